// Helpers shared by the tests: a watchdog that bounds a call which could block
// forever, a clock the test sets by hand, and a fake Park that records how it
// was parked. Header-only, test code only.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "park/park.hpp"
#include "park/timer.hpp"

namespace ringpark::test {

using namespace std::chrono_literals;
using detail::Duration;
using detail::Timeout;
using detail::TimePoint;

// Aborts the process, naming the running test, if it is still alive after
// `limit`. For calls that can only be bounded from outside (park(none)): a
// hang becomes a crash with a message rather than a test that never ends.
// Destroying the watchdog disarms it.
class Watchdog {
 public:
  explicit Watchdog(std::chrono::milliseconds limit = 5s, const char* what = "park")
      : thread_([this, limit, what, name = current_test_name()] {
          std::unique_lock lock(mutex_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "watchdog: %s in %s did not return within %lld ms\n", what,
                         name.c_str(), static_cast<long long>(limit.count()));
            std::abort();
          }
        }) {}

  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  static std::string current_test_name() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    if (info == nullptr) return "?";
    return std::string(info->test_suite_name()) + "." + info->name();
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;   // guarded by mutex_
  std::thread thread_;  // last: starts once the members above exist
};

// Wall time since construction, for upper bounds ("returned within 1 s").
class Stopwatch {
 public:
  Stopwatch() : start_(std::chrono::steady_clock::now()) {}
  Duration elapsed() const { return std::chrono::steady_clock::now() - start_; }

 private:
  std::chrono::steady_clock::time_point start_;
};

// A Clock whose time moves only when the test says so.
class ManualClock final : public detail::Clock {
 public:
  TimePoint now() const noexcept override { return now_; }
  void set(TimePoint t) noexcept { now_ = t; }
  void advance(Duration d) noexcept { now_ += d; }
  // A fixed, arbitrary start so that deadlines read as offsets from it.
  static TimePoint epoch() noexcept { return TimePoint(std::chrono::hours(1)); }

 private:
  TimePoint now_ = epoch();
};

// A Park that never blocks: it records every timeout it was parked with and
// counts calls. Its unparker signals a real eventfd, so a test can see whether
// an outer layer unparked it.
class FakePark final : public detail::Park {
 public:
  FakePark() : wake_(std::make_shared<detail::WakeFd>()) {}

  void park(Timeout timeout) noexcept override { parked.push_back(timeout); }
  void turn() noexcept override { ++turns; }
  detail::Unparker unparker() const override { return detail::Unparker(wake_); }
  void shutdown() noexcept override { ++shutdowns; }
  void abandon() noexcept override { ++abandons; }

  // True, and the wake reset, if unpark() was called since the last check.
  bool take_unpark() const noexcept {
    std::uint64_t value = 0;
    // The eventfd is non-blocking: with no unpark pending read fails (EAGAIN).
    return ::read(wake_->fd(), &value, sizeof value) == sizeof value && value > 0;
  }

  std::vector<Timeout> parked;
  int turns = 0;
  int shutdowns = 0;
  int abandons = 0;

 private:
  std::shared_ptr<const detail::WakeFd> wake_;
};

// A fresh directory under $TMPDIR, removed with the files made through file().
struct TempDir {
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    path = std::string(base && *base ? base : "/tmp") + "/ringpark-test-XXXXXX";
    EXPECT_NE(::mkdtemp(path.data()), nullptr);
  }
  ~TempDir() {
    for (const std::string& f : files) ::unlink(f.c_str());
    ::rmdir(path.c_str());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  std::string file(const std::string& name) {
    files.push_back(path + "/" + name);
    return files.back();
  }

  std::string path;
  std::vector<std::string> files;
};

}  // namespace ringpark::test
