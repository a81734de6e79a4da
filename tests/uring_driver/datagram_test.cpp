// Datagram operations (recvmsg, recvmsg_multishot, sendmsg) on UDP sockets on
// the loopback only, on both backends (the typed DatagramTest) with the same
// expectations: the same results, the same MSG_TRUNC, the same source address.
// Multishot recvmsg runs where the backend has it (io_uring with provided
// buffer rings, Linux 6.0); elsewhere its one completion is -EOPNOTSUPP, and
// the tests use plain recvmsg there. UringDatagramTest holds what only the
// ring has: the shared datagram buffer ring running dry and refilling, a
// kernel that refuses multishot recvmsg, truncation into small ring buffers.
//
// Loss: a loopback UDP socket drops a datagram only when its receive buffer is
// full. Every test that counts datagrams counts those drops too (the socket's
// own, from /proc/net/udp, and the system's Udp RcvbufErrors, from
// /proc/net/snmp) and prints them; a datagram neither received nor dropped
// there is lost inside ringpark, and fails the test.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "backend_harness.hpp"
#include "udp_util.hpp"

namespace ringpark::test {
namespace {

using detail::kBuffer;

using udp::datagram_bytes;
using udp::kMaxIpv4Payload;
using udp::kMaxIpv6Payload;
using udp::socket_drops;
using udp::udp_rcvbuf_errors;

// ---- Sockets ----------------------------------------------------------------

// A blocking UDP socket bound to the loopback of `family` (udp_util.hpp).
int udp_socket(int family, sockaddr_storage* addr, socklen_t* len) {
  return udp::bound_socket(family, addr, len, /*nonblock=*/false);
}

bool same_address(const sockaddr_storage& a, socklen_t alen, const sockaddr_storage& b,
                  socklen_t blen) {
  return alen == blen && std::memcmp(&a, &b, alen) == 0;
}

std::uint32_t seq_of(const std::string& d) { return udp::seq_of(d.data(), d.size()); }

// ---- Receiving ---------------------------------------------------------------

struct Received {
  std::string data;          // the payload received (cut to the buffer)
  std::size_t full_len = 0;  // the datagram's real length
  int msg_flags = 0;
  sockaddr_storage from{};
  socklen_t fromlen = 0;
};

// Receives the datagrams of one socket for a test: one multishot recvmsg, or a
// plain recvmsg submitted again from each completion. Each completion's bytes
// are copied out and the ring buffer recycled before it returns (unless
// `hold`, a consumer that gives buffers back only with release()).
class Sink {
 public:
  Sink(IoBackend& io, int fd, bool multishot, std::size_t buf_size = 65536)
      : io_(io), buf_(buf_size) {
    op_.code = multishot ? OpCode::recvmsg_multishot : OpCode::recvmsg;
    op_.fd = fd;
    op_.buf = &msg_;
    op_.complete = &Sink::on_complete;
    op_.data = this;
  }

  void start() {
    reset_msg();
    io_.submit(&op_);
  }
  void stop() {
    stopping_ = true;
    io_.cancel(&op_);
  }
  void release() {
    for (std::uint16_t id : held_) io_.recycle_datagram(id);
    held_.clear();
  }

  bool multishot() const { return op_.code == OpCode::recvmsg_multishot; }
  bool done() const { return done_; }

  int recv_flags = 0;  // for plain recvmsg (MSG_TRUNC)
  bool hold = false;
  std::vector<Received> got;
  int calls = 0;
  int final_res = 0;
  int bad = 0;  // completions that made no sense (a kBuffer without a datagram...)
  int dry = 0;  // kDry completions: the ring ran dry, the socket was not drained

 private:
  void reset_msg() {
    msg_ = msghdr{};
    iov_ = {buf_.data(), buf_.size()};
    msg_.msg_name = &name_;
    msg_.msg_namelen = sizeof name_;
    if (!multishot()) {
      msg_.msg_iov = &iov_;
      msg_.msg_iovlen = 1;
    }
    op_.flags = multishot() ? 0 : recv_flags;
  }

  static void on_complete(Op* op, int res, std::uint32_t flags) noexcept {
    static_cast<Sink*>(op->data)->take(res, flags);
  }

