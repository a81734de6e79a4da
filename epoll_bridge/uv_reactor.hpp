// UvReactor: a libuv loop as the innermost layer of the chain. Its fd is
// uv_backend_fd (libuv's epoll set), its timeout uv_backend_timeout.
//
// Two ways of turning it:
// - run_nowait: turn() is uv_run(loop, UV_RUN_NOWAIT). Used when ringpark drives
//   (a C++ Runtime attached to a loop).
// - mark_ready: turn() only records that libuv has work; the caller then returns
//   control to the uv_run that is already on the stack (rp_uv_run's hook, which
//   sleeps in the ring from inside libuv's prepare phase), and libuv's own poll,
//   which now finds its fd ready or a timer due, is the real turn.
#pragma once

#include <uv.h>

#include <memory>

#include "park/park.hpp"

namespace ringpark::detail {

class UvReactor final : public Reactor {
 public:
  enum class TurnMode { run_nowait, mark_ready };
  using RunFn = int (*)(uv_loop_t*, uv_run_mode);

  // `run` is the real uv_run (the preload library interposes the symbol, so it
  // passes the next one in the lookup order). The loop must outlive the reactor.
  // Throws std::system_error if the wake eventfd cannot be made.
  UvReactor(uv_loop_t* loop, TurnMode mode, RunFn run)
      : loop_(loop), mode_(mode), run_(run), wake_(std::make_shared<WakeFd>()) {}

  // Standing alone: poll(2) on libuv's backend fd and our wake fd, bounded by
  // uv_backend_timeout, then turn. Under a driver only turn() is used.
  void park(Timeout timeout) noexcept override;
  void turn() noexcept override;
  Unparker unparker() const override { return Unparker(wake_); }
  void shutdown() noexcept override {}
  // libuv's loop is the program's: in a forked child the program calls
  // uv_loop_fork for it, as libuv requires. Our wake fd closes with the reactor.
  void abandon() noexcept override { ready_ = false; }
  int fd() const noexcept override { return uv_backend_fd(loop_); }
  Timeout timeout() const noexcept override;

  bool ready() const noexcept { return ready_; }
  void clear_ready() noexcept { ready_ = false; }
  uv_loop_t* loop() const noexcept { return loop_; }

 private:
  uv_loop_t* loop_;
  TurnMode mode_;
  RunFn run_;
  std::shared_ptr<const WakeFd> wake_;
  bool ready_ = false;
};

}  // namespace ringpark::detail
