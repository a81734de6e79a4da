// Ringpark's state for one libuv loop, and how it rides inside uv_run.
//
// rp_uv_run(loop, mode) calls the real uv_run(loop, mode), so every phase of
// libuv runs exactly as before. A hidden prepare handle, kept last in the
// prepare queue, is where ringpark does its part of each iteration:
// - nothing of ringpark's in flight: it returns at once and libuv sleeps in its
//   own epoll_wait, as it would without ringpark;
// - ringpark operations in flight: it sleeps in the ring (one io_uring_enter),
//   with libuv's epoll fd polled from inside the ring and the wait bounded by
//   uv_backend_timeout; ringpark completions run right there and the sleep goes
//   on, and once libuv's fd is readable or its timer due the hook returns, so
//   libuv's own poll finds work and does not block.
// When libuv sleeps by itself (the first case, plain uv_run, or a mode that must
// not block), ringpark's completions still wake it: the ring's eventfd (or, on
// the fallback, ringpark's epoll fd) is watched by a hidden uv_poll_t, and a
// hidden uv_timer_t carries ringpark's earliest deadline.
//
// After fork(2) the ring (its SQ and CQ are mapped MAP_SHARED), the epoll set of
// the fallback and the eventfd are shared with the parent: a child that
// submitted, reaped or cancelled through them would take the parent's
// completions or cancel its operations. So a context in a forked child keeps
// its address (handles point at it) but, the first time any entry point calls
// notice_fork(), it abandons the parent's chain without touching it (unmap and
// close only), builds a fresh one (new ring, new eventfd, placed on the old
// eventfd's fd number so that libuv's hidden uv_poll_t, and libuv's own
// uv_loop_fork, see the new one) and tells every extension (after_fork()).
// Operations that were in flight at the fork never complete in the child; the
// parent keeps every one of its completions.
#pragma once

#include <uv.h>

#include <memory>
#include <unordered_set>
#include <utility>
#include <vector>

#include "epoll_bridge/uv_reactor.hpp"
#include "runtime/chain.hpp"

namespace ringpark::detail {

class LoopContext {
 public:
  // The loop's context, made on first use. Null only when even the fallback
  // cannot be built (out of fds); the caller then runs plain libuv. In a forked
  // child, the context has noticed the fork (notice_fork()) when this returns.
  static LoopContext* get(uv_loop_t* loop) noexcept;
  // The context if one exists, without making one.
  static LoopContext* find(uv_loop_t* loop) noexcept;
  // Runs `fn` on every context of the process, under the registry's lock (so
  // `fn` must not make or close contexts).
  static void for_each(void (*fn)(LoopContext*)) noexcept;

  int run(uv_run_mode mode) noexcept;
  int close_loop() noexcept;

  // Per-loop state of a part built on the context (rp_poll_t's recheck set,
  // the stream engine's live streams...), owned and destroyed with it. One
  // registry for every part, keyed by the part's type.
  struct Extension {
    virtual ~Extension() = default;
    // Takes the part's libuv handles out of the loop before uv_loop_close; the
    // destructor must not touch the loop.
    virtual void stop() noexcept = 0;
    // In a forked child, once the context has a fresh chain: every op the part
    // had in the old chain was forgotten (left idle, and it will never complete
    // in this process), and so was every deadline. The part forgets them too,
    // and starts again on the fresh chain what should go on (a started watcher
    // is armed again). Runs inside whichever entry point noticed the fork, so
    // it must not call user code.
    virtual void after_fork() noexcept {}
  };
  // Part T's state, or null while it has none.
  template <typename T>
  T* find_extension() const noexcept {
    for (const auto& [key, ext] : extensions_) {
      if (key == &kExtensionKey<T>) return static_cast<T*>(ext.get());
    }
    return nullptr;
  }
  // Gives part T its state (it has none yet); returns it, or null when out of
  // memory (then `ext` is destroyed).
  template <typename T>
  T* add_extension(std::unique_ptr<T> ext) noexcept {
    try {
      extensions_.emplace_back(&kExtensionKey<T>, std::move(ext));
      return static_cast<T*>(extensions_.back().second.get());
    } catch (const std::bad_alloc&) {
      return nullptr;
    }
  }

  // Handles of ours (rp_poll_t, rp_tcp_t) are live on the loop from init to
  // their close callback, so that rp_loop_close answers UV_EBUSY while any is
  // open, as uv_loop_close does for libuv's handles. handle_opened returns 0,
  // or UV_EBUSY when `handle` is live already (an init called again on a live
  // handle: refused, and nothing counted twice), or UV_ENOMEM. Loop thread.
  int handle_opened(const void* handle) noexcept;
  void handle_closed(const void* handle) noexcept { live_handles_.erase(handle); }

