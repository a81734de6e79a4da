/* http_hello: a minimal HTTP/1.1 server that answers every request with
 * "Hello, World!", written once and run two ways, so that a comparison between
 * them is one of the same program logic:
 *
 *   http_hello [port]               on ringpark's rp_tcp_t, run with rp_uv_run
 *   http_hello --uv [port]          on plain libuv's uv_tcp_t, run with uv_run
 *   http_hello --uv --rp-run [port] uv_tcp_t under rp_uv_run (the drop-in case)
 *   http_hello [--uv] --self-test   also run a client thread that sends single,
 *                                   keep-alive, pipelined, split and closing
 *                                   requests and checks every answer; exit 0
 *                                   when all are right (1 otherwise, or after
 *                                   20 s)
 *
 * Port 0 (or none) picks a free port; either way the server prints
 * "http_hello: listening on 127.0.0.1:PORT (backend)". On SIGINT or SIGTERM it
 * prints its counters (requests, reads, writes and, when ringpark ran the
 * loop, rp_stats) and exits 0.
 *
 * HTTP, kept to what a benchmark client and a careful reader need: a request
 * ends at its blank line ("\r\n\r\n"), followed by Content-Length bytes of
 * body if it says so; connections are kept alive (HTTP/1.0 only with
 * "Connection: keep-alive"); "Connection: close" closes after the answer;
 * "Transfer-Encoding" and requests over 16 KiB get 400 and a close. Pipelining:
 * every complete request found in one read is answered, in order, with ONE
 * write (a single buffer for up to kCopies answers, taken from a static block
 * of identical answers, so no answer is ever copied or allocated).
 *
 * Memory: each connection owns its read buffer (with ringpark it is lent to the
 * kernel while a recv waits, which is why alloc_cb hands out the connection's
 * own buffer rather than a fresh one) and one write request; a second write
 * while the first is in flight gets a malloc'd request, freed in its callback.
 * A connection is freed in its close callback, as libuv's rules say. */
#define _GNU_SOURCE /* memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <uv.h>

#include "ringpark.h"

enum {
  kReadBufSize = 16384, /* the largest request (headers and body) kept whole */
  kCopies = 64,         /* answers per buffer of the static answer block */
  kMaxBufs = kReadBufSize / 18 / kCopies + 2, /* 18: "GET / HTTP/1.1\r\n\r\n" */
  kSelfTestTimeoutMs = 20000,
};

#define RESPONSE                                                          \
  "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n" \
  "\r\nHello, World!"
static const char kResponse[] = RESPONSE;
#define RESPONSE_LEN (sizeof kResponse - 1)
static const char kBadRequest[] =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/* kCopies answers back to back: a write of n <= kCopies answers is one buffer. */
static char answers[kCopies * RESPONSE_LEN];

/* ---- The two backends ------------------------------------------------------ */

static int use_uv = 0;     /* --uv: uv_tcp_t; otherwise rp_tcp_t */
static int use_rp_run = 1; /* the loop runs with rp_uv_run (not with --uv alone) */
static uv_loop_t loop;

struct conn_s;

typedef struct write_s {
  union {
    uv_write_t uv;
    rp_write_t rp;
  } req;
  struct conn_s* conn;
  int pooled; /* the connection's own request, not malloc'd */
} write_t;

typedef struct conn_s {
  union {
    uv_tcp_t uv;
    rp_tcp_t rp;
  } tcp;
  size_t have;      /* bytes of an incomplete request at the start of rbuf */
  size_t body_left; /* body bytes of the last request still to skip */
  int writes_pending;
  int closing_after; /* answer what is queued, then close (Connection: close, 400) */
  int write_busy;    /* `write` is in flight */
  write_t write;
  char rbuf[kReadBufSize];
} conn_t;

static union {
  uv_tcp_t uv;
  rp_tcp_t rp;
} server;

static struct { unsigned long long requests, reads, writes, conns, bad; } counters;

static void conn_on_data(conn_t* c, size_t nread);

static void conn_freed_uv(uv_handle_t* h) { free(h->data); }
static void conn_freed_rp(rp_tcp_t* h) { free(h->data); }

static int conn_is_closing(conn_t* c) {
  return use_uv ? uv_is_closing((uv_handle_t*)&c->tcp.uv) : rp_is_closing(&c->tcp.rp);
}

static void conn_close(conn_t* c) {
  if (conn_is_closing(c)) return;
  if (use_uv)
    uv_close((uv_handle_t*)&c->tcp.uv, conn_freed_uv);
  else
    rp_close(&c->tcp.rp, conn_freed_rp);
}

