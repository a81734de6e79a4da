// FallbackDriver: the driver layer of the fallback backend, for machines where
// io_uring is unusable (old kernels, Docker's seccomp profile, a memlock limit):
//
//   executor -> timer -> FallbackDriver -> EpollReactor
//
// It runs the same ops as the io_uring driver and gives the same results for
// them (negative errno, byte counts, revents, kMore on multishot completions):
// - socket and pipe ops are non-blocking syscalls, retried on readiness reported
//   by the EpollReactor (one level-triggered registration per fd, shared by
//   every op waiting on it);
// - file ops, openat, statx and the other calls that block go to a ThreadPool,
//   as io_uring sends them to its io-wq threads;
// - timeouts sit in a min-heap whose earliest deadline bounds each wait.
// Like the ring, it submits nothing inside submit(): ops queued during a turn
// are started at the next park or turn, and every completion runs there too.
//
// Differences from io_uring a user may notice:
// - a multishot poll is level-triggered: it reports once per turn for as long as
//   the fd stays ready, where io_uring reports once per wakeup;
// - an op waiting on an fd that the close op closes waits until cancelled (as
//   in io_uring, where it holds the file); closing such an fd behind the
//   driver's back and reusing the number is not supported.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "epoll_bridge/epoll_reactor.hpp"
#include "epoll_bridge/thread_pool.hpp"
#include "park/fork.hpp"
#include "park/park.hpp"
#include "ringpark/op.hpp"

namespace ringpark::detail {

struct FallbackStats {
  std::uint64_t turns = 0;       // park() and turn() calls
  std::uint64_t waits = 0;       // epoll_wait calls made by park() and turn()
  std::uint64_t syscalls = 0;    // syscalls made on the loop thread for ops
  std::uint64_t epoll_ctls = 0;  // registration changes for the ops' fds
  std::uint64_t pool_jobs = 0;   // ops handed to the thread pool
  std::uint64_t completions = 0;  // completions run (final or not)
};

class FallbackDriver final : public Park, public IoBackend {
 public:
  // `epoll` is the layer below; `inner` (may be null) is a reactor turned when
  // its fd is readable or its timeout passes. Both must outlive the driver.
  // Throws std::bad_alloc.
  FallbackDriver(EpollReactor& epoll, Reactor* inner);
  // Shuts down if shutdown() has not run.
  ~FallbackDriver() override;
  FallbackDriver(const FallbackDriver&) = delete;
  FallbackDriver& operator=(const FallbackDriver&) = delete;

  // Starts the ops submitted since the last turn, parks the EpollReactor for at
  // most min(timeout, earliest op timeout, inner reactor's timeout), runs every
  // completion that became ready, then turns the inner reactor if its fd fired
  // or its timeout passed. Loop thread only.
  void park(Timeout timeout) noexcept override;
  // The same without blocking.
  void turn() noexcept override;
  // Wakes a park() from any thread (the EpollReactor's unparker).
  Unparker unparker() const override { return unparker_; }
  // Cancels every op in flight (each completes once, with -ECANCELED, or with its
  // real result if a pool thread is already running it), waits for running pool
  // jobs, since they hold the ops' buffers, then shuts the layers below down.
  // Blocks; loop thread only. Later submissions complete with -ECANCELED. In a
  // forked child it abandons instead.
  void shutdown() noexcept override;
  // In a forked child: forgets every op (left idle, never completed here), with
  // no epoll_ctl on the epoll set (the parent's registrations are in it) and no
  // wait for the pool: its threads do not exist here, so the pool is leaked,
  // not destroyed (glibc's pthread_cond_destroy would wait for the parent's
  // waiters). Then abandons the layers below. Aborts in the process that made
  // the driver.
  void abandon() noexcept override;

