// The io_uring driver: owns the ring, and is the layer whose park() is ONE
// io_uring_enter that submits every SQE queued during the turn and waits for a
// completion or the timeout. The inner reactor's fd sits in the ring as a
// one-shot POLL_ADD, re-armed after every turn of the reactor (a multishot poll
// on an epoll fd is edge-triggered and stalls libuv; see DESIGN.md "Level, not
// edge").
//
// Multishot recv and its provided buffers (OpCode::recv_multishot):
// - the driver owns one provided buffer ring (group 0), registered the first
//   time supports(OpCode::recv_multishot) or a submit of that op needs it. Its
//   memory is the same for 10 sockets as for 10,000: the kernel holds only as
//   many buffers as the most bytes in flight at once have needed (BufRing);
// - each completion with data names a buffer (kBuffer, buffer_id(flags)). The
//   bytes are the kernel's from the moment the buffer is in the ring until that
//   CQE, then the op owner's: it reads provided_buffer(id) during the
//   completion, up to `res` bytes (or keeps that pointer), and gives them back
//   with recycle(id), at once or later. Where the kernel fills buffers
//   incrementally (Linux 6.12) several completions may name one buffer, each
//   for its own piece, and each piece is recycled once. Recycled buffers reach
//   the kernel in one store per batch of completions. Every buffer stays mapped
//   until the driver is destroyed (after shutdown() has reaped every op);
// - when the ring runs dry the kernel ends the op with -ENOBUFS. The owner
//   never sees that: the driver keeps the op in flight and re-arms it once
//   buffers are back (oldest first, no more at a time than the ring has
//   buffers, so that a re-armed op does not starve again at once), and the
//   owner's stream goes on with no gap and no loss. Cancelling it meanwhile
//   completes it with -ECANCELED as usual;
// - a kernel without multishot recv (before 6.0) refuses the first one with
//   -EINVAL: the driver then turns the op off for good and completes that op
//   with -EOPNOTSUPP, which tells the owner to fall back to plain recv.
//
// Multishot recvmsg (OpCode::recvmsg_multishot) works the same way for
// datagrams, on a buffer group of its own (RingOptions::dgram_ring_*): one
// whole buffer per datagram, big enough for any, so a datagram arrives whole
// (filling a buffer incrementally, as stream bytes do, could cut one at the
// buffer's end). The owner reads a completion with datagram(), gives its
// buffer back with recycle_datagram(), and falls back to plain recvmsg on
// -EOPNOTSUPP. When the ring runs dry the op waits for buffers as a stream's
// does, and its owner gets one completion flagged kDry (no datagram): the
// socket is not drained. Every socket of the loop shares the group, so its
// memory does not grow with the number of sockets either.
#pragma once

#include <liburing.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "park/fork.hpp"
#include "park/park.hpp"
#include "ringpark/op.hpp"
#include "uring_driver/buf_ring.hpp"
#include "uring_driver/buffer_group.hpp"
#include "uring_driver/probe.hpp"

namespace ringpark::detail {

struct DriverStats {
  std::uint64_t turns = 0;           // park() and turn() calls
  std::uint64_t enters = 0;          // io_uring_enter syscalls
  std::uint64_t sqes_submitted = 0;  // SQEs handed to the kernel
  std::uint64_t cqes_reaped = 0;     // CQEs taken off the ring
  std::uint64_t buffers_ran_out = 0;  // multishot recvs ended by an empty buffer ring, re-armed
  // SQEs that re-armed a multishot op its owner did not ask to end (after
  // -ENOBUFS, or when the kernel found the CQ full).
  std::uint64_t multishot_rearms = 0;
  // Calls io_uring ended with -ECANCELED for want of a worker thread, made on
  // the loop thread instead (see dispatch()).
  std::uint64_t worker_fallbacks = 0;
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
  // them (their completions run, with -ECANCELED for the cancelled ones). In a
  // forked child it abandons instead (the ring is the parent's).
  void shutdown() noexcept override;
  // In a forked child: unmaps the ring and closes its fd, nothing else (no
  // enter, no register or unregister, no cancel, no reap). Every op in flight
  // is forgotten: left idle, never completed here (the kernel completes the
  // parent's copy). The buffer ring's registration is left to the parent; its
  // memory stays mapped until the driver is destroyed. Aborts in the process
  // that made the ring, where the kernel could still write into those ops.
  void abandon() noexcept override;

