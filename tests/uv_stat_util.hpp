// Compares two uv_stat_t field by field (ringpark's answer beside libuv's),
// so that a failure names the field. Header-only, test code only.
#pragma once

#include <gtest/gtest.h>
#include <uv.h>

namespace ringpark::test {

inline void expect_same_stat(const uv_stat_t& a, const uv_stat_t& b) {
  EXPECT_EQ(a.st_dev, b.st_dev);
  EXPECT_EQ(a.st_mode, b.st_mode);
  EXPECT_EQ(a.st_nlink, b.st_nlink);
  EXPECT_EQ(a.st_uid, b.st_uid);
  EXPECT_EQ(a.st_gid, b.st_gid);
  EXPECT_EQ(a.st_rdev, b.st_rdev);
  EXPECT_EQ(a.st_ino, b.st_ino);
  EXPECT_EQ(a.st_size, b.st_size);
  EXPECT_EQ(a.st_blksize, b.st_blksize);
  EXPECT_EQ(a.st_blocks, b.st_blocks);
  EXPECT_EQ(a.st_flags, b.st_flags);
  EXPECT_EQ(a.st_gen, b.st_gen);
  EXPECT_EQ(a.st_mtim.tv_sec, b.st_mtim.tv_sec);
  EXPECT_EQ(a.st_mtim.tv_nsec, b.st_mtim.tv_nsec);
  EXPECT_EQ(a.st_ctim.tv_sec, b.st_ctim.tv_sec);
  EXPECT_EQ(a.st_ctim.tv_nsec, b.st_ctim.tv_nsec);
  EXPECT_EQ(a.st_birthtim.tv_sec, b.st_birthtim.tv_sec);
  EXPECT_EQ(a.st_birthtim.tv_nsec, b.st_birthtim.tv_nsec);
}

}  // namespace ringpark::test
