// What the benchmark's load generators (loadgen.cpp: TCP, udp_loadgen.cpp:
// UDP) share: errors, the clock, the latency histogram, the message pattern's
// mixer, perf's control FIFO and the CPU time of a process.
#pragma once

#include <poll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace loadgen_util {

// The program's name, for its error messages.
inline const char* g_program = "loadgen";

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "%s: error: ", g_program);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::exit(1);
}

inline uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Log-linear latency histogram in nanoseconds: exact below 128 ns, then 64
// buckets per power of two (under 1.6% error), enough for any run's range.
class Histogram {
 public:
  void record(uint64_t v) {
    ++counts_[index(v)];
    ++total_;
  }
  uint64_t total() const { return total_; }
  // The value below which a fraction q of the samples lie (bucket midpoint).
  double quantile(double q) const {
    if (total_ == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(total_ - 1)) + 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < kBuckets; ++i) {
      seen += counts_[i];
      if (seen >= rank) return midpoint(i);
    }
    return midpoint(kBuckets - 1);
  }

 private:
  static constexpr int kSubBits = 6;
  static constexpr size_t kBuckets = 64 * 60;
  static size_t index(uint64_t v) {
    if (v < (2u << kSubBits)) return static_cast<size_t>(v);
    int msb = 63 - __builtin_clzll(v);
    int e = msb - kSubBits;
    size_t i = (static_cast<size_t>(e) << kSubBits) + static_cast<size_t>(v >> e);
    return std::min(i, kBuckets - 1);
  }
  static double midpoint(size_t i) {
    if (i < (2u << kSubBits)) return static_cast<double>(i);
    size_t e = (i >> kSubBits) - 1;
    uint64_t m = (i & ((1u << kSubBits) - 1)) + (1u << kSubBits);
    return static_cast<double>(m << e) + static_cast<double>((uint64_t{1} << e) / 2);
  }
  std::vector<uint64_t> counts_ = std::vector<uint64_t>(kBuckets);
  uint64_t total_ = 0;
};

// Sends `cmd` to perf's control FIFO `ctl` and waits (5 s at most) for its
// ack on `ack`; nothing when ctl < 0.
inline void perf_command(int ctl, int ack, const char* cmd) {
  if (ctl < 0) return;
  if (write(ctl, cmd, std::strlen(cmd)) < 0)
    fail("writing to the perf control FIFO: %s", std::strerror(errno));
  pollfd p{ack, POLLIN, 0};
  if (poll(&p, 1, 5000) != 1)
    fail("perf did not acknowledge '%.*s' within 5 s", static_cast<int>(std::strlen(cmd)) - 1, cmd);
  char buf[64];
  if (read(ack, buf, sizeof buf) <= 0) fail("reading the perf ack FIFO failed");
}

// The CPU time (user + system) process `pid` has used, from /proc/PID/stat;
// 0 for pid <= 0.
inline double server_cpu_seconds(long pid) {
  if (pid <= 0) return 0;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) fail("open %s: %s", path, std::strerror(errno));
  char buf[2048];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  // Field 2 (comm) may hold spaces: count fields from the last ')'. After it:
  // state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
  // utime(14) stime(15).
  const char* p = std::strrchr(buf, ')');
  unsigned long long utime = 0, stime = 0;
  if (p == nullptr || std::sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                                  &utime, &stime) != 2)
    fail("cannot parse %s", path);
  return static_cast<double>(utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// This process's CPU time (user + system).
inline double process_cpu_seconds() {
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

}  // namespace loadgen_util
