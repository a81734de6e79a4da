// The adopted uv_udp_t: a front end of the datagram engine for a libuv
// handle. See udp.hpp for what adoption is and which of libuv's fields it
// keeps.
//
// Memory the kernel may touch: the engine's Dgram (its ops) lives in an
// AdoptedUdp block that belongs to the handle from adoption until the
// engine's `closed`; a send's engine part (SendReq: its op, msghdr, copies of
// the iovecs and the address) comes from the loop's pool and goes back there
// before the send's callback, after its final completion. No buffer of the
// program's is ever in the kernel's hands: datagrams are copied out of the
// ring's shared datagram buffers into alloc_cb's buffer.
#include "runtime/uv/adopt/udp.hpp"

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "runtime/stream/dgram.hpp"
#include "runtime/uv/adopt/adopt.hpp"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail::adopt::udp {
namespace {

namespace dg = dgram;
namespace uf = uv_private::flags;

static_assert(dg::kPartial == UV_UDP_PARTIAL && dg::kMmsgChunk == UV_UDP_MMSG_CHUNK &&
                  dg::kMmsgFree == UV_UDP_MMSG_FREE,
              "the engine's receive flags are libuv's");
static_assert(sizeof(uv_buf_t) == sizeof(iovec) &&
                  offsetof(uv_buf_t, base) == offsetof(iovec, iov_base) &&
                  offsetof(uv_buf_t, len) == offsetof(iovec, iov_len),
              "uv_buf_t is an iovec on unix");
static_assert(UV_ENOBUFS == -ENOBUFS && UV_ECANCELED == -ECANCELED && UV_EAGAIN == -EAGAIN,
              "libuv's errors are negative errno values on unix");

UvUdpFns g_uv = {&uv_udp_init,       &uv_udp_init_ex, &uv_udp_recv_start, &uv_udp_recv_stop,
                 &uv_udp_send,       &uv_udp_try_send, &uv_close};

// Marks an AdoptedUdp block (see adopted()).
constexpr std::uint32_t kMagic = 0x72706475;  // "rpdu"

struct UdpSet;

struct AdoptedUdp {
  std::uint32_t magic = kMagic;
  uv_udp_t* handle = nullptr;
  UdpSet* set = nullptr;
  uv_close_cb close_cb = nullptr;
  // The recv_cb of the latest alloc: a recv_cb that stopped receiving (and so
  // cleared the handle's) still gets back the buffer its alloc_cb gave.
  uv_udp_recv_cb recv_cb_of_alloc = nullptr;
  bool recverr = false;  // IP_RECVERR or IPV6_RECVERR, as last looked at
  AdoptedUdp* prev = nullptr;
  AdoptedUdp* next = nullptr;
  dg::Dgram d;
};

// What UDP adoption counts for RINGPARK_STATS.
struct Counts {
  std::uint64_t adopted = 0;   // sockets adopted
  std::uint64_t received = 0;  // datagrams handed to recv_cb
  std::uint64_t sent = 0;      // send requests
};

// UDP adoption's per-loop state: the adopted sockets (to resume after a
// fork), the EdgeSet they wait in (for datagrams, for room), the pool of
// send requests, the counts.
struct UdpSet final : LoopContext::Extension {
  explicit UdpSet(LoopContext* c) : ctx(c), edges(&c->chain().io(), c->libuv_accounted()) {}
  ~UdpSet() override {
    while (free_sends != nullptr) {
      dg::SendReq* r = free_sends;
      free_sends = r->next;
      delete r;
    }
  }
  void stop() noexcept override {}
  void after_fork() noexcept override {
    for (AdoptedUdp* a = head; a != nullptr; a = a->next) dg::after_fork(&a->d, &ctx->chain().io());
    edges.after_fork(&ctx->chain().io());
  }

