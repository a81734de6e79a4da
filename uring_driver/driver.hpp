// The io_uring driver: owns the ring, and is the layer whose park() is ONE
// io_uring_enter that submits every SQE queued during the turn and waits for a
// completion or the timeout. The inner reactor's fd sits in the ring as a
// one-shot POLL_ADD, re-armed after every turn of the reactor (a multishot poll
// on an epoll fd is edge-triggered and stalls libuv; see DESIGN.md "Level, not
// edge").
#pragma once

#include <liburing.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "park/park.hpp"
#include "ringpark/op.hpp"
#include "uring_driver/probe.hpp"

namespace ringpark::detail {

struct DriverStats {
  std::uint64_t turns = 0;           // park() and turn() calls
  std::uint64_t enters = 0;          // io_uring_enter syscalls
  std::uint64_t sqes_submitted = 0;  // SQEs handed to the kernel
  std::uint64_t cqes_reaped = 0;     // CQEs taken off the ring
};

class UringDriver final : public Park, public IoBackend {
 public:
  // Sets up a ring. Returns nullptr, with `probe->reason` saying why, when
  // io_uring is unusable here; that selects the fallback and is never an error.
  // `inner` (may be null) must outlive the driver.
  static std::unique_ptr<UringDriver> create(Reactor* inner, const RingOptions& options,
                                             RingProbe* probe) noexcept;
  ~UringDriver() override;
  UringDriver(const UringDriver&) = delete;
  UringDriver& operator=(const UringDriver&) = delete;

  // Park: one io_uring_enter (submit + wait for >= 1 CQE or the timeout, never
  // past the inner reactor's own timeout), then reap and hand every CQE to its
  // op, then turn the inner reactor if its fd fired or its timeout passed.
  void park(Timeout timeout) noexcept override;
  // Submits what is queued and reaps what is there without waiting.
  void turn() noexcept override;
  Unparker unparker() const override { return Unparker(wake_); }
  // Cancels every op in flight and reaps until the kernel has let go of all of
  // them (their completions run, with -ECANCELED for the cancelled ones).
  void shutdown() noexcept override;

  void submit(Op* op) noexcept override;
  void cancel(Op* op) noexcept override;
  std::size_t in_flight() const noexcept override { return user_in_flight_; }
  // Whether this kernel's io_uring runs `code` (others complete -EOPNOTSUPP).
  bool supports(OpCode code) const noexcept;

  // Hands queued SQEs to the kernel without waiting or reaping (one enter, or
  // none when nothing is queued).
  void flush() noexcept;

  // Makes `fd` readable whenever CQEs are posted, for an outer poller (libuv's
  // epoll) to wait on the ring; `enabled` toggles that without a syscall.
  int register_eventfd(int fd) noexcept;
  void set_eventfd_enabled(bool enabled) noexcept;
  bool has_cqes() const noexcept;
  bool has_sqes() const noexcept { return io_uring_sq_ready(&ring_) > 0; }

  const DriverStats& stats() const noexcept { return stats_; }
  const RingProbe& probe() const noexcept { return probe_; }

 private:
  struct Cqe {
    std::uint64_t user_data;
    int res;
    std::uint32_t flags;
  };

  UringDriver(Reactor* inner, const RingProbe& probe);

  io_uring_sqe* get_sqe() noexcept;
  void prepare(io_uring_sqe* sqe, Op* op) noexcept;
  void complete_later(Op* op, int res) noexcept;
  void arm_internal(bool watch_inner) noexcept;
  int enter(Timeout timeout) noexcept;
  std::size_t reap() noexcept;
  std::size_t take_cqes(std::vector<Cqe>& out) noexcept;
  void dispatch(const Cqe& cqe) noexcept;
  void track(Op* op) noexcept;
  void untrack(Op* op) noexcept;

  static void on_wake(Op* op, int res, std::uint32_t flags) noexcept;
  static void on_reactor_ready(Op* op, int res, std::uint32_t flags) noexcept;

  mutable io_uring ring_;
  RingProbe probe_;
  Reactor* inner_;
  std::shared_ptr<const WakeFd> wake_;

  // The eventfd read that unpark() completes. wake_buf_ is written by the kernel
  // until wake_op_'s CQE; both live as long as the driver, which reaps it in
  // shutdown().
  Op wake_op_;
  std::uint64_t wake_buf_ = 0;
  // The one-shot poll on the inner reactor's fd.
  Op reactor_op_;
  int reactor_fd_ = -1;  // the fd reactor_op_ was armed on
  bool reactor_ready_ = false;

  Op* in_flight_head_ = nullptr;  // every op the kernel may hold, for shutdown
  std::size_t user_in_flight_ = 0;
  std::vector<Cqe> batch_;     // reused by reap()
  std::vector<Cqe> deferred_;  // completions decided outside reap (errors at submit)
  bool shutting_down_ = false;
  bool closed_ = false;
  DriverStats stats_;
};

}  // namespace ringpark::detail
