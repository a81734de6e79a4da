// Everything ringpark needs from libuv beyond its public API, in one place and
// checked against the libuv version it was written for (1.x unix, whose loop
// and handle layouts these functions read). See private.cpp.
#pragma once

#include <uv.h>

#include <cstdint>

namespace ringpark::detail::uv_private {

// Hides a handle of ours from uv_walk, and from uv_loop_close's "handles still
// open" check, the way libuv hides its own internal handles.
void mark_internal(uv_handle_t* handle) noexcept;

// Moves a started prepare handle to the end of the loop's prepare queue, so its
// callback runs after every other prepare callback of the iteration.
void move_prepare_last(uv_prepare_t* handle) noexcept;

// True while `handle` is linked into `loop`'s handle queue. False once the loop
// memory was re-initialised (a new loop at the same address).
bool still_linked(const uv_loop_t* loop, const uv_handle_t* handle) noexcept;

// True while fds wait to be added to libuv's epoll set (uv_backend_timeout then
// reads 0, yet the poll that adds them may still block).
bool watchers_pending(const uv_loop_t* loop) noexcept;

// What uv_run(UV_RUN_ONCE) checks before deciding that it may block: no pending
// callbacks and no idle handles.
bool once_may_block(const uv_loop_t* loop) noexcept;

// True while check handles are started on the loop: libuv runs them after
// every poll that returned, so I/O callbacks are followed by them.
bool has_check_handles(const uv_loop_t* loop) noexcept;

// Fills `req` as libuv's uv_fs_* functions do before they queue work: type,
// fs_type, loop, cb, result 0, ptr/path/new_path/bufs null, and the thread-pool
// link made inert so that uv_cancel(req) answers UV_EBUSY (an operation already
// running) instead of touching a work queue the request is not on.
void fs_init(uv_fs_t* req, uv_loop_t* loop, uv_fs_type type, uv_fs_cb cb) noexcept;
// Gives `req` libuv-owned copies of its paths (freed by uv_fs_req_cleanup, as
// libuv frees them: with the allocator libuv uses, one block for both paths).
// Returns 0 or UV_ENOMEM.
int fs_copy_paths(uv_fs_t* req, const char* path, const char* new_path) noexcept;
// The private fields libuv leaves set on a request (file, flags, mode, offset).
void fs_set_args(uv_fs_t* req, uv_file file, int flags, int mode, std::int64_t offset) noexcept;
// Counts `req` as an active request of its loop, as libuv does for its own fs
// requests, so uv_loop_alive and uv_run's return value account for it.
void req_register(uv_loop_t* loop) noexcept;
void req_unregister(uv_loop_t* loop) noexcept;
// Fills a request's public head as libuv's uv__req_init does (type) and
// counts it as an active request of `loop`.
void req_init(uv_loop_t* loop, uv_req_t* req, uv_req_type type) noexcept;

// ---- Streams: what adopting a libuv stream needs (runtime/uv/adopt/) --------
//
// libuv's handle flags (src/uv-common.h), the same values from 1.44 through
// 1.51, except kShutting, which 1.45 removed: from then on a stream is
// shutting while its shutdown_req is set (set_shutting does the right thing
// for the running version).
namespace flags {
constexpr unsigned kClosing = 0x1;
constexpr unsigned kClosed = 0x2;
constexpr unsigned kActive = 0x4;
constexpr unsigned kRef = 0x8;
constexpr unsigned kListening = 0x40;
constexpr unsigned kShut = 0x200;
constexpr unsigned kReadEof = 0x800;
constexpr unsigned kReading = 0x1000;
constexpr unsigned kReadable = 0x4000;
constexpr unsigned kWritable = 0x8000;
constexpr unsigned kUdpProcessing = 0x1000000;
constexpr unsigned kUdpConnected = 0x2000000;
}  // namespace flags

// libuv's uv__handle_start / uv__handle_stop: the ACTIVE flag, and the loop's
// count of active handles for a referenced handle.
void handle_start(uv_handle_t* handle) noexcept;
void handle_stop(uv_handle_t* handle) noexcept;
// The stream's fd (io_watcher.fd), and setting it (-1 once ringpark closed it).
int stream_fd(const uv_stream_t* stream) noexcept;
void set_stream_fd(uv_stream_t* stream, int fd) noexcept;
// True when libuv has nothing of its own going on for the stream's socket:
// no connect in progress, no write queued or owed a callback, no shutdown,
// its fd watched for nothing (libuv neither reads nor writes it).
bool stream_quiet(const uv_stream_t* stream) noexcept;
// True when libuv reads the stream and its watcher waits for nothing else
// (reading started before a connect completed).
bool stream_only_reading(const uv_stream_t* stream) noexcept;
// Whether a shutdown is pending, and marking it so, as the running libuv
// version records it (1.44: a flag and shutdown_req; 1.45 on: shutdown_req).
bool shutting(const uv_stream_t* stream) noexcept;
void set_shutting(uv_stream_t* stream, uv_shutdown_t* req) noexcept;
// A pointer-sized field of a TCP stream that libuv uses only for IPC pipes
// (queued_fds), where adoption keeps its state. It must be null again before
// the stream goes back to libuv (uv_close frees it if not).
void*& adoption_slot(uv_tcp_t* stream) noexcept;

// ---- UDP handles: what adopting a uv_udp_t needs (runtime/uv/adopt/udp.cpp) ---
//
// The socket's fd (io_watcher.fd; -1 before a bind), and setting it (-1 once
// adoption's close took it).
int udp_fd(const uv_udp_t* handle) noexcept;
void set_udp_fd(uv_udp_t* handle, int fd) noexcept;
// True when libuv has nothing of its own going on for the socket: no send
// queued or owed a callback, its fd watched for nothing, nothing pending.
bool udp_quiet(const uv_udp_t* handle) noexcept;
// A pointer-sized word of a UDP handle that libuv on unix never uses
// (u.reserved[1]: only uv_async_t uses u, and only its fd), where adoption
// keeps its state. libuv's init does not clear it, so the interposed
// uv_udp_init(_ex) does (clear_udp_adoption_slot) before any other use.
void*& udp_adoption_slot(uv_udp_t* handle) noexcept;
void clear_udp_adoption_slot(uv_udp_t* handle) noexcept;
// Whether the loop counts the handle's fd as one of its watched fds
// (loop->watchers[fd] is its io watcher): what uv_udp_open, uv_tcp_open and
// uv_poll_init check to answer UV_EEXIST for an fd a handle has already.
bool udp_fd_claimed(const uv_udp_t* handle) noexcept;
// Right after libuv's own uv_udp_recv_start on the handle, which registered
// its fd with the loop (growing the loop's watcher table with libuv's own
// allocator): takes the watch off again (nothing armed, off the queue of
// changes for epoll, which thus never sees the fd; the handle inactive, its
// callbacks cleared) but leaves the fd registered, so that it still counts
// as taken. libuv touches such a watcher only through uv__io_stop and
// uv__io_close, which adoption never lets run on it before
// release_udp_fd().
void udp_disarm_keep_fd(uv_udp_t* handle) noexcept;
// Unregisters the handle's fd from the loop (libuv's view: the fd is closed).
void release_udp_fd(uv_udp_t* handle) noexcept;

}  // namespace ringpark::detail::uv_private
