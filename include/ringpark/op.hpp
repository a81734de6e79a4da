// One asynchronous operation, described independently of the backend that runs
// it (the io_uring driver or the epoll fallback). Public only because the C++ API
// embeds operations by value in awaitables and handles; users do not touch the
// fields.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>

struct iovec;
struct sockaddr;
struct statx;

namespace ringpark::detail {

enum class OpCode : std::uint8_t {
  nop,
  timeout,         // completes with -ETIME after `timeout_ns`
  poll,            // one-shot readiness: res = revents
  poll_multishot,  // one result per readiness change, flagged kMore until the last
  read,            // pread at `offset`, or read at the file position if offset == -1
  write,
  readv,
  writev,
  recv,
  // One request that keeps receiving on a socket into buffers the backend
  // provides: one completion per chunk, each naming its buffer (kBuffer and
  // buffer_id() in the flags), flagged kMore until the last. `buf` and `len`
  // are unused. Completes -EOPNOTSUPP (final) where the backend lacks it; ask
  // UringDriver::supports() first. See UringDriver for the buffers' rules.
  recv_multishot,
  send,
  // Datagrams. `buf` points at a msghdr (struct msghdr*), which stays valid, as
  // everything it points at, until the op's final completion.
  //
  // One datagram, as recvmsg(2) with `flags`: into the msghdr's iovecs, the
  // source address into msg_name (msg_namelen set to its length), control
  // messages into msg_control; msg_flags says MSG_TRUNC when the datagram did
  // not fit. res = the bytes received (with MSG_TRUNC in `flags`, the
  // datagram's real length), or -errno.
  recvmsg,
  // One request that keeps receiving datagrams into buffers the backend
  // provides: one completion per datagram, naming its buffer (kBuffer,
  // buffer_id()), flagged kMore until the last. The msghdr's msg_namelen and
  // msg_controllen say how much room each buffer keeps for the source address
  // and control messages (its iovecs are unused). Each buffer holds the
  // datagram whole when it fits (the io_uring driver's do, up to 65,527 bytes);
  // UringDriver::datagram() reads the address, payload, real length and
  // MSG_TRUNC out of it. Completes -EOPNOTSUPP (final) where the backend lacks
  // it; ask UringDriver::supports() first, else use recvmsg.
  recvmsg_multishot,
  // One datagram, as sendmsg(2) with `flags` (MSG_NOSIGNAL always): the
  // destination in msg_name (or none on a connected socket), the bytes
  // gathered from the msghdr's iovecs. res = the bytes sent, or -errno. Sends
  // to one socket leave in the order they were submitted unless the socket's
  // send buffer is full (then the op waits for room, as a blocking sendmsg
  // would, and a later one may leave first on io_uring).
  sendmsg,
  accept,
  accept_multishot,
  connect,
  shutdown,
  close,
  cancel,  // asks the backend to cancel `target`; res = 0, -ENOENT or -EALREADY
  openat,
  statx,
  fsync,
  fdatasync,
  unlinkat,
  renameat,
  mkdirat,
  ftruncate,  // to length `offset`
};

// Set in `flags` of a completion when more completions of the same operation
// follow (a multishot operation that is still armed).
inline constexpr std::uint32_t kMore = 1u << 0;
// Set when the completion's bytes are in a buffer the backend provided
// (OpCode::recv_multishot, recvmsg_multishot); buffer_id(flags) says which
// one. From that completion on the buffer is the op owner's, until it gives it
// back. Mirrors IORING_CQE_F_BUFFER and IORING_CQE_BUFFER_SHIFT.
inline constexpr std::uint32_t kBuffer = 1u << 1;
inline constexpr unsigned kBufferIdShift = 16;
// Set, with kMore and res 0, on a completion of OpCode::recvmsg_multishot that
// carries no datagram but says: the backend's datagram buffers ran out while
// datagrams still wait in the socket. The op goes on by itself once buffers
// come back; an owner that hands datagrams over in batches can wait for the
// rest of a batch instead of cutting it here (the socket is not drained).
inline constexpr std::uint32_t kDry = 1u << 2;
inline constexpr std::uint16_t buffer_id(std::uint32_t flags) noexcept {
  return static_cast<std::uint16_t>(flags >> kBufferIdShift);
}

// One datagram received by OpCode::recvmsg_multishot, read out of its
// completion's buffer by IoBackend::datagram(). The pointers are into that
// buffer: valid until the owner recycles it.
struct Datagram {
  const sockaddr* addr = nullptr;  // the source address, or null if none
  unsigned addrlen = 0;            // its length (at most the msg_namelen kept)
  const char* data = nullptr;      // the payload that fitted the buffer
  std::size_t len = 0;             // its length
  std::size_t full_len = 0;        // the datagram's real length (> len when cut)
  int msg_flags = 0;               // MSG_TRUNC when cut, MSG_CTRUNC...
  const void* control = nullptr;   // control messages (cmsghdr), if room was kept
  std::size_t controllen = 0;
};

struct Op;
// Called once per completion, on the loop thread, after the backend is done
// with the completion record. With kMore clear this is the final completion: the
// backend no longer references the op or anything it points at.
using CompleteFn = void (*)(Op* op, int res, std::uint32_t flags) noexcept;

// Pinned: from submission until its final completion the op's address is what
// the kernel hands back (io_uring user_data), so it is neither copied nor moved.
struct Op {
  Op() = default;
  Op(const Op&) = delete;
  Op& operator=(const Op&) = delete;

