// The fallback as a program meets it: io_uring_setup refused by a seccomp filter
// (Docker's default profile says EPERM; a kernel without io_uring, ENOSYS).
// Each test forks; the child sets its own environment (so the tests mean the
// same under any RINGPARK_BACKEND the runner sets, and run once, not per
// backend), installs the filter, and checks with plain code (no gtest in the
// child): the backend reported, a libuv TCP echo under rp_uv_run, and
// ringpark's own socket and timeout ops on that loop. The child reports
// through its exit status and one line per failure on stderr, which the
// parent collects and shows.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <netinet/in.h>
#include <poll.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using ringpark::detail::IoBackend;
using ringpark::detail::LoopContext;
using ringpark::detail::Op;
using ringpark::detail::OpCode;

// Exit statuses of a child.
constexpr int kPass = 0;
constexpr int kFail = 1;
constexpr int kSkip = 77;  // the machine cannot run the check; stderr says why

// A failure line on the child's stderr (the parent shows it).
void fail_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fail_line(const char* fmt, ...) {
  std::va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stderr);
}

// Everything the test knows about a finished child.
struct ChildResult {
  bool timed_out = false;
  int status = 0;      // from waitpid
  std::string output;  // the child's stderr

  bool passed() const { return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == kPass; }
  bool skipped() const { return !timed_out && WIFEXITED(status) && WEXITSTATUS(status) == kSkip; }
  std::string describe() const {
    std::string what;
    if (timed_out) {
      what = "killed after the time limit";
    } else if (WIFEXITED(status)) {
      what = "exit status " + std::to_string(WEXITSTATUS(status));
    } else if (WIFSIGNALED(status)) {
      what = std::string("killed by signal ") + strsignal(WTERMSIG(status));
    } else {
      what = "status " + std::to_string(status);
    }
    return what + "; child's stderr:\n" + output;
  }
};

// Runs `body` in a forked child whose stderr the parent collects; the child
// exits with body's return value. Kills the child if it outlives `limit`.
ChildResult run_in_child(const std::function<int()>& body, std::chrono::seconds limit = 20s) {
  ChildResult result;
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    result.output = std::string("pipe2: ") + std::strerror(errno);
    result.status = kFail << 8;
    return result;
  }
  std::fflush(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    result.output = std::string("fork: ") + std::strerror(errno);
    result.status = kFail << 8;
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    return result;
  }
  if (pid == 0) {
    ::dup2(pipe_fds[1], STDERR_FILENO);
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    int code = body();
    std::fflush(nullptr);
    ::_exit(code);
  }
  ::close(pipe_fds[1]);

  const auto deadline = Clock::now() + limit;
  bool eof = false;
  while (!eof) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) break;
    pollfd pfd{pipe_fds[0], POLLIN, 0};
    int n = ::poll(&pfd, 1, static_cast<int>(left));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    char buf[4096];
    ssize_t got = ::read(pipe_fds[0], buf, sizeof buf);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      eof = true;
    } else {
      result.output.append(buf, static_cast<std::size_t>(got));
    }
  }
  ::close(pipe_fds[0]);

  // The pipe closes when the child (and every thread of it) is gone; give the
  // exit a moment to become visible, then enforce the limit.
  for (;;) {
    pid_t r = ::waitpid(pid, &result.status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) break;
    if (Clock::now() >= deadline) {
      result.timed_out = true;
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &result.status, 0);
      break;
    }
    ::usleep(1000);
  }
  return result;
}

