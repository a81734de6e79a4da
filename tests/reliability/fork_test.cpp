// fork(2) with ringpark operations in flight (issue 8, defect 2). An io_uring's
// SQ and CQ are mapped MAP_SHARED, and an epoll set or an eventfd is one kernel
// object for parent and child: a child that reaped, submitted or cancelled
// through what it inherited would take the parent's completions or cancel its
// operations. Checked here, on both backends (RINGPARK_BACKEND, set by CTest):
// - the parent keeps every completion: each of its operations completes
//   exactly once, with the right result, after the child ran;
// - the child never hangs or spins: it is killed by SIGALRM (and the test
//   fails) if it does not exit within kChildSeconds; and it can run new
//   operations, on its inherited loop (after uv_loop_fork) or a new one;
// - the C++ Runtime in a child refuses to run, and its destructor returns at
//   once.
//
// A child leaves through _exit, so that nothing of the parent's (GoogleTest's
// state, destructors of the test's objects) runs twice. It reports what went
// wrong on stderr, and through its exit status.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "epoll_bridge/epoll_reactor.hpp"
#include "epoll_bridge/fallback_driver.hpp"
#include "ringpark.h"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"
#include "tests/test_util.hpp"
#include "uring_driver/driver.hpp"

namespace ringpark::test {
namespace {

using namespace std::chrono_literals;

// A child that has not exited by then is killed by SIGALRM; the parent gives
// up a little later (and kills it) in case SIGALRM is blocked.
constexpr unsigned kChildSeconds = 10;
constexpr auto kParentWait = std::chrono::seconds(kChildSeconds + 5);

bool backend_is(const char* name) {
  const char* value = std::getenv("RINGPARK_BACKEND");
  return value != nullptr && std::strcmp(value, name) == 0;
}

// In a child: prints where and why, and makes the child's exit status 1.
#define CHILD_CHECK(cond)                                                                   \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "child %d: %s:%d: check failed: %s\n", ::getpid(), __FILE__,     \
                   __LINE__, #cond);                                                        \
      return 1;                                                                             \
    }                                                                                       \
  } while (0)

// How child `pid` ended: "exit 0", "killed by signal 14 (Alarm clock)", or
// "still running after ... (killed)".
std::string wait_child(pid_t pid) {
  const auto deadline = std::chrono::steady_clock::now() + kParentWait;
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
      if (WIFSIGNALED(status)) {
        return "killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
               strsignal(WTERMSIG(status)) + ")";
      }
      return "status " + std::to_string(status);
    }
    if (r < 0 && errno != EINTR) return std::string("waitpid: ") + std::strerror(errno);
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return "still running after " + std::to_string(kParentWait.count()) + " s (killed)";
    }
    std::this_thread::sleep_for(5ms);
  }
}

// The first thing a child does: a bound on its life.
void arm_child_alarm() {
  ::signal(SIGALRM, SIG_DFL);
  ::alarm(kChildSeconds);
}

