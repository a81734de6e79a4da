// Operations through the IoBackend interface, on real kernel objects (a file in
// a fresh temporary directory, pipes, TCP sockets on 127.0.0.1 only).
//
// BackendTest is typed (harness in backend_harness.hpp): every op test runs on
// each backend (the io_uring driver and the epoll fallback). UringDriverTest
// holds what only the ring has:
// batching into one io_uring_enter, a full SQ, an overflowing CQ. A backend
// that cannot be built here skips with its reason.
#include "uring_driver/driver.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend_harness.hpp"
#include "epoll_bridge/epoll_reactor.hpp"
#include "epoll_bridge/fallback_driver.hpp"
#include "ringpark/op.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

// A fresh directory from mkdtemp, removed with its contents at the end.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/ringpark-test-XXXXXX";
    if (::mkdtemp(tmpl) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  bool ok() const { return !path_.empty(); }
  std::string file(const char* name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

template <class Backend>
class BackendTest : public OpFixture<Backend>, public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = this->start(); !why.empty()) GTEST_SKIP() << why;
  }
};

TYPED_TEST_SUITE(BackendTest, Backends, BackendName);

// ---- Basic ops ---------------------------------------------------------------

TYPED_TEST(BackendTest, NopNeverCompletesInsideSubmit) {
  TestOp& op = this->nop();
  EXPECT_EQ(op.calls, 0);
  EXPECT_EQ(this->io().in_flight(), 1u);
}

TYPED_TEST(BackendTest, NopCompletesOnceWithZero) {
  TestOp& op = this->nop();
  ASSERT_TRUE(this->run_until_done(op));
  this->settle();
  EXPECT_EQ(op.calls, 1);
  EXPECT_EQ(op.res, 0);
  EXPECT_EQ(op.flags, 0u);
  EXPECT_EQ(this->io().in_flight(), 0u);
}

TYPED_TEST(BackendTest, TimeoutCompletesWithEtimeAfterItsDuration) {
  Stopwatch sw;
  TestOp& op = this->timeout(30ms);
  ASSERT_TRUE(this->run_until_done(op));
  EXPECT_EQ(op.res, -ETIME);
  EXPECT_GE(sw.elapsed(), 30ms);
  EXPECT_LT(sw.elapsed(), 30ms + 2s);
}

TYPED_TEST(BackendTest, CancelOfPendingTimeoutCompletesItOnceWithEcanceled) {
  TestOp& op = this->timeout(10s);
  this->park().park(Duration::zero());  // the timeout is now with the kernel
  this->io().cancel(&op.op);
  ASSERT_TRUE(this->run_until_done(op));
  this->settle();
  EXPECT_EQ(op.calls, 1);
  EXPECT_EQ(op.res, -ECANCELED);
  EXPECT_EQ(this->io().in_flight(), 0u);
}

TYPED_TEST(BackendTest, CancelInSameTurnAsSubmitCompletesOnceWithEcanceled) {
  TestOp& op = this->timeout(10s);
  this->io().cancel(&op.op);
  ASSERT_TRUE(this->run_until_done(op));
  this->settle();
  EXPECT_EQ(op.calls, 1);
  EXPECT_EQ(op.res, -ECANCELED);
}

TYPED_TEST(BackendTest, CancelOpOnPendingTargetReturnsZero) {
  TestOp& target = this->timeout(10s);
  this->park().park(Duration::zero());
  TestOp& cancel = this->make(OpCode::cancel);
  cancel.op.target = &target.op;
  this->io().submit(&cancel.op);
  ASSERT_TRUE(this->run_until([&] { return cancel.done() && target.done(); }));
  EXPECT_EQ(cancel.res, 0);
  EXPECT_EQ(target.res, -ECANCELED);
}

TYPED_TEST(BackendTest, CancelOpOnUnknownTargetReturnsEnoent) {
  TestOp& never_submitted = this->make(OpCode::nop);
  TestOp& cancel = this->make(OpCode::cancel);
  cancel.op.target = &never_submitted.op;
  this->io().submit(&cancel.op);
  ASSERT_TRUE(this->run_until_done(cancel));
  EXPECT_EQ(cancel.res, -ENOENT);
  EXPECT_EQ(never_submitted.calls, 0);
}

TYPED_TEST(BackendTest, CancelOfIdleOpIsNoOp) {
  TestOp& idle = this->make(OpCode::nop);
  this->io().cancel(&idle.op);
  this->settle();
  EXPECT_EQ(idle.calls, 0);
  EXPECT_EQ(this->io().in_flight(), 0u);
}

// ---- Files -------------------------------------------------------------------

