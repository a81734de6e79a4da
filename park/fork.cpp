#include "park/fork.hpp"

#include <pthread.h>

namespace ringpark::detail {

std::atomic<unsigned> g_fork_generation{0};

namespace {

// Registered when this file is loaded, which is before any ring exists (every
// owner of one reads g_fork_generation, so the linker keeps this file).
[[maybe_unused]] const int g_registered = ::pthread_atfork(
    nullptr, nullptr, [] { g_fork_generation.fetch_add(1, std::memory_order_relaxed); });

}  // namespace

}  // namespace ringpark::detail