static void conn_read_stop(conn_t* c) {
  if (use_uv)
    uv_read_stop((uv_stream_t*)&c->tcp.uv);
  else
    rp_read_stop(&c->tcp.rp);
}

/* Both backends' alloc_cb: the free part of the connection's own buffer. */
static void conn_alloc(conn_t* c, uv_buf_t* buf) {
  *buf = uv_buf_init(c->rbuf + c->have, (unsigned)(kReadBufSize - c->have));
}

static void alloc_uv(uv_handle_t* h, size_t suggested, uv_buf_t* buf) {
  (void)suggested;
  conn_alloc(h->data, buf);
}
static void alloc_rp(rp_tcp_t* h, size_t suggested, uv_buf_t* buf) {
  (void)suggested;
  conn_alloc(h->data, buf);
}

/* nread as libuv and ringpark report it; the buffer is always the connection's. */
static void conn_on_read(conn_t* c, ssize_t nread) {
  if (nread > 0) {
    conn_on_data(c, (size_t)nread);
  } else if (nread < 0 && nread != UV_ECANCELED) {
    conn_close(c); /* EOF or an error; ECANCELED: our own close handing back the buffer */
  }
}
static void read_uv(uv_stream_t* s, ssize_t nread, const uv_buf_t* buf) {
  (void)buf;
  conn_on_read(s->data, nread);
}
static void read_rp(rp_tcp_t* h, ssize_t nread, const uv_buf_t* buf) {
  (void)buf;
  conn_on_read(h->data, nread);
}

static void conn_written(write_t* w, int status) {
  conn_t* c = w->conn;
  c->writes_pending--;
  if (w->pooled)
    c->write_busy = 0;
  else
    free(w);
  if (status < 0 || (c->closing_after && c->writes_pending == 0)) conn_close(c);
}
static void written_uv(uv_write_t* req, int status) { conn_written((write_t*)req, status); }
static void written_rp(rp_write_t* req, int status) { conn_written((write_t*)req, status); }

/* One write of `bufs` (static memory, valid for the program's life). */
static void conn_write(conn_t* c, const uv_buf_t* bufs, unsigned nbufs) {
  write_t* w = &c->write;
  if (c->write_busy) {
    w = malloc(sizeof *w);
    if (w == NULL) {
      conn_close(c);
      return;
    }
    w->pooled = 0;
  } else {
    c->write_busy = 1;
    w->pooled = 1;
  }
  w->conn = c;
  int r = use_uv ? uv_write(&w->req.uv, (uv_stream_t*)&c->tcp.uv, bufs, nbufs, written_uv)
                 : rp_write(&w->req.rp, &c->tcp.rp, bufs, nbufs, written_rp);
  if (r != 0) {
    /* The callback never runs: undo here. */
    if (w->pooled)
      c->write_busy = 0;
    else
      free(w);
    conn_close(c);
    return;
  }
  c->writes_pending++;
  counters.writes++;
}

/* ---- HTTP ------------------------------------------------------------------ */

/* Looks at one request's head [p, end) (end points at its "\r\n\r\n"). Sets
 * *body to its Content-Length and returns 0 to keep the connection, 1 to close
 * it after the answer, or -1 for a request this server does not take. */
static int parse_head(const char* p, const char* end, size_t* body) {
  const char* eol = memchr(p, '\n', (size_t)(end - p));
  if (eol == NULL) eol = end;
  /* The request line ends in the version; HTTP/1.0 defaults to close. */
  int close_it = eol - p >= 9 && memcmp(eol - (eol[-1] == '\r' ? 9 : 8), "HTTP/1.0", 8) == 0;
  *body = 0;
  for (const char* line = eol + 1; line < end; line = eol + 1) {
    eol = memchr(line, '\n', (size_t)(end - line));
    if (eol == NULL) eol = end;
    size_t len = (size_t)(eol - line);
    char first = (char)(*line | 0x20);
    if (first == 'c' && len > 15 && strncasecmp(line, "content-length:", 15) == 0) {
      char* stop;
      unsigned long long n = strtoull(line + 15, &stop, 10);
      if (n > (1ull << 40)) return -1;
      *body = (size_t)n;
    } else if (first == 'c' && len > 11 && strncasecmp(line, "connection:", 11) == 0) {
      const char* v = line + 11;
      while (v < eol && (*v == ' ' || *v == '\t')) v++;
      if ((size_t)(eol - v) >= 5 && strncasecmp(v, "close", 5) == 0) close_it = 1;
      if ((size_t)(eol - v) >= 10 && strncasecmp(v, "keep-alive", 10) == 0) close_it = 0;
    } else if (first == 't' && len > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
      return -1;
    }
  }
  return close_it;
}

