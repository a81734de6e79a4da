#include "epoll_bridge/thread_pool.hpp"

#include <signal.h>

#include <cerrno>

namespace ringpark::detail {

ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::start_threads() noexcept {
  // The threads block every signal, so a signal meant for the program (SIGINT,
  // SIGCHLD, a sigwait loop) is never handled on a pool thread behind its back.
  // They inherit the mask in force when they are created.
  sigset_t all;
  sigset_t old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  try {
    threads_.reserve(max_threads_);
    while (threads_.size() < max_threads_) threads_.emplace_back([this] { work(); });
  } catch (...) {
    // Out of threads or memory: run with the threads that did start, if any.
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

int ThreadPool::post(Job* job) noexcept {
  if (threads_.empty()) {
    start_threads();
    if (threads_.empty()) return -EAGAIN;
  }
  {
    std::lock_guard lock(mutex_);
    job->queued_ = true;
    job->next_ = nullptr;
    job->prev_ = tail_;
    if (tail_) {
      tail_->next_ = job;
    } else {
      head_ = job;
    }
    tail_ = job;
  }
  work_cv_.notify_one();
  return 0;
}

bool ThreadPool::try_cancel(Job* job) noexcept {
  std::lock_guard lock(mutex_);
  if (!job->queued_) return false;
  if (job->prev_) {
    job->prev_->next_ = job->next_;
  } else {
    head_ = job->next_;
  }
  if (job->next_) {
    job->next_->prev_ = job->prev_;
  } else {
    tail_ = job->prev_;
  }
  job->next_ = job->prev_ = nullptr;
  job->queued_ = false;
  if (head_ == nullptr && running_ == 0) idle_cv_.notify_all();
  return true;
}

void ThreadPool::wait_idle() noexcept {
  std::unique_lock lock(mutex_);
  idle_cv_.wait(lock, [this] { return head_ == nullptr && running_ == 0; });
}

void ThreadPool::stop() noexcept {
  if (threads_.empty()) return;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  std::lock_guard lock(mutex_);
  stopping_ = false;
}

std::size_t ThreadPool::running() const noexcept {
  std::lock_guard lock(mutex_);
  return running_;
}

void ThreadPool::work() noexcept {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_cv_.wait(lock, [this] { return head_ != nullptr || stopping_; });
    // Stopping still drains the queue: every posted job runs exactly once
    // unless try_cancel took it back.
    if (head_ == nullptr) return;
    Job* job = head_;
    head_ = job->next_;
    if (head_) {
      head_->prev_ = nullptr;
    } else {
      tail_ = nullptr;
    }
    job->next_ = nullptr;
    job->queued_ = false;
    ++running_;
    lock.unlock();
    job->run(job);  // from here on the job may be gone
    lock.lock();
    --running_;
    if (running_ == 0 && head_ == nullptr) idle_cv_.notify_all();
  }
}

}  // namespace ringpark::detail
