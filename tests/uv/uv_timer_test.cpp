// libuv timers under rp_uv_run fire on time while ringpark has an operation in
// flight, whichever way the loop sleeps (in the ring or in libuv's epoll_wait)
// and on both backends. The operation is a read of an empty pipe, the shape of
// a program whose every connection keeps a read in flight.
//
// The bound is 10% + 2 ms past the due time: a loop that sleeps in the ring
// and forgets to tell libuv how long it slept fires each timer a whole period
// late (a 200 ms timer every 400 ms), far outside it.
#include <gtest/gtest.h>
#include <unistd.h>
#include <uv.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <vector>

#include "ringpark.h"

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct TimerLog {
  Clock::time_point started;
  std::vector<Clock::time_point> fired;
  std::size_t want = 0;
};

void on_timer(uv_timer_t* t) {
  auto* log = static_cast<TimerLog*>(t->data);
  log->fired.push_back(Clock::now());
  if (log->fired.size() == log->want) uv_timer_stop(t);
}

milliseconds bound(milliseconds period) { return period + period / 10 + milliseconds(2); }

class UvTimers : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    // The loop's context reads RINGPARK_SLEEP when it is made, at the first
    // ringpark call on the loop below.
    if (std::string(GetParam()) == "ring") {
      setenv("RINGPARK_SLEEP", "ring", 1);
    } else {
      unsetenv("RINGPARK_SLEEP");
    }
    ASSERT_EQ(uv_loop_init(&loop_), 0);
    ASSERT_EQ(pipe(pipe_), 0);
  }
  void TearDown() override {
    ::close(pipe_[0]);
    ::close(pipe_[1]);
    unsetenv("RINGPARK_SLEEP");
  }

  uv_loop_t loop_;
  int pipe_[2] = {-1, -1};
};

TEST_P(UvTimers, FireOnTimeWhileAReadIsInFlight) {
  // The read stays in flight until the timers are done.
  uv_fs_t read_req;
  char byte = 0;
  uv_buf_t buf = uv_buf_init(&byte, 1);
  int read_result = 1000;
  read_req.data = &read_result;
  ASSERT_EQ(rp_fs_read(&loop_, &read_req, pipe_[0], &buf, 1, -1,
                       [](uv_fs_t* r) {
                         *static_cast<int*>(r->data) = static_cast<int>(r->result);
                         uv_fs_req_cleanup(r);
                       }),
            0);
  // Let the read reach the ring (and the loop its first sleep) before timing.
  ASSERT_NE(rp_uv_run(&loop_, UV_RUN_NOWAIT), 0);

  uv_timer_t repeating, once;
  TimerLog every200, after50;
  every200.want = 4;
  after50.want = 1;
  uv_timer_init(&loop_, &repeating);
  uv_timer_init(&loop_, &once);
  repeating.data = &every200;
  once.data = &after50;
  uv_update_time(&loop_);
  every200.started = after50.started = Clock::now();
  uv_timer_start(&repeating, on_timer, 200, 200);
  uv_timer_start(&once, on_timer, 50, 0);

  // Both timers stop themselves; the read keeps the loop alive, so run until
  // the timers are done, bounded by 5 s (well over the 800 ms expected).
  while ((every200.fired.size() < every200.want || after50.fired.empty()) &&
         Clock::now() - every200.started < std::chrono::seconds(5)) {
    rp_uv_run(&loop_, UV_RUN_ONCE);
  }
  ASSERT_EQ(after50.fired.size(), 1u);
  ASSERT_EQ(every200.fired.size(), every200.want);
  EXPECT_EQ(read_result, 1000) << "the read must still be in flight";

  auto late = [](Clock::time_point due, Clock::time_point fired) {
    return std::chrono::duration_cast<milliseconds>(fired - due);
  };
  EXPECT_GE(after50.fired[0] - after50.started, milliseconds(49));
  EXPECT_LE(after50.fired[0] - after50.started, bound(milliseconds(50)))
      << "the 50 ms timer was " << late(after50.started, after50.fired[0]).count()
      << " ms after its start";
  Clock::time_point previous = every200.started;
  for (std::size_t i = 0; i < every200.fired.size(); ++i) {
    // Each period is measured from the previous firing, as libuv schedules a
    // repeating timer.
    EXPECT_GE(every200.fired[i] - previous, milliseconds(199)) << "firing " << i;
    EXPECT_LE(every200.fired[i] - previous, bound(milliseconds(200)))
        << "firing " << i << " came " << late(previous, every200.fired[i]).count()
        << " ms after the previous one";
    previous = every200.fired[i];
  }

  // End the read, then close everything as a careful program does.
  ASSERT_EQ(::write(pipe_[1], "x", 1), 1);
  while (read_result == 1000) rp_uv_run(&loop_, UV_RUN_ONCE);
  EXPECT_EQ(read_result, 1);
  uv_close(reinterpret_cast<uv_handle_t*>(&repeating), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&once), nullptr);
  EXPECT_EQ(rp_uv_run(&loop_, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_loop_close(&loop_), 0);
}

INSTANTIATE_TEST_SUITE_P(SleepMode, UvTimers, ::testing::Values("default", "ring"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
