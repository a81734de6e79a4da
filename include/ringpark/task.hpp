// Task<T>: a lazy coroutine, the unit of work of the C++ API.
//
// A Task does nothing until it is awaited (co_await from another Task), run
// with block_on(), or handed to spawn(). Its value, or the exception that
// escaped it, is delivered to whoever awaits it. A Task is move-only and owns
// its coroutine frame: destroying the Task destroys the frame.
//
// co_await runs the awaited task at once, on the awaiter's stack. If it ends
// without suspending, the awaiter simply goes on (no resume call at all); if it
// suspends, its end later hands control to the awaiter by symmetric transfer.
// So neither a loop over tasks that finish at once nor a chain of tasks resumed
// by completions grows the stack, even where the compiler does not turn the
// transfer into a tail call (GCC at -O0 or under AddressSanitizer).
#pragma once

#include <coroutine>
#include <exception>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace ringpark {

template <class T = void>
class Task;

namespace detail {

// What Task<T>'s promise has in common for every T: where to go when the
// coroutine ends.
struct PromiseBase {
  // Set for a task run by spawn() or block_on(): called at the end instead of
  // resuming an awaiter. It may destroy the frame (spawn does).
  using DoneFn = void (*)(void* context, PromiseBase& promise,
                          std::coroutine_handle<> self) noexcept;

  struct FinalAwaiter {
    bool await_ready() const noexcept { return false; }
    template <class Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> self) noexcept {
      PromiseBase& p = self.promise();
      if (p.on_done_ != nullptr) {
        // Nothing of the frame may be touched after this call: it may be gone.
        p.on_done_(p.done_context_, p, self);
        return std::noop_coroutine();
      }
      if (p.running_inline_) {
        // Ended inside the awaiter's await_suspend: it resumes the awaiter by
        // returning false, so return to it rather than resuming it here.
        p.running_inline_ = false;
        return std::noop_coroutine();
      }
      // Symmetric transfer to the awaiter, or nowhere if nobody awaits.
      return p.continuation_ ? p.continuation_ : std::noop_coroutine();
    }
    void await_resume() const noexcept {}
  };

  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  void unhandled_exception() noexcept { error_ = std::current_exception(); }

  std::coroutine_handle<> continuation_;
  std::exception_ptr error_;
  DoneFn on_done_ = nullptr;
  void* done_context_ = nullptr;
  // True while the task runs inside its awaiter's await_suspend, before its
  // first suspension.
  bool running_inline_ = false;
};

template <class T>
struct Promise final : PromiseBase {
  Task<T> get_return_object() noexcept;
  template <class U = T>
  void return_value(U&& value) {
    value_.emplace(std::forward<U>(value));
  }
  // The value, moved out, or the exception rethrown. Call once.
  T result() {
    if (error_) std::rethrow_exception(error_);
    return std::move(*value_);
  }

  std::optional<T> value_;
};

template <>
struct Promise<void> final : PromiseBase {
  Task<void> get_return_object() noexcept;
  void return_void() const noexcept {}
  void result() const {
    if (error_) std::rethrow_exception(error_);
  }
};

// How runtime.hpp and runtime.cpp reach a Task's frame; not for users.
struct TaskAccess {
  template <class T>
  static std::coroutine_handle<Promise<T>> handle(Task<T>& task) noexcept {
    return task.handle_;
  }
  template <class T>
  static std::coroutine_handle<Promise<T>> release(Task<T>& task) noexcept {
    return std::exchange(task.handle_, {});
  }
};

}  // namespace detail

template <class T>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::Promise<T>;
  using value_type = T;

  Task() noexcept = default;
  Task(Task&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      reset();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  // Destroys the frame. Never blocks. A task that is suspended in an operation
  // must not be destroyed by hand: only its awaiter's end, or the Runtime's
  // shutdown (which first completes every operation), may end it.
  ~Task() { reset(); }

  // False for a default-constructed or moved-from Task.
  bool valid() const noexcept { return static_cast<bool>(handle_); }

  // co_await task: runs the task to its end (the awaiter is resumed by
  // symmetric transfer when it finishes) and yields its value, or rethrows the
  // exception that escaped it. A Task is awaited at most once.
  auto operator co_await() & noexcept { return Awaiter{handle_}; }
  auto operator co_await() && noexcept { return Awaiter{handle_}; }

 private:
  friend struct detail::Promise<T>;
  friend struct detail::TaskAccess;

  struct Awaiter {
    std::coroutine_handle<promise_type> task;
    bool await_ready() const noexcept { return !task || task.done(); }
    bool await_suspend(std::coroutine_handle<> awaiter) noexcept {
      promise_type& p = task.promise();
      p.continuation_ = awaiter;
      p.running_inline_ = true;
      task.resume();                         // until the task suspends or ends
      if (!p.running_inline_) return false;  // it ended: the awaiter goes on now
      p.running_inline_ = false;             // it suspended: its end resumes the awaiter
      return true;
    }
    T await_resume() {
      if (!task) throw std::invalid_argument("ringpark: co_await on an empty Task");
      return task.promise().result();
    }
  };

  explicit Task(std::coroutine_handle<promise_type> handle) noexcept : handle_(handle) {}
  void reset() noexcept {
    if (handle_) std::exchange(handle_, {}).destroy();
  }

  std::coroutine_handle<promise_type> handle_;
};

namespace detail {

template <class T>
Task<T> Promise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<Promise<T>>::from_promise(*this));
}

inline Task<void> Promise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<Promise<void>>::from_promise(*this));
}

}  // namespace detail

}  // namespace ringpark
