/* uv_udp_echo_server: a UDP request/response (echo) server written the way an
 * ordinary libuv program writes one, for the datagram benchmark (issue 10).
 *
 * Every datagram that arrives on 127.0.0.1:PORT goes back to its sender,
 * byte for byte, with uv_udp_send. alloc_cb mallocs a buffer for every
 * receive, as libuv's examples do; the send request and its bytes live in one
 * allocation that the send callback frees.
 *
 *   uv_udp_echo_server [--port P]         natural libuv on uv_run
 *   uv_udp_echo_server --mmsg [...]       uv_udp_init_ex(..., UV_UDP_RECVMMSG):
 *                                         one 20 x 64 KiB buffer per receive,
 *                                         filled by recvmmsg(2) with up to 20
 *                                         datagrams (each echoed from a copy:
 *                                         the big buffer is freed at the
 *                                         UV_UDP_MMSG_FREE callback)
 *   uv_udp_echo_server --rp [...]         the same program, rp_uv_run instead
 *                                         of uv_run
 *   LD_PRELOAD=libringpark-preload.so uv_udp_echo_server [...]
 *                                         unchanged, uv_run interposed
 *
 * Without --mmsg the received buffer itself is echoed: it was malloc'd with
 * room for the send request in front of it. Prints
 * "uv_udp_echo_server: listening on 127.0.0.1:PORT (...)" once bound; on
 * SIGTERM or SIGINT it closes its handles, prints its counts (datagrams
 * echoed, receive errors, send errors, truncated datagrams, sends refused
 * because the client had gone (ECONNREFUSED) and sends still queued at close
 * (ECANCELED)) and ringpark's
 * counters if ringpark ran the loop, and exits 0. */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "ringpark.h"

enum { kMmsgWidth = 20, kMaxDatagram = 64 * 1024 };

/* A send request and the bytes it sends, in one allocation. Without --mmsg the
 * receive buffer is `data` of one of these, so a datagram is echoed without a
 * copy. */
typedef struct {
  uv_udp_send_t req;
  uv_buf_t buf;
  char data[];
} block_t;

static int use_mmsg = 0;
static int use_rp = 0;
static uv_udp_t server;
static uv_signal_t sigterm_handle, sigint_handle;
static unsigned long long echoed = 0, recv_errors = 0, send_errors = 0, truncated = 0;
static unsigned long long refused = 0, cancelled = 0;

static block_t* block_of(char* data) { return (block_t*)(data - offsetof(block_t, data)); }

static void alloc_cb(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)h;
  if (use_mmsg) {
    /* Room for several datagrams only if libuv will use recvmmsg. */
    size_t size = uv_udp_using_recvmmsg(&server) ? (size_t)kMmsgWidth * kMaxDatagram : suggested;
    buf->base = malloc(size);
    buf->len = buf->base != NULL ? size : 0;
    return;
  }
  block_t* b = malloc(sizeof *b + suggested);
  *buf = b != NULL ? uv_buf_init(b->data, (unsigned)suggested) : uv_buf_init(NULL, 0);
}

static void sent_cb(uv_udp_send_t* req, int status) {
  /* A client that went away: its port answers unreachable. */
  if (status == UV_ECONNREFUSED) {
    refused++;
  } else if (status == UV_ECANCELED) {
    cancelled++; /* still queued when the handle closed */
  } else if (status < 0) {
    fprintf(stderr, "uv_udp_echo_server: send: %s\n", uv_strerror(status));
    send_errors++;
  }
  free(req); /* the block: req is its first member */
}

static void echo(uv_udp_t* handle, block_t* b, size_t len, const struct sockaddr* addr) {
  b->buf = uv_buf_init(b->data, (unsigned)len);
  if (uv_udp_send(&b->req, handle, &b->buf, 1, addr, sent_cb) != 0) {
    send_errors++;
    free(b);
    return;
  }
  echoed++;
}