  OpCode code = OpCode::nop;
  int fd = -1;
  int dfd = -100;  // directory fd for *at operations; AT_FDCWD by default
  int flags = 0;   // open flags, send/recv flags, *at flags, poll events
  std::uint32_t len = 0;
  std::uint32_t mode = 0;
  std::int64_t offset = -1;
  void* buf = nullptr;  // read/write/recv/send buffer; readv/writev: iovec*; *msg: msghdr*
  const char* path = nullptr;
  const char* path2 = nullptr;  // renameat's new path
  sockaddr* addr = nullptr;     // accept (out) and connect (in)
  unsigned* addrlen = nullptr;  // accept: in/out; connect: uses `len`
  struct statx* statxbuf = nullptr;
  Op* target = nullptr;              // cancel
  std::uint64_t timeout_ns = 0;      // timeout
  struct {
    std::int64_t tv_sec, tv_nsec;
  } ts_{};  // kernel copy of timeout_ns, kept in the pinned op while in flight

  CompleteFn complete = nullptr;
  void* data = nullptr;  // for the owner of the op

  // Backend bookkeeping.
  enum class State : std::uint8_t { idle, in_flight, cancelling } state = State::idle;
  Op* next_ = nullptr;  // intrusive link for the fallback's wait lists
  Op* prev_ = nullptr;
};

// Work that prepares ops at the end of a turn rather than at once, so that one
// op can carry what a whole turn queued (a stream's writes, gathered into one
// sendmsg). IoBackend::defer() runs it once, right before the backend next
// hands work to the kernel. Pinned from defer() until `run` is called.
struct Deferred {
  void (*run)(Deferred* self) noexcept = nullptr;
  Deferred* next = nullptr;
  bool queued = false;
};

// The backend-neutral operations interface that the io_uring driver and the epoll
// fallback both implement. Loop thread only.
class IoBackend {
 public:
  virtual ~IoBackend() = default;
  // Queues `op`; it completes later, through op->complete, on the loop thread
  // (never inside this call, except after shutdown(), when it completes inside
  // it with -ECANCELED). Nothing reaches the kernel before the next park or
  // turn: every op queued during a turn goes out in one submission.
  virtual void submit(Op* op) noexcept = 0;
  // Queues the sendmsg ops `ops[0..n)`, all on one socket, so that they leave
  // in this order even when the socket's send buffer is full (submit() keeps
  // no order then on io_uring). Each completes through its own op->complete,
  // as submit()'s do, in this order. On io_uring they are linked: each starts
  // only once the one before it has completed, and one that fails (a
  // negative result, or a cancel) ends every later one with -ECANCELED,
  // unsent: the owner queues those again. The fallback keeps one socket's
  // sendmsg ops in submission order by itself and ends none early. Returns
  // how many it took (at least 1 when n > 0; fewer than n when the backend
  // cannot link that many at once): queue the rest only once these have
  // completed, or they could overtake them. Never blocks; loop thread only.
  virtual std::size_t submit_in_order(Op* const* ops, std::size_t n) noexcept {
    for (std::size_t i = 0; i < n; ++i) submit(ops[i]);
    return n;
  }
  // Asks for `op` to end early; it then completes with -ECANCELED (or its real
  // result if it finished first). A request: `op` and its buffers stay owned by
  // the backend until its final completion.
  virtual void cancel(Op* op) noexcept = 0;
  // Number of ops submitted and not yet finally completed.
  virtual std::size_t in_flight() const noexcept = 0;
  // Whether `code` runs here as the kernel's own asynchronous operation (an
  // io_uring opcode this kernel has). False on the epoll fallback, which runs
  // every op but by readiness or on its thread pool, and completes
  // OpCode::recv_multishot and recvmsg_multishot with -EOPNOTSUPP. Never
  // blocks.
  virtual bool native(OpCode code) noexcept = 0;
  // Hands what is queued to the kernel now, without waiting or reaping. Never
  // blocks.
  virtual void flush() noexcept = 0;
  // Runs `d` (once, however often it is deferred meanwhile) right before the
  // next submission: in the next park, turn or flush, after everything the
  // current turn queues. Work deferred from inside `run` goes with it.
  void defer(Deferred* d) noexcept {
    if (d->queued) return;
    d->queued = true;
    d->next = nullptr;
    if (deferred_tail_) {
      deferred_tail_->next = d;
    } else {
      deferred_head_ = d;
    }
    deferred_tail_ = d;
  }