// Forks; the child runs `body` and _exits with its value (1 if it throws).
// Returns how the child ended.
std::string in_child(const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return std::string("fork: ") + std::strerror(errno);
  if (pid == 0) {
    arm_child_alarm();
    int code = 1;
    try {
      code = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child %d: exception: %s\n", ::getpid(), e.what());
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  return wait_child(pid);
}

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
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  bool put(const char* s) const {
    const auto n = static_cast<ssize_t>(std::strlen(s));
    return ::write(w, s, static_cast<std::size_t>(n)) == n;
  }
};

struct SocketPair {
  int a = -1, b = -1;
  SocketPair() {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
      ADD_FAILURE() << "socketpair: " << std::strerror(errno);
    a = fds[0];
    b = fds[1];
  }
  ~SocketPair() {
    if (a >= 0) ::close(a);
    if (b >= 0) ::close(b);
  }
  SocketPair(const SocketPair&) = delete;
  SocketPair& operator=(const SocketPair&) = delete;
};

// ---- The C++ Runtime ---------------------------------------------------------

std::optional<Runtime> build_runtime(uv_loop_t* loop = nullptr) {
  Runtime::Builder builder;
  if (loop != nullptr) builder.attach(loop);
  try {
    return builder.build();
  } catch (const std::system_error&) {
    if (backend_is("uring")) return std::nullopt;  // io_uring demanded, not here
    throw;
  }
}

// What a recv awaited by a spawned task saw, and how many times it completed.
struct RecvSeen {
  int completions = 0;
  std::string data;
  std::error_code error;
};

Task<void> recv_once(Runtime& rt, int fd, RecvSeen& seen) {
  BufferResult r = co_await ringpark::recv(rt, fd, Buffer(64));
  ++seen.completions;
  seen.error = r.error;
  seen.data.assign(r.buffer.data(), r.bytes);
}

// A real suspension: spawned tasks start and submit their operations.
Task<void> settle(Runtime& rt) { co_await sleep_for(rt, 5ms); }

Task<void> until_completed(Runtime& rt, const RecvSeen& seen) {
  while (seen.completions == 0) co_await sleep_for(rt, 1ms);
  co_await sleep_for(rt, 5ms);  // room for a second completion, which must not come
}

// The parent's side after a child ran: the recv that was in flight at the fork
// completes exactly once, with the bytes sent now.
void expect_recv_completes_once(Runtime& rt, int peer, const RecvSeen& seen) {
  EXPECT_EQ(seen.completions, 0) << "the recv completed before anything was sent";
  ASSERT_EQ(::send(peer, "parent", 6, MSG_NOSIGNAL), 6);
  {
    Watchdog dog(5s, "block_on of the parent's recv");
    block_on(rt, until_completed(rt, seen));
  }
  EXPECT_EQ(seen.completions, 1);
  EXPECT_FALSE(seen.error) << seen.error.message();
  EXPECT_EQ(seen.data, "parent");
}

// Before the fix: ~Runtime in the child cancelled and reaped the parent's ring;
// with SINGLE_ISSUER|DEFER_TASKRUN every enter fails there, and it spun.
TEST(ForkRuntime, StandaloneWithRecvInFlightChildTearsDownAtOnce) {
  SocketPair sp;
  std::optional<Runtime> rt = build_runtime();
  if (!rt) GTEST_SKIP() << "RINGPARK_BACKEND=uring and io_uring is unusable here";
  RecvSeen seen;
  spawn(*rt, recv_once(*rt, sp.a, seen));
  block_on(*rt, settle(*rt));  // the recv is in flight now

  Stopwatch clock;
  EXPECT_EQ(in_child([&] {
              rt.reset();
              return 0;
            }),
            "exit 0");
  EXPECT_LT(clock.elapsed(), 3s) << "the child's ~Runtime must not wait for anything";
  expect_recv_completes_once(*rt, sp.b, seen);
}

// Before the fix: the child's teardown of a loop-attached (COOP_TASKRUN) ring
// consumed the parent's CQEs, and the parent aborted ("CQE for op ... that is
// not in flight").
TEST(ForkRuntime, AttachedToALoopWithRecvInFlightParentKeepsItsCompletion) {
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  {
    SocketPair sp;
    std::optional<Runtime> rt = build_runtime(&loop);
    if (!rt) GTEST_SKIP() << "RINGPARK_BACKEND=uring and io_uring is unusable here";
    RecvSeen seen;
    spawn(*rt, recv_once(*rt, sp.a, seen));
    block_on(*rt, settle(*rt));

    EXPECT_EQ(in_child([&] {
                rt.reset();
                return 0;
              }),
              "exit 0");
    expect_recv_completes_once(*rt, sp.b, seen);
  }
  EXPECT_EQ(uv_loop_close(&loop), 0);
}

// Using the parent's Runtime in a child is a clear error, never a hang on the
// parent's ring; a new Runtime works there.
TEST(ForkRuntime, ChildGetsAnErrorFromTheInheritedRuntimeAndANewOneWorks) {
  SocketPair sp;
  std::optional<Runtime> rt = build_runtime();
  if (!rt) GTEST_SKIP() << "RINGPARK_BACKEND=uring and io_uring is unusable here";
  RecvSeen seen;
  spawn(*rt, recv_once(*rt, sp.a, seen));
  block_on(*rt, settle(*rt));

  EXPECT_EQ(in_child([&] {
              bool threw = false;
              try {
                block_on(*rt, settle(*rt));
              } catch (const std::logic_error& e) {
                threw = std::strstr(e.what(), "fork") != nullptr;
              }
              CHILD_CHECK(threw);
              threw = false;
              try {
                spawn(*rt, settle(*rt));
              } catch (const std::logic_error&) {
                threw = true;
              }
              CHILD_CHECK(threw);
              threw = false;
              try {
                post(*rt, [] {});
              } catch (const std::logic_error&) {
                threw = true;
              }
              CHILD_CHECK(threw);
              CHILD_CHECK(seen.completions == 0);  // the parent's recv never completes here

              SocketPair mine;
              std::optional<Runtime> fresh = build_runtime();
              CHILD_CHECK(fresh.has_value());
              RecvSeen child_seen;
              CHILD_CHECK(::send(mine.b, "child", 5, MSG_NOSIGNAL) == 5);
              block_on(*fresh, recv_once(*fresh, mine.a, child_seen));
              CHILD_CHECK(child_seen.completions == 1 && child_seen.data == "child");
              fresh.reset();
              rt.reset();
              return 0;
            }),
            "exit 0");
  expect_recv_completes_once(*rt, sp.b, seen);
}

Task<pid_t> fork_inside(Runtime& rt) {
  co_await sleep_for(rt, 1ms);
  const pid_t pid = ::fork();
  if (pid == 0) arm_child_alarm();
  // In the child this suspends on the parent's chain, and block_on throws.
  co_await sleep_for(rt, 1ms);
  co_return pid;
}

// A task that forks: the child's block_on throws once the task suspends, and
// runs none of the parent's other work.
TEST(ForkRuntime, TaskThatForksChildBlockOnThrows) {
  SocketPair sp;
  std::optional<Runtime> rt = build_runtime();
  if (!rt) GTEST_SKIP() << "RINGPARK_BACKEND=uring and io_uring is unusable here";
  RecvSeen seen;
  spawn(*rt, recv_once(*rt, sp.a, seen));
  block_on(*rt, settle(*rt));

  const pid_t parent = ::getpid();
  std::fflush(nullptr);
  pid_t child = -1;
  try {
    child = block_on(*rt, fork_inside(*rt));
  } catch (const std::logic_error& e) {
    if (::getpid() != parent) {
      rt.reset();
      ::_exit(seen.completions == 0 ? 0 : 2);
    }
    ADD_FAILURE() << "block_on threw in the parent: " << e.what();
  }
  if (::getpid() != parent) {
    std::fprintf(stderr, "child %d: block_on returned instead of throwing\n", ::getpid());
    ::_exit(1);
  }
  ASSERT_GT(child, 0);
  EXPECT_EQ(wait_child(child), "exit 0");
  expect_recv_completes_once(*rt, sp.b, seen);
}

// ---- A driver whose completion forks -----------------------------------------

// Two nops complete in one reap (or dispatch) pass; the first one's completion
// forks. In the child, the rest of that pass is the parent's: the second
// completion must not run there (before the fix, the io_uring driver went on
// dispatching, and then reaping the parent's CQ).
struct ForkingNops {
  detail::Op first;
  detail::Op second;
  int second_runs = 0;
  pid_t child = -1;

  ForkingNops() {
    first.code = second.code = detail::OpCode::nop;
    first.data = second.data = this;
    first.complete = [](detail::Op* op, int, std::uint32_t) noexcept {
      auto* self = static_cast<ForkingNops*>(op->data);
      std::fflush(nullptr);
      self->child = ::fork();
      if (self->child == 0) arm_child_alarm();
    };
    second.complete = [](detail::Op* op, int, std::uint32_t) noexcept {
      ++static_cast<ForkingNops*>(op->data)->second_runs;
    };
  }
};

template <class Driver>
void completion_that_forks(Driver& driver) {
  ForkingNops nops;
  driver.submit(&nops.first);
  driver.submit(&nops.second);
  driver.park(Timeout(Duration(100ms)));
  if (nops.child == 0) {
    // The child: nothing more of the parent's batch, and the driver lets go of
    // the parent's ring (or epoll set) when destroyed.
    const int code = nops.second_runs == 0 ? 0 : 3;
    if (code != 0) std::fprintf(stderr, "child: the parent's second completion ran here\n");
    driver.shutdown();
    ::_exit(code);
  }
  ASSERT_GT(nops.child, 0) << "the first completion did not run, or fork failed";
  EXPECT_EQ(wait_child(nops.child), "exit 0");
  for (int i = 0; i < 10 && nops.second_runs == 0; ++i) driver.park(Timeout(Duration(10ms)));
  EXPECT_EQ(nops.second_runs, 1);
}

// The drivers do not read RINGPARK_BACKEND: each runs once, in its own run.
TEST(ForkDriver, UringCompletionThatForksRunsNoMoreOfTheBatchInTheChild) {
  if (backend_is("epoll")) GTEST_SKIP() << "the io_uring driver runs under RINGPARK_BACKEND=uring";
  detail::EpollReactor reactor;
  detail::RingProbe probe;
  auto driver = detail::UringDriver::create(&reactor, detail::RingOptions{}, &probe);
  if (!driver) GTEST_SKIP() << "io_uring is unavailable: " << probe.reason;
  completion_that_forks(*driver);
}

TEST(ForkDriver, FallbackCompletionThatForksRunsNoMoreOfTheBatchInTheChild) {
  if (!backend_is("epoll")) GTEST_SKIP() << "the fallback driver runs under RINGPARK_BACKEND=epoll";
  detail::EpollReactor reactor;
  detail::FallbackDriver driver(reactor, nullptr);
  completion_that_forks(driver);
}

// ---- The libuv side: rp_uv_run, rp_fs_*, rp_poll_t -----------------------------

struct FsRead {
  uv_fs_t req;
  char buf[64];
  uv_buf_t iov;
  int calls = 0;
  ssize_t result = 0;
  std::string data() const { return result > 0 ? std::string(buf, static_cast<size_t>(result)) : ""; }
};

void on_fs_read(uv_fs_t* req) {
  auto* r = static_cast<FsRead*>(req->data);
  ++r->calls;
  r->result = req->result;
  uv_fs_req_cleanup(req);
}

int start_read(uv_loop_t* loop, FsRead* r, int fd) {
  r->iov = uv_buf_init(r->buf, sizeof r->buf);
  r->req.data = r;
  return rp_fs_read(loop, &r->req, fd, &r->iov, 1, -1, &on_fs_read);
}

// A readiness watcher that drains its fd and counts.
struct Watch {
  rp_poll_t handle;
  int fd = -1;
  int calls = 0;
  int status = 0;
  int closes = 0;
};

void on_readable(rp_poll_t* h, int status, int) {
  auto* w = static_cast<Watch*>(h->data);
  ++w->calls;
  w->status = status;
  char buf[256];
  while (::read(w->fd, buf, sizeof buf) > 0) {
  }
}

int start_watch(uv_loop_t* loop, Watch* w, int fd) {
  w->fd = fd;
  w->handle.data = w;
  if (int r = rp_poll_init(loop, &w->handle, fd); r != 0) return r;
  return rp_poll_start(&w->handle, UV_READABLE, &on_readable);
}

int close_watch(Watch* w) {
  return rp_poll_close(&w->handle, [](rp_poll_t* h) { ++static_cast<Watch*>(h->data)->closes; });
}

// Runs the loop one iteration at a time until `done` holds (false if the loop
// ran out of work first, or after 5 s).
template <class Pred>
bool run_until(uv_loop_t* loop, Pred done) {
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    rp_uv_run(loop, UV_RUN_NOWAIT);
    if (!done()) std::this_thread::sleep_for(1ms);
  }
  return true;
}

