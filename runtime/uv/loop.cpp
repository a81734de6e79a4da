#include "runtime/uv/loop.hpp"

#include <fcntl.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <unordered_map>

#include "ringpark.h"
#include "runtime/uv/private.hpp"

namespace ringpark::detail {

namespace {

// Written once by the preload (at load, or by the first interposed call of a
// thread that beat the constructor), read by every loop's thread.
std::atomic<UvReactor::RunFn> g_real_uv_run{nullptr};
std::atomic<LoopCloseFn> g_real_uv_loop_close{nullptr};

std::atomic<FallbackNotice> g_fallback_notice{nullptr};

std::mutex g_registry_mutex;
std::unordered_map<uv_loop_t*, LoopContext*>& registry() {
  static auto* map = new std::unordered_map<uv_loop_t*, LoopContext*>;
  return *map;
}

// Held across fork(2), so that a child never inherits the registry locked by a
// thread that does not exist there, or half-way through a change.
[[maybe_unused]] const int g_registry_atfork = ::pthread_atfork(
    [] { g_registry_mutex.lock(); }, [] { g_registry_mutex.unlock(); },
    [] { g_registry_mutex.unlock(); });

}  // namespace

UvReactor::RunFn real_uv_run() noexcept {
  UvReactor::RunFn run = g_real_uv_run.load(std::memory_order_acquire);
  return run != nullptr ? run : &uv_run;
}
void set_real_uv_run(UvReactor::RunFn run) noexcept {
  g_real_uv_run.store(run, std::memory_order_release);
}
LoopCloseFn real_uv_loop_close() noexcept {
  LoopCloseFn close = g_real_uv_loop_close.load(std::memory_order_acquire);
  return close != nullptr ? close : &uv_loop_close;
}
void set_real_uv_loop_close(LoopCloseFn close) noexcept {
  g_real_uv_loop_close.store(close, std::memory_order_release);
}
void set_fallback_notice(FallbackNotice notice) noexcept {
  g_fallback_notice.store(notice, std::memory_order_release);
}

LoopContext* LoopContext::find(uv_loop_t* loop) noexcept {
  std::lock_guard lock(g_registry_mutex);
  auto it = registry().find(loop);
  return it == registry().end() ? nullptr : it->second;
}

void LoopContext::for_each(void (*fn)(LoopContext*)) noexcept {
  std::lock_guard lock(g_registry_mutex);
  for (auto& [loop, ctx] : registry()) fn(ctx);
}

LoopContext* LoopContext::get(uv_loop_t* loop) noexcept {
  LoopContext* ctx = nullptr;
  {
    std::lock_guard lock(g_registry_mutex);
    auto& map = registry();
    auto it = map.find(loop);
    if (it != map.end()) {
      ctx = it->second;
      if (!uv_private::still_linked(loop, reinterpret_cast<uv_handle_t*>(&ctx->hook_))) {
        // The loop was closed with plain uv_loop_close and a new one made at
        // the same address: the old handles are gone with the old loop. (In a
        // forked child the chain's shutdown abandons the parent's ring.)
        map.erase(it);
        delete ctx;
        ctx = nullptr;
      }
    }
    if (ctx == nullptr) {
      try {
        ctx = new LoopContext(loop);
        map.emplace(loop, ctx);
        return ctx;
      } catch (const std::exception& e) {
        std::fprintf(stderr, "ringpark: cannot set up loop %p, running plain libuv: %s\n",
                     static_cast<void*>(loop), e.what());
        return nullptr;
      }
    }
  }
  // Outside the lock: the rebuild runs the extensions' after_fork(). A loop is
  // used by one thread at a time, which is the one here.
  ctx->notice_fork();
  return ctx;
}

LoopContext::LoopContext(uv_loop_t* loop) : loop_(loop), fork_generation_(fork_generation()) {
  // RINGPARK_SLEEP=ring: sleep in the ring on every turn that may block, even
  // with nothing of ringpark's in flight (to measure it, and so that libuv's
  // test suite can exercise that path); the default sleeps there only when
  // ringpark is busy.
  const char* sleep = std::getenv("RINGPARK_SLEEP");
  always_ring_ = sleep != nullptr && std::strcmp(sleep, "ring") == 0;
  // DEFER_TASKRUN stays off (the ring gets COOP_TASKRUN): it needs
  // SINGLE_ISSUER, which ties the ring to the thread that made it, while libuv
  // lets a loop be set up on one thread and run on another; measured, it gave
  // about 3% over COOP_TASKRUN (bench/RESULTS.md). On the fallback libuv
  // watches our epoll set, so ours must not watch libuv's.
  options_.fallback_polls_inner = false;
  // Room for a thousand operations started in one iteration (rp_poll_start on
  // 1,000 fds) to go out in one io_uring_enter: a full SQ costs an extra enter.
  // Under a small locked-memory limit the ring may get fewer (setup_ring).
  options_.ring.entries = 1024;
  build_chain();

  uv_prepare_init(loop, &hook_);
  uv_poll_init(loop, &wake_, wake_fd_);
  uv_timer_init(loop, &deadline_);
  for (uv_handle_t* h : {reinterpret_cast<uv_handle_t*>(&hook_),
                         reinterpret_cast<uv_handle_t*>(&wake_),
                         reinterpret_cast<uv_handle_t*>(&deadline_)}) {
    h->data = this;
    uv_private::mark_internal(h);
  }
  start_handles();
}

LoopContext::~LoopContext() {
  // In a forked child that never noticed the fork, this abandons instead.
  chain_->shutdown();
  ::close(wake_fd_);
}

void LoopContext::build_chain() {
  auto reactor =
      std::make_unique<UvReactor>(loop_, UvReactor::TurnMode::mark_ready, real_uv_run());
  UvReactor* reactor_ptr = reactor.get();
  auto chain = std::make_unique<Chain>(options_, std::move(reactor));
  IoBackend& io = chain->io();
  // The backend's completion fd: on io_uring an eventfd the kernel signals on
  // every CQE, on the fallback its epoll set, readable whenever ringpark has
  // work. Watched through a number of our own (a dup), which can outlive the
  // chain.
  const int own = io.completion_fd();
  if (own < 0) throw std::system_error(-own, std::generic_category(), "completion fd");
  if (wake_fd_ < 0) {
    wake_fd_ = ::fcntl(own, F_DUPFD_CLOEXEC, 0);
    if (wake_fd_ < 0) throw std::system_error(errno, std::generic_category(), "wake fd");
  } else if (::dup3(own, wake_fd_, O_CLOEXEC) < 0) {
    // After a fork: the fresh object goes onto the old number, which libuv's
    // hidden uv_poll_t (and libuv's own bookkeeping) name. The parent's eventfd
    // (or epoll set) is no longer reachable from here, so the child never reads
    // a wake meant for the parent; and when libuv registers the number in its
    // epoll set (uv_loop_fork makes it do so again) it gets the fresh object.
    throw std::system_error(errno, std::generic_category(), "dup3 of the wake fd");
  }
  const bool fell_back = !io.native(OpCode::nop);
  chain_ = std::move(chain);
  reactor_ = reactor_ptr;
  if (fell_back && backend_from_env(options_.backend) != BackendChoice::epoll) {
    if (FallbackNotice notice = g_fallback_notice.load(std::memory_order_acquire)) {
      notice(chain_->fallback_reason().c_str());
    }
  }
}

void LoopContext::rebuild_after_fork() noexcept {
  fork_generation_ = fork_generation();
  // Let go of the parent's ring (or epoll set) without touching it. The old
  // chain's objects may be on the stack (a completion callback that forked),
  // so they are freed later (collect_abandoned).
  chain_->abandon();
  try {
    abandoned_.push_back(std::move(chain_));
  } catch (...) {
    (void)chain_.release();  // out of memory: leaked, never freed while in use
  }
  try {
    build_chain();
  } catch (const std::exception& e) {
    // The hidden handles name this context's chain; there is no way to go on.
    std::fprintf(stderr, "ringpark: cannot rebuild loop %p in a forked child: %s\n",
                 static_cast<void*>(loop_), e.what());
    std::abort();
  }
  for (auto& entry : extensions_) entry.second->after_fork();
  update_ref();
}

int LoopContext::handle_opened(const void* handle) noexcept {
  try {
    return live_handles_.insert(handle).second ? 0 : UV_EBUSY;
  } catch (...) {
    return UV_ENOMEM;
  }
}

void LoopContext::start_handles() noexcept {
  uv_prepare_start(&hook_, &LoopContext::on_prepare);
  uv_unref(reinterpret_cast<uv_handle_t*>(&hook_));
  uv_private::move_prepare_last(&hook_);
  uv_poll_start(&wake_, UV_READABLE, &LoopContext::on_wake);
  uv_unref(reinterpret_cast<uv_handle_t*>(&wake_));
  uv_unref(reinterpret_cast<uv_handle_t*>(&deadline_));
  referenced_ = false;
}

void LoopContext::stop_handles() noexcept {
  uv_prepare_stop(&hook_);
  uv_poll_stop(&wake_);
  uv_timer_stop(&deadline_);
}

bool LoopContext::busy() noexcept {
  return chain_->io().in_flight() > 0 || chain_->timers().size() > 0 ||
         chain_->executor().has_work();
}

void LoopContext::before_libuv_sleeps(bool libuv_may_block) noexcept {
  IoBackend& io = chain_->io();
  io.flush();
  // Completions need to wake libuv only while its poll may block; otherwise
  // the hook runs before the next poll and reaps them, and a stray signal
  // would end the next sleep in the ring at once (libuv's epoll fd reads
  // ready). Enabled before looking: a completion that comes after the look
  // then signals, one before is seen by the look (on the fallback, queued
  // completions never show on its epoll fd by themselves).
  io.set_completion_wake(libuv_may_block);
  if (libuv_may_block && io.has_completions()) io.wake_outer();
  if (libuv_may_block && chain_->executor().has_work()) chain_->top().unparker().unpark();
  const Timeout next = min_timeout(chain_->timers().next_timeout(), io.next_deadline());
  if (next) {
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(*next).count();
    uv_timer_start(&deadline_, &LoopContext::on_deadline, static_cast<std::uint64_t>(ms), 0);
  } else {
    uv_timer_stop(&deadline_);
  }
  update_ref();
}

void LoopContext::update_ref() noexcept {
  // Ringpark's operations keep the loop alive, as libuv's own requests do;
  // those of adopted streams do so through the streams' libuv handles.
  const bool want_ref = chain_->io().in_flight() > libuv_accounted_ ||
                        chain_->timers().size() > 0 || chain_->executor().has_work();
  if (want_ref != referenced_) {
    referenced_ = want_ref;
    if (want_ref) {
      uv_ref(reinterpret_cast<uv_handle_t*>(&wake_));
    } else {
      uv_unref(reinterpret_cast<uv_handle_t*>(&wake_));
    }
  }
}

void LoopContext::sleep_in_ring() noexcept {
  const unsigned generation = fork_generation_;
  // While the ring is where we sleep, CQEs need not signal libuv's side.
  chain_->io().set_completion_wake(false);
  reactor_->clear_ready();
  for (;;) {
    // executor -> timer -> driver: the driver folds uv_backend_timeout into its
    // wait and "turns" the reactor (marks it ready) when libuv's epoll fd is
    // readable or libuv's next timer is due.
    const std::uint64_t reaped = chain_->stats().completions;
    // Our wake handle is referenced only while ringpark is busy; once it is not,
    // uv_backend_timeout must see that (0 when nothing else is alive).
    update_ref();
    chain_->top().park(std::nullopt);
    // libuv measures its next poll timeout (and the next sleep here) from its
    // cached time, which predates this sleep: without this a due timer would
    // look a whole sleep away, and fire up to twice late.
    uv_update_time(loop_);
    if (fork_generation() != generation) {
      // A callback forked and this is the child: the chain is the parent's. Go
      // back to libuv with the fresh chain (built here if no entry point in
      // the callback built it).
      notice_fork();
      break;
    }
    const bool callbacks_ran = chain_->stats().completions != reaped;
    if (callbacks_ran && (mode_ == UV_RUN_ONCE || uv_private::has_check_handles(loop_))) {
      // Ringpark callbacks ran: that is the progress ONCE waits for, and
      // libuv runs check handles after every poll that brought I/O, as the
      // program expects them after its I/O callbacks (an adopted socket's
      // receive is always in flight, so without this they would wait for an
      // event of libuv's own). Return to libuv, whose poll must then not
      // block: the eventfd makes it readable. (Even when libuv's own fd is
      // readable too: its event may be stale, and then libuv would poll
      // again, with no limit.)
      chain_->io().wake_outer();
      break;
    }
    if (reactor_->ready() || !(busy() || always_ring_)) break;
    // Completions ran and more are awaited: sleep again.
  }
}

void LoopContext::on_prepare(uv_prepare_t* handle) {
  auto* self = static_cast<LoopContext*>(handle->data);
  // Before libuv's poll, which would register the wake fd in a forked child's
  // new epoll set (after uv_loop_fork): it must name the fresh object by then.
  self->notice_fork();
  self->collect_abandoned();
  ++self->turns_;
  // Only the ring can wait on libuv's fd and ours at once; on the fallback libuv
  // sleeps and our epoll fd wakes it.
  const bool libuv_blocks = !self->running_ || self->mode_ == UV_RUN_DEFAULT ||
                            (self->mode_ == UV_RUN_ONCE && self->may_block_);
  const bool may_sleep = self->chain_->io().waits_on_inner() && self->running_ && libuv_blocks;
  bool libuv_has_work = false;
  if (self->busy() || (may_sleep && self->always_ring_)) {
    if (may_sleep) {
      self->sleep_in_ring();
      // libuv's poll will not block when its timeout is now 0 (a timer due, a
      // callback pending), unless it read 0 only because fds still wait to
      // enter its epoll set. A readable epoll fd is no such promise: the event
      // may be for an fd libuv no longer watches (it drops those lazily), and
      // then it polls again, and would sleep through our completions.
      libuv_has_work = self->reactor_->ready() && uv_backend_timeout(self->loop_) == 0 &&
                       !uv_private::watchers_pending(self->loop_);
    } else {
      const std::uint64_t ran = self->chain_->stats().completions;
      self->chain_->top().turn();
      // Ringpark callbacks ran here, before libuv's poll, which then must not
      // block (as in sleep_in_ring): under UV_RUN_ONCE (or a plain uv_run,
      // whose mode we cannot see) they are the progress the caller waits
      // for, and check handles expect to run after I/O callbacks.
      if ((!self->running_ || self->mode_ == UV_RUN_ONCE ||
           uv_private::has_check_handles(self->loop_)) &&
          self->chain_->stats().completions != ran) {
        self->chain_->io().wake_outer();
      }
    }
  }
  self->notice_fork();  // a callback may have forked
  // libuv's poll comes next. Completions left for us must wake it only if it
  // could block: when its own fd is ready it returns at once, and the next
  // iteration's hook reaps them without an eventfd round trip.
  self->before_libuv_sleeps(libuv_blocks && !libuv_has_work);
}

void LoopContext::on_wake(uv_poll_t* handle, int, int) {
  auto* self = static_cast<LoopContext*>(handle->data);
  // In a forked child, first put the fresh eventfd on the number: reading the
  // inherited one would eat a wake meant for the parent.
  self->notice_fork();
  self->collect_abandoned();
  self->chain_->io().clear_outer_wake();
  self->chain_->top().turn();
  self->notice_fork();  // a callback may have forked
  // The prepare hook runs before libuv polls again and takes care of anything
  // left: no need to wake libuv from here.
  self->before_libuv_sleeps(/*libuv_may_block=*/false);
}

void LoopContext::on_deadline(uv_timer_t* handle) {
  auto* self = static_cast<LoopContext*>(handle->data);
  self->notice_fork();
  self->collect_abandoned();
  self->chain_->top().turn();
  self->notice_fork();  // a callback may have forked
  self->before_libuv_sleeps(/*libuv_may_block=*/false);
}

int LoopContext::run(uv_run_mode mode) noexcept {
  collect_abandoned();
  // Keep the hook after any prepare handle the program started meanwhile.
  uv_private::move_prepare_last(&hook_);
  const bool was_running = running_;
  const uv_run_mode was_mode = mode_;
  running_ = true;
  mode_ = mode;
  may_block_ = uv_private::once_may_block(loop_);
  update_ref();  // operations started before this call keep the loop alive
  int r = real_uv_run()(loop_, mode);
  running_ = was_running;
  mode_ = was_mode;
  return r;
}

int LoopContext::close_loop() noexcept {
  notice_fork();
  collect_abandoned();
  if (busy() || !live_handles_.empty()) return UV_EBUSY;
  stop_handles();
  for (auto& entry : extensions_) entry.second->stop();
  int r = real_uv_loop_close()(loop_);
  if (r != 0) {
    start_handles();
    return r;
  }
  {
    std::lock_guard lock(g_registry_mutex);
    registry().erase(loop_);
  }
  delete this;
  return 0;
}

}  // namespace ringpark::detail

