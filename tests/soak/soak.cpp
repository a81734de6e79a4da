// ringpark_soak: a randomized mix of everything a libuv server under ringpark
// does, run for a while, with every operation accounted for.
//
// One loop under rp_uv_run, on one thread, runs at once:
// - TCP echo traffic over a front end (front_end.hpp; today rp_tcp_t) on
//   127.0.0.1: clients connect, write messages of random sizes (pipelined),
//   check every echoed byte, shut down and wait for the end of the echo; some
//   close at a random point with reads and writes in flight, some find the
//   server closing on them at a random point; both sides pause reading at
//   random (rp_read_stop / rp_read_start) and the server applies backpressure;
// - file work through rp_fs_* (open, write and read with one or two buffers,
//   fstat, ftruncate, fsync, close, unlink), every byte read back checked, and
//   uv_cancel tried on reads in flight;
// - libuv timers of 0 to 30 ms, some stopped before they fire;
// - uv_stop from a timer at random moments, and rp_uv_run in the DEFAULT,
//   ONCE and NOWAIT modes at random;
// - a 1 ms SIGALRM storm (EINTR everywhere), with SA_RESTART and without, in
//   turns.
// Every few seconds (an epoch) the load drains: nothing new starts until all
// connections and files are closed; then the open descriptors and the RSS are
// sampled. The first epoch is the warm-up; later samples must be flat.
//
// It passes when:
// - every operation completed exactly once (connects, writes, shutdowns,
//   closes, file requests; timers that were stopped never fired), and every
//   callback came in the order the contract gives (nothing after a close);
// - every echoed byte is right, and every connection that nobody cut short
//   got all its bytes back;
// - the descriptor count at every checkpoint after the warm-up equals the
//   warm-up's, and the RSS stays within 8 MiB + 10% of it (not checked under
//   AddressSanitizer or ThreadSanitizer, whose own memory grows; ASan's leak
//   checker covers leaks there); at exit, with the loop closed, the count is
//   what it was before the loop was made;
// - the loop goes idle when the load stops: with an idle connection (reads in
//   flight on both ends) and nothing else to do, the process uses under 10%
//   of one CPU over a second of rp_uv_run (a busy loop would use all of it).
//
// The seed is printed at the start; --seed S replays the same choices (the
// kernel's timing still varies from run to run). --seconds/--minutes sets the
// length; the short form runs in CI, the long one on demand:
//   ringpark_soak --minutes 60
// Exit status: 0 pass, 1 fail, 2 usage or set-up error.
#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "front_end.hpp"
#include "ringpark.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SOAK_SANITIZED 1
#else
#define SOAK_SANITIZED 0
#endif

namespace soak {
namespace {

using Clock = std::chrono::steady_clock;

// ---- Options ---------------------------------------------------------------------

struct Options {
  std::uint64_t seed = 0;
  bool seed_given = false;
  double seconds = 10;
  double epoch = 2;  // seconds of load between checkpoints; the first is the warm-up
  int clients = 24;  // connections at a time
  int files = 4;     // file workers
  int timers = 16;   // libuv timers re-armed at random
  std::size_t max_message = 64 * 1024;
  bool storm = true;
  std::string front_end = "rp_tcp";
};

void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--seed S] [--seconds N | --minutes N] [--epoch SECONDS]\n"
               "          [--clients N] [--files N] [--timers N] [--no-storm]\n"
               "          [--front-end NAME]   (one of: %s)\n",
               argv0, front_end_names());
}

bool parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    const char* v = nullptr;
    if (a == "--no-storm") {
      o->storm = false;
    } else if ((a == "--seed") && (v = value())) {
      o->seed = std::strtoull(v, nullptr, 0);
      o->seed_given = true;
    } else if (a == "--seconds" && (v = value())) {
      o->seconds = std::atof(v);
    } else if (a == "--minutes" && (v = value())) {
      o->seconds = 60 * std::atof(v);
    } else if (a == "--epoch" && (v = value())) {
      o->epoch = std::atof(v);
    } else if (a == "--clients" && (v = value())) {
      o->clients = std::atoi(v);
    } else if (a == "--files" && (v = value())) {
      o->files = std::atoi(v);
    } else if (a == "--timers" && (v = value())) {
      o->timers = std::atoi(v);
    } else if (a == "--front-end" && (v = value())) {
      o->front_end = v;
    } else {
      return false;
    }
  }
  return o->seconds > 0 && o->epoch > 0 && o->clients > 0 && o->files >= 0 && o->timers >= 0;
}

// ---- Randomness and content ---------------------------------------------------------

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

struct Rng {
  std::uint64_t state;
  std::uint64_t next() { return mix(state++); }
  std::uint64_t below(std::uint64_t n) { return n == 0 ? 0 : next() % n; }
  std::uint64_t between(std::uint64_t lo, std::uint64_t hi) { return lo + below(hi - lo + 1); }
  bool chance(double p) { return static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }
};

// The bytes client `id` sends, by offset: its id in the first 8 bytes (so the
// server knows whose stream it echoes), then a pattern that names the offset.
char content(std::uint64_t id, std::uint64_t offset) {
  if (offset < 8) return static_cast<char>(id >> (8 * offset));
  return static_cast<char>(mix(id * 0x100000001b3ull ^ (offset >> 3)) >> (8 * (offset & 7)));
}

// ---- Failures and the ledger ------------------------------------------------------

std::atomic<std::uint64_t> g_progress{0};  // bumped by every completion; the watchdog reads it
int g_failures = 0;
Clock::time_point g_start;

double elapsed() { return std::chrono::duration<double>(Clock::now() - g_start).count(); }

void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void fail(const char* fmt, ...) {
  if (++g_failures > 50) return;  // the first fifty say enough
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "soak: FAIL [%7.2fs] ", elapsed());
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
}

