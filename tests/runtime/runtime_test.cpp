// The C++ API: Runtime, Task<T>, block_on, spawn, post, sleep_for and the
// awaitable operations. Every test runs once per backend (RINGPARK_BACKEND=uring
// and =epoll), uses loopback sockets and files in a fresh mkdtemp directory
// only, and is bounded by a watchdog.
//
// GoogleTest's ASSERT_* macros `return`, which a coroutine may not; inside
// coroutines the tests use EXPECT_* and co_return by hand.
#include "ringpark/runtime.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "ringpark/ops.hpp"
#include "ringpark/task.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

const char* env_backend() {
  const char* value = std::getenv("RINGPARK_BACKEND");
  return value ? value : "";
}

// Builds a runtime; skips the test when io_uring was demanded and the machine
// does not have it (the one case where build() throws on a working system).
std::optional<Runtime> try_build(Runtime::Builder builder = Runtime::Builder()) {
  try {
    return builder.build();
  } catch (const std::system_error& e) {
    if (std::string(env_backend()) == "uring") return std::nullopt;
    throw;
  }
}

class RuntimeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rt_ = try_build();
    if (!rt_) GTEST_SKIP() << "RINGPARK_BACKEND=uring but io_uring is unusable here";
  }
  Runtime& rt() { return *rt_; }

  std::optional<Runtime> rt_;
  Watchdog watchdog_{20s, "test"};
};

// A listening TCP socket on 127.0.0.1 with an ephemeral port.
struct Listener {
  Listener() {
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_GE(fd, 0);
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(fd, 64), 0);
    socklen_t len = sizeof addr;
    EXPECT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  }
  ~Listener() { ::close(fd); }

  int fd = -1;
  sockaddr_in addr{};
};

struct SocketPair {
  SocketPair() { EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0); }
  ~SocketPair() {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  int fds[2] = {-1, -1};
};

Buffer bytes_of(const std::string& s) { return Buffer(s.begin(), s.end()); }

// Waits, in steps of the runtime's own timer, until `done` holds.
template <class Pred>
Task<void> wait_until(Runtime& rt, Pred done) {
  while (!done()) co_await sleep_for(rt, 1ms);
}

// Sends all of `data`, retrying short sends. Returns the first error.
Task<std::error_code> send_all(Runtime& rt, int fd, Buffer data) {
  while (!data.empty()) {
    BufferResult r = co_await send(rt, fd, std::move(data));
    if (!r) co_return r.error;
    data = std::move(r.buffer);
    data.erase(data.begin(), data.begin() + static_cast<std::ptrdiff_t>(r.bytes));
  }
  co_return std::error_code();
}

// ---- Runtime ---------------------------------------------------------------

TEST_F(RuntimeTest, BackendNameMatchesTheEnvironment) {
  const std::string env = env_backend();
  if (env == "epoll") {
    EXPECT_EQ(rt().backend_name(), "epoll (RINGPARK_BACKEND=epoll)");
  } else if (env == "uring") {
    EXPECT_EQ(rt().backend_name(), "io_uring");
  } else {
    EXPECT_TRUE(rt().backend_name() == "io_uring" || rt().backend_name().rfind("epoll (", 0) == 0)
        << rt().backend_name();
  }
  EXPECT_EQ(rt().loop(), nullptr);
}

TEST(RuntimeBuild, DemandingEpollGivesTheFallback) {
  Watchdog watchdog(10s, "test");
  if (std::string(env_backend()) == "uring") GTEST_SKIP() << "the environment forces io_uring";
  Runtime rt = Runtime::Builder().backend(Backend::epoll).entries(8).build();
  EXPECT_EQ(rt.backend_name().rfind("epoll (", 0), 0u) << rt.backend_name();
}

TEST_F(RuntimeTest, MovingTheRuntimeKeepsItWorking) {
  Runtime moved = std::move(rt());
  auto body = [](Runtime& rt) -> Task<int> {
    co_await sleep_for(rt, 1ms);
    auto r = co_await nop(rt);
    co_return r ? 5 : -1;
  };
  EXPECT_EQ(block_on(moved, body(moved)), 5);
}

// ---- Task and block_on -----------------------------------------------------

Task<int> forty_two() { co_return 42; }

