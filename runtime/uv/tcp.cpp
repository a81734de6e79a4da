// rp_tcp_*: TCP handles with libuv's calls, a front end of the stream engine
// (runtime/stream/stream.hpp), which runs their socket I/O as ops in the
// loop's ring (or on the epoll fallback, which gives the same results). Here
// are only what is rp_tcp_t's own: the C surface and its argument checks,
// socket setup (socket, bind, listen, options: none of them blocks, so they
// are plain syscalls, as in libuv's tcp.c), and the translation of the
// engine's callbacks into the user's.
//
// Memory (DESIGN.md, "Ownership of memory the kernel may touch"): the engine's
// Stream, with the ops the kernel may write into, lives in rp_tcp_t's private
// words, each request's part in the request's; the user keeps both alive until
// the callback that ends them, as libuv's rules say.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <new>

#include "ringpark.h"
#include "runtime/stream/stream.hpp"
#include "runtime/uv/loop.hpp"
#include "runtime/uv/private.hpp"

namespace ringpark::detail {
namespace {

namespace st = stream;

// Marks memory that rp_tcp_init set up, so that a call on an uninitialised
// handle fails with UV_EINVAL instead of following garbage pointers.
constexpr std::uint32_t kMagic = 0x72707463;  // "rptc"

struct TcpSet;

struct TcpState {
  std::uint32_t magic = kMagic;
  bool nodelay = false;    // TCP_NODELAY wanted, applied to any socket the handle gets
  int delayed_error = 0;   // bind's EADDRINUSE, reported by listen and connect
  rp_tcp_t* handle = nullptr;
  uv_loop_t* loop = nullptr;
  // Valid while an op is in flight (rp_loop_close refuses a busy loop), so
  // completions use it as is; calls from the user refresh it when idle.
  LoopContext* ctx = nullptr;
  rp_alloc_cb alloc_cb = nullptr;
  rp_read_cb read_cb = nullptr;
  rp_connection_cb connection_cb = nullptr;
  rp_close_cb close_cb = nullptr;
  TcpState* prev = nullptr;  // the loop's live handles (TcpSet)
  TcpState* next = nullptr;
  st::Stream s;
};

// The public structs reserve room for these; if this fails, grow private_ in
// include/ringpark.h (an ABI change).
template <typename State, typename Public>
constexpr bool fits() {
  return sizeof(State) <= sizeof(Public::private_) &&
         alignof(State) <= alignof(decltype(Public::private_[0]));
}
static_assert(fits<TcpState, rp_tcp_t>(), "rp_tcp_t::private_ is too small");
static_assert(fits<st::WriteReq, rp_write_t>(), "rp_write_t::private_ is too small");
static_assert(fits<st::ConnectReq, rp_connect_t>(), "rp_connect_t::private_ is too small");
static_assert(fits<st::ShutdownReq, rp_shutdown_t>(), "rp_shutdown_t::private_ is too small");

template <typename State, typename Public>
State* state_of(Public* p) noexcept {
  return std::launder(reinterpret_cast<State*>(p->private_));
}

// The handle's state, or null for a null or uninitialised handle.
TcpState* live(rp_tcp_t* handle) noexcept {
  if (handle == nullptr) return nullptr;
  TcpState* t = state_of<TcpState>(handle);
  return t->magic == kMagic && t->handle == handle ? t : nullptr;
}
const TcpState* live(const rp_tcp_t* handle) noexcept {
  return live(const_cast<rp_tcp_t*>(handle));
}

TcpState* of(st::Stream* s) noexcept { return static_cast<TcpState*>(s->owner); }

bool closing(const TcpState* t) noexcept { return t->s.closing(); }

// The loop's live rp_tcp_t handles, so that a forked child can resume them on
// its own ring.
struct TcpSet final : LoopContext::Extension {
  void stop() noexcept override {}
  void after_fork() noexcept override {
    for (TcpState* t = head; t != nullptr; t = t->next) {
      st::after_fork(&t->s, &t->ctx->chain().io());
    }
  }
  TcpState* head = nullptr;
};

bool link(LoopContext* ctx, TcpState* t) noexcept {
  TcpSet* set = ctx->find_extension<TcpSet>();
  if (set == nullptr) {
    std::unique_ptr<TcpSet> made(new (std::nothrow) TcpSet);
    set = made ? ctx->add_extension(std::move(made)) : nullptr;
    if (set == nullptr) return false;
  }
  t->next = set->head;
  if (set->head) set->head->prev = t;
  set->head = t;
  return true;
}

void unlink(TcpState* t) noexcept {
  TcpSet* set = t->ctx->find_extension<TcpSet>();
  if (t->prev) {
    t->prev->next = t->next;
  } else {
    set->head = t->next;
  }
  if (t->next) t->next->prev = t->prev;
  t->prev = t->next = nullptr;
}

// The handle's context, first told to notice a fork (every entry point calls
// this, so that a child never reaches the parent's chain).
LoopContext* ctx_for(TcpState* t) noexcept {
  t->ctx->notice_fork();
  if (t->s.life.in_flight() == 0) {
    // Idle: the loop may have a new context (closed with plain uv_loop_close
    // and made again at the same address).
    LoopContext* ctx = LoopContext::get(t->loop);
    if (ctx != nullptr && ctx != t->ctx) {
      unlink(t);
      t->ctx = ctx;
      if (!link(ctx, t)) return nullptr;
      st::set_backend(&t->s, &ctx->chain().io());
    }
  }
  return t->ctx;
}

// ---- The engine's callbacks, as rp_tcp_t's ----------------------------------

void host_alloc(st::Stream* s, std::size_t suggested, uv_buf_t* buf) noexcept {
  of(s)->alloc_cb(of(s)->handle, suggested, buf);
}

void host_read(st::Stream* s, ssize_t nread, const uv_buf_t* buf) noexcept {
  TcpState* t = of(s);
  if (t->read_cb) t->read_cb(t->handle, nread, buf);
}

void host_write_done(st::Stream* s, st::WriteReq* w, int status) noexcept {
  auto* req = static_cast<rp_write_t*>(w->owner);
  uv_private::req_unregister(of(s)->loop);
  if (req->cb) req->cb(req, status);  // the request may be freed from here on
}

void host_connect_done(st::Stream* s, st::ConnectReq* c, int status) noexcept {
  auto* req = static_cast<rp_connect_t*>(c->owner);
  uv_private::req_unregister(of(s)->loop);
  if (req->cb) req->cb(req, status);
}

void host_shutdown_done(st::Stream* s, st::ShutdownReq* r, int status) noexcept {
  auto* req = static_cast<rp_shutdown_t*>(r->owner);
  uv_private::req_unregister(of(s)->loop);
  if (req->cb) req->cb(req, status);
}

void host_connection(st::Stream* s, int status) noexcept {
  TcpState* t = of(s);
  t->connection_cb(t->handle, status);
}

void host_closed(st::Stream* s) noexcept {
  TcpState* t = of(s);
  rp_close_cb cb = t->close_cb;
  unlink(t);
  t->ctx->handle_closed(t->handle);
  // The user may free or reuse the handle from here on.
  if (cb) cb(t->handle);
}

// rp_tcp_t's reads follow its documented contract (include/ringpark.h): the
// bytes waiting as the suggested size, buffers lent on the plain path, and
// EOF and errors with a null buffer on the multishot path.
constexpr st::Host kHost = {
    .alloc = &host_alloc,
    .read = &host_read,
    .write_done = &host_write_done,
    .connect_done = &host_connect_done,
    .shutdown_done = &host_shutdown_done,
    .connection = &host_connection,
    .closed = &host_closed,
    .settled = nullptr,
    .reading_ended = nullptr,
    .lend_buffers = true,
    .fixed_suggestion = false,
    .end_with_buffer = false,
};

// ---- Sockets ------------------------------------------------------------------

int set_nodelay(int fd, int on) noexcept {
  return ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) < 0 ? -errno : 0;
}

// Gives the handle a fresh socket of `domain`, non-blocking and close-on-exec
// as libuv makes them.
int new_socket(TcpState* t, int domain) noexcept {
  int fd = ::socket(domain, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  if (t->nodelay) {
    if (int err = set_nodelay(fd, 1); err < 0) {
      ::close(fd);
      return err;
    }
  }
  st::set_socket(&t->s, fd);
  return 0;
}

// Length of an IPv4 or IPv6 address, or 0 for any other family.
socklen_t ip_addr_len(const sockaddr* addr) noexcept {
  if (addr->sa_family == AF_INET) return sizeof(sockaddr_in);
  if (addr->sa_family == AF_INET6) return sizeof(sockaddr_in6);
  return 0;
}

int getsockpeername(const rp_tcp_t* handle, sockaddr* name, int* namelen,
                    int (*fn)(int, sockaddr*, socklen_t*)) noexcept {
  const TcpState* t = live(handle);
  if (t == nullptr || name == nullptr || namelen == nullptr || *namelen < 0) return UV_EINVAL;
  if (t->delayed_error) return t->delayed_error;
  if (t->s.fd() < 0 || closing(t)) return UV_EBADF;  // as uv_fileno
  socklen_t len = static_cast<socklen_t>(*namelen);
  if (fn(t->s.fd(), name, &len) < 0) return -errno;
  *namelen = static_cast<int>(len);
  return 0;
}

}  // namespace
}  // namespace ringpark::detail

