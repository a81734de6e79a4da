// Multishot operations that the kernel ends on its own. A multishot accept or
// recv posts each result with IORING_CQE_F_MORE; when it cannot post one (the
// completion queue is full, or has completions waiting in the overflow list)
// the kernel ends the operation: the result comes as a final completion,
// without F_MORE, and nothing more is accepted or received until someone arms
// it again. A multishot recv also ends when the provided-buffer ring is empty
// (-ENOBUFS). The driver hides both: it re-arms the operation (from
// UringDriver::dispatch, or once buffers are back), so the owner sees one
// unbroken stream of completions, each with kMore, and nothing is lost.
//
// How the kernel is made to end them, for real:
// - CQ overflow: a ring of 8 entries (a CQ of 16) holds 24 one-shot polls on
//   an empty pipe; one byte into the pipe completes them all at once, more
//   than the CQ holds, and nobody reaps; then a connection (or bytes) arrives.
//   Under the loop's own ring (a CQ of 2,048) the same is done with 2,100
//   polls. (Completions the kernel posts by itself: the driver makes room in
//   the CQ before it submits, so submitted nops no longer overflow it.)
// - an empty buffer ring: 80 connections whose bytes all arrive before the
//   first multishot recv is armed, more than the loop's 512 buffers hold.
// Each driver test first checks, on a bare liburing ring, that this kernel does
// end the operation that way; where it does not, there is nothing to re-arm and
// the test skips, saying so.
//
// io_uring only: the fallback has no multishot operations to end.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"
#include "test_util.hpp"
#include "uring_driver/backend_harness.hpp"
#include "uring_driver/buf_ring.hpp"
#include "uring_driver/driver.hpp"

namespace ringpark::test {
namespace {

using detail::kMore;
using detail::Op;
using detail::OpCode;
using detail::RingOptions;
using detail::RingProbe;
using detail::UringDriver;

// Bytes that say where they sit in which stream: a lost, repeated or
// reordered chunk shows up as a mismatch.
std::string pattern(std::size_t n, unsigned stream = 0) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) {
    s[i] = static_cast<char>((i * 7 + i / 251 + stream * 31) & 0xff);
  }
  return s;
}

// ---- The kernel, bare ----------------------------------------------------------

constexpr unsigned kTinyRing = 8;  // a CQ of 16
constexpr int kOverflowNops = 24;

// Queues `n` nops on a bare ring and submits them; nobody reaps them.
void flood_with_nops(io_uring* ring, int n) {
  for (int i = 0; i < n; ++i) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring);
    if (sqe == nullptr) {
      io_uring_submit(ring);
      sqe = io_uring_get_sqe(ring);
    }
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, 1);
  }
  io_uring_submit(ring);
}

