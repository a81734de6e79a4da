// rp_poll_t against uv_poll_t's contract, on real fds (pipes, eventfds, TCP over
// 127.0.0.1). Every test runs under both a stock uv_run and rp_uv_run (the
// value parameter), and, through CTest, on both backends.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ringpark.h"
#include "tests/test_util.hpp"

namespace {

using namespace std::chrono_literals;
using ringpark::test::Watchdog;

enum class Runner { plain_uv_run, rp_uv_run };

std::string runner_name(const ::testing::TestParamInfo<Runner>& info) {
  return info.param == Runner::plain_uv_run ? "PlainUvRun" : "RpUvRun";
}

bool on_io_uring(uv_loop_t* loop) { return std::string(rp_backend(loop)) == "io_uring"; }

// A connected TCP pair over 127.0.0.1 made with plain syscalls.
struct TcpPair {
  int client = -1;
  int server = -1;
  TcpPair() {
    int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listener < 0 || ::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::listen(listener, 1) != 0 ||
        ::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "listen on 127.0.0.1: " << std::strerror(errno);
      if (listener >= 0) ::close(listener);
      return;
    }
    client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
      ADD_FAILURE() << "connect: " << std::strerror(errno);
    server = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (server < 0) ADD_FAILURE() << "accept: " << std::strerror(errno);
    ::close(listener);
  }
  ~TcpPair() {
    if (client >= 0) ::close(client);
    if (server >= 0) ::close(server);
  }
};

struct Pipe {
  int r = -1, w = -1;
  Pipe() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    r = fds[0];
    w = fds[1];
  }
  ~Pipe() {
    if (r >= 0) ::close(r);
    if (w >= 0) ::close(w);
  }
};

// What a poll callback saw, reachable from handle->data.
struct Seen {
  int calls = 0;
  int status = 1;  // of the last call
  int events = 0;  // of the last call
  int all_events = 0;
  int closes = 0;
  // Optional behaviour inside the callback.
  int drain_fd = -1;         // read everything from this fd
  bool stop_in_cb = false;   // rp_poll_stop on the first call
  bool close_in_cb = false;  // rp_poll_close on the first call
};

void record(rp_poll_t* h, int status, int events) {
  auto* s = static_cast<Seen*>(h->data);
  ++s->calls;
  s->status = status;
  s->events = events;
  s->all_events |= events;
  if (s->drain_fd >= 0) {
    char buf[4096];
    while (::read(s->drain_fd, buf, sizeof buf) > 0) {
    }
  }
  if (s->stop_in_cb) {
    EXPECT_EQ(rp_poll_stop(h), 0);
  }
  if (s->close_in_cb) {
    s->close_in_cb = false;
    EXPECT_EQ(rp_poll_close(h, [](rp_poll_t* c) { ++static_cast<Seen*>(c->data)->closes; }), 0);
  }
}

void count_close(rp_poll_t* h) { ++static_cast<Seen*>(h->data)->closes; }

class RpPoll : public ::testing::TestWithParam<Runner> {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }
  void TearDown() override {
    // Every watcher a test made is closed by then; the loop must wind down.
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
  }

  int run(uv_run_mode mode) {
    return GetParam() == Runner::rp_uv_run ? rp_uv_run(&loop_, mode) : uv_run(&loop_, mode);
  }
  // Runs single iterations until `done` holds; false if it did not within 5 s.
  template <typename Pred>
  bool run_until(Pred done) {
    Watchdog dog(10s, "run_until");
    auto start = std::chrono::steady_clock::now();
    while (!done()) {
      if (std::chrono::steady_clock::now() - start > 5s) return false;
      run(UV_RUN_NOWAIT);
    }
    return true;
  }
  // Closes `h` and runs the loop until its close callback ran, once.
  void close_and_wait(rp_poll_t* h, Seen* seen) {
    ASSERT_EQ(rp_poll_close(h, &count_close), 0);
    EXPECT_TRUE(run_until([&] { return seen->closes > 0; }));
    EXPECT_EQ(seen->closes, 1);
  }

  uv_loop_t loop_;
};