// In the child: make io_uring_setup fail with `err`, everything else allowed.
// Returns kPass, or kSkip when the machine has no seccomp to install.
int refuse_io_uring_setup(int err) {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) {
    fail_line("seccomp_init failed");
    return kSkip;
  }
  int r = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(static_cast<std::uint32_t>(err)),
                           SCMP_SYS(io_uring_setup), 0);
  if (r != 0) {
    seccomp_release(ctx);
    fail_line("seccomp_rule_add(io_uring_setup): %s", std::strerror(-r));
    return kSkip;
  }
  r = seccomp_load(ctx);
  seccomp_release(ctx);
  if (r != 0) {
    fail_line("seccomp_load: %s (no seccomp on this machine?)", std::strerror(-r));
    return kSkip;
  }
  // The filter must really be in force, or the test proves nothing.
  io_uring_params params;
  std::memset(&params, 0, sizeof params);
  long fd = ::syscall(__NR_io_uring_setup, 4, &params);
  if (fd >= 0 || errno != err) {
    fail_line("after the filter, io_uring_setup gave %ld (errno %s), expected errno %s", fd,
              strerrorname_np(errno), strerrorname_np(err));
    if (fd >= 0) ::close(static_cast<int>(fd));
    return kFail;
  }
  return kPass;
}

// ---------------------------------------------------------------------------
// A libuv TCP echo over 127.0.0.1, plain libuv handles, run with rp_uv_run.

constexpr char kMessage[] = "hello through ringpark's loop";

struct UvEcho {
  uv_loop_t* loop = nullptr;
  uv_tcp_t server, client, accepted;
  uv_connect_t connect_req;
  uv_write_t client_write, echo_write;
  uv_timer_t watchdog;
  char read_buf[256];
  std::string echo;      // what the server got, written back from here
  std::string received;  // what the client got back
  int failures = 0;

  void fail(const char* what, int status) {
    fail_line("libuv echo: %s: %s", what, uv_strerror(status));
    ++failures;
    uv_stop(loop);
  }
};

void on_alloc(uv_handle_t* h, std::size_t, uv_buf_t* buf) {
  auto* e = static_cast<UvEcho*>(h->data);
  *buf = uv_buf_init(e->read_buf, sizeof e->read_buf);
}

void on_server_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* e = static_cast<UvEcho*>(s->data);
  if (n == UV_EOF) {
    uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
    return;
  }
  if (n < 0) return e->fail("server read", static_cast<int>(n));
  if (n == 0) return;
  // One write in flight at a time keeps `echo` stable while libuv holds it.
  e->echo.assign(buf->base, static_cast<std::size_t>(n));
  uv_read_stop(s);
  uv_buf_t out = uv_buf_init(e->echo.data(), static_cast<unsigned>(e->echo.size()));
  int r = uv_write(&e->echo_write, s, &out, 1, [](uv_write_t* req, int status) {
    auto* e = static_cast<UvEcho*>(req->handle->data);
    if (status < 0) return e->fail("echo write", status);
    uv_read_start(req->handle, on_alloc, on_server_read);
  });
  if (r < 0) e->fail("uv_write (echo)", r);
}

void on_connection(uv_stream_t* server, int status) {
  auto* e = static_cast<UvEcho*>(server->data);
  if (status < 0) return e->fail("connection", status);
  uv_tcp_init(e->loop, &e->accepted);
  e->accepted.data = e;
  int r = uv_accept(server, reinterpret_cast<uv_stream_t*>(&e->accepted));
  if (r < 0) return e->fail("uv_accept", r);
  r = uv_read_start(reinterpret_cast<uv_stream_t*>(&e->accepted), on_alloc, on_server_read);
  if (r < 0) e->fail("uv_read_start (server)", r);
}

void on_client_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* e = static_cast<UvEcho*>(s->data);
  if (n < 0) return e->fail("client read", static_cast<int>(n));
  e->received.append(buf->base, static_cast<std::size_t>(n));
  if (e->received.size() >= sizeof kMessage - 1) {
    // Done: the client's close sends FIN, on which the server closes its end.
    uv_close(reinterpret_cast<uv_handle_t*>(&e->client), nullptr);
    uv_close(reinterpret_cast<uv_handle_t*>(&e->server), nullptr);
  }
}

void on_connect(uv_connect_t* req, int status) {
  auto* e = static_cast<UvEcho*>(req->handle->data);
  if (status < 0) return e->fail("connect", status);
  uv_buf_t out = uv_buf_init(const_cast<char*>(kMessage), sizeof kMessage - 1);
  int r = uv_write(&e->client_write, req->handle, &out, 1, [](uv_write_t* w, int st) {
    if (st < 0) static_cast<UvEcho*>(w->handle->data)->fail("client write", st);
  });
  if (r < 0) return e->fail("uv_write (client)", r);
  r = uv_read_start(req->handle, on_alloc, on_client_read);
  if (r < 0) e->fail("uv_read_start (client)", r);
}

