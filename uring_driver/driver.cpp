#include "uring_driver/driver.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "epoll_bridge/blocking.hpp"

namespace ringpark::detail {

namespace {

// Newer than liburing 2.3's header (Linux 6.9); the probe says whether the
// running kernel has it.
constexpr unsigned kOpFtruncate = 55;

// The io_uring opcode that runs each OpCode, for the support check.
unsigned uring_opcode(OpCode code) noexcept {
  switch (code) {
    case OpCode::nop: return IORING_OP_NOP;
    case OpCode::timeout: return IORING_OP_TIMEOUT;
    case OpCode::poll:
    case OpCode::poll_multishot: return IORING_OP_POLL_ADD;
    case OpCode::read: return IORING_OP_READ;
    case OpCode::write: return IORING_OP_WRITE;
    case OpCode::readv: return IORING_OP_READV;
    case OpCode::writev: return IORING_OP_WRITEV;
    case OpCode::recv:
    case OpCode::recv_multishot: return IORING_OP_RECV;
    case OpCode::send: return IORING_OP_SEND;
    case OpCode::recvmsg:
    case OpCode::recvmsg_multishot: return IORING_OP_RECVMSG;
    case OpCode::sendmsg: return IORING_OP_SENDMSG;
    case OpCode::accept:
    case OpCode::accept_multishot: return IORING_OP_ACCEPT;
    case OpCode::connect: return IORING_OP_CONNECT;
    case OpCode::shutdown: return IORING_OP_SHUTDOWN;
    case OpCode::close: return IORING_OP_CLOSE;
    case OpCode::cancel: return IORING_OP_ASYNC_CANCEL;
    case OpCode::openat: return IORING_OP_OPENAT;
    case OpCode::statx: return IORING_OP_STATX;
    case OpCode::fsync:
    case OpCode::fdatasync: return IORING_OP_FSYNC;
    case OpCode::unlinkat: return IORING_OP_UNLINKAT;
    case OpCode::renameat: return IORING_OP_RENAMEAT;
    case OpCode::mkdirat: return IORING_OP_MKDIRAT;
    case OpCode::ftruncate: return kOpFtruncate;
  }
  return 255;
}

bool is_multishot(OpCode code) noexcept {
  return code == OpCode::poll_multishot || code == OpCode::accept_multishot ||
         code == OpCode::recv_multishot || code == OpCode::recvmsg_multishot;
}

// The buffer groups of the driver's provided buffer rings.
constexpr std::uint16_t kStreamGroup = 0;
constexpr std::uint16_t kDgramGroup = 1;

// RINGPARK_RECV_MULTISHOT=0 turns multishot recv off (for comparisons, and
// for a kernel whose implementation misbehaves).
bool recv_multishot_disabled_by_env() noexcept {
  const char* v = std::getenv("RINGPARK_RECV_MULTISHOT");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

__kernel_timespec to_timespec(Duration d) noexcept {
  if (d < Duration::zero()) d = Duration::zero();
  auto secs = std::chrono::duration_cast<std::chrono::seconds>(d);
  return {static_cast<long long>(secs.count()), static_cast<long long>((d - secs).count())};
}

}  // namespace

static_assert(sizeof(Op{}.ts_) == sizeof(__kernel_timespec),
              "Op::ts_ must have the kernel's timespec layout");

std::unique_ptr<UringDriver> UringDriver::create(Reactor* inner, const RingOptions& options,
                                                 RingProbe* probe) noexcept {
  try {
    auto driver = std::unique_ptr<UringDriver>(new UringDriver(inner, *probe, options));
    if (setup_ring(&driver->ring_, options, probe) != 0) {
      driver->closed_ = true;  // no ring to tear down
      return nullptr;
    }
    driver->probe_ = *probe;
    return driver;
  } catch (const std::exception& e) {
    probe->error = -ENOMEM;
    probe->reason = e.what();
    return nullptr;
  }
}

UringDriver::UringDriver(Reactor* inner, const RingProbe& probe, const RingOptions& options)
    : probe_(probe),
      inner_(inner),
      wake_(std::make_shared<WakeFd>(/*nonblocking=*/false)),
      stream_(kStreamGroup, recv_multishot_disabled_by_env() ? 0 : options.buf_ring_entries,
              options.buf_ring_buf_size, options.buf_ring_incremental),
      // Never incremental: a datagram must not be cut at a buffer's end.
      dgram_(kDgramGroup, recv_multishot_disabled_by_env() ? 0 : options.dgram_ring_entries,
             options.dgram_ring_buf_size, /*incremental=*/false) {
  wake_op_.code = OpCode::read;
  wake_op_.fd = wake_->fd();
  wake_op_.buf = &wake_buf_;
  wake_op_.len = sizeof wake_buf_;
  wake_op_.offset = 0;
  wake_op_.complete = &UringDriver::on_wake;
  wake_op_.data = this;

  reactor_op_.code = OpCode::poll;
  reactor_op_.flags = POLLIN;
  reactor_op_.complete = &UringDriver::on_reactor_ready;
  reactor_op_.data = this;
}

UringDriver::~UringDriver() {
  if (!closed_) shutdown();
}

void UringDriver::track(Op* op) noexcept {
  op->state = Op::State::in_flight;
  op->prev_ = nullptr;
  op->next_ = in_flight_head_;
  if (in_flight_head_) in_flight_head_->prev_ = op;
  in_flight_head_ = op;
  if (op != &wake_op_ && op != &reactor_op_) ++user_in_flight_;
}

void UringDriver::untrack(Op* op) noexcept {
  if (op->prev_) {
    op->prev_->next_ = op->next_;
  } else {
    in_flight_head_ = op->next_;
  }
  if (op->next_) op->next_->prev_ = op->prev_;
  op->next_ = op->prev_ = nullptr;
  op->state = Op::State::idle;
  if (op != &wake_op_ && op != &reactor_op_) --user_in_flight_;
}

io_uring_sqe* UringDriver::get_sqe() noexcept {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {
    // SQ full: hand what is queued to the kernel and retry; never drop.
    submit_queued();
    sqe = io_uring_get_sqe(&ring_);
  }
  return sqe;
}

void UringDriver::submit_queued() noexcept {
  make_cq_room();
  ++stats_.enters;
  int r = io_uring_submit(&ring_);
  if (r > 0) stats_.sqes_submitted += static_cast<unsigned>(r);
  if (r < 0 && r != -EBUSY && r != -EAGAIN && r != -EINTR) {
    // The ring refuses submissions for good (-EBADF, -EEXIST from another
    // thread of a SINGLE_ISSUER ring...): retrying would spin forever.
    std::fprintf(stderr, "ringpark: io_uring_submit failed: %s\n", errno_name(r));
    std::abort();
  }
  if (r == -EBUSY || r == -EAGAIN) {
    // The CQ is backed up: move its entries aside (dispatched by the next
    // reap, never inside submit) so the kernel can take SQEs again.
    std::size_t taken = take_cqes(deferred_);
    if (taken == 0 && io_uring_cq_has_overflow(&ring_)) {
      ++stats_.enters;
      io_uring_get_events(&ring_);
    }
  }
}

void UringDriver::prepare(io_uring_sqe* sqe, Op* op) noexcept {
  // Every pointer below stays valid until the op's final CQE: the op is pinned
  // and its owner keeps what it points at alive until then (see op.hpp).
  const auto off = static_cast<__u64>(op->offset);
  switch (op->code) {
    case OpCode::nop:
      io_uring_prep_nop(sqe);
      break;
    case OpCode::timeout: {
      auto ts = to_timespec(Duration(op->timeout_ns));
      op->ts_ = {ts.tv_sec, ts.tv_nsec};
      io_uring_prep_timeout(sqe, reinterpret_cast<__kernel_timespec*>(&op->ts_), 0, 0);
      break;
    }
    case OpCode::poll:
      io_uring_prep_poll_add(sqe, op->fd, static_cast<unsigned>(op->flags));
      break;
    case OpCode::poll_multishot:
      io_uring_prep_poll_multishot(sqe, op->fd, static_cast<unsigned>(op->flags));
      break;
    case OpCode::read:
      io_uring_prep_read(sqe, op->fd, op->buf, op->len, off);
      break;
    case OpCode::write:
      io_uring_prep_write(sqe, op->fd, op->buf, op->len, off);
      break;
    case OpCode::readv:
      io_uring_prep_readv(sqe, op->fd, static_cast<const iovec*>(op->buf), op->len, off);
      break;
    case OpCode::writev:
      io_uring_prep_writev(sqe, op->fd, static_cast<const iovec*>(op->buf), op->len, off);
      break;
    case OpCode::recv:
      io_uring_prep_recv(sqe, op->fd, op->buf, op->len, op->flags);
      break;
    case OpCode::recv_multishot:
      // No buffer of the op's: the kernel picks one from the driver's ring for
      // each chunk, and that ring lives until the driver is destroyed.
      io_uring_prep_recv_multishot(sqe, op->fd, nullptr, 0, op->flags);
      sqe->flags |= IOSQE_BUFFER_SELECT;
      sqe->buf_group = kStreamGroup;
      break;
    case OpCode::recvmsg:
      io_uring_prep_recvmsg(sqe, op->fd, static_cast<msghdr*>(op->buf),
                            static_cast<unsigned>(op->flags));
      break;
    case OpCode::recvmsg_multishot:
      // The msghdr says how much room each buffer keeps for the address and
      // control messages; the datagrams go into the driver's datagram ring.
      // MSG_TRUNC: the header then carries a cut datagram's real length.
      io_uring_prep_recvmsg_multishot(sqe, op->fd, static_cast<msghdr*>(op->buf),
                                      static_cast<unsigned>(op->flags | MSG_TRUNC));
      sqe->flags |= IOSQE_BUFFER_SELECT;
      sqe->buf_group = kDgramGroup;
      break;
    case OpCode::sendmsg:
      io_uring_prep_sendmsg(sqe, op->fd, static_cast<const msghdr*>(op->buf),
                            static_cast<unsigned>(op->flags));
      break;
    case OpCode::send:
      io_uring_prep_send(sqe, op->fd, op->buf, op->len, op->flags);
      break;
    case OpCode::accept:
      io_uring_prep_accept(sqe, op->fd, op->addr, reinterpret_cast<socklen_t*>(op->addrlen),
                           op->flags);
      break;
    case OpCode::accept_multishot:
      io_uring_prep_multishot_accept(sqe, op->fd, op->addr,
                                     reinterpret_cast<socklen_t*>(op->addrlen), op->flags);
      break;
    case OpCode::connect:
      io_uring_prep_connect(sqe, op->fd, op->addr, op->len);
      break;
    case OpCode::shutdown:
      io_uring_prep_shutdown(sqe, op->fd, op->flags);
      break;
    case OpCode::close:
      io_uring_prep_close(sqe, op->fd);
      break;
    case OpCode::cancel:
      io_uring_prep_cancel64(sqe, reinterpret_cast<__u64>(op->target), 0);
      break;
    case OpCode::openat:
      io_uring_prep_openat(sqe, op->dfd, op->path, op->flags, op->mode);
      break;
    case OpCode::statx:
      io_uring_prep_statx(sqe, op->dfd, op->path, op->flags, op->len, op->statxbuf);
      break;
    case OpCode::fsync:
      io_uring_prep_fsync(sqe, op->fd, 0);
      break;
    case OpCode::fdatasync:
      io_uring_prep_fsync(sqe, op->fd, IORING_FSYNC_DATASYNC);
      break;
    case OpCode::unlinkat:
      io_uring_prep_unlinkat(sqe, op->dfd, op->path, op->flags);
      break;
    case OpCode::renameat:
      io_uring_prep_renameat(sqe, op->dfd, op->path, op->dfd, op->path2,
                             static_cast<unsigned>(op->flags));
      break;
    case OpCode::mkdirat:
      io_uring_prep_mkdirat(sqe, op->dfd, op->path, op->mode);
      break;
    case OpCode::ftruncate:
      io_uring_prep_rw(kOpFtruncate, sqe, op->fd, nullptr, 0, off);
      break;
  }
  io_uring_sqe_set_data(sqe, op);
}

void UringDriver::complete_later(Op* op, int res) noexcept {
  track(op);
  try {
    deferred_.push_back({reinterpret_cast<std::uint64_t>(op), res, 0});
  } catch (...) {
    std::fprintf(stderr, "ringpark: out of memory queueing a completion\n");
    std::abort();
  }
}

void UringDriver::submit(Op* op) noexcept {
  if (op->state != Op::State::idle) {
    std::fprintf(stderr, "ringpark: op %p submitted while still in flight\n",
                 static_cast<void*>(op));
    std::abort();
  }
  if (closed_) {
    // The ring is gone, so there is no later turn to complete it in.
    op->complete(op, -ECANCELED, 0);
    return;
  }
  if (shutting_down_) return complete_later(op, -ECANCELED);
  // A forked child, before its owner abandoned the ring: the op stays with
  // those the fork left in flight (see submit() in driver.hpp). Not one byte
  // goes into the parent's SQ.
  if (forked()) return track(op);
  if (!supports(op->code)) return complete_later(op, -EOPNOTSUPP);
  prepare(get_sqe(), op);
  track(op);
}

std::size_t UringDriver::submit_in_order(Op* const* ops, std::size_t n) noexcept {
  if (n == 0) return 0;
  if (n == 1 || closed_ || shutting_down_ || forked() || !supports(ops[0]->code)) {
    // None of them reaches the kernel now (or one alone): each ends as
    // submit() ends it, in this order.
    for (std::size_t i = 0; i < n; ++i) submit(ops[i]);
    return n;
  }
  // A chain must sit in consecutive SQEs of one submission: the kernel cuts
  // it at the end of a batch, and the part that comes later could then run
  // beside it. So at most half the SQ, and room for all of it now.
  const std::size_t most = ring_.sq.ring_entries / 2 > 0 ? ring_.sq.ring_entries / 2 : 1;
  if (n > most) n = most;
  while (io_uring_sq_space_left(&ring_) < n) submit_queued();
  for (std::size_t i = 0; i < n; ++i) {
    Op* op = ops[i];
    if (op->state != Op::State::idle) {
      std::fprintf(stderr, "ringpark: op %p submitted while still in flight\n",
                   static_cast<void*>(op));
      std::abort();
    }
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    prepare(sqe, op);
    // A soft link: an op that fails ends the rest of the chain with
    // -ECANCELED, so nothing after a datagram that did not leave overtakes
    // it when the owner sends it again.
    if (i + 1 < n) sqe->flags |= IOSQE_IO_LINK;
    track(op);
  }
  return n;
}

bool UringDriver::supports(OpCode code) noexcept {
  if (BufferGroup* group = group_of(code)) return ensure_group(*group, uring_opcode(code));
  return probe_.has(uring_opcode(code));
}

BufferGroup* UringDriver::group_of(OpCode code) noexcept {
  if (code == OpCode::recv_multishot) return &stream_;
  if (code == OpCode::recvmsg_multishot) return &dgram_;
  return nullptr;
}

bool UringDriver::ensure_group(BufferGroup& group, unsigned plain_op) noexcept {
  // No registration on a ring that is going away (the answer stays open), nor
  // in a forked child: it would register with the parent's ring.
  if (!group.ring() && (closed_ || shutting_down_ || forked())) return false;
  return group.ensure(&ring_, probe_.has(plain_op));
}

void UringDriver::return_buffers() noexcept {
  // Recycled buffers back to the kernel, and the receives they starved
  // re-armed where they stopped (see BufferGroup). prepare() via get_sqe() may
  // move CQEs aside but never runs a completion.
  const auto rearm = [this](Op* op) noexcept {
    prepare(get_sqe(), op);
    ++stats_.multishot_rearms;
  };
  stream_.return_buffers(!shutting_down_, rearm);
  dgram_.return_buffers(!shutting_down_, rearm);
}

void UringDriver::cancel(Op* op) noexcept {
  // In a forked child the op is the parent's to cancel; here abandon() forgets it.
  if (op->state != Op::State::in_flight || closed_ || forked()) return;
  op->state = Op::State::cancelling;
  BufferGroup* group = group_of(op->code);
  if (group != nullptr && group->forget_starved(op)) {
    // Not in the kernel: it ends here, from the next reap.
    try {
      deferred_.push_back({reinterpret_cast<std::uint64_t>(op), -ECANCELED, 0});
    } catch (...) {
      std::fprintf(stderr, "ringpark: out of memory queueing a completion\n");
      std::abort();
    }
    return;
  }
  io_uring_sqe* sqe = get_sqe();
  io_uring_prep_cancel64(sqe, reinterpret_cast<__u64>(op), 0);
  io_uring_sqe_set_data64(sqe, 0);  // its own CQE says nothing we need
}

void UringDriver::arm_internal(bool watch_inner) noexcept {
  if (shutting_down_) return;
  if (wake_op_.state == Op::State::idle) {
    prepare(get_sqe(), &wake_op_);
    track(&wake_op_);
  }
  // Only a wait needs the reactor's fd in the ring. Arming it in a non-blocking
  // turn would cost a CQE (and, under libuv, an eventfd wake and an enter) each
  // time libuv's own epoll_wait wakes.
  if (inner_ == nullptr || !watch_inner) return;
  int fd = inner_->fd();
  if (reactor_op_.state == Op::State::idle) {
    if (fd >= 0) {
      reactor_op_.fd = reactor_fd_ = fd;
      prepare(get_sqe(), &reactor_op_);
      track(&reactor_op_);
    }
  } else if (fd != reactor_fd_ && reactor_op_.state == Op::State::in_flight) {
    // The reactor's fd changed (uv_loop_fork): drop the old poll; the next park
    // arms one on the new fd.
    cancel(&reactor_op_);
  }
}

int UringDriver::enter(Timeout timeout) noexcept {
  run_deferred();  // what the turn's deferred work prepares goes out with the rest
  return_buffers();
  if (io_uring_sq_ready(&ring_) > 0) make_cq_room();
  const unsigned queued = io_uring_sq_ready(&ring_);
  const bool defer = probe_.setup_flags & IORING_SETUP_DEFER_TASKRUN;
  const bool ready = !deferred_.empty() || io_uring_cq_ready(&ring_) > 0;
  int r = 0;
  if ((timeout && *timeout <= Duration::zero()) || ready) {
    // Must not block. With DEFER_TASKRUN completions are only posted inside an
    // enter, so even a pure reap needs one.
    if (queued > 0) {
      ++stats_.enters;
      r = defer ? io_uring_submit_and_get_events(&ring_) : io_uring_submit(&ring_);
    } else if (defer || io_uring_cq_has_overflow(&ring_) || taskrun_pending()) {
      ++stats_.enters;
      r = io_uring_get_events(&ring_);
    }
  } else {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{};
    if (timeout) ts = to_timespec(*timeout);
    ++stats_.enters;
    r = io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, timeout ? &ts : nullptr, nullptr);
  }
  stats_.sqes_submitted += queued - io_uring_sq_ready(&ring_);
  // -ETIME (timeout) and -EINTR (a signal) are ordinary wakes; anything else is
  // reported to the caller, which treats it as a spurious wake too.
  return r < 0 && r != -ETIME && r != -EINTR ? r : 0;
}

std::size_t UringDriver::take_cqes(std::vector<Cqe>& out) noexcept {
  unsigned head;
  unsigned n = 0;
  io_uring_cqe* cqe;
  try {
    io_uring_for_each_cqe(&ring_, head, cqe) {
      out.push_back({cqe->user_data, cqe->res, cqe->flags});
      ++n;
    }
  } catch (...) {
    std::fprintf(stderr, "ringpark: out of memory holding completions\n");
    std::abort();
  }
  io_uring_cq_advance(&ring_, n);
  stats_.cqes_reaped += n;
  return n;
}

void UringDriver::make_cq_room() noexcept {
  // About to submit: what the kernel completes for these SQEs (and what
  // arrives meanwhile) needs room in the CQ. A multishot op whose next CQE
  // finds the CQ full is ended by the kernel, and re-arming it costs an SQE: a
  // burst of sends to 3,000 loopback peers, submitted while the CQ still held
  // the previous burst, ended a third of the multishot recvs that way. So the
  // CQEs already posted move aside (16 bytes each), to be dispatched by the
  // reap, before anything still in the CQ.
  if (io_uring_cq_ready(&ring_) > 0) take_cqes(deferred_);
}

std::size_t UringDriver::dispatch_deferred() noexcept {
  // Completions moved aside came off the CQ before anything still in it, so
  // they run first. What they move aside meanwhile is newer than the rest of
  // this batch and waits for the next one.
  std::size_t total = 0;
  while (!deferred_.empty()) {
    std::vector<Cqe> pending;
    pending.swap(deferred_);
    for (const Cqe& c : pending) {
      dispatch(c);
      // A completion that forked: in the child, the rest is the parent's.
      if (forked()) return total;
      ++total;
    }
    // Recycled buffers back to the kernel after every batch, not at the end of
    // the pass: a pass under load can go on for thousands of completions.
    return_buffers();
    if (deferred_.empty()) {
      pending.clear();
      deferred_.swap(pending);  // keep the capacity
    }
  }
  return total;
}

std::size_t UringDriver::reap() noexcept {
  std::size_t total = dispatch_deferred();
  if (forked()) return total;
  for (;;) {
    // Copy a batch out and release the ring slots before running completions,
    // so a completion that re-enters the driver sees a consistent ring. The
    // batch lives on the stack for the same reason.
    Cqe local[64];
    unsigned head;
    unsigned n = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      local[n++] = {cqe->user_data, cqe->res, cqe->flags};
      if (n == 64) break;
    }
    if (n == 0) {
      if (!io_uring_cq_has_overflow(&ring_)) break;
      // Completions the CQ could not hold wait in the kernel; flush them in.
      ++stats_.enters;
      io_uring_get_events(&ring_);
      continue;
    }
    io_uring_cq_advance(&ring_, n);
    stats_.cqes_reaped += n;
    total += n;
    for (unsigned i = 0; i < n; ++i) {
      dispatch(local[i]);
      // A completion that forked (a pre-fork server forking from a callback):
      // in the child the rest of the batch, and every CQE still in the ring,
      // are the parent's. Not one more access to the ring from here.
      if (forked()) return total;
    }
    // One store to the buffer ring's tail for every buffer recycled in this
    // batch. Not once per pass: a pass lasts as long as completions keep
    // coming, and under load they always do (their own submissions, when the
    // SQ fills, post more), so buffers recycled early in a pass would not
    // reach the kernel before the ring ran dry.
    return_buffers();
    total += dispatch_deferred();
    if (forked()) return total;
  }
  return_buffers();
  return total;
}

