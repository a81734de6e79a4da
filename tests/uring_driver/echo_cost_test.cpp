// What one echoed message costs in SQEs as the number of connections grows
// (issue 8, defect 5): rp_echo's self-test, done at the driver. N clients each
// send 64-byte messages to an echo server over loopback TCP, one at a time;
// every socket has a multishot recv into the driver's provided buffers, and the
// ring is the size of a libuv loop's (1,024 SQEs, so a 2,048-entry CQ, and the
// default 512 x 16 KiB buffer ring).
//
// A message costs two SQEs, the client's send and the server's echo: the recvs
// stay armed. It used to cost 2.0 at 16 connections, 3.9 at 1,000 and 7.8 at
// 3,000 here (9.3 in rp_echo): each send burst woke more recvs than the ring
// had buffers, every starved recv was re-armed whenever a single buffer came
// back (and starved again), buffers recycled during a long reap pass reached
// the kernel only at its end, and a submission made while the CQ still held
// the previous burst made the kernel end multishot recvs it could not post
// for. Where the kernel fills buffers incrementally (Linux 6.12) a message
// takes 64 bytes of a buffer instead of a whole one and nothing runs dry: the
// cost stays 2. With whole buffers (older kernels, and forced here) a burst of
// more messages than buffers still starves some recvs, but each is re-armed
// once: at most one more SQE per recv, two per message, whatever the number of
// connections. The bounds are counts, not times: they hold on a busy machine
// as on an idle one.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "ringpark/op.hpp"
#include "test_util.hpp"
#include "uring_driver/driver.hpp"

