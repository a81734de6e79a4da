#include "uring_driver/buf_ring.hpp"

#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>

namespace ringpark::detail {

namespace {

void* map(std::size_t bytes) noexcept {
  // Anonymous mappings are page-aligned and zeroed; pages the kernel never
  // writes into cost no memory.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

[[noreturn]] void bad_id(const char* what, unsigned id) noexcept {
  std::fprintf(stderr, "ringpark: provided buffer %u %s\n", id, what);
  std::abort();
}

}  // namespace

int BufRing::create(io_uring* ring, unsigned entries, unsigned buf_size, std::uint16_t group,
                    std::unique_ptr<BufRing>* out) noexcept {
  if (entries == 0 || entries > 32768 || (entries & (entries - 1)) != 0 || buf_size == 0)
    return -EINVAL;
  std::unique_ptr<BufRing> br(new (std::nothrow) BufRing);
  if (!br) return -ENOMEM;
  try {
    br->held_.assign(entries, false);
  } catch (...) {
    return -ENOMEM;
  }
  br->entries_ = entries;
  br->buf_size_ = buf_size;
  br->mask_ = io_uring_buf_ring_mask(entries);
  br->group_ = group;
  br->ring_bytes_ = entries * sizeof(io_uring_buf);
  br->base_bytes_ = static_cast<std::size_t>(entries) * buf_size;
  br->ring_ = static_cast<io_uring_buf_ring*>(map(br->ring_bytes_));
  br->base_ = static_cast<char*>(map(br->base_bytes_));
  if (br->ring_ == nullptr || br->base_ == nullptr) return -ENOMEM;  // the destructor unmaps

  io_uring_buf_ring_init(br->ring_);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<std::uintptr_t>(br->ring_);
  reg.ring_entries = entries;
  reg.bgid = group;
  // The kernel pins the ring's pages; they stay mapped until the destructor,
  // which runs after unregister().
  if (int r = io_uring_register_buf_ring(ring, &reg, 0); r < 0) return r;
  br->registered_ = true;

  // Every buffer to the kernel. The buffers stay mapped until the destructor.
  for (unsigned id = 0; id < entries; ++id) {
    io_uring_buf_ring_add(br->ring_, br->data(static_cast<std::uint16_t>(id)), buf_size,
                          static_cast<unsigned short>(id), br->mask_, static_cast<int>(id));
  }
  io_uring_buf_ring_advance(br->ring_, static_cast<int>(entries));
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

void BufRing::taken(std::uint16_t id) noexcept {
  if (id >= entries_ || held_[id]) bad_id("named by a CQE while not in the ring", id);
  held_[id] = true;
  ++out_;
}

void BufRing::recycle(std::uint16_t id) noexcept {
  if (id >= entries_ || !held_[id]) bad_id("recycled but not held", id);
  held_[id] = false;
  --out_;
  // Written past the tail the kernel sees; publish() moves the tail over it.
  io_uring_buf_ring_add(ring_, data(id), buf_size_, id, mask_, static_cast<int>(pending_));
  ++pending_;
}

unsigned BufRing::publish() noexcept {
  const unsigned n = pending_;
  if (n == 0) return 0;
  // A release store: the entries written by recycle() are visible to the
  // kernel before the tail that covers them (pairs with the kernel's
  // smp_load_acquire of the tail when it picks a buffer).
  io_uring_buf_ring_advance(ring_, static_cast<int>(n));
  pending_ = 0;
  return n;
}

}  // namespace ringpark::detail
