// The ring inside a stock uv_run: after rp_uv_attach (or any first rp_* call)
// a program that never calls rp_uv_run still gets every rp_* operation done,
// from whatever libuv callback starts it, and its uv_run(UV_RUN_DEFAULT) stays
// alive exactly while ringpark operations are in flight. Nothing here calls
// rp_uv_run. Runs once per backend.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "ringpark.h"
#include "tests/test_util.hpp"

// rp_tcp_* live in runtime/uv/tcp.cpp, which this test does not require: with
// weak references it links without it and skips the TCP test.
extern "C" {
#pragma weak rp_tcp_init
#pragma weak rp_tcp_bind
#pragma weak rp_listen
#pragma weak rp_accept
#pragma weak rp_tcp_connect
#pragma weak rp_read_start
#pragma weak rp_write
#pragma weak rp_close
#pragma weak rp_tcp_getsockname
}

namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using ringpark::test::Watchdog;

bool on_io_uring(uv_loop_t* loop) { return std::string(rp_backend(loop)) == "io_uring"; }

class Attach : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    char tmpl[] = "/tmp/ringpark-attach-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    file_ = dir_ + "/data";
    int fd = ::open(file_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, "0123456789", 10), 10);
    ::close(fd);
  }
  void TearDown() override {
    {
      Watchdog dog(10s, "uv_run(DEFAULT) in TearDown");
      EXPECT_EQ(uv_run(&loop_, UV_RUN_DEFAULT), 0);
    }
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    std::string cmd = "rm -rf " + dir_;
    EXPECT_EQ(std::system(cmd.c_str()), 0);
  }
  // A stock uv_run(UV_RUN_DEFAULT), bounded from outside: a hang aborts.
  int run_default() {
    Watchdog dog(10s, "uv_run(DEFAULT)");
    return uv_run(&loop_, UV_RUN_DEFAULT);
  }

  uv_loop_t loop_;
  std::string dir_, file_;
};

TEST_F(Attach, ReturnsZeroAndTheBackendIsReported) {
  EXPECT_EQ(rp_uv_attach(nullptr), UV_EINVAL);
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  EXPECT_EQ(rp_uv_attach(&loop_), 0) << "idempotent";
  const char* env = std::getenv("RINGPARK_BACKEND");
  if (env != nullptr && std::string(env) == "epoll") {
    EXPECT_STREQ(rp_backend(&loop_), "epoll (RINGPARK_BACKEND=epoll)");
  } else {
    EXPECT_STREQ(rp_backend(&loop_), "io_uring");
  }
  // The hidden handles keep nothing alive and are not the program's to see.
  int seen = 0;
  uv_walk(
      &loop_, [](uv_handle_t*, void* arg) { ++*static_cast<int*>(arg); }, &seen);
  EXPECT_EQ(seen, 0);
  EXPECT_EQ(run_default(), 0);
  EXPECT_EQ(uv_run(&loop_, UV_RUN_NOWAIT), 0);
}

// One chain of file operations, each started from the previous one's callback.
struct FsChain {
  std::string dir, sub, path, moved;
  uv_fs_t req;
  uv_file file = -1;
  char out[6] = "hello";
  char in[8] = {};
  uv_buf_t buf;
  int step = 0;
  int64_t size = -1;
  int failed_step = -1;
  int failed_result = 0;
};