  LoopContext* ctx;
  EdgeSet edges;
  AdoptedUdp* head = nullptr;
  dg::SendReq* free_sends = nullptr;
  Counts counts;
};

uv_handle_t* as_handle(uv_udp_t* h) noexcept { return reinterpret_cast<uv_handle_t*>(h); }
AdoptedUdp* of(dg::Dgram* d) noexcept { return static_cast<AdoptedUdp*>(d->owner); }

// The handle's AdoptedUdp block, or null when libuv owns the socket. Its
// loop's context has noticed a fork when this returns (every entry point
// comes here first), so that a child never reaches the parent's ring.
AdoptedUdp* adopted(uv_udp_t* h) noexcept {
  if (h == nullptr || h->type != UV_UDP) return nullptr;
  auto* a = static_cast<AdoptedUdp*>(uv_private::udp_adoption_slot(h));
  if (a == nullptr || a->magic != kMagic || a->handle != h) return nullptr;
  a->set->ctx->notice_fork();
  return a;
}

// Mirrors the engine's send queue into libuv's counters.
void mirror_queue(AdoptedUdp* a) noexcept {
  a->handle->send_queue_size = a->d.queued_bytes;
  a->handle->send_queue_count = a->d.queued_count;
}

// Whether the socket asked for ICMP errors (uv_udp_bind's
// UV_UDP_LINUX_RECVERR sets these); looked at when adopted and at each
// uv_udp_recv_start.
bool recverr_on(int fd) noexcept {
  int on = 0;
  socklen_t len = sizeof on;
  if (::getsockopt(fd, IPPROTO_IP, IP_RECVERR, &on, &len) == 0 && on) return true;
  on = 0;
  len = sizeof on;
  return ::getsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &on, &len) == 0 && on;
}

// Tells the engine whether ICMP errors come back to the socket (see
// dgram::set_errors_come_back): asked for, or a connected socket's.
void update_errors(AdoptedUdp* a) noexcept {
  dg::set_errors_come_back(&a->d, a->recverr || (a->handle->flags & uf::kUdpConnected));
}

// libuv's rule for ACTIVE: while receiving, or while sends are queued.
void update_active(AdoptedUdp* a) noexcept {
  uv_udp_t* h = a->handle;
  if (h->flags & uf::kClosing) return;
  if ((a->d.flags & dg::kReceiving) || a->d.queued_count > 0) {
    uv_private::handle_start(as_handle(h));
  } else {
    uv_private::handle_stop(as_handle(h));
  }
}

// ---- The engine's callbacks, as libuv's ---------------------------------------

void host_alloc(dg::Dgram* d, std::size_t suggested, iovec* buf) noexcept {
  AdoptedUdp* a = of(d);
  uv_udp_t* h = a->handle;
  uv_buf_t b = uv_buf_init(nullptr, 0);
  a->recv_cb_of_alloc = h->recv_cb;
  if (h->alloc_cb) h->alloc_cb(as_handle(h), suggested, &b);
  buf->iov_base = b.base;
  buf->iov_len = b.len;
}

void host_recv(dg::Dgram* d, ssize_t nread, const iovec* buf, const sockaddr* addr,
               unsigned flags) noexcept {
  AdoptedUdp* a = of(d);
  uv_udp_t* h = a->handle;
  uv_udp_recv_cb cb = h->recv_cb != nullptr ? h->recv_cb : a->recv_cb_of_alloc;
  if (addr != nullptr) ++a->set->counts.received;
  const uv_buf_t b = uv_buf_init(static_cast<char*>(buf->iov_base), static_cast<unsigned>(buf->iov_len));
  if (cb) cb(h, nread, &b, addr, flags);
}

void host_send_done(dg::Dgram* d, dg::SendReq* r, int status) noexcept {
  AdoptedUdp* a = of(d);
  uv_udp_t* h = a->handle;
  auto* req = static_cast<uv_udp_send_t*>(r->owner);
  // As uv__udp_run_completed: the counters first, then the callback.
  mirror_queue(a);
  // The engine is done with the SendReq (its final completion came): back to
  // the pool before the callback, which may send again.
  r->next = a->set->free_sends;
  a->set->free_sends = r;
  uv_private::req_unregister(h->loop);
  if (req->cb) req->cb(req, status);  // the request may be freed from here on
  // The handle's memory stays valid until its close callback, which comes
  // later; the AdoptedUdp block until `closed`, which comes later too.
  update_active(a);
}

bool host_defer(dg::Dgram* d) noexcept {
  LoopContext* ctx = of(d)->set->ctx;
  try {
    ctx->chain().executor().spawn([d] { dg::run_deferred(d); });
    return true;
  } catch (...) {
    return false;  // the engine comes back through a nop instead
  }
}

void unlink(AdoptedUdp* a) noexcept {
  if (a->prev) {
    a->prev->next = a->next;
  } else {
    a->set->head = a->next;
  }
  if (a->next) a->next->prev = a->prev;
  a->prev = a->next = nullptr;
}

