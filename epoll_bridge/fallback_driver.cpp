#include "epoll_bridge/fallback_driver.hpp"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "epoll_bridge/blocking.hpp"

namespace ringpark::detail {

namespace {

static_assert(std::is_same_v<socklen_t, unsigned>, "Op::addrlen is handed to accept4");

// An op's poll mask is used as its epoll interest, and epoll's revents as its
// result, which holds because Linux gives both the same bit values.
static_assert(POLLIN == EPOLLIN && POLLPRI == EPOLLPRI && POLLOUT == EPOLLOUT &&
                  POLLERR == EPOLLERR && POLLHUP == EPOLLHUP && POLLRDNORM == EPOLLRDNORM &&
                  POLLRDBAND == EPOLLRDBAND && POLLWRNORM == EPOLLWRNORM &&
                  POLLWRBAND == EPOLLWRBAND && POLLRDHUP == EPOLLRDHUP,
              "poll and epoll bits differ");

constexpr std::uint32_t kPollBits = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDNORM | EPOLLRDBAND |
                                    EPOLLWRNORM | EPOLLWRBAND | EPOLLMSG | EPOLLRDHUP;

// What poll(2) reports for a file without a poll method (a regular file).
constexpr std::uint32_t kAlwaysReady = EPOLLIN | EPOLLOUT | EPOLLRDNORM | EPOLLWRNORM;

// Accepts a multishot accept makes per turn before it lets other work run; a
// level-triggered registration reports the rest of the backlog next turn.
constexpr int kAcceptsPerTurn = 16;

// An op timeout longer than this is treated as this (about 31 years), which
// keeps now() + timeout inside the clock's range.
constexpr std::uint64_t kMaxTimeoutNs = 1'000'000'000'000'000'000ull;

[[noreturn]] void out_of_memory(const char* what) noexcept {
  std::fprintf(stderr, "ringpark: out of memory %s\n", what);
  std::abort();
}

[[noreturn]] void in_flight_twice(const Op* op) noexcept {
  std::fprintf(stderr, "ringpark: op %p submitted while still in flight\n",
               static_cast<const void*>(op));
  std::abort();
}

// The epoll interest of an op that waits for readiness.
std::uint32_t interest(const Op& op) noexcept {
  switch (op.code) {
    case OpCode::poll:
    case OpCode::poll_multishot:
      return static_cast<std::uint32_t>(op.flags) & kPollBits;
    case OpCode::send:
    case OpCode::sendmsg:
    case OpCode::write:
    case OpCode::writev:
    case OpCode::connect:
      return EPOLLOUT;
    default:
      return EPOLLIN;
  }
}

}  // namespace

FallbackDriver::FallbackDriver(EpollReactor& epoll, Reactor* inner)
    : epoll_(epoll),
      inner_(inner),
      unparker_(epoll.unparker()),
      pool_(std::make_unique<ThreadPool>()) {
  ready_.reserve(64);
  fired_.reserve(64);
  inner_watcher_.events = EPOLLIN;  // level-triggered: see DESIGN.md "Level, not edge"
  inner_watcher_.ready = &FallbackDriver::on_inner_ready;
  inner_watcher_.data = this;
}

FallbackDriver::~FallbackDriver() {
  if (!closed_) shutdown();
}

// ---- Submission -------------------------------------------------------------

void FallbackDriver::submit(Op* op) noexcept {
  if (op->state != Op::State::idle) in_flight_twice(op);
  if (closed_) {
    // No later turn will come to complete it in.
    op->complete(op, -ECANCELED, 0);
    return;
  }
  Record* r;
  try {
    auto [it, inserted] = ops_.try_emplace(op);
    if (!inserted) in_flight_twice(op);  // its state was reset under the driver
    r = &it->second;
    if (!shutting_down_) fresh_.push_back(op);
  } catch (...) {
    out_of_memory("submitting an op");
  }
  r->op = op;
  r->self = this;
  op->state = Op::State::in_flight;
  if (shutting_down_) finish(*r, -ECANCELED);
}

void FallbackDriver::start_fresh() noexcept {
  // start() runs no user code, so fresh_ cannot grow while it is walked. An
  // entry whose op was cancelled before it started is skipped.
  for (Op* op : fresh_) {
    auto it = ops_.find(op);
    if (it != ops_.end() && it->second.where == Where::fresh) start(it->second);
  }
  fresh_.clear();
}

void FallbackDriver::start(Record& r) noexcept {
  Op* op = r.op;
  switch (op->code) {
    case OpCode::nop:
      return finish(r, 0);
    case OpCode::timeout:
      return arm_timer(r);
    case OpCode::poll:
    case OpCode::poll_multishot:
      // The registration reports an fd that is ready now, so no poll(2) first.
      return wait_on(r, op->fd, interest(*op));
    case OpCode::recv:
    case OpCode::send:
      if (!drive(r, false)) wait_on(r, op->fd, interest(*op));
      return;
    case OpCode::accept:
    case OpCode::accept_multishot: {
      ++stats_.syscalls;
      const int fl = ::fcntl(op->fd, F_GETFL);
      if (fl < 0) return finish(r, -errno);
      if (!(fl & O_NONBLOCK)) {
        // accept4 has no MSG_DONTWAIT: on a blocking listener, call it only
        // once epoll says a connection is queued.
        r.mode = IoMode::ready_first;
        return wait_on(r, op->fd, EPOLLIN);
      }
      if (!drive(r, false)) wait_on(r, op->fd, EPOLLIN);
      return;
    }
    case OpCode::connect:
      return start_connect(r);
    case OpCode::recv_multishot:
    case OpCode::recvmsg_multishot:
      // No provided buffers here: the owner falls back to plain recv(msg).
      return finish(r, -EOPNOTSUPP);
    case OpCode::recvmsg:
      if (!drive(r, false)) wait_on(r, op->fd, EPOLLIN);
      return;
    case OpCode::sendmsg:
      // Behind a datagram still waiting for room in the same socket, so that
      // datagrams leave in the order they were submitted.
      if (send_waits_before(r) || !drive(r, false)) wait_on(r, op->fd, EPOLLOUT);
      return;
    case OpCode::read:
    case OpCode::write:
    case OpCode::readv:
    case OpCode::writev: {
      struct stat st;
      ++stats_.syscalls;
      if (::fstat(op->fd, &st) < 0) return finish(r, -errno);
      // Streams wait for readiness; regular files and block devices are always
      // "ready" to epoll yet block on the disk, so they go to the pool.
      if (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode) || S_ISCHR(st.st_mode)) {
        if (!drive(r, false)) wait_on(r, op->fd, interest(*op));
        return;
      }
      return to_pool(r);
    }
    case OpCode::close:
      return finish(r, close_fd(op->fd));
    case OpCode::shutdown:
      // Never blocks, so it runs here rather than on the pool.
      ++stats_.syscalls;
      return finish(r, errno_result(::shutdown(op->fd, op->flags)));
    case OpCode::cancel:
      return start_cancel(r);
    case OpCode::openat:
    case OpCode::statx:
    case OpCode::fsync:
    case OpCode::fdatasync:
    case OpCode::unlinkat:
    case OpCode::renameat:
    case OpCode::mkdirat:
    case OpCode::ftruncate:
      return to_pool(r);
  }
  finish(r, -EINVAL);  // not an OpCode
}

