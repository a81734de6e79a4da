// libuv programs under rp_uv_run: each test is an ordinary libuv program whose
// uv_run calls were renamed, and checks that it behaves as under uv_run. Every
// test runs once per backend (RINGPARK_BACKEND=uring and =epoll).
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <gtest/gtest.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "ringpark.h"
#include "runtime/uv/loop.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using ringpark::detail::LoopContext;
using ringpark::detail::Op;
using ringpark::detail::OpCode;

class UvRun : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(uv_loop_init(&loop_), 0); }
  // Every test ends with close_loop() while its handles are still alive.
  void TearDown() override { EXPECT_TRUE(closed_); }
  // What a careful libuv program does at exit: close every handle, run the
  // close callbacks, close the loop. uv_loop_close must then succeed.
  void close_loop() {
    uv_walk(
        &loop_,
        [](uv_handle_t* h, void*) {
          if (!uv_is_closing(h)) uv_close(h, nullptr);
        },
        nullptr);
    EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
    EXPECT_EQ(rp_loop_close(&loop_), 0);
    closed_ = true;
  }

  // Keeps ringpark busy with a timeout op in the ring, so the loop sleeps in
  // the ring (not in libuv's epoll_wait) while the test runs.
  void keep_ringpark_busy() {
    LoopContext* ctx = LoopContext::get(&loop_);
    ASSERT_NE(ctx, nullptr);
    busy_op_.code = OpCode::timeout;
    busy_op_.timeout_ns = 60'000'000'000ull;
    busy_op_.complete = [](Op* op, int res, std::uint32_t) noexcept {
      *static_cast<int*>(op->data) = res;
    };
    busy_op_.data = &busy_res_;
    ctx->chain().io().submit(&busy_op_);
  }
  void stop_ringpark_busy() {
    LoopContext::get(&loop_)->chain().io().cancel(&busy_op_);
    while (busy_res_ == 1) rp_uv_run(&loop_, UV_RUN_ONCE);
    EXPECT_EQ(busy_res_, -ECANCELED);
  }

  uv_loop_t loop_;
  bool closed_ = false;
  Op busy_op_;
  int busy_res_ = 1;
};

TEST_F(UvRun, ReportsTheBackendChosenByTheEnvironment) {
  const char* env = std::getenv("RINGPARK_BACKEND");
  std::string backend = rp_backend(&loop_);
  if (env && std::string(env) == "epoll") {
    EXPECT_EQ(backend, "epoll (RINGPARK_BACKEND=epoll)");
  } else {
    EXPECT_EQ(backend, "io_uring");
  }
  close_loop();
}

TEST_F(UvRun, EmptyLoopReturnsZeroAtOnce) {
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_ONCE), 0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_NOWAIT), 0);
  close_loop();
}

TEST_F(UvRun, TimerFiresOnceAndLoopEnds) {
  uv_timer_t timer;
  int fired = 0;
  uv_timer_init(&loop_, &timer);
  timer.data = &fired;
  uv_timer_start(
      &timer, [](uv_timer_t* t) { ++*static_cast<int*>(t->data); }, 20, 0);
  auto start = Clock::now();
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(fired, 1);
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(19));
  close_loop();
}

TEST_F(UvRun, LibuvTimerIsNotLateWhileRingparkSleepsInTheRing) {
  keep_ringpark_busy();
  uv_timer_t timer;
  Clock::time_point fired_at{};
  uv_timer_init(&loop_, &timer);
  timer.data = &fired_at;
  uv_timer_start(
      &timer, [](uv_timer_t* t) { *static_cast<Clock::time_point*>(t->data) = Clock::now(); },
      30, 0);
  auto start = Clock::now();
  while (fired_at == Clock::time_point{} && Clock::now() - start < std::chrono::seconds(5))
    rp_uv_run(&loop_, UV_RUN_ONCE);
  ASSERT_NE(fired_at, Clock::time_point{});
  // Without folding uv_backend_timeout into the ring's wait this would be 60 s.
  EXPECT_LT(fired_at - start, std::chrono::seconds(1));
  stop_ringpark_busy();
  close_loop();
}