using namespace ringpark::detail;

extern "C" {

int rp_tcp_init(uv_loop_t* loop, rp_tcp_t* handle) {
  if (loop == nullptr || handle == nullptr) return UV_EINVAL;
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) return UV_EMFILE;
  // Refused before anything is written: the handle may be live (a second
  // init), and then its state must stay as it is.
  if (int err = ctx->handle_opened(handle); err != 0) return err;
  auto* t = new (handle->private_) TcpState;
  t->handle = handle;
  t->loop = loop;
  t->ctx = ctx;
  if (!link(ctx, t)) {
    t->magic = 0;
    ctx->handle_closed(handle);
    return UV_ENOMEM;
  }
  st::init(&t->s, &ctx->chain().io(), &kHost, t);
  handle->loop = loop;
  return 0;
}

int rp_tcp_open(rp_tcp_t* handle, uv_os_sock_t sock) {
  TcpState* t = live(handle);
  if (t == nullptr || closing(t)) return UV_EINVAL;
  if (t->s.fd() >= 0) return t->s.fd() == sock ? 0 : UV_EBUSY;
  const int fl = ::fcntl(sock, F_GETFL);
  if (fl < 0) return -errno;
  if (!(fl & O_NONBLOCK) && ::fcntl(sock, F_SETFL, fl | O_NONBLOCK) < 0) return -errno;
  if (t->nodelay) {
    if (int err = set_nodelay(sock, 1); err < 0) return err;
  }
  st::set_socket(&t->s, sock);
  t->s.flags |= st::kReadable | st::kWritable;
  return 0;
}