  // Queues `op`; it starts at the next park or turn and completes there or
  // later, never inside this call. Aborts if `op` is already in flight.
  // In a forked child that has not abandoned the driver yet, an op submitted
  // here is never started (park() and turn() return at once there), and
  // abandon() forgets it.
  void submit(Op* op) noexcept override;
  // Requests the end of `op`: it completes with -ECANCELED at the next turn
  // unless a pool thread already runs it (it then completes with its result).
  // A no-op for an op that is not in flight or whose result is already queued.
  void cancel(Op* op) noexcept override;
  std::size_t in_flight() const noexcept override { return ops_.size(); }
  // Every op runs here, none as the kernel's own asynchronous operation.
  bool native(OpCode) noexcept override { return false; }
  // Runs the deferred work and starts what is queued (readiness ops try their
  // syscall now, the rest wait on epoll or go to the pool), so that a loop
  // about to sleep elsewhere sees their completions through has_completions()
  // or the epoll fd. Runs no callback.
  void flush() noexcept override;
  // The outer loop's side (IoBackend): the EpollReactor's fd, readable when
  // readiness or pool results are pending; queued completions show through
  // has_completions() and wake_outer(), which signals the reactor's wake fd.
  bool waits_on_inner() const noexcept override { return inner_ != nullptr; }
  int completion_fd() noexcept override { return epoll_.fd(); }
  void set_completion_wake(bool) noexcept override {}
  bool has_completions() const noexcept override { return has_work(); }
  void wake_outer() noexcept override { unparker_.unpark(); }
  void clear_outer_wake() noexcept override {}
  Timeout next_deadline() const noexcept override { return next_timeout(); }

  // For an outer loop that embeds the fallback (libuv): the EpollReactor's fd,
  // readable when readiness or pool results are pending. Completions that need
  // no wait (nop, errors found at start, results already queued) are reported
  // by has_work() instead, so check it before sleeping on fd().
  int fd() const noexcept { return epoll_.fd(); }
  // True when a turn would run something now: ops to start, completions queued,
  // pool results in, or an op timeout due.
  bool has_work() const noexcept;
  // Time until the earliest op timeout (zero if past); nullopt if none.
  Timeout next_timeout() const noexcept;

  const FallbackStats& stats() const noexcept { return stats_; }
  // The pool that runs file ops, for tests and diagnostics. Not after abandon().
  const ThreadPool& pool() const noexcept { return *pool_; }
  // True in a forked child of the process that made the driver (park/fork.hpp).
  bool forked() const noexcept { return fork_generation_ != fork_generation(); }

 private:
  using TimePoint = std::chrono::steady_clock::time_point;

  // Where an op in flight is; each value names the one structure holding it.
  enum class Where : std::uint8_t {
    fresh,       // in fresh_, not started
    waiting,     // on an FdState's list, waiting for readiness
    timer,       // in heap_
    parked,      // waiting for something that cannot be reported; only cancel ends it
    pool,        // a pool job, queued or running
    completing,  // its final completion is queued (ready_, or a batch being dispatched)
  };

  // How a read or write on a pollable fd avoids blocking.
  enum class IoMode : std::uint8_t {
    nowait,       // preadv2/pwritev2 with RWF_NOWAIT
    plain,        // the fd is O_NONBLOCK: plain syscalls
    ready_first,  // a blocking fd without RWF_NOWAIT: wait for readiness, then call
  };

  // The driver's side of one op in flight, found by the op's address.
  struct Record {
    Op* op = nullptr;
    FallbackDriver* self = nullptr;
    Where where = Where::fresh;
    IoMode mode = IoMode::nowait;
    bool connecting = false;    // connect: EINPROGRESS seen, read SO_ERROR when writable
    int saved_fl = 0;           // connect: file status flags to restore
    std::uint32_t events = 0;   // epoll interest while waiting
    Record* fd_prev = nullptr;  // FdState list links
    Record* fd_next = nullptr;
    std::size_t done = 0;        // MSG_WAITALL progress of a recv or send
    TimePoint deadline{};        // timeout
    std::size_t heap_index = 0;  // timeout
    std::uint64_t seq = 0;       // timeout: orders equal deadlines
    ThreadPool::Job job;         // pool ops; data points back here
    int res = 0;                 // pool ops: the result, written by the pool thread
  };

