// loadgen: the TCP echo load generator of the benchmark suite (issue 4).
//
// N connections to 127.0.0.1:PORT, each keeping D messages of S bytes in flight
// (pipelined), every echoed byte checked against what that connection sent.
// One thread, level-triggered epoll, one read and at most one write per
// connection per wakeup, so that on a shared core it takes as little of the
// core as it can from the server it measures.
//
//   loadgen --port P [--conns N] [--depth D] [--size S] [--seconds T]
//           [--warmup W] [--server-pid PID] [--perf-ctl FIFO --perf-ack FIFO]
//
// Phases: connect (in batches, each connection echoes one message before the
// next batch connects, so a small accept backlog never drops a SYN), warm-up
// (W seconds, default 0.5), then the measured window (T seconds, default 3).
// Only the window counts: messages completed in it, and their round-trip
// latency from the moment the message was queued for sending to the moment
// its last echoed byte was read.
//
// With --server-pid, the server's CPU time (utime + stime of /proc/PID/stat,
// all its threads) is sampled at the window's edges, which gives the server's
// efficiency: messages per second of server CPU. With --perf-ctl/--perf-ack
// (the FIFOs of `perf stat --delay=-1 --control=fifo:CTL,ACK`), perf's
// counters are enabled exactly for the window.
//
// Prints one line of key=value pairs on stdout. Exits 0, or 1 on any
// mismatch, connection error, early close or a window without a message; 2 on
// bad arguments.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
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
using loadgen_util::process_cpu_seconds;

struct Options {
  int port = 0;
  int conns = 50;
  int depth = 1;
  int size = 64;
  double seconds = 3.0;
  double warmup = 0.5;
  long server_pid = 0;
  std::string perf_ctl;
  std::string perf_ack;
};

// Message `seq` of connection `id`: every 8-byte word differs with the
// connection, the sequence number and the position, so a byte echoed to the
// wrong connection, lost, repeated or reordered is caught.
void fill_message(unsigned char* out, size_t size, uint32_t id, uint64_t seq) {
  uint64_t base = mix64((static_cast<uint64_t>(id) << 40) ^ seq);
  size_t i = 0;
  for (uint64_t w = 0; i + 8 <= size; i += 8, ++w) {
    uint64_t v = base ^ (w * 0xD6E8FEB86659FD93ull);
    std::memcpy(out + i, &v, 8);
  }
  if (i < size) {
    uint64_t v = base ^ 0xA5A5A5A5A5A5A5A5ull;
    std::memcpy(out + i, &v, size - i);
  }
}

struct Conn {
  int fd = -1;
  uint32_t id = 0;
  uint64_t sent = 0;      // messages queued for sending so far
  uint64_t received = 0;  // messages fully echoed so far
  size_t recv_off = 0;    // bytes of message `received` already checked
  bool want_out = false;  // EPOLLOUT armed: `out` has bytes the socket did not take
  uint64_t window_start_received = 0;
  std::vector<uint64_t> send_ts;      // queue time of message seq, at seq % depth
  std::vector<unsigned char> expect;  // message `received`, as it must come back
  std::vector<unsigned char> out;     // bytes queued, not yet written
  size_t out_off = 0;
};

class LoadGen {
 public:
  explicit LoadGen(const Options& o) : o_(o), rbuf_(256 * 1024) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epfd_ < 0) fail("epoll_create1: %s", std::strerror(errno));
    conns_.resize(static_cast<size_t>(o.conns));
    events_.resize(static_cast<size_t>(std::min(o.conns, 1024)));
  }

  int run();

 private:
  void connect_one(Conn& c, uint32_t id);
  void top_up(Conn& c, uint64_t now);
  void flush(Conn& c);
  void on_readable(Conn& c);
  void set_out(Conn& c, bool on);
  void poll_once(int timeout_ms);
  void perf_command(const char* cmd);
  double server_cpu_seconds() const;

  const Options& o_;
  int epfd_ = -1;
  std::vector<Conn> conns_;
  std::vector<epoll_event> events_;
  std::vector<unsigned char> rbuf_;
  uint64_t limit_ = 1;  // messages in flight per connection: 1 while connecting, then depth
  bool measuring_ = false;
  uint64_t completed_ = 0;  // messages fully echoed, all phases
  Histogram hist_;
  int perf_ctl_fd_ = -1;
  int perf_ack_fd_ = -1;
};

void LoadGen::connect_one(Conn& c, uint32_t id) {
  c.id = id;
  c.send_ts.assign(static_cast<size_t>(o_.depth), 0);
  c.expect.resize(static_cast<size_t>(o_.size));
  c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c.fd < 0) fail("socket: %s", std::strerror(errno));
  int one = 1;
  // Pipelined small messages: without this, Nagle holds back all but the first.
  setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(o_.port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  // Blocking connect: on loopback it completes as soon as the server's kernel
  // answers; the batches keep the server's accept queue short.
  if (connect(c.fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    fail("connect to 127.0.0.1:%d (connection %u): %s", o_.port, id, std::strerror(errno));
  if (fcntl(c.fd, F_SETFL, fcntl(c.fd, F_GETFL) | O_NONBLOCK) != 0)
    fail("fcntl: %s", std::strerror(errno));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &c;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, c.fd, &ev) != 0) fail("epoll_ctl: %s", std::strerror(errno));
}

