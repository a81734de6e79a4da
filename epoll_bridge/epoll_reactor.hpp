// EpollReactor: ringpark's own epoll set. It is the innermost layer of the chain
// in both backends: under the io_uring driver it holds whatever must be watched
// by epoll (its fd sits in the ring as a one-shot poll), and in the fallback
// backend it is the layer that waits, with the fallback operations on top.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "park/park.hpp"

namespace ringpark::detail {

class EpollReactor final : public Reactor {
 public:
  // A readiness watcher. Pinned while registered: its address is the epoll
  // data. Level-triggered unless `events` has EPOLLET.
  struct Watcher {
    Watcher() = default;
    Watcher(const Watcher&) = delete;
    Watcher& operator=(const Watcher&) = delete;

    int fd = -1;
    std::uint32_t events = 0;                                   // EPOLLIN, EPOLLOUT, ...
    void (*ready)(Watcher*, std::uint32_t revents) noexcept = nullptr;  // loop thread
    void* data = nullptr;
    bool registered_ = false;
  };

  // Throws std::system_error when epoll_create1 or eventfd fails.
  EpollReactor();
  ~EpollReactor() override;
  EpollReactor(const EpollReactor&) = delete;
  EpollReactor& operator=(const EpollReactor&) = delete;

  // Registers, re-registers (new events) or removes a watcher. Negative errno on
  // failure (EBADF, EPERM for a regular file, ...), and the watcher is left as it
  // was. Loop thread only; never blocks.
  int watch(Watcher* w) noexcept;
  int unwatch(Watcher* w) noexcept;

  void park(Timeout timeout) noexcept override;
  void turn() noexcept override;
  Unparker unparker() const override { return Unparker(wake_); }
  void shutdown() noexcept override;
  // Closes this process's reference to the epoll set (the parent's
  // registrations stay, untouched); watch() then fails with -EBADF and
  // unwatch() does nothing.
  void abandon() noexcept override;
  int fd() const noexcept override { return epfd_; }
  Timeout timeout() const noexcept override { return std::nullopt; }

  std::uint64_t waits() const noexcept { return waits_; }

 private:
  void wait(int timeout_ms) noexcept;

  int epfd_;
  std::shared_ptr<const WakeFd> wake_;
  std::vector<Watcher*> removed_;  // unwatched during this dispatch; skip their events
  bool dispatching_ = false;
  std::uint64_t waits_ = 0;
};

// Milliseconds for epoll_wait/poll from a Timeout, rounded up so that a sleep
// never ends before the deadline; -1 for none.
int to_poll_ms(Timeout timeout) noexcept;

}  // namespace ringpark::detail
