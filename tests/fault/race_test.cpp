// Races of a cancel against the completion it tries to stop (more than
// 10,000 per backend), each of which must end with every callback run exactly
// once, nothing lost that the contract keeps, and nothing freed while the
// kernel may still touch it (the suite runs under AddressSanitizer in CI,
// where a completion for freed memory is a crash):
// - 2,500 rp_read_stop calls made in the same turn as bytes arrive for the
//   recv they cancel (before or after the bytes, at random), and 2,500 made
//   from another connection's read callback with the stopped one's completion
//   already queued behind it: every byte is delivered, once, in order, after
//   the next rp_read_start, and no read callback runs while stopped;
// - 2,500 rp_close calls in the same turn as bytes arrive and a write is
//   queued: one close callback, one write callback (0 or UV_ECANCELED), every
//   read buffer handed back, no bytes delivered after the close;
// each of these once with multishot recv and once with the plain recv into a
// lent buffer (on io_uring; the fallback reads the plain way both times);
// - 2,500 timeouts of 0 or of a few microseconds cancelled at once (in the
//   same submission), once in the kernel, or after a turn: one completion
//   each, -ETIME or -ECANCELED;
// - 2,500 rp_poll_stop calls in the same turn as the fd becomes readable: no
//   callback after the stop; then rp_poll_close likewise, one close callback.
// Runs on both backends. Read buffers are malloc'd in alloc_cb and freed in
// read_cb, and counted: a buffer never handed back shows as a count above
// zero (and as a leak under ASan), one handed back twice as a double free.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

using Clock = std::chrono::steady_clock;
using detail::Op;
using detail::OpCode;

constexpr int kPairs = 50;
constexpr int kRounds = 50;  // kPairs * kRounds = 2,500 races of each kind

long g_buffers_out = 0;  // allocated by alloc_cb, not yet handed back to read_cb

// One end of a TCP connection and what its callbacks saw.
struct Side {
  rp_tcp_t h{};
  bool reading = false;  // between rp_read_start and rp_read_stop (as the test called them)
  bool closing = false;  // rp_close was called
  std::string got;
  int eof = 0;
  int errors = 0;
  int closes = 0;
  int reads_while_stopped = 0;   // read callbacks with bytes while stopped
  int reads_after_close = 0;     // read callbacks with bytes after rp_close
  Side* stop_on_read = nullptr;  // a side to rp_read_stop from this side's read callback
  int* stops = nullptr;          // counts those stops
};

struct Pair {
  Side client;
  Side* peer = nullptr;  // the accepted end, one of Races::sides_
  rp_connect_t connect{};
  int connected = 0;  // connect callbacks
  std::string sent;   // by the client, raw, in order
};

void alloc(rp_tcp_t*, size_t suggested, uv_buf_t* buf) {
  *buf = uv_buf_init(static_cast<char*>(std::malloc(suggested)), static_cast<unsigned>(suggested));
  ++g_buffers_out;
}

void on_read(rp_tcp_t* h, ssize_t n, const uv_buf_t* buf) {
  auto* s = static_cast<Side*>(h->data);
  if (n > 0) {
    if (s->closing) {
      ++s->reads_after_close;
    } else if (!s->reading) {
      ++s->reads_while_stopped;
    }
    s->got.append(buf->base, static_cast<std::size_t>(n));
    if (Side* other = s->stop_on_read; other != nullptr && other->reading) {
      other->reading = false;
      EXPECT_EQ(rp_read_stop(&other->h), 0);
      ++*s->stops;
    }
  } else if (n == UV_EOF) {
    ++s->eof;
  } else if (n < 0 && n != UV_ECANCELED) {
    ++s->errors;
  }
  if (buf->base != nullptr) {
    std::free(buf->base);
    --g_buffers_out;
  }
}

void on_side_close(rp_tcp_t* h) { ++static_cast<Side*>(h->data)->closes; }