TEST_F(UvRun, StopIsHonoured) {
  uv_timer_t timer;
  int fired = 0;
  uv_timer_init(&loop_, &timer);
  timer.data = &fired;
  uv_timer_start(
      &timer,
      [](uv_timer_t* t) {
        if (++*static_cast<int*>(t->data) == 3) uv_stop(t->loop);
      },
      1, 1);
  // The repeating timer keeps the loop alive, so a non-zero return means
  // rp_uv_run returned because of uv_stop.
  EXPECT_NE(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(fired, 3);
  uv_timer_stop(&timer);
  close_loop();
}

TEST_F(UvRun, IdleHandleRunsWithoutBlocking) {
  uv_idle_t idle;
  int runs = 0;
  uv_idle_init(&loop_, &idle);
  idle.data = &runs;
  uv_idle_start(&idle, [](uv_idle_t* i) {
    if (++*static_cast<int*>(i->data) == 100) uv_idle_stop(i);
  });
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(runs, 100);
  close_loop();
}

TEST_F(UvRun, NowaitReturnsAtOnceWithReferencedTimer) {
  uv_timer_t timer;
  uv_timer_init(&loop_, &timer);
  uv_timer_start(&timer, [](uv_timer_t*) {}, 10'000, 0);
  auto start = Clock::now();
  EXPECT_NE(rp_uv_run(&loop_, UV_RUN_NOWAIT), 0);
  EXPECT_LT(Clock::now() - start, std::chrono::milliseconds(500));
  uv_timer_stop(&timer);
  close_loop();
}

TEST_F(UvRun, AsyncFromAnotherThreadWakesTheLoop) {
  uv_async_t async;
  int calls = 0;
  async.data = &calls;
  uv_async_init(&loop_, &async, [](uv_async_t* a) {
    ++*static_cast<int*>(a->data);
    uv_close(reinterpret_cast<uv_handle_t*>(a), nullptr);
  });
  std::thread sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    uv_async_send(&async);
  });
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  sender.join();
  EXPECT_EQ(calls, 1);
  close_loop();
}

TEST_F(UvRun, AsyncWakesTheLoopWhileItSleepsInTheRing) {
  keep_ringpark_busy();
  uv_async_t async;
  int calls = 0;
  async.data = &calls;
  uv_async_init(&loop_, &async, [](uv_async_t* a) { ++*static_cast<int*>(a->data); });
  std::thread sender([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    uv_async_send(&async);
  });
  auto start = Clock::now();
  while (calls == 0 && Clock::now() - start < std::chrono::seconds(5))
    rp_uv_run(&loop_, UV_RUN_ONCE);
  sender.join();
  EXPECT_EQ(calls, 1);
  uv_close(reinterpret_cast<uv_handle_t*>(&async), nullptr);
  stop_ringpark_busy();
  close_loop();
}

TEST_F(UvRun, CloseCallbacksRunExactlyOnce) {
  int closed[3] = {0, 0, 0};
  uv_timer_t timer;
  uv_idle_t idle;
  uv_prepare_t prepare;
  uv_timer_init(&loop_, &timer);
  uv_idle_init(&loop_, &idle);
  uv_prepare_init(&loop_, &prepare);
  timer.data = &closed[0];
  idle.data = &closed[1];
  prepare.data = &closed[2];
  auto on_close = [](uv_handle_t* h) { ++*static_cast<int*>(h->data); };
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), on_close);
  uv_close(reinterpret_cast<uv_handle_t*>(&idle), on_close);
  uv_close(reinterpret_cast<uv_handle_t*>(&prepare), on_close);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(closed[0], 1);
  EXPECT_EQ(closed[1], 1);
  EXPECT_EQ(closed[2], 1);
  close_loop();
}

