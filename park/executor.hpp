// The executor layer: runs ready work (completion callbacks, resumed coroutines,
// posted tasks). Its park is "park the layer below with no wait if work is
// queued, else with the caller's timeout; then run what is ready".
#pragma once

#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "park/fork.hpp"
#include "park/park.hpp"

namespace ringpark::detail {

class Executor final : public Park {
 public:
  using Task = std::function<void()>;

  // `inner` must outlive the executor.
  explicit Executor(Park& inner) : inner_(inner), unparker_(inner.unparker()) {}

  // Queues `task` to run on the loop thread during a later park or turn. Loop
  // thread only; never blocks; never runs `task` inside the call.
  void spawn(Task task);
  // Same from any thread: takes a lock and unparks the chain.
  void post(Task task);

  // True while tasks are queued (local or posted).
  bool has_work() const noexcept;

  void park(Timeout timeout) noexcept override;
  void turn() noexcept override;
  Unparker unparker() const override { return unparker_; }
  // Drops queued tasks without running them, then shuts the layer below down.
  void shutdown() noexcept override;
  // The same in a forked child, then abandons the layer below.
  void abandon() noexcept override;

  // Runs every task queued now (not those they queue). Returns how many ran.
  std::size_t run_ready() noexcept;

 private:
  Park& inner_;
  Unparker unparker_;
  std::deque<Task> local_;
  mutable std::mutex remote_mutex_;
  std::vector<Task> remote_;  // guarded by remote_mutex_
  bool remote_pending_ = false;  // guarded by remote_mutex_
};

}  // namespace ringpark::detail
