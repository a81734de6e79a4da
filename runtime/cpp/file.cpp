// The handle machinery shared by File, TcpListener and TcpStream (FdHandle,
// HandleOp and the operations on a handle's descriptor), and File itself.
//
// An operation on a handle is an OpAwaitable (the OpSlot) plus a link in its
// handle's list of operations, so that the handle can reach every operation
// that may be in flight on its descriptor:
// - close() cancels them before closing the descriptor through the backend,
//   so no operation keeps the file open (io_uring holds its own reference to
//   the file for as long as an operation on it is in flight) and none waits on
//   a descriptor number that a later socket may get (the epoll fallback waits
//   on numbers);
// - moving the handle re-points them at its new address;
// - destroying the handle, or the operation, unlinks it from the other.
// An operation started without a CancelToken is linked to one of its own, so
// the handle can cancel it at once, even from its destructor; one started with
// the caller's token is cancelled by a cancel op that close() awaits.
#include "ringpark/file.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

namespace ringpark {
namespace detail {

namespace {

// The most one read or write moves on Linux (MAX_RW_COUNT); larger buffers
// give a short transfer, as read(2) would.
constexpr std::size_t kMaxIo = 0x7ffff000;

std::error_code bad_fd() noexcept { return std::make_error_code(std::errc::bad_file_descriptor); }

// Asks the backend to end `target` (io_uring's ASYNC_CANCEL, matched on the
// op's address). Used for operations linked to the caller's token, which the
// handle may not cancel through that token. The target must be alive when
// this is submitted; if it has completed by the time the cancel is processed,
// the cancel finds nothing (-ENOENT), which is fine.
class CancelOp final : public OpAwaitable {
 public:
  CancelOp(Runtime& runtime, Op* target) noexcept : OpAwaitable(runtime, nullptr) {
    op_.code = OpCode::cancel;
    op_.target = target;
  }
  Result<void> await_resume() const noexcept { return {error()}; }
};

// openat(2). The path lives here, in the pinned awaitable, until the final
// completion (io_uring copies it at submission, the fallback's pool thread
// reads it when it runs).
class OpenOp final : public OpAwaitable {
 public:
  OpenOp(Runtime& runtime, std::string&& path, int flags, mode_t mode, CancelToken* token) noexcept
      : OpAwaitable(runtime, token), path_(std::move(path)) {
    op_.code = OpCode::openat;
    op_.dfd = AT_FDCWD;
    op_.path = path_.c_str();  // kept alive by path_ in this pinned awaitable
    op_.flags = flags | O_CLOEXEC;
    op_.mode = mode;
    // The kernel would stop at the NUL and open another file than the one named.
    if (path_.find('\0') != std::string::npos) refuse(-EINVAL);
  }
  ~OpenOp() {
    // Opened, but the task is being destroyed (its Runtime went away) before it
    // could take the descriptor: close it rather than leak it.
    if (submitted_ && !taken_ && res_ >= 0) ::close(res_);
  }
  void await_suspend(std::coroutine_handle<> awaiter) noexcept {
    submitted_ = true;
    res_ = -EINPROGRESS;  // overwritten by the completion
    OpAwaitable::await_suspend(awaiter);
  }
  Result<int> await_resume() noexcept {
    taken_ = true;
    return {res_ >= 0 ? res_ : -1, error()};
  }

