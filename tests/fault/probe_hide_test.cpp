// The per-operation fallback of rp_fs_*: where the kernel's io_uring lacks an
// opcode, that one operation runs as libuv's own uv_fs_* call, and a program
// cannot tell the difference. A kernel that has every opcode is made to lack
// some through the probe's test seam, RINGPARK_PROBE_HIDE (read once per
// process, so every case runs in a forked child that sets it first).
//
// Each case runs the same script of rp_fs_* calls beside their uv_fs_* twins
// (results, errors, fields of the uv_fs_t, and what each left on disk must be
// identical) and checks which way each rp_fs_* call went: through the ring
// (it submitted SQEs) exactly when its opcode is neither hidden nor missing
// from the kernel, through libuv (no SQE) otherwise.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "child.hpp"
#include "ringpark.h"
#include "runtime/uv/loop.hpp"
#include "test_util.hpp"
#include "uv_stat_util.hpp"

namespace {

using ringpark::test::expect_same_stat;
using ringpark::test::run_in_child;

constexpr unsigned kOpFtruncate = 55;  // Linux 6.9, newer than liburing 2.3

// What the running kernel's io_uring has, asked directly (not through the
// seam under test).
bool kernel_has(unsigned op) {
  io_uring ring;
  if (io_uring_queue_init(2, &ring, 0) != 0) return false;
  io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  const bool has = probe != nullptr && io_uring_opcode_supported(probe, static_cast<int>(op));
  if (probe) io_uring_free_probe(probe);
  io_uring_queue_exit(&ring);
  return has;
}

// Runs rp_fs_* and uv_fs_* side by side on one loop.
class FsScript {
 public:
  explicit FsScript(std::set<unsigned> hidden) : hidden_(std::move(hidden)) {
    EXPECT_EQ(uv_loop_init(&loop_), 0);
    dir_ = tmp_.path;
    ::chmod(dir_.c_str(), 0755);
  }
  ~FsScript() {
    EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    std::string cmd = "rm -rf " + dir_;
    EXPECT_EQ(std::system(cmd.c_str()), 0);
  }

  uv_loop_t* loop() { return &loop_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  // A file holding `content`, made with plain syscalls.
  std::string make_file(const std::string& name, const std::string& content) {
    const std::string p = path(name);
    int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0640);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
    ::close(fd);
    return p;
  }
  static std::string contents(const std::string& p) {
    std::string s;
    int fd = ::open(p.c_str(), O_RDONLY);
    if (fd < 0) return "<missing>";
    char buf[256];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) s.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    return s;
  }

  // Runs one request whose call returned `r` to its callback; checks the
  // callback ran exactly once.
  void finish(uv_fs_t* req, int r) {
    ASSERT_EQ(r, 0) << "the call itself failed";
    int calls = 0;
    req->data = &calls;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (calls == 0 && std::chrono::steady_clock::now() < deadline) {
      rp_uv_run(&loop_, UV_RUN_ONCE);
    }
    ASSERT_EQ(calls, 1);
  }
  static void count(uv_fs_t* req) { ++*static_cast<int*>(req->data); }

  std::uint64_t sqes() {
    rp_stats_t s;
    rp_stats(&loop_, &s);
    return s.sqes_submitted;
  }

  // Runs `rp` (an rp_fs_* call on `ours`) and `uv` (its twin on `theirs`),
  // each to its callback, and compares what a callback may read. `op` is the
  // io_uring opcode the rp_fs_* call needs: checks the call went through the
  // ring exactly when that opcode is available.
  // How the two requests must compare besides the fs_type: `exact`, the same
  // result and path; `own_paths`, the same result, each its own path (calls on
  // two files made alike); `fd`, as own_paths, but a non-negative result is a
  // new fd on each side, so only its sign must agree.
  enum class Same { exact, own_paths, fd };

  template <typename Rp, typename Uv>
  void both(const char* what, unsigned op, uv_fs_t* ours, uv_fs_t* theirs, Rp rp, Uv uv,
            Same same = Same::exact) {
    SCOPED_TRACE(what);
    const std::uint64_t before = sqes();
    finish(ours, rp(&loop_, ours));
    const bool via_ring = sqes() != before;
    finish(theirs, uv(&loop_, theirs));
    const bool ring_can = kernel_has(op) && hidden_.count(op) == 0;
    EXPECT_EQ(via_ring, ring_can) << "opcode " << op
                                  << (ring_can ? " is available, yet the call"
                                               : " is hidden or missing, yet the call")
                                  << (via_ring ? " went through the ring"
                                               : " did not use the ring");
    if (same == Same::fd && theirs->result >= 0) {
      EXPECT_GE(ours->result, 0);
    } else {
      EXPECT_EQ(ours->result, theirs->result);
    }
    EXPECT_EQ(ours->fs_type, theirs->fs_type);
    if (theirs->path == nullptr) {
      EXPECT_EQ(ours->path, nullptr);
    } else if (same == Same::exact) {
      EXPECT_STREQ(ours->path, theirs->path);
    } else {
      EXPECT_NE(ours->path, nullptr);
    }
  }