 protected:
  // Runs the deferred work, in the order it was deferred; each backend calls
  // this before it hands queued ops to the kernel.
  void run_deferred() noexcept {
    while (deferred_head_) {
      Deferred* d = deferred_head_;
      deferred_head_ = d->next;
      if (deferred_head_ == nullptr) deferred_tail_ = nullptr;
      d->queued = false;
      d->run(d);
    }
  }
  // A forked child: the work belongs to owners whose ops the parent holds.
  void forget_deferred() noexcept {
    for (Deferred* d = deferred_head_; d != nullptr; d = d->next) d->queued = false;
    deferred_head_ = deferred_tail_ = nullptr;
  }

 private:
  Deferred* deferred_head_ = nullptr;
  Deferred* deferred_tail_ = nullptr;

 public:

  // Provided buffers (OpCode::recv_multishot). A completion flagged kBuffer
  // makes buffer buffer_id(flags) the op owner's: it reads up to the
  // completion's `res` bytes at provided_buffer(id), then gives it back with
  // recycle(id), at once or later. A backend without them never sets kBuffer.
  virtual char* provided_buffer(std::uint16_t /*id*/) const noexcept { return nullptr; }
  virtual void recycle(std::uint16_t /*id*/) noexcept {}
  // The size of one provided buffer; 0 without them.
  virtual unsigned provided_buffer_size() const noexcept { return 0; }

  // Provided datagram buffers (OpCode::recvmsg_multishot): a completion flagged
  // kBuffer holds one datagram; datagram() reads it (false for a completion
  // without one), and recycle_datagram(buffer_id(flags)) gives the buffer back,
  // at once or later. Loop thread only; never blocks.
  virtual bool datagram(const Op& /*op*/, int /*res*/, std::uint32_t /*flags*/,
                        Datagram* /*out*/) const noexcept {
    return false;
  }
  virtual void recycle_datagram(std::uint16_t /*id*/) noexcept {}

  // For an outer loop that sleeps in a poller of its own (libuv's epoll)
  // while ops are in flight, and must wake for their completions.
  //
  // Whether the backend's own wait can also watch the outer loop's fd (the
  // ring polls it from inside io_uring_enter); if not, the outer loop must
  // sleep in its poller with completion_fd() in it.
  virtual bool waits_on_inner() const noexcept = 0;
  // An fd, owned by the backend, that is readable while completions wait to
  // be reaped (while set_completion_wake(true), for the ring), or a negative
  // errno. Made on first call. Loop thread.
  virtual int completion_fd() noexcept = 0;
  // Turns the signal on completion_fd() on or off, without a syscall where
  // the backend can (a ring's CQ flag); completions that come while it is off
  // are only found by has_completions().
  virtual void set_completion_wake(bool on) noexcept = 0;
  // Completions are waiting (reaped or not), or work the next turn would run.
  virtual bool has_completions() const noexcept = 0;
  // Makes completion_fd() readable now, and resets it after it was read.
  virtual void wake_outer() noexcept = 0;
  virtual void clear_outer_wake() noexcept = 0;
  // The earliest deadline the backend keeps itself (the fallback's op
  // timeouts), which the outer loop must not sleep past; nullopt for none
  // (the ring's timeouts are the kernel's).
  virtual std::optional<std::chrono::nanoseconds> next_deadline() const noexcept {
    return std::nullopt;
  }
};

}  // namespace ringpark::detail
