// The harness of the tests that run one op contract on both backends (the
// io_uring driver and the epoll fallback): kernel objects a fixture owns, an op
// that records its completions, the two backends, and a fixture that tears
// them down in a safe order. Header-only, test code only.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "epoll_bridge/epoll_reactor.hpp"
#include "epoll_bridge/fallback_driver.hpp"
#include "ringpark/op.hpp"
#include "test_util.hpp"
#include "uring_driver/driver.hpp"

namespace ringpark::test {

using detail::IoBackend;
using detail::kMore;
using detail::Op;
using detail::OpCode;
using detail::Park;
using detail::RingOptions;
using detail::RingProbe;
using detail::UringDriver;

// ---- Kernel objects --------------------------------------------------------

// Closes the fds it holds when destroyed. A fixture keeps one alive until the
// backend has shut down, so no op ever waits on an fd number closed under it.
class Fds {
 public:
  ~Fds() {
    for (int fd : fds_) ::close(fd);
  }
  int add(int fd) {
    if (fd >= 0) fds_.push_back(fd);
    return fd;
  }

 private:
  std::vector<int> fds_;
};

// A listening TCP socket on 127.0.0.1 with a kernel-chosen port.
inline int listen_loopback(sockaddr_in* addr, int backlog = 16) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  *addr = {};
  addr->sin_family = AF_INET;
  addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof *addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(addr), len) < 0 || ::listen(fd, backlog) < 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(addr), &len) < 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// A blocking connect to a loopback listener: completes at once, since the
// kernel finishes the handshake into the listener's backlog.
inline int connect_loopback(const sockaddr_in& addr) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// ---- Recording ops ---------------------------------------------------------

// An op whose completion records (res, flags). Owns the memory the op points at
// (buf, addr, addrlen), so that memory lives as long as the op.
struct TestOp {
  explicit TestOp(OpCode code) {
    op.code = code;
    op.complete = &TestOp::on_complete;
    op.data = this;
  }

  static void on_complete(Op* op, int res, std::uint32_t flags) noexcept {
    auto* self = static_cast<TestOp*>(op->data);
    ++self->calls;
    self->res = res;
    self->flags = flags;
    self->results.emplace_back(res, flags);
    if (self->then) self->then(*self);
  }

  // The final completion (kMore clear) has run.
  bool done() const { return calls > 0 && !(flags & kMore); }

  Op op;
  int calls = 0;
  int res = 0;
  std::uint32_t flags = 0;
  std::vector<std::pair<int, std::uint32_t>> results;
  std::function<void(TestOp&)> then;  // runs inside the completion, after recording

  std::array<char, 64> buf{};
  sockaddr_in addr{};
  unsigned addrlen = sizeof addr;
};

// ---- Backends --------------------------------------------------------------

struct UringBackend {
  static std::string name() { return "Uring"; }
  explicit UringBackend(const RingOptions& options = {})
      : driver(UringDriver::create(nullptr, options, &probe)) {}
  std::string unavailable() const {
    return driver ? std::string() : "io_uring is unavailable: " + probe.reason;
  }
  Park& park() { return *driver; }
  IoBackend& io() { return *driver; }
  bool recv_multishot() { return driver->supports(OpCode::recv_multishot); }

  RingProbe probe;
  std::unique_ptr<UringDriver> driver;
};

// The epoll fallback, as the chain builds it without a libuv loop.
struct FallbackBackend {
  static std::string name() { return "Fallback"; }
  std::string unavailable() const { return {}; }
  Park& park() { return driver; }
  IoBackend& io() { return driver; }
  bool recv_multishot() { return false; }

  detail::EpollReactor reactor;
  detail::FallbackDriver driver{reactor, nullptr};
};

using Backends = ::testing::Types<UringBackend, FallbackBackend>;

struct BackendName {
  template <class T>
  static std::string GetName(int) {
    return T::name();
  }
};

// Everything a test needs, torn down in a safe order: the backend first (its
// shutdown completes every op still in flight), then the ops it may have
// touched, then the fds.
template <class Backend>
class OpFixture {
 protected:
  template <class... Args>
  std::string start(Args&&... args) {
    backend_ = std::make_unique<Backend>(std::forward<Args>(args)...);
    return backend_->unavailable();
  }

  Park& park() { return backend_->park(); }
  IoBackend& io() { return backend_->io(); }

  TestOp& make(OpCode code) { return *ops_.emplace_back(std::make_unique<TestOp>(code)); }

  // Parks until `pred` holds, at most `limit`. Returns whether it holds.
  template <class Pred>
  bool run_until(Pred pred, Duration limit = 5s) {
    Stopwatch sw;
    while (!pred()) {
      if (sw.elapsed() >= limit) return false;
      park().park(std::min<Duration>(limit - sw.elapsed(), Duration(100ms)));
    }
    return true;
  }
  bool run_until_done(const TestOp& op, Duration limit = 5s) {
    return run_until([&] { return op.done(); }, limit);
  }

  // A few short parks, for anything that would (wrongly) still arrive.
  void settle() {
    for (int i = 0; i < 3; ++i) park().park(Duration(10ms));
  }

  TestOp& nop() {
    TestOp& op = make(OpCode::nop);
    io().submit(&op.op);
    return op;
  }

  TestOp& timeout(Duration d) {
    TestOp& op = make(OpCode::timeout);
    op.op.timeout_ns = static_cast<std::uint64_t>(d.count());
    io().submit(&op.op);
    return op;
  }

  // A connected TCP pair on loopback, owned by the fixture.
  bool tcp_pair(int* client, int* server) {
    sockaddr_in addr;
    int listener = fds_.add(listen_loopback(&addr));
    if (listener < 0) return false;
    *client = fds_.add(connect_loopback(addr));
    if (*client < 0) return false;
    *server = fds_.add(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    return *server >= 0;
  }

  bool pipe(int* r, int* w, int flags = 0) {
    int p[2];
    if (::pipe2(p, O_CLOEXEC | flags) < 0) return false;
    *r = fds_.add(p[0]);
    *w = fds_.add(p[1]);
    return true;
  }

  Fds fds_;
  std::deque<std::unique_ptr<TestOp>> ops_;
  std::unique_ptr<Backend> backend_;
};

}  // namespace ringpark::test