// Queues messages until `limit_` are in flight on `c`, then writes them.
void LoadGen::top_up(Conn& c, uint64_t now) {
  const size_t size = static_cast<size_t>(o_.size);
  bool queued = false;
  while (c.sent - c.received < limit_) {
    size_t at = c.out.size();
    c.out.resize(at + size);
    fill_message(c.out.data() + at, size, c.id, c.sent);
    c.send_ts[c.sent % c.send_ts.size()] = now;
    ++c.sent;
    queued = true;
  }
  if (queued && !c.want_out) flush(c);
}

void LoadGen::set_out(Conn& c, bool on) {
  if (c.want_out == on) return;
  c.want_out = on;
  epoll_event ev{};
  ev.events = EPOLLIN | (on ? EPOLLOUT : 0u);
  ev.data.ptr = &c;
  if (epoll_ctl(epfd_, EPOLL_CTL_MOD, c.fd, &ev) != 0) fail("epoll_ctl: %s", std::strerror(errno));
}

void LoadGen::flush(Conn& c) {
  while (c.out_off < c.out.size()) {
    ssize_t n = write(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off);
    if (n > 0) {
      c.out_off += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      set_out(c, true);  // the rest goes when the socket has room
      return;
    }
    fail("write (connection %u): %s", c.id, n == 0 ? "wrote 0 bytes" : std::strerror(errno));
  }
  c.out.clear();
  c.out_off = 0;
  set_out(c, false);
}

void LoadGen::on_readable(Conn& c) {
  ssize_t n;
  for (;;) {
    n = read(c.fd, rbuf_.data(), rbuf_.size());
    if (n >= 0 || errno != EINTR) break;
  }
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
  if (n < 0) fail("read (connection %u): %s", c.id, std::strerror(errno));
  if (n == 0)
    fail("connection %u closed by the server after %" PRIu64 " messages", c.id, c.received);
  const uint64_t now = now_ns();
  const size_t size = static_cast<size_t>(o_.size);
  const unsigned char* p = rbuf_.data();
  size_t left = static_cast<size_t>(n);
  while (left > 0) {
    if (c.received == c.sent)
      fail("connection %u: %zu bytes echoed that were never sent (after message %" PRIu64 ")", c.id,
           left, c.received);
    if (c.recv_off == 0) fill_message(c.expect.data(), size, c.id, c.received);
    size_t take = std::min(left, size - c.recv_off);
    if (std::memcmp(p, c.expect.data() + c.recv_off, take) != 0) {
      size_t at = 0;
      while (p[at] == c.expect[c.recv_off + at]) ++at;
      fail("connection %u: message %" PRIu64 " byte %zu came back as 0x%02x, sent 0x%02x", c.id,
           c.received, c.recv_off + at, p[at], c.expect[c.recv_off + at]);
    }
    p += take;
    left -= take;
    c.recv_off += take;
    if (c.recv_off == size) {
      if (measuring_) hist_.record(now - c.send_ts[c.received % c.send_ts.size()]);
      c.recv_off = 0;
      ++c.received;
      ++completed_;
    }
  }
  top_up(c, now);
}

void LoadGen::poll_once(int timeout_ms) {
  int n = epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()), timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return;
    fail("epoll_wait: %s", std::strerror(errno));
  }
  for (int i = 0; i < n; ++i) {
    Conn& c = *static_cast<Conn*>(events_[static_cast<size_t>(i)].data.ptr);
    uint32_t ev = events_[static_cast<size_t>(i)].events;
    if (ev & EPOLLOUT) flush(c);
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
  }
}

void LoadGen::perf_command(const char* cmd) {
  loadgen_util::perf_command(perf_ctl_fd_, perf_ack_fd_, cmd);
}

double LoadGen::server_cpu_seconds() const { return loadgen_util::server_cpu_seconds(o_.server_pid); }