// UV_ECANCELED for a request nobody cancelled: io_uring ends operations it
// cannot hand to a worker thread that way (tests/fault/nproc_test.cpp).
const char* uncancelled_hint(ssize_t status) {
  return status == UV_ECANCELED ? " (a request nobody cancelled: see tests/fault/nproc_test.cpp)"
                                : "";
}

// Operations started and completed, by kind.
enum Kind { kConnect, kWrite, kShutdown, kClose, kFs, kKinds };
const char* kKindNames[kKinds] = {"connect", "write", "shutdown", "close", "fs request"};

struct Ledger {
  std::uint64_t started[kKinds] = {};
  std::uint64_t finished[kKinds] = {};
  void start(Kind k) { ++started[k]; }
  void finish(Kind k) {
    ++finished[k];
    g_progress.fetch_add(1, std::memory_order_relaxed);
  }
  bool balanced() const {
    for (int k = 0; k < kKinds; ++k) {
      if (started[k] != finished[k]) return false;
    }
    return true;
  }
};

// ---- Measurements -------------------------------------------------------------------

int count_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(d);
  return n - 1;  // the listing's own
}

std::string list_fds() {
  std::string out;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string link = std::string("/proc/self/fd/") + e->d_name;
    char target[256];
    ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    out += std::string(" ") + e->d_name + "=" + target;
  }
  ::closedir(d);
  return out;
}

std::uint64_t rss_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long size = 0, resident = 0;
  if (std::fscanf(f, "%lu %lu", &size, &resident) != 2) resident = 0;
  std::fclose(f);
  return static_cast<std::uint64_t>(resident) * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

double cpu_ms() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1e3 +
         (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e3;
}

// ---- The signal storm ----------------------------------------------------------------

std::atomic<std::uint64_t> g_signals{0};

void on_alarm(int) { g_signals.fetch_add(1, std::memory_order_relaxed); }

void storm(bool on, bool restart) {
  struct sigaction sa {};
  sa.sa_handler = on_alarm;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = restart ? SA_RESTART : 0;
  ::sigaction(SIGALRM, &sa, nullptr);
  itimerval t{};
  if (on) t = {{0, 1000}, {0, 1000}};
  ::setitimer(ITIMER_REAL, &t, nullptr);
}

// ---- The soak ------------------------------------------------------------------------

class Soak;

// What every soak object behind a Stream is.
class Endpoint {
 public:
  virtual ~Endpoint() = default;
  virtual void on_connect(int status) = 0;
  virtual void on_read(ssize_t n, const char* bytes) = 0;
  virtual void on_write(void* token, int status) = 0;
  virtual void on_shutdown(int status) = 0;
  virtual void on_close() = 0;
};

// Routes each stream's events to its Endpoint.
class Router final : public StreamEvents {
 public:
  void on_connect(Stream& s, int status) override { ep(s)->on_connect(status); }
  void on_read(Stream& s, ssize_t n, const char* bytes) override { ep(s)->on_read(n, bytes); }
  void on_write(Stream& s, void* token, int status) override { ep(s)->on_write(token, status); }
  void on_shutdown(Stream& s, int status) override { ep(s)->on_shutdown(status); }
  void on_close(Stream& s) override { ep(s)->on_close(); }

 private:
  static Endpoint* ep(Stream& s) { return static_cast<Endpoint*>(s.owner); }
};

// One write in flight: its bytes, kept until its callback.
struct WriteOp {
  std::string bytes;
  bool done = false;
};

struct Stats {
  std::uint64_t connections = 0, graceful = 0, client_aborts = 0, server_aborts = 0;
  std::uint64_t bytes_echoed = 0, read_pauses = 0;
  std::uint64_t fs_ops = 0, fs_cancelled = 0, file_cycles = 0;
  std::uint64_t timers_fired = 0, timers_stopped = 0, stops = 0, runs = 0;
  double timer_late_ms = 0;
};

class Soak {
 public:
  Soak(const Options& o, FrontEnd& fe) : opt(o), fe(fe), rng{o.seed} {}

  int run();

  // Shared with the actors.
  const Options& opt;
  FrontEnd& fe;
  Rng rng;
  uv_loop_t loop;
  Router router;
  Ledger ledger;
  Stats stats;
  sockaddr_in server_addr{};
  bool draining = false;  // start nothing new until the checkpoint
  std::string dir;
  int clients_alive = 0;
  int servers_alive = 0;
  int files_busy = 0;
  std::uint64_t next_client_id = 1;

  // Whether the server cuts client `id`'s connection short, and after how
  // many bytes; decided by the id alone, so the client knows too.
  static bool server_cuts(std::uint64_t id) { return mix(id ^ 0x5eed) % 6 == 0; }
  static std::uint64_t server_cut_at(std::uint64_t id) { return 8 + mix(id ^ 0xc07) % 200000; }

  void spawn_client();
  void client_gone();
  void accepted(Stream* s, int status);

 private:
  void start_load();
  bool quiescent() const;
  void checkpoint();
  void measure_idle();
  void teardown();

  std::unique_ptr<Listener> listener_;
  std::vector<std::unique_ptr<class FileWorker>> files_;
  std::vector<std::unique_ptr<class TimerActor>> timers_;
  uv_timer_t stopper_;
  uv_timer_t epoch_timer_;
  bool finished_ = false;
  int epoch_ = 0;
  int base_fds_ = -1;
  std::uint64_t base_rss_ = 0;
  int fds_before_loop_ = -1;
  bool restart_ = false;
};

// ---- Clients ------------------------------------------------------------------------

// One connection: writes `target` bytes in messages of random sizes (up to
// four in flight), checks every echoed byte, then shuts down and waits for
// the end of the echo; or closes at a random point (`abort_at`).
class Client final : public Endpoint {
 public:
  Client(Soak& soak, std::uint64_t id)
      : soak_(soak), id_(id), rng_{soak.opt.seed ^ mix(id)}, cut_by_server_(Soak::server_cuts(id)) {
    target_ = rng_.between(8, 1 << 20);
    if (rng_.chance(0.15)) abort_at_ = rng_.below(target_);
    uv_timer_init(&soak.loop, &pause_);
    pause_.data = this;
  }

