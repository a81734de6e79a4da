/* An ordinary libuv TCP echo server and client on 127.0.0.1, in one process,
 * where the only ringpark-specific line is rp_uv_run() in place of uv_run().
 * It sends MESSAGES messages over CONNS connections, checks every echoed byte,
 * and prints how long it took and ringpark's counters.
 *
 *   uv_echo [--plain] [conns] [messages-per-conn]
 *
 * --plain runs the same program on plain uv_run, for comparison. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "ringpark.h"

enum { kMessageSize = 64 };

typedef struct {
  uv_tcp_t tcp;
  uv_write_t write;
  char out[kMessageSize];
  char in[kMessageSize];
  size_t have;
  int sent;
} client_t;

typedef struct {
  uv_tcp_t tcp;
} server_conn_t;

typedef struct {
  uv_write_t req;
  uv_buf_t buf;
} echo_write_t;

static uv_tcp_t server;
static int conns = 50, messages = 2000, done_clients = 0, errors = 0;

static void alloc_cb(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)h;
  buf->base = malloc(suggested);
  buf->len = suggested;
}

static void free_on_close(uv_handle_t* h) { free(h); }

static void echo_written(uv_write_t* req, int status) {
  echo_write_t* w = (echo_write_t*)req;
  if (status < 0) errors++;
  free(w->buf.base);
  free(w);
}

static void server_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  if (n > 0) {
    echo_write_t* w = malloc(sizeof *w);
    w->buf = uv_buf_init(buf->base, (unsigned)n);
    uv_write(&w->req, s, &w->buf, 1, echo_written);
    return;
  }
  free(buf->base);
  if (n < 0) uv_close((uv_handle_t*)s, free_on_close);
}

static void on_connection(uv_stream_t* srv, int status) {
  if (status < 0) {
    errors++;
    return;
  }
  server_conn_t* c = malloc(sizeof *c);
  uv_tcp_init(srv->loop, &c->tcp);
  if (uv_accept(srv, (uv_stream_t*)&c->tcp) == 0) {
    uv_read_start((uv_stream_t*)&c->tcp, alloc_cb, server_read);
  } else {
    uv_close((uv_handle_t*)&c->tcp, free_on_close);
  }
}

static void send_next(client_t* c);

static void client_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  client_t* c = s->data;
  if (n < 0) {
    errors++;
    uv_close((uv_handle_t*)s, NULL);
  }
  for (ssize_t i = 0; i < n; i++) {
    if (buf->base[i] != c->out[c->have]) errors++;
    if (++c->have == kMessageSize) {
      c->have = 0;
      send_next(c);
    }
  }
  free(buf->base);
}

static void send_next(client_t* c) {
  if (c->sent == messages) {
    uv_close((uv_handle_t*)&c->tcp, NULL);
    if (++done_clients == conns) uv_close((uv_handle_t*)&server, NULL);
    return;
  }
  for (int i = 0; i < kMessageSize; i++) c->out[i] = (char)(c->sent * 31 + i);
  c->sent++;
  uv_buf_t b = uv_buf_init(c->out, kMessageSize);
  uv_write(&c->write, (uv_stream_t*)&c->tcp, &b, 1, NULL);
}

static void on_connect(uv_connect_t* req, int status) {
  client_t* c = req->data;
  free(req);
  if (status < 0) {
    errors++;
    return;
  }
  uv_read_start((uv_stream_t*)&c->tcp, alloc_cb, client_read);
  send_next(c);
}

int main(int argc, char** argv) {
  int plain = 0, arg = 1;
  if (argc > 1 && strcmp(argv[1], "--plain") == 0) plain = 1, arg++;
  if (argc > arg) conns = atoi(argv[arg++]);
  if (argc > arg) messages = atoi(argv[arg++]);
  if (conns <= 0 || messages <= 0) {
    fprintf(stderr, "usage: %s [--plain] [conns>0] [messages>0]\n", argv[0]);
    return 2;
  }
  uv_loop_t* loop = uv_default_loop();
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, &server);
  uv_tcp_bind(&server, (const struct sockaddr*)&addr, 0);
  if (uv_listen((uv_stream_t*)&server, 1024, on_connection) != 0) return 1;
  struct sockaddr_storage bound;
  int len = sizeof bound;
  uv_tcp_getsockname(&server, (struct sockaddr*)&bound, &len);

  client_t* clients = calloc((size_t)conns, sizeof *clients);
  for (int i = 0; i < conns; i++) {
    uv_tcp_init(loop, &clients[i].tcp);
    clients[i].tcp.data = &clients[i];
    uv_connect_t* req = malloc(sizeof *req);
    req->data = &clients[i];
    uv_tcp_connect(req, &clients[i].tcp, (const struct sockaddr*)&bound, on_connect);
  }

  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int r = plain ? uv_run(loop, UV_RUN_DEFAULT) : rp_uv_run(loop, UV_RUN_DEFAULT);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
  long total = (long)conns * messages;

  printf("%-8s %s: %ld echoes of %d bytes over %d connections in %.3f s (%.0f msgs/s), "
         "errors %d\n",
         plain ? "uv_run" : "rp_uv_run", plain ? "plain libuv" : rp_backend(loop), total,
         kMessageSize, conns, secs, (double)total / secs, errors);
  if (!plain) {
    rp_stats_t s;
    rp_stats(loop, &s);
    printf("         rp_stats: turns %llu, enters %llu, sqes %llu, cqes %llu\n",
           (unsigned long long)s.turns, (unsigned long long)s.enters,
           (unsigned long long)s.sqes_submitted, (unsigned long long)s.cqes_reaped);
  }
  free(clients);
  int closed = plain ? uv_loop_close(loop) : rp_loop_close(loop);
  if (r != 0 || closed != 0 || errors != 0) {
    fprintf(stderr, "uv_echo: run returned %d, loop close %d, %d errors\n", r, closed, errors);
    return 1;
  }
  return 0;
}