TYPED_TEST(BackendTest, WriteThenReadFileAtOffset) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  int fd = this->fds_.add(::open(dir.file("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_GE(fd, 0);

  TestOp& w = this->make(OpCode::write);
  std::memcpy(w.buf.data(), "hello world", 11);
  w.op.fd = fd;
  w.op.buf = w.buf.data();
  w.op.len = 11;
  w.op.offset = 0;
  this->io().submit(&w.op);
  ASSERT_TRUE(this->run_until_done(w));
  ASSERT_EQ(w.res, 11);

  TestOp& r = this->make(OpCode::read);
  r.op.fd = fd;
  r.op.buf = r.buf.data();
  r.op.len = 5;
  r.op.offset = 6;
  this->io().submit(&r.op);
  ASSERT_TRUE(this->run_until_done(r));
  ASSERT_EQ(r.res, 5);
  EXPECT_EQ(std::string(r.buf.data(), 5), "world");
}

TYPED_TEST(BackendTest, ReadAtOffsetMinusOneUsesAndAdvancesFilePosition) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  int fd = this->fds_.add(::open(dir.file("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, "abcdefgh", 8, 0), 8);
  ASSERT_EQ(::lseek(fd, 2, SEEK_SET), 2);

  TestOp& r = this->make(OpCode::read);
  r.op.fd = fd;
  r.op.buf = r.buf.data();
  r.op.len = 3;
  r.op.offset = -1;
  this->io().submit(&r.op);
  ASSERT_TRUE(this->run_until_done(r));
  ASSERT_EQ(r.res, 3);
  EXPECT_EQ(std::string(r.buf.data(), 3), "cde");
  EXPECT_EQ(::lseek(fd, 0, SEEK_CUR), 5);
}

TYPED_TEST(BackendTest, WritesAtOffsetMinusOneFollowEachOther) {
  TempDir dir;
  ASSERT_TRUE(dir.ok());
  int fd = this->fds_.add(::open(dir.file("f").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_GE(fd, 0);
  for (const char* part : {"abc", "def"}) {
    TestOp& w = this->make(OpCode::write);
    std::memcpy(w.buf.data(), part, 3);
    w.op.fd = fd;
    w.op.buf = w.buf.data();
    w.op.len = 3;
    w.op.offset = -1;
    this->io().submit(&w.op);
    ASSERT_TRUE(this->run_until_done(w));
    ASSERT_EQ(w.res, 3);
  }
  char back[8] = {};
  ASSERT_EQ(::pread(fd, back, sizeof back, 0), 6);
  EXPECT_EQ(std::string(back, 6), "abcdef");
}

// ---- Sockets -----------------------------------------------------------------

TYPED_TEST(BackendTest, SendAndRecvOverTcp) {
  int client, server;
  ASSERT_TRUE(this->tcp_pair(&client, &server));
  TestOp& send = this->make(OpCode::send);
  std::memcpy(send.buf.data(), "ping", 4);
  send.op.fd = client;
  send.op.buf = send.buf.data();
  send.op.len = 4;
  TestOp& recv = this->make(OpCode::recv);
  recv.op.fd = server;
  recv.op.buf = recv.buf.data();
  recv.op.len = static_cast<unsigned>(recv.buf.size());
  this->io().submit(&recv.op);
  this->io().submit(&send.op);
  ASSERT_TRUE(this->run_until([&] { return send.done() && recv.done(); }));
  EXPECT_EQ(send.res, 4);
  ASSERT_EQ(recv.res, 4);
  EXPECT_EQ(std::string(recv.buf.data(), 4), "ping");
}

TYPED_TEST(BackendTest, RecvWaitsForData) {
  int client, server;
  ASSERT_TRUE(this->tcp_pair(&client, &server));
  TestOp& recv = this->make(OpCode::recv);
  recv.op.fd = server;
  recv.op.buf = recv.buf.data();
  recv.op.len = static_cast<unsigned>(recv.buf.size());
  this->io().submit(&recv.op);
  this->settle();
  EXPECT_EQ(recv.calls, 0);
  ASSERT_EQ(::send(client, "x", 1, MSG_NOSIGNAL), 1);
  ASSERT_TRUE(this->run_until_done(recv));
  EXPECT_EQ(recv.res, 1);
}

TYPED_TEST(BackendTest, RecvSeesPeerCloseAsZero) {
  int client, server;
  ASSERT_TRUE(this->tcp_pair(&client, &server));
  ASSERT_EQ(::shutdown(client, SHUT_WR), 0);
  TestOp& recv = this->make(OpCode::recv);
  recv.op.fd = server;
  recv.op.buf = recv.buf.data();
  recv.op.len = static_cast<unsigned>(recv.buf.size());
  this->io().submit(&recv.op);
  ASSERT_TRUE(this->run_until_done(recv));
  EXPECT_EQ(recv.res, 0);
}

// Where the backend lacks multishot recv it says so, in supports() for the
// ring and in the op's one completion everywhere; where it has it, the op
// receives.
TYPED_TEST(BackendTest, RecvMultishotRunsOrIsAnsweredEopnotsupp) {
  int client, server;
  ASSERT_TRUE(this->tcp_pair(&client, &server));
  const bool supported = this->backend_->recv_multishot();
  TestOp& recv = this->make(OpCode::recv_multishot);
  recv.op.fd = server;
  this->io().submit(&recv.op);
  ASSERT_EQ(::send(client, "x", 1, MSG_NOSIGNAL), 1);
  if (!supported) {
    ASSERT_TRUE(this->run_until_done(recv));
    EXPECT_EQ(recv.calls, 1);
    EXPECT_EQ(recv.res, -EOPNOTSUPP);
    EXPECT_EQ(recv.flags, 0u);
    return;
  }
  ASSERT_TRUE(this->run_until([&] { return recv.calls > 0; }));
  EXPECT_EQ(recv.res, 1);
  EXPECT_EQ(recv.flags & (kMore | detail::kBuffer), kMore | detail::kBuffer);
  if constexpr (std::is_same_v<TypeParam, UringBackend>) {
    // The buffer is ours until recycled.
    UringDriver& driver = *this->backend_->driver;
    EXPECT_EQ(driver.provided_buffer(detail::buffer_id(recv.flags))[0], 'x');
    driver.recycle(detail::buffer_id(recv.flags));
  }
  this->io().cancel(&recv.op);
  ASSERT_TRUE(this->run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
}

TYPED_TEST(BackendTest, AcceptAndConnect) {
  sockaddr_in addr;
  int listener = this->fds_.add(listen_loopback(&addr));
  ASSERT_GE(listener, 0);
  int client = this->fds_.add(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_GE(client, 0);

  TestOp& accept = this->make(OpCode::accept);
  accept.op.fd = listener;
  accept.op.addr = reinterpret_cast<sockaddr*>(&accept.addr);
  accept.op.addrlen = &accept.addrlen;
  accept.then = [this](TestOp& op) { this->fds_.add(op.res); };
  TestOp& connect = this->make(OpCode::connect);
  connect.addr = addr;
  connect.op.fd = client;
  connect.op.addr = reinterpret_cast<sockaddr*>(&connect.addr);
  connect.op.len = sizeof connect.addr;
  this->io().submit(&accept.op);
  this->io().submit(&connect.op);
  ASSERT_TRUE(this->run_until([&] { return accept.done() && connect.done(); }));
  EXPECT_EQ(connect.res, 0);
  ASSERT_GE(accept.res, 0);
  EXPECT_EQ(accept.addr.sin_family, AF_INET);
  EXPECT_EQ(accept.addr.sin_addr.s_addr, htonl(INADDR_LOOPBACK));
}

TYPED_TEST(BackendTest, ConnectToClosedPortFails) {
  sockaddr_in addr;
  int listener = listen_loopback(&addr);
  ASSERT_GE(listener, 0);
  ::close(listener);  // nothing listens on addr now
  int client = this->fds_.add(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_GE(client, 0);
  TestOp& connect = this->make(OpCode::connect);
  connect.addr = addr;
  connect.op.fd = client;
  connect.op.addr = reinterpret_cast<sockaddr*>(&connect.addr);
  connect.op.len = sizeof connect.addr;
  this->io().submit(&connect.op);
  ASSERT_TRUE(this->run_until_done(connect));
  EXPECT_EQ(connect.res, -ECONNREFUSED);
}

TYPED_TEST(BackendTest, AcceptMultishotGetsEachConnectionWithMore) {
  sockaddr_in addr;
  int listener = this->fds_.add(listen_loopback(&addr));
  ASSERT_GE(listener, 0);
  TestOp& accept = this->make(OpCode::accept_multishot);
  accept.op.fd = listener;
  accept.then = [this](TestOp& op) { this->fds_.add(op.res); };
  this->io().submit(&accept.op);
  this->park().park(Duration::zero());
  for (int i = 0; i < 3; ++i) ASSERT_GE(this->fds_.add(connect_loopback(addr)), 0);

  ASSERT_TRUE(this->run_until([&] { return accept.calls >= 3 || accept.done(); }));
  if (accept.done() && accept.res == -EINVAL) GTEST_SKIP() << "no multishot accept here";
  ASSERT_EQ(accept.results.size(), 3u);
  for (auto [res, flags] : accept.results) {
    EXPECT_GE(res, 0);
    EXPECT_TRUE(flags & kMore);
  }
}

TYPED_TEST(BackendTest, AcceptMultishotEndsWithEcanceledAfterCancel) {
  sockaddr_in addr;
  int listener = this->fds_.add(listen_loopback(&addr));
  ASSERT_GE(listener, 0);
  TestOp& accept = this->make(OpCode::accept_multishot);
  accept.op.fd = listener;
  accept.then = [this](TestOp& op) {
    if (op.res >= 0) this->fds_.add(op.res);
  };
  this->io().submit(&accept.op);
  ASSERT_GE(this->fds_.add(connect_loopback(addr)), 0);
  ASSERT_TRUE(this->run_until([&] { return accept.calls >= 1; }));
  if (accept.done() && accept.res == -EINVAL) GTEST_SKIP() << "no multishot accept here";
  this->io().cancel(&accept.op);
  ASSERT_TRUE(this->run_until_done(accept));
  EXPECT_EQ(accept.res, -ECANCELED);
  EXPECT_EQ(accept.calls, 2);
  EXPECT_EQ(this->io().in_flight(), 0u);
}

// ---- Readiness ---------------------------------------------------------------

TYPED_TEST(BackendTest, PollOneShotReportsPipeReadable) {
  int r, w;
  ASSERT_TRUE(this->pipe(&r, &w));
  TestOp& poll = this->make(OpCode::poll);
  poll.op.fd = r;
  poll.op.flags = POLLIN;
  this->io().submit(&poll.op);
  this->settle();
  EXPECT_EQ(poll.calls, 0);
  ASSERT_EQ(::write(w, "x", 1), 1);
  ASSERT_TRUE(this->run_until_done(poll));
  EXPECT_TRUE(poll.res & POLLIN);
  this->settle();
  EXPECT_EQ(poll.calls, 1);
}

TYPED_TEST(BackendTest, PollMultishotReportsEachTimeThenEndsWithEcanceled) {
  int r, w;
  ASSERT_TRUE(this->pipe(&r, &w, O_NONBLOCK));
  TestOp& poll = this->make(OpCode::poll_multishot);
  poll.op.fd = r;
  poll.op.flags = POLLIN;
  // Empty the pipe at each report, as a consumer would, so that every write is
  // a new readiness on both backends (the fallback's poll is level-triggered).
  poll.then = [r](TestOp& op) {
    char sink[16];
    while (op.res > 0 && ::read(r, sink, sizeof sink) > 0) {
    }
  };
  this->io().submit(&poll.op);
  this->park().park(Duration::zero());
  for (int i = 1; i <= 3; ++i) {
    ASSERT_EQ(::write(w, "x", 1), 1);
    ASSERT_TRUE(this->run_until([&] { return poll.calls >= i; })) << "report " << i;
    ASSERT_FALSE(poll.done()) << "multishot poll ended after report " << i;
    EXPECT_TRUE(poll.res & POLLIN);
  }
  this->io().cancel(&poll.op);
  ASSERT_TRUE(this->run_until_done(poll));
  EXPECT_EQ(poll.res, -ECANCELED);
  EXPECT_EQ(poll.calls, 4);
}

// ---- Shutdown and wake -------------------------------------------------------

TYPED_TEST(BackendTest, ShutdownCompletesRecvAndTimeoutOnceWithEcanceled) {
  int client, server;
  ASSERT_TRUE(this->tcp_pair(&client, &server));
  TestOp& recv = this->make(OpCode::recv);
  recv.op.fd = server;
  recv.op.buf = recv.buf.data();
  recv.op.len = static_cast<unsigned>(recv.buf.size());
  this->io().submit(&recv.op);
  TestOp& timer = this->timeout(10s);
  this->park().park(Duration::zero());
  {
    Watchdog watchdog(5s, "shutdown");
    this->park().shutdown();
  }
  EXPECT_EQ(recv.calls, 1);
  EXPECT_EQ(recv.res, -ECANCELED);
  EXPECT_EQ(timer.calls, 1);
  EXPECT_EQ(timer.res, -ECANCELED);
  EXPECT_EQ(this->io().in_flight(), 0u);
}

TYPED_TEST(BackendTest, ShutdownCompletesOpsNotYetSubmittedToKernel) {
  TestOp& timer = this->timeout(10s);  // still queued: no park since submit
  {
    Watchdog watchdog(5s, "shutdown");
    this->park().shutdown();
  }
  EXPECT_EQ(timer.calls, 1);
  EXPECT_EQ(timer.res, -ECANCELED);
}

TYPED_TEST(BackendTest, OpSubmittedDuringShutdownCompletesWithEcanceled) {
  TestOp& timer = this->timeout(10s);
  TestOp& late = this->make(OpCode::timeout);
  late.op.timeout_ns = std::uint64_t{10'000'000'000};
  timer.then = [this, &late](TestOp&) { this->io().submit(&late.op); };
  this->park().park(Duration::zero());
  {
    Watchdog watchdog(5s, "shutdown");
    this->park().shutdown();
  }
  EXPECT_EQ(timer.res, -ECANCELED);
  EXPECT_EQ(late.calls, 1);
  EXPECT_EQ(late.res, -ECANCELED);
}

TYPED_TEST(BackendTest, InFlightCountsUntilFinalCompletion) {
  EXPECT_EQ(this->io().in_flight(), 0u);
  TestOp& a = this->nop();
  TestOp& b = this->timeout(10ms);
  EXPECT_EQ(this->io().in_flight(), 2u);
  ASSERT_TRUE(this->run_until([&] { return a.done() && b.done(); }));
  EXPECT_EQ(this->io().in_flight(), 0u);
}

// ---- io_uring only -----------------------------------------------------------

class UringDriverTest : public OpFixture<UringBackend>, public ::testing::Test {
 protected:
  // A ring of `entries` SQEs; skips the test when io_uring is unavailable.
  bool open_ring(unsigned entries = 256) {
    RingOptions options;
    options.entries = entries;
    std::string why = start(options);
    if (!why.empty()) {
      skip_reason_ = why;
      return false;
    }
    return true;
  }
  UringDriver& driver() { return *backend_->driver; }
  // A ring whose provided buffer ring has `entries` buffers of `size` bytes,
  // filled incrementally where the kernel can unless `incremental` is false;
  // false (with the reason) where the kernel lacks multishot recv.
  bool open_ring_with_buffers(unsigned entries, unsigned size, bool incremental = true) {
    RingOptions options;
    options.buf_ring_entries = entries;
    options.buf_ring_buf_size = size;
    options.buf_ring_incremental = incremental;
    if (std::string why = start(options); !why.empty()) {
      skip_reason_ = why;
      return false;
    }
    if (!driver().supports(OpCode::recv_multishot)) {
      skip_reason_ = std::string("no multishot recv with provided buffers here: ") +
                     detail::errno_name(driver().recv_multishot_error());
      return false;
    }
    return true;
  }
  void empty_and_refill();
  bool all_done(const std::vector<TestOp*>& ops) const {
    return std::all_of(ops.begin(), ops.end(), [](const TestOp* op) { return op->done(); });
  }

  std::string skip_reason_;
};

#define OPEN_RING_OR_SKIP(...) \
  if (!open_ring(__VA_ARGS__)) GTEST_SKIP() << skip_reason_
#define OPEN_RING_WITH_BUFFERS_OR_SKIP(...) \
  if (!open_ring_with_buffers(__VA_ARGS__)) GTEST_SKIP() << skip_reason_
#define WHOLE_BUFFERS false

// Bytes that show where they sit in the stream, so a lost, repeated or
// reordered chunk shows up as a mismatch.
std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + i / 251) & 0xff);
  return s;
}

// Writes as much of `data` from *sent on as the non-blocking `fd` takes.
void send_some(int fd, const std::string& data, std::size_t* sent) {
  while (*sent < data.size()) {
    ssize_t n = ::send(fd, data.data() + *sent, data.size() - *sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n <= 0) return;
    *sent += static_cast<std::size_t>(n);
  }
}

// The owner of a multishot recv: keeps its bytes in order and the id of every
// buffer a completion named; recycles each at once, or, with `hold`, keeps it
// until recycle_all() (a slow consumer).
struct Receiver {
  explicit Receiver(UringDriver& d) : driver(d) {}
  void take(const TestOp& op) {
    if (!(op.flags & detail::kBuffer)) return;
    const std::uint16_t id = detail::buffer_id(op.flags);
    ids.push_back(id);
    if (op.res > 0) bytes.append(driver.provided_buffer(id), static_cast<std::size_t>(op.res));
    if (hold) {
      held.push_back(id);
    } else {
      driver.recycle(id);
    }
  }
  void recycle_all() {
    for (std::uint16_t id : held) driver.recycle(id);
    held.clear();
  }

  UringDriver& driver;
  bool hold = false;
  std::string bytes;
  std::vector<std::uint16_t> ids;
  std::vector<std::uint16_t> held;
};

TEST_F(UringDriverTest, SixtyFourNopsTakeOneEnter) {
  OPEN_RING_OR_SKIP();
  // Warm up: the first park arms the driver's own wake read; it is then in
  // flight and adds no SQE to the measured park.
  driver().park(Duration::zero());
  const detail::DriverStats before = driver().stats();
  std::vector<TestOp*> ops;
  for (int i = 0; i < 64; ++i) ops.push_back(&nop());
  EXPECT_EQ(driver().stats().enters, before.enters) << "submit() entered the kernel";

  driver().park(Duration(5s));
  const detail::DriverStats& after = driver().stats();
  EXPECT_EQ(after.enters - before.enters, 1u);
  EXPECT_EQ(after.sqes_submitted - before.sqes_submitted, 64u);
  EXPECT_EQ(after.cqes_reaped - before.cqes_reaped, 64u);
  EXPECT_TRUE(all_done(ops));
}

TEST_F(UringDriverTest, SixtyFourReadyPipeReadsTakeOneEnter) {
  OPEN_RING_OR_SKIP();
  int r, w;
  ASSERT_TRUE(pipe(&r, &w));
  char bytes[64];
  for (int i = 0; i < 64; ++i) bytes[i] = static_cast<char>(i);
  ASSERT_EQ(::write(w, bytes, 64), 64);
  driver().park(Duration::zero());
  const detail::DriverStats before = driver().stats();

  std::vector<TestOp*> ops;
  for (int i = 0; i < 64; ++i) {
    TestOp& op = make(OpCode::read);
    op.op.fd = r;
    op.op.buf = op.buf.data();
    op.op.len = 1;
    io().submit(&op.op);
    ops.push_back(&op);
  }
  driver().park(Duration(5s));
  const detail::DriverStats& after = driver().stats();
  EXPECT_EQ(after.enters - before.enters, 1u);
  EXPECT_EQ(after.sqes_submitted - before.sqes_submitted, 64u);
  ASSERT_TRUE(all_done(ops));
  std::vector<int> seen;
  for (TestOp* op : ops) {
    ASSERT_EQ(op->res, 1);
    seen.push_back(op->buf[0]);
  }
  std::sort(seen.begin(), seen.end());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(seen[i], i);
}

TEST_F(UringDriverTest, FullSubmissionQueueDropsNothing) {
  OPEN_RING_OR_SKIP(8);
  std::vector<TestOp*> ops;
  for (int i = 0; i < 100; ++i) ops.push_back(&nop());
  for (TestOp* op : ops) ASSERT_EQ(op->calls, 0) << "completed inside submit()";
  ASSERT_TRUE(run_until([&] { return all_done(ops); }));
  settle();
  for (TestOp* op : ops) {
    EXPECT_EQ(op->calls, 1);
    EXPECT_EQ(op->res, 0);
  }
  EXPECT_EQ(driver().in_flight(), 0u);
}

TEST_F(UringDriverTest, CompletionQueueOverflowLosesNothing) {
  OPEN_RING_OR_SKIP(8);
  // 12 batches of 8 timeouts handed to the kernel, then not reaped until all
  // have fired: far more CQEs than the CQ (16 entries for an 8-entry ring)
  // holds. (The driver moves posted CQEs aside before it submits, so they
  // must all come after the last submission to overflow it.)
  std::vector<TestOp*> ops;
  const detail::DriverStats before = driver().stats();
  for (int batch = 0; batch < 12; ++batch) {
    for (int i = 0; i < 8; ++i) ops.push_back(&timeout(50ms));
    driver().flush();
  }
  std::this_thread::sleep_for(200ms);
  for (TestOp* op : ops) ASSERT_EQ(op->calls, 0);
  EXPECT_TRUE(driver().has_cqes());
  ASSERT_TRUE(run_until([&] { return all_done(ops); }));
  settle();
  for (TestOp* op : ops) {
    EXPECT_EQ(op->calls, 1);
    EXPECT_EQ(op->res, -ETIME);
  }
  EXPECT_EQ(driver().stats().cqes_reaped - before.cqes_reaped, 96u);
}

TEST_F(UringDriverTest, MultishotPollKeepsReportingAcrossCompletionQueueOverflow) {
  OPEN_RING_OR_SKIP(8);
  int r, w;
  ASSERT_TRUE(pipe(&r, &w, O_NONBLOCK));
  TestOp& poll = make(OpCode::poll_multishot);
  poll.op.fd = r;
  poll.op.flags = POLLIN;
  poll.then = [r](TestOp& op) {
    char sink[16];
    while (op.res > 0 && ::read(r, sink, sizeof sink) > 0) {
    }
  };
  io().submit(&poll.op);
  driver().park(Duration::zero());

  // Fill the CQ (16 entries) past the brim, then make the poll fire: a kernel
  // may end a multishot op it cannot post for, which the driver must hide by
  // re-arming it. (Timeouts that fire after the last submission: the driver
  // moves posted CQEs aside before it submits.)
  std::vector<TestOp*> nops;
  for (int batch = 0; batch < 3; ++batch) {
    for (int i = 0; i < 8; ++i) nops.push_back(&timeout(20ms));
    driver().flush();
  }
  std::this_thread::sleep_for(100ms);
  const std::uint64_t rearms = driver().stats().multishot_rearms;
  ASSERT_EQ(::write(w, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return poll.calls >= 1 && all_done(nops); }));
  ASSERT_FALSE(poll.done()) << "multishot poll ended by CQ overflow, res " << poll.res;
  EXPECT_EQ(driver().stats().multishot_rearms - rearms, 1u)
      << "the kernel did not end the poll: the test is weaker";

  ASSERT_EQ(::write(w, "y", 1), 1);
  ASSERT_TRUE(run_until([&] { return poll.calls >= 2; }));
  ASSERT_FALSE(poll.done());
  io().cancel(&poll.op);
  ASSERT_TRUE(run_until_done(poll));
  EXPECT_EQ(poll.res, -ECANCELED);
  for (std::size_t i = 0; i + 1 < poll.results.size(); ++i) {
    EXPECT_TRUE(poll.results[i].second & kMore) << "completion " << i;
  }
}

TEST_F(UringDriverTest, FlushSubmitsWithoutCompleting) {
  OPEN_RING_OR_SKIP();
  TestOp& op = nop();
  const detail::DriverStats before = driver().stats();
  driver().flush();
  EXPECT_EQ(driver().stats().enters - before.enters, 1u);
  EXPECT_EQ(driver().stats().sqes_submitted - before.sqes_submitted, 1u);
  EXPECT_EQ(op.calls, 0);
  EXPECT_FALSE(driver().has_sqes());
  ASSERT_TRUE(run_until_done(op));
}

TEST_F(UringDriverTest, TurnWithNothingQueuedMakesNoSyscall) {
  OPEN_RING_OR_SKIP();
  driver().park(Duration::zero());  // arms the wake read
  const detail::DriverStats before = driver().stats();
  driver().turn();
  EXPECT_EQ(driver().stats().enters, before.enters);
  EXPECT_EQ(driver().stats().turns - before.turns, 1u);
}

TEST_F(UringDriverTest, RingWithoutDeferTaskrunIsCooperativeWhereTheKernelAllowsIt) {
  OPEN_RING_OR_SKIP();
  // Whether this kernel takes the flags, asked of it directly.
  io_uring ring;
  io_uring_params params{};
  params.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG;
  const int r = io_uring_queue_init_params(4, &ring, &params);
  if (r == 0) io_uring_queue_exit(&ring);
  const unsigned flags = backend_->probe.setup_flags;
  EXPECT_EQ((flags & IORING_SETUP_COOP_TASKRUN) != 0, r == 0) << "the kernel said " << r;
  EXPECT_EQ((flags & IORING_SETUP_TASKRUN_FLAG) != 0, r == 0);
  EXPECT_EQ(flags & IORING_SETUP_DEFER_TASKRUN, 0u);
}

// ---- Multishot recv and the provided buffer ring -------------------------------

TEST_F(UringDriverTest, BufferRingIsRegisteredOnFirstUse) {
  OPEN_RING_OR_SKIP();
  EXPECT_EQ(driver().provided_buffer_size(), 0u) << "registered before anyone asked";
  if (!driver().supports(OpCode::recv_multishot)) {
    GTEST_SKIP() << "no multishot recv here: "
                 << detail::errno_name(driver().recv_multishot_error());
  }
  EXPECT_EQ(driver().provided_buffer_size(), RingOptions{}.buf_ring_buf_size);
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
  EXPECT_TRUE(driver().supports(OpCode::recv_multishot));  // once, then remembered
}

TEST_F(UringDriverTest, NoBuffersConfiguredMeansNoMultishotRecv) {
  if (!open_ring_with_buffers(0, 4096)) {
    EXPECT_EQ(driver().recv_multishot_error(), -EOPNOTSUPP);
  }
  ASSERT_NE(backend_->driver, nullptr) << skip_reason_;
  EXPECT_FALSE(driver().supports(OpCode::recv_multishot));
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  io().submit(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -EOPNOTSUPP);
}

TEST_F(UringDriverTest, RecvMultishotGetsEachMessageInItsOwnBufferWhenBuffersAreWhole) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096, WHOLE_BUFFERS);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  r.hold = true;
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  const char* messages[] = {"one", "two!", "three", "four!!", "five!!!"};
  for (int i = 0; i < 5; ++i) {
    const std::string m = messages[i];
    ASSERT_EQ(::send(client, m.data(), m.size(), MSG_NOSIGNAL), static_cast<ssize_t>(m.size()));
    ASSERT_TRUE(run_until([&] { return recv.calls == i + 1; })) << "message " << i;
    EXPECT_EQ(recv.res, static_cast<int>(m.size()));
    EXPECT_EQ(recv.flags & (kMore | detail::kBuffer), kMore | detail::kBuffer);
    // Each buffer is ours, unchanged, until we recycle it.
    EXPECT_EQ(std::string(driver().provided_buffer(r.ids.back()), m.size()), m);
  }
  EXPECT_EQ(r.bytes, "onetwo!threefour!!five!!!");
  std::vector<std::uint16_t> ids = r.ids;
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(std::unique(ids.begin(), ids.end()), ids.end()) << "a held buffer was handed out twice";
  EXPECT_EQ(driver().provided_buffers_out(), 5u);
  r.recycle_all();
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
  EXPECT_EQ(driver().in_flight(), 1u);  // one op for the whole stream
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
  EXPECT_FALSE(recv.flags & detail::kBuffer);
  EXPECT_EQ(driver().in_flight(), 0u);
}

TEST_F(UringDriverTest, SmallMessagesShareOneBufferWhenFilledIncrementally) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096);
  if (!driver().provided_buffers_incremental()) {
    GTEST_SKIP() << "this kernel fills provided buffers whole only (before Linux 6.12)";
  }
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  r.hold = true;
  std::vector<const char*> pieces;
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&](TestOp& op) {
    if (op.flags & detail::kBuffer)
      pieces.push_back(driver().provided_buffer(detail::buffer_id(op.flags)));
    r.take(op);
  };
  io().submit(&recv.op);
  const char* messages[] = {"one", "two!", "three", "four!!", "five!!!"};
  for (int i = 0; i < 5; ++i) {
    const std::string m = messages[i];
    ASSERT_EQ(::send(client, m.data(), m.size(), MSG_NOSIGNAL), static_cast<ssize_t>(m.size()));
    ASSERT_TRUE(run_until([&] { return recv.calls == i + 1; })) << "message " << i;
    EXPECT_EQ(recv.res, static_cast<int>(m.size()));
  }
  EXPECT_EQ(r.bytes, "onetwo!threefour!!five!!!");
  // One buffer, filled piece after piece; each piece stays readable while held.
  for (std::uint16_t id : r.ids) EXPECT_EQ(id, r.ids[0]);
  EXPECT_EQ(driver().provided_buffers_out(), 1u);
  ASSERT_EQ(pieces.size(), 5u);
  EXPECT_EQ(std::string(pieces[0], 25), "onetwo!threefour!!five!!!");
  for (int i = 1; i < 5; ++i) EXPECT_EQ(pieces[i], pieces[i - 1] + std::strlen(messages[i - 1]));
  r.recycle_all();  // one recycle per piece
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
}

// Receive buffers cost the same for many idle sockets as for a few: the
// kernel holds a few buffers until bytes in flight need more.
TEST_F(UringDriverTest, IdleSocketsTakeNoMoreBuffersThanAFew) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(512, 16 * 1024);
  const unsigned few = driver().provided_buffers_in_ring();
  EXPECT_LE(few, 32u);
  std::vector<TestOp*> recvs;
  for (int i = 0; i < 500; ++i) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    fds_.add(sv[0]);
    fds_.add(sv[1]);
    TestOp& recv = make(OpCode::recv_multishot);
    recv.op.fd = sv[0];
    io().submit(&recv.op);
    recvs.push_back(&recv);
  }
  settle();
  EXPECT_EQ(driver().provided_buffers_in_ring(), few);
  EXPECT_EQ(driver().stats().buffers_ran_out, 0u);
  for (TestOp* recv : recvs) {
    EXPECT_EQ(recv->calls, 0);
    io().cancel(&recv->op);
  }
  ASSERT_TRUE(run_until([&] { return all_done(recvs); }));
}