TEST_P(RpPoll, ReadableWhenPipeHasData) {
  Pipe p;
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = p.r;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  EXPECT_EQ(h.fd, p.r);
  EXPECT_EQ(h.loop, &loop_);
  // As uv_poll_init: the fd is now non-blocking.
  EXPECT_TRUE(::fcntl(p.r, F_GETFL) & O_NONBLOCK);
  EXPECT_EQ(rp_poll_is_active(&h), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  EXPECT_EQ(rp_poll_is_active(&h), 1);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.status, 0);
  EXPECT_EQ(seen.events, UV_READABLE);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, QuietUntilTheFdBecomesReadable) {
  Pipe p;
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = p.r;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  for (int i = 0; i < 20; ++i)
    EXPECT_NE(run(UV_RUN_NOWAIT), 0) << "an active watcher keeps the loop alive";
  EXPECT_EQ(seen.calls, 0);
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.events, UV_READABLE);
  // Drained: no more calls.
  const int calls = seen.calls;
  for (int i = 0; i < 20; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, calls);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, BlockingRunWakesForReadiness) {
  // The loop sleeps (nothing else to do) and the readiness alone wakes it.
  Pipe p;
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = p.r;
  seen.stop_in_cb = true;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  std::thread writer([&] {
    std::this_thread::sleep_for(50ms);
    ASSERT_EQ(::write(p.w, "x", 1), 1);
  });
  {
    Watchdog dog(10s, "uv_run(DEFAULT) with a watcher");
    // The callback stops the watcher, so the loop then has nothing left.
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  }
  writer.join();
  EXPECT_EQ(seen.calls, 1);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, UndrainedFdIsReportedAgainOnEveryIteration) {
  // Level-triggered, as uv_poll_t: a callback that does not read is called
  // again on the next iteration, for as long as the data stays.
  Pipe p;
  ASSERT_EQ(::write(p.w, "abc", 3), 3);
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  const int first = seen.calls;
  {
    Watchdog dog(10s, "uv_run(ONCE) with an undrained watcher");
    // ONCE may block, but must not: the fd is still readable.
    for (int i = 0; i < 10; ++i) EXPECT_NE(run(UV_RUN_ONCE), 0);
  }
  EXPECT_GE(seen.calls - first, 10);
  EXPECT_LE(seen.calls - first, 20) << "at most about one call per iteration";
  EXPECT_EQ(seen.events, UV_READABLE);
  // Drained now: the calls stop, and the multishot still reports new data.
  char buf[8];
  ASSERT_EQ(::read(p.r, buf, sizeof buf), 3);
  run(UV_RUN_NOWAIT);
  run(UV_RUN_NOWAIT);
  const int after_drain = seen.calls;
  for (int i = 0; i < 10; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, after_drain);
  ASSERT_EQ(::write(p.w, "d", 1), 1);
  ASSERT_TRUE(run_until([&] { return seen.calls > after_drain; }));
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, PartialReadsAreReportedUntilDrained) {
  // The callback reads one byte per call: a 100-byte pipe takes 100 calls.
  Pipe p;
  std::string data(100, 'z');
  ASSERT_EQ(::write(p.w, data.data(), data.size()), 100);
  struct State {
    int fd;
    int got = 0;
    int calls = 0;
  } st{p.r};
  rp_poll_t h;
  h.data = &st;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE,
                          [](rp_poll_t* h, int status, int) {
                            auto* s = static_cast<State*>(h->data);
                            ASSERT_EQ(status, 0);
                            ++s->calls;
                            char c;
                            if (::read(s->fd, &c, 1) == 1) ++s->got;
                          }),
            0);
  ASSERT_TRUE(run_until([&] { return st.got == 100; }));
  for (int i = 0; i < 5; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(st.got, 100);
  EXPECT_LE(st.calls, 110);
  EXPECT_EQ(rp_poll_close(&h, nullptr), 0);
  EXPECT_EQ(run(UV_RUN_DEFAULT), 0);  // h must stay valid until then
}

