// FallbackDriver: every op against real pipes, files in a temporary folder and
// TCP sockets on 127.0.0.1, with the results io_uring gives for the same op.
// Every wait is bounded: run_until() parks 50 ms at a time for at most 5 s.
#include "epoll_bridge/fallback_driver.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ringpark::detail {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// An op that records each of its completions.
struct TestOp : Op {
  struct Result {
    int res;
    std::uint32_t flags;
  };

  explicit TestOp(OpCode c) {
    code = c;
    complete = &TestOp::record;
  }

  static void record(Op* op, int res, std::uint32_t flags) noexcept {
    auto* self = static_cast<TestOp*>(op);
    self->results.push_back({res, flags});
    if (!(flags & kMore)) ++self->finals;
  }

  bool finished() const { return finals > 0; }
  int res() const { return results.back().res; }

  std::vector<Result> results;
  int finals = 0;
};

// Closes the fd it holds.
struct Fd {
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  void reset(int f = -1) {
    if (fd >= 0) ::close(fd);
    fd = f;
  }
  int fd = -1;
};

sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return sa;
}

std::uint16_t port_of(int fd) {
  sockaddr_in sa{};
  socklen_t len = sizeof sa;
  EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len), 0);
  return ntohs(sa.sin_port);
}

// A TCP socket bound to 127.0.0.1 on a free port; listening unless told not to.
int tcp_bound(bool listening, bool nonblocking = false) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (nonblocking ? SOCK_NONBLOCK : 0), 0);
  EXPECT_GE(fd, 0);
  sockaddr_in sa = loopback(0);
  EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  if (listening) {
    EXPECT_EQ(::listen(fd, 16), 0);
  }
  return fd;
}

// A blocking connect to `port` on 127.0.0.1.
int tcp_connect(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  sockaddr_in sa = loopback(port);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
  return fd;
}

// Two connected (blocking) TCP sockets over 127.0.0.1.
void tcp_pair(Fd& a, Fd& b) {
  Fd listener(tcp_bound(true));
  a.reset(tcp_connect(port_of(listener.fd)));
  b.reset(::accept4(listener.fd, nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_GE(b.fd, 0);
}

bool is_nonblocking(int fd) { return ::fcntl(fd, F_GETFL) & O_NONBLOCK; }

class FallbackDriverTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ringpark-fallback-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }

  void TearDown() override {
    // Every test ends with its ops completed: the ops live on its stack.
    EXPECT_EQ(driver_.in_flight(), 0u);
    std::filesystem::remove_all(dir_);
  }

  // Parks 50 ms at a time until `pred` holds or 5 s pass; false on the latter.
  template <class Pred>
  bool run_until(Pred pred, Clock::duration limit = 5s) {
    const auto deadline = Clock::now() + limit;
    while (!pred()) {
      if (Clock::now() >= deadline) return false;
      driver_.park(50ms);
    }
    return true;
  }

  // Parks for about `d`, for tests checking that nothing happens.
  void run_for(Clock::duration d) {
    const auto end = Clock::now() + d;
    while (Clock::now() < end) driver_.park(10ms);
  }

  std::string path(const char* name) const { return dir_ + "/" + name; }

  int open_file(const char* name, int flags = O_RDWR | O_CREAT) {
    int fd = ::open(path(name).c_str(), flags | O_CLOEXEC, 0600);
    EXPECT_GE(fd, 0);
    return fd;
  }

  std::string dir_;
  EpollReactor epoll_;
  FallbackDriver driver_{epoll_, nullptr};
};

// ---- nop and timeouts -------------------------------------------------------

TEST_F(FallbackDriverTest, NopCompletesAtTheNextTurnNotInsideSubmit) {
  TestOp nop(OpCode::nop);
  driver_.submit(&nop);
  EXPECT_TRUE(nop.results.empty());
  EXPECT_EQ(nop.state, Op::State::in_flight);
  EXPECT_EQ(driver_.in_flight(), 1u);
  EXPECT_TRUE(driver_.has_work());
  driver_.turn();
  ASSERT_EQ(nop.results.size(), 1u);
  EXPECT_EQ(nop.res(), 0);
  EXPECT_EQ(nop.results[0].flags, 0u);
  EXPECT_EQ(nop.state, Op::State::idle);
  EXPECT_FALSE(driver_.has_work());
}

TEST_F(FallbackDriverTest, TimeoutFiresWithEtime) {
  TestOp timeout(OpCode::timeout);
  timeout.timeout_ns = std::chrono::nanoseconds(20ms).count();
  const auto start = Clock::now();
  driver_.submit(&timeout);
  ASSERT_TRUE(run_until([&] { return timeout.finished(); }));
  EXPECT_GE(Clock::now() - start, 20ms);
  ASSERT_EQ(timeout.results.size(), 1u);
  EXPECT_EQ(timeout.res(), -ETIME);
}

TEST_F(FallbackDriverTest, ParkWithNoLimitWakesForAnOpTimeout) {
  TestOp timeout(OpCode::timeout);
  timeout.timeout_ns = std::chrono::nanoseconds(30ms).count();
  driver_.submit(&timeout);
  EXPECT_EQ(driver_.next_timeout(), std::nullopt);  // not started yet
  const auto start = Clock::now();
  // Asked to sleep 10 s, the park must end at the op's deadline instead.
  while (!timeout.finished() && Clock::now() - start < 5s) driver_.park(10s);
  EXPECT_LT(Clock::now() - start, 2s);
  ASSERT_TRUE(timeout.finished());
  EXPECT_EQ(timeout.res(), -ETIME);
}

