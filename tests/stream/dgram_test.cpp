// The datagram engine (runtime/stream/dgram.hpp) through a test front end, on
// each way it can receive: io_uring with multishot recvmsg (where the kernel
// has it), io_uring with plain recvmsg (the datagram buffer ring turned off:
// a kernel before 6.0), and the epoll fallback (plain recvmsg, several in
// flight). The front end records every callback and checks libuv's rules as
// they happen: alloc is asked for 65536, one alloc then its recv before the
// next alloc, each recv's buffer is the one the alloc before it gave (or a
// chunk of it).
//
// Loopback only, every run bounded in time, every fd closed by the test.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "runtime/chain.hpp"
#include "runtime/stream/dgram.hpp"
#include "udp_util.hpp"

namespace ringpark::test {
namespace {

using namespace std::chrono_literals;
using namespace ringpark::test::udp;
namespace dg = detail::dgram;
using Clock = std::chrono::steady_clock;

// ---- The configurations --------------------------------------------------------

struct Config {
  const char* name;
  detail::BackendChoice backend;
  bool multishot;  // with the datagram buffer ring
  // Sockets in an EdgeSet (their receive in the ring only while they have
  // datagrams), as the adopted uv_udp_t's; without, it stays armed.
  bool edges;
};

const Config kConfigs[] = {
    {"uring_multishot", detail::BackendChoice::uring, true, true},
    {"uring_multishot_armed", detail::BackendChoice::uring, true, false},
    {"uring_plain", detail::BackendChoice::uring, false, true},
    {"epoll", detail::BackendChoice::epoll, false, true},
};

// ---- The test front end -----------------------------------------------------------

struct Event {
  enum Kind { kAlloc, kRecv, kSent, kClosed } kind;
  explicit Event(Kind k) : kind(k) {}
  ssize_t nread = 0;
  unsigned flags = 0;
  std::string data;      // the bytes received (nread of them)
  bool has_addr = false;
  sockaddr_storage addr{};
  std::ptrdiff_t offset = -1;  // kRecv: where its buffer starts in the alloc's
  std::size_t buf_len = 0;     // kRecv: its buffer's length
  int status = 0;  // kSent
  int id = -1;     // kSent: the request's number
};

struct Sock;

struct Req {
  dg::SendReq r;
  int id = 0;
  std::string bytes;
};

struct Sock {
  dg::Dgram d;
  detail::Chain* chain = nullptr;
  std::vector<Event> events;
  std::size_t alloc_size = dg::kDatagramMax;
  int fail_allocs = 0;  // this many allocs give no buffer
  // libuv's rules, checked as they happen.
  bool outstanding = false;  // an alloc's buffer not yet handed back
  char* given = nullptr;     // that buffer
  std::size_t given_len = 0;
  int double_allocs = 0;
  int odd_suggestions = 0;
  int foreign_buffers = 0;  // a recv with a buffer the alloc before did not give
  int after_closed = 0;     // callbacks after `closed`
  bool closed = false;
  std::function<void(Sock&, const Event&)> on_recv;  // runs after recording
  std::function<void(Sock&, const Event&)> on_sent;

  // The program frees the buffer of the alloc before (a batch buffer whose
  // kMmsgFree will not come).
  void take_back() {
    std::free(given);
    given = nullptr;
    outstanding = false;
  }