int rp_tcp_bind(rp_tcp_t* handle, const struct sockaddr* addr, unsigned int flags) {
  TcpState* t = live(handle);
  if (t == nullptr || addr == nullptr || closing(t)) return UV_EINVAL;
  const socklen_t len = ip_addr_len(addr);
  if (len == 0 || (flags & ~static_cast<unsigned>(UV_TCP_IPV6ONLY)) != 0) return UV_EINVAL;
  if ((flags & UV_TCP_IPV6ONLY) && addr->sa_family != AF_INET6) return UV_EINVAL;
  if (t->s.fd() < 0) {
    if (int err = new_socket(t, addr->sa_family); err < 0) return err;
  }
  const int fd = t->s.fd();
  int on = 1;
  if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0) return -errno;
  if (addr->sa_family == AF_INET6) {
    on = (flags & UV_TCP_IPV6ONLY) != 0;
    if (::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) < 0) return -errno;
  }
  if (::bind(fd, addr, len) < 0) {
    // As libuv: EADDRINUSE waits for listen or connect.
    if (errno != EADDRINUSE) return errno == EAFNOSUPPORT ? UV_EINVAL : -errno;
    t->delayed_error = UV_EADDRINUSE;
  } else {
    t->delayed_error = 0;
  }
  return 0;
}

int rp_listen(rp_tcp_t* server, int backlog, rp_connection_cb cb) {
  TcpState* t = live(server);
  if (t == nullptr || cb == nullptr || closing(t)) return UV_EINVAL;
  if (t->delayed_error) return t->delayed_error;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  if ((t->s.role != st::Role::none && t->s.role != st::Role::accept &&
       t->s.role != st::Role::backoff) ||
      t->s.ms_active)
    return UV_EBUSY;  // reading
  if (t->s.fd() < 0) {
    if (int err = new_socket(t, AF_INET); err < 0) return err;  // as libuv
  }
  if (::listen(t->s.fd(), backlog) < 0) return -errno;
  t->connection_cb = cb;
  st::listen(&t->s);
  ctx->update_ref();
  return 0;
}

int rp_accept(rp_tcp_t* server, rp_tcp_t* client) {
  TcpState* s = live(server);
  TcpState* c = live(client);
  if (s == nullptr || c == nullptr || closing(c)) return UV_EINVAL;
  if (s->s.acc_count == 0) return UV_EAGAIN;
  if (c->s.fd() >= 0) return UV_EBUSY;
  const int fd = st::accept(&s->s);
  if (c->nodelay) set_nodelay(fd, 1);
  st::set_socket(&c->s, fd);
  c->s.flags |= st::kReadable | st::kWritable;
  return 0;
}