TEST_P(RpPoll, EventfdReadable) {
  int efd = ::eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(efd, 0);
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = efd;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, efd), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, 0);
  std::uint64_t one = 1;
  ASSERT_EQ(::write(efd, &one, sizeof one), 8);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.events, UV_READABLE);
  close_and_wait(&h, &seen);
  ::close(efd);
}

TEST_P(RpPoll, SocketIsWritable) {
  TcpPair tcp;
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, tcp.client), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_WRITABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.status, 0);
  EXPECT_EQ(seen.events, UV_WRITABLE);
  // Level: still writable, so called again.
  const int calls = seen.calls;
  ASSERT_TRUE(run_until([&] { return seen.calls > calls + 3; }));
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, DisconnectWhenThePeerCloses) {
  TcpPair tcp;
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  seen.stop_in_cb = true;
  ASSERT_EQ(rp_poll_init(&loop_, &h, tcp.server), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE | UV_DISCONNECT, &record), 0);
  run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, 0);
  ::close(tcp.client);
  tcp.client = -1;
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.status, 0);
  EXPECT_TRUE(seen.events & UV_DISCONNECT) << seen.events;
  EXPECT_TRUE(seen.events & UV_READABLE) << seen.events;  // the EOF is readable
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, OnlyTheWatchedEventsAreReported) {
  // The peer closed and the socket is writable, but only DISCONNECT is watched.
  TcpPair tcp;
  ::close(tcp.client);
  tcp.client = -1;
  rp_poll_t h;
  Seen seen;
  seen.stop_in_cb = true;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, tcp.server), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_DISCONNECT, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.events, UV_DISCONNECT);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, ErrorOnTheSocketReportsEbadfAndStops) {
  // A connection refused on loopback: POLLERR, which uv_poll_t reports as
  // UV_EBADF and then stops the handle.
  int probe = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(probe, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::getsockname(probe, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ::close(probe);  // the port is now (almost certainly) closed
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int rc = ::connect(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ASSERT_TRUE(rc == 0 || errno == EINPROGRESS || errno == ECONNREFUSED);
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, s), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE | UV_WRITABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.status, UV_EBADF);
  EXPECT_EQ(seen.events, 0);
  EXPECT_EQ(rp_poll_is_active(&h), 0);
  const int calls = seen.calls;
  for (int i = 0; i < 5; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, calls);
  close_and_wait(&h, &seen);
  ::close(s);
}

TEST_P(RpPoll, StopSilencesAPendingEventAndStartResumes) {
  Pipe p;
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  // Reported once and still readable; a stop is effective at once.
  ASSERT_EQ(rp_poll_stop(&h), 0);
  EXPECT_EQ(rp_poll_is_active(&h), 0);
  const int calls = seen.calls;
  {
    Watchdog dog(10s, "uv_run(DEFAULT) after stop");
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0) << "a stopped watcher does not keep the loop alive";
  }
  EXPECT_EQ(seen.calls, calls);
  // Started again, the still-pending data is reported.
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > calls; }));
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, FdClosedRightAfterStopAndItsNumberReused) {
  // uv_poll_t's docs: the fd may be closed right after uv_poll_stop. The next
  // fd with the same number must be watchable, and the old watcher silent.
  auto old_pipe = std::make_unique<Pipe>();
  const int old_fd = old_pipe->r;
  rp_poll_t old_h, new_h;
  Seen old_seen, new_seen;
  old_h.data = &old_seen;
  new_h.data = &new_seen;
  new_seen.drain_fd = -1;
  ASSERT_EQ(rp_poll_init(&loop_, &old_h, old_fd), 0);
  ASSERT_EQ(rp_poll_start(&old_h, UV_READABLE, &record), 0);
  run(UV_RUN_NOWAIT);  // the poll is in the kernel now
  ASSERT_EQ(rp_poll_stop(&old_h), 0);
  old_pipe.reset();  // both ends closed
  Pipe reused;
  if (reused.r != old_fd) GTEST_SKIP() << "the fd number was not reused";
  new_seen.drain_fd = reused.r;
  ASSERT_EQ(rp_poll_init(&loop_, &new_h, reused.r), 0);
  ASSERT_EQ(rp_poll_start(&new_h, UV_READABLE, &record), 0);
  for (int i = 0; i < 3; ++i) run(UV_RUN_NOWAIT);
  ASSERT_EQ(::write(reused.w, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return new_seen.calls > 0; }));
  EXPECT_EQ(new_seen.events, UV_READABLE);
  EXPECT_EQ(old_seen.calls, 0);
  close_and_wait(&new_h, &new_seen);
  close_and_wait(&old_h, &old_seen);
}

