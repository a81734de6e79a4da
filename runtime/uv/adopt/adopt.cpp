// The adopted uv_tcp_t: a front end of the stream engine for a libuv handle.
// See adopt.hpp for what adoption is and which of libuv's fields it keeps.
//
// Memory the kernel may touch: the engine's Stream (its ops) lives in an
// Adopted block that belongs to the handle from adoption until the engine's
// `closed` (or a release); a write's engine part (WriteReq: its op and iovec
// copy) comes from the loop's pool and goes back there before the write's
// callback, after its final completion; a shutdown's the same way. No buffer
// of the program's is ever in the kernel's hands: reads are copied out of the
// ring's provided buffers into alloc_cb's buffer.
#include "runtime/uv/adopt/adopt.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <unordered_set>

#include "ringpark.h"
#include "runtime/stream/stream.hpp"
#include "runtime/uv/adopt/udp.hpp"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail::adopt {
namespace {

namespace st = stream;
namespace uf = uv_private::flags;

UvStreamFns g_uv = {&uv_read_start,  &uv_read_stop, &uv_write2,
                    &uv_try_write2,  &uv_shutdown,  &uv_close,
                    &uv_stream_set_blocking};

// Marks an Adopted block, so that adoption_slot() of a stream that is not
// adopted (null) or of one that holds something else is never taken for one.
constexpr std::uint32_t kMagic = 0x72706164;  // "rpad"

// The libuv versions adoption was tested with: the layouts and flags it uses
// are the same from 1.44 through 1.51 (runtime/uv/private.cpp), and its tests
// ran on 1.44.2 (Debian 12) and 1.51.0.
constexpr unsigned kOldest = 0x012c00;  // 1.44.0
constexpr unsigned kNewest = 0x0133ff;  // 1.51.x

struct AdoptSet;

struct Adopted {
  std::uint32_t magic = kMagic;
  uv_tcp_t* handle = nullptr;
  AdoptSet* set = nullptr;
  uv_close_cb close_cb = nullptr;
  bool releasing = false;  // going back to libuv once quiet
  Adopted* prev = nullptr;
  Adopted* next = nullptr;
  st::Stream s;
};

// What adoption counts for RINGPARK_STATS.
struct Counts {
  std::uint64_t adopted = 0;   // streams adopted
  std::uint64_t released = 0;  // streams handed back to libuv
  std::uint64_t reads = 0;     // read callbacks with bytes
  std::uint64_t writes = 0;    // write requests
};

// Adoption's per-loop state: the adopted streams (to resume after a fork),
// the pool of write requests, the streams handed back to libuv (never adopted
// again), and the counts.
struct AdoptSet final : LoopContext::Extension {
  ~AdoptSet() override {
    while (free_writes != nullptr) {
      st::WriteReq* w = free_writes;
      free_writes = w->next;
      delete w;
    }
  }
  void stop() noexcept override {}
  void after_fork() noexcept override {
    for (Adopted* a = head; a != nullptr; a = a->next) st::after_fork(&a->s, &ctx->chain().io());
  }

  // Keeps a WriteReq for the next write, up to kMaxFreeWrites of them (a burst
  // of queued writes should not pin its memory for the loop's life).
  void recycle(st::WriteReq* w) noexcept {
    if (free_count >= kMaxFreeWrites) {
      delete w;
      return;
    }
    w->next = free_writes;
    free_writes = w;
    ++free_count;
  }
  st::WriteReq* take() noexcept {
    st::WriteReq* w = free_writes;
    if (w == nullptr) return new (std::nothrow) st::WriteReq;
    free_writes = w->next;
    --free_count;
    return w;
  }
  static constexpr unsigned kMaxFreeWrites = 1024;