// In a child: a new operation on `loop` completes with the right result. On
// io_uring, a file read through the child's ring; on the fallback, where
// rp_fs_read is libuv's thread pool (and a child that starts threads after a
// multi-threaded fork is more than ThreadSanitizer supports), a new watcher on
// the child's fresh epoll set.
int new_operation_works(uv_loop_t* loop) {
  Pipe p3;
  if (!backend_is("epoll")) {
    FsRead mine;
    CHILD_CHECK(start_read(loop, &mine, p3.r) == 0);
    CHILD_CHECK(p3.put("child"));
    CHILD_CHECK(run_until(loop, [&] { return mine.calls > 0; }));
    CHILD_CHECK(mine.data() == "child");
    return 0;
  }
  Watch mine;
  CHILD_CHECK(start_watch(loop, &mine, p3.r) == 0);
  CHILD_CHECK(p3.put("child"));
  CHILD_CHECK(run_until(loop, [&] { return mine.calls > 0; }));
  CHILD_CHECK(mine.status == 0);
  CHILD_CHECK(close_watch(&mine) == 0);
  CHILD_CHECK(run_until(loop, [&] { return mine.closes == 1; }));
  return 0;
}

// A loop whose parent has a file read (p1) and a started watcher (p2) in
// flight when it forks.
class ForkLoop : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(start_read(&loop_, &read_, p1_.r), 0);
    ASSERT_EQ(start_watch(&loop_, &watch_, p2_.r), 0);
    rp_uv_run(&loop_, UV_RUN_NOWAIT);  // both are in the ring (or epoll) now
    started_ = true;
    ASSERT_EQ(read_.calls, 0);
    ASSERT_EQ(watch_.calls, 0);
  }

  // What a failed test left is finished, so that neither the kernel nor a
  // thread of libuv's pool holds the fixture's memory after it.
  void TearDown() override {
    if (!started_ || loop_closed_) return;
    if (read_.calls == 0 && p1_.put("z")) run_until(&loop_, [&] { return read_.calls > 0; });
    if (watch_.closes == 0) {
      close_watch(&watch_);  // UV_EINVAL if it is closing already
      run_until(&loop_, [&] { return watch_.closes > 0; });
    }
    rp_loop_close(&loop_);
  }

  // After the child: the parent's read completes exactly once with what is
  // written now, its watcher reports new data, and the loop winds down.
  void expect_parent_keeps_its_operations() {
    ASSERT_TRUE(p1_.put("parent"));
    EXPECT_TRUE(run_until(&loop_, [&] { return read_.calls > 0; })) << "the parent's read";
    for (int i = 0; i < 5; ++i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
    EXPECT_EQ(read_.calls, 1);
    EXPECT_EQ(read_.data(), "parent");

    ASSERT_TRUE(p2_.put("y"));
    EXPECT_TRUE(run_until(&loop_, [&] { return watch_.calls > 0; })) << "the parent's watcher";
    EXPECT_EQ(watch_.status, 0) << uv_strerror(watch_.status);
    EXPECT_EQ(close_watch(&watch_), 0);
    {
      Watchdog dog(5s, "rp_uv_run(DEFAULT) of the parent");
      EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    }
    EXPECT_EQ(watch_.closes, 1);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    loop_closed_ = true;
  }

  // The child's copy of the read was in the parent's ring; on io_uring it must
  // not keep the child's loop alive. (On the fallback rp_fs_read is libuv's
  // uv_fs_read, whose thread pool request a child never sees completed:
  // libuv's behaviour, not ringpark's.)
  static bool orphans_are_ours() { return !backend_is("epoll"); }

  uv_loop_t loop_;
  Pipe p1_, p2_;
  FsRead read_;
  Watch watch_;
  bool started_ = false;
  bool loop_closed_ = false;
};