TEST_F(RuntimeTest, BlockOnReturnsTheTaskValue) {
  EXPECT_EQ(block_on(rt(), forty_two()), 42);
  auto string_task = []() -> Task<std::string> { co_return "ring"; };
  EXPECT_EQ(block_on(rt(), string_task()), "ring");
}

Task<void> append(std::vector<int>& log, int v) {
  log.push_back(v);
  co_return;
}

Task<int> chain(Runtime& rt, std::vector<int>& log) {
  co_await append(log, 1);
  co_await sleep_for(rt, 1ms);  // a real suspension in the middle of the chain
  co_await append(log, 2);
  int v = co_await forty_two();
  log.push_back(3);
  co_return v + 1;
}

TEST_F(RuntimeTest, TasksAwaitTasks) {
  std::vector<int> log;
  EXPECT_EQ(block_on(rt(), chain(rt(), log)), 43);
  EXPECT_EQ(log, (std::vector<int>{1, 2, 3}));
}

TEST_F(RuntimeTest, TasksAreLazy) {
  bool ran = false;
  auto set = [](bool& flag) -> Task<void> {
    flag = true;
    co_return;
  };
  {
    Task<void> t = set(ran);
    Task<void> moved = std::move(t);
    EXPECT_FALSE(t.valid());
    EXPECT_TRUE(moved.valid());
  }
  EXPECT_FALSE(ran);  // destroyed unstarted
  block_on(rt(), set(ran));
  EXPECT_TRUE(ran);
}

Task<int> one() { co_return 1; }

TEST_F(RuntimeTest, AwaitingManyTasksDoesNotGrowTheStack) {
  // Each co_await of a task that ends without suspending is a symmetric
  // transfer there and back; a nested resume per iteration would overflow.
  auto sum = [](int n) -> Task<int> {
    int s = 0;
    for (int i = 0; i < n; ++i) s += co_await one();
    co_return s;
  };
  EXPECT_EQ(block_on(rt(), sum(200000)), 200000);
}

Task<int> throws_at_once() {
  throw std::runtime_error("at once");
  co_return 0;
}

Task<int> throws_after_suspending(Runtime& rt) {
  co_await nop(rt);
  throw std::out_of_range("later");
}

TEST_F(RuntimeTest, ExceptionsPropagateToTheAwaiter) {
  auto catcher = [](Runtime& rt) -> Task<int> {
    int caught = 0;
    try {
      co_await throws_at_once();
    } catch (const std::runtime_error& e) {
      caught += std::string(e.what()) == "at once" ? 1 : 100;
    }
    try {
      co_await throws_after_suspending(rt);
    } catch (const std::out_of_range&) {
      caught += 10;
    }
    co_return caught;
  };
  EXPECT_EQ(block_on(rt(), catcher(rt())), 11);
  EXPECT_THROW(block_on(rt(), throws_after_suspending(rt())), std::out_of_range);
  // The runtime is still usable after a task threw.
  EXPECT_EQ(block_on(rt(), forty_two()), 42);
}

TEST_F(RuntimeTest, VoidTaskExceptionsPropagate) {
  auto thrower = [](Runtime& rt) -> Task<void> {
    co_await sleep_for(rt, 1ms);
    throw std::logic_error("void");
  };
  EXPECT_THROW(block_on(rt(), thrower(rt())), std::logic_error);
}

TEST_F(RuntimeTest, BlockOnInsideATaskIsRefused) {
  auto nested = [](Runtime& rt) -> Task<bool> {
    try {
      block_on(rt, forty_two());
    } catch (const std::logic_error&) {
      co_return true;
    }
    co_return false;
  };
  EXPECT_TRUE(block_on(rt(), nested(rt())));
}

TEST_F(RuntimeTest, BlockOnFromAnotherThreadIsRefused) {
  bool refused = false;
  std::thread other([&] {
    try {
      block_on(rt(), forty_two());
    } catch (const std::logic_error&) {
      refused = true;
    }
  });
  other.join();
  EXPECT_TRUE(refused);
  EXPECT_EQ(block_on(rt(), forty_two()), 42);  // the owner still drives it
}

// ---- sleep_for, spawn, post ------------------------------------------------

TEST_F(RuntimeTest, SleepForSleepsAtLeastTheDuration) {
  auto body = [](Runtime& rt) -> Task<Clock::duration> {
    auto start = Clock::now();
    co_await sleep_for(rt, 50ms);
    co_return Clock::now() - start;
  };
  auto slept = block_on(rt(), body(rt()));
  EXPECT_GE(slept, 50ms);
  EXPECT_LT(slept, 5s);  // generous: only catches a sleep that never ends on time
}