TEST_F(UvRun, FsRequestsOnTheThreadPool) {
  char dir_template[] = "/tmp/ringpark-uvfs-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  std::string path = std::string(dir_template) + "/f";
  struct State {
    uv_fs_t req;
    uv_file file = -1;
    char out[6] = "hello";
    char in[6] = {};
    uv_buf_t buf;
    int step = 0;
  } st;
  st.req.data = &st;
  auto on_close = [](uv_fs_t* r) {
    auto* s = static_cast<State*>(r->data);
    EXPECT_EQ(r->result, 0);
    s->step = 4;
    uv_fs_req_cleanup(r);
  };
  ASSERT_EQ(uv_fs_open(&loop_, &st.req, path.c_str(), O_RDWR | O_CREAT, 0600,
                       [](uv_fs_t* r) {
                         auto* s = static_cast<State*>(r->data);
                         ASSERT_GE(r->result, 0);
                         s->file = static_cast<uv_file>(r->result);
                         s->step = 1;
                         uv_fs_req_cleanup(r);
                         s->buf = uv_buf_init(s->out, 5);
                         uv_fs_write(r->loop, r, s->file, &s->buf, 1, 0, [](uv_fs_t* w) {
                           auto* s = static_cast<State*>(w->data);
                           EXPECT_EQ(w->result, 5);
                           s->step = 2;
                           uv_fs_req_cleanup(w);
                           s->buf = uv_buf_init(s->in, 5);
                           uv_fs_read(w->loop, w, s->file, &s->buf, 1, 0, [](uv_fs_t* rd) {
                             auto* s = static_cast<State*>(rd->data);
                             EXPECT_EQ(rd->result, 5);
                             s->step = 3;
                             uv_fs_req_cleanup(rd);
                           });
                         });
                       }),
            0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  ASSERT_EQ(st.step, 3);
  EXPECT_STREQ(st.in, "hello");
  ASSERT_EQ(uv_fs_close(&loop_, &st.req, st.file, on_close), 0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(st.step, 4);
  unlink(path.c_str());
  rmdir(dir_template);
  close_loop();
}

// A TCP echo over 127.0.0.1, server and client on the same loop.
struct Echo {
  uv_tcp_t server, client, accepted;
  uv_connect_t connect;
  uv_write_t write_req, echo_req;
  std::string received;
  std::string echo_buf;
  int closes = 0;
  static constexpr const char* kMessage = "ping over loopback";
};

void alloc_buf(uv_handle_t*, size_t suggested, uv_buf_t* buf) {
  buf->base = static_cast<char*>(malloc(suggested));
  buf->len = suggested;
}

void run_echo(uv_loop_t* loop, bool ring_busy_check) {
  static Echo* e;
  Echo echo;
  e = &echo;
  sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  ASSERT_EQ(uv_tcp_init(loop, &echo.server), 0);
  ASSERT_EQ(uv_tcp_bind(&echo.server, reinterpret_cast<sockaddr*>(&addr), 0), 0);
  ASSERT_EQ(uv_listen(reinterpret_cast<uv_stream_t*>(&echo.server), 16,
                      [](uv_stream_t* server, int status) {
                        ASSERT_EQ(status, 0);
                        uv_tcp_init(server->loop, &e->accepted);
                        ASSERT_EQ(uv_accept(server, reinterpret_cast<uv_stream_t*>(&e->accepted)),
                                  0);
                        uv_read_start(reinterpret_cast<uv_stream_t*>(&e->accepted), alloc_buf,
                                      [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
                                        if (n > 0) {
                                          e->echo_buf.assign(buf->base, n);
                                          uv_buf_t out =
                                              uv_buf_init(e->echo_buf.data(), e->echo_buf.size());
                                          uv_write(&e->echo_req, s, &out, 1, nullptr);
                                        } else if (n < 0) {
                                          uv_close(reinterpret_cast<uv_handle_t*>(s),
                                                   [](uv_handle_t*) { ++e->closes; });
                                        }
                                        free(buf->base);
                                      });
                      }),
            0);
  sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&echo.server, reinterpret_cast<sockaddr*>(&bound), &len);
  uv_tcp_init(loop, &echo.client);
  ASSERT_EQ(
      uv_tcp_connect(&echo.connect, &echo.client, reinterpret_cast<sockaddr*>(&bound),
                     [](uv_connect_t* c, int status) {
                       ASSERT_EQ(status, 0);
                       uv_buf_t out = uv_buf_init(const_cast<char*>(Echo::kMessage),
                                                  std::strlen(Echo::kMessage));
                       uv_write(&e->write_req, c->handle, &out, 1, nullptr);
                       uv_read_start(c->handle, alloc_buf,
                                     [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
                                       if (n > 0) e->received.append(buf->base, n);
                                       free(buf->base);
                                       if (e->received.size() >= std::strlen(Echo::kMessage)) {
                                         uv_close(reinterpret_cast<uv_handle_t*>(s),
                                                  [](uv_handle_t*) { ++e->closes; });
                                         uv_close(reinterpret_cast<uv_handle_t*>(&e->server),
                                                  [](uv_handle_t*) { ++e->closes; });
                                       }
                                     });
                     }),
      0);
  if (ring_busy_check) {
    auto start = Clock::now();
    while (echo.closes < 3 && Clock::now() - start < std::chrono::seconds(10))
      rp_uv_run(loop, UV_RUN_ONCE);
  } else {
    EXPECT_EQ(rp_uv_run(loop, UV_RUN_DEFAULT), 0);
  }
  EXPECT_EQ(echo.received, Echo::kMessage);
  EXPECT_EQ(echo.closes, 3);
}

TEST_F(UvRun, TcpEchoOverLoopback) { run_echo(&loop_, false);
  close_loop();
}

TEST_F(UvRun, TcpEchoWhileSleepingInTheRing) {
  keep_ringpark_busy();
  run_echo(&loop_, true);
  stop_ringpark_busy();
  close_loop();
}

// The level-triggered case of DESIGN.md: libuv reads a stream at most 32
// times per wakeup, so the loop must wake again while data is still queued.
// With ringpark busy the loop sleeps in the ring, which polls libuv's epoll fd.
void read_whole_pipe(uv_loop_t* loop, size_t total, size_t chunk) {
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  ASSERT_GE(fcntl(fds[1], F_SETPIPE_SZ, static_cast<int>(total)), static_cast<int>(total));
  std::vector<char> data(total);
  for (size_t i = 0; i < total; ++i) data[i] = static_cast<char>(i * 7);
  ASSERT_EQ(write(fds[1], data.data(), total), static_cast<ssize_t>(total));
  close(fds[1]);

  struct Reader {
    uv_pipe_t pipe;
    std::vector<char> got;
    size_t chunk;
    bool eof = false;
  } reader;
  reader.chunk = chunk;
  reader.pipe.data = &reader;
  ASSERT_EQ(uv_pipe_init(loop, &reader.pipe, 0), 0);
  ASSERT_EQ(uv_pipe_open(&reader.pipe, fds[0]), 0);
  uv_read_start(
      reinterpret_cast<uv_stream_t*>(&reader.pipe),
      [](uv_handle_t* h, size_t, uv_buf_t* buf) {
        auto* r = static_cast<Reader*>(h->data);
        buf->base = static_cast<char*>(malloc(r->chunk));
        buf->len = r->chunk;
      },
      [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
        auto* r = static_cast<Reader*>(s->data);
        if (n > 0) r->got.insert(r->got.end(), buf->base, buf->base + n);
        if (n == UV_EOF) {
          r->eof = true;
          uv_close(reinterpret_cast<uv_handle_t*>(s), nullptr);
        }
        free(buf->base);
      });
  auto start = Clock::now();
  while (!reader.eof && Clock::now() - start < std::chrono::seconds(10))
    rp_uv_run(loop, UV_RUN_ONCE);
  EXPECT_TRUE(reader.eof);
  ASSERT_EQ(reader.got.size(), total);
  EXPECT_EQ(reader.got, data);
}

TEST_F(UvRun, PipeOf256KiBReadThrough1KiBBuffersWhileSleepingInTheRing) {
  keep_ringpark_busy();
  read_whole_pipe(&loop_, 256 * 1024, 1024);
  stop_ringpark_busy();
  close_loop();
}

TEST_F(UvRun, OnceAfterReadStartRunsTheReadCallback) {
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  ASSERT_EQ(write(fds[1], "x", 1), 1);
  uv_pipe_t pipe;
  int reads = 0;
  pipe.data = &reads;
  uv_pipe_init(&loop_, &pipe, 0);
  uv_pipe_open(&pipe, fds[0]);
  // uv_read_start only queues the fd for libuv's epoll set; uv_backend_timeout
  // reads 0 until uv_run has added it. ONCE must still wait for the data.
  uv_read_start(reinterpret_cast<uv_stream_t*>(&pipe), alloc_buf,
                [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
                  if (n > 0) ++*static_cast<int*>(s->data);
                  free(buf->base);
                });
  EXPECT_NE(rp_uv_run(&loop_, UV_RUN_ONCE), 0);
  EXPECT_EQ(reads, 1);
  uv_close(reinterpret_cast<uv_handle_t*>(&pipe), nullptr);
  close(fds[1]);
  close_loop();
}

TEST_F(UvRun, OnceAfterReadStartWhileRingparkIsBusy) {
  keep_ringpark_busy();
  int fds[2];
  ASSERT_EQ(pipe2(fds, O_CLOEXEC), 0);
  uv_pipe_t pipe;
  int reads = 0;
  pipe.data = &reads;
  uv_pipe_init(&loop_, &pipe, 0);
  uv_pipe_open(&pipe, fds[0]);
  uv_read_start(reinterpret_cast<uv_stream_t*>(&pipe), alloc_buf,
                [](uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
                  if (n > 0) ++*static_cast<int*>(s->data);
                  free(buf->base);
                });
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ASSERT_EQ(write(fds[1], "x", 1), 1);
  });
  EXPECT_NE(rp_uv_run(&loop_, UV_RUN_ONCE), 0);
  writer.join();
  EXPECT_EQ(reads, 1);
  uv_close(reinterpret_cast<uv_handle_t*>(&pipe), nullptr);
  close(fds[1]);
  stop_ringpark_busy();
  close_loop();
}