// Whether this kernel ends a multishot accept (recv = false) or recv (true)
// whose next result finds the CQ overflowed: the operation's first completion
// then comes without F_MORE. Empty when it does, else why the test cannot run.
std::string kernel_ends_multishot_on_overflow(bool recv) {
  io_uring ring;
  io_uring_params params{};
  params.flags = IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL;
  if (int r = io_uring_queue_init_params(kTinyRing, &ring, &params); r != 0) {
    return std::string("no io_uring here: ") + detail::errno_name(r);
  }
  Fds fds;
  sockaddr_in addr;
  const int listener = fds.add(listen_loopback(&addr, 128));
  std::unique_ptr<detail::BufRing> bufs;
  int server = -1, client = -1;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  if (recv) {
    client = fds.add(connect_loopback(addr));
    server = fds.add(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (detail::BufRing::create(&ring, 8, 4096, 0, /*incremental=*/false, &bufs) != 0) {
      io_uring_queue_exit(&ring);
      return "no provided buffer rings here";
    }
    io_uring_prep_recv_multishot(sqe, server, nullptr, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = 0;
  } else {
    io_uring_prep_multishot_accept(sqe, listener, nullptr, nullptr, SOCK_CLOEXEC);
  }
  io_uring_sqe_set_data64(sqe, 42);
  io_uring_submit(&ring);
  flood_with_nops(&ring, kOverflowNops);
  if (recv) {
    (void)!::write(client, "abc", 3);
  } else {
    fds.add(connect_loopback(addr));
  }
  int res = 0;
  std::uint32_t flags = 0;
  bool seen = false;
  for (int round = 0; round < 100 && !seen; ++round) {
    io_uring_get_events(&ring);
    io_uring_cqe* cqe;
    unsigned head, n = 0;
    io_uring_for_each_cqe(&ring, head, cqe) {
      if (cqe->user_data == 42 && !seen) {
        seen = true;
        res = cqe->res;
        flags = cqe->flags;
      }
      ++n;
    }
    io_uring_cq_advance(&ring, n);
    if (!seen) ::usleep(1000);
  }
  if (bufs) bufs->unregister(&ring);
  io_uring_queue_exit(&ring);
  const char* what = recv ? "multishot recv" : "multishot accept";
  if (!seen) return std::string("the bare ring's ") + what + " never completed";
  if (res == -EINVAL) return std::string("no ") + what + " here";
  if (flags & IORING_CQE_F_MORE) {
    return std::string("this kernel keeps a ") + what +
           " armed across CQ overflow: there is nothing to re-arm";
  }
  if (res <= 0)
    return std::string("the bare ring's ") + what + " ended with " + std::to_string(res);
  return {};
}

// ---- The driver, with a tiny ring ------------------------------------------------

struct Recorder {
  Op op;
  std::vector<std::pair<int, std::uint32_t>> results;
  std::function<void(int, std::uint32_t)> then;
  bool done() const { return !results.empty() && !(results.back().second & kMore); }
};

void record(Op* op, int res, std::uint32_t flags) noexcept {
  auto* r = static_cast<Recorder*>(op->data);
  r->results.emplace_back(res, flags);
  if (r->then) r->then(res, flags);
}

class TinyRing : public ::testing::Test {
 protected:
  // Empty when the ring is up; otherwise the reason to skip.
  std::string open(unsigned buf_entries = 0) {
    RingOptions options;
    options.entries = kTinyRing;
    options.buf_ring_entries = buf_entries;
    options.buf_ring_buf_size = 4096;
    driver_ = UringDriver::create(nullptr, options, &probe_);
    if (!driver_) return "io_uring is unavailable: " + probe_.reason;
    if (buf_entries > 0 && !driver_->supports(OpCode::recv_multishot)) {
      return std::string("no multishot recv here: ") +
             detail::errno_name(driver_->recv_multishot_error());
    }
    return {};
  }
  void TearDown() override {
    if (driver_) driver_->shutdown();
  }

  Recorder& make(OpCode code) {
    Recorder& r = *ops_.emplace_back(std::make_unique<Recorder>());
    r.op.code = code;
    r.op.complete = &record;
    r.op.data = &r;
    return r;
  }

  // Arms `n` one-shot polls on an empty pipe, then completes them all with one
  // byte and does not reap: with more than the CQ holds, the rest wait in the
  // kernel's overflow list. Returns the polls.
  std::vector<Recorder*> overflow_cq(int n) {
    int p[2];
    EXPECT_EQ(::pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
    fds_.add(p[0]);
    fds_.add(p[1]);
    std::vector<Recorder*> polls;
    for (int i = 0; i < n; ++i) {
      Recorder& r = make(OpCode::poll);
      r.op.fd = p[0];
      r.op.flags = POLLIN;
      driver_->submit(&r.op);
      polls.push_back(&r);
    }
    driver_->flush();
    EXPECT_EQ(::write(p[1], "x", 1), 1);  // completes every poll, on the way out of write()
    return polls;
  }

  template <class Pred>
  bool run_until(Pred pred, Duration limit = 5s) {
    Stopwatch sw;
    while (!pred()) {
      if (sw.elapsed() >= limit) return false;
      driver_->park(Duration(10ms));
    }
    return true;
  }

  RingProbe probe_;
  std::unique_ptr<UringDriver> driver_;
  std::deque<std::unique_ptr<Recorder>> ops_;
  Fds fds_;
};

TEST_F(TinyRing, MultishotAcceptEndedByCqOverflowIsReArmedAndLosesNoConnection) {
  if (std::string why = kernel_ends_multishot_on_overflow(false); !why.empty()) GTEST_SKIP() << why;
  if (std::string why = open(); !why.empty()) GTEST_SKIP() << why;
  sockaddr_in addr;
  const int listener = fds_.add(listen_loopback(&addr, 128));
  ASSERT_GE(listener, 0);
  Recorder& accept = make(OpCode::accept_multishot);
  accept.op.fd = listener;
  accept.op.flags = SOCK_CLOEXEC;
  accept.then = [this](int res, std::uint32_t) {
    if (res >= 0) fds_.add(res);
  };
  driver_->submit(&accept.op);
  driver_->park(Duration::zero());  // the accept is armed in the kernel

  // The CQ overflows; then three connections arrive. The kernel can post the
  // first accept only as the op's last completion.
  const std::uint64_t rearms_before = driver_->stats().multishot_rearms;
  std::vector<Recorder*> polls = overflow_cq(kOverflowNops);
  ASSERT_TRUE(driver_->has_cqes());
  for (int i = 0; i < 3; ++i) ASSERT_GE(fds_.add(connect_loopback(addr)), 0);

  auto accepted = [&] {
    int n = 0;
    for (const auto& [res, flags] : accept.results) n += res >= 0;
    return n;
  };
  ASSERT_TRUE(run_until([&] { return accepted() == 3 || accept.done(); }))
      << "accepted " << accepted() << " of 3";
  EXPECT_EQ(accepted(), 3);
  for (const auto& [res, flags] : accept.results) {
    EXPECT_TRUE(flags & kMore) << "the owner saw the op end (res " << res << ")";
  }
  for (Recorder* p : polls) ASSERT_EQ(p->results.size(), 1u) << "a poll completed twice or never";
  // The kernel ended the accept, and the driver armed it again.
  EXPECT_GE(driver_->stats().multishot_rearms - rearms_before, 1u)
      << "the CQ overflow did not end the multishot accept: the test proves nothing";

  // The re-armed accept goes on working, and ends once, when cancelled.
  ASSERT_GE(fds_.add(connect_loopback(addr)), 0);
  ASSERT_TRUE(run_until([&] { return accepted() == 4; }));
  driver_->cancel(&accept.op);
  ASSERT_TRUE(run_until([&] { return accept.done(); }));
  EXPECT_EQ(accept.results.back().first, -ECANCELED);
  EXPECT_EQ(accepted(), 4);
}

TEST_F(TinyRing, MultishotRecvEndedByCqOverflowIsReArmedAndLosesNoByte) {
  if (std::string why = kernel_ends_multishot_on_overflow(true); !why.empty()) GTEST_SKIP() << why;
  if (std::string why = open(/*buf_entries=*/16); !why.empty()) GTEST_SKIP() << why;
  sockaddr_in addr;
  const int listener = fds_.add(listen_loopback(&addr, 128));
  const int client = fds_.add(connect_loopback(addr));
  const int server = fds_.add(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_GE(server, 0);

  std::string got;
  Recorder& recv = make(OpCode::recv_multishot);
  recv.op.fd = server;
  recv.then = [&](int res, std::uint32_t flags) {
    if (!(flags & detail::kBuffer)) return;
    const std::uint16_t id = detail::buffer_id(flags);
    if (res > 0) got.append(driver_->provided_buffer(id), static_cast<std::size_t>(res));
    driver_->recycle(id);
  };
  driver_->submit(&recv.op);
  driver_->park(Duration::zero());

  // Three rounds: overflow the CQ, then send a chunk, which the kernel can
  // post only as the recv's last completion.
  const std::string data = pattern(3 * 3000);
  for (int round = 0; round < 3; ++round) {
    const std::uint64_t rearms_before = driver_->stats().multishot_rearms;
    std::vector<Recorder*> polls = overflow_cq(kOverflowNops);
    ASSERT_TRUE(driver_->has_cqes());
    ASSERT_EQ(::send(client, data.data() + round * 3000, 3000, MSG_NOSIGNAL), 3000);
    ASSERT_TRUE(run_until([&] { return got.size() == (round + 1) * 3000u || recv.done(); }))
        << "round " << round << ": received " << got.size();
    for (Recorder* p : polls) ASSERT_EQ(p->results.size(), 1u);
    EXPECT_GE(driver_->stats().multishot_rearms - rearms_before, 1u)
        << "round " << round << ": the CQ overflow did not end the multishot recv";
  }
  EXPECT_TRUE(got == data) << "bytes lost, repeated or reordered";
  for (const auto& [res, flags] : recv.results) {
    EXPECT_TRUE(flags & kMore) << "the owner saw the recv end (res " << res << ")";
  }
  driver_->cancel(&recv.op);
  ASSERT_TRUE(run_until([&] { return recv.done(); }));
  EXPECT_EQ(recv.results.back().first, -ECANCELED);
  EXPECT_EQ(driver_->provided_buffers_out(), 0u);
}

// ---- rp_tcp_t on the loop's ring --------------------------------------------------

// A connection accepted by the server, and what it received.
struct Peer {
  rp_tcp_t tcp{};
  std::string got;
  int eof = 0;
  int errors = 0;
  int closes = 0;
};

struct Server {
  rp_tcp_t tcp{};
  uv_loop_t* loop = nullptr;
  std::deque<Peer> peers;
  int connection_errors = 0;
  int closes = 0;
};

void peer_alloc(rp_tcp_t*, size_t suggested, uv_buf_t* buf) {
  *buf = uv_buf_init(static_cast<char*>(std::malloc(suggested)), static_cast<unsigned>(suggested));
}

void peer_read(rp_tcp_t* h, ssize_t n, const uv_buf_t* buf) {
  auto* p = static_cast<Peer*>(h->data);
  if (n > 0) {
    p->got.append(buf->base, static_cast<std::size_t>(n));
  } else if (n == UV_EOF) {
    ++p->eof;
  } else if (n < 0 && n != UV_ECANCELED) {
    ++p->errors;
  }
  std::free(buf->base);
}

void on_connection(rp_tcp_t* s, int status) {
  auto* server = static_cast<Server*>(s->data);
  if (status != 0) {
    ++server->connection_errors;
    return;
  }
  Peer& p = server->peers.emplace_back();
  p.tcp.data = &p;
  if (rp_tcp_init(server->loop, &p.tcp) != 0 || rp_accept(s, &p.tcp) != 0 ||
      rp_read_start(&p.tcp, peer_alloc, peer_read) != 0) {
    ++server->connection_errors;
  }
}

class LoopRing : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(uv_timer_init(&loop_, &tick_), 0);
    uv_timer_start(
        &tick_, [](uv_timer_t*) {}, 5, 5);  // bounds every UV_RUN_ONCE
    const std::string backend = rp_backend(&loop_);
    ctx_ = detail::LoopContext::get(&loop_);
    if (backend != "io_uring") {
      skip_ = "io_uring only (multishot operations); backend: " + backend;
      return;
    }
    if (!ctx_->chain().uring()->supports(OpCode::recv_multishot)) {
      skip_ = "no multishot recv here";
      return;
    }
    server_.loop = &loop_;
    server_.tcp.data = &server_;
    ASSERT_EQ(rp_tcp_init(&loop_, &server_.tcp), 0);
    sockaddr_in any{};
    uv_ip4_addr("127.0.0.1", 0, &any);
    ASSERT_EQ(rp_tcp_bind(&server_.tcp, reinterpret_cast<const sockaddr*>(&any), 0), 0);
    int len = sizeof addr_;
    ASSERT_EQ(rp_tcp_getsockname(&server_.tcp, reinterpret_cast<sockaddr*>(&addr_), &len), 0);
    ASSERT_EQ(rp_listen(&server_.tcp, 256, on_connection), 0);
    opened_ = true;
  }

  void TearDown() override {
    if (opened_) {
      auto on_peer_close = [](rp_tcp_t* h) { ++static_cast<Peer*>(h->data)->closes; };
      for (Peer& p : server_.peers) {
        if (!rp_is_closing(&p.tcp)) rp_close(&p.tcp, on_peer_close);
      }
      rp_close(&server_.tcp, [](rp_tcp_t* h) { ++static_cast<Server*>(h->data)->closes; });
      EXPECT_TRUE(run_until([&] {
        if (server_.closes == 0) return false;
        for (const Peer& p : server_.peers) {
          if (p.closes == 0) return false;
        }
        return true;
      }));
      for (const Peer& p : server_.peers) EXPECT_EQ(p.closes, 1);
      EXPECT_EQ(server_.closes, 1);
    }
    uv_close(reinterpret_cast<uv_handle_t*>(&tick_), nullptr);
    EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
  }

  template <class Pred>
  bool run_until(Pred pred, std::chrono::seconds limit = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (!pred()) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      rp_uv_run(&loop_, UV_RUN_ONCE);
    }
    return true;
  }

  uv_loop_t loop_;
  uv_timer_t tick_;
  detail::LoopContext* ctx_ = nullptr;
  Server server_;
  sockaddr_in addr_{};
  bool opened_ = false;
  std::string skip_;
  Fds fds_;
};

// End to end through rp_tcp_t: nothing lost, and (the driver's counter) the
// kernel did end the accept and the recv and the driver armed them again.
// The stream engine would also recover by itself from an accept or recv that
// ended (it re-arms a recv that ends with bytes, and accepts again after a
// short pause), so the counter, not the bytes, is what pins the driver here.
TEST_F(LoopRing, RpTcpAcceptsAndReadsAcrossACqOverflowLosingNothing) {
  if (!skip_.empty()) GTEST_SKIP() << skip_;
  for (bool recv : {false, true}) {
    if (std::string why = kernel_ends_multishot_on_overflow(recv); !why.empty())
      GTEST_SKIP() << why;
  }
  // One connection reading already (its multishot recv armed).
  const int first = fds_.add(connect_loopback(addr_));
  ASSERT_TRUE(run_until([&] { return server_.peers.size() == 1; }));
  rp_uv_run(&loop_, UV_RUN_NOWAIT);

  // Overflow the loop's CQ: 2,100 one-shot polls on an empty pipe (more than
  // its 2,048 entries), completed at once by one byte, and not reaped.
  UringDriver& ring = *ctx_->chain().uring();
  const std::uint64_t rearms_before = ring.stats().multishot_rearms;
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC | O_NONBLOCK), 0);
  fds_.add(p[0]);
  fds_.add(p[1]);
  std::deque<Recorder> polls(2100);
  for (Recorder& r : polls) {
    r.op.code = OpCode::poll;
    r.op.fd = p[0];
    r.op.flags = POLLIN;
    r.op.complete = &record;
    r.op.data = &r;
    ctx_->chain().io().submit(&r.op);
  }
  ring.flush();
  ASSERT_EQ(::write(p[1], "x", 1), 1);
  ASSERT_TRUE(ring.has_cqes());

  // Now three connections arrive and the first one gets bytes: the accept and
  // the recv each find the CQ overflowed, and the kernel ends them.
  std::vector<int> clients = {first};
  for (int i = 0; i < 3; ++i) clients.push_back(fds_.add(connect_loopback(addr_)));
  const std::vector<std::string> data = {pattern(5000, 0), pattern(7000, 1), pattern(9000, 2),
                                         pattern(11000, 3)};
  for (std::size_t i = 0; i < clients.size(); ++i) {
    ASSERT_EQ(::send(clients[i], data[i].data(), data[i].size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(data[i].size()));
    ::shutdown(clients[i], SHUT_WR);
  }
  ASSERT_TRUE(run_until([&] {
    if (server_.peers.size() < clients.size()) return false;
    for (const Peer& p : server_.peers) {
      if (p.eof == 0 && p.errors == 0) return false;
    }
    return true;
  })) << "accepted "
      << server_.peers.size() << " of " << clients.size();
  EXPECT_EQ(server_.connection_errors, 0);
  // Accepted in order of arrival; each got its client's bytes, then EOF.
  for (std::size_t i = 0; i < server_.peers.size(); ++i) {
    EXPECT_TRUE(server_.peers[i].got == data[i])
        << "connection " << i << ": received " << server_.peers[i].got.size() << " bytes";
    EXPECT_EQ(server_.peers[i].eof, 1);
    EXPECT_EQ(server_.peers[i].errors, 0);
  }
  for (const Recorder& r : polls) ASSERT_EQ(r.results.size(), 1u);
  // The kernel ended the accept and the recv, and the driver armed them again.
  EXPECT_GE(ring.stats().multishot_rearms - rearms_before, 2u)
      << "the CQ overflow did not end the multishot accept and recv: the test proves less";
}