TEST_F(UringDriverTest, RecycledBuffersAreReused) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(4, 64);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  std::string sent;
  for (int i = 0; i < 20; ++i) {
    const std::string m = "message " + std::to_string(i) + ";";
    sent += m;
    ASSERT_EQ(::send(client, m.data(), m.size(), MSG_NOSIGNAL), static_cast<ssize_t>(m.size()));
    ASSERT_TRUE(run_until([&] { return r.bytes.size() == sent.size(); })) << "message " << i;
  }
  EXPECT_EQ(r.bytes, sent);
  EXPECT_GE(r.ids.size(), 20u);
  for (std::uint16_t id : r.ids) EXPECT_LT(id, 4u);
  EXPECT_EQ(driver().stats().buffers_ran_out, 0u) << "4 buffers, recycled at once, ran out";
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
  EXPECT_FALSE(recv.done());
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
}

// A fast sender and a consumer that gives buffers back only once it holds
// some of every one of them: the kernel empties the ring again and again. With
// incremental filling a buffer goes back only once every piece of it does.
void UringDriverTest::empty_and_refill() {
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  ASSERT_EQ(::fcntl(client, F_SETFL, O_NONBLOCK), 0);
  const std::string data = pattern(2 * 1024 * 1024);
  Receiver r(driver());
  r.hold = true;
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  std::size_t sent = 0;
  Stopwatch sw;
  while (r.bytes.size() < data.size() && sw.elapsed() < 20s && !recv.done()) {
    send_some(client, data, &sent);
    park().park(Duration(1ms));
    if (driver().provided_buffers_out() == 8) r.recycle_all();
  }
  ASSERT_FALSE(recv.done()) << "the recv ended, res " << recv.res;
  ASSERT_EQ(r.bytes.size(), data.size());
  EXPECT_TRUE(r.bytes == data) << "bytes lost, repeated or reordered";
  EXPECT_GT(driver().stats().buffers_ran_out, 0u) << "the ring never ran out: the test is weaker";
  // Each starved recv re-armed once; the last may still wait for buffers.
  EXPECT_LE(driver().stats().multishot_rearms, driver().stats().buffers_ran_out)
      << "a starved recv was re-armed more than once";
  EXPECT_GE(driver().stats().multishot_rearms + 1, driver().stats().buffers_ran_out);
  for (const auto& [res, flags] : recv.results) EXPECT_TRUE(flags & kMore) << "res " << res;
  r.recycle_all();
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
}

