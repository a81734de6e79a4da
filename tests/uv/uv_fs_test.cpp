// rp_fs_* against their uv_fs_* twins: the same call on the same file through
// libuv's thread pool and through ringpark must leave the same uv_fs_t fields
// for the callback. Runs once per backend (on the fallback rp_fs_* is libuv's
// own call, so the comparison there checks the delegation).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <cstring>
#include <string>

#include "ringpark.h"
#include "uv_stat_util.hpp"

namespace {

using ringpark::test::expect_same_stat;

class UvFs : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    char tmpl[] = "/tmp/ringpark-fs-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    file_ = dir_ + "/data";
    int fd = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0640);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, "0123456789", 10), 10);
    ::close(fd);
  }
  void TearDown() override {
    EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    std::string cmd = "rm -rf " + dir_;
    EXPECT_EQ(std::system(cmd.c_str()), 0);
  }

  // Runs one asynchronous request to completion and returns how often its
  // callback ran.
  int finish(uv_fs_t* req) {
    calls_ = 0;
    req->data = this;
    while (calls_ == 0 && rp_uv_run(&loop_, UV_RUN_ONCE) != 0) {
    }
    return calls_;
  }
  static void count(uv_fs_t* req) { ++static_cast<UvFs*>(req->data)->calls_; }

  uv_loop_t loop_;
  std::string dir_, file_;
  int calls_ = 0;
};

// Field-for-field what a callback may read.
TEST_F(UvFs, StatMatchesLibuvFieldByField) {
  for (auto [rp, uv, type] : {std::tuple{&rp_fs_stat, &uv_fs_stat, UV_FS_STAT},
                              std::tuple{&rp_fs_lstat, &uv_fs_lstat, UV_FS_LSTAT}}) {
    uv_fs_t theirs, ours;
    ASSERT_EQ(uv(&loop_, &theirs, file_.c_str(), &UvFs::count), 0);
    ASSERT_EQ(finish(&theirs), 1);
    ASSERT_EQ(rp(&loop_, &ours, file_.c_str(), &UvFs::count), 0);
    ASSERT_EQ(finish(&ours), 1);
    EXPECT_EQ(ours.result, theirs.result);
    EXPECT_EQ(ours.fs_type, type);
    EXPECT_EQ(ours.fs_type, theirs.fs_type);
    EXPECT_STREQ(ours.path, theirs.path);
    EXPECT_EQ(ours.ptr, &ours.statbuf);
    EXPECT_EQ(theirs.ptr, &theirs.statbuf);
    expect_same_stat(ours.statbuf, theirs.statbuf);
    uv_fs_req_cleanup(&ours);
    uv_fs_req_cleanup(&theirs);
    EXPECT_EQ(ours.path, nullptr);
    EXPECT_EQ(ours.ptr, nullptr);
  }
}