// Returns the number of failures (each reported on stderr). `ringpark_runs`:
// whether ringpark has a part in the loop (and so must count turns).
int libuv_echo(uv_loop_t* loop, bool ringpark_runs = true) {
  UvEcho e;
  e.loop = loop;
  // Unreferenced: ends a stuck run with a message instead of the parent's kill.
  uv_timer_init(loop, &e.watchdog);
  e.watchdog.data = &e;
  uv_timer_start(
      &e.watchdog,
      [](uv_timer_t* t) {
        auto* e = static_cast<UvEcho*>(t->data);
        fail_line("libuv echo: no round trip within 10 s (got %zu of %zu bytes back)",
                  e->received.size(), sizeof kMessage - 1);
        ++e->failures;
        uv_stop(t->loop);
      },
      10'000, 0);
  uv_unref(reinterpret_cast<uv_handle_t*>(&e.watchdog));

  sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, &e.server);
  e.server.data = &e;
  int r = uv_tcp_bind(&e.server, reinterpret_cast<const sockaddr*>(&addr), 0);
  if (r == 0) r = uv_listen(reinterpret_cast<uv_stream_t*>(&e.server), 8, on_connection);
  int len = sizeof addr;
  if (r == 0) r = uv_tcp_getsockname(&e.server, reinterpret_cast<sockaddr*>(&addr), &len);
  if (r < 0) {
    fail_line("libuv echo: listen on 127.0.0.1: %s", uv_strerror(r));
    return 1;
  }
  uv_tcp_init(loop, &e.client);
  e.client.data = &e;
  r = uv_tcp_connect(&e.connect_req, &e.client, reinterpret_cast<const sockaddr*>(&addr),
                     on_connect);
  if (r < 0) {
    fail_line("libuv echo: uv_tcp_connect: %s", uv_strerror(r));
    return 1;
  }

  r = rp_uv_run(loop, UV_RUN_DEFAULT);
  if (e.failures == 0) {
    if (r != 0) {
      fail_line("libuv echo: rp_uv_run returned %d with nothing left to do", r);
      ++e.failures;
    }
    if (e.received != kMessage) {
      fail_line("libuv echo: got back \"%s\"", e.received.c_str());
      ++e.failures;
    }
  }
  // Close whatever is still open (all of it after a failure), then the watchdog.
  uv_walk(
      loop,
      [](uv_handle_t* h, void*) {
        if (!uv_is_closing(h)) uv_close(h, nullptr);
      },
      nullptr);
  rp_uv_run(loop, UV_RUN_DEFAULT);

  rp_stats_t stats;
  rp_stats(loop, &stats);
  if (ringpark_runs && stats.turns == 0) {
    fail_line("libuv echo: rp_stats turns == 0 after rp_uv_run");
    ++e.failures;
  }
  return e.failures;
}

// ---------------------------------------------------------------------------
// Ringpark's own ops on the same loop: accept + connect, send/recv both ways,
// a timeout, a cancelled recv and close, each checked as it completes.

struct OpsEcho {
  IoBackend* io = nullptr;
  int listen_fd = -1, client_fd = -1, server_fd = -1;
  sockaddr_in addr{};
  sockaddr_in peer{};
  unsigned peer_len = sizeof peer;
  Op accept, connect, send_ping, recv_ping, send_echo, recv_echo, timeout, idle_recv, close_server,
      close_client, close_listen;
  char server_buf[64] = {};
  char client_buf[64] = {};
  char idle_buf[16] = {};
  Clock::time_point timeout_start;
  bool accept_done = false;
  bool connect_done = false;
  int completions = 0;
  int closes_left = 3;
  int failures = 0;
  bool done = false;

