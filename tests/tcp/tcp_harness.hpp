// The harness of the TCP stream suite: one fixture, TcpTest<FE>, over the
// front ends of the stream engine (runtime/stream/), each described by a
// trait:
//   - RpTcp: rp_tcp_t and the rp_* calls;
//   - AdoptedTcp: a plain libuv uv_tcp_t and the uv_* calls, which reach
//     adoption (runtime/uv/adopt/) because the test binary is linked against
//     libringpark-preload.so ahead of libuv. Listening, accepting and
//     connecting stay libuv's (they are not interposed), as in any libuv
//     program.
// A test is written once against the fixture's helpers (make_conn, pair,
// read_start, write, shutdown, close...), whose callbacks the trait makes
// from its own callback types; where the two contracts differ on purpose
// (include/ringpark.h: rp_tcp_t lends buffers on its plain path, ends a
// multishot read with a null buffer, suggests the bytes waiting), the trait
// says which applies, so a test asserts the exact contract of each.
//
// The binary runs in three configurations (tests/CMakeLists.txt): io_uring
// with adoption, which must then be on (a silently disabled adoption fails);
// the epoll fallback; and RINGPARK_ADOPT=0, where AdoptedTcp is plain libuv,
// the oracle every uv_* expectation must also hold for.
//
// Every test is bounded in time (run_until runs the loop with a ticking
// timer until a deadline), uses 127.0.0.1 only, and ends with every handle
// closed exactly once and the loop closed. Read buffers are malloc'd and
// freed by the read callback in every case, so a buffer that never comes
// back shows up as a leak under ASan.
#pragma once

#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "ringpark.h"

namespace ringpark::test::tcp {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

inline sockaddr_in loopback(int port) {
  sockaddr_in a{};
  uv_ip4_addr("127.0.0.1", port, &a);
  return a;
}

inline const sockaddr* sa(const sockaddr_in& a) { return reinterpret_cast<const sockaddr*>(&a); }

// Bytes that show where they sit in the stream: a lost, repeated or reordered
// chunk shows up as a mismatch.
inline std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + i / 251) & 0xff);
  return s;
}

