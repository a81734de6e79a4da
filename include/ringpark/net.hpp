// TCP with awaitable operations: TcpListener and TcpStream.
//
//   auto listener = ringpark::TcpListener::bind(rt, "127.0.0.1", 0);
//   ringpark::Result<ringpark::TcpStream> conn = co_await listener.value.accept();
//   ringpark::BufferResult r = co_await conn.value.recv(std::move(buffer));
//   co_await conn.value.send_all(std::move(reply));
//
// The rules every handle follows (ownership, errors, close(), what the
// destructor does, moving while an operation is in flight) are at the top of
// ringpark/file.hpp. Sockets are created close-on-exec and blocking: the
// backends never block on them (io_uring polls, the fallback uses
// MSG_DONTWAIT), and a descriptor given away with release() behaves as an
// ordinary socket.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <system_error>

#include "ringpark/file.hpp"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"

namespace ringpark {

// An IPv4 or IPv6 socket address, by value.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;  // 0: no address

  // A copy of `addr`; invalid_argument for null or for a length of 0 or above
  // sizeof(sockaddr_storage). Never blocks.
  static Result<SocketAddress> from(const sockaddr* addr, socklen_t length) noexcept;
  // A numeric IPv4 ("127.0.0.1") or IPv6 ("::1") address and a port in host
  // byte order; no name lookup, so never blocks; invalid_argument otherwise.
  static Result<SocketAddress> parse(const std::string& host, std::uint16_t port) noexcept;

  // The address to pass to a socket call, with `length`; never blocks.
  const sockaddr* get() const noexcept { return reinterpret_cast<const sockaddr*>(&storage); }
  // AF_INET, AF_INET6, or AF_UNSPEC (0) for no address.
  int family() const noexcept { return storage.ss_family; }
  // The port in host byte order; 0 for an address that is not IPv4 or IPv6.
  std::uint16_t port() const noexcept;
  // "127.0.0.1:8080" or "[::1]:8080"; "" for anything else. Throws std::bad_alloc.
  std::string to_string() const;
};

class TcpStream;

class TcpListener {
 public:
  // An empty handle: every operation completes with EBADF.
  TcpListener() noexcept = default;
  // Adopts a listening socket, which the TcpListener then owns.
  TcpListener(Runtime& runtime, int fd) noexcept : handle_(runtime, fd) {}
  // Move and destroy as File's (see ringpark/file.hpp): the accepts in
  // flight follow the listener; the destructor ::closes an unclosed socket.
  TcpListener(TcpListener&&) noexcept = default;
  TcpListener& operator=(TcpListener&&) noexcept = default;
  ~TcpListener() = default;

  // socket(2), SO_REUSEADDR (as libuv sets it, so that a restarted server can
  // bind at once), bind(2) and listen(2), made synchronously: none of them
  // blocks. Errors (EADDRINUSE, EACCES, invalid_argument for a bad address)
  // are in the result, with no socket left open. The address is only read
  // during the call. Owner thread.
  static Result<TcpListener> bind(Runtime& runtime, const sockaddr* addr, socklen_t addrlen,
                                  int backlog = 128);
  // The same for a numeric IPv4 or IPv6 host (no name lookup) and a port in
  // host byte order; port 0 picks a free one (see local_port()).
  static Result<TcpListener> bind(Runtime& runtime, const std::string& host, std::uint16_t port,
                                  int backlog = 128);

  // The port bound, in host byte order (getsockname(2)); 0 when closed.
  // Never blocks.
  std::uint16_t local_port() const noexcept;
  // getsockname(2). Never blocks; errors in the result.
  Result<SocketAddress> local_address() const noexcept;

  // accept4(2) of one connection (OpCode::accept, one per call), close-on-exec.
  // The new TcpStream belongs to the caller. Several accepts may be in flight
  // on one listener, each gets its own connection. operation_canceled when
  // `token` is cancelled first; if the connection was already taken by then it
  // is handed out all the same (or closed, never leaked, when the task is
  // destroyed with its Runtime). Never blocks the thread. The listener must
  // stay in place (not moved, not destroyed) until the task ends.
  Task<Result<TcpStream>> accept(CancelToken* token = nullptr);

  // Cancels the accepts in flight, then close(2) through the backend; see
  // File::close(). Never blocks the thread.
  Task<Result<void>> close() { return handle_.close(); }