  // Ends the sequence: `what` completed with `res`, which it should not have.
  void fail(const char* what, int res) {
    fail_line("ops: %s: res %d (%s)", what, res, res < 0 ? strerrorname_np(-res) : "not an error");
    ++failures;
    done = true;
  }
  void prepare(Op& op, OpCode code, int fd) {
    op.code = code;
    op.fd = fd;
    op.data = this;
    op.complete = &OpsEcho::on_complete;
  }
  void submit(Op& op) { io->submit(&op); }

  void start() {
    prepare(accept, OpCode::accept, listen_fd);
    accept.addr = reinterpret_cast<sockaddr*>(&peer);
    accept.addrlen = &peer_len;
    prepare(connect, OpCode::connect, client_fd);
    connect.addr = reinterpret_cast<sockaddr*>(&addr);
    connect.len = sizeof addr;
    submit(accept);
    submit(connect);
  }

  void connected() {
    prepare(send_ping, OpCode::send, client_fd);
    send_ping.buf = const_cast<char*>("ping");
    send_ping.len = 4;
    prepare(recv_ping, OpCode::recv, server_fd);
    recv_ping.buf = server_buf;
    recv_ping.len = sizeof server_buf;
    submit(recv_ping);
    submit(send_ping);
  }

  static void on_complete(Op* op, int res, std::uint32_t) noexcept {
    auto* s = static_cast<OpsEcho*>(op->data);
    ++s->completions;
    if (s->done) return;
    s->step(op, res);
  }

  void step(Op* op, int res) {
    if (op == &accept) {
      if (res < 0) return fail("accept", res);
      server_fd = res;
      accept_done = true;
      if (connect_done) connected();
    } else if (op == &connect) {
      if (res != 0) return fail("connect", res);
      connect_done = true;
      if (accept_done) connected();
    } else if (op == &send_ping) {
      if (res != 4) return fail("send of 4 bytes on the client", res);
    } else if (op == &recv_ping) {
      if (res != 4 || std::memcmp(server_buf, "ping", 4) != 0)
        return fail("recv of \"ping\" on the accepted socket", res);
      prepare(send_echo, OpCode::send, server_fd);
      send_echo.buf = server_buf;
      send_echo.len = static_cast<std::uint32_t>(res);
      prepare(recv_echo, OpCode::recv, client_fd);
      recv_echo.buf = client_buf;
      recv_echo.len = sizeof client_buf;
      submit(send_echo);
      submit(recv_echo);
    } else if (op == &send_echo) {
      if (res != 4) return fail("send of 4 bytes back", res);
    } else if (op == &recv_echo) {
      if (res != 4 || std::memcmp(client_buf, "ping", 4) != 0)
        return fail("recv of the echo on the client", res);
      prepare(timeout, OpCode::timeout, -1);
      timeout.timeout_ns = 20'000'000;  // 20 ms
      timeout_start = Clock::now();
      submit(timeout);
    } else if (op == &timeout) {
      if (res != -ETIME) return fail("timeout (expected -ETIME)", res);
      if (Clock::now() - timeout_start < 15ms) return fail("20 ms timeout, completed early", res);
      // Nothing will arrive on the client: the recv waits until cancelled.
      prepare(idle_recv, OpCode::recv, client_fd);
      idle_recv.buf = idle_buf;
      idle_recv.len = sizeof idle_buf;
      submit(idle_recv);
      io->cancel(&idle_recv);
    } else if (op == &idle_recv) {
      if (res != -ECANCELED) return fail("cancelled recv (expected -ECANCELED)", res);
      prepare(close_server, OpCode::close, server_fd);
      prepare(close_client, OpCode::close, client_fd);
      prepare(close_listen, OpCode::close, listen_fd);
      submit(close_server);
      submit(close_client);
      submit(close_listen);
    } else if (op == &close_server || op == &close_client || op == &close_listen) {
      if (res != 0) return fail("close", res);
      if (--closes_left == 0) {
        server_fd = client_fd = listen_fd = -1;
        done = true;
      }
    } else {
      fail("completion of an op that is not ours", res);
    }
  }
};

