// RLIMIT_MEMLOCK (issue 8, defect 3). The kernel charges a ring's memory (its
// SQEs and its SQ and CQ rings, in whole pages) and a provided buffer ring's
// pages to RLIMIT_MEMLOCK, per user across all of that user's processes, unless
// the process has CAP_IPC_LOCK. A loop asks for 1,024 entries; under a small
// limit it must get a smaller ring (down to kMinRingEntries), and fall back to
// epoll only when even that does not fit, with a reason that names the limit.
// A buffer ring that does not fit shrinks, or multishot recv goes off; the
// loop works either way.
//
// Each case runs in a forked child that lowers the limit and becomes a user of
// its own (a fresh uid, so that no other process's rings count against it), as
// `setpriv --reuid=N --regid=N --clear-groups` would. That needs root; without
// it the tests skip.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"
#include "uring_driver/driver.hpp"
#include "uring_driver/probe.hpp"

namespace ringpark::test {
namespace {

using detail::kMinRingEntries;
using detail::ring_locked_bytes;

// What a loop came up with in the limited child.
struct Outcome {
  std::string backend;    // rp_backend()
  unsigned entries = 0;   // SQ entries of the loop's ring (0 on epoll)
  unsigned buffers = 0;   // provided buffers for multishot recv (0: off)
  int buffers_error = 0;  // why multishot recv is off (negative errno), or 0
  bool read_ok = false;   // an rp_fs_read through the loop gave the right bytes
  std::string failure;    // set when the child could not even run
};

void on_read(uv_fs_t* req) { *static_cast<ssize_t*>(req->data) = req->result; }

// In the child: one line per field, then "end".
int report(int out, unsigned long limit, uid_t uid) {
  unsetenv("RINGPARK_BACKEND");
  const rlimit lim{limit, limit};
  if (::setrlimit(RLIMIT_MEMLOCK, &lim) != 0 || ::setgroups(0, nullptr) != 0 ||
      ::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0) {
    dprintf(out, "failure\nsetrlimit/setresuid: %s\nend\n", std::strerror(errno));
    return 1;
  }
  uv_loop_t loop;
  if (uv_loop_init(&loop) != 0) return 1;
  const std::string backend = rp_backend(&loop);
  auto* ctx = detail::LoopContext::find(&loop);
  detail::UringDriver* uring = ctx ? ctx->chain().uring() : nullptr;
  unsigned entries = 0, buffers = 0;
  int buffers_error = 0;
  if (uring != nullptr) {
    entries = uring->probe().entries;
    uring->supports(detail::OpCode::recv_multishot);  // registers the buffer ring
    buffers = uring->provided_buffers();
    buffers_error = uring->recv_multishot_error();
  }
  // The loop works, whatever it got.
  int fds[2];
  bool read_ok = false;
  if (::pipe2(fds, O_CLOEXEC) == 0 && ::write(fds[1], "memlock", 7) == 7) {
    char buf[16];
    uv_buf_t iov = uv_buf_init(buf, sizeof buf);
    uv_fs_t req;
    ssize_t result = -1000;
    req.data = &result;
    if (rp_fs_read(&loop, &req, fds[0], &iov, 1, -1, &on_read) == 0) {
      rp_uv_run(&loop, UV_RUN_DEFAULT);
      read_ok = result == 7 && std::memcmp(buf, "memlock", 7) == 0;
      uv_fs_req_cleanup(&req);
    }
  }
  rp_loop_close(&loop);
  dprintf(out, "backend\n%s\nentries\n%u\nbuffers\n%u\nbuffers_error\n%d\nread_ok\n%d\nend\n",
          backend.c_str(), entries, buffers, buffers_error, read_ok ? 1 : 0);
  return 0;
}

// Runs a loop in a child with RLIMIT_MEMLOCK `limit` as user `uid`.
Outcome run_limited(unsigned long limit, uid_t uid) {
  Outcome o;
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) {
    o.failure = "pipe2";
    return o;
  }
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(20);
    ::close(p[0]);
    ::_exit(report(p[1], limit, uid));
  }
  ::close(p[1]);
  std::string text;
  char buf[512];
  ssize_t n;
  while ((n = ::read(p[0], buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
  ::close(p[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::istringstream in(text);
  std::string key, value;
  while (std::getline(in, key) && key != "end" && std::getline(in, value)) {
    if (key == "backend") o.backend = value;
    if (key == "entries") o.entries = static_cast<unsigned>(std::stoul(value));
    if (key == "buffers") o.buffers = static_cast<unsigned>(std::stoul(value));
    if (key == "buffers_error") o.buffers_error = std::stoi(value);
    if (key == "read_ok") o.read_ok = value == "1";
    if (key == "failure") o.failure = value;
  }
  if (o.failure.empty() && !(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    o.failure = "the child ended with status " + std::to_string(status) + ": " + text;
  return o;
}

class Memlock : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "switching to a fresh user needs root";
    // io_uring at all, for root (the limit does not apply to root).
    io_uring ring;
    detail::RingProbe probe;
    if (detail::setup_ring(&ring, detail::RingOptions{}, &probe) != 0)
      GTEST_SKIP() << "io_uring is unavailable here: " << probe.reason;
    io_uring_queue_exit(&ring);
    // Does this kernel charge rings to RLIMIT_MEMLOCK? (From 5.12 until rings
    // were charged again, they went to the memory cgroup instead.)
    const Outcome zero = run_limited(0, next_uid());
    charges_ = zero.backend != "io_uring";
  }

  // A user of its own for every case: the kernel frees a closed ring's pages
  // (and uncharges them) a little later, and that must not count against the
  // next case.
  static uid_t next_uid() {
    static uid_t uid = 400000 + static_cast<uid_t>(::getpid() % 50000) * 16;
    return ++uid;
  }

  // Checks what every limit must give: a working loop, on io_uring unless
  // even the smallest ring did not fit.
  static void expect_works(const Outcome& o, unsigned long limit) {
    ASSERT_EQ(o.failure, "") << "limit " << limit;
    std::printf("RLIMIT_MEMLOCK %lu KiB: %s, %u entries, %u provided buffers (error %d)\n",
                limit / 1024, o.backend.c_str(), o.entries, o.buffers, o.buffers_error);
    EXPECT_TRUE(o.read_ok) << "limit " << limit << ": the loop did not work (" << o.backend << ")";
    if (o.backend == "io_uring") {
      EXPECT_GE(o.entries, kMinRingEntries);
      EXPECT_LE(o.entries, 1024u);
      // The buffer ring degrades, never the loop: smaller, or off for ENOMEM.
      EXPECT_TRUE(o.buffers > 0 || o.buffers_error == -ENOMEM)
          << "limit " << limit << ": buffers " << o.buffers << ", error " << o.buffers_error;
      EXPECT_LE(o.buffers, 512u);
    }
  }

  bool charges_ = true;
};

TEST_F(Memlock, ZeroFallsBackAndSaysWhy) {
  const Outcome o = run_limited(0, next_uid());
  expect_works(o, 0);
  if (!charges_) {
    EXPECT_EQ(o.backend, "io_uring");
    GTEST_SKIP() << "this kernel does not charge rings to RLIMIT_MEMLOCK";
  }
  EXPECT_EQ(o.backend.rfind("epoll (io_uring_setup: ENOMEM (RLIMIT_MEMLOCK", 0), 0u) << o.backend;
  const std::string needs =
      "needs " + std::to_string((ring_locked_bytes(kMinRingEntries) + 1023) / 1024) + " KiB";
  EXPECT_NE(o.backend.find(needs), std::string::npos) << o.backend;
  EXPECT_NE(o.backend.find("the limit is 0 KiB"), std::string::npos) << o.backend;
}

// 16 KiB: 1,024 entries (104 KiB) do not fit, the smaller rings do. Before the
// fix the loop never retried and fell back to epoll.
TEST_F(Memlock, SixteenKibGetsASmallerRing) {
  const unsigned long limit = 16 * 1024;
  const Outcome o = run_limited(limit, next_uid());
  expect_works(o, limit);
  EXPECT_EQ(o.backend, "io_uring");
  if (charges_) {
    EXPECT_LT(o.entries, 1024u);
    EXPECT_LE(ring_locked_bytes(o.entries), limit) << o.entries << " entries";
  }
}

// 32 KiB: a 256-entry ring (28 KiB) leaves one page, too little for the 512
// buffers' ring (8 KiB), enough for 256 (4 KiB): the buffer ring shrinks.
TEST_F(Memlock, ThirtyTwoKibShrinksTheBufferRing) {
  const unsigned long limit = 32 * 1024;
  const Outcome o = run_limited(limit, next_uid());
  expect_works(o, limit);
  EXPECT_EQ(o.backend, "io_uring");
  const unsigned long page = static_cast<unsigned long>(::sysconf(_SC_PAGESIZE));
  const unsigned long left = limit - ring_locked_bytes(o.entries);
  if (charges_ && left >= page && left < 2 * page) {
    // Room for exactly one page of buffer ring: 16 bytes a buffer.
    EXPECT_EQ(o.buffers, page / 16) << o.entries << " entries, error " << o.buffers_error;
  }
}

TEST_F(Memlock, SixtyFourKibGetsIoUring) {
  const unsigned long limit = 64 * 1024;
  const Outcome o = run_limited(limit, next_uid());
  expect_works(o, limit);
  EXPECT_EQ(o.backend, "io_uring");
  if (charges_) {
    EXPECT_LE(ring_locked_bytes(o.entries), limit);
  }
}

TEST_F(Memlock, OneMibGetsTheFullRing) {
  const unsigned long limit = 1024 * 1024;
  const Outcome o = run_limited(limit, next_uid());
  expect_works(o, limit);
  EXPECT_EQ(o.backend, "io_uring");
  EXPECT_EQ(o.entries, 1024u);
  EXPECT_EQ(o.buffers, 512u);
}

}  // namespace
}  // namespace ringpark::test