TEST_F(RuntimeTest, SleepsEndInDeadlineOrder) {
  std::vector<int> order;
  auto sleeper = [](Runtime& rt, std::vector<int>& order, int id,
                    std::chrono::milliseconds d) -> Task<void> {
    co_await sleep_for(rt, d);
    order.push_back(id);
  };
  spawn(rt(), sleeper(rt(), order, 3, 30ms));
  spawn(rt(), sleeper(rt(), order, 1, 0ms));
  spawn(rt(), sleeper(rt(), order, 2, 10ms));
  block_on(rt(), wait_until(rt(), [&] { return order.size() == 3; }));
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3}));
}

// Counts destructions, to see that a spawned task's frame is freed. Movable,
// so that it can be a parameter (moved into the frame when the task is made,
// before the task ever runs); a moved-from Tracker counts nothing.
struct Tracker {
  explicit Tracker(int& destroyed) : destroyed_(&destroyed) {}
  Tracker(Tracker&& other) noexcept : destroyed_(std::exchange(other.destroyed_, nullptr)) {}
  Tracker& operator=(Tracker&&) = delete;
  ~Tracker() {
    if (destroyed_ != nullptr) ++*destroyed_;
  }
  int* destroyed_;
};

TEST_F(RuntimeTest, SpawnRunsDetachedTasksAndFreesThem) {
  int finished = 0;
  int destroyed = 0;
  auto worker = [](Runtime& rt, int& finished, int& destroyed, int i) -> Task<void> {
    Tracker tracker(destroyed);
    co_await sleep_for(rt, std::chrono::milliseconds(i % 3));
    co_await nop(rt);
    ++finished;
  };
  for (int i = 0; i < 20; ++i) spawn(rt(), worker(rt(), finished, destroyed, i));
  EXPECT_EQ(finished, 0);  // spawn never runs the task inside the call
  block_on(rt(), wait_until(rt(), [&] { return finished == 20; }));
  EXPECT_EQ(destroyed, 20);
}

// Resumed by whoever sets it, on the loop thread.
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

TEST_F(RuntimeTest, PostFromOtherThreadsWakesBlockOn) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 250;
  Signal all_ran;
  int ran = 0;  // touched only by posted functions, on the loop thread
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      std::this_thread::sleep_for(20ms);  // block_on is parked with nothing to do by now
      for (int i = 0; i < kPerThread; ++i) {
        post(rt(), [&] {
          if (++ran == kThreads * kPerThread) all_ran.fire();
        });
      }
    });
  }
  auto body = [](Signal& s) -> Task<int> {
    co_await s;
    co_return 1;
  };
  EXPECT_EQ(block_on(rt(), body(all_ran)), 1);
  for (auto& t : threads) t.join();
  EXPECT_EQ(ran, kThreads * kPerThread);
}

// ---- Operations ------------------------------------------------------------

TEST_F(RuntimeTest, NopAndTimeoutComplete) {
  auto body = [](Runtime& rt) -> Task<Clock::duration> {
    Result<void> n = co_await nop(rt);
    EXPECT_TRUE(n) << n.error.message();
    auto start = Clock::now();
    Result<void> t = co_await timeout(rt, 20ms);
    EXPECT_TRUE(t) << t.error.message();  // -ETIME is the success case
    co_return Clock::now() - start;
  };
  auto took = block_on(rt(), body(rt()));
  EXPECT_GE(took, 19ms);  // the kernel's clock and ours may round apart by a hair
  EXPECT_LT(took, 5s);
}

TEST_F(RuntimeTest, OperationsOfOneTurnShareOneSubmission) {
  if (rt().backend_name() != "io_uring") GTEST_SKIP() << "batching is counted for io_uring";
  int done = 0;
  auto one_nop = [](Runtime& rt, int& done) -> Task<void> {
    auto r = co_await nop(rt);
    EXPECT_TRUE(r);
    ++done;
  };
  block_on(rt(), forty_two());  // let the ring's own internal ops settle
  Stats before = rt().stats();
  for (int i = 0; i < 64; ++i) spawn(rt(), one_nop(rt(), done));
  block_on(rt(), wait_until(rt(), [&] { return done == 64; }));
  Stats after = rt().stats();
  EXPECT_GE(after.sqes_submitted - before.sqes_submitted, 64u);
  EXPECT_GE(after.cqes_reaped - before.cqes_reaped, 64u);
  EXPECT_LT(after.enters - before.enters, 16u) << "64 nops should not cost 64 enters";
}