  void take(int res, std::uint32_t flags) {
    ++calls;
    const bool more = flags & kMore;
    if (multishot()) {
      detail::Datagram d;
      if (io_.datagram(op_, res, flags, &d)) {
        Received r;
        r.data.assign(d.data, d.len);
        r.full_len = d.full_len;
        r.msg_flags = d.msg_flags;
        if (d.addr != nullptr) std::memcpy(&r.from, d.addr, d.addrlen);
        r.fromlen = d.addrlen;
        got.push_back(std::move(r));
      } else if (flags & detail::kDry) {
        // The ring ran dry with datagrams still in the socket: no datagram.
        if (res != 0 || !more || (flags & kBuffer)) ++bad;
        ++dry;
      } else if (res >= 0) {
        ++bad;
      }
      if (flags & kBuffer) {
        if (hold) {
          held_.push_back(detail::buffer_id(flags));
        } else {
          io_.recycle_datagram(detail::buffer_id(flags));
        }
      }
    } else if (res >= 0) {
      Received r;
      r.full_len = static_cast<std::size_t>(res);
      r.data.assign(buf_.data(), std::min(r.full_len, buf_.size()));
      r.msg_flags = msg_.msg_flags;
      std::memcpy(&r.from, &name_, msg_.msg_namelen);
      r.fromlen = msg_.msg_namelen;
      got.push_back(std::move(r));
    }
    if (more) return;
    if (!multishot() && res >= 0 && !stopping_) {
      reset_msg();
      io_.submit(&op_);  // the next datagram
      return;
    }
    done_ = true;
    final_res = res;
  }

