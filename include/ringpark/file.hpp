// File: an owned file descriptor with awaitable operations.
//
//   ringpark::Result<ringpark::File> f = co_await ringpark::File::open(rt, path, O_RDONLY);
//   ringpark::BufferResult r = co_await f.value.read(std::move(buffer), 0);
//   co_await f.value.close();
//
// The handles of the C++ API (File here, TcpListener and TcpStream in
// ringpark/net.hpp) share these rules:
// - A handle owns its descriptor and refers to its Runtime, which must outlive
//   it and must not be moved while the handle lives (the same rule as for any
//   task holding a Runtime&). Handles are move-only. Every function of a
//   handle, constructors and destructor included, is for the Runtime's owner
//   thread only, like everything in the C++ API but post().
// - Operations are the awaitables of ringpark/ops.hpp, tied to the handle: the
//   buffer is taken by value and given back with the result, errors are a
//   std::error_code of std::generic_category() in the result, never an
//   exception, and each takes an optional CancelToken.
// - An operation on a closed, moved-from or default-constructed handle
//   completes at once with std::errc::bad_file_descriptor, without starting.
// - close() cancels every operation still in flight on the handle (they
//   complete with operation_canceled, their buffers come back), then closes the
//   descriptor through the backend. Prefer it to the destructor.
// - The destructor of a handle that was not closed closes the descriptor
//   synchronously (::close). Await every operation on a handle before
//   destroying it. If one is still in flight anyway, the destructor asks for it
//   to be cancelled when it was started without a CancelToken (its task then
//   resumes with operation_canceled); memory stays safe in every case, since
//   the operation's buffer lives in its awaitable and io_uring holds its own
//   reference to the file, but an operation that was given a token and is left
//   in flight on the epoll fallback keeps waiting on the descriptor number and
//   may see a later file that reuses it.
// - A handle and the task awaiting one of its operations may be moved while
//   the operation is in flight: the operation follows the handle. A member
//   function that is itself a Task (close(), send_all(), accept()) uses the
//   handle at its own address until it ends, so neither move nor destroy the
//   handle until it does.
#pragma once

#include <sys/types.h>

#include <cerrno>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <system_error>

#include "ringpark/op.hpp"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"

namespace ringpark {

namespace detail {

class HandleOp;

// What every handle holds: its Runtime, its descriptor and the list of its
// operations that have been created and not yet resumed. Not for users.
class FdHandle {
 public:
  FdHandle() noexcept = default;
  FdHandle(Runtime& runtime, int fd) noexcept : runtime_(&runtime), fd_(fd < 0 ? -1 : fd) {}
  // Takes the descriptor and the operations of `other`, which stays closed but
  // keeps its Runtime, so its operations still complete with EBADF.
  FdHandle(FdHandle&& other) noexcept;
  FdHandle& operator=(FdHandle&& other) noexcept;
  FdHandle(const FdHandle&) = delete;
  FdHandle& operator=(const FdHandle&) = delete;
  ~FdHandle() { dispose(); }

  int fd() const noexcept { return fd_; }
  Runtime* runtime() const noexcept { return runtime_; }
  int release() noexcept;
  Task<Result<void>> close();

 private:
  friend class HandleOp;
  void attach(HandleOp* op) noexcept;
  void detach(HandleOp* op) noexcept;
  void take_ops(FdHandle& other) noexcept;
  // Cancels what can be cancelled at once, forgets every op and ::closes.
  void dispose() noexcept;

  Runtime* runtime_ = nullptr;
  int fd_ = -1;
  HandleOp* ops_ = nullptr;  // intrusive list through HandleOp::prev_/next_
};

// An OpAwaitable whose protected parts the handle operations may use.
class OpSlot final : public OpAwaitable {
 public:
  OpSlot(Runtime& runtime, CancelToken* token) noexcept : OpAwaitable(runtime, token) {}
  using OpAwaitable::error;
  using OpAwaitable::op_;
  using OpAwaitable::refuse;
  using OpAwaitable::refused_;
  using OpAwaitable::res_;
};

// One operation on a handle's descriptor. Pinned, like every awaitable. It
// holds its OpSlot only when the handle has a Runtime (a default-constructed
// handle has none, and then the operation is refused with EBADF). The fd is
// read from the handle when the operation is awaited, not when it is created,
// so one created before close() and awaited after it is refused too.
class HandleOp {
 public:
  HandleOp(const HandleOp&) = delete;
  HandleOp& operator=(const HandleOp&) = delete;

