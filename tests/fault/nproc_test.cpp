// A process that cannot start another thread (RLIMIT_NPROC reached, or a
// clone that keeps failing): io_uring runs blocking operations (fsync, an open
// with O_CREAT or O_TRUNC, shutdown...) on worker threads it starts on demand,
// and when it cannot start the first one it ends every such operation with
// -ECANCELED. Nobody cancelled them: the result a libuv program gets for the
// same call (the synchronous uv_fs_* call, made in the calling thread) is the
// operation's real result. ringpark must give that too, never UV_ECANCELED for
// a request nobody cancelled.
//
// Each case runs in a forked child that becomes uid 65534 with RLIMIT_NPROC 1
// (as root the limit does not apply), then sets up its loop or Runtime.
// - rp_fs_* on io_uring: the driver makes such a call itself, on the loop
//   thread, when io_uring ends it with -ECANCELED unasked (they once came
//   back as UV_ECANCELED; the same burst was seen in the soak under
//   ThreadSanitizer, where the first worker's clone failed under the signal
//   storm). On the fallback rp_fs_* is libuv's own call on libuv's pool, and
//   libuv aborts the process when it cannot start its pool: nothing ringpark
//   can change, so that case does not run.
// - the C++ Runtime's File::open and fsync: on io_uring the same; on the
//   fallback its own pool runs a job in the caller's thread when it cannot
//   start one. The results must be right on both.
// Needs root (to set the uid).
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
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

// In the child: an unprivileged user that may not start one more thread.
bool become_nobody_without_threads() {
  if (::setgroups(0, nullptr) != 0 || ::setresgid(kNobody, kNobody, kNobody) != 0 ||
      ::setresuid(kNobody, kNobody, kNobody) != 0) {
    return false;
  }
  rlimit one{1, 1};
  return ::setrlimit(RLIMIT_NPROC, &one) == 0;
}

class NoThreads : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (to become uid 65534 with RLIMIT_NPROC 1)";
    ASSERT_EQ(::chmod(dir_.path.c_str(), 0777), 0);
    file_ = dir_.file("f");
    existing_ = dir_.file("existing");
    int fd = ::open(existing_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::fchmod(fd, 0666), 0);
    ::close(fd);
  }
  TempDir dir_;
  std::string file_, existing_;
};

// Runs one rp_fs_* request to its callback; returns its result.
template <typename Start>
ssize_t run_request(uv_loop_t* loop, Start start) {
  uv_fs_t req;
  int calls = 0;
  req.data = &calls;
  EXPECT_EQ(start(&req, [](uv_fs_t* r) { ++*static_cast<int*>(r->data); }), 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (calls == 0 && std::chrono::steady_clock::now() < deadline) rp_uv_run(loop, UV_RUN_ONCE);
  EXPECT_EQ(calls, 1);
  const ssize_t result = req.result;
  uv_fs_req_cleanup(&req);
  return result;
}

TEST_F(NoThreads, RpFsGivesTheRealResultWhenIoUringCannotStartAWorker) {
  auto outcome = run_in_child([&] {
    ASSERT_TRUE(become_nobody_without_threads()) << std::strerror(errno);
    uv_loop_t loop;
    ASSERT_EQ(uv_loop_init(&loop), 0);
    const std::string backend = rp_backend(&loop);
    if (backend != "io_uring") {
      EXPECT_EQ(rp_loop_close(&loop), 0);
      GTEST_SKIP() << "on " << backend
                   << " rp_fs_* is libuv's own call, and libuv aborts when it cannot start its "
                      "thread pool";
    }
    // The same calls, synchronous (libuv runs them in this thread): the
    // results a libuv program gets.
    uv_fs_t sync_req;
    const int sync_open =
        uv_fs_open(&loop, &sync_req, file_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600, nullptr);
    uv_fs_req_cleanup(&sync_req);
    ASSERT_GE(sync_open, 0);
    const int sync_fsync = uv_fs_fsync(&loop, &sync_req, sync_open, nullptr);
    uv_fs_req_cleanup(&sync_req);
    ::close(sync_open);

    // Through the ring, where io_uring hands both to a worker thread.
    const ssize_t opened = run_request(&loop, [&](uv_fs_t* r, uv_fs_cb cb) {
      return rp_fs_open(&loop, r, file_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600, cb);
    });
    const int fd = opened >= 0 ? static_cast<int>(opened) : ::open(existing_.c_str(), O_RDWR);
    const ssize_t synced =
        run_request(&loop, [&](uv_fs_t* r, uv_fs_cb cb) { return rp_fs_fsync(&loop, r, fd, cb); });
    ::close(fd);
    EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop), 0);

    EXPECT_GE(opened, 0) << "rp_fs_open: " << uv_strerror(static_cast<int>(opened))
                         << " (libuv's own call gave " << sync_open << ")";
    EXPECT_EQ(synced, sync_fsync) << "rp_fs_fsync: " << uv_strerror(static_cast<int>(synced));
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

Task<int> open_and_sync(Runtime& rt, std::string path) {
  Result<File> f = co_await File::open(rt, std::move(path), O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (!f) co_return -f.error.value();
  Result<void> s = co_await f.value.fsync();
  co_return s ? 0 : -s.error.value();
}

TEST_F(NoThreads, RuntimeFileOpsGiveTheRealResultWhenNoThreadCanStart) {
  auto outcome = run_in_child([&] {
    ASSERT_TRUE(become_nobody_without_threads()) << std::strerror(errno);
    Runtime rt = Runtime::Builder().build();
    const int r = block_on(rt, open_and_sync(rt, file_));
    EXPECT_EQ(r, 0) << "on " << rt.backend_name() << ": " << std::strerror(-r);
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

}  // namespace
}  // namespace ringpark::test