TEST_F(FallbackDriverTest, CancelledTimeoutCompletesOnceWithEcanceled) {
  TestOp timeout(OpCode::timeout);
  timeout.timeout_ns = std::chrono::nanoseconds(10s).count();
  driver_.submit(&timeout);
  driver_.turn();
  ASSERT_TRUE(driver_.next_timeout().has_value());
  driver_.cancel(&timeout);
  EXPECT_TRUE(timeout.results.empty());  // never inside cancel()
  driver_.turn();
  ASSERT_EQ(timeout.results.size(), 1u);
  EXPECT_EQ(timeout.res(), -ECANCELED);
  EXPECT_EQ(driver_.next_timeout(), std::nullopt);
  run_for(20ms);
  EXPECT_EQ(timeout.results.size(), 1u);
}

TEST_F(FallbackDriverTest, CancelBeforeTheFirstTurnCompletesWithEcanceled) {
  TestOp nop(OpCode::nop);
  driver_.submit(&nop);
  driver_.cancel(&nop);
  EXPECT_TRUE(nop.results.empty());
  EXPECT_EQ(nop.state, Op::State::cancelling);
  driver_.turn();
  driver_.turn();
  ASSERT_EQ(nop.results.size(), 1u);
  EXPECT_EQ(nop.res(), -ECANCELED);
}

TEST_F(FallbackDriverTest, AnOpSubmittedFromACompletionRunsAtTheNextTurn) {
  // The completion resubmits its own op once: the second result must wait for
  // another turn, as a CQE would.
  struct Resubmit : TestOp {
    using TestOp::TestOp;
    FallbackDriver* driver = nullptr;
  } nop(OpCode::nop);
  nop.driver = &driver_;
  nop.complete = [](Op* op, int res, std::uint32_t flags) noexcept {
    auto* self = static_cast<Resubmit*>(op);
    TestOp::record(op, res, flags);
    if (self->finals == 1) self->driver->submit(op);
  };
  driver_.submit(&nop);
  driver_.turn();
  EXPECT_EQ(nop.finals, 1);
  EXPECT_EQ(driver_.in_flight(), 1u);
  driver_.turn();
  EXPECT_EQ(nop.finals, 2);
  EXPECT_EQ(driver_.in_flight(), 0u);
}

// ---- readiness --------------------------------------------------------------

TEST_F(FallbackDriverTest, PollOnAPipeCompletesWhenItBecomesReadable) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  Fd rd(p[0]), wr(p[1]);
  TestOp poll(OpCode::poll);
  poll.fd = rd.fd;
  poll.flags = POLLIN;
  driver_.submit(&poll);
  run_for(30ms);
  EXPECT_FALSE(poll.finished());
  ASSERT_EQ(::write(wr.fd, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return poll.finished(); }));
  ASSERT_EQ(poll.results.size(), 1u);
  EXPECT_TRUE(poll.res() & POLLIN);
  EXPECT_EQ(poll.results[0].flags, 0u);
}

TEST_F(FallbackDriverTest, PollOnARegularFileIsReadyAtOnce) {
  Fd file(open_file("f"));
  TestOp poll(OpCode::poll);
  poll.fd = file.fd;
  poll.flags = POLLIN;
  driver_.submit(&poll);
  ASSERT_TRUE(run_until([&] { return poll.finished(); }));
  EXPECT_EQ(poll.res(), POLLIN);  // what poll(2) says of a file epoll refuses
}

TEST_F(FallbackDriverTest, MultishotPollReportsUntilCancelledThenEndsWithEcanceled) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  Fd rd(p[0]), wr(p[1]);
  TestOp poll(OpCode::poll_multishot);
  poll.fd = rd.fd;
  poll.flags = POLLIN;
  driver_.submit(&poll);
  ASSERT_EQ(::write(wr.fd, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return poll.results.size() >= 3; }));
  for (const auto& r : poll.results) {
    EXPECT_EQ(r.flags, kMore);
    EXPECT_TRUE(r.res & POLLIN);
  }
  driver_.cancel(&poll);
  ASSERT_TRUE(run_until([&] { return poll.finished(); }));
  run_for(20ms);
  EXPECT_EQ(poll.finals, 1);
  EXPECT_EQ(poll.res(), -ECANCELED);
  EXPECT_EQ(poll.results.back().flags, 0u);
}

// ---- sockets ----------------------------------------------------------------

TEST_F(FallbackDriverTest, SendAndRecvEchoOverTcp) {
  Fd a, b;
  tcp_pair(a, b);
  char out[] = "hello";
  char in[64] = {};
  TestOp send(OpCode::send);
  send.fd = a.fd;
  send.buf = out;
  send.len = 5;
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  driver_.submit(&recv);
  driver_.submit(&send);
  ASSERT_TRUE(run_until([&] { return send.finished() && recv.finished(); }));
  EXPECT_EQ(send.res(), 5);
  ASSERT_EQ(recv.res(), 5);
  EXPECT_EQ(std::string(in, 5), "hello");

  // And back, on the same ops.
  char back[64] = {};
  send.fd = b.fd;
  send.buf = in;
  recv.fd = a.fd;
  recv.buf = back;
  driver_.submit(&send);
  driver_.submit(&recv);
  ASSERT_TRUE(run_until([&] { return send.finals == 2 && recv.finals == 2; }));
  ASSERT_EQ(recv.res(), 5);
  EXPECT_EQ(std::string(back, 5), "hello");
  EXPECT_FALSE(is_nonblocking(a.fd));  // the driver leaves the fds' flags alone
  EXPECT_GT(driver_.stats().syscalls, 0u);
}