TEST_F(RuntimeTest, PollReportsReadiness) {
  SocketPair sp;
  ASSERT_EQ(::write(sp.fds[1], "x", 1), 1);
  auto body = [](Runtime& rt, int fd) -> Task<Result<unsigned>> {
    co_return co_await poll(rt, fd, POLLIN);
  };
  Result<unsigned> r = block_on(rt(), body(rt(), sp.fds[0]));
  EXPECT_TRUE(r) << r.error.message();
  EXPECT_TRUE(r.value & POLLIN);
}

TEST_F(RuntimeTest, FileWriteAndReadGiveTheBufferBack) {
  TempDir dir;
  const std::string path = dir.file("data");
  int fd = ::open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  auto body = [](Runtime& rt, int fd) -> Task<void> {
    BufferResult w = co_await write(rt, fd, bytes_of("hello, ring!"), 0);
    EXPECT_TRUE(w) << w.error.message();
    EXPECT_EQ(w.bytes, 12u);
    EXPECT_EQ(std::string(w.buffer.begin(), w.buffer.end()), "hello, ring!");

    BufferResult r = co_await read(rt, fd, Buffer(32, '.'), 7);
    EXPECT_TRUE(r) << r.error.message();
    EXPECT_EQ(r.bytes, 5u);
    EXPECT_EQ(r.buffer.size(), 32u);  // the whole buffer comes back
    EXPECT_EQ(std::string(r.buffer.begin(), r.buffer.begin() + 5), "ring!");
    EXPECT_EQ(r.buffer[5], '.');

    BufferResult eof = co_await read(rt, fd, Buffer(8), 100);
    EXPECT_TRUE(eof);
    EXPECT_EQ(eof.bytes, 0u);

    Result<void> c = co_await close(rt, fd);
    EXPECT_TRUE(c) << c.error.message();
  };
  block_on(rt(), body(rt(), fd));
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);  // closed through the backend
}

TEST_F(RuntimeTest, BadDescriptorsGiveErrorsNotCrashes) {
  auto body = [](Runtime& rt) -> Task<void> {
    BufferResult r = co_await read(rt, -1, Buffer(8, 'k'), 0);
    EXPECT_EQ(r.error, std::errc::bad_file_descriptor);
    EXPECT_EQ(r.buffer, Buffer(8, 'k'));
    BufferResult s = co_await recv(rt, 1 << 20, Buffer(4));
    EXPECT_EQ(s.error, std::errc::bad_file_descriptor);
    Result<void> c = co_await connect(rt, 0, nullptr, 0);
    EXPECT_EQ(c.error, std::errc::invalid_argument);
  };
  block_on(rt(), body(rt()));
}

Task<void> echo_connection(Runtime& rt, int fd) {
  for (;;) {
    BufferResult r = co_await recv(rt, fd, Buffer(4096));
    if (!r || r.bytes == 0) break;
    Buffer out(r.buffer.begin(), r.buffer.begin() + static_cast<std::ptrdiff_t>(r.bytes));
    if (co_await send_all(rt, fd, std::move(out))) break;
  }
  co_await close(rt, fd);
}

Task<void> echo_server(Runtime& rt, int listener, int connections) {
  for (int i = 0; i < connections; ++i) {
    Result<int> conn = co_await accept(rt, listener);
    EXPECT_TRUE(conn) << conn.error.message();
    if (!conn) co_return;
    spawn(rt, echo_connection(rt, conn.value));
  }
}

Task<void> echo_client(Runtime& rt, sockaddr_in addr, int id, int& ok) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  Result<void> c = co_await connect(rt, fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  EXPECT_TRUE(c) << c.error.message();
  bool good = static_cast<bool>(c);
  for (int round = 0; good && round < 5; ++round) {
    std::string msg = "client " + std::to_string(id) + " round " + std::to_string(round);
    good = !co_await send_all(rt, fd, bytes_of(msg));
    std::string got;
    Buffer buf(64);
    while (good && got.size() < msg.size()) {
      BufferResult r = co_await recv(rt, fd, std::move(buf));
      good = r && r.bytes > 0;
      got.append(r.buffer.data(), r.bytes);
      buf = std::move(r.buffer);
    }
    EXPECT_EQ(got, msg);
    good = good && got == msg;
  }
  Result<void> closed = co_await close(rt, fd);
  EXPECT_TRUE(closed);
  if (good) ++ok;
}

