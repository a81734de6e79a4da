// The C++ API over one Chain: Runtime, block_on, spawn, post, sleep_for and the
// awaitable operations.
//
// How a coroutine waits: an awaitable in the coroutine's frame holds a pinned
// Op (or TimerEntry); its completion stores the result and schedules the
// frame's resumption on the executor. Resuming from the executor, never from
// inside the driver's reap, keeps user code out of the driver's stack and is
// what makes teardown simple:
//
//   ~Runtime: 1. stop scheduling resumptions;
//             2. shut the chain down: queued work is dropped, timers disarmed,
//                every op cancelled and reaped (its completion runs and stores
//                -ECANCELED, but resumes nothing);
//             3. only now, with the kernel holding nothing, destroy the frames
//                of unfinished spawned tasks (and with them every awaitable,
//                buffer and child task they hold);
//             4. destroy the chain (the ring is closed in step 2).
//
// After fork(2) the ring is the parent's (its SQ and CQ are mapped MAP_SHARED;
// a standalone ring is SINGLE_ISSUER, which the child may not even enter). The
// first time a forked child reaches the chain, the Runtime abandons it: the
// ring is unmapped and closed without another syscall on it, every operation
// in flight is forgotten (it completes in the parent only), and from then on
// every operation completes at once with ECANCELED and block_on, spawn and
// post throw. Teardown in the child is then steps 3 and 4 only.
#include "ringpark/runtime.hpp"

#include <sys/socket.h>
#include <uv.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <thread>
#include <unordered_set>
#include <utility>

#include "epoll_bridge/uv_reactor.hpp"
#include "park/fork.hpp"
#include "park/timer.hpp"
#include "ringpark/ops.hpp"
#include "runtime/chain.hpp"
#include "runtime/uv/loop.hpp"

namespace ringpark {
namespace detail {

class RuntimeImpl {
 public:
  RuntimeImpl(const ChainOptions& options, uv_loop_t* loop)
      : loop_(loop), owner_(std::this_thread::get_id()) {
    std::unique_ptr<Reactor> inner;
    if (loop_ != nullptr) {
      // block_on drives libuv: one uv_run(NOWAIT) whenever its fd is ready or
      // its next timer is due (the driver folds uv_backend_timeout into its wait).
      inner = std::make_unique<UvReactor>(loop_, UvReactor::TurnMode::run_nowait, real_uv_run());
    }
    chain_ = std::make_unique<Chain>(options, std::move(inner));
  }

  ~RuntimeImpl() {
    // A forked child: let go of the parent's ring (reaping or cancelling there
    // would take the parent's completions, and a SINGLE_ISSUER ring refuses
    // every enter from this process, so the shutdown below would spin).
    if (forked()) abandon();
    if (!abandoned_ && std::this_thread::get_id() != owner_ && single_issuer()) {
      // The kernel refuses every enter from this thread (EEXIST), so the
      // shutdown could never reap what is in flight: say so rather than spin.
      std::fprintf(stderr,
                   "ringpark: Runtime destroyed on a thread other than the one that built it; "
                   "its ring is SINGLE_ISSUER\n");
      std::abort();
    }
    shut_down_ = true;
    chain_->shutdown();
    // Frames may spawn from their destructors; spawn() drops those at once.
    while (!spawned_.empty()) {
      auto it = spawned_.begin();
      void* frame = *it;
      spawned_.erase(it);
      std::coroutine_handle<>::from_address(frame).destroy();
    }
    chain_.reset();
  }

  RuntimeImpl(const RuntimeImpl&) = delete;
  RuntimeImpl& operator=(const RuntimeImpl&) = delete;

  // The chain; in a forked child, the abandoned one (see the top of this file).
  Chain& chain() noexcept {
    if (forked()) abandon();
    return *chain_;
  }
  uv_loop_t* loop() const noexcept { return loop_; }
  // True once a forked child let go of the parent's ring: awaitables may then
  // be destroyed with their op "in flight" (the kernel writes the parent's
  // copy, never ours).
  bool abandoned() const noexcept { return abandoned_; }

  void post(std::function<void()> fn) {
    refuse_in_child("post");
    chain_->executor().post(std::move(fn));
  }

  // Queues the resumption of `frame` on the executor. Called from completions
  // (noexcept), so running out of memory here is fatal, as in the driver.
  void schedule(std::coroutine_handle<> frame) noexcept {
    if (shut_down_) return;  // teardown: the frame is destroyed, not resumed
    try {
      // A lambda holding one handle fits std::function's local storage; only
      // the executor's queue may allocate.
      chain_->executor().spawn([frame] { frame.resume(); });
    } catch (...) {
      std::fprintf(stderr, "ringpark: out of memory scheduling a coroutine\n");
      std::abort();
    }
  }