  // The descriptor, still owned by the handle (-1 when closed), and whether
  // there is one. Never block.
  int fd() const noexcept { return handle_.fd(); }
  bool is_open() const noexcept { return handle_.fd() >= 0; }
  // Gives the descriptor up to the caller; see File::release().
  int release() noexcept { return handle_.release(); }

 private:
  detail::FdHandle handle_;
};

class TcpStream {
 public:
  // An empty handle: every operation completes with EBADF.
  TcpStream() noexcept = default;
  // Adopts a connected stream socket, which the TcpStream then owns.
  TcpStream(Runtime& runtime, int fd) noexcept : handle_(runtime, fd) {}
  // Move and destroy as File's (see ringpark/file.hpp): the recvs and sends
  // in flight follow the stream; the destructor ::closes an unclosed socket.
  TcpStream(TcpStream&&) noexcept = default;
  TcpStream& operator=(TcpStream&&) noexcept = default;
  ~TcpStream() = default;

  // A new socket connected to `addr` through the backend (connect(2) never
  // blocks the thread). The address is copied during the call, so the
  // caller's may go at once, before the task even starts. Errors
  // (ECONNREFUSED, ETIMEDOUT, operation_canceled, invalid_argument for a bad
  // address) are in the result, with no socket left open.
  static Task<Result<TcpStream>> connect(Runtime& runtime, const sockaddr* addr, socklen_t addrlen,
                                         CancelToken* token = nullptr);
  // The same for a numeric IPv4 or IPv6 host (no name lookup) and a port in
  // host byte order.
  static Task<Result<TcpStream>> connect(Runtime& runtime, const std::string& host,
                                         std::uint16_t port, CancelToken* token = nullptr);

  // recv(2) of up to buffer.size() bytes. bytes == 0 with no error: the peer
  // shut its side down (end of stream). An empty buffer is refused with
  // invalid_argument, since its 0 bytes would read as the end of the stream.
  // The buffer comes back with the result, whatever happened (its size is not
  // changed: the first `bytes` bytes are the ones received).
  [[nodiscard]] detail::BufferOp recv(Buffer buffer, CancelToken* token = nullptr) noexcept {
    return detail::BufferOp(handle_, detail::OpCode::recv, std::move(buffer), -1, 0, 0, token);
  }
  // One send(2) of buffer.size() bytes, with MSG_NOSIGNAL (a peer gone is
  // EPIPE or ECONNRESET, never SIGPIPE). It may send only part: bytes says how
  // much. An empty buffer completes at once with 0 bytes. The buffer comes back
  // with the result.
  [[nodiscard]] detail::BufferOp send(Buffer buffer, CancelToken* token = nullptr) noexcept {
    return detail::BufferOp(handle_, detail::OpCode::send, std::move(buffer), -1, 0, 0, token);
  }
  // Sends all of `buffer`, issuing sends until every byte went or one failed;
  // bytes is how many went (buffer.size() on success) and the buffer comes
  // back whole. On an error or a cancel the bytes before it were sent. The
  // stream must stay in place until the task ends. Never blocks the thread.
  Task<BufferResult> send_all(Buffer buffer, CancelToken* token = nullptr);
  // shutdown(2) through the backend; SHUT_WR sends the end of stream (the peer's
  // recv then returns 0 bytes) and leaves receiving open.
  [[nodiscard]] detail::VoidOp shutdown(int how = SHUT_WR, CancelToken* token = nullptr) noexcept {
    return detail::VoidOp(handle_, detail::OpCode::shutdown, how, token);
  }

  // Cancels the recvs and sends in flight on the stream, then close(2) through
  // the backend; see File::close(). Never blocks the thread.
  Task<Result<void>> close() { return handle_.close(); }

  // TCP_NODELAY on or off (setsockopt(2), synchronous, never blocks); the
  // errno as an error_code, none on success.
  std::error_code set_nodelay(bool on) noexcept;
  // getpeername(2) and getsockname(2). Never block; errors in the result.
  Result<SocketAddress> peer_address() const noexcept;
  Result<SocketAddress> local_address() const noexcept;

  // The descriptor, still owned by the handle (-1 when closed), and whether
  // there is one. Never block.
  int fd() const noexcept { return handle_.fd(); }
  bool is_open() const noexcept { return handle_.fd() >= 0; }
  // Gives the descriptor up to the caller; see File::release().
  int release() noexcept { return handle_.release(); }

 private:
  static Task<Result<TcpStream>> connect_to(Runtime& runtime, Result<SocketAddress> addr,
                                            CancelToken* token);

  detail::FdHandle handle_;
};

}  // namespace ringpark
