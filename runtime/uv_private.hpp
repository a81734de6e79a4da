// Everything ringpark needs from libuv beyond its public API, in one place and
// checked against the libuv version it was written for (1.x unix, whose loop
// and handle layouts these functions read). See uv_private.cpp.
#pragma once

#include <uv.h>

namespace ringpark::detail::uv_private {

// Hides a handle of ours from uv_walk, and from uv_loop_close's "handles still
// open" check, the way libuv hides its own internal handles.
void mark_internal(uv_handle_t* handle) noexcept;

// Moves a started prepare handle to the end of the loop's prepare queue, so its
// callback runs after every other prepare callback of the iteration.
void move_prepare_last(uv_prepare_t* handle) noexcept;

// True while `handle` is linked into `loop`'s handle queue. False once the loop
// memory was re-initialised (a new loop at the same address).
bool still_linked(const uv_loop_t* loop, const uv_handle_t* handle) noexcept;

// What uv_run(UV_RUN_ONCE) checks before deciding that it may block: no pending
// callbacks and no idle handles.
bool once_may_block(const uv_loop_t* loop) noexcept;

}  // namespace ringpark::detail::uv_private
