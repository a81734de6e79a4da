// TcpListener, TcpStream and SocketAddress, on the handle machinery of
// runtime/cpp/file.cpp. Socket setup (socket, setsockopt, bind, listen, the
// get*name calls) never blocks, so it is made synchronously; accept, connect,
// recv, send, shutdown and close go through the backend.
#include "ringpark/net.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace ringpark {
namespace detail {

namespace {

std::error_code errno_error() noexcept { return std::error_code(errno, std::generic_category()); }

std::error_code invalid() noexcept { return std::make_error_code(std::errc::invalid_argument); }

// accept4(2) of one connection. A connection the kernel handed over but that
// nobody took (the task was destroyed with its Runtime between the completion
// and the resumption) is closed here rather than leaked.
class AcceptOp final : public HandleOp {
 public:
  AcceptOp(FdHandle& listener, CancelToken* token) noexcept : HandleOp(listener, token) {
    if (Op* o = op()) {
      o->code = OpCode::accept;
      o->flags = SOCK_CLOEXEC;
    }
  }
  ~AcceptOp() {
    // peek_result() is -EINPROGRESS for an op still in flight, which only a
    // broken invariant allows (~OpSlot then aborts), so nothing is closed then.
    if (submitted() && !taken_ && peek_result() >= 0) ::close(peek_result());
  }
  Result<int> await_resume() noexcept {
    taken_ = true;
    const int res = take_result();
    return {res >= 0 ? res : -1, to_error(res)};
  }

 private:
  bool taken_ = false;
};

// connect(2) of a handle's socket. The kernel reads the address while the op is
// in flight (io_uring may do so from a worker, long after submission), so it is
// a copy kept in this pinned awaitable.
class ConnectOp final : public HandleOp {
 public:
  ConnectOp(FdHandle& stream, const SocketAddress& addr, CancelToken* token) noexcept
      : HandleOp(stream, token), addr_(addr) {
    if (Op* o = op()) {
      o->code = OpCode::connect;
      o->addr = reinterpret_cast<sockaddr*>(&addr_.storage);  // alive in this awaitable
      o->len = addr_.length;
    }
  }
  Result<void> await_resume() noexcept { return {to_error(take_result())}; }

 private:
  SocketAddress addr_;
};

Result<SocketAddress> name_of(int fd, bool peer) noexcept {
  if (fd < 0) return {SocketAddress{}, std::make_error_code(std::errc::bad_file_descriptor)};
  SocketAddress a;
  a.length = sizeof a.storage;
  auto* sa = reinterpret_cast<sockaddr*>(&a.storage);
  const int rc = peer ? ::getpeername(fd, sa, &a.length) : ::getsockname(fd, sa, &a.length);
  if (rc != 0) return {SocketAddress{}, errno_error()};
  return {a, {}};
}

}  // namespace
}  // namespace detail

// ---- SocketAddress ---------------------------------------------------------------

Result<SocketAddress> SocketAddress::from(const sockaddr* addr, socklen_t length) noexcept {
  SocketAddress a;
  if (addr == nullptr || length == 0 || length > sizeof a.storage) {
    return {a, detail::invalid()};
  }
  std::memcpy(&a.storage, addr, length);
  a.length = length;
  return {a, {}};
}

Result<SocketAddress> SocketAddress::parse(const std::string& host, std::uint16_t port) noexcept {
  SocketAddress a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.storage);
  if (::inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    a.length = sizeof *v4;
    return {a, {}};
  }
  a = SocketAddress{};
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
  if (::inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    a.length = sizeof *v6;
    return {a, {}};
  }
  return {SocketAddress{}, detail::invalid()};
}

std::uint16_t SocketAddress::port() const noexcept {
  if (family() == AF_INET && length >= sizeof(sockaddr_in)) {
    return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  }
  if (family() == AF_INET6 && length >= sizeof(sockaddr_in6)) {
    return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  }
  return 0;
}

std::string SocketAddress::to_string() const {
  char text[INET6_ADDRSTRLEN] = {};
  if (family() == AF_INET && length >= sizeof(sockaddr_in)) {
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, text,
                sizeof text);
    return std::string(text) + ":" + std::to_string(port());
  }
  if (family() == AF_INET6 && length >= sizeof(sockaddr_in6)) {
    ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, text,
                sizeof text);
    // Appended piece by piece: GCC 12 at -O3 warns (-Wrestrict, wrongly) on
    // "[" + std::string(...).
    std::string out = "[";
    out += text;
    out += "]:";
    out += std::to_string(port());
    return out;
  }
  return "";
}

// ---- TcpListener -----------------------------------------------------------------