  void start() {
    stream_ = soak_.fe.new_stream(&soak_.loop, &soak_.router);
    if (stream_ == nullptr) {
      fail("client %" PRIu64 ": no stream", id_);
      return finish();
    }
    stream_->owner = this;
    if (int r = stream_->connect(soak_.server_addr); r != 0) {
      fail("client %" PRIu64 ": connect: %s", id_, uv_strerror(r));
      return close();
    }
    soak_.ledger.start(kConnect);
    connect_pending_ = true;
  }

  void on_connect(int status) override {
    soak_.ledger.finish(kConnect);
    if (!connect_pending_) fail("client %" PRIu64 ": connect callback twice", id_);
    connect_pending_ = false;
    if (closed_) fail("client %" PRIu64 ": connect callback after close", id_);
    if (status != 0) {
      if (!(closing_ && status == UV_ECANCELED)) {
        fail("client %" PRIu64 ": connect: %s", id_, uv_strerror(status));
      }
      return close();
    }
    if (closing_) return;
    connected_ = true;
    read_start();
    pump();
  }

  void on_read(ssize_t n, const char* bytes) override {
    if (closed_) fail("client %" PRIu64 ": read callback after close", id_);
    if (closing_) {
      fail("client %" PRIu64 ": read callback after rp_close", id_);
      return;
    }
    if (!reading_) fail("client %" PRIu64 ": read callback while stopped", id_);
    if (n > 0) {
      for (ssize_t i = 0; i < n; ++i) {
        if (bytes[i] != content(id_, echoed_ + i)) {
          fail("client %" PRIu64 ": echoed byte %" PRIu64 " is %d, sent %d", id_,
               echoed_ + static_cast<std::uint64_t>(i), bytes[i], content(id_, echoed_ + i));
          return close();
        }
      }
      echoed_ += static_cast<std::uint64_t>(n);
      soak_.stats.bytes_echoed += static_cast<std::uint64_t>(n);
      g_progress.fetch_add(1, std::memory_order_relaxed);
      if (echoed_ > sent_) {
        fail("client %" PRIu64 ": %" PRIu64 " bytes echoed, %" PRIu64 " sent", id_, echoed_, sent_);
        return close();
      }
      if (abort_at_ && echoed_ >= *abort_at_) return abort();
      if (soak_.rng.chance(0.01)) pause_reading();
      return;
    }
    // The end: EOF, or an error.
    reading_ = false;
    const bool complete = shut_done_ && echoed_ == sent_ && sent_ == target_;
    if (n == UV_EOF && complete) {
      ++soak_.stats.graceful;
    } else if (cut_by_server_) {
      ++soak_.stats.server_aborts;  // early EOF or a reset: what the server's cut looks like
    } else {
      fail("client %" PRIu64 ": %s after %" PRIu64 " of %" PRIu64 " bytes echoed (%" PRIu64
           " sent)",
           id_, n == UV_EOF ? "EOF" : uv_strerror(static_cast<int>(n)), echoed_, target_, sent_);
    }
    close();
  }

  void on_write(void* token, int status) override {
    soak_.ledger.finish(kWrite);
    auto* w = static_cast<WriteOp*>(token);
    if (w->done) fail("client %" PRIu64 ": write callback twice", id_);
    if (closed_) fail("client %" PRIu64 ": write callback after close", id_);
    w->done = true;
    --writes_;
    if (status != 0 && !closing_ && !cut_by_server_) {
      fail("client %" PRIu64 ": write: %s", id_, uv_strerror(status));
    }
    if (status != 0 && status != UV_ECANCELED && status != UV_EPIPE && status != UV_ECONNRESET) {
      fail("client %" PRIu64 ": write: unexpected %s", id_, uv_strerror(status));
    }
    delete w;
    pump();
  }

  void on_shutdown(int status) override {
    soak_.ledger.finish(kShutdown);
    if (!shut_pending_) fail("client %" PRIu64 ": shutdown callback twice", id_);
    shut_pending_ = false;
    if (status == 0) {
      shut_done_ = true;
    } else if (!closing_) {
      // The peer will not see our EOF, so no end of the echo will come.
      if (!cut_by_server_) {
        fail("client %" PRIu64 ": shutdown: %s%s", id_, uv_strerror(status),
             uncancelled_hint(status));
      }
      close();
    }
  }

  void on_close() override {
    soak_.ledger.finish(kClose);
    if (closed_) fail("client %" PRIu64 ": close callback twice", id_);
    closed_ = true;
    if (writes_ != 0 || connect_pending_ || shut_pending_) {
      fail("client %" PRIu64 ": close callback with %d writes, %d connect, %d shutdown pending",
           id_, writes_, connect_pending_, shut_pending_);
    }
    finish();
  }

 private:
  void read_start() {
    if (int r = stream_->read_start(); r != 0) {
      fail("client %" PRIu64 ": read_start: %s", id_, uv_strerror(r));
      return close();
    }
    reading_ = true;
  }

  // rp_read_stop now, rp_read_start 1 to 20 ms later.
  void pause_reading() {
    ++soak_.stats.read_pauses;
    stream_->read_stop();
    reading_ = false;
    uv_timer_start(
        &pause_,
        [](uv_timer_t* t) {
          auto* c = static_cast<Client*>(t->data);
          if (!c->closing_ && !c->reading_) c->read_start();
        },
        soak_.rng.between(1, 20), 0);
  }

