#include "epoll_bridge/uv_reactor.hpp"

#include <poll.h>

#include <cerrno>

#include "epoll_bridge/epoll_reactor.hpp"

namespace ringpark::detail {

Timeout UvReactor::timeout() const noexcept {
  // libuv computes this from its cached loop time; callers that sleep in a loop
  // call uv_update_time between sleeps (rp_uv_run's hook does).
  int ms = uv_backend_timeout(loop_);
  if (ms < 0) return std::nullopt;
  return std::chrono::milliseconds(ms);
}

void UvReactor::park(Timeout timeout) noexcept {
  // Standing alone (no driver above), parking is libuv's documented embedding:
  // poll its backend fd, then turn it.
  pollfd pfds[2] = {{fd(), POLLIN, 0}, {wake_->fd(), POLLIN, 0}};
  int r = ::poll(pfds, 2, to_poll_ms(min_timeout(timeout, this->timeout())));
  if (r > 0 && (pfds[1].revents & POLLIN)) wake_->drain();
  // A timeout, a wake or EINTR: all end in one turn.
  turn();
}

void UvReactor::turn() noexcept {
  if (mode_ == TurnMode::mark_ready) {
    ready_ = true;
  } else {
    run_(loop_, UV_RUN_NOWAIT);
  }
}

}  // namespace ringpark::detail
