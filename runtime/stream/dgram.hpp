// The datagram engine: one implementation of a UDP socket's I/O as ops on the
// loop's backend, the sibling of the stream engine (stream.hpp). It knows no
// front-end type (neither libuv's nor rp_'s): it talks to its front end
// through Host, a table of callbacks, and keeps its state in a Dgram that the
// front end places where it likes (beside an adopted uv_udp_t today).
//
// What it does, in libuv's terms (src/unix/udp.c is the model):
// - receiving: ONE multishot recvmsg in flight from recv_start to recv_stop,
//   its datagrams in the backend's shared datagram buffers (the loop's, not
//   the socket's: memory does not grow with sockets). Each datagram is copied
//   into a buffer from the host's alloc, then handed over by its recv: one
//   alloc, then its recv, before the next alloc, and never a buffer of the
//   host's in the kernel's hands (programs such as BIND hand out one buffer at
//   a time). Where multishot recvmsg is missing (the epoll fallback, Linux
//   before 6.0) plain recvmsg ops into buffers of the engine's own do the
//   same: one in flight on io_uring, which keeps no order between several
//   waiting on one socket, a few on the fallback, which does. (One exception:
//   on a socket that ICMP errors come back to, the receive is off while a
//   chain of sends is out; see set_errors_come_back.) On io_uring, given the
//   loop's EdgeSet (Dgram::edges), "in flight" means from an edge of the
//   socket until it is empty: the receive then drains with MSG_DONTWAIT and
//   never waits in the ring, where it would keep the socket (and its port)
//   open past the death of the process (edges.hpp);
// - batches: the datagrams of one round of completions end, as libuv's
//   wakeups end, with recv(0, buffer, no address): "nothing more now". A
//   socket in batch mode (libuv's UV_UDP_RECVMMSG) gets libuv's recvmmsg
//   contract: one alloc'd buffer per batch, filled with up to 20 datagrams of
//   one 64 KiB chunk each (kMmsgChunk on each), then recv(0, buffer, no
//   address, kMmsgFree). A round whose receive ran out of the backend's
//   buffers (kDry: the socket is not drained) is not the end of a batch: its
//   last, partial batch waits for the next round's datagrams, as libuv's
//   recvmmsg fills its buffer from a socket that has them;
// - nothing is lost inside the engine: a datagram that cannot be handed over
//   now (reading stopped, alloc gave no buffer) is copied out and kept, and
//   handed over first once the reader can take it; while too much is kept the
//   multishot recvmsg is paused, so that the socket (whose overflow the kernel
//   counts) holds the rest;
// - sending: requests queued in order; they leave in that order even when the
//   socket's send buffer is full. Each round's queued requests go out as ONE
//   chain (IoBackend::submit_in_order: linked SQEs on io_uring), and the next
//   chain only once this one has completed. On io_uring no send waits in the
//   kernel for room (MSG_DONTWAIT): one that finds none ends the chain there
//   (the link cancels the rest, unsent), the engine waits for POLLOUT (in the
//   EdgeSet when it has one, else with a poll op) and sends them again, in
//   order, as libuv's uv__udp_sendmsg does; so nothing of a closing socket can
//   stay stuck in the kernel. The fallback waits for room
//   itself and keeps one socket's sends in order. A chain rather than only the
//   head in flight, because an echo answers every datagram of a round: with
//   the head alone each send would cost a round trip through the ring, with a
//   chain a round of sends costs one submission;
// - close through the fd-lifetime protocol (fd_life.hpp): sends that could
//   leave at once leave (libuv sends inside uv_udp_send), those waiting for
//   room are cancelled, every final completion awaited, what is still owed
//   completed with -ECANCELED in order, the socket closed through the backend,
//   then the host's `closed`.
//
// Work that must wait for the end of the round of completions now running
// (a batch's end, a chain of the round's sends) goes through the host's
// `defer`, which runs run_deferred() from the loop after those completions
// (the executor, for the libuv front end); without it a nop op comes back in
// the next round.
//
// What the kernel may write into, and what keeps it alive until the final
// completion: the Dgram's ops (the multishot recvmsg and its msghdr, the nop,
// the wait for POLLOUT, the fallback's close barrier) live in the Dgram, which
// the front end keeps in place until `closed`; plain
// receives' ops, msghdrs and buffers in a block the Dgram owns until then;
// each send's op, msghdr, copy of the iovecs and of the destination address in
// its SendReq, which the front end keeps until send_done.
//
// Errors are negative errno values; the front end maps them (libuv's UV_E*
// are the same numbers on Linux). Loop thread only. No function here calls a
// host callback from inside a call the host made: callbacks come from
// completions and from run_deferred().
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

#include "ringpark/op.hpp"
#include "runtime/stream/edges.hpp"
#include "runtime/stream/fd_life.hpp"