static void recv_cb(uv_udp_t* handle, ssize_t nread, const uv_buf_t* buf,
                    const struct sockaddr* addr, unsigned flags) {
  if (use_mmsg) {
    /* Chunks live in the big buffer, freed by the UV_UDP_MMSG_FREE call (or by
     * a call without a chunk: nothing to read, or an error). */
    if (nread > 0 || (nread == 0 && addr != NULL)) {
      if (flags & UV_UDP_PARTIAL) truncated++;
      block_t* b = malloc(sizeof *b + (size_t)nread);
      if (b == NULL) {
        send_errors++;
      } else {
        memcpy(b->data, buf->base, (size_t)nread);
        echo(handle, b, (size_t)nread, addr);
      }
    } else if (nread < 0) {
      recv_errors++;
    }
    if (!(flags & UV_UDP_MMSG_CHUNK)) free(buf->base);
    return;
  }
  if (nread < 0) recv_errors++;
  if (nread > 0 || (nread == 0 && addr != NULL)) {
    /* A datagram (possibly empty): echo the buffer it came in. */
    if (flags & UV_UDP_PARTIAL) truncated++;
    echo(handle, block_of(buf->base), (size_t)nread, addr);
    return;
  }
  /* Nothing more to read now, or an error: the buffer goes back. */
  if (buf->base != NULL) free(block_of(buf->base));
}

static void on_signal(uv_signal_t* h, int signum) {
  (void)h;
  (void)signum;
  uv_close((uv_handle_t*)&sigterm_handle, NULL);
  uv_close((uv_handle_t*)&sigint_handle, NULL);
  uv_close((uv_handle_t*)&server, NULL);
}

int main(int argc, char** argv) {
  int port = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--mmsg") == 0) {
      use_mmsg = 1;
    } else if (strcmp(argv[i], "--rp") == 0) {
      use_rp = 1;
    } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = atoi(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--mmsg] [--rp] [--port P]\n", argv[0]);
      return 2;
    }
  }

  uv_loop_t* loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  int r = uv_udp_init_ex(loop, &server, AF_INET | (use_mmsg ? UV_UDP_RECVMMSG : 0));
  if (r == 0) r = uv_udp_bind(&server, (const struct sockaddr*)&addr, 0);
  if (r == 0) r = uv_udp_recv_start(&server, alloc_cb, recv_cb);
  if (r != 0) {
    fprintf(stderr, "uv_udp_echo_server: bind to port %d: %s\n", port, uv_strerror(r));
    return 1;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_udp_getsockname(&server, (struct sockaddr*)&bound, &len);
  uv_signal_init(loop, &sigterm_handle);
  uv_signal_start(&sigterm_handle, on_signal, SIGTERM);
  uv_signal_init(loop, &sigint_handle);
  uv_signal_start(&sigint_handle, on_signal, SIGINT);

  printf(
      "uv_udp_echo_server: listening on 127.0.0.1:%d (%s, %s)\n",
      ntohs(((struct sockaddr_in*)&bound)->sin_port),
      use_mmsg ? (uv_udp_using_recvmmsg(&server) ? "recvmmsg" : "recvmmsg unavailable") : "recvmsg",
      use_rp ? "rp_uv_run" : "uv_run");
  fflush(stdout);

  r = use_rp ? rp_uv_run(loop, UV_RUN_DEFAULT) : uv_run(loop, UV_RUN_DEFAULT);

  printf(
      "uv_udp_echo_server: echoed=%llu recv_errors=%llu send_errors=%llu truncated=%llu "
      "refused=%llu cancelled=%llu\n",
      echoed, recv_errors, send_errors, truncated, refused, cancelled);
  /* Under rp_uv_run, or uv_run interposed by the preload, ringpark counted
   * its work; on plain uv_run it never saw the loop and reads as zeros. */
  rp_stats_t s;
  if (rp_stats(loop, &s) == 0 && s.turns > 0) {
    printf("uv_udp_echo_server: rp_stats turns=%llu enters=%llu sqes=%llu cqes=%llu backend=%s\n",
           (unsigned long long)s.turns, (unsigned long long)s.enters,
           (unsigned long long)s.sqes_submitted, (unsigned long long)s.cqes_reaped,
           rp_backend(loop));
  }
  int closed = use_rp ? rp_loop_close(loop) : uv_loop_close(loop);
  if (r != 0 || closed != 0) {
    fprintf(stderr, "uv_udp_echo_server: run returned %d, loop close %s\n", r,
            closed ? uv_strerror(closed) : "ok");
    return 1;
  }
  return 0;
}
