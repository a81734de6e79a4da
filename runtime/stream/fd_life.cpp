#include "runtime/stream/fd_life.hpp"

#include <unistd.h>

#include <cerrno>

namespace ringpark::detail {

bool FdLife::close() noexcept {
  if (closing_) return false;
  closing_ = true;
  hooks_->cancel_all(this);
  if (in_flight_ == 0 && holds_ == 0) {
    // Nothing in flight: finish from the loop all the same, never in here.
    op_.code = OpCode::nop;
    op_.complete = &FdLife::on_op;
    op_.data = this;
    submit(&op_);
  }
  return true;
}

void FdLife::drain() noexcept {
  drained_ = true;
  if (hooks_->drained) hooks_->drained(this);
  if (owned_ && fd_ >= 0) {
    // Through the backend like every other call on the descriptor, and only
    // now: nothing that names it is in flight any more.
    op_.code = OpCode::close;
    op_.fd = fd_;
    op_.complete = &FdLife::on_op;
    op_.data = this;
    submit(&op_);
    return;
  }
  closed_ = true;
  hooks_->closed(this);  // the owner may be gone from here on
}

void FdLife::on_op(Op* op, int res, std::uint32_t) noexcept {
  auto* self = static_cast<FdLife*>(op->data);
  self->ended();
  if (op->code == OpCode::close) {
    // A close op that did not run leaves the descriptor open: close it here.
    if (res == -ECANCELED || res == -EOPNOTSUPP || res == -EINVAL) ::close(self->fd_);
    self->fd_ = -1;
    self->closed_ = true;
    self->hooks_->closed(self);  // the owner may be gone from here on
    return;
  }
  self->settle();  // the barrier nop of a close with nothing in flight
}

void FdLife::forget_in_flight(IoBackend* io) noexcept {
  io_ = io;
  if (shared_) *shared_ -= in_flight_;
  in_flight_ = 0;
  holds_ = 0;
  op_.state = Op::State::idle;
  op_.next_ = op_.prev_ = nullptr;
  if (closing_ && !closed_) {
    // The close was on its way in the old backend: do it again in this one.
    drained_ = false;
    op_.code = OpCode::nop;
    op_.complete = &FdLife::on_op;
    op_.data = this;
    submit(&op_);
  }
}

}  // namespace ringpark::detail