void fs_chain_step(uv_fs_t* r) {
  auto* c = static_cast<FsChain*>(r->data);
  uv_loop_t* loop = r->loop;
  const int64_t result = r->result;
  const uv_fs_type type = r->fs_type;
  if (type == UV_FS_FSTAT && result == 0) c->size = static_cast<int64_t>(r->statbuf.st_size);
  uv_fs_req_cleanup(r);
  if (result < 0) {
    c->failed_step = c->step;
    c->failed_result = static_cast<int>(result);
    return;
  }
  if (type == UV_FS_OPEN) c->file = static_cast<uv_file>(result);
  if (type == UV_FS_READ) c->in[result] = '\0';
  int rc = 0;
  switch (++c->step) {
    case 1:
      rc = rp_fs_open(loop, r, c->path.c_str(), O_RDWR | O_CREAT, 0600, fs_chain_step);
      break;
    case 2:
      c->buf = uv_buf_init(c->out, 5);
      rc = rp_fs_write(loop, r, c->file, &c->buf, 1, 0, fs_chain_step);
      break;
    case 3:
      rc = rp_fs_fsync(loop, r, c->file, fs_chain_step);
      break;
    case 4:
      rc = rp_fs_fdatasync(loop, r, c->file, fs_chain_step);
      break;
    case 5:
      rc = rp_fs_ftruncate(loop, r, c->file, 4, fs_chain_step);
      break;
    case 6:
      rc = rp_fs_fstat(loop, r, c->file, fs_chain_step);
      break;
    case 7:
      c->buf = uv_buf_init(c->in, sizeof c->in - 1);
      rc = rp_fs_read(loop, r, c->file, &c->buf, 1, 0, fs_chain_step);
      break;
    case 8:
      rc = rp_fs_close(loop, r, c->file, fs_chain_step);
      break;
    case 9:
      rc = rp_fs_stat(loop, r, c->path.c_str(), fs_chain_step);
      break;
    case 10:
      rc = rp_fs_lstat(loop, r, c->path.c_str(), fs_chain_step);
      break;
    case 11:
      rc = rp_fs_rename(loop, r, c->path.c_str(), c->moved.c_str(), fs_chain_step);
      break;
    case 12:
      rc = rp_fs_unlink(loop, r, c->moved.c_str(), fs_chain_step);
      break;
    default:
      return;  // done
  }
  if (rc != 0) {
    c->failed_step = c->step;
    c->failed_result = rc;
  }
}

TEST_F(Attach, EveryFileOperationUnderStockUvRun) {
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  rp_stats_t before, after;
  ASSERT_EQ(rp_stats(&loop_, &before), 0);
  FsChain c;
  c.dir = dir_;
  c.sub = dir_ + "/sub";
  c.path = c.sub + "/f";
  c.moved = c.sub + "/g";
  c.req.data = &c;
  ASSERT_EQ(rp_fs_mkdir(&loop_, &c.req, c.sub.c_str(), 0700, fs_chain_step), 0);
  EXPECT_EQ(run_default(), 0);
  EXPECT_EQ(c.failed_step, -1) << "result " << c.failed_result;
  EXPECT_EQ(c.step, 13);
  EXPECT_EQ(c.size, 4);
  EXPECT_STREQ(c.in, "hell");
  struct stat st;
  EXPECT_EQ(::stat(c.moved.c_str(), &st), -1);
  EXPECT_EQ(::rmdir(c.sub.c_str()), 0);
  ASSERT_EQ(rp_stats(&loop_, &after), 0);
  if (on_io_uring(&loop_)) {
    // 13 requests; on a kernel without some opcode that one runs on libuv's
    // pool, so this is a lower bound with room for that.
    EXPECT_GE(after.sqes_submitted - before.sqes_submitted, 10u);
    EXPECT_GT(after.turns, before.turns);
  }
}

// ---- Operations started from each phase of libuv's loop ---------------------

enum class Phase {
  outside,  // before uv_run
  timer,
  idle,
  prepare,
  prepare_before_attach,  // a prepare handle the program started before attaching
  check,
  close_cb,
  uv_fs_cb,    // libuv's own thread-pool request
  rp_fs_cb,    // a ringpark completion
  rp_poll_cb,  // a ringpark readiness watcher
  uv_poll_cb,  // libuv's poll phase
  async,       // woken from another thread
};