  LoopContext* ctx = nullptr;
  Adopted* head = nullptr;
  st::WriteReq* free_writes = nullptr;
  unsigned free_count = 0;
  std::unordered_set<const uv_stream_t*> released;
  Counts counts;
};

uv_stream_t* as_stream(uv_tcp_t* h) noexcept { return reinterpret_cast<uv_stream_t*>(h); }
uv_handle_t* as_handle(uv_tcp_t* h) noexcept { return reinterpret_cast<uv_handle_t*>(h); }
Adopted* of(st::Stream* s) noexcept { return static_cast<Adopted*>(s->owner); }

// The stream's Adopted block, or null when libuv owns the stream. Its loop's
// context has noticed a fork when this returns (every entry point comes here
// first), so that a child never reaches the parent's ring.
Adopted* adopted(uv_stream_t* stream) noexcept {
  if (stream == nullptr || stream->type != UV_TCP) return nullptr;
  auto* tcp = reinterpret_cast<uv_tcp_t*>(stream);
  auto* a = static_cast<Adopted*>(uv_private::adoption_slot(tcp));
  if (a == nullptr || a->magic != kMagic || a->handle != tcp) return nullptr;
  a->set->ctx->notice_fork();
  return a;
}

// Mirrors the engine's view of the stream into libuv's flags.
void set_flag(uv_tcp_t* h, unsigned flag, bool on) noexcept {
  if (on) {
    h->flags |= flag;
  } else {
    h->flags &= ~flag;
  }
}

// ---- The engine's callbacks, as libuv's -------------------------------------

void host_alloc(st::Stream* s, std::size_t suggested, uv_buf_t* buf) noexcept {
  uv_tcp_t* h = of(s)->handle;
  if (h->alloc_cb) h->alloc_cb(as_handle(h), suggested, buf);
}

void host_read(st::Stream* s, ssize_t nread, const uv_buf_t* buf) noexcept {
  Adopted* a = of(s);
  uv_tcp_t* h = a->handle;
  if (nread < 0 && nread != UV_EOF && nread != UV_ENOBUFS && nread != UV_ECANCELED) {
    // A read error: libuv's stream is no longer readable or writable when the
    // callback runs (the engine's flags say the same).
    set_flag(h, uf::kReadable | uf::kWritable, false);
  }
  if (nread > 0) ++a->set->counts.reads;
  if (h->read_cb) h->read_cb(as_stream(h), nread, buf);
}

void host_reading_ended(st::Stream* s) noexcept {
  uv_tcp_t* h = of(s)->handle;
  set_flag(h, uf::kReading, false);
  set_flag(h, uf::kReadEof, s->flags & st::kReadEof);
  uv_private::handle_stop(as_handle(h));
}

void host_write_done(st::Stream* s, st::WriteReq* w, int status) noexcept {
  Adopted* a = of(s);
  auto* req = static_cast<uv_write_t*>(w->owner);
  a->handle->write_queue_size = s->queued_bytes;
  // The engine is done with the WriteReq (its final completion came): back to
  // the pool before the callback, which may write again.
  a->set->recycle(w);
  uv_private::req_unregister(a->handle->loop);
  req->error = status;
  if (req->cb) req->cb(req, status);  // the request may be freed from here on
}

void host_shutdown_done(st::Stream* s, st::ShutdownReq* r, int status) noexcept {
  Adopted* a = of(s);
  auto* req = static_cast<uv_shutdown_t*>(r->owner);
  delete r;
  uv_private::set_shutting(as_stream(a->handle), nullptr);
  if (status == 0) a->handle->flags |= uf::kShut;
  uv_private::req_unregister(a->handle->loop);
  if (req->cb) req->cb(req, status);
}

void host_connect_done(st::Stream*, st::ConnectReq*, int) noexcept {
  std::fprintf(stderr, "ringpark: an adopted stream never connects through the engine\n");
  std::abort();
}

void host_connection(st::Stream*, int) noexcept {
  std::fprintf(stderr, "ringpark: an adopted stream never listens through the engine\n");
  std::abort();
}

void unlink(Adopted* a) noexcept {
  if (a->prev) {
    a->prev->next = a->next;
  } else {
    a->set->head = a->next;
  }
  if (a->next) a->next->prev = a->prev;
  a->prev = a->next = nullptr;
}

// Hands the handle back to libuv: its slot cleared, the Adopted block freed.
// Nothing of the engine's may be in flight.
uv_tcp_t* detach(Adopted* a) noexcept {
  uv_tcp_t* h = a->handle;
  st::dispose(&a->s);
  unlink(a);
  uv_private::adoption_slot(h) = nullptr;
  a->magic = 0;
  delete a;
  return h;
}

// The engine closed the socket (through the ring) and nothing of the stream
// is in flight: libuv's own close takes it from here, and runs the close
// callback in this iteration's closing phase, after the callbacks the engine
// completed with UV_ECANCELED, as libuv orders them.
void host_closed(st::Stream* s) noexcept {
  Adopted* a = of(s);
  uv_close_cb cb = a->close_cb;
  uv_tcp_t* h = detach(a);
  h->write_queue_size = 0;
  h->flags &= ~uf::kClosing;  // uv_close asserts the handle is not closing yet
  g_uv.close(as_handle(h), cb);
}

// A stream going back to libuv (uv_stream_set_blocking): once the engine is
// quiet, libuv owns it again, reading where the program reads.
void host_settled(st::Stream* s) noexcept {
  Adopted* a = of(s);
  if (!a->releasing || !st::quiet(s)) return;
  AdoptSet* set = a->set;
  uv_tcp_t* h = detach(a);
  set->released.insert(as_stream(h));
  ++set->counts.released;
  if (h->flags & uf::kReading) {
    // libuv's uv_read_start arms its own watcher; it wants READING clear.
    uv_alloc_cb alloc_cb = h->alloc_cb;
    uv_read_cb read_cb = h->read_cb;
    h->flags &= ~uf::kReading;
    uv_private::handle_stop(as_handle(h));
    g_uv.read_start(as_stream(h), alloc_cb, read_cb);
  }
}

// Reads as libuv's do: alloc_cb always asked for 65536 bytes, EOF and errors
// delivered with a buffer from alloc_cb, and never a buffer lent to the
// kernel (programs hand out one buffer at a time).
constexpr st::Host kHost = {
    .alloc = &host_alloc,
    .read = &host_read,
    .write_done = &host_write_done,
    .connect_done = &host_connect_done,
    .shutdown_done = &host_shutdown_done,
    .connection = &host_connection,
    .closed = &host_closed,
    .settled = &host_settled,
    .reading_ended = &host_reading_ended,
    .lend_buffers = false,
    .fixed_suggestion = true,
    .end_with_buffer = true,
};

// ---- Deciding ------------------------------------------------------------------

std::string version_string(unsigned v) {
  return std::to_string(v >> 16) + "." + std::to_string((v >> 8) & 0xff) + "." +
         std::to_string(v & 0xff);
}

// Why the loop's streams cannot be adopted, or null.
const char* loop_gate(LoopContext* ctx) noexcept {
  if (const char* why = process_gate()) return why;
  IoBackend& io = ctx->chain().io();
  if (!io.native(OpCode::recv)) return "the loop runs on the epoll fallback";
  if (!io.native(OpCode::recv_multishot)) {
    return "the kernel has no multishot recv with provided buffers (Linux 6.0)";
  }
  return nullptr;
}

AdoptSet* adopt_set(LoopContext* ctx) noexcept {
  if (auto* set = ctx->find_extension<AdoptSet>()) return set;
  std::unique_ptr<AdoptSet> made(new (std::nothrow) AdoptSet);
  if (!made) return nullptr;
  made->ctx = ctx;
  return ctx->add_extension(std::move(made));
}

// Adopts `stream` if everything allows it; null leaves it to libuv.
Adopted* try_adopt(uv_stream_t* stream) noexcept {
  if (stream == nullptr || stream->type != UV_TCP) return nullptr;
  if (stream->flags & (uf::kClosing | uf::kListening)) return nullptr;
  if (uv_private::stream_fd(stream) < 0 || !uv_private::stream_quiet(stream)) return nullptr;
  auto* tcp = reinterpret_cast<uv_tcp_t*>(stream);
  if (uv_private::adoption_slot(tcp) != nullptr) return nullptr;  // not ours to touch
  LoopContext* ctx = LoopContext::get(stream->loop);
  if (ctx == nullptr || loop_gate(ctx) != nullptr) return nullptr;
  AdoptSet* set = adopt_set(ctx);
  if (set == nullptr || set->released.count(stream)) return nullptr;
  auto* a = new (std::nothrow) Adopted;
  if (a == nullptr) return nullptr;
  a->handle = tcp;
  a->set = set;
  st::init(&a->s, &ctx->chain().io(), &kHost, a);
  st::set_socket(&a->s, uv_private::stream_fd(stream));
  // libuv's own counts keep the loop alive for this stream's ops (see
  // LoopContext::libuv_accounted), until it closes.
  a->s.life.share_count(ctx->libuv_accounted());
  if (stream->flags & uf::kReadable) a->s.flags |= st::kReadable;
  if (stream->flags & uf::kWritable) a->s.flags |= st::kWritable;
  if (stream->flags & uf::kShut) a->s.flags |= st::kShut;
  a->next = set->head;
  if (set->head) set->head->prev = a;
  set->head = a;
  uv_private::adoption_slot(tcp) = a;
  ++set->counts.adopted;
  return a;
}

LoopContext* ctx_of(Adopted* a) noexcept { return a->set->ctx; }

// Starts the adopted stream's reading: what uv_read_start does to libuv's
// handle, then the engine's read.
void start_reading(Adopted* a, uv_alloc_cb alloc_cb, uv_read_cb read_cb) noexcept {
  uv_tcp_t* h = a->handle;
  h->flags = (h->flags | uf::kReading) & ~uf::kReadEof;
  h->alloc_cb = alloc_cb;
  h->read_cb = read_cb;
  uv_private::handle_start(as_handle(h));
  a->s.flags |= st::kReadable;  // libuv's flag says so, whatever the engine saw
  a->s.flags &= ~st::kReading;
  st::read_start(&a->s);
}

// A stream libuv already reads (its uv_read_start came before its connect
// completed, as many clients do) is taken over at its first write: libuv's
// reading stops (the socket keeps what it has not read), and the engine's
// starts with the same callbacks. Null leaves it to libuv.
Adopted* take_over_reading(uv_stream_t* stream) noexcept {
  if (stream == nullptr || stream->type != UV_TCP || !uv_private::stream_only_reading(stream)) {
    return nullptr;
  }
  uv_alloc_cb alloc_cb = stream->alloc_cb;
  uv_read_cb read_cb = stream->read_cb;
  g_uv.read_stop(stream);
  Adopted* a = try_adopt(stream);
  if (a == nullptr) {
    g_uv.read_start(stream, alloc_cb, read_cb);  // libuv's as before
    return nullptr;
  }
  start_reading(a, alloc_cb, read_cb);
  return a;
}

}  // namespace

