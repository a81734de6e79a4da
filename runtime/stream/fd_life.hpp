// The fd-lifetime protocol, written once for every handle that runs ops on a
// descriptor (the stream engine behind rp_tcp_t and adopted uv_tcp_t,
// rp_poll_t's watchers):
//   1. every op that names the descriptor is counted from its submission to
//      its final completion (submit(), then ended() in that completion);
//   2. close() marks the life closing and asks the owner to cancel its ops in
//      flight: a request, never a release;
//   3. the final completion that brings the count to zero runs the owner's
//      `drained` hook, where it completes the callbacks it still owes;
//   4. then the descriptor is closed through the backend, when the owner owns
//      it (close(2) itself if the backend could not run the close op);
//   5. and when that close has completed, the `closed` hook runs: only now may
//      the number be reused (no completion of an old op can name it any more)
//      and the owner's memory be freed.
// A close with nothing in flight still finishes from the loop, through a nop,
// never inside close(): callbacks never run inside the call that asked.
//
// The FdLife's own op (the nop, then the close) lives inside it, so the FdLife
// must stay in place, like the owner's ops, until `closed` has run.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringpark/op.hpp"

namespace ringpark::detail {

class FdLife {
 public:
  struct Hooks {
    // Cancel every op of the owner that is in flight (IoBackend::cancel).
    void (*cancel_all)(FdLife* life) noexcept;
    // The last op has ended: run the callbacks still owed. May be null.
    void (*drained)(FdLife* life) noexcept;
    // The descriptor is closed (or was not the owner's): the owner may go.
    void (*closed)(FdLife* life) noexcept;
  };

  FdLife() = default;
  FdLife(const FdLife&) = delete;
  FdLife& operator=(const FdLife&) = delete;

  // `owner` is for the hooks (owner()). Call once, before anything else.
  void init(IoBackend* io, const Hooks* hooks, void* owner) noexcept {
    io_ = io;
    hooks_ = hooks;
    owner_ = owner;
  }
  // The descriptor the owner's ops name; `owned`: close() closes it.
  void set_fd(int fd, bool owned) noexcept {
    fd_ = fd;
    owned_ = owned;
  }
  int fd() const noexcept { return fd_; }
  void* owner() const noexcept { return owner_; }
  IoBackend& io() const noexcept { return *io_; }
  bool closing() const noexcept { return closing_; }
  // The owner's ops in flight, and its holds (hold()).
  std::uint32_t in_flight() const noexcept { return in_flight_ + holds_; }

  // Submits one of the owner's ops and counts it until ended().
  void submit(Op* op) noexcept {
    ++in_flight_;
    if (shared_) ++*shared_;
    io_->submit(op);
  }
  // Submits the owner's sendmsg ops with IoBackend::submit_in_order and
  // counts those it took, each until ended(). Returns how many it took.
  std::size_t submit_in_order(Op* const* ops, std::size_t n) noexcept {
    const std::size_t taken = io_->submit_in_order(ops, n);
    in_flight_ += static_cast<std::uint32_t>(taken);
    if (shared_) *shared_ += taken;
    return taken;
  }
  // Counts something of the owner's that is not an op but must end before
  // the close goes on (work it asked the loop to run later, which touches
  // the owner), until release(). Not counted in share_count()'s total.
  void hold() noexcept { ++holds_; }
  // The end of a hold(); then settle(), as after an op.
  void release() noexcept { --holds_; }
  // From the final completion of one of the owner's ops, before the owner
  // looks at anything else.
  void ended() noexcept {
    --in_flight_;
    if (shared_) --*shared_;
  }
  // Counts the ops in flight in *shared too (a count over many lives), from
  // now on and including those already in flight; null stops that.
  void share_count(std::size_t* shared) noexcept {
    if (shared_) *shared_ -= in_flight_;
    shared_ = shared;
    if (shared_) *shared_ += in_flight_;
  }
  // Last in every completion of the owner's: once a closing life has nothing
  // in flight, go on to step 3. Nothing may touch the owner after this returns.
  void settle() noexcept {
    if (closing_ && in_flight_ == 0 && holds_ == 0 && !drained_) drain();
  }
  // Step 2. Returns false (and does nothing) when already closing.
  bool close() noexcept;

  // A forked child: nothing in the old backend will ever complete here. The
  // count starts again at zero on `io`, the child's backend, and so do the
  // holds (the work they stood for was the parent's loop's).
  void forget_in_flight(IoBackend* io) noexcept;

 private:
  void drain() noexcept;
  static void on_op(Op* op, int res, std::uint32_t flags) noexcept;

  IoBackend* io_ = nullptr;
  const Hooks* hooks_ = nullptr;
  void* owner_ = nullptr;
  int fd_ = -1;
  bool owned_ = false;
  bool closing_ = false;
  bool drained_ = false;
  bool closed_ = false;  // `closed` has run (or is running): nothing is left to do
  std::uint32_t in_flight_ = 0;
  std::uint32_t holds_ = 0;
  std::size_t* shared_ = nullptr;  // see share_count()
  // The barrier nop of a close with nothing in flight, then the close op. The
  // kernel reads nothing of it but its fields at submission.
  Op op_;
};

}  // namespace ringpark::detail
