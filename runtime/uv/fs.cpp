// rp_fs_*: libuv's file operations on uv_fs_t, run through the loop's ring
// instead of libuv's thread pool. Each keeps its uv_fs_* twin's contract; where
// the ring cannot run an operation (the fallback backend, or a kernel whose
// io_uring lacks the opcode) the twin itself runs it, so results never differ.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>

#include <cerrno>
#include <climits>
#include <memory>
#include <new>

#include "ringpark.h"
#include "runtime/uv/fs.hpp"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail {

namespace {
UvFsTwins g_twins;
}  // namespace

const UvFsTwins& uv_fs_twins() noexcept { return g_twins; }
void set_uv_fs_twins(const UvFsTwins& twins) noexcept { g_twins = twins; }

namespace {

struct FsSet;

// One file operation in the ring. Owned by the ring from submit until its
// completion, which frees it before running the user's callback: the kernel
// writes into `stx` and the buffers `iov` points at until then.
struct FsOp {
  Op op;
  uv_fs_t* req = nullptr;
  struct statx stx {};
  iovec small[4];
  std::unique_ptr<iovec[]> big;
  // On its loop's list of requests in the ring, from submit to completion.
  FsSet* set = nullptr;
  FsOp* prev = nullptr;
  FsOp* next = nullptr;
};

// The loop's requests in the ring, for a forked child to forget (after_fork).
struct FsSet final : LoopContext::Extension {
  void stop() noexcept override {}
  // Every request on the list was in the parent's ring and never completes
  // here; its callback runs in the parent only (libuv's own thread pool loses
  // a child's copies of its requests the same way). It stops counting as an
  // active request of the loop, so the child's uv_run can end, and our part of
  // it is freed (the kernel writes the parent's copy, never ours).
  void after_fork() noexcept override {
    while (head != nullptr) {
      FsOp* f = head;
      head = f->next;
      uv_private::req_unregister(loop);
      delete f;
    }
  }

  void link(FsOp* f) noexcept {
    f->set = this;
    f->prev = nullptr;
    f->next = head;
    if (head) head->prev = f;
    head = f;
  }
  void unlink(FsOp* f) noexcept {
    if (f->prev) {
      f->prev->next = f->next;
    } else {
      head = f->next;
    }
    if (f->next) f->next->prev = f->prev;
    f->set = nullptr;
  }

