/* fsbench: 4 KiB random reads of one file at a fixed queue depth, through
 * libuv's uv_fs_read (its thread pool) or ringpark's rp_fs_read (the ring),
 * from the same program logic (issue 4, item 3).
 *
 *   fsbench --create FILE [--size BYTES]
 *       makes FILE (default 1 GiB) unless it already has that size: real data,
 *       written and fsync'd (fallocate alone leaves unwritten extents, which
 *       O_DIRECT reads as zeros without touching the disk)
 *   fsbench --warm FILE
 *       reads FILE once, sequentially, to put it in the page cache
 *   fsbench --mode uv|rp --qd N [--direct] [--seconds S] [--warmup S]
 *           [--count N] [--block B] FILE
 *       keeps N reads of B bytes (default 4096) at random aligned offsets in
 *       flight: each completion issues the next. After --warmup seconds
 *       (default 0.2) it counts completions for --seconds (default 1), or
 *       until --count reads have completed (no warm-up then). uv runs the loop
 *       with uv_run, rp with rp_uv_run.
 *
 * Prints one line of key=value pairs:
 *   fsbench: mode=rp qd=32 direct=0 iops=... ops=... seconds=... cpu_s=...
 *            iops_per_cpu_s=... total_ops=... enters=... enters_per_op=...
 * (cpu_s: user + system time of the whole process over the window, libuv's
 * pool threads included; total_ops: every read, warm-up included, for
 * dividing a whole-run syscall count; enters: rp_stats, rp mode only).
 * Exits 0; 3 with "O_DIRECT unsupported on this filesystem" when the file
 * system refuses O_DIRECT (EINVAL at open or at the first read); 1 on any
 * other error (a short or failed read is one). */
#define _GNU_SOURCE /* O_DIRECT */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "ringpark.h"

enum { kAlign = 4096 };

typedef struct {
  uv_fs_t req; /* first: the callback gets &req */
  uv_buf_t buf;
} read_t;

static uv_loop_t loop;
static int use_rp = 0;
static int direct = 0;
static int fd = -1;
static uint64_t blocks = 0; /* reads fit at block offsets 0 .. blocks-1 */
static size_t block = 4096;
static uint64_t rng_state = 0;
static uint64_t completed = 0; /* every read, warm-up included */
static uint64_t count_limit = 0;
static int stopping = 0;
static int failed = 0;
static unsigned inflight = 0;