int ringpark_ops_echo(uv_loop_t* loop) {
  LoopContext* ctx = LoopContext::get(loop);
  if (ctx == nullptr) {
    fail_line("ops: LoopContext::get returned null");
    return 1;
  }
  OpsEcho s;
  s.io = &ctx->chain().io();

  // Ordinary blocking sockets, as a program hands them to io_uring.
  s.listen_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  s.client_fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  s.addr.sin_family = AF_INET;
  s.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof s.addr;
  if (s.listen_fd < 0 || s.client_fd < 0 ||
      ::bind(s.listen_fd, reinterpret_cast<sockaddr*>(&s.addr), sizeof s.addr) != 0 ||
      ::listen(s.listen_fd, 8) != 0 ||
      ::getsockname(s.listen_fd, reinterpret_cast<sockaddr*>(&s.addr), &len) != 0) {
    fail_line("ops: set up a listening socket on 127.0.0.1: %s", std::strerror(errno));
    return 1;
  }

  rp_stats_t before;
  rp_stats(loop, &before);
  s.start();
  // Ringpark's ops in flight keep the loop alive, as libuv's own requests do,
  // so one DEFAULT run lasts until the last of them completes.
  const auto start = Clock::now();
  while (!s.done && Clock::now() - start < 10s) {
    int r = rp_uv_run(loop, UV_RUN_DEFAULT);
    if (!s.done && r == 0 && ctx->chain().io().in_flight() == 0) {
      fail_line("ops: the loop ran out of work with the sequence unfinished");
      ++s.failures;
      break;
    }
  }
  if (!s.done) {
    fail_line("ops: sequence unfinished after 10 s (%d completions)", s.completions);
    ++s.failures;
  }
  if (s.failures > 0) {
    // Cancel what is left and reap it, so the ops' memory is not in use when
    // this frame goes away.
    for (Op* op : {&s.accept, &s.connect, &s.send_ping, &s.recv_ping, &s.send_echo, &s.recv_echo,
                   &s.timeout, &s.idle_recv}) {
      if (op->state != Op::State::idle) s.io->cancel(op);
    }
    const auto reap_start = Clock::now();
    while (s.io->in_flight() > 0 && Clock::now() - reap_start < 2s) rp_uv_run(loop, UV_RUN_NOWAIT);
    for (int fd : {s.listen_fd, s.client_fd, s.server_fd})
      if (fd >= 0) ::close(fd);
    return s.failures;
  }
  if (s.io->in_flight() != 0) {
    fail_line("ops: %zu ops still in flight after the last completion", s.io->in_flight());
    ++s.failures;
  }
  rp_stats_t after;
  rp_stats(loop, &after);
  if (after.turns <= before.turns) {
    fail_line("ops: rp_stats turns did not grow");
    ++s.failures;
  }
  if (ctx->chain().uring() != nullptr) {
    // Every completion is a CQE taken off the ring.
    if (after.cqes_reaped - before.cqes_reaped < static_cast<std::uint64_t>(s.completions)) {
      fail_line("ops: rp_stats cqes_reaped grew by %llu for %d completions",
                static_cast<unsigned long long>(after.cqes_reaped - before.cqes_reaped),
                s.completions);
      ++s.failures;
    }
  } else if (after.sqes_submitted != 0 || after.cqes_reaped != 0) {
    // ringpark.h: both are 0 on the fallback, which has no ring.
    fail_line("ops: on the fallback rp_stats reads sqes %llu cqes %llu, expected 0 and 0",
              static_cast<unsigned long long>(after.sqes_submitted),
              static_cast<unsigned long long>(after.cqes_reaped));
    ++s.failures;
  }
  return s.failures;
}

// ---------------------------------------------------------------------------

