// kernel.io_uring_disabled (Linux 6.6): 1 lets only CAP_SYS_ADMIN (and the
// kernel.io_uring_group) set up rings, 2 lets nobody. Either way a loop must
// come up on the epoll fallback, say so in rp_backend() (and the C++ Runtime
// in backend_name()), and work.
//
// The sysctl is machine-wide, so the CTest entry runs alone (RUN_SERIAL) and
// the value is changed for as short a time as possible: set in this process,
// read by a forked child when it sets up its loop, restored the moment the
// child has reported its backend; only then does the child go on to check
// that the fallback works. The original value is written back whatever
// happens: by this process when the test ends, and, should this process die
// first, by a small guardian process that waits for it to go away.
//
// Needs root (to write the sysctl); skips without it or without the sysctl.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "child.hpp"
#include "ringpark.h"
#include "ringpark/runtime.hpp"

namespace {

using namespace std::chrono_literals;
using ringpark::test::ChildOutcome;
using ringpark::test::run_in_child;

constexpr const char* kSysctl = "/proc/sys/kernel/io_uring_disabled";
constexpr uid_t kNobody = 65534;

// Reads the sysctl; false if it cannot (absent: a kernel before 6.6).
bool read_value(std::string* out) {
  int fd = ::open(kSysctl, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[16] = {};
  ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return false;
  *out = std::string(buf, static_cast<std::size_t>(n));
  while (!out->empty() && (out->back() == '\n' || out->back() == ' ')) out->pop_back();
  return true;
}

bool write_value(const std::string& value) {
  int fd = ::open(kSysctl, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, value.data(), value.size()) == static_cast<ssize_t>(value.size());
  ::close(fd);
  return ok;
}

// Owns a change of the sysctl: restore() (also from the destructor) writes the
// original value back. A guardian process, forked before the first change,
// writes it back too as soon as this process is gone, however it ended (its
// end of a pipe then reads EOF).
class SysctlGuard {
 public:
  // Empty when the guard is usable; otherwise why not (the test skips).
  std::string start() {
    if (!read_value(&original_)) return std::string(kSysctl) + " is absent (kernel before 6.6)";
    if (::geteuid() != 0) return "writing kernel.io_uring_disabled needs root";
    if (!write_value(original_))
      return std::string("cannot write ") + kSysctl + ": " + std::strerror(errno);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return std::string("pipe2: ") + std::strerror(errno);
    std::fflush(nullptr);
    guardian_ = ::fork();
    if (guardian_ < 0) return std::string("fork: ") + std::strerror(errno);
    if (guardian_ == 0) {
      // Holds nothing of the test's (CTest waits for its output pipes to close).
      int null_fd = ::open("/dev/null", O_RDWR);
      ::dup2(null_fd, STDIN_FILENO);
      ::dup2(null_fd, STDOUT_FILENO);
      ::dup2(null_fd, STDERR_FILENO);
      ::close(fds[1]);
      char c;
      while (::read(fds[0], &c, 1) != 0 && errno == EINTR) {
      }
      write_value(original_);
      ::_exit(0);
    }
    ::close(fds[0]);
    guardian_pipe_ = fds[1];
    return {};
  }

  bool set(const std::string& value) { return write_value(value); }

  // Writes the original value back. Returns false (and the test fails) if the
  // machine is left changed.
  bool restore() {
    if (original_.empty()) return true;
    if (!write_value(original_)) return false;
    std::string now;
    return read_value(&now) && now == original_;
  }

  ~SysctlGuard() {
    restore();
    if (guardian_pipe_ >= 0) ::close(guardian_pipe_);  // the guardian restores once more and exits
    if (guardian_ > 0) ::waitpid(guardian_, nullptr, 0);
  }

  const std::string& original() const { return original_; }

 private:
  std::string original_;
  pid_t guardian_ = -1;
  int guardian_pipe_ = -1;
};

// Drops every privilege: no supplementary groups, gid and uid nobody (which
// clears the capabilities, CAP_SYS_ADMIN among them).
bool become_nobody() {
  return ::setgroups(0, nullptr) == 0 && ::setresgid(kNobody, kNobody, kNobody) == 0 &&
         ::setresuid(kNobody, kNobody, kNobody) == 0;
}

// What the child reports once its loop is set up: both backends, on one line.
struct Reported {
  std::string loop_backend;
  std::string runtime_backend;
};

// Checks, in the child, that the loop it already set up works: a libuv timer,
// an rp_fs_stat, and an echo over rp_tcp_t on 127.0.0.1.
struct Echo {
  rp_tcp_t server{}, client{}, accepted{};
  rp_connect_t connect{};
  rp_write_t write{};
  std::string got;
  int closes = 0;
};

void check_loop_works(uv_loop_t* loop) {
  // A timer.
  uv_timer_t timer;
  bool fired = false;
  uv_timer_init(loop, &timer);
  timer.data = &fired;
  uv_timer_start(
      &timer, [](uv_timer_t* t) { *static_cast<bool*>(t->data) = true; }, 10, 0);
  // A file operation.
  uv_fs_t stat_req;
  int stat_result = 1;
  stat_req.data = &stat_result;
  ASSERT_EQ(rp_fs_stat(loop, &stat_req, "/",
                       [](uv_fs_t* r) {
                         *static_cast<int*>(r->data) = static_cast<int>(r->result);
                         uv_fs_req_cleanup(r);
                       }),
            0);
  // A TCP echo: the client writes "ping", the accepted side reads it.
  Echo e;
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", 0, &addr);
  ASSERT_EQ(rp_tcp_init(loop, &e.server), 0);
  ASSERT_EQ(rp_tcp_init(loop, &e.client), 0);
  ASSERT_EQ(rp_tcp_init(loop, &e.accepted), 0);
  e.server.data = e.client.data = e.accepted.data = &e;
  ASSERT_EQ(rp_tcp_bind(&e.server, reinterpret_cast<const sockaddr*>(&addr), 0), 0);
  int len = sizeof addr;
  ASSERT_EQ(rp_tcp_getsockname(&e.server, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(rp_listen(&e.server, 8,
                      [](rp_tcp_t* s, int status) {
                        auto* echo = static_cast<Echo*>(s->data);
                        if (status != 0 || rp_accept(s, &echo->accepted) != 0) return;
                        rp_read_start(
                            &echo->accepted,
                            [](rp_tcp_t*, size_t n, uv_buf_t* b) {
                              *b = uv_buf_init(static_cast<char*>(std::malloc(n)), n);
                            },
                            [](rp_tcp_t* h, ssize_t n, const uv_buf_t* b) {
                              auto* echo = static_cast<Echo*>(h->data);
                              if (n > 0) echo->got.append(b->base, static_cast<std::size_t>(n));
                              std::free(b->base);
                            });
                      }),
            0);
  ASSERT_EQ(
      rp_tcp_connect(&e.connect, &e.client, reinterpret_cast<const sockaddr*>(&addr), nullptr), 0);
  static char ping[] = "ping";
  uv_buf_t buf = uv_buf_init(ping, 4);
  ASSERT_EQ(rp_write(&e.write, &e.client, &buf, 1, nullptr), 0);

  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while ((!fired || stat_result == 1 || e.got.size() < 4) &&
         std::chrono::steady_clock::now() < deadline) {
    rp_uv_run(loop, UV_RUN_NOWAIT);
    ::poll(nullptr, 0, 1);
  }
  EXPECT_TRUE(fired) << "the libuv timer did not fire";
  EXPECT_EQ(stat_result, 0) << "rp_fs_stat(\"/\")";
  EXPECT_EQ(e.got, "ping") << "the TCP echo";
  auto on_close = [](rp_tcp_t* h) { ++static_cast<Echo*>(h->data)->closes; };
  rp_close(&e.server, on_close);
  rp_close(&e.client, on_close);
  rp_close(&e.accepted, on_close);
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), nullptr);
  while (e.closes < 3 && std::chrono::steady_clock::now() < deadline) {
    rp_uv_run(loop, UV_RUN_NOWAIT);
    ::poll(nullptr, 0, 1);
  }
  EXPECT_EQ(e.closes, 3);
  EXPECT_EQ(rp_uv_run(loop, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_loop_close(loop), 0);
}

// Sets the sysctl to `value`, runs a child (as nobody when `drop_privileges`)
// that sets up a loop and a C++ Runtime and reports their backends, restores
// the sysctl as soon as the report is in, and lets the child check that its
// loop works. Returns what the child reported.
Reported run_with_sysctl(SysctlGuard& guard, const std::string& value, bool drop_privileges) {
  Reported reported;
  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return reported;
  }
  if (!guard.set(value)) {
    ADD_FAILURE() << "cannot set kernel.io_uring_disabled=" << value << ": "
                  << std::strerror(errno);
    return reported;
  }
  // The restore waits for the child's report, and the child then checks that
  // its loop works.
  ChildOutcome outcome;
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(report[0]);
    if (drop_privileges && !become_nobody()) {
      std::printf("cannot become uid %u: %s\n", kNobody, std::strerror(errno));
      ::_exit(ringpark::test::kChildFail);
    }
    // Leave the choice to ringpark, whatever the runner set.
    ::unsetenv("RINGPARK_BACKEND");
    uv_loop_t loop;
    uv_loop_init(&loop);
    std::string line = rp_backend(&loop);
    {
      ringpark::Runtime rt = ringpark::Runtime::Builder().build();
      line += "\n" + rt.backend_name() + "\n";
    }
    (void)!::write(report[1], line.data(), line.size());
    ::close(report[1]);
    // The sysctl is restored from here on: the fallback must go on working.
    check_loop_works(&loop);
    std::fflush(nullptr);
    ::_exit(::testing::Test::HasFailure() ? ringpark::test::kChildFail
                                          : ringpark::test::kChildPass);
  }
  ::close(report[1]);
  std::string text;
  if (pid > 0) {
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    char buf[256];
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                            deadline - std::chrono::steady_clock::now())
                            .count();
      pollfd p{report[0], POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
      ssize_t n = ::read(report[0], buf, sizeof buf);
      if (n <= 0) break;
      text.append(buf, static_cast<std::size_t>(n));
    }
  }
  // The machine gets its value back before anything else is checked.
  EXPECT_TRUE(guard.restore()) << "kernel.io_uring_disabled was not restored to "
                               << guard.original();
  ::close(report[0]);
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return reported;
  }
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (::waitpid(pid, &outcome.status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &outcome.status, 0);
      outcome.timed_out = true;
      break;
    }
    ::poll(nullptr, 0, 5);
  }
  EXPECT_TRUE(outcome.passed()) << outcome.describe();
  const std::size_t nl = text.find('\n');
  if (nl != std::string::npos) {
    reported.loop_backend = text.substr(0, nl);
    const std::size_t nl2 = text.find('\n', nl + 1);
    reported.runtime_backend = text.substr(nl + 1, nl2 == std::string::npos ? nl2 : nl2 - nl - 1);
  }
  return reported;
}