namespace ringpark::detail::dgram {

// The flags of a recv, with libuv's values (UV_UDP_PARTIAL, UV_UDP_MMSG_CHUNK,
// UV_UDP_MMSG_FREE), so that a libuv front end passes them on as they are.
inline constexpr unsigned kPartial = 2;     // the datagram was cut to the buffer
inline constexpr unsigned kMmsgChunk = 8;   // one datagram of a batch buffer
inline constexpr unsigned kMmsgFree = 16;   // the batch buffer is done with
// What alloc is always asked for, and the length of one chunk of a batch
// buffer: libuv's UV__UDP_DGRAM_MAXSIZE.
inline constexpr std::size_t kDatagramMax = 64 * 1024;
// The most datagrams one batch buffer holds (libuv's recvmmsg width).
inline constexpr unsigned kMaxChunks = 20;

struct Dgram;
struct SendReq;

// The front end.
struct Host {
  // A buffer for what comes next, of up to `suggested` bytes (kDatagramMax);
  // base null or len 0: none now.
  void (*alloc)(Dgram* d, std::size_t suggested, iovec* buf) noexcept;
  // A datagram of `nread` bytes (>= 0) from `addr`; the end of a batch
  // (nread 0, addr null; with kMmsgFree, the batch buffer's last call); or an
  // error (nread < 0, addr null): -ENOBUFS when alloc gave no buffer, a
  // receive error otherwise. `buf` is alloc's buffer (or, with kMmsgChunk,
  // the chunk of it that holds this datagram); `addr` is valid during the
  // call only.
  void (*recv)(Dgram* d, ssize_t nread, const iovec* buf, const sockaddr* addr,
               unsigned flags) noexcept;
  // A send ended with `status` (0, or a negative errno; -ECANCELED for one
  // the close cancelled); the request is the front end's again.
  void (*send_done)(Dgram* d, SendReq* r, int status) noexcept;
  // Asks for run_deferred(d) from the loop, after the completions running
  // now and never inside this call. False when it cannot (the engine then
  // comes back through a nop op). May be null.
  bool (*defer)(Dgram* d) noexcept;
  // The socket is closed and nothing of the Dgram is in flight: it may be
  // freed from here on.
  void (*closed)(Dgram* d) noexcept;
};

struct SendReq {
  Op op;  // the sendmsg; reads msg, iov, the bytes and addr until its final CQE
  msghdr msg{};
  sockaddr_storage addr{};  // the destination, copied (msg.msg_name when set)
  iovec* iov = nullptr;     // `small`, or malloc'd for more buffers
  unsigned nbufs = 0;
  std::size_t size = 0;  // the datagram's bytes
  SendReq* next = nullptr;
  Dgram* dgram = nullptr;
  void* owner = nullptr;  // the front end's request
  int res = 0;
  // A socket error (an ICMP's: ECONNREFUSED...) the receive took while this
  // send waited: libuv's send would have taken it (see dgram.cpp).
  int taken_error = 0;
  enum class State : std::uint8_t { queued, in_flight, done } state = State::queued;
  iovec small[4];
};

// Flags, in the Dgram's `flags`.
enum Flag : std::uint32_t {
  kReceiving = 1u << 0,  // between recv_start and recv_stop
  kBatch = 1u << 1,      // hands datagrams over in batch buffers (libuv's mmsg)
  kClosing = 1u << 2,    // close asked for
  kClosed = 1u << 3,     // `closed` has run
  kStarved = 1u << 4,    // alloc gave no buffer: kept datagrams wait a round
  kPaused = 1u << 5,     // too much kept: the receive is not re-armed
  kBatchOpen = 1u << 6,  // datagrams went out since the last batch end
  kNoRoom = 1u << 7,     // a send of the chain in flight found no room
  kDryRound = 1u << 8,   // this round's receive found more than the buffers held
  kErrorsComeBack = 1u << 9,  // ICMP errors reach the socket (see set_errors_come_back)
};

// How the socket receives, decided at its first recv_start.
enum class RecvMode : std::uint8_t { undecided, multishot, plain };

// A datagram (or a receive error) not yet handed over, still in the
// backend's buffer (a multishot completion's) or a plain receive's.
struct Held {
  Datagram d;
  int error = 0;        // a receive error instead of a datagram
  std::int32_t source;  // >= 0: the backend's buffer id; < 0: plain receive ~source
};

struct Kept;   // a datagram or error copied out, waiting for the reader
struct Plain;  // the plain receives (dgram.cpp)

struct Dgram {
  const Host* host = nullptr;
  void* owner = nullptr;  // the front end's handle
  FdLife life;            // the socket's fd, its ops in flight, the close
  std::uint32_t flags = 0;
  RecvMode mode = RecvMode::undecided;
  // Receiving.
  Op ms_op;  // the multishot recvmsg
  msghdr ms_msg{};  // room kept for the source address in each buffer
  bool ms_active = false;
  bool ms_cancelled = false;
  std::uint32_t ms_taken = 0;  // datagrams (buffers) it brought since armed
  Plain* plain = nullptr;
  unsigned plain_n = 0;
  // The loop's EdgeSet, given by the front end before recv_start (null: the
  // receive stays armed in the ring). Where the backend is io_uring, the
  // socket joins it at its first recv_start: its receive is then in the
  // kernel only from an edge until it finds the socket empty (see
  // edges.hpp and arm_receive).
  EdgeSet* edges = nullptr;
  EdgeSet::Member member;  // member.in: the socket is watched
  bool may_read = true;    // an edge came since a receive last found it empty
  Held held[kMaxChunks];  // a batch socket's datagrams of this round
  unsigned held_n = 0;
  unsigned batch_chunks = kMaxChunks;  // datagrams the reader's last batch buffer held
  Kept* kept_head = nullptr;  // FIFO; nonempty only while held_n == 0
  Kept* kept_tail = nullptr;
  std::size_t kept_bytes = 0;
  std::size_t kept_n = 0;
  // The way back into the loop: a deferred run_deferred (counted as a hold of
  // `life`), or the nop.
  bool deferred = false;
  Op nop;
  bool nop_active = false;
  bool resume = false;  // the nop resumes after a fork
  Op wait_op;  // a poll for POLLOUT (without the EdgeSet): no room for a send
  bool wait_active = false;  // waiting for room (wait_op, or an edge)
  bool wait_on_edge = false;  // the wait is in the EdgeSet, not an op
  Op barrier;  // the fallback's close: cancels the sends tried before it
  bool barrier_active = false;
  // Sending: the queue in order; [head, unsent) are in the chain in flight.
  SendReq* send_head = nullptr;
  SendReq* send_tail = nullptr;
  SendReq* unsent = nullptr;
  std::size_t chain_left = 0;    // ops of the chain not yet completed
  std::size_t queued_bytes = 0;  // of every request not yet done (libuv's send_queue_size)
  std::size_t queued_count = 0;  // libuv's send_queue_count

