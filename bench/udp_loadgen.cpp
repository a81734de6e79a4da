// udp_loadgen: the UDP request/response load generator of the datagram
// benchmark (issue 10).
//
// N clients, each a UDP socket connected to 127.0.0.1:PORT, each keeping K
// requests of S bytes in flight; the server must send every request back byte
// for byte (an echo), and every reply is checked against the request it
// answers. One thread, level-triggered epoll, recvmmsg per readable client, so
// that on a shared core it takes as little of the core as it can from the
// server it measures.
//
//   udp_loadgen --port P [--clients N] [--depth K] [--size S] [--seconds T]
//               [--warmup W] [--timeout-ms M] [--server-pid PID] [--per-client]
//               [--perf-ctl FIFO --perf-ack FIFO]
//
// A request carries its client, its slot (0..K-1) and a sequence number in its
// first 16 bytes, then bytes that depend on all three (S >= 16). A reply must
// have the length of the request, come from the server's address (the socket
// is connected) and match the request of that slot byte for byte; anything
// else is a mismatch and fails the run. UDP may drop: a request unanswered
// after M ms (default 200) counts as lost and its slot sends a new one; a reply
// that comes after that counts as late and is ignored.
//
// Phases: warm-up (W seconds, default 0.5), then the measured window (T
// seconds, default 3), both bounded in time. Only the window counts: replies
// checked in it, and their round-trip latency.
//
// With --server-pid, the server's CPU time (utime + stime of /proc/PID/stat)
// is sampled at the window's edges: datagrams answered per second of server
// CPU. With --per-client, each client's replies in the window are printed too.
// With --perf-ctl/--perf-ack (the FIFOs of `perf stat --delay=-1
// --control=fifo:CTL,ACK`), perf's counters are enabled for exactly the
// window, as bench/loadgen does.
//
// Prints one line of key=value pairs on stdout (per-client figures: the
// minimum, median and maximum of the clients' replies per second). Exits 0, or
// 1 on a mismatch, a socket error or a window without a reply; 2 on bad
// arguments.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "loadgen_util.hpp"

namespace {

using loadgen_util::fail;
using loadgen_util::Histogram;
using loadgen_util::mix64;
using loadgen_util::now_ns;
using loadgen_util::perf_command;
using loadgen_util::process_cpu_seconds;
using loadgen_util::server_cpu_seconds;

struct Options {
  int port = 0;
  int clients = 64;
  int depth = 1;
  int size = 64;
  double seconds = 3.0;
  double warmup = 0.5;
  int timeout_ms = 200;
  long server_pid = 0;
  bool per_client = false;
  std::string perf_ctl;
  std::string perf_ack;
};


struct Header {
  uint32_t client;
  uint32_t slot;
  uint64_t seq;
};
static_assert(sizeof(Header) == 16);

// Request `seq` of slot `slot` of client `client`: the header, then words that
// differ with all three and with the position, so a reply of another request,
// or a cut, changed or repeated one, is caught.
void fill_request(unsigned char* out, size_t size, uint32_t client, uint32_t slot, uint64_t seq) {
  const Header h{client, slot, seq};
  std::memcpy(out, &h, sizeof h);
  uint64_t base = mix64((static_cast<uint64_t>(client) << 40) ^ (uint64_t{slot} << 32) ^ seq);
  size_t i = sizeof h;
  for (uint64_t w = 0; i + 8 <= size; i += 8, ++w) {
    uint64_t v = base ^ (w * 0xD6E8FEB86659FD93ull);
    std::memcpy(out + i, &v, 8);
  }
  if (i < size) {
    uint64_t v = base ^ 0xA5A5A5A5A5A5A5A5ull;
    std::memcpy(out + i, &v, size - i);
  }
}

struct Slot {
  uint64_t seq = 0;      // the request in flight
  uint64_t sent_ns = 0;  // when it was sent
};

struct Client {
  int fd = -1;
  uint32_t id = 0;
  uint64_t next_seq = 0;
  std::vector<Slot> slots;
  uint64_t replies = 0;  // checked replies, all phases
  uint64_t window_start_replies = 0;
};

class UdpLoadGen {
 public:
  explicit UdpLoadGen(const Options& o)
      : o_(o), rbufs_(kBatch * static_cast<size_t>(kMaxDatagram)), expect_(kMaxDatagram) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) fail("epoll_create1: %s", std::strerror(errno));
    clients_.resize(static_cast<size_t>(o.clients));
    events_.resize(static_cast<size_t>(std::min(o.clients, 1024)));
    out_.resize(static_cast<size_t>(o.size));
  }
  int run();

 private:
  static constexpr size_t kBatch = 32;  // datagrams per recvmmsg
  static constexpr int kMaxDatagram = 65536;

  void open_client(Client& c, uint32_t id);
  void send_request(Client& c, size_t slot, uint64_t now);
  void on_readable(Client& c);
  void expire(uint64_t now);
  void poll_once(int timeout_ms);

  const Options& o_;
  int epfd_ = -1;
  std::vector<Client> clients_;
  std::vector<epoll_event> events_;
  std::vector<unsigned char> rbufs_;
  std::vector<unsigned char> expect_;
  std::vector<unsigned char> out_;
  bool measuring_ = false;
  Histogram hist_;
  uint64_t replies_ = 0, lost_ = 0, late_ = 0, window_lost_ = 0, window_late_ = 0;
  uint64_t last_expire_ = 0;
};

