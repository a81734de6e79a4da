// The Park contract: what every layer of the chain offers the layer above it.
//
//   executor -> timer -> uring driver -> reactor
//
// Each layer wraps the one below and, when it has nothing to do, parks it with a
// timeout. A layer only ever sees this interface of the layer below, never its
// concrete type; the chain is assembled in one place (runtime/chain.cpp).
#pragma once

#include <chrono>
#include <memory>
#include <optional>

namespace ringpark::detail {

using Duration = std::chrono::nanoseconds;

// std::nullopt means "no limit".
using Timeout = std::optional<Duration>;

// The smaller of two timeouts, where nullopt is infinity.
constexpr Timeout min_timeout(Timeout a, Timeout b) noexcept {
  if (!a) return b;
  if (!b) return a;
  return *a < *b ? a : b;
}

// A kernel object that wakes a parked layer: an eventfd. Shared between the
// layer that reads it and every Unparker, so the fd stays open while any handle
// to it exists, even after the layer is gone.
class WakeFd {
 public:
  // Throws std::system_error if the eventfd cannot be made.
  // `nonblocking` makes read(2) on the fd return EAGAIN instead of blocking;
  // the io_uring driver wants a blocking one, since io_uring honours O_NONBLOCK
  // and would end its read early instead of waiting.
  explicit WakeFd(bool nonblocking = true);
  ~WakeFd();
  WakeFd(const WakeFd&) = delete;
  WakeFd& operator=(const WakeFd&) = delete;

  int fd() const noexcept { return fd_; }
  // Makes fd() readable. Thread-safe, async-signal-safe, never blocks.
  void signal() const noexcept;
  // Resets the counter to zero. Only for a non-blocking fd, where it never blocks.
  void drain() const noexcept;

 private:
  int fd_;
};

// A copyable, thread-safe handle that wakes one parked layer. unpark() before
// park() makes the next park() return at once; several unparks collapse into one.
class Unparker {
 public:
  Unparker() = default;
  explicit Unparker(std::shared_ptr<const WakeFd> fd) noexcept : fd_(std::move(fd)) {}
  // Thread-safe; never blocks. A default-constructed Unparker does nothing.
  void unpark() const noexcept {
    if (fd_) fd_->signal();
  }

 private:
  std::shared_ptr<const WakeFd> fd_;
};

class Park {
 public:
  virtual ~Park() = default;

  // Blocks at most `timeout` (nullopt: no limit) or until unparked, then does
  // this layer's work. Returning early is allowed (a spurious wake); EINTR is one.
  virtual void park(Timeout timeout) noexcept = 0;

  // One pass of this layer's work that never blocks.
  virtual void turn() noexcept = 0;

  virtual Unparker unparker() const = 0;

  // Cancels and reaps everything in flight. Nothing the kernel may still touch is
  // released before this returns. The layer may not be parked again afterwards.
  virtual void shutdown() noexcept = 0;

  // In a forked child only (see park/fork.hpp): lets go of what this layer
  // inherited from the parent without touching any kernel object it shares with
  // the parent: no io_uring_enter, register or cancel on a ring, no epoll_ctl on
  // an epoll set, no wait for threads (they do not exist here). Fds are closed
  // and mappings unmapped, which affects only this process. Every op and
  // deadline the layer held is forgotten: it is left idle and never completes or
  // fires here (the kernel writes the parent's copy of its memory, not ours).
  // Runs no user code; never blocks; then abandons the layer below. Afterwards
  // the layer may be destroyed (its destructor touches nothing shared) but never
  // parked again.
  virtual void abandon() noexcept = 0;
};

// The innermost layer: a Park whose pending work is signalled by a pollable fd,
// so that an outer layer (the io_uring driver) can watch it from inside its own
// wait. The fd may change over the reactor's life (libuv's does after
// uv_loop_fork), so callers read it again before each wait.
class Reactor : public Park {
 public:
  // Readable (POLLIN) whenever turn() has work to do. -1 if there is none yet.
  virtual int fd() const noexcept = 0;
  // How long the reactor may sleep before it must turn (its own timers): nullopt
  // for no limit, zero when it must turn now.
  virtual Timeout timeout() const noexcept = 0;
};

}  // namespace ringpark::detail