  uv_loop_t* loop = nullptr;
  FsOp* head = nullptr;
};

FsSet* fs_set(LoopContext* ctx) noexcept {
  if (auto* set = ctx->find_extension<FsSet>()) return set;
  std::unique_ptr<FsSet> made(new (std::nothrow) FsSet);
  if (!made) return nullptr;
  made->loop = ctx->loop();
  return ctx->add_extension(std::move(made));
}

void to_uv_stat(const struct statx& s, uv_stat_t* out) noexcept {
  // Field for field what libuv's own statx path fills in (src/unix/fs.c).
  out->st_dev = makedev(s.stx_dev_major, s.stx_dev_minor);
  out->st_mode = s.stx_mode;
  out->st_nlink = s.stx_nlink;
  out->st_uid = s.stx_uid;
  out->st_gid = s.stx_gid;
  out->st_rdev = makedev(s.stx_rdev_major, s.stx_rdev_minor);
  out->st_ino = s.stx_ino;
  out->st_size = s.stx_size;
  out->st_blksize = s.stx_blksize;
  out->st_blocks = s.stx_blocks;
  out->st_atim = {s.stx_atime.tv_sec, s.stx_atime.tv_nsec};
  out->st_mtim = {s.stx_mtime.tv_sec, s.stx_mtime.tv_nsec};
  out->st_ctim = {s.stx_ctime.tv_sec, s.stx_ctime.tv_nsec};
  out->st_birthtim = {s.stx_btime.tv_sec, s.stx_btime.tv_nsec};
  out->st_flags = 0;
  out->st_gen = 0;
}

void on_complete(Op* op, int res, std::uint32_t) noexcept {
  auto* f = static_cast<FsOp*>(op->data);
  uv_fs_t* req = f->req;
  req->result = res;
  if (res == 0 &&
      (req->fs_type == UV_FS_STAT || req->fs_type == UV_FS_LSTAT || req->fs_type == UV_FS_FSTAT)) {
    to_uv_stat(f->stx, &req->statbuf);
    req->ptr = &req->statbuf;
  }
  if (f->set) f->set->unlink(f);
  delete f;  // the kernel is done with it: this is the op's final completion
  uv_private::req_unregister(req->loop);
  req->cb(req);
}

// The loop's context when the ring can run `code`, else null (run libuv's twin).
LoopContext* ring_for(uv_loop_t* loop, OpCode code) noexcept {
  if (loop == nullptr) return nullptr;
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return nullptr;
  return ctx->chain().io().native(code) ? ctx : nullptr;
}

// Fills the request as libuv would and makes the ring op for it. Null (with
// *err set) when memory runs out; then nothing was changed that needs undoing.
FsOp* begin(uv_loop_t* loop, uv_fs_t* req, uv_fs_type type, OpCode code, uv_fs_cb cb,
            const char* path, const char* new_path, int* err) noexcept {
  auto* f = new (std::nothrow) FsOp;
  if (f == nullptr) {
    *err = UV_ENOMEM;
    return nullptr;
  }
  uv_private::fs_init(req, loop, type, cb);
  if (path != nullptr && (*err = uv_private::fs_copy_paths(req, path, new_path)) != 0) {
    delete f;
    return nullptr;
  }
  f->req = req;
  f->op.code = code;
  f->op.complete = &on_complete;
  f->op.data = f;
  // The path copies belong to req, which the caller keeps alive until the
  // callback (libuv's rule), so the kernel may read them until then.
  f->op.path = req->path;
  f->op.path2 = req->new_path;
  return f;
}

int submit(LoopContext* ctx, FsOp* f) noexcept {
  FsSet* set = fs_set(ctx);
  if (set == nullptr) {
    uv_fs_req_cleanup(f->req);  // the path copies begin() made
    delete f;
    return UV_ENOMEM;
  }
  set->link(f);
  uv_private::req_register(f->req->loop);
  ctx->chain().io().submit(&f->op);
  ctx->update_ref();
  return 0;
}

// Points the op at the caller's buffers: one plain buffer, or a copy of the
// uv_buf_t array as iovecs (the same layout on unix) that the op owns.
bool set_buffers(FsOp* f, const uv_buf_t bufs[], unsigned nbufs, OpCode single,
                 OpCode vectored) noexcept {
  if (nbufs == 1 && bufs[0].len <= UINT32_MAX) {
    f->op.code = single;
    f->op.buf = bufs[0].base;
    f->op.len = static_cast<std::uint32_t>(bufs[0].len);
    return true;
  }
  iovec* iov = f->small;
  if (nbufs > 4) {
    f->big.reset(new (std::nothrow) iovec[nbufs]);
    if (!f->big) return false;
    iov = f->big.get();
  }
  for (unsigned i = 0; i < nbufs; ++i) iov[i] = {bufs[i].base, bufs[i].len};
  f->op.code = vectored;
  f->op.buf = iov;
  f->op.len = nbufs;
  return true;
}

int read_or_write(uv_loop_t* loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
                  unsigned nbufs, std::int64_t offset, uv_fs_cb cb, bool is_write) {
  auto twin = is_write ? uv_fs_twins().write : uv_fs_twins().read;
  const OpCode single = is_write ? OpCode::write : OpCode::read;
  const OpCode vectored = is_write ? OpCode::writev : OpCode::readv;
  // libuv's own checks and synchronous mode come first, unchanged.
  if (cb == nullptr || req == nullptr || bufs == nullptr || nbufs == 0 || nbufs > IOV_MAX)
    return twin(loop, req, file, bufs, nbufs, offset, cb);
  LoopContext* ctx = ring_for(loop, nbufs == 1 ? single : vectored);
  if (ctx == nullptr) return twin(loop, req, file, bufs, nbufs, offset, cb);
  int err = 0;
  FsOp* f =
      begin(loop, req, is_write ? UV_FS_WRITE : UV_FS_READ, single, cb, nullptr, nullptr, &err);
  if (f == nullptr) return err;
  if (!set_buffers(f, bufs, nbufs, single, vectored)) {
    delete f;
    return UV_ENOMEM;
  }
  uv_private::fs_set_args(req, file, 0, 0, offset);
  f->op.fd = file;
  f->op.offset = offset < 0 ? -1 : offset;  // -1: the file position, as libuv's read()
  return submit(ctx, f);
}

int stat_like(LoopContext* ctx, uv_loop_t* loop, uv_fs_t* req, uv_fs_type type, const char* path,
              uv_file file, uv_fs_cb cb) {
  int err = 0;
  FsOp* f = begin(loop, req, type, OpCode::statx, cb, path, nullptr, &err);
  if (f == nullptr) return err;
  // As libuv: sync-as-stat, the basic fields and birth time; fstat names the fd
  // with an empty path.
  f->op.flags = AT_STATX_SYNC_AS_STAT;
  if (type == UV_FS_LSTAT) f->op.flags |= AT_SYMLINK_NOFOLLOW;
  if (type == UV_FS_FSTAT) {
    f->op.flags |= AT_EMPTY_PATH;
    f->op.dfd = file;
    f->op.path = "";
    uv_private::fs_set_args(req, file, 0, 0, 0);
  }
  f->op.len = STATX_BASIC_STATS | STATX_BTIME;
  f->op.statxbuf = &f->stx;
  return submit(ctx, f);
}

}  // namespace
}  // namespace ringpark::detail