/* nread new bytes are at rbuf + have: answer every complete request in them
 * with one write, keep an incomplete one for the next read. */
static void conn_on_data(conn_t* c, size_t nread) {
  counters.reads++;
  if (c->closing_after) return; /* a read that raced with read_stop */
  size_t len = c->have + nread, pos = 0, n = 0;
  int bad = 0;
  while (pos < len) {
    if (c->body_left > 0) {
      size_t skip = len - pos < c->body_left ? len - pos : c->body_left;
      pos += skip;
      c->body_left -= skip;
      continue;
    }
    const char* start = c->rbuf + pos;
    const char* end = memmem(start, len - pos, "\r\n\r\n", 4);
    if (end == NULL) break;
    int verdict = parse_head(start, end, &c->body_left);
    if (verdict < 0) {
      bad = 1;
      break;
    }
    n++;
    pos = (size_t)(end + 4 - c->rbuf);
    if (verdict == 1) {
      c->closing_after = 1;
      break;
    }
  }
  if (!bad && !c->closing_after && pos == 0 && len == kReadBufSize) bad = 1; /* too large */
  /* Keep the incomplete rest at the start of the buffer for the next read. */
  c->have = bad || c->closing_after ? 0 : len - pos;
  if (c->have > 0 && pos > 0) memmove(c->rbuf, c->rbuf + pos, c->have);
  if (bad) {
    c->closing_after = 1;
    counters.bad++;
  }
  if (c->closing_after) conn_read_stop(c);
  counters.requests += n;

  uv_buf_t bufs[kMaxBufs + 1];
  unsigned nbufs = 0;
  while (n > 0) {
    size_t k = n < kCopies ? n : kCopies;
    bufs[nbufs++] = uv_buf_init(answers, (unsigned)(k * RESPONSE_LEN));
    n -= k;
  }
  if (bad) bufs[nbufs++] = uv_buf_init((char*)kBadRequest, sizeof kBadRequest - 1);
  if (nbufs > 0)
    conn_write(c, bufs, nbufs);
  else if (c->closing_after && c->writes_pending == 0)
    conn_close(c);
}

/* ---- Accepting ------------------------------------------------------------- */

static void on_connection_uv(uv_stream_t* srv, int status) {
  if (status < 0) return;
  conn_t* c = calloc(1, sizeof *c);
  if (c == NULL || uv_tcp_init(&loop, &c->tcp.uv) != 0) {
    free(c);
    return;
  }
  c->tcp.uv.data = c;
  counters.conns++;
  if (uv_accept(srv, (uv_stream_t*)&c->tcp.uv) != 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp.uv, 1);
  if (uv_read_start((uv_stream_t*)&c->tcp.uv, alloc_uv, read_uv) != 0) conn_close(c);
}

static void on_connection_rp(rp_tcp_t* srv, int status) {
  if (status < 0) return;
  conn_t* c = calloc(1, sizeof *c);
  if (c == NULL || rp_tcp_init(&loop, &c->tcp.rp) != 0) {
    free(c); /* the connection stays queued; closing the server closes it */
    return;
  }
  c->tcp.rp.data = c;
  counters.conns++;
  if (rp_accept(srv, &c->tcp.rp) != 0) {
    conn_close(c);
    return;
  }
  rp_tcp_nodelay(&c->tcp.rp, 1);
  if (rp_read_start(&c->tcp.rp, alloc_rp, read_rp) != 0) conn_close(c);
}

/* ---- Counters and signals -------------------------------------------------- */

static uv_signal_t sigint_handle, sigterm_handle;

static void print_counters(void) {
  printf("http_hello: requests %llu, reads %llu, writes %llu, connections %llu, bad %llu\n",
         counters.requests, counters.reads, counters.writes, counters.conns, counters.bad);
  if (use_rp_run) {
    rp_stats_t s;
    rp_stats(&loop, &s);
    printf("rp_stats: turns %llu, enters %llu, sqes %llu, cqes %llu\n", (unsigned long long)s.turns,
           (unsigned long long)s.enters, (unsigned long long)s.sqes_submitted,
           (unsigned long long)s.cqes_reaped);
    if (counters.requests > 0)
      printf("http_hello: %.4f enters per request\n", (double)s.enters / (double)counters.requests);
  }
  fflush(stdout);
}