  int datagrams() const {
    int n = 0;
    for (const auto& e : events) n += e.kind == Event::kRecv && e.has_addr;
    return n;
  }
  int count(Event::Kind k) const {
    int n = 0;
    for (const auto& e : events) n += e.kind == k;
    return n;
  }
};

Sock* of(dg::Dgram* d) { return static_cast<Sock*>(d->owner); }

void host_alloc(dg::Dgram* d, std::size_t suggested, iovec* buf) noexcept {
  Sock* s = of(d);
  if (s->closed) ++s->after_closed;
  if (suggested != dg::kDatagramMax) ++s->odd_suggestions;
  if (s->outstanding) ++s->double_allocs;
  Event e(Event::kAlloc);
  s->events.push_back(e);
  if (s->fail_allocs > 0) {
    --s->fail_allocs;
    *buf = iovec{nullptr, 0};
    s->outstanding = true;  // its recv (UV_ENOBUFS) still comes
    s->given = nullptr;
    return;
  }
  s->given = static_cast<char*>(std::malloc(s->alloc_size));
  s->given_len = s->alloc_size;
  *buf = iovec{s->given, s->alloc_size};
  s->outstanding = true;
}

void host_recv(dg::Dgram* d, ssize_t nread, const iovec* buf, const sockaddr* addr,
               unsigned flags) noexcept {
  Sock* s = of(d);
  if (s->closed) ++s->after_closed;
  auto* base = static_cast<char*>(buf->iov_base);
  const bool chunk = flags & dg::kMmsgChunk;
  if (!s->outstanding) {
    ++s->foreign_buffers;
  } else if (chunk ? !(base >= s->given && base + buf->iov_len <= s->given + s->given_len)
                   : base != s->given) {
    ++s->foreign_buffers;
  }
  Event e(Event::kRecv);
  e.nread = nread;
  e.flags = flags;
  if (s->outstanding && s->given != nullptr && base != nullptr) e.offset = base - s->given;
  e.buf_len = buf->iov_len;
  if (nread > 0 && base != nullptr) e.data.assign(base, static_cast<std::size_t>(nread));
  if (addr != nullptr) {
    e.has_addr = true;
    std::memcpy(&e.addr, addr, sizeof e.addr);
  }
  s->events.push_back(e);
  if (!chunk) {
    // The buffer comes back: every call but a chunk's ends the alloc.
    std::free(s->given);
    s->given = nullptr;
    s->outstanding = false;
  }
  if (s->on_recv) s->on_recv(*s, s->events.back());
}

void host_send_done(dg::Dgram* d, dg::SendReq* r, int status) noexcept {
  Sock* s = of(d);
  if (s->closed) ++s->after_closed;
  Event e(Event::kSent);
  e.status = status;
  e.id = static_cast<Req*>(r->owner)->id;
  s->events.push_back(e);
  if (s->on_sent) s->on_sent(*s, s->events.back());
}

bool host_defer(dg::Dgram* d) noexcept {
  of(d)->chain->executor().spawn([d] { dg::run_deferred(d); });
  return true;
}

void host_closed(dg::Dgram* d) noexcept {
  Sock* s = of(d);
  s->closed = true;
  s->events.push_back(Event(Event::kClosed));
}

constexpr dg::Host kHost = {&host_alloc, &host_recv, &host_send_done, &host_defer, &host_closed};

// ---- The fixture ----------------------------------------------------------------

class DgramTest : public ::testing::TestWithParam<Config> {
 protected:
  void SetUp() override {
    detail::ChainOptions o;
    o.backend = GetParam().backend;
    if (!GetParam().multishot) o.ring.dgram_ring_entries = 0;
    try {
      chain_ = std::make_unique<detail::Chain>(o, nullptr);
    } catch (const std::exception& e) {
      GTEST_SKIP() << "io_uring is not available here: " << e.what();
    }
    const bool ms = chain_->io().native(detail::OpCode::recvmsg_multishot);
    if (GetParam().multishot && !ms) GTEST_SKIP() << "no multishot recvmsg on this kernel";
    ASSERT_EQ(ms, GetParam().multishot);
    if (GetParam().edges) edges_ = std::make_unique<detail::EdgeSet>(&chain_->io(), nullptr);
  }

  void TearDown() override {
    // Every socket closed through the engine, and its close seen through.
    for (auto& s : socks_) {
      if (!s->d.closing()) dg::close(&s->d);
    }
    run_until([&] {
      for (auto& s : socks_) {
        if (!s->closed) return false;
      }
      return true;
    });
    for (auto& s : socks_) {
      EXPECT_TRUE(s->closed);
      EXPECT_EQ(s->after_closed, 0) << "callbacks after closed";
      EXPECT_EQ(s->double_allocs, 0) << "an alloc before the previous one's recv";
      EXPECT_EQ(s->odd_suggestions, 0) << "alloc asked for something other than 65536";
      EXPECT_EQ(s->foreign_buffers, 0) << "a recv with a buffer alloc did not give";
      std::free(s->given);
    }
    chain_.reset();  // nothing in flight any more: every Sock outlived its ops
    edges_.reset();  // nor the EdgeSet's poll
    for (int fd : fds_) ::close(fd);
  }