using namespace ringpark::detail;

extern "C" {

int rp_fs_read(uv_loop_t* loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
               unsigned int nbufs, int64_t offset, uv_fs_cb cb) {
  return read_or_write(loop, req, file, bufs, nbufs, offset, cb, false);
}

int rp_fs_write(uv_loop_t* loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
                unsigned int nbufs, int64_t offset, uv_fs_cb cb) {
  return read_or_write(loop, req, file, bufs, nbufs, offset, cb, true);
}

int rp_fs_open(uv_loop_t* loop, uv_fs_t* req, const char* path, int flags, int mode, uv_fs_cb cb) {
  LoopContext* ctx =
      cb == nullptr || req == nullptr || path == nullptr ? nullptr : ring_for(loop, OpCode::openat);
  if (ctx == nullptr) return uv_fs_twins().open(loop, req, path, flags, mode, cb);
  int err = 0;
  FsOp* f = begin(loop, req, UV_FS_OPEN, OpCode::openat, cb, path, nullptr, &err);
  if (f == nullptr) return err;
  uv_private::fs_set_args(req, -1, flags, mode, 0);
  f->op.flags = flags | O_CLOEXEC;  // libuv opens every file close-on-exec
  f->op.mode = static_cast<std::uint32_t>(mode);
  return submit(ctx, f);
}

#define RP_FD_OP(name, twin, type, code)                                \
  int name(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb) {  \
    LoopContext* ctx = cb && req ? ring_for(loop, code) : nullptr;      \
    if (ctx == nullptr) return uv_fs_twins().twin(loop, req, file, cb); \
    int err = 0;                                                        \
    FsOp* f = begin(loop, req, type, code, cb, nullptr, nullptr, &err); \
    if (f == nullptr) return err;                                       \
    uv_private::fs_set_args(req, file, 0, 0, 0);                        \
    f->op.fd = file;                                                    \
    return submit(ctx, f);                                              \
  }

RP_FD_OP(rp_fs_close, close, UV_FS_CLOSE, OpCode::close)
RP_FD_OP(rp_fs_fsync, fsync, UV_FS_FSYNC, OpCode::fsync)
RP_FD_OP(rp_fs_fdatasync, fdatasync, UV_FS_FDATASYNC, OpCode::fdatasync)
#undef RP_FD_OP

int rp_fs_ftruncate(uv_loop_t* loop, uv_fs_t* req, uv_file file, int64_t offset, uv_fs_cb cb) {
  LoopContext* ctx = cb == nullptr || req == nullptr ? nullptr : ring_for(loop, OpCode::ftruncate);
  if (ctx == nullptr) return uv_fs_twins().ftruncate(loop, req, file, offset, cb);
  int err = 0;
  FsOp* f = begin(loop, req, UV_FS_FTRUNCATE, OpCode::ftruncate, cb, nullptr, nullptr, &err);
  if (f == nullptr) return err;
  uv_private::fs_set_args(req, file, 0, 0, offset);
  f->op.fd = file;
  f->op.offset = offset;
  return submit(ctx, f);
}

int rp_fs_stat(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb) {
  LoopContext* ctx =
      cb == nullptr || req == nullptr || path == nullptr ? nullptr : ring_for(loop, OpCode::statx);
  if (ctx == nullptr) return uv_fs_twins().stat(loop, req, path, cb);
  return stat_like(ctx, loop, req, UV_FS_STAT, path, -1, cb);
}

int rp_fs_lstat(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb) {
  LoopContext* ctx =
      cb == nullptr || req == nullptr || path == nullptr ? nullptr : ring_for(loop, OpCode::statx);
  if (ctx == nullptr) return uv_fs_twins().lstat(loop, req, path, cb);
  return stat_like(ctx, loop, req, UV_FS_LSTAT, path, -1, cb);
}

int rp_fs_fstat(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb) {
  LoopContext* ctx = cb == nullptr || req == nullptr ? nullptr : ring_for(loop, OpCode::statx);
  if (ctx == nullptr) return uv_fs_twins().fstat(loop, req, file, cb);
  return stat_like(ctx, loop, req, UV_FS_FSTAT, nullptr, file, cb);
}

int rp_fs_unlink(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb) {
  LoopContext* ctx = cb == nullptr || req == nullptr || path == nullptr
                         ? nullptr
                         : ring_for(loop, OpCode::unlinkat);
  if (ctx == nullptr) return uv_fs_twins().unlink(loop, req, path, cb);
  int err = 0;
  FsOp* f = begin(loop, req, UV_FS_UNLINK, OpCode::unlinkat, cb, path, nullptr, &err);
  if (f == nullptr) return err;
  return submit(ctx, f);
}

int rp_fs_mkdir(uv_loop_t* loop, uv_fs_t* req, const char* path, int mode, uv_fs_cb cb) {
  LoopContext* ctx = cb == nullptr || req == nullptr || path == nullptr
                         ? nullptr
                         : ring_for(loop, OpCode::mkdirat);
  if (ctx == nullptr) return uv_fs_twins().mkdir(loop, req, path, mode, cb);
  int err = 0;
  FsOp* f = begin(loop, req, UV_FS_MKDIR, OpCode::mkdirat, cb, path, nullptr, &err);
  if (f == nullptr) return err;
  uv_private::fs_set_args(req, -1, 0, mode, 0);
  f->op.mode = static_cast<std::uint32_t>(mode);
  return submit(ctx, f);
}

int rp_fs_rename(uv_loop_t* loop, uv_fs_t* req, const char* path, const char* new_path,
                 uv_fs_cb cb) {
  LoopContext* ctx = cb == nullptr || req == nullptr || path == nullptr || new_path == nullptr
                         ? nullptr
                         : ring_for(loop, OpCode::renameat);
  if (ctx == nullptr) return uv_fs_twins().rename(loop, req, path, new_path, cb);
  int err = 0;
  FsOp* f = begin(loop, req, UV_FS_RENAME, OpCode::renameat, cb, path, new_path, &err);
  if (f == nullptr) return err;
  return submit(ctx, f);
}

}  // extern "C"
