// Helpers of the datagram tests (the engine's, tests/stream/dgram_test.cpp,
// and the adopted uv_udp_t's, tests/udp/): loopback sockets, datagram bytes
// that say which datagram they are, and the kernel's drop counters, so that a
// test can tell a datagram the kernel dropped (a full receive buffer, the only
// loss loopback UDP has) from one lost inside ringpark. Header-only, test code
// only.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

namespace ringpark::test::udp {

constexpr std::size_t kMaxIpv4Payload = 65507;
constexpr std::size_t kMaxIpv6Payload = 65527;

// The loopback address of `family` with `port`.
inline sockaddr_storage loopback_addr(int family, int port, socklen_t* len) {
  sockaddr_storage ss{};
  if (family == AF_INET) {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = htons(static_cast<std::uint16_t>(port));
    *len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_loopback;
    a->sin6_port = htons(static_cast<std::uint16_t>(port));
    *len = sizeof *a;
  }
  return ss;
}

// A UDP socket bound to the loopback of `family` on a kernel-chosen port,
// non-blocking when asked; its address in *addr. -1 if the family is not
// available here. Its receive buffer is 4 MiB (where the limit allows):
// loopback drops only when that overflows.
inline int bound_socket(int family, sockaddr_storage* addr, socklen_t* len, bool nonblock = true) {
  int fd = ::socket(family, SOCK_DGRAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
  if (fd < 0) return -1;
  *addr = loopback_addr(family, 0, len);
  if (::bind(fd, reinterpret_cast<sockaddr*>(addr), *len) < 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(addr), len) < 0) {
    ::close(fd);
    return -1;
  }
  const int size = 4 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  return fd;
}

inline int port_of(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
}

// Whether two addresses name the same family, address and port.
inline bool same_address(const sockaddr* a, const sockaddr_storage& b) {
  if (a == nullptr || a->sa_family != b.ss_family) return false;
  if (a->sa_family == AF_INET) {
    auto* x = reinterpret_cast<const sockaddr_in*>(a);
    auto* y = reinterpret_cast<const sockaddr_in*>(&b);
    return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
  }
  if (a->sa_family == AF_INET6) {
    auto* x = reinterpret_cast<const sockaddr_in6*>(a);
    auto* y = reinterpret_cast<const sockaddr_in6*>(&b);
    return x->sin6_port == y->sin6_port &&
           std::memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
  }
  return false;
}

// Bytes that say which datagram they belong to: a sequence number, then a
// pattern of it, so that a wrong, cut, repeated or reordered datagram shows.
inline std::string datagram_bytes(std::uint32_t seq, std::size_t size) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) s[i] = static_cast<char>((seq * 131 + i * 7) & 0xff);
  if (size >= 4) std::memcpy(s.data(), &seq, 4);
  return s;
}

inline std::uint32_t seq_of(const char* p, std::size_t n) {
  std::uint32_t seq = 0;
  if (n >= 4) std::memcpy(&seq, p, 4);
  return seq;
}

// Whether [p, p + n) are exactly the bytes of some datagram (its number is the
// first 4 bytes) of `size` bytes.
inline bool is_datagram(const char* p, std::size_t n, std::size_t size) {
  if (n != size) return false;
  const std::string want = datagram_bytes(seq_of(p, n), size);
  return std::memcmp(p, want.data(), n) == 0;
}

// The drops the kernel counted for the socket `fd` (the `drops` column of
// /proc/net/udp or udp6, found by the socket's inode); -1 if not found.
inline long socket_drops(int fd, int family) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return -1;
  std::ifstream in(family == AF_INET6 ? "/proc/net/udp6" : "/proc/net/udp");
  std::string line;
  std::getline(in, line);  // the header
  while (std::getline(in, line)) {
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
    std::istringstream f(line);
    std::string field[13];
    for (auto& x : field) f >> x;
    if (std::to_string(st.st_ino) == field[9]) return std::stol(field[12]);
  }
  return -1;
}

// The system's Udp RcvbufErrors (/proc/net/snmp): datagrams any socket of this
// network namespace dropped for a full receive buffer.
inline long udp_rcvbuf_errors() {
  std::ifstream in("/proc/net/snmp");
  std::string names, values;
  while (std::getline(in, names)) {
    if (names.rfind("Udp:", 0) != 0) continue;
    std::getline(in, values);
    std::istringstream n(names), v(values);
    std::string name, value;
    while (n >> name && v >> value) {
      if (name == "RcvbufErrors") return std::stol(value);
    }
  }
  return -1;
}

}  // namespace ringpark::test::udp