TEST_F(UringDriverTest, EmptiedBufferRingIsRefilledAndNothingIsLost) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(8, 4096, WHOLE_BUFFERS);
  empty_and_refill();
}

TEST_F(UringDriverTest, EmptiedIncrementalBufferRingIsRefilledAndNothingIsLost) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(8, 4096);
  if (!driver().provided_buffers_incremental()) {
    GTEST_SKIP() << "this kernel fills provided buffers whole only (before Linux 6.12)";
  }
  empty_and_refill();
}

TEST_F(UringDriverTest, CancelMidStreamEndsWithEcanceledAndLosesNoByte) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  ASSERT_EQ(::fcntl(client, F_SETFL, O_NONBLOCK), 0);
  const std::string data = pattern(1024 * 1024);
  Receiver r(driver());
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  std::size_t sent = 0;
  ASSERT_TRUE(run_until([&] {
    send_some(client, data, &sent);
    return r.bytes.size() >= 128 * 1024;
  }));
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
  EXPECT_EQ(driver().in_flight(), 0u);
  // What the recv got is the start of the stream, and the socket still holds
  // the rest: a plain recv picks up exactly where it stopped.
  ASSERT_TRUE(data.compare(0, r.bytes.size(), r.bytes) == 0);
  std::string rest;
  Stopwatch sw;
  while (r.bytes.size() + rest.size() < data.size() && sw.elapsed() < 10s) {
    send_some(client, data, &sent);
    char buf[65536];
    ssize_t n = ::recv(server, buf, sizeof buf, MSG_DONTWAIT);
    if (n > 0) rest.append(buf, static_cast<std::size_t>(n));
    if (n <= 0) std::this_thread::sleep_for(1ms);
  }
  EXPECT_TRUE(r.bytes + rest == data);
}

