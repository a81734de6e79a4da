// The timer layer: ringpark's own deadlines (sleeps, operation timeouts). Its
// park shrinks the caller's timeout to the next deadline, parks the layer below,
// then fires what is due. The clock is injected so tests never sleep.
#pragma once

#include <chrono>
#include <cstddef>
#include <vector>

#include "park/fork.hpp"
#include "park/park.hpp"

namespace ringpark::detail {

using TimePoint = std::chrono::steady_clock::time_point;

class Clock {
 public:
  virtual ~Clock() = default;
  virtual TimePoint now() const noexcept = 0;
};

class SteadyClock final : public Clock {
 public:
  TimePoint now() const noexcept override { return std::chrono::steady_clock::now(); }
  static SteadyClock& instance() noexcept;
};

// A deadline. Pinned while armed: the layer keeps its address in a heap.
struct TimerEntry {
  TimerEntry() = default;
  TimerEntry(const TimerEntry&) = delete;
  TimerEntry& operator=(const TimerEntry&) = delete;
  bool armed() const noexcept { return heap_index_ != kNotArmed; }

  TimePoint deadline{};
  void (*fire)(TimerEntry*) noexcept = nullptr;  // runs on the loop thread
  void* data = nullptr;

  static constexpr std::size_t kNotArmed = static_cast<std::size_t>(-1);
  std::size_t heap_index_ = kNotArmed;
  std::uint64_t seq_ = 0;  // insertion order breaks ties between equal deadlines
  TimePoint key_{};        // the heap's order: deadline, or later (see TimerLayer::arm)
};

class TimerLayer final : public Park {
 public:
  // `inner` and `clock` must outlive the layer.
  TimerLayer(Park& inner, const Clock& clock = SteadyClock::instance())
      : inner_(inner), clock_(clock) {}

  // Arms `entry` for entry->deadline; re-arming an armed entry moves it. Loop
  // thread only; O(log n); fire runs in a later park or turn, never here. An
  // entry armed from a fire callback for a time already due fires in the next
  // pass, after everything that was due in this one.
  void arm(TimerEntry* entry);
  // Disarms `entry`; a no-op when it is not armed. After this, fire never runs.
  void cancel(TimerEntry* entry) noexcept;

  // Time until the earliest deadline (zero if past), nullopt if none is armed.
  Timeout next_timeout() const noexcept;
  std::size_t size() const noexcept { return heap_.size(); }
  const Clock& clock() const noexcept { return clock_; }

  void park(Timeout timeout) noexcept override;
  void turn() noexcept override;
  Unparker unparker() const override { return inner_.unparker(); }
  // Disarms every entry without firing it, then shuts the layer below down.
  void shutdown() noexcept override;
  // The same in a forked child (every entry is left disarmed, never fired),
  // then abandons the layer below.
  void abandon() noexcept override;

  // Fires every entry whose deadline has passed, earliest first. Returns how
  // many. Stops early in a child that a fire callback forked.
  std::size_t fire_due() noexcept;

 private:
  bool less(std::size_t a, std::size_t b) const noexcept;
  void swap_nodes(std::size_t a, std::size_t b) noexcept;
  void sift_up(std::size_t i) noexcept;
  void sift_down(std::size_t i) noexcept;
  void remove_at(std::size_t i) noexcept;

  Park& inner_;
  const Clock& clock_;
  std::vector<TimerEntry*> heap_;
  std::uint64_t next_seq_ = 0;
  bool firing_ = false;
  TimePoint firing_now_{};  // the `now` of the pass in progress
};

}  // namespace ringpark::detail