Result<TcpListener> TcpListener::bind(Runtime& runtime, const sockaddr* addr, socklen_t addrlen,
                                      int backlog) {
  Result<SocketAddress> a = SocketAddress::from(addr, addrlen);
  if (!a) return {TcpListener(), a.error};
  const int fd = ::socket(a.value.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return {TcpListener(), detail::errno_error()};
  TcpListener listener(runtime, fd);  // closes the socket on the error paths
  const int one = 1;
  if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      ::bind(fd, a.value.get(), a.value.length) != 0 || ::listen(fd, backlog) != 0) {
    // errno is read before `listener` closes the socket.
    return {TcpListener(), detail::errno_error()};
  }
  return {std::move(listener), {}};
}

Result<TcpListener> TcpListener::bind(Runtime& runtime, const std::string& host, std::uint16_t port,
                                      int backlog) {
  Result<SocketAddress> a = SocketAddress::parse(host, port);
  if (!a) return {TcpListener(), a.error};
  return bind(runtime, a.value.get(), a.value.length, backlog);
}

std::uint16_t TcpListener::local_port() const noexcept {
  Result<SocketAddress> a = local_address();
  return a ? a.value.port() : 0;
}

Result<SocketAddress> TcpListener::local_address() const noexcept {
  return detail::name_of(handle_.fd(), /*peer=*/false);
}

Task<Result<TcpStream>> TcpListener::accept(CancelToken* token) {
  // Read before suspending; nothing of *this is used after the accept.
  Runtime* runtime = handle_.runtime();
  Result<int> conn = co_await detail::AcceptOp(handle_, token);
  if (!conn) co_return Result<TcpStream>{TcpStream(), conn.error};
  co_return Result<TcpStream>{TcpStream(*runtime, conn.value), {}};
}

// ---- TcpStream -------------------------------------------------------------------

Task<Result<TcpStream>> TcpStream::connect(Runtime& runtime, const sockaddr* addr,
                                           socklen_t addrlen, CancelToken* token) {
  // Copied now: the task is lazy and the caller's address may be gone when it runs.
  return connect_to(runtime, SocketAddress::from(addr, addrlen), token);
}

Task<Result<TcpStream>> TcpStream::connect(Runtime& runtime, const std::string& host,
                                           std::uint16_t port, CancelToken* token) {
  return connect_to(runtime, SocketAddress::parse(host, port), token);
}

Task<Result<TcpStream>> TcpStream::connect_to(Runtime& runtime, Result<SocketAddress> addr,
                                              CancelToken* token) {
  if (!addr) co_return Result<TcpStream>{TcpStream(), addr.error};
  const int fd = ::socket(addr.value.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) co_return Result<TcpStream>{TcpStream(), detail::errno_error()};
  // Owned from here: the socket is closed on failure, and if the task is
  // destroyed with its Runtime while connecting.
  TcpStream stream(runtime, fd);
  Result<void> connected = co_await detail::ConnectOp(stream.handle_, addr.value, token);
  if (!connected) co_return Result<TcpStream>{TcpStream(), connected.error};
  co_return Result<TcpStream>{std::move(stream), {}};
}

Task<BufferResult> TcpStream::send_all(Buffer buffer, CancelToken* token) {
  const std::size_t total = buffer.size();
  std::size_t sent = 0;
  // At least one send, even of an empty buffer: on a closed stream it says EBADF.
  do {
    BufferResult r = co_await detail::BufferOp(handle_, detail::OpCode::send, std::move(buffer), -1,
                                               0, sent, token);
    buffer = std::move(r.buffer);
    sent += r.bytes;
    if (!r) co_return BufferResult{sent, std::move(buffer), r.error};
    if (r.bytes == 0 && sent < total) {
      // A stream socket never sends nothing without an error; do not spin if
      // something else behind the descriptor does.
      co_return BufferResult{sent, std::move(buffer), std::make_error_code(std::errc::io_error)};
    }
  } while (sent < total);
  co_return BufferResult{sent, std::move(buffer), {}};
}

std::error_code TcpStream::set_nodelay(bool on) noexcept {
  if (handle_.fd() < 0) return std::make_error_code(std::errc::bad_file_descriptor);
  const int value = on ? 1 : 0;
  if (::setsockopt(handle_.fd(), IPPROTO_TCP, TCP_NODELAY, &value, sizeof value) != 0) {
    return detail::errno_error();
  }
  return {};
}

Result<SocketAddress> TcpStream::peer_address() const noexcept {
  return detail::name_of(handle_.fd(), /*peer=*/true);
}

Result<SocketAddress> TcpStream::local_address() const noexcept {
  return detail::name_of(handle_.fd(), /*peer=*/false);
}

}  // namespace ringpark
