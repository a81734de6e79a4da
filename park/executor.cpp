#include "park/executor.hpp"

namespace ringpark::detail {

void Executor::spawn(Task task) { local_.push_back(std::move(task)); }

void Executor::post(Task task) {
  {
    std::lock_guard lock(remote_mutex_);
    remote_.push_back(std::move(task));
    remote_pending_ = true;
  }
  unparker_.unpark();
}

bool Executor::has_work() const noexcept {
  if (!local_.empty()) return true;
  std::lock_guard lock(remote_mutex_);
  return remote_pending_;
}

void Executor::park(Timeout timeout) noexcept {
  inner_.park(has_work() ? Timeout(Duration::zero()) : timeout);
  run_ready();
}

void Executor::turn() noexcept {
  inner_.turn();
  run_ready();
}

std::size_t Executor::run_ready() noexcept {
  {
    std::lock_guard lock(remote_mutex_);
    for (auto& task : remote_) local_.push_back(std::move(task));
    remote_.clear();
    remote_pending_ = false;
  }
  // Only what is queued now runs, so a task that requeues itself cannot starve
  // the layers below.
  std::size_t n = local_.size();
  const unsigned generation = fork_generation();
  for (std::size_t i = 0; i < n; ++i) {
    Task task = std::move(local_.front());
    local_.pop_front();
    task();
    // In a child that this task forked, the rest of the queue is the parent's
    // work: the child abandons this chain, and its queue with it.
    if (fork_generation() != generation) return i + 1;
  }
  return n;
}

void Executor::shutdown() noexcept {
  local_.clear();
  {
    std::lock_guard lock(remote_mutex_);
    remote_.clear();
    remote_pending_ = false;
  }
  inner_.shutdown();
}

void Executor::abandon() noexcept {
  local_.clear();
  // A thread of the parent may have held the lock when it forked; it does not
  // exist here, so the lock would never be released. Leave the queue as it is
  // then (it is dropped with the executor).
  if (remote_mutex_.try_lock()) {
    remote_.clear();
    remote_pending_ = false;
    remote_mutex_.unlock();
  }
  inner_.abandon();
}

}  // namespace ringpark::detail
