// Executor over a FakePark (which records how it was parked), and over a real
// EpollReactor for the one behaviour that needs a real wait: post() waking a
// parked executor from another thread.
#include "park/executor.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "epoll_bridge/epoll_reactor.hpp"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

using detail::Executor;

class ExecutorTest : public ::testing::Test {
 protected:
  // A task that appends `id` to ran_.
  Executor::Task log(int id) {
    return [this, id] { ran_.push_back(id); };
  }

  FakePark inner_;
  Executor executor_{inner_};
  std::vector<int> ran_;
};

TEST_F(ExecutorTest, SpawnDoesNotRunTheTask) {
  executor_.spawn(log(1));
  EXPECT_TRUE(ran_.empty());
  EXPECT_TRUE(executor_.has_work());
}

TEST_F(ExecutorTest, PostDoesNotRunTheTask) {
  executor_.post(log(1));
  EXPECT_TRUE(ran_.empty());
  EXPECT_TRUE(executor_.has_work());
}

TEST_F(ExecutorTest, SpawnedTasksRunInOrderOnNextPark) {
  executor_.spawn(log(1));
  executor_.spawn(log(2));
  executor_.spawn(log(3));
  executor_.park(std::nullopt);
  EXPECT_EQ(ran_, (std::vector<int>{1, 2, 3}));
  EXPECT_FALSE(executor_.has_work());
}

TEST_F(ExecutorTest, SpawnedTasksRunInOrderOnNextTurn) {
  executor_.spawn(log(1));
  executor_.spawn(log(2));
  executor_.turn();
  EXPECT_EQ(ran_, (std::vector<int>{1, 2}));
  EXPECT_EQ(inner_.turns, 1);
}

TEST_F(ExecutorTest, RunsInnerLayerBeforeTasks) {
  // The inner park comes first: completions it delivers join this pass.
  executor_.spawn([this] { ran_.push_back(static_cast<int>(inner_.parked.size())); });
  executor_.park(std::nullopt);
  EXPECT_EQ(ran_, std::vector<int>{1});
}

TEST_F(ExecutorTest, TaskSpawnedByTaskWaitsForNextPass) {
  executor_.spawn([this] {
    ran_.push_back(1);
    executor_.spawn(log(2));
  });
  EXPECT_EQ(executor_.run_ready(), 1u);
  EXPECT_EQ(ran_, std::vector<int>{1});
  EXPECT_TRUE(executor_.has_work());
  EXPECT_EQ(executor_.run_ready(), 1u);
  EXPECT_EQ(ran_, (std::vector<int>{1, 2}));
}

TEST_F(ExecutorTest, RunReadyReturnsZeroWhenIdle) { EXPECT_EQ(executor_.run_ready(), 0u); }

TEST_F(ExecutorTest, ParksInnerWithZeroTimeoutWhenWorkIsQueued) {
  executor_.spawn(log(1));
  executor_.park(std::nullopt);
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(Duration::zero()));
}

TEST_F(ExecutorTest, ParksInnerWithZeroTimeoutWhenPostedWorkIsQueued) {
  executor_.post(log(1));
  executor_.park(Duration(50ms));
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(Duration::zero()));
}

TEST_F(ExecutorTest, ParksInnerWithCallerTimeoutWhenIdle) {
  executor_.park(std::nullopt);
  executor_.park(Duration(50ms));
  ASSERT_EQ(inner_.parked.size(), 2u);
  EXPECT_EQ(inner_.parked[0], Timeout());
  EXPECT_EQ(inner_.parked[1], Timeout(50ms));
}

TEST_F(ExecutorTest, PostUnparksInnerLayer) {
  executor_.post(log(1));
  EXPECT_TRUE(inner_.take_unpark());
}

TEST_F(ExecutorTest, SpawnDoesNotUnpark) {
  executor_.spawn(log(1));
  EXPECT_FALSE(inner_.take_unpark());
}

TEST_F(ExecutorTest, PostedTasksRunInOrder) {
  executor_.post(log(1));
  executor_.post(log(2));
  executor_.post(log(3));
  executor_.turn();
  EXPECT_EQ(ran_, (std::vector<int>{1, 2, 3}));
}

TEST_F(ExecutorTest, ShutdownDropsQueuedTasksWithoutRunningThem) {
  executor_.spawn(log(1));
  executor_.post(log(2));
  executor_.shutdown();
  EXPECT_FALSE(executor_.has_work());
  EXPECT_EQ(executor_.run_ready(), 0u);
  EXPECT_TRUE(ran_.empty());
}

TEST_F(ExecutorTest, ShutdownDestroysQueuedTasks) {
  // What a dropped task captured is released at shutdown, not leaked.
  auto token = std::make_shared<int>(0);
  std::weak_ptr<int> watch = token;
  executor_.spawn([token] {});
  executor_.post([token] {});
  token.reset();
  executor_.shutdown();
  EXPECT_TRUE(watch.expired());
}

TEST_F(ExecutorTest, ShutdownShutsInnerDown) {
  executor_.shutdown();
  EXPECT_EQ(inner_.shutdowns, 1);
}

TEST(ExecutorOverEpoll, PostFromAnotherThreadWakesParkedExecutor) {
  detail::EpollReactor reactor;
  Executor executor(reactor);
  std::atomic<bool> ran{false};
  std::thread poster([&] {
    std::this_thread::sleep_for(50ms);
    executor.post([&] { ran = true; });
  });
  {
    Watchdog watchdog;
    // Spurious wakes are allowed; loop until the task ran (bounded above).
    while (!ran) executor.park(std::nullopt);
  }
  poster.join();
  EXPECT_TRUE(ran);
  executor.shutdown();
}

TEST(ExecutorOverEpoll, TaskPostedFromAnotherThreadRunsOnLoopThread) {
  detail::EpollReactor reactor;
  Executor executor(reactor);
  std::atomic<bool> ran{false};
  std::thread::id ran_on;
  std::thread poster([&] {
    executor.post([&] {
      ran_on = std::this_thread::get_id();
      ran = true;
    });
  });
  poster.join();
  {
    Watchdog watchdog;
    while (!ran) executor.park(std::nullopt);
  }
  EXPECT_EQ(ran_on, std::this_thread::get_id());
  executor.shutdown();
}

}  // namespace
}  // namespace ringpark::test
