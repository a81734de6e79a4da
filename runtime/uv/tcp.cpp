// rp_tcp_*: TCP handles with libuv's calls, whose socket I/O runs as ops in the
// loop's ring (or on the epoll fallback, which gives the same results).
//
// What the kernel may write into lives in memory the user keeps alive until the
// callback that ends it (DESIGN.md, "Ownership of memory the kernel may touch"):
// - a handle embeds two ops of its own. The first is the recv of a reading
//   stream or the multishot accept of a listener (never both), a nop that
//   brings held bytes back into the loop, and at the end the close. The second
//   is the multishot recv of a reading stream, where the kernel has it;
// - each request embeds its op: the send/writev of a write, the connect, the
//   shutdown, with the copies of the iovec array and the address they use;
// - with multishot recv (io_uring with provided buffer rings, Linux 6.0), the
//   kernel receives into the driver's buffer ring and no buffer of the user's is
//   ever lent: each completion's bytes are copied into alloc_cb's buffers and the
//   ring buffer goes back before the completion returns;
// - otherwise (the fallback, older kernels) the read buffer comes from alloc_cb
//   and is lent to the kernel until the recv's final completion; it always goes
//   back to the user through read_cb.
// A handle counts its ops in flight. rp_close cancels them (a request, never a
// release); the completion that brings the count to zero completes the
// callbacks still owed, then the socket is closed by a close op, and the close
// callback runs when that op completes. So nothing is freed or reused while the
// kernel may touch it, and the fd number is free only once the old socket has
// no operation left that could report on it.
//
// Batching comes from never making a socket I/O syscall here: every recv, send,
// accept, connect, shutdown and close is an op, so what one turn's completions
// start goes out in the driver's next single io_uring_enter.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail {
namespace {

// Marks memory that rp_tcp_init set up, so that a call on an uninitialised
// handle fails with UV_EINVAL instead of following garbage pointers.
constexpr std::uint32_t kMagic = 0x72707463;  // "rptc"

// libuv's suggested read size.
constexpr std::size_t kSuggestedSize = 64 * 1024;
// Bytes held for a reader that cannot take them (alloc_cb gives no buffer)
// beyond which the multishot recv is paused, so that the socket, not our
// memory, holds the backlog; it resumes once they are delivered.
constexpr std::size_t kHeldPause = std::size_t{1} << 20;
// A bulk stream fills every provided buffer, and copying out of them costs
// more than the multishot recv saves (measured: 15-25% of a 2 GiB transfer on
// loopback). After this many full buffers in a row a handle reads with plain
// recv, straight into alloc_cb's buffer...
constexpr std::uint8_t kBulkRun = 4;
// ...until this many plain reads in a row would each have fitted in one
// provided buffer: then it goes back to multishot recv.
constexpr std::uint8_t kSmallRun = 16;
// The most one send asks for: its result must fit an int.
constexpr std::size_t kMaxSend = std::size_t{1} << 30;
// How long a listener waits before accepting again after an error that the
// next attempt would most likely hit too (EMFILE...): the connection that
// failed is still queued, so an immediate retry would spin.
constexpr std::uint64_t kAcceptBackoffNs = 10'000'000;

enum Flag : std::uint32_t {
  kReadable = 1u << 0,     // may read (connected, accepted or opened), as libuv's flag
  kWritable = 1u << 1,     // may write; cleared by rp_shutdown and by read errors
  kReading = 1u << 2,      // between rp_read_start and rp_read_stop (or EOF, error)
  kListening = 1u << 3,    // rp_listen succeeded and the accept is (re-)armed
  kConnecting = 1u << 4,   // a connect op is in flight: I/O waits for it
  kShutting = 1u << 5,     // rp_shutdown called, its op not yet completed
  kShut = 1u << 6,         // the writing side is shut down
  kClosing = 1u << 7,      // rp_close called
  kClosed = 1u << 8,       // the close callback has run
  kNodelay = 1u << 9,      // TCP_NODELAY wanted, applied to any socket the handle gets
  kFinalizing = 1u << 10,  // the last completion came: owed callbacks, then the close op
};

// What the handle's own op is doing.
enum class Role : std::uint8_t {
  none,     // idle
  recv,     // a recv into the lent buffer
  poll,     // alloc_cb gave no buffer: wait for readability, then UV_ENOBUFS
  stash,    // a nop that delivers a result kept across rp_read_stop
  drain,    // a nop that delivers held bytes (multishot reading) from the loop
  accept,   // the listener's multishot accept
  backoff,  // a timeout before accepting again after an error
  barrier,  // a nop so that rp_close of an idle handle finishes from the loop
  close,    // closes the socket; its completion runs the close callback
};

// How a handle reads, decided at its first rp_read_start.
enum class ReadMode : std::uint8_t {
  undecided,
  plain,      // a recv into alloc_cb's buffer, queued again after each read
  multishot,  // one multishot recv into the driver's provided buffers
  bulk,       // multishot recv works here, but a bulk stream reads as plain
};

struct TcpState;

struct WriteState {
  Op op;  // the send or writev; `iov` and the caller's bytes live until its final CQE
  WriteState* next = nullptr;
  rp_write_t* req = nullptr;
  TcpState* tcp = nullptr;
  iovec* iov = nullptr;  // `small`, or malloc'd when there are more buffers
  unsigned nbufs = 0;
  unsigned index = 0;  // first buffer not yet completely sent
  iovec small[4];
};

struct ConnectState {
  Op op;  // reads `addr` until its final CQE
  rp_connect_t* req = nullptr;
  TcpState* tcp = nullptr;
  int forced = 0;  // a deferred bind error to report instead of connecting
  union {
    sockaddr sa;
    sockaddr_in in;
    sockaddr_in6 in6;
  } addr{};
};

struct ShutdownState {
  Op op;
  rp_shutdown_t* req = nullptr;
  TcpState* tcp = nullptr;
  bool started = false;  // the op was submitted (the write queue had drained)
};

struct TcpState {
  std::uint32_t magic = kMagic;
  std::uint32_t flags = 0;
  int fd = -1;
  int delayed_error = 0;  // bind's EADDRINUSE, reported by listen and connect
  rp_tcp_t* handle = nullptr;
  uv_loop_t* loop = nullptr;
  // Valid while an op is in flight (rp_loop_close refuses a busy loop), so
  // completions use it as is; calls from the user refresh it when idle.
  LoopContext* ctx = nullptr;
  std::uint32_t pending = 0;  // ops of this handle and its requests in flight
  Role role = Role::none;
  bool buf_lent = false;        // `buf` came from alloc_cb and is still ours
  bool stashed = false;         // a read result (stash_res) waits for rp_read_start
  bool in_alloc = false;        // inside alloc_cb: a nested rp_read_start must not arm
  bool read_cancelled = false;  // rp_read_stop cancelled the op in flight
  bool write_active = false;    // the head write's op is in flight
  ReadMode read_mode = ReadMode::undecided;
  bool ms_active = false;     // ms_op is in flight
  bool ms_cancelled = false;  // we asked ms_op to end (read stop, pause, close)
  bool to_bulk = false;       // ms_op was cancelled to switch to ReadMode::bulk
  std::uint8_t run = 0;       // full provided buffers (multishot) or small reads (bulk) in a row
  int stash_res = 0;
  // Multishot reading: bytes received but not yet delivered, [held_off,
  // held_len) of a malloc'd block, and then held_end (UV_EOF or an error), if
  // not 0. Ours alone: the kernel never sees this memory.
  int held_end = 0;
  char* held = nullptr;
  std::size_t held_off = 0;
  std::size_t held_len = 0;
  std::size_t held_cap = 0;
  Op op;  // see Role; reads into `buf` until its final CQE
  Op ms_op;  // the multishot recv; points at no memory of ours
  uv_buf_t buf{};
  rp_alloc_cb alloc_cb = nullptr;
  rp_read_cb read_cb = nullptr;
  rp_connection_cb connection_cb = nullptr;
  rp_close_cb close_cb = nullptr;
  int* accepted = nullptr;  // ring of accepted fds not yet taken by rp_accept
  std::uint32_t acc_head = 0;
  std::uint32_t acc_count = 0;
  std::uint32_t acc_cap = 0;
  WriteState* write_head = nullptr;  // writes in order; only the head is in flight
  WriteState* write_tail = nullptr;
  ConnectState* connect = nullptr;
  ShutdownState* shutdown = nullptr;
};

// The public structs reserve room for these; if this fails, grow private_ in
// include/ringpark.h (an ABI change).
template <typename State, typename Public>
constexpr bool fits() {
  return sizeof(State) <= sizeof(Public::private_) &&
         alignof(State) <= alignof(decltype(Public::private_[0]));
}
static_assert(fits<TcpState, rp_tcp_t>(), "rp_tcp_t::private_ is too small");
static_assert(fits<WriteState, rp_write_t>(), "rp_write_t::private_ is too small");
static_assert(fits<ConnectState, rp_connect_t>(), "rp_connect_t::private_ is too small");
static_assert(fits<ShutdownState, rp_shutdown_t>(), "rp_shutdown_t::private_ is too small");
static_assert(sizeof(uv_buf_t) == sizeof(iovec) &&
                  offsetof(uv_buf_t, base) == offsetof(iovec, iov_base) &&
                  offsetof(uv_buf_t, len) == offsetof(iovec, iov_len),
              "uv_buf_t is an iovec on unix");

template <typename State, typename Public>
State* state_of(Public* p) noexcept {
  return std::launder(reinterpret_cast<State*>(p->private_));
}

// The handle's state, or null for a null or uninitialised handle.
TcpState* live(rp_tcp_t* handle) noexcept {
  if (handle == nullptr) return nullptr;
  TcpState* t = state_of<TcpState>(handle);
  return t->magic == kMagic && t->handle == handle ? t : nullptr;
}
const TcpState* live(const rp_tcp_t* handle) noexcept {
  return live(const_cast<rp_tcp_t*>(handle));
}

LoopContext* ctx_for(TcpState* t) noexcept {
  if (t->pending == 0 || t->ctx == nullptr) t->ctx = LoopContext::get(t->loop);
  return t->ctx;
}

bool closing(const TcpState* t) noexcept { return t->flags & kClosing; }

void submit(TcpState* t, Op* op) noexcept {
  ++t->pending;
  t->ctx->chain().io().submit(op);
}

// Points the handle's op at a new job; the op is idle (role none).
void prepare_handle_op(TcpState* t, Role role, OpCode code, CompleteFn complete) noexcept {
  Op& op = t->op;
  op.code = code;
  op.fd = t->fd;
  op.flags = 0;
  op.len = 0;
  op.offset = -1;
  op.buf = nullptr;
  op.addr = nullptr;
  op.addrlen = nullptr;
  op.complete = complete;
  op.data = t;
  t->role = role;
}

int set_nodelay(int fd, int on) noexcept {
  return ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) < 0 ? -errno : 0;
}