TEST_F(UringDriverTest, CancelOfARecvWaitingForBuffersEndsItWithEcanceled) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(2, 64);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  r.hold = true;  // never given back: the recv waits in the driver
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  const std::string data = pattern(1024);
  ASSERT_EQ(::send(client, data.data(), data.size(), MSG_NOSIGNAL), 1024);
  ASSERT_TRUE(run_until([&] { return driver().stats().buffers_ran_out > 0; }));
  EXPECT_EQ(r.bytes, data.substr(0, 128));
  EXPECT_FALSE(recv.done());
  EXPECT_EQ(driver().in_flight(), 1u);  // still the owner's op in flight
  io().cancel(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -ECANCELED);
  EXPECT_EQ(driver().in_flight(), 0u);
  r.recycle_all();
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
}

TEST_F(UringDriverTest, RecvMultishotEndsAtEndOfStream) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  ASSERT_EQ(::send(client, "bye", 3, MSG_NOSIGNAL), 3);
  ASSERT_EQ(::shutdown(client, SHUT_WR), 0);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, 0);  // not re-armed: the stream is over
  EXPECT_EQ(r.bytes, "bye");
  settle();
  EXPECT_EQ(driver().in_flight(), 0u);
  EXPECT_EQ(driver().provided_buffers_out(), 0u);
}