TEST_F(RuntimeTest, TcpEchoOnLoopback) {
  constexpr int kClients = 8;
  Listener listener;
  int ok = 0;
  spawn(rt(), echo_server(rt(), listener.fd, kClients));
  for (int i = 0; i < kClients; ++i) spawn(rt(), echo_client(rt(), listener.addr, i, ok));
  block_on(rt(), wait_until(rt(), [&] { return ok == kClients; }));
  EXPECT_EQ(ok, kClients);
}

TEST_F(RuntimeTest, CancelEndsAPendingRecv) {
  SocketPair sp;
  CancelToken token;
  auto canceller = [](Runtime& rt, CancelToken& token) -> Task<void> {
    co_await sleep_for(rt, 20ms);
    token.cancel();
  };
  auto receiver = [](Runtime& rt, int fd, CancelToken& token) -> Task<BufferResult> {
    co_return co_await recv(rt, fd, Buffer(16, 'z'), 0, &token);
  };
  spawn(rt(), canceller(rt(), token));
  auto start = Clock::now();
  BufferResult r = block_on(rt(), receiver(rt(), sp.fds[0], token));
  EXPECT_EQ(r.error, std::errc::operation_canceled) << r.error.message();
  EXPECT_EQ(r.bytes, 0u);
  EXPECT_EQ(r.buffer, Buffer(16, 'z'));  // the buffer comes back untouched
  EXPECT_LT(Clock::now() - start, 5s);
  EXPECT_TRUE(token.cancelled());

  // A cancelled token refuses new operations until reset.
  auto again = [](Runtime& rt, CancelToken& token) -> Task<int> {
    Result<void> t = co_await timeout(rt, 10s, &token);
    EXPECT_EQ(t.error, std::errc::operation_canceled);
    token.reset();
    Result<void> n = co_await nop(rt, &token);
    EXPECT_TRUE(n);
    co_return 0;
  };
  EXPECT_EQ(block_on(rt(), again(rt(), token)), 0);
}

TEST_F(RuntimeTest, OneTokenCancelsSeveralOperations) {
  SocketPair sp;
  CancelToken token;
  int cancelled = 0;
  auto waiter = [](Runtime& rt, int fd, CancelToken& token, int& cancelled) -> Task<void> {
    Result<unsigned> r = co_await poll(rt, fd, POLLIN, &token);
    if (r.error == std::errc::operation_canceled) ++cancelled;
  };
  auto sleeper = [](Runtime& rt, CancelToken& token, int& cancelled) -> Task<void> {
    Result<void> r = co_await timeout(rt, 30s, &token);
    if (r.error == std::errc::operation_canceled) ++cancelled;
  };
  spawn(rt(), waiter(rt(), sp.fds[0], token, cancelled));
  spawn(rt(), waiter(rt(), sp.fds[0], token, cancelled));
  spawn(rt(), sleeper(rt(), token, cancelled));
  auto body = [](Runtime& rt, CancelToken& token, int& cancelled) -> Task<void> {
    co_await sleep_for(rt, 10ms);
    token.cancel();
    co_await wait_until(rt, [&] { return cancelled == 3; });
  };
  block_on(rt(), body(rt(), token, cancelled));
  EXPECT_EQ(cancelled, 3);
}

TEST_F(RuntimeTest, TokenMayDieBeforeItsOperations) {
  SocketPair sp;
  auto body = [](Runtime& rt, int fd) -> Task<BufferResult> {
    auto token = std::make_unique<CancelToken>();
    auto awaitable = recv(rt, fd, Buffer(4), 0, token.get());
    token.reset();  // before the op even starts
    co_return co_await awaitable;
  };
  std::thread writer([&] {
    std::this_thread::sleep_for(20ms);
    EXPECT_EQ(::write(sp.fds[1], "abc", 3), 3);
  });
  BufferResult r = block_on(rt(), body(rt(), sp.fds[0]));
  writer.join();
  EXPECT_TRUE(r) << r.error.message();
  EXPECT_EQ(r.bytes, 3u);
}