TEST_F(LoopRing, RpTcpReadsAcrossAnEmptiedBufferRingLosingNothing) {
  if (!skip_.empty()) GTEST_SKIP() << skip_;
  // 80 connections whose bytes wait in their sockets before the server reads:
  // the multishot recvs armed for them in one turn want more buffers than the
  // ring's 512, and the kernel ends those that find it empty (-ENOBUFS).
  constexpr int kClients = 80;
  constexpr std::size_t kBytes = 256 * 1024;
  std::vector<int> clients;
  std::vector<std::string> data;
  std::vector<std::size_t> sent(kClients, 0);
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(fds_.add(connect_loopback(addr_)));
    ASSERT_GE(clients.back(), 0);
    ASSERT_EQ(::fcntl(clients.back(), F_SETFL, O_NONBLOCK), 0);
    data.push_back(pattern(kBytes, static_cast<unsigned>(i)));
  }
  auto pump = [&] {
    bool all = true;
    for (int i = 0; i < kClients; ++i) {
      while (sent[i] < kBytes) {
        ssize_t n = ::send(clients[i], data[i].data() + sent[i], kBytes - sent[i],
                           MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0) break;
        sent[i] += static_cast<std::size_t>(n);
        if (sent[i] == kBytes) ::shutdown(clients[i], SHUT_WR);
      }
      all = all && sent[i] == kBytes;
    }
    return all;
  };
  pump();  // as much as the sockets take before anyone reads
  const std::uint64_t ran_out_before = ctx_->chain().uring()->stats().buffers_ran_out;
  ASSERT_TRUE(run_until([&] {
    pump();
    if (server_.peers.size() < static_cast<std::size_t>(kClients)) return false;
    for (const Peer& p : server_.peers) {
      if (p.eof == 0 && p.errors == 0) return false;
    }
    return true;
  })) << "accepted "
      << server_.peers.size();
  const std::uint64_t ran_out = ctx_->chain().uring()->stats().buffers_ran_out - ran_out_before;
  // Which client each peer is: the first bytes name the stream.
  for (const Peer& p : server_.peers) {
    EXPECT_EQ(p.eof, 1);
    EXPECT_EQ(p.errors, 0);
    ASSERT_EQ(p.got.size(), kBytes);
    bool matched = false;
    for (int i = 0; i < kClients && !matched; ++i) matched = p.got == data[i];
    EXPECT_TRUE(matched) << "a connection's bytes were lost, repeated or reordered";
  }
  if (ran_out == 0) {
    GTEST_SKIP() << "the buffer ring never ran dry here: nothing was lost, but the fault was not "
                    "provoked";
  }
}

}  // namespace
}  // namespace ringpark::test
