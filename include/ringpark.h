/* ringpark: io_uring under the libuv loop an application already has.
 *
 * The C API mirrors libuv: same names with an rp_ prefix, same argument order,
 * same error convention (0 or a negative UV_E* code), same lifetime rule (a
 * request or handle must stay valid until its callback has run; if a call that
 * takes a callback returns an error, that callback never runs).
 *
 * Threads: every function here must be called on the thread that runs the loop,
 * like the libuv functions they mirror.
 *
 * fork(2): a loop's ring is shared with a forked child (its memory is mapped
 * MAP_SHARED), so the child never touches the parent's ring, eventfd or epoll
 * set beyond closing and unmapping them, and the parent keeps every one of its
 * completions. The first ringpark call on the loop in the child (rp_uv_run,
 * rp_fs_*, rp_poll_*, or ringpark's hidden handles inside a plain uv_run) gives
 * the loop a fresh ring, on the same loop and handles:
 *  - operations that were in flight at the fork never complete in the child
 *    (their callbacks run in the parent only), and no longer keep the child's
 *    loop alive;
 *  - a started rp_poll_t watches again in the child's ring; one being closed
 *    gets its close callback;
 *  - the child must call uv_loop_fork(loop) before it runs the loop, as libuv
 *    requires (until then libuv's own epoll set is the parent's).
 * A fork from inside a ringpark callback is fine: in the child, nothing more of
 * that loop iteration's ringpark completions runs.
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
 * "epoll (io_uring_setup: EPERM)" (a seccomp filter),
 * "epoll (io_uring_setup: EPERM (kernel.io_uring_disabled=2: ...))",
 * "epoll (io_uring_setup: ENOMEM (RLIMIT_MEMLOCK: a ring of 64 entries needs
 * 8 KiB of locked memory, the limit is 0 KiB, ...))" or
 * "epoll (RINGPARK_BACKEND=epoll)". Under a small RLIMIT_MEMLOCK a loop's ring
 * gets fewer entries (down to 64) before it falls back. Sets up the loop's
 * ringpark state if needed. The string lives as long as that state (until
 * rp_loop_close, or until a forked child gives the loop a fresh ring). Never
 * null. */
const char* rp_backend(uv_loop_t* loop);

/* Whether the program's own uv_tcp_t streams on `loop` are adopted (their
 * reads and writes run through the loop's ring; see the README's "Adoption"):
 * "on", or "off (<why>)" such as "off (RINGPARK_ADOPT=0)" or "off (the loop
 * runs on the epoll fallback)". Adoption needs libringpark-preload (as
 * LD_PRELOAD, or linked ahead of libuv), whose interposers take the calls;
 * "on" says only that nothing else stands in its way. Sets up the loop's
 * ringpark state if needed. The string is valid until the next call on the
 * same thread. Never null; never blocks. */
const char* rp_adoption(uv_loop_t* loop);

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

/* ---- TCP handles (section owned by runtime/uv/tcp.cpp) ---------------------- */