void set_uv_stream_fns(const UvStreamFns& fns) noexcept { g_uv = fns; }

const char* process_gate() noexcept {
  static const std::string why = [] {
    const char* env = std::getenv("RINGPARK_ADOPT");
    if (env != nullptr && std::strcmp(env, "0") == 0) return std::string("RINGPARK_ADOPT=0");
    const unsigned v = uv_version();
    if (v < kOldest || v > kNewest) {
      return "libuv " + version_string(v) + " is not a version adoption was tested with (" +
             version_string(kOldest) + " to 1.51)";
    }
    return std::string();
  }();
  return why.empty() ? nullptr : why.c_str();
}

int read_start(uv_stream_t* stream, uv_alloc_cb alloc_cb, uv_read_cb read_cb) noexcept {
  if (stream == nullptr || alloc_cb == nullptr || read_cb == nullptr) {
    return g_uv.read_start(stream, alloc_cb, read_cb);  // libuv's UV_EINVAL
  }
  Adopted* a = adopted(stream);
  if (a == nullptr && !(stream->flags & (uf::kReading | uf::kClosing)) &&
      (stream->flags & uf::kReadable)) {
    a = try_adopt(stream);
  }
  if (a == nullptr) return g_uv.read_start(stream, alloc_cb, read_cb);
  // uv_read_start's checks, in its order.
  uv_tcp_t* h = a->handle;
  if (h->flags & uf::kClosing) return UV_EINVAL;
  if (h->flags & uf::kReading) return UV_EALREADY;
  if (!(h->flags & uf::kReadable)) return UV_ENOTCONN;
  start_reading(a, alloc_cb, read_cb);
  ctx_of(a)->update_ref();
  return 0;
}

