// Awaitable operations of the C++ API: `co_await ringpark::recv(rt, fd, buf)`.
//
// Every operation:
// - is prepared when awaited and goes to the kernel with everything else
//   prepared in the same turn, in one submission (io_uring) or as a
//   non-blocking syscall after readiness (the epoll fallback);
// - suspends the awaiting task, which resumes on the owner thread, from the
//   executor, once the operation has completed;
// - reports errors as a std::error_code of std::generic_category() built from
//   the negative errno of the completion (std::errc::operation_canceled for a
//   cancelled one), never by throwing;
// - lives, with its Op, inside the awaiting coroutine's frame: the Op is pinned
//   there until its final completion, which is why a suspended task can only be
//   ended by its Runtime (see ~Runtime);
// - takes a buffer by value and gives it back with the result, so no memory
//   the kernel may write into belongs to anyone else while it is in flight;
// - accepts an optional CancelToken (see below).
// Owner thread only, like everything but post().
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <system_error>
#include <vector>

#include "ringpark/op.hpp"
#include "ringpark/runtime.hpp"

namespace ringpark {

// What an operation yields. `value` is meaningful only without `error`.
template <class T>
struct Result {
  T value{};
  std::error_code error;
  explicit operator bool() const noexcept { return !error; }
};

template <>
struct Result<void> {
  std::error_code error;
  explicit operator bool() const noexcept { return !error; }
};

// The memory of a read, write, recv or send. Owned by the operation while it is
// in flight and handed back with the result.
using Buffer = std::vector<char>;

// The result of an operation that took a Buffer: how many bytes moved, and the
// buffer itself, whole (its size is not changed; the first `bytes` bytes are
// the ones read or written), whether the operation succeeded or not.
struct BufferResult {
  std::size_t bytes = 0;
  Buffer buffer;
  std::error_code error;
  explicit operator bool() const noexcept { return !error; }
};

class CancelToken;

namespace detail {

// The state every operation awaitable shares: the pinned Op and the link to a
// CancelToken. Out-of-line parts are in runtime.cpp.
class OpAwaitable {
 public:
  OpAwaitable(const OpAwaitable&) = delete;
  OpAwaitable& operator=(const OpAwaitable&) = delete;

  // True, and the operation not started, when its token is already cancelled
  // or its arguments were refused; the result then says why.
  bool await_ready() noexcept;
  // Submits the op; the awaiter resumes from the executor after its completion.
  void await_suspend(std::coroutine_handle<> awaiter) noexcept;

 protected:
  OpAwaitable(Runtime& runtime, CancelToken* token) noexcept;
  // Aborts, naming the op, if the kernel may still write into it: a broken
  // invariant, since only ~Runtime ends a suspended task and it reaps first.
  ~OpAwaitable();

  // The completion's result (negative errno) as an error_code; none for >= 0.
  std::error_code error() const noexcept;
  // Refuses the operation before it starts: it completes at once with
  // `negative_errno`.
  void refuse(int negative_errno) noexcept {
    res_ = negative_errno;
    refused_ = true;
  }

  RuntimeImpl* runtime_;
  Op op_;
  int res_ = 0;  // the completion's result
  bool refused_ = false;

 private:
  friend class ringpark::CancelToken;
  static void on_complete(Op* op, int res, std::uint32_t flags) noexcept;
  void link(CancelToken* token) noexcept;
  void unlink() noexcept;

  std::coroutine_handle<> awaiter_;
  bool in_flight_ = false;  // submitted and not yet finally completed
  CancelToken* token_;      // the token this op is linked to, or null
  OpAwaitable* token_prev_ = nullptr;
  OpAwaitable* token_next_ = nullptr;
};

class NopAwaitable final : public OpAwaitable {
 public:
  NopAwaitable(Runtime& runtime, CancelToken* token) noexcept;
  Result<void> await_resume() const noexcept { return {error()}; }
};

class TimeoutAwaitable final : public OpAwaitable {
 public:
  TimeoutAwaitable(Runtime& runtime, std::chrono::nanoseconds duration,
                   CancelToken* token) noexcept;
  Result<void> await_resume() const noexcept;
};

class PollAwaitable final : public OpAwaitable {
 public:
  PollAwaitable(Runtime& runtime, int fd, unsigned events, CancelToken* token) noexcept;
  Result<unsigned> await_resume() const noexcept;
};

// read, write, recv and send: the buffer lives here while the op is in flight.
class BufferAwaitable final : public OpAwaitable {
 public:
  BufferAwaitable(Runtime& runtime, OpCode code, int fd, Buffer buffer, std::int64_t offset,
                  int flags, CancelToken* token) noexcept;
  BufferResult await_resume() noexcept;

 private:
  Buffer buffer_;  // op_.buf points into it until the final completion
};

class AcceptAwaitable final : public OpAwaitable {
 public:
  AcceptAwaitable(Runtime& runtime, int fd, CancelToken* token) noexcept;
  Result<int> await_resume() const noexcept;
};

class ConnectAwaitable final : public OpAwaitable {
 public:
  ConnectAwaitable(Runtime& runtime, int fd, const sockaddr* addr, socklen_t addrlen,
                   CancelToken* token) noexcept;
  Result<void> await_resume() const noexcept { return {error()}; }

