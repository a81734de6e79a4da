// Credentials: a ring is set up (and its kernel worker threads started) while
// the process is root; the process then becomes an ordinary user with
// setuid(65534). Every operation from then on must be checked against the new
// credentials, whatever ran before: an open of a root-only (0600) file through
// the ring fails with EACCES. A ring that kept the credentials it was made
// with (or a worker thread that did) would open it: a privilege leak.
//
// Runs on both backends (on the fallback rp_fs_* is libuv's own call on its
// thread pool, and the C++ Runtime's file ops run on ringpark's pool, whose
// threads were started as root too). Each case runs in a forked child, since
// setuid cannot be undone. Needs root.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstring>
#include <string>

#include "child.hpp"
#include "ringpark.h"
#include "ringpark/file.hpp"
#include "ringpark/runtime.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

constexpr uid_t kNobody = 65534;

bool become_nobody() {
  return ::setgroups(0, nullptr) == 0 && ::setresgid(kNobody, kNobody, kNobody) == 0 &&
         ::setresuid(kNobody, kNobody, kNobody) == 0;
}

// A directory anyone may search, holding a root-only file and a public one.
class Files : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (to make a root-only file, then setuid)";
    ASSERT_EQ(::chmod(dir_.path.c_str(), 0755), 0);
    secret_ = make(dir_.file("secret"), 0600);
    public_ = make(dir_.file("public"), 0644);
  }
  static std::string make(const std::string& path, mode_t mode) {
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::write(fd, "data", 4), 4);
    EXPECT_EQ(::fchmod(fd, mode), 0);  // whatever the umask
    ::close(fd);
    return path;
  }

  TempDir dir_;
  std::string secret_, public_;
};

// Opens `path` with rp_fs_open and runs the loop until the callback; returns
// the result (a new fd, or a negative error). *ring_sqes counts the SQEs the
// loop submitted meanwhile (0 on the fallback or for libuv's path).
int open_through_loop(uv_loop_t* loop, const std::string& path, int flags,
                      std::uint64_t* ring_sqes) {
  rp_stats_t before, after;
  rp_stats(loop, &before);
  uv_fs_t req;
  int calls = 0;
  req.data = &calls;
  EXPECT_EQ(rp_fs_open(loop, &req, path.c_str(), flags, 0,
                       [](uv_fs_t* r) { ++*static_cast<int*>(r->data); }),
            0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (calls == 0 && std::chrono::steady_clock::now() < deadline) rp_uv_run(loop, UV_RUN_ONCE);
  EXPECT_EQ(calls, 1);
  rp_stats(loop, &after);
  *ring_sqes = after.sqes_submitted - before.sqes_submitted;
  const int result = static_cast<int>(req.result);
  uv_fs_req_cleanup(&req);
  return result;
}

TEST_F(Files, RpFsOpenOfARootOnlyFileFailsWithEaccesAfterSetuid) {
  auto outcome = run_in_child([&] {
    uv_loop_t loop;
    ASSERT_EQ(uv_loop_init(&loop), 0);
    const std::string backend = rp_backend(&loop);  // the ring is set up here, as root
    const bool uring = backend == "io_uring";
    std::uint64_t sqes = 0;

    // As root: the file opens, through the ring (and an fsync starts the
    // ring's worker threads, which always run it, as root).
    int fd = open_through_loop(&loop, secret_, O_RDWR, &sqes);
    ASSERT_GE(fd, 0) << "root could not open its own file: " << uv_strerror(fd);
    if (uring) {
      EXPECT_GT(sqes, 0u) << "the open did not go through the ring";
    }
    uv_fs_t sync_req;
    int synced = 1;
    sync_req.data = &synced;
    ASSERT_EQ(
        rp_fs_fsync(&loop, &sync_req, fd,
                    [](uv_fs_t* r) { *static_cast<int*>(r->data) = static_cast<int>(r->result); }),
        0);
    while (synced == 1) rp_uv_run(&loop, UV_RUN_ONCE);
    EXPECT_EQ(synced, 0);
    uv_fs_req_cleanup(&sync_req);
    ::close(fd);

    ASSERT_TRUE(become_nobody()) << std::strerror(errno);
    ASSERT_EQ(::geteuid(), kNobody);

    // The same ring, the new credentials.
    for (int flags : {O_RDONLY, O_WRONLY, O_RDWR}) {
      fd = open_through_loop(&loop, secret_, flags, &sqes);
      EXPECT_EQ(fd, UV_EACCES) << "flags " << flags << ": the open as uid " << kNobody << " gave "
                               << (fd >= 0 ? "a file" : uv_strerror(fd));
      if (uring) {
        EXPECT_GT(sqes, 0u) << "the open did not go through the ring";
      }
      if (fd >= 0) ::close(fd);
    }
    // The ring still serves the new user where the file allows it.
    fd = open_through_loop(&loop, public_, O_RDONLY, &sqes);
    EXPECT_GE(fd, 0) << uv_strerror(fd);
    if (fd >= 0) ::close(fd);

    EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop), 0);
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

Task<int> open_file(Runtime& rt, std::string path, int flags) {
  Result<File> f = co_await File::open(rt, std::move(path), flags);
  if (!f) co_return -f.error.value();
  co_return 0;  // the File closes itself
}

Task<int> sync_file(Runtime& rt, std::string path) {
  Result<File> f = co_await File::open(rt, std::move(path), O_RDWR);
  if (!f) co_return -f.error.value();
  Result<void> s = co_await f.value.fsync();
  co_return s ? 0 : -s.error.value();
}

TEST_F(Files, RuntimeFileOpenOfARootOnlyFileFailsWithEaccesAfterSetuid) {
  auto outcome = run_in_child([&] {
    Runtime rt = Runtime::Builder().build();  // the ring (or the pool) as root
    ASSERT_EQ(block_on(rt, sync_file(rt, secret_)), 0) << "as root";
    ASSERT_TRUE(become_nobody()) << std::strerror(errno);
    for (int flags : {O_RDONLY, O_WRONLY, O_RDWR}) {
      EXPECT_EQ(block_on(rt, open_file(rt, secret_, flags)), -EACCES)
          << "flags " << flags << " on " << rt.backend_name();
    }
    EXPECT_EQ(block_on(rt, open_file(rt, public_, O_RDONLY)), 0);
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

}  // namespace
}  // namespace ringpark::test