TEST_F(UringDriverTest, RefusedMultishotRecvIsTurnedOffForGood) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  // A kernel before 6.0 refuses every multishot recv with -EINVAL. This one
  // refuses MSG_WAITALL with it the same way, which stands in for that.
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.op.flags = MSG_WAITALL;
  io().submit(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -EOPNOTSUPP);
  EXPECT_EQ(recv.calls, 1);
  EXPECT_FALSE(driver().supports(OpCode::recv_multishot));
  EXPECT_EQ(driver().recv_multishot_error(), -EINVAL);
  TestOp& again = make(OpCode::recv_multishot);
  again.op.fd = server;
  io().submit(&again.op);
  ASSERT_TRUE(run_until_done(again));
  EXPECT_EQ(again.res, -EOPNOTSUPP);
}

TEST_F(UringDriverTest, ShutdownEndsAMultishotRecvAndHeldBuffersStayReadable) {
  OPEN_RING_WITH_BUFFERS_OR_SKIP(16, 4096);
  int client, server;
  ASSERT_TRUE(tcp_pair(&client, &server));
  Receiver r(driver());
  r.hold = true;
  TestOp& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&r](TestOp& op) { r.take(op); };
  io().submit(&recv.op);
  ASSERT_EQ(::send(client, "kept", 4, MSG_NOSIGNAL), 4);
  ASSERT_TRUE(run_until([&] { return r.bytes.size() == 4; }));
  driver().shutdown();
  EXPECT_TRUE(recv.done());
  EXPECT_EQ(recv.res, -ECANCELED);
  // Unregistered, but mapped until the driver goes.
  EXPECT_EQ(std::string(driver().provided_buffer(r.held[0]), 4), "kept");
}

}  // namespace
}  // namespace ringpark::test
