// A provided buffer ring (IORING_REGISTER_PBUF_RING, Linux 5.19): a ring of
// fixed-size buffers that the kernel picks from when a request with
// IOSQE_BUFFER_SELECT (a multishot recv or recvmsg) has data, naming the buffer
// in the CQE.
//
// Two ways for the kernel to use a buffer:
// - whole: every CQE takes one buffer, however few bytes it carries;
// - incremental (IOU_PBUF_RING_INC, Linux 6.12, asked for at create() and
//   dropped where the kernel refuses it): the kernel fills a buffer piece by
//   piece, each CQE carrying the next piece of the same buffer, and moves to the
//   next buffer only when this one is full. A 64-byte message then costs 64
//   bytes of the ring, not a whole buffer, so the ring runs dry after so many
//   bytes rather than after so many messages. Each piece starts where the
//   previous CQE that named the buffer ended (CQEs for one buffer are posted in
//   the order the kernel filled it); IORING_CQE_F_BUF_MORE says the kernel will
//   fill more of it.
//
// How many buffers the kernel holds: not all of them. The ring starts with a
// few (kInitialInRing) and doubles that target each time the kernel finds it
// empty (ran_dry()), up to all of them; recycled buffers go back before ones
// never used (last in, first out). So the memory the buffers really take (the
// pages the kernel wrote into) follows the most bytes in flight at once, not
// the configured size: a loop that never has more than a few KiB in flight
// touches a few buffers, however many sockets it has.
//
// Who owns a buffer:
// - the kernel, from the moment add() + publish() put it in the ring until a
//   CQE names it as done (whole: the first CQE; incremental: one without
//   IORING_CQE_F_BUF_MORE);
// - each piece is the op owner's from the CQE that names it (taken()) until it
//   gives it back (recycle()); a buffer goes back into the ring once the kernel
//   is done with it and every piece of it is back;
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

// Newer than liburing 2.3's header: the registration flag for incremental
// consumption (Linux 6.12) and the CQE flag that goes with it.
inline constexpr std::uint16_t kPbufRingInc = 2;        // IOU_PBUF_RING_INC
inline constexpr std::uint32_t kCqeFBufMore = 1u << 4;  // IORING_CQE_F_BUF_MORE

class BufRing {
 public:
  // Maps the ring (page-aligned, as the kernel requires) and `entries` buffers
  // of `buf_size` bytes, registers them with `ring` as buffer group `group`, and
  // hands every buffer to the kernel. `entries` is a power of two, at most
  // 32768. With `incremental`, asks for incremental consumption and registers
  // without it where the kernel refuses the flag (incremental() says which).
  // Returns 0 and sets *out, or a negative errno: -EINVAL or -ENOENT from a
  // kernel without provided buffer rings, -ENOMEM (mmap, or the locked-memory
  // limit), -EINVAL for bad sizes. Never throws; never blocks.
  static int create(io_uring* ring, unsigned entries, unsigned buf_size, std::uint16_t group,
                    bool incremental, std::unique_ptr<BufRing>* out) noexcept;
  // How many buffers the ring holds at first (or all, if fewer).
  static constexpr unsigned kInitialInRing = 32;
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

  // Records a CQE (result `res`, flags `cqe_flags`) that named buffer `id`: the
  // owner holds one more piece of it from now on. Returns where that piece's
  // bytes start (the buffer's start, unless incremental). Aborts on an id the
  // kernel does not hold (a broken invariant).
  char* taken(std::uint16_t id, int res, std::uint32_t cqe_flags) noexcept;
  // The start of buffer `id` (buf_size() bytes).
  char* data(std::uint16_t id) const noexcept {
    return base_ + static_cast<std::size_t>(id) * buf_size_;
  }
  // Where the piece named by the latest CQE for buffer `id` starts.
  char* piece(std::uint16_t id) const noexcept { return data(id) + slots_[id].last; }
  // Gives one piece of buffer `id` back. Once the kernel is done with the
  // buffer and no piece of it is out, it is free, and the next publish() may
  // hand it to the kernel again. Aborts on an id the owner holds no piece of.
  void recycle(std::uint16_t id) noexcept;
  // Tops the ring up with free buffers to the current target and makes them
  // visible to the kernel (one release store of the tail), so a batch of
  // completions that recycles many buffers makes one store. Returns how many
  // it added.
  unsigned publish() noexcept;
  // The kernel found the ring empty (a recv ended with -ENOBUFS): the next
  // publish() keeps twice as many buffers in it, up to all of them.
  void ran_dry() noexcept;

  unsigned entries() const noexcept { return entries_; }
  unsigned buf_size() const noexcept { return buf_size_; }
  bool incremental() const noexcept { return incremental_; }
  // Buffers the owners hold a piece of.
  unsigned out() const noexcept { return out_; }
  // Buffers the ring holds: the ones handed to the kernel that it is not done
  // with. Some may be picked by the kernel already, their CQEs unreaped.
  unsigned available() const noexcept { return in_ring_; }
  // How many buffers publish() keeps in the ring.
  unsigned target() const noexcept { return target_; }

 private:
  BufRing() = default;
  void add(std::uint16_t id) noexcept;

  struct Slot {
    std::uint32_t offset = 0;  // incremental: bytes the kernel filled so far
    std::uint32_t last = 0;    // where the latest piece starts
    std::uint16_t pieces = 0;  // pieces the owner holds
    bool in_kernel = false;    // in the ring: the kernel may still fill it
  };

  io_uring_buf_ring* ring_ = nullptr;  // mapped, ring_bytes_ long
  std::size_t ring_bytes_ = 0;
  char* base_ = nullptr;  // the buffers, mapped, entries_ * buf_size_ long
  std::size_t base_bytes_ = 0;
  unsigned entries_ = 0;
  unsigned buf_size_ = 0;
  int mask_ = 0;
  std::uint16_t group_ = 0;
  bool registered_ = false;
  bool incremental_ = false;
  unsigned pending_ = 0;  // added, not yet published
  unsigned out_ = 0;      // buffers with pieces > 0
  unsigned in_ring_ = 0;  // buffers with in_kernel
  unsigned target_ = 0;   // in_ring_ that publish() tops up to
  std::vector<Slot> slots_;
  std::vector<std::uint16_t> free_;  // neither in the ring nor held; the last one goes first
};

}  // namespace ringpark::detail
