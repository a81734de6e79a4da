// TimerLayer over a FakePark, with a ManualClock: no test sleeps, time moves
// only when a test advances the clock.
#include "park/timer.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "test_util.hpp"

namespace ringpark::test {
namespace {

using detail::TimerEntry;
using detail::TimerLayer;

class TimerTest : public ::testing::Test {
 protected:
  // An entry whose fire callback appends its id to fired_.
  struct Entry {
    TimerEntry entry;
    TimerTest* test = nullptr;
    int id = 0;
  };

  static void record(TimerEntry* e) noexcept {
    auto* self = static_cast<Entry*>(e->data);
    self->test->fired_.push_back(self->id);
  }

  // Sets `e` up to fire at `at` from the clock's epoch (does not arm it).
  void init(Entry& e, int id, Duration at) {
    e.test = this;
    e.id = id;
    e.entry.data = &e;
    e.entry.fire = &TimerTest::record;
    e.entry.deadline = ManualClock::epoch() + at;
  }

  void arm(Entry& e, int id, Duration at) {
    init(e, id, at);
    timers_.arm(&e.entry);
  }

  FakePark inner_;
  ManualClock clock_;
  TimerLayer timers_{inner_, clock_};
  std::vector<int> fired_;
};

TEST_F(TimerTest, EntriesFireInDeadlineOrder) {
  Entry a, b, c, d;
  arm(a, 1, 30ms);
  arm(b, 2, 10ms);
  arm(c, 3, 40ms);
  arm(d, 4, 20ms);
  clock_.advance(40ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, (std::vector<int>{2, 4, 1, 3}));
}

TEST_F(TimerTest, EqualDeadlinesFireInArmingOrder) {
  // Enough entries that the heap has to reorder ties, not just keep a list.
  Entry e[16];
  std::vector<int> expected;
  for (int i = 0; i < 16; ++i) {
    arm(e[i], i, 10ms);
    expected.push_back(i);
  }
  clock_.advance(10ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, expected);
}

TEST_F(TimerTest, CancelPreventsFiring) {
  Entry a, b;
  arm(a, 1, 10ms);
  arm(b, 2, 10ms);
  timers_.cancel(&a.entry);
  EXPECT_FALSE(a.entry.armed());
  clock_.advance(20ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, std::vector<int>{2});
}

TEST_F(TimerTest, CancelOfUnarmedEntryIsNoOp) {
  Entry a, b;
  init(a, 1, 10ms);
  arm(b, 2, 10ms);
  timers_.cancel(&a.entry);
  EXPECT_EQ(timers_.size(), 1u);
  clock_.advance(10ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, std::vector<int>{2});
}

TEST_F(TimerTest, RearmMovesDeadlineLater) {
  Entry a;
  arm(a, 1, 10ms);
  a.entry.deadline = ManualClock::epoch() + 50ms;
  timers_.arm(&a.entry);
  EXPECT_EQ(timers_.size(), 1u);
  clock_.advance(20ms);
  EXPECT_EQ(timers_.fire_due(), 0u);
  clock_.advance(30ms);
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(fired_, std::vector<int>{1});
}

TEST_F(TimerTest, RearmMovesDeadlineEarlier) {
  Entry a, b;
  arm(a, 1, 50ms);
  arm(b, 2, 30ms);
  a.entry.deadline = ManualClock::epoch() + 10ms;
  timers_.arm(&a.entry);
  clock_.advance(10ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, std::vector<int>{1});
}

TEST_F(TimerTest, ParkPassesCallerTimeoutWhenShorterThanNextDeadline) {
  Entry a;
  arm(a, 1, 30ms);
  timers_.park(Duration(10ms));
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(10ms));
}

TEST_F(TimerTest, ParkPassesNextDeadlineWhenShorterThanCallerTimeout) {
  Entry a;
  arm(a, 1, 30ms);
  timers_.park(Duration(100ms));
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(30ms));
}