// The fixture: a loop with a listening rp_tcp_t that accepts into `sides_`.
// `plain_recv`: how rp_tcp_t reads on io_uring: with multishot recv (where
// the kernel has it), or the plain way (RINGPARK_RECV_MULTISHOT=0: a recv
// into alloc_cb's buffer, lent to the kernel). The fallback always reads the
// plain way.
class RaceFixture : public ::testing::Test {
 protected:
  void start(bool plain_recv) {
    g_buffers_out = 0;
    // Read when the loop's ring is set up, at the first ringpark call below.
    if (plain_recv) {
      ::setenv("RINGPARK_RECV_MULTISHOT", "0", 1);
    } else {
      ::unsetenv("RINGPARK_RECV_MULTISHOT");
    }
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(uv_timer_init(&loop_, &tick_), 0);
    uv_timer_start(
        &tick_, [](uv_timer_t*) {}, 5, 5);  // bounds every UV_RUN_ONCE
    server_.data = this;
    ASSERT_EQ(rp_tcp_init(&loop_, &server_), 0);
    sockaddr_in any{};
    uv_ip4_addr("127.0.0.1", 0, &any);
    ASSERT_EQ(rp_tcp_bind(&server_, reinterpret_cast<const sockaddr*>(&any), 0), 0);
    int len = sizeof addr_;
    ASSERT_EQ(rp_tcp_getsockname(&server_, reinterpret_cast<sockaddr*>(&addr_), &len), 0);
    ASSERT_EQ(rp_listen(&server_, 256, &RaceFixture::on_connection), 0);
    started_ = true;
  }

  void TearDown() override {
    if (!started_) return;
    int server_closes = 0;
    server_.data = &server_closes;
    rp_close(&server_, [](rp_tcp_t* h) { ++*static_cast<int*>(h->data); });
    uv_close(reinterpret_cast<uv_handle_t*>(&tick_), nullptr);
    EXPECT_TRUE(run_until([&] { return server_closes == 1; }));
    EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    EXPECT_EQ(g_buffers_out, 0) << "read buffers never handed back";
  }

  template <class Pred>
  bool run_until(Pred pred, std::chrono::seconds limit = std::chrono::seconds(30)) {
    const auto deadline = Clock::now() + limit;
    while (!pred()) {
      if (Clock::now() > deadline) return false;
      rp_uv_run(&loop_, UV_RUN_ONCE);
    }
    return true;
  }

  static void on_connection(rp_tcp_t* server, int status) {
    auto* self = static_cast<RaceFixture*>(server->data);
    ASSERT_EQ(status, 0);
    Side& s = self->sides_.emplace_back();
    s.h.data = &s;
    ASSERT_EQ(rp_tcp_init(&self->loop_, &s.h), 0);
    ASSERT_EQ(rp_accept(server, &s.h), 0);
    // Which pair: the accepted socket's peer port is the client's own port.
    sockaddr_in peer{};
    int len = sizeof peer;
    ASSERT_EQ(rp_tcp_getpeername(&s.h, reinterpret_cast<sockaddr*>(&peer), &len), 0);
    self->unmatched_[ntohs(peer.sin_port)] = &s;
  }

  // `n` connected pairs; nobody reads yet.
  std::vector<Pair*> make_pairs(int n) {
    std::vector<Pair*> made;
    for (int i = 0; i < n; ++i) {
      Pair& p = pairs_.emplace_back();
      p.client.h.data = &p.client;
      EXPECT_EQ(rp_tcp_init(&loop_, &p.client.h), 0);
      p.connect.data = &p;
      EXPECT_EQ(rp_tcp_connect(&p.connect, &p.client.h, reinterpret_cast<const sockaddr*>(&addr_),
                               [](rp_connect_t* c, int status) {
                                 EXPECT_EQ(status, 0);
                                 ++static_cast<Pair*>(c->data)->connected;
                               }),
                0);
      made.push_back(&p);
    }
    EXPECT_TRUE(run_until([&] {
      for (Pair* p : made) {
        if (p->connected == 0) return false;
      }
      return unmatched_.size() >= made.size();
    }));
    for (Pair* p : made) {
      EXPECT_EQ(p->connected, 1);
      sockaddr_in me{};
      int len = sizeof me;
      EXPECT_EQ(rp_tcp_getsockname(&p->client.h, reinterpret_cast<sockaddr*>(&me), &len), 0);
      auto it = unmatched_.find(ntohs(me.sin_port));
      if (it == unmatched_.end()) {
        ADD_FAILURE() << "no accepted connection for a client";
        continue;
      }
      p->peer = it->second;
      unmatched_.erase(it);
    }
    return made;
  }

