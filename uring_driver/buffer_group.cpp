#include "uring_driver/buffer_group.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace ringpark::detail {

bool BufferGroup::ensure(io_uring* ring, bool op_in_probe) noexcept {
  if (state_ != State::untried) return state_ != State::off;
  // Decided by trying, once: a kernel without provided buffer rings (before
  // 5.19) refuses the registration with -EINVAL; the locked-memory limit gives
  // -ENOMEM. The kernel pins the ring itself (16 bytes a buffer), not the
  // buffers, so on -ENOMEM a smaller ring is tried, down to one page of it
  // (256 buffers with 4 KiB pages): a smaller one pins the same page. If even
  // that fails, the multishot op is off and its owners use the plain one; the
  // loop itself is not affected.
  int r = -EOPNOTSUPP;
  if (entries_ > 0 && op_in_probe) {
    const auto page = static_cast<unsigned>(::sysconf(_SC_PAGESIZE));
    const unsigned smallest = page / sizeof(io_uring_buf);
    for (unsigned n = entries_;; n /= 2) {
      r = BufRing::create(ring, n, buf_size_, group_, incremental_, &ring_);
      if (r != -ENOMEM || n <= smallest) break;
    }
  }
  if (r < 0) {
    state_ = State::off;
    error_ = r;
    return false;
  }
  state_ = State::unconfirmed;
  return true;
}

BufferGroup::Verdict BufferGroup::classify(Op* op, int* res, bool more, bool live) noexcept {
  // A re-armed op's first completion: it took its buffer (or found none).
  if (!rearmed_.empty()) rearmed_.erase(op);
  if (*res == -ENOBUFS) {
    // The buffer ring ran dry; the socket keeps its bytes. Nothing to report
    // while the op stays armed. (Only a kernel with the multishot op gets this
    // far.)
    if (state_ == State::unconfirmed) state_ = State::works;
    if (more) return Verdict::drop;
    if (!live) {
      *res = -ECANCELED;  // it was being cancelled: that is how it ends
      return Verdict::deliver;
    }
    ring_->ran_dry();
    try {
      starved_.push_back(op);  // still in flight for its owner
    } catch (...) {
      std::fprintf(stderr, "ringpark: out of memory holding a starved receive\n");
      std::abort();
    }
    return Verdict::starved;
  }
  if (state_ == State::unconfirmed) {
    if (*res == -EINVAL && !more) {
      // The first multishot op on this ring was refused: a kernel before 6.0
      // takes the flag for an invalid argument. Off for good; the owner falls
      // back to the plain op.
      state_ = State::off;
      error_ = -EINVAL;
      *res = -EOPNOTSUPP;
    } else if (more || *res > 0) {
      state_ = State::works;
    }
  }
  return Verdict::deliver;
}

bool BufferGroup::forget_starved(Op* op) noexcept {
  auto it = std::find(starved_.begin(), starved_.end(), op);
  if (it == starved_.end()) return false;
  starved_.erase(it);
  return true;
}

}  // namespace ringpark::detail