void UdpLoadGen::open_client(Client& c, uint32_t id) {
  c.id = id;
  c.slots.assign(static_cast<size_t>(o_.depth), Slot{});
  c.fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c.fd < 0) fail("socket: %s", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(o_.port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  // Connected: the kernel hands this socket only the server's datagrams.
  if (connect(c.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    fail("connect to 127.0.0.1:%d (client %u): %s", o_.port, id, std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &c;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, c.fd, &ev) != 0) fail("epoll_ctl: %s", std::strerror(errno));
}

void UdpLoadGen::send_request(Client& c, size_t slot, uint64_t now) {
  Slot& s = c.slots[slot];
  s.seq = c.next_seq++;
  s.sent_ns = now;
  fill_request(out_.data(), out_.size(), c.id, static_cast<uint32_t>(slot), s.seq);
  for (;;) {
    ssize_t n = send(c.fd, out_.data(), out_.size(), 0);
    if (n == static_cast<ssize_t>(out_.size())) return;
    if (n < 0 && errno == EINTR) continue;
    // The send buffer is full (or the server's port said unreachable): the
    // request is as good as lost, and the slot's timeout sends a new one.
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNREFUSED)) return;
    fail("send (client %u): %s", c.id, n < 0 ? std::strerror(errno) : "short send");
  }
}