TEST_P(RpPoll, TwoWatchersOnOneFdBothReport) {
  // uv_poll_init refuses a second handle for an fd (UV_EEXIST); the ring has
  // no such limit, and each watcher gets its own callbacks.
  int efd = ::eventfd(1, EFD_CLOEXEC);
  ASSERT_GE(efd, 0);
  rp_poll_t a, b;
  Seen sa, sb;
  sa.stop_in_cb = sb.stop_in_cb = true;
  a.data = &sa;
  b.data = &sb;
  ASSERT_EQ(rp_poll_init(&loop_, &a, efd), 0);
  ASSERT_EQ(rp_poll_init(&loop_, &b, efd), 0);
  ASSERT_EQ(rp_poll_start(&a, UV_READABLE, &record), 0);
  ASSERT_EQ(rp_poll_start(&b, UV_READABLE | UV_WRITABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return sa.calls > 0 && sb.calls > 0; }));
  EXPECT_EQ(sa.events, UV_READABLE);
  EXPECT_EQ(sb.events, UV_READABLE | UV_WRITABLE);
  close_and_wait(&a, &sa);
  close_and_wait(&b, &sb);
  ::close(efd);
}

TEST_P(RpPoll, StopAndStartManyTimesInOneTurn) {
  // Each start after a stop needs a new poll while the old one's cancel is in
  // flight: more restarts than the watcher has ops must still end in exactly
  // one armed poll.
  Pipe p;
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = p.r;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  for (int round = 0; round < 3; ++round) {
    for (int i = 0; i < 5; ++i) {
      ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
      ASSERT_EQ(rp_poll_stop(&h), 0);
    }
    ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
    const int calls = seen.calls;
    for (int i = 0; i < 5; ++i) run(UV_RUN_NOWAIT);
    EXPECT_EQ(seen.calls, calls);
    ASSERT_EQ(::write(p.w, "x", 1), 1);
    ASSERT_TRUE(run_until([&] { return seen.calls > calls; }));
  }
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, StartOnAnActiveHandleChangesTheMask) {
  TcpPair tcp;
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, tcp.server), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  for (int i = 0; i < 5; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, 0) << "nothing to read yet";
  ASSERT_EQ(rp_poll_start(&h, UV_WRITABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; }));
  EXPECT_EQ(seen.events, UV_WRITABLE);
  // Back to READABLE: writability is no longer reported...
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  run(UV_RUN_NOWAIT);
  run(UV_RUN_NOWAIT);
  seen.all_events = 0;
  const int calls = seen.calls;
  for (int i = 0; i < 5; ++i) run(UV_RUN_NOWAIT);
  EXPECT_EQ(seen.calls, calls);
  // ...and data is.
  ASSERT_EQ(::write(tcp.client, "hi", 2), 2);
  ASSERT_TRUE(run_until([&] { return seen.calls > calls; }));
  EXPECT_EQ(seen.all_events, UV_READABLE);
  // The same mask again only changes the callback.
  seen.drain_fd = tcp.server;
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  EXPECT_EQ(rp_poll_is_active(&h), 1);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, StartWithNoEventsStops) {
  Pipe p;
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  ASSERT_EQ(rp_poll_start(&h, 0, nullptr), 0);
  EXPECT_EQ(rp_poll_is_active(&h), 0);
  EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  EXPECT_EQ(seen.calls, 0);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, StopInsideTheCallback) {
  Pipe p;
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  rp_poll_t h;
  Seen seen;
  seen.stop_in_cb = true;  // and never drains
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  {
    Watchdog dog(10s, "uv_run(DEFAULT)");
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  }
  EXPECT_EQ(seen.calls, 1);
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, CloseWhileActiveRunsTheCloseCallbackOnce) {
  Pipe p;
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  run(UV_RUN_NOWAIT);                  // the poll is in the kernel now
  ASSERT_EQ(::write(p.w, "x", 1), 1);  // a CQE may be on its way
  ASSERT_EQ(rp_poll_close(&h, &count_close), 0);
  EXPECT_EQ(rp_poll_close(&h, &count_close), UV_EINVAL) << "already closing";
  EXPECT_EQ(rp_poll_start(&h, UV_READABLE, &record), UV_EINVAL) << "closing";
  EXPECT_EQ(seen.closes, 0) << "never inside rp_poll_close";
  {
    Watchdog dog(10s, "uv_run(DEFAULT) after close");
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  }
  EXPECT_EQ(seen.closes, 1);
  EXPECT_EQ(seen.calls, 0);
  EXPECT_EQ(h.impl_, nullptr);
}