  // Queues writes while fewer than four are in flight and bytes are left to
  // send; then the shutdown.
  void pump() {
    while (connected_ && !closing_ && !shut_requested_ && writes_ < 4 && sent_ < target_) {
      const std::uint64_t n =
          std::min<std::uint64_t>(soak_.rng.between(1, soak_.opt.max_message), target_ - sent_);
      auto* w = new WriteOp;
      w->bytes.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) w->bytes[i] = content(id_, sent_ + i);
      if (int r = stream_->write(w->bytes.data(), n, w); r != 0) {
        delete w;
        if (!cut_by_server_) fail("client %" PRIu64 ": write: %s", id_, uv_strerror(r));
        return close();
      }
      soak_.ledger.start(kWrite);
      ++writes_;
      sent_ += n;
      if (abort_at_ && sent_ >= *abort_at_ && soak_.rng.chance(0.5)) return abort();
    }
    if (connected_ && !closing_ && !shut_requested_ && sent_ == target_) {
      shut_requested_ = true;
      if (int r = stream_->shutdown(); r != 0) {
        if (!cut_by_server_) fail("client %" PRIu64 ": shutdown: %s", id_, uv_strerror(r));
        return close();
      }
      soak_.ledger.start(kShutdown);
      shut_pending_ = true;
    }
  }

  // Closes with whatever is in flight.
  void abort() {
    ++soak_.stats.client_aborts;
    close();
  }

  void close() {
    if (closing_) return;
    closing_ = true;
    uv_timer_stop(&pause_);
    if (stream_ == nullptr) return finish();
    if (int r = stream_->close(); r != 0) {
      fail("client %" PRIu64 ": close: %s", id_, uv_strerror(r));
      return;
    }
    soak_.ledger.start(kClose);
  }

  // The stream is gone; the pause timer goes next, then the client.
  void finish() {
    uv_close(reinterpret_cast<uv_handle_t*>(&pause_), [](uv_handle_t* h) {
      auto* c = static_cast<Client*>(h->data);
      Soak& soak = c->soak_;
      delete c->stream_;
      delete c;
      soak.client_gone();
    });
  }

  Soak& soak_;
  std::uint64_t id_;
  Rng rng_;
  bool cut_by_server_;
  Stream* stream_ = nullptr;
  uv_timer_t pause_;
  std::uint64_t target_ = 0, sent_ = 0, echoed_ = 0;
  std::optional<std::uint64_t> abort_at_;
  int writes_ = 0;
  bool connect_pending_ = false, connected_ = false, reading_ = false;
  bool shut_requested_ = false, shut_pending_ = false, shut_done_ = false;
  bool closing_ = false, closed_ = false;
};

void Soak::spawn_client() {
  ++clients_alive;
  ++stats.connections;
  (new Client(*this, next_client_id++))->start();
}

void Soak::client_gone() {
  --clients_alive;
  if (!draining) spawn_client();
}

// ---- The echo server's connections ------------------------------------------------------

// Echoes what it reads; stops reading while more than 1 MiB of echo is in
// flight; pauses reading at random; shuts down after the client's EOF; cuts
// some connections short (Soak::server_cuts) with everything in flight.
class ServerConn final : public Endpoint {
 public:
  ServerConn(Soak& soak, Stream* s) : soak_(soak), stream_(s) {
    ++soak.servers_alive;
    s->owner = this;
    uv_timer_init(&soak.loop, &pause_);
    pause_.data = this;
    read_start();
  }

  void on_connect(int) override { fail("server connection: a connect callback"); }

  void on_read(ssize_t n, const char* bytes) override {
    if (closed_ || closing_) fail("server connection: read callback after close");
    if (!reading_) fail("server connection: read callback while stopped");
    if (closing_ || closed_) return;
    if (n < 0) {
      reading_ = false;
      if (n == UV_EOF && !shut_requested_) {
        // The client is done: echo what is queued, then shut down.
        shut_requested_ = true;
        if (stream_->shutdown() == 0) {
          soak_.ledger.start(kShutdown);
          shut_pending_ = true;
          return;
        }
      }
      return close();  // an error: the client went away
    }
    // The first 8 bytes of a client's stream are its id.
    for (ssize_t i = 0; i < n && received_ + i < 8; ++i) {
      id_ |= static_cast<std::uint64_t>(static_cast<unsigned char>(bytes[i]))
             << (8 * (received_ + i));
    }
    received_ += static_cast<std::uint64_t>(n);
    auto* w = new WriteOp;
    w->bytes.assign(bytes, static_cast<std::size_t>(n));
    if (int r = stream_->write(w->bytes.data(), w->bytes.size(), w); r != 0) {
      delete w;
      return close();
    }
    soak_.ledger.start(kWrite);
    ++writes_;
    in_flight_ += static_cast<std::size_t>(n);
    if (received_ >= 8 && Soak::server_cuts(id_) && received_ >= Soak::server_cut_at(id_)) {
      return close();
    }
    if (in_flight_ > (1u << 20)) {
      backpressure_ = true;
      stream_->read_stop();
      reading_ = false;
    } else if (soak_.rng.chance(0.01)) {
      stream_->read_stop();
      reading_ = false;
      uv_timer_start(
          &pause_,
          [](uv_timer_t* t) {
            auto* c = static_cast<ServerConn*>(t->data);
            if (!c->closing_ && !c->reading_ && !c->backpressure_) c->read_start();
          },
          soak_.rng.between(1, 20), 0);
    }
  }

  void on_write(void* token, int status) override {
    soak_.ledger.finish(kWrite);
    auto* w = static_cast<WriteOp*>(token);
    if (w->done) fail("server connection: write callback twice");
    if (closed_) fail("server connection: write callback after close");
    w->done = true;
    --writes_;
    in_flight_ -= w->bytes.size();
    delete w;
    if (status != 0 && status != UV_ECANCELED && status != UV_EPIPE && status != UV_ECONNRESET) {
      fail("server connection: write: %s", uv_strerror(status));
    }
    if (status != 0) return close();
    if (backpressure_ && in_flight_ < (256u << 10) && !closing_) {
      backpressure_ = false;
      read_start();
    }
  }

  void on_shutdown(int status) override {
    soak_.ledger.finish(kShutdown);
    if (!shut_pending_) fail("server connection: shutdown callback twice");
    shut_pending_ = false;
    (void)status;  // the client may have gone; either way, close
    close();
  }

