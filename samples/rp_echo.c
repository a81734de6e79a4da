/* A TCP echo server on ringpark's rp_tcp_t. It reads like a libuv echo server
 * with uv_ renamed to rp_; the difference is underneath: every accept, read,
 * write and close is an operation in the loop's io_uring (or the epoll
 * fallback), and everything one loop iteration starts reaches the kernel in a
 * single io_uring_enter.
 *
 *   rp_echo [--pool] [--threads N] [port]
 *                                  serve on 127.0.0.1:port until SIGINT
 *                                  (0 or none: a free port, which it prints),
 *                                  then print rp_stats and exit 0
 *   rp_echo [...] --self-test N [port]
 *                                  also run N clients in the (first) loop,
 *                                  each sending MESSAGES messages one at a
 *                                  time and checking every echoed byte; then
 *                                  print rp_stats and exit 0 if all came back
 *                                  intact (1 on any error, or after 30 s)
 *
 *   --pool        buffers from a free list: one block holds a read's bytes and
 *                 the write request that echoes them, and goes back to the
 *                 list when the write completes (bench/uv_echo_server.c's
 *                 --pool). Without it, as libuv's examples do, every read
 *                 mallocs its buffer and every write its request.
 *   --threads N   N threads, each with its own loop and its own listening
 *                 socket on the same port (SO_REUSEPORT: the kernel spreads
 *                 connections over them by a hash of the address pair). The
 *                 first thread is the main one; it binds first (port 0: the
 *                 others bind the port it got) and its SIGINT stops them all.
 *                 The exit report gives each thread's accepted connections.
 *
 * Memory follows libuv's rules: a handle is freed in its close callback, a
 * request in its callback, a read buffer by the read callback in every case
 * (with ringpark, on the plain-recv path, that includes UV_ECANCELED, when a
 * close hands back the buffer of a read still in flight; the multishot path
 * holds no user buffer in the kernel, so it never does). */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "ringpark.h"

enum { kMessageSize = 64, kMessages = 200, kTimeoutMs = 30000, kMaxThreads = 64 };

/* --pool's block size. On the multishot path (the usual one) the bytes come
 * out of ringpark's 16 KiB provided buffers, at most one buffer's worth per
 * completion, and alloc_cb is asked for exactly the bytes waiting: 16 KiB
 * takes any completion in one block, one read_cb, one write. A buffer
 * smaller than suggested is not an error either way (the rest comes in more
 * alloc_cb/read_cb rounds, or the next recv on the plain path), so 16 KiB
 * only bounds how much one echo write carries. */
enum { kBlockSize = 16 * 1024 };

typedef struct {
  rp_write_t req; /* first: the callback gets &req */
  char* base;
} echo_write_t;

/* --pool: a read's buffer and the write that echoes it, in one allocation. */
typedef struct block_s {
  echo_write_t write;
  struct block_s* next_free;
  char data[kBlockSize];
} block_t;

/* One server thread: its loop, its listening socket, its counters. Without
 * --threads there is one, run on the main thread. */
typedef struct {
  uv_loop_t loop; /* loop.data points back here */
  rp_tcp_t server;
  uv_async_t stop;      /* threads after the first: how the main one stops them */
  block_t* free_blocks; /* --pool: this thread's free list */
  long accepted;        /* connections taken */
  rp_stats_t stats;     /* taken when the loop has stopped */
  pthread_t thread;
  int status; /* set-up: 0 or a UV_E* code */
} worker_t;

static int use_pool = 0;
static int nthreads = 1;
static int port = 0; /* once the first thread listens, the port it got */
static worker_t workers[kMaxThreads];
static sem_t ready; /* posted by each thread after it set up */

static uv_timer_t watchdog;
static uv_signal_t sigint;
static int errors = 0;
static int clients_left = 0;
static long echoed_messages = 0;

/* ---- The server ---------------------------------------------------------- */

static block_t* block_of(char* data) { return (block_t*)(data - offsetof(block_t, data)); }

static void alloc_cb(rp_tcp_t* handle, size_t suggested, uv_buf_t* buf) {
  if (use_pool) {
    worker_t* w = handle->loop->data;
    block_t* b = w->free_blocks;
    if (b != NULL)
      w->free_blocks = b->next_free;
    else
      b = malloc(sizeof *b);
    *buf = b != NULL ? uv_buf_init(b->data, kBlockSize) : uv_buf_init(NULL, 0);
    return;
  }
  buf->base = malloc(suggested);
  buf->len = buf->base != NULL ? suggested : 0; /* none: read_cb gets UV_ENOBUFS */
}

/* Gives back a buffer from alloc_cb (NULL is fine). */
static void release(uv_loop_t* loop, char* base) {
  if (!use_pool) {
    free(base);
  } else if (base != NULL) {
    worker_t* w = loop->data;
    block_t* b = block_of(base);
    b->next_free = w->free_blocks;
    w->free_blocks = b;
  }
}