// Gives the handle a fresh socket of `domain`, non-blocking and close-on-exec
// as libuv makes them.
int new_socket(TcpState* t, int domain) noexcept {
  int fd = ::socket(domain, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  if (t->flags & kNodelay) {
    if (int err = set_nodelay(fd, 1); err < 0) {
      ::close(fd);
      return err;
    }
  }
  t->fd = fd;
  return 0;
}

// Length of an IPv4 or IPv6 address, or 0 for any other family.
socklen_t ip_addr_len(const sockaddr* addr) noexcept {
  if (addr->sa_family == AF_INET) return sizeof(sockaddr_in);
  if (addr->sa_family == AF_INET6) return sizeof(sockaddr_in6);
  return 0;
}

void on_handle_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_write_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_connect_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_shutdown_op(Op* op, int res, std::uint32_t flags) noexcept;

// ---- Closing ------------------------------------------------------------------

void finish_close(TcpState* t) noexcept {
  t->fd = -1;
  t->flags |= kClosed;
  t->role = Role::none;
  rp_close_cb cb = t->close_cb;
  ctx_for(t)->handle_closed();
  // The user may free or reuse the handle from here on.
  if (cb) cb(t->handle);
}

void finish_write(TcpState* t, WriteState* w, int status) noexcept;

// The last op of a closing handle has completed: nothing of it is in the kernel
// any more. Complete what is still owed, then close the socket.
void finalize(TcpState* t) noexcept {
  t->flags |= kFinalizing;
  // libuv's order (uv__stream_destroy): connect (done with its op), the writes
  // in order, then the shutdown.
  while (t->write_head) finish_write(t, t->write_head, UV_ECANCELED);
  if (ShutdownState* s = t->shutdown) {
    t->shutdown = nullptr;
    t->flags &= ~kShutting;
    rp_shutdown_t* req = s->req;
    uv_private::req_unregister(t->loop);
    if (req->cb) req->cb(req, UV_ECANCELED);
  }
  // Held bytes nobody will read: dropped, as libuv drops unread data at close.
  std::free(t->held);
  t->held = nullptr;
  t->held_off = t->held_len = t->held_cap = 0;
  t->held_end = 0;
  if (t->buf_lent) {
    // The lent buffer goes back so the user can free it (libuv on Windows does
    // the same for a read that close cancels).
    uv_buf_t buf = t->buf;
    t->buf = uv_buf_t{};
    t->buf_lent = t->stashed = false;
    if (buf.base != nullptr && t->read_cb) t->read_cb(t->handle, UV_ECANCELED, &buf);
  }
  // Connections nobody took: ours to close. They have no ops.
  while (t->acc_count > 0) {
    ::close(t->accepted[t->acc_head]);
    t->acc_head = (t->acc_head + 1) % t->acc_cap;
    --t->acc_count;
  }
  std::free(t->accepted);
  t->accepted = nullptr;
  t->acc_cap = t->acc_head = 0;
  if (t->fd >= 0) {
    // Through the ring like every other socket call; the number is reusable
    // once this completes.
    prepare_handle_op(t, Role::close, OpCode::close, &on_handle_op);
    submit(t, &t->op);
    t->ctx->update_ref();
    return;
  }
  finish_close(t);
}

// Runs last in every completion: once a closing handle has nothing in flight,
// finalize it. Nothing may touch the handle after this returns.
void maybe_finalize(TcpState* t) noexcept {
  if (closing(t) && t->pending == 0 && !(t->flags & kFinalizing)) finalize(t);
}

// ---- Reading ------------------------------------------------------------------

bool usable(const uv_buf_t& buf) noexcept { return buf.base != nullptr && buf.len > 0; }

void arm_read(TcpState* t) noexcept;
void ms_resume(TcpState* t) noexcept;

// Starts the next read if the handle reads and nothing else holds its op.
void maybe_arm_read(TcpState* t) noexcept {
  if ((t->flags & (kReading | kClosing | kConnecting | kListening)) != kReading || t->in_alloc ||
      t->fd < 0) {
    return;
  }
  if (t->read_mode == ReadMode::multishot || t->held_len > 0 || t->held_end != 0) {
    return ms_resume(t);  // held bytes first, whatever reads next
  }
  if (t->role == Role::none) arm_read(t);
}

void arm_read(TcpState* t) noexcept {
  if (t->stashed) {
    if (t->stash_res != -ECANCELED) {
      // A result that came in while stopped: deliver it from the loop.
      prepare_handle_op(t, Role::stash, OpCode::nop, &on_handle_op);
      submit(t, &t->op);
      return;
    }
    t->stashed = false;  // a cancelled recv: its buffer is reused as is
  } else {
    t->buf = uv_buf_init(nullptr, 0);
    t->buf_lent = true;
    t->in_alloc = true;
    t->alloc_cb(t->handle, kSuggestedSize, &t->buf);
    t->in_alloc = false;
    if ((t->flags & (kReading | kClosing)) != kReading || t->role != Role::none) {
      // alloc_cb stopped reading or closed the handle: keep the buffer for the
      // next start, or for the close.
      t->stashed = true;
      t->stash_res = -ECANCELED;
      return;
    }
  }
  if (usable(t->buf)) {
    prepare_handle_op(t, Role::recv, OpCode::recv, &on_handle_op);
    // The buffer is the user's, lent until this op's final CQE: read_cb hands
    // it back after that, and rp_close returns it only after that too.
    t->op.buf = t->buf.base;
    t->op.len = static_cast<std::uint32_t>(t->buf.len < kMaxSend ? t->buf.len : kMaxSend);
  } else {
    // No buffer: as libuv, wait until readable, then say UV_ENOBUFS.
    prepare_handle_op(t, Role::poll, OpCode::poll, &on_handle_op);
    t->op.flags = POLLIN;
  }
  submit(t, &t->op);
}

// Hands a read result to the user, with the lent buffer.
void deliver(TcpState* t, int res) noexcept {
  uv_buf_t buf = t->buf;
  t->buf = uv_buf_t{};
  t->buf_lent = t->stashed = false;
  ssize_t nread;
  if (res > 0) {
    nread = res;
    if (t->read_mode == ReadMode::bulk) {
      // Back to multishot recv once the stream is no longer bulk.
      const unsigned small = t->ctx->chain().uring()->provided_buffer_size();
      t->run = static_cast<unsigned>(res) < small ? t->run + 1 : 0;
      if (t->run >= kSmallRun) {
        t->run = 0;
        t->read_mode = ReadMode::multishot;
      }
    }
  } else if (res == 0) {
    nread = UV_EOF;  // as libuv: reading stops at the end of the stream
    t->flags &= ~kReading;
  } else if (res == -EAGAIN || res == -EWOULDBLOCK) {
    nread = 0;
  } else {
    nread = res;  // as libuv: reading stops; the user should close
    t->flags &= ~(kReading | kReadable | kWritable);
  }
  t->read_cb(t->handle, nread, &buf);
  maybe_arm_read(t);
}

void on_read_op(TcpState* t, Role role, int res, bool we_cancelled) noexcept {
  if (role == Role::stash) {
    // The nop only carried us back into the loop; the stash is the result.
    if ((t->flags & (kReading | kClosing)) == kReading) deliver(t, t->stash_res);
    return;
  }
  if (closing(t) || !(t->flags & kReading)) {
    // Nobody reads now: keep the buffer, and what came with it, for the next
    // rp_read_start (or hand the buffer back at the close).
    t->stashed = true;
    t->stash_res = role == Role::recv ? res : -ECANCELED;
    return;
  }
  if (res == -ECANCELED && we_cancelled) {
    // Stopped and started again before the cancel came back: go on reading
    // into the same buffer.
    t->stashed = true;
    t->stash_res = -ECANCELED;
    maybe_arm_read(t);
    return;
  }
  if (role == Role::poll && res >= 0) {
    uv_buf_t buf = t->buf;
    t->buf = uv_buf_t{};
    t->buf_lent = false;
    t->read_cb(t->handle, UV_ENOBUFS, &buf);
    maybe_arm_read(t);
    return;
  }
  deliver(t, res);
}

// ---- Reading with multishot recv ------------------------------------------------
//
// A reading handle keeps ONE multishot recv in flight (ms_op), from
// rp_read_start until rp_read_stop, EOF or an error. Each completion's bytes sit
// in a buffer of the driver's ring: they are copied into buffers from alloc_cb
// (as many alloc_cb/read_cb rounds as the user's buffers need), and the ring
// buffer is recycled before the completion returns. Bytes that cannot be
// delivered now (reading stopped, or alloc_cb gave no buffer) are copied into
// `held`, and delivered in order, before anything newer, from the loop once the
// handle reads again (a drain nop): nothing is lost. EOF and errors that come
// while bytes are held wait behind them in held_end.

bool reads_now(const TcpState* t) noexcept {
  return (t->flags & (kReading | kClosing)) == kReading;
}

void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept;

void arm_multishot(TcpState* t) noexcept {
  Op& op = t->ms_op;
  op.code = OpCode::recv_multishot;
  op.fd = t->fd;
  op.flags = 0;
  op.len = 0;
  op.buf = nullptr;  // the kernel picks buffers from the driver's ring
  op.complete = &on_ms_op;
  op.data = t;
  t->ms_active = true;
  t->ms_cancelled = false;
  submit(t, &op);
}

// Brings held bytes back from the loop (never from inside a call of the user's).
void schedule_drain(TcpState* t) noexcept {
  if (t->role != Role::none || closing(t)) return;  // one is on its way already
  prepare_handle_op(t, Role::drain, OpCode::nop, &on_handle_op);
  submit(t, &t->op);
}

void ms_resume(TcpState* t) noexcept {
  if (t->held_len > 0 || t->held_end != 0) return schedule_drain(t);  // old bytes first
  if (t->read_mode != ReadMode::multishot) {
    if (t->role == Role::none) arm_read(t);  // the held bytes are out: plain recv goes on
    return;
  }
  if (!t->ms_active) arm_multishot(t);
  // Otherwise it is armed, or its cancel is on the way and its final
  // completion resumes.
}

// Keeps `n` bytes for later. Out of memory, they cannot be kept: the reader
// gets UV_ENOMEM after the bytes held before them, and reading stops.
void hold(TcpState* t, const char* p, std::size_t n) noexcept {
  if (t->held_end != 0) return;  // nothing is read past an error
  if (t->held_off > 0 && t->held_len + n > t->held_cap) {
    std::memmove(t->held, t->held + t->held_off, t->held_len - t->held_off);
    t->held_len -= t->held_off;
    t->held_off = 0;
  }
  if (t->held_len + n > t->held_cap) {
    std::size_t cap = t->held_cap ? t->held_cap : 16 * 1024;
    while (cap < t->held_len + n) cap *= 2;
    auto* grown = static_cast<char*>(std::realloc(t->held, cap));
    if (grown == nullptr) {
      t->held_end = UV_ENOMEM;
      if (t->ms_active && !t->ms_cancelled) {
        t->ms_cancelled = true;
        t->ctx->chain().io().cancel(&t->ms_op);
      }
      return;
    }
    t->held = grown;
    t->held_cap = cap;
  }
  std::memcpy(t->held + t->held_len, p, n);
  t->held_len += n;
  if (t->held_len - t->held_off >= kHeldPause && t->ms_active && !t->ms_cancelled) {
    // The reader cannot keep up (alloc_cb gives no buffer): let the socket
    // hold the rest. ms_resume() re-arms once the held bytes are delivered.
    t->ms_cancelled = true;
    t->ctx->chain().io().cancel(&t->ms_op);
  }
}

// Copies [p, p + n) into buffers from alloc_cb, one read_cb each, while the
// handle reads. Returns the bytes delivered; sets *starved when alloc_cb gave
// no buffer (read_cb got UV_ENOBUFS, as libuv does).
std::size_t hand_over(TcpState* t, const char* p, std::size_t n, bool* starved) noexcept {
  std::size_t done = 0;
  while (done < n && reads_now(t)) {
    uv_buf_t buf = uv_buf_init(nullptr, 0);
    // The bytes waiting, not libuv's blind 64 KiB: a program that allocates
    // what is suggested then allocates what it needs. (Measured on rp_echo at
    // 50 x 16: with 64 KiB, mallocs that no lent read pins any more made glibc
    // trim and re-fault its heap, and the server spent ~15% more CPU per
    // message.)
    t->alloc_cb(t->handle, n - done < kSuggestedSize ? n - done : kSuggestedSize, &buf);
    if (!usable(buf)) {
      *starved = true;
      t->read_cb(t->handle, UV_ENOBUFS, &buf);
      break;
    }
    if (closing(t)) {
      // alloc_cb closed the handle: its buffer goes back unfilled, as at close.
      t->read_cb(t->handle, UV_ECANCELED, &buf);
      break;
    }
    // Also when alloc_cb stopped reading: libuv, too, fills the buffer it
    // asked for and hands it back with the bytes.
    const std::size_t k = n - done < buf.len ? n - done : buf.len;
    std::memcpy(buf.base, p + done, k);
    done += k;
    t->read_cb(t->handle, static_cast<ssize_t>(k), &buf);
  }
  return done;
}

// Hands the handle's pending end (EOF or an error) to the reader.
void deliver_end(TcpState* t) noexcept {
  const int end = t->held_end;
  t->held_end = 0;
  if (end == UV_EOF) {
    t->flags &= ~kReading;  // as libuv: reading stops at the end of the stream
  } else {
    t->flags &= ~(kReading | kReadable | kWritable);  // as libuv: the user should close
  }
  // As libuv does for EOF and errors found without reading: a null buffer.
  uv_buf_t buf = uv_buf_init(nullptr, 0);
  t->read_cb(t->handle, end, &buf);
}

// From the loop: delivers the held bytes, then the held end, then goes on
// reading.
void drain(TcpState* t) noexcept {
  bool starved = false;
  while (reads_now(t) && t->held_off < t->held_len && !starved) {
    t->held_off += hand_over(t, t->held + t->held_off, t->held_len - t->held_off, &starved);
  }
  if (t->held_off == t->held_len) t->held_off = t->held_len = 0;
  if (!reads_now(t)) return;
  if (t->held_len > 0) return schedule_drain(t);  // no buffer now: try again next turn, as libuv
  if (t->held_end != 0) return deliver_end(t);
  maybe_arm_read(t);
}

// The bytes of one completion, while the ring buffer holding them is ours.
void take_bytes(TcpState* t, const char* p, std::size_t n) noexcept {
  if (closing(t)) return;  // nobody reads any more: dropped, as libuv does at close
  std::size_t done = 0;
  if (reads_now(t) && t->held_len == 0 && t->held_end == 0) {
    bool starved = false;
    done = hand_over(t, p, n, &starved);
    if (closing(t)) return;
  }
  if (done < n) {
    hold(t, p + done, n - done);
    if (reads_now(t)) schedule_drain(t);
  }
}

// The multishot recv's final completion: it ended because we asked (rp_read_stop,
// a pause, rp_close), at EOF, on an error, or because the kernel lacks it.
void ms_ended(TcpState* t, int res, bool we_cancelled) noexcept {
  if (closing(t)) return;
  if (t->to_bulk) {
    t->to_bulk = false;
    t->run = 0;
    if (t->read_mode == ReadMode::multishot) t->read_mode = ReadMode::bulk;
  }
  if (res == -EOPNOTSUPP) {
    // The kernel refused multishot recv (before Linux 6.0): plain recv from now
    // on, for this handle and, through the driver, every later one.
    t->read_mode = ReadMode::plain;
  } else if (res == 0 && t->held_end == 0) {
    t->held_end = UV_EOF;
  } else if (res < 0 && !(res == -ECANCELED && we_cancelled) && t->held_end == 0) {
    t->held_end = res;  // also an EOF or error that came after rp_read_stop: kept
  }
  if (reads_now(t) && t->held_len == 0 && t->held_end != 0) return deliver_end(t);
  maybe_arm_read(t);
}

void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept {
  auto* t = static_cast<TcpState*>(op->data);
  const bool more = flags & kMore;
  const bool we_cancelled = t->ms_cancelled;
  if (!more) {
    --t->pending;
    t->ms_active = false;
    t->ms_cancelled = false;
  }
  if (flags & kBuffer) {
    // The driver's buffer is ours from this completion until recycle(); the
    // driver (and so the buffer) outlives every op in flight.
    UringDriver& ring = *t->ctx->chain().uring();
    const std::uint16_t id = buffer_id(flags);
    if (res > 0) take_bytes(t, ring.provided_buffer(id), static_cast<std::size_t>(res));
    ring.recycle(id);
    // A full buffer after full buffer: a bulk stream, better read plain.
    t->run = res > 0 && static_cast<unsigned>(res) >= ring.provided_buffer_size() ? t->run + 1 : 0;
    if (t->run >= kBulkRun && t->ms_active && !t->ms_cancelled && reads_now(t)) {
      t->to_bulk = true;
      t->ms_cancelled = true;
      t->ctx->chain().io().cancel(&t->ms_op);
    }
  } else if (res > 0) {
    std::fprintf(stderr, "ringpark: multishot recv of rp_tcp_t %p got %d bytes without a buffer\n",
                 static_cast<void*>(t->handle), res);
    std::abort();
  }
  if (!more) ms_ended(t, res, we_cancelled);
  maybe_finalize(t);
}

// ---- Listening ----------------------------------------------------------------

bool push_accepted(TcpState* t, int fd) noexcept {
  if (t->acc_count == t->acc_cap) {
    std::uint32_t cap = t->acc_cap ? t->acc_cap * 2 : 16;
    auto* ring = static_cast<int*>(std::malloc(cap * sizeof(int)));
    if (ring == nullptr) return false;
    for (std::uint32_t i = 0; i < t->acc_count; ++i)
      ring[i] = t->accepted[(t->acc_head + i) % t->acc_cap];
    std::free(t->accepted);
    t->accepted = ring;
    t->acc_cap = cap;
    t->acc_head = 0;
  }
  t->accepted[(t->acc_head + t->acc_count) % t->acc_cap] = fd;
  ++t->acc_count;
  return true;
}

void arm_accept(TcpState* t) noexcept {
  prepare_handle_op(t, Role::accept, OpCode::accept_multishot, &on_handle_op);
  t->op.flags = SOCK_NONBLOCK | SOCK_CLOEXEC;  // accept4's flags, as libuv's accept
  submit(t, &t->op);
}

void on_accept(TcpState* t, int res, bool more) noexcept {
  if (res >= 0) {
    if (closing(t)) {
      ::close(res);  // came in while the cancel was on its way
    } else if (!push_accepted(t, res)) {
      ::close(res);
      t->connection_cb(t->handle, UV_ENOMEM);
    } else {
      t->connection_cb(t->handle, 0);
    }
  } else if (res != -ECANCELED && res != -ECONNABORTED && !closing(t)) {
    t->connection_cb(t->handle, res);  // libuv skips ECONNABORTED silently too
  }
  if (more || closing(t) || !(t->flags & kListening) || t->role != Role::none) return;
  // The multishot accept ended (the driver re-arms one that ends without an
  // error, so this is an error). Listen on unless the socket itself is wrong or
  // the backend is going away.
  switch (res) {
    case -ECANCELED:
    case -EBADF:
    case -EINVAL:
    case -ENOTSOCK:
    case -EOPNOTSUPP:
    case -EFAULT:
      t->flags &= ~kListening;
      return;
    case -ECONNABORTED:
    case -EPERM:
    case -EPROTO:
    case -EINTR:
    case -EAGAIN:
      // That one connection failed and is gone from the queue: go on at once.
      arm_accept(t);
      return;
    default:
      // EMFILE, ENFILE, ENOBUFS, ENOMEM or anything unknown: the next attempt
      // would fail the same way right now. Retry after a pause, not in a spin;
      // each failed retry is reported again.
      prepare_handle_op(t, Role::backoff, OpCode::timeout, &on_handle_op);
      t->op.timeout_ns = kAcceptBackoffNs;
      submit(t, &t->op);
  }
}

// ---- The handle's op ----------------------------------------------------------

void on_handle_op(Op* op, int res, std::uint32_t flags) noexcept {
  auto* t = static_cast<TcpState*>(op->data);
  const bool more = flags & kMore;
  const Role role = t->role;
  const bool we_cancelled = t->read_cancelled;
  if (!more) {
    --t->pending;
    t->role = Role::none;
    t->read_cancelled = false;
  }
  switch (role) {
    case Role::recv:
    case Role::poll:
    case Role::stash:
      on_read_op(t, role, res, we_cancelled);
      break;
    case Role::accept:
      on_accept(t, res, more);
      break;
    case Role::backoff:
      if (!closing(t) && (t->flags & kListening)) arm_accept(t);
      break;
    case Role::drain:
      if (reads_now(t)) drain(t);
      break;
    case Role::barrier:
      break;
    case Role::close:
      // A close op that did not run leaves the socket open: close it here.
      if (res == -ECANCELED || res == -EOPNOTSUPP || res == -EINVAL) ::close(op->fd);
      finish_close(t);
      return;  // the handle may be gone
    case Role::none:
      std::fprintf(stderr, "ringpark: completion for idle rp_tcp_t %p\n",
                   static_cast<void*>(t->handle));
      std::abort();
  }
  maybe_finalize(t);
}

// ---- Writing ------------------------------------------------------------------

void start_write(TcpState* t, WriteState* w) noexcept {
  while (w->index < w->nbufs && w->iov[w->index].iov_len == 0) ++w->index;
  Op& op = w->op;
  op.fd = t->fd;
  op.offset = -1;
  op.complete = &on_write_op;
  op.data = w;
  const unsigned left = w->nbufs - w->index;
  if (left == 0) {
    op.code = OpCode::nop;  // zero bytes: completes with 0, in order
  } else if (left == 1) {
    const iovec& v = w->iov[w->index];
    op.code = OpCode::send;
    op.buf = v.iov_base;  // the caller's bytes, valid until the write callback
    op.len = static_cast<std::uint32_t>(v.iov_len < kMaxSend ? v.iov_len : kMaxSend);
    // MSG_WAITALL: the kernel finishes a short send itself where it can.
    op.flags = MSG_NOSIGNAL | MSG_WAITALL;
  } else {
    op.code = OpCode::writev;
    op.buf = &w->iov[w->index];  // our copy of the array, in the request
    op.len = left < IOV_MAX ? left : IOV_MAX;
    op.flags = 0;
  }
  t->write_active = true;
  submit(t, &op);
}

// Takes the head write off the queue and runs its callback.
void finish_write(TcpState* t, WriteState* w, int status) noexcept {
  t->write_head = w->next;
  if (t->write_head == nullptr) t->write_tail = nullptr;
  if (w->iov != w->small) std::free(w->iov);
  w->iov = nullptr;
  rp_write_t* req = w->req;
  uv_private::req_unregister(t->loop);
  if (req->cb) req->cb(req, status);  // the request may be freed from here on
}

void start_shutdown(TcpState* t) noexcept {
  ShutdownState* s = t->shutdown;
  s->started = true;
  s->op.code = OpCode::shutdown;
  s->op.fd = t->fd;
  s->op.flags = SHUT_WR;
  s->op.complete = &on_shutdown_op;
  s->op.data = s;
  submit(t, &s->op);
}

// Starts the head write, or the shutdown once no write is left, if the handle
// may write now.
void pump_writes(TcpState* t) noexcept {
  if ((t->flags & (kClosing | kConnecting)) || t->fd < 0 || t->write_active) return;
  if (t->write_head) return start_write(t, t->write_head);
  if (t->shutdown && !t->shutdown->started) start_shutdown(t);
}

// Consumes `n` sent bytes from the front of the write's buffers.
void advance(WriteState* w, std::size_t n) noexcept {
  while (n > 0 && w->index < w->nbufs) {
    iovec& v = w->iov[w->index];
    const std::size_t k = n < v.iov_len ? n : v.iov_len;
    v.iov_base = static_cast<char*>(v.iov_base) + k;
    v.iov_len -= k;
    n -= k;
    if (v.iov_len == 0) ++w->index;
  }
  while (w->index < w->nbufs && w->iov[w->index].iov_len == 0) ++w->index;
}

void on_write_op(Op* op, int res, std::uint32_t) noexcept {
  auto* w = static_cast<WriteState*>(op->data);
  TcpState* t = w->tcp;
  --t->pending;
  t->write_active = false;
  if (res > 0) advance(w, static_cast<std::size_t>(res));
  const bool done = w->index >= w->nbufs;
  int status;
  if (done && res >= 0) {
    status = 0;
  } else if (closing(t)) {
    status = UV_ECANCELED;
  } else if (res >= 0 || res == -EAGAIN || res == -EINTR) {
    start_write(t, w);  // a short send: send the rest before the callback
    return;
  } else {
    status = res;
  }
  finish_write(t, w, status);
  pump_writes(t);
  maybe_finalize(t);
}

// ---- Connecting and shutting down ----------------------------------------------

void on_connect_op(Op* op, int res, std::uint32_t) noexcept {
  auto* c = static_cast<ConnectState*>(op->data);
  TcpState* t = c->tcp;
  --t->pending;
  t->connect = nullptr;
  t->flags &= ~kConnecting;
  int status = c->forced != 0 ? c->forced : res;
  if (closing(t)) status = UV_ECANCELED;  // as libuv: the handle went first
  rp_connect_t* req = c->req;
  uv_private::req_unregister(t->loop);
  if (req->cb) req->cb(req, status);
  if (!closing(t)) {
    // As libuv: writes queued behind a failed connect are cancelled.
    if (status < 0) {
      while (t->write_head) finish_write(t, t->write_head, UV_ECANCELED);
    }
    pump_writes(t);
    maybe_arm_read(t);
  }
  maybe_finalize(t);
}

void on_shutdown_op(Op* op, int res, std::uint32_t) noexcept {
  auto* s = static_cast<ShutdownState*>(op->data);
  TcpState* t = s->tcp;
  --t->pending;
  t->shutdown = nullptr;
  t->flags &= ~kShutting;
  if (res == 0) t->flags |= kShut;
  const int status = res == 0 || !closing(t) ? res : UV_ECANCELED;
  rp_shutdown_t* req = s->req;
  uv_private::req_unregister(t->loop);
  if (req->cb) req->cb(req, status);
  maybe_finalize(t);
}

int getsockpeername(const rp_tcp_t* handle, sockaddr* name, int* namelen,
                    int (*fn)(int, sockaddr*, socklen_t*)) noexcept {
  const TcpState* t = live(handle);
  if (t == nullptr || name == nullptr || namelen == nullptr || *namelen < 0) return UV_EINVAL;
  if (t->delayed_error) return t->delayed_error;
  if (t->fd < 0 || closing(t)) return UV_EBADF;  // as uv_fileno
  socklen_t len = static_cast<socklen_t>(*namelen);
  if (fn(t->fd, name, &len) < 0) return -errno;
  *namelen = static_cast<int>(len);
  return 0;
}

}  // namespace
}  // namespace ringpark::detail