  void on_close() override {
    soak_.ledger.finish(kClose);
    if (closed_) fail("server connection: close callback twice");
    closed_ = true;
    if (writes_ != 0 || shut_pending_) {
      fail("server connection: close callback with %d writes, %d shutdown pending", writes_,
           shut_pending_);
    }
    uv_close(reinterpret_cast<uv_handle_t*>(&pause_), [](uv_handle_t* h) {
      auto* c = static_cast<ServerConn*>(h->data);
      --c->soak_.servers_alive;
      delete c->stream_;
      delete c;
    });
  }

 private:
  void read_start() {
    if (stream_->read_start() != 0) return close();
    reading_ = true;
  }

  void close() {
    if (closing_) return;
    closing_ = true;
    reading_ = false;
    uv_timer_stop(&pause_);
    if (int r = stream_->close(); r != 0) {
      fail("server connection: close: %s", uv_strerror(r));
      return;
    }
    soak_.ledger.start(kClose);
  }

  Soak& soak_;
  Stream* stream_;
  uv_timer_t pause_;
  std::uint64_t id_ = 0, received_ = 0;
  std::size_t in_flight_ = 0;
  int writes_ = 0;
  bool reading_ = false, backpressure_ = false;
  bool shut_requested_ = false, shut_pending_ = false;
  bool closing_ = false, closed_ = false;
};

void Soak::accepted(Stream* s, int status) {
  if (status != 0) {
    fail("accept: %s", uv_strerror(status));
    return;
  }
  new ServerConn(*this, s);
}

// ---- Files ------------------------------------------------------------------------

// Cycles through one file: open, write (one or two buffers), fstat, read back
// (one or two buffers; uv_cancel tried on the way), check, maybe ftruncate
// and fstat, maybe fsync, close, maybe unlink.
class FileWorker {
 public:
  FileWorker(Soak& soak, int index) : soak_(soak), rng_{soak.opt.seed ^ mix(0xf11e + index)} {
    path_ = soak.dir + "/file" + std::to_string(index);
    req_.data = this;
  }
  ~FileWorker() { ::unlink(path_.c_str()); }

  bool busy() const { return busy_; }

  void start_cycle() {
    if (busy_ || soak_.draining) return;
    busy_ = true;
    ++soak_.files_busy;
    ++soak_.stats.file_cycles;
    submit(Step::open, rp_fs_open(&soak_.loop, &req_, path_.c_str(), O_RDWR | O_CREAT | O_TRUNC,
                                  0600, &FileWorker::on_fs));
  }

 private:
  enum class Step { open, write, fstat, read, truncate, fstat_truncated, fsync, close, unlink };

  void submit(Step step, int r) {
    step_ = step;
    if (r != 0) {
      fail("file: step %d: the call failed: %s", static_cast<int>(step), uv_strerror(r));
      return end_cycle();
    }
    soak_.ledger.start(kFs);
    in_flight_ = true;
  }

  static void on_fs(uv_fs_t* req) {
    auto* self = static_cast<FileWorker*>(req->data);
    self->soak_.ledger.finish(kFs);
    ++self->soak_.stats.fs_ops;
    if (!self->in_flight_) fail("file: a callback for a request not in flight");
    self->in_flight_ = false;
    const ssize_t result = req->result;
    const uv_stat_t st = req->statbuf;
    uv_fs_req_cleanup(req);
    self->next(result, st);
  }

  uv_buf_t split(std::vector<char>& v, std::size_t at, std::size_t part) {
    return uv_buf_init(v.data() + at, static_cast<unsigned>(part));
  }

  void next(ssize_t result, const uv_stat_t& st) {
    uv_loop_t* loop = &soak_.loop;
    switch (step_) {
      case Step::open: {
        if (result < 0) {
          fail("file: open: %s%s", uv_strerror(static_cast<int>(result)), uncancelled_hint(result));
          return end_cycle();
        }
        fd_ = static_cast<uv_file>(result);
        len_ = rng_.between(1, 256 * 1024);
        wbuf_.resize(len_);
        for (std::size_t i = 0; i < len_; ++i) wbuf_[i] = static_cast<char>(mix(rng_.state + i));
        rng_.next();
        uv_buf_t b[2];
        const unsigned n = write_bufs(b);
        return submit(Step::write, rp_fs_write(loop, &req_, fd_, b, n, 0, &FileWorker::on_fs));
      }
      case Step::write:
        if (result != static_cast<ssize_t>(len_)) {
          fail("file: wrote %zd of %zu bytes", result, len_);
          return close_file();
        }
        return submit(Step::fstat, rp_fs_fstat(loop, &req_, fd_, &FileWorker::on_fs));
      case Step::fstat:
        if (result != 0 || st.st_size != len_) {
          fail("file: fstat: %zd, size %" PRIu64 " (wrote %zu)", result, st.st_size, len_);
          return close_file();
        }
        return read_back();
      case Step::read:
        if (result == UV_ECANCELED) {
          ++soak_.stats.fs_cancelled;  // uv_cancel won: read again
          return read_back();
        }
        if (result != static_cast<ssize_t>(len_) ||
            std::memcmp(rbuf_.data(), wbuf_.data(), len_) != 0) {
          fail("file: read back %zd of %zu bytes, %s", result, len_,
               result == static_cast<ssize_t>(len_) ? "different" : "short");
          return close_file();
        }
        if (rng_.chance(0.3)) {
          len_ = rng_.below(len_);
          return submit(
              Step::truncate,
              rp_fs_ftruncate(loop, &req_, fd_, static_cast<int64_t>(len_), &FileWorker::on_fs));
        }
        return maybe_fsync();
      case Step::truncate:
        if (result != 0) {
          fail("file: ftruncate: %s%s", uv_strerror(static_cast<int>(result)),
               uncancelled_hint(result));
          return close_file();
        }
        return submit(Step::fstat_truncated, rp_fs_fstat(loop, &req_, fd_, &FileWorker::on_fs));
      case Step::fstat_truncated:
        if (result != 0 || st.st_size != len_) {
          fail("file: fstat after ftruncate: %zd, size %" PRIu64 " (want %zu)", result, st.st_size,
               len_);
        }
        return maybe_fsync();
      case Step::fsync:
        if (result != 0)
          fail("file: fsync: %s%s", uv_strerror(static_cast<int>(result)),
               uncancelled_hint(result));
        return close_file();
      case Step::close:
        if (result != 0)
          fail("file: close: %s%s", uv_strerror(static_cast<int>(result)),
               uncancelled_hint(result));
        fd_ = -1;
        if (rng_.chance(0.5)) {
          return submit(Step::unlink, rp_fs_unlink(loop, &req_, path_.c_str(), &FileWorker::on_fs));
        }
        return end_cycle();
      case Step::unlink:
        if (result != 0)
          fail("file: unlink: %s%s", uv_strerror(static_cast<int>(result)),
               uncancelled_hint(result));
        return end_cycle();
    }
  }