std::string phase_name(const ::testing::TestParamInfo<Phase>& info) {
  switch (info.param) {
    case Phase::outside:
      return "Outside";
    case Phase::timer:
      return "Timer";
    case Phase::idle:
      return "Idle";
    case Phase::prepare:
      return "Prepare";
    case Phase::prepare_before_attach:
      return "PrepareStartedBeforeAttach";
    case Phase::check:
      return "Check";
    case Phase::close_cb:
      return "CloseCallback";
    case Phase::uv_fs_cb:
      return "UvFsCallback";
    case Phase::rp_fs_cb:
      return "RpFsCallback";
    case Phase::rp_poll_cb:
      return "RpPollCallback";
    case Phase::uv_poll_cb:
      return "UvPollCallback";
    case Phase::async:
      return "Async";
  }
  return "?";
}

// The work started from the phase under test: a file stat and a readiness
// watcher (on an eventfd that is readable already), both through ringpark.
struct Work {
  uv_loop_t* loop = nullptr;
  std::string path;
  uv_fs_t stat_req;
  int stat_result = 1;
  rp_poll_t watcher;
  int efd = -1;
  int poll_calls = 0;
  int watcher_closes = 0;
  int started = 0;

  void start() {
    ++started;
    stat_req.data = this;
    ASSERT_EQ(rp_fs_stat(loop, &stat_req, path.c_str(),
                         [](uv_fs_t* r) {
                           static_cast<Work*>(r->data)->stat_result = static_cast<int>(r->result);
                           uv_fs_req_cleanup(r);
                         }),
              0);
    watcher.data = this;
    ASSERT_EQ(rp_poll_init(loop, &watcher, efd), 0);
    ASSERT_EQ(rp_poll_start(&watcher, UV_READABLE,
                            [](rp_poll_t* h, int status, int) {
                              auto* w = static_cast<Work*>(h->data);
                              EXPECT_EQ(status, 0);
                              ++w->poll_calls;
                              rp_poll_close(h, [](rp_poll_t* c) {
                                ++static_cast<Work*>(c->data)->watcher_closes;
                              });
                            }),
              0);
  }
};

class AttachPhase : public Attach, public ::testing::WithParamInterface<Phase> {};