// ---- Teardown --------------------------------------------------------------

TEST_F(RuntimeTest, DestroyingTheRuntimeEndsUnfinishedSpawnedTasks) {
  SocketPair sp;
  int destroyed = 0;
  int resumed = 0;
  // Blocked in recv: the kernel holds the op and its buffer.
  auto in_recv = [](Runtime& rt, int fd, int& destroyed, int& resumed) -> Task<void> {
    Tracker tracker(destroyed);
    BufferResult r = co_await recv(rt, fd, Buffer(1 << 16));
    ++resumed;
    (void)r;
  };
  // Awaiting a child task that is itself blocked in recv.
  auto in_child = [](Runtime& rt, int fd, int& destroyed, int& resumed, auto child) -> Task<void> {
    Tracker tracker(destroyed);
    co_await child(rt, fd, destroyed, resumed);
    ++resumed;
  };
  // Sleeping on a timer, and in a long timeout op.
  auto sleeping = [](Runtime& rt, int& destroyed, int& resumed) -> Task<void> {
    Tracker tracker(destroyed);
    co_await sleep_for(rt, 1h);
    ++resumed;
  };
  auto in_timeout = [](Runtime& rt, int& destroyed, int& resumed) -> Task<void> {
    Tracker tracker(destroyed);
    co_await timeout(rt, 1h);
    ++resumed;
  };
  // Spawned but never started: its frame holds only its parameters.
  auto unstarted = [](Runtime& rt, [[maybe_unused]] Tracker tracker, int& resumed) -> Task<void> {
    co_await nop(rt);
    ++resumed;
  };

  spawn(rt(), in_recv(rt(), sp.fds[0], destroyed, resumed));
  spawn(rt(), in_child(rt(), sp.fds[0], destroyed, resumed, in_recv));
  spawn(rt(), sleeping(rt(), destroyed, resumed));
  spawn(rt(), in_timeout(rt(), destroyed, resumed));
  block_on(rt(), [](Runtime& rt) -> Task<void> { co_await sleep_for(rt, 20ms); }(rt()));
  EXPECT_EQ(destroyed, 0);
  spawn(rt(), unstarted(rt(), Tracker(destroyed), resumed));
  {
    Watchdog watchdog(5s, "~Runtime");
    rt_.reset();
  }
  EXPECT_EQ(destroyed, 6);  // every frame, including the child's and the unstarted one
  EXPECT_EQ(resumed, 0);    // and none resumed into code that would submit more
}

TEST_F(RuntimeTest, DestroyingTheRuntimeWithAConnectionInFlight) {
  Listener listener;
  int destroyed = 0;
  auto server = [](Runtime& rt, int fd, int& destroyed) -> Task<void> {
    Tracker tracker(destroyed);
    Result<int> conn = co_await accept(rt, fd);
    if (!conn) co_return;
    BufferResult r = co_await recv(rt, conn.value, Buffer(1024));
    (void)r;
    ::close(conn.value);
  };
  spawn(rt(), server(rt(), listener.fd, destroyed));
  int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(client, 0);
  ASSERT_EQ(::connect(client, reinterpret_cast<sockaddr*>(&listener.addr), sizeof listener.addr),
            0);
  block_on(rt(), [](Runtime& rt) -> Task<void> { co_await sleep_for(rt, 20ms); }(rt()));
  {
    Watchdog watchdog(5s, "~Runtime");
    rt_.reset();
  }
  EXPECT_EQ(destroyed, 1);
  ::close(client);
}

// ---- Attached to a libuv loop ----------------------------------------------

class RuntimeOnUv : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }
  void TearDown() override {
    if (!finished_) finish();  // a skipped test, or one that failed an ASSERT
  }
  bool build() {
    rt_ = try_build(Runtime::Builder().attach(&loop_));
    return rt_.has_value();
  }
  Runtime& rt() { return *rt_; }

  // Every test ends here while its handles are still alive: the Runtime goes
  // first and leaves no handle behind, so once the test's own are closed the
  // loop has nothing left and closes cleanly.
  void finish() {
    finished_ = true;
    rt_.reset();
    uv_walk(
        &loop_,
        [](uv_handle_t* h, void*) {
          if (!uv_is_closing(h)) uv_close(h, nullptr);
        },
        nullptr);
    EXPECT_EQ(uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(uv_loop_close(&loop_), 0);
  }

  uv_loop_t loop_;
  // The tests' handles live here, so that they outlive finish() even when a
  // test ends early.
  uv_timer_t timer_;
  uv_async_t async_;
  std::optional<Runtime> rt_;
  bool finished_ = false;
  Watchdog watchdog_{20s, "test"};
};