void UringDriver::dispatch(const Cqe& cqe) noexcept {
  if (cqe.user_data == 0 || cqe.user_data == LIBURING_UDATA_TIMEOUT) return;
  Op* op = reinterpret_cast<Op*>(cqe.user_data);
  if (op->state == Op::State::idle) {
    std::fprintf(stderr, "ringpark: CQE for op %p that is not in flight (res %d)\n",
                 static_cast<void*>(op), cqe.res);
    std::abort();
  }
  bool more = cqe.flags & IORING_CQE_F_MORE;
  int res = cqe.res;
  BufferGroup* group = group_of(op->code);
  if (group != nullptr) {
    const bool live = op->state == Op::State::in_flight && !shutting_down_;
    switch (group->classify(op, &res, more, live)) {
      case BufferGroup::Verdict::deliver: break;
      case BufferGroup::Verdict::drop: return;
      case BufferGroup::Verdict::starved:
        ++stats_.buffers_ran_out;
        // Still in flight for its owner, who never sees the -ENOBUFS; a
        // datagram receive's owner is told that the socket is not drained.
        if (op->code == OpCode::recvmsg_multishot) op->complete(op, 0, kMore | kDry);
        return;
    }
  }
  std::uint32_t flags = 0;
  if (cqe.flags & IORING_CQE_F_BUFFER) {
    // The buffer is the owner's from here until it recycles it.
    const auto id = static_cast<std::uint16_t>(cqe.flags >> IORING_CQE_BUFFER_SHIFT);
    if (group == nullptr || group->ring() == nullptr) {
      std::fprintf(stderr, "ringpark: CQE names provided buffer %u without a buffer ring\n", id);
      std::abort();
    }
    group->ring()->taken(id, res, cqe.flags);
    flags = kBuffer | (std::uint32_t{id} << kBufferIdShift);
  }
  // A recv that ends with 0 bytes reached the end of the stream: that one stays
  // ended. (A datagram's result always counts its header, so it is > 0.)
  const bool ended_ok = group != nullptr ? res > 0 : res >= 0;
  if (!more && is_multishot(op->code) && ended_ok && op->state == Op::State::in_flight &&
      !shutting_down_) {
    // The kernel ended a multishot op that nobody cancelled (CQ pressure, or a
    // kernel that only does one shot): re-arm it so the owner sees no gap.
    prepare(get_sqe(), op);
    ++stats_.multishot_rearms;
    more = true;
  }
  if (res == -ECANCELED && !more && op->state == Op::State::in_flight && !shutting_down_ &&
      blocking_call_is_bounded(*op)) {
    // Nobody cancelled it: io_uring ends a call it meant to run on a worker
    // thread this way when it cannot start one (RLIMIT_NPROC reached, a clone
    // that fails), before making it. Make it here, as libuv's synchronous
    // uv_fs_* call would: the loop waits for the disk, but the owner gets the
    // call's real result.
    res = run_blocking(*op);
    ++stats_.worker_fallbacks;
  }
  if (!more) untrack(op);
  op->complete(op, res, flags | (more ? kMore : 0));
}