  unsigned write_bufs(uv_buf_t* b) {
    if (len_ > 1 && rng_.chance(0.5)) {
      const std::size_t at = rng_.between(1, len_ - 1);
      b[0] = split(wbuf_, 0, at);
      b[1] = split(wbuf_, at, len_ - at);
      return 2;
    }
    b[0] = split(wbuf_, 0, len_);
    return 1;
  }

  void read_back() {
    rbuf_.assign(len_, 0);
    uv_buf_t b[2];
    unsigned n = 1;
    if (len_ > 1 && rng_.chance(0.5)) {
      const std::size_t at = rng_.between(1, len_ - 1);
      b[0] = split(rbuf_, 0, at);
      b[1] = split(rbuf_, at, len_ - at);
      n = 2;
    } else {
      b[0] = split(rbuf_, 0, len_);
    }
    submit(Step::read, rp_fs_read(&soak_.loop, &req_, fd_, b, n, 0, &FileWorker::on_fs));
    if (in_flight_ && rng_.chance(0.2)) {
      // 0 (it will complete with UV_ECANCELED), or UV_EBUSY once it runs:
      // either way its callback runs once.
      const int r = uv_cancel(reinterpret_cast<uv_req_t*>(&req_));
      if (r != 0 && r != UV_EBUSY) fail("file: uv_cancel: %s", uv_strerror(r));
    }
  }

  void maybe_fsync() {
    if (rng_.chance(0.2)) {
      return submit(Step::fsync, rp_fs_fsync(&soak_.loop, &req_, fd_, &FileWorker::on_fs));
    }
    close_file();
  }

  void close_file() {
    submit(Step::close, rp_fs_close(&soak_.loop, &req_, fd_, &FileWorker::on_fs));
  }

  void end_cycle() {
    busy_ = false;
    --soak_.files_busy;
    start_cycle();
  }

  Soak& soak_;
  Rng rng_;
  std::string path_;
  uv_fs_t req_;
  Step step_ = Step::open;
  bool busy_ = false, in_flight_ = false;
  uv_file fd_ = -1;
  std::size_t len_ = 0;
  std::vector<char> wbuf_, rbuf_;
};

// ---- Timers -----------------------------------------------------------------------

// A libuv timer re-armed with 0 to 30 ms each time it fires; now and then
// stopped before it fires (and then it must not), and started again.
class TimerActor {
 public:
  explicit TimerActor(Soak& soak) : soak_(soak) {
    uv_timer_init(&soak.loop, &timer_);
    timer_.data = this;
  }
  void arm() {
    const std::uint64_t ms = soak_.rng.below(31);
    due_ = uv_now(&soak_.loop) + ms;
    due_wall_ = Clock::now() + std::chrono::milliseconds(ms);
    armed_ = true;
    uv_timer_start(&timer_, &TimerActor::on_fire, ms, 0);
    if (soak_.rng.chance(0.1)) {
      uv_timer_stop(&timer_);
      armed_ = false;
      ++soak_.stats.timers_stopped;
      uv_timer_start(&timer_, &TimerActor::on_fire, 0, 0);  // and started afresh
      due_ = uv_now(&soak_.loop);
      due_wall_ = Clock::now();
      armed_ = true;
    }
  }
  void stop() {
    uv_timer_stop(&timer_);
    armed_ = false;
  }
  void close() {
    stop();
    uv_close(reinterpret_cast<uv_handle_t*>(&timer_), nullptr);
  }

 private:
  static void on_fire(uv_timer_t* t) {
    auto* self = static_cast<TimerActor*>(t->data);
    Soak& soak = self->soak_;
    g_progress.fetch_add(1, std::memory_order_relaxed);
    ++soak.stats.timers_fired;
    if (!self->armed_) fail("timer: a stopped timer fired");
    if (uv_now(&soak.loop) < self->due_) fail("timer: fired before it was due");
    const double late =
        std::chrono::duration<double, std::milli>(Clock::now() - self->due_wall_).count();
    soak.stats.timer_late_ms = std::max(soak.stats.timer_late_ms, late);
    // A timer a whole second late means a loop that did not wake for it.
    if (late > 1000) fail("timer: fired %.0f ms late", late);
    self->armed_ = false;
    if (!soak.draining) self->arm();
  }

  Soak& soak_;
  uv_timer_t timer_;
  std::uint64_t due_ = 0;
  Clock::time_point due_wall_;
  bool armed_ = false;
};

// ---- The run ------------------------------------------------------------------------

void Soak::start_load() {
  draining = false;
  restart_ = !restart_;
  if (opt.storm) storm(true, restart_);
  for (int i = clients_alive; i < opt.clients; ++i) spawn_client();
  for (auto& f : files_) f->start_cycle();
  for (auto& t : timers_) t->arm();
}

bool Soak::quiescent() const {
  return clients_alive == 0 && servers_alive == 0 && files_busy == 0 && ledger.balanced();
}