int read_stop(uv_stream_t* stream) noexcept {
  Adopted* a = adopted(stream);
  if (a == nullptr) return g_uv.read_stop(stream);
  uv_tcp_t* h = a->handle;
  if (!(h->flags & uf::kReading)) return 0;
  h->flags &= ~uf::kReading;
  uv_private::handle_stop(as_handle(h));
  h->read_cb = nullptr;
  h->alloc_cb = nullptr;
  st::read_stop(&a->s);
  return 0;
}

int write2(uv_write_t* req, uv_stream_t* stream, const uv_buf_t bufs[], unsigned int nbufs,
           uv_stream_t* send_handle, uv_write_cb cb) noexcept {
  // A handle to send: libuv's UV_EINVAL for a TCP stream, with nothing queued.
  if (send_handle != nullptr) return g_uv.write2(req, stream, bufs, nbufs, send_handle, cb);
  const bool valid = req != nullptr && bufs != nullptr && nbufs > 0;
  Adopted* a = adopted(stream);
  if (a == nullptr && valid) a = try_adopt(stream);
  if (a == nullptr && valid) a = take_over_reading(stream);
  if (a == nullptr) return g_uv.write2(req, stream, bufs, nbufs, send_handle, cb);
  if (!valid) return UV_EINVAL;  // libuv asserts
  uv_tcp_t* h = a->handle;
  // uv__check_before_write, in its order.
  if (uv_private::stream_fd(stream) < 0 || (h->flags & uf::kClosing)) return UV_EBADF;
  if (!(h->flags & uf::kWritable)) return UV_EPIPE;
  AdoptSet* set = a->set;
  st::WriteReq* w = set->take();
  if (w == nullptr) return UV_ENOMEM;
  if (int err = st::write_prepare(w, bufs, nbufs); err < 0) {
    set->recycle(w);
    return err;
  }
  w->owner = req;
  // What uv_write2 fills in; libuv's own queue fields stay unused.
  uv_private::req_init(h->loop, reinterpret_cast<uv_req_t*>(req), UV_WRITE);
  req->cb = cb;
  req->handle = stream;
  req->send_handle = nullptr;
  req->error = 0;
  req->bufs = nullptr;
  req->nbufs = nbufs;
  ++set->counts.writes;
  st::write(&a->s, w);
  h->write_queue_size = a->s.queued_bytes;
  ctx_of(a)->update_ref();
  return 0;
}

