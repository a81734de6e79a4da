// One provided buffer group of the driver and the multishot receives that
// take their buffers from it. The driver has two: stream bytes
// (OpCode::recv_multishot, group 0, buffers filled incrementally where the
// kernel can) and datagrams (OpCode::recvmsg_multishot, group 1, one whole
// buffer per datagram, each big enough for the largest one).
//
// What a group decides for the driver:
// - whether its multishot op runs here, by trying: the buffer ring is
//   registered the first time someone asks (a kernel before 5.19 refuses it),
//   and a kernel before 6.0 refuses the first multishot op with -EINVAL, after
//   which the op is off for good and its owners get -EOPNOTSUPP;
// - what a CQE of one of its ops means for the owner: -ENOBUFS (the ring ran
//   dry) is never shown; the op waits on the starved list, still in flight for
//   its owner, until buffers come back;
// - which starved ops to re-arm when buffers come back: oldest first, and no
//   more than the ring has buffers not already promised to re-armed ops whose
//   first completion has not come yet (more would only starve again, an SQE
//   and a CQE each for nothing).
// Loop thread only, like the driver that owns it.
#pragma once

#include <liburing.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_set>

#include "ringpark/op.hpp"
#include "uring_driver/buf_ring.hpp"

namespace ringpark::detail {

class BufferGroup {
 public:
  // `entries` buffers at most (0: the op is off), of `buf_size` bytes each.
  BufferGroup(std::uint16_t group, unsigned entries, unsigned buf_size, bool incremental) noexcept
      : group_(group), entries_(entries), buf_size_(buf_size), incremental_(incremental) {}

  // Whether the group's multishot op runs on `ring`: registers the buffer ring
  // on the first call (when `op_in_probe`, the kernel has the plain opcode),
  // then remembers. Where the locked-memory limit refuses the ring, a smaller
  // one is tried. Never blocks.
  bool ensure(io_uring* ring, bool op_in_probe) noexcept;
  // Why the op is off (a negative errno: the buffer ring's registration error,
  // -EINVAL for a kernel that refused the op, -EOPNOTSUPP when turned off), or 0.
  int error() const noexcept { return error_; }
  // The buffer ring, once registered (null before, or when it failed).
  BufRing* ring() const noexcept { return ring_.get(); }

  // What a CQE of one of this group's ops is for its owner.
  enum class Verdict : std::uint8_t {
    deliver,  // hand it over (*res may have been changed)
    drop,     // nothing for the owner: the op goes on
    starved,  // the ring ran dry: the op waits for buffers, still in flight
  };
  // `live`: the op is in flight, not being cancelled, and the driver not
  // shutting down. A -ENOBUFS that ends a live op puts it on the starved list;
  // one that ends a cancelled op ends it with -ECANCELED. The first refusal
  // (-EINVAL, final) turns the op off and becomes -EOPNOTSUPP.
  Verdict classify(Op* op, int* res, bool more, bool live) noexcept;

  // Tops the buffer ring up (recycled buffers back to the kernel, one store)
  // and hands starved ops to `rearm`, oldest first, while there are buffers
  // for them and `may_rearm`. Returns how many it re-armed. `rearm` may move
  // CQEs aside but must run no completion.
  template <class Rearm>
  std::size_t return_buffers(bool may_rearm, Rearm&& rearm) noexcept;

  // Takes `op` off the starved list (a cancel: it is not in the kernel, so it
  // ends from the driver). Returns whether it was there.
  bool forget_starved(Op* op) noexcept;

  // Unregisters the buffer ring (the kernel holds no op of the group any more).
  void unregister(io_uring* ring) noexcept {
    if (ring_) ring_->unregister(ring);
  }
  // A forked child lets go of the parent's ring: every op is forgotten, and
  // the registration, the parent's, is left alone.
  void abandon() noexcept {
    starved_.clear();
    rearmed_.clear();
    if (ring_) ring_->abandon();
  }

 private:
  // Where the group's multishot op stands: no buffer ring tried yet; a ring
  // but no op that worked yet (an -EINVAL then means the kernel lacks it);
  // known to work; off for good.
  enum class State : std::uint8_t { untried, unconfirmed, works, off };

  std::uint16_t group_;
  unsigned entries_;
  unsigned buf_size_;
  bool incremental_;
  State state_ = State::untried;
  int error_ = 0;
  std::unique_ptr<BufRing> ring_;
  std::deque<Op*> starved_;          // ended by -ENOBUFS, waiting for buffers
  std::unordered_set<Op*> rearmed_;  // re-armed, first completion not yet in
};

template <class Rearm>
std::size_t BufferGroup::return_buffers(bool may_rearm, Rearm&& rearm) noexcept {
  if (!ring_) return 0;
  ring_->publish();
  if (starved_.empty() || !may_rearm) return 0;
  // Each re-armed op takes a buffer as soon as the kernel sees it (its socket
  // kept the bytes). With 3,000 sockets and 512 whole buffers, re-arming every
  // starved recv whenever one buffer came back cost up to 9.3 SQEs per message;
  // bounded so, each starved recv is re-armed once.
  const std::size_t promised = rearmed_.size();
  const std::size_t room = ring_->available() > promised ? ring_->available() - promised : 0;
  std::size_t n = starved_.size() < room ? starved_.size() : room;
  for (std::size_t i = 0; i < n; ++i) {
    Op* op = starved_.front();
    starved_.pop_front();
    rearm(op);
    try {
      rearmed_.insert(op);
    } catch (...) {
      // Only the bound gets looser: the op is armed either way.
    }
  }
  return n;
}

}  // namespace ringpark::detail