void Soak::checkpoint() {
  ++epoch_;
  ::malloc_trim(0);  // free memory back to the kernel: what stays is in use
  const int fds = count_fds();
  const std::uint64_t rss = rss_bytes();
  const bool last = elapsed() >= opt.seconds;
  std::fprintf(stderr,
               "soak: [%7.2fs] epoch %d: %" PRIu64 " connections (%" PRIu64 " graceful, %" PRIu64
               " cut by the client, %" PRIu64 " by the server), %.1f MiB echoed, %" PRIu64
               " fs ops (%" PRIu64 " cancelled), %" PRIu64
               " timers (at most %.1f ms late), %" PRIu64 " stops, %" PRIu64
               " signals; fds %d, rss %.1f MiB%s\n",
               elapsed(), epoch_, stats.connections, stats.graceful, stats.client_aborts,
               stats.server_aborts, stats.bytes_echoed / 1048576.0, stats.fs_ops,
               stats.fs_cancelled, stats.timers_fired, stats.timer_late_ms, stats.stops,
               g_signals.load(), fds, rss / 1048576.0, epoch_ == 1 ? " (the baseline)" : "");
  if (epoch_ == 1) {
    base_fds_ = fds;
    base_rss_ = rss;
  } else {
    if (fds != base_fds_) {
      fail("%d descriptors open at checkpoint %d, %d after the warm-up:%s", fds, epoch_, base_fds_,
           list_fds().c_str());
    }
    const std::uint64_t tolerance = (8u << 20) + base_rss_ / 10;
    if (!SOAK_SANITIZED && rss > base_rss_ + tolerance) {
      fail("RSS %.1f MiB at checkpoint %d, %.1f MiB after the warm-up (tolerance %.1f MiB)",
           rss / 1048576.0, epoch_, base_rss_ / 1048576.0, tolerance / 1048576.0);
    }
  }
  if (last) {
    finished_ = true;
  } else {
    start_load();
  }
}

// With the load stopped and a connection idle (a read in flight on each
// end), one second of rp_uv_run must cost well under a second of CPU.
void Soak::measure_idle() {
  storm(false, false);
  // One idle connection: connected, both ends reading, nothing sent.
  struct Idle final : Endpoint {
    Soak& soak;
    Stream* s = nullptr;
    bool connected = false, closed = false;
    explicit Idle(Soak& sk) : soak(sk) {}
    void on_connect(int status) override {
      soak.ledger.finish(kConnect);
      if (status != 0) fail("idle client: connect: %s", uv_strerror(status));
      connected = status == 0;
      if (connected && s->read_start() != 0) fail("idle client: read_start");
    }
    void on_read(ssize_t n, const char*) override { fail("idle client: read %zd", n); }
    void on_write(void*, int) override {}
    void on_shutdown(int) override {}
    void on_close() override {
      soak.ledger.finish(kClose);
      closed = true;
    }
  } idle(*this);
  idle.s = fe.new_stream(&loop, &router);
  if (idle.s == nullptr) return fail("idle client: no stream");
  idle.s->owner = &idle;
  if (idle.s->connect(server_addr) != 0) return fail("idle client: connect");
  ledger.start(kConnect);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while ((!idle.connected || servers_alive == 0) && Clock::now() < deadline) {
    rp_uv_run(&loop, UV_RUN_NOWAIT);
  }
  for (int i = 0; i < 10; ++i) rp_uv_run(&loop, UV_RUN_NOWAIT);  // settle

  uv_timer_t one_second;
  uv_timer_init(&loop, &one_second);
  uv_timer_start(
      &one_second, [](uv_timer_t* t) { uv_stop(t->loop); }, 1000, 0);
  rp_stats_t before{}, after{};
  rp_stats(&loop, &before);
  const double cpu_before = cpu_ms();
  const auto wall_before = Clock::now();
  rp_uv_run(&loop, UV_RUN_DEFAULT);
  const double cpu = cpu_ms() - cpu_before;
  const double wall = std::chrono::duration<double, std::milli>(Clock::now() - wall_before).count();
  rp_stats(&loop, &after);
  std::fprintf(stderr,
               "soak: idle: %.1f ms of CPU over %.0f ms of rp_uv_run, %" PRIu64 " enters, %" PRIu64
               " loop turns\n",
               cpu, wall, after.enters - before.enters, after.turns - before.turns);
  if (wall < 900) fail("idle: rp_uv_run returned after %.0f ms, before its 1 s timer", wall);
  if (cpu > 0.1 * wall)
    fail("idle: %.1f ms of CPU in %.0f ms: the loop does not go idle", cpu, wall);
  uv_close(reinterpret_cast<uv_handle_t*>(&one_second), nullptr);
  if (idle.s->close() == 0) ledger.start(kClose);
  while (!idle.closed && Clock::now() < deadline + std::chrono::seconds(10)) {
    rp_uv_run(&loop, UV_RUN_ONCE);
  }
  delete idle.s;
  while (servers_alive > 0 && Clock::now() < deadline + std::chrono::seconds(10)) {
    rp_uv_run(&loop, UV_RUN_ONCE);
  }
}

void Soak::teardown() {
  for (auto& t : timers_) t->close();
  uv_close(reinterpret_cast<uv_handle_t*>(&stopper_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&epoch_timer_), nullptr);
  bool listener_closed = false;
  if (listener_->close([&] { listener_closed = true; }) != 0) fail("listener: close");
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  while (!listener_closed && Clock::now() < deadline) rp_uv_run(&loop, UV_RUN_ONCE);
  listener_.reset();
  if (int r = rp_uv_run(&loop, UV_RUN_DEFAULT); r != 0) fail("the loop is still alive at the end");
  if (int r = rp_loop_close(&loop); r != 0) fail("rp_loop_close: %s", uv_strerror(r));
  files_.clear();
  timers_.clear();
  ::rmdir(dir.c_str());
}