TEST_F(FallbackDriverTest, RecvWaitsUntilDataArrives) {
  Fd a, b;
  tcp_pair(a, b);
  char in[16] = {};
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  driver_.submit(&recv);
  run_for(50ms);
  EXPECT_FALSE(recv.finished());
  ASSERT_EQ(::send(a.fd, "xyz", 3, 0), 3);
  ASSERT_TRUE(run_until([&] { return recv.finished(); }));
  ASSERT_EQ(recv.res(), 3);
  EXPECT_EQ(std::string(in, 3), "xyz");
}

TEST_F(FallbackDriverTest, RecvWithWaitallGathersTheWholeBuffer) {
  Fd a, b;
  tcp_pair(a, b);
  char in[6] = {};
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  recv.flags = MSG_WAITALL;
  driver_.submit(&recv);
  ASSERT_EQ(::send(a.fd, "abc", 3, 0), 3);
  run_for(30ms);
  EXPECT_FALSE(recv.finished());
  ASSERT_EQ(::send(a.fd, "def", 3, 0), 3);
  ASSERT_TRUE(run_until([&] { return recv.finished(); }));
  ASSERT_EQ(recv.res(), 6);
  EXPECT_EQ(std::string(in, 6), "abcdef");
}

TEST_F(FallbackDriverTest, AcceptAndConnectOnBlockingSockets) {
  Fd listener(tcp_bound(true));
  Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in to = loopback(port_of(listener.fd));
  sockaddr_in from{};
  unsigned from_len = sizeof from;

  TestOp accept(OpCode::accept);
  accept.fd = listener.fd;
  accept.addr = reinterpret_cast<sockaddr*>(&from);
  accept.addrlen = &from_len;
  accept.flags = SOCK_CLOEXEC;
  TestOp connect(OpCode::connect);
  connect.fd = client.fd;
  connect.addr = reinterpret_cast<sockaddr*>(&to);
  connect.len = sizeof to;
  driver_.submit(&accept);
  driver_.submit(&connect);
  ASSERT_TRUE(run_until([&] { return accept.finished() && connect.finished(); }));
  EXPECT_EQ(connect.res(), 0);
  ASSERT_GE(accept.res(), 0);
  Fd server(accept.res());
  EXPECT_EQ(from.sin_family, AF_INET);
  EXPECT_EQ(from_len, sizeof from);
  EXPECT_EQ(from.sin_port, htons(port_of(client.fd)));
  EXPECT_FALSE(is_nonblocking(client.fd));  // O_NONBLOCK was for the call only
  EXPECT_FALSE(is_nonblocking(server.fd));  // accept4's flags, exactly
}

TEST_F(FallbackDriverTest, MultishotAcceptTakesThreeConnections) {
  Fd listener(tcp_bound(true, /*nonblocking=*/true));
  TestOp accept(OpCode::accept_multishot);
  accept.fd = listener.fd;
  accept.flags = SOCK_CLOEXEC;
  driver_.submit(&accept);
  driver_.turn();
  Fd c1(tcp_connect(port_of(listener.fd)));
  Fd c2(tcp_connect(port_of(listener.fd)));
  Fd c3(tcp_connect(port_of(listener.fd)));
  ASSERT_TRUE(run_until([&] { return accept.results.size() >= 3; }));
  std::vector<Fd> accepted(3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(accept.results[i].flags, kMore);
    EXPECT_GE(accept.results[i].res, 0);
    accepted[i].reset(accept.results[i].res);
  }
  EXPECT_FALSE(accept.finished());
  driver_.cancel(&accept);
  ASSERT_TRUE(run_until([&] { return accept.finished(); }));
  EXPECT_EQ(accept.results.size(), 4u);
  EXPECT_EQ(accept.res(), -ECANCELED);
  EXPECT_EQ(accept.results.back().flags, 0u);
}

TEST_F(FallbackDriverTest, MultishotAcceptOnABlockingListener) {
  Fd listener(tcp_bound(true));
  TestOp accept(OpCode::accept_multishot);
  accept.fd = listener.fd;
  accept.flags = SOCK_CLOEXEC | SOCK_NONBLOCK;
  driver_.submit(&accept);
  Fd c1(tcp_connect(port_of(listener.fd)));
  Fd c2(tcp_connect(port_of(listener.fd)));
  ASSERT_TRUE(run_until([&] { return accept.results.size() >= 2; }));
  Fd s1(accept.results[0].res), s2(accept.results[1].res);
  EXPECT_TRUE(is_nonblocking(s1.fd));
  driver_.cancel(&accept);
  ASSERT_TRUE(run_until([&] { return accept.finished(); }));
  EXPECT_EQ(accept.res(), -ECANCELED);
}