TEST_P(RpPoll, CloseInsideTheCallback) {
  Pipe p;
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  auto h = std::make_unique<rp_poll_t>();
  Seen seen;
  seen.close_in_cb = true;
  h->data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, h.get(), p.r), 0);
  ASSERT_EQ(rp_poll_start(h.get(), UV_READABLE, &record), 0);
  {
    Watchdog dog(10s, "uv_run(DEFAULT)");
    EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  }
  EXPECT_EQ(seen.calls, 1);
  EXPECT_EQ(seen.closes, 1);
  h.reset();  // the memory is the user's again: ASan would see a later use
  for (int i = 0; i < 3; ++i) run(UV_RUN_NOWAIT);
}

TEST_P(RpPoll, CloseANeverStartedHandle) {
  Pipe p;
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  ASSERT_EQ(rp_poll_close(&h, &count_close), 0);
  EXPECT_EQ(seen.closes, 0);
  EXPECT_EQ(run(UV_RUN_DEFAULT), 0);
  EXPECT_EQ(seen.closes, 1);
}

TEST_P(RpPoll, RegularFileIsAlwaysReady) {
  // A documented difference: uv_poll_init says UV_EPERM; poll(2) and the ring
  // call a file without a poll method always ready.
  char path[] = "/tmp/ringpark-poll-XXXXXX";
  int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  ::unlink(path);
  rp_poll_t h;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, fd), 0);
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE | UV_WRITABLE, &record), 0);
  ASSERT_TRUE(run_until([&] { return seen.calls > 2; }));
  EXPECT_EQ(seen.events, UV_READABLE | UV_WRITABLE);
  close_and_wait(&h, &seen);
  ::close(fd);
}

TEST_P(RpPoll, BadInput) {
  rp_poll_t h;
  EXPECT_EQ(rp_poll_init(nullptr, &h, 0), UV_EINVAL);
  EXPECT_EQ(rp_poll_init(&loop_, nullptr, 0), UV_EINVAL);
  EXPECT_EQ(rp_poll_init(&loop_, &h, -1), UV_EBADF);
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ::close(fds[0]);
  ::close(fds[1]);
  EXPECT_EQ(rp_poll_init(&loop_, &h, fds[0]), UV_EBADF) << "a closed fd";
  EXPECT_EQ(rp_poll_start(nullptr, UV_READABLE, &record), UV_EINVAL);
  EXPECT_EQ(rp_poll_stop(nullptr), UV_EINVAL);
  EXPECT_EQ(rp_poll_close(nullptr, nullptr), UV_EINVAL);
  EXPECT_EQ(rp_poll_is_active(nullptr), 0);

  Pipe p;
  Seen seen;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  EXPECT_EQ(rp_poll_start(&h, 0x100, &record), UV_EINVAL) << "unknown event bit";
  EXPECT_EQ(rp_poll_start(&h, UV_READABLE, nullptr), UV_EINVAL) << "no callback";
  EXPECT_EQ(rp_poll_is_active(&h), 0) << "a refused start changes nothing";
  close_and_wait(&h, &seen);
  EXPECT_EQ(rp_poll_start(&h, UV_READABLE, &record), UV_EINVAL) << "closed";
}

