// A 1 ms SIGALRM storm (setitimer), with and without SA_RESTART, aimed at the
// loop thread while it sleeps (in the ring, in libuv's epoll_wait, or in the
// fallback's): every wait ends in EINTR about once a millisecond. The Park
// contract treats EINTR as a spurious wake, so:
// - no wake-up is lost: a uv_async_send from another thread, bytes arriving on
//   an rp_tcp_t socket, a pipe read through rp_fs_read, a post() to the C++
//   Runtime, each arrives (every one is waited for, one at a time, and none may
//   take 2 s);
// - deadlines are met: a 200 ms libuv timer and a 50 ms sleep_for fire within
//   10% + 2 ms of their due time, neither early nor a signal period late (a
//   wait that restarted its whole timeout after each EINTR would never fire).
// The wake-up tests start no timer of their own, so nothing but the event
// itself (and the storm) ends the loop's sleep. The test's helper threads
// block SIGALRM, so the storm hits the loop thread (each test checks that it
// did) and the thread pools (libuv's, on the fallback), which inherit its
// mask, the way a program's signals reach them.
// Runs on both backends.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ringpark.h"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// ---- The storm -----------------------------------------------------------------

std::atomic<pid_t> g_target_tid{0};
std::atomic<std::uint64_t> g_hits{0};  // signals taken by the target thread

void on_alarm(int) {
  const int saved = errno;
  if (static_cast<pid_t>(::syscall(SYS_gettid)) == g_target_tid.load(std::memory_order_relaxed)) {
    g_hits.fetch_add(1, std::memory_order_relaxed);
  }
  errno = saved;
}

// SIGALRM every millisecond while it lives, handled with or without
// SA_RESTART, aimed at the thread that made it.
class Storm {
 public:
  explicit Storm(bool restart) {
    g_target_tid = static_cast<pid_t>(::syscall(SYS_gettid));
    g_hits = 0;
    struct sigaction sa {};
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = restart ? SA_RESTART : 0;
    EXPECT_EQ(::sigaction(SIGALRM, &sa, &old_), 0);
    started_ = Clock::now();
    itimerval every_ms{{0, 1000}, {0, 1000}};
    EXPECT_EQ(::setitimer(ITIMER_REAL, &every_ms, nullptr), 0);
  }
  ~Storm() {
    itimerval off{};
    ::setitimer(ITIMER_REAL, &off, nullptr);
    ::sigaction(SIGALRM, &old_, nullptr);
  }
  Storm(const Storm&) = delete;
  Storm& operator=(const Storm&) = delete;

  // Signals the loop thread took since the storm began.
  static std::uint64_t hits() { return g_hits.load(); }
  // Whether the loop thread took at least one signal per 4 ms of the storm
  // so far (the kernel merges signals that arrive while one is pending, and a
  // loaded machine delivers fewer than one per millisecond).
  ::testing::AssertionResult reached_the_loop_thread() const {
    const auto ms = std::chrono::duration_cast<milliseconds>(Clock::now() - started_).count();
    const std::uint64_t n = hits();
    if (n >= 10 && static_cast<std::int64_t>(n) * 4 >= ms) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure()
           << "the storm reached the loop thread " << n << " times in " << ms << " ms";
  }

 private:
  struct sigaction old_ {};
  Clock::time_point started_;
};

