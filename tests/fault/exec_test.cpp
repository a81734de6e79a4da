// exec: no file descriptor ringpark made survives into a program the process
// execs (a server that spawns CGI-style children must not hand them its ring,
// its eventfds, its epoll sets or its sockets). A forked child closes every
// descriptor it inherited, sets up everything of ringpark's it can, with
// operations in flight:
// - a libuv loop under rp_uv_run: its ring (or the fallback's epoll set), the
//   ring's eventfd, a listening rp_tcp_t, a connected one and its accepted
//   peer reading, an rp_poll_t, a file opened with rp_fs_open, an rp_fs_read
//   waiting on a pipe (on the fallback: in libuv's thread pool);
// - a second loop with the ring inside plain uv_run (rp_uv_attach);
// - a standalone C++ Runtime (SINGLE_ISSUER ring, or the fallback's epoll set
//   and thread pool) with a file open and a recv in flight;
// - a C++ Runtime attached to a libuv loop;
// then execs fd_lister, which prints every descriptor above 2 it was given.
// There must be none. Runs on both backends.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>

#include "ringpark.h"
#include "ringpark/file.hpp"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "test_util.hpp"

#ifndef RINGPARK_FD_LISTER
#error "RINGPARK_FD_LISTER must name the fd_lister helper"
#endif