namespace ringpark::test {
namespace {

using detail::kBuffer;
using detail::kMore;
using detail::Op;
using detail::OpCode;
using detail::UringDriver;

constexpr int kMessageSize = 64;
constexpr int kMessages = 100;  // per connection
// SQEs per message allowed: the two sends, and a little for re-arms...
constexpr double kMaxSqesPerMessage = 2.2;
// ...or, with whole buffers, at most one re-arm per recv (two recvs a message).
constexpr double kMaxSqesPerMessageWholeBuffers = 4.05;

// Raises the soft fd limit to what `needed` takes, up to the hard limit.
// Returns whether it is enough.
bool enough_fds(rlim_t needed) {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return false;
  if (lim.rlim_cur < needed) {
    lim.rlim_cur = lim.rlim_max == RLIM_INFINITY || lim.rlim_max >= needed ? needed : lim.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &lim);
    ::getrlimit(RLIMIT_NOFILE, &lim);
  }
  return lim.rlim_cur >= needed;
}

struct Echo;

// One connection: the client end sends a message and waits for its echo; the
// server end sends back what it receives.
struct Conn {
  Echo* echo = nullptr;
  int id = 0;
  int client = -1;
  int server = -1;
  Op client_send, client_recv, server_send, server_recv;
  char out[kMessageSize];  // the client's message in flight
  int have = 0;            // bytes of its echo back so far
  int sent = 0;            // messages sent
  std::string pending;     // server: bytes received, not yet echoed
  char echo_buf[kMessageSize * 4];
  bool echoing = false;  // server: a send is in flight
  bool failed = false;
};

struct Echo {
  UringDriver* driver = nullptr;
  long done_messages = 0;
  long errors = 0;
  int conns_finished = 0;
};

void fill_message(Conn& c) {
  for (int i = 0; i < kMessageSize; ++i) c.out[i] = static_cast<char>(c.sent * 31 + c.id * 7 + i);
}

void fail(Conn& c) {
  if (!c.failed) ++c.echo->errors;
  c.failed = true;
}

void send_next(Conn& c) {
  fill_message(c);
  ++c.sent;
  c.have = 0;
  c.client_send.buf = c.out;
  c.client_send.len = kMessageSize;
  c.echo->driver->submit(&c.client_send);
}

void start_echo(Conn& c) {
  const std::size_t n = std::min(c.pending.size(), sizeof c.echo_buf);
  std::memcpy(c.echo_buf, c.pending.data(), n);
  c.pending.erase(0, n);
  c.server_send.buf = c.echo_buf;
  c.server_send.len = static_cast<std::uint32_t>(n);
  c.echoing = true;
  c.echo->driver->submit(&c.server_send);
}

void on_client_send(Op* op, int res, std::uint32_t) noexcept {
  auto& c = *static_cast<Conn*>(op->data);
  if (res != kMessageSize) fail(c);
}

void on_server_send(Op* op, int res, std::uint32_t) noexcept {
  auto& c = *static_cast<Conn*>(op->data);
  c.echoing = false;
  if (res != static_cast<int>(op->len)) return fail(c);
  if (!c.pending.empty()) start_echo(c);
}

// The bytes of a multishot recv completion, recycled before it returns.
const char* bytes_of(Conn& c, int res, std::uint32_t flags) {
  if (res <= 0) return nullptr;
  if (!(flags & kBuffer)) {
    fail(c);
    return nullptr;
  }
  return c.echo->driver->provided_buffer(detail::buffer_id(flags));
}

void on_server_recv(Op* op, int res, std::uint32_t flags) noexcept {
  auto& c = *static_cast<Conn*>(op->data);
  if (const char* p = bytes_of(c, res, flags)) c.pending.append(p, static_cast<std::size_t>(res));
  if (flags & kBuffer) c.echo->driver->recycle(detail::buffer_id(flags));
  if (!(flags & kMore) && res != -ECANCELED) fail(c);  // it must stay armed
  if (!c.pending.empty() && !c.echoing) start_echo(c);
}

void on_client_recv(Op* op, int res, std::uint32_t flags) noexcept {
  auto& c = *static_cast<Conn*>(op->data);
  if (const char* p = bytes_of(c, res, flags)) {
    for (int i = 0; i < res; ++i) {
      if (c.have >= kMessageSize || p[i] != c.out[c.have]) {
        fail(c);
        break;
      }
      ++c.have;
    }
  }
  if (flags & kBuffer) c.echo->driver->recycle(detail::buffer_id(flags));
  if (!(flags & kMore) && res != -ECANCELED) fail(c);
  if (c.have == kMessageSize) {
    ++c.echo->done_messages;
    if (c.sent < kMessages) {
      send_next(c);
    } else {
      c.have = 0;
      ++c.echo->conns_finished;
    }
  }
}

void prepare(Conn& c, Op& op, OpCode code, int fd, detail::CompleteFn fn) {
  op.code = code;
  op.fd = fd;
  op.flags = 0;
  op.complete = fn;
  op.data = &c;
}

// The number of connections, and whether the buffers are filled incrementally
// where the kernel can (true) or used whole (false).
using Param = std::tuple<int, bool>;

class EchoCost : public ::testing::TestWithParam<Param> {};

TEST_P(EchoCost, SqesPerMessageStayFlatAsConnectionsGrow) {
  const auto [n, incremental] = GetParam();
  if (!enough_fds(static_cast<rlim_t>(2 * n + 64))) {
    GTEST_SKIP() << "RLIMIT_NOFILE's hard limit is below " << 2 * n + 64;
  }
  detail::RingOptions options;
  options.entries = 1024;  // a libuv loop's ring
  options.buf_ring_incremental = incremental;
  detail::RingProbe probe;
  std::unique_ptr<UringDriver> driver = UringDriver::create(nullptr, options, &probe);
  if (!driver) GTEST_SKIP() << "io_uring is unavailable: " << probe.reason;
  if (!driver->supports(OpCode::recv_multishot)) {
    GTEST_SKIP() << "no multishot recv here: "
                 << detail::errno_name(driver->recv_multishot_error());
  }
  if (incremental && !driver->provided_buffers_incremental()) {
    GTEST_SKIP() << "this kernel fills provided buffers whole only (before Linux 6.12)";
  }
  const double bound = incremental ? kMaxSqesPerMessage : kMaxSqesPerMessageWholeBuffers;

  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&addr), len), 0);
  ASSERT_EQ(::listen(listener, 128), 0);
  ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);

  Echo echo;
  echo.driver = driver.get();
  std::vector<std::unique_ptr<Conn>> conns;
  const int one = 1;
  for (int i = 0; i < n; ++i) {
    auto c = std::make_unique<Conn>();
    c->echo = &echo;
    c->id = i;
    c->client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(c->client, 0);
    ASSERT_EQ(::connect(c->client, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    c->server = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    ASSERT_GE(c->server, 0);
    // As rp_echo: small messages leave at once rather than wait for Nagle.
    ::setsockopt(c->client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(c->server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    prepare(*c, c->client_send, OpCode::send, c->client, &on_client_send);
    prepare(*c, c->server_send, OpCode::send, c->server, &on_server_send);
    prepare(*c, c->client_recv, OpCode::recv_multishot, c->client, &on_client_recv);
    prepare(*c, c->server_recv, OpCode::recv_multishot, c->server, &on_server_recv);
    conns.push_back(std::move(c));
  }
  ::close(listener);
  for (auto& c : conns) {
    driver->submit(&c->server_recv);
    driver->submit(&c->client_recv);
  }
  driver->park(Duration::zero());  // every recv armed: what follows is messages only

  const detail::DriverStats before = driver->stats();
  for (auto& c : conns) send_next(*c);
  Stopwatch sw;
  while (echo.conns_finished < n && echo.errors == 0 && sw.elapsed() < 40s) {
    driver->park(Duration(100ms));
  }
  const detail::DriverStats after = driver->stats();
  ASSERT_EQ(echo.errors, 0);
  ASSERT_EQ(echo.done_messages, static_cast<long>(n) * kMessages);

  const double messages = static_cast<double>(echo.done_messages);
  const double sqes = static_cast<double>(after.sqes_submitted - before.sqes_submitted);
  RecordProperty("sqes_per_message", std::to_string(sqes / messages));
  std::printf(
      "%d connections, %s buffers: %.3f SQEs per message (%llu recvs ran out of buffers, "
      "%llu re-arms)\n",
      n, incremental ? "incremental" : "whole", sqes / messages,
      static_cast<unsigned long long>(after.buffers_ran_out - before.buffers_ran_out),
      static_cast<unsigned long long>(after.multishot_rearms - before.multishot_rearms));
  EXPECT_LE(sqes / messages, bound)
      << n << " connections: " << sqes << " SQEs for " << messages << " messages; "
      << after.buffers_ran_out - before.buffers_ran_out << " recvs ran out of buffers, "
      << after.multishot_rearms - before.multishot_rearms << " multishot re-arms";

  driver->shutdown();  // cancels the recvs; their final completions run here
  for (auto& c : conns) {
    ::close(c->client);
    ::close(c->server);
  }
}

INSTANTIATE_TEST_SUITE_P(Connections, EchoCost,
                         ::testing::Combine(::testing::Values(16, 1000, 3000),
                                            ::testing::Values(true, false)),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::to_string(std::get<0>(info.param)) +
                                  (std::get<1>(info.param) ? "_incremental" : "_whole_buffers");
                         });

}  // namespace
}  // namespace ringpark::test