  // Runs the chain until `pred` holds or `limit` passes.
  bool run_until(const std::function<bool()>& pred, std::chrono::milliseconds limit = 10s) {
    const auto end = Clock::now() + limit;
    while (!pred()) {
      if (Clock::now() > end) return false;
      chain_->top().park(detail::Duration(5ms));
    }
    return true;
  }
  void run_for(std::chrono::milliseconds t) {
    const auto end = Clock::now() + t;
    run_until([&] { return Clock::now() > end; }, t + 1s);
  }

  // A socket the engine owns (and closes), bound to the loopback of `family`.
  Sock* engine_socket(int family, sockaddr_storage* addr) {
    socklen_t len;
    int fd = bound_socket(family, addr, &len);
    if (fd < 0) return nullptr;
    return adopt_fd(fd);
  }
  Sock* adopt_fd(int fd) {
    auto s = std::make_unique<Sock>();
    s->chain = chain_.get();
    dg::init(&s->d, &chain_->io(), &kHost, s.get(), fd);
    s->d.edges = edges_.get();
    socks_.push_back(std::move(s));
    return socks_.back().get();
  }
  // A plain socket of the test's (closed by the fixture).
  int test_socket(int family, sockaddr_storage* addr, bool nonblock = false) {
    socklen_t len;
    int fd = bound_socket(family, addr, &len, nonblock);
    if (fd >= 0) fds_.push_back(fd);
    return fd;
  }

  void send_to(int fd, const std::string& bytes, const sockaddr_storage& to) {
    const socklen_t len = to.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
    ASSERT_EQ(::sendto(fd, bytes.data(), bytes.size(), 0, reinterpret_cast<const sockaddr*>(&to), len),
              static_cast<ssize_t>(bytes.size()));
  }

  Req* queue_send(Sock* s, int id, const std::string& bytes, const sockaddr* to, unsigned tolen) {
    reqs_.push_back(std::make_unique<Req>());
    Req* q = reqs_.back().get();
    q->id = id;
    q->bytes = bytes;
    q->r.owner = q;
    iovec v{q->bytes.data(), q->bytes.size()};
    EXPECT_EQ(dg::send_prepare(&q->r, &v, 1, to, tolen), 0);
    dg::send(&s->d, &q->r);
    return q;
  }

  std::unique_ptr<detail::Chain> chain_;
  std::unique_ptr<detail::EdgeSet> edges_;
  std::vector<std::unique_ptr<Sock>> socks_;
  std::vector<std::unique_ptr<Req>> reqs_;
  std::vector<int> fds_;
};

// The datagram events of `s`, in order.
std::vector<const Event*> datagrams(const Sock& s) {
  std::vector<const Event*> out;
  for (const auto& e : s.events) {
    if (e.kind == Event::kRecv && e.has_addr) out.push_back(&e);
  }
  return out;
}

// ---- Receiving -------------------------------------------------------------------

// 0, 1, 1,472 and 65,507 bytes, each whole, with its source address and no
// flags; a round ends with recv(0, buffer, no address).
TEST_P(DgramTest, DatagramsOfEverySizeArriveWholeWithTheirSource) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  ASSERT_NE(s, nullptr);
  int tx = test_socket(AF_INET, &from);
  ASSERT_EQ(dg::recv_start(&s->d, false), 0);
  EXPECT_EQ(dg::recv_start(&s->d, false), -EALREADY);
  const std::size_t sizes[] = {0, 1, 1472, kMaxIpv4Payload};
  for (std::uint32_t i = 0; i < 4; ++i) send_to(tx, datagram_bytes(i, sizes[i]), at);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 4; }));
  run_for(50ms);
  auto got = datagrams(*s);
  ASSERT_EQ(got.size(), 4u);
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(got[i]->nread, static_cast<ssize_t>(sizes[i]));
    EXPECT_EQ(got[i]->data, datagram_bytes(static_cast<std::uint32_t>(i), sizes[i]));
    EXPECT_EQ(got[i]->flags, 0u);
    EXPECT_TRUE(same_address(reinterpret_cast<const sockaddr*>(&got[i]->addr), from));
  }
  // The round's end: nothing more now.
  const Event& last = s->events.back();
  EXPECT_EQ(last.kind, Event::kRecv);
  EXPECT_EQ(last.nread, 0);
  EXPECT_FALSE(last.has_addr);
  EXPECT_EQ(last.flags, 0u);
}