static void on_signal(uv_signal_t* h, int signum) {
  (void)h;
  (void)signum;
  uv_stop(&loop);
}

/* ---- Self-test: a blocking client on its own thread ------------------------ */

static struct sockaddr_in bound;
static uv_async_t self_test_done;
static uv_timer_t watchdog;
static int self_test_failures = 0;
static int self_test_timed_out = 0;

static int client_connect(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct timeval tv = {.tv_sec = 5};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr*)&bound, sizeof bound) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int send_all(int fd, const char* p, size_t len) {
  while (len > 0) {
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return -1;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Reads exactly `len` bytes (the expected answers) and compares them. */
static int expect(int fd, const char* want, size_t len, const char* what) {
  char* got = malloc(len + 1);
  size_t have = 0;
  while (have < len) {
    ssize_t n = recv(fd, got + have, len - have, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      fprintf(stderr, "http_hello: self-test %s: %s after %zu of %zu bytes\n", what,
              n == 0 ? "EOF" : strerror(errno), have, len);
      free(got);
      return -1;
    }
    have += (size_t)n;
  }
  int ok = memcmp(got, want, len) == 0;
  if (!ok) {
    got[len] = 0;
    fprintf(stderr, "http_hello: self-test %s: wrong answer:\n%s\n", what, got);
  }
  free(got);
  return ok ? 0 : -1;
}

/* Expects the peer to close: recv returns 0 (after no further bytes). */
static int expect_eof(int fd, const char* what) {
  char b[64];
  ssize_t n;
  do n = recv(fd, b, sizeof b, 0);
  while (n < 0 && errno == EINTR);
  if (n == 0) return 0;
  fprintf(stderr, "http_hello: self-test %s: expected the server to close, got %zd (%s)\n", what, n,
          n < 0 ? strerror(errno) : "bytes");
  return -1;
}

static char* repeat(const char* s, int n, size_t* len) {
  size_t l = strlen(s);
  char* out = malloc(l * (size_t)n + 1);
  for (int i = 0; i < n; i++) memcpy(out + l * (size_t)i, s, l);
  out[l * (size_t)n] = 0;
  *len = l * (size_t)n;
  return out;
}

#define CHECK(what, expr)                                          \
  do {                                                             \
    if ((expr) != 0) {                                             \
      fprintf(stderr, "http_hello: self-test failed: %s\n", what); \
      failures++;                                                  \
    }                                                              \
  } while (0)

static void* self_test_client(void* arg) {
  (void)arg;
  static const char get[] = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: self-test\r\n\r\n";
  int failures = 0, fd;
  size_t len, alen;
  char *reqs, *ans;

  /* 1. One request, then two more on the same connection (keep-alive). */
  fd = client_connect();
  CHECK("connect", fd < 0 ? -1 : 0);
  for (int i = 0; i < 3 && fd >= 0; i++) {
    CHECK("single request: send", send_all(fd, get, sizeof get - 1));
    CHECK("single request: answer", expect(fd, kResponse, RESPONSE_LEN, "single"));
  }

  /* 2. 16 requests in one write (what wrk's pipeline script sends). */
  reqs = repeat(get, 16, &len);
  ans = repeat(kResponse, 16, &alen);
  CHECK("16 pipelined: send", send_all(fd, reqs, len));
  CHECK("16 pipelined: answers", expect(fd, ans, alen, "16 pipelined"));
  free(reqs);
  free(ans);

  /* 3. 200 pipelined requests (more than one buffer of answers). */
  reqs = repeat(get, 200, &len);
  ans = repeat(kResponse, 200, &alen);
  CHECK("200 pipelined: send", send_all(fd, reqs, len));
  CHECK("200 pipelined: answers", expect(fd, ans, alen, "200 pipelined"));
  free(reqs);
  free(ans);

  /* 4. A request split in three writes, the split inside "\r\n\r\n". */
  {
    size_t cut1 = 7, cut2 = sizeof get - 3;
    CHECK("split: send 1", send_all(fd, get, cut1));
    usleep(20000);
    CHECK("split: send 2", send_all(fd, get + cut1, cut2 - cut1));
    usleep(20000);
    CHECK("split: send 3", send_all(fd, get + cut2, sizeof get - 1 - cut2));
    CHECK("split: answer", expect(fd, kResponse, RESPONSE_LEN, "split"));
  }

  /* 5. Two and a half requests, then the rest: two answers, then one. */
  {
    char buf[3 * sizeof get];
    size_t l = strlen(get);
    memcpy(buf, get, l);
    memcpy(buf + l, get, l);
    memcpy(buf + 2 * l, get, l);
    CHECK("partial pipeline: send 1", send_all(fd, buf, 2 * l + 10));
    ans = repeat(kResponse, 2, &alen);
    CHECK("partial pipeline: two answers", expect(fd, ans, alen, "partial pipeline 1"));
    free(ans);
    CHECK("partial pipeline: send 2", send_all(fd, buf + 2 * l + 10, l - 10));
    CHECK("partial pipeline: third answer", expect(fd, kResponse, RESPONSE_LEN, "partial 2"));
  }

  /* 6. A POST whose body holds "\r\n\r\n", pipelined with a GET: two answers. */
  {
    static const char post[] =
        "POST /x HTTP/1.1\r\nHost: a\r\ncontent-length: 8\r\n\r\nab\r\n\r\ncdGET / "
        "HTTP/1.1\r\n\r\n";
    CHECK("post: send", send_all(fd, post, sizeof post - 1));
    ans = repeat(kResponse, 2, &alen);
    CHECK("post: answers", expect(fd, ans, alen, "post with body"));
    free(ans);
  }

  /* 7. Connection: close: the answer, then the server closes. */
  {
    static const char closing[] = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
    CHECK("close: send", send_all(fd, closing, sizeof closing - 1));
    CHECK("close: answer", expect(fd, kResponse, RESPONSE_LEN, "connection close"));
    CHECK("close: EOF", expect_eof(fd, "connection close"));
  }
  if (fd >= 0) close(fd);

  /* 8. HTTP/1.0 without keep-alive closes; Transfer-Encoding gets 400. */
  fd = client_connect();
  {
    static const char old[] = "GET / HTTP/1.0\r\n\r\n";
    CHECK("http/1.0: send", send_all(fd, old, sizeof old - 1));
    CHECK("http/1.0: answer", expect(fd, kResponse, RESPONSE_LEN, "http/1.0"));
    CHECK("http/1.0: EOF", expect_eof(fd, "http/1.0"));
  }
  if (fd >= 0) close(fd);
  fd = client_connect();
  {
    static const char chunked[] =
        "GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    CHECK("chunked: send", send_all(fd, chunked, sizeof chunked - 1));
    CHECK("chunked: answers",
          expect(fd, RESPONSE "HTTP/1.1 400 Bad Request\r\n", RESPONSE_LEN + 26, "chunked"));
  }
  if (fd >= 0) close(fd);

  /* 9. Eight connections at once, each with a pipelined batch, then a client
   *    that goes away with requests unanswered (the server must not mind). */
  {
    int fds[8];
    reqs = repeat(get, 5, &len);
    ans = repeat(kResponse, 5, &alen);
    for (int i = 0; i < 8; i++) fds[i] = client_connect();
    for (int i = 0; i < 8; i++) CHECK("many: send", send_all(fds[i], reqs, len));
    for (int i = 0; i < 8; i++) CHECK("many: answers", expect(fds[i], ans, alen, "many"));
    for (int i = 0; i < 8; i++) close(fds[i]);
    free(ans);
    fd = client_connect();
    CHECK("abandon: send", send_all(fd, reqs, len));
    close(fd);
    free(reqs);
    /* A last request shows the server still answers after that. */
    fd = client_connect();
    CHECK("after abandon: send", send_all(fd, get, sizeof get - 1));
    CHECK("after abandon: answer", expect(fd, kResponse, RESPONSE_LEN, "after abandon"));
    close(fd);
  }

  self_test_failures = failures;
  uv_async_send(&self_test_done);
  return NULL;
}

static void close_server(void) {
  if (use_uv)
    uv_close((uv_handle_t*)&server.uv, NULL);
  else
    rp_close(&server.rp, NULL);
  uv_close((uv_handle_t*)&sigint_handle, NULL);
  uv_close((uv_handle_t*)&sigterm_handle, NULL);
  uv_close((uv_handle_t*)&watchdog, NULL);
  uv_close((uv_handle_t*)&self_test_done, NULL);
}

static void on_self_test_done(uv_async_t* h) {
  (void)h;
  /* The client's connections end with EOFs the loop still has to see; once
   * they are closed, and the server too, the loop runs out of work. */
  close_server();
}

static void on_watchdog(uv_timer_t* t) {
  (void)t;
  fprintf(stderr, "http_hello: self-test did not finish within %d ms\n", kSelfTestTimeoutMs);
  self_test_timed_out = 1;
  uv_stop(&loop);
}

/* ---- main ------------------------------------------------------------------ */

int main(int argc, char** argv) {
  int self_test = 0, port = 0, rp_run_flag = 0;
  for (int i = 1; i < argc; i++) {
    char* stop;
    if (strcmp(argv[i], "--uv") == 0) {
      use_uv = 1;
    } else if (strcmp(argv[i], "--rp-run") == 0) {
      rp_run_flag = 1;
    } else if (strcmp(argv[i], "--self-test") == 0) {
      self_test = 1;
    } else if (argv[i][0] != '-' && (port = (int)strtol(argv[i], &stop, 10), *stop == 0) &&
               port >= 0 && port <= 65535) {
    } else {
      fprintf(stderr, "usage: %s [--uv [--rp-run]] [--self-test] [port]\n", argv[0]);
      return 2;
    }
  }
  use_rp_run = !use_uv || rp_run_flag;
  signal(SIGPIPE, SIG_IGN); /* libuv's writev may raise it on a reset connection */
  for (size_t i = 0; i < kCopies; i++) memcpy(answers + i * RESPONSE_LEN, kResponse, RESPONSE_LEN);

  if (uv_loop_init(&loop) != 0) return 1;
  struct sockaddr_in addr;
  uv_ip4_addr("127.0.0.1", port, &addr);
  int r;
  int len = sizeof bound;
  if (use_uv) {
    r = uv_tcp_init(&loop, &server.uv);
    if (r == 0) r = uv_tcp_bind(&server.uv, (const struct sockaddr*)&addr, 0);
    if (r == 0) r = uv_listen((uv_stream_t*)&server.uv, 1024, on_connection_uv);
    if (r == 0) r = uv_tcp_getsockname(&server.uv, (struct sockaddr*)&bound, &len);
  } else {
    r = rp_tcp_init(&loop, &server.rp);
    if (r == 0) r = rp_tcp_bind(&server.rp, (const struct sockaddr*)&addr, 0);
    if (r == 0) r = rp_listen(&server.rp, 1024, on_connection_rp);
    if (r == 0) r = rp_tcp_getsockname(&server.rp, (struct sockaddr*)&bound, &len);
  }
  if (r != 0) {
    fprintf(stderr, "http_hello: listen on 127.0.0.1:%d: %s\n", port, uv_strerror(r));
    return 1;
  }
  /* A copy: rp_backend's string goes away with rp_loop_close. */
  char backend[160];
  snprintf(backend, sizeof backend, "%s%s",
           use_uv && use_rp_run ? "uv_tcp_t under rp_uv_run, " : "",
           use_rp_run ? rp_backend(&loop) : "libuv uv_run");
  printf("http_hello: listening on 127.0.0.1:%d (%s)\n", ntohs(bound.sin_port), backend);
  fflush(stdout);

  uv_signal_init(&loop, &sigint_handle);
  uv_signal_start(&sigint_handle, on_signal, SIGINT);
  uv_signal_init(&loop, &sigterm_handle);
  uv_signal_start(&sigterm_handle, on_signal, SIGTERM);

  pthread_t client;
  if (self_test) {
    uv_timer_init(&loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, kSelfTestTimeoutMs, 0);
    uv_unref((uv_handle_t*)&watchdog);
    uv_async_init(&loop, &self_test_done, on_self_test_done);
    if (pthread_create(&client, NULL, self_test_client, NULL) != 0) return 1;
  }

  r = use_rp_run ? rp_uv_run(&loop, UV_RUN_DEFAULT) : uv_run(&loop, UV_RUN_DEFAULT);
  if (!self_test || self_test_timed_out) {
    /* Stopped by a signal (or the watchdog): report, leave without tidying up. */
    print_counters();
    if (self_test) printf("http_hello: self-test FAILED (timed out)\n");
    return self_test ? 1 : 0;
  }
  pthread_join(client, NULL);
  print_counters();
  int closed = use_rp_run ? rp_loop_close(&loop) : uv_loop_close(&loop);
  int ok = self_test_failures == 0 && r == 0 && closed == 0 && counters.writes <= counters.reads;
  printf("http_hello: self-test %s (%s): %llu requests answered, %d failed checks, loop close %s\n",
         ok ? "passed" : "FAILED", backend, counters.requests, self_test_failures,
         closed == 0 ? "ok" : uv_strerror(closed));
  return ok ? 0 : 1;
}