using ringpark::detail::LoopContext;

extern "C" int rp_uv_run(uv_loop_t* loop, uv_run_mode mode) {
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return ringpark::detail::real_uv_run()(loop, mode);
  return ctx->run(mode);
}

extern "C" int rp_uv_attach(uv_loop_t* loop) {
  if (loop == nullptr) return UV_EINVAL;
  // The context starts its hidden handles when it is made: the prepare hook
  // (last in the prepare queue, so ops started by any prepare callback before
  // it are submitted too) and the wake poll. A program's prepare handles
  // started later go to the front of libuv's queue, ahead of the hook.
  return LoopContext::get(loop) != nullptr ? 0 : UV_ENOMEM;
}

extern "C" int rp_stats(uv_loop_t* loop, rp_stats_t* stats) {
  if (loop == nullptr || stats == nullptr) return UV_EINVAL;
  *stats = rp_stats_t{};
  LoopContext* ctx = LoopContext::find(loop);
  if (ctx == nullptr) return 0;
  auto s = ctx->chain().stats();
  stats->turns = ctx->turns();
  stats->enters = s.enters;
  stats->sqes_submitted = s.sqes_submitted;
  stats->cqes_reaped = s.cqes_reaped;
  return 0;
}

extern "C" const char* rp_backend(uv_loop_t* loop) {
  if (loop == nullptr) return "none (null loop)";
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return "none (set-up failed)";
  return ctx->chain().backend_name().c_str();
}

extern "C" int rp_loop_close(uv_loop_t* loop) {
  if (loop == nullptr) return UV_EINVAL;
  LoopContext* ctx = LoopContext::find(loop);
  if (ctx == nullptr) return ringpark::detail::real_uv_loop_close()(loop);
  return ctx->close_loop();
}
