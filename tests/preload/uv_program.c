/* An ordinary libuv program, built without ringpark (it links libuv only):
 * first a chain of asynchronous file requests (uv_fs_mkdir, open, write, fsync,
 * fdatasync, ftruncate, fstat, read, close, stat, lstat, rename, unlink, each
 * started from the previous one's callback, then a synchronous uv_fs_stat and
 * uv_fs_rmdir), then a TCP echo round trip over 127.0.0.1, bounded by a
 * uv_timer; both run with uv_run(UV_RUN_DEFAULT). preload_test.sh runs it
 * plain and with libringpark-preload.so in LD_PRELOAD.
 *
 * It prints "fs: ok" after correct file results, and looks ringpark up at run
 * time (dlsym(RTLD_DEFAULT)), since it has no link dependency on it. If found,
 * it prints what the file requests added to the loop's counters:
 *   ringpark fs requests: 13 sqes: N cqes: N
 * and at the end
 *   ringpark backend: <name>
 *   ringpark turns: N enters: N cqes: N
 * or, without ringpark,
 *   ringpark: absent
 * Exits 0 after correct file results and a correct echo, 1 otherwise.
 *
 * `uv_program --probe-io-uring` instead asks the kernel directly whether this
 * process may set up an io_uring (exit 0), or says why not (exit 1), so that the
 * test can tell "io_uring unavailable here" from "ringpark chose wrongly". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <uv.h>

/* ringpark.h's rp_stats_t, declared here so as not to depend on ringpark. */
typedef struct {
  uint64_t turns;
  uint64_t enters;
  uint64_t sqes_submitted;
  uint64_t cqes_reaped;
} stats_t;
typedef const char* (*backend_fn)(uv_loop_t*);
typedef int (*stats_fn)(uv_loop_t*, stats_t*);

static const char kMessage[] = "echo through an unmodified libuv program";

static uv_loop_t* loop;
static uv_tcp_t server, client, accepted;
static uv_connect_t connect_req;
static uv_write_t client_write, echo_write;
static uv_timer_t limit;
static char read_buf[256];
static char echo_buf[256];
static char received[256];
static size_t received_len;
static int failed;

static void fail(const char* what, int status) {
  fprintf(stderr, "uv_program: %s: %s\n", what, uv_strerror(status));
  failed = 1;
  uv_stop(loop);
}

static void on_alloc(uv_handle_t* h, size_t size, uv_buf_t* buf) {
  (void)h;
  (void)size;
  *buf = uv_buf_init(read_buf, sizeof read_buf);
}

static void on_server_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf);

static void on_echo_written(uv_write_t* req, int status) {
  if (status < 0) {
    fail("echo write", status);
    return;
  }
  uv_read_start(req->handle, on_alloc, on_server_read);
}

static void on_server_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  uv_buf_t out;
  int r;
  if (n == UV_EOF) {
    uv_close((uv_handle_t*)s, NULL);
    return;
  }
  if (n < 0) {
    fail("server read", (int)n);
    return;
  }
  if (n == 0) return;
  /* One echo write at a time, so echo_buf stays put while libuv holds it. */
  memcpy(echo_buf, buf->base, (size_t)n);
  uv_read_stop(s);
  out = uv_buf_init(echo_buf, (unsigned)n);
  r = uv_write(&echo_write, s, &out, 1, on_echo_written);
  if (r < 0) fail("uv_write (echo)", r);
}

static void on_connection(uv_stream_t* srv, int status) {
  int r;
  if (status < 0) {
    fail("connection", status);
    return;
  }
  uv_tcp_init(loop, &accepted);
  r = uv_accept(srv, (uv_stream_t*)&accepted);
  if (r == 0) r = uv_read_start((uv_stream_t*)&accepted, on_alloc, on_server_read);
  if (r < 0) fail("accept", r);
}

static void on_client_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  if (n < 0) {
    fail("client read", (int)n);
    return;
  }
  if (received_len + (size_t)n > sizeof received) {
    fprintf(stderr, "uv_program: more came back than was sent\n");
    failed = 1;
    uv_stop(loop);
    return;
  }
  memcpy(received + received_len, buf->base, (size_t)n);
  received_len += (size_t)n;
  if (received_len >= sizeof kMessage - 1) {
    /* Done: closing the client sends FIN, on which the server closes its end. */
    uv_close((uv_handle_t*)s, NULL);
    uv_close((uv_handle_t*)&server, NULL);
    uv_close((uv_handle_t*)&limit, NULL);
  }
}

static void on_client_written(uv_write_t* req, int status) {
  (void)req;
  if (status < 0) fail("client write", status);
}

static void on_connect(uv_connect_t* req, int status) {
  uv_buf_t out;
  int r;
  if (status < 0) {
    fail("connect", status);
    return;
  }
  out = uv_buf_init((char*)kMessage, sizeof kMessage - 1);
  r = uv_write(&client_write, req->handle, &out, 1, on_client_written);
  if (r == 0) r = uv_read_start(req->handle, on_alloc, on_client_read);
  if (r < 0) fail("client write/read start", r);
}