  // The client's socket, for raw sends: they reach the peer at once (loopback),
  // so its recv completes before the next call of the test returns.
  static int client_fd(Pair* p) {
    uv_os_fd_t fd = -1;
    EXPECT_EQ(rp_fileno(&p->client.h, &fd), 0);
    return fd;
  }
  static bool send_raw(Pair* p, const std::string& bytes) {
    if (::send(client_fd(p), bytes.data(), bytes.size(), MSG_NOSIGNAL) !=
        static_cast<ssize_t>(bytes.size())) {
      return false;
    }
    p->sent += bytes;
    return true;
  }

  // Closes both ends of every pair still open and waits for the callbacks.
  void close_all(const std::vector<Pair*>& pairs) {
    for (Pair* p : pairs) {
      for (Side* s : {&p->client, p->peer}) {
        if (s != nullptr && !s->closing) {
          s->closing = true;
          EXPECT_EQ(rp_close(&s->h, on_side_close), 0);
        }
      }
    }
    EXPECT_TRUE(run_until([&] {
      for (Pair* p : pairs) {
        if (p->client.closes == 0 || (p->peer && p->peer->closes == 0)) return false;
      }
      return true;
    }));
    for (Pair* p : pairs) {
      EXPECT_EQ(p->client.closes, 1);
      if (p->peer) {
        EXPECT_EQ(p->peer->closes, 1);
      }
    }
  }

  uv_loop_t loop_;
  uv_timer_t tick_;
  rp_tcp_t server_{};
  sockaddr_in addr_{};
  std::deque<Pair> pairs_;
  std::deque<Side> sides_;          // accepted ends
  std::map<int, Side*> unmatched_;  // accepted, by the client's port, not yet in a pair
  std::mt19937 rng_{20240611};
  bool started_ = false;
};

// The rp_tcp_t races, once per way of reading.
class Races : public RaceFixture, public ::testing::WithParamInterface<const char*> {
 protected:
  void SetUp() override { start(std::string(GetParam()) == "plain"); }
};

// The races that do not read from sockets.
class LoopRaces : public RaceFixture {
 protected:
  void SetUp() override { start(false); }
};

// A message that says which round sent it, of a random length.
std::string message(int round, std::mt19937& rng) {
  return "<" + std::to_string(round) + ":" +
         std::string(1 + rng() % 3000, static_cast<char>('a' + round % 26)) + ">";
}