// The same, for what only the ring has: skipped on the fallback before the
// parent starts anything.
class ForkLoopRing : public ForkLoop {
 protected:
  void SetUp() override {
    if (!orphans_are_ours()) {
      GTEST_SKIP() << "on the fallback rp_fs_read is libuv's uv_fs_read: its callback runs from "
                      "libuv's thread pool queue, not from ringpark (see ForkDriver for the "
                      "fallback's own completions)";
    }
    ForkLoop::SetUp();
  }
};

// The child goes on with the inherited loop: uv_loop_fork (as libuv requires),
// then rp_uv_run. Before the fix its watcher was dead (its poll was in the
// parent's ring) and the parent's read kept its loop alive forever.
TEST_F(ForkLoop, ChildGoesOnWithTheInheritedLoop) {
  EXPECT_EQ(in_child([&] {
              CHILD_CHECK(uv_loop_fork(&loop_) == 0);
              // The inherited watcher works in the child's fresh ring.
              CHILD_CHECK(p2_.put("x"));
              CHILD_CHECK(run_until(&loop_, [&] { return watch_.calls > 0; }));
              CHILD_CHECK(watch_.status == 0);
              // So does a new operation.
              CHILD_CHECK(new_operation_works(&loop_) == 0);
              CHILD_CHECK(read_.calls == 0);  // the parent's read never completes here
              CHILD_CHECK(close_watch(&watch_) == 0);
              CHILD_CHECK(run_until(&loop_, [&] { return watch_.closes == 1; }));
              if (orphans_are_ours()) {
                CHILD_CHECK(rp_uv_run(&loop_, UV_RUN_DEFAULT) == 0);
                CHILD_CHECK(rp_loop_close(&loop_) == 0);
              }
              return 0;
            }),
            "exit 0");
  expect_parent_keeps_its_operations();
}