bool UringDriver::datagram(const Op& op, int res, std::uint32_t flags,
                           Datagram* out) const noexcept {
  if (!(flags & kBuffer) || res <= 0 || dgram_.ring() == nullptr || op.buf == nullptr) return false;
  // The buffer: struct io_uring_recvmsg_out, then the room the msghdr kept for
  // the address and control messages, then the payload.
  auto* msg = static_cast<msghdr*>(op.buf);
  char* buf = dgram_.ring()->data(buffer_id(flags));
  io_uring_recvmsg_out* o = io_uring_recvmsg_validate(buf, res, msg);
  if (o == nullptr) return false;
  *out = Datagram{};
  if (msg->msg_namelen > 0 && o->namelen > 0) {
    out->addr = static_cast<const sockaddr*>(io_uring_recvmsg_name(o));
    out->addrlen = o->namelen < msg->msg_namelen ? o->namelen : msg->msg_namelen;
  }
  if (msg->msg_controllen > 0 && o->controllen > 0) {
    out->control = reinterpret_cast<const char*>(o + 1) + msg->msg_namelen;
    out->controllen = o->controllen;
  }
  out->data = static_cast<const char*>(io_uring_recvmsg_payload(o, msg));
  out->len = io_uring_recvmsg_payload_length(o, res, msg);
  out->full_len = o->payloadlen;
  out->msg_flags = static_cast<int>(o->flags);
  return true;
}