 private:
  // The kernel reads the address while the connect is in flight (io_uring may
  // do so from a worker long after submission): a copy kept in the pinned
  // awaitable, not the caller's pointer.
  sockaddr_storage addr_{};
};

class CloseAwaitable final : public OpAwaitable {
 public:
  CloseAwaitable(Runtime& runtime, int fd, CancelToken* token) noexcept;
  Result<void> await_resume() const noexcept { return {error()}; }
};

}  // namespace detail

// Cancels the operations that were started with it. Pass the same token to any
// number of operations; cancel() asks the backend to end every one of them that
// is still in flight (each then completes with std::errc::operation_canceled,
// or with its real result if it finished first), and every operation awaited
// with the token afterwards completes at once with operation_canceled, without
// starting, until reset(). Cancel is a request: buffers come back with the
// result, as always. Owner thread only (post() a cancel from elsewhere). The
// token may be destroyed before the operations that use it end.
class CancelToken {
 public:
  CancelToken() noexcept = default;
  CancelToken(const CancelToken&) = delete;
  CancelToken& operator=(const CancelToken&) = delete;
  ~CancelToken();

  // Never blocks; never completes anything inside the call (the completions run
  // from the executor later).
  void cancel() noexcept;
  bool cancelled() const noexcept { return cancelled_; }
  // Lets operations awaited from now on start again.
  void reset() noexcept { cancelled_ = false; }

 private:
  friend class detail::OpAwaitable;
  detail::OpAwaitable* head_ = nullptr;  // operations in flight with this token
  bool cancelled_ = false;
};

// Each function below returns an awaitable to co_await at once from a task on
// `runtime`'s owner thread; none blocks. Descriptors are plain ints that the
// caller owns (close() closes one through the ring).

// Completes with no effect: a round trip through the backend.
inline detail::NopAwaitable nop(Runtime& runtime, CancelToken* token = nullptr) noexcept {
  return {runtime, token};
}

// An io_uring timeout op (a timer in the fallback driver): success once
// `duration` has passed, operation_canceled when cancelled first.
inline detail::TimeoutAwaitable timeout(Runtime& runtime, std::chrono::nanoseconds duration,
                                        CancelToken* token = nullptr) noexcept {
  return {runtime, duration, token};
}

// One-shot readiness of `fd` for `events` (POLLIN, POLLOUT, ... from <poll.h>);
// the value is the revents that fired.
inline detail::PollAwaitable poll(Runtime& runtime, int fd, unsigned events,
                                  CancelToken* token = nullptr) noexcept {
  return {runtime, fd, events, token};
}

// pread(2) of up to buffer.size() bytes at `offset` (-1: at the file position).
// bytes == 0 with no error is the end of the file.
inline detail::BufferAwaitable read(Runtime& runtime, int fd, Buffer buffer, std::int64_t offset,
                                    CancelToken* token = nullptr) noexcept {
  return {runtime, detail::OpCode::read, fd, std::move(buffer), offset, 0, token};
}

// pwrite(2) of buffer.size() bytes at `offset` (-1: at the file position). A
// short write is reported, not retried.
inline detail::BufferAwaitable write(Runtime& runtime, int fd, Buffer buffer, std::int64_t offset,
                                     CancelToken* token = nullptr) noexcept {
  return {runtime, detail::OpCode::write, fd, std::move(buffer), offset, 0, token};
}

// recv(2) of up to buffer.size() bytes. bytes == 0 with no error: the peer
// closed its side.
inline detail::BufferAwaitable recv(Runtime& runtime, int fd, Buffer buffer, int flags = 0,
                                    CancelToken* token = nullptr) noexcept {
  return {runtime, detail::OpCode::recv, fd, std::move(buffer), -1, flags, token};
}

// send(2) of buffer.size() bytes, always with MSG_NOSIGNAL (a closed peer is
// the error EPIPE, not a signal). A short send is reported, not retried.
inline detail::BufferAwaitable send(Runtime& runtime, int fd, Buffer buffer, int flags = 0,
                                    CancelToken* token = nullptr) noexcept {
  return {runtime, detail::OpCode::send, fd, std::move(buffer), -1, flags, token};
}

// accept4(2) on a listening socket; the value is the new connection's fd,
// close-on-exec, owned by the caller.
inline detail::AcceptAwaitable accept(Runtime& runtime, int fd,
                                      CancelToken* token = nullptr) noexcept {
  return {runtime, fd, token};
}

// connect(2) of socket `fd` to `addr`, which is copied (the caller's may go
// away at once). invalid_argument, without starting, for an address larger
// than sockaddr_storage.
inline detail::ConnectAwaitable connect(Runtime& runtime, int fd, const sockaddr* addr,
                                        socklen_t addrlen, CancelToken* token = nullptr) noexcept {
  return {runtime, fd, addr, addrlen, token};
}

// close(2) through the backend. Operations still in flight on `fd` are not
// ended by it; cancel them first.
inline detail::CloseAwaitable close(Runtime& runtime, int fd,
                                    CancelToken* token = nullptr) noexcept {
  return {runtime, fd, token};
}

}  // namespace ringpark
