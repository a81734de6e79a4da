#include "epoll_bridge/epoll_reactor.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <system_error>

namespace ringpark::detail {

int to_poll_ms(Timeout timeout) noexcept {
  if (!timeout) return -1;
  if (*timeout <= Duration::zero()) return 0;
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(*timeout).count();
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

EpollReactor::EpollReactor()
    : epfd_(::epoll_create1(EPOLL_CLOEXEC)), wake_(std::make_shared<WakeFd>()) {
  if (epfd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = nullptr;  // null marks the wake fd
  if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_->fd(), &ev) < 0) {
    int err = errno;
    ::close(epfd_);
    throw std::system_error(err, std::generic_category(), "epoll_ctl(wake)");
  }
}

EpollReactor::~EpollReactor() {
  if (epfd_ >= 0) ::close(epfd_);
}

int EpollReactor::watch(Watcher* w) noexcept {
  epoll_event ev{};
  ev.events = w->events;
  ev.data.ptr = w;
  int op = w->registered_ ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
  if (::epoll_ctl(epfd_, op, w->fd, &ev) < 0) return -errno;
  w->registered_ = true;
  if (dispatching_) std::erase(removed_, w);
  return 0;
}

int EpollReactor::unwatch(Watcher* w) noexcept {
  if (!w->registered_) return 0;
  w->registered_ = false;
  if (dispatching_) removed_.push_back(w);
  if (epfd_ < 0) return 0;  // abandoned
  // The fd may already be closed, which removed it from the set: not an error.
  if (::epoll_ctl(epfd_, EPOLL_CTL_DEL, w->fd, nullptr) < 0 && errno != EBADF &&
      errno != ENOENT) {
    return -errno;
  }
  return 0;
}

void EpollReactor::wait(int timeout_ms) noexcept {
  epoll_event events[64];
  ++waits_;
  int n = ::epoll_wait(epfd_, events, 64, timeout_ms);
  if (n <= 0) return;  // timeout, or EINTR: a spurious wake
  dispatching_ = true;
  for (int i = 0; i < n; ++i) {
    auto* w = static_cast<Watcher*>(events[i].data.ptr);
    if (w == nullptr) {
      wake_->drain();
      continue;
    }
    // A callback earlier in this batch may have unwatched (and freed) w.
    if (!removed_.empty() && std::find(removed_.begin(), removed_.end(), w) != removed_.end())
      continue;
    w->ready(w, events[i].events);
  }
  dispatching_ = false;
  removed_.clear();
}

void EpollReactor::park(Timeout timeout) noexcept { wait(to_poll_ms(timeout)); }

void EpollReactor::turn() noexcept { wait(0); }

void EpollReactor::abandon() noexcept {
  // In a forked child the set is shared with the parent: an EPOLL_CTL_DEL here
  // would remove the parent's registration. Closing our fd removes nothing
  // while the parent holds the set.
  if (epfd_ >= 0) ::close(epfd_);
  epfd_ = -1;
}

void EpollReactor::shutdown() noexcept {
  // Nothing is in flight in an epoll set: readiness costs the kernel no memory
  // of ours. Watchers are unregistered by their owners.
}

}  // namespace ringpark::detail