TEST_P(DgramTest, Ipv6DatagramsUpToTheLargest) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET6, &at);
  if (s == nullptr) GTEST_SKIP() << "no IPv6 loopback here";
  int tx = test_socket(AF_INET6, &from);
  ASSERT_GE(tx, 0);
  ASSERT_EQ(dg::recv_start(&s->d, false), 0);
  send_to(tx, datagram_bytes(7, kMaxIpv6Payload), at);
  send_to(tx, datagram_bytes(8, 1), at);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 2; }));
  auto got = datagrams(*s);
  EXPECT_EQ(got[0]->data, datagram_bytes(7, kMaxIpv6Payload));
  EXPECT_EQ(got[1]->data, datagram_bytes(8, 1));
  EXPECT_TRUE(same_address(reinterpret_cast<const sockaddr*>(&got[0]->addr), from));
}

// A datagram larger than alloc's buffer: cut to it, with kPartial.
TEST_P(DgramTest, ADatagramCutToASmallBufferSaysPartial) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  int tx = test_socket(AF_INET, &from);
  s->alloc_size = 100;
  ASSERT_EQ(dg::recv_start(&s->d, false), 0);
  send_to(tx, datagram_bytes(3, 1000), at);
  send_to(tx, datagram_bytes(4, 100), at);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 2; }));
  auto got = datagrams(*s);
  EXPECT_EQ(got[0]->nread, 100);
  EXPECT_EQ(got[0]->flags, dg::kPartial);
  EXPECT_EQ(got[0]->data, datagram_bytes(3, 1000).substr(0, 100));
  EXPECT_EQ(got[1]->nread, 100);
  EXPECT_EQ(got[1]->flags, 0u);  // exactly the buffer: not cut
}

// Batch mode (libuv's UV_UDP_RECVMMSG): one buffer holds several datagrams,
// a 64 KiB chunk each with kMmsgChunk, then kMmsgFree on the whole buffer.
TEST_P(DgramTest, ABatchBufferHoldsSeveralDatagramsThenFree) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  int tx = test_socket(AF_INET, &from);
  s->alloc_size = 20 * dg::kDatagramMax;
  for (std::uint32_t i = 0; i < 30; ++i) send_to(tx, datagram_bytes(i, 100 + i), at);
  ASSERT_EQ(dg::recv_start(&s->d, true), 0);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 30; }));
  run_for(50ms);
  // Walk the calls: each batch is chunks, then FREE; the round ends with
  // (0, no address, 0).
  std::uint32_t next = 0;
  int batches = 0, largest = 0, chunks = 0, ends = 0;
  for (const auto& e : s->events) {
    if (e.kind != Event::kRecv) continue;
    if (e.flags & dg::kMmsgChunk) {
      ++chunks;
      EXPECT_TRUE(e.has_addr);
      EXPECT_TRUE(same_address(reinterpret_cast<const sockaddr*>(&e.addr), from));
      EXPECT_EQ(e.data, datagram_bytes(next, 100 + next));
      ++next;
    } else if (e.flags & dg::kMmsgFree) {
      EXPECT_EQ(e.nread, 0);
      EXPECT_FALSE(e.has_addr);
      ++batches;
      largest = std::max(largest, chunks);
      EXPECT_LE(chunks, 20);
      EXPECT_GE(chunks, 1);
      chunks = 0;
    } else {
      EXPECT_EQ(e.nread, 0);
      EXPECT_FALSE(e.has_addr);
      EXPECT_EQ(chunks, 0) << "a batch without its FREE";
      ++ends;
    }
  }
  EXPECT_EQ(next, 30u);
  EXPECT_GE(batches, 2);  // 30 datagrams need two buffers of 20 at the least
  // Several datagrams to a buffer wherever a round can bring several: not
  // with io_uring's single plain recvmsg (a kernel before 6.0).
  if (GetParam().multishot || GetParam().backend == detail::BackendChoice::epoll) {
    EXPECT_GT(largest, 1) << "every batch buffer held one datagram";
  }
  EXPECT_GE(ends, 1);
}