void UringDriver::on_wake(Op*, int, std::uint32_t) noexcept {
  // Nothing to do: the wake already ended the park. arm_internal() re-arms.
}

void UringDriver::on_reactor_ready(Op* op, int res, std::uint32_t) noexcept {
  auto* self = static_cast<UringDriver*>(op->data);
  if (res != -ECANCELED) self->reactor_ready_ = true;
}

void UringDriver::park(Timeout timeout) noexcept {
  if (closed_ || forked()) return;
  ++stats_.turns;
  arm_internal(/*watch_inner=*/true);
  const Timeout inner_timeout = inner_ ? inner_->timeout() : std::nullopt;
  const auto start = inner_timeout ? std::chrono::steady_clock::now()
                                   : std::chrono::steady_clock::time_point{};
  enter(min_timeout(timeout, inner_timeout));
  reap();
  if (forked()) return;  // a completion forked; this is the child
  const bool inner_due =
      inner_timeout && std::chrono::steady_clock::now() - start >= *inner_timeout;
  if (inner_ && (reactor_ready_ || inner_due)) {
    reactor_ready_ = false;
    inner_->turn();
  }
}

void UringDriver::turn() noexcept {
  if (closed_ || forked()) return;
  ++stats_.turns;
  arm_internal(/*watch_inner=*/false);
  enter(Duration::zero());
  reap();
  if (forked()) return;  // a completion forked; this is the child
  if (inner_ && reactor_ready_) {
    reactor_ready_ = false;
    inner_->turn();
  }
}

