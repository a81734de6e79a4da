/* ringpark: io_uring under the libuv loop an application already has.
 *
 * The C API mirrors libuv: same names with an rp_ prefix, same argument order,
 * same error convention (0 or a negative UV_E* code), same lifetime rule (a
 * request or handle must stay valid until its callback has run; if a call that
 * takes a callback returns an error, that callback never runs).
 *
 * Threads: every function here must be called on the thread that runs the loop,
 * like the libuv functions they mirror.
 */
#ifndef RINGPARK_H_
#define RINGPARK_H_

#include <stdint.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Counters of the loop's ringpark chain. "Syscalls per operation" is the number
 * this library exists to lower; these make it visible. */
typedef struct rp_stats_s {
  uint64_t turns;          /* loop iterations ringpark took part in */
  uint64_t enters;         /* io_uring_enter calls (epoll_wait calls on the fallback) */
  uint64_t sqes_submitted; /* SQEs handed to the kernel (0 on the fallback) */
  uint64_t cqes_reaped;    /* CQEs taken off the ring (0 on the fallback) */
} rp_stats_t;

/* A drop-in replacement for uv_run(loop, mode): same modes, same return value
 * (non-zero while referenced handles or requests remain), uv_stop() honoured.
 * While it runs, ringpark's own operations on this loop go through one
 * io_uring (or the epoll fallback) and the loop sleeps in the ring when they
 * are in flight. Blocks as uv_run does. The first call sets up the loop's
 * ringpark state; if even the fallback cannot be set up it runs plain uv_run. */
int rp_uv_run(uv_loop_t* loop, uv_run_mode mode);

/* Fills *stats for `loop`. Returns 0, or UV_EINVAL for null arguments. A loop
 * ringpark has not seen yet reads as all zeros. Never blocks. */
int rp_stats(uv_loop_t* loop, rp_stats_t* stats);

/* Which backend runs `loop`: "io_uring", or "epoll (<why>)" such as
 * "epoll (io_uring_setup: EPERM)" or "epoll (RINGPARK_BACKEND=epoll)". Sets up
 * the loop's ringpark state if needed. The string lives as long as that state
 * (until rp_loop_close). Never null. */
const char* rp_backend(uv_loop_t* loop);

/* uv_loop_close(loop) that also releases ringpark's state for the loop (its ring
 * and hidden handles). Returns UV_EBUSY, and closes nothing, while handles,
 * requests or ringpark operations are still active. A program that calls plain
 * uv_loop_close instead works, but keeps a ring's worth of memory per loop. */
int rp_loop_close(uv_loop_t* loop);

/* ---- Files on uv_fs_t, through the ring ------------------------------------
 *
 * Each has exactly the signature of its uv_fs_* twin and fills the same
 * uv_fs_t fields for the callback (result, ptr/statbuf, path, fs_type), so a
 * libuv program migrates by renaming; uv_fs_req_cleanup(req) is safe after the
 * callback. With cb == NULL the call runs synchronously, as libuv's does (it is
 * libuv's own synchronous call). Operations the running kernel's io_uring lacks,
 * and every operation on the epoll fallback, run as libuv's own uv_fs_* call on
 * libuv's thread pool, with the same results. Differences from libuv:
 *  - uv_cancel(req) returns UV_EBUSY once the operation is in the ring (libuv
 *    also returns UV_EBUSY for work its pool has started);
 *  - req->path is copied with malloc(): a program that replaced libuv's
 *    allocator with uv_replace_allocator must not use these with paths. */
int rp_fs_open(uv_loop_t* loop, uv_fs_t* req, const char* path, int flags, int mode,
               uv_fs_cb cb);
int rp_fs_close(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb);
int rp_fs_read(uv_loop_t* loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
               unsigned int nbufs, int64_t offset, uv_fs_cb cb);
int rp_fs_write(uv_loop_t* loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
                unsigned int nbufs, int64_t offset, uv_fs_cb cb);
int rp_fs_fsync(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb);
int rp_fs_fdatasync(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb);
int rp_fs_stat(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb);
int rp_fs_fstat(uv_loop_t* loop, uv_fs_t* req, uv_file file, uv_fs_cb cb);
int rp_fs_lstat(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb);
int rp_fs_unlink(uv_loop_t* loop, uv_fs_t* req, const char* path, uv_fs_cb cb);
int rp_fs_rename(uv_loop_t* loop, uv_fs_t* req, const char* path, const char* new_path,
                 uv_fs_cb cb);
int rp_fs_mkdir(uv_loop_t* loop, uv_fs_t* req, const char* path, int mode, uv_fs_cb cb);
int rp_fs_ftruncate(uv_loop_t* loop, uv_fs_t* req, uv_file file, int64_t offset,
                    uv_fs_cb cb);

#ifdef __cplusplus
}
#endif

#endif /* RINGPARK_H_ */