TEST_F(TimerTest, ParkWithoutLimitPassesNextDeadline) {
  Entry a;
  arm(a, 1, 30ms);
  clock_.advance(5ms);
  timers_.park(std::nullopt);
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(25ms));
}

TEST_F(TimerTest, ParkWithoutEntriesPassesCallerTimeout) {
  timers_.park(std::nullopt);
  timers_.park(Duration(7ms));
  ASSERT_EQ(inner_.parked.size(), 2u);
  EXPECT_EQ(inner_.parked[0], Timeout());
  EXPECT_EQ(inner_.parked[1], Timeout(7ms));
}

TEST_F(TimerTest, ParkPassesZeroForOverdueEntry) {
  Entry a;
  arm(a, 1, 10ms);
  clock_.advance(25ms);
  EXPECT_EQ(timers_.next_timeout(), Timeout(Duration::zero()));
  timers_.park(std::nullopt);
  ASSERT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(inner_.parked[0], Timeout(Duration::zero()));
}

TEST_F(TimerTest, NothingFiresBeforeItsDeadline) {
  Entry a;
  arm(a, 1, 10ms);
  clock_.advance(10ms - 1ns);
  timers_.park(std::nullopt);
  timers_.turn();
  EXPECT_EQ(timers_.fire_due(), 0u);
  EXPECT_TRUE(fired_.empty());
  EXPECT_TRUE(a.entry.armed());
}

TEST_F(TimerTest, EntryFiresAtExactlyItsDeadline) {
  Entry a;
  arm(a, 1, 10ms);
  clock_.advance(10ms);
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_FALSE(a.entry.armed());
}

TEST_F(TimerTest, ParkFiresDueEntriesAfterParkingInner) {
  Entry a;
  arm(a, 1, 10ms);
  clock_.advance(10ms);
  timers_.park(std::nullopt);
  EXPECT_EQ(inner_.parked.size(), 1u);
  EXPECT_EQ(fired_, std::vector<int>{1});
}

TEST_F(TimerTest, TurnTurnsInnerAndFiresDueEntries) {
  Entry a;
  arm(a, 1, 10ms);
  clock_.advance(10ms);
  timers_.turn();
  EXPECT_EQ(inner_.turns, 1);
  EXPECT_TRUE(inner_.parked.empty());
  EXPECT_EQ(fired_, std::vector<int>{1});
}

TEST_F(TimerTest, FiringNeverHappensInsideArm) {
  Entry a;
  arm(a, 1, Duration::zero());  // already due
  EXPECT_TRUE(fired_.empty());
  EXPECT_TRUE(a.entry.armed());
}

TEST_F(TimerTest, FireDueReturnsHowManyFired) {
  Entry a, b, c;
  arm(a, 1, 10ms);
  arm(b, 2, 20ms);
  arm(c, 3, 30ms);
  clock_.advance(20ms);
  EXPECT_EQ(timers_.fire_due(), 2u);
  EXPECT_EQ(timers_.fire_due(), 0u);
  EXPECT_EQ(timers_.size(), 1u);
}

// A fire callback that arms `next` for the clock's current time.
struct Rearming {
  TimerEntry entry;
  TimerEntry next;
  TimerLayer* timers = nullptr;
  int next_fired = 0;
};

TEST_F(TimerTest, EntryArmedFromFireForNowWaitsForNextPass) {
  Rearming r;
  r.timers = &timers_;
  r.entry.data = r.next.data = &r;
  r.entry.deadline = ManualClock::epoch();
  r.entry.fire = [](TimerEntry* e) noexcept {
    auto* self = static_cast<Rearming*>(e->data);
    self->next.deadline = self->timers->clock().now();
    self->timers->arm(&self->next);
  };
  r.next.fire = [](TimerEntry* e) noexcept { ++static_cast<Rearming*>(e->data)->next_fired; };
  timers_.arm(&r.entry);

  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(r.next_fired, 0);
  EXPECT_TRUE(r.next.armed());
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(r.next_fired, 1);
}