// The engine closed the socket (through the ring) and nothing of it is in
// flight: libuv's own close takes it from here (its fd is -1 already, its
// queues are empty), and runs the close callback in this iteration's closing
// phase, after the send callbacks the engine completed with UV_ECANCELED, as
// libuv orders them.
void host_closed(dg::Dgram* d) noexcept {
  AdoptedUdp* a = of(d);
  uv_close_cb cb = a->close_cb;
  uv_udp_t* h = a->handle;
  unlink(a);
  uv_private::clear_udp_adoption_slot(h);
  a->magic = 0;
  delete a;
  h->send_queue_size = 0;
  h->send_queue_count = 0;
  h->flags &= ~uf::kClosing;  // uv_close asserts the handle is not closing yet
  g_uv.close(as_handle(h), cb);
}

constexpr dg::Host kHost = {
    .alloc = &host_alloc,
    .recv = &host_recv,
    .send_done = &host_send_done,
    .defer = &host_defer,
    .closed = &host_closed,
};

// ---- Deciding ------------------------------------------------------------------

UdpSet* udp_set(LoopContext* ctx) noexcept {
  if (auto* set = ctx->find_extension<UdpSet>()) return set;
  std::unique_ptr<UdpSet> made(new (std::nothrow) UdpSet(ctx));
  if (!made) return nullptr;
  return ctx->add_extension(std::move(made));
}

void claim_alloc(uv_handle_t*, std::size_t, uv_buf_t* buf) { *buf = uv_buf_init(nullptr, 0); }
void claim_recv(uv_udp_t*, ssize_t, const uv_buf_t*, const sockaddr*, unsigned) {}

// Keeps the socket's fd taken in libuv's eyes (uv_udp_open or uv_poll_init of
// the same fd say UV_EEXIST, as they do for a socket libuv watches): libuv's
// own uv_udp_recv_start registers it, with callbacks that never run, and the
// watch is taken off again at once, the registration kept. False leaves the
// socket to libuv.
bool claim_fd(uv_udp_t* h) noexcept {
  if (uv_private::udp_fd_claimed(h)) return true;
  if (g_uv.recv_start(h, &claim_alloc, &claim_recv) != 0) return false;
  const bool claimed = uv_private::udp_fd_claimed(h);
  uv_private::udp_disarm_keep_fd(h);
  return claimed;
}

// Adopts `h` if everything allows it; null leaves it to libuv.
AdoptedUdp* try_adopt(uv_udp_t* h) noexcept {
  if (h == nullptr || h->type != UV_UDP || (h->flags & (uf::kClosing | uf::kClosed))) {
    return nullptr;
  }
  const int fd = uv_private::udp_fd(h);
  if (fd < 0 || !uv_private::udp_quiet(h)) return nullptr;
  if (uv_private::udp_adoption_slot(h) != nullptr) return nullptr;  // not ours to touch
  LoopContext* ctx = LoopContext::get(h->loop);
  if (ctx == nullptr || loop_gate(ctx) != nullptr) return nullptr;
  UdpSet* set = udp_set(ctx);
  if (set == nullptr) return nullptr;
  auto* a = new (std::nothrow) AdoptedUdp;
  if (a == nullptr) return nullptr;
  if (!claim_fd(h)) {
    delete a;
    return nullptr;
  }
  a->handle = h;
  a->set = set;
  dg::init(&a->d, &ctx->chain().io(), &kHost, a, fd);
  a->d.edges = &set->edges;
  a->recverr = recverr_on(fd);
  update_errors(a);
  // libuv's own counts keep the loop alive for this socket's ops (see
  // LoopContext::libuv_accounted), until it closes.
  a->d.life.share_count(ctx->libuv_accounted());
  a->next = set->head;
  if (set->head) set->head->prev = a;
  set->head = a;
  uv_private::udp_adoption_slot(h) = a;
  ++set->counts.adopted;
  return a;
}

// uv__udp_check_before_send, in its order: the address length, or an error.
int check_before_send(const uv_udp_t* h, const sockaddr* addr) noexcept {
  if (addr != nullptr && (h->flags & uf::kUdpConnected)) return UV_EISCONN;
  if (addr == nullptr && !(h->flags & uf::kUdpConnected)) return UV_EDESTADDRREQ;
  if (addr == nullptr) return 0;
  switch (addr->sa_family) {
    case AF_INET: return sizeof(sockaddr_in);
    case AF_INET6: return sizeof(sockaddr_in6);
    case AF_UNIX: return sizeof(sockaddr_un);
    default: return UV_EINVAL;
  }
}