/* rp_tcp_t is a TCP stream whose accepts, connects, reads, writes, shutdown and
 * close are operations in the loop's ring (or the epoll fallback), so all the
 * socket I/O that one loop iteration starts goes to the kernel in one
 * io_uring_enter. The calls mirror libuv's uv_tcp_* and uv_stream functions
 * (names, argument order, error codes, callback order); a libuv program
 * migrates by renaming uv_tcp_t to rp_tcp_t and uv_X to rp_X.
 *
 * Lifetime, as in libuv: a handle stays valid from rp_tcp_init until its close
 * callback has run, a request until its callback has run; the memory may be
 * freed or reused from inside those callbacks. The close callback runs once,
 * after the final completion of every operation of the handle, and the socket
 * is closed only then, so a reused fd number never sees the old socket's
 * completions. If a call that takes a callback returns an error, that
 * callback never runs. Every callback runs on the loop thread from inside
 * rp_uv_run (or uv_run), never from inside the call that started the work.
 *
 * Reading runs one of two ways, chosen per handle at its first
 * rp_read_start:
 *  - multishot (io_uring with provided buffer rings and multishot recv, Linux
 *    6.0): one request keeps receiving into buffers ringpark owns (16 KiB
 *    each), for as long as the handle reads. alloc_cb runs when data has
 *    arrived, as in libuv, with suggested_size the number of bytes waiting
 *    (at most 65536, libuv's fixed suggestion), and the bytes are copied into
 *    its buffer; bytes that do not fit take more alloc_cb/read_cb rounds,
 *    nothing is dropped. No buffer of the user's is lent this way, so rp_close
 *    runs no read_cb, as libuv on Unix. EOF and errors come with a null
 *    buffer (base NULL, len 0), which libuv's contract allows. A bulk stream,
 *    one that fills those buffers back to back, reads the plain way (no copy,
 *    a lent buffer) until its reads are small again;
 *  - plain (the epoll fallback, older kernels, RINGPARK_RECV_MULTISHOT=0): a
 *    recv into alloc_cb's buffer. alloc_cb runs when a read is queued (in
 *    rp_read_start and after each read callback), not when data arrives: the
 *    buffer is lent to the kernel while the recv waits. It therefore always
 *    comes back through read_cb: after rp_read_stop it is kept and reused by
 *    the next rp_read_start; at rp_close, read_cb runs once more with
 *    UV_ECANCELED and the buffer, before the close callback, as libuv does on
 *    Windows where reads are also lent.
 * Either way bytes that arrive after rp_read_stop are kept and delivered,
 * first, after the next rp_read_start: nothing is lost. A read_cb that frees
 * buf->base in every case (NULL included) is right for both.
 *
 * Writes queued during one loop iteration go out together at its end: one
 * send for a lone buffer, else one sendmsg gathering the buffers of every
 * write queued (up to IOV_MAX of them); each write's callback comes once its
 * bytes are out, in order.
 *
 * Differences from libuv a user may notice:
 *  - writes go out at the end of the loop iteration, not inside rp_write
 *    (libuv writes inside uv_write when nothing is queued); a write followed
 *    at once by rp_close still goes out, as libuv's would;
 *  - a write to a broken connection fails with UV_EPIPE and never raises
 *    SIGPIPE (libuv's writev raises it);
 *  - handles are not uv_handle_t: uv_walk does not see them (rp_loop_close
 *    still answers UV_EBUSY while any is open, as uv_loop_close does). */

typedef struct rp_tcp_s rp_tcp_t;
typedef struct rp_write_s rp_write_t;
typedef struct rp_connect_s rp_connect_t;
typedef struct rp_shutdown_s rp_shutdown_t;

/* uv_alloc_cb for rp_tcp_t: fill *buf (base NULL or len 0 means "no buffer
 * now": read_cb then gets UV_ENOBUFS once the socket is readable, and the
 * bytes wait for the next try, in the next loop iteration). suggested_size is
 * a hint, as in libuv: 65536, or on the multishot path the bytes waiting. */
typedef void (*rp_alloc_cb)(rp_tcp_t* handle, size_t suggested_size, uv_buf_t* buf);
/* nread > 0: bytes read; 0: nothing read (EAGAIN); UV_EOF: the peer shut
 * down its side (reading stops); other negative values: an error (reading
 * stops; close the handle). `buf` is the one alloc_cb gave, or, for UV_EOF
 * and errors on the multishot path, a null buffer (base NULL, len 0). */
typedef void (*rp_read_cb)(rp_tcp_t* handle, ssize_t nread, const uv_buf_t* buf);
typedef void (*rp_write_cb)(rp_write_t* req, int status);
typedef void (*rp_connect_cb)(rp_connect_t* req, int status);
typedef void (*rp_shutdown_cb)(rp_shutdown_t* req, int status);
typedef void (*rp_connection_cb)(rp_tcp_t* server, int status);
typedef void (*rp_close_cb)(rp_tcp_t* handle);

/* The private words hold the operation the kernel may write into and the
 * handle's state (runtime/uv/tcp.cpp checks at build time that they fit).
 * Never touch them. */
struct rp_tcp_s {
  void* data;      /* for the user */
  uv_loop_t* loop; /* read-only */
  uint64_t private_[112];
};