TEST_F(TimerTest, EntryRearmingItselfForNowFiresOncePerPass) {
  struct Self {
    TimerEntry entry;
    TimerLayer* timers;
    int fired = 0;
  } s{{}, &timers_};
  s.entry.data = &s;
  s.entry.deadline = ManualClock::epoch();
  s.entry.fire = [](TimerEntry* e) noexcept {
    auto* self = static_cast<Self*>(e->data);
    ++self->fired;
    self->timers->arm(e);  // same deadline, which is now
  };
  timers_.arm(&s.entry);
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(s.fired, 2);
  timers_.cancel(&s.entry);
}

TEST_F(TimerTest, CancelFromFireCallbackPreventsLaterEntry) {
  struct Pair {
    TimerEntry first, second;
    TimerLayer* timers;
    int second_fired = 0;
  } p{{}, {}, &timers_};
  p.first.data = p.second.data = &p;
  p.first.deadline = ManualClock::epoch() + 10ms;
  p.second.deadline = ManualClock::epoch() + 20ms;
  p.first.fire = [](TimerEntry* e) noexcept {
    auto* self = static_cast<Pair*>(e->data);
    self->timers->cancel(&self->second);
  };
  p.second.fire = [](TimerEntry* e) noexcept { ++static_cast<Pair*>(e->data)->second_fired; };
  timers_.arm(&p.first);
  timers_.arm(&p.second);
  clock_.advance(20ms);
  EXPECT_EQ(timers_.fire_due(), 1u);
  EXPECT_EQ(p.second_fired, 0);
  EXPECT_EQ(timers_.size(), 0u);
}

// A periodic timer behind schedule re-arms itself from its callback with a
// deadline still in the past. It must not sort ahead of an older entry that is
// due and stop the pass there: fire_due fires every entry whose deadline has
// passed (and the re-armed one waits for the next pass).
TEST_F(TimerTest, EntryArmedInThePastFromFireDoesNotHoldBackDueEntries) {
  struct Periodic {
    TimerEntry entry;
    TimerLayer* timers;
  } p{{}, &timers_};
  p.entry.data = &p;
  p.entry.deadline = ManualClock::epoch() + 1ms;
  p.entry.fire = [](TimerEntry* e) noexcept {
    auto* self = static_cast<Periodic*>(e->data);
    if (e->deadline < TimePoint(ManualClock::epoch() + 4ms)) {
      e->deadline += 1ms;  // still in the past: behind schedule
      self->timers->arm(e);
    }
  };
  timers_.arm(&p.entry);
  Entry late;
  arm(late, 7, 5ms);
  clock_.advance(10ms);
  timers_.fire_due();
  EXPECT_EQ(fired_, std::vector<int>{7});
  timers_.cancel(&p.entry);
}

TEST_F(TimerTest, ShutdownDisarmsWithoutFiring) {
  Entry a, b, c;
  arm(a, 1, 10ms);
  arm(b, 2, 20ms);
  arm(c, 3, 30ms);
  clock_.advance(30ms);
  timers_.shutdown();
  EXPECT_EQ(timers_.size(), 0u);
  EXPECT_FALSE(a.entry.armed());
  EXPECT_FALSE(b.entry.armed());
  EXPECT_FALSE(c.entry.armed());
  EXPECT_EQ(timers_.fire_due(), 0u);
  EXPECT_TRUE(fired_.empty());
}

TEST_F(TimerTest, ShutdownShutsInnerDown) {
  timers_.shutdown();
  EXPECT_EQ(inner_.shutdowns, 1);
}

TEST_F(TimerTest, NextTimeoutIsNoneWithoutEntries) { EXPECT_EQ(timers_.next_timeout(), Timeout()); }

TEST_F(TimerTest, UnparkerIsTheInnerLayers) {
  timers_.unparker().unpark();
  EXPECT_TRUE(inner_.take_unpark());
}

}  // namespace
}  // namespace ringpark::test