  void spawn(Task<void> task) {
    auto handle = TaskAccess::handle(task);
    if (!handle) throw std::invalid_argument("ringpark::spawn: empty Task");
    refuse_in_child("spawn");
    if (shut_down_) return;             // `task` is destroyed without running
    spawned_.insert(handle.address());  // may throw; `task` still owns the frame
    TaskAccess::release(task);
    handle.promise().on_done_ = &RuntimeImpl::on_spawned_done;
    handle.promise().done_context_ = this;
    schedule(handle);
  }

  void run_until_done(std::coroutine_handle<> task, const bool& done) {
    refuse_in_child("block_on");
    if (driving_) {
      throw std::logic_error("ringpark::block_on called from inside a task of the same Runtime");
    }
    if (std::this_thread::get_id() != owner_) {
      throw std::logic_error(
          "ringpark::block_on called on a thread other than the one that built the Runtime");
    }
    driving_ = true;
    struct Reset {
      bool& flag;
      ~Reset() { flag = false; }
    } reset{driving_};
    task.resume();
    while (!done) {
      // A task forked and this is the child: the chain is the parent's. The
      // task's frame is destroyed by the caller's Task, without being resumed.
      refuse_in_child("block_on");
      park();
    }
  }

 private:
  bool forked() const noexcept { return fork_generation_ != fork_generation(); }

  void abandon() noexcept {
    if (abandoned_) return;
    abandoned_ = true;
    shut_down_ = true;  // nothing is resumed any more
    chain_->abandon();
  }

  // block_on, spawn and post in a forked child: a clear error, not a hang on a
  // ring that belongs to the parent.
  void refuse_in_child(const char* what) {
    if (!forked()) return;
    abandon();
    throw std::logic_error(std::string("ringpark::") + what +
                           ": the Runtime was built before a fork and this is the child; its "
                           "ring belongs to the parent. Build a new Runtime in the child.");
  }

  // One pass of the chain with no time limit: executor -> timer -> driver ->
  // reactor; returns after something ran (or a spurious wake).
  void park() noexcept {
    // libuv measures its timers from its cached loop time, which a long run of
    // tasks since its last turn leaves stale; refresh it so that the driver's
    // wait, bounded by uv_backend_timeout, does not make a libuv timer late.
    if (loop_ != nullptr) uv_update_time(loop_);
    chain_->top().park(std::nullopt);
  }

  bool single_issuer() noexcept {
    UringDriver* uring = chain_->uring();
    return uring != nullptr && (uring->probe().setup_flags & IORING_SETUP_SINGLE_ISSUER) != 0;
  }

  static void on_spawned_done(void* context, PromiseBase& promise,
                              std::coroutine_handle<> self) noexcept {
    if (promise.error_) {
      // As for a std::thread: nobody is there to receive it.
      try {
        std::rethrow_exception(promise.error_);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "ringpark: exception escaped a spawned task: %s\n", e.what());
      } catch (...) {
        std::fprintf(stderr, "ringpark: exception escaped a spawned task\n");
      }
      std::terminate();
    }
    auto* self_rt = static_cast<RuntimeImpl*>(context);
    self_rt->spawned_.erase(self.address());
    self.destroy();  // allowed: the frame is suspended at its final point
  }

