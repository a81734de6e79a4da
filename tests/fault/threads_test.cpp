// Loops on several threads at once, the thread-per-core shape (DESIGN.md,
// "Threads and scale"): each thread makes, runs and closes its own libuv
// loops under rp_uv_run, again and again, with TCP echo over rp_tcp_t, files
// through rp_fs_* and libuv timers, while the others do the same; a loop set
// up on one thread and run on another (libuv allows it, which is why a loop's
// ring is not SINGLE_ISSUER); and a C++ Runtime per thread, each posted to by
// all the others. Everything ringpark shares between loops (the registry of
// loop contexts, the fork generation, libuv's thread pool behind rp_fs_* on
// the fallback) is exercised from many threads: this is the suite
// ThreadSanitizer runs in CI. Runs on both backends.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <unistd.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "ringpark.h"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int kThreads = 4;
constexpr int kLoopsPerThread = 6;
constexpr int kMessages = 20;

// One loop's work: an echo of kMessages messages over rp_tcp_t, a file
// written and read back through rp_fs_*, a 5 ms libuv timer. Returns an empty
// string on success, else what went wrong. Runs the loop on the calling
// thread; `loop` must be initialised (possibly on another thread).
struct Echo {
  rp_tcp_t server{}, client{}, peer{};
  rp_connect_t connect{};
  std::string sent, echoed;
  int closes = 0;
  bool accepted = false;
};

void echo_alloc(rp_tcp_t*, size_t n, uv_buf_t* b) {
  *b = uv_buf_init(static_cast<char*>(std::malloc(n)), static_cast<unsigned>(n));
}

struct OwnedWrite {
  rp_write_t req{};
  std::string bytes;
};

void write_copy(rp_tcp_t* h, const char* p, std::size_t n) {
  auto* w = new OwnedWrite;
  w->bytes.assign(p, n);
  w->req.data = w;
  uv_buf_t b = uv_buf_init(w->bytes.data(), static_cast<unsigned>(n));
  if (rp_write(&w->req, h, &b, 1,
               [](rp_write_t* r, int) { delete static_cast<OwnedWrite*>(r->data); }) != 0) {
    delete w;
  }
}

std::string run_work(uv_loop_t* loop, const std::string& file, unsigned seed) {
  // --- TCP echo.
  Echo e;
  e.server.data = e.client.data = e.peer.data = &e;
  if (rp_tcp_init(loop, &e.server) || rp_tcp_init(loop, &e.client) || rp_tcp_init(loop, &e.peer)) {
    return "rp_tcp_init";
  }
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", 0, &addr);
  if (rp_tcp_bind(&e.server, reinterpret_cast<const sockaddr*>(&addr), 0) != 0) return "bind";
  int len = sizeof addr;
  rp_tcp_getsockname(&e.server, reinterpret_cast<sockaddr*>(&addr), &len);
  if (rp_listen(&e.server, 8, [](rp_tcp_t* s, int status) {
        auto* e = static_cast<Echo*>(s->data);
        if (status != 0 || rp_accept(s, &e->peer) != 0) return;
        e->accepted = true;
        rp_read_start(&e->peer, echo_alloc, [](rp_tcp_t* h, ssize_t n, const uv_buf_t* b) {
          if (n > 0) write_copy(h, b->base, static_cast<std::size_t>(n));
          std::free(b->base);
        });
      }) != 0) {
    return "listen";
  }
  if (rp_tcp_connect(&e.connect, &e.client, reinterpret_cast<const sockaddr*>(&addr), nullptr)) {
    return "connect";
  }
  rp_read_start(&e.client, echo_alloc, [](rp_tcp_t* h, ssize_t n, const uv_buf_t* b) {
    if (n > 0) static_cast<Echo*>(h->data)->echoed.append(b->base, static_cast<std::size_t>(n));
    std::free(b->base);
  });
  for (int i = 0; i < kMessages; ++i) {
    std::string m =
        std::to_string(seed) + ":" + std::to_string(i) + std::string(1 + (seed + i) % 700, 'x');
    e.sent += m;
    write_copy(&e.client, m.data(), m.size());
  }

  // --- A file through rp_fs_*.
  struct Fs {
    uv_fs_t req;
    int step = 0;  // 0 open, 1 write, 2 read, 3 close, 4 done
    uv_file fd = -1;
    std::string data, back;
    std::string error;
  } fs;
  fs.data = "thread file " + std::to_string(seed);
  fs.back.assign(fs.data.size(), '\0');
  fs.req.data = &fs;
  static const uv_fs_cb on_fs = [](uv_fs_t* r) {
    auto* f = static_cast<Fs*>(r->data);
    const ssize_t res = r->result;
    uv_loop_t* l = r->loop;
    uv_fs_req_cleanup(r);
    if (res < 0) {
      f->error = std::string("fs step ") + std::to_string(f->step) + ": " +
                 uv_strerror(static_cast<int>(res));
      f->step = 4;
      return;
    }
    ++f->step;
    uv_buf_t b;
    switch (f->step) {
      case 1:
        f->fd = static_cast<uv_file>(res);
        b = uv_buf_init(f->data.data(), static_cast<unsigned>(f->data.size()));
        rp_fs_write(l, r, f->fd, &b, 1, 0, on_fs);
        break;
      case 2:
        b = uv_buf_init(f->back.data(), static_cast<unsigned>(f->back.size()));
        rp_fs_read(l, r, f->fd, &b, 1, 0, on_fs);
        break;
      case 3:
        if (f->back != f->data) f->error = "the file read back differs";
        rp_fs_close(l, r, f->fd, on_fs);
        break;
      default:
        break;
    }
  };
  rp_fs_open(loop, &fs.req, file.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600, on_fs);

  // --- A libuv timer.
  uv_timer_t timer;
  bool fired = false;
  uv_timer_init(loop, &timer);
  timer.data = &fired;
  uv_timer_start(
      &timer, [](uv_timer_t* t) { *static_cast<bool*>(t->data) = true; }, 5, 0);

  const auto deadline = Clock::now() + std::chrono::seconds(20);
  while ((e.echoed.size() < e.sent.size() || fs.step < 4 || !fired) && Clock::now() < deadline) {
    rp_uv_run(loop, UV_RUN_ONCE);
  }
  std::string error;
  if (e.echoed != e.sent)
    error = "echo: " + std::to_string(e.echoed.size()) + " of " + std::to_string(e.sent.size());
  if (!fs.error.empty()) error += " " + fs.error;
  if (fs.step < 4) error += " the file work did not finish";
  if (!fired) error += " the timer did not fire";

  auto on_close = [](rp_tcp_t* h) { ++static_cast<Echo*>(h->data)->closes; };
  rp_close(&e.server, on_close);
  rp_close(&e.client, on_close);
  rp_close(&e.peer, on_close);
  uv_close(reinterpret_cast<uv_handle_t*>(&timer), nullptr);
  while (e.closes < 3 && Clock::now() < deadline + std::chrono::seconds(10)) {
    rp_uv_run(loop, UV_RUN_ONCE);
  }
  if (e.closes != 3) error += " handles not closed";
  if (rp_uv_run(loop, UV_RUN_DEFAULT) != 0) error += " the loop is still alive";
  return error;
}