  int fd() const noexcept { return life.fd(); }
  bool closing() const noexcept { return flags & kClosing; }
};

// Sets `d` up on backend `io` for front end `host`, with socket `fd`
// (non-blocking, bound), which it owns and closes.
void init(Dgram* d, IoBackend* io, const Host* host, void* owner, int fd) noexcept;

// Starts receiving: 0, or -EALREADY. `batch`: hand datagrams over in batch
// buffers (libuv's UV_UDP_RECVMMSG). Calls no host callback.
int recv_start(Dgram* d, bool batch) noexcept;
// Stops receiving; what still arrives is kept for the next start.
void recv_stop(Dgram* d) noexcept;

// Fills `r` for a datagram of `bufs` to `addr` (`addrlen` bytes; null for a
// connected socket): copies the iovecs and the address, not the bytes, which
// stay the caller's until send_done. Returns 0 or -ENOMEM.
int send_prepare(SendReq* r, const iovec* bufs, unsigned nbufs, const sockaddr* addr,
                 unsigned addrlen) noexcept;
// Queues `r` behind the socket's other sends; it leaves with the round's
// chain.
void send(Dgram* d, SendReq* r) noexcept;
// libuv's uv_udp_try_send: one sendmsg(2) now, when nothing is queued.
// Returns the bytes sent, -EAGAIN when sends are queued or the socket is
// full, or an error.
int try_send(Dgram* d, const iovec* bufs, unsigned nbufs, const sockaddr* addr,
             unsigned addrlen) noexcept;

// Whether ICMP errors come back to the socket (IP_RECVERR is set on it, or it
// is connected): the kernel then keeps an error for the socket's next call,
// and the engine keeps its receive off while a chain of sends is in flight,
// so that the next send takes it, as libuv's does (see dgram.cpp). The front
// end says so whenever it may have changed (before sends, at recv_start).
inline void set_errors_come_back(Dgram* d, bool on) noexcept {
  if (on) {
    d->flags |= kErrorsComeBack;
  } else {
    d->flags &= ~kErrorsComeBack;
  }
}

// Cancels what waits, sends what can leave, and runs the close protocol;
// `closed` comes last. Returns false when already closing.
bool close(Dgram* d) noexcept;

// The host's `defer` coming back.
void run_deferred(Dgram* d) noexcept;

// In a forked child: the ops in the old backend will never complete. Forget
// them (sends in flight end with -ECANCELED, from the loop), keep what was
// received, and go on on `io`.
void after_fork(Dgram* d, IoBackend* io) noexcept;

}  // namespace ringpark::detail::dgram