TEST_P(AttachPhase, OperationsStartedThereCompleteUnderStockUvRun) {
  const Phase phase = GetParam();
  Work work;
  work.loop = &loop_;
  work.path = file_;
  work.efd = ::eventfd(1, EFD_CLOEXEC);  // readable from the start
  ASSERT_GE(work.efd, 0);

  // The starter handles; each closes itself after starting the work, so that
  // only ringpark's operations can keep the loop going (and a queued SQE that
  // nobody submits would leave libuv asleep for good).
  union {
    uv_timer_t timer;
    uv_idle_t idle;
    uv_prepare_t prepare;
    uv_check_t check;
    uv_poll_t poll;
    uv_async_t async;
  } h;
  uv_timer_t wake_check;  // the check phase needs the poll before it to return
  uv_fs_t fs_req;
  rp_poll_t rp_watcher;
  int rp_efd = -1;
  std::thread sender;

  if (phase != Phase::prepare_before_attach) {
    ASSERT_EQ(rp_uv_attach(&loop_), 0);
  }
  switch (phase) {
    case Phase::outside:
      work.start();
      break;
    case Phase::timer:
      uv_timer_init(&loop_, &h.timer);
      h.timer.data = &work;
      uv_timer_start(
          &h.timer,
          [](uv_timer_t* t) {
            static_cast<Work*>(t->data)->start();
            uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr);
          },
          1, 0);
      break;
    case Phase::idle:
      uv_idle_init(&loop_, &h.idle);
      h.idle.data = &work;
      uv_idle_start(&h.idle, [](uv_idle_t* i) {
        static_cast<Work*>(i->data)->start();
        uv_close(reinterpret_cast<uv_handle_t*>(i), nullptr);
      });
      break;
    case Phase::prepare:
    case Phase::prepare_before_attach:
      uv_prepare_init(&loop_, &h.prepare);
      h.prepare.data = &work;
      uv_prepare_start(&h.prepare, [](uv_prepare_t* p) {
        static_cast<Work*>(p->data)->start();
        uv_close(reinterpret_cast<uv_handle_t*>(p), nullptr);
      });
      if (phase == Phase::prepare_before_attach) {
        ASSERT_EQ(rp_uv_attach(&loop_), 0);
      }
      break;
    case Phase::check:
      uv_check_init(&loop_, &h.check);
      h.check.data = &work;
      uv_check_start(&h.check, [](uv_check_t* c) {
        static_cast<Work*>(c->data)->start();
        uv_close(reinterpret_cast<uv_handle_t*>(c), nullptr);
      });
      uv_timer_init(&loop_, &wake_check);
      uv_timer_start(
          &wake_check, [](uv_timer_t* t) { uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr); },
          1, 0);
      break;
    case Phase::close_cb:
      uv_timer_init(&loop_, &h.timer);
      h.timer.data = &work;
      uv_close(reinterpret_cast<uv_handle_t*>(&h.timer),
               [](uv_handle_t* t) { static_cast<Work*>(t->data)->start(); });
      break;
    case Phase::uv_fs_cb:
      fs_req.data = &work;
      ASSERT_EQ(uv_fs_stat(&loop_, &fs_req, file_.c_str(),
                           [](uv_fs_t* r) {
                             uv_fs_req_cleanup(r);
                             static_cast<Work*>(r->data)->start();
                           }),
                0);
      break;
    case Phase::rp_fs_cb:
      fs_req.data = &work;
      ASSERT_EQ(rp_fs_stat(&loop_, &fs_req, file_.c_str(),
                           [](uv_fs_t* r) {
                             uv_fs_req_cleanup(r);
                             static_cast<Work*>(r->data)->start();
                           }),
                0);
      break;
    case Phase::rp_poll_cb:
      rp_efd = ::eventfd(1, EFD_CLOEXEC);
      ASSERT_GE(rp_efd, 0);
      rp_watcher.data = &work;
      ASSERT_EQ(rp_poll_init(&loop_, &rp_watcher, rp_efd), 0);
      ASSERT_EQ(rp_poll_start(&rp_watcher, UV_READABLE,
                              [](rp_poll_t* p, int, int) {
                                rp_poll_close(p, nullptr);
                                static_cast<Work*>(p->data)->start();
                              }),
                0);
      break;
    case Phase::uv_poll_cb:
      rp_efd = ::eventfd(1, EFD_CLOEXEC);
      ASSERT_GE(rp_efd, 0);
      ASSERT_EQ(uv_poll_init(&loop_, &h.poll, rp_efd), 0);
      h.poll.data = &work;
      uv_poll_start(&h.poll, UV_READABLE, [](uv_poll_t* p, int, int) {
        static_cast<Work*>(p->data)->start();
        uv_close(reinterpret_cast<uv_handle_t*>(p), nullptr);
      });
      break;
    case Phase::async:
      h.async.data = &work;
      uv_async_init(&loop_, &h.async, [](uv_async_t* a) {
        static_cast<Work*>(a->data)->start();
        uv_close(reinterpret_cast<uv_handle_t*>(a), nullptr);
      });
      sender = std::thread([&h] {
        std::this_thread::sleep_for(20ms);
        uv_async_send(&h.async);
      });
      break;
  }

  EXPECT_EQ(run_default(), 0);
  if (sender.joinable()) sender.join();
  EXPECT_EQ(work.started, 1);
  EXPECT_EQ(work.stat_result, 0);
  EXPECT_EQ(work.poll_calls, 1);
  EXPECT_EQ(work.watcher_closes, 1);
  ::close(work.efd);
  if (rp_efd >= 0) ::close(rp_efd);
}