TEST(LoopsOnThreads, EachThreadMakesRunsAndClosesItsOwnLoops) {
  Watchdog watchdog(std::chrono::seconds(80), "the threads");
  TempDir dir;
  std::vector<std::string> errors(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < kLoopsPerThread && errors[t].empty(); ++round) {
        uv_loop_t loop;
        if (uv_loop_init(&loop) != 0) {
          errors[t] = "uv_loop_init";
          break;
        }
        const std::string file = dir.path + "/t" + std::to_string(t) + "-" + std::to_string(round);
        errors[t] = run_work(&loop, file, static_cast<unsigned>(t * 100 + round));
        ::unlink(file.c_str());
        if (int r = rp_loop_close(&loop); r != 0 && errors[t].empty()) {
          errors[t] = std::string("rp_loop_close: ") + uv_strerror(r);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(errors[t], "") << "thread " << t;
}

TEST(LoopsOnThreads, ALoopSetUpOnOneThreadRunsOnAnother) {
  Watchdog watchdog(std::chrono::seconds(60), "the threads");
  TempDir dir;
  uv_loop_t loop;
  std::string backend;
  // Set up (ring and all) on one thread...
  std::thread([&] {
    ASSERT_EQ(uv_loop_init(&loop), 0);
    backend = rp_backend(&loop);
  }).join();
  // ...run and closed on another.
  std::string error;
  std::thread([&] {
    error = run_work(&loop, dir.path + "/moved", 7);
    if (int r = rp_loop_close(&loop); r != 0 && error.empty()) error = uv_strerror(r);
    ::unlink((dir.path + "/moved").c_str());
  }).join();
  EXPECT_EQ(error, "") << "on " << backend;
}

// A runtime per thread; every thread posts to every runtime.
TEST(LoopsOnThreads, EveryRuntimeTakesPostsFromEveryThread) {
  Watchdog watchdog(std::chrono::seconds(60), "the threads");
  constexpr int kPostsPerPair = 200;
  std::vector<Runtime*> runtimes(kThreads, nullptr);
  std::atomic<int> ready{0};
  std::atomic<int> ran[kThreads] = {};
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Runtime rt = Runtime::Builder().build();
      runtimes[t] = &rt;
      ready++;
      while (!go) std::this_thread::yield();
      // Post to every runtime, this one included, then drive this one until
      // every thread's posts to it have run.
      for (int i = 0; i < kPostsPerPair; ++i) {
        for (int u = 0; u < kThreads; ++u) post(*runtimes[u], [&ran, u] { ran[u]++; });
      }
      auto until_all = [](Runtime& rt, std::atomic<int>& n, int want) -> Task<void> {
        while (n.load() < want) co_await sleep_for(rt, std::chrono::milliseconds(1));
      };
      block_on(rt, until_all(rt, ran[t], kThreads * kPostsPerPair));
      ready--;
      // Stay alive (others may still post to this runtime) until all are done.
      while (ready.load() > 0) std::this_thread::yield();
    });
  }
  while (ready.load() < kThreads) std::this_thread::yield();
  go = true;
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(ran[t].load(), kThreads * kPostsPerPair);
}

}  // namespace
}  // namespace ringpark::test
