/* A TCP echo server on ringpark's rp_tcp_t. It reads like a libuv echo server
 * with uv_ renamed to rp_; the difference is underneath: every accept, read,
 * write and close is an operation in the loop's io_uring (or the epoll
 * fallback), and everything one loop iteration starts reaches the kernel in a
 * single io_uring_enter.
 *
 *   rp_echo [port]                 serve on 127.0.0.1:port until SIGINT
 *                                  (0 or none: a free port, which it prints)
 *   rp_echo --self-test N [port]   also run N clients in the same loop, each
 *                                  sending MESSAGES messages one at a time and
 *                                  checking every echoed byte; then print
 *                                  rp_stats and exit 0 if all came back intact
 *                                  (1 on any error, or after 30 s)
 *
 * Memory follows libuv's rules: a handle is freed in its close callback, a
 * request in its callback, a read buffer by the read callback in every case
 * (with ringpark, on the plain-recv path, that includes UV_ECANCELED, when a
 * close hands back the buffer of a read still in flight; the multishot path
 * holds no user buffer in the kernel, so it never does). */
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "ringpark.h"

enum { kMessageSize = 64, kMessages = 200, kTimeoutMs = 30000 };

static uv_loop_t loop;
static rp_tcp_t server;
static uv_timer_t watchdog;
static uv_signal_t sigint;
static int errors = 0;
static int clients_left = 0;
static long echoed_messages = 0;

/* ---- The server ---------------------------------------------------------- */

typedef struct {
  rp_write_t req; /* first: the callback gets &req */
  char* base;
} echo_write_t;

static void alloc_cb(rp_tcp_t* handle, size_t suggested, uv_buf_t* buf) {
  (void)handle;
  buf->base = malloc(suggested);
  buf->len = buf->base != NULL ? suggested : 0; /* none: read_cb gets UV_ENOBUFS */
}

static void free_on_close(rp_tcp_t* handle) { free(handle); }

static void echo_written(rp_write_t* req, int status) {
  echo_write_t* w = (echo_write_t*)req;
  /* A failed write needs nothing more: the connection's read fails too, and
   * that closes it. */
  (void)status;
  free(w->base);
  free(w);
}

static void server_read(rp_tcp_t* conn, ssize_t nread, const uv_buf_t* buf) {
  if (nread > 0) {
    /* Echo the buffer itself; the write callback frees it. */
    echo_write_t* w = malloc(sizeof *w);
    uv_buf_t out = uv_buf_init(buf->base, (unsigned)nread);
    if (w != NULL) w->base = buf->base;
    if (w == NULL || rp_write(&w->req, conn, &out, 1, echo_written) != 0) {
      free(buf->base);
      free(w);
      if (!rp_is_closing(conn)) rp_close(conn, free_on_close);
    }
    return;
  }
  free(buf->base); /* 0 (nothing read), EOF, an error, or handed back at close */
  if (nread < 0 && !rp_is_closing(conn)) rp_close(conn, free_on_close);
}

static void on_connection(rp_tcp_t* srv, int status) {
  if (status < 0) {
    fprintf(stderr, "rp_echo: accept: %s\n", uv_strerror(status));
    return;
  }
  rp_tcp_t* conn = malloc(sizeof *conn);
  if (conn == NULL || rp_tcp_init(srv->loop, conn) != 0) {
    free(conn); /* the connection stays queued; the server's close closes it */
    return;
  }
  /* Small messages go out at once rather than waiting for Nagle's timer. */
  if (rp_accept(srv, conn) != 0 || rp_tcp_nodelay(conn, 1) != 0 ||
      rp_read_start(conn, alloc_cb, server_read) != 0)
    rp_close(conn, free_on_close);
}

/* ---- The self-test clients ------------------------------------------------ */

typedef struct {
  rp_tcp_t tcp;
  rp_connect_t connect;
  rp_write_t write;
  int id;
  char out[kMessageSize]; /* the message in flight; written, then echoed */
  size_t have;            /* bytes of it echoed back so far */
  int sent;
  int writing;  /* its write has not completed */
  int awaiting; /* its echo has not fully come back */
} client_t;

static void client_closed(rp_tcp_t* handle) {
  (void)handle;
  if (--clients_left == 0) {
    /* Everything is done: closing the server and the timers ends the loop. */
    rp_close(&server, NULL);
    uv_close((uv_handle_t*)&watchdog, NULL);
    uv_close((uv_handle_t*)&sigint, NULL);
  }
}

static void client_fail(client_t* c, const char* what, int err) {
  fprintf(stderr, "rp_echo: client %d: %s: %s\n", c->id, what, uv_strerror(err));
  errors++;
  if (!rp_is_closing(&c->tcp)) rp_close(&c->tcp, client_closed);
}

static void client_written(rp_write_t* req, int status);

/* Sends the next message once the previous one is both written and echoed. */
static void client_next(client_t* c) {
  if (c->writing || c->awaiting || rp_is_closing(&c->tcp)) return;
  if (c->sent == kMessages) {
    rp_close(&c->tcp, client_closed);
    return;
  }
  for (int i = 0; i < kMessageSize; i++) c->out[i] = (char)(c->sent * 31 + c->id * 7 + i);
  c->sent++;
  c->have = 0;
  c->writing = c->awaiting = 1;
  uv_buf_t b = uv_buf_init(c->out, kMessageSize);
  int r = rp_write(&c->write, &c->tcp, &b, 1, client_written);
  if (r != 0) client_fail(c, "write", r);
}