void FallbackDriver::start_connect(Record& r) noexcept {
  ++stats_.syscalls;
  r.saved_fl = ::fcntl(r.op->fd, F_GETFL);
  if (r.saved_fl < 0) return finish(r, -errno);
  if (!drive(r, false)) wait_on(r, r.op->fd, EPOLLOUT);
}

int FallbackDriver::close_fd(int fd) noexcept {
  auto it = fds_.find(fd);
  if (it != fds_.end()) {
    FdState& s = it->second;
    // Drop the registration while the number still names the file: once it is
    // closed, epoll keeps the registration for as long as a dup of the file
    // lives, and nothing could delete it any more.
    if (s.watcher.registered_) {
      ++stats_.epoll_ctls;
      epoll_.unwatch(&s.watcher);
    }
    // Ops waiting on it keep waiting, as io_uring's do (they hold the file), but
    // nothing can report for them now: only a cancel ends them.
    for (Record* r = s.head; r != nullptr;) {
      Record* next = r->fd_next;
      r->fd_prev = r->fd_next = nullptr;
      r->where = Where::parked;
      r = next;
    }
    fds_.erase(it);
  }
  if (inner_fd_ == fd) inner_fd_ = -1;  // registered again on the next park
  ++stats_.syscalls;
  return errno_result(::close(fd));
}

// ---- Cancellation -----------------------------------------------------------

void FallbackDriver::cancel(Op* op) noexcept {
  // In a forked child abandon() forgets the op; taking a job back from the pool
  // would lock a mutex a thread of the parent may have held at the fork.
  if (closed_ || op->state != Op::State::in_flight || forked()) return;
  auto it = ops_.find(op);
  if (it == ops_.end()) return;
  op->state = Op::State::cancelling;
  cancel_record(it->second, /*by_cancel_op=*/false);
}