  // Every op waiting on one fd, and the one epoll registration they share.
  struct FdState {
    EpollReactor::Watcher watcher;  // pinned: the node of fds_ does not move
    Record* head = nullptr;
    Record* tail = nullptr;
    std::uint32_t registered = 0;  // the events epoll holds for the fd
    bool recheck = false;          // an op joined a live registration: MOD it anyway
    bool dirty = false;            // listed in dirty_
  };

  struct Completion {
    Op* op;
    int res;
    std::uint32_t flags;
  };

  static constexpr int kWait = -0x7fffffff;  // an attempt that must wait for readiness

  void start_fresh() noexcept;
  void start(Record& r) noexcept;
  void start_connect(Record& r) noexcept;
  void start_cancel(Record& r) noexcept;
  int cancel_record(Record& r, bool by_cancel_op) noexcept;
  int close_fd(int fd) noexcept;

  bool drive(Record& r, bool ready) noexcept;
  int attempt(Record& r, bool ready) noexcept;
  int attempt_stream(Record& r) noexcept;
  int attempt_msg(Record& r) noexcept;
  bool send_waits_before(const Record& r) const noexcept;
  int attempt_rw(Record& r, bool ready) noexcept;
  int attempt_connect(Record& r) noexcept;
  void on_ready(Record& r, std::uint32_t revents) noexcept;

  void wait_on(Record& r, int fd, std::uint32_t events) noexcept;
  void unlink_waiter(Record& r) noexcept;
  void mark_dirty(int fd, FdState& s) noexcept;
  void sync_fds() noexcept;
  void sync_fd(int fd) noexcept;
  void cannot_wait(Record& r, int err) noexcept;
  void sync_inner() noexcept;
  void turn_inner(bool due) noexcept;

  void arm_timer(Record& r) noexcept;
  void fire_due() noexcept;
  bool heap_less(std::size_t a, std::size_t b) const noexcept;
  void heap_swap(std::size_t a, std::size_t b) noexcept;
  void heap_up(std::size_t i) noexcept;
  void heap_down(std::size_t i) noexcept;
  void heap_remove(Record& r) noexcept;

  void to_pool(Record& r) noexcept;
  static void run_job(ThreadPool::Job* job) noexcept;
  void push_done(Record* r) noexcept;
  void collect_done() noexcept;

  void queue(Op* op, int res, std::uint32_t flags) noexcept;
  void finish(Record& r, int res) noexcept;
  void reap() noexcept;
  void dispatch() noexcept;
  bool has_ready() const noexcept;

  static void on_fd_ready(EpollReactor::Watcher* w, std::uint32_t revents) noexcept;
  static void on_inner_ready(EpollReactor::Watcher* w, std::uint32_t revents) noexcept;

  EpollReactor& epoll_;
  Reactor* inner_;
  const Unparker unparker_;

  std::unordered_map<Op*, Record> ops_;  // every op in flight; nodes are pinned
  std::vector<Op*> fresh_;               // submitted, to start at the next turn
  std::vector<Completion> ready_;        // completions to run at this turn's end

  std::unordered_map<int, FdState> fds_;
  std::vector<int> dirty_;  // fds whose registration may need a change
  struct Fired {
    int fd;
    std::uint32_t revents;
  };
  std::vector<Fired> fired_;  // filled during the epoll wait, handled after it

  std::vector<Record*> heap_;  // timeouts, earliest deadline first
  std::uint64_t next_seq_ = 0;

  // By pointer so that a forked child can leak it (see abandon()).
  std::unique_ptr<ThreadPool> pool_;
  std::mutex done_mutex_;
  std::vector<Record*> done_;              // finished pool jobs; guarded by done_mutex_
  std::vector<Record*> done_batch_;        // loop thread: done_ swapped out to be finished
  std::atomic<bool> done_pending_{false};  // set with done_ non-empty

  EpollReactor::Watcher inner_watcher_;
  int inner_fd_ = -1;  // the fd inner_watcher_ was set up for
  bool inner_ready_ = false;

  bool shutting_down_ = false;
  bool closed_ = false;
  const unsigned fork_generation_ = fork_generation();  // when the driver was made
  FallbackStats stats_;
};

}  // namespace ringpark::detail