// RINGPARK_TRY_WRITE=queue makes uv_try_write on an adopted stream answer
// UV_EAGAIN, so that the program's fallback uv_write joins the turn's batch
// instead of costing a syscall of its own. node, uvloop and BIND fall back so;
// knot-resolver 5.7.4 and later does not (its send fails), which is why the
// default sends at once, as libuv does (bench/RESULTS.md has both measured).
namespace {
bool try_write_queues() noexcept {
  static const bool queue = [] {
    const char* v = std::getenv("RINGPARK_TRY_WRITE");
    return v != nullptr && std::strcmp(v, "queue") == 0;
  }();
  return queue;
}
}  // namespace

int try_write2(uv_stream_t* stream, const uv_buf_t bufs[], unsigned int nbufs,
               uv_stream_t* send_handle) noexcept {
  Adopted* a = adopted(stream);
  if (a == nullptr || send_handle != nullptr) {
    return g_uv.try_write2(stream, bufs, nbufs, send_handle);
  }
  // uv_try_write2's checks, in its order: writes queued (bytes in the ring
  // count: they are not written yet) say UV_EAGAIN, so nothing overtakes them.
  uv_tcp_t* h = a->handle;
  if (h->write_queue_size != 0 || a->s.write_head != nullptr) return UV_EAGAIN;
  if (nbufs == 0 || bufs == nullptr) return UV_EINVAL;
  if (uv_private::stream_fd(stream) < 0 || (h->flags & uf::kClosing)) return UV_EBADF;
  if (!(h->flags & uf::kWritable)) return UV_EPIPE;
  if (try_write_queues()) return UV_EAGAIN;
  return st::try_write(&a->s, bufs, nbufs);
}

int shutdown(uv_shutdown_t* req, uv_stream_t* stream, uv_shutdown_cb cb) noexcept {
  Adopted* a = adopted(stream);
  if (a == nullptr) return g_uv.shutdown(req, stream, cb);
  uv_tcp_t* h = a->handle;
  if (!(h->flags & uf::kWritable) || (h->flags & uf::kShut) || uv_private::shutting(stream) ||
      (h->flags & uf::kClosing)) {
    return UV_ENOTCONN;
  }
  auto* r = new (std::nothrow) st::ShutdownReq;
  if (r == nullptr) return UV_ENOMEM;
  r->owner = req;
  uv_private::req_init(h->loop, reinterpret_cast<uv_req_t*>(req), UV_SHUTDOWN);
  req->handle = stream;
  req->cb = cb;
  uv_private::set_shutting(stream, req);
  h->flags &= ~uf::kWritable;
  st::shutdown(&a->s, r);
  ctx_of(a)->update_ref();
  return 0;
}