  uv_loop_t* loop_;
  std::thread::id owner_;  // the thread that built the runtime and must drive it
  std::unique_ptr<Chain> chain_;
  std::unordered_set<void*> spawned_;  // frames of unfinished spawned tasks
  bool driving_ = false;               // inside run_until_done
  bool shut_down_ = false;
  bool abandoned_ = false;  // a forked child let go of the chain (abandon())
  const unsigned fork_generation_ = fork_generation();
};

RuntimeImpl& impl_of(Runtime& runtime) noexcept { return *runtime.impl_; }

void run_until_done(RuntimeImpl& runtime, std::coroutine_handle<> task, const bool& done) {
  runtime.run_until_done(task, done);
}

namespace {

BackendChoice to_choice(Backend backend) noexcept {
  switch (backend) {
    case Backend::uring:
      return BackendChoice::uring;
    case Backend::epoll:
      return BackendChoice::epoll;
    case Backend::automatic:
      break;
  }
  return BackendChoice::automatic;
}

// The most a single read or write moves on Linux (MAX_RW_COUNT), which also
// keeps every byte count representable in the int result.
constexpr std::size_t kMaxIo = 0x7ffff000;

}  // namespace

// ---- Operations ------------------------------------------------------------

OpAwaitable::OpAwaitable(Runtime& runtime, CancelToken* token) noexcept
    : runtime_(&impl_of(runtime)), token_(nullptr) {
  op_.complete = &OpAwaitable::on_complete;
  op_.data = this;
  // Linked from the start (the awaitable is pinned from here on), so that a
  // token destroyed before the op is awaited forgets it instead of dangling.
  link(token);
}

OpAwaitable::~OpAwaitable() {
  if (in_flight_ && !runtime_->abandoned()) {
    std::fprintf(stderr,
                 "ringpark: awaitable of op %p (code %d) destroyed while the kernel may still "
                 "write into it\n",
                 static_cast<void*>(&op_), static_cast<int>(op_.code));
    std::abort();
  }
  unlink();
}

bool OpAwaitable::await_ready() noexcept {
  if (!refused_ && token_ != nullptr && token_->cancelled()) refuse(-ECANCELED);
  return refused_;
}

void OpAwaitable::await_suspend(std::coroutine_handle<> awaiter) noexcept {
  awaiter_ = awaiter;
  in_flight_ = true;
  // From here until on_complete the backend holds &op_ (the user_data) and
  // whatever it points at; the coroutine frame that holds both stays suspended
  // until then, and ~Runtime reaps before it destroys any frame.
  runtime_->chain().io().submit(&op_);
}

void OpAwaitable::on_complete(Op* op, int res, std::uint32_t flags) noexcept {
  auto* self = static_cast<OpAwaitable*>(op->data);
  if (flags & kMore) return;  // only multishot ops have these; ours are one-shot
  self->in_flight_ = false;
  self->res_ = res;
  self->unlink();
  self->runtime_->schedule(self->awaiter_);
}

std::error_code OpAwaitable::error() const noexcept {
  if (res_ >= 0) return {};
  return std::error_code(-res_, std::generic_category());
}

void OpAwaitable::link(CancelToken* token) noexcept {
  if (token == nullptr) return;
  token_ = token;
  token_prev_ = nullptr;
  token_next_ = token->head_;
  if (token->head_ != nullptr) token->head_->token_prev_ = this;
  token->head_ = this;
}

void OpAwaitable::unlink() noexcept {
  if (token_ == nullptr) return;
  if (token_prev_ != nullptr) {
    token_prev_->token_next_ = token_next_;
  } else if (token_->head_ == this) {
    token_->head_ = token_next_;
  }
  if (token_next_ != nullptr) token_next_->token_prev_ = token_prev_;
  token_prev_ = token_next_ = nullptr;
  token_ = nullptr;
}

NopAwaitable::NopAwaitable(Runtime& runtime, CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::nop;
}

TimeoutAwaitable::TimeoutAwaitable(Runtime& runtime, std::chrono::nanoseconds duration,
                                   CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::timeout;
  op_.timeout_ns = static_cast<std::uint64_t>(std::max<std::int64_t>(duration.count(), 0));
}

Result<void> TimeoutAwaitable::await_resume() const noexcept {
  // -ETIME is how a timeout op says that its time has passed: the success case.
  if (res_ == -ETIME) return {};
  return {error()};
}

PollAwaitable::PollAwaitable(Runtime& runtime, int fd, unsigned events, CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::poll;
  op_.fd = fd;
  op_.flags = static_cast<int>(events);
}

Result<unsigned> PollAwaitable::await_resume() const noexcept {
  return {res_ > 0 ? static_cast<unsigned>(res_) : 0u, error()};
}

BufferAwaitable::BufferAwaitable(Runtime& runtime, OpCode code, int fd, Buffer buffer,
                                 std::int64_t offset, int flags, CancelToken* token) noexcept
    : OpAwaitable(runtime, token), buffer_(std::move(buffer)) {
  op_.code = code;
  op_.fd = fd;
  // buffer_'s heap block is what the kernel reads or writes; buffer_ is not
  // resized while the op is in flight and lives in this pinned awaitable.
  op_.buf = buffer_.data();
  op_.len = static_cast<std::uint32_t>(std::min(buffer_.size(), kMaxIo));
  op_.offset = offset;
  op_.flags = code == OpCode::send ? flags | MSG_NOSIGNAL : flags;
}

BufferResult BufferAwaitable::await_resume() noexcept {
  return {res_ > 0 ? static_cast<std::size_t>(res_) : 0u, std::move(buffer_), error()};
}

AcceptAwaitable::AcceptAwaitable(Runtime& runtime, int fd, CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::accept;
  op_.fd = fd;
  op_.flags = SOCK_CLOEXEC;
}

Result<int> AcceptAwaitable::await_resume() const noexcept {
  return {res_ >= 0 ? res_ : -1, error()};
}

ConnectAwaitable::ConnectAwaitable(Runtime& runtime, int fd, const sockaddr* addr,
                                   socklen_t addrlen, CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::connect;
  op_.fd = fd;
  if (addr == nullptr || addrlen > sizeof addr_) {
    refuse(-EINVAL);
    return;
  }
  std::memcpy(&addr_, addr, addrlen);
  op_.addr = reinterpret_cast<sockaddr*>(&addr_);  // kept alive by this pinned awaitable
  op_.len = addrlen;
}

CloseAwaitable::CloseAwaitable(Runtime& runtime, int fd, CancelToken* token) noexcept
    : OpAwaitable(runtime, token) {
  op_.code = OpCode::close;
  op_.fd = fd;
}

}  // namespace detail