// The child closes the inherited loop and makes a new one. Before the fix,
// closing the watcher cancelled the parent's poll through the parent's ring.
TEST_F(ForkLoop, ChildClosesTheInheritedLoopAndMakesANewOne) {
  EXPECT_EQ(in_child([&] {
              CHILD_CHECK(uv_loop_fork(&loop_) == 0);
              CHILD_CHECK(close_watch(&watch_) == 0);
              CHILD_CHECK(run_until(&loop_, [&] { return watch_.closes == 1; }));
              if (orphans_are_ours()) {
                CHILD_CHECK(rp_uv_run(&loop_, UV_RUN_DEFAULT) == 0);
                CHILD_CHECK(rp_loop_close(&loop_) == 0);
              }
              uv_loop_t mine;
              CHILD_CHECK(uv_loop_init(&mine) == 0);
              CHILD_CHECK(new_operation_works(&mine) == 0);
              CHILD_CHECK(rp_uv_run(&mine, UV_RUN_DEFAULT) == 0);
              CHILD_CHECK(rp_loop_close(&mine) == 0);
              CHILD_CHECK(read_.calls == 0);
              return 0;
            }),
            "exit 0");
  expect_parent_keeps_its_operations();
}

// A read's callback forks. In the child the rest of that reap is the parent's:
// the other read's callback must not run there (before the fix the child went
// on dispatching the batch, and then reaped the parent's CQ).
TEST_F(ForkLoopRing, ReadCallbackThatForks) {
  struct Forking {
    FsRead first, second;
    pid_t child = -1;
    int second_at_fork = -1;
  } f;
  Pipe a, b;
  ASSERT_TRUE(a.put("first"));
  ASSERT_TRUE(b.put("second"));
  f.first.iov = uv_buf_init(f.first.buf, sizeof f.first.buf);
  f.first.req.data = &f;
  ASSERT_EQ(rp_fs_read(&loop_, &f.first.req, a.r, &f.first.iov, 1, -1,
                       [](uv_fs_t* req) {
                         auto* self = static_cast<Forking*>(req->data);
                         ++self->first.calls;
                         self->first.result = req->result;
                         uv_fs_req_cleanup(req);
                         self->second_at_fork = self->second.calls;
                         std::fflush(nullptr);
                         self->child = ::fork();
                         if (self->child == 0) arm_child_alarm();
                       }),
            0);
  ASSERT_EQ(start_read(&loop_, &f.second, b.r), 0);
  const pid_t parent = ::getpid();
  run_until(&loop_, [&] { return f.first.calls > 0; });
  if (::getpid() != parent) {
    // The child, back from the loop iteration that forked.
    auto child = [&]() -> int {
      CHILD_CHECK(f.second.calls == f.second_at_fork);
      CHILD_CHECK(uv_loop_fork(&loop_) == 0);
      CHILD_CHECK(new_operation_works(&loop_) == 0);
      CHILD_CHECK(f.second.calls == f.second_at_fork);
      CHILD_CHECK(read_.calls == 0);
      return 0;
    };
    const int code = child();
    std::fflush(nullptr);
    ::_exit(code);
  }
  ASSERT_GT(f.child, 0);
  EXPECT_EQ(wait_child(f.child), "exit 0");
  EXPECT_TRUE(run_until(&loop_, [&] { return f.second.calls > 0; }));
  for (int i = 0; i < 5; ++i) rp_uv_run(&loop_, UV_RUN_NOWAIT);
  EXPECT_EQ(f.first.calls, 1);
  EXPECT_EQ(f.first.data(), "first");
  EXPECT_EQ(f.second.calls, 1);
  EXPECT_EQ(f.second.data(), "second");
  expect_parent_keeps_its_operations();
}