  IoBackend& io_;
  Op op_;
  msghdr msg_{};
  iovec iov_{};
  sockaddr_storage name_{};
  std::vector<char> buf_;
  std::vector<std::uint16_t> held_;
  bool stopping_ = false;
  bool done_ = false;
};

// ---- The typed suite -----------------------------------------------------------

template <class Backend>
class DatagramTest : public OpFixture<Backend>, public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = this->start(); !why.empty()) GTEST_SKIP() << why;
  }
  UringDriver* uring() {
    if constexpr (std::is_same_v<Backend, UringBackend>) return this->backend_->driver.get();
    return nullptr;
  }
  bool multishot_here() {
    return uring() != nullptr && uring()->supports(OpCode::recvmsg_multishot);
  }

  // A bound socket pair for `family`, owned by the fixture; false (the test
  // then skips) where the family is missing.
  bool pair(int family) {
    rx_ = this->fds_.add(udp_socket(family, &rx_addr_, &rx_len_));
    tx_ = this->fds_.add(udp_socket(family, &tx_addr_, &tx_len_));
    family_ = family;
    return rx_ >= 0 && tx_ >= 0;
  }
  Sink& sink(bool multishot, std::size_t buf_size = 65536) {
    return *sinks_.emplace_back(std::make_unique<Sink>(this->io(), rx_, multishot, buf_size));
  }
  bool send_to_rx(const std::string& d) {
    return ::sendto(tx_, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&rx_addr_),
                    rx_len_) == static_cast<ssize_t>(d.size());
  }

  // 1-byte, 1,472-byte (a full Ethernet frame), 65,507-byte (the largest
  // over IPv4) and, over IPv6, 65,527-byte datagrams arrive whole, each with
  // the sender's address.
  void sizes_arrive_whole(int family, bool multishot) {
    if (!pair(family)) GTEST_SKIP() << "no loopback for address family " << family;
    Sink& s = sink(multishot, 65536);
    s.start();
    const std::size_t sizes[] = {1, 1472, kMaxIpv4Payload, kMaxIpv6Payload};
    for (std::size_t i = 0; i < (family == AF_INET6 ? 4u : 3u); ++i) {
      ASSERT_TRUE(send_to_rx(datagram_bytes(static_cast<std::uint32_t>(i), sizes[i])))
          << std::strerror(errno);
      ASSERT_TRUE(this->run_until([&] { return s.got.size() == i + 1 || s.done(); }))
          << "datagram of " << sizes[i] << " bytes";
      ASSERT_FALSE(s.done()) << "ended with " << s.final_res;
      const Received& r = s.got.back();
      EXPECT_EQ(r.full_len, sizes[i]);
      EXPECT_TRUE(r.data == datagram_bytes(static_cast<std::uint32_t>(i), sizes[i]))
          << "datagram of " << sizes[i] << " bytes came cut or changed (" << r.data.size() << ")";
      EXPECT_EQ(r.msg_flags & MSG_TRUNC, 0);
      EXPECT_TRUE(same_address(r.from, r.fromlen, tx_addr_, tx_len_)) << "wrong source address";
    }
    EXPECT_EQ(s.bad, 0);
    s.stop();
    ASSERT_TRUE(this->run_until([&] { return s.done(); }));
    EXPECT_EQ(s.final_res, -ECANCELED);
    if (uring() != nullptr) {
      EXPECT_EQ(uring()->datagram_buffers_out(), 0u);
    }
  }

  // `count` datagrams of mixed sizes, sent from this thread `per_turn` at a
  // time, every one received or counted as dropped by the socket.
  void burst(bool multishot, int count, int per_turn) {
    if (!pair(AF_INET)) GTEST_SKIP() << "no IPv4 loopback";
    const long snmp_before = udp_rcvbuf_errors();
    const long drops_before = socket_drops(rx_, AF_INET);
    Sink& s = sink(multishot);
    s.start();
    int sent = 0;
    Stopwatch sw;
    while (sw.elapsed() < 20s && !s.done()) {
      for (int i = 0; i < per_turn && sent < count; ++i, ++sent) {
        const std::size_t size = 8 + static_cast<std::size_t>(sent * 37) % 1465;
        ASSERT_TRUE(send_to_rx(datagram_bytes(static_cast<std::uint32_t>(sent), size)));
      }
      this->park().park(Duration::zero());
      const long dropped = socket_drops(rx_, AF_INET) - drops_before;
      if (sent == count && static_cast<long>(s.got.size()) + dropped >= count) break;
    }
    this->settle();
    const long dropped = socket_drops(rx_, AF_INET) - drops_before;
    const long snmp = udp_rcvbuf_errors() - snmp_before;
    std::printf(
        "%d datagrams sent, %zu received, %ld dropped by the socket (Udp RcvbufErrors +%ld)\n",
        count, s.got.size(), dropped, snmp);
    ASSERT_FALSE(s.done()) << "ended with " << s.final_res;
    ASSERT_GE(dropped, 0) << "the socket is not in /proc/net/udp";
    EXPECT_EQ(static_cast<long>(s.got.size()) + dropped, count) << "lost inside ringpark";
    // Each one whole and intact, none twice, in order (loopback keeps it).
    long last = -1;
    for (const Received& r : s.got) {
      const std::uint32_t seq = seq_of(r.data);
      ASSERT_GT(static_cast<long>(seq), last) << "repeated or out of order";
      last = seq;
      const std::size_t size = 8 + static_cast<std::size_t>(seq * 37) % 1465;
      ASSERT_TRUE(r.data == datagram_bytes(seq, size)) << "datagram " << seq << " changed";
    }
    EXPECT_EQ(s.bad, 0);
    s.stop();
    ASSERT_TRUE(this->run_until([&] { return s.done(); }));
  }

  // A sender thread sends `count` datagrams as fast as it can (at most 10 s):
  // the receiver falls behind, the socket drops some, and every datagram is
  // either received intact or counted as dropped.
  void flood(bool multishot, int count) {
    if (!pair(AF_INET)) GTEST_SKIP() << "no IPv4 loopback";
    const long snmp_before = udp_rcvbuf_errors();
    const long drops_before = socket_drops(rx_, AF_INET);
    Sink& s = sink(multishot);
    s.start();
    std::atomic<int> sent{0};
    std::atomic<bool> finished{false};
    std::thread sender([&, tx = tx_, to = rx_addr_, tolen = rx_len_] {
      Stopwatch sw;
      for (int i = 0; i < count && sw.elapsed() < 10s; ++i) {
        const std::string d = datagram_bytes(static_cast<std::uint32_t>(i), 200);
        if (::sendto(tx, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&to), tolen) < 0)
          break;
        sent = i + 1;
      }
      finished = true;
    });
    Stopwatch sw;
    long dropped = 0;
    while (sw.elapsed() < 20s && !s.done()) {
      this->park().park(Duration(1ms));
      dropped = socket_drops(rx_, AF_INET) - drops_before;
      if (finished && static_cast<long>(s.got.size()) + dropped >= sent) break;
    }
    sender.join();
    this->settle();
    dropped = socket_drops(rx_, AF_INET) - drops_before;
    std::printf(
        "%d datagrams sent, %zu received, %ld dropped by the socket (Udp RcvbufErrors "
        "+%ld)\n",
        sent.load(), s.got.size(), dropped, udp_rcvbuf_errors() - snmp_before);
    if (uring() != nullptr) {
      std::printf("the datagram ring ran dry %llu times; %llu re-arms\n",
                  static_cast<unsigned long long>(uring()->stats().buffers_ran_out),
                  static_cast<unsigned long long>(uring()->stats().multishot_rearms));
    }
    ASSERT_FALSE(s.done()) << "ended with " << s.final_res;
    EXPECT_EQ(static_cast<long>(s.got.size()) + dropped, sent.load()) << "lost inside ringpark";
    long last = -1;
    for (const Received& r : s.got) {
      const std::uint32_t seq = seq_of(r.data);
      ASSERT_GT(static_cast<long>(seq), last) << "repeated or out of order";
      last = seq;
      ASSERT_TRUE(r.data == datagram_bytes(seq, 200)) << "datagram " << seq << " changed";
    }
    s.stop();
    ASSERT_TRUE(this->run_until([&] { return s.done(); }));
  }

  int rx_ = -1, tx_ = -1, family_ = AF_INET;
  sockaddr_storage rx_addr_{}, tx_addr_{};
  socklen_t rx_len_ = 0, tx_len_ = 0;
  std::vector<std::unique_ptr<Sink>> sinks_;  // destroyed after the backend
};