namespace ringpark::test {
namespace {

using Clock = std::chrono::steady_clock;

struct Tcp {
  rp_tcp_t server{}, client{}, peer{};
  rp_connect_t connect{};
  bool accepted = false;
};

void alloc(rp_tcp_t*, size_t n, uv_buf_t* b) {
  *b = uv_buf_init(static_cast<char*>(std::malloc(n)), static_cast<unsigned>(n));
}
void on_read(rp_tcp_t*, ssize_t, const uv_buf_t* b) { std::free(b->base); }

Task<void> spawn_recv(Runtime& rt, int fd) {
  BufferResult r = co_await recv(rt, fd, Buffer(64));
  (void)r;
}

Task<int> open_and_sync(Runtime& rt, std::string path, std::optional<File>* keep) {
  Result<File> f = co_await File::open(rt, std::move(path), O_RDWR | O_CREAT, 0600);
  if (!f) co_return -1;
  Result<void> s = co_await f.value.fsync();
  keep->emplace(std::move(f.value));
  co_return s ? 0 : -2;
}

// In the forked child: sets everything up, then execs the lister. Returns
// only if something failed before the exec.
void set_up_and_exec(const std::string& dir) {
  // --- A loop under rp_uv_run, with TCP, a poll watcher and files.
  static uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  static Tcp tcp;
  tcp.server.data = &tcp;
  ASSERT_EQ(rp_tcp_init(&loop, &tcp.server), 0);
  ASSERT_EQ(rp_tcp_init(&loop, &tcp.client), 0);
  ASSERT_EQ(rp_tcp_init(&loop, &tcp.peer), 0);
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", 0, &addr);
  ASSERT_EQ(rp_tcp_bind(&tcp.server, reinterpret_cast<const sockaddr*>(&addr), 0), 0);
  int len = sizeof addr;
  ASSERT_EQ(rp_tcp_getsockname(&tcp.server, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(rp_listen(&tcp.server, 8,
                      [](rp_tcp_t* s, int status) {
                        auto* t = static_cast<Tcp*>(s->data);
                        if (status == 0 && rp_accept(s, &t->peer) == 0) {
                          t->accepted = rp_read_start(&t->peer, alloc, on_read) == 0;
                        }
                      }),
            0);
  ASSERT_EQ(
      rp_tcp_connect(&tcp.connect, &tcp.client, reinterpret_cast<const sockaddr*>(&addr), nullptr),
      0);
  ASSERT_EQ(rp_read_start(&tcp.client, alloc, on_read), 0);

  int watched[2], empty[2];
  ASSERT_EQ(::pipe2(watched, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(empty, O_CLOEXEC), 0);
  static rp_poll_t poll_handle;
  ASSERT_EQ(rp_poll_init(&loop, &poll_handle, watched[0]), 0);
  ASSERT_EQ(rp_poll_start(&poll_handle, UV_READABLE, [](rp_poll_t*, int, int) {}), 0);

  static uv_fs_t open_req, read_req;
  static int opened = 1;
  open_req.data = &opened;
  const std::string file = dir + "/f";
  ASSERT_EQ(
      rp_fs_open(&loop, &open_req, file.c_str(), O_RDWR | O_CREAT, 0600,
                 [](uv_fs_t* r) { *static_cast<int*>(r->data) = static_cast<int>(r->result); }),
      0);
  static char byte;
  uv_buf_t buf = uv_buf_init(&byte, 1);
  ASSERT_EQ(rp_fs_read(&loop, &read_req, empty[0], &buf, 1, -1, [](uv_fs_t*) {}), 0);

  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while ((!tcp.accepted || opened == 1) && Clock::now() < deadline) {
    rp_uv_run(&loop, UV_RUN_NOWAIT);
    ::poll(nullptr, 0, 1);
  }
  ASSERT_TRUE(tcp.accepted);
  ASSERT_GE(opened, 0) << "rp_fs_open: " << uv_strerror(opened);

  // --- A second loop, the ring inside plain uv_run.
  static uv_loop_t attached;
  ASSERT_EQ(uv_loop_init(&attached), 0);
  ASSERT_EQ(rp_uv_attach(&attached), 0);
  uv_run(&attached, UV_RUN_NOWAIT);

  // --- A standalone C++ Runtime with a file open (and synced: on the
  // fallback that starts its thread pool) and a recv in flight.
  static std::optional<Runtime> rt;
  rt.emplace(Runtime::Builder().build());
  static std::optional<File> kept;
  ASSERT_EQ(block_on(*rt, open_and_sync(*rt, dir + "/g", &kept)), 0);
  int pair[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  spawn(*rt, spawn_recv(*rt, pair[0]));
  auto turn = [](Runtime& r) -> Task<void> { co_await sleep_for(r, std::chrono::milliseconds(1)); };
  block_on(*rt, turn(*rt));  // the recv goes out

  // --- A C++ Runtime attached to a libuv loop.
  static uv_loop_t under;
  ASSERT_EQ(uv_loop_init(&under), 0);
  static std::optional<Runtime> attached_rt;
  attached_rt.emplace(Runtime::Builder().attach(&under).build());
  block_on(*attached_rt, turn(*attached_rt));

  char* argv[] = {const_cast<char*>(RINGPARK_FD_LISTER), nullptr};
  ::execv(RINGPARK_FD_LISTER, argv);
  ADD_FAILURE() << "execv " << RINGPARK_FD_LISTER << ": " << std::strerror(errno);
}

TEST(Exec, NoRingparkDescriptorSurvivesExec) {
  TempDir dir;
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);  // dup2 clears close-on-exec on the copy
    // Nothing inherited: every descriptor above 2 from here on is one the
    // child made, through ringpark, libuv or this test (all close-on-exec).
    ::close_range(3, ~0u, 0);
    set_up_and_exec(dir.path);
    std::fflush(nullptr);
    ::_exit(1);
  }
  ::close(out[1]);
  std::string listing;
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  char buf[1024];
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{out[0], POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
    const ssize_t n = ::read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    listing.append(buf, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  int status = 0;
  if (Clock::now() > deadline) ::kill(pid, SIGKILL);
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the child failed before or after the exec (status " << status << "); it printed:\n"
      << listing;
  ASSERT_NE(listing.find("end\n"), std::string::npos) << "the lister did not finish:\n" << listing;
  EXPECT_EQ(listing, "end\n") << "descriptors that survived exec:\n" << listing;
}

}  // namespace
}  // namespace ringpark::test