// Each chunk is its own 64 KiB slice of the buffer, in order, and the FREE
// call hands back the whole buffer.
TEST_P(DgramTest, BatchChunksAreConsecutiveSlicesOfTheBuffer) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  int tx = test_socket(AF_INET, &from);
  s->alloc_size = 4 * dg::kDatagramMax + 100;  // 4 chunks; the rest unused
  for (std::uint32_t i = 0; i < 4; ++i) send_to(tx, datagram_bytes(i, 10), at);
  ASSERT_EQ(dg::recv_start(&s->d, true), 0);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 4; }));
  std::ptrdiff_t expect = 0;
  for (const auto& e : s->events) {
    if (e.kind != Event::kRecv) continue;
    if (e.flags & dg::kMmsgChunk) {
      EXPECT_EQ(e.offset, expect);
      EXPECT_EQ(e.buf_len, dg::kDatagramMax);
      expect += static_cast<std::ptrdiff_t>(dg::kDatagramMax);
    } else {
      EXPECT_EQ(e.offset, 0);
      EXPECT_EQ(e.buf_len, s->alloc_size);
      expect = 0;
    }
  }
}

// A batch buffer smaller than one chunk: one datagram, cut to it (libuv
// would ask recvmmsg for no message and spin).
TEST_P(DgramTest, ABatchBufferSmallerThanAChunkTakesOneCutDatagram) {
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  int tx = test_socket(AF_INET, &from);
  s->alloc_size = 1000;
  send_to(tx, datagram_bytes(1, 2000), at);
  send_to(tx, datagram_bytes(2, 10), at);
  ASSERT_EQ(dg::recv_start(&s->d, true), 0);
  ASSERT_TRUE(run_until([&] { return s->datagrams() == 2; }));
  auto got = datagrams(*s);
  EXPECT_EQ(got[0]->nread, 1000);
  EXPECT_EQ(got[0]->flags, dg::kMmsgChunk | dg::kPartial);
  EXPECT_EQ(got[0]->data, datagram_bytes(1, 2000).substr(0, 1000));
  EXPECT_EQ(got[1]->flags, dg::kMmsgChunk);
  EXPECT_EQ(got[1]->data, datagram_bytes(2, 10));
}

// A reader that stops in the middle of a round: nothing more comes, what
// arrives meanwhile is kept, and it all comes first, in order, after the next
// start. Batch mode or not.
TEST_P(DgramTest, StoppingKeepsWhatArrivesForTheNextStart) {
  for (bool batch : {false, true}) {
    SCOPED_TRACE(batch ? "batch" : "single");
    sockaddr_storage at, from;
    Sock* s = engine_socket(AF_INET, &at);
    int tx = test_socket(AF_INET, &from);
    s->alloc_size = batch ? 20 * dg::kDatagramMax : dg::kDatagramMax;
    int seen = 0;
    s->on_recv = [&](Sock& sock, const Event& e) {
      if (e.has_addr && ++seen == 3) {
        dg::recv_stop(&sock.d);
        // As libuv: a reader that stops inside a chunk's call gets no
        // kMmsgFree; the buffer is its own again.
        if (e.flags & dg::kMmsgChunk) sock.take_back();
      }
    };
    for (std::uint32_t i = 0; i < 10; ++i) send_to(tx, datagram_bytes(i, 50), at);
    ASSERT_EQ(dg::recv_start(&s->d, batch), 0);
    ASSERT_TRUE(run_until([&] { return seen >= 3; }));
    run_for(50ms);
    EXPECT_EQ(seen, 3) << "datagrams after the stop";
    for (std::uint32_t i = 10; i < 15; ++i) send_to(tx, datagram_bytes(i, 50), at);
    run_for(50ms);
    EXPECT_EQ(seen, 3);
    s->on_recv = nullptr;
    ASSERT_EQ(dg::recv_start(&s->d, batch), 0);
    ASSERT_TRUE(run_until([&] { return s->datagrams() == 15; }));
    auto got = datagrams(*s);
    for (std::uint32_t i = 0; i < 15; ++i) EXPECT_EQ(got[i]->data, datagram_bytes(i, 50)) << i;
  }
}