TEST_F(FallbackDriverTest, ConnectToAPortNobodyListensOnIsRefused) {
  // Bound but not listening: the port is ours, and a SYN to it gets a RST.
  Fd bound(tcp_bound(false));
  Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in to = loopback(port_of(bound.fd));
  TestOp connect(OpCode::connect);
  connect.fd = client.fd;
  connect.addr = reinterpret_cast<sockaddr*>(&to);
  connect.len = sizeof to;
  driver_.submit(&connect);
  ASSERT_TRUE(run_until([&] { return connect.finished(); }));
  EXPECT_EQ(connect.res(), -ECONNREFUSED);
}

TEST_F(FallbackDriverTest, RecvAndSendWaitingOnOneSocketBothComplete) {
  Fd a, b;
  tcp_pair(a, b);
  // Small buffers, then fill a's send path so that a send on it must wait.
  int small = 4096;
  ASSERT_EQ(::setsockopt(a.fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  ASSERT_EQ(::setsockopt(b.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
  std::vector<char> chunk(65536, 'f');
  while (::send(a.fd, chunk.data(), chunk.size(), MSG_DONTWAIT) > 0) {
  }
  ASSERT_EQ(errno, EAGAIN);

  char in[16] = {};
  std::vector<char> out(100, 'o');
  TestOp recv(OpCode::recv);
  recv.fd = a.fd;
  recv.buf = in;
  recv.len = sizeof in;
  TestOp send(OpCode::send);
  send.fd = a.fd;
  send.buf = out.data();
  send.len = static_cast<unsigned>(out.size());
  driver_.submit(&recv);
  driver_.submit(&send);
  run_for(30ms);
  EXPECT_FALSE(recv.finished());
  EXPECT_FALSE(send.finished());

  ASSERT_EQ(::send(b.fd, "ping", 4, 0), 4);
  ASSERT_TRUE(run_until([&] { return recv.finished(); }));
  ASSERT_EQ(recv.res(), 4);
  EXPECT_EQ(std::string(in, 4), "ping");
  EXPECT_FALSE(send.finished());

  // Drain b, which makes room on a.
  ASSERT_TRUE(run_until([&] {
    while (::recv(b.fd, chunk.data(), chunk.size(), MSG_DONTWAIT) > 0) {
    }
    return send.finished();
  }));
  EXPECT_EQ(send.res(), 100);
}

TEST_F(FallbackDriverTest, SendToAPeerThatClosedIsEpipeWithoutSigpipe) {
  Fd a, b;
  tcp_pair(a, b);
  b.reset();  // FIN now; the first send after it draws a RST
  char byte = 'x';
  TestOp send(OpCode::send);
  send.fd = a.fd;
  send.buf = &byte;
  send.len = 1;
  for (int i = 0; i < 100; ++i) {
    driver_.submit(&send);
    ASSERT_TRUE(run_until([&] { return send.finals == i + 1; }));
    if (send.res() < 0) break;
  }
  EXPECT_EQ(send.res(), -EPIPE);  // and the test process is still alive
}

TEST_F(FallbackDriverTest, CancelOfAPendingRecvCompletesItOnceWithEcanceled) {
  Fd a, b;
  tcp_pair(a, b);
  char in[16];
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  driver_.submit(&recv);
  driver_.turn();
  driver_.cancel(&recv);
  EXPECT_TRUE(recv.results.empty());  // never inside cancel()
  driver_.cancel(&recv);              // a second request changes nothing
  ASSERT_TRUE(run_until([&] { return recv.finished(); }));
  ASSERT_EQ(::send(a.fd, "late", 4, 0), 4);
  run_for(30ms);
  ASSERT_EQ(recv.results.size(), 1u);
  EXPECT_EQ(recv.res(), -ECANCELED);
  // The data stayed in the socket.
  EXPECT_EQ(::recv(b.fd, in, sizeof in, MSG_DONTWAIT), 4);
}

TEST_F(FallbackDriverTest, CancelOpEndsAPendingRecvAndReturnsZero) {
  Fd a, b;
  tcp_pair(a, b);
  char in[16];
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  driver_.submit(&recv);
  driver_.turn();
  TestOp cancel(OpCode::cancel);
  cancel.target = &recv;
  driver_.submit(&cancel);
  ASSERT_TRUE(run_until([&] { return cancel.finished() && recv.finished(); }));
  EXPECT_EQ(cancel.res(), 0);
  EXPECT_EQ(recv.res(), -ECANCELED);
  EXPECT_EQ(recv.finals, 1);
}

TEST_F(FallbackDriverTest, CancelOpOfAnOpNotInFlightIsEnoent) {
  TestOp never(OpCode::nop);  // never submitted
  TestOp cancel(OpCode::cancel);
  cancel.target = &never;
  driver_.submit(&cancel);
  ASSERT_TRUE(run_until([&] { return cancel.finished(); }));
  EXPECT_EQ(cancel.res(), -ENOENT);

  // Nor one that already completed.
  TestOp nop(OpCode::nop);
  driver_.submit(&nop);
  ASSERT_TRUE(run_until([&] { return nop.finished(); }));
  cancel.target = &nop;
  driver_.submit(&cancel);
  ASSERT_TRUE(run_until([&] { return cancel.finals == 2; }));
  EXPECT_EQ(cancel.res(), -ENOENT);
}

TEST_F(FallbackDriverTest, ShutdownCompletesEveryOpInFlightOnceWithEcanceled) {
  Fd a, b;
  tcp_pair(a, b);
  char in[16];
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  TestOp timeout(OpCode::timeout);
  timeout.timeout_ns = std::chrono::nanoseconds(10s).count();
  TestOp fresh(OpCode::nop);  // submitted, never started
  driver_.submit(&recv);
  driver_.submit(&timeout);
  driver_.turn();
  driver_.submit(&fresh);
  driver_.shutdown();
  EXPECT_EQ(driver_.in_flight(), 0u);
  for (TestOp* op : {&recv, &timeout, &fresh}) {
    ASSERT_EQ(op->results.size(), 1u);
    EXPECT_EQ(op->res(), -ECANCELED);
    EXPECT_EQ(op->state, Op::State::idle);
  }
  // Afterwards an op completes at once, since no turn will come.
  TestOp late(OpCode::nop);
  driver_.submit(&late);
  ASSERT_EQ(late.results.size(), 1u);
  EXPECT_EQ(late.res(), -ECANCELED);
  driver_.shutdown();  // a second call does nothing
  EXPECT_EQ(recv.results.size(), 1u);
}

// ---- reads and writes on streams --------------------------------------------

TEST_F(FallbackDriverTest, ReadAndWriteOnAPipe) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  Fd rd(p[0]), wr(p[1]);
  char in[16] = {};
  char out[] = "pipe";
  TestOp read(OpCode::read);
  read.fd = rd.fd;
  read.buf = in;
  read.len = sizeof in;
  read.offset = 0;  // ignored on a stream, as io_uring ignores it
  driver_.submit(&read);
  run_for(30ms);
  EXPECT_FALSE(read.finished());
  TestOp write(OpCode::write);
  write.fd = wr.fd;
  write.buf = out;
  write.len = 4;
  driver_.submit(&write);
  ASSERT_TRUE(run_until([&] { return read.finished() && write.finished(); }));
  EXPECT_EQ(write.res(), 4);
  ASSERT_EQ(read.res(), 4);
  EXPECT_EQ(std::string(in, 4), "pipe");
  EXPECT_EQ(driver_.stats().pool_jobs, 0u);  // streams never go to the pool
}

TEST_F(FallbackDriverTest, ReadOnAnEventfdWaitsForASignal) {
  Fd efd(::eventfd(0, EFD_CLOEXEC));
  std::uint64_t value = 0;
  TestOp read(OpCode::read);
  read.fd = efd.fd;
  read.buf = &value;
  read.len = sizeof value;
  driver_.submit(&read);
  run_for(30ms);
  EXPECT_FALSE(read.finished());
  std::uint64_t two = 2;
  ASSERT_EQ(::write(efd.fd, &two, sizeof two), 8);
  ASSERT_TRUE(run_until([&] { return read.finished(); }));
  EXPECT_EQ(read.res(), 8);
  EXPECT_EQ(value, 2u);
}

// ---- files, on the pool -----------------------------------------------------

TEST_F(FallbackDriverTest, ReadAndWriteAFileAtOffsetsAndAtItsPosition) {
  Fd file(open_file("data"));
  char hello[] = "hello world";
  TestOp write(OpCode::write);
  write.fd = file.fd;
  write.buf = hello;
  write.len = 11;
  write.offset = 0;
  driver_.submit(&write);
  ASSERT_TRUE(run_until([&] { return write.finished(); }));
  ASSERT_EQ(write.res(), 11);

  char in[16] = {};
  TestOp read(OpCode::read);
  read.fd = file.fd;
  read.buf = in;
  read.len = 5;
  read.offset = 6;
  driver_.submit(&read);
  ASSERT_TRUE(run_until([&] { return read.finished(); }));
  ASSERT_EQ(read.res(), 5);
  EXPECT_EQ(std::string(in, 5), "world");

  // offset -1: at the file position (still 0: pread/pwrite leave it), which moves.
  char abc[] = "ABC";
  write.buf = abc;
  write.len = 3;
  write.offset = -1;
  driver_.submit(&write);
  ASSERT_TRUE(run_until([&] { return write.finals == 2; }));
  ASSERT_EQ(write.res(), 3);
  EXPECT_EQ(::lseek(file.fd, 0, SEEK_CUR), 3);
  read.len = 4;
  read.offset = -1;
  driver_.submit(&read);
  ASSERT_TRUE(run_until([&] { return read.finals == 2; }));
  ASSERT_EQ(read.res(), 4);
  EXPECT_EQ(std::string(in, 4), "lo w");
  EXPECT_EQ(::lseek(file.fd, 0, SEEK_CUR), 7);

  // Past the end: 0 bytes, as pread says.
  read.offset = 100;
  driver_.submit(&read);
  ASSERT_TRUE(run_until([&] { return read.finals == 3; }));
  EXPECT_EQ(read.res(), 0);
  EXPECT_EQ(driver_.stats().pool_jobs, 5u);
}

TEST_F(FallbackDriverTest, ReadvAndWritevOnAFile) {
  Fd file(open_file("data"));
  char one[] = "abc", two[] = "defg";
  iovec out[2] = {{one, 3}, {two, 4}};
  TestOp writev(OpCode::writev);
  writev.fd = file.fd;
  writev.buf = out;
  writev.len = 2;
  writev.offset = 2;
  driver_.submit(&writev);
  ASSERT_TRUE(run_until([&] { return writev.finished(); }));
  ASSERT_EQ(writev.res(), 7);

  char x[4] = {}, y[16] = {};
  iovec in[2] = {{x, 4}, {y, sizeof y}};
  TestOp readv(OpCode::readv);
  readv.fd = file.fd;
  readv.buf = in;
  readv.len = 2;
  readv.offset = 0;
  driver_.submit(&readv);
  ASSERT_TRUE(run_until([&] { return readv.finished(); }));
  ASSERT_EQ(readv.res(), 9);
  EXPECT_EQ(std::string(x, 4), std::string("\0\0ab", 4));
  EXPECT_EQ(std::string(y, 5), "cdefg");

  // At the position (0): writes there and moves it.
  char z[] = "ZZ";
  iovec zz[1] = {{z, 2}};
  writev.buf = zz;
  writev.len = 1;
  writev.offset = -1;
  driver_.submit(&writev);
  ASSERT_TRUE(run_until([&] { return writev.finals == 2; }));
  ASSERT_EQ(writev.res(), 2);
  EXPECT_EQ(::lseek(file.fd, 0, SEEK_CUR), 2);
  char check[9];
  ASSERT_EQ(::pread(file.fd, check, 9, 0), 9);
  EXPECT_EQ(std::string(check, 9), "ZZabcdefg");
}

TEST_F(FallbackDriverTest, FsyncAndFdatasyncSucceedOnAFile) {
  Fd file(open_file("data"));
  ASSERT_EQ(::write(file.fd, "x", 1), 1);
  TestOp fsync(OpCode::fsync);
  fsync.fd = file.fd;
  TestOp fdatasync(OpCode::fdatasync);
  fdatasync.fd = file.fd;
  driver_.submit(&fsync);
  driver_.submit(&fdatasync);
  ASSERT_TRUE(run_until([&] { return fsync.finished() && fdatasync.finished(); }));
  EXPECT_EQ(fsync.res(), 0);
  EXPECT_EQ(fdatasync.res(), 0);
}

TEST_F(FallbackDriverTest, OpenatOfAMissingFileIsEnoent) {
  const std::string missing = path("missing");
  TestOp open(OpCode::openat);
  open.path = missing.c_str();
  open.flags = O_RDONLY | O_CLOEXEC;
  driver_.submit(&open);
  ASSERT_TRUE(run_until([&] { return open.finished(); }));
  EXPECT_EQ(open.res(), -ENOENT);
}

TEST_F(FallbackDriverTest, OpenatCreatesAFileRelativeToADirectory) {
  Fd dir(::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  TestOp open(OpCode::openat);
  open.dfd = dir.fd;
  open.path = "made";
  open.flags = O_RDWR | O_CREAT | O_CLOEXEC;
  open.mode = 0640;
  driver_.submit(&open);
  ASSERT_TRUE(run_until([&] { return open.finished(); }));
  ASSERT_GE(open.res(), 0);
  Fd made(open.res());
  struct stat st;
  ASSERT_EQ(::stat(path("made").c_str(), &st), 0);
  EXPECT_TRUE(S_ISREG(st.st_mode));
}

TEST_F(FallbackDriverTest, StatxReportsTheSize) {
  {
    Fd file(open_file("sized"));
    std::vector<char> bytes(1234, 's');
    ASSERT_EQ(::write(file.fd, bytes.data(), bytes.size()), 1234);
  }
  const std::string p = path("sized");
  struct statx stx {};
  TestOp statx(OpCode::statx);
  statx.path = p.c_str();
  statx.flags = 0;
  statx.len = STATX_SIZE;
  statx.statxbuf = &stx;
  driver_.submit(&statx);
  ASSERT_TRUE(run_until([&] { return statx.finished(); }));
  ASSERT_EQ(statx.res(), 0);
  EXPECT_TRUE(stx.stx_mask & STATX_SIZE);
  EXPECT_EQ(stx.stx_size, 1234u);
}

TEST_F(FallbackDriverTest, MkdiratMakesADirectory) {
  const std::string p = path("sub");
  TestOp mkdir(OpCode::mkdirat);
  mkdir.path = p.c_str();
  mkdir.mode = 0750;
  driver_.submit(&mkdir);
  ASSERT_TRUE(run_until([&] { return mkdir.finished(); }));
  ASSERT_EQ(mkdir.res(), 0);
  EXPECT_TRUE(std::filesystem::is_directory(p));
  driver_.submit(&mkdir);  // again: it exists
  ASSERT_TRUE(run_until([&] { return mkdir.finals == 2; }));
  EXPECT_EQ(mkdir.res(), -EEXIST);
}

TEST_F(FallbackDriverTest, RenameatMovesAFile) {
  Fd(open_file("old"));
  const std::string from = path("old"), to = path("new");
  TestOp rename(OpCode::renameat);
  rename.path = from.c_str();
  rename.path2 = to.c_str();
  driver_.submit(&rename);
  ASSERT_TRUE(run_until([&] { return rename.finished(); }));
  ASSERT_EQ(rename.res(), 0);
  EXPECT_FALSE(std::filesystem::exists(from));
  EXPECT_TRUE(std::filesystem::exists(to));
}

TEST_F(FallbackDriverTest, UnlinkatRemovesAFileAndADirectory) {
  Fd(open_file("doomed"));
  const std::string file = path("doomed"), dir = path("dir");
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  TestOp unlink(OpCode::unlinkat);
  unlink.path = file.c_str();
  TestOp rmdir(OpCode::unlinkat);
  rmdir.path = dir.c_str();
  rmdir.flags = AT_REMOVEDIR;
  driver_.submit(&unlink);
  driver_.submit(&rmdir);
  ASSERT_TRUE(run_until([&] { return unlink.finished() && rmdir.finished(); }));
  EXPECT_EQ(unlink.res(), 0);
  EXPECT_EQ(rmdir.res(), 0);
  EXPECT_FALSE(std::filesystem::exists(file));
  EXPECT_FALSE(std::filesystem::exists(dir));
  driver_.submit(&unlink);  // gone now
  ASSERT_TRUE(run_until([&] { return unlink.finals == 2; }));
  EXPECT_EQ(unlink.res(), -ENOENT);
}

TEST_F(FallbackDriverTest, CloseGivesTheSyscallsResult) {
  TestOp close(OpCode::close);
  close.fd = ::eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(close.fd, 0);
  driver_.submit(&close);
  ASSERT_TRUE(run_until([&] { return close.finished(); }));
  EXPECT_EQ(close.res(), 0);
  driver_.submit(&close);  // the same fd, closed now
  ASSERT_TRUE(run_until([&] { return close.finals == 2; }));
  EXPECT_EQ(close.res(), -EBADF);
}

TEST_F(FallbackDriverTest, FtruncateSetsTheLength) {
  Fd file(open_file("data"));
  ASSERT_EQ(::write(file.fd, "0123456789", 10), 10);
  TestOp truncate(OpCode::ftruncate);
  truncate.fd = file.fd;
  truncate.offset = 4;
  driver_.submit(&truncate);
  ASSERT_TRUE(run_until([&] { return truncate.finished(); }));
  EXPECT_EQ(truncate.res(), 0);
  struct stat st;
  ASSERT_EQ(::fstat(file.fd, &st), 0);
  EXPECT_EQ(st.st_size, 4);
}

TEST_F(FallbackDriverTest, AnOpWaitingOnAnFdTheCloseOpClosesWaitsUntilCancelled) {
  Fd a, b;
  tcp_pair(a, b);
  char in[16];
  TestOp recv(OpCode::recv);
  recv.fd = b.fd;
  recv.buf = in;
  recv.len = sizeof in;
  driver_.submit(&recv);
  driver_.turn();
  TestOp close(OpCode::close);
  close.fd = b.fd;
  driver_.submit(&close);
  ASSERT_TRUE(run_until([&] { return close.finished(); }));
  EXPECT_EQ(close.res(), 0);
  b.fd = -1;  // closed by the op
  // A new socket may take the number now; the old recv must not see it.
  Fd c, d;
  tcp_pair(c, d);
  ASSERT_EQ(::send(a.fd, "x", 1, 0), 1);
  ASSERT_EQ(::send(c.fd, "y", 1, 0), 1);
  run_for(30ms);
  EXPECT_FALSE(recv.finished());
  driver_.cancel(&recv);
  ASSERT_TRUE(run_until([&] { return recv.finished(); }));
  EXPECT_EQ(recv.res(), -ECANCELED);
}

TEST_F(FallbackDriverTest, ShutdownWaitsForARunningPoolJobAndGivesItsResult) {
  const std::string fifo = path("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  TestOp open(OpCode::openat);
  open.path = fifo.c_str();
  open.flags = O_RDONLY | O_CLOEXEC;
  driver_.submit(&open);
  driver_.turn();
  const auto start = Clock::now();
  while (driver_.pool().running() == 0 && Clock::now() - start < 5s) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(driver_.pool().running(), 1u);
  // The writer comes while shutdown() waits for the job.
  std::thread writer([&] {
    std::this_thread::sleep_for(50ms);
    Fd w(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
    EXPECT_GE(w.fd, 0);
  });
  driver_.shutdown();
  writer.join();
  ASSERT_EQ(open.results.size(), 1u);
  ASSERT_GE(open.res(), 0);  // not -ECANCELED: it was running
  Fd reader(open.res());
  EXPECT_GE(Clock::now() - start, 50ms);
}

TEST_F(FallbackDriverTest, CancelOfARunningPoolJobIsEalreadyAndItFinishes) {
  // Opening a FIFO for reading blocks until a writer comes: a job that runs
  // for as long as the test wants.
  const std::string fifo = path("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  TestOp open(OpCode::openat);
  open.path = fifo.c_str();
  open.flags = O_RDONLY | O_CLOEXEC;
  driver_.submit(&open);
  driver_.turn();
  const auto start = Clock::now();
  while (driver_.pool().running() == 0 && Clock::now() - start < 5s) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_EQ(driver_.pool().running(), 1u);

  TestOp cancel(OpCode::cancel);
  cancel.target = &open;
  driver_.submit(&cancel);
  ASSERT_TRUE(run_until([&] { return cancel.finished(); }));
  EXPECT_EQ(cancel.res(), -EALREADY);
  driver_.cancel(&open);  // the request form: no effect either
  run_for(20ms);
  EXPECT_FALSE(open.finished());

  Fd writer(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC));
  ASSERT_GE(writer.fd, 0);
  ASSERT_TRUE(run_until([&] { return open.finished(); }));
  ASSERT_GE(open.res(), 0);  // its real result
  Fd reader(open.res());
  EXPECT_EQ(open.finals, 1);
}

// ---- the inner reactor ------------------------------------------------------

// A reactor whose fd is an eventfd; turn() drains it and counts.
class EventfdReactor final : public Reactor {
 public:
  EventfdReactor() : fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}
  ~EventfdReactor() override { ::close(fd_); }
  void park(Timeout) noexcept override {}
  void turn() noexcept override {
    std::uint64_t v;
    while (::read(fd_, &v, sizeof v) > 0) {
    }
    ++turns;
  }
  Unparker unparker() const override { return {}; }
  void shutdown() noexcept override { ++shutdowns; }
  void abandon() noexcept override {}
  int fd() const noexcept override { return fd_; }
  Timeout timeout() const noexcept override { return timeout_; }

  void signal() const {
    std::uint64_t one = 1;
    (void)!::write(fd_, &one, sizeof one);
  }
  // A new fd under a new number (made before the old one is closed).
  void replace_fd() {
    const int old = fd_;
    fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    ::close(old);
  }

  int turns = 0;
  int shutdowns = 0;
  Timeout timeout_;

 private:
  int fd_;
};

TEST(FallbackDriverInner, TurnsTheInnerReactorWhenItsFdIsReadable) {
  EpollReactor epoll;
  EventfdReactor inner;
  FallbackDriver driver(epoll, &inner);
  driver.park(20ms);
  EXPECT_EQ(inner.turns, 0);
  inner.signal();
  const auto start = Clock::now();
  while (inner.turns == 0 && Clock::now() - start < 5s) driver.park(1s);
  EXPECT_LT(Clock::now() - start, 900ms);  // woken by the fd, not by the 1 s limit
  EXPECT_EQ(inner.turns, 1);
  driver.park(20ms);
  EXPECT_EQ(inner.turns, 1);  // drained: level-triggered, no report left
  driver.shutdown();
  EXPECT_EQ(inner.shutdowns, 1);
}

TEST(FallbackDriverInner, TurnsTheInnerReactorWhenItsTimeoutPasses) {
  EpollReactor epoll;
  EventfdReactor inner;
  inner.timeout_ = 30ms;
  FallbackDriver driver(epoll, &inner);
  const auto start = Clock::now();
  while (inner.turns == 0 && Clock::now() - start < 5s) driver.park(10s);
  EXPECT_LT(Clock::now() - start, 2s);
  EXPECT_EQ(inner.turns, 1);
}

TEST(FallbackDriverInner, FollowsTheInnerReactorsFdWhenItChanges) {
  EpollReactor epoll;
  EventfdReactor inner;
  FallbackDriver driver(epoll, &inner);
  driver.turn();
  const int old = inner.fd();
  inner.replace_fd();
  ASSERT_NE(inner.fd(), old);
  inner.signal();
  const auto start = Clock::now();
  while (inner.turns == 0 && Clock::now() - start < 5s) driver.park(50ms);
  EXPECT_EQ(inner.turns, 1);
}

// ---- the thread pool --------------------------------------------------------

TEST(ThreadPool, RunsEveryJobPostedOnce) {
  ThreadPool pool(2);
  EXPECT_EQ(pool.threads(), 0u);  // started on first use
  std::atomic<int> runs{0};
  std::vector<ThreadPool::Job> jobs(20);
  for (auto& job : jobs) {
    job.data = &runs;
    job.run = [](ThreadPool::Job* j) noexcept {
      static_cast<std::atomic<int>*>(j->data)->fetch_add(1);
    };
    ASSERT_EQ(pool.post(&job), 0);
  }
  EXPECT_EQ(pool.threads(), 2u);
  pool.wait_idle();
  EXPECT_EQ(runs.load(), 20);
  pool.stop();
  EXPECT_EQ(pool.threads(), 0u);
}

TEST(ThreadPool, TryCancelTakesBackAQueuedJobButNotARunningOne) {
  ThreadPool pool(1);
  struct Gate {
    std::mutex m;
    std::condition_variable cv;
    bool started = false, open = false;
    int runs = 0;
  } gate;
  ThreadPool::Job blocker, queued;
  blocker.data = queued.data = &gate;
  blocker.run = [](ThreadPool::Job* j) noexcept {
    auto* g = static_cast<Gate*>(j->data);
    std::unique_lock lock(g->m);
    g->started = true;
    g->cv.notify_all();
    g->cv.wait(lock, [g] { return g->open; });
    ++g->runs;
  };
  queued.run = [](ThreadPool::Job* j) noexcept {
    auto* g = static_cast<Gate*>(j->data);
    std::lock_guard lock(g->m);
    ++g->runs;
  };
  ASSERT_EQ(pool.post(&blocker), 0);
  ASSERT_EQ(pool.post(&queued), 0);
  {
    std::unique_lock lock(gate.m);
    ASSERT_TRUE(gate.cv.wait_for(lock, 5s, [&] { return gate.started; }));
  }
  EXPECT_TRUE(pool.try_cancel(&queued));
  EXPECT_FALSE(pool.try_cancel(&blocker));
  EXPECT_EQ(pool.running(), 1u);
  {
    std::lock_guard lock(gate.m);
    gate.open = true;
  }
  gate.cv.notify_all();
  pool.wait_idle();
  std::lock_guard lock(gate.m);
  EXPECT_EQ(gate.runs, 1);  // the cancelled job never ran
}

}  // namespace
}  // namespace ringpark::detail
