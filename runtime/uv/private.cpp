// The only file that reaches into libuv's private fields. The layouts used here
// (QUEUE as void*[2] links, the loop's prepare/pending/idle queues, the stream
// fields, the handle flags) are those of libuv 1.x on unix; the stream and
// loop layouts and the flags are the same from 1.44 through 1.52 (checked
// against each release's headers), with the exception noted at set_shutting.
// The build refuses any other major version, and adoption, which depends on
// the stream fields most, checks the running version (runtime/uv/adopt/).
#include "runtime/uv/private.hpp"

#include <poll.h>

#include <cstdlib>
#include <cstring>

#if UV_VERSION_MAJOR != 1
#error "ringpark reads libuv 1.x private fields; check runtime/uv/private.cpp for this version"
#endif

namespace ringpark::detail::uv_private {

namespace {

using Link = void* [2];

constexpr unsigned kHandleInternal = 0x10;  // UV_HANDLE_INTERNAL in src/uv-common.h

void*& next_of(void* node) noexcept { return (*static_cast<Link*>(node))[0]; }
void*& prev_of(void* node) noexcept { return (*static_cast<Link*>(node))[1]; }

}  // namespace

void mark_internal(uv_handle_t* handle) noexcept { handle->flags |= kHandleInternal; }

void move_prepare_last(uv_prepare_t* handle) noexcept {
  void* head = &handle->loop->prepare_handles;
  void* node = &handle->queue;
  if (prev_of(head) == node) return;  // already last
  // Unlink.
  next_of(prev_of(node)) = next_of(node);
  prev_of(next_of(node)) = prev_of(node);
  // Insert before head, i.e. at the tail.
  next_of(node) = head;
  prev_of(node) = prev_of(head);
  next_of(prev_of(head)) = node;
  prev_of(head) = node;
}

bool still_linked(const uv_loop_t* loop, const uv_handle_t* handle) noexcept {
  // Walk from the loop's own queue head, so that only live handles are read
  // (our neighbours in a stale queue may have been freed). Our handles are made
  // early, so the walk is short.
  void* head = const_cast<void**>(loop->handle_queue);
  const void* node = handle->handle_queue;
  for (void* q = next_of(head); q != head; q = next_of(q)) {
    if (q == node) return true;
  }
  return false;
}

bool watchers_pending(const uv_loop_t* loop) noexcept {
  return loop->watcher_queue[0] != &loop->watcher_queue;
}

bool once_may_block(const uv_loop_t* loop) noexcept {
  const void* pending = &loop->pending_queue;
  const void* idle = &loop->idle_handles;
  return loop->pending_queue[0] == pending && loop->idle_handles[0] == idle;
}

bool has_check_handles(const uv_loop_t* loop) noexcept {
  return loop->check_handles[0] != &loop->check_handles;
}

void fs_init(uv_fs_t* req, uv_loop_t* loop, uv_fs_type type, uv_fs_cb cb) noexcept {
  req->type = UV_FS;
  req->fs_type = type;
  req->result = 0;
  req->ptr = nullptr;
  req->loop = loop;
  req->path = nullptr;
  req->new_path = nullptr;
  req->bufs = nullptr;
  req->nbufs = 0;
  req->cb = cb;
  // uv_cancel takes w->loop->wq_mutex and reports "running" for a work item
  // whose queue link is empty.
  req->work_req.loop = loop;
  req->work_req.work = nullptr;
  req->work_req.done = nullptr;
  req->work_req.wq[0] = req->work_req.wq;
  req->work_req.wq[1] = req->work_req.wq;
}

int fs_copy_paths(uv_fs_t* req, const char* path, const char* new_path) noexcept {
  // libuv frees req->path with its allocator (malloc unless the program called
  // uv_replace_allocator), and new_path with it, since both share one block.
  std::size_t len = std::strlen(path) + 1;
  std::size_t new_len = new_path ? std::strlen(new_path) + 1 : 0;
  char* block = static_cast<char*>(std::malloc(len + new_len));
  if (block == nullptr) return UV_ENOMEM;
  std::memcpy(block, path, len);
  req->path = block;
  if (new_path) {
    std::memcpy(block + len, new_path, new_len);
    req->new_path = block + len;
  }
  return 0;
}

void fs_set_args(uv_fs_t* req, uv_file file, int flags, int mode, std::int64_t offset) noexcept {
  req->file = file;
  req->flags = flags;
  req->mode = static_cast<mode_t>(mode);
  req->off = static_cast<off_t>(offset);
}

void req_register(uv_loop_t* loop) noexcept { ++loop->active_reqs.count; }
void req_unregister(uv_loop_t* loop) noexcept { --loop->active_reqs.count; }

void req_init(uv_loop_t* loop, uv_req_t* req, uv_req_type type) noexcept {
  req->type = type;
  req_register(loop);
}

void handle_start(uv_handle_t* handle) noexcept {
  if (handle->flags & flags::kActive) return;
  handle->flags |= flags::kActive;
  if (handle->flags & flags::kRef) ++handle->loop->active_handles;
}

void handle_stop(uv_handle_t* handle) noexcept {
  if (!(handle->flags & flags::kActive)) return;
  handle->flags &= ~flags::kActive;
  if (handle->flags & flags::kRef) --handle->loop->active_handles;
}

int stream_fd(const uv_stream_t* stream) noexcept { return stream->io_watcher.fd; }
void set_stream_fd(uv_stream_t* stream, int fd) noexcept { stream->io_watcher.fd = fd; }

bool stream_quiet(const uv_stream_t* stream) noexcept {
  const void* write_queue = &stream->write_queue;
  const void* completed = &stream->write_completed_queue;
  const void* pending = &stream->io_watcher.pending_queue;
  return stream->connect_req == nullptr && stream->shutdown_req == nullptr &&
         stream->write_queue_size == 0 && stream->write_queue[0] == write_queue &&
         stream->write_completed_queue[0] == completed && stream->io_watcher.pevents == 0 &&
         stream->io_watcher.pending_queue[0] == pending && !shutting(stream);
}

bool stream_only_reading(const uv_stream_t* stream) noexcept {
  return stream->io_watcher.pevents == POLLIN && (stream->flags & flags::kReading);
}

namespace {
// UV_HANDLE_SHUTTING of libuv 1.44, gone from 1.45 on.
constexpr unsigned kShutting144 = 0x100;
bool has_shutting_flag() noexcept { return uv_version() < 0x012d00; }  // before 1.45.0
}  // namespace

bool shutting(const uv_stream_t* stream) noexcept {
  if (stream->shutdown_req != nullptr) return true;
  return has_shutting_flag() && (stream->flags & kShutting144);
}

void set_shutting(uv_stream_t* stream, uv_shutdown_t* req) noexcept {
  stream->shutdown_req = req;
  if (!has_shutting_flag()) return;
  if (req != nullptr) {
    stream->flags |= kShutting144;
  } else {
    stream->flags &= ~kShutting144;
  }
}

void*& adoption_slot(uv_tcp_t* stream) noexcept {
  return reinterpret_cast<void*&>(stream->queued_fds);
}

int udp_fd(const uv_udp_t* handle) noexcept { return handle->io_watcher.fd; }
void set_udp_fd(uv_udp_t* handle, int fd) noexcept { handle->io_watcher.fd = fd; }

bool udp_quiet(const uv_udp_t* handle) noexcept {
  const void* write_queue = &handle->write_queue;
  const void* completed = &handle->write_completed_queue;
  const void* pending = &handle->io_watcher.pending_queue;
  return handle->send_queue_count == 0 && handle->send_queue_size == 0 &&
         handle->write_queue[0] == write_queue && handle->write_completed_queue[0] == completed &&
         handle->io_watcher.pevents == 0 && handle->io_watcher.pending_queue[0] == pending &&
         !(handle->flags & flags::kUdpProcessing);
}

void*& udp_adoption_slot(uv_udp_t* handle) noexcept {
  static_assert(sizeof handle->u.reserved >= 2 * sizeof(void*));
  return handle->u.reserved[1];
}

void clear_udp_adoption_slot(uv_udp_t* handle) noexcept { handle->u.reserved[1] = nullptr; }

bool udp_fd_claimed(const uv_udp_t* handle) noexcept {
  const uv_loop_t* loop = handle->loop;
  const int fd = handle->io_watcher.fd;
  return fd >= 0 && static_cast<unsigned>(fd) < loop->nwatchers &&
         loop->watchers[fd] == &handle->io_watcher;
}

void udp_disarm_keep_fd(uv_udp_t* handle) noexcept {
  // What uv__io_stop(POLLIN) does, but for loop->watchers[fd] and nfds.
  uv__io_t* w = &handle->io_watcher;
  w->pevents = 0;
  void* node = &w->watcher_queue;
  next_of(prev_of(node)) = next_of(node);
  prev_of(next_of(node)) = prev_of(node);
  next_of(node) = node;
  prev_of(node) = node;
  w->events = 0;
  handle_stop(reinterpret_cast<uv_handle_t*>(handle));
  handle->alloc_cb = nullptr;
  handle->recv_cb = nullptr;
}

void release_udp_fd(uv_udp_t* handle) noexcept {
  if (!udp_fd_claimed(handle)) return;
  handle->loop->watchers[handle->io_watcher.fd] = nullptr;
  --handle->loop->nfds;
}

}  // namespace ringpark::detail::uv_private