static void free_on_close(rp_tcp_t* handle) { free(handle); }

static void echo_written(rp_write_t* req, int status) {
  echo_write_t* w = (echo_write_t*)req;
  /* A failed write needs nothing more: the connection's read fails too, and
   * that closes it. */
  (void)status;
  release(req->handle->loop, w->base);
  if (!use_pool) free(w);
}

static void server_read(rp_tcp_t* conn, ssize_t nread, const uv_buf_t* buf) {
  if (nread > 0) {
    /* Echo the buffer itself; the write callback gives it back. */
    echo_write_t* w = use_pool ? &block_of(buf->base)->write : malloc(sizeof *w);
    uv_buf_t out = uv_buf_init(buf->base, (unsigned)nread);
    if (w != NULL) w->base = buf->base;
    if (w == NULL || rp_write(&w->req, conn, &out, 1, echo_written) != 0) {
      release(conn->loop, buf->base);
      if (!use_pool) free(w);
      if (!rp_is_closing(conn)) rp_close(conn, free_on_close);
    }
    return;
  }
  release(conn->loop, buf->base); /* 0 (nothing read), EOF, an error, or handed back at close */
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
      rp_read_start(conn, alloc_cb, server_read) != 0) {
    rp_close(conn, free_on_close);
    return;
  }
  ((worker_t*)srv->loop->data)->accepted++;
}

/* --threads: the socket is made here, with SO_REUSEPORT, and handed to the
 * handle (libuv 1.44 has no UV_TCP_REUSEPORT for rp_tcp_bind to mirror). */
static int reuseport_socket(rp_tcp_t* server) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int on = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) != 0) {
    int err = -errno;
    close(fd);
    return err;
  }
  int r = rp_tcp_open(server, fd); /* from here on the handle owns the socket */
  if (r != 0) close(fd);
  return r;
}

/* Sets up w's loop and listens on 127.0.0.1:port with it. */
static int serve(worker_t* w) {
  int r = uv_loop_init(&w->loop);
  if (r != 0) return r;
  w->loop.data = w;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  r = rp_tcp_init(&w->loop, &w->server);
  if (r == 0 && nthreads > 1) r = reuseport_socket(&w->server);
  if (r == 0) r = rp_tcp_bind(&w->server, (const struct sockaddr*)&addr, 0);
  if (r == 0) r = rp_listen(&w->server, 1024, on_connection);
  if (r != 0)
    fprintf(stderr, "rp_echo: thread %d: listen on 127.0.0.1:%d: %s\n", (int)(w - workers), port,
            uv_strerror(r));
  return r;
}

/* ---- More threads (--threads) --------------------------------------------- */

static void on_stop(uv_async_t* handle) { uv_stop(handle->loop); }

static void* worker_main(void* arg) {
  worker_t* w = arg;
  /* Everything on the loop is done on this thread, its ring made here too. */
  w->status = serve(w);
  if (w->status == 0) w->status = uv_async_init(&w->loop, &w->stop, on_stop);
  sem_post(&ready);
  if (w->status != 0) return NULL;
  rp_uv_run(&w->loop, UV_RUN_DEFAULT);
  rp_stats(&w->loop, &w->stats);
  return NULL;
}

/* Starts threads 1..nthreads-1 on the port the first one got and waits until
 * each listens. Returns how many started (all are joined by stop_threads). */
static int start_threads(void) {
  int started = 1;
  for (; started < nthreads; started++) {
    if (pthread_create(&workers[started].thread, NULL, worker_main, &workers[started]) != 0) break;
  }
  for (int i = 1; i < started; i++) sem_wait(&ready);
  return started;
}

/* From the main thread: stops the loops of threads 1..started-1 (the ones
 * that set up; the others have returned already) and joins them. */
static void stop_threads(int started) {
  for (int i = 1; i < started; i++)
    if (workers[i].status == 0) uv_async_send(&workers[i].stop);
  for (int i = 1; i < started; i++) pthread_join(workers[i].thread, NULL);
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
    rp_close(&workers[0].server, NULL);
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
  release(handle->loop, buf->base);
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
  fprintf(stderr, "rp_echo: self-test did not finish within %d ms\n", kTimeoutMs);
  errors++;
  uv_stop(timer->loop);
}

static void on_sigint(uv_signal_t* handle, int signum) {
  (void)signum;
  uv_stop(handle->loop); /* and main() stops the other threads */
}