TYPED_TEST_SUITE(DatagramTest, Backends, BackendName);

TYPED_TEST(DatagramTest, RecvmsgGetsDatagramsWholeWithTheirSourceIpv4) {
  this->sizes_arrive_whole(AF_INET, false);
}

TYPED_TEST(DatagramTest, RecvmsgGetsDatagramsWholeWithTheirSourceIpv6) {
  this->sizes_arrive_whole(AF_INET6, false);
}

TYPED_TEST(DatagramTest, RecvmsgMultishotGetsDatagramsWholeWithTheirSourceIpv4) {
  if (!this->multishot_here()) GTEST_SKIP() << "no multishot recvmsg on this backend";
  this->sizes_arrive_whole(AF_INET, true);
}

TYPED_TEST(DatagramTest, RecvmsgMultishotGetsDatagramsWholeWithTheirSourceIpv6) {
  if (!this->multishot_here()) GTEST_SKIP() << "no multishot recvmsg on this backend";
  this->sizes_arrive_whole(AF_INET6, true);
}

// Where the backend lacks it, it says so, in supports() for the ring and in the
// op's one completion everywhere.
TYPED_TEST(DatagramTest, RecvmsgMultishotRunsOrIsAnsweredEopnotsupp) {
  ASSERT_TRUE(this->pair(AF_INET));
  const bool supported = this->multishot_here();
  Sink& s = this->sink(true);
  s.start();
  ASSERT_TRUE(this->send_to_rx("x"));
  if (!supported) {
    ASSERT_TRUE(this->run_until([&] { return s.done(); }));
    EXPECT_EQ(s.calls, 1);
    EXPECT_EQ(s.final_res, -EOPNOTSUPP);
    EXPECT_TRUE(s.got.empty());
    return;
  }
  ASSERT_TRUE(this->run_until([&] { return s.got.size() == 1; }));
  EXPECT_EQ(s.got[0].data, "x");
  s.stop();
  ASSERT_TRUE(this->run_until([&] { return s.done(); }));
  EXPECT_EQ(s.final_res, -ECANCELED);
}

// A datagram bigger than the buffer: cut to it, MSG_TRUNC in msg_flags, and
// with MSG_TRUNC asked for, the result is the real length.
TYPED_TEST(DatagramTest, RecvmsgIntoASmallBufferReportsTruncationAndTheRealLength) {
  ASSERT_TRUE(this->pair(AF_INET));
  Sink& s = this->sink(false, 100);
  s.start();
  const std::string d = datagram_bytes(7, 1000);
  ASSERT_TRUE(this->send_to_rx(d));
  ASSERT_TRUE(this->run_until([&] { return s.got.size() == 1; }));
  EXPECT_EQ(s.got[0].full_len, 100u);  // without MSG_TRUNC: what was copied
  EXPECT_EQ(s.got[0].data, d.substr(0, 100));
  EXPECT_TRUE(s.got[0].msg_flags & MSG_TRUNC);
  s.stop();
  ASSERT_TRUE(this->run_until([&] { return s.done(); }));

  Sink& t = this->sink(false, 100);
  t.recv_flags = MSG_TRUNC;
  t.start();
  ASSERT_TRUE(this->send_to_rx(d));
  ASSERT_TRUE(this->run_until([&] { return t.got.size() == 1; }));
  EXPECT_EQ(t.got[0].full_len, 1000u);  // with MSG_TRUNC: the real length
  EXPECT_EQ(t.got[0].data, d.substr(0, 100));
  EXPECT_TRUE(t.got[0].msg_flags & MSG_TRUNC);
  EXPECT_TRUE(same_address(t.got[0].from, t.got[0].fromlen, this->tx_addr_, this->tx_len_));
  t.stop();
  ASSERT_TRUE(this->run_until([&] { return t.done(); }));
}