TEST_F(UvFs, FstatMatchesLibuv) {
  int fd = ::open(file_.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  uv_fs_t theirs, ours;
  ASSERT_EQ(uv_fs_fstat(&loop_, &theirs, fd, &UvFs::count), 0);
  ASSERT_EQ(finish(&theirs), 1);
  ASSERT_EQ(rp_fs_fstat(&loop_, &ours, fd, &UvFs::count), 0);
  ASSERT_EQ(finish(&ours), 1);
  EXPECT_EQ(ours.result, 0);
  EXPECT_EQ(ours.fs_type, UV_FS_FSTAT);
  EXPECT_EQ(ours.path, nullptr);
  expect_same_stat(ours.statbuf, theirs.statbuf);
  uv_fs_req_cleanup(&ours);
  uv_fs_req_cleanup(&theirs);
  ::close(fd);
}

TEST_F(UvFs, MissingFileGivesTheSameError) {
  std::string missing = dir_ + "/missing";
  uv_fs_t theirs, ours;
  ASSERT_EQ(uv_fs_stat(&loop_, &theirs, missing.c_str(), &UvFs::count), 0);
  ASSERT_EQ(finish(&theirs), 1);
  ASSERT_EQ(rp_fs_stat(&loop_, &ours, missing.c_str(), &UvFs::count), 0);
  ASSERT_EQ(finish(&ours), 1);
  EXPECT_EQ(ours.result, UV_ENOENT);
  EXPECT_EQ(ours.result, theirs.result);
  EXPECT_EQ(ours.ptr, nullptr);
  uv_fs_req_cleanup(&ours);
  uv_fs_req_cleanup(&theirs);

  ASSERT_EQ(rp_fs_open(&loop_, &ours, missing.c_str(), O_RDONLY, 0, &UvFs::count), 0);
  ASSERT_EQ(finish(&ours), 1);
  EXPECT_EQ(ours.result, UV_ENOENT);
  uv_fs_req_cleanup(&ours);
}

TEST_F(UvFs, OpenReadWriteCloseRoundTrip) {
  uv_fs_t req;
  ASSERT_EQ(rp_fs_open(&loop_, &req, file_.c_str(), O_RDWR, 0, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  ASSERT_GE(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_OPEN);
  EXPECT_STREQ(req.path, file_.c_str());
  const uv_file fd = static_cast<uv_file>(req.result);
  EXPECT_TRUE(::fcntl(fd, F_GETFD) & FD_CLOEXEC);  // as libuv opens files
  uv_fs_req_cleanup(&req);

  char a[4] = {}, b[3] = {};
  uv_buf_t bufs[2] = {uv_buf_init(a, 4), uv_buf_init(b, 3)};
  ASSERT_EQ(rp_fs_read(&loop_, &req, fd, bufs, 2, 2, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 7);
  EXPECT_EQ(req.fs_type, UV_FS_READ);
  EXPECT_EQ(std::string(a, 4) + std::string(b, 3), "2345678");
  uv_fs_req_cleanup(&req);

  char w[] = "AB";
  uv_buf_t wb = uv_buf_init(w, 2);
  ASSERT_EQ(rp_fs_write(&loop_, &req, fd, &wb, 1, 8, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 2);
  EXPECT_EQ(req.fs_type, UV_FS_WRITE);
  uv_fs_req_cleanup(&req);

  // Offset -1: the file position, which the earlier positioned calls left at 0.
  char c[10] = {};
  uv_buf_t cb = uv_buf_init(c, 10);
  ASSERT_EQ(rp_fs_read(&loop_, &req, fd, &cb, 1, -1, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 10);
  EXPECT_EQ(std::string(c, 10), "01234567AB");
  uv_fs_req_cleanup(&req);
  ASSERT_EQ(rp_fs_read(&loop_, &req, fd, &cb, 1, -1, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);  // end of file
  uv_fs_req_cleanup(&req);

  for (auto op : {&rp_fs_fsync, &rp_fs_fdatasync}) {
    ASSERT_EQ(op(&loop_, &req, fd, &UvFs::count), 0);
    ASSERT_EQ(finish(&req), 1);
    EXPECT_EQ(req.result, 0);
    uv_fs_req_cleanup(&req);
  }
  ASSERT_EQ(rp_fs_ftruncate(&loop_, &req, fd, 3, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_FTRUNCATE);
  uv_fs_req_cleanup(&req);
  struct stat st;
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_EQ(st.st_size, 3);

  ASSERT_EQ(rp_fs_close(&loop_, &req, fd, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_CLOSE);
  uv_fs_req_cleanup(&req);
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
}

TEST_F(UvFs, ManyBuffersAreCopiedFromTheCaller) {
  int fd = ::open(file_.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  char bytes[10] = {};
  uv_fs_t req;
  {
    // The array goes out of scope before the read completes: libuv copies it,
    // and so must ringpark.
    uv_buf_t bufs[10];
    for (int i = 0; i < 10; ++i) bufs[i] = uv_buf_init(&bytes[i], 1);
    ASSERT_EQ(rp_fs_read(&loop_, &req, fd, bufs, 10, 0, &UvFs::count), 0);
    std::memset(bufs, 0, sizeof bufs);
  }
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 10);
  EXPECT_EQ(std::string(bytes, 10), "0123456789");
  uv_fs_req_cleanup(&req);
  ::close(fd);
}

TEST_F(UvFs, MkdirRenameUnlink) {
  uv_fs_t req;
  std::string sub = dir_ + "/sub";
  ASSERT_EQ(rp_fs_mkdir(&loop_, &req, sub.c_str(), 0755, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_MKDIR);
  uv_fs_req_cleanup(&req);
  ASSERT_EQ(rp_fs_mkdir(&loop_, &req, sub.c_str(), 0755, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, UV_EEXIST);
  uv_fs_req_cleanup(&req);

  std::string moved = sub + "/moved";
  ASSERT_EQ(rp_fs_rename(&loop_, &req, file_.c_str(), moved.c_str(), &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_RENAME);
  EXPECT_STREQ(req.path, file_.c_str());
  uv_fs_req_cleanup(&req);
  EXPECT_EQ(::access(moved.c_str(), F_OK), 0);
  EXPECT_EQ(::access(file_.c_str(), F_OK), -1);

  ASSERT_EQ(rp_fs_unlink(&loop_, &req, moved.c_str(), &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, 0);
  EXPECT_EQ(req.fs_type, UV_FS_UNLINK);
  uv_fs_req_cleanup(&req);
  EXPECT_EQ(::access(moved.c_str(), F_OK), -1);
}

TEST_F(UvFs, NullCallbackRunsSynchronouslyAsLibuv) {
  uv_fs_t req;
  EXPECT_EQ(rp_fs_stat(&loop_, &req, file_.c_str(), nullptr), 0);
  EXPECT_EQ(req.statbuf.st_size, 10u);
  uv_fs_req_cleanup(&req);
  EXPECT_EQ(rp_fs_open(&loop_, &req, (dir_ + "/nope").c_str(), O_RDONLY, 0, nullptr), UV_ENOENT);
  uv_fs_req_cleanup(&req);
}

TEST_F(UvFs, BadInputFailsAtTheCallAndTheCallbackNeverRuns) {
  uv_fs_t req;
  req.data = this;
  calls_ = 0;
  EXPECT_EQ(rp_fs_read(&loop_, &req, 0, nullptr, 1, 0, &UvFs::count), UV_EINVAL);
  uv_buf_t buf = uv_buf_init(nullptr, 0);
  EXPECT_EQ(rp_fs_read(&loop_, &req, 0, &buf, 0, 0, &UvFs::count), UV_EINVAL);
  EXPECT_EQ(rp_fs_open(&loop_, nullptr, file_.c_str(), O_RDONLY, 0, &UvFs::count), UV_EINVAL);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_NOWAIT), 0);
  EXPECT_EQ(calls_, 0);
}

TEST_F(UvFs, InvalidFdIsReportedInTheCallback) {
  uv_fs_t req;
  char c;
  uv_buf_t buf = uv_buf_init(&c, 1);
  ASSERT_EQ(rp_fs_read(&loop_, &req, 1 << 20, &buf, 1, 0, &UvFs::count), 0);
  ASSERT_EQ(finish(&req), 1);
  EXPECT_EQ(req.result, UV_EBADF);
  uv_fs_req_cleanup(&req);
}

TEST_F(UvFs, PendingRequestKeepsTheLoopAliveAndCloseWaits) {
  uv_fs_t req;
  ASSERT_EQ(rp_fs_stat(&loop_, &req, file_.c_str(), &UvFs::count), 0);
  req.data = this;
  calls_ = 0;
  EXPECT_EQ(uv_loop_alive(&loop_), 1);
  EXPECT_EQ(rp_loop_close(&loop_), UV_EBUSY);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(calls_, 1);
  uv_fs_req_cleanup(&req);
}

TEST_F(UvFs, CancelOfARingRequestAnswersBusyAndTheCallbackStillRuns) {
  uv_fs_t req;
  ASSERT_EQ(rp_fs_stat(&loop_, &req, file_.c_str(), &UvFs::count), 0);
  int r = uv_cancel(reinterpret_cast<uv_req_t*>(&req));
  // libuv's pool may not have started it yet (fallback), then it is cancelled.
  EXPECT_TRUE(r == UV_EBUSY || r == 0) << r;
  ASSERT_EQ(finish(&req), 1);
  if (r == 0) {
    EXPECT_EQ(req.result, UV_ECANCELED);
  } else {
    EXPECT_EQ(req.result, 0);
  }
  uv_fs_req_cleanup(&req);
}

}  // namespace
