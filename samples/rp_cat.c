/* Copies a file with rp_fs_* (libuv's uv_fs_* calls, renamed): every read and
 * write goes through the loop's ring instead of libuv's thread pool.
 *
 *   rp_cat SRC DST      copy SRC to DST (created or truncated)
 *   rp_cat SRC          write SRC to standard output
 *
 * Reads and writes alternate on one 64 KiB buffer, with explicit offsets.
 * The counters ringpark kept go to standard error. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "ringpark.h"

enum { kChunk = 64 * 1024 };

static uv_fs_t open_req, read_req, write_req, close_req;
static uv_file src = -1, dst = 1;
static int64_t offset = 0, out_offset = 0;
static char buffer[kChunk];
static uv_buf_t iov;
static int status = 0;
static const char* dst_path;

static void on_read(uv_fs_t* req);

static void fail(const char* what, ssize_t err) {
  fprintf(stderr, "rp_cat: %s: %s\n", what, uv_strerror((int)err));
  status = 1;
}

static void start_read(void) {
  iov = uv_buf_init(buffer, kChunk);
  rp_fs_read(read_req.loop, &read_req, src, &iov, 1, offset, on_read);
}

static void on_write(uv_fs_t* req) {
  ssize_t n = req->result;
  uv_fs_req_cleanup(req);
  if (n < 0) return fail("write", n);
  out_offset += n;
  if ((size_t)n < iov.len) {  /* a short write: send the rest */
    iov = uv_buf_init(iov.base + n, (unsigned)(iov.len - (size_t)n));
    rp_fs_write(req->loop, &write_req, dst, &iov, 1, dst == 1 ? -1 : out_offset, on_write);
    return;
  }
  start_read();
}

static void on_read(uv_fs_t* req) {
  ssize_t n = req->result;
  uv_fs_req_cleanup(req);
  if (n < 0) return fail("read", n);
  if (n == 0) return;  /* end of file */
  offset += n;
  iov = uv_buf_init(buffer, (unsigned)n);
  /* Standard output may be a pipe: write at its position (-1). */
  rp_fs_write(req->loop, &write_req, dst, &iov, 1, dst == 1 ? -1 : out_offset, on_write);
}

static void on_open_dst(uv_fs_t* req) {
  if (req->result < 0) {
    fail(dst_path, req->result);
  } else {
    dst = (uv_file)req->result;
    read_req.loop = req->loop;
    start_read();
  }
  uv_fs_req_cleanup(req);
}

static void on_open_src(uv_fs_t* req) {
  if (req->result < 0) {
    fail(req->path, req->result);
    uv_fs_req_cleanup(req);
    return;
  }
  src = (uv_file)req->result;
  uv_fs_req_cleanup(req);
  if (dst_path != NULL) {
    rp_fs_open(req->loop, &open_req, dst_path, O_WRONLY | O_CREAT | O_TRUNC, 0644, on_open_dst);
  } else {
    read_req.loop = req->loop;
    start_read();
  }
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s SRC [DST]\n", argv[0]);
    return 2;
  }
  dst_path = argc == 3 ? argv[2] : NULL;
  uv_loop_t* loop = uv_default_loop();
  rp_fs_open(loop, &open_req, argv[1], O_RDONLY, 0, on_open_src);
  rp_uv_run(loop, UV_RUN_DEFAULT);

  /* Closing synchronously (cb == NULL) is libuv's own call, as with uv_fs_close. */
  if (src >= 0) rp_fs_close(loop, &close_req, src, NULL);
  if (dst > 2) rp_fs_close(loop, &close_req, dst, NULL);
  rp_stats_t s;
  rp_stats(loop, &s);
  fprintf(stderr, "rp_cat: %lld bytes on %s; enters %llu, sqes %llu, cqes %llu\n",
          (long long)offset, rp_backend(loop), (unsigned long long)s.enters,
          (unsigned long long)s.sqes_submitted, (unsigned long long)s.cqes_reaped);
  if (rp_loop_close(loop) != 0) status = 1;
  return status;
}