void FallbackDriver::start_cancel(Record& r) noexcept {
  Op* target = r.op->target;
  int res = -ENOENT;
  // Looked up before it is touched: a target that completed may be freed.
  auto it = target != r.op ? ops_.find(target) : ops_.end();
  if (it != ops_.end()) {
    res = cancel_record(it->second, /*by_cancel_op=*/true);
    if (res != -ENOENT) target->state = Op::State::cancelling;
  }
  // Queued after the target's -ECANCELED, the order io_uring posts them in.
  finish(r, res);
}

int FallbackDriver::cancel_record(Record& t, bool by_cancel_op) noexcept {
  switch (t.where) {
    case Where::fresh:
      // The ring takes SQEs in order, so a cancel op never finds an op that was
      // submitted after it.
      if (by_cancel_op) return -ENOENT;
      finish(t, -ECANCELED);
      return 0;
    case Where::waiting:
    case Where::timer:
    case Where::parked:
      finish(t, -ECANCELED);
      return 0;
    case Where::pool:
      if (pool_->try_cancel(&t.job)) {
        finish(t, -ECANCELED);
        return 0;
      }
      // Running (or done): a thread holds its buffers; its real result stands.
      return -EALREADY;
    case Where::completing:
      return -ENOENT;
  }
  return -ENOENT;
}

// ---- Non-blocking attempts --------------------------------------------------

bool FallbackDriver::drive(Record& r, bool ready) noexcept {
  for (int i = 0; i < kAcceptsPerTurn; ++i) {
    const int res = attempt(r, ready);
    if (res == kWait) return false;
    if (r.op->code != OpCode::accept_multishot || res < 0) {
      finish(r, res);
      return true;
    }
    queue(r.op, res, kMore);
    // A blocking listener is known to hold one connection only.
    if (r.mode == IoMode::ready_first) return false;
  }
  return false;
}

int FallbackDriver::attempt(Record& r, bool ready) noexcept {
  Op* op = r.op;
  switch (op->code) {
    case OpCode::recv:
    case OpCode::send:
      return attempt_stream(r);
    case OpCode::recvmsg:
    case OpCode::sendmsg:
      return attempt_msg(r);
    case OpCode::accept:
    case OpCode::accept_multishot: {
      if (r.mode == IoMode::ready_first && !ready) return kWait;
      ++stats_.syscalls;
      // The flags are accept4's, as io_uring takes them: the new fd is
      // non-blocking only if the caller asked for it.
      const int fd = ::accept4(op->fd, op->addr, op->addrlen, op->flags);
      if (fd >= 0) return fd;
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return kWait;
      return -errno;
    }
    case OpCode::connect:
      return attempt_connect(r);
    case OpCode::read:
    case OpCode::write:
    case OpCode::readv:
    case OpCode::writev:
      return attempt_rw(r, ready);
    default:
      return -EINVAL;
  }
}