// ---- CancelToken -----------------------------------------------------------

CancelToken::~CancelToken() {
  // Operations still in flight outlive the token: they just forget it.
  for (detail::OpAwaitable* op = head_; op != nullptr;) {
    detail::OpAwaitable* next = op->token_next_;
    op->token_ = nullptr;
    op->token_prev_ = op->token_next_ = nullptr;
    op = next;
  }
}

void CancelToken::cancel() noexcept {
  cancelled_ = true;
  // Backends never complete inside cancel(), so the list does not change here.
  // Operations not awaited yet are refused when they are (await_ready).
  for (detail::OpAwaitable* op = head_; op != nullptr; op = op->token_next_) {
    if (op->in_flight_) op->runtime_->chain().io().cancel(&op->op_);
  }
}

// ---- Runtime ---------------------------------------------------------------

Runtime Runtime::Builder::build() const {
  detail::ChainOptions options;
  options.backend = detail::to_choice(backend_);
  options.ring.entries = entries_;
  // SINGLE_ISSUER|DEFER_TASKRUN only for the standalone ring: nobody but this
  // thread's block_on ever uses it. A loop's ring must serve whichever thread
  // runs the loop (runtime/uv/loop.cpp).
  options.ring.defer_taskrun = loop_ == nullptr;
  return Runtime(std::make_unique<detail::RuntimeImpl>(options, loop_));
}

Runtime::Runtime(std::unique_ptr<detail::RuntimeImpl> impl) noexcept : impl_(std::move(impl)) {}
Runtime::Runtime(Runtime&& other) noexcept = default;
Runtime& Runtime::operator=(Runtime&& other) noexcept = default;
Runtime::~Runtime() = default;

const std::string& Runtime::backend_name() const noexcept { return impl_->chain().backend_name(); }

Stats Runtime::stats() const noexcept {
  detail::ChainStats s = impl_->chain().stats();
  return Stats{s.turns, s.enters, s.sqes_submitted, s.cqes_reaped};
}

uv_loop_t* Runtime::loop() const noexcept { return impl_->loop(); }

void spawn(Runtime& runtime, Task<void> task) { detail::impl_of(runtime).spawn(std::move(task)); }

void post(Runtime& runtime, std::function<void()> fn) {
  detail::impl_of(runtime).post(std::move(fn));
}

// ---- sleep_for ---------------------------------------------------------------

SleepAwaitable::SleepAwaitable(Runtime& runtime, std::chrono::nanoseconds duration) noexcept
    : runtime_(&detail::impl_of(runtime)), duration_(duration) {
  static_assert(sizeof(detail::TimerEntry) <= kEntrySize &&
                    alignof(detail::TimerEntry) <= alignof(std::max_align_t),
                "SleepAwaitable::entry_ cannot hold a TimerEntry");
  auto* entry = ::new (static_cast<void*>(entry_)) detail::TimerEntry;
  entry->fire = &SleepAwaitable::on_fire;
  entry->data = this;
}

SleepAwaitable::~SleepAwaitable() {
  detail::TimerEntry* e = entry();
  // Only an armed entry is known to the timer layer; its shutdown disarms all,
  // so a frame destroyed by ~Runtime never reaches the chain here.
  if (e->armed()) runtime_->chain().timers().cancel(e);
  e->~TimerEntry();
}

detail::TimerEntry* SleepAwaitable::entry() noexcept {
  return std::launder(reinterpret_cast<detail::TimerEntry*>(entry_));
}

void SleepAwaitable::await_suspend(std::coroutine_handle<> awaiter) {
  awaiter_ = awaiter;
  detail::TimerLayer& timers = runtime_->chain().timers();
  const detail::TimePoint now = timers.clock().now();
  detail::TimerEntry* e = entry();
  // A negative duration is zero; a "forever"-like one saturates, not overflows.
  if (duration_ <= std::chrono::nanoseconds::zero()) {
    e->deadline = now;
  } else if (duration_ > detail::TimePoint::max() - now) {
    e->deadline = detail::TimePoint::max();
  } else {
    e->deadline = now + duration_;
  }
  timers.arm(e);
}

void SleepAwaitable::on_fire(detail::TimerEntry* entry) noexcept {
  auto* self = static_cast<SleepAwaitable*>(entry->data);
  self->runtime_->schedule(self->awaiter_);
}

}  // namespace ringpark