TYPED_TEST(DatagramTest, SendmsgGathersItsIovecsToItsDestination) {
  ASSERT_TRUE(this->pair(AF_INET6) || this->pair(AF_INET));
  Sink& s = this->sink(false);
  s.start();
  char head[] = "head:";
  char body[] = "the body";
  iovec iov[2] = {{head, 5}, {body, 8}};
  msghdr msg{};
  msg.msg_name = &this->rx_addr_;
  msg.msg_namelen = this->rx_len_;
  msg.msg_iov = iov;
  msg.msg_iovlen = 2;
  TestOp& send = this->make(OpCode::sendmsg);
  send.op.fd = this->tx_;
  send.op.buf = &msg;
  this->io().submit(&send.op);
  ASSERT_TRUE(this->run_until([&] { return send.done() && s.got.size() == 1; }));
  EXPECT_EQ(send.res, 13);
  EXPECT_EQ(s.got[0].data, "head:the body");
  EXPECT_TRUE(same_address(s.got[0].from, s.got[0].fromlen, this->tx_addr_, this->tx_len_));
  s.stop();
  ASSERT_TRUE(this->run_until([&] { return s.done(); }));
}

TYPED_TEST(DatagramTest, SendmsgToAPortNobodyListensOnFailsOnTheNextSend) {
  // A connected UDP socket learns of the ICMP port unreachable: the next send
  // (or receive) fails with ECONNREFUSED, on both backends alike.
  ASSERT_TRUE(this->pair(AF_INET));
  sockaddr_storage gone = this->rx_addr_;
  ::close(this->rx_);  // the fixture closes the number again later: harmless
  ASSERT_EQ(::connect(this->tx_, reinterpret_cast<sockaddr*>(&gone), this->rx_len_), 0);
  char byte = 'x';
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<int> results;
  for (int i = 0; i < 2; ++i) {
    TestOp& send = this->make(OpCode::sendmsg);
    send.op.fd = this->tx_;
    send.op.buf = &msg;
    this->io().submit(&send.op);
    ASSERT_TRUE(this->run_until_done(send));
    results.push_back(send.res);
  }
  EXPECT_EQ(results[0], 1);
  EXPECT_EQ(results[1], -ECONNREFUSED);
}

