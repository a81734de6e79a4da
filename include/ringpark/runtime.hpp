// The C++ API's runtime: one chain (executor -> timer -> io_uring or epoll
// fallback -> reactor) with coroutines on top.
//
//   ringpark::Runtime rt = ringpark::Runtime::Builder().build();
//   int n = ringpark::block_on(rt, some_task());
//
// Threads: a Runtime belongs to the thread that builds it. That thread drives
// it (block_on), spawns on it, awaits operations on it and destroys it; the
// standalone ring is created SINGLE_ISSUER, so another thread could not even
// enter it. The only entry point for other threads is post().
//
// Nothing happens between calls: tasks, timers and completions make progress
// only while some block_on() runs on the Runtime.
//
// fork(2): a Runtime belongs to the process that built it. In a forked child
// (a fork through glibc's fork(), from anywhere, a task included) it is
// unusable: block_on, spawn and post throw std::logic_error, and operations
// complete at once with operation_canceled. Its ring is the parent's, and the
// child never touches it beyond unmapping and closing it, so the parent keeps
// every one of its completions; the child's copies of the operations that were
// in flight never complete. Destroying the Runtime in the child returns at once
// (unfinished spawned tasks are destroyed without being resumed). A child that
// wants ringpark builds a new Runtime.
//
// Operations are in ringpark/ops.hpp.
#pragma once

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

#include "ringpark/task.hpp"

struct uv_loop_s;
typedef struct uv_loop_s uv_loop_t;

namespace ringpark {

class Runtime;

namespace detail {

class RuntimeImpl;
struct TimerEntry;

// The implementation behind a Runtime; stable while the Runtime is moved.
RuntimeImpl& impl_of(Runtime& runtime) noexcept;
// Resumes `task`, then drives the chain until `done` is set. Throws
// std::logic_error when called from inside a task of the same runtime.
void run_until_done(RuntimeImpl& runtime, std::coroutine_handle<> task, const bool& done);

}  // namespace detail

// Which backend runs the runtime. The environment variable RINGPARK_BACKEND
// (uring or epoll) takes precedence over what is asked here.
enum class Backend {
  automatic,  // io_uring when the kernel allows it, else the epoll fallback
  uring,      // io_uring or an error
  epoll,      // the epoll fallback even where io_uring works
};

// Counters of the runtime's chain; "syscalls per operation" made visible.
struct Stats {
  std::uint64_t turns = 0;           // park and turn passes of the driver layer
  std::uint64_t enters = 0;          // io_uring_enter calls (epoll_wait calls on the fallback)
  std::uint64_t sqes_submitted = 0;  // SQEs handed to the kernel (0 on the fallback)
  std::uint64_t cqes_reaped = 0;     // CQEs taken off the ring (0 on the fallback)
};

class Runtime {
 public:
  class Builder {
   public:
    // Size of the submission queue (io_uring only; the kernel rounds it up to
    // a power of two). Default 256. A size the kernel refuses makes io_uring
    // unusable: the fallback runs, or build() throws under Backend::uring.
    Builder& entries(unsigned entries) noexcept {
      entries_ = entries;
      return *this;
    }
    Builder& backend(Backend backend) noexcept {
      backend_ = backend;
      return *this;
    }
    // Runs the runtime on top of an existing libuv loop: while block_on()
    // drives the runtime it also runs the loop (uv_run(UV_RUN_NOWAIT) whenever
    // libuv's fd is ready or one of its timers is due), so libuv handles and
    // ringpark tasks progress together. The loop must outlive the Runtime; the
    // Runtime starts no handle on it, so uv_loop_close works after the Runtime
    // is gone. Do not also run rp_uv_run() on the same loop.
    Builder& attach(uv_loop_t* loop) noexcept {
      loop_ = loop;
      return *this;
    }

    // Builds the runtime on the calling thread, which then owns it. Throws
    // std::system_error when even the fallback cannot be built (no eventfd or
    // epoll), or when Backend::uring was demanded and io_uring is unusable;
    // io_uring being unavailable otherwise just selects the fallback.
    Runtime build() const;

   private:
    unsigned entries_ = 256;
    Backend backend_ = Backend::automatic;
    uv_loop_t* loop_ = nullptr;
  };

  // Moving keeps every task, operation and awaitable working (they refer to the
  // implementation, not to this object). A moved-from Runtime may only be
  // destroyed or assigned to.
  Runtime(Runtime&& other) noexcept;
  Runtime& operator=(Runtime&& other) noexcept;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  // Shuts the chain down: every operation in flight is cancelled and reaped
  // (the kernel lets go of every buffer), queued work is dropped, and only then
  // are the frames of unfinished spawned tasks destroyed, without resuming
  // them. Blocks until the kernel has returned every operation. Owner thread
  // only: destroying a Runtime whose ring is SINGLE_ISSUER on another thread
  // aborts with a message (the kernel would refuse to reap it there). In a
  // forked child it never blocks and never touches the parent's ring (see the
  // top of this file); any thread may do it there.
  ~Runtime();

