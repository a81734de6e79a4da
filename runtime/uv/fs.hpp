// The libuv functions rp_fs_* fall back on (synchronous calls, bad input, and
// operations the ring cannot run), reached through pointers so that the
// preload library, which defines uv_fs_* itself, can aim them at libuv's real
// definitions; called by name, they would resolve to the preload's own
// interposers and recurse. This mirrors real_uv_run()/set_real_uv_run().
#pragma once

#include <uv.h>

namespace ringpark::detail {

struct UvFsTwins {
  decltype(&uv_fs_open) open = &uv_fs_open;
  decltype(&uv_fs_close) close = &uv_fs_close;
  decltype(&uv_fs_read) read = &uv_fs_read;
  decltype(&uv_fs_write) write = &uv_fs_write;
  decltype(&uv_fs_fsync) fsync = &uv_fs_fsync;
  decltype(&uv_fs_fdatasync) fdatasync = &uv_fs_fdatasync;
  decltype(&uv_fs_stat) stat = &uv_fs_stat;
  decltype(&uv_fs_fstat) fstat = &uv_fs_fstat;
  decltype(&uv_fs_lstat) lstat = &uv_fs_lstat;
  decltype(&uv_fs_unlink) unlink = &uv_fs_unlink;
  decltype(&uv_fs_rename) rename = &uv_fs_rename;
  decltype(&uv_fs_mkdir) mkdir = &uv_fs_mkdir;
  decltype(&uv_fs_ftruncate) ftruncate = &uv_fs_ftruncate;
};

// The twins in use: libuv's functions unless set_uv_fs_twins replaced them.
const UvFsTwins& uv_fs_twins() noexcept;
// Replaces the twins. Call before any rp_fs_* call can run (the preload does,
// from its constructor); not synchronised with concurrent rp_fs_* calls.
void set_uv_fs_twins(const UvFsTwins& twins) noexcept;

}  // namespace ringpark::detail