// Sends submitted in one turn leave in that order.
TYPED_TEST(DatagramTest, SendmsgKeepsTheOrderOfSubmission) {
  ASSERT_TRUE(this->pair(AF_INET));
  constexpr int kCount = 256;
  struct Send {
    std::string bytes;
    iovec iov;
    msghdr msg;
  };
  std::vector<Send> sends(kCount);
  std::vector<TestOp*> ops;
  const long drops_before = socket_drops(this->rx_, AF_INET);
  for (int i = 0; i < kCount; ++i) {
    Send& x = sends[static_cast<std::size_t>(i)];
    x.bytes = datagram_bytes(static_cast<std::uint32_t>(i), 16);
    x.iov = {x.bytes.data(), x.bytes.size()};
    x.msg = msghdr{};
    x.msg.msg_name = &this->rx_addr_;
    x.msg.msg_namelen = this->rx_len_;
    x.msg.msg_iov = &x.iov;
    x.msg.msg_iovlen = 1;
    TestOp& op = this->make(OpCode::sendmsg);
    op.op.fd = this->tx_;
    op.op.buf = &x.msg;
    this->io().submit(&op.op);
    ops.push_back(&op);
  }
  ASSERT_TRUE(this->run_until(
      [&] { return std::all_of(ops.begin(), ops.end(), [](TestOp* op) { return op->done(); }); }));
  for (TestOp* op : ops) EXPECT_EQ(op->res, 16);
  std::vector<std::uint32_t> seen;
  char buf[64];
  ssize_t n;
  while ((n = ::recv(this->rx_, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
    seen.push_back(seq_of(std::string(buf, static_cast<std::size_t>(n))));
  }
  EXPECT_EQ(static_cast<long>(seen.size()) + socket_drops(this->rx_, AF_INET) - drops_before,
            kCount);
  for (std::size_t i = 1; i < seen.size(); ++i) EXPECT_LT(seen[i - 1], seen[i]) << "at " << i;
  EXPECT_EQ(seen.size(), static_cast<std::size_t>(kCount)) << "the receive buffer dropped some";
}

TYPED_TEST(DatagramTest, BurstOfDatagramsLosesNoneWithRecvmsg) {
  // One datagram per plain recvmsg, and one recvmsg per turn: so is the pace.
  this->burst(/*multishot=*/false, 20000, 1);
}

TYPED_TEST(DatagramTest, BurstOfDatagramsLosesNoneWithRecvmsgMultishot) {
  if (!this->multishot_here()) GTEST_SKIP() << "no multishot recvmsg on this backend";
  this->burst(/*multishot=*/true, 100000, 256);
}

TYPED_TEST(DatagramTest, FloodFromAnotherThreadIsReceivedOrCountedAsDropped) {
  this->flood(this->multishot_here(), 100000);
}

// A cancel while datagrams keep arriving: the receive ends with -ECANCELED,
// every datagram before it is whole, and the ones after it stay in the socket
// for whoever reads next; none goes missing between the two.
TYPED_TEST(DatagramTest, CancelWhileDatagramsArriveLosesNone) {
  ASSERT_TRUE(this->pair(AF_INET));
  const bool multishot = this->multishot_here();
  const long drops_before = socket_drops(this->rx_, AF_INET);
  Sink& s = this->sink(multishot);
  s.start();
  std::atomic<bool> stop{false};
  std::atomic<int> sent{0};
  const int tx = this->tx_;
  const sockaddr_storage to = this->rx_addr_;
  const socklen_t tolen = this->rx_len_;
  std::thread sender([&] {
    // Bounded: at most 20,000 datagrams or 10 s, paced so the socket rarely fills.
    Stopwatch sw;
    for (std::uint32_t i = 0; i < 20000 && !stop && sw.elapsed() < 10s; ++i) {
      const std::string d = datagram_bytes(i, 64);
      if (::sendto(tx, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&to), tolen) < 0)
        break;
      sent = static_cast<int>(i + 1);
      if (i % 32 == 31) std::this_thread::sleep_for(100us);
    }
  });
  ASSERT_TRUE(this->run_until([&] { return s.got.size() >= 500; }, 10s));
  s.stop();
  const bool ended = this->run_until([&] { return s.done(); });
  stop = true;
  sender.join();
  ASSERT_TRUE(ended);
  EXPECT_EQ(s.final_res, -ECANCELED);
  if (this->uring() != nullptr) {
    EXPECT_EQ(this->uring()->datagram_buffers_out(), 0u);
  }
  // The rest, straight from the socket.
  std::vector<std::uint32_t> seqs;
  for (const Received& r : s.got) seqs.push_back(seq_of(r.data));
  char buf[128];
  ssize_t n;
  while ((n = ::recv(this->rx_, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
    seqs.push_back(seq_of(std::string(buf, static_cast<std::size_t>(n))));
  }
  const long dropped = socket_drops(this->rx_, AF_INET) - drops_before;
  std::printf("%d sent, %zu received before the cancel, %zu after, %ld dropped by the socket\n",
              sent.load(), s.got.size(), seqs.size() - s.got.size(), dropped);
  EXPECT_EQ(static_cast<long>(seqs.size()) + dropped, sent.load()) << "lost inside ringpark";
  for (std::size_t i = 1; i < seqs.size(); ++i) ASSERT_LT(seqs[i - 1], seqs[i]) << "at " << i;
  if (dropped == 0) {
    EXPECT_EQ(seqs.back() + 1, seqs.size());
  }
}

// ---- io_uring only -------------------------------------------------------------

class UringDatagramTest : public OpFixture<UringBackend>, public ::testing::Test {
 protected:
  // A ring whose datagram buffer ring has `entries` buffers of `size` bytes;
  // false (with the reason) where the kernel lacks multishot recvmsg.
  bool open_ring(unsigned entries, unsigned size) {
    RingOptions options;
    options.dgram_ring_entries = entries;
    options.dgram_ring_buf_size = size;
    if (std::string why = start(options); !why.empty()) {
      skip_ = why;
      return false;
    }
    if (!driver().supports(OpCode::recvmsg_multishot)) {
      skip_ = std::string("no multishot recvmsg here: ") +
              detail::errno_name(driver().recvmsg_multishot_error());
      return false;
    }
    rx_ = fds_.add(udp_socket(AF_INET, &rx_addr_, &rx_len_));
    tx_ = fds_.add(udp_socket(AF_INET, &tx_addr_, &tx_len_));
    return rx_ >= 0 && tx_ >= 0;
  }
  UringDriver& driver() { return *backend_->driver; }
  bool send_to_rx(const std::string& d) {
    return ::sendto(tx_, d.data(), d.size(), 0, reinterpret_cast<const sockaddr*>(&rx_addr_),
                    rx_len_) == static_cast<ssize_t>(d.size());
  }

  std::string skip_;
  int rx_ = -1, tx_ = -1;
  sockaddr_storage rx_addr_{}, tx_addr_{};
  socklen_t rx_len_ = 0, tx_len_ = 0;
  std::unique_ptr<Sink> sink_;  // destroyed after the backend
};

#define OPEN_RING_OR_SKIP(entries, size) \
  if (!open_ring(entries, size)) GTEST_SKIP() << skip_

TEST_F(UringDatagramTest, DatagramRingIsSeparateFromTheStreamRingAndRegisteredOnFirstUse) {
  OPEN_RING_OR_SKIP(64, 68 * 1024);
  EXPECT_EQ(driver().provided_buffer_size(), 0u) << "the stream ring came with the datagram one";
  EXPECT_EQ(driver().datagram_buffers_out(), 0u);
  EXPECT_GT(driver().datagram_buffers_in_ring(), 0u);
  EXPECT_LE(driver().datagram_buffers_in_ring(), 64u);
}

// The ring runs dry while the consumer holds every buffer: the owner is told
// once (kDry, no datagram), the socket keeps the datagrams, the receive waits
// in the driver, and once buffers come back it goes on with the next
// datagram, none lost, none out of order.
TEST_F(UringDatagramTest, EmptiedDatagramRingIsRefilledAndNothingIsLost) {
  OPEN_RING_OR_SKIP(2, 68 * 1024);
  sink_ = std::make_unique<Sink>(io(), rx_, true);
  Sink& s = *sink_;
  s.hold = true;
  s.start();
  for (std::uint32_t i = 0; i < 10; ++i) ASSERT_TRUE(send_to_rx(datagram_bytes(i, 100 + i)));
  ASSERT_TRUE(run_until([&] { return driver().stats().buffers_ran_out > 0; }));
  EXPECT_EQ(s.got.size(), 2u);
  EXPECT_EQ(s.dry, 1) << "the owner was not told the socket still held datagrams";
  EXPECT_EQ(s.bad, 0);
  EXPECT_FALSE(s.done());
  EXPECT_EQ(driver().in_flight(), 1u);  // still the owner's op
  Stopwatch sw;
  while (s.got.size() < 10 && sw.elapsed() < 5s) {
    s.release();
    park().park(Duration(10ms));
  }
  ASSERT_EQ(s.got.size(), 10u);
  for (std::uint32_t i = 0; i < 10; ++i) {
    EXPECT_TRUE(s.got[i].data == datagram_bytes(i, 100 + i)) << "datagram " << i;
  }
  const detail::DriverStats& st = driver().stats();
  // Each starved receive re-armed once; the last may still wait for buffers.
  EXPECT_LE(st.multishot_rearms, st.buffers_ran_out) << "a starved receive was re-armed twice";
  EXPECT_GE(st.multishot_rearms + 1, st.buffers_ran_out);
  s.release();
  s.stop();
  ASSERT_TRUE(run_until([&] { return s.done(); }));
  EXPECT_EQ(s.final_res, -ECANCELED);
  EXPECT_EQ(driver().datagram_buffers_out(), 0u);
}

// Ring buffers smaller than a datagram: the payload is cut to what fits, and
// the completion still tells the real length, with MSG_TRUNC.
TEST_F(UringDatagramTest, DatagramCutToASmallRingBufferReportsTheRealLength) {
  OPEN_RING_OR_SKIP(4, 512);
  sink_ = std::make_unique<Sink>(io(), rx_, true);
  Sink& s = *sink_;
  s.start();
  const std::string d = datagram_bytes(3, 1000);
  ASSERT_TRUE(send_to_rx(d));
  ASSERT_TRUE(run_until([&] { return !s.got.empty() || s.done(); }));
  ASSERT_FALSE(s.got.empty()) << "ended with " << s.final_res;
  const Received& r = s.got[0];
  EXPECT_EQ(r.full_len, 1000u);
  EXPECT_TRUE(r.msg_flags & MSG_TRUNC);
  ASSERT_LT(r.data.size(), 512u);
  EXPECT_GT(r.data.size(), 0u);
  EXPECT_EQ(r.data, d.substr(0, r.data.size()));
  EXPECT_TRUE(same_address(r.from, r.fromlen, tx_addr_, tx_len_));
  s.stop();
  ASSERT_TRUE(run_until([&] { return s.done(); }));
}

TEST_F(UringDatagramTest, RefusedMultishotRecvmsgIsTurnedOffForGood) {
  OPEN_RING_OR_SKIP(16, 68 * 1024);
  // A kernel before 6.0 refuses every multishot recvmsg with -EINVAL. This
  // one refuses MSG_WAITALL with it the same way, which stands in for that.
  msghdr msg{};
  TestOp& recv = make(OpCode::recvmsg_multishot);
  recv.op.fd = rx_;
  recv.op.buf = &msg;
  recv.op.flags = MSG_WAITALL;
  io().submit(&recv.op);
  ASSERT_TRUE(run_until_done(recv));
  EXPECT_EQ(recv.res, -EOPNOTSUPP);
  EXPECT_EQ(recv.calls, 1);
  EXPECT_FALSE(driver().supports(OpCode::recvmsg_multishot));
  EXPECT_EQ(driver().recvmsg_multishot_error(), -EINVAL);
  TestOp& again = make(OpCode::recvmsg_multishot);
  again.op.fd = rx_;
  again.op.buf = &msg;
  io().submit(&again.op);
  ASSERT_TRUE(run_until_done(again));
  EXPECT_EQ(again.res, -EOPNOTSUPP);
}

// Many sockets, one buffer group: the buffers follow the datagrams in flight,
// not the sockets.
TEST_F(UringDatagramTest, ManySocketsShareOneDatagramRing) {
  OPEN_RING_OR_SKIP(1024, 68 * 1024);
  const unsigned before = driver().datagram_buffers_in_ring();
  std::vector<std::unique_ptr<Sink>> sinks;
  std::vector<sockaddr_storage> addrs(200);
  std::vector<socklen_t> lens(200);
  for (int i = 0; i < 200; ++i) {
    int fd = fds_.add(udp_socket(AF_INET, &addrs[i], &lens[i]));
    ASSERT_GE(fd, 0);
    sinks.push_back(std::make_unique<Sink>(io(), fd, true));
    sinks.back()->start();
  }
  settle();
  EXPECT_EQ(driver().datagram_buffers_in_ring(), before) << "idle sockets took buffers";
  for (int i = 0; i < 200; ++i) {
    const std::string d = datagram_bytes(static_cast<std::uint32_t>(i), 32);
    ASSERT_EQ(::sendto(tx_, d.data(), d.size(), 0, reinterpret_cast<sockaddr*>(&addrs[i]), lens[i]),
              32);
  }
  ASSERT_TRUE(run_until([&] {
    return std::all_of(sinks.begin(), sinks.end(), [](auto& s) { return s->got.size() == 1; });
  }));
  for (int i = 0; i < 200; ++i) {
    EXPECT_TRUE(sinks[i]->got[0].data == datagram_bytes(static_cast<std::uint32_t>(i), 32));
    sinks[i]->stop();
  }
  ASSERT_TRUE(run_until(
      [&] { return std::all_of(sinks.begin(), sinks.end(), [](auto& s) { return s->done(); }); }));
  backend_.reset();  // before the sinks whose ops it completed
}

}  // namespace
}  // namespace ringpark::test