TEST_P(Races, ReadStopInTheTurnTheBytesArriveLosesNothing) {
  Watchdog watchdog(std::chrono::seconds(80), "the races");
  std::vector<Pair*> pairs = make_pairs(kPairs);
  for (Pair* p : pairs) {
    p->peer->reading = true;
    ASSERT_EQ(rp_read_start(&p->peer->h, alloc, on_read), 0);
  }
  rp_uv_run(&loop_, UV_RUN_NOWAIT);  // every recv is in flight
  for (int round = 0; round < kRounds; ++round) {
    for (Pair* p : pairs) {
      // The bytes reach the peer's socket inside send(): its recv completes
      // (on io_uring its completion is posted on the way out of the syscall)
      // while the cancel that rp_read_stop asks for is still to be submitted,
      // or the cancel is asked for first and the bytes follow at once.
      const bool stop_first = rng_() & 1;
      if (stop_first) {
        p->peer->reading = false;
        ASSERT_EQ(rp_read_stop(&p->peer->h), 0);
      }
      ASSERT_TRUE(send_raw(p, message(round, rng_)));
      if (!stop_first) {
        p->peer->reading = false;
        ASSERT_EQ(rp_read_stop(&p->peer->h), 0);
      }
    }
    // The cancels and the completions meet in the next turns (0 to 2 of them
    // before reading starts again).
    for (int i = static_cast<int>(rng_() % 3); i > 0; --i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
    for (Pair* p : pairs) {
      p->peer->reading = true;
      ASSERT_EQ(rp_read_start(&p->peer->h, alloc, on_read), 0);
    }
    rp_uv_run(&loop_, UV_RUN_NOWAIT);
  }
  const bool all_in = run_until([&] {
    for (Pair* p : pairs) {
      if (p->peer->got.size() < p->sent.size() || p->peer->errors > 0) return false;
    }
    return true;
  });
  for (Pair* p : pairs) {
    EXPECT_EQ(p->peer->got.size(), p->sent.size());
    EXPECT_TRUE(p->peer->got == p->sent) << "bytes lost, repeated or reordered";
    EXPECT_EQ(p->peer->reads_while_stopped, 0) << "read callbacks while stopped";
    EXPECT_EQ(p->peer->errors, 0);
  }
  EXPECT_TRUE(all_in);
  close_all(pairs);
}

// The stop comes from inside a read callback, for another connection whose
// bytes arrived in the same turn: its completion (the recv done, on the
// fallback; the CQE reaped, on io_uring) is already queued behind the
// callback that stops it.
TEST_P(Races, ReadStopFromAnotherCallbackOfTheSameTurnLosesNothing) {
  Watchdog watchdog(std::chrono::seconds(80), "the races");
  std::vector<Pair*> pairs = make_pairs(kPairs);
  struct CrossStop {
    std::vector<Pair*>* pairs;
    int stops = 0;
  } cross{&pairs};
  // Each peer's read callback stops the next pair's peer (once per round).
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    Side* next = pairs[(i + 1) % pairs.size()]->peer;
    pairs[i]->peer->stop_on_read = next;
    pairs[i]->peer->stops = &cross.stops;
  }
  for (Pair* p : pairs) {
    p->peer->reading = true;
    ASSERT_EQ(rp_read_start(&p->peer->h, alloc, on_read), 0);
  }
  rp_uv_run(&loop_, UV_RUN_NOWAIT);
  for (int round = 0; round < kRounds; ++round) {
    // Bytes for every connection, then the turn that reads them.
    for (Pair* p : pairs) ASSERT_TRUE(send_raw(p, message(round, rng_)));
    rp_uv_run(&loop_, UV_RUN_NOWAIT);
    for (int i = static_cast<int>(rng_() % 3); i > 0; --i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
    for (Pair* p : pairs) {
      if (!p->peer->reading) {
        p->peer->reading = true;
        ASSERT_EQ(rp_read_start(&p->peer->h, alloc, on_read), 0);
      }
    }
  }
  for (Pair* p : pairs) p->peer->stop_on_read = nullptr;
  const bool all_in = run_until([&] {
    for (Pair* p : pairs) {
      if (p->peer->got.size() < p->sent.size() || p->peer->errors > 0) return false;
    }
    return true;
  });
  for (Pair* p : pairs) {
    EXPECT_TRUE(p->peer->got == p->sent)
        << "bytes lost, repeated or reordered: " << p->peer->got.size() << " of " << p->sent.size();
    EXPECT_EQ(p->peer->reads_while_stopped, 0) << "read callbacks while stopped";
    EXPECT_EQ(p->peer->errors, 0);
  }
  EXPECT_TRUE(all_in);
  EXPECT_GT(cross.stops, kRounds) << "too few stops from callbacks: the race was not run";
  close_all(pairs);
}

TEST_P(Races, CloseInTheTurnTheBytesArriveAndAWriteIsQueued) {
  Watchdog watchdog(std::chrono::seconds(80), "the races");
  struct Write {
    rp_write_t req{};
    int calls = 0;
    int status = 1;
  };
  static char reply[1000];
  for (int round = 0; round < kRounds; ++round) {
    std::vector<Pair*> pairs = make_pairs(kPairs);
    for (Pair* p : pairs) {
      p->peer->reading = p->client.reading = true;
      ASSERT_EQ(rp_read_start(&p->peer->h, alloc, on_read), 0);
      ASSERT_EQ(rp_read_start(&p->client.h, alloc, on_read), 0);
    }
    rp_uv_run(&loop_, UV_RUN_NOWAIT);
    std::deque<Write> writes(pairs.size());
    for (std::size_t i = 0; i < pairs.size(); ++i) {
      Pair* p = pairs[i];
      Write& w = writes[i];
      w.req.data = &w;
      uv_buf_t b = uv_buf_init(reply, sizeof reply);
      auto write = [&] {
        ASSERT_EQ(rp_write(&w.req, &p->peer->h, &b, 1,
                           [](rp_write_t* r, int status) {
                             auto* w = static_cast<Write*>(r->data);
                             ++w->calls;
                             w->status = status;
                           }),
                  0);
      };
      auto close = [&] {
        p->peer->closing = true;
        ASSERT_EQ(rp_close(&p->peer->h, on_side_close), 0);
      };
      // The bytes arrive before the write, between the write and the close,
      // or after the close (the socket is still open until the close op).
      switch (rng_() % 3) {
        case 0:
          ASSERT_TRUE(send_raw(p, message(round, rng_)));
          write();
          close();
          break;
        case 1:
          write();
          ASSERT_TRUE(send_raw(p, message(round, rng_)));
          close();
          break;
        default:
          write();
          close();
          ASSERT_TRUE(send_raw(p, message(round, rng_)));
          break;
      }
    }
    close_all(pairs);
    for (std::size_t i = 0; i < pairs.size(); ++i) {
      EXPECT_EQ(writes[i].calls, 1) << "round " << round;
      EXPECT_TRUE(writes[i].status == 0 || writes[i].status == UV_ECANCELED)
          << uv_strerror(writes[i].status);
      EXPECT_EQ(pairs[i]->peer->reads_after_close, 0) << "bytes delivered after rp_close";
    }
    if (::testing::Test::HasFailure()) break;
  }
}

TEST_F(LoopRaces, TimeoutsCancelledAsTheyExpireCompleteOnce) {
  Watchdog watchdog(std::chrono::seconds(80), "the races");
  detail::LoopContext* ctx = detail::LoopContext::get(&loop_);
  ASSERT_NE(ctx, nullptr);
  detail::IoBackend& io = ctx->chain().io();
  struct Timeout {
    Op op;
    int calls = 0;
    int res = 1;
  };
  const std::size_t in_flight_before = io.in_flight();  // the listener's accept
  std::deque<Timeout> timeouts(kPairs * kRounds);
  std::size_t next = 0;
  for (int round = 0; round < kRounds; ++round) {
    // Each timeout is of 0, or of up to 50 us (so that it expires about when
    // the cancel reaches it), and is cancelled at once (in the same
    // submission), once the kernel has it, or after a turn of the loop.
    std::vector<Timeout*> after_flush, after_turn;
    for (int i = 0; i < kPairs; ++i) {
      Timeout& t = timeouts[next++];
      t.op.code = OpCode::timeout;
      t.op.timeout_ns = rng_() % 4 == 0 ? 0 : rng_() % 50'000;
      t.op.data = &t;
      t.op.complete = [](Op* op, int res, std::uint32_t) noexcept {
        auto* t = static_cast<Timeout*>(op->data);
        ++t->calls;
        t->res = res;
      };
      io.submit(&t.op);
      switch (rng_() % 3) {
        case 0:
          io.cancel(&t.op);
          break;
        case 1:
          after_flush.push_back(&t);
          break;
        default:
          after_turn.push_back(&t);
      }
    }
    if (detail::UringDriver* uring = ctx->chain().uring()) uring->flush();
    for (Timeout* t : after_flush) io.cancel(&t->op);
    ctx->update_ref();
    rp_uv_run(&loop_, UV_RUN_NOWAIT);
    for (Timeout* t : after_turn) io.cancel(&t->op);  // a no-op for those already done
    ctx->update_ref();
  }
  ASSERT_TRUE(run_until([&] {
    for (const Timeout& t : timeouts) {
      if (t.calls == 0) return false;
    }
    return true;
  }));
  EXPECT_EQ(io.in_flight(), in_flight_before) << "operations left in flight";
  for (int i = 0; i < 5; ++i) rp_uv_run(&loop_, UV_RUN_NOWAIT);  // anything late would show
  int etime = 0, ecanceled = 0;
  for (const Timeout& t : timeouts) {
    ASSERT_EQ(t.calls, 1);
    ASSERT_TRUE(t.res == -ETIME || t.res == -ECANCELED) << "res " << t.res;
    (t.res == -ETIME ? etime : ecanceled)++;
  }
  RecordProperty("expired", etime);
  RecordProperty("cancelled", ecanceled);
}

struct Watch {
  rp_poll_t h{};
  int fds[2] = {-1, -1};
  bool active = false;
  int calls = 0;
  int calls_while_stopped = 0;
  int closes = 0;
};

void on_watch(rp_poll_t* h, int status, int) {
  auto* w = static_cast<Watch*>(h->data);
  ++w->calls;
  if (!w->active) ++w->calls_while_stopped;
  EXPECT_EQ(status, 0);
  char buf[64];
  while (::read(w->fds[0], buf, sizeof buf) > 0) {
  }
}

TEST_F(LoopRaces, PollStopInTheTurnTheFdBecomesReadable) {
  Watchdog watchdog(std::chrono::seconds(80), "the races");
  std::deque<Watch> watches(kPairs);
  for (Watch& w : watches) {
    ASSERT_EQ(::pipe2(w.fds, O_NONBLOCK | O_CLOEXEC), 0);
    w.h.data = &w;
    ASSERT_EQ(rp_poll_init(&loop_, &w.h, w.fds[0]), 0);
    w.active = true;
    ASSERT_EQ(rp_poll_start(&w.h, UV_READABLE, on_watch), 0);
  }
  rp_uv_run(&loop_, UV_RUN_NOWAIT);  // every poll is armed
  auto drain = [](Watch& w) {
    char buf[64];
    while (::read(w.fds[0], buf, sizeof buf) > 0) {
    }
  };
  for (int round = 0; round < kRounds; ++round) {
    for (Watch& w : watches) {
      const bool stop_first = rng_() & 1;
      if (stop_first) {
        w.active = false;
        ASSERT_EQ(rp_poll_stop(&w.h), 0);
      }
      ASSERT_EQ(::write(w.fds[1], "x", 1), 1);
      if (!stop_first) {
        w.active = false;
        ASSERT_EQ(rp_poll_stop(&w.h), 0);
      }
    }
    for (int i = static_cast<int>(rng_() % 3); i > 0; --i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
    for (Watch& w : watches) {
      drain(w);
      w.active = true;
      ASSERT_EQ(rp_poll_start(&w.h, UV_READABLE, on_watch), 0);
    }
    rp_uv_run(&loop_, UV_RUN_NOWAIT);
  }
  // The last race: readable, and closed in the same breath.
  for (Watch& w : watches) {
    ASSERT_EQ(::write(w.fds[1], "x", 1), 1);
    w.active = false;
    ASSERT_EQ(rp_poll_close(&w.h, [](rp_poll_t* h) { ++static_cast<Watch*>(h->data)->closes; }), 0);
  }
  ASSERT_TRUE(run_until([&] {
    for (const Watch& w : watches) {
      if (w.closes == 0) return false;
    }
    return true;
  }));
  for (int i = 0; i < 5; ++i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
  for (Watch& w : watches) {
    EXPECT_EQ(w.closes, 1);
    EXPECT_EQ(w.calls_while_stopped, 0) << "a callback ran after rp_poll_stop or rp_poll_close";
    ::close(w.fds[0]);
    ::close(w.fds[1]);
  }
}

INSTANTIATE_TEST_SUITE_P(Recv, Races, ::testing::Values("multishot", "plain"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace ringpark::test