int Soak::run() {
  g_start = Clock::now();
  {
    // libuv makes process-wide descriptors (its signal lock pipe) at the first
    // uv_loop_init and keeps them: count from after those.
    uv_loop_t first;
    uv_loop_init(&first);
    uv_loop_close(&first);
  }
  fds_before_loop_ = count_fds();
  char tmpl[] = "/tmp/ringpark-soak-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) {
    std::perror("soak: mkdtemp");
    return 2;
  }
  dir = tmpl;
  uv_loop_init(&loop);
  std::fprintf(stderr,
               "soak: seed %" PRIu64 " (replay with --seed %" PRIu64
               "), front end %s, backend %s, %.0f s in epochs of %.1f s, %d clients, %d file "
               "workers, %d timers, signal storm %s%s\n",
               opt.seed, opt.seed, fe.name(), rp_backend(&loop), opt.seconds, opt.epoch,
               opt.clients, opt.files, opt.timers, opt.storm ? "on" : "off",
               SOAK_SANITIZED ? " (sanitized build: RSS not checked)" : "");
  listener_.reset(
      fe.listen(&loop, &router, [this](Stream* s, int status) { accepted(s, status); }));
  if (!listener_) {
    std::fprintf(stderr, "soak: cannot listen on 127.0.0.1\n");
    return 2;
  }
  server_addr = listener_->address();
  for (int i = 0; i < opt.files; ++i) files_.push_back(std::make_unique<FileWorker>(*this, i));
  for (int i = 0; i < opt.timers; ++i) timers_.push_back(std::make_unique<TimerActor>(*this));

  // uv_stop at random moments.
  uv_timer_init(&loop, &stopper_);
  stopper_.data = this;
  uv_timer_start(
      &stopper_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Soak*>(t->data);
        ++self->stats.stops;
        uv_stop(t->loop);
        uv_timer_start(t, t->timer_cb, self->rng.between(5, 100), 0);
      },
      rng.between(5, 100), 0);
  // The end of each epoch: drain.
  uv_timer_init(&loop, &epoch_timer_);
  epoch_timer_.data = this;
  const auto epoch_ms = static_cast<std::uint64_t>(opt.epoch * 1000);
  uv_timer_start(
      &epoch_timer_, [](uv_timer_t* t) { static_cast<Soak*>(t->data)->draining = true; }, epoch_ms,
      epoch_ms);

  start_load();
  while (!finished_) {
    const std::uint64_t pick = rng.below(20);
    const uv_run_mode mode = pick < 14 ? UV_RUN_DEFAULT : pick < 19 ? UV_RUN_ONCE : UV_RUN_NOWAIT;
    rp_uv_run(&loop, mode);
    ++stats.runs;
    if (draining) {
      for (auto& t : timers_) t->stop();
      if (quiescent()) checkpoint();
    }
  }
  uv_timer_stop(&stopper_);
  uv_timer_stop(&epoch_timer_);
  measure_idle();
  teardown();

  for (int k = 0; k < kKinds; ++k) {
    if (ledger.started[k] != ledger.finished[k]) {
      fail("%" PRIu64 " %ss started, %" PRIu64 " completed", ledger.started[k], kKindNames[k],
           ledger.finished[k]);
    }
  }
  const int fds_after = count_fds();
  if (fds_after != fds_before_loop_) {
    fail("%d descriptors open after rp_loop_close, %d before the loop was made:%s", fds_after,
         fds_before_loop_, list_fds().c_str());
  }
  std::fprintf(stderr,
               "soak: %s after %.1f s: %" PRIu64 " connections, %.1f MiB echoed, %" PRIu64
               " writes, %" PRIu64 " fs ops, %" PRIu64 " timers, %" PRIu64
               " rp_uv_run calls; %d "
               "failure%s (seed %" PRIu64 ")\n",
               g_failures == 0 ? "PASS" : "FAIL", elapsed(), stats.connections,
               stats.bytes_echoed / 1048576.0, ledger.finished[kWrite], stats.fs_ops,
               stats.timers_fired, stats.runs, g_failures, g_failures == 1 ? "" : "s", opt.seed);
  return g_failures == 0 ? 0 : 1;
}

// Aborts the process, with what it knows, if nothing completes for a minute
// (a hang), or if the run overstays its length by more than five minutes.
void start_watchdog(double seconds) {
  sigset_t all, old;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &old);  // the storm is for the loop thread
  std::thread([seconds] {
    const auto hard_limit = Clock::now() + std::chrono::seconds(static_cast<long>(seconds) + 300);
    std::uint64_t last = g_progress.load();
    auto last_change = Clock::now();
    for (;;) {
      std::this_thread::sleep_for(std::chrono::seconds(1));
      const std::uint64_t now = g_progress.load();
      if (now != last) {
        last = now;
        last_change = Clock::now();
      }
      if (Clock::now() - last_change > std::chrono::seconds(60) || Clock::now() > hard_limit) {
        std::fprintf(stderr,
                     "soak: STUCK: no operation completed for 60 s (or over time), %" PRIu64
                     " completions so far; aborting\n",
                     now);
        std::abort();
      }
    }
  }).detach();
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

}  // namespace
}  // namespace soak

int main(int argc, char** argv) {
  soak::Options opt;
  if (!soak::parse(argc, argv, &opt)) {
    soak::usage(argv[0]);
    return 2;
  }
  if (!opt.seed_given) {
    opt.seed = soak::mix(
        static_cast<std::uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) ^
        static_cast<std::uint64_t>(::getpid()));
  }
  std::unique_ptr<soak::FrontEnd> fe = soak::make_front_end(opt.front_end);
  if (!fe) {
    std::fprintf(stderr, "soak: no front end %s (have: %s)\n", opt.front_end.c_str(),
                 soak::front_end_names());
    return 2;
  }
  ::signal(SIGPIPE, SIG_IGN);
  std::setvbuf(stderr, nullptr, _IOLBF, 0);
  soak::start_watchdog(opt.seconds);
  soak::Soak s(opt, *fe);
  return s.run();
}
