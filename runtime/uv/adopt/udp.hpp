// Adoption of libuv's uv_udp_t: an unchanged program's own UDP sockets,
// received from and sent on through the loop's ring by the datagram engine
// (runtime/stream/dgram.hpp), while each stays a real libuv handle with
// libuv 1.44.2's contract (src/unix/udp.c).
//
// The UDP calls below are interposed (runtime/uv/preload.cpp) and come here
// first. A handle is adopted at its first uv_udp_recv_start or uv_udp_send
// when everything allows it (the same process gate and RINGPARK_ADOPT=0 kill
// switch as TCP streams, a loop on io_uring whose kernel has multishot
// recvmsg, and libuv with nothing of its own going on for the socket); from
// then on the engine owns its socket I/O:
// - one multishot recvmsg from the loop's shared datagram buffers, each
//   datagram copied into the program's alloc_cb buffer with its source and
//   flags (UV_UDP_PARTIAL when cut), alloc_cb asked for 65536 as libuv asks;
//   each round of completions ends as libuv's wakeups end, with
//   recv_cb(0, buf, NULL, 0); a UV_UDP_RECVMMSG handle gets libuv's recvmmsg
//   contract (one alloc_cb buffer filled with up to 20 datagrams, each with
//   UV_UDP_MMSG_CHUNK, then recv_cb(0, buf, NULL, UV_UDP_MMSG_FREE));
// - uv_udp_send queued in order and sent with the round's other sends in one
//   linked chain, callbacks in order; uv_udp_try_send sends at once or says
//   UV_EAGAIN, never ahead of a queued send;
// - uv_close cancels, waits for the last completion and closes the socket
//   through the ring before libuv's own close runs the close callback (after
//   the sends it cancelled, with UV_ECANCELED, in order).
//
// What adoption keeps of libuv's handle, field by field, is what libuv's own
// calls read: ACTIVE (receiving or sending) with the loop's active handle
// count, the send requests in active_reqs, send_queue_size and
// send_queue_count, alloc_cb and recv_cb, io_watcher.fd (-1 from uv_close on,
// as libuv's). libuv's io watcher for the socket stays idle; its write queues
// stay empty. Every other UDP call (bind, connect, options, multicast,
// getsockname, uv_udp_using_recvmmsg, uv_udp_try_send2) stays libuv's and
// works on the adopted socket as before.
#pragma once

#include <uv.h>

#include <string>

namespace ringpark::detail {
class LoopContext;
}

namespace ringpark::detail::adopt::udp {

// libuv's own calls, which the interposers and adoption forward to (never the
// interposers themselves). The preload points them at the next definitions
// in the lookup order; elsewhere they are libuv's.
struct UvUdpFns {
  int (*init)(uv_loop_t*, uv_udp_t*);
  int (*init_ex)(uv_loop_t*, uv_udp_t*, unsigned int);
  int (*recv_start)(uv_udp_t*, uv_alloc_cb, uv_udp_recv_cb);
  int (*recv_stop)(uv_udp_t*);
  int (*send)(uv_udp_send_t*, uv_udp_t*, const uv_buf_t[], unsigned int, const sockaddr*,
              uv_udp_send_cb);
  int (*try_send)(uv_udp_t*, const uv_buf_t[], unsigned int, const sockaddr*);
  void (*close)(uv_handle_t*, uv_close_cb);
};
void set_uv_udp_fns(const UvUdpFns& fns) noexcept;

// The interposed calls: each is libuv's call of the same name, with libuv's
// contract, run by the engine when the handle is adopted or can be, by libuv
// otherwise. Loop thread only, as in libuv.
int init(uv_loop_t* loop, uv_udp_t* handle) noexcept;
int init_ex(uv_loop_t* loop, uv_udp_t* handle, unsigned int flags) noexcept;
int recv_start(uv_udp_t* handle, uv_alloc_cb alloc_cb, uv_udp_recv_cb recv_cb) noexcept;
int recv_stop(uv_udp_t* handle) noexcept;
int send(uv_udp_send_t* req, uv_udp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
         const sockaddr* addr, uv_udp_send_cb cb) noexcept;
int try_send(uv_udp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
             const sockaddr* addr) noexcept;
// uv_close's UDP path (adopt::close hands UDP handles here): true when the
// handle is adopted and this closes it; false leaves it to libuv's uv_close.
bool close(uv_udp_t* handle, uv_close_cb cb) noexcept;

// Why the loop's UDP sockets cannot be adopted, or null.
const char* loop_gate(LoopContext* ctx) noexcept;
// The UDP part of a RINGPARK_STATS line ("; 2 UDP sockets adopted, ..."), and
// the socket syscalls libuv would have made for that traffic at the least.
std::string stats_part(LoopContext* ctx, std::uint64_t* libuv_syscalls);

}  // namespace ringpark::detail::adopt::udp