int rp_tcp_connect(rp_connect_t* req, rp_tcp_t* handle, const struct sockaddr* addr,
                   rp_connect_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr || addr == nullptr || closing(t)) return UV_EINVAL;
  const socklen_t len = ip_addr_len(addr);
  if (len == 0) return UV_EINVAL;
  if (t->s.connect != nullptr) return UV_EALREADY;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  if (t->delayed_error == 0 && t->s.fd() < 0) {
    if (int err = new_socket(t, addr->sa_family); err < 0) return err;
  }
  auto* c = new (req->private_) st::ConnectReq;
  c->owner = req;
  c->forced = t->delayed_error;
  // Copied: the kernel reads the address when the SQE is issued, after this
  // returns; the request keeps the copy until the op's final CQE.
  std::memcpy(&c->addr, addr, len);
  req->handle = handle;
  req->cb = cb;
  uv_private::req_register(t->loop);
  st::connect(&t->s, c, len);
  ctx->update_ref();
  return 0;
}

int rp_read_start(rp_tcp_t* handle, rp_alloc_cb alloc_cb, rp_read_cb read_cb) {
  TcpState* t = live(handle);
  if (t == nullptr || alloc_cb == nullptr || read_cb == nullptr || closing(t)) return UV_EINVAL;
  if (t->s.flags & st::kReading) return UV_EALREADY;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  const rp_alloc_cb old_alloc = t->alloc_cb;
  const rp_read_cb old_read = t->read_cb;
  t->alloc_cb = alloc_cb;
  t->read_cb = read_cb;
  if (int err = st::read_start(&t->s); err < 0) {
    t->alloc_cb = old_alloc;
    t->read_cb = old_read;
    return err;
  }
  ctx->update_ref();
  return 0;
}

int rp_read_stop(rp_tcp_t* handle) {
  TcpState* t = live(handle);
  if (t == nullptr) return UV_EINVAL;
  t->ctx->notice_fork();
  st::read_stop(&t->s);
  return 0;
}

int rp_write(rp_write_t* req, rp_tcp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
             rp_write_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr || bufs == nullptr || nbufs == 0) return UV_EINVAL;
  for (unsigned i = 0; i < nbufs; ++i) {
    if (bufs[i].base == nullptr && bufs[i].len > 0) return UV_EINVAL;
  }
  if (t->s.fd() < 0 || closing(t)) return UV_EBADF;  // as libuv, whose fd is -1 then
  if (!(t->s.flags & st::kWritable)) return UV_EPIPE;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  auto* w = new (req->private_) st::WriteReq;
  if (int err = st::write_prepare(w, bufs, nbufs); err < 0) return err;
  w->owner = req;
  req->handle = handle;
  req->cb = cb;
  uv_private::req_register(t->loop);
  st::write(&t->s, w);
  ctx->update_ref();
  return 0;
}

int rp_shutdown(rp_shutdown_t* req, rp_tcp_t* handle, rp_shutdown_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || req == nullptr) return UV_EINVAL;
  if (!(t->s.flags & st::kWritable) || (t->s.flags & (st::kShut | st::kShutting)) ||
      closing(t) || t->s.fd() < 0)
    return UV_ENOTCONN;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  auto* r = new (req->private_) st::ShutdownReq;
  r->owner = req;
  req->handle = handle;
  req->cb = cb;
  uv_private::req_register(t->loop);
  st::shutdown(&t->s, r);
  ctx->update_ref();
  return 0;
}

int rp_close(rp_tcp_t* handle, rp_close_cb cb) {
  TcpState* t = live(handle);
  if (t == nullptr || closing(t)) return UV_EINVAL;
  LoopContext* ctx = ctx_for(t);
  if (ctx == nullptr) return UV_EMFILE;
  t->close_cb = cb;
  st::close(&t->s);
  ctx->update_ref();
  return 0;
}

int rp_is_closing(const rp_tcp_t* handle) {
  const TcpState* t = live(handle);
  return t != nullptr && closing(t);
}

int rp_tcp_nodelay(rp_tcp_t* handle, int enable) {
  TcpState* t = live(handle);
  if (t == nullptr) return UV_EINVAL;
  if (t->s.fd() >= 0) {
    if (int err = set_nodelay(t->s.fd(), enable ? 1 : 0); err < 0) return err;
  }
  t->nodelay = enable != 0;
  return 0;
}

int rp_tcp_getsockname(const rp_tcp_t* handle, struct sockaddr* name, int* namelen) {
  return getsockpeername(handle, name, namelen, &::getsockname);
}

int rp_tcp_getpeername(const rp_tcp_t* handle, struct sockaddr* name, int* namelen) {
  return getsockpeername(handle, name, namelen, &::getpeername);
}

int rp_fileno(const rp_tcp_t* handle, uv_os_fd_t* fd) {
  const TcpState* t = live(handle);
  if (t == nullptr || fd == nullptr) return UV_EINVAL;
  if (t->s.fd() < 0 || closing(t)) return UV_EBADF;
  *fd = t->s.fd();
  return 0;
}

}  // extern "C"