struct rp_write_s {
  void* data;       /* for the user */
  rp_tcp_t* handle; /* read-only */
  rp_write_cb cb;   /* read-only */
  uint64_t private_[40];
};

struct rp_connect_s {
  void* data;
  rp_tcp_t* handle;
  rp_connect_cb cb;
  uint64_t private_[28];
};

struct rp_shutdown_s {
  void* data;
  rp_tcp_t* handle;
  rp_shutdown_cb cb;
  uint64_t private_[24];
};

/* Initialises `handle` on `loop` without a socket (made by bind, connect or
 * listen, as in libuv). Returns 0, UV_EINVAL for null arguments, UV_EBUSY for
 * a handle that is live already (initialised and its close callback not run
 * yet: nothing of it changes), or UV_EMFILE when the loop's ringpark state
 * cannot be set up. Never blocks. */
int rp_tcp_init(uv_loop_t* loop, rp_tcp_t* handle);
/* Takes an existing connected (or connecting) socket, made non-blocking; the
 * handle owns it from then on and closes it in rp_close. Returns 0, UV_EBADF
 * for an invalid fd, UV_EBUSY if the handle already has a socket, UV_EINVAL
 * for a closing or uninitialised handle. */
int rp_tcp_open(rp_tcp_t* handle, uv_os_sock_t sock);
/* As uv_tcp_bind: makes a socket of addr's family (SOCK_NONBLOCK|CLOEXEC), sets
 * SO_REUSEADDR and binds. flags: 0 or UV_TCP_IPV6ONLY. EADDRINUSE is reported
 * later, by rp_listen or the connect callback, as libuv does. Returns 0 or a
 * negative UV_E* code (UV_EINVAL for null or non-IP addresses). Never blocks. */
int rp_tcp_bind(rp_tcp_t* handle, const struct sockaddr* addr, unsigned int flags);
/* Listens and keeps one multishot accept in flight. `cb` runs once per
 * accepted connection (status 0; call rp_accept inside or later to take it;
 * connections not taken stay queued and are closed with the server), or with
 * a negative status for an accept error. After an error such as UV_EMFILE,
 * which the next attempt would hit too, accepting resumes 10 ms later (and
 * each failed attempt is reported) rather than spinning. Returns 0, UV_EINVAL
 * (null cb, closing handle), the deferred bind error, or listen(2)'s error. */
int rp_listen(rp_tcp_t* server, int backlog, rp_connection_cb cb);
/* Hands the oldest queued connection of `server` to `client`, an initialised
 * handle without a socket. Returns 0, UV_EAGAIN when none is queued, UV_EBUSY
 * when `client` already has a socket (the connection stays queued), or
 * UV_EINVAL for a closing or uninitialised handle. */
int rp_accept(rp_tcp_t* server, rp_tcp_t* client);
/* Connects to `addr` (IPv4 or IPv6). `cb` (may be null) gets 0 or the error,
 * e.g. UV_ECONNREFUSED, or UV_ECANCELED if the handle is closed first. Writes
 * and rp_read_start may be issued before it completes; they start once it
 * succeeds. Returns 0, UV_EINVAL (null req/handle/addr, non-IP address,
 * closing handle), UV_EALREADY while a connect is in progress, or an error
 * from creating the socket. */
int rp_tcp_connect(rp_connect_t* req, rp_tcp_t* handle, const struct sockaddr* addr,
                   rp_connect_cb cb);
/* Starts reading (see above: one multishot recv for as long as the handle
 * reads, or a recv into alloc_cb's buffer queued again after each read
 * callback). Returns 0, UV_EINVAL (null arguments, closing handle),
 * UV_EALREADY when already reading, or UV_ENOTCONN when the handle has no
 * connected socket. On the plain path it calls alloc_cb before it returns;
 * it never calls read_cb (bytes kept since an rp_read_stop come from the
 * loop). */