using namespace ringpark::detail;

extern "C" {

int rp_tcp_init(uv_loop_t* loop, rp_tcp_t* handle) {
  if (loop == nullptr || handle == nullptr) return UV_EINVAL;
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return UV_EMFILE;
  auto* t = new (handle->private_) TcpState;
  t->handle = handle;
  t->loop = loop;
  t->ctx = ctx;
  ctx->handle_opened();
  handle->loop = loop;
  return 0;
}

int rp_tcp_open(rp_tcp_t* handle, uv_os_sock_t sock) {
  TcpState* t = live(handle);
  if (t == nullptr || closing(t)) return UV_EINVAL;
  if (t->fd >= 0) return t->fd == sock ? 0 : UV_EBUSY;
  const int fl = ::fcntl(sock, F_GETFL);
  if (fl < 0) return -errno;
  if (!(fl & O_NONBLOCK) && ::fcntl(sock, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
  if (t->flags & kNodelay) {
    if (int err = set_nodelay(sock, 1); err < 0) return err;
  }
  t->fd = sock;
  t->flags |= kReadable | kWritable;
  return 0;
}

int rp_tcp_bind(rp_tcp_t* handle, const struct sockaddr* addr, unsigned int flags) {
  TcpState* t = live(handle);
  if (t == nullptr || addr == nullptr || closing(t)) return UV_EINVAL;
  const socklen_t len = ip_addr_len(addr);
  if (len == 0 || (flags & ~static_cast<unsigned>(UV_TCP_IPV6ONLY)) != 0) return UV_EINVAL;
  if ((flags & UV_TCP_IPV6ONLY) && addr->sa_family != AF_INET6) return UV_EINVAL;
  if (t->fd < 0) {
    if (int err = new_socket(t, addr->sa_family); err < 0) return err;
  }
  int on = 1;
  if (::setsockopt(t->fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0) return -errno;
  if (addr->sa_family == AF_INET6) {
    on = (flags & UV_TCP_IPV6ONLY) != 0;
    if (::setsockopt(t->fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) < 0) return -errno;
  }
  if (::bind(t->fd, addr, len) < 0) {
    // As libuv: EADDRINUSE waits for listen or connect.
    if (errno != EADDRINUSE) return errno == EAFNOSUPPORT ? UV_EINVAL : -errno;
    t->delayed_error = UV_EADDRINUSE;
  } else {
    t->delayed_error = 0;
  }
  return 0;
}

int rp_listen(rp_tcp_t* server, int backlog, rp_connection_cb cb) {
  TcpState* t = live(server);
  if (t == nullptr || cb == nullptr || closing(t)) return UV_EINVAL;
  if (t->delayed_error) return t->delayed_error;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  if ((t->role != Role::none && t->role != Role::accept && t->role != Role::backoff) ||
      t->ms_active)
    return UV_EBUSY;  // reading
  if (t->fd < 0) {
    if (int err = new_socket(t, AF_INET); err < 0) return err;  // as libuv
  }
  if (::listen(t->fd, backlog) < 0) return -errno;
  t->connection_cb = cb;
  t->flags |= kListening;
  if (t->role == Role::none) arm_accept(t);
  ctx->update_ref();
  return 0;
}

int rp_accept(rp_tcp_t* server, rp_tcp_t* client) {
  TcpState* s = live(server);
  TcpState* c = live(client);
  if (s == nullptr || c == nullptr || closing(c)) return UV_EINVAL;
  if (s->acc_count == 0) return UV_EAGAIN;
  if (c->fd >= 0) return UV_EBUSY;
  const int fd = s->accepted[s->acc_head];
  s->acc_head = (s->acc_head + 1) % s->acc_cap;
  --s->acc_count;
  if (c->flags & kNodelay) set_nodelay(fd, 1);
  c->fd = fd;
  c->flags |= kReadable | kWritable;
  return 0;
}

int rp_tcp_connect(rp_connect_t* req, rp_tcp_t* handle, const struct sockaddr* addr,
                   rp_connect_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr || addr == nullptr || closing(t)) return UV_EINVAL;
  const socklen_t len = ip_addr_len(addr);
  if (len == 0) return UV_EINVAL;
  if (t->connect != nullptr) return UV_EALREADY;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  if (t->delayed_error == 0 && t->fd < 0) {
    if (int err = new_socket(t, addr->sa_family); err < 0) return err;
  }
  auto* c = new (req->private_) ConnectState;
  c->req = req;
  c->tcp = t;
  c->op.complete = &on_connect_op;
  c->op.data = c;
  if (t->delayed_error != 0) {
    c->forced = t->delayed_error;  // reported from the loop, as libuv does
    c->op.code = OpCode::nop;
  } else {
    // Copied: the kernel reads the address when the SQE is issued, after this
    // returns; the request keeps the copy until the op's final CQE.
    std::memcpy(&c->addr, addr, len);
    c->op.code = OpCode::connect;
    c->op.fd = t->fd;
    c->op.addr = &c->addr.sa;
    c->op.len = len;
    t->flags |= kReadable | kWritable;
  }
  req->handle = handle;
  req->cb = cb;
  t->connect = c;
  t->flags |= kConnecting;
  uv_private::req_register(t->loop);
  submit(t, &c->op);
  ctx->update_ref();
  return 0;
}

int rp_read_start(rp_tcp_t* handle, rp_alloc_cb alloc_cb, rp_read_cb read_cb) {
  TcpState* t = live(handle);
  if (t == nullptr || alloc_cb == nullptr || read_cb == nullptr || closing(t)) return UV_EINVAL;
  if (t->flags & kReading) return UV_EALREADY;
  if (!(t->flags & kReadable) || (t->flags & kListening) || t->fd < 0) return UV_ENOTCONN;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  t->alloc_cb = alloc_cb;
  t->read_cb = read_cb;
  t->flags |= kReading;
  if (t->read_mode == ReadMode::undecided) {
    UringDriver* ring = ctx->chain().uring();
    t->read_mode = ring != nullptr && ring->supports(OpCode::recv_multishot) ? ReadMode::multishot
                                                                             : ReadMode::plain;
  }
  maybe_arm_read(t);
  ctx->update_ref();
  return 0;
}

int rp_read_stop(rp_tcp_t* handle) {
  TcpState* t = live(handle);
  if (t == nullptr) return UV_EINVAL;
  if (!(t->flags & kReading)) return 0;
  t->flags &= ~kReading;
  if (t->role == Role::recv || t->role == Role::poll || t->role == Role::stash) {
    // A request: the buffer stays lent until the op's final CQE.
    t->read_cancelled = true;
    t->ctx->chain().io().cancel(&t->op);
  }
  if (t->ms_active && !t->ms_cancelled) {
    // Bytes that still come before its final CQE are held for the next start.
    t->ms_cancelled = true;
    t->ctx->chain().io().cancel(&t->ms_op);
  }
  return 0;
}

int rp_write(rp_write_t* req, rp_tcp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
             rp_write_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr || bufs == nullptr || nbufs == 0) return UV_EINVAL;
  for (unsigned i = 0; i < nbufs; ++i) {
    if (bufs[i].base == nullptr && bufs[i].len > 0) return UV_EINVAL;
  }
  if (t->fd < 0 || closing(t)) return UV_EBADF;  // as libuv, whose fd is -1 then
  if (!(t->flags & kWritable)) return UV_EPIPE;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  auto* w = new (req->private_) WriteState;
  w->iov = w->small;
  if (nbufs > 4) {
    w->iov = static_cast<iovec*>(std::malloc(nbufs * sizeof(iovec)));
    if (w->iov == nullptr) return UV_ENOMEM;
  }
  std::memcpy(w->iov, bufs, nbufs * sizeof(iovec));  // uv_buf_t is an iovec
  w->nbufs = nbufs;
  w->req = req;
  w->tcp = t;
  req->handle = handle;
  req->cb = cb;
  if (t->write_tail) {
    t->write_tail->next = w;
  } else {
    t->write_head = w;
  }
  t->write_tail = w;
  uv_private::req_register(t->loop);
  pump_writes(t);
  ctx->update_ref();
  return 0;
}

int rp_shutdown(rp_shutdown_t* req, rp_tcp_t* handle, rp_shutdown_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr) return UV_EINVAL;
  if (!(t->flags & kWritable) || (t->flags & (kShut | kShutting | kClosing)) || t->fd < 0)
    return UV_ENOTCONN;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  auto* s = new (req->private_) ShutdownState;
  s->req = req;
  s->tcp = t;
  req->handle = handle;
  req->cb = cb;
  t->shutdown = s;
  t->flags |= kShutting;
  t->flags &= ~kWritable;
  uv_private::req_register(t->loop);
  pump_writes(t);
  ctx->update_ref();
  return 0;
}

int rp_close(rp_tcp_t* handle, rp_close_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || closing(t)) return UV_EINVAL;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  t->flags |= kClosing;
  t->flags &= ~(kReading | kListening);
  t->close_cb = cb;
  // Requests, not releases: every op still ends with its own final CQE.
  IoBackend& io = ctx->chain().io();
  if (t->role != Role::none) io.cancel(&t->op);
  if (t->ms_active) io.cancel(&t->ms_op);
  if (t->write_active) io.cancel(&t->write_head->op);
  if (t->connect) io.cancel(&t->connect->op);
  if (t->shutdown && t->shutdown->started) io.cancel(&t->shutdown->op);
  if (t->pending == 0) {
    // Nothing in flight: finish from the loop all the same, never in here.
    prepare_handle_op(t, Role::barrier, OpCode::nop, &on_handle_op);
    submit(t, &t->op);
  }
  ctx->update_ref();
  return 0;
}

int rp_is_closing(const rp_tcp_t* handle) {
  const TcpState* t = live(handle);
  return t != nullptr && closing(t);
}

int rp_tcp_nodelay(rp_tcp_t* handle, int enable) {
  TcpState* t = live(handle);
  if (t == nullptr) return UV_EINVAL;
  if (t->fd >= 0) {
    if (int err = set_nodelay(t->fd, enable ? 1 : 0); err < 0) return err;
  }
  if (enable) {
    t->flags |= kNodelay;
  } else {
    t->flags &= ~kNodelay;
  }
  return 0;
}

int rp_tcp_getsockname(const rp_tcp_t* handle, struct sockaddr* name, int* namelen) {
  return getsockpeername(handle, name, namelen, &::getsockname);
}

int rp_tcp_getpeername(const rp_tcp_t* handle, struct sockaddr* name, int* namelen) {
  return getsockpeername(handle, name, namelen, &::getpeername);
}

int rp_fileno(const rp_tcp_t* handle, uv_os_fd_t* fd) {
  const TcpState* t = live(handle);
  if (t == nullptr || fd == nullptr) return UV_EINVAL;
  if (t->fd < 0 || closing(t)) return UV_EBADF;
  *fd = t->fd;
  return 0;
}

}  // extern "C"
