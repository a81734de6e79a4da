/* uv_echo_server: the libuv contender of the echo benchmark (issue 4).
 *
 * A TCP echo server on 127.0.0.1 written the way libuv's own examples write
 * one: alloc_cb mallocs a buffer for every read, and every read becomes one
 * uv_write whose callback frees it. The same source runs four ways:
 *
 *   uv_echo_server [--port P]          natural libuv on uv_run
 *   uv_echo_server --pool [--port P]   buffers from a free list: no malloc per read
 *   uv_echo_server --rp [...]          the same program, rp_uv_run instead of uv_run
 *   LD_PRELOAD=libringpark-preload.so uv_echo_server [...]
 *                                      unchanged, uv_run interposed by ringpark
 *
 * Accepted sockets get TCP_NODELAY (as every contender's do), so pipelined
 * echoes are not held back by Nagle's algorithm. Prints
 * "uv_echo_server: listening on 127.0.0.1:PORT (...)" once it accepts; on
 * SIGTERM or SIGINT it closes every handle, prints ringpark's counters if
 * ringpark ran the loop (rp_uv_run or the preload), and exits 0. */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "ringpark.h"

typedef struct conn_s {
  uv_tcp_t tcp;
  struct conn_s* prev;
  struct conn_s* next;
} conn_t;

/* One read's buffer and the write that echoes it, in one allocation. */
typedef struct block_s {
  uv_write_t req;
  uv_buf_t buf;
  struct block_s* next_free; /* --pool: the free list */
  char data[];
} block_t;

static int use_pool = 0;
static int use_rp = 0;
static uv_tcp_t server;
static uv_signal_t sigterm_handle, sigint_handle;
static conn_t conns = {.prev = &conns, .next = &conns}; /* open connections */
static block_t* free_blocks = NULL;
static size_t block_data_size = 0;

static block_t* block_of(char* data) { return (block_t*)(data - offsetof(block_t, data)); }

/* Natural: a malloc per read, as in libuv's examples. Pool: reuse a block. */
static void alloc_cb(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)h;
  block_t* b;
  if (use_pool && free_blocks != NULL) {
    b = free_blocks;
    free_blocks = b->next_free;
  } else {
    if (use_pool) suggested = block_data_size;
    b = malloc(sizeof *b + suggested);
    if (b == NULL) {
      *buf = uv_buf_init(NULL, 0); /* read_cb gets UV_ENOBUFS */
      return;
    }
  }
  *buf = uv_buf_init(b->data, (unsigned)(use_pool ? block_data_size : suggested));
}

static void release(block_t* b) {
  if (use_pool) {
    b->next_free = free_blocks;
    free_blocks = b;
  } else {
    free(b);
  }
}

static void on_conn_closed(uv_handle_t* h) {
  conn_t* c = (conn_t*)h;
  c->prev->next = c->next;
  c->next->prev = c->prev;
  free(c);
}

static void echo_written(uv_write_t* req, int status) {
  (void)status; /* a failed write shows up as a read error too */
  release((block_t*)req);
}

static void on_read(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  block_t* b = buf->base != NULL ? block_of(buf->base) : NULL;
  if (nread > 0) {
    b->buf = uv_buf_init(buf->base, (unsigned)nread);
    if (uv_write(&b->req, s, &b->buf, 1, echo_written) != 0) {
      release(b);
      uv_close((uv_handle_t*)s, on_conn_closed);
    }
    return;
  }
  if (b != NULL) release(b);
  if (nread < 0 && !uv_is_closing((uv_handle_t*)s)) uv_close((uv_handle_t*)s, on_conn_closed);
}

static void on_connection(uv_stream_t* srv, int status) {
  if (status < 0) return;
  conn_t* c = malloc(sizeof *c);
  if (c == NULL || uv_tcp_init(srv->loop, &c->tcp) != 0) {
    free(c);
    return;
  }
  c->next = conns.next;
  c->prev = &conns;
  conns.next->prev = c;
  conns.next = c;
  if (uv_accept(srv, (uv_stream_t*)&c->tcp) != 0) {
    uv_close((uv_handle_t*)&c->tcp, on_conn_closed);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  uv_read_start((uv_stream_t*)&c->tcp, alloc_cb, on_read);
}

/* Closes our handles only: uv_walk would also close the hidden handle
 * ringpark keeps in the loop. The loop then ends on its own. */
static void on_signal(uv_signal_t* h, int signum) {
  (void)h;
  (void)signum;
  uv_close((uv_handle_t*)&sigterm_handle, NULL);
  uv_close((uv_handle_t*)&sigint_handle, NULL);
  uv_close((uv_handle_t*)&server, NULL);
  for (conn_t* c = conns.next; c != &conns; c = c->next) {
    if (!uv_is_closing((uv_handle_t*)&c->tcp)) uv_close((uv_handle_t*)&c->tcp, on_conn_closed);
  }
}

int main(int argc, char** argv) {
  int port = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--pool") == 0) {
      use_pool = 1;
    } else if (strcmp(argv[i], "--rp") == 0) {
      use_rp = 1;
    } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = atoi(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--pool] [--rp] [--port P]\n", argv[0]);
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN);
  block_data_size = 64 * 1024; /* what libuv suggests for a stream read */

  uv_loop_t* loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  uv_tcp_init(loop, &server);
  int r = uv_tcp_bind(&server, (const struct sockaddr*)&addr, 0);
  if (r == 0) r = uv_listen((uv_stream_t*)&server, 1024, on_connection);
  if (r != 0) {
    fprintf(stderr, "uv_echo_server: listen on port %d: %s\n", port, uv_strerror(r));
    return 1;
  }
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&server, (struct sockaddr*)&bound, &len);
  uv_signal_init(loop, &sigterm_handle);
  uv_signal_start(&sigterm_handle, on_signal, SIGTERM);
  uv_signal_init(loop, &sigint_handle);
  uv_signal_start(&sigint_handle, on_signal, SIGINT);

  printf("uv_echo_server: listening on 127.0.0.1:%d (%s, %s)\n",
         ntohs(((struct sockaddr_in*)&bound)->sin_port), use_pool ? "pool" : "natural",
         use_rp ? "rp_uv_run" : "uv_run");
  fflush(stdout);

  r = use_rp ? rp_uv_run(loop, UV_RUN_DEFAULT) : uv_run(loop, UV_RUN_DEFAULT);

  /* Under rp_uv_run, or uv_run interposed by the preload, ringpark counted
   * its work; on plain uv_run it never saw the loop and reads as zeros. */
  rp_stats_t s;
  if (rp_stats(loop, &s) == 0 && s.turns > 0) {
    printf("uv_echo_server: rp_stats turns=%llu enters=%llu sqes=%llu cqes=%llu backend=%s\n",
           (unsigned long long)s.turns, (unsigned long long)s.enters,
           (unsigned long long)s.sqes_submitted, (unsigned long long)s.cqes_reaped,
           rp_backend(loop));
  }
  while (free_blocks != NULL) {
    block_t* b = free_blocks;
    free_blocks = b->next_free;
    free(b);
  }
  int closed = use_rp ? rp_loop_close(loop) : uv_loop_close(loop);
  if (r != 0 || closed != 0) {
    fprintf(stderr, "uv_echo_server: run returned %d, loop close %s\n", r,
            closed ? uv_strerror(closed) : "ok");
    return 1;
  }
  return 0;
}