TEST_F(RuntimeOnUv, LibuvTimerFiresInsideBlockOn) {
  if (!build()) GTEST_SKIP() << "RINGPARK_BACKEND=uring but io_uring is unusable here";
  EXPECT_EQ(rt().loop(), &loop_);
  struct State {
    Clock::time_point start = Clock::now();
    std::optional<Clock::duration> fired_after;
    int fired_during_sleep = -1;
  } state;
  uv_timer_t& timer = timer_;
  ASSERT_EQ(uv_timer_init(&loop_, &timer), 0);
  timer.data = &state;
  ASSERT_EQ(uv_timer_start(
                &timer,
                [](uv_timer_t* t) {
                  auto* s = static_cast<State*>(t->data);
                  s->fired_after = Clock::now() - s->start;
                },
                30, 0),
            0);
  auto body = [](Runtime& rt, State& s) -> Task<void> {
    co_await sleep_for(rt, 150ms);  // ringpark's timer layer
    s.fired_during_sleep = s.fired_after.has_value() ? 1 : 0;
    Result<void> t = co_await timeout(rt, 10ms);  // an io op, libuv idle
    EXPECT_TRUE(t) << t.error.message();
  };
  block_on(rt(), body(rt(), state));
  EXPECT_EQ(state.fired_during_sleep, 1);
  ASSERT_TRUE(state.fired_after.has_value());
  EXPECT_GE(*state.fired_after, 29ms);
  EXPECT_LT(*state.fired_after, 140ms) << "the libuv timer ran late, not inside the sleep";
  finish();
}

TEST_F(RuntimeOnUv, LibuvFdEventWakesBlockOn) {
  // No timer anywhere: only libuv's fd (an async's eventfd, in its epoll set)
  // can wake the parked runtime; the async callback then cancels ringpark's op.
  if (!build()) GTEST_SKIP() << "RINGPARK_BACKEND=uring but io_uring is unusable here";
  struct State {
    CancelToken token;
    int async_calls = 0;
  } state;
  uv_async_t& async = async_;
  ASSERT_EQ(uv_async_init(&loop_, &async,
                          [](uv_async_t* a) {
                            auto* s = static_cast<State*>(a->data);
                            ++s->async_calls;
                            s->token.cancel();
                          }),
            0);
  async.data = &state;
  std::thread sender([&] {
    std::this_thread::sleep_for(30ms);
    uv_async_send(&async);
  });
  auto body = [](Runtime& rt, CancelToken& token) -> Task<Result<void>> {
    co_return co_await timeout(rt, 30s, &token);
  };
  auto start = Clock::now();
  Result<void> r = block_on(rt(), body(rt(), state.token));
  sender.join();
  EXPECT_EQ(r.error, std::errc::operation_canceled);
  EXPECT_EQ(state.async_calls, 1);
  EXPECT_LT(Clock::now() - start, 5s);
  finish();
}

TEST_F(RuntimeOnUv, RingparkTasksMayBeStartedFromLibuvCallbacks) {
  if (!build()) GTEST_SKIP() << "RINGPARK_BACKEND=uring but io_uring is unusable here";
  struct State {
    Runtime* rt;
    int done = 0;
  } state{&rt()};
  uv_timer_t& timer = timer_;
  ASSERT_EQ(uv_timer_init(&loop_, &timer), 0);
  timer.data = &state;
  uv_timer_start(
      &timer,
      [](uv_timer_t* t) {
        auto* s = static_cast<State*>(t->data);
        auto task = [](Runtime& rt, int& done) -> Task<void> {
          auto r = co_await nop(rt);
          EXPECT_TRUE(r);
          ++done;
        };
        spawn(*s->rt, task(*s->rt, s->done));
      },
      5, 5);
  block_on(rt(), wait_until(rt(), [&] { return state.done >= 3; }));
  EXPECT_GE(state.done, 3);
  finish();
}

}  // namespace
}  // namespace ringpark::test