void close(uv_handle_t* handle, uv_close_cb cb) noexcept {
  if (handle != nullptr && handle->type == UV_UDP &&
      udp::close(reinterpret_cast<uv_udp_t*>(handle), cb)) {
    return;
  }
  Adopted* a = handle != nullptr && handle->type == UV_TCP
                   ? adopted(reinterpret_cast<uv_stream_t*>(handle))
                   : nullptr;
  if (a == nullptr) {
    if (handle != nullptr && handle->type == UV_TCP) {
      if (LoopContext* ctx = LoopContext::find(handle->loop)) {
        if (auto* set = ctx->find_extension<AdoptSet>()) {
          set->released.erase(reinterpret_cast<uv_stream_t*>(handle));
        }
      }
    }
    return g_uv.close(handle, cb);
  }
  uv_tcp_t* h = a->handle;
  // Closing already: libuv asserts; nothing here may change the close under
  // way (its callback stays the first one given).
  if (h->flags & uf::kClosing) return;
  // What uv_close and uv__stream_close do at once, but the socket stays open
  // until the engine has nothing in flight on it; libuv's own close follows
  // then (host_closed).
  h->flags |= uf::kClosing;
  h->close_cb = cb;
  a->close_cb = cb;
  h->flags &= ~(uf::kReading | uf::kReadable | uf::kWritable);
  h->read_cb = nullptr;
  h->alloc_cb = nullptr;
  uv_private::handle_stop(handle);
  // libuv has no fd for a closing stream any more (calls on it answer
  // UV_EBADF); the engine keeps the socket open until nothing of it is in
  // flight. A closing handle is no longer among libuv's active ones, and it
  // is not on libuv's closing list yet: its ops keep the loop alive as
  // ringpark's own.
  uv_private::set_stream_fd(as_stream(h), -1);
  a->s.life.share_count(nullptr);
  LoopContext* ctx = ctx_of(a);
  st::close(&a->s);
  ctx->update_ref();
}

int set_blocking(uv_stream_t* stream, int blocking) noexcept {
  Adopted* a = adopted(stream);
  const int r = g_uv.set_blocking(stream, blocking);
  if (a == nullptr || r != 0 || !blocking || a->releasing) return r;
  // libuv's blocking writes are not the engine's: hand the stream back once
  // nothing of it is left in the ring. Writes queued meanwhile still go out
  // through the engine, in order, before libuv takes over.
  a->releasing = true;
  st::quiesce(&a->s);
  if (st::quiet(&a->s)) host_settled(&a->s);
  return r;
}

std::string state(uv_loop_t* loop) {
  if (const char* why = process_gate()) return std::string("off (") + why + ")";
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return "off (the loop's ringpark state could not be set up)";
  if (const char* why = loop_gate(ctx)) return std::string("off (") + why + ")";
  return "on";
}

std::string stats_line(LoopContext* ctx) {
  const ChainStats c = ctx->chain().stats();
  std::string line = "ringpark: loop " + std::to_string(reinterpret_cast<std::uintptr_t>(ctx->loop())) +
                     ": backend " + ctx->chain().backend_name();
  const Counts counts = [&] {
    const AdoptSet* set = ctx->find_extension<AdoptSet>();
    return set ? set->counts : Counts{};
  }();
  std::uint64_t libuv_syscalls = counts.reads + counts.writes;
  if (const char* why = loop_gate(ctx)) {
    line += std::string("; adoption off (") + why + ")";
    // The UDP part says more only when its own reason differs.
    if (const char* udp_why = udp::loop_gate(ctx); udp_why == nullptr || std::strcmp(udp_why, why) != 0) {
      line += udp::stats_part(ctx, &libuv_syscalls);
    }
  } else {
    line += "; adopted " + std::to_string(counts.adopted) + " streams (" +
            std::to_string(counts.released) + " handed back), " + std::to_string(counts.reads) +
            " reads and " + std::to_string(counts.writes) + " writes through the ring";
    line += udp::stats_part(ctx, &libuv_syscalls);
  }
  line += "; " + std::to_string(ctx->turns()) + " turns, " + std::to_string(c.enters) +
          (ctx->chain().io().native(OpCode::nop) ? " io_uring_enter calls, " : " epoll_wait calls, ") +
          std::to_string(c.sqes_submitted) + " SQEs, " + std::to_string(c.cqes_reaped) + " CQEs";
  if (libuv_syscalls > 0) {
    // What libuv would have spent on the same traffic, at the least: a read
    // or write syscall for each read, write and datagram (it also polls, and
    // reads once more to see EAGAIN when a read does not fill its buffer).
    line += "; libuv would have made at least " + std::to_string(libuv_syscalls) +
            " socket syscalls for these";
  }
  return line;
}

}  // namespace ringpark::detail::adopt

extern "C" const char* rp_adoption(uv_loop_t* loop) {
  if (loop == nullptr) return "off (null loop)";
  // One string per distinct answer, kept for the process's life: the answer
  // of a loop changes only with its backend.
  static thread_local std::string answer;
  answer = ringpark::detail::adopt::state(loop);
  return answer.c_str();
}
