#include "runtime/stream/edges.hpp"

#include <poll.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace ringpark::detail {

EdgeSet::~EdgeSet() {
  if (epfd_ >= 0) ::close(epfd_);
}

bool EdgeSet::ensure_epoll() noexcept {
  if (epfd_ < 0) epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  return epfd_ >= 0;
}

bool EdgeSet::add(Member* m, int fd) noexcept {
  if (m->in || fd < 0 || !ensure_epoll()) return false;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLET;  // EPOLLERR and EPOLLHUP come by themselves
  ev.data.ptr = m;
  if (::epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) return false;
  m->fd = fd;
  m->in = true;
  m->prev = nullptr;
  m->next = head_;
  if (head_) head_->prev = m;
  head_ = m;
  ++members_;
  if (armed_) {
    recount();  // a cancel on its way: the op goes on (on_poll arms it again)
  } else {
    arm();
  }
  return true;
}

void EdgeSet::remove(Member* m) noexcept {
  if (!m->in) return;
  ::epoll_ctl(epfd_, EPOLL_CTL_DEL, m->fd, nullptr);
  if (m->prev) {
    m->prev->next = m->next;
  } else {
    head_ = m->next;
  }
  if (m->next) m->next->prev = m->prev;
  m->prev = m->next = nullptr;
  m->in = false;
  --members_;
  if (members_ == 0 && armed_ && !cancelling_) {
    cancelling_ = true;
    io_->cancel(&op_);
  }
  recount();
}

bool EdgeSet::want_out(Member* m, bool on) noexcept {
  if (!m->in) return false;
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLET | (on ? EPOLLOUT : 0u);
  ev.data.ptr = m;
  return ::epoll_ctl(epfd_, EPOLL_CTL_MOD, m->fd, &ev) == 0;
}

void EdgeSet::recount() noexcept {
  const bool want = armed_ && members_ > 0 && accounted_ != nullptr;
  if (want == counted_) return;
  counted_ = want;
  if (want) {
    ++*accounted_;
  } else {
    --*accounted_;
  }
}

void EdgeSet::arm() noexcept {
  op_.code = OpCode::poll_multishot;
  op_.fd = epfd_;
  op_.flags = POLLIN;
  op_.complete = &EdgeSet::on_poll;
  op_.data = this;
  armed_ = true;
  io_->submit(&op_);
  recount();
}

void EdgeSet::read_events() noexcept {
  constexpr int kMax = 64;
  epoll_event evs[kMax];
  for (;;) {
    const int n = ::epoll_wait(epfd_, evs, kMax, 0);
    if (n < 0 && errno == EINTR) continue;
    for (int i = 0; i < n; ++i) {
      auto* m = static_cast<Member*>(evs[i].data.ptr);
      m->edge(m, evs[i].events);  // must not remove members (see Member)
    }
    if (n < kMax) return;
  }
}

void EdgeSet::on_poll(Op* op, int res, std::uint32_t flags) noexcept {
  auto* self = static_cast<EdgeSet*>(op->data);
  const bool more = flags & kMore;
  const bool we_cancelled = self->cancelling_;
  if (!more) {
    self->armed_ = false;
    self->cancelling_ = false;
    self->recount();
  }
  if (res > 0) self->read_events();
  if (more || self->members_ == 0) return;
  if (res >= 0 || (res == -ECANCELED && we_cancelled)) {
    self->arm();  // ended by the kernel, or cancelled while members came back
    return;
  }
  // A cancel not ours: the backend is shutting down (and completes anything
  // submitted now at once). Nothing to watch with any more.
  if (res == -ECANCELED) return;
  // The poll on our own epoll set failed: nothing to wait on any more. Every
  // member leaves (and drains once), and keeps its receive in the ring.
  std::fprintf(stderr, "ringpark: the poll on the datagram epoll set failed (%d)\n", res);
  while (Member* m = self->head_) {
    self->remove(m);
    m->edge(m, EPOLLIN | EPOLLOUT);
  }
}

void EdgeSet::after_fork(IoBackend* io) noexcept {
  io_ = io;
  op_.state = Op::State::idle;
  op_.next_ = op_.prev_ = nullptr;
  armed_ = false;
  cancelling_ = false;
  recount();
  // Our number for the parent's epoll set: the parent keeps its own.
  if (epfd_ >= 0) ::close(epfd_);
  epfd_ = -1;
  Member* m = head_;
  head_ = nullptr;
  members_ = 0;
  while (m != nullptr) {
    Member* next = m->next;
    const int fd = m->fd;
    m->in = false;
    m->prev = m->next = nullptr;
    add(m, fd);  // watching for EPOLLIN only; on failure the member is out
    m = next;
  }
}

}  // namespace ringpark::detail