TEST_F(UvRun, RingparkOperationKeepsTheLoopAliveUntilItCompletes) {
  LoopContext* ctx = LoopContext::get(&loop_);
  ASSERT_NE(ctx, nullptr);
  Op op;
  int res = 1;
  op.code = OpCode::timeout;
  op.timeout_ns = 30'000'000;
  op.data = &res;
  op.complete = [](Op* o, int r, std::uint32_t) noexcept { *static_cast<int*>(o->data) = r; };
  ctx->chain().io().submit(&op);
  auto start = Clock::now();
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(res, -ETIME);
  EXPECT_GE(Clock::now() - start, std::chrono::milliseconds(29));
  close_loop();
}

TEST_F(UvRun, OnceReturnsAfterOnlyRingparkCallbacksRan) {
  // A ringpark completion is a callback of this loop: ONCE returns after it,
  // even though libuv itself had nothing to do and another op stays in flight.
  keep_ringpark_busy();
  LoopContext* ctx = LoopContext::get(&loop_);
  Op op;
  int res = 1;
  op.code = OpCode::timeout;
  op.timeout_ns = 20'000'000;
  op.data = &res;
  op.complete = [](Op* o, int r, std::uint32_t) noexcept { *static_cast<int*>(o->data) = r; };
  ctx->chain().io().submit(&op);
  auto start = Clock::now();
  while (res == 1 && Clock::now() - start < std::chrono::seconds(5)) {
    EXPECT_NE(rp_uv_run(&loop_, UV_RUN_ONCE), 0);  // the busy op keeps it alive
  }
  EXPECT_EQ(res, -ETIME);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  stop_ringpark_busy();
  close_loop();
}