int rp_read_start(rp_tcp_t* handle, rp_alloc_cb alloc_cb, rp_read_cb read_cb);
/* Stops reading; no read callback runs until the next rp_read_start (or, on
 * the plain path, the close, which hands back a lent buffer). The recv in
 * flight is cancelled (a request: bytes it still gets, and a lent buffer, are
 * kept for the next start, and so are an EOF or error that come with them).
 * Returns 0 (also when not reading), or UV_EINVAL for an uninitialised
 * handle. */
int rp_read_stop(rp_tcp_t* handle);
/* Queues a write of `bufs` (the array is copied, the bytes are not: they must
 * stay valid until the callback). Writes go out in order, each completely
 * (short sends are continued) before its callback runs with 0, or with an
 * error, or UV_ECANCELED if the handle was closed first. A write of zero bytes
 * completes with 0 after the writes before it. Returns 0, UV_EINVAL (null
 * req/handle/bufs, nbufs 0, a buffer with a null base and a non-zero length),
 * UV_EBADF (no socket, or closing), UV_EPIPE (not writable: not connected, or
 * shut down), UV_ENOMEM. */
int rp_write(rp_write_t* req, rp_tcp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
             rp_write_cb cb);
/* Shuts down the writing side once every queued write has completed. `cb`
 * (may be null) gets 0, an error, or UV_ECANCELED if the handle is closed
 * first. Returns 0, UV_EINVAL (null req/handle), or UV_ENOTCONN (not
 * writable, already shut down or shutting down, closing). */
int rp_shutdown(rp_shutdown_t* req, rp_tcp_t* handle, rp_shutdown_cb cb);
/* Closes the handle: stops reading and listening, cancels every operation in
 * flight, and calls the pending callbacks (connect, then writes in order,
 * then shutdown) with UV_ECANCELED unless their operation had already
 * finished; then closes the socket and runs `cb` (may be null) once. Returns
 * 0, or UV_EINVAL for a handle that is closing, closed or uninitialised (then
 * `cb` never runs). Never calls a callback itself. */
int rp_close(rp_tcp_t* handle, rp_close_cb cb);
/* Non-zero from rp_close on (also after the close callback). */
int rp_is_closing(const rp_tcp_t* handle);
/* TCP_NODELAY on or off; remembered and applied when the socket is made.
 * Returns 0, UV_EINVAL, or setsockopt's error. */
int rp_tcp_nodelay(rp_tcp_t* handle, int enable);
/* As uv_tcp_getsockname / uv_tcp_getpeername: *namelen is the size of *name
 * on entry, the address length on return. Returns 0, the deferred bind error,
 * UV_EINVAL (no socket, null arguments), or the syscall's error. */
int rp_tcp_getsockname(const rp_tcp_t* handle, struct sockaddr* name, int* namelen);
int rp_tcp_getpeername(const rp_tcp_t* handle, struct sockaddr* name, int* namelen);
/* The socket's fd, as uv_fileno. Returns 0, UV_EINVAL (null arguments), or
 * UV_EBADF (no socket, or closing). */
int rp_fileno(const rp_tcp_t* handle, uv_os_fd_t* fd);

/* ---- Readiness watchers and the ring inside a plain uv_run (runtime/uv/poll.cpp) */

/* Makes `loop` ready for ringpark's operations under a stock uv_run(), for code
 * that cannot replace uv_run with rp_uv_run (a library or add-on living in
 * someone else's loop). It sets up the loop's ring (or the fallback) and two
 * hidden, internal handles: a prepare handle that submits every queued SQE
 * before libuv may sleep, and a poll handle on the ring's eventfd (the
 * fallback's epoll fd) that wakes libuv for ringpark's completions. From then
 * on rp_* operations started in any callback of any phase complete under plain
 * uv_run, and keep uv_run(UV_RUN_DEFAULT) from returning while in flight, as
 * libuv's own requests do. Every rp_* call on a loop does this on first use;
 * calling it first only makes the set-up, and its failure, explicit. Loop
 * thread; never blocks; idempotent. Returns 0 (rp_backend(loop) then says which
 * backend runs), UV_EINVAL for a null loop, or UV_ENOMEM when not even the
 * fallback can be set up (out of memory or file descriptors). */
int rp_uv_attach(uv_loop_t* loop);