// Aborts the process, naming the test, if it is still alive after `limit`:
// for a uv_run(DEFAULT) that a bug would keep from returning.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::milliseconds limit, const char* what)
      : thread_([this, limit, what] {
          std::unique_lock lock(mutex_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "watchdog: %s did not return within %lld ms\n", what,
                         static_cast<long long>(limit.count()));
            std::abort();
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// ---- What a connection saw, whatever its front end ------------------------------

struct ConnState {
  std::string received;
  std::vector<ssize_t> nreads;  // every nread, in order
  int eof = 0;
  int cancelled = 0;  // read_cb(UV_ECANCELED): a lent buffer came back at close
  int enobufs = 0;
  int read_errors = 0;  // negative nread other than UV_EOF and UV_ECANCELED (UV_ENOBUFS too)
  ssize_t last_error = 0;
  int null_end_bufs = 0;    // UV_EOF or an error delivered with a null buffer
  int filled_end_bufs = 0;  // ... with a buffer from alloc_cb
  int close_calls = 0;
  int connect_calls = 0;
  int connect_status = 1;
  int write_errors = 0;
  std::size_t max_read = 0;  // the largest nread
  int allocs = 0;
  int calls_by_set[2][2] = {};  // [set][0: alloc_cb, 1: read_cb]
  int odd_suggestions = 0;      // alloc_cb asked for something other than 65536
  bool in_read_start = false;
  bool lends = false;  // alloc_cb ran inside a read_start: buffers are lent (rp plain path)
  bool echo = false;   // writes back what it reads
  bool close_on_error = false;  // closes itself on EOF or a read error
  std::size_t want = 0;         // ping mode: bytes expected before the next ping
  int pings_left = 0;
  // Checking mode for large transfers: bytes are compared with *expect as
  // they come, not kept; `got` counts them, `mismatch` is the first offset
  // that differed (or npos).
  const std::string* expect = nullptr;
  std::size_t got = 0;
  std::size_t mismatch = std::string::npos;
};

// Which buffer comes with UV_EOF or a read error.
enum class EndBuffer { kFilled, kNull, kEither };

// ---- The front ends -------------------------------------------------------------
//
// A trait holds the handle and request types, the calls, and the contract
// differences. Callbacks are made from thunks that find the harness object in
// the handle's or request's `data` (the first field of each, in both APIs).

// `Set` tells two sets of read callbacks apart (distinct function pointers),
// for tests that start reading again with other callbacks.
template <class Obj, class H, int Set>
void alloc_thunk(H* h, std::size_t suggested, uv_buf_t* buf) {
  Obj* c = static_cast<Obj*>(h->data);
  c->test->on_alloc(*c, suggested, buf, Set);
}
template <class Obj, class H, int Set>
void read_thunk(H* h, ssize_t nread, const uv_buf_t* buf) {
  Obj* c = static_cast<Obj*>(h->data);
  c->test->on_read_cb(*c, nread, buf, Set);
}
template <class Obj, class H>
void close_thunk(H* h) {
  Obj* c = static_cast<Obj*>(h->data);
  ++c->close_calls;
  if (c->on_closed) c->on_closed();
}
template <class Obj, class R>
void req_thunk(R* req, int status) {
  static_cast<Obj*>(req->data)->complete(status);
}
template <class Obj, class H>
void connection_thunk(H* server, int status) {
  Obj* l = static_cast<Obj*>(server->data);
  l->test->on_connection(*l, status);
}

struct RpTcp {
  static constexpr const char* kName = "RpTcp";
  using Handle = rp_tcp_t;
  using WriteReq = rp_write_t;
  using ShutdownReq = rp_shutdown_t;
  using ConnectReq = rp_connect_t;

  static int run(uv_loop_t* loop, uv_run_mode mode) { return rp_uv_run(loop, mode); }
  static int loop_close(uv_loop_t* loop) { return rp_loop_close(loop); }
  static int init(uv_loop_t* loop, Handle* h) { return rp_tcp_init(loop, h); }
  static int open(Handle* h, int fd) { return rp_tcp_open(h, fd); }
  static int bind(Handle* h, const sockaddr* addr) { return rp_tcp_bind(h, addr, 0); }
  template <class L>
  static int listen(Handle* h, int backlog) {
    return rp_listen(h, backlog, &connection_thunk<L, rp_tcp_t>);
  }
  static int accept(Handle* server, Handle* client) { return rp_accept(server, client); }
  template <class C>
  static int connect(ConnectReq* req, Handle* h, const sockaddr* addr) {
    return rp_tcp_connect(req, h, addr, &req_thunk<C, rp_connect_t>);
  }
  template <class C, int Set>
  static int read_start(Handle* h) {
    return rp_read_start(h, &alloc_thunk<C, rp_tcp_t, Set>, &read_thunk<C, rp_tcp_t, Set>);
  }
  static int read_stop(Handle* h) { return rp_read_stop(h); }
  template <class W>
  static int write(WriteReq* req, Handle* h, const uv_buf_t bufs[], unsigned nbufs) {
    return rp_write(req, h, bufs, nbufs, &req_thunk<W, rp_write_t>);
  }
  template <class S>
  static int shutdown(ShutdownReq* req, Handle* h) {
    return rp_shutdown(req, h, &req_thunk<S, rp_shutdown_t>);
  }
  template <class C>
  static int close(Handle* h) {
    return rp_close(h, &close_thunk<C, rp_tcp_t>);
  }
  static bool is_closing(const Handle* h) { return rp_is_closing(h) != 0; }
  static int fileno(const Handle* h, uv_os_fd_t* fd) { return rp_fileno(h, fd); }
  static int nodelay(Handle* h, int on) { return rp_tcp_nodelay(h, on); }
  static int getsockname(const Handle* h, sockaddr* a, int* len) {
    return rp_tcp_getsockname(h, a, len);
  }
  static int getpeername(const Handle* h, sockaddr* a, int* len) {
    return rp_tcp_getpeername(h, a, len);
  }

  // ---- rp_tcp_t's contract where it differs from libuv's (include/ringpark.h)
  // On the plain path (the fallback, kernels without multishot recv) alloc_cb
  // runs inside rp_read_start and its buffer is lent to the kernel: it comes
  // back through read_cb, with UV_ECANCELED at close.
  static bool lends_buffers(const ConnState& c) { return c.lends; }
  // UV_EOF and errors come with alloc_cb's buffer on the plain path, with a
  // null buffer on the multishot path. A bulk stream (one that filled the
  // 16 KiB provided buffers back to back) switches to the plain path: its
  // reads then bring more than 16 KiB, and its end may come either way.
  static EndBuffer end_buffer(const ConnState& c) {
    if (c.lends) return EndBuffer::kFilled;
    return c.max_read > 16 * 1024 ? EndBuffer::kEither : EndBuffer::kNull;
  }
  // On the multishot path the suggested size is the bytes waiting.
  static constexpr bool kFixedSuggestion = false;
  // A second rp_close is an error (libuv asserts).
  static constexpr bool kCloseTwiceIsAnError = true;
  // rp_close cancels every write whose operation has not finished: a write
  // issued just before it may end with UV_ECANCELED, its bytes unsent.
  static constexpr bool kSmallWriteBeforeCloseIsSent = false;
};

struct AdoptedTcp {
  static constexpr const char* kName = "AdoptedTcp";
  using Handle = uv_tcp_t;
  using WriteReq = uv_write_t;
  using ShutdownReq = uv_shutdown_t;
  using ConnectReq = uv_connect_t;

  static uv_stream_t* stream(Handle* h) { return reinterpret_cast<uv_stream_t*>(h); }
  static uv_handle_t* handle(Handle* h) { return reinterpret_cast<uv_handle_t*>(h); }
  static const uv_handle_t* handle(const Handle* h) {
    return reinterpret_cast<const uv_handle_t*>(h);
  }

  // uv_run and uv_loop_close are the preload's too: a libuv program calls
  // them, and they are rp_uv_run and rp_loop_close.
  static int run(uv_loop_t* loop, uv_run_mode mode) { return uv_run(loop, mode); }
  static int loop_close(uv_loop_t* loop) { return uv_loop_close(loop); }
  static int init(uv_loop_t* loop, Handle* h) { return uv_tcp_init(loop, h); }
  static int open(Handle* h, int fd) { return uv_tcp_open(h, fd); }
  static int bind(Handle* h, const sockaddr* addr) { return uv_tcp_bind(h, addr, 0); }
  template <class L>
  static int listen(Handle* h, int backlog) {
    return uv_listen(stream(h), backlog, &connection_thunk<L, uv_stream_t>);
  }
  static int accept(Handle* server, Handle* client) {
    return uv_accept(stream(server), stream(client));
  }
  template <class C>
  static int connect(ConnectReq* req, Handle* h, const sockaddr* addr) {
    return uv_tcp_connect(req, h, addr, &req_thunk<C, uv_connect_t>);
  }
  template <class C, int Set>
  static int read_start(Handle* h) {
    return uv_read_start(stream(h), &alloc_thunk<C, uv_handle_t, Set>,
                         &read_thunk<C, uv_stream_t, Set>);
  }
  static int read_stop(Handle* h) { return uv_read_stop(stream(h)); }
  template <class W>
  static int write(WriteReq* req, Handle* h, const uv_buf_t bufs[], unsigned nbufs) {
    return uv_write(req, stream(h), bufs, nbufs, &req_thunk<W, uv_write_t>);
  }
  template <class S>
  static int shutdown(ShutdownReq* req, Handle* h) {
    return uv_shutdown(req, stream(h), &req_thunk<S, uv_shutdown_t>);
  }
  template <class C>
  static int close(Handle* h) {
    uv_close(handle(h), &close_thunk<C, uv_handle_t>);
    return 0;
  }
  static bool is_closing(const Handle* h) { return uv_is_closing(handle(h)) != 0; }
  static int fileno(const Handle* h, uv_os_fd_t* fd) { return uv_fileno(handle(h), fd); }
  static int nodelay(Handle* h, int on) { return uv_tcp_nodelay(h, on); }
  static int getsockname(const Handle* h, sockaddr* a, int* len) {
    return uv_tcp_getsockname(h, a, len);
  }
  static int getpeername(const Handle* h, sockaddr* a, int* len) {
    return uv_tcp_getpeername(h, a, len);
  }

  // ---- libuv's contract, which adoption keeps
  static bool lends_buffers(const ConnState&) { return false; }
  static EndBuffer end_buffer(const ConnState&) { return EndBuffer::kFilled; }
  static constexpr bool kFixedSuggestion = true;
  static constexpr bool kCloseTwiceIsAnError = false;
  // libuv writes at once inside uv_write when nothing is queued and the
  // socket has room: a small write followed at once by uv_close has gone out,
  // and its callback gets 0 (uv__stream_destroy runs the completed writes'
  // callbacks with their status).
  static constexpr bool kSmallWriteBeforeCloseIsSent = true;

  // Whether adoption holds the stream: it keeps its state in the stream's
  // queued_fds, a field libuv uses only for IPC pipes (runtime/uv/private.hpp,
  // adoption_slot). Plain libuv leaves it null on a TCP stream.
  static bool adopted(const Handle* h) { return h->queued_fds != nullptr; }
  // Whether libuv's own epoll watches the socket (for reading or writing).
  static bool libuv_watches(const Handle* h) { return h->io_watcher.pevents != 0; }
};

template <class FE>
class TcpTest;

// One end of a connection.
template <class FE>
struct Conn : ConnState {
  typename FE::Handle h{};
  typename FE::ConnectReq connect_req{};
  TcpTest<FE>* test = nullptr;
  // Hooks a test may set; null: the harness's defaults.
  std::function<void(Conn&, std::size_t, uv_buf_t*)> alloc;
  std::function<void(Conn&, ssize_t, const uv_buf_t*)> read;
  std::function<void()> on_closed;               // after close_calls is counted
  std::function<void(Conn&, int)> on_connected;  // in the connect callback
  // Whether read_start checks that the stream is adopted when the
  // configuration says adoption is on (AdoptedTcp only).
  bool expect_adoption = true;

  void complete(int status) {  // the connect callback
    ++connect_calls;
    connect_status = status;
    if (on_connected) on_connected(*this, status);
  }
};

// A listening handle that takes every connection into a new Conn.
template <class FE>
struct Listener {
  typename FE::Handle h{};
  TcpTest<FE>* test = nullptr;
  bool accept = true;  // accept in the connection callback
  bool read = true;    // and start reading
  bool echo = true;    // the accepted ends echo
  bool close_on_error = true;
  int connections = 0;
  int errors = 0;
  int close_calls = 0;
  std::function<void()> on_closed;
  std::vector<Conn<FE>*> peers;
};

// A write request owned by the harness, freed after its callback.
template <class FE>
struct Write {
  typename FE::WriteReq req{};
  std::function<void(int)> cb;
  char* owned = nullptr;  // freed after the callback
  void complete(int status) {
    if (cb) cb(status);
    std::free(owned);
    delete this;
  }
};

template <class FE>
struct Shutdown {
  typename FE::ShutdownReq req{};
  std::function<void(int)> cb;
  void complete(int status) {
    if (cb) cb(status);
    delete this;
  }
};

// ---- The fixture ----------------------------------------------------------------

template <class FE>
class TcpTest : public ::testing::Test {
 public:
  using C = Conn<FE>;
  using L = Listener<FE>;

  // ---- Handles

  C* make_conn() {
    conns_.push_back(std::make_unique<C>());
    C* c = conns_.back().get();
    c->test = this;
    EXPECT_EQ(FE::init(&loop_, &c->h), 0);
    c->h.data = c;
    return c;
  }

  // A listener on an ephemeral port of 127.0.0.1.
  L* listen(int backlog = 128) {
    listeners_.push_back(std::make_unique<L>());
    L* l = listeners_.back().get();
    l->test = this;
    EXPECT_EQ(FE::init(&loop_, &l->h), 0);
    l->h.data = l;
    sockaddr_in any = loopback(0);
    EXPECT_EQ(FE::bind(&l->h, sa(any)), 0);
    EXPECT_EQ(FE::template listen<L>(&l->h, backlog), 0);
    return l;
  }

  int port_of(const typename FE::Handle* h) {
    sockaddr_in a{};
    int len = sizeof a;
    EXPECT_EQ(FE::getsockname(h, reinterpret_cast<sockaddr*>(&a), &len), 0);
    return ntohs(a.sin_port);
  }
  int port_of(const L* l) { return port_of(&l->h); }

  // A client connecting to `port`; connected (status 0) when `wait`.
  C* connect(int port, bool wait = true) {
    C* c = make_conn();
    c->connect_req.data = c;
    sockaddr_in to = loopback(port);
    EXPECT_EQ(FE::template connect<C>(&c->connect_req, &c->h, sa(to)), 0);
    if (wait) {
      EXPECT_TRUE(run_until([&] { return c->connect_calls > 0; }));
      EXPECT_EQ(c->connect_status, 0);
    }
    return c;
  }

  // A connected pair: a client, and the server side accepted by `l` (reading
  // and echoing as `l` says).
  std::pair<C*, C*> pair(L* l) {
    const std::size_t before = l->peers.size();
    C* client = connect(port_of(l));
    EXPECT_TRUE(run_until([&] { return l->peers.size() > before; }));
    return {client, l->peers.size() > before ? l->peers.back() : nullptr};
  }

  // A connected pair of which neither end reads yet (nor echoes, nor closes
  // by itself).
  std::pair<C*, C*> quiet_pair() {
    L* l = listen();
    l->read = false;
    l->echo = false;
    l->close_on_error = false;
    auto p = pair(l);
    EXPECT_NE(p.second, nullptr);
    return p;
  }

  // ---- Calls, with the harness's callbacks

  // Starts reading with the harness's callbacks (set 0), or with another set
  // of function pointers (set 1) that run the same hooks.
  int read_start(C* c, int set = 0) {
    c->in_read_start = true;
    const int allocs = c->allocs;
    const int r =
        set == 0 ? FE::template read_start<C, 0>(&c->h) : FE::template read_start<C, 1>(&c->h);
    c->in_read_start = false;
    if (c->allocs > allocs) c->lends = true;
    if constexpr (std::is_same_v<FE, AdoptedTcp>) {
      if (r == 0 && c->expect_adoption) {
        EXPECT_EQ(AdoptedTcp::adopted(&c->h), adoption())
            << "a stream read_start'ed under " << adoption_state_;
        // An adopted stream's socket is the ring's: libuv's epoll never
        // watches it for reading.
        if (adoption()) {
          EXPECT_FALSE(AdoptedTcp::libuv_watches(&c->h));
        } else {
          EXPECT_TRUE(AdoptedTcp::libuv_watches(&c->h));
        }
      }
    }
    return r;
  }
  int read_stop(C* c) { return FE::read_stop(&c->h); }

  // A write of `bufs` (the bytes kept alive by the caller) whose callback
  // runs `cb`. Returns the call's result (then `cb` never runs).
  int write(C* c, const uv_buf_t bufs[], unsigned nbufs, std::function<void(int)> cb = {},
            char* owned = nullptr) {
    auto* w = new Write<FE>;
    w->req.data = w;
    w->cb = std::move(cb);
    w->owned = owned;
    const int r = FE::template write<Write<FE>>(&w->req, &c->h, bufs, nbufs);
    if (r != 0) {
      w->owned = nullptr;
      delete w;
    }
    return r;
  }
  // A write of `base` (malloc'd; the write frees it), counted in write_errors
  // if it fails.
  int write_owned(C* c, char* base, std::size_t len) {
    uv_buf_t b = uv_buf_init(base, static_cast<unsigned>(len));
    const int r = write(
        c, &b, 1,
        [c](int status) {
          if (status < 0) ++c->write_errors;
        },
        base);
    if (r != 0) std::free(base);
    return r;
  }
  int write_copy(C* c, const std::string& s) {
    char* p = static_cast<char*>(std::malloc(s.size() + 1));
    std::memcpy(p, s.data(), s.size());
    return write_owned(c, p, s.size());
  }
  // Writes `data` (kept alive by the caller) in one write; *status gets the
  // callback's status.
  void write_all(C* c, const std::string& data, int* status) {
    uv_buf_t b = uv_buf_init(const_cast<char*>(data.data()), static_cast<unsigned>(data.size()));
    ASSERT_EQ(write(c, &b, 1, [status](int st) { *status = st; }), 0);
  }
  int shutdown(C* c, std::function<void(int)> cb = {}) {
    auto* s = new Shutdown<FE>;
    s->req.data = s;
    s->cb = std::move(cb);
    const int r = FE::template shutdown<Shutdown<FE>>(&s->req, &c->h);
    if (r != 0) delete s;
    return r;
  }
  int close(C* c) { return FE::template close<C>(&c->h); }
  int close(L* l) { return FE::template close<L>(&l->h); }
  bool is_closing(const C* c) { return FE::is_closing(&c->h); }
  uv_os_fd_t fd_of(const C* c) {
    uv_os_fd_t fd = -1;
    EXPECT_EQ(FE::fileno(&c->h, &fd), 0);
    return fd;
  }

  // ---- The default callbacks (the thunks come here)

  void on_alloc(C& c, std::size_t suggested, uv_buf_t* buf, int set) {
    ++c.allocs;
    ++c.calls_by_set[set][0];
    if (suggested != 64 * 1024) ++c.odd_suggestions;
    if (c.alloc) return c.alloc(c, suggested, buf);
    default_alloc(c, suggested, buf);
  }
  static void default_alloc(C&, std::size_t suggested, uv_buf_t* buf) {
    buf->base = static_cast<char*>(std::malloc(suggested));
    buf->len = suggested;
  }
  void on_read_cb(C& c, ssize_t n, const uv_buf_t* buf, int set) {
    ++c.calls_by_set[set][1];
    if (c.read) return c.read(c, n, buf);
    on_read(c, n, buf);
  }
  // Records the read, echoes or pings as the connection says, frees the
  // buffer, and closes on an error when asked to.
  void on_read(C& c, ssize_t n, const uv_buf_t* buf) {
    c.nreads.push_back(n);
    if (n > 0 && static_cast<std::size_t>(n) > c.max_read) c.max_read = static_cast<std::size_t>(n);
    if (n > 0) {
      if (c.expect != nullptr) {
        const std::size_t k = static_cast<std::size_t>(n);
        if (c.mismatch == std::string::npos &&
            (c.got + k > c.expect->size() ||
             std::memcmp(c.expect->data() + c.got, buf->base, k) != 0)) {
          c.mismatch = c.got;
        }
        c.got += k;
      } else {
        c.received.append(buf->base, static_cast<std::size_t>(n));
      }
      if (c.echo) {
        write_owned(&c, buf->base, static_cast<std::size_t>(n));  // the write frees it
        return;
      }
      if (c.want != 0 && c.received.size() >= c.want) {
        c.want = 0;
        if (c.pings_left > 0) {
          send_ping(&c);
        } else if (--pinging_ == 0 && stop_when_done_) {
          uv_stop(&loop_);
        }
      }
    } else if (n == UV_ECANCELED) {
      ++c.cancelled;
    } else if (n < 0) {
      if (n == UV_EOF) {
        ++c.eof;
      } else {
        ++c.read_errors;
        c.last_error = n;
        if (n == UV_ENOBUFS) ++c.enobufs;
      }
      if (n != UV_ENOBUFS) {
        if (buf->base == nullptr) {
          ++c.null_end_bufs;
        } else {
          ++c.filled_end_bufs;
        }
      }
    }
    std::free(buf->base);
    if (n < 0 && n != UV_ECANCELED && n != UV_ENOBUFS && c.close_on_error && !is_closing(&c)) {
      close(&c);
    }
  }

  void on_connection(L& l, int status) {
    if (status < 0) {
      ++l.errors;
      return;
    }
    ++l.connections;
    if (!l.accept) return;
    C* c = make_conn();
    c->echo = l.echo;
    c->close_on_error = l.close_on_error;
    ASSERT_EQ(FE::accept(&l.h, &c->h), 0);
    l.peers.push_back(c);
    if (l.read) {
      ASSERT_EQ(read_start(c), 0);
    }
  }

  // Ping mode: a 64-byte message; the next one once the echo is back.
  void send_ping(C* c) {
    std::string msg(64, static_cast<char>('a' + c->pings_left % 26));
    c->want = c->received.size() + msg.size();
    --c->pings_left;
    write_copy(c, msg);
  }

  // Whether the one end (UV_EOF or an error) that `c` saw came with the buffer
  // the front end's contract says.
  static void expect_end_buffer(const C& c) {
    switch (FE::end_buffer(c)) {
      case EndBuffer::kFilled:
        EXPECT_EQ(c.filled_end_bufs, 1) << "the end came without alloc_cb's buffer";
        break;
      case EndBuffer::kNull:
        EXPECT_EQ(c.null_end_bufs, 1) << "the end came with a buffer";
        break;
      case EndBuffer::kEither:
        EXPECT_EQ(c.filled_end_bufs + c.null_end_bufs, 1);
        break;
    }
  }

  // ---- Driving the loop

  // Runs the loop until pred() holds or `limit` passes; returns pred(). A
  // ticking timer makes every UV_RUN_ONCE return within `tick_ms`.
  template <typename Pred>
  bool run_until(Pred pred, std::chrono::milliseconds limit = 10s, std::uint64_t tick_ms = 10) {
    uv_timer_start(
        &tick_, [](uv_timer_t*) {}, tick_ms, tick_ms);
    const auto deadline = Clock::now() + limit;
    while (!pred() && Clock::now() < deadline) FE::run(&loop_, UV_RUN_ONCE);
    uv_timer_stop(&tick_);
    return pred();
  }
  // Runs the loop for `d` whatever happens.
  void run_for(std::chrono::milliseconds d) {
    const auto end = Clock::now() + d;
    run_until([&] { return Clock::now() >= end; }, d + 1s);
  }

  // ---- The configuration

  // Whether the loop's operations run on io_uring.
  bool uring() const { return uring_; }
  // Whether this run adopts uv_tcp_t streams (AdoptedTcp); decided in SetUp
  // from RINGPARK_BACKEND, RINGPARK_ADOPT and what the machine allows.
  bool adoption() const { return adoption_; }
  // Whether the stream's socket I/O runs as ops on the ring: rp_tcp_t on
  // io_uring, an adopted uv_tcp_t. Figures about batching hold only then.
  bool on_ring() const {
    if constexpr (std::is_same_v<FE, AdoptedTcp>) {
      return adoption_;
    } else {
      return uring_;
    }
  }

 protected:
  void SetUp() override {
    ::signal(SIGPIPE, SIG_IGN);  // a multi-buffer write is a writev, as libuv's
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(uv_timer_init(&loop_, &tick_), 0);
    uring_ = std::string(rp_backend(&loop_)) == "io_uring";
    adoption_state_ = rp_adoption(&loop_);
    // Adoption is wanted unless the environment turns it off: then a
    // silently disabled adoption fails here.
    const char* backend = std::getenv("RINGPARK_BACKEND");
    const char* adopt = std::getenv("RINGPARK_ADOPT");
    const bool wanted = !(backend != nullptr && std::strcmp(backend, "epoll") == 0) &&
                        !(adopt != nullptr && std::strcmp(adopt, "0") == 0);
    const bool on = adoption_state_ == "on";
    if (wanted && !on && (!uring_ || adoption_state_.find("multishot") != std::string::npos)) {
      // The machine lacks io_uring or multishot recv: adoption cannot be on
      // here, and AdoptedTcp runs as plain libuv.
      std::printf("note: adoption wanted, but this machine has %s, adoption %s\n",
                  rp_backend(&loop_), adoption_state_.c_str());
    } else if (wanted) {
      ASSERT_TRUE(on) << "adoption should be on here, but rp_adoption() says " << adoption_state_;
    } else {
      ASSERT_FALSE(on) << "adoption should be off here (RINGPARK_BACKEND=epoll or "
                          "RINGPARK_ADOPT=0), but rp_adoption() says on";
    }
    adoption_ = on;
  }

  void TearDown() override {
    for (auto& c : conns_) {
      if (!is_closing(c.get())) {
        EXPECT_EQ(close(c.get()), 0);
      }
    }
    for (auto& l : listeners_) {
      if (!FE::is_closing(&l->h)) {
        EXPECT_EQ(close(l.get()), 0);
      }
    }
    EXPECT_TRUE(run_until([&] { return all_closed(); })) << "handles left open";
    for (auto& c : conns_) EXPECT_EQ(c->close_calls, 1);
    for (auto& l : listeners_) EXPECT_EQ(l->close_calls, 1);
    uv_close(reinterpret_cast<uv_handle_t*>(&tick_), nullptr);
    EXPECT_EQ(FE::run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(FE::loop_close(&loop_), 0);
  }

  bool all_closed() const {
    for (auto& c : conns_)
      if (c->close_calls == 0) return false;
    for (auto& l : listeners_)
      if (l->close_calls == 0) return false;
    return true;
  }

  uv_loop_t loop_;
  uv_timer_t tick_;
  bool uring_ = false;
  bool adoption_ = false;
  std::string adoption_state_;
  int pinging_ = 0;              // ping mode: connections still pinging
  bool stop_when_done_ = false;  // uv_stop the loop when none is left
  std::vector<std::unique_ptr<C>> conns_;
  std::vector<std::unique_ptr<L>> listeners_;
};

}  // namespace ringpark::test::tcp