static void on_limit(uv_timer_t* t) {
  (void)t;
  fprintf(stderr, "uv_program: no round trip within 10 s (%zu of %zu bytes back)\n", received_len,
          sizeof kMessage - 1);
  failed = 1;
  uv_stop(loop);
}

static void close_any(uv_handle_t* h, void* arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* ---- Asynchronous file requests ---------------------------------------- */

static const char kFileData[] = "file data through uv_fs_*";
enum { kFsRequests = 13 };

static struct {
  char dir[64];
  char sub[96];
  char path[128];
  char moved[128];
  uv_fs_t req;
  uv_buf_t buf;
  char in[64];
  uv_file file;
  int step;
  int64_t size;
  int failed;
} fsw;

static void fs_fail(const char* what, int result) {
  fprintf(stderr, "uv_program: %s (step %d): %s\n", what, fsw.step, uv_strerror(result));
  fsw.failed = 1;
}

/* One request per callback: each starts the next. */
static void fs_step(uv_fs_t* req) {
  uv_loop_t* l = req->loop;
  ssize_t result = req->result;
  uv_fs_type type = req->fs_type;
  int r = 0;
  if (type == UV_FS_FSTAT && result == 0) fsw.size = (int64_t)req->statbuf.st_size;
  uv_fs_req_cleanup(req);
  if (result < 0) {
    fs_fail("file request", (int)result);
    return;
  }
  if (type == UV_FS_OPEN) fsw.file = (uv_file)result;
  if (type == UV_FS_READ) fsw.in[result] = '\0';
  if (type == UV_FS_WRITE && result != (ssize_t)(sizeof kFileData - 1)) {
    fprintf(stderr, "uv_program: short write (%zd)\n", result);
    fsw.failed = 1;
    return;
  }
  switch (++fsw.step) {
    case 1:
      r = uv_fs_open(l, req, fsw.path, O_RDWR | O_CREAT | O_TRUNC, 0600, fs_step);
      break;
    case 2:
      fsw.buf = uv_buf_init((char*)kFileData, sizeof kFileData - 1);
      r = uv_fs_write(l, req, fsw.file, &fsw.buf, 1, 0, fs_step);
      break;
    case 3:
      r = uv_fs_fsync(l, req, fsw.file, fs_step);
      break;
    case 4:
      r = uv_fs_fdatasync(l, req, fsw.file, fs_step);
      break;
    case 5:
      r = uv_fs_ftruncate(l, req, fsw.file, 9, fs_step); /* "file data" */
      break;
    case 6:
      r = uv_fs_fstat(l, req, fsw.file, fs_step);
      break;
    case 7:
      fsw.buf = uv_buf_init(fsw.in, sizeof fsw.in - 1);
      r = uv_fs_read(l, req, fsw.file, &fsw.buf, 1, 0, fs_step);
      break;
    case 8:
      r = uv_fs_close(l, req, fsw.file, fs_step);
      break;
    case 9:
      r = uv_fs_stat(l, req, fsw.path, fs_step);
      break;
    case 10:
      r = uv_fs_lstat(l, req, fsw.path, fs_step);
      break;
    case 11:
      r = uv_fs_rename(l, req, fsw.path, fsw.moved, fs_step);
      break;
    case 12:
      r = uv_fs_unlink(l, req, fsw.moved, fs_step);
      break;
    default:
      return; /* all 13 done */
  }
  if (r < 0) fs_fail("starting a file request", r);
}

/* Runs the chain on `loop`; returns 0 when every result was right. */
static int run_file_requests(stats_fn stats) {
  stats_t before, after;
  int r;
  memset(&before, 0, sizeof before);
  memset(&after, 0, sizeof after);
  strcpy(fsw.dir, "/tmp/ringpark-preload-XXXXXX");
  if (mkdtemp(fsw.dir) == NULL) {
    perror("uv_program: mkdtemp");
    return 1;
  }
  snprintf(fsw.sub, sizeof fsw.sub, "%s/sub", fsw.dir);
  snprintf(fsw.path, sizeof fsw.path, "%s/file", fsw.sub);
  snprintf(fsw.moved, sizeof fsw.moved, "%s/moved", fsw.sub);
  if (stats != NULL) stats(loop, &before);

  r = uv_fs_mkdir(loop, &fsw.req, fsw.sub, 0700, fs_step);
  if (r < 0) fs_fail("uv_fs_mkdir", r);
  r = uv_run(loop, UV_RUN_DEFAULT);
  if (r != 0) {
    fprintf(stderr, "uv_program: uv_run returned %d after the file requests\n", r);
    fsw.failed = 1;
  }
  if (!fsw.failed && fsw.step != kFsRequests) {
    fprintf(stderr, "uv_program: the file chain stopped after %d of %d requests\n", fsw.step,
            kFsRequests);
    fsw.failed = 1;
  }
  if (!fsw.failed && (fsw.size != 9 || strcmp(fsw.in, "file data") != 0)) {
    fprintf(stderr, "uv_program: read back \"%s\" from a file of %lld bytes\n", fsw.in,
            (long long)fsw.size);
    fsw.failed = 1;
  }
  /* Synchronous requests (cb == NULL) stay libuv's: the file is gone, the
   * directory is there and empty. */
  r = uv_fs_stat(loop, &fsw.req, fsw.moved, NULL);
  uv_fs_req_cleanup(&fsw.req);
  if (r != UV_ENOENT) fs_fail("synchronous uv_fs_stat of the unlinked file", r);
  r = uv_fs_stat(loop, &fsw.req, fsw.sub, NULL);
  uv_fs_req_cleanup(&fsw.req);
  if (r != 0) fs_fail("synchronous uv_fs_stat", r);
  r = uv_fs_rmdir(loop, &fsw.req, fsw.sub, NULL);
  uv_fs_req_cleanup(&fsw.req);
  if (r != 0) fs_fail("synchronous uv_fs_rmdir", r);
  rmdir(fsw.dir);

  printf("fs: %s\n", fsw.failed ? "failed" : "ok");
  if (stats != NULL) {
    stats(loop, &after);
    printf("ringpark fs requests: %d sqes: %llu cqes: %llu\n", kFsRequests,
           (unsigned long long)(after.sqes_submitted - before.sqes_submitted),
           (unsigned long long)(after.cqes_reaped - before.cqes_reaped));
  }
  return fsw.failed;
}

static int probe_io_uring(void) {
  struct io_uring_params params;
  long fd;
  memset(&params, 0, sizeof params);
  fd = syscall(__NR_io_uring_setup, 4, &params);
  if (fd < 0) {
    printf("io_uring_setup: %s\n", strerrorname_np(errno));
    return 1;
  }
  close((int)fd);
  printf("io_uring_setup: ok\n");
  return 0;
}

int main(int argc, char** argv) {
  struct sockaddr_in addr;
  int len = sizeof addr;
  int r;
  backend_fn backend;
  stats_fn stats;
  int fs_failed;

  if (argc > 1 && strcmp(argv[1], "--probe-io-uring") == 0) return probe_io_uring();
  if (argc > 1) {
    fprintf(stderr, "usage: %s [--probe-io-uring]\n", argv[0]);
    return 2;
  }

  loop = uv_default_loop();
  /* Ringpark, if something put it in this process. */
  backend = (backend_fn)dlsym(RTLD_DEFAULT, "rp_backend");
  stats = (stats_fn)dlsym(RTLD_DEFAULT, "rp_stats");
  if (backend == NULL) stats = NULL;
  fs_failed = run_file_requests(stats);

  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, &server);
  r = uv_tcp_bind(&server, (const struct sockaddr*)&addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t*)&server, 8, on_connection);
  if (r == 0) r = uv_tcp_getsockname(&server, (struct sockaddr*)&addr, &len);
  if (r < 0) {
    fprintf(stderr, "uv_program: listen on 127.0.0.1: %s\n", uv_strerror(r));
    return 1;
  }
  uv_tcp_init(loop, &client);
  r = uv_tcp_connect(&connect_req, &client, (const struct sockaddr*)&addr, on_connect);
  if (r < 0) {
    fprintf(stderr, "uv_program: connect: %s\n", uv_strerror(r));
    return 1;
  }
  /* Referenced, so it bounds the run; closed once the echo is back. */
  uv_timer_init(loop, &limit);
  uv_timer_start(&limit, on_limit, 10000, 0);

  r = uv_run(loop, UV_RUN_DEFAULT);
  if (!failed && r != 0) {
    fprintf(stderr, "uv_program: uv_run returned %d with nothing left to do\n", r);
    failed = 1;
  }
  if (!failed &&
      (received_len != sizeof kMessage - 1 || memcmp(received, kMessage, received_len) != 0)) {
    fprintf(stderr, "uv_program: got back \"%.*s\"\n", (int)received_len, received);
    failed = 1;
  }
  printf("echo: %s\n", failed ? "failed" : "ok");

  if (backend != NULL && stats != NULL) {
    stats_t s;
    memset(&s, 0, sizeof s);
    if (stats(loop, &s) != 0) {
      fprintf(stderr, "uv_program: rp_stats failed\n");
      failed = 1;
    }
    printf("ringpark backend: %s\n", backend(loop));
    printf("ringpark turns: %llu enters: %llu cqes: %llu\n", (unsigned long long)s.turns,
           (unsigned long long)s.enters, (unsigned long long)s.cqes_reaped);
  } else {
    printf("ringpark: absent\n");
  }

  /* A tidy exit: every handle closed, then the loop. */
  uv_walk(loop, close_any, NULL);
  uv_run(loop, UV_RUN_DEFAULT);
  r = uv_loop_close(loop);
  if (r != 0) {
    fprintf(stderr, "uv_program: uv_loop_close: %s\n", uv_strerror(r));
    failed = 1;
  }
  fflush(stdout);
  return failed || fs_failed ? 1 : 0;
}