// alloc gives no buffer: the reader gets -ENOBUFS (with no address), and the
// datagram is kept, not lost: it comes, in order, once alloc gives again.
TEST_P(DgramTest, NoBufferFromAllocKeepsTheDatagram) {
  for (bool batch : {false, true}) {
    SCOPED_TRACE(batch ? "batch" : "single");
    sockaddr_storage at, from;
    Sock* s = engine_socket(AF_INET, &at);
    int tx = test_socket(AF_INET, &from);
    s->alloc_size = batch ? 20 * dg::kDatagramMax : dg::kDatagramMax;
    s->fail_allocs = 3;
    for (std::uint32_t i = 0; i < 5; ++i) send_to(tx, datagram_bytes(i, 20), at);
    ASSERT_EQ(dg::recv_start(&s->d, batch), 0);
    ASSERT_TRUE(run_until([&] { return s->datagrams() == 5; }));
    int enobufs = 0;
    for (const auto& e : s->events) {
      if (e.kind == Event::kRecv && e.nread == -ENOBUFS) {
        ++enobufs;
        EXPECT_FALSE(e.has_addr);
      }
    }
    EXPECT_GE(enobufs, 1);
    auto got = datagrams(*s);
    for (std::uint32_t i = 0; i < 5; ++i) EXPECT_EQ(got[i]->data, datagram_bytes(i, 20)) << i;
  }
}

// A burst of 100,000 datagrams from a sender that does not wait: every one is
// received whole and in order, or counted by the kernel as dropped for a full
// receive buffer (loopback's only loss); none is lost inside the engine.
TEST_P(DgramTest, ABurstOf100000DatagramsIsReceivedOrCountedAsDropped) {
  constexpr std::uint32_t kCount = 100000;
  constexpr std::size_t kSize = 64;
  sockaddr_storage at, from;
  Sock* s = engine_socket(AF_INET, &at);
  int tx = test_socket(AF_INET, &from);
  const long drops_before = socket_drops(s->d.fd(), AF_INET);
  const long rcvbuf_errors_before = udp_rcvbuf_errors();
  ASSERT_GE(drops_before, 0);
  std::uint32_t next = 0, received = 0, skipped = 0, bad = 0;
  s->on_recv = [&](Sock&, const Event& e) {
    if (!e.has_addr) return;
    if (!is_datagram(e.data.data(), e.data.size(), kSize)) {
      ++bad;
      return;
    }
    const std::uint32_t seq = seq_of(e.data.data(), e.data.size());
    if (seq < next) ++bad;  // repeated or reordered
    skipped += seq - next;
    next = seq + 1;
    ++received;
  };
  ASSERT_EQ(dg::recv_start(&s->d, false), 0);
  std::thread sender([&] {
    for (std::uint32_t i = 0; i < kCount; ++i) {
      const std::string b = datagram_bytes(i, kSize);
      ::sendto(tx, b.data(), b.size(), 0, reinterpret_cast<const sockaddr*>(&at), sizeof(sockaddr_in));
    }
  });
  const auto dropped = [&] { return socket_drops(s->d.fd(), AF_INET) - drops_before; };
  bool done = run_until([&] { return received + dropped() >= kCount; }, 30s);
  sender.join();
  if (!done) done = run_until([&] { return received + dropped() >= kCount; }, 5s);
  s->on_recv = nullptr;
  skipped += kCount - next;  // the last ones, dropped
  std::printf("burst: %u received, %ld dropped by the kernel for a full receive buffer "
              "(socket drops; Udp RcvbufErrors +%ld)\n",
              received, dropped(), udp_rcvbuf_errors() - rcvbuf_errors_before);
  EXPECT_TRUE(done);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(static_cast<long>(received) + dropped(), static_cast<long>(kCount))
      << "datagrams neither received nor dropped by the kernel";
  EXPECT_EQ(static_cast<long>(skipped), dropped()) << "a gap the kernel did not count";
}

// ---- Sending ---------------------------------------------------------------------