/* Window bookkeeping. */
static uint64_t ops_at_start = 0, ops_at_end = 0;
static double t_start = 0, t_end = 0, cpu_start = 0, cpu_end = 0;
static uint64_t enters_start = 0, enters_end = 0;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru); /* every thread of the process */
  return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
         (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static uint64_t enters_now(void) {
  rp_stats_t s;
  if (!use_rp || rp_stats(&loop, &s) != 0) return 0;
  return s.enters;
}

static uint64_t next_offset(void) {
  /* xorshift64*: uniform enough, and the same cost in both modes. */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return ((rng_state * 0x2545F4914F6CDD1DULL) % blocks) * block;
}

static void window_begin(void) {
  ops_at_start = completed;
  t_start = now_s();
  cpu_start = cpu_s();
  enters_start = enters_now();
}

static void window_end(void) {
  ops_at_end = completed;
  t_end = now_s();
  cpu_end = cpu_s();
  enters_end = enters_now();
  stopping = 1;
}

static void on_read(uv_fs_t* req);

static void issue(read_t* r) {
  int64_t off = (int64_t)next_offset();
  int e = use_rp ? rp_fs_read(&loop, &r->req, fd, &r->buf, 1, off, on_read)
                 : uv_fs_read(&loop, &r->req, fd, &r->buf, 1, off, on_read);
  if (e != 0) {
    fprintf(stderr, "fsbench: %s: %s\n", use_rp ? "rp_fs_read" : "uv_fs_read", uv_strerror(e));
    failed = 1;
    stopping = 1;
    return;
  }
  inflight++;
}

static void on_read(uv_fs_t* req) {
  read_t* r = (read_t*)req;
  ssize_t res = req->result;
  uv_fs_req_cleanup(req);
  inflight--;
  if (res != (ssize_t)block) {
    if (res == UV_EINVAL && direct && completed == 0) {
      printf("fsbench: O_DIRECT unsupported on this filesystem (read: EINVAL)\n");
      exit(3);
    }
    fprintf(stderr, "fsbench: read returned %zd (%s), wanted %zu\n", res,
            res < 0 ? uv_strerror((int)res) : "short", block);
    failed = 1;
    stopping = 1;
    return;
  }
  completed++;
  if (count_limit > 0 && completed == count_limit) window_end();
  if (!stopping) issue(r);
}

static uv_timer_t warm_timer, end_timer;

static void on_end(uv_timer_t* t) {
  (void)t;
  if (!stopping) window_end();
  uv_close((uv_handle_t*)&warm_timer, NULL);
  uv_close((uv_handle_t*)&end_timer, NULL);
}
static void on_warm(uv_timer_t* t) {
  (void)t;
  window_begin();
}

/* ---- --create and --warm ---------------------------------------------------- */

static int create_file(const char* path, uint64_t size) {
  struct stat st;
  if (stat(path, &st) == 0 && (uint64_t)st.st_size == size) return 0;
  int f = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (f < 0) {
    fprintf(stderr, "fsbench: create %s: %s\n", path, strerror(errno));
    return 1;
  }
  /* Reserve the space first so a full disk fails at once, then write real data. */
  int e = posix_fallocate(f, 0, (off_t)size);
  if (e != 0 && e != EOPNOTSUPP && e != EINVAL) {
    fprintf(stderr, "fsbench: fallocate %s: %s\n", path, strerror(e));
    close(f);
    unlink(path);
    return 1;
  }
  enum { kChunk = 1 << 20 };
  char* chunk = malloc(kChunk);
  uint64_t x = 0x9E3779B97F4A7C15ULL;
  for (uint64_t done = 0; done < size;) {
    for (size_t i = 0; i < kChunk / 8; i++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      memcpy(chunk + i * 8, &x, 8);
    }
    size_t n = size - done < kChunk ? (size_t)(size - done) : kChunk;
    ssize_t w = pwrite(f, chunk, n, (off_t)done);
    if (w <= 0) {
      fprintf(stderr, "fsbench: write %s: %s\n", path, w < 0 ? strerror(errno) : "short");
      free(chunk);
      close(f);
      unlink(path);
      return 1;
    }
    done += (uint64_t)w;
  }
  free(chunk);
  if (fsync(f) != 0 || close(f) != 0) {
    fprintf(stderr, "fsbench: fsync %s: %s\n", path, strerror(errno));
    return 1;
  }
  return 0;
}

static int warm_file(const char* path) {
  int f = open(path, O_RDONLY | O_CLOEXEC);
  if (f < 0) {
    fprintf(stderr, "fsbench: open %s: %s\n", path, strerror(errno));
    return 1;
  }
  enum { kChunk = 1 << 20 };
  char* chunk = malloc(kChunk);
  ssize_t n;
  while ((n = read(f, chunk, kChunk)) > 0) {
  }
  free(chunk);
  close(f);
  return n < 0 ? 1 : 0;
}

/* ---- main ------------------------------------------------------------------- */

static void usage(void) {
  fprintf(stderr,
          "usage: fsbench --create FILE [--size BYTES]\n"
          "       fsbench --warm FILE\n"
          "       fsbench --mode uv|rp --qd N [--direct] [--seconds S] [--warmup S]\n"
          "               [--count N] [--block B] FILE\n");
  exit(2);
}

int main(int argc, char** argv) {
  const char *path = NULL, *mode = NULL;
  int qd = 0, do_create = 0, do_warm = 0;
  double seconds = 1.0, warmup = 0.2;
  uint64_t size = 1ULL << 30;
  for (int i = 1; i < argc; i++) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--create") == 0) {
      do_create = 1;
    } else if (strcmp(a, "--warm") == 0) {
      do_warm = 1;
    } else if (strcmp(a, "--direct") == 0) {
      direct = 1;
    } else if (v != NULL && strcmp(a, "--mode") == 0) {
      mode = v, i++;
    } else if (v != NULL && strcmp(a, "--qd") == 0) {
      qd = atoi(v), i++;
    } else if (v != NULL && strcmp(a, "--seconds") == 0) {
      seconds = atof(v), i++;
    } else if (v != NULL && strcmp(a, "--warmup") == 0) {
      warmup = atof(v), i++;
    } else if (v != NULL && strcmp(a, "--count") == 0) {
      count_limit = strtoull(v, NULL, 10), i++;
    } else if (v != NULL && strcmp(a, "--size") == 0) {
      size = strtoull(v, NULL, 10), i++;
    } else if (v != NULL && strcmp(a, "--block") == 0) {
      block = (size_t)strtoul(v, NULL, 10), i++;
    } else if (a[0] != '-' && path == NULL) {
      path = a;
    } else {
      usage();
    }
  }
  if (path == NULL) usage();
  if (do_create) return create_file(path, size);
  if (do_warm) return warm_file(path);
  if (mode == NULL || qd <= 0 || seconds <= 0 || warmup < 0 || block == 0 ||
      (block % kAlign != 0 && direct))
    usage();
  if (strcmp(mode, "rp") == 0)
    use_rp = 1;
  else if (strcmp(mode, "uv") != 0)
    usage();

  fd = open(path, O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd < 0) {
    if (direct && errno == EINVAL) {
      printf("fsbench: O_DIRECT unsupported on this filesystem (open: EINVAL)\n");
      return 3;
    }
    fprintf(stderr, "fsbench: open %s: %s\n", path, strerror(errno));
    return 1;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || (uint64_t)st.st_size < block) {
    fprintf(stderr, "fsbench: %s is smaller than one read\n", path);
    return 1;
  }
  blocks = (uint64_t)st.st_size / block;
  rng_state = (uint64_t)now_s() * 1000003ULL ^ (uint64_t)getpid() << 20 ^ 0x9E3779B97F4A7C15ULL;

  if (uv_loop_init(&loop) != 0) return 1;
  read_t* reads = calloc((size_t)qd, sizeof *reads);
  if (reads == NULL) return 1;
  for (int i = 0; i < qd; i++) {
    void* mem = NULL;
    /* Aligned for O_DIRECT; the same buffers in both modes. Each stays valid
     * until the loop is done, so outlives every read the kernel may fill. */
    if (posix_memalign(&mem, kAlign, block) != 0) return 1;
    memset(mem, 0, block);
    reads[i].buf = uv_buf_init(mem, (unsigned)block);
  }

  if (use_rp) rp_backend(&loop); /* sets up the ring before the clock starts */
  uv_update_time(&loop);
  if (count_limit == 0) {
    uv_timer_init(&loop, &warm_timer);
    uv_timer_init(&loop, &end_timer);
    uv_timer_start(&warm_timer, on_warm, (uint64_t)(warmup * 1000), 0);
    uv_timer_start(&end_timer, on_end, (uint64_t)((warmup + seconds) * 1000), 0);
  }
  if (count_limit > 0) window_begin();
  for (int i = 0; i < qd && !stopping; i++) issue(&reads[i]);

  int r = use_rp ? rp_uv_run(&loop, UV_RUN_DEFAULT) : uv_run(&loop, UV_RUN_DEFAULT);
  if (failed || r != 0 || inflight != 0 || t_end <= t_start) {
    fprintf(stderr, "fsbench: failed (run %d, %u in flight)\n", r, inflight);
    return 1;
  }
  double secs = t_end - t_start, cpu = cpu_end - cpu_start;
  uint64_t ops = ops_at_end - ops_at_start;
  uint64_t enters = enters_end - enters_start;
  printf(
      "fsbench: mode=%s qd=%d direct=%d iops=%.0f ops=%llu seconds=%.3f cpu_s=%.3f "
      "iops_per_cpu_s=%.0f total_ops=%llu",
      mode, qd, direct, (double)ops / secs, (unsigned long long)ops, secs, cpu,
      cpu > 0 ? (double)ops / cpu : 0.0, (unsigned long long)completed);
  if (use_rp)
    printf(" enters=%llu enters_per_op=%.4f backend=%s", (unsigned long long)enters,
           ops ? (double)enters / (double)ops : 0.0, rp_backend(&loop));
  printf("\n");
  for (int i = 0; i < qd; i++) free(reads[i].buf.base);
  free(reads);
  close(fd);
  int closed = use_rp ? rp_loop_close(&loop) : uv_loop_close(&loop);
  if (closed != 0) fprintf(stderr, "fsbench: loop close: %s\n", uv_strerror(closed));
  return closed != 0;
}
