// Readiness edges of sockets, from an epoll set that holds none of them open.
//
// Why: every io_uring op takes a reference to its file, and when a process
// dies its ring lets go of the ops still in it only later, from a kernel
// worker (the ring's exit work; 5 to 10 ms on Linux 6.18, measured). A
// receive that waits in the ring on a bound UDP socket therefore keeps the
// socket, and its port, alive after a kill: a server restarted at once, or the
// next test of libuv's suite, gets EADDRINUSE where libuv's own epoll loop
// (whose sockets die with the process) gets the port. An epoll set holds no
// reference to what it watches, so a socket watched here is in the ring only
// while it has datagrams (its receive drains it with MSG_DONTWAIT) or while
// its sends go out (a wait for room is an EPOLLOUT edge here too), and dies
// with the process, as libuv's.
//
// One EdgeSet per loop: an epoll set of its own (edge-triggered: one event
// per arrival, never a level that stays), watched from the backend with one
// multishot poll op, armed while the set has members. Its events are read
// with epoll_wait(2) when that poll fires, and each member is told with its
// `edge` callback, from the loop, inside the backend's completions.
//
// The poll op keeps the loop alive only through the members' own handles: it
// counts in `accounted` (LoopContext::libuv_accounted) while the set has
// members, and as ringpark's own once the last one left, until its final
// completion. Loop thread only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringpark/op.hpp"

namespace ringpark::detail {

class EdgeSet {
 public:
  struct Member {
    // The socket may have become readable (EPOLLIN), writable (EPOLLOUT,
    // while asked for with want_out), or has an error to take (EPOLLERR,
    // EPOLLHUP): `events` says which. Runs inside the backend's completions;
    // it may submit ops and call want_out, but must not remove members or
    // call user code.
    void (*edge)(Member* m, std::uint32_t events) noexcept = nullptr;
    void* data = nullptr;  // for the owner
    int fd = -1;
    bool in = false;  // in the set
    Member* prev = nullptr;
    Member* next = nullptr;
  };

  // `accounted` may be null (nothing keeps count of liveness).
  EdgeSet(IoBackend* io, std::size_t* accounted) noexcept : io_(io), accounted_(accounted) {}
  // After the backend has reaped every op (its shutdown), or in a forked
  // child after abandon: the poll op is not in flight.
  ~EdgeSet();
  EdgeSet(const EdgeSet&) = delete;
  EdgeSet& operator=(const EdgeSet&) = delete;

  // Watches `fd` for `m` (m->edge set). False (nothing watched) when the epoll
  // set cannot be made or take it: the caller keeps its receive in the ring.
  bool add(Member* m, int fd) noexcept;
  // Stops watching; the fd must still be open. No edge comes for `m` after.
  void remove(Member* m) noexcept;
  // Adds EPOLLOUT to what `m` is watched for (an edge comes at once if the
  // socket has room already), or takes it off again. False when `m` is not
  // in the set or the epoll set refused.
  bool want_out(Member* m, bool on) noexcept;
  // In a forked child, on the child's backend: the poll op was forgotten with
  // the parent's ring, and the epoll set is shared with the parent. A fresh
  // set takes every member again (no edge is called: the members drain once
  // by themselves, see dgram::after_fork).
  void after_fork(IoBackend* io) noexcept;

 private:
  static void on_poll(Op* op, int res, std::uint32_t flags) noexcept;
  void arm() noexcept;
  void recount() noexcept;
  void read_events() noexcept;
  bool ensure_epoll() noexcept;

  IoBackend* io_;
  std::size_t* accounted_;
  int epfd_ = -1;
  Member* head_ = nullptr;
  std::size_t members_ = 0;
  Op op_;                  // the multishot poll on epfd_
  bool armed_ = false;     // op_ in flight
  bool cancelling_ = false;  // we asked for op_ to end (the set emptied)
  bool counted_ = false;   // op_ counted in *accounted_
};

}  // namespace ringpark::detail