// ---- A pre-fork echo server ---------------------------------------------------

// One listening socket with a started watcher; the parent forks workers, each
// serving on its inherited loop. Before the fix the inherited watcher lived in
// the parent's ring and no worker ever accepted.
struct Worker {
  uv_loop_t* loop;
  int listener;
  Watch stop;  // the control pipe: EOF tells the worker to finish
  int served = 0;
  bool stopping = false;

  struct Conn {
    Worker* worker;
    rp_poll_t handle;
    int fd;
  };
  std::vector<std::unique_ptr<Conn>> conns;
};

void on_conn_readable(rp_poll_t* h, int status, int) {
  auto* c = static_cast<Worker::Conn*>(h->data);
  char buf[256];
  const ssize_t n = status == 0 ? ::read(c->fd, buf, sizeof buf) : -1;
  if (n > 0) {
    (void)!::write(c->fd, buf, static_cast<size_t>(n));  // small: the socket buffer takes it
    return;
  }
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  ++c->worker->served;
  rp_poll_close(h, [](rp_poll_t* closed) {
    auto* conn = static_cast<Worker::Conn*>(closed->data);
    ::close(conn->fd);
    conn->fd = -1;
  });
}

void on_acceptable(rp_poll_t* h, int status, int) {
  auto* worker = static_cast<Worker*>(h->data);
  if (status != 0) return;
  for (;;) {
    // Both workers wake for one connection; the one that loses gets EAGAIN.
    const int fd = ::accept4(worker->listener, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    auto conn = std::make_unique<Worker::Conn>(Worker::Conn{worker, {}, fd});
    conn->handle.data = conn.get();
    if (rp_poll_init(worker->loop, &conn->handle, fd) != 0 ||
        rp_poll_start(&conn->handle, UV_READABLE | UV_DISCONNECT, &on_conn_readable) != 0) {
      ::close(fd);
      continue;
    }
    worker->conns.push_back(std::move(conn));
  }
}

TEST(ForkServer, PreForkedWorkersServeOnTheirInheritedLoops) {
  constexpr int kWorkers = 2;
  constexpr int kConnections = 12;
  int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(listener, 64), 0);
  ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);

  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  rp_poll_t acceptor;  // the parent starts it; the workers inherit it started
  Worker worker{&loop, listener, {}, 0, false, {}};
  acceptor.data = &worker;
  ASSERT_EQ(rp_poll_init(&loop, &acceptor, listener), 0);
  ASSERT_EQ(rp_poll_start(&acceptor, UV_READABLE, &on_acceptable), 0);
  rp_uv_run(&loop, UV_RUN_NOWAIT);  // armed in the parent's ring

  Pipe control;
  std::vector<pid_t> workers;
  std::vector<int> served_pipes;
  for (int i = 0; i < kWorkers; ++i) {
    int result[2];
    ASSERT_EQ(::pipe2(result, O_CLOEXEC), 0);
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      arm_child_alarm();
      ::close(result[0]);
      ::close(control.w);
      control.w = -1;
      auto serve = [&]() -> int {
        CHILD_CHECK(uv_loop_fork(&loop) == 0);
        CHILD_CHECK(start_watch(&loop, &worker.stop, control.r) == 0);
        while (worker.stop.calls == 0) rp_uv_run(&loop, UV_RUN_ONCE);
        // Done; the process ends with whatever is left open.
        CHILD_CHECK(::write(result[1], &worker.served, sizeof worker.served) ==
                    static_cast<ssize_t>(sizeof worker.served));
        return 0;
      };
      const int code = serve();
      std::fflush(nullptr);
      ::_exit(code);
    }
    ::close(result[1]);
    workers.push_back(pid);
    served_pipes.push_back(result[0]);
  }

  // The parent is the client: each connection sends a line and reads it back.
  int echoed = 0;
  for (int i = 0; i < kConnections; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string msg = "hello " + std::to_string(i);
    ASSERT_EQ(::send(fd, msg.data(), msg.size(), MSG_NOSIGNAL), static_cast<ssize_t>(msg.size()));
    std::string got;
    char buf[64];
    while (got.size() < msg.size()) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    EXPECT_EQ(got, msg) << "connection " << i << " got no echo (no worker accepted it?)";
    ::close(fd);
    if (got != msg) break;  // the workers do not serve: the rest would wait as long
    ++echoed;
  }
  EXPECT_EQ(echoed, kConnections);

  // Stop the workers; each reports how many connections it served.
  ::close(control.w);
  control.w = -1;
  int served = 0;
  for (int i = 0; i < kWorkers; ++i) {
    EXPECT_EQ(wait_child(workers[static_cast<size_t>(i)]), "exit 0") << "worker " << i;
    int n = 0;
    if (::read(served_pipes[static_cast<size_t>(i)], &n, sizeof n) == static_cast<ssize_t>(sizeof n))
      served += n;
    ::close(served_pipes[static_cast<size_t>(i)]);
  }
  // A worker counts a connection when it sees the client close it; it may be
  // stopped before it saw the last ones.
  EXPECT_LE(served, kConnections);

  // The parent's own watcher is intact in its ring.
  EXPECT_EQ(rp_poll_close(&acceptor, nullptr), 0);
  {
    Watchdog dog(5s, "rp_uv_run(DEFAULT) of the parent");
    EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
  }
  EXPECT_EQ(rp_loop_close(&loop), 0);
  ::close(listener);
}

