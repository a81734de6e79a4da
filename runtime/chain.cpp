#include "runtime/chain.hpp"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <system_error>

namespace ringpark::detail {

BackendChoice backend_from_env(BackendChoice otherwise) noexcept {
  const char* value = std::getenv("RINGPARK_BACKEND");
  if (value == nullptr) return otherwise;
  if (std::strcmp(value, "epoll") == 0) return BackendChoice::epoll;
  if (std::strcmp(value, "uring") == 0 || std::strcmp(value, "io_uring") == 0)
    return BackendChoice::uring;
  return otherwise;
}

Chain::Chain(const ChainOptions& options, std::unique_ptr<Reactor> inner)
    : inner_(std::move(inner)), epoll_(std::make_unique<EpollReactor>()) {
  const Clock& clock = options.clock ? *options.clock : SteadyClock::instance();
  const BackendChoice choice = backend_from_env(options.backend);
  // Without a libuv loop the io_uring driver's inner reactor is our epoll set.
  Reactor* below_driver = inner_ ? inner_.get() : epoll_.get();

  std::string why;
  if (choice == BackendChoice::epoll) {
    why = "RINGPARK_BACKEND=epoll";
  } else {
    RingProbe probe;
    uring_ = UringDriver::create(below_driver, options.ring, &probe);
    if (!uring_) {
      if (choice == BackendChoice::uring) {
        throw std::system_error(-probe.error, std::generic_category(), probe.reason);
      }
      why = probe.reason;
    }
  }

  Park* driver;
  if (uring_) {
    io_ = uring_.get();
    driver = uring_.get();
    backend_name_ = "io_uring";
  } else {
    fallback_ = std::make_unique<FallbackDriver>(
        *epoll_, options.fallback_polls_inner ? inner_.get() : nullptr);
    io_ = fallback_.get();
    driver = fallback_.get();
    backend_name_ = "epoll (" + why + ")";
    fallback_reason_ = why;
  }
  timer_ = std::make_unique<TimerLayer>(*driver, clock);
  executor_ = std::make_unique<Executor>(*timer_);
}

Chain::~Chain() { shutdown(); }

void Chain::shutdown() noexcept {
  if (shut_down_) return;
  if (forked()) return abandon();
  shut_down_ = true;
  // Down the chain: the executor drops queued tasks, the timer disarms, the
  // driver cancels and reaps, then the reactor below it.
  executor_->shutdown();
}

void Chain::abandon() noexcept {
  if (shut_down_) return;
  shut_down_ = true;
  // Down the chain as in shutdown(); each driver aborts if this is not a
  // forked child. Our own epoll set is below the driver only without a libuv
  // loop; abandon it in any case.
  executor_->abandon();
  epoll_->abandon();
}

ChainStats Chain::stats() const noexcept {
  ChainStats s;
  if (uring_) {
    const DriverStats& d = uring_->stats();
    s.turns = d.turns;
    s.enters = d.enters;
    s.sqes_submitted = d.sqes_submitted;
    s.cqes_reaped = d.cqes_reaped;
    s.completions = d.cqes_reaped;
  } else {
    const FallbackStats& f = fallback_->stats();
    s.turns = f.turns;
    s.enters = f.waits;
    s.completions = f.completions;
  }
  return s;
}

}  // namespace ringpark::detail
