// A provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19): a ring of
// fixed-size buffers that the kernel picks from when a request with
// IOSQE_BUFFER_SELECT (a multishot recv) has data, naming the buffer in the CQE.
//
// Who owns a buffer:
// - the kernel, from the moment add() + publish() put it in the ring until a
//   CQE names it (IORING_CQE_F_BUFFER);
// - the op's owner, from that CQE (taken()) until it gives it back (recycle());
// - the ring memory and every buffer live until the BufRing is destroyed, which
//   the driver does only after unregistering it from a ring that has nothing in
//   flight.
// Loop thread only, like the driver that owns it.
#pragma once

#include <liburing.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace ringpark::detail {

class BufRing {
 public:
  // Maps the ring (page-aligned, as the kernel requires) and `entries` buffers
  // of `buf_size` bytes, registers them with `ring` as buffer group `group`, and
  // hands every buffer to the kernel. `entries` is a power of two, at most
  // 32768. Returns 0 and sets *out, or a negative errno: -EINVAL or -ENOENT from
  // a kernel without provided buffer rings, -ENOMEM (mmap, or the locked-memory
  // limit), -EINVAL for bad sizes. Never throws; never blocks.
  static int create(io_uring* ring, unsigned entries, unsigned buf_size, std::uint16_t group,
                    std::unique_ptr<BufRing>* out) noexcept;
  // Unmaps the memory. The driver unregisters the ring first (unregister()),
  // once the kernel holds no request that could pick a buffer.
  ~BufRing();
  BufRing(const BufRing&) = delete;
  BufRing& operator=(const BufRing&) = delete;

  // Takes the ring out of the kernel (IORING_UNREGISTER_PBUF_RING). Returns 0
  // or a negative errno. Call before destroying it, while `ring` is still set
  // up.
  int unregister(io_uring* ring) noexcept;
  // In a forked child: forgets the registration, which belongs to the parent's
  // ring, without a syscall. The memory (this process's copy since the fork)
  // stays mapped until the destructor.
  void abandon() noexcept { registered_ = false; }

  // Records that a CQE named buffer `id`: the owner has it from now on. Aborts
  // on an id the kernel does not hold (a broken invariant).
  void taken(std::uint16_t id) noexcept;
  // The bytes of buffer `id` (buf_size() of them), for its owner to read.
  char* data(std::uint16_t id) const noexcept {
    return base_ + static_cast<std::size_t>(id) * buf_size_;
  }
  // Gives buffer `id` back. It reaches the kernel at the next publish(), so a
  // reap pass that recycles many buffers makes one store to the ring's tail.
  // Aborts on an id the owner does not hold.
  void recycle(std::uint16_t id) noexcept;
  // Makes the buffers recycled since the last call visible to the kernel (one
  // release store of the tail). Returns how many.
  unsigned publish() noexcept;

  unsigned entries() const noexcept { return entries_; }
  unsigned buf_size() const noexcept { return buf_size_; }
  // Buffers the owners hold (named by a CQE, not yet recycled).
  unsigned out() const noexcept { return out_; }
  // Buffers the ring holds, or will hold after the next publish(): entries()
  // minus out(). Some may be picked by the kernel already, their CQEs unreaped.
  unsigned available() const noexcept { return entries_ - out_; }

 private:
  BufRing() = default;

  io_uring_buf_ring* ring_ = nullptr;  // mapped, ring_bytes_ long
  std::size_t ring_bytes_ = 0;
  char* base_ = nullptr;  // the buffers, mapped, entries_ * buf_size_ long
  std::size_t base_bytes_ = 0;
  unsigned entries_ = 0;
  unsigned buf_size_ = 0;
  int mask_ = 0;
  std::uint16_t group_ = 0;
  bool registered_ = false;
  unsigned pending_ = 0;  // recycled, not yet published
  unsigned out_ = 0;
  std::vector<bool> held_;  // by id: true while the owner holds the buffer
};

}  // namespace ringpark::detail
