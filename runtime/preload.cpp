// libringpark-preload.so: loaded with LD_PRELOAD into a dynamically linked
// libuv 1.x program, it interposes uv_run so that the program runs on ringpark
// without a rebuild. RINGPARK_BACKEND=epoll still selects the fallback.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>

#include "ringpark.h"
#include "runtime/uv_loop.hpp"

namespace {

ringpark::detail::UvReactor::RunFn next_uv_run() noexcept {
  static auto next = reinterpret_cast<ringpark::detail::UvReactor::RunFn>(
      ::dlsym(RTLD_NEXT, "uv_run"));
  if (next == nullptr) {
    std::fprintf(stderr, "ringpark-preload: no uv_run after this library: %s\n", ::dlerror());
    std::abort();
  }
  return next;
}

}  // namespace

// Ringpark's own calls to uv_run would otherwise resolve to the definition below.
__attribute__((constructor)) static void ringpark_preload_init() {
  ringpark::detail::set_real_uv_run(next_uv_run());
}

extern "C" __attribute__((visibility("default"))) int uv_run(uv_loop_t* loop,
                                                             uv_run_mode mode) {
  // A uv_run from another library's constructor may come before ours ran.
  ringpark::detail::set_real_uv_run(next_uv_run());
  return rp_uv_run(loop, mode);
}