// A unix datagram socket pair whose reader does not read: the sender's queue
// fills, sends wait for room (on io_uring: -EAGAIN, then POLLOUT), and still
// every datagram arrives in the order it was queued, callbacks in that order.
TEST_P(DgramTest, SendsLeaveInOrderWhenTheSocketIsFull) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
  fds_.push_back(sv[1]);
  Sock* s = adopt_fd(sv[0]);
  constexpr int kCount = 3000;
  for (int i = 0; i < kCount; ++i) {
    queue_send(s, i, datagram_bytes(static_cast<std::uint32_t>(i), 1000), nullptr, 0);
  }
  EXPECT_EQ(s->d.queued_count, static_cast<std::size_t>(kCount));
  EXPECT_EQ(s->d.queued_bytes, static_cast<std::size_t>(kCount) * 1000);
  run_for(200ms);
  // The peer has not read: the socket is full and sends wait.
  ASSERT_GT(s->d.queued_count, 0u) << "the socket never filled: the test proves nothing";
  ASSERT_LT(s->count(Event::kSent), kCount);
  // The peer reads from another thread, a little at a time, so that room
  // comes back while sends are being tried: a send behind one that found no
  // room could then leave first, unless the engine keeps them in order.
  std::vector<std::uint32_t> got;
  std::atomic<bool> reading{true};
  int bad = 0;
  std::thread reader([&] {
    char buf[2048];
    const auto end = Clock::now() + 20s;
    while (got.size() < kCount && Clock::now() < end) {
      ssize_t n = ::recv(sv[1], buf, sizeof buf, MSG_DONTWAIT);
      if (n < 0) {
        std::this_thread::sleep_for(50us);
        continue;
      }
      if (!is_datagram(buf, static_cast<std::size_t>(n), 1000)) ++bad;
      got.push_back(seq_of(buf, static_cast<std::size_t>(n)));
      if (got.size() % 8 == 0) std::this_thread::sleep_for(20us);
    }
    reading = false;
  });
  run_until([&] { return !reading; }, 25s);
  reader.join();
  EXPECT_EQ(bad, 0);
  ASSERT_EQ(got.size(), static_cast<std::size_t>(kCount));
  int out_of_order = 0;
  for (int i = 0; i < kCount; ++i) out_of_order += got[i] != static_cast<std::uint32_t>(i);
  EXPECT_EQ(out_of_order, 0) << "datagrams out of order";
  ASSERT_TRUE(run_until([&] { return s->count(Event::kSent) == kCount; }));
  int id = 0;
  for (const auto& e : s->events) {
    if (e.kind != Event::kSent) continue;
    EXPECT_EQ(e.id, id++);
    EXPECT_EQ(e.status, 0);
  }
  EXPECT_EQ(s->d.queued_count, 0u);
  EXPECT_EQ(s->d.queued_bytes, 0u);
}

// A send that fails (a datagram too big) reports its error and does not stop
// or reorder the sends behind it (on io_uring, the link it breaks cancels
// them and the engine sends them again).
TEST_P(DgramTest, AFailedSendReportsItsErrorAndTheOthersGoOnInOrder) {
  sockaddr_storage at, to;
  Sock* s = engine_socket(AF_INET, &at);
  int rx = test_socket(AF_INET, &to);
  const std::string big(70000, 'x');
  for (int i = 0; i < 10; ++i) {
    const std::string b = i == 4 ? big : datagram_bytes(static_cast<std::uint32_t>(i), 100);
    queue_send(s, i, b, reinterpret_cast<const sockaddr*>(&to), sizeof(sockaddr_in));
  }
  ASSERT_TRUE(run_until([&] { return s->count(Event::kSent) == 10; }));
  int id = 0;
  for (const auto& e : s->events) {
    if (e.kind != Event::kSent) continue;
    EXPECT_EQ(e.id, id);
    EXPECT_EQ(e.status, id == 4 ? -EMSGSIZE : 0) << id;
    ++id;
  }
  char buf[2048];
  std::vector<std::uint32_t> got;
  for (;;) {
    ssize_t n = ::recv(rx, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) break;
    got.push_back(seq_of(buf, static_cast<std::size_t>(n)));
  }
  EXPECT_EQ(got, (std::vector<std::uint32_t>{0, 1, 2, 3, 5, 6, 7, 8, 9}));
}

// try_send: at once when nothing is queued; -EAGAIN while a send is queued,
// so that it never overtakes one.
TEST_P(DgramTest, TrySendSendsAtOnceOrSaysEagainBehindAQueuedSend) {
  sockaddr_storage at, to;
  Sock* s = engine_socket(AF_INET, &at);
  int rx = test_socket(AF_INET, &to);
  std::string b = datagram_bytes(0, 30);
  iovec v{b.data(), b.size()};
  const auto* dst = reinterpret_cast<const sockaddr*>(&to);
  EXPECT_EQ(dg::try_send(&s->d, &v, 1, dst, sizeof(sockaddr_in)), 30);
  queue_send(s, 1, datagram_bytes(1, 30), dst, sizeof(sockaddr_in));
  std::string b2 = datagram_bytes(2, 30);
  iovec v2{b2.data(), b2.size()};
  EXPECT_EQ(dg::try_send(&s->d, &v2, 1, dst, sizeof(sockaddr_in)), -EAGAIN);
  ASSERT_TRUE(run_until([&] { return s->count(Event::kSent) == 1; }));
  EXPECT_EQ(dg::try_send(&s->d, &v2, 1, dst, sizeof(sockaddr_in)), 30);
  char buf[64];
  std::vector<std::uint32_t> got;
  for (;;) {
    ssize_t n = ::recv(rx, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0) break;
    got.push_back(seq_of(buf, static_cast<std::size_t>(n)));
  }
  EXPECT_EQ(got, (std::vector<std::uint32_t>{0, 1, 2}));
}