void UdpLoadGen::on_readable(Client& c) {
  mmsghdr msgs[kBatch];
  iovec iov[kBatch];
  for (size_t i = 0; i < kBatch; ++i) {
    iov[i] = {rbufs_.data() + i * kMaxDatagram, static_cast<size_t>(kMaxDatagram)};
    msgs[i] = mmsghdr{};
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  int n;
  do {
    n = recvmmsg(c.fd, msgs, kBatch, MSG_DONTWAIT, nullptr);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  // The server's port was closed for a moment (ICMP unreachable): the
  // requests in flight are lost, and time out.
  if (n < 0 && errno == ECONNREFUSED) return;
  if (n < 0) fail("recvmmsg (client %u): %s", c.id, std::strerror(errno));
  const uint64_t now = now_ns();
  const size_t size = static_cast<size_t>(o_.size);
  for (int i = 0; i < n; ++i) {
    const unsigned char* p = static_cast<unsigned char*>(iov[i].iov_base);
    const size_t len = msgs[i].msg_len;
    Header h;
    if (len != size || (msgs[i].msg_hdr.msg_flags & MSG_TRUNC))
      fail("client %u: a reply of %zu bytes to requests of %zu", c.id, len, size);
    std::memcpy(&h, p, sizeof h);
    if (h.client != c.id || h.slot >= c.slots.size())
      fail("client %u: a reply to client %u slot %u", c.id, h.client, h.slot);
    Slot& s = c.slots[h.slot];
    if (h.seq != s.seq) {
      // An answer to a request that timed out (its slot moved on).
      if (h.seq > s.seq) fail("client %u: a reply to request %" PRIu64 " never sent", c.id, h.seq);
      ++late_;
      window_late_ += measuring_;
      continue;
    }
    fill_request(expect_.data(), size, c.id, h.slot, h.seq);
    if (std::memcmp(p, expect_.data(), size) != 0) {
      size_t at = 0;
      while (p[at] == expect_[at]) ++at;
      fail("client %u: request %" PRIu64 " byte %zu came back as 0x%02x, sent 0x%02x", c.id, h.seq,
           at, p[at], expect_[at]);
    }
    if (measuring_) hist_.record(now - s.sent_ns);
    ++c.replies;
    ++replies_;
    send_request(c, h.slot, now);
  }
}

// Requests unanswered for longer than the timeout are lost: their slots send
// new ones.
void UdpLoadGen::expire(uint64_t now) {
  const uint64_t timeout = static_cast<uint64_t>(o_.timeout_ms) * 1'000'000u;
  if (now - last_expire_ < timeout / 4) return;
  last_expire_ = now;
  for (Client& c : clients_) {
    for (size_t i = 0; i < c.slots.size(); ++i) {
      if (now - c.slots[i].sent_ns < timeout) continue;
      ++lost_;
      window_lost_ += measuring_;
      send_request(c, i, now);
    }
  }
}

void UdpLoadGen::poll_once(int timeout_ms) {
  int n = epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()), timeout_ms);
  if (n < 0 && errno != EINTR) fail("epoll_wait: %s", std::strerror(errno));
  for (int i = 0; i < n; ++i)
    on_readable(*static_cast<Client*>(events_[static_cast<size_t>(i)].data.ptr));
  expire(now_ns());
}