// The same with rp_tcp_t, whose listener holds a multishot accept in the ring:
// the workers' fresh rings accept after the fork. The parent closes its own
// listener handle first: on io_uring an accept the parent left armed goes on
// taking connections in the kernel (it runs as task work on the parent's next
// syscall, whether or not the parent runs its loop), and the workers would
// see none. (The fallback accepts only while the parent runs its loop.)
struct TcpConn {
  rp_tcp_t handle;
  char buf[256];
  rp_write_t write;
};

void tcp_alloc(rp_tcp_t* h, size_t, uv_buf_t* buf) {
  auto* c = reinterpret_cast<TcpConn*>(h);
  *buf = uv_buf_init(c->buf, sizeof c->buf);
}

void tcp_read(rp_tcp_t* h, ssize_t n, const uv_buf_t* buf) {
  auto* c = reinterpret_cast<TcpConn*>(h);
  if (n > 0) {
    // One write in flight at a time is enough: the client waits for each echo.
    uv_buf_t out = uv_buf_init(buf->base, static_cast<unsigned>(n));
    rp_write(&c->write, h, &out, 1, [](rp_write_t*, int) {});
  } else if (n < 0) {
    ++*static_cast<int*>(h->data);
    rp_close(h, [](rp_tcp_t* closed) { delete reinterpret_cast<TcpConn*>(closed); });
  }
}