// rp_poll_init on a handle that is open on the loop is refused, before it
// changes anything: the watcher keeps working, and it is counted once, so that
// after its one close the loop closes (before the fix the second init leaked
// the first watcher, and rp_loop_close answered UV_EBUSY for ever).
TEST_P(RpPoll, InitAgainOnALiveHandleIsRefused) {
  Pipe p, q;
  rp_poll_t h;
  Seen seen;
  seen.drain_fd = p.r;
  h.data = &seen;
  ASSERT_EQ(rp_poll_init(&loop_, &h, p.r), 0);
  EXPECT_EQ(rp_poll_init(&loop_, &h, p.r), UV_EBUSY) << "initialised, not started";
  ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  EXPECT_EQ(rp_poll_init(&loop_, &h, p.r), UV_EBUSY) << "started";
  EXPECT_EQ(rp_poll_init(&loop_, &h, q.r), UV_EBUSY) << "started, another fd";
  EXPECT_FALSE(::fcntl(q.r, F_GETFL) & O_NONBLOCK) << "a refused init changes nothing";
  EXPECT_EQ(h.fd, p.r);
  EXPECT_EQ(rp_poll_is_active(&h), 1);
  ASSERT_EQ(::write(p.w, "x", 1), 1);
  ASSERT_TRUE(run_until([&] { return seen.calls > 0; })) << "the watcher still works";
  EXPECT_EQ(seen.status, 0);
  ASSERT_EQ(rp_poll_close(&h, &count_close), 0);
  EXPECT_EQ(rp_poll_init(&loop_, &h, p.r), UV_EBUSY) << "closing: open until its close callback";
  EXPECT_TRUE(run_until([&] { return seen.closes > 0; }));
  EXPECT_EQ(seen.closes, 1);
  // From its close callback on, the memory is the program's again.
  ASSERT_EQ(rp_poll_init(&loop_, &h, q.r), 0);
  seen.closes = 0;
  close_and_wait(&h, &seen);
}

TEST_P(RpPoll, RandomStartStopCloseSequencesKeepTheContract) {
  // Seeded, bounded churn: starts with random masks, stops, closes and
  // re-inits, writes and drains, mixed with loop iterations. Checked: no
  // callback for a stopped or closed watcher, only watched events reported,
  // exactly one close callback per close. ASan checks the op memory.
  constexpr int kWatchers = 16;
  struct Slot {
    rp_poll_t h;
    int efd = -1;
    bool open = false;
    bool active = false;
    int mask = 0;
    int calls = 0;
    int closes = 0;
    int closes_expected = 0;
    int bad = 0;
  };
  std::vector<Slot> all(kWatchers);
  auto cb = [](rp_poll_t* h, int status, int events) {
    Slot* s = static_cast<Slot*>(h->data);
    ++s->calls;
    if (!s->open || !s->active) ++s->bad;
    if (status == 0 && (events & ~s->mask) != 0) ++s->bad;
    if (status != 0) s->active = false;  // stopped by the error
    if (events & UV_READABLE) {
      std::uint64_t v;
      (void)!::read(s->efd, &v, sizeof v);
    }
  };
  auto on_close = [](rp_poll_t* h) { ++static_cast<Slot*>(h->data)->closes; };
  for (Slot& s : all) {
    s.efd = ::eventfd(0, EFD_CLOEXEC);
    ASSERT_GE(s.efd, 0);
  }
  std::mt19937 rng(12345);
  Watchdog dog(30s, "random churn");
  for (int step = 0; step < 3000; ++step) {
    Slot& s = all[rng() % kWatchers];
    switch (rng() % 7) {
      case 0:
        if (!s.open) {
          s.h.data = &s;
          ASSERT_EQ(rp_poll_init(&loop_, &s.h, s.efd), 0);
          s.open = true;
        }
        break;
      case 1:
      case 2:
        if (s.open) {
          const int masks[] = {UV_READABLE, UV_WRITABLE, UV_READABLE | UV_WRITABLE,
                               UV_READABLE | UV_DISCONNECT};
          s.mask = masks[rng() % 4];
          ASSERT_EQ(rp_poll_start(&s.h, s.mask, cb), 0);
          s.active = true;
        }
        break;
      case 3:
        if (s.open) {
          ASSERT_EQ(rp_poll_stop(&s.h), 0);
          s.active = false;
        }
        break;
      case 4:
        if (s.open) {
          ASSERT_EQ(rp_poll_close(&s.h, on_close), 0);
          s.open = s.active = false;
          ++s.closes_expected;
          // The handle must stay untouched until its close callback.
          ASSERT_TRUE(run_until([&] { return s.closes == s.closes_expected; }));
        }
        break;
      case 5: {
        std::uint64_t one = 1;
        ASSERT_EQ(::write(s.efd, &one, sizeof one), 8);
        break;
      }
      case 6:
        run(UV_RUN_NOWAIT);
        break;
    }
  }
  for (Slot& s : all) {
    if (s.open) {
      ASSERT_EQ(rp_poll_close(&s.h, on_close), 0);
      s.open = s.active = false;
      ++s.closes_expected;
    }
  }
  ASSERT_TRUE(run_until([&] {
    for (const Slot& s : all)
      if (s.closes != s.closes_expected) return false;
    return true;
  }));
  int calls = 0;
  for (const Slot& s : all) {
    EXPECT_EQ(s.bad, 0);
    EXPECT_EQ(s.closes, s.closes_expected);
    calls += s.calls;
    ::close(s.efd);
  }
  EXPECT_GT(calls, 0);
}