// What rp_backend() says for each value (runtime/probe: the reason names the
// sysctl, and for 1 the group that may still set up rings).
std::string expected_backend(const std::string& value) {
  const std::string eperm = "epoll (io_uring_setup: EPERM (kernel.io_uring_disabled=";
  if (value == "2") return eperm + "2: io_uring is off for everyone))";
  std::string group = "-1";
  if (int fd = ::open("/proc/sys/kernel/io_uring_group", O_RDONLY | O_CLOEXEC); fd >= 0) {
    char buf[32] = {};
    if (::read(fd, buf, sizeof buf - 1) > 0) group = std::to_string(std::atol(buf));
    ::close(fd);
  }
  if (group == "-1") {
    return eperm +
           "1, kernel.io_uring_group=-1: only processes with CAP_SYS_ADMIN may set up a ring))";
  }
  return eperm + "1: only processes with CAP_SYS_ADMIN or in group " + group +
         ", kernel.io_uring_group, may set up a ring))";
}

class IoUringDisabled : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string why = guard_.start(); !why.empty()) GTEST_SKIP() << why;
    if (guard_.original() != "0") {
      GTEST_SKIP() << "kernel.io_uring_disabled is " << guard_.original()
                   << " already: the io_uring control case cannot run";
    }
  }
  SysctlGuard guard_;
};

