// Which fork of the process this is. Every object that holds a kernel object
// shared with a parent after fork(2) (an io_uring, whose SQ and CQ are mapped
// MAP_SHARED; an epoll set; an eventfd) records the generation it was made in,
// and compares it before touching that object: a different value means "I am
// in a forked child, and this object belongs to my parent".
//
// The generation is bumped by a pthread_atfork child handler, so fork(2)
// through glibc (fork, and system/popen, whose children exec at once) counts;
// a raw clone(2) or vfork that goes on running ringpark code is not noticed.
#pragma once

#include <atomic>

namespace ringpark::detail {

// Bumped once in every forked child; starts at 0. Read with a relaxed load:
// the only writer is the child's own atfork handler, which runs before fork()
// returns in that same thread.
extern std::atomic<unsigned> g_fork_generation;

// The current generation. One relaxed load: cheap enough for every submit.
inline unsigned fork_generation() noexcept {
  return g_fork_generation.load(std::memory_order_relaxed);
}

}  // namespace ringpark::detail