INSTANTIATE_TEST_SUITE_P(Phases, AttachPhase,
                         ::testing::Values(Phase::outside, Phase::timer, Phase::idle,
                                           Phase::prepare, Phase::prepare_before_attach,
                                           Phase::check, Phase::close_cb, Phase::uv_fs_cb,
                                           Phase::rp_fs_cb, Phase::rp_poll_cb, Phase::uv_poll_cb,
                                           Phase::async),
                         phase_name);

// ---- Liveness ----------------------------------------------------------------

TEST_F(Attach, LoopStaysAliveWhileAnOperationIsInFlight) {
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  // A read on an empty pipe waits in the kernel (or, on the fallback, in
  // libuv's pool) until a writer thread feeds it 100 ms later.
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  struct Read {
    uv_fs_t req;
    char buf[8] = {};
    uv_buf_t iov;
    int64_t result = 1;
    Clock::time_point done{};
  } rd;
  rd.iov = uv_buf_init(rd.buf, sizeof rd.buf);
  rd.req.data = &rd;
  ASSERT_EQ(rp_fs_read(&loop_, &rd.req, fds[0], &rd.iov, 1, -1,
                       [](uv_fs_t* r) {
                         auto* rd = static_cast<Read*>(r->data);
                         rd->result = r->result;
                         rd->done = Clock::now();
                         uv_fs_req_cleanup(r);
                       }),
            0);
  // Nothing but the read keeps this loop alive.
  EXPECT_NE(uv_run(&loop_, UV_RUN_NOWAIT), 0);
  EXPECT_EQ(rd.result, 1);
  const auto start = Clock::now();
  std::thread writer([&] {
    std::this_thread::sleep_for(100ms);
    ASSERT_EQ(::write(fds[1], "ping", 4), 4);
  });
  EXPECT_EQ(run_default(), 0);
  const auto returned = Clock::now();
  writer.join();
  EXPECT_EQ(rd.result, 4);
  EXPECT_STREQ(rd.buf, "ping");
  EXPECT_GE(returned - start, 90ms) << "uv_run returned before the read completed";
  EXPECT_GE(returned, rd.done);
  EXPECT_EQ(uv_run(&loop_, UV_RUN_NOWAIT), 0) << "nothing left";
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_F(Attach, StoppedWatcherLetsTheLoopEnd) {
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  rp_poll_t w;
  ASSERT_EQ(rp_poll_init(&loop_, &w, fds[0]), 0);
  ASSERT_EQ(rp_poll_start(&w, UV_READABLE, [](rp_poll_t*, int, int) {}), 0);
  EXPECT_NE(uv_run(&loop_, UV_RUN_NOWAIT), 0) << "an active watcher keeps the loop alive";
  // A timer stops it 30 ms later; then uv_run(DEFAULT) must return.
  uv_timer_t timer;
  uv_timer_init(&loop_, &timer);
  timer.data = &w;
  uv_timer_start(
      &timer,
      [](uv_timer_t* t) {
        rp_poll_close(static_cast<rp_poll_t*>(t->data), nullptr);
        uv_close(reinterpret_cast<uv_handle_t*>(t), nullptr);
      },
      30, 0);
  EXPECT_EQ(run_default(), 0);
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_F(Attach, UvStopFromARingparkCallbackIsHonoured) {
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  // A referenced repeating timer keeps the loop alive: only uv_stop ends the run.
  uv_timer_t keep;
  uv_timer_init(&loop_, &keep);
  uv_timer_start(
      &keep, [](uv_timer_t*) {}, 60'000, 60'000);
  int efd = ::eventfd(1, EFD_CLOEXEC);
  rp_poll_t w;
  ASSERT_EQ(rp_poll_init(&loop_, &w, efd), 0);
  ASSERT_EQ(rp_poll_start(&w, UV_READABLE,
                          [](rp_poll_t* p, int, int) {
                            rp_poll_stop(p);
                            uv_stop(p->loop);
                          }),
            0);
  EXPECT_NE(run_default(), 0);
  EXPECT_EQ(rp_poll_close(&w, nullptr), 0);
  uv_close(reinterpret_cast<uv_handle_t*>(&keep), nullptr);
  EXPECT_EQ(run_default(), 0);
  ::close(efd);
}

// ---- TCP, when runtime/uv/tcp.cpp is in the build ----------------------------

TEST_F(Attach, TcpEchoUnderStockUvRun) {
  if (&rp_tcp_init == nullptr)
    GTEST_SKIP() << "rp_tcp_* are not in this build (runtime/uv/tcp.cpp)";
  ASSERT_EQ(rp_uv_attach(&loop_), 0);
  struct Echo {
    rp_tcp_t server, client, accepted;
    rp_connect_t connect;
    rp_write_t write_req, echo_req;
    char rbuf[64], sbuf[64];
    std::string received, echoed;
    int closes = 0;
  };
  static Echo* e;
  Echo echo;
  e = &echo;
  static const char kMessage[] = "ping through the ring";
  sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  ASSERT_EQ(rp_tcp_init(&loop_, &echo.server), 0);
  ASSERT_EQ(rp_tcp_bind(&echo.server, reinterpret_cast<sockaddr*>(&addr), 0), 0);
  ASSERT_EQ(rp_listen(&echo.server, 8,
                      [](rp_tcp_t* server, int status) {
                        ASSERT_EQ(status, 0);
                        ASSERT_EQ(rp_tcp_init(server->loop, &e->accepted), 0);
                        ASSERT_EQ(rp_accept(server, &e->accepted), 0);
                        rp_read_start(
                            &e->accepted,
                            [](rp_tcp_t*, size_t, uv_buf_t* b) {
                              *b = uv_buf_init(e->sbuf, sizeof e->sbuf);
                            },
                            [](rp_tcp_t* s, ssize_t n, const uv_buf_t* b) {
                              if (n > 0) {
                                e->echoed.assign(b->base, static_cast<size_t>(n));
                                uv_buf_t out = uv_buf_init(e->echoed.data(), e->echoed.size());
                                rp_write(&e->echo_req, s, &out, 1, nullptr);
                              } else if (n < 0) {
                                rp_close(s, [](rp_tcp_t*) { ++e->closes; });
                              }
                            });
                      }),
            0);
  sockaddr_storage bound;
  int len = sizeof bound;
  ASSERT_EQ(rp_tcp_getsockname(&echo.server, reinterpret_cast<sockaddr*>(&bound), &len), 0);
  ASSERT_EQ(rp_tcp_init(&loop_, &echo.client), 0);
  ASSERT_EQ(rp_tcp_connect(&echo.connect, &echo.client, reinterpret_cast<sockaddr*>(&bound),
                           [](rp_connect_t* c, int status) {
                             ASSERT_EQ(status, 0);
                             uv_buf_t out =
                                 uv_buf_init(const_cast<char*>(kMessage), sizeof kMessage - 1);
                             rp_write(&e->write_req, c->handle, &out, 1, nullptr);
                             rp_read_start(
                                 c->handle,
                                 [](rp_tcp_t*, size_t, uv_buf_t* b) {
                                   *b = uv_buf_init(e->rbuf, sizeof e->rbuf);
                                 },
                                 [](rp_tcp_t* s, ssize_t n, const uv_buf_t* b) {
                                   if (n > 0) e->received.append(b->base, static_cast<size_t>(n));
                                   if (n < 0 || e->received.size() >= sizeof kMessage - 1) {
                                     rp_close(s, [](rp_tcp_t*) { ++e->closes; });
                                     rp_close(&e->server, [](rp_tcp_t*) { ++e->closes; });
                                   }
                                 });
                           }),
            0);
  EXPECT_EQ(run_default(), 0);
  EXPECT_EQ(echo.received, kMessage);
  EXPECT_EQ(echo.closes, 3);
}

}  // namespace
