// The harness of the adopted uv_udp_t tests: a libuv loop run bounded in
// time, UDP handles whose callbacks record everything and check libuv's
// rules as they happen (alloc_cb asked for 65536; one alloc_cb, then its
// recv_cb, before the next; each recv_cb's buffer the one the alloc_cb before
// gave, or a chunk of it), and send requests that record their callbacks and
// the send queue counters libuv shows at that moment.
//
// The test binary is linked against libringpark-preload ahead of libuv, so
// its uv_* calls reach adoption as an unchanged program's do under
// LD_PRELOAD. It runs three times (tests/CMakeLists.txt): io_uring with
// adoption, which must then be on (a handle that should be adopted and is
// not fails the test); the epoll fallback; and RINGPARK_ADOPT=0. In the last
// two every handle is libuv's own: the oracle each expectation must also hold
// for.
#pragma once

#include <gtest/gtest.h>
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
#include <vector>

#include "ringpark.h"
#include "udp_util.hpp"

namespace ringpark::test::udp {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Whether this configuration adopts UDP handles (io_uring, adoption not
// turned off); the kernel here has multishot recvmsg, which adoption needs
// (checked by TheConfigurationAdoptsAsItShould).
inline bool adoption_expected() {
  const char* backend = std::getenv("RINGPARK_BACKEND");
  const char* adopt = std::getenv("RINGPARK_ADOPT");
  return !(backend != nullptr && std::strcmp(backend, "epoll") == 0) &&
         !(adopt != nullptr && std::strcmp(adopt, "0") == 0);
}

// Whether adoption holds the handle (its slot: u.reserved[1], see
// runtime/uv/private.hpp).
inline bool adopted(const uv_udp_t* h) { return h->u.reserved[1] != nullptr; }

struct Rx {
  ssize_t nread = 0;
  unsigned flags = 0;
  std::string data;
  bool has_addr = false;
  sockaddr_storage addr{};
  std::ptrdiff_t offset = -1;  // where its buffer starts in the alloc's
  std::size_t buf_len = 0;
};

struct Udp;

struct Send {
  uv_udp_send_t req;
  Udp* u = nullptr;
  std::string bytes;
  uv_buf_t buf;
  int id = 0;
  int status = 1;  // 1: no callback yet
  int calls = 0;
  std::size_t count_at_cb = 0;  // send_queue_count seen inside the callback
  std::size_t size_at_cb = 0;
};

struct Udp {
  uv_udp_t h;
  std::vector<Rx> rx;
  std::vector<int> sent_order;  // ids, in the order their callbacks ran
  std::size_t alloc_size = 65536;
  int fail_allocs = 0;
  int allocs = 0;
  int close_calls = 0;
  bool closed_seen = false;
  int after_close = 0;  // recv callbacks after uv_close
  bool closing = false;
  // libuv's rules, checked as they happen.
  bool outstanding = false;
  char* given = nullptr;
  std::size_t given_len = 0;
  int double_allocs = 0;
  int odd_suggestions = 0;
  int foreign_buffers = 0;
  std::function<void(Udp&, const Rx&)> on_recv;
  std::function<void(Udp&, Send&)> on_sent;

  int datagrams() const {
    int n = 0;
    for (const auto& r : rx) n += r.has_addr;
    return n;
  }
  int count_nread(ssize_t n) const {
    int c = 0;
    for (const auto& r : rx) c += r.nread == n && !r.has_addr;
    return c;
  }
  // The program frees the buffer of the last alloc_cb (a batch buffer whose
  // UV_UDP_MMSG_FREE will not come, after a stop inside a chunk's call).
  void take_back() {
    std::free(given);
    given = nullptr;
    outstanding = false;
  }
};

inline Udp* of(uv_handle_t* h) { return static_cast<Udp*>(h->data); }

inline void alloc_cb(uv_handle_t* handle, std::size_t suggested, uv_buf_t* buf) {
  Udp* u = of(handle);
  ++u->allocs;
  if (suggested != 65536) ++u->odd_suggestions;
  if (u->outstanding) ++u->double_allocs;
  u->outstanding = true;
  if (u->fail_allocs > 0) {
    --u->fail_allocs;
    u->given = nullptr;
    *buf = uv_buf_init(nullptr, 0);
    return;
  }
  u->given = static_cast<char*>(std::malloc(u->alloc_size));
  u->given_len = u->alloc_size;
  *buf = uv_buf_init(u->given, static_cast<unsigned>(u->alloc_size));
}

inline void recv_cb(uv_udp_t* handle, ssize_t nread, const uv_buf_t* buf, const sockaddr* addr,
                    unsigned flags) {
  Udp* u = of(reinterpret_cast<uv_handle_t*>(handle));
  if (u->closing) ++u->after_close;
  const bool chunk = flags & UV_UDP_MMSG_CHUNK;
  if (!u->outstanding) {
    ++u->foreign_buffers;
  } else if (buf->base != nullptr &&
             (chunk ? !(buf->base >= u->given && buf->base + buf->len <= u->given + u->given_len)
                    : buf->base != u->given)) {
    ++u->foreign_buffers;
  }
  Rx r;
  r.nread = nread;
  r.flags = flags;
  if (nread > 0 && buf->base != nullptr) r.data.assign(buf->base, static_cast<std::size_t>(nread));
  if (addr != nullptr) {
    r.has_addr = true;
    std::memcpy(&r.addr, addr,
                addr->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
  }
  if (u->given != nullptr && buf->base != nullptr) r.offset = buf->base - u->given;
  r.buf_len = buf->len;
  u->rx.push_back(r);
  if (!chunk) u->take_back();  // every call but a chunk's hands the buffer back
  if (u->on_recv) u->on_recv(*u, u->rx.back());
}

inline void send_cb(uv_udp_send_t* req, int status) {
  Send* s = static_cast<Send*>(req->data);
  ++s->calls;
  s->status = status;
  s->count_at_cb = uv_udp_get_send_queue_count(req->handle);
  s->size_at_cb = uv_udp_get_send_queue_size(req->handle);
  s->u->sent_order.push_back(s->id);
  if (s->u->on_sent) s->u->on_sent(*s->u, *s);
}

inline void close_cb(uv_handle_t* handle) {
  Udp* u = of(handle);
  ++u->close_calls;
}

class UdpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(uv_timer_init(&loop_, &tick_), 0);
  }

  void TearDown() override {
    for (auto& u : udps_) {
      if (!uv_is_closing(reinterpret_cast<uv_handle_t*>(&u->h))) close(u.get());
    }
    uv_close(reinterpret_cast<uv_handle_t*>(&tick_), nullptr);
    run_until([&] {
      for (auto& u : udps_) {
        if (u->close_calls == 0) return false;
      }
      return true;
    });
    for (auto& u : udps_) {
      EXPECT_EQ(u->close_calls, 1);
      EXPECT_EQ(u->double_allocs, 0) << "an alloc_cb before the previous one's recv_cb";
      EXPECT_EQ(u->odd_suggestions, 0) << "alloc_cb asked for something other than 65536";
      EXPECT_EQ(u->foreign_buffers, 0) << "a recv_cb with a buffer alloc_cb did not give";
      EXPECT_EQ(u->after_close, 0) << "recv_cb after uv_close";
      std::free(u->given);
    }
    // Every send's callback ran exactly once.
    for (auto& s : sends_) EXPECT_EQ(s->calls, 1) << "send " << s->id;
    EXPECT_EQ(uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
    for (int fd : fds_) ::close(fd);
  }

  // Runs the loop (with a ticking timer, so that it never sleeps past the
  // check) until `pred` holds or `limit` passes.
  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds limit = 10s) {
    const auto end = Clock::now() + limit;
    uv_timer_start(&tick_, [](uv_timer_t*) {}, 5, 5);
    bool ok = true;
    while (!pred()) {
      if (Clock::now() > end) {
        ok = false;
        break;
      }
      uv_run(&loop_, UV_RUN_ONCE);
    }
    uv_timer_stop(&tick_);
    return ok;
  }
  void run_for(std::chrono::milliseconds t) {
    const auto end = Clock::now() + t;
    run_until([&] { return Clock::now() > end; }, t + 1s);
  }

  Udp* make(unsigned flags = AF_UNSPEC) {
    auto u = std::make_unique<Udp>();
    EXPECT_EQ(uv_udp_init_ex(&loop_, &u->h, flags), 0);
    u->h.data = u.get();
    udps_.push_back(std::move(u));
    return udps_.back().get();
  }
  // A handle bound to the loopback of `family` on a kernel-chosen port.
  Udp* bound(int family, sockaddr_storage* at, unsigned flags = AF_UNSPEC, unsigned bind_flags = 0) {
    Udp* u = make(flags);
    socklen_t len;
    *at = loopback_addr(family, 0, &len);
    if (uv_udp_bind(&u->h, reinterpret_cast<const sockaddr*>(at), bind_flags) != 0) return nullptr;
    int n = sizeof *at;
    EXPECT_EQ(uv_udp_getsockname(&u->h, reinterpret_cast<sockaddr*>(at), &n), 0);
    return u;
  }
  int start(Udp* u) {
    const int r = uv_udp_recv_start(&u->h, &alloc_cb, &recv_cb);
    if (r == 0) {
      EXPECT_EQ(adopted(&u->h), adoption_expected())
          << (adoption_expected() ? "adoption should be on here: " : "adoption should be off: ")
          << rp_adoption(&loop_);
    }
    return r;
  }
  void close(Udp* u) {
    u->closing = true;
    uv_close(reinterpret_cast<uv_handle_t*>(&u->h), &close_cb);
  }

  Send* send(Udp* u, int id, std::string bytes, const sockaddr* to, int expect = 0) {
    auto s = std::make_unique<Send>();
    s->u = u;
    s->id = id;
    s->bytes = std::move(bytes);
    s->buf = uv_buf_init(s->bytes.data(), static_cast<unsigned>(s->bytes.size()));
    s->req.data = s.get();
    const int r = uv_udp_send(&s->req, &u->h, &s->buf, 1, to, &send_cb);
    EXPECT_EQ(r, expect) << uv_strerror(r);
    if (r != 0) return nullptr;
    sends_.push_back(std::move(s));
    return sends_.back().get();
  }

  // A plain socket of the test's (closed at the end).
  int raw_socket(int family, sockaddr_storage* at, bool nonblock = true) {
    socklen_t len;
    const int fd = bound_socket(family, at, &len, nonblock);
    if (fd >= 0) fds_.push_back(fd);
    return fd;
  }
  static void send_to(int fd, const std::string& bytes, const sockaddr_storage& to) {
    const socklen_t len = to.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    ASSERT_EQ(::sendto(fd, bytes.data(), bytes.size(), 0, reinterpret_cast<const sockaddr*>(&to), len),
              static_cast<ssize_t>(bytes.size()));
  }
  static std::vector<std::string> drain(int fd) {
    std::vector<std::string> got;
    std::string buf(70000, '\0');
    for (;;) {
      ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
      if (n < 0) break;
      got.emplace_back(buf.data(), static_cast<std::size_t>(n));
    }
    return got;
  }

  uv_loop_t loop_;
  uv_timer_t tick_;
  std::vector<std::unique_ptr<Udp>> udps_;
  std::vector<std::unique_ptr<Send>> sends_;
  std::vector<int> fds_;
};

inline const sockaddr* sa(const sockaddr_storage& a) { return reinterpret_cast<const sockaddr*>(&a); }

}  // namespace ringpark::test::udp