// ---- Closing ---------------------------------------------------------------------

// Close in the middle of a burst both ways: every send is completed once, in
// order (those sent with 0, then those the close kept from leaving with
// -ECANCELED, none sent after a cancelled one), no receive callback after the
// close, `closed` last, and the socket's fd closed by then.
TEST_P(DgramTest, CloseDuringABurstCompletesEverythingInOrderThenClosed) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
  fds_.push_back(sv[1]);
  Sock* s = adopt_fd(sv[0]);
  const int fd = sv[0];
  ASSERT_EQ(dg::recv_start(&s->d, false), 0);
  std::thread peer([&] {
    for (std::uint32_t i = 0; i < 2000; ++i) {
      const std::string b = datagram_bytes(i, 200);
      ::send(sv[1], b.data(), b.size(), MSG_DONTWAIT);
    }
  });
  constexpr int kCount = 2000;
  for (int i = 0; i < kCount; ++i) {
    queue_send(s, i, datagram_bytes(static_cast<std::uint32_t>(i), 1000), nullptr, 0);
  }
  int recvs_at_close = -1;
  s->on_recv = [&](Sock& sock, const Event& e) {
    if (e.has_addr && sock.datagrams() == 50 && !sock.d.closing()) {
      dg::close(&sock.d);
      recvs_at_close = sock.count(Event::kRecv);
    }
  };
  const bool closed = run_until([&] { return s->closed; }, 10s);
  peer.join();
  ASSERT_TRUE(closed || run_until([&] { return s->closed; }));
  if (recvs_at_close < 0) GTEST_SKIP() << "the peer's datagrams did not come";
  EXPECT_EQ(s->count(Event::kRecv), recvs_at_close) << "a receive callback after the close";
  EXPECT_EQ(s->count(Event::kSent), kCount);
  int id = 0, cancelled = 0;
  for (const auto& e : s->events) {
    if (e.kind != Event::kSent) continue;
    EXPECT_EQ(e.id, id++);
    if (e.status == -ECANCELED) {
      ++cancelled;
    } else {
      EXPECT_EQ(e.status, 0);
      EXPECT_EQ(cancelled, 0) << "a send completed after one the close cancelled";
    }
  }
  EXPECT_GT(cancelled, 0) << "the socket was never full: the close cancelled nothing";
  EXPECT_EQ(s->events.back().kind, Event::kClosed);
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "the socket is still open after closed";
}

// A send queued just before the close leaves, as libuv's uv_udp_send sends
// at once; the close waits for it.
TEST_P(DgramTest, ASendQueuedJustBeforeTheCloseLeaves) {
  sockaddr_storage at, to;
  Sock* s = engine_socket(AF_INET, &at);
  int rx = test_socket(AF_INET, &to);
  queue_send(s, 0, datagram_bytes(0, 10), reinterpret_cast<const sockaddr*>(&to), sizeof(sockaddr_in));
  queue_send(s, 1, datagram_bytes(1, 10), reinterpret_cast<const sockaddr*>(&to), sizeof(sockaddr_in));
  ASSERT_TRUE(dg::close(&s->d));
  EXPECT_FALSE(dg::close(&s->d));
  ASSERT_TRUE(run_until([&] { return s->closed; }));
  ASSERT_EQ(s->count(Event::kSent), 2);
  for (const auto& e : s->events) {
    if (e.kind == Event::kSent) {
      EXPECT_EQ(e.status, 0);
    }
  }
  char buf[64];
  EXPECT_EQ(::recv(rx, buf, sizeof buf, MSG_DONTWAIT), 10);
  EXPECT_EQ(::recv(rx, buf, sizeof buf, MSG_DONTWAIT), 10);
}

INSTANTIATE_TEST_SUITE_P(Backends, DgramTest, ::testing::ValuesIn(kConfigs),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ringpark::test