 private:
  std::string path_;
  bool submitted_ = false;
  bool taken_ = false;
};

}  // namespace

// ---- FdHandle ----------------------------------------------------------------

FdHandle::FdHandle(FdHandle&& other) noexcept
    : runtime_(other.runtime_), fd_(std::exchange(other.fd_, -1)) {
  take_ops(other);
}

FdHandle& FdHandle::operator=(FdHandle&& other) noexcept {
  if (this != &other) {
    dispose();
    runtime_ = other.runtime_;
    fd_ = std::exchange(other.fd_, -1);
    take_ops(other);
  }
  return *this;
}

void FdHandle::take_ops(FdHandle& other) noexcept {
  ops_ = std::exchange(other.ops_, nullptr);
  for (HandleOp* op = ops_; op != nullptr; op = op->next_) op->handle_ = this;
}

int FdHandle::release() noexcept {
  // The ops in flight now belong with the descriptor, not with this handle:
  // forgotten here, so that destroying or closing the handle leaves them be.
  // Those not awaited yet are refused with EBADF, as on a closed handle.
  for (HandleOp* op = ops_; op != nullptr;) {
    HandleOp* next = op->next_;
    op->handle_ = nullptr;
    op->prev_ = op->next_ = nullptr;
    op = next;
  }
  ops_ = nullptr;
  return std::exchange(fd_, -1);
}

void FdHandle::attach(HandleOp* op) noexcept {
  op->prev_ = nullptr;
  op->next_ = ops_;
  if (ops_ != nullptr) ops_->prev_ = op;
  ops_ = op;
}

void FdHandle::detach(HandleOp* op) noexcept {
  if (op->prev_ != nullptr) {
    op->prev_->next_ = op->next_;
  } else {
    ops_ = op->next_;
  }
  if (op->next_ != nullptr) op->next_->prev_ = op->prev_;
  op->prev_ = op->next_ = nullptr;
}

void FdHandle::dispose() noexcept {
  // An op still listed here is one whose task has not resumed from it. If it is
  // in flight its frame is alive, and so is the Runtime, so cancelling it is
  // safe; once it has completed the cancel does nothing.
  for (HandleOp* op = ops_; op != nullptr;) {
    HandleOp* next = op->next_;
    op->cancel_now();
    op->handle_ = nullptr;
    op->prev_ = op->next_ = nullptr;
    op = next;
  }
  ops_ = nullptr;
  // Synchronous: the destructor cannot wait for a close op. An op left in
  // flight holds the file in io_uring, so this only drops the number.
  if (fd_ >= 0) ::close(std::exchange(fd_, -1));
}

Task<Result<void>> FdHandle::close() {
  if (fd_ < 0 || runtime_ == nullptr) co_return Result<void>{bad_fd()};
  Runtime& runtime = *runtime_;
  // Closed from here on: ops created before and awaited after are refused.
  const int fd = std::exchange(fd_, -1);
  bool need_cancel_ops = false;
  for (HandleOp* op = ops_; op != nullptr; op = op->next_) {
    if (!op->cancel_now()) need_cancel_ops = true;
  }
  // Ops on the caller's token need a cancel op each. The list changes while we
  // wait (their tasks resume and unlink them), so look again after each one.
  while (need_cancel_ops) {
    HandleOp* target = nullptr;
    for (HandleOp* op = ops_; op != nullptr; op = op->next_) {
      if (op->user_token_ && op->submitted_ && !op->cancel_sent_) {
        target = op;
        break;
      }
    }
    if (target == nullptr) break;
    target->cancel_sent_ = true;
    // target is alive here: it is still listed, so its task has not resumed.
    co_await CancelOp(runtime, &target->slot_->op_);
  }
  // Queued after the cancels, so the backend sees them first; io_uring would
  // keep the socket open while a recv on it is in flight.
  Result<void> closed = co_await ringpark::close(runtime, fd);
  co_return closed;
}

// ---- HandleOp ----------------------------------------------------------------

HandleOp::HandleOp(FdHandle& handle, CancelToken* token) noexcept
    : handle_(&handle), user_token_(token != nullptr) {
  if (handle.runtime_ != nullptr) slot_.emplace(*handle.runtime_, token ? token : &own_token_);
  handle.attach(this);
}

HandleOp::~HandleOp() { forget_handle(); }

void HandleOp::forget_handle() noexcept {
  if (handle_ == nullptr) return;
  handle_->detach(this);
  handle_ = nullptr;
}

bool HandleOp::await_ready() noexcept {
  if (!slot_) return true;  // no Runtime: take_result() says EBADF
  OpSlot& s = *slot_;
  if (handle_ == nullptr || handle_->fd_ < 0) {
    s.refuse(-EBADF);  // before any other refusal: the handle is the first thing wrong
  } else if (!s.refused_) {
    // statx names the file by its directory fd and an empty path.
    if (s.op_.code == OpCode::statx) {
      s.op_.dfd = handle_->fd_;
    } else {
      s.op_.fd = handle_->fd_;
    }
  }
  return s.await_ready();
}

void HandleOp::await_suspend(std::coroutine_handle<> awaiter) noexcept {
  submitted_ = true;
  slot_->res_ = -EINPROGRESS;  // overwritten by the completion
  slot_->await_suspend(awaiter);
}

int HandleOp::take_result() noexcept {
  forget_handle();
  return slot_ ? slot_->res_ : -EBADF;
}

bool HandleOp::cancel_now() noexcept {
  if (user_token_) return false;
  // The token cancels the op if it is in flight and refuses it if it is
  // awaited later; it never completes anything inside this call.
  own_token_.cancel();
  return true;
}

// ---- Operations ----------------------------------------------------------------

BufferOp::BufferOp(FdHandle& handle, OpCode code, Buffer buffer, std::int64_t offset, int flags,
                   std::size_t start, CancelToken* token) noexcept
    : HandleOp(handle, token), buffer_(std::move(buffer)) {
  Op* o = op();
  if (o == nullptr) return;
  start = std::min(start, buffer_.size());
  const std::size_t len = std::min(buffer_.size() - start, kMaxIo);
  o->code = code;
  // buffer_'s heap block is what the kernel reads or writes; buffer_ is not
  // touched while the op is in flight and lives in this pinned awaitable.
  o->buf = buffer_.data() + start;
  o->len = static_cast<std::uint32_t>(len);
  o->offset = offset;
  o->flags = code == OpCode::send ? flags | MSG_NOSIGNAL : flags;
  if (len == 0) {
    // Nothing to move. A read of 0 bytes would look like the end of the file
    // (or stream), so it is refused; a write of 0 bytes simply wrote them all.
    const bool reads = code == OpCode::read || code == OpCode::recv;
    refuse(reads ? -EINVAL : 0);
  }
}

BufferResult BufferOp::await_resume() noexcept {
  const int res = take_result();
  return {res > 0 ? static_cast<std::size_t>(res) : 0u, std::move(buffer_), to_error(res)};
}

VoidOp::VoidOp(FdHandle& handle, OpCode code, int flags, CancelToken* token) noexcept
    : HandleOp(handle, token) {
  if (Op* o = op()) {
    o->code = code;
    o->flags = flags;  // shutdown's `how`
  }
}

StatOp::StatOp(FdHandle& handle, CancelToken* token) noexcept : HandleOp(handle, token) {
  static_assert(sizeof(struct statx) <= kStatxSize && alignof(struct statx) <= 8,
                "StatOp::statx_ cannot hold a struct statx");
  std::memset(statx_, 0, sizeof statx_);
  if (Op* o = op()) {
    o->code = OpCode::statx;
    o->path = "";  // a literal: lives forever
    o->flags = AT_EMPTY_PATH | AT_STATX_SYNC_AS_STAT;
    o->len = STATX_BASIC_STATS;                             // the mask
    o->statxbuf = reinterpret_cast<struct statx*>(statx_);  // kept alive by this pinned awaitable
  }
}

Result<FileStat> StatOp::await_resume() noexcept {
  const int res = take_result();
  if (res < 0) return {FileStat{}, to_error(res)};
  struct statx st;
  std::memcpy(&st, statx_, sizeof st);
  auto ns = [](const struct statx_timestamp& t) {
    return static_cast<std::int64_t>(t.tv_sec) * 1'000'000'000 + t.tv_nsec;
  };
  FileStat out;
  out.size = st.stx_size;
  out.mode = st.stx_mode;
  out.nlink = st.stx_nlink;
  out.uid = st.stx_uid;
  out.gid = st.stx_gid;
  out.ino = st.stx_ino;
  out.blocks = st.stx_blocks;
  out.blksize = st.stx_blksize;
  out.atime_ns = ns(st.stx_atime);
  out.mtime_ns = ns(st.stx_mtime);
  out.ctime_ns = ns(st.stx_ctime);
  return {out, {}};
}

}  // namespace detail

// ---- File ----------------------------------------------------------------------

Task<Result<File>> File::open(Runtime& runtime, std::string path, int flags, mode_t mode,
                              CancelToken* token) {
  Result<int> opened = co_await detail::OpenOp(runtime, std::move(path), flags, mode, token);
  if (!opened) co_return Result<File>{File(), opened.error};
  co_return Result<File>{File(runtime, opened.value), {}};
}

}  // namespace ringpark