// uv__udp_maybe_deferred_bind through libuv's public uv_udp_bind (the same
// uv__udp_bind with no flags): a socket of `family` bound to the wildcard
// address, port 0. 0, or libuv's error.
int deferred_bind(uv_udp_t* h, int family) noexcept {
  if (uv_private::udp_fd(h) != -1) return 0;
  if (family == AF_INET6) {
    sockaddr_in6 any{};
    any.sin6_family = AF_INET6;
    any.sin6_addr = in6addr_any;
    return uv_udp_bind(h, reinterpret_cast<const sockaddr*>(&any), 0);
  }
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_ANY);
  return uv_udp_bind(h, reinterpret_cast<const sockaddr*>(&any), 0);
}

}  // namespace

void set_uv_udp_fns(const UvUdpFns& fns) noexcept { g_uv = fns; }

const char* loop_gate(LoopContext* ctx) noexcept {
  if (const char* why = process_gate()) return why;
  IoBackend& io = ctx->chain().io();
  if (!io.native(OpCode::sendmsg)) return "the loop runs on the epoll fallback";
  if (!io.native(OpCode::recvmsg_multishot)) {
    return "the kernel has no multishot recvmsg with provided buffers (Linux 6.0)";
  }
  return nullptr;
}

int init(uv_loop_t* loop, uv_udp_t* handle) noexcept {
  const int r = g_uv.init(loop, handle);
  if (r == 0) uv_private::clear_udp_adoption_slot(handle);
  return r;
}

int init_ex(uv_loop_t* loop, uv_udp_t* handle, unsigned int flags) noexcept {
  const int r = g_uv.init_ex(loop, handle, flags);
  if (r == 0) uv_private::clear_udp_adoption_slot(handle);
  return r;
}

int recv_start(uv_udp_t* handle, uv_alloc_cb alloc_cb, uv_udp_recv_cb recv_cb) noexcept {
  if (handle == nullptr || handle->type != UV_UDP || alloc_cb == nullptr || recv_cb == nullptr) {
    return g_uv.recv_start(handle, alloc_cb, recv_cb);  // libuv's UV_EINVAL
  }
  AdoptedUdp* a = adopted(handle);
  if (a == nullptr && !(handle->flags & uf::kClosing) && uv_private::udp_quiet(handle)) {
    // uv__udp_recv_start's deferred bind, then adoption, which needs the fd.
    LoopContext* ctx = LoopContext::get(handle->loop);
    if (ctx != nullptr && loop_gate(ctx) == nullptr) {
      if (int err = deferred_bind(handle, AF_INET); err != 0) return err;
      a = try_adopt(handle);
    }
  }
  if (a == nullptr) return g_uv.recv_start(handle, alloc_cb, recv_cb);
  uv_udp_t* h = a->handle;
  if (h->flags & uf::kClosing) return UV_EINVAL;  // libuv would bind a new socket
  if (a->d.flags & dg::kReceiving) return UV_EALREADY;
  h->alloc_cb = alloc_cb;
  h->recv_cb = recv_cb;
  a->recverr = recverr_on(uv_private::udp_fd(h));
  update_errors(a);
  dg::recv_start(&a->d, uv_udp_using_recvmmsg(h) != 0);
  update_active(a);
  a->set->ctx->update_ref();
  return 0;
}

int recv_stop(uv_udp_t* handle) noexcept {
  AdoptedUdp* a = adopted(handle);
  if (a == nullptr) return g_uv.recv_stop(handle);
  uv_udp_t* h = a->handle;
  dg::recv_stop(&a->d);
  // As uv__udp_recv_stop: the handle stays active only while sends wait.
  update_active(a);
  h->alloc_cb = nullptr;
  h->recv_cb = nullptr;
  return 0;
}