TEST_F(UvRun, RingparkOperationCompletesUnderPlainUvRun) {
  // The ring inside the loop: libuv sleeps, the ring's eventfd (or the
  // fallback's epoll fd) wakes it.
  LoopContext* ctx = LoopContext::get(&loop_);
  ASSERT_NE(ctx, nullptr);
  Op op;
  int res = 1;
  op.code = OpCode::timeout;
  op.timeout_ns = 20'000'000;
  op.data = &res;
  op.complete = [](Op* o, int r, std::uint32_t) noexcept { *static_cast<int*>(o->data) = r; };
  ctx->chain().io().submit(&op);
  ctx->before_libuv_sleeps();
  EXPECT_EQ(uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(res, -ETIME);
  close_loop();
}

TEST_F(UvRun, CompletionWakesTheLoopAfterAStaleLibuvEvent) {
  // libuv leaves a stream's fd in its epoll set when the stream stops
  // reading, and removes it only when epoll next reports it; then it polls
  // again. Such a report makes libuv's epoll fd readable, which ends a sleep
  // in the ring, yet libuv's poll then blocks once more: a ringpark completion
  // that comes during that poll must still wake it.
  int pair[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
  uv_pipe_t stale;
  ASSERT_EQ(uv_pipe_init(&loop_, &stale, 0), 0);
  ASSERT_EQ(uv_pipe_open(&stale, pair[0]), 0);
  ASSERT_EQ(uv_read_start(reinterpret_cast<uv_stream_t*>(&stale),
                          [](uv_handle_t*, size_t, uv_buf_t* b) { *b = uv_buf_init(nullptr, 0); },
                          [](uv_stream_t*, ssize_t, const uv_buf_t*) {}),
            0);
  rp_uv_run(&loop_, UV_RUN_NOWAIT);  // into libuv's epoll set
  ASSERT_EQ(uv_read_stop(reinterpret_cast<uv_stream_t*>(&stale)), 0);
  ASSERT_EQ(::write(pair[1], "s", 1), 1);  // reported by epoll from now on
  // A read of a pipe, in flight until the writer below, 200 ms from now.
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  uv_fs_t req;
  char byte = 0;
  uv_buf_t buf = uv_buf_init(&byte, 1);
  int result = 1000;
  req.data = &result;
  ASSERT_EQ(rp_fs_read(&loop_, &req, pipe_fds[0], &buf, 1, -1,
                       [](uv_fs_t* r) {
                         *static_cast<int*>(r->data) = static_cast<int>(r->result);
                         uv_fs_req_cleanup(r);
                       }),
            0);
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    EXPECT_EQ(::write(pipe_fds[1], "x", 1), 1);
  });
  // libuv's poll timeout, and the bound of the run: without the wake the loop
  // sleeps until this fires.
  uv_timer_t limit;
  uv_timer_init(&loop_, &limit);
  uv_timer_start(&limit, [](uv_timer_t* t) { uv_stop(t->loop); }, 5000, 0);
  uv_unref(reinterpret_cast<uv_handle_t*>(&limit));
  auto start = Clock::now();
  while (result == 1000 && Clock::now() - start < std::chrono::seconds(6)) {
    rp_uv_run(&loop_, UV_RUN_ONCE);
  }
  writer.join();
  EXPECT_EQ(result, 1);
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2))
      << "the completion waited for libuv's next timer instead of waking the loop";
  ::close(pair[1]);
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
  close_loop();
}

