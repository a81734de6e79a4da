// rp_poll_t: uv_poll_t's readiness watchers through the loop's ring.
//
// How a watcher gets uv_poll_t's level-triggered semantics out of the ring:
// - While started, a watcher holds one multishot POLL_ADD
//   (OpCode::poll_multishot). Starting N watchers in one iteration queues N
//   SQEs, which the loop's next submission hands over in one io_uring_enter.
//   The driver re-arms a multishot the kernel ends by itself, so the watcher
//   sees no gap.
// - A multishot poll is edge-triggered: the kernel reports a wakeup of the fd's
//   wait queue, not the state "still readable". uv_poll_t promises the callback
//   again on the next iteration while the fd stays ready (a callback that did
//   not drain the fd). So a watcher the ring reported goes on the loop's
//   *recheck list*; at the next iteration a hidden idle handle polls every
//   watcher on the list with ONE poll(2) call (timeout 0): those still ready are
//   reported again and stay listed, the others leave the list, and from then on
//   the still-armed multishot reports their next edge. No edge is lost: the
//   multishot is armed throughout, so readiness that comes after the poll(2)
//   wakes the fd's wait queue and posts a CQE.
// - While a watcher is listed, its CQEs are not reported (the recheck will see
//   the same readiness): that coalesces several wakeups into one callback per
//   iteration, as libuv's epoll_wait does.
// - The idle handle also keeps libuv from sleeping while watchers are listed
//   (uv_backend_timeout is 0 with an idle handle active), which is what ends
//   rp_uv_run's sleep in the ring so the recheck can run.
// The alternative, a one-shot POLL_ADD re-armed after every callback, is
// level-triggered by itself but costs an SQE (and the kernel a wait-queue
// add/remove) for every event, and under rp_uv_run it reports an undrained fd
// over and over inside one libuv iteration. Here an event costs a CQE, plus a
// share of one poll(2) per iteration for the watchers reported last time.
// On the epoll fallback a multishot poll is level-triggered already (reported
// once per turn while ready); the same list then only coalesces the reports.
//
// Memory the kernel may touch: a watcher's two Ops. They live in the watcher's
// private state (rp_poll_t::impl_), which is freed only after both are idle
// (their final completions ran), right before the close callback.
//
// After fork(2), in the child (PollSet::after_fork): the watchers' polls were
// in the parent's ring and never complete here. Every started watcher gets a
// new poll in the child's fresh ring; one being closed gets its close callback.
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "ringpark.h"
#include "runtime/stream/fd_life.hpp"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail {
namespace {

constexpr int kAllEvents = UV_READABLE | UV_WRITABLE | UV_DISCONNECT | UV_PRIORITIZED;

struct PollSet;

// A watcher's private state. Owned by the rp_poll_t from rp_poll_init until the
// close callback; the kernel may write into `ops` until their final CQEs.
struct Watcher {
  rp_poll_t* handle = nullptr;
  PollSet* set = nullptr;
  int fd = -1;
  // Two ops, so that a stop followed at once by a start (or a change of mask)
  // arms a new poll while the old one's cancellation is still under way. A
  // third start while both are in flight waits for one (want_arm).
  Op ops[2];
  Op* armed = nullptr;  // the op carrying the current start; null when stopped
  // The ops' count and the close (fd_life.hpp): the fd is the user's, so the
  // close only waits for both ops' final completions.
  FdLife life;
  rp_poll_cb cb = nullptr;
  rp_poll_close_cb close_cb = nullptr;
  unsigned mask = 0;  // poll(2) bits for the events asked for
  bool active = false;
  bool want_arm = false;
  bool closing = false;
  // Every watcher of the loop, from init to its release (PollSet::all_head).
  Watcher* all_prev = nullptr;
  Watcher* all_next = nullptr;
  // The loop's recheck list (see the top of this file).
  bool listed = false;
  Watcher* prev = nullptr;
  Watcher* next = nullptr;
};

// Ringpark's poll state for one loop: the recheck list, the watchers whose
// close callbacks are due, and the hidden idle handle that runs both. Made with
// the loop's first watcher, kept with the loop's context.
struct PollSet final : LoopContext::Extension {
  void stop() noexcept override { uv_idle_stop(&idle); }
  void after_fork() noexcept override;

  void link(Watcher* w) noexcept {
    w->all_prev = nullptr;
    w->all_next = all_head;
    if (all_head) all_head->all_prev = w;
    all_head = w;
  }
  void unlink(Watcher* w) noexcept {
    if (w->all_prev) {
      w->all_prev->all_next = w->all_next;
    } else {
      all_head = w->all_next;
    }
    if (w->all_next) w->all_next->all_prev = w->all_prev;
  }

