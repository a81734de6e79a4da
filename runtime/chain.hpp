// The one place where the chain of DESIGN.md is assembled and the backend
// chosen:
//
//   io_uring:  Executor -> TimerLayer -> UringDriver    -> inner reactor
//   fallback:  Executor -> TimerLayer -> FallbackDriver -> EpollReactor (-> inner)
//
// The inner reactor is ringpark's own EpollReactor, or a libuv loop (UvReactor).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "epoll_bridge/epoll_reactor.hpp"
#include "epoll_bridge/fallback_driver.hpp"
#include "park/executor.hpp"
#include "park/fork.hpp"
#include "park/timer.hpp"
#include "ringpark/op.hpp"
#include "uring_driver/driver.hpp"

namespace ringpark::detail {

enum class BackendChoice { automatic, uring, epoll };

struct ChainOptions {
  BackendChoice backend = BackendChoice::automatic;
  RingOptions ring;
  const Clock* clock = nullptr;  // SteadyClock when null
  // Whether the fallback driver watches the inner reactor's fd in its epoll set.
  // Off when the inner loop already watches the fallback's epoll fd (libuv
  // driving, ringpark inside it): the kernel refuses a cycle of epoll sets.
  bool fallback_polls_inner = true;
};

struct ChainStats {
  std::uint64_t turns = 0;
  std::uint64_t enters = 0;  // io_uring_enter calls, or epoll_wait calls on the fallback
  std::uint64_t sqes_submitted = 0;
  std::uint64_t cqes_reaped = 0;  // 0 on the fallback, like sqes_submitted
  std::uint64_t completions = 0;  // completions run: the CQEs, or the fallback's results
};

// RINGPARK_BACKEND from the environment: "epoll" forces the fallback, "uring"
// forbids it; anything else (or unset) is automatic.
BackendChoice backend_from_env(BackendChoice otherwise) noexcept;

class Chain {
 public:
  // `inner` is the innermost reactor when the chain runs under someone else's
  // loop; null makes the chain use its own EpollReactor. Throws
  // std::system_error when even the fallback cannot be built (no eventfd or
  // epoll), or when BackendChoice::uring was asked for and io_uring is unusable.
  Chain(const ChainOptions& options, std::unique_ptr<Reactor> inner);
  ~Chain();

  Executor& executor() noexcept { return *executor_; }
  TimerLayer& timers() noexcept { return *timer_; }
  IoBackend& io() noexcept { return *io_; }
  Park& top() noexcept { return *executor_; }
  Reactor* inner() noexcept { return inner_.get(); }
  EpollReactor& epoll() noexcept { return *epoll_; }
  UringDriver* uring() noexcept { return uring_.get(); }
  FallbackDriver* fallback() noexcept { return fallback_.get(); }

  // "io_uring", or "epoll (<why io_uring is not used>)".
  const std::string& backend_name() const noexcept { return backend_name_; }
  // Why io_uring is not used ("RINGPARK_BACKEND=epoll", "io_uring_setup:
  // EPERM"...), or empty on io_uring.
  const std::string& fallback_reason() const noexcept { return fallback_reason_; }
  ChainStats stats() const noexcept;
  // Shuts every layer down (cancel, then reap until nothing is in flight). In a
  // forked child it abandons instead.
  void shutdown() noexcept;
  // In a forked child: every layer lets go of what it shares with the parent
  // without touching it (Park::abandon): the ring is unmapped and closed, the
  // epoll set closed, every op and deadline forgotten, nothing runs. The chain
  // may then be destroyed. Aborts in the process that built the chain.
  void abandon() noexcept;
  // True in a forked child of the process that built the chain.
  bool forked() const noexcept { return fork_generation_ != fork_generation(); }

 private:
  std::unique_ptr<Reactor> inner_;
  std::unique_ptr<EpollReactor> epoll_;
  std::unique_ptr<UringDriver> uring_;
  std::unique_ptr<FallbackDriver> fallback_;
  std::unique_ptr<TimerLayer> timer_;
  std::unique_ptr<Executor> executor_;
  IoBackend* io_ = nullptr;
  std::string backend_name_;
  std::string fallback_reason_;
  const unsigned fork_generation_ = fork_generation();
  bool shut_down_ = false;
};

}  // namespace ringpark::detail