TEST_F(UvRun, StatsCountLoopTurns) {
  rp_stats_t before, after;
  ASSERT_EQ(rp_stats(&loop_, &before), 0);
  uv_timer_t timer;
  uv_timer_init(&loop_, &timer);
  uv_timer_start(&timer, [](uv_timer_t*) {}, 1, 0);
  rp_uv_run(&loop_, UV_RUN_DEFAULT);
  ASSERT_EQ(rp_stats(&loop_, &after), 0);
  EXPECT_GT(after.turns, before.turns);
  EXPECT_EQ(rp_stats(nullptr, &after), UV_EINVAL);
  close_loop();
}

TEST_F(UvRun, LoopCloseAfterRunSucceeds) {
  uv_timer_t timer;
  uv_timer_init(&loop_, &timer);
  uv_timer_start(&timer, [](uv_timer_t*) {}, 1, 0);
  rp_uv_run(&loop_, UV_RUN_DEFAULT);
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), nullptr);
  rp_uv_run(&loop_, UV_RUN_DEFAULT);
  // Plain uv_loop_close, as an unmodified program calls it: ringpark's hidden
  // handles must not make it fail.
  EXPECT_EQ(uv_loop_close(&loop_), 0);
  closed_ = true;
  // A new loop at the same address gets fresh ringpark state.
  ASSERT_EQ(uv_loop_init(&loop_), 0);
  uv_timer_init(&loop_, &timer);
  int fired = 0;
  timer.data = &fired;
  uv_timer_start(
      &timer, [](uv_timer_t* t) { ++*static_cast<int*>(t->data); }, 1, 0);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(fired, 1);
  closed_ = false;
  close_loop();
}

}  // namespace

