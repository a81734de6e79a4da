// Adoption: an unchanged libuv program's own uv_tcp_t streams, read and
// written through the loop's ring by the stream engine (runtime/stream/),
// while each stays a real libuv handle with libuv's contract.
//
// The libuv calls below are interposed (runtime/uv/preload.cpp) and come here
// first. A stream is adopted at its first uv_read_start or uv_write when
// everything allows it (see gate()); from then on the engine owns its
// socket I/O: one multishot recv from the loop's provided buffers copied into
// the program's alloc_cb buffers (one alloc_cb, then its read_cb, before the
// next alloc_cb: never a program's buffer held by the kernel), writes queued
// in order and submitted with everything else of the turn, shutdown, and a
// close that cancels, waits for the last completion and closes the socket
// through the ring before libuv's own close runs the close callback. Every
// other stream, and every call ringpark does not take over, is libuv's.
//
// What adoption keeps of libuv's handle, field by field, is what libuv's own
// calls read (uv_is_active, uv_is_readable/writable, uv_fileno,
// uv_stream_get_write_queue_size, uv_run's liveness): the flags READING,
// READABLE, WRITABLE, READ_EOF, SHUT and shutting, ACTIVE with the loop's
// active handle count, the requests in active_reqs, write_queue_size,
// read_cb and alloc_cb. libuv's io watcher for the socket stays idle.
//
// Reaching into libuv's private fields is only safe on the versions this was
// tested with, so adoption checks uv_version() and otherwise stays off and
// says why (rp_adoption()); RINGPARK_ADOPT=0 turns it off.
#pragma once

#include <uv.h>

#include <string>

namespace ringpark::detail {
class LoopContext;
}

namespace ringpark::detail::adopt {

// libuv's own stream calls, which the interposers and adoption forward to
// (never the interposers themselves). The preload points them at the next
// definitions in the lookup order; elsewhere they are libuv's.
struct UvStreamFns {
  int (*read_start)(uv_stream_t*, uv_alloc_cb, uv_read_cb);
  int (*read_stop)(uv_stream_t*);
  int (*write2)(uv_write_t*, uv_stream_t*, const uv_buf_t[], unsigned int, uv_stream_t*,
                uv_write_cb);
  int (*try_write2)(uv_stream_t*, const uv_buf_t[], unsigned int, uv_stream_t*);
  int (*shutdown)(uv_shutdown_t*, uv_stream_t*, uv_shutdown_cb);
  void (*close)(uv_handle_t*, uv_close_cb);
  int (*set_blocking)(uv_stream_t*, int);
};
void set_uv_stream_fns(const UvStreamFns& fns) noexcept;

// The interposed calls: each is libuv's call of the same name, with libuv's
// contract (arguments, return values, callbacks and their order), run by the
// engine when the stream is adopted or can be, by libuv otherwise. Loop
// thread only, as in libuv.
int read_start(uv_stream_t* stream, uv_alloc_cb alloc_cb, uv_read_cb read_cb) noexcept;
int read_stop(uv_stream_t* stream) noexcept;
int write2(uv_write_t* req, uv_stream_t* stream, const uv_buf_t bufs[], unsigned int nbufs,
           uv_stream_t* send_handle, uv_write_cb cb) noexcept;
int try_write2(uv_stream_t* stream, const uv_buf_t bufs[], unsigned int nbufs,
               uv_stream_t* send_handle) noexcept;
int shutdown(uv_shutdown_t* req, uv_stream_t* stream, uv_shutdown_cb cb) noexcept;
void close(uv_handle_t* handle, uv_close_cb cb) noexcept;
int set_blocking(uv_stream_t* stream, int blocking) noexcept;

// Why adoption is off for this process ("RINGPARK_ADOPT=0", "libuv 1.52.0 is
// not a version adoption was tested with"...), or null when it is allowed.
const char* process_gate() noexcept;

// "on", or "off (why)", for the loop (rp_adoption()).
std::string state(uv_loop_t* loop);
// The RINGPARK_STATS line of a loop: the backend, what adoption did, and the
// chain's counts.
std::string stats_line(LoopContext* ctx);

}  // namespace ringpark::detail::adopt