void UringDriver::flush() noexcept {
  if (closed_ || forked()) return;
  run_deferred();
  return_buffers();
  const unsigned queued = io_uring_sq_ready(&ring_);
  if (queued == 0) return;
  make_cq_room();
  ++stats_.enters;
  io_uring_submit(&ring_);
  stats_.sqes_submitted += queued - io_uring_sq_ready(&ring_);
}

bool UringDriver::taskrun_pending() const noexcept {
  // COOP_TASKRUN with TASKRUN_FLAG: completions the kernel holds until this
  // thread enters it.
  return (probe_.setup_flags & IORING_SETUP_TASKRUN_FLAG) &&
         (IO_URING_READ_ONCE(*ring_.sq.kflags) & IORING_SQ_TASKRUN);
}

bool UringDriver::has_cqes() const noexcept {
  if (closed_ || forked()) return false;
  return !deferred_.empty() || io_uring_cq_ready(&ring_) > 0 || io_uring_cq_has_overflow(&ring_) ||
         taskrun_pending();
}

int UringDriver::completion_fd() noexcept {
  if (completion_fd_ >= 0) return completion_fd_;
  if (closed_) return -EBADF;
  if (forked()) return -ECHILD;  // it would register with the parent's ring
  const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (fd < 0) return -errno;
  if (int r = io_uring_register_eventfd(&ring_, fd); r < 0) {
    ::close(fd);
    return r;
  }
  completion_fd_ = fd;
  return fd;
}