void tcp_connection(rp_tcp_t* server, int status) {
  if (status != 0) return;
  auto* c = new TcpConn;
  rp_tcp_init(server->loop, &c->handle);
  c->handle.data = server->data;  // the worker's count of served connections
  if (rp_accept(server, &c->handle) != 0 || rp_read_start(&c->handle, &tcp_alloc, &tcp_read) != 0)
    rp_close(&c->handle, [](rp_tcp_t* closed) { delete reinterpret_cast<TcpConn*>(closed); });
}

TEST(ForkServer, PreForkedRpTcpWorkersAcceptOnTheirOwnRings) {
  constexpr int kWorkers = 2;
  constexpr int kConnections = 12;
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  rp_tcp_t server;
  int served_here = 0;
  server.data = &served_here;
  ASSERT_EQ(rp_tcp_init(&loop, &server), 0);
  sockaddr_in addr{};
  ASSERT_EQ(uv_ip4_addr("127.0.0.1", 0, &addr), 0);
  ASSERT_EQ(rp_tcp_bind(&server, reinterpret_cast<sockaddr*>(&addr), 0), 0);
  int len = sizeof addr;
  ASSERT_EQ(rp_tcp_getsockname(&server, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(rp_listen(&server, 64, &tcp_connection), 0);
  rp_uv_run(&loop, UV_RUN_NOWAIT);  // the accept is in the parent's ring

  Pipe control;
  std::vector<pid_t> workers;
  for (int i = 0; i < kWorkers; ++i) {
    std::fflush(nullptr);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      arm_child_alarm();
      ::close(control.w);
      control.w = -1;
      auto serve = [&]() -> int {
        CHILD_CHECK(uv_loop_fork(&loop) == 0);
        Watch stop;
        CHILD_CHECK(start_watch(&loop, &stop, control.r) == 0);
        while (stop.calls == 0) rp_uv_run(&loop, UV_RUN_ONCE);
        return 0;
      };
      const int code = serve();
      std::fflush(nullptr);
      ::_exit(code);
    }
    workers.push_back(pid);
  }
  // The parent stops accepting (see above), then acts as the client.
  ASSERT_EQ(rp_close(&server, nullptr), 0);
  {
    Watchdog dog(5s, "the parent's rp_close of its listener");
    while (rp_uv_run(&loop, UV_RUN_NOWAIT) != 0) std::this_thread::sleep_for(1ms);
  }
  int echoed = 0;
  for (int i = 0; i < kConnections; ++i) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(fd, 0);
    timeval tv{5, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string msg = "tcp " + std::to_string(i);
    ASSERT_EQ(::send(fd, msg.data(), msg.size(), MSG_NOSIGNAL), static_cast<ssize_t>(msg.size()));
    std::string got;
    char buf[64];
    while (got.size() < msg.size()) {
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      got.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
    EXPECT_EQ(got, msg) << "connection " << i << " got no echo (no worker accepted it?)";
    if (got != msg) break;
    ++echoed;
  }
  EXPECT_EQ(echoed, kConnections);
  EXPECT_EQ(served_here, 0) << "the parent served connections itself";
  ::close(control.w);
  control.w = -1;
  for (pid_t pid : workers) EXPECT_EQ(wait_child(pid), "exit 0");
  EXPECT_EQ(rp_loop_close(&loop), 0);
}

}  // namespace
}  // namespace ringpark::test