int UdpLoadGen::run() {
  int perf_ctl = -1, perf_ack = -1;
  if (!o_.perf_ctl.empty()) {
    // perf holds both FIFOs open already (it opens them O_RDWR), so neither blocks.
    perf_ctl = open(o_.perf_ctl.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    perf_ack = open(o_.perf_ack.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (perf_ctl < 0 || perf_ack < 0)
      fail("opening the perf FIFOs %s, %s: %s", o_.perf_ctl.c_str(), o_.perf_ack.c_str(),
           std::strerror(errno));
  }
  for (int i = 0; i < o_.clients; ++i)
    open_client(clients_[static_cast<size_t>(i)], static_cast<uint32_t>(i));
  uint64_t now = now_ns();
  last_expire_ = now;
  for (Client& c : clients_) {
    for (size_t s = 0; s < c.slots.size(); ++s) send_request(c, s, now);
  }
  const uint64_t warm_end = now + static_cast<uint64_t>(o_.warmup * 1e9);
  while (now < warm_end) {
    poll_once(static_cast<int>(std::min<uint64_t>((warm_end - now + 999'999) / 1'000'000, 50)));
    now = now_ns();
  }

  perf_command(perf_ctl, perf_ack, "enable\n");
  const double cpu0 = server_cpu_seconds(o_.server_pid);
  const double self0 = process_cpu_seconds();
  const uint64_t replies0 = replies_;
  for (Client& c : clients_) c.window_start_replies = c.replies;
  const uint64_t window_start = now_ns();
  const uint64_t window_end = window_start + static_cast<uint64_t>(o_.seconds * 1e9);
  measuring_ = true;
  now = window_start;
  while (now < window_end) {
    poll_once(static_cast<int>(std::min<uint64_t>((window_end - now + 999'999) / 1'000'000, 50)));
    now = now_ns();
  }
  measuring_ = false;
  perf_command(perf_ctl, perf_ack, "disable\n");
  const uint64_t replies = replies_ - replies0;
  const double cpu1 = server_cpu_seconds(o_.server_pid);
  const double self1 = process_cpu_seconds();
  const double window = static_cast<double>(now - window_start) / 1e9;

  std::vector<double> per_client;
  for (const Client& c : clients_)
    per_client.push_back(static_cast<double>(c.replies - c.window_start_replies) / window);
  std::vector<double> sorted = per_client;
  std::sort(sorted.begin(), sorted.end());
  int idle = static_cast<int>(std::count(sorted.begin(), sorted.end(), 0.0));

  std::printf("clients=%d depth=%d size=%d window_s=%.3f dgrams=%" PRIu64
              " dgrams_per_s=%.0f p50_us=%.1f p99_us=%.1f lost=%" PRIu64 " late=%" PRIu64
              " client_min_per_s=%.0f client_median_per_s=%.0f client_max_per_s=%.0f"
              " idle_clients=%d client_cpu_s=%.3f",
              o_.clients, o_.depth, o_.size, window, replies, static_cast<double>(replies) / window,
              hist_.quantile(0.50) / 1e3, hist_.quantile(0.99) / 1e3, window_lost_, window_late_,
              sorted.front(), sorted[sorted.size() / 2], sorted.back(), idle, self1 - self0);
  if (o_.server_pid > 0) {
    const double cpu = cpu1 - cpu0;
    std::printf(" server_cpu_s=%.3f server_dgrams_per_cpu_s=%.0f", cpu,
                cpu > 0 ? static_cast<double>(replies) / cpu : 0.0);
  }
  std::printf("\n");
  if (o_.per_client) {
    for (size_t i = 0; i < per_client.size(); ++i)
      std::printf("client=%zu dgrams_per_s=%.0f\n", i, per_client[i]);
  }
  std::fflush(stdout);
  for (Client& c : clients_) close(c.fd);
  if (replies == 0) fail("no reply in the %.3f s window", window);
  return 0;
}

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --port P [--clients N] [--depth K] [--size S] [--seconds T]\n"
               "          [--warmup W] [--timeout-ms M] [--server-pid PID] [--per-client]\n"
               "          [--perf-ctl FIFO --perf-ack FIFO]\n",
               argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  loadgen_util::g_program = "udp_loadgen";
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--per-client") {
      o.per_client = true;
      continue;
    }
    if (i + 1 >= argc) usage(argv[0]);
    const char* v = argv[++i];
    char* end = nullptr;
    if (a == "--port")
      o.port = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--clients")
      o.clients = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--depth")
      o.depth = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--size")
      o.size = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--seconds")
      o.seconds = std::strtod(v, &end);
    else if (a == "--warmup")
      o.warmup = std::strtod(v, &end);
    else if (a == "--timeout-ms")
      o.timeout_ms = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--server-pid")
      o.server_pid = std::strtol(v, &end, 10);
    else if (a == "--perf-ctl")
      o.perf_ctl = v;
    else if (a == "--perf-ack")
      o.perf_ack = v;
    else
      usage(argv[0]);
    if (end != nullptr && *end != '\0') usage(argv[0]);
  }
  if (o.port <= 0 || o.port > 65535 || o.clients <= 0 || o.clients > 10000 || o.depth <= 0 ||
      o.depth > 1024 || o.size < 16 || o.size > 65507 || !(o.seconds > 0) || o.seconds > 3600 ||
      !(o.warmup >= 0) || o.warmup > 600 || o.timeout_ms <= 0 ||
      o.perf_ctl.empty() != o.perf_ack.empty())
    usage(argv[0]);
  UdpLoadGen g(o);
  return g.run();
}