TEST_P(RpPoll, ThousandWatchersStartedInOneTurnCostOneEnter) {
  constexpr int kWatchers = 1000;
  rlimit lim{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &lim), 0);
  if (lim.rlim_cur < kWatchers + 200) {
    lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, kWatchers + 200);
    ::setrlimit(RLIMIT_NOFILE, &lim);
    if (lim.rlim_cur < kWatchers + 200) GTEST_SKIP() << "RLIMIT_NOFILE too low for 1,000 fds";
  }
  std::vector<int> efds(kWatchers);
  for (int& fd : efds) {
    fd = ::eventfd(0, EFD_CLOEXEC);
    ASSERT_GE(fd, 0);
  }
  std::vector<rp_poll_t> handles(kWatchers);
  std::vector<Seen> seen(kWatchers);
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  run(UV_RUN_NOWAIT);  // whatever the loop's own set-up submits, out of the way
  for (int i = 0; i < kWatchers; ++i) {
    handles[i].data = &seen[i];
    seen[i].drain_fd = efds[i];
    ASSERT_EQ(rp_poll_init(&loop_, &handles[i], efds[i]), 0);
  }
  rp_stats_t before, after;
  ASSERT_EQ(rp_stats(&loop_, &before), 0);
  for (auto& h : handles) ASSERT_EQ(rp_poll_start(&h, UV_READABLE, &record), 0);
  EXPECT_NE(run(UV_RUN_NOWAIT), 0);
  ASSERT_EQ(rp_stats(&loop_, &after), 0);
  if (on_io_uring(&loop_)) {
    EXPECT_EQ(after.enters - before.enters, 1u);
    EXPECT_GE(after.sqes_submitted - before.sqes_submitted, static_cast<std::uint64_t>(kWatchers));
  } else {
    std::printf("note: backend is %s, not io_uring: the one-enter claim is not checked\n",
                rp_backend(&loop_));
  }
  // All of them work.
  std::uint64_t one = 1;
  for (int fd : efds) ASSERT_EQ(::write(fd, &one, sizeof one), 8);
  ASSERT_TRUE(run_until([&] {
    for (const Seen& s : seen)
      if (s.calls == 0) return false;
    return true;
  }));
  for (auto& h : handles) ASSERT_EQ(rp_poll_close(&h, &count_close), 0);
  ASSERT_TRUE(run_until([&] {
    for (const Seen& s : seen)
      if (s.closes == 0) return false;
    return true;
  }));
  for (const Seen& s : seen) EXPECT_EQ(s.closes, 1);
  for (int fd : efds) ::close(fd);
}

INSTANTIATE_TEST_SUITE_P(Runners, RpPoll,
                         ::testing::Values(Runner::plain_uv_run, Runner::rp_uv_run), runner_name);

}  // namespace