TEST_F(IoUringDisabled, OneMakesAnUnprivilegedProcessFallBackToEpoll) {
  const Reported r = run_with_sysctl(guard_, "1", /*drop_privileges=*/true);
  EXPECT_EQ(r.loop_backend, expected_backend("1"));
  EXPECT_EQ(r.runtime_backend, expected_backend("1"));
}

TEST_F(IoUringDisabled, OneStillLetsRootUseIoUring) {
  // The control for the test above: the same value, a privileged child.
  const Reported r = run_with_sysctl(guard_, "1", /*drop_privileges=*/false);
  EXPECT_EQ(r.loop_backend, "io_uring");
  EXPECT_EQ(r.runtime_backend, "io_uring");
}

TEST_F(IoUringDisabled, TwoMakesEvenRootFallBackToEpoll) {
  const Reported r = run_with_sysctl(guard_, "2", /*drop_privileges=*/false);
  EXPECT_EQ(r.loop_backend, expected_backend("2"));
  EXPECT_EQ(r.runtime_backend, expected_backend("2"));
}

TEST_F(IoUringDisabled, GuardianRestoresTheValueWhenItsProcessIsKilled) {
  // The safety net of the tests above: a process that changed the value is
  // killed before it could restore it; its guardian writes the value back.
  ChildOutcome outcome = run_in_child(
      [] {
        SysctlGuard inner;
        if (!inner.start().empty() || !inner.set("2")) ::_exit(ringpark::test::kChildFail);
        ::raise(SIGKILL);
      },
      10s);
  ASSERT_TRUE(WIFSIGNALED(outcome.status)) << outcome.describe();
  std::string now;
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (read_value(&now) && now != "0" && std::chrono::steady_clock::now() < deadline) {
    ::poll(nullptr, 0, 10);
  }
  EXPECT_EQ(now, "0") << "the guardian did not restore kernel.io_uring_disabled";
}

}  // namespace