namespace {

TEST_F(UvRun, LoopCloseIsBusyWhileRingparkHandlesAreOpen) {
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  ASSERT_GE(efd, 0);
  rp_poll_t poll;
  rp_tcp_t tcp;
  int closes = 0;
  ASSERT_EQ(rp_poll_init(&loop_, &poll, efd), 0);
  ASSERT_EQ(rp_tcp_init(&loop_, &tcp), 0);
  poll.data = &closes;
  tcp.data = &closes;
  EXPECT_EQ(rp_loop_close(&loop_), UV_EBUSY);
  rp_poll_close(&poll, [](rp_poll_t* p) { ++*static_cast<int*>(p->data); });
  EXPECT_EQ(rp_loop_close(&loop_), UV_EBUSY);  // its close callback has not run
  rp_close(&tcp, [](rp_tcp_t* t) { ++*static_cast<int*>(t->data); });
  auto start = Clock::now();
  while (closes < 2 && Clock::now() - start < std::chrono::seconds(5))
    rp_uv_run(&loop_, UV_RUN_ONCE);
  EXPECT_EQ(closes, 2);
  close_loop();

  // A new loop at the same address gets fresh state, watchers included.
  ASSERT_EQ(uv_loop_init(&loop_), 0);
  closed_ = false;
  int events = 0;
  ASSERT_EQ(rp_poll_init(&loop_, &poll, efd), 0);
  poll.data = &events;
  ASSERT_EQ(rp_poll_start(&poll, UV_READABLE,
                          [](rp_poll_t* p, int status, int) {
                            if (status == 0) ++*static_cast<int*>(p->data);
                            rp_poll_stop(p);
                          }),
            0);
  std::uint64_t one = 1;
  ASSERT_EQ(write(efd, &one, sizeof one), 8);
  start = Clock::now();
  while (events == 0 && Clock::now() - start < std::chrono::seconds(5))
    rp_uv_run(&loop_, UV_RUN_ONCE);
  EXPECT_EQ(events, 1);
  rp_poll_close(&poll, nullptr);
  close_loop();
  close(efd);
}

TEST_F(UvRun, TcpInitOnALiveHandleIsRefusedAndCountedOnce) {
  // Issue 8: a second rp_tcp_init of a live handle used to count it twice, so
  // that rp_loop_close answered UV_EBUSY forever after its one close.
  rp_tcp_t tcp;
  ASSERT_EQ(rp_tcp_init(&loop_, &tcp), 0);
  sockaddr_in any{};
  uv_ip4_addr("127.0.0.1", 0, &any);
  ASSERT_EQ(rp_tcp_bind(&tcp, reinterpret_cast<const sockaddr*>(&any), 0), 0);
  uv_os_fd_t fd = -1;
  ASSERT_EQ(rp_fileno(&tcp, &fd), 0);
  EXPECT_EQ(rp_tcp_init(&loop_, &tcp), UV_EBUSY);
  // Nothing of the live handle changed: it still has its socket.
  uv_os_fd_t again = -1;
  EXPECT_EQ(rp_fileno(&tcp, &again), 0);
  EXPECT_EQ(again, fd);
  int closes = 0;
  tcp.data = &closes;
  ASSERT_EQ(rp_close(&tcp, [](rp_tcp_t* t) { ++*static_cast<int*>(t->data); }), 0);
  auto start = Clock::now();
  while (closes == 0 && Clock::now() - start < std::chrono::seconds(5))
    rp_uv_run(&loop_, UV_RUN_ONCE);
  EXPECT_EQ(closes, 1);
  // Closed: the memory may be initialised again, and the loop closes.
  ASSERT_EQ(rp_tcp_init(&loop_, &tcp), 0);
  ASSERT_EQ(rp_close(&tcp, nullptr), 0);
  close_loop();
}

}  // namespace