// Blocks SIGALRM in this thread while it lives: threads started meanwhile
// inherit the mask and never take the storm's signals.
class AlarmBlocked {
 public:
  AlarmBlocked() {
    sigset_t alarm;
    sigemptyset(&alarm);
    sigaddset(&alarm, SIGALRM);
    ::pthread_sigmask(SIG_BLOCK, &alarm, &old_);
  }
  ~AlarmBlocked() { ::pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

 private:
  sigset_t old_;
};

// A helper thread that never takes SIGALRM.
std::thread quiet_thread(std::function<void()> fn) {
  AlarmBlocked blocked;
  return std::thread(std::move(fn));
}

// A watchdog whose thread never takes SIGALRM.
std::unique_ptr<Watchdog> quiet_watchdog(int seconds, const char* what) {
  AlarmBlocked blocked;
  return std::make_unique<Watchdog>(std::chrono::seconds(seconds), what);
}

// Waits until `done` holds, at most `limit`; for the helper threads.
template <class Pred>
bool wait_for(Pred done, milliseconds limit = milliseconds(2000)) {
  const auto deadline = Clock::now() + limit;
  while (!done()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

milliseconds bound(milliseconds period) { return period + period / 10 + milliseconds(2); }

class SignalStorm : public ::testing::TestWithParam<bool> {
 protected:
  bool restart() const { return GetParam(); }
};

// ---- libuv and rp_* under rp_uv_run ---------------------------------------------

struct Sock {
  rp_tcp_t server{}, conn{};
  std::atomic<std::size_t> received{0};  // written on the loop thread only
  int closes = 0;
};

void sock_alloc(rp_tcp_t*, size_t n, uv_buf_t* b) {
  *b = uv_buf_init(static_cast<char*>(std::malloc(n)), static_cast<unsigned>(n));
}
void sock_read(rp_tcp_t* h, ssize_t n, const uv_buf_t* b) {
  auto* s = static_cast<Sock*>(h->data);
  if (n > 0) s->received.fetch_add(static_cast<std::size_t>(n));
  std::free(b->base);
}

// An accepted rp_tcp_t that reads whatever `client` (a plain blocking socket)
// sends. Keeps a read in flight, so the loop sleeps in the ring (io_uring).
class Connected {
 public:
  explicit Connected(uv_loop_t* loop) : loop_(loop) {
    s_.server.data = s_.conn.data = &s_;
    EXPECT_EQ(rp_tcp_init(loop, &s_.server), 0);
    EXPECT_EQ(rp_tcp_init(loop, &s_.conn), 0);
    sockaddr_in addr{};
    uv_ip4_addr("127.0.0.1", 0, &addr);
    EXPECT_EQ(rp_tcp_bind(&s_.server, reinterpret_cast<const sockaddr*>(&addr), 0), 0);
    int len = sizeof addr;
    EXPECT_EQ(rp_tcp_getsockname(&s_.server, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    EXPECT_EQ(rp_listen(&s_.server, 4,
                        [](rp_tcp_t* srv, int status) {
                          auto* s = static_cast<Sock*>(srv->data);
                          if (status == 0 && rp_accept(srv, &s->conn) == 0) {
                            rp_read_start(&s->conn, sock_alloc, sock_read);
                          }
                        }),
              0);
    client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_EQ(::connect(client, reinterpret_cast<const sockaddr*>(&addr), sizeof addr), 0);
    int fd = -1;
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    while (rp_fileno(&s_.conn, &fd) != 0 && Clock::now() < deadline) {
      rp_uv_run(loop, UV_RUN_NOWAIT);
    }
    EXPECT_GE(fd, 0) << "the connection was not accepted";
  }
  // Closes both handles; the loop runs their close callbacks.
  void close() {
    auto on_close = [](rp_tcp_t* h) { ++static_cast<Sock*>(h->data)->closes; };
    rp_close(&s_.server, on_close);
    rp_close(&s_.conn, on_close);
    ::close(client);
  }
  bool closed() const { return s_.closes == 2; }
  std::size_t received() const { return s_.received.load(); }

  int client = -1;

 private:
  uv_loop_t* loop_;
  Sock s_;
};

struct TimerLog {
  std::vector<Clock::time_point> fired;
  std::size_t want = 4;
};

TEST_P(SignalStorm, LibuvTimerIsOnTimeWhileTheLoopSleepsWithAReadInFlight) {
  auto watchdog = quiet_watchdog(30, "the loop");
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  Connected c(&loop);  // a read in flight: on io_uring the loop sleeps in the ring

  Storm storm(restart());
  uv_timer_t timer;
  TimerLog log;
  uv_timer_init(&loop, &timer);
  timer.data = &log;
  uv_update_time(&loop);
  const Clock::time_point started = Clock::now();
  uv_timer_start(
      &timer,
      [](uv_timer_t* t) {
        auto* l = static_cast<TimerLog*>(t->data);
        l->fired.push_back(Clock::now());
        if (l->fired.size() == l->want) uv_stop(t->loop);
      },
      200, 200);
  rp_uv_run(&loop, UV_RUN_DEFAULT);  // until uv_stop from the 4th firing
  EXPECT_TRUE(storm.reached_the_loop_thread());
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), nullptr);

  ASSERT_EQ(log.fired.size(), log.want);
  Clock::time_point previous = started;
  for (std::size_t i = 0; i < log.fired.size(); ++i) {
    const auto gap = std::chrono::duration_cast<milliseconds>(log.fired[i] - previous);
    EXPECT_GE(log.fired[i] - previous, milliseconds(199)) << "firing " << i << " came early";
    EXPECT_LE(log.fired[i] - previous, bound(milliseconds(200)))
        << "firing " << i << " came " << gap.count() << " ms after the previous one";
    previous = log.fired[i];
  }

  c.close();
  while (!c.closed()) rp_uv_run(&loop, UV_RUN_ONCE);
  EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_loop_close(&loop), 0);
}

// The wake-up sources of one test, each driven by its own quiet thread that
// waits for each event to arrive before it sends the next.
struct Wakeups {
  static constexpr int kAsyncs = 100;
  static constexpr int kWrites = 100;
  static constexpr int kPipeReads = 50;

  uv_async_t async;
  std::atomic<int> asyncs_seen{0};
  uv_fs_t read_req;
  char byte = 0;
  int pipe_fds[2] = {-1, -1};
  std::atomic<int> pipe_reads{0};
  int pipe_errors = 0;
  ssize_t pipe_error = 0;  // the last result that was neither a byte nor an allowed EINTR
  int pipe_eintr = 0;
  bool uring = false;  // the loop runs on io_uring
  std::atomic<bool> lost{false};
  std::string what_lost;  // set by the thread that saw it, read after join
};

// Keeps one rp_fs_read of the pipe in flight until kPipeReads bytes came.
// On io_uring the kernel does the read and no signal interrupts it. On the
// fallback it is libuv's uv_fs_read on libuv's thread pool, whose threads take
// the storm's signals too; libuv does not retry an interrupted read (it
// retries other calls), so without SA_RESTART the read may complete with
// UV_EINTR, as it would in a plain libuv program: that is read again.
void start_pipe_read(uv_loop_t* loop, Wakeups* w) {
  uv_buf_t b = uv_buf_init(&w->byte, 1);
  w->read_req.data = w;
  int r = rp_fs_read(loop, &w->read_req, w->pipe_fds[0], &b, 1, -1, [](uv_fs_t* req) {
    auto* w = static_cast<Wakeups*>(req->data);
    uv_loop_t* loop = req->loop;
    const ssize_t result = req->result;
    uv_fs_req_cleanup(req);
    if (result == UV_EINTR && !w->uring) {
      ++w->pipe_eintr;
      return start_pipe_read(loop, w);
    }
    if (result != 1) {
      ++w->pipe_errors;
      w->pipe_error = result;
      return;
    }
    if (w->pipe_reads.fetch_add(1) + 1 < Wakeups::kPipeReads) start_pipe_read(loop, w);
  });
  EXPECT_EQ(r, 0);
}

TEST_P(SignalStorm, NoWakeUpIsLost) {
  auto watchdog = quiet_watchdog(60, "the loop");
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  Connected c(&loop);
  Wakeups w;
  ASSERT_EQ(::pipe2(w.pipe_fds, O_CLOEXEC), 0);
  ASSERT_EQ(uv_async_init(&loop, &w.async,
                          [](uv_async_t* a) { static_cast<Wakeups*>(a->data)->asyncs_seen++; }),
            0);
  w.async.data = &w;
  w.uring = std::string(rp_backend(&loop)) == "io_uring";
  start_pipe_read(&loop, &w);

  std::atomic<int> threads_done{0};
  auto lose = [&w](const std::string& what) {
    if (!w.lost.exchange(true)) w.what_lost = what;
  };
  std::vector<std::thread> threads;
  Storm storm(restart());
  threads.push_back(quiet_thread([&] {
    std::mt19937 rng(1);
    for (int i = 0; i < Wakeups::kAsyncs && !w.lost; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      uv_async_send(&w.async);
      if (!wait_for([&] { return w.asyncs_seen.load() > i; }))
        lose("uv_async_send " + std::to_string(i));
    }
    threads_done++;
    uv_async_send(&w.async);
  }));
  threads.push_back(quiet_thread([&] {
    std::mt19937 rng(2);
    std::size_t total = 0;
    std::string chunk(4096, 'x');
    for (int i = 0; i < Wakeups::kWrites && !w.lost; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      const std::size_t n = 1 + rng() % chunk.size();
      if (::send(c.client, chunk.data(), n, MSG_NOSIGNAL) != static_cast<ssize_t>(n)) {
        lose("send failed");
        break;
      }
      total += n;
      if (!wait_for([&] { return c.received() >= total; }))
        lose("socket bytes of write " + std::to_string(i));
    }
    threads_done++;
    uv_async_send(&w.async);
  }));
  threads.push_back(quiet_thread([&] {
    std::mt19937 rng(3);
    for (int i = 0; i < Wakeups::kPipeReads && !w.lost; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      if (::write(w.pipe_fds[1], "p", 1) != 1) {
        lose("pipe write failed");
        break;
      }
      if (!wait_for([&] { return w.pipe_reads.load() > i; }))
        lose("rp_fs_read " + std::to_string(i));
    }
    threads_done++;
    uv_async_send(&w.async);
  }));

  // The loop runs until every thread is done: nothing but their events (and
  // the storm) wakes it.
  while (threads_done.load() < 3) rp_uv_run(&loop, UV_RUN_ONCE);
  EXPECT_TRUE(storm.reached_the_loop_thread());
  for (auto& t : threads) t.join();

  EXPECT_FALSE(w.lost) << "lost: " << w.what_lost;
  EXPECT_EQ(w.pipe_reads.load(), Wakeups::kPipeReads);
  EXPECT_EQ(w.pipe_errors, 0) << "rp_fs_read of the pipe: " << w.pipe_error;
  RecordProperty("pipe_reads_interrupted", w.pipe_eintr);

  if (w.pipe_reads.load() < Wakeups::kPipeReads) {
    // End the read still in flight (a lost wake-up left it there).
    (void)!::write(w.pipe_fds[1], "e", 1);
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&w.async), nullptr);
  c.close();
  while (!c.closed()) rp_uv_run(&loop, UV_RUN_ONCE);
  EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_loop_close(&loop), 0);
  ::close(w.pipe_fds[0]);
  ::close(w.pipe_fds[1]);
}

