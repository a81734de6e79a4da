// libringpark-preload.so: loaded with LD_PRELOAD into a dynamically linked
// libuv 1.x program, it interposes
// - uv_run, so that the program runs on ringpark without a rebuild;
// - the asynchronous file requests uv_fs_open, close, read, write, fsync,
//   fdatasync, stat, fstat, lstat, unlink, rename, mkdir and ftruncate, so that
//   the program's file I/O goes through the loop's ring instead of libuv's
//   thread pool (each is its rp_fs_* twin, with the same contract).
// Calls with cb == NULL (libuv's synchronous mode) go straight to libuv.
// RINGPARK_BACKEND=epoll still selects the fallback, where rp_fs_* are libuv's
// own calls; RINGPARK_PRELOAD_FS=0 leaves every uv_fs_* call to libuv.
//
// Recursion: ringpark's own calls to uv_run and uv_fs_* (rp_fs_* fall back on
// their uv_fs_* twin) would resolve to the definitions below, which call back
// into ringpark. So every such call goes through a pointer that the
// constructor aims at the next definition in the lookup order (libuv's):
// set_real_uv_run and set_uv_fs_twins.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "ringpark.h"
#include "runtime/uv/fs.hpp"
#include "runtime/uv/loop.hpp"

namespace {

void* next_symbol(const char* name) noexcept {
  void* sym = ::dlsym(RTLD_NEXT, name);
  if (sym == nullptr) {
    std::fprintf(stderr, "ringpark-preload: no %s after this library: %s\n", name, ::dlerror());
    std::abort();
  }
  return sym;
}

ringpark::detail::UvReactor::RunFn next_uv_run() noexcept {
  static auto next = reinterpret_cast<ringpark::detail::UvReactor::RunFn>(next_symbol("uv_run"));
  return next;
}

template <typename Fn>
void aim(Fn& fn, const char* name) noexcept {
  fn = reinterpret_cast<Fn>(next_symbol(name));
}

// libuv's uv_fs_* (never ours), and whether the file part is on.
struct Fs {
  ringpark::detail::UvFsTwins real;
  bool enabled = true;
};

const Fs& fs() noexcept {
  static std::once_flag once;
  static Fs state;
  std::call_once(once, [] {
    auto& r = state.real;
    aim(r.open, "uv_fs_open");
    aim(r.close, "uv_fs_close");
    aim(r.read, "uv_fs_read");
    aim(r.write, "uv_fs_write");
    aim(r.fsync, "uv_fs_fsync");
    aim(r.fdatasync, "uv_fs_fdatasync");
    aim(r.stat, "uv_fs_stat");
    aim(r.fstat, "uv_fs_fstat");
    aim(r.lstat, "uv_fs_lstat");
    aim(r.unlink, "uv_fs_unlink");
    aim(r.rename, "uv_fs_rename");
    aim(r.mkdir, "uv_fs_mkdir");
    aim(r.ftruncate, "uv_fs_ftruncate");
    // rp_fs_* fall back on libuv's functions, not on the interposers below.
    ringpark::detail::set_uv_fs_twins(r);
    const char* env = std::getenv("RINGPARK_PRELOAD_FS");
    state.enabled = env == nullptr || std::strcmp(env, "0") != 0;
  });
  return state;
}

}  // namespace

// Ringpark's own calls to uv_run and uv_fs_* would otherwise resolve to the
// definitions below.
__attribute__((constructor)) static void ringpark_preload_init() {
  ringpark::detail::set_real_uv_run(next_uv_run());
  (void)fs();
}

#define RP_EXPORT extern "C" __attribute__((visibility("default")))

RP_EXPORT int uv_run(uv_loop_t* loop, uv_run_mode mode) {
  // A uv_run from another library's constructor may come before ours ran.
  ringpark::detail::set_real_uv_run(next_uv_run());
  (void)fs();
  return rp_uv_run(loop, mode);
}

// Each interposer: the real function when the file part is off or the call is
// synchronous, else its rp_fs_* twin. fs() also covers a call made from
// another library's constructor, before ours ran.
#define RP_INTERPOSE(name, rp_name, member, params, args)       \
  RP_EXPORT int name params {                                   \
    const Fs& f = fs();                                         \
    if (!f.enabled || cb == nullptr) return f.real.member args; \
    return rp_name args;                                        \
  }

RP_INTERPOSE(uv_fs_open, rp_fs_open, open,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, int flags, int mode, uv_fs_cb cb),
             (loop, req, path, flags, mode, cb))
RP_INTERPOSE(uv_fs_close, rp_fs_close, close,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_read, rp_fs_read, read,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
              unsigned int nbufs, int64_t offset, uv_fs_cb cb),
             (loop, req, file, bufs, nbufs, offset, cb))
RP_INTERPOSE(uv_fs_write, rp_fs_write, write,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
              unsigned int nbufs, int64_t offset, uv_fs_cb cb),
             (loop, req, file, bufs, nbufs, offset, cb))
RP_INTERPOSE(uv_fs_fsync, rp_fs_fsync, fsync,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_fdatasync, rp_fs_fdatasync, fdatasync,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_stat, rp_fs_stat, stat,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_fstat, rp_fs_fstat, fstat,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_lstat, rp_fs_lstat, lstat,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_unlink, rp_fs_unlink, unlink,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_rename, rp_fs_rename, rename,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, const char* new_path, uv_fs_cb cb),
             (loop, req, path, new_path, cb))
RP_INTERPOSE(uv_fs_mkdir, rp_fs_mkdir, mkdir,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, int mode, uv_fs_cb cb),
             (loop, req, path, mode, cb))
RP_INTERPOSE(uv_fs_ftruncate, rp_fs_ftruncate, ftruncate,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, int64_t offset, uv_fs_cb cb),
             (loop, req, file, offset, cb))

#undef RP_INTERPOSE
#undef RP_EXPORT