/* A readiness watcher with uv_poll_t's semantics, run through the loop's ring:
 * each started watcher is one multishot POLL_ADD, so starting a thousand of
 * them in one loop iteration costs one io_uring_enter (libuv: an epoll_ctl
 * each). Like uv_poll_t it is level-triggered: while the fd stays ready for a
 * watched event the callback runs again on each loop iteration (ringpark
 * re-checks the watchers it reported, all of them with one poll(2) call, at the
 * next iteration; the ring reports the edges). Differences from uv_poll_t:
 *  - it is not a uv_handle_t: uv_close, uv_walk, uv_ref and uv_is_active do not
 *    apply; use rp_poll_close and rp_poll_is_active;
 *  - several watchers on one fd are allowed (uv_poll_init says UV_EEXIST);
 *  - a file without a poll method (a regular file) is reported always ready,
 *    as poll(2) does, where uv_poll_init fails with UV_EPERM;
 *  - the callback may occasionally run twice in one iteration (uv_poll_t's
 *    docs already allow spurious calls: handle EAGAIN).
 * All functions: loop thread only, never block. Fields other than `data` are
 * read-only. */
typedef struct rp_poll_s rp_poll_t;
/* status 0 with `events` a mask of UV_READABLE, UV_WRITABLE, UV_DISCONNECT and
 * UV_PRIORITIZED (only those watched), or status < 0 (UV_EBADF for an error
 * condition on the fd, as libuv reports POLLERR) with events 0; after an error
 * the watcher is stopped. */
typedef void (*rp_poll_cb)(rp_poll_t* handle, int status, int events);
typedef void (*rp_poll_close_cb)(rp_poll_t* handle);

struct rp_poll_s {
  void* data;       /* the user's, untouched by ringpark */
  uv_loop_t* loop;  /* read-only */
  int fd;           /* read-only */
  void* impl_;      /* ringpark's private state, owned until the close callback */
};

/* Initialises `handle` to watch `fd` and sets `fd` non-blocking, as
 * uv_poll_init does. Returns 0, UV_EINVAL (null loop or handle), UV_EBADF (fd
 * is not an open descriptor), UV_EBUSY (`handle` is open on this loop already:
 * initialised and its close callback not yet run; nothing changes), UV_ENOMEM
 * (the watcher's state or the loop's ringpark state cannot be allocated). After
 * 0 the handle must be closed with rp_poll_close before its memory is reused. */
int rp_poll_init(uv_loop_t* loop, rp_poll_t* handle, int fd);
/* Starts watching for `events` (UV_READABLE | UV_WRITABLE | UV_DISCONNECT |
 * UV_PRIORITIZED), calling `cb` as uv_poll_cb. On an active handle it changes
 * the mask and callback; events == 0 stops it. The fd is registered in the
 * ring at the next submission, batched with everything else queued. Returns 0
 * or UV_EINVAL (null handle, unknown event bits, null cb with events, a handle
 * being closed). An active watcher keeps the loop alive. */
int rp_poll_start(rp_poll_t* handle, int events, rp_poll_cb cb);
/* Stops the watcher at once: no callback runs after this returns, even for an
 * event already reported to ringpark. The ring's poll is cancelled (its memory
 * stays with the handle until the kernel lets go), so the fd may be closed
 * right after this, as with uv_poll_stop. Starting again at once is fine.
 * Returns 0, or UV_EINVAL for a null handle. */
int rp_poll_stop(rp_poll_t* handle);
/* Stops the watcher and releases it. `cb` (may be null) runs exactly once, on a
 * later loop iteration, after the kernel has posted the last completion for the
 * handle; from then on the handle's memory may be freed or reused. The loop
 * stays alive until it has run. Returns 0, or UV_EINVAL for a null handle or
 * one already closing (the callback then never runs). */
int rp_poll_close(rp_poll_t* handle, rp_poll_close_cb cb);
/* 1 while started (and not stopped by the user or by an error), else 0. */
int rp_poll_is_active(const rp_poll_t* handle);

#ifdef __cplusplus
}
#endif

#endif /* RINGPARK_H_ */