// The child of the fallback tests: filter, then backend, echo, ops, close.
int fallback_child(int err) {
  // Automatic choice, whatever the runner set.
  ::unsetenv("RINGPARK_BACKEND");
  if (int r = refuse_io_uring_setup(err); r != kPass) return r;

  uv_loop_t loop;
  if (int r = uv_loop_init(&loop); r != 0) {
    fail_line("uv_loop_init: %s", uv_strerror(r));
    return kFail;
  }
  int failures = 0;
  const std::string expected = std::string("epoll (io_uring_setup: ") + strerrorname_np(err) + ")";
  const std::string backend = rp_backend(&loop);
  if (backend != expected) {
    fail_line("rp_backend is \"%s\", expected \"%s\"", backend.c_str(), expected.c_str());
    // Nothing below would test the fallback.
    return kFail;
  }
  failures += libuv_echo(&loop);
  failures += ringpark_ops_echo(&loop);
  if (int r = rp_loop_close(&loop); r != 0) {
    fail_line("rp_loop_close: %s", uv_strerror(r));
    ++failures;
  }
  return failures == 0 ? kPass : kFail;
}

void expect_child_passes(const std::function<int()>& body) {
  ChildResult child = run_in_child(body);
  if (child.skipped()) GTEST_SKIP() << child.output;
  EXPECT_TRUE(child.passed()) << child.describe();
}

// Whether this process may set up a ring (the test that expects io_uring skips
// otherwise).
std::string io_uring_unavailable() {
  io_uring ring;
  int r = io_uring_queue_init(4, &ring, 0);
  if (r < 0) return std::string("io_uring_setup: ") + strerrorname_np(-r);
  io_uring_queue_exit(&ring);
  return {};
}

TEST(SeccompFallback, IoUringSetupEpermSelectsEpollAndItsOpsWork) {
  expect_child_passes([] { return fallback_child(EPERM); });
}

TEST(SeccompFallback, IoUringSetupEnosysSelectsEpollAndItsOpsWork) {
  expect_child_passes([] { return fallback_child(ENOSYS); });
}

TEST(SeccompFallback, WithoutFilterBackendIsIoUring) {
  if (std::string why = io_uring_unavailable(); !why.empty())
    GTEST_SKIP() << "io_uring is unavailable here (" << why << ")";
  expect_child_passes([] {
    ::unsetenv("RINGPARK_BACKEND");
    uv_loop_t loop;
    if (int r = uv_loop_init(&loop); r != 0) {
      fail_line("uv_loop_init: %s", uv_strerror(r));
      return kFail;
    }
    int failures = 0;
    const std::string backend = rp_backend(&loop);
    if (backend != "io_uring") {
      fail_line("rp_backend is \"%s\", expected \"io_uring\"", backend.c_str());
      ++failures;
    }
    failures += libuv_echo(&loop);
    failures += ringpark_ops_echo(&loop);
    if (int r = rp_loop_close(&loop); r != 0) {
      fail_line("rp_loop_close: %s", uv_strerror(r));
      ++failures;
    }
    return failures == 0 ? kPass : kFail;
  });
}

// RINGPARK_BACKEND=uring forbids the fallback; with io_uring refused, the loop
// gets no ringpark state, and rp_uv_run runs it as plain libuv, not a crash.
TEST(SeccompFallback, ForcedUringWithoutIoUringRunsPlainLibuv) {
  expect_child_passes([] {
    ::setenv("RINGPARK_BACKEND", "uring", 1);
    if (int r = refuse_io_uring_setup(EPERM); r != kPass) return r;
    uv_loop_t loop;
    if (int r = uv_loop_init(&loop); r != 0) {
      fail_line("uv_loop_init: %s", uv_strerror(r));
      return kFail;
    }
    int failures = 0;
    const std::string backend = rp_backend(&loop);
    if (backend.rfind("none", 0) != 0) {
      fail_line("rp_backend is \"%s\", expected no backend (\"none (...)\")", backend.c_str());
      ++failures;
    }
    if (LoopContext::find(&loop) != nullptr) {
      fail_line("the loop has ringpark state although no backend could be set up");
      ++failures;
    }
    failures += libuv_echo(&loop, /*ringpark_runs=*/false);
    if (int r = rp_loop_close(&loop); r != 0) {
      fail_line("rp_loop_close: %s", uv_strerror(r));
      ++failures;
    }
    return failures == 0 ? kPass : kFail;
  });
}

}  // namespace