  bool await_ready() noexcept;
  void await_suspend(std::coroutine_handle<> awaiter) noexcept;

 protected:
  HandleOp(FdHandle& handle, CancelToken* token) noexcept;
  ~HandleOp();

  // The op to describe, or null when there is no runtime.
  Op* op() noexcept { return slot_ ? &slot_->op_ : nullptr; }
  void refuse(int negative_errno) noexcept {
    if (slot_) slot_->refuse(negative_errno);
  }
  // The completion's result (negative errno); forgets the handle. Called once,
  // from await_resume.
  int take_result() noexcept;
  // The result so far, without taking it: -EINPROGRESS while in flight.
  int peek_result() const noexcept { return slot_ ? slot_->res_ : -EBADF; }
  bool submitted() const noexcept { return submitted_; }
  static std::error_code to_error(int res) noexcept {
    return res < 0 ? std::error_code(-res, std::generic_category()) : std::error_code();
  }

 private:
  friend class FdHandle;
  // Asks for the op to end through its own token; false when it was given the
  // caller's token, which only that caller may cancel.
  bool cancel_now() noexcept;
  void forget_handle() noexcept;

  CancelToken own_token_;       // before slot_: the slot may link to it
  std::optional<OpSlot> slot_;  // pinned in this pinned awaitable
  FdHandle* handle_;            // null once resumed, or when the handle went away
  HandleOp* prev_ = nullptr;    // FdHandle::ops_ list
  HandleOp* next_ = nullptr;
  bool user_token_;           // linked to the caller's token, not own_token_
  bool cancel_sent_ = false;  // FdHandle::close() submitted a cancel op for it
  bool submitted_ = false;
};

// read, write, recv and send on a handle: the buffer lives here while the op
// is in flight and comes back, whole, with the result.
class BufferOp final : public HandleOp {
 public:
  // `start`: the first byte of `buffer` to transfer (send_all's progress).
  BufferOp(FdHandle& handle, OpCode code, Buffer buffer, std::int64_t offset, int flags,
           std::size_t start, CancelToken* token) noexcept;
  BufferResult await_resume() noexcept;

 private:
  Buffer buffer_;  // op()->buf points into it until the final completion
};

// fsync, fdatasync and shutdown: no value, only an error.
class VoidOp final : public HandleOp {
 public:
  VoidOp(FdHandle& handle, OpCode code, int flags, CancelToken* token) noexcept;
  Result<void> await_resume() noexcept { return {to_error(take_result())}; }
};

}  // namespace detail

// What File::stat() reports: the fields of statx(2) that every Linux file
// system fills (STATX_BASIC_STATS).
struct FileStat {
  std::uint64_t size = 0;  // bytes
  std::uint32_t mode = 0;  // type and permission bits, as st_mode (S_ISREG(mode)...)
  std::uint32_t nlink = 0;
  std::uint32_t uid = 0;
  std::uint32_t gid = 0;
  std::uint64_t ino = 0;
  std::uint64_t blocks = 0;   // 512-byte blocks allocated
  std::uint32_t blksize = 0;  // preferred I/O size
  std::int64_t atime_ns = 0;  // since the epoch
  std::int64_t mtime_ns = 0;
  std::int64_t ctime_ns = 0;
};

namespace detail {

// statx(fd, "", AT_EMPTY_PATH): the kernel writes into statx_ while in flight.
class StatOp final : public HandleOp {
 public:
  StatOp(FdHandle& handle, CancelToken* token) noexcept;
  Result<FileStat> await_resume() noexcept;