int LoadGen::run() {
  if (!o_.perf_ctl.empty()) {
    // perf holds both FIFOs open already (it opens them O_RDWR), so neither blocks.
    perf_ctl_fd_ = open(o_.perf_ctl.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    perf_ack_fd_ = open(o_.perf_ack.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (perf_ctl_fd_ < 0 || perf_ack_fd_ < 0)
      fail("opening the perf FIFOs %s, %s: %s", o_.perf_ctl.c_str(), o_.perf_ack.c_str(),
           std::strerror(errno));
  }

  // Connect in batches; each batch echoes one message before the next starts.
  const uint64_t setup_deadline = now_ns() + 10'000'000'000ull + uint64_t(o_.conns) * 20'000'000ull;
  constexpr int kBatch = 32;
  for (int first = 0; first < o_.conns; first += kBatch) {
    int last = std::min(first + kBatch, o_.conns);
    for (int i = first; i < last; ++i)
      connect_one(conns_[static_cast<size_t>(i)], static_cast<uint32_t>(i));
    uint64_t now = now_ns();
    for (int i = first; i < last; ++i) top_up(conns_[static_cast<size_t>(i)], now);
    for (;;) {
      bool all = true;
      for (int i = first; i < last && all; ++i) all = conns_[static_cast<size_t>(i)].received >= 1;
      if (all) break;
      if (now_ns() > setup_deadline)
        fail("connections %d..%d got no echo within the setup time", first, last - 1);
      poll_once(100);
    }
  }

  // Full depth, warm-up, then the measured window.
  limit_ = static_cast<uint64_t>(o_.depth);
  uint64_t start = now_ns();
  for (Conn& c : conns_) top_up(c, start);
  const uint64_t warm_end = start + static_cast<uint64_t>(o_.warmup * 1e9);
  uint64_t now = start;
  while (now < warm_end) {
    poll_once(static_cast<int>((warm_end - now + 999'999) / 1'000'000));
    now = now_ns();
  }

  perf_command("enable\n");
  const double cpu0 = server_cpu_seconds();
  const double self_cpu0 = process_cpu_seconds();
  const uint64_t completed0 = completed_;
  for (Conn& c : conns_) c.window_start_received = c.received;
  const uint64_t window_start = now_ns();
  const uint64_t window_end = window_start + static_cast<uint64_t>(o_.seconds * 1e9);
  measuring_ = true;
  now = window_start;
  while (now < window_end) {
    poll_once(static_cast<int>((window_end - now + 999'999) / 1'000'000));
    now = now_ns();
  }
  measuring_ = false;
  const uint64_t completed1 = completed_;
  const double cpu1 = server_cpu_seconds();
  const double self_cpu1 = process_cpu_seconds();
  perf_command("disable\n");

  const double window = static_cast<double>(now - window_start) / 1e9;
  const uint64_t msgs = completed1 - completed0;
  int idle = 0;
  for (const Conn& c : conns_) idle += c.received == c.window_start_received;

  std::printf("conns=%d depth=%d size=%d window_s=%.3f msgs=%" PRIu64
              " msgs_per_s=%.0f p50_us=%.1f p99_us=%.1f total_msgs=%" PRIu64
              " idle_conns=%d"
              " client_cpu_s=%.3f",
              o_.conns, o_.depth, o_.size, window, msgs, static_cast<double>(msgs) / window,
              hist_.quantile(0.50) / 1e3, hist_.quantile(0.99) / 1e3, completed_, idle,
              self_cpu1 - self_cpu0);
  if (o_.server_pid > 0) {
    double cpu = cpu1 - cpu0;
    std::printf(" server_cpu_s=%.3f server_msgs_per_cpu_s=%.0f", cpu,
                cpu > 0 ? static_cast<double>(msgs) / cpu : 0.0);
  }
  std::printf("\n");
  std::fflush(stdout);
  if (idle > 0)
    std::fprintf(stderr, "loadgen: warning: %d of %d connections got no echo in the window\n", idle,
                 o_.conns);
  for (Conn& c : conns_) close(c.fd);
  if (msgs == 0) fail("no message was echoed in the %.3f s window", window);
  return 0;
}

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --port P [--conns N] [--depth D] [--size S] [--seconds T]\n"
               "          [--warmup W] [--server-pid PID] [--perf-ctl FIFO --perf-ack FIFO]\n",
               argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) usage(argv[0]);
    const char* v = argv[++i];
    char* end = nullptr;
    if (a == "--port")
      o.port = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--conns")
      o.conns = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--depth")
      o.depth = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--size")
      o.size = static_cast<int>(std::strtol(v, &end, 10));
    else if (a == "--seconds")
      o.seconds = std::strtod(v, &end);
    else if (a == "--warmup")
      o.warmup = std::strtod(v, &end);
    else if (a == "--server-pid")
      o.server_pid = std::strtol(v, &end, 10);
    else if (a == "--perf-ctl")
      o.perf_ctl = v;
    else if (a == "--perf-ack")
      o.perf_ack = v;
    else
      usage(argv[0]);
    if (end != nullptr && *end != '\0') usage(argv[0]);  // a number with trailing junk
  }
  if (o.port <= 0 || o.port > 65535 || o.conns <= 0 || o.conns > 60000 || o.depth <= 0 ||
      o.size <= 0 || o.size > (1 << 20) || !(o.seconds > 0) || o.seconds > 3600 ||
      !(o.warmup >= 0) || o.perf_ctl.empty() != o.perf_ack.empty())
    usage(argv[0]);
  // A server that dies mid-run must give an error, not kill us silently.
  signal(SIGPIPE, SIG_IGN);
  LoadGen g(o);
  return g.run();
}