// ---- The C++ Runtime -----------------------------------------------------------

// Resumed by whoever fires it, on the owner thread.
struct Signal {
  bool await_ready() const noexcept { return fired; }
  void await_suspend(std::coroutine_handle<> h) noexcept { waiter = h; }
  void await_resume() const noexcept {}
  void fire() {
    fired = true;
    if (waiter) std::exchange(waiter, {}).resume();
  }
  std::coroutine_handle<> waiter;
  bool fired = false;
};

TEST_P(SignalStorm, RuntimeSleepIsOnTimeAndNoPostIsLost) {
  auto watchdog = quiet_watchdog(60, "block_on");
  Runtime rt = Runtime::Builder().build();
  Storm storm(restart());

  // Deadlines: four 50 ms sleeps in a row, nothing else running.
  auto sleeper = [](Runtime& rt, std::vector<Clock::time_point>& woke) -> Task<void> {
    for (int i = 0; i < 4; ++i) {
      co_await sleep_for(rt, milliseconds(50));
      woke.push_back(Clock::now());
    }
  };
  std::vector<Clock::time_point> woke;
  const Clock::time_point started = Clock::now();
  block_on(rt, sleeper(rt, woke));
  ASSERT_EQ(woke.size(), 4u);
  Clock::time_point previous = started;
  for (std::size_t i = 0; i < woke.size(); ++i) {
    EXPECT_GE(woke[i] - previous, milliseconds(50)) << "sleep " << i << " ended early";
    EXPECT_LE(woke[i] - previous, bound(milliseconds(50)))
        << "sleep " << i << " took "
        << std::chrono::duration_cast<milliseconds>(woke[i] - previous).count() << " ms";
    previous = woke[i];
  }

  // Wake-ups: 200 posts from another thread, one at a time, each waited for,
  // while block_on sleeps with no timer at all.
  constexpr int kPosts = 200;
  std::atomic<int> ran{0};
  std::atomic<bool> lost{false};
  Signal all_ran;
  std::thread poster = quiet_thread([&] {
    std::mt19937 rng(4);
    for (int i = 0; i < kPosts && !lost; ++i) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
      post(rt, [&] {
        if (ran.fetch_add(1) + 1 == kPosts) all_ran.fire();
      });
      if (!wait_for([&] { return ran.load() > i; })) lost = true;
    }
    if (lost) post(rt, [&] { all_ran.fire(); });  // let block_on return
  });
  auto waiter = [](Signal& s) -> Task<int> {
    co_await s;
    co_return 0;
  };
  block_on(rt, waiter(all_ran));
  poster.join();
  EXPECT_FALSE(lost) << "a post() was not run within 2 s";
  EXPECT_EQ(ran.load(), kPosts);
  EXPECT_TRUE(storm.reached_the_loop_thread());
}

INSTANTIATE_TEST_SUITE_P(Restart, SignalStorm, ::testing::Bool(), [](const auto& info) {
  return std::string(info.param ? "WithSaRestart" : "WithoutSaRestart");
});

}  // namespace
}  // namespace ringpark::test