 private:
  static constexpr std::size_t kStatxSize = 256;  // sizeof(struct statx); file.cpp checks
  alignas(8) unsigned char statx_[kStatxSize];    // op()->statxbuf points here
};

}  // namespace detail

class File {
 public:
  // An empty handle: every operation completes with EBADF.
  File() noexcept = default;
  // Adopts `fd` (a file, pipe, or any descriptor read and written with
  // read/write), which the File then owns and closes. Never blocks.
  File(Runtime& runtime, int fd) noexcept : handle_(runtime, fd) {}
  // Takes `other`'s descriptor and the operations in flight on it; `other`
  // is left closed. Never blocks.
  File(File&&) noexcept = default;
  // Closes this File's descriptor first (as the destructor does), then takes
  // `other`'s.
  File& operator=(File&&) noexcept = default;
  // See the top of this file: ::close() if not closed; await operations first.
  ~File() = default;

  // openat(AT_FDCWD, path, flags | O_CLOEXEC, mode) through the backend (io_uring,
  // or the fallback's thread pool): never blocks the thread. The path is kept
  // in the task's frame until the open completes, so the caller's string may go
  // at once. Errors (ENOENT...) are in the result; a path holding a NUL byte is
  // refused with invalid_argument. The new File belongs to the caller; if the
  // task is destroyed with the Runtime after the kernel opened the file but
  // before the task resumed, the descriptor is closed, never leaked.
  static Task<Result<File>> open(Runtime& runtime, std::string path, int flags, mode_t mode = 0644,
                                 CancelToken* token = nullptr);

  // pread(2) of up to buffer.size() bytes at `offset` (-1: at the file
  // position, which then advances; the only choice for a pipe). bytes == 0 with
  // no error is the end of the file. An empty buffer is refused with
  // invalid_argument (it could not be told from the end of the file). The
  // buffer comes back with the result, whatever happened.
  [[nodiscard]] detail::BufferOp read(Buffer buffer, std::int64_t offset = -1,
                                      CancelToken* token = nullptr) noexcept {
    return detail::BufferOp(handle_, detail::OpCode::read, std::move(buffer), offset, 0, 0, token);
  }
  // pwrite(2) of buffer.size() bytes at `offset` (-1: at the file position). A
  // short write is reported, not retried. An empty buffer completes at once
  // with 0 bytes. The buffer comes back with the result.
  [[nodiscard]] detail::BufferOp write(Buffer buffer, std::int64_t offset = -1,
                                       CancelToken* token = nullptr) noexcept {
    return detail::BufferOp(handle_, detail::OpCode::write, std::move(buffer), offset, 0, 0, token);
  }
  // fsync(2) and fdatasync(2) through the backend; never block the thread.
  [[nodiscard]] detail::VoidOp fsync(CancelToken* token = nullptr) noexcept {
    return detail::VoidOp(handle_, detail::OpCode::fsync, 0, token);
  }
  [[nodiscard]] detail::VoidOp fdatasync(CancelToken* token = nullptr) noexcept {
    return detail::VoidOp(handle_, detail::OpCode::fdatasync, 0, token);
  }
  // statx(2) of the open file (AT_EMPTY_PATH) through the backend.
  [[nodiscard]] detail::StatOp stat(CancelToken* token = nullptr) noexcept {
    return detail::StatOp(handle_, token);
  }

  // Cancels the operations in flight on the File, then close(2) through the
  // backend. The File is closed from the call on, whatever the result (which
  // is close(2)'s: EIO from a network file system, say); bad_file_descriptor
  // if it already was. Never blocks the thread.
  Task<Result<void>> close() { return handle_.close(); }

  // The descriptor, still owned by the File; -1 when closed. Never blocks.
  int fd() const noexcept { return handle_.fd(); }
  bool is_open() const noexcept { return handle_.fd() >= 0; }
  // Gives the descriptor up to the caller, who then closes it; the File is
  // closed from then on. Operations already in flight go on, untouched by
  // what later happens to the File. Returns -1 when the File was closed.
  // Never blocks.
  int release() noexcept { return handle_.release(); }

 private:
  detail::FdHandle handle_;
};

}  // namespace ringpark