  // In a forked child that has not abandoned the driver yet, submit() and
  // cancel() touch nothing: a submitted op joins those in flight at the fork,
  // which abandon() forgets. park(), turn() and flush() return at once there.
  void submit(Op* op) noexcept override;
  // Links the ops (IOSQE_IO_LINK) in consecutive SQEs, at most half the SQ at
  // a time; see IoBackend::submit_in_order.
  std::size_t submit_in_order(Op* const* ops, std::size_t n) noexcept override;
  void cancel(Op* op) noexcept override;
  std::size_t in_flight() const noexcept override { return user_in_flight_; }
  // Whether this kernel's io_uring runs `code` (others complete -EOPNOTSUPP).
  // For OpCode::recv_multishot and recvmsg_multishot the first call registers
  // the op's buffer ring (which may fail: then false for good), and the answer
  // turns false if the kernel refuses the first such op. Loop thread only;
  // never blocks.
  bool supports(OpCode code) noexcept;
  bool native(OpCode code) noexcept override { return supports(code); }

  // The bytes of the latest completion that named provided buffer `id` (with
  // kBuffer), for the op owner to read (up to that completion's `res`) until it
  // recycles them. A later completion naming the same buffer (incremental
  // filling) changes what this returns, so an owner that keeps bytes past
  // their completion keeps this pointer. The memory stays mapped until the
  // driver is destroyed.
  char* provided_buffer(std::uint16_t id) const noexcept override {
    return stream_.ring()->piece(id);
  }
  // Gives the bytes of one completion that named provided buffer `id` back;
  // the kernel sees the buffer again after this batch of completions (or at
  // the next enter) once it is done with it. Aborts for an id the owner holds
  // nothing of. Loop thread only; never blocks.
  void recycle(std::uint16_t id) noexcept override { stream_.ring()->recycle(id); }
  // Provided buffers held by op owners (0 without a buffer ring).
  unsigned provided_buffers_out() const noexcept { return ring_or(stream_, &BufRing::out); }
  // Why multishot recv is off (a negative errno: the buffer ring's
  // registration error, -EINVAL for a kernel that refused the op, -EOPNOTSUPP
  // when turned off), or 0.
  int recv_multishot_error() const noexcept { return stream_.error(); }
  // How many provided buffers the ring has (0 without a buffer ring); fewer
  // than asked for when the locked-memory limit refused the full ring.
  unsigned provided_buffers() const noexcept { return ring_or(stream_, &BufRing::entries); }
  // The size of one provided buffer (0 without a buffer ring).
  unsigned provided_buffer_size() const noexcept override {
    return ring_or(stream_, &BufRing::buf_size);
  }
  // Whether the kernel fills the provided buffers incrementally (see BufRing).
  bool provided_buffers_incremental() const noexcept {
    return stream_.ring() && stream_.ring()->incremental();
  }
  // Provided buffers the kernel holds now (it gets more only when it runs dry).
  unsigned provided_buffers_in_ring() const noexcept {
    return ring_or(stream_, &BufRing::available);
  }

  // Reads the datagram that the completion (`res`, `flags`) of `op` (an
  // OpCode::recvmsg_multishot, whose msghdr says how much room each buffer
  // keeps for the address and control messages) put into its buffer; the
  // real length is always known (the driver asks the kernel with MSG_TRUNC).
  // Returns false for a completion without a datagram (no kBuffer, or a
  // malformed buffer). Loop thread only; never blocks.
  bool datagram(const Op& op, int res, std::uint32_t flags,
                Datagram* out) const noexcept override;
  // Gives the buffer of a recvmsg_multishot completion back. Aborts for an id
  // the owner does not hold. Loop thread only; never blocks.
  void recycle_datagram(std::uint16_t id) noexcept override { dgram_.ring()->recycle(id); }
  // Datagram buffers held by op owners; why multishot recvmsg is off (as
  // recv_multishot_error()); the datagram buffers the kernel holds now.
  unsigned datagram_buffers_out() const noexcept { return ring_or(dgram_, &BufRing::out); }
  int recvmsg_multishot_error() const noexcept { return dgram_.error(); }
  unsigned datagram_buffers_in_ring() const noexcept {
    return ring_or(dgram_, &BufRing::available);
  }