static void print_stats(void) {
  rp_stats_t s = {0};
  long accepted = 0;
  for (int i = 0; i < nthreads; i++) {
    s.turns += workers[i].stats.turns;
    s.enters += workers[i].stats.enters;
    s.sqes_submitted += workers[i].stats.sqes_submitted;
    s.cqes_reaped += workers[i].stats.cqes_reaped;
    accepted += workers[i].accepted;
  }
  printf("rp_stats: turns %llu, enters %llu, sqes %llu, cqes %llu; %ld connections accepted\n",
         (unsigned long long)s.turns, (unsigned long long)s.enters,
         (unsigned long long)s.sqes_submitted, (unsigned long long)s.cqes_reaped, accepted);
  for (int i = 0; nthreads > 1 && i < nthreads; i++) {
    const rp_stats_t* t = &workers[i].stats;
    printf("rp_echo: thread %d: accepted %ld, turns %llu, enters %llu, sqes %llu, cqes %llu\n", i,
           workers[i].accepted, (unsigned long long)t->turns, (unsigned long long)t->enters,
           (unsigned long long)t->sqes_submitted, (unsigned long long)t->cqes_reaped);
  }
  if (echoed_messages > 0)
    printf(
        "%ld messages echoed: %.3f enters per message (io_uring_enter calls; "
        "epoll_wait calls on the fallback), %.3f SQEs per message\n",
        echoed_messages, (double)s.enters / (double)echoed_messages,
        (double)s.sqes_submitted / (double)echoed_messages);
}

static int usage(const char* argv0) {
  fprintf(stderr, "usage: %s [--pool] [--threads N] [--self-test N] [port]\n", argv0);
  return 2;
}

int main(int argc, char** argv) {
  int nclients = 0, arg = 1;
  for (; arg < argc && strncmp(argv[arg], "--", 2) == 0; arg++) {
    if (strcmp(argv[arg], "--pool") == 0) {
      use_pool = 1;
    } else if (strcmp(argv[arg], "--threads") == 0 && arg + 1 < argc) {
      nthreads = atoi(argv[++arg]);
      if (nthreads < 1 || nthreads > kMaxThreads) {
        fprintf(stderr, "rp_echo: --threads needs 1..%d\n", kMaxThreads);
        return 2;
      }
    } else if (strcmp(argv[arg], "--self-test") == 0 && arg + 1 < argc) {
      nclients = atoi(argv[++arg]);
      if (nclients <= 0) {
        fprintf(stderr, "rp_echo: --self-test needs a number of clients > 0\n");
        return 2;
      }
    } else {
      return usage(argv[0]);
    }
  }
  if (arg < argc) port = atoi(argv[arg++]);
  if (arg < argc || port < 0 || port > 65535) return usage(argv[0]);
  signal(SIGPIPE, SIG_IGN); /* belt and braces: one-buffer writes never raise it */

  /* The first thread (this one) listens first; with port 0 the others then
   * bind the port it got. */
  worker_t* main_worker = &workers[0];
  uv_loop_t* loop = &main_worker->loop;
  if (serve(main_worker) != 0) return 1;
  struct sockaddr_in bound;
  int len = sizeof bound;
  rp_tcp_getsockname(&main_worker->server, (struct sockaddr*)&bound, &len);
  port = ntohs(bound.sin_port);

  sem_init(&ready, 0, 0);
  int started = start_threads();
  for (int i = 1; i < nthreads; i++) {
    if (i >= started || workers[i].status != 0) {
      if (i >= started) fprintf(stderr, "rp_echo: could not start thread %d\n", i);
      stop_threads(started);
      return 1;
    }
  }
  if (nthreads > 1)
    printf("rp_echo: listening on 127.0.0.1:%d (%s), %d threads\n", port, rp_backend(loop),
           nthreads);
  else
    printf("rp_echo: listening on 127.0.0.1:%d (%s)\n", port, rp_backend(loop));
  fflush(stdout);

  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigint, on_sigint, SIGINT);

  client_t* clients = NULL;
  int r;
  if (nclients > 0) {
    uv_timer_init(loop, &watchdog);
    uv_timer_start(&watchdog, on_timeout, kTimeoutMs, 0);
    clients = calloc((size_t)nclients, sizeof *clients);
    if (clients == NULL) return 1;
    clients_left = nclients;
    for (int i = 0; i < nclients; i++) {
      client_t* c = &clients[i];
      c->id = i;
      rp_tcp_init(loop, &c->tcp);
      c->tcp.data = c->connect.data = c->write.data = c;
      r = rp_tcp_connect(&c->connect, &c->tcp, (const struct sockaddr*)&bound, client_connected);
      if (r != 0) client_fail(c, "connect", r);
    }
  }

  r = rp_uv_run(loop, UV_RUN_DEFAULT);
  /* Interrupted, or the self-test's loop is done: the other threads' loops
   * are stopped (not closed: the process ends) and their counters taken. */
  stop_threads(nthreads);
  rp_stats(loop, &main_worker->stats);
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
  int closed = rp_loop_close(loop);
  while (main_worker->free_blocks != NULL) {
    block_t* b = main_worker->free_blocks;
    main_worker->free_blocks = b->next_free;
    free(b);
  }
  if (closed != 0 || echoed_messages != expected) {
    fprintf(stderr, "rp_echo: loop close %d, %ld of %ld echoed\n", closed, echoed_messages,
            expected);
    return 1;
  }
  return 0;
}