  uv_loop_t* loop = nullptr;
  LoopContext* ctx = nullptr;
  uv_idle_t idle;
  bool idle_active = false;
  Watcher* listed_head = nullptr;
  std::vector<Watcher*> closed;  // every op idle, close callback due
  std::size_t watchers = 0;      // initialised and not yet released
  Watcher* all_head = nullptr;   // those watchers
  // Scratch for the recheck, kept for its capacity.
  std::vector<pollfd> fds;
  std::vector<Watcher*> batch;
};

void on_idle(uv_idle_t* idle);

PollSet* poll_set(uv_loop_t* loop, LoopContext* ctx) noexcept {
  if (auto* set = ctx->find_extension<PollSet>()) return set;
  std::unique_ptr<PollSet> made(new (std::nothrow) PollSet);
  PollSet* set = made ? ctx->add_extension(std::move(made)) : nullptr;
  if (set == nullptr) return nullptr;
  set->loop = loop;
  set->ctx = ctx;
  uv_idle_init(loop, &set->idle);
  set->idle.data = set;
  // Hidden from uv_walk: a program that closes every handle it walks must not
  // close ours.
  uv_private::mark_internal(reinterpret_cast<uv_handle_t*>(&set->idle));
  return set;
}

// Runs the idle handle exactly while it has work: watchers to recheck or close
// callbacks to run. It stays referenced, so a due close callback keeps the loop
// alive (listed watchers are started, and keep it alive anyway).
void update_idle(PollSet* set) noexcept {
  const bool want = set->listed_head != nullptr || !set->closed.empty();
  if (want == set->idle_active) return;
  set->idle_active = want;
  if (want) {
    uv_idle_start(&set->idle, &on_idle);
  } else {
    uv_idle_stop(&set->idle);
  }
}

void list(Watcher* w) noexcept {
  if (w->listed) return;
  PollSet* set = w->set;
  w->listed = true;
  w->prev = nullptr;
  w->next = set->listed_head;
  if (set->listed_head) set->listed_head->prev = w;
  set->listed_head = w;
  update_idle(set);
}

void unlist(Watcher* w) noexcept {
  if (!w->listed) return;
  PollSet* set = w->set;
  if (w->prev) {
    w->prev->next = w->next;
  } else {
    set->listed_head = w->next;
  }
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = nullptr;
  w->listed = false;
  // The idle handle is stopped by the pass itself once nothing is left, not
  // here: stopping and restarting it on every stop/start would cost nothing
  // but churn in libuv's idle queue.
}

unsigned to_mask(int events) noexcept {
  unsigned mask = 0;
  if (events & UV_READABLE) mask |= POLLIN;
  if (events & UV_PRIORITIZED) mask |= POLLPRI;
  if (events & UV_WRITABLE) mask |= POLLOUT;
  if (events & UV_DISCONNECT) mask |= POLLRDHUP;
  return mask;
}

void on_complete(Op* op, int res, std::uint32_t flags) noexcept;

// Arms a multishot poll for the watcher's mask on an idle op, or, when both ops
// are still in flight (being cancelled), once one of them is idle.
void arm(Watcher* w) noexcept {
  Op* op = nullptr;
  for (Op& candidate : w->ops) {
    if (candidate.state == Op::State::idle) {
      op = &candidate;
      break;
    }
  }
  if (op == nullptr) {
    w->want_arm = true;
    return;
  }
  w->want_arm = false;
  op->code = OpCode::poll_multishot;
  op->fd = w->fd;
  op->flags = static_cast<int>(w->mask);
  op->complete = &on_complete;
  op->data = w;
  // The op lives in the watcher, which is freed only after its FdLife's
  // `closed`, when both ops are idle.
  w->life.submit(op);
  w->armed = op;
}

void stop(Watcher* w) noexcept {
  w->active = false;
  w->want_arm = false;
  unlist(w);
  if (w->armed != nullptr) {
    // A request: the op stays ours until its final CQE; later CQEs of it are
    // not reported (it is no longer `armed`).
    w->life.io().cancel(w->armed);
    w->armed = nullptr;
  }
}

// FdLife's hooks. The close callback runs from the idle pass, like libuv's
// from its closing phase, never from inside a completion.
void cancel_all(FdLife* life) noexcept {
  auto* w = static_cast<Watcher*>(life->owner());
  stop(w);
  for (Op& op : w->ops) {
    if (op.state == Op::State::in_flight) life->io().cancel(&op);
  }
}

void queue_close(FdLife* life) noexcept {
  auto* w = static_cast<Watcher*>(life->owner());
  PollSet* set = w->set;
  try {
    set->closed.push_back(w);
  } catch (...) {
    std::fprintf(stderr, "ringpark: out of memory queueing a close callback\n");
    std::abort();
  }
  update_idle(set);
}

constexpr FdLife::Hooks kLifeHooks = {&cancel_all, nullptr, &queue_close};

// Reports poll(2)/CQE readiness `revents` to the user, exactly as libuv's
// uv__io_poll and uv__poll_io filter and map epoll's events.
void report(Watcher* w, unsigned revents) noexcept {
  unsigned ev = revents & (w->mask | POLLERR | POLLHUP | POLLNVAL);
  // libuv: epoll sometimes reports only ERR or HUP; the read or write the user
  // then makes finds out what happened.
  if (ev == POLLERR || ev == POLLHUP) ev |= w->mask & (POLLIN | POLLOUT | POLLRDHUP | POLLPRI);
  if (ev == 0) return;
  rp_poll_cb cb = w->cb;
  // POLLERR with POLLPRI is sysfs's way of signalling, not an error (libuv).
  // POLLNVAL: the fd was closed under an active watcher.
  if ((ev & POLLNVAL) || ((ev & POLLERR) && !(ev & POLLPRI))) {
    stop(w);
    w->set->ctx->update_ref();
    cb(w->handle, UV_EBADF, 0);
    return;
  }
  int events = 0;
  if (ev & POLLIN) events |= UV_READABLE;
  if (ev & POLLPRI) events |= UV_PRIORITIZED;
  if (ev & POLLOUT) events |= UV_WRITABLE;
  if (ev & POLLRDHUP) events |= UV_DISCONNECT;
  // Listed before the callback, so that a stop or close inside it unlists it.
  list(w);
  cb(w->handle, 0, events);
}

void on_complete(Op* op, int res, std::uint32_t flags) noexcept {
  auto* w = static_cast<Watcher*>(op->data);
  const bool final = (flags & kMore) == 0;
  if (final) w->life.ended();
  // CQEs of an op that was stopped, or replaced by a start with another mask,
  // are not reported: uv_poll_stop is "effective immediately".
  if (op == w->armed) {
    if (final) w->armed = nullptr;
    if (res < 0) {
      if (final) {
        // The poll failed (or the loop's ring is shutting down): stopped, with
        // the error reported, as libuv does for an error on the fd.
        rp_poll_cb cb = w->cb;
        stop(w);
        cb(w->handle, res, 0);
      }
    } else {
      // The backend let a multishot end without an error: keep watching.
      if (final && w->active) arm(w);
      // A listed watcher is rechecked at the next iteration; reporting this
      // wakeup too would only call it twice for one readiness.
      if (w->active && !w->listed) report(w, static_cast<unsigned>(res));
    }
  }
  if (!final) return;
  // `op` is idle: it may carry a start that had to wait, or end a close.
  if (w->want_arm && w->active && w->armed == nullptr) arm(w);
  w->life.settle();
}

void recheck(PollSet* set) noexcept {
  set->fds.clear();
  set->batch.clear();
  try {
    for (Watcher* w = set->listed_head; w != nullptr; w = w->next) {
      set->batch.push_back(w);
      set->fds.push_back({w->fd, static_cast<short>(w->mask), 0});
    }
  } catch (...) {
    return;  // out of memory: the list stays as is, try again next iteration
  }
  if (set->batch.empty()) return;
  int n;
  do {
    n = ::poll(set->fds.data(), set->fds.size(), 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return;  // ENOMEM: as above
  // Callbacks may stop, start or close any watcher, but free none (only the
  // idle pass's first step does), so every pointer in `batch` stays valid;
  // `listed` says whether it is still to be looked at.
  for (std::size_t i = 0; i < set->batch.size(); ++i) {
    Watcher* w = set->batch[i];
    if (!w->listed) continue;
    const auto revents = static_cast<unsigned short>(set->fds[i].revents);
    if (revents == 0) {
      unlist(w);  // not ready any more: the multishot reports the next edge
    } else {
      report(w, revents);
    }
  }
}

void on_idle(uv_idle_t* idle) {
  auto* set = static_cast<PollSet*>(idle->data);
  set->ctx->notice_fork();
  // 1. Close callbacks. Those queued meanwhile (a close callback closing
  // another watcher) run at the next pass.
  if (!set->closed.empty()) {
    std::vector<Watcher*> due;
    due.swap(set->closed);
    for (Watcher* w : due) {
      rp_poll_t* handle = w->handle;
      rp_poll_close_cb cb = w->close_cb;
      handle->impl_ = nullptr;
      set->unlink(w);
      delete w;
      --set->watchers;
      set->ctx->handle_closed(handle);
      if (cb) cb(handle);  // the handle's memory is the user's again
    }
  }
  // 2. Level-triggered recheck of the watchers reported last time.
  recheck(set);
  update_idle(set);
  // Ops started or cancelled by the callbacks are flushed by the loop's
  // prepare hook, which runs after this phase; this only keeps the loop's
  // liveness right for an op that ended here.
  set->ctx->update_ref();
}

void PollSet::after_fork() noexcept {
  // The context has abandoned the parent's ring, which forgot both ops of
  // every watcher (they are idle, and nothing of theirs completes here).
  for (Watcher* w = all_head; w != nullptr; w = w->all_next) {
    w->armed = nullptr;
    w->want_arm = false;
    // A close that waited for those ops' final completions finishes in the
    // new chain.
    w->life.forget_in_flight(&ctx->chain().io());
    if (!w->closing && w->active) {
      // Readiness that came meanwhile is reported: a new poll reports an fd
      // that is ready when it is armed. A listed watcher stays listed, and the
      // next recheck looks at it.
      arm(w);
    }
  }
  ctx->update_ref();
}

// The watcher of a handle, after the loop's context noticed a fork (if any),
// so that what the caller does next goes to the fresh ring.
Watcher* watcher_of(const rp_poll_t* handle) noexcept {
  if (handle == nullptr) return nullptr;
  auto* w = static_cast<Watcher*>(handle->impl_);
  if (w != nullptr) w->set->ctx->notice_fork();
  return w;
}

}  // namespace
}  // namespace ringpark::detail

using namespace ringpark::detail;

extern "C" {

int rp_poll_init(uv_loop_t* loop, rp_poll_t* handle, int fd) {
  if (loop == nullptr || handle == nullptr) return UV_EINVAL;
  if (fd < 0) return UV_EBADF;
  // An fd that is not open is refused before the loop's context may be made
  // (which opens fds of its own, and could reuse that number).
  if (::fcntl(fd, F_GETFD) < 0) return -errno;
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return UV_ENOMEM;
  PollSet* set = poll_set(loop, ctx);
  if (set == nullptr) return UV_ENOMEM;
  // Refused, before anything changes, while the handle is open on this loop:
  // initialising it again would lose the watcher it has (and its ops, which
  // the kernel may still hold), and count it twice.
  if (int r = ctx->handle_opened(handle); r != 0) return r;
  // Non-blocking, as uv_poll_init makes it; this also checks that fd is open.
  int one = 1;
  if (::ioctl(fd, FIONBIO, &one) != 0) {
    int err = errno;
    if (err == ENOTTY) {
      int fl = ::fcntl(fd, F_GETFL);
      err = fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0 ? 0 : errno;
    }
    if (err != 0) {
      ctx->handle_closed(handle);
      return -err;
    }
  }
  auto* w = new (std::nothrow) Watcher;
  if (w == nullptr) {
    ctx->handle_closed(handle);
    return UV_ENOMEM;  // a new set stays, empty, until the next watcher
  }
  w->handle = handle;
  w->set = set;
  w->fd = fd;
  w->life.init(&ctx->chain().io(), &kLifeHooks, w);
  w->life.set_fd(fd, /*owned=*/false);
  ++set->watchers;
  set->link(w);
  handle->loop = loop;
  handle->fd = fd;
  handle->impl_ = w;
  return 0;
}

int rp_poll_start(rp_poll_t* handle, int events, rp_poll_cb cb) {
  Watcher* w = watcher_of(handle);
  if (w == nullptr || w->closing || (events & ~kAllEvents) != 0) return UV_EINVAL;
  if (events == 0) return rp_poll_stop(handle);
  if (cb == nullptr) return UV_EINVAL;
  const unsigned mask = to_mask(events);
  w->cb = cb;
  if (w->active && mask == w->mask) return 0;  // only the callback changes
  // A new mask needs a new poll: cancel the old one (its late CQEs are not
  // reported) and arm another at once.
  stop(w);
  w->mask = mask;
  w->active = true;
  arm(w);
  w->set->ctx->update_ref();
  return 0;
}

int rp_poll_stop(rp_poll_t* handle) {
  Watcher* w = watcher_of(handle);
  if (w == nullptr) return UV_EINVAL;
  stop(w);
  w->set->ctx->update_ref();
  return 0;
}

int rp_poll_close(rp_poll_t* handle, rp_poll_close_cb cb) {
  Watcher* w = watcher_of(handle);
  if (w == nullptr || w->closing) return UV_EINVAL;
  w->closing = true;
  w->close_cb = cb;
  w->life.close();
  w->set->ctx->update_ref();
  return 0;
}

int rp_poll_is_active(const rp_poll_t* handle) {
  const Watcher* w = watcher_of(handle);
  return w != nullptr && w->active ? 1 : 0;
}

}  // extern "C"