void UringDriver::set_completion_wake(bool on) noexcept {
  // The flag lives in the CQ ring, which a forked child shares with the parent:
  // writing it there would turn the parent's notifications off.
  if (closed_ || forked() || completion_fd_ < 0) return;
  io_uring_cq_eventfd_toggle(&ring_, on);
}

void UringDriver::wake_outer() noexcept {
  if (completion_fd_ < 0) return;
  std::uint64_t one = 1;
  (void)!::write(completion_fd_, &one, sizeof one);
}

void UringDriver::clear_outer_wake() noexcept {
  if (completion_fd_ < 0) return;
  std::uint64_t value;
  (void)!::read(completion_fd_, &value, sizeof value);
}

void UringDriver::close_completion_fd() noexcept {
  if (completion_fd_ >= 0) ::close(completion_fd_);
  completion_fd_ = -1;
}

void UringDriver::shutdown() noexcept {
  if (closed_) return;
  // A forked child cannot reap the parent's ring (with SINGLE_ISSUER it may
  // not even enter it: every enter fails, and this loop would spin forever),
  // and cancelling through it would cancel the parent's ops.
  if (forked()) return abandon();
  shutting_down_ = true;
  run_deferred();  // what it submits completes with -ECANCELED below
  while (in_flight_head_ != nullptr || !deferred_.empty()) {
    // Completions run here, with -ECANCELED for what was cancelled; ops they
    // submit complete with -ECANCELED too. A cancel can lose the race with an op
    // the kernel is already running; its CQE still comes, so wait for it.
    for (Op* op = in_flight_head_; op != nullptr; op = op->next_) cancel(op);
    enter(deferred_.empty() ? Timeout{} : Timeout(Duration::zero()));
    reap();
    if (forked()) return abandon();  // a completion forked; this is the child
  }
  if (inner_) inner_->shutdown();
  // Nothing is in flight, so no request can pick a buffer any more; owners may
  // still read buffers they hold until the driver is destroyed.
  stream_.unregister(&ring_);
  dgram_.unregister(&ring_);
  io_uring_queue_exit(&ring_);
  close_completion_fd();
  closed_ = true;
}