  // "io_uring", or "epoll (<why io_uring is not used>)". Never blocks; the
  // string lives as long as the Runtime.
  const std::string& backend_name() const noexcept;
  // A snapshot of the counters. Never blocks; owner thread.
  Stats stats() const noexcept;
  // The libuv loop given to Builder::attach, or null.
  uv_loop_t* loop() const noexcept;

 private:
  explicit Runtime(std::unique_ptr<detail::RuntimeImpl> impl) noexcept;
  friend detail::RuntimeImpl& detail::impl_of(Runtime& runtime) noexcept;

  std::unique_ptr<detail::RuntimeImpl> impl_;
};

// Runs `task` to its end on the calling (owner) thread, driving the runtime
// meanwhile: spawned tasks, timers, completions and, when attached, the libuv
// loop all run inside this call. Blocks until the task finishes; returns its
// value or rethrows its exception. Throws std::logic_error when called from
// inside a task running on the same runtime (it would park the chain
// re-entrantly) or on another thread than the one that built the runtime, or
// in a forked child of the process that built it (also when a task forks: the
// child's block_on throws once the task suspends), and std::invalid_argument
// for an empty Task.
template <class T>
T block_on(Runtime& runtime, Task<T> task) {
  auto handle = detail::TaskAccess::handle(task);
  if (!handle) throw std::invalid_argument("ringpark::block_on: empty Task");
  bool done = false;
  handle.promise().on_done_ = [](void* context, detail::PromiseBase&,
                                 std::coroutine_handle<>) noexcept {
    *static_cast<bool*>(context) = true;
  };
  handle.promise().done_context_ = &done;
  detail::run_until_done(detail::impl_of(runtime), handle, done);
  return handle.promise().result();  // `task` destroys the frame after this
}

// Runs `task` detached on the runtime's executor: it starts during a later
// block_on (never inside this call) and its frame is destroyed when it ends.
// Throws std::logic_error in a forked child of the process that built the
// runtime.
// An exception escaping a spawned task is printed and ends the process
// (std::terminate), as one escaping a std::thread does. A task still unfinished
// when the Runtime is destroyed is destroyed without being resumed, after every
// operation has completed. Owner thread; never blocks; throws std::bad_alloc
// (the task is then destroyed) and std::invalid_argument for an empty Task.
void spawn(Runtime& runtime, Task<void> task);

// Queues `fn` to run on the owner thread during a later block_on, and wakes the
// runtime if it is parked. Thread-safe (the one entry point that is); never
// blocks beyond a short lock; throws std::bad_alloc. Work still queued when the
// Runtime is destroyed is dropped without running. The Runtime must outlive the
// call. Throws std::logic_error in a forked child of the process that built the
// runtime.
void post(Runtime& runtime, std::function<void()> fn);

// The awaitable of sleep_for(). A deadline in the runtime's timer layer (not an
// io_uring operation); pinned, like every awaitable of ringpark.
class SleepAwaitable {
 public:
  SleepAwaitable(Runtime& runtime, std::chrono::nanoseconds duration) noexcept;
  SleepAwaitable(const SleepAwaitable&) = delete;
  SleepAwaitable& operator=(const SleepAwaitable&) = delete;
  ~SleepAwaitable();

  bool await_ready() const noexcept { return false; }
  // Arms the deadline (now + duration). Throws std::bad_alloc.
  void await_suspend(std::coroutine_handle<> awaiter);
  void await_resume() const noexcept {}

 private:
  static constexpr std::size_t kEntrySize = 64;
  static void on_fire(detail::TimerEntry* entry) noexcept;
  detail::TimerEntry* entry() noexcept;

  detail::RuntimeImpl* runtime_;
  std::chrono::nanoseconds duration_;
  std::coroutine_handle<> awaiter_;
  // A detail::TimerEntry lives here (runtime.cpp checks that it fits); the
  // timer layer keeps its address while it is armed.
  alignas(std::max_align_t) unsigned char entry_[kEntrySize];
};

// co_await sleep_for(runtime, d): resumes the awaiting task on the owner thread
// once at least `d` has passed (d <= 0 still waits for the next turn). Uses
// the timer layer, so it costs no syscall of its own. Not cancellable; use
// ringpark::timeout() with a CancelToken for a sleep that can be cut short.
inline SleepAwaitable sleep_for(Runtime& runtime, std::chrono::nanoseconds duration) noexcept {
  return SleepAwaitable(runtime, duration);
}

}  // namespace ringpark