  // Every entry point that reaches the chain through a context it holds (a
  // handle's) calls this first. Cheap (one relaxed load and a compare) unless
  // this is a forked child whose context has not noticed the fork yet: then it
  // abandons the parent's chain and builds a fresh one (see the top of this
  // file). Aborts, with a message, if even the fallback cannot be built.
  void notice_fork() noexcept {
    if (fork_generation_ != fork_generation()) rebuild_after_fork();
  }

  Chain& chain() noexcept { return *chain_; }
  uv_loop_t* loop() const noexcept { return loop_; }
  std::uint64_t turns() const noexcept { return turns_; }

  // True while ringpark has work in flight: operations, deadlines armed,
  // tasks queued. The loop then sleeps in the ring.
  bool busy() noexcept;
  // Operations in flight that libuv's own counts already account for (an
  // adopted stream's reads and writes: its handle's ACTIVE flag, its
  // requests), which therefore must not keep the loop alive a second time: a
  // program that unrefs a reading stream expects uv_run to return. The
  // adopted streams' FdLifes count into it (FdLife::share_count).
  std::size_t* libuv_accounted() noexcept { return &libuv_accounted_; }
  // Everything that must happen before libuv may sleep on its own: submit what
  // is queued, carry the next deadline, keep the loop alive while busy, and,
  // when libuv's next poll could block, make sure completions and tasks already
  // waiting for us wake it.
  void before_libuv_sleeps(bool libuv_may_block = true) noexcept;
  // References the hidden wake handle while ringpark's own work (busy(),
  // less what libuv accounts for) is in flight, so that uv_run keeps going
  // (and returns non-zero) while ringpark operations are in flight. Call after
  // starting an operation from outside the loop's own callbacks.
  void update_ref() noexcept;

 private:
  explicit LoopContext(uv_loop_t* loop);
  ~LoopContext();

  // Builds chain_ and reactor_, and points wake_fd_ at the chain's wake object
  // (the ring's eventfd, or a dup of the fallback's epoll fd). Throws.
  void build_chain();
  void rebuild_after_fork() noexcept;
  // Frees chains abandoned after a fork. Only where no frame of theirs can be
  // on the stack: at the entry of our libuv callbacks and of run().
  void collect_abandoned() noexcept { abandoned_.clear(); }

  void start_handles() noexcept;
  void stop_handles() noexcept;
  void sleep_in_ring() noexcept;

  static void on_prepare(uv_prepare_t* handle);
  static void on_wake(uv_poll_t* handle, int status, int events);
  static void on_deadline(uv_timer_t* handle);

  uv_loop_t* loop_;
  unsigned fork_generation_;  // of the process that built chain_ (park/fork.hpp)
  ChainOptions options_;
  UvReactor* reactor_ = nullptr;  // owned by chain_
  std::unique_ptr<Chain> chain_;
  // Chains of the parent, abandoned after a fork (see collect_abandoned).
  std::vector<std::unique_ptr<Chain>> abandoned_;
  // The fd libuv's wake poll watches, owned by the context: the ring's eventfd,
  // or a dup of the fallback's epoll fd. Its number never changes (after a fork
  // a fresh object is put on it with dup3), since libuv's uv_poll_t names it.
  int wake_fd_ = -1;
  uv_prepare_t hook_;
  uv_poll_t wake_;
  uv_timer_t deadline_;
  bool running_ = false;  // inside rp_uv_run (not a plain uv_run)
  uv_run_mode mode_ = UV_RUN_DEFAULT;
  bool may_block_ = true;
  bool referenced_ = false;
  bool always_ring_ = false;  // RINGPARK_SLEEP=ring
  std::uint64_t turns_ = 0;
  std::size_t libuv_accounted_ = 0;
  std::unordered_set<const void*> live_handles_;  // see handle_opened
  template <typename T>
  static constexpr char kExtensionKey = 0;  // its address names part T
  std::vector<std::pair<const void*, std::unique_ptr<Extension>>> extensions_;
};

// The real uv_run. The preload library, which defines uv_run itself, sets it to
// the next definition in the lookup order, once (any thread may read it
// meanwhile: it is an atomic).
UvReactor::RunFn real_uv_run() noexcept;
void set_real_uv_run(UvReactor::RunFn run) noexcept;
// The real uv_loop_close, likewise (the preload interposes it too).
using LoopCloseFn = int (*)(uv_loop_t*);
LoopCloseFn real_uv_loop_close() noexcept;
void set_real_uv_loop_close(LoopCloseFn close) noexcept;

// Called with the reason each time a loop's chain comes up on the epoll
// fallback although nothing forced it there (RINGPARK_BACKEND=epoll), from the
// thread that runs the loop. The preload sets it, to say once on stderr why a
// program does not get io_uring. Null (the default) for none.
using FallbackNotice = void (*)(const char* reason) noexcept;
void set_fallback_notice(FallbackNotice notice) noexcept;

}  // namespace ringpark::detail
