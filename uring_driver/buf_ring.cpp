#include "uring_driver/buf_ring.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace ringpark::detail {

namespace {

void* map(std::size_t bytes, int flags = 0) noexcept {
  // Anonymous mappings are page-aligned and zeroed; pages the kernel never
  // writes into cost no memory.
  void* p =
      ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

[[noreturn]] void bad_id(const char* what, unsigned id) noexcept {
  std::fprintf(stderr, "ringpark: provided buffer %u %s\n", id, what);
  std::abort();
}

}  // namespace

int BufRing::create(io_uring* ring, unsigned entries, unsigned buf_size, std::uint16_t group,
                    bool incremental, std::unique_ptr<BufRing>* out) noexcept {
  if (entries == 0 || entries > 32768 || (entries & (entries - 1)) != 0 || buf_size == 0)
    return -EINVAL;
  std::unique_ptr<BufRing> br(new (std::nothrow) BufRing);
  if (!br) return -ENOMEM;
  try {
    br->slots_.assign(entries, Slot{});
    br->free_.reserve(entries);
  } catch (...) {
    return -ENOMEM;
  }
  // Buffer 0 first: the free list hands out its last entry.
  for (unsigned id = entries; id-- > 0;) br->free_.push_back(static_cast<std::uint16_t>(id));
  br->target_ = entries < kInitialInRing ? entries : kInitialInRing;
  br->entries_ = entries;
  br->buf_size_ = buf_size;
  br->mask_ = io_uring_buf_ring_mask(entries);
  br->group_ = group;
  br->ring_bytes_ = entries * sizeof(io_uring_buf);
  br->base_bytes_ = static_cast<std::size_t>(entries) * buf_size;
  br->ring_ = static_cast<io_uring_buf_ring*>(map(br->ring_bytes_));
  // Nor are they counted against the commit limit before they are written:
  // most of the buffers of a big ring are never used.
  br->base_ = static_cast<char*>(map(br->base_bytes_, MAP_NORESERVE));
  if (br->ring_ == nullptr || br->base_ == nullptr) return -ENOMEM;  // the destructor unmaps

  io_uring_buf_ring_init(br->ring_);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<std::uintptr_t>(br->ring_);
  reg.ring_entries = entries;
  reg.bgid = group;
  // liburing 2.3 calls the kernel's `flags` field `pad`. A kernel before 6.12
  // refuses the flag with -EINVAL: then whole buffers it is.
  reg.pad = incremental ? kPbufRingInc : 0;
  // The kernel pins the ring's pages; they stay mapped until the destructor,
  // which runs after unregister().
  int r = io_uring_register_buf_ring(ring, &reg, 0);
  if (r == -EINVAL && incremental) {
    reg.pad = 0;
    r = io_uring_register_buf_ring(ring, &reg, 0);
  }
  if (r < 0) return r;
  br->registered_ = true;
  br->incremental_ = reg.pad != 0;

  // The first buffers to the kernel. Every buffer stays mapped until the
  // destructor.
  br->publish();
  *out = std::move(br);
  return 0;
}

BufRing::~BufRing() {
  if (ring_ != nullptr) ::munmap(ring_, ring_bytes_);
  if (base_ != nullptr) ::munmap(base_, base_bytes_);
}

int BufRing::unregister(io_uring* ring) noexcept {
  if (!registered_) return 0;
  registered_ = false;
  return io_uring_unregister_buf_ring(ring, group_);
}

void BufRing::add(std::uint16_t id) noexcept {
  // Written past the tail the kernel sees; publish() moves the tail over it.
  // The whole buffer again: the kernel moved an incremental entry's address
  // and length along as it filled it.
  io_uring_buf_ring_add(ring_, data(id), buf_size_, id, mask_, static_cast<int>(pending_));
  ++pending_;
  ++in_ring_;
  slots_[id] = Slot{};
  slots_[id].in_kernel = true;
}

char* BufRing::taken(std::uint16_t id, int res, std::uint32_t cqe_flags) noexcept {
  if (id >= entries_ || !slots_[id].in_kernel) bad_id("named by a CQE while not in the ring", id);
  Slot& s = slots_[id];
  s.last = s.offset;
  if (!incremental_) {
    s.in_kernel = false;
  } else {
    if (res > 0) s.offset += static_cast<std::uint32_t>(res);
    if (s.offset > buf_size_) bad_id("filled past its end", id);
    // A CQE with no bytes consumed nothing, whatever its flags say (kernels
    // before the fix of 3ecd3e03144b flag such a buffer done without moving
    // past it): the kernel goes on filling it.
    if (res > 0 && !(cqe_flags & kCqeFBufMore)) s.in_kernel = false;
  }
  if (!s.in_kernel) --in_ring_;
  if (s.pieces++ == 0) ++out_;
  return data(id) + s.last;
}

void BufRing::recycle(std::uint16_t id) noexcept {
  if (id >= entries_ || slots_[id].pieces == 0) bad_id("recycled but not held", id);
  Slot& s = slots_[id];
  if (--s.pieces > 0) return;
  --out_;
  if (s.in_kernel) return;  // the kernel goes on filling it
  free_.push_back(id);      // never beyond entries_: reserved at create()
}

void BufRing::ran_dry() noexcept { target_ = target_ * 2 < entries_ ? target_ * 2 : entries_; }

unsigned BufRing::publish() noexcept {
  while (in_ring_ < target_ && !free_.empty()) {
    add(free_.back());
    free_.pop_back();
  }
  const unsigned n = pending_;
  if (n == 0) return 0;
  // A release store: the entries written by add() are visible to the kernel
  // before the tail that covers them (pairs with the kernel's smp_load_acquire
  // of the tail when it picks a buffer).
  io_uring_buf_ring_advance(ring_, static_cast<int>(n));
  pending_ = 0;
  return n;
}

}  // namespace ringpark::detail