int send(uv_udp_send_t* req, uv_udp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
         const sockaddr* addr, uv_udp_send_cb cb) noexcept {
  if (handle == nullptr || handle->type != UV_UDP) {
    return g_uv.send(req, handle, bufs, nbufs, addr, cb);  // libuv's UV_EINVAL
  }
  const int addrlen = check_before_send(handle, addr);
  if (addrlen < 0) return addrlen;
  const bool valid = req != nullptr && bufs != nullptr && nbufs > 0;
  AdoptedUdp* a = adopted(handle);
  if (a == nullptr && valid && !(handle->flags & uf::kClosing) && uv_private::udp_quiet(handle)) {
    // uv__udp_send's deferred bind (for an address of the families libuv
    // binds: it asserts on any other), then adoption.
    LoopContext* ctx = LoopContext::get(handle->loop);
    const bool bindable = uv_private::udp_fd(handle) != -1 ||
                          (addr != nullptr && (addr->sa_family == AF_INET || addr->sa_family == AF_INET6));
    if (ctx != nullptr && loop_gate(ctx) == nullptr && bindable) {
      if (addr != nullptr) {
        if (int err = deferred_bind(handle, addr->sa_family); err != 0) return err;
      }
      a = try_adopt(handle);
    }
  }
  if (a == nullptr) return g_uv.send(req, handle, bufs, nbufs, addr, cb);
  if (!valid) return UV_EINVAL;  // libuv asserts
  uv_udp_t* h = a->handle;
  // A closing handle has no socket for libuv any more (it would bind a new
  // one, then abort at its close).
  if (h->flags & uf::kClosing) return UV_EBADF;
  UdpSet* set = a->set;
  dg::SendReq* r = set->free_sends;
  if (r != nullptr) {
    set->free_sends = r->next;
  } else {
    r = new (std::nothrow) dg::SendReq;
    if (r == nullptr) return UV_ENOMEM;
  }
  if (int err = dg::send_prepare(r, reinterpret_cast<const iovec*>(bufs), nbufs, addr,
                                 static_cast<unsigned>(addrlen));
      err < 0) {
    r->next = set->free_sends;
    set->free_sends = r;
    return err;
  }
  r->owner = req;
  // What uv__udp_send fills in that a program may read; libuv's queue
  // fields and its copy of the buffers stay unused.
  uv_private::req_init(h->loop, reinterpret_cast<uv_req_t*>(req), UV_UDP_SEND);
  req->handle = h;
  req->cb = cb;
  ++set->counts.sent;
  update_errors(a);  // uv_udp_connect may have changed it
  dg::send(&a->d, r);
  mirror_queue(a);
  update_active(a);
  set->ctx->update_ref();
  return 0;
}

int try_send(uv_udp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
             const sockaddr* addr) noexcept {
  AdoptedUdp* a = adopted(handle);
  if (a == nullptr) return g_uv.try_send(handle, bufs, nbufs, addr);
  uv_udp_t* h = a->handle;
  const int addrlen = check_before_send(h, addr);
  if (addrlen < 0) return addrlen;
  if (bufs == nullptr || nbufs == 0) return UV_EINVAL;  // 1.51's answer; 1.44 asserts
  if (h->flags & uf::kClosing) return UV_EBADF;
  // Sends queued (in the ring or waiting for it) say UV_EAGAIN, as libuv's
  // "already sending a message": nothing overtakes them.
  return dg::try_send(&a->d, reinterpret_cast<const iovec*>(bufs), nbufs, addr,
                      static_cast<unsigned>(addrlen));
}

bool close(uv_udp_t* handle, uv_close_cb cb) noexcept {
  AdoptedUdp* a = adopted(handle);
  if (a == nullptr) return false;
  uv_udp_t* h = a->handle;
  // Closing already: libuv asserts; nothing here may change the close under
  // way (its callback stays the first one given).
  if (h->flags & uf::kClosing) return true;
  // What uv_close and uv__udp_close do at once; the socket stays open until
  // the engine has nothing in flight on it, and libuv's own close follows
  // then (host_closed).
  h->flags |= uf::kClosing;
  h->close_cb = cb;
  a->close_cb = cb;
  uv_private::handle_stop(as_handle(h));
  // libuv has no fd for a closing handle (uv_fileno says UV_EBADF). A closing
  // handle is no longer among libuv's active ones, and not yet on its closing
  // list: its ops keep the loop alive as ringpark's own.
  uv_private::release_udp_fd(h);
  uv_private::set_udp_fd(h, -1);
  a->d.life.share_count(nullptr);
  LoopContext* ctx = a->set->ctx;
  dg::close(&a->d);
  ctx->update_ref();
  return true;
}

std::string stats_part(LoopContext* ctx, std::uint64_t* libuv_syscalls) {
  if (const char* why = loop_gate(ctx)) return std::string("; UDP sockets stay libuv's (") + why + ")";
  const UdpSet* set = ctx->find_extension<UdpSet>();
  const Counts c = set ? set->counts : Counts{};
  *libuv_syscalls += c.received + c.sent;
  return "; adopted " + std::to_string(c.adopted) + " UDP sockets, " + std::to_string(c.received) +
         " datagrams received and " + std::to_string(c.sent) + " sent through the ring";
}

}  // namespace ringpark::detail::adopt::udp