static void client_written(rp_write_t* req, int status) {
  client_t* c = req->data;
  c->writing = 0;
  if (status < 0) {
    client_fail(c, "write", status);
    return;
  }
  client_next(c);
}

static void client_read(rp_tcp_t* handle, ssize_t nread, const uv_buf_t* buf) {
  client_t* c = handle->data;
  for (ssize_t i = 0; i < nread; i++) {
    if (!c->awaiting || buf->base[i] != c->out[c->have]) {
      errors++;
      break;
    }
    if (++c->have == kMessageSize) {
      c->awaiting = 0;
      echoed_messages++;
    }
  }
  free(buf->base);
  if (nread == UV_ECANCELED) return; /* the buffer of the read our close cancelled */
  if (nread < 0) {
    client_fail(c, "read", (int)nread); /* EOF before the end, or an error */
    return;
  }
  client_next(c);
}

static void client_connected(rp_connect_t* req, int status) {
  client_t* c = req->data;
  int r = status < 0 ? status : rp_read_start(&c->tcp, alloc_cb, client_read);
  if (r != 0) {
    client_fail(c, status < 0 ? "connect" : "read_start", r);
    return;
  }
  client_next(c);
}

static void on_timeout(uv_timer_t* timer) {
  (void)timer;
  fprintf(stderr, "rp_echo: self-test did not finish within %d ms\n", kTimeoutMs);
  errors++;
  uv_stop(&loop);
}

static void on_sigint(uv_signal_t* handle, int signum) {
  (void)handle;
  (void)signum;
  uv_stop(&loop);
}

static void print_stats(void) {
  rp_stats_t s;
  rp_stats(&loop, &s);
  printf("rp_stats: turns %llu, enters %llu, sqes %llu, cqes %llu\n", (unsigned long long)s.turns,
         (unsigned long long)s.enters, (unsigned long long)s.sqes_submitted,
         (unsigned long long)s.cqes_reaped);
  if (echoed_messages > 0)
    printf(
        "%ld messages echoed: %.3f enters per message (io_uring_enter calls; "
        "epoll_wait calls on the fallback)\n",
        echoed_messages, (double)s.enters / (double)echoed_messages);
}

int main(int argc, char** argv) {
  int nclients = 0, arg = 1, port = 0;
  if (argc > arg + 1 && strcmp(argv[arg], "--self-test") == 0) {
    nclients = atoi(argv[arg + 1]);
    arg += 2;
    if (nclients <= 0) {
      fprintf(stderr, "rp_echo: --self-test needs a number of clients > 0\n");
      return 2;
    }
  }
  if (argc > arg) port = atoi(argv[arg++]);
  if (argc > arg || port < 0 || port > 65535) {
    fprintf(stderr, "usage: %s [--self-test N] [port]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN); /* belt and braces: one-buffer writes never raise it */

  if (uv_loop_init(&loop) != 0) return 1;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  int r = rp_tcp_init(&loop, &server);
  if (r == 0) r = rp_tcp_bind(&server, (const struct sockaddr*)&addr, 0);
  if (r == 0) r = rp_listen(&server, 1024, on_connection);
  if (r != 0) {
    fprintf(stderr, "rp_echo: listen on 127.0.0.1:%d: %s\n", port, uv_strerror(r));
    return 1;
  }
  struct sockaddr_in bound;
  int len = sizeof bound;
  rp_tcp_getsockname(&server, (struct sockaddr*)&bound, &len);
  printf("rp_echo: listening on 127.0.0.1:%d (%s)\n", ntohs(bound.sin_port), rp_backend(&loop));
  fflush(stdout);

  uv_signal_init(&loop, &sigint);
  uv_signal_start(&sigint, on_sigint, SIGINT);

  client_t* clients = NULL;
  if (nclients > 0) {
    uv_timer_init(&loop, &watchdog);
    uv_timer_start(&watchdog, on_timeout, kTimeoutMs, 0);
    clients = calloc((size_t)nclients, sizeof *clients);
    if (clients == NULL) return 1;
    clients_left = nclients;
    for (int i = 0; i < nclients; i++) {
      client_t* c = &clients[i];
      c->id = i;
      rp_tcp_init(&loop, &c->tcp);
      c->tcp.data = c->connect.data = c->write.data = c;
      r = rp_tcp_connect(&c->connect, &c->tcp, (const struct sockaddr*)&bound, client_connected);
      if (r != 0) client_fail(c, "connect", r);
    }
  }

  r = rp_uv_run(&loop, UV_RUN_DEFAULT);
  if (nclients == 0 || errors > 0 || r != 0) {
    /* Interrupted, timed out or failed: report and leave without tidying up. */
    print_stats();
    printf("rp_echo: %s, %d errors\n", nclients ? "self-test failed" : "stopped", errors);
    return nclients == 0 ? 0 : 1;
  }
  const long expected = (long)nclients * kMessages;
  printf(
      "rp_echo: self-test: %ld of %ld messages of %d bytes echoed intact over %d "
      "connections\n",
      echoed_messages, expected, kMessageSize, nclients);
  print_stats();
  free(clients);
  int closed = rp_loop_close(&loop);
  if (closed != 0 || echoed_messages != expected) {
    fprintf(stderr, "rp_echo: loop close %d, %ld of %ld echoed\n", closed, echoed_messages,
            expected);
    return 1;
  }
  return 0;
}