int FallbackDriver::attempt_stream(Record& r) noexcept {
  Op* op = r.op;
  // io_uring keeps receiving (sending) until the whole buffer is done when asked
  // with MSG_WAITALL; `done` carries the progress across waits.
  const bool waitall = op->flags & MSG_WAITALL;
  const int flags = (op->flags & ~MSG_WAITALL) | MSG_DONTWAIT;
  char* buf = static_cast<char*>(op->buf) + r.done;
  const std::size_t left = op->len - r.done;
  ssize_t n;
  ++stats_.syscalls;
  do {
    // MSG_NOSIGNAL: a peer that went away gives -EPIPE, never a SIGPIPE.
    n = op->code == OpCode::recv ? ::recv(op->fd, buf, left, flags)
                                 : ::send(op->fd, buf, left, flags | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n > 0) {
    r.done += static_cast<std::size_t>(n);
    if (waitall && r.done < op->len) return kWait;
    return static_cast<int>(r.done);
  }
  if (n == 0) return static_cast<int>(r.done);  // end of stream, or an empty buffer
  const int err = errno;
  if (err == EAGAIN || err == EWOULDBLOCK) {
    // The caller's own MSG_DONTWAIT means "do not wait", which io_uring honours.
    if (!(op->flags & MSG_DONTWAIT)) return kWait;
  }
  return r.done > 0 ? static_cast<int>(r.done) : -err;
}

int FallbackDriver::attempt_msg(Record& r) noexcept {
  Op* op = r.op;
  // The msghdr and all it points at live until the op's final completion. As
  // io_uring's, the call fills msg_namelen, msg_controllen and msg_flags.
  auto* msg = static_cast<msghdr*>(op->buf);
  const int flags = op->flags | MSG_DONTWAIT;
  ssize_t n;
  ++stats_.syscalls;
  do {
    // MSG_NOSIGNAL: io_uring's sendmsg never raises SIGPIPE either.
    n = op->code == OpCode::recvmsg ? ::recvmsg(op->fd, msg, flags)
                                    : ::sendmsg(op->fd, msg, flags | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return static_cast<int>(n);
  const int err = errno;
  // The caller's own MSG_DONTWAIT means "do not wait", which io_uring honours.
  if ((err == EAGAIN || err == EWOULDBLOCK) && !(op->flags & MSG_DONTWAIT)) return kWait;
  return -err;
}

bool FallbackDriver::send_waits_before(const Record& r) const noexcept {
  auto it = fds_.find(r.op->fd);
  if (it == fds_.end()) return false;
  // Records join an fd's list at its tail, so those before `r` (all of them,
  // when `r` is not on it yet) were submitted earlier.
  for (const Record* w = it->second.head; w != nullptr && w != &r; w = w->fd_next) {
    if (w->op->code == OpCode::sendmsg) return true;
  }
  return false;
}

int FallbackDriver::attempt_rw(Record& r, bool ready) noexcept {
  Op* op = r.op;
  const bool is_write = op->code == OpCode::write || op->code == OpCode::writev;
  iovec one{op->buf, op->len};
  const iovec* iov = &one;
  int iovcnt = 1;
  if (op->code == OpCode::readv || op->code == OpCode::writev) {
    iov = static_cast<const iovec*>(op->buf);
    iovcnt = static_cast<int>(op->len);
  }
  // The offset is ignored: these are streams (pipes, sockets, eventfds, ttys),
  // for which io_uring ignores it too.
  for (;;) {
    ssize_t n;
    if (r.mode == IoMode::nowait) {
      ++stats_.syscalls;
      n = is_write ? ::pwritev2(op->fd, iov, iovcnt, -1, RWF_NOWAIT)
                   : ::preadv2(op->fd, iov, iovcnt, -1, RWF_NOWAIT);
      if (n < 0 && (errno == EOPNOTSUPP || errno == ENOSYS)) {
        // No RWF_NOWAIT here (kernel before 4.14, or a file type without
        // it): fall back on the fd's own O_NONBLOCK, or on waiting first.
        ++stats_.syscalls;
        const int fl = ::fcntl(op->fd, F_GETFL);
        if (fl < 0) return -errno;
        r.mode = (fl & O_NONBLOCK) ? IoMode::plain : IoMode::ready_first;
        continue;
      }
    } else if (r.mode == IoMode::plain || !is_write) {
      if (r.mode == IoMode::ready_first && !ready) return kWait;
      ++stats_.syscalls;
      n = is_write ? ::writev(op->fd, iov, iovcnt) : ::readv(op->fd, iov, iovcnt);
    } else {
      if (!ready) return kWait;
      // A blocking write returns only once all of it is written. Readiness
      // promises room for PIPE_BUF bytes (on a pipe), so write no more than that
      // now: a short write, which io_uring may report for a stream as well.
      iovec part[16];
      int parts = 0;
      std::size_t total = 0;
      for (int i = 0; i < iovcnt && parts < 16 && total < PIPE_BUF; ++i) {
        part[parts] = iov[i];
        part[parts].iov_len = std::min<std::size_t>(iov[i].iov_len, PIPE_BUF - total);
        total += part[parts++].iov_len;
      }
      ++stats_.syscalls;
      n = ::writev(op->fd, part, parts);
    }
    if (n >= 0) return static_cast<int>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return kWait;
    return -errno;
  }
}

int FallbackDriver::attempt_connect(Record& r) noexcept {
  Op* op = r.op;
  if (r.connecting) {
    // Writable after EINPROGRESS: the handshake is over, SO_ERROR says how.
    int err = 0;
    socklen_t len = sizeof err;
    ++stats_.syscalls;
    if (::getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return -errno;
    return -err;
  }
  // io_uring never blocks on a connect, and the loop may not either: a blocking
  // socket is made non-blocking for the call only.
  const bool blocking = !(r.saved_fl & O_NONBLOCK);
  if (blocking) {
    ++stats_.syscalls;
    ::fcntl(op->fd, F_SETFL, r.saved_fl | O_NONBLOCK);
  }
  ++stats_.syscalls;
  const int rc = ::connect(op->fd, op->addr, op->len);
  const int err = rc < 0 ? errno : 0;
  if (blocking) {
    ++stats_.syscalls;
    ::fcntl(op->fd, F_SETFL, r.saved_fl);
  }
  if (rc == 0) return 0;
  switch (err) {
    case EINPROGRESS:
    case EINTR:  // the handshake goes on without us
      r.connecting = true;
      return kWait;
    case EAGAIN:  // a unix socket's listener has a full backlog: retry when writable
      return kWait;
    default:
      return -err;
  }
}

void FallbackDriver::on_ready(Record& r, std::uint32_t revents) noexcept {
  Op* op = r.op;
  if (op->code == OpCode::poll || op->code == OpCode::poll_multishot) {
    // io_uring reports what was asked for, plus ERR, HUP and RDHUP always.
    const int res = static_cast<int>(revents & (r.events | EPOLLRDHUP));
    if (op->code == OpCode::poll) return finish(r, res);
    return queue(op, res, kMore);
  }
  // A datagram behind one that still waits for room waits too: order kept.
  if (op->code == OpCode::sendmsg && send_waits_before(r)) return;
  drive(r, true);  // finish() takes it off the fd's list when it is done
}

// ---- Readiness registrations ------------------------------------------------

void FallbackDriver::wait_on(Record& r, int fd, std::uint32_t events) noexcept {
  FdState* s;
  try {
    s = &fds_.try_emplace(fd).first->second;
  } catch (...) {
    out_of_memory("watching an fd");
  }
  if (s->watcher.ready == nullptr) {
    s->watcher.fd = fd;
    s->watcher.ready = &FallbackDriver::on_fd_ready;
    s->watcher.data = this;
  }
  r.where = Where::waiting;
  // ERR and HUP are reported whether asked for or not; holding them in every
  // interest keeps a registration alive for a poll that asked for nothing else.
  r.events = events | EPOLLERR | EPOLLHUP;
  r.fd_next = nullptr;
  r.fd_prev = s->tail;
  if (s->tail) {
    s->tail->fd_next = &r;
  } else {
    s->head = &r;
  }
  s->tail = &r;
  // If the fd was closed and its number reused behind the driver's back, epoll
  // dropped the registration while fds_ still holds it; a MOD finds that out.
  if (s->watcher.registered_) s->recheck = true;
  mark_dirty(fd, *s);
}

void FallbackDriver::unlink_waiter(Record& r) noexcept {
  const int fd = r.op->fd;
  auto it = fds_.find(fd);
  if (it == fds_.end()) {
    std::fprintf(stderr, "ringpark: op %p waits on fd %d, which has no registration\n",
                 static_cast<void*>(r.op), fd);
    std::abort();
  }
  FdState& s = it->second;
  if (r.fd_prev) {
    r.fd_prev->fd_next = r.fd_next;
  } else {
    s.head = r.fd_next;
  }
  if (r.fd_next) {
    r.fd_next->fd_prev = r.fd_prev;
  } else {
    s.tail = r.fd_prev;
  }
  r.fd_prev = r.fd_next = nullptr;
  mark_dirty(fd, s);
}

void FallbackDriver::mark_dirty(int fd, FdState& s) noexcept {
  if (s.dirty) return;
  s.dirty = true;
  try {
    dirty_.push_back(fd);
  } catch (...) {
    out_of_memory("tracking fds");
  }
}

void FallbackDriver::sync_fds() noexcept {
  // Registrations change once per turn, just before the wait: an op that ends
  // and another that starts on the same fd in one turn cost no epoll_ctl.
  // sync_fd() touches no other fd's state, so dirty_ does not grow meanwhile.
  for (std::size_t i = 0; i < dirty_.size(); ++i) sync_fd(dirty_[i]);
  dirty_.clear();
}

void FallbackDriver::sync_fd(int fd) noexcept {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return;
  FdState& s = it->second;
  s.dirty = false;
  std::uint32_t want = 0;
  for (Record* r = s.head; r != nullptr; r = r->fd_next) want |= r->events;
  if (want == 0) {
    // Nobody waits: a level-triggered registration left behind would report a
    // hung-up socket on every wait.
    if (s.watcher.registered_) {
      ++stats_.epoll_ctls;
      epoll_.unwatch(&s.watcher);
    }
    fds_.erase(it);
    return;
  }
  if (s.watcher.registered_ && want == s.registered && !s.recheck) return;
  s.recheck = false;
  s.watcher.events = want;
  ++stats_.epoll_ctls;
  int rc = epoll_.watch(&s.watcher);
  if (rc == -ENOENT && s.watcher.registered_) {
    // Closed and reused since it was registered (epoll forgot it): add it anew.
    s.watcher.registered_ = false;
    ++stats_.epoll_ctls;
    rc = epoll_.watch(&s.watcher);
  }
  if (rc == 0) {
    s.registered = want;
    return;
  }
  // epoll refuses the fd: nobody can wait on it through this registration.
  Record* r = s.head;
  s.head = s.tail = nullptr;
  if (s.watcher.registered_) {
    ++stats_.epoll_ctls;
    epoll_.unwatch(&s.watcher);
  }
  fds_.erase(it);
  while (r != nullptr) {
    Record* next = r->fd_next;
    r->fd_prev = r->fd_next = nullptr;
    r->where = Where::parked;
    cannot_wait(*r, rc);
    r = next;
  }
}

void FallbackDriver::cannot_wait(Record& r, int err) noexcept {
  Op* op = r.op;
  if (err != -EPERM) return finish(r, err);
  // EPERM: a file without a poll method (regular file, /dev/null...). poll(2)
  // calls it always ready, and a read or write on it may block.
  switch (op->code) {
    case OpCode::poll:
    case OpCode::poll_multishot: {
      const int mask = static_cast<int>(r.events & kAlwaysReady);
      // Nothing asked for that it can report: it waits, parked, until cancelled,
      // as it would in io_uring.
      if (mask == 0) return;
      if (op->code == OpCode::poll) return finish(r, mask);
      // io_uring reports it once too: no wakeup ever comes after the first.
      return queue(op, mask, kMore);
    }
    case OpCode::read:
    case OpCode::write:
    case OpCode::readv:
    case OpCode::writev:
      return to_pool(r);
    default: {
      // Not a socket, so the call fails at once (ENOTSOCK) rather than block.
      const int res = attempt(r, /*ready=*/true);
      return finish(r, res == kWait ? err : res);
    }
  }
}

void FallbackDriver::sync_inner() noexcept {
  if (inner_ == nullptr) return;
  const int fd = inner_->fd();  // it may change (libuv's, after uv_loop_fork)
  if (fd == inner_fd_ && (fd < 0 || inner_watcher_.registered_)) return;
  if (inner_watcher_.registered_) {
    auto it = fds_.find(inner_watcher_.fd);
    epoll_.unwatch(&inner_watcher_);
    // The old number may name another file now, one an op waits on; the DEL
    // above then took that file's registration, so have it made again.
    if (it != fds_.end()) {
      it->second.watcher.registered_ = false;
      mark_dirty(it->first, it->second);
    }
  }
  inner_fd_ = fd;
  if (fd < 0) return;
  inner_watcher_.fd = fd;
  // If epoll refuses it, the inner reactor still turns when its timeout passes;
  // the registration is tried again at the next park.
  epoll_.watch(&inner_watcher_);
}

void FallbackDriver::turn_inner(bool due) noexcept {
  if (inner_ == nullptr || !(inner_ready_ || due)) return;
  inner_ready_ = false;
  inner_->turn();
}

void FallbackDriver::on_fd_ready(EpollReactor::Watcher* w, std::uint32_t revents) noexcept {
  // Handled after the wait returns, not here: the ops' syscalls may unwatch
  // fds while the EpollReactor still walks this batch of events.
  auto* self = static_cast<FallbackDriver*>(w->data);
  try {
    self->fired_.push_back({w->fd, revents});
  } catch (...) {
    out_of_memory("holding readiness");
  }
}

void FallbackDriver::on_inner_ready(EpollReactor::Watcher* w, std::uint32_t) noexcept {
  static_cast<FallbackDriver*>(w->data)->inner_ready_ = true;
}

// ---- Timeouts ---------------------------------------------------------------

void FallbackDriver::arm_timer(Record& r) noexcept {
  const std::uint64_t ns = std::min(r.op->timeout_ns, kMaxTimeoutNs);
  r.where = Where::timer;
  r.deadline =
      std::chrono::steady_clock::now() + std::chrono::nanoseconds(static_cast<std::int64_t>(ns));
  r.seq = next_seq_++;
  r.heap_index = heap_.size();
  try {
    heap_.push_back(&r);
  } catch (...) {
    out_of_memory("arming a timeout");
  }
  heap_up(r.heap_index);
}

void FallbackDriver::fire_due() noexcept {
  if (heap_.empty()) return;
  const TimePoint now = std::chrono::steady_clock::now();
  while (!heap_.empty() && heap_.front()->deadline <= now) finish(*heap_.front(), -ETIME);
}

Timeout FallbackDriver::next_timeout() const noexcept {
  if (heap_.empty()) return std::nullopt;
  const auto left = heap_.front()->deadline - std::chrono::steady_clock::now();
  if (left <= Duration::zero()) return Duration::zero();
  // Rounded up, so that a wake never comes a fraction early and spins.
  return std::chrono::ceil<Duration>(left);
}

bool FallbackDriver::heap_less(std::size_t a, std::size_t b) const noexcept {
  const Record* x = heap_[a];
  const Record* y = heap_[b];
  if (x->deadline != y->deadline) return x->deadline < y->deadline;
  return x->seq < y->seq;
}

void FallbackDriver::heap_swap(std::size_t a, std::size_t b) noexcept {
  std::swap(heap_[a], heap_[b]);
  heap_[a]->heap_index = a;
  heap_[b]->heap_index = b;
}

void FallbackDriver::heap_up(std::size_t i) noexcept {
  while (i > 0) {
    const std::size_t parent = (i - 1) / 2;
    if (!heap_less(i, parent)) return;
    heap_swap(i, parent);
    i = parent;
  }
}

void FallbackDriver::heap_down(std::size_t i) noexcept {
  for (;;) {
    std::size_t least = i;
    const std::size_t left = 2 * i + 1;
    const std::size_t right = left + 1;
    if (left < heap_.size() && heap_less(left, least)) least = left;
    if (right < heap_.size() && heap_less(right, least)) least = right;
    if (least == i) return;
    heap_swap(i, least);
    i = least;
  }
}

void FallbackDriver::heap_remove(Record& r) noexcept {
  const std::size_t i = r.heap_index;
  const std::size_t last = heap_.size() - 1;
  if (i != last) {
    heap_swap(i, last);
    heap_.pop_back();
    heap_down(i);
    heap_up(i);
  } else {
    heap_.pop_back();
  }
}

// ---- Thread pool ------------------------------------------------------------

void FallbackDriver::to_pool(Record& r) noexcept {
  r.where = Where::pool;
  r.job.run = &FallbackDriver::run_job;
  r.job.data = &r;
  ++stats_.pool_jobs;
  // With no thread to be had, run it here: the loop blocks, but the op gets the
  // result io_uring would give instead of an error io_uring never gives.
  if (pool_->post(&r.job) < 0) run_job(&r.job);
}

void FallbackDriver::run_job(ThreadPool::Job* job) noexcept {
  // On a pool thread. The loop thread leaves the record alone until the result
  // is handed over below; the op and its buffers live until it completes.
  auto* r = static_cast<Record*>(job->data);
  FallbackDriver* self = r->self;
  r->res = run_blocking(*r->op);
  self->push_done(r);  // from here on the loop may free r
}

void FallbackDriver::push_done(Record* r) noexcept {
  bool first;
  {
    std::lock_guard lock(done_mutex_);
    first = done_.empty();
    try {
      done_.push_back(r);
    } catch (...) {
      out_of_memory("holding a pool result");
    }
    done_pending_.store(true, std::memory_order_release);
  }
  // One wake per batch: a non-empty list means the loop has a wake pending.
  if (first) unparker_.unpark();
}

void FallbackDriver::collect_done() noexcept {
  if (!done_pending_.load(std::memory_order_acquire)) return;
  {
    std::lock_guard lock(done_mutex_);
    done_batch_.swap(done_);
    done_pending_.store(false, std::memory_order_relaxed);
  }
  for (Record* r : done_batch_) finish(*r, r->res);
  done_batch_.clear();
}

// ---- Completion -------------------------------------------------------------

void FallbackDriver::queue(Op* op, int res, std::uint32_t flags) noexcept {
  try {
    ready_.push_back({op, res, flags});
  } catch (...) {
    out_of_memory("queueing a completion");
  }
}

void FallbackDriver::finish(Record& r, int res) noexcept {
  switch (r.where) {
    case Where::waiting:
      unlink_waiter(r);
      break;
    case Where::timer:
      heap_remove(r);
      break;
    default:
      break;
  }
  // Exactly one final completion: nothing finishes a record that is completing.
  r.where = Where::completing;
  queue(r.op, res, 0);
}

void FallbackDriver::reap() noexcept {
  for (std::size_t i = 0; i < fired_.size(); ++i) {
    const Fired f = fired_[i];
    auto it = fds_.find(f.fd);
    if (it == fds_.end()) continue;
    // on_ready() may take r (never another op) off the list, so step first.
    for (Record* r = it->second.head; r != nullptr;) {
      Record* next = r->fd_next;
      if (f.revents & r->events) on_ready(*r, f.revents);
      r = next;
    }
  }
  fired_.clear();
  fire_due();
  collect_done();
}

void FallbackDriver::dispatch() noexcept {
  if (ready_.empty()) return;
  // Only what is queued now runs: what the callbacks queue (an op they cancel,
  // one they submit) waits for the next turn, as a CQE posted later would.
  std::vector<Completion> batch;
  batch.swap(ready_);
  for (const Completion& c : batch) {
    ++stats_.completions;
    if (c.flags & kMore) {
      c.op->complete(c.op, c.res, kMore);
      if (forked()) return;
      continue;
    }
    if (ops_.erase(c.op) != 1) {
      std::fprintf(stderr, "ringpark: final completion for op %p that is not in flight\n",
                   static_cast<void*>(c.op));
      std::abort();
    }
    c.op->state = Op::State::idle;
    c.op->complete(c.op, c.res, 0);
    // A completion that forked: in the child the rest of the batch is the
    // parent's (abandon() forgets those ops).
    if (forked()) return;
  }
  batch.clear();
  if (ready_.empty()) ready_.swap(batch);  // keep the capacity
}

bool FallbackDriver::has_ready() const noexcept {
  return !ready_.empty() || done_pending_.load(std::memory_order_acquire);
}

bool FallbackDriver::has_work() const noexcept {
  if (!fresh_.empty() || has_ready()) return true;
  const Timeout next = next_timeout();
  return next && *next <= Duration::zero();
}

// ---- Park -------------------------------------------------------------------

void FallbackDriver::flush() noexcept {
  if (closed_ || forked()) return;
  run_deferred();
  start_fresh();
  sync_fds();
}

void FallbackDriver::park(Timeout timeout) noexcept {
  if (closed_ || forked()) return;
  ++stats_.turns;
  run_deferred();
  start_fresh();
  sync_inner();
  sync_fds();
  // Completions already queued must not wait, and no op timeout is overslept.
  const Timeout wait =
      has_ready() ? Timeout(Duration::zero()) : min_timeout(timeout, next_timeout());
  const Timeout inner_timeout = inner_ ? inner_->timeout() : std::nullopt;
  const auto start =
      inner_timeout ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  ++stats_.waits;
  epoll_.park(min_timeout(wait, inner_timeout));
  reap();
  dispatch();
  if (forked()) return;  // a completion forked; this is the child
  turn_inner(inner_timeout && std::chrono::steady_clock::now() - start >= *inner_timeout);
}

void FallbackDriver::turn() noexcept {
  if (closed_ || forked()) return;
  ++stats_.turns;
  run_deferred();
  start_fresh();
  sync_inner();
  sync_fds();
  ++stats_.waits;
  epoll_.turn();
  reap();
  dispatch();
  if (forked()) return;  // a completion forked; this is the child
  const Timeout inner_timeout = inner_ ? inner_->timeout() : std::nullopt;
  turn_inner(inner_timeout && *inner_timeout <= Duration::zero());
}

void FallbackDriver::shutdown() noexcept {
  if (closed_) return;
  // The pool's threads and the epoll set's registrations are the parent's.
  if (forked()) return abandon();
  run_deferred();  // what it prepares is cancelled with the rest
  shutting_down_ = true;
  for (;;) {
    // Completions run here, -ECANCELED for what was cancelled; what they submit
    // completes with -ECANCELED too, and is cancelled in the next round.
    for (auto& [op, r] : ops_) {
      if (r.where == Where::completing) continue;
      op->state = Op::State::cancelling;
      cancel_record(r, /*by_cancel_op=*/false);
    }
    // Jobs running on the pool hold their ops' buffers: wait for them.
    pool_->wait_idle();
    collect_done();
    dispatch();
    // Done when every op left has its final completion queued: in ready_, or in
    // the batch of a dispatch() further up the stack if a callback called this.
    if (ready_.empty() && std::all_of(ops_.begin(), ops_.end(), [](const auto& entry) {
          return entry.second.where == Where::completing;
        })) {
      break;
    }
  }
  fresh_.clear();
  sync_fds();  // nobody waits any more: every registration goes
  if (inner_watcher_.registered_) epoll_.unwatch(&inner_watcher_);
  pool_->stop();
  closed_ = true;
  epoll_.shutdown();
  if (inner_ != nullptr && inner_ != static_cast<Reactor*>(&epoll_)) inner_->shutdown();
}

void FallbackDriver::abandon() noexcept {
  if (closed_) return;
  if (!forked()) {
    std::fprintf(stderr,
                 "ringpark: abandon() of a fallback driver this process made; only a forked "
                 "child may let go of one without waiting for its ops\n");
    std::abort();
  }
  // Forget every op: the parent finishes its own copy; ours never completes.
  for (auto& [op, r] : ops_) op->state = Op::State::idle;
  ops_.clear();
  forget_deferred();
  fresh_.clear();
  ready_.clear();
  // The registrations these describe are in the parent's epoll set: dropped
  // here without an EPOLL_CTL_DEL.
  fds_.clear();
  dirty_.clear();
  fired_.clear();
  heap_.clear();
  done_batch_.clear();
  inner_watcher_.registered_ = false;
  // done_ is left alone: a pool thread of the parent may have held done_mutex_
  // at the fork. The pool is leaked: its std::thread objects name threads that
  // do not exist here (joining them could wait on an unrelated new thread that
  // reuses a stack) and its condition variables count the parent's waiters.
  (void)pool_.release();
  shutting_down_ = true;
  closed_ = true;
  epoll_.abandon();
  if (inner_ != nullptr && inner_ != static_cast<Reactor*>(&epoll_)) inner_->abandon();
}

}  // namespace ringpark::detail
