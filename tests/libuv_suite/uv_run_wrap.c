/* Linked into libuv's test runner (uv_run_tests) together with
 * -Wl,--wrap=uv_run: every uv_run() call made by the test objects is
 * resolved to __wrap_uv_run() below and so goes through ringpark.
 * libringpark.so is a separate shared object, so its own call to uv_run()
 * is not wrapped and reaches the real libuv. */
#include <uv.h>
#include "ringpark.h"

int __wrap_uv_run(uv_loop_t* l, uv_run_mode m);

int __wrap_uv_run(uv_loop_t* l, uv_run_mode m) { return rp_uv_run(l, m); }