 private:
  ringpark::test::TempDir tmp_;
  uv_loop_t loop_;
  std::string dir_;
  std::set<unsigned> hidden_;
};

// Every rp_fs_* call, beside its twin.
void run_script(FsScript& s) {
  uv_loop_t* loop = s.loop();
  uv_fs_t ours, theirs;
  auto cleanup = [&] {
    uv_fs_req_cleanup(&ours);
    uv_fs_req_cleanup(&theirs);
  };

  // A read through the ring first: it arms the driver's own wake read, whose
  // SQE would otherwise be counted against the first call checked below.
  {
    const std::string warm = s.make_file("warm", "w");
    int fd = ::open(warm.c_str(), O_RDONLY);
    char c;
    uv_buf_t b = uv_buf_init(&c, 1);
    s.finish(&ours, rp_fs_read(loop, &ours, fd, &b, 1, 0, &FsScript::count));
    uv_fs_req_cleanup(&ours);
    ::close(fd);
  }

  const std::string data = s.make_file("data", "0123456789abcdef");

  // ---- open, in its outcomes; the fds are compared by what they name.
  s.both(
      "open existing", IORING_OP_OPENAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_open(l, r, data.c_str(), O_RDONLY, 0, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_open(l, r, data.c_str(), O_RDONLY, 0, &FsScript::count);
      },
      FsScript::Same::fd);
  ASSERT_GE(ours.result, 0);
  ASSERT_GE(theirs.result, 0);
  const int our_fd = static_cast<int>(ours.result);
  const int their_fd = static_cast<int>(theirs.result);
  {
    struct stat a, b;
    ASSERT_EQ(::fstat(our_fd, &a), 0);
    ASSERT_EQ(::fstat(their_fd, &b), 0);
    EXPECT_EQ(a.st_ino, b.st_ino);
    EXPECT_EQ(::fcntl(our_fd, F_GETFD), ::fcntl(their_fd, F_GETFD)) << "close-on-exec differs";
    EXPECT_EQ(::fcntl(our_fd, F_GETFL), ::fcntl(their_fd, F_GETFL)) << "status flags differ";
  }
  cleanup();

  const std::string missing = s.path("missing");
  s.both(
      "open missing", IORING_OP_OPENAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_open(l, r, missing.c_str(), O_RDONLY, 0, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_open(l, r, missing.c_str(), O_RDONLY, 0, &FsScript::count);
      });
  EXPECT_EQ(ours.result, UV_ENOENT);
  cleanup();

  s.both(
      "open O_EXCL existing", IORING_OP_OPENAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_open(l, r, data.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_open(l, r, data.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600, &FsScript::count);
      });
  EXPECT_EQ(ours.result, UV_EEXIST);
  cleanup();

  const std::string new_ours = s.path("new-ours"), new_theirs = s.path("new-theirs");
  s.both(
      "open O_CREAT new", IORING_OP_OPENAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_open(l, r, new_ours.c_str(), O_RDWR | O_CREAT, 0604, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_open(l, r, new_theirs.c_str(), O_RDWR | O_CREAT, 0604, &FsScript::count);
      },
      FsScript::Same::fd);
  // The paths differ by name only; compare results and modes.
  ASSERT_GE(ours.result, 0);
  ASSERT_GE(theirs.result, 0);
  const int new_our_fd = static_cast<int>(ours.result);
  const int new_their_fd = static_cast<int>(theirs.result);
  {
    struct stat a, b;
    ASSERT_EQ(::stat(new_ours.c_str(), &a), 0);
    ASSERT_EQ(::stat(new_theirs.c_str(), &b), 0);
    EXPECT_EQ(a.st_mode, b.st_mode);
  }
  cleanup();

  // ---- read: one buffer at an offset, two buffers, the file position, EOF.
  char a1[5], b1[5];
  s.both(
      "read at offset", IORING_OP_READ, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(a1, sizeof a1);
        return rp_fs_read(l, r, our_fd, &b, 1, 2, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(b1, sizeof b1);
        return uv_fs_read(l, r, their_fd, &b, 1, 2, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 5);
  EXPECT_EQ(std::string(a1, 5), std::string(b1, 5));
  cleanup();

  char a2[3], a3[4], b2[3], b3[4];
  s.both(
      "read two buffers", IORING_OP_READV, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b[2] = {uv_buf_init(a2, 3), uv_buf_init(a3, 4)};
        return rp_fs_read(l, r, our_fd, b, 2, 1, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b[2] = {uv_buf_init(b2, 3), uv_buf_init(b3, 4)};
        return uv_fs_read(l, r, their_fd, b, 2, 1, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 7);
  EXPECT_EQ(std::string(a2, 3) + std::string(a3, 4), std::string(b2, 3) + std::string(b3, 4));
  cleanup();

  for (int round = 0; round < 2; ++round) {
    s.both(
        "read at the file position", IORING_OP_READ, &ours, &theirs,
        [&](uv_loop_t* l, uv_fs_t* r) {
          uv_buf_t b = uv_buf_init(a1, sizeof a1);
          return rp_fs_read(l, r, our_fd, &b, 1, -1, &FsScript::count);
        },
        [&](uv_loop_t* l, uv_fs_t* r) {
          uv_buf_t b = uv_buf_init(b1, sizeof b1);
          return uv_fs_read(l, r, their_fd, &b, 1, -1, &FsScript::count);
        });
    EXPECT_EQ(ours.result, 5);
    EXPECT_EQ(std::string(a1, 5), std::string(b1, 5)) << "round " << round;
    cleanup();
  }

  s.both(
      "read past the end", IORING_OP_READ, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(a1, sizeof a1);
        return rp_fs_read(l, r, our_fd, &b, 1, 100, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(b1, sizeof b1);
        return uv_fs_read(l, r, their_fd, &b, 1, 100, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 0);
  cleanup();

  // ---- fstat, stat, lstat (of a symlink), stat of a missing path.
  s.both(
      "fstat", IORING_OP_STATX, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_fstat(l, r, our_fd, &FsScript::count); },
      [&](uv_loop_t* l, uv_fs_t* r) { return uv_fs_fstat(l, r, their_fd, &FsScript::count); });
  EXPECT_EQ(ours.result, 0);
  expect_same_stat(ours.statbuf, theirs.statbuf);
  cleanup();

  s.both(
      "stat", IORING_OP_STATX, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_stat(l, r, data.c_str(), &FsScript::count); },
      [&](uv_loop_t* l, uv_fs_t* r) { return uv_fs_stat(l, r, data.c_str(), &FsScript::count); });
  EXPECT_EQ(ours.result, 0);
  EXPECT_EQ(ours.ptr, &ours.statbuf);
  expect_same_stat(ours.statbuf, theirs.statbuf);
  cleanup();

  const std::string link = s.path("link");
  ASSERT_EQ(::symlink(data.c_str(), link.c_str()), 0);
  s.both(
      "lstat", IORING_OP_STATX, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_lstat(l, r, link.c_str(), &FsScript::count); },
      [&](uv_loop_t* l, uv_fs_t* r) { return uv_fs_lstat(l, r, link.c_str(), &FsScript::count); });
  EXPECT_EQ(ours.result, 0);
  EXPECT_TRUE(S_ISLNK(ours.statbuf.st_mode));
  expect_same_stat(ours.statbuf, theirs.statbuf);
  cleanup();
  ::unlink(link.c_str());

  s.both(
      "stat missing", IORING_OP_STATX, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_stat(l, r, missing.c_str(), &FsScript::count); },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_stat(l, r, missing.c_str(), &FsScript::count);
      });
  EXPECT_EQ(ours.result, UV_ENOENT);
  cleanup();

  // ---- writes into the two new files; then both must hold the same bytes.
  static char w1[] = "hello", w2[] = ", ", w3[] = "world";
  s.both(
      "write at offset", IORING_OP_WRITE, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(w1, 5);
        return rp_fs_write(l, r, new_our_fd, &b, 1, 3, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b = uv_buf_init(w1, 5);
        return uv_fs_write(l, r, new_their_fd, &b, 1, 3, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 5);
  cleanup();
  s.both(
      "write two buffers at the file position", IORING_OP_WRITEV, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b[2] = {uv_buf_init(w2, 2), uv_buf_init(w3, 5)};
        return rp_fs_write(l, r, new_our_fd, b, 2, -1, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        uv_buf_t b[2] = {uv_buf_init(w2, 2), uv_buf_init(w3, 5)};
        return uv_fs_write(l, r, new_their_fd, b, 2, -1, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 7);
  cleanup();
  EXPECT_EQ(FsScript::contents(new_ours), FsScript::contents(new_theirs));

  for (auto [name, rp, uv] : {std::tuple{"fsync", &rp_fs_fsync, &uv_fs_fsync},
                              std::tuple{"fdatasync", &rp_fs_fdatasync, &uv_fs_fdatasync}}) {
    s.both(
        name, IORING_OP_FSYNC, &ours, &theirs,
        [&](uv_loop_t* l, uv_fs_t* r) { return rp(l, r, new_our_fd, &FsScript::count); },
        [&](uv_loop_t* l, uv_fs_t* r) { return uv(l, r, new_their_fd, &FsScript::count); });
    EXPECT_EQ(ours.result, 0);
    cleanup();
  }

  s.both(
      "ftruncate", kOpFtruncate, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_ftruncate(l, r, new_our_fd, 4, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_ftruncate(l, r, new_their_fd, 4, &FsScript::count);
      });
  EXPECT_EQ(ours.result, 0);
  cleanup();
  EXPECT_EQ(FsScript::contents(new_ours), FsScript::contents(new_theirs));
  EXPECT_EQ(FsScript::contents(new_ours).size(), 4u);

  // ---- close: the fds, then one that is closed already.
  for (auto [mine, other] : {std::pair{our_fd, their_fd}, std::pair{new_our_fd, new_their_fd}}) {
    s.both(
        "close", IORING_OP_CLOSE, &ours, &theirs,
        [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_close(l, r, mine, &FsScript::count); },
        [&](uv_loop_t* l, uv_fs_t* r) { return uv_fs_close(l, r, other, &FsScript::count); });
    EXPECT_EQ(ours.result, 0);
    cleanup();
  }
  s.both(
      "close a closed fd", IORING_OP_CLOSE, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) { return rp_fs_close(l, r, our_fd, &FsScript::count); },
      [&](uv_loop_t* l, uv_fs_t* r) { return uv_fs_close(l, r, their_fd, &FsScript::count); });
  EXPECT_EQ(ours.result, UV_EBADF);
  cleanup();

  // ---- mkdir, rename, unlink, and their errors.
  const std::string dir_ours = s.path("dir-ours"), dir_theirs = s.path("dir-theirs");
  s.both(
      "mkdir", IORING_OP_MKDIRAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_mkdir(l, r, dir_ours.c_str(), 0750, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_mkdir(l, r, dir_theirs.c_str(), 0750, &FsScript::count);
      },
      FsScript::Same::own_paths);
  EXPECT_EQ(ours.result, 0);
  cleanup();
  s.both(
      "mkdir existing", IORING_OP_MKDIRAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_mkdir(l, r, dir_ours.c_str(), 0750, &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_mkdir(l, r, dir_theirs.c_str(), 0750, &FsScript::count);
      },
      FsScript::Same::own_paths);
  EXPECT_EQ(ours.result, UV_EEXIST);
  cleanup();
  {
    struct stat a, b;
    ASSERT_EQ(::stat(dir_ours.c_str(), &a), 0);
    ASSERT_EQ(::stat(dir_theirs.c_str(), &b), 0);
    EXPECT_EQ(a.st_mode, b.st_mode);
  }
  ::rmdir(dir_ours.c_str());
  ::rmdir(dir_theirs.c_str());

  const std::string moved_ours = s.path("moved-ours"), moved_theirs = s.path("moved-theirs");
  s.both(
      "rename", IORING_OP_RENAMEAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_rename(l, r, new_ours.c_str(), moved_ours.c_str(), &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_rename(l, r, new_theirs.c_str(), moved_theirs.c_str(), &FsScript::count);
      },
      FsScript::Same::own_paths);
  EXPECT_EQ(ours.result, 0);
  EXPECT_EQ(FsScript::contents(moved_ours), FsScript::contents(moved_theirs));
  cleanup();
  s.both(
      "rename missing", IORING_OP_RENAMEAT, &ours, &theirs,
      [&](uv_loop_t* l, uv_fs_t* r) {
        return rp_fs_rename(l, r, missing.c_str(), moved_ours.c_str(), &FsScript::count);
      },
      [&](uv_loop_t* l, uv_fs_t* r) {
        return uv_fs_rename(l, r, missing.c_str(), moved_theirs.c_str(), &FsScript::count);
      },
      FsScript::Same::own_paths);
  EXPECT_EQ(ours.result, UV_ENOENT);
  cleanup();

  for (int round = 0; round < 2; ++round) {  // the second time: ENOENT
    s.both(
        "unlink", IORING_OP_UNLINKAT, &ours, &theirs,
        [&](uv_loop_t* l, uv_fs_t* r) {
          return rp_fs_unlink(l, r, moved_ours.c_str(), &FsScript::count);
        },
        [&](uv_loop_t* l, uv_fs_t* r) {
          return uv_fs_unlink(l, r, moved_theirs.c_str(), &FsScript::count);
        },
        FsScript::Same::own_paths);
    EXPECT_EQ(ours.result, round == 0 ? 0 : UV_ENOENT);
    cleanup();
  }
  ::unlink(data.c_str());
  ::unlink(s.path("warm").c_str());
}

// Opcodes by the names RINGPARK_PROBE_HIDE takes.
std::set<unsigned> opcodes(const char* list) {
  static const std::vector<std::pair<std::string, unsigned>> kNames = {
      {"OPENAT", IORING_OP_OPENAT},     {"STATX", IORING_OP_STATX},
      {"READV", IORING_OP_READV},       {"WRITEV", IORING_OP_WRITEV},
      {"FSYNC", IORING_OP_FSYNC},       {"UNLINKAT", IORING_OP_UNLINKAT},
      {"RENAMEAT", IORING_OP_RENAMEAT}, {"MKDIRAT", IORING_OP_MKDIRAT},
      {"FTRUNCATE", kOpFtruncate},      {"READ", IORING_OP_READ},
  };
  std::set<unsigned> out;
  std::string s = list;
  for (const auto& [name, op] : kNames) {
    for (std::size_t pos = 0; (pos = s.find(name, pos)) != std::string::npos; pos += name.size()) {
      const bool starts = pos == 0 || s[pos - 1] == ',';
      const bool ends = pos + name.size() == s.size() || s[pos + name.size()] == ',';
      if (starts && ends) out.insert(op);
    }
  }
  return out;
}

// In a fresh child: hides `list` (may be empty), lets ringpark pick the
// backend, and runs the script. Skips where io_uring cannot be set up at all.
void run_case(const char* list) {
  auto outcome = run_in_child([list] {
    if (*list) {
      ::setenv("RINGPARK_PROBE_HIDE", list, 1);
    } else {
      ::unsetenv("RINGPARK_PROBE_HIDE");
    }
    ::unsetenv("RINGPARK_BACKEND");
    {
      uv_loop_t probe_loop;
      uv_loop_init(&probe_loop);
      const std::string backend = rp_backend(&probe_loop);
      EXPECT_EQ(rp_loop_close(&probe_loop), 0);
      if (backend != "io_uring") GTEST_SKIP() << "no io_uring here: " << backend;
    }
    FsScript script(opcodes(list));
    run_script(script);
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

TEST(ProbeHide, FsThroughTheRingMatchesLibuv) {
  // The control: nothing hidden, so every call the kernel can run goes
  // through the ring.
  run_case("");
}

TEST(ProbeHide, OneHiddenOpcodeFallsBackForThatOperationOnly) { run_case("OPENAT"); }

TEST(ProbeHide, EveryOptionalFsOpcodeHiddenFallsBackToLibuvWithTheSameResults) {
  run_case("OPENAT,STATX,READV,WRITEV,FSYNC,UNLINKAT,RENAMEAT,MKDIRAT,FTRUNCATE");
}

TEST(ProbeHide, HidingARequiredOpcodeSelectsTheFallbackAndSaysWhy) {
  auto outcome = run_in_child([] {
    ::setenv("RINGPARK_PROBE_HIDE", "READ", 1);
    ::unsetenv("RINGPARK_BACKEND");
    if (!kernel_has(IORING_OP_READ)) GTEST_SKIP() << "no io_uring here";
    uv_loop_t loop;
    uv_loop_init(&loop);
    EXPECT_STREQ(rp_backend(&loop), "epoll (io_uring lacks IORING_OP_READ)");
    EXPECT_EQ(rp_loop_close(&loop), 0);
  });
  RP_EXPECT_CHILD_PASSED(outcome);
}

}  // namespace
