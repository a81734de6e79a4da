#include "park/timer.hpp"

#include <utility>

namespace ringpark::detail {

SteadyClock& SteadyClock::instance() noexcept {
  static SteadyClock clock;
  return clock;
}

bool TimerLayer::less(std::size_t a, std::size_t b) const noexcept {
  const TimerEntry* x = heap_[a];
  const TimerEntry* y = heap_[b];
  if (x->key_ != y->key_) return x->key_ < y->key_;
  return x->seq_ < y->seq_;
}

void TimerLayer::swap_nodes(std::size_t a, std::size_t b) noexcept {
  std::swap(heap_[a], heap_[b]);
  heap_[a]->heap_index_ = a;
  heap_[b]->heap_index_ = b;
}

void TimerLayer::sift_up(std::size_t i) noexcept {
  while (i > 0) {
    std::size_t parent = (i - 1) / 2;
    if (!less(i, parent)) break;
    swap_nodes(i, parent);
    i = parent;
  }
}

void TimerLayer::sift_down(std::size_t i) noexcept {
  for (;;) {
    std::size_t smallest = i;
    std::size_t left = 2 * i + 1;
    std::size_t right = left + 1;
    if (left < heap_.size() && less(left, smallest)) smallest = left;
    if (right < heap_.size() && less(right, smallest)) smallest = right;
    if (smallest == i) return;
    swap_nodes(i, smallest);
    i = smallest;
  }
}

void TimerLayer::remove_at(std::size_t i) noexcept {
  TimerEntry* gone = heap_[i];
  std::size_t last = heap_.size() - 1;
  if (i != last) {
    swap_nodes(i, last);
    heap_.pop_back();
    sift_down(i);
    sift_up(i);
  } else {
    heap_.pop_back();
  }
  gone->heap_index_ = TimerEntry::kNotArmed;
}

void TimerLayer::arm(TimerEntry* entry) {
  if (entry->armed()) remove_at(entry->heap_index_);
  entry->seq_ = next_seq_++;
  entry->key_ = entry->deadline;
  // Keep a callback that re-arms itself in the past (a periodic timer behind
  // schedule) from holding back entries that were due before it.
  // It sorts after every entry due in this pass, and the pass stops at it.
  if (firing_ && entry->key_ < firing_now_) entry->key_ = firing_now_;
  entry->heap_index_ = heap_.size();
  heap_.push_back(entry);
  sift_up(entry->heap_index_);
}

void TimerLayer::cancel(TimerEntry* entry) noexcept {
  if (entry->armed()) remove_at(entry->heap_index_);
}

Timeout TimerLayer::next_timeout() const noexcept {
  if (heap_.empty()) return std::nullopt;
  auto left = heap_.front()->key_ - clock_.now();
  if (left < Duration::zero()) return Duration::zero();
  // Round up so that a wake never comes a fraction too early and spins.
  return std::chrono::ceil<Duration>(left);
}

void TimerLayer::park(Timeout timeout) noexcept {
  inner_.park(min_timeout(timeout, next_timeout()));
  fire_due();
}

void TimerLayer::turn() noexcept {
  inner_.turn();
  fire_due();
}

std::size_t TimerLayer::fire_due() noexcept {
  // Entries armed by a fire callback for "now" wait for the next pass (see
  // arm), so a timer that re-arms itself with a zero delay cannot loop here.
  const bool nested = firing_;
  firing_ = true;
  firing_now_ = clock_.now();
  const std::uint64_t armed_before = next_seq_;
  std::size_t fired = 0;
  const unsigned generation = fork_generation();
  while (!heap_.empty()) {
    TimerEntry* top = heap_.front();
    if (top->key_ > firing_now_ || top->seq_ >= armed_before) break;
    remove_at(0);
    ++fired;
    top->fire(top);
    // In a child that this callback forked, the rest of the pass is the
    // parent's: the child abandons this chain, and its deadlines with it.
    if (fork_generation() != generation) break;
  }
  firing_ = nested;
  return fired;
}

void TimerLayer::shutdown() noexcept {
  while (!heap_.empty()) remove_at(heap_.size() - 1);
  inner_.shutdown();
}

void TimerLayer::abandon() noexcept {
  // Disarmed, so that an owner that cancels or re-arms one later (on this layer
  // or a new one) finds it idle.
  while (!heap_.empty()) remove_at(heap_.size() - 1);
  inner_.abandon();
}

}  // namespace ringpark::detail
