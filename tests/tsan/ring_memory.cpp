// ThreadSanitizer and the memory a ring shares with the kernel (test builds
// with RINGPARK_SANITIZE=thread only).
//
// liburing maps a ring's SQ ring, CQ ring and SQE array, and unmaps them, with
// raw mmap/munmap system calls (its own wrappers, not libc's), which TSan does
// not intercept. So TSan never learns that a ring's memory was unmapped: when
// one thread tears its loop's ring down and another thread's new ring is later
// mapped at the same addresses, TSan holds the first thread's accesses there
// and reports a data race between two rings that never coexisted (seen with
// loops made and closed on several threads at once, tests/fault/
// threads_test.cpp; the accesses are the CQ head and the SQEs, through
// liburing's inline functions).
//
// What the kernel guarantees is an order: the munmap of a range happens before
// any later mmap that returns an address in it. This shim, linked into every
// test executable of the TSan build with -Wl,--wrap for the two liburing
// calls, tells TSan exactly that: io_uring_queue_exit releases, page by page,
// the memory it is about to unmap, and io_uring_queue_init_params acquires, page
// by page, the memory it has just mapped. (GCC 12's TSan, v2, has no working
// "this memory is new" annotation: AnnotateNewMemory is a no-op there.) Two
// threads using one ring are still reported. Nothing here changes ringpark's
// code or any other build.
#include <liburing.h>

#include <cstddef>
#include <cstdint>

extern "C" {
int __real_io_uring_queue_init_params(unsigned entries, io_uring* ring, io_uring_params* p);
void __real_io_uring_queue_exit(io_uring* ring);
void AnnotateHappensBefore(const char* file, int line, const volatile void* addr);
void AnnotateHappensAfter(const char* file, int line, const volatile void* addr);
}

namespace {

constexpr std::uintptr_t kPage = 4096;

template <typename Annotate>
void each_page(const void* mem, std::size_t size, Annotate annotate) {
  if (mem == nullptr || size == 0) return;
  const auto begin = reinterpret_cast<std::uintptr_t>(mem) & ~(kPage - 1);
  const auto end = reinterpret_cast<std::uintptr_t>(mem) + size;
  for (std::uintptr_t page = begin; page < end; page += kPage) {
    annotate(reinterpret_cast<const volatile void*>(page));
  }
}

// The ranges liburing maps for `ring`: the SQ ring, the CQ ring (the same
// mapping where the kernel has IORING_FEAT_SINGLE_MMAP) and the SQE array.
template <typename Annotate>
void each_ring_page(const io_uring* ring, Annotate annotate) {
  each_page(ring->sq.ring_ptr, ring->sq.ring_sz, annotate);
  if (ring->cq.ring_ptr != ring->sq.ring_ptr)
    each_page(ring->cq.ring_ptr, ring->cq.ring_sz, annotate);
  each_page(ring->sq.sqes, ring->sq.ring_entries * sizeof(io_uring_sqe), annotate);
}

}  // namespace

extern "C" int __wrap_io_uring_queue_init_params(unsigned entries, io_uring* ring,
                                                 io_uring_params* p) {
  const int r = __real_io_uring_queue_init_params(entries, ring, p);
  if (r == 0) {
    each_ring_page(ring,
                   [](const volatile void* a) { AnnotateHappensAfter(__FILE__, __LINE__, a); });
  }
  return r;
}

extern "C" void __wrap_io_uring_queue_exit(io_uring* ring) {
  each_ring_page(ring,
                 [](const volatile void* a) { AnnotateHappensBefore(__FILE__, __LINE__, a); });
  __real_io_uring_queue_exit(ring);
}