  // Hands queued SQEs to the kernel without waiting or reaping (one enter, or
  // none when nothing is queued).
  void flush() noexcept override;

  // The outer loop's side (IoBackend): an eventfd registered with the ring,
  // which the kernel signals on every CQE while the wake is on (the CQ's
  // eventfd flag, toggled without a syscall).
  bool waits_on_inner() const noexcept override { return true; }
  int completion_fd() noexcept override;
  void set_completion_wake(bool on) noexcept override;
  bool has_completions() const noexcept override { return has_cqes(); }
  void wake_outer() noexcept override;
  void clear_outer_wake() noexcept override;
  // CQEs to reap, or completions the kernel holds for this thread's next entry.
  bool has_cqes() const noexcept;
  bool has_sqes() const noexcept { return !closed_ && !forked() && io_uring_sq_ready(&ring_) > 0; }

  // True in a forked child of the process that made the ring (park/fork.hpp).
  bool forked() const noexcept { return fork_generation_ != fork_generation(); }

  const DriverStats& stats() const noexcept { return stats_; }
  const RingProbe& probe() const noexcept { return probe_; }

 private:
  bool taskrun_pending() const noexcept;
  void close_completion_fd() noexcept;

  struct Cqe {
    std::uint64_t user_data;
    int res;
    std::uint32_t flags;
  };

  UringDriver(Reactor* inner, const RingProbe& probe, const RingOptions& options);

  io_uring_sqe* get_sqe() noexcept;
  // The SQ is full (or short of room): hands what is queued to the kernel.
  void submit_queued() noexcept;
  void prepare(io_uring_sqe* sqe, Op* op) noexcept;
  void complete_later(Op* op, int res) noexcept;
  void arm_internal(bool watch_inner) noexcept;
  int enter(Timeout timeout) noexcept;
  std::size_t reap() noexcept;
  std::size_t take_cqes(std::vector<Cqe>& out) noexcept;
  void make_cq_room() noexcept;
  std::size_t dispatch_deferred() noexcept;
  void dispatch(const Cqe& cqe) noexcept;
  BufferGroup* group_of(OpCode code) noexcept;
  bool ensure_group(BufferGroup& group, unsigned plain_op) noexcept;
  void return_buffers() noexcept;
  template <class Get>
  static unsigned ring_or(const BufferGroup& group, Get get) noexcept {
    return group.ring() ? (group.ring()->*get)() : 0;
  }
  void track(Op* op) noexcept;
  void untrack(Op* op) noexcept;

  static void on_wake(Op* op, int res, std::uint32_t flags) noexcept;
  static void on_reactor_ready(Op* op, int res, std::uint32_t flags) noexcept;

  mutable io_uring ring_;
  const unsigned fork_generation_ = fork_generation();  // when the ring was made
  RingProbe probe_;
  Reactor* inner_;
  std::shared_ptr<const WakeFd> wake_;

  // The eventfd read that unpark() completes. wake_buf_ is written by the kernel
  // until wake_op_'s CQE; both live as long as the driver, which reaps it in
  // shutdown().
  Op wake_op_;
  std::uint64_t wake_buf_ = 0;
  int completion_fd_ = -1;  // see completion_fd(); closed with the ring
  // The one-shot poll on the inner reactor's fd.
  Op reactor_op_;
  int reactor_fd_ = -1;  // the fd reactor_op_ was armed on
  bool reactor_ready_ = false;

  Op* in_flight_head_ = nullptr;  // every op the kernel may hold, for shutdown
  std::size_t user_in_flight_ = 0;
  std::vector<Cqe> batch_;     // reused by reap()
  std::vector<Cqe> deferred_;  // completions decided outside reap (errors at submit)
  // The provided buffer groups, their rings registered on first use; see the
  // top of this file.
  BufferGroup stream_;  // OpCode::recv_multishot, group 0
  BufferGroup dgram_;   // OpCode::recvmsg_multishot, group 1
  bool shutting_down_ = false;
  bool closed_ = false;
  DriverStats stats_;
};

}  // namespace ringpark::detail
