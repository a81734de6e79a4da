// ThreadPool: a few threads for the fallback backend's blocking work (file
// reads and writes, openat, statx, fsync, ...), the calls io_uring hands to its
// io-wq workers. The threads start on the first post(), so a program that never
// touches a file never pays for them.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <thread>
#include <vector>

namespace ringpark::detail {

class ThreadPool {
 public:
  static constexpr std::size_t kDefaultThreads = 4;

  // One unit of work, owned by the caller. Pinned from post() until it has run
  // or try_cancel() took it back: the pool keeps its address in its queue.
  struct Job {
    Job() = default;
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;

    // Runs once on a pool thread. The pool does not touch the job after run
    // returns, so run may hand the job back to its owner (who may free it) as
    // its last step.
    void (*run)(Job*) noexcept = nullptr;
    void* data = nullptr;

    // Queue links, guarded by the pool's mutex.
    Job* next_ = nullptr;
    Job* prev_ = nullptr;
    bool queued_ = false;
  };

  explicit ThreadPool(std::size_t threads = kDefaultThreads) noexcept
      : max_threads_(threads == 0 ? 1 : threads) {}
  // Runs what is still queued, then joins the threads (see stop()).
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Queues `job` to run on a pool thread, starting the threads if none runs.
  // Returns 0, or -EAGAIN when no thread could be started (the job is then not
  // queued; the caller runs it some other way). Owner thread only (it alone
  // starts and joins threads); never blocks beyond the queue lock.
  int post(Job* job) noexcept;

  // Takes back a job that has not started. true: it will never run. false: it is
  // running or has run. Owner thread only; never blocks beyond the queue lock.
  bool try_cancel(Job* job) noexcept;

  // Blocks until no job is queued or running. Owner thread only.
  void wait_idle() noexcept;

  // Lets the threads finish what is queued, then joins them. Blocks. A later
  // post() starts new threads. Owner thread only.
  void stop() noexcept;

  // Jobs running at this instant (a snapshot). Any thread.
  std::size_t running() const noexcept;
  // Threads started and not yet joined. Owner thread only.
  std::size_t threads() const noexcept { return threads_.size(); }

 private:
  void start_threads() noexcept;
  void work() noexcept;

  const std::size_t max_threads_;
  mutable std::mutex mutex_;
  std::condition_variable work_cv_;  // a job was queued, or stop() began
  std::condition_variable idle_cv_;  // the pool went idle
  Job* head_ = nullptr;              // FIFO; guarded by mutex_
  Job* tail_ = nullptr;
  std::size_t running_ = 0;           // guarded by mutex_
  bool stopping_ = false;             // guarded by mutex_
  std::vector<std::thread> threads_;  // owner thread only
};

}  // namespace ringpark::detail