void UringDriver::abandon() noexcept {
  if (closed_) return;
  if (!forked()) {
    std::fprintf(stderr,
                 "ringpark: abandon() of a ring this process set up; only a forked child may "
                 "let go of a ring without reaping it\n");
    std::abort();
  }
  // Forget every op: the parent's copy of it completes in the parent; ours
  // never will. Left idle, so that its owner may submit it again elsewhere.
  for (Op* op = in_flight_head_; op != nullptr;) {
    Op* next = op->next_;
    op->next_ = op->prev_ = nullptr;
    op->state = Op::State::idle;
    op = next;
  }
  in_flight_head_ = nullptr;
  user_in_flight_ = 0;
  deferred_.clear();
  forget_deferred();
  reactor_ready_ = false;
  // The registrations are the parent ring's (IORING_UNREGISTER_PBUF_RING here
  // would take them from the parent); the memory is this process's own copy.
  stream_.abandon();
  dgram_.abandon();
  if (inner_) inner_->abandon();
  // In liburing 2.3 this unmaps the SQEs and the SQ and CQ rings and closes the
  // ring fd, nothing more: its only other step, unregistering a registered ring
  // fd, needs io_uring_register_ring_fd, which ringpark never calls. Unmapping
  // and closing affect this process only; the parent keeps its ring.
  io_uring_queue_exit(&ring_);
  close_completion_fd();  // this process's fd only; the parent's stays registered
  shutting_down_ = true;
  closed_ = true;
}

}  // namespace ringpark::detail
