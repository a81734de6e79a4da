/* epoll_echo: the hand-written baseline of the echo benchmark (issue 4).
 *
 * A minimal level-triggered epoll TCP echo on 127.0.0.1, one thread,
 * non-blocking sockets: on EPOLLIN read once and write the bytes straight back;
 * what the socket does not take waits in a per-connection buffer, reading
 * pauses and EPOLLOUT is armed until it has gone. No allocation per read.
 *
 *   epoll_echo [--port P]     P = 0 (default) picks a free port
 *
 * Prints "epoll_echo: listening on 127.0.0.1:PORT" once it accepts, and exits
 * 0 on SIGTERM or SIGINT. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { kBufSize = 64 * 1024, kMaxEvents = 256 };

typedef struct {
  int fd;
  char* pending; /* bytes read but not yet written back (NULL when none) */
  size_t pending_len, pending_off;
} conn_t;

static volatile sig_atomic_t stopping = 0;
static void on_signal(int sig) {
  (void)sig;
  stopping = 1;
}

static void drop(int ep, conn_t* c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  free(c->pending);
  free(c);
}

static int watch(int ep, conn_t* c, uint32_t events, int op) {
  struct epoll_event ev = {.events = events, .data.ptr = c};
  return epoll_ctl(ep, op, c->fd, &ev);
}

/* Writes what is pending; returns 0, or -1 when the connection is dead. */
static int flush_pending(int ep, conn_t* c) {
  while (c->pending_off < c->pending_len) {
    ssize_t n = write(c->fd, c->pending + c->pending_off, c->pending_len - c->pending_off);
    if (n > 0) {
      c->pending_off += (size_t)n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return 0; /* EPOLLOUT stays armed */
    } else {
      return -1;
    }
  }
  free(c->pending);
  c->pending = NULL;
  c->pending_len = c->pending_off = 0;
  return watch(ep, c, EPOLLIN, EPOLL_CTL_MOD); /* read again */
}

/* Reads once and echoes; returns 0, or -1 when the connection is done. */
static int echo(int ep, conn_t* c, char* buf) {
  ssize_t n = read(c->fd, buf, kBufSize);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
  if (n <= 0) return -1;
  size_t off = 0;
  while (off < (size_t)n) {
    ssize_t w = write(c->fd, buf + off, (size_t)n - off);
    if (w > 0) {
      off += (size_t)w;
    } else if (w < 0 && errno == EINTR) {
      continue;
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      /* Keep the rest, stop reading until it has gone. */
      c->pending_len = (size_t)n - off;
      c->pending_off = 0;
      c->pending = malloc(c->pending_len);
      if (c->pending == NULL) return -1;
      memcpy(c->pending, buf + off, c->pending_len);
      return watch(ep, c, EPOLLOUT, EPOLL_CTL_MOD);
    } else {
      return -1;
    }
  }
  return 0;
}

int main(int argc, char** argv) {
  int port = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
      port = atoi(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--port P]\n", argv[0]);
      return 2;
    }
  }
  /* No SA_RESTART: the signal interrupts epoll_wait, which then sees `stopping`. */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (lfd < 0 || bind(lfd, (struct sockaddr*)&addr, sizeof addr) != 0 || listen(lfd, 1024) != 0 ||
      getsockname(lfd, (struct sockaddr*)&addr, &len) != 0) {
    perror("epoll_echo: listen");
    return 1;
  }
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL}; /* NULL marks the listener */
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
  printf("epoll_echo: listening on 127.0.0.1:%d\n", ntohs(addr.sin_port));
  fflush(stdout);

  static char buf[kBufSize];
  struct epoll_event events[kMaxEvents];
  while (!stopping) {
    int n = epoll_wait(ep, events, kMaxEvents, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      perror("epoll_echo: epoll_wait");
      return 1;
    }
    for (int i = 0; i < n; i++) {
      conn_t* c = events[i].data.ptr;
      if (c == NULL) {
        int fd;
        while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          conn_t* nc = calloc(1, sizeof *nc);
          nc->fd = fd;
          if (watch(ep, nc, EPOLLIN, EPOLL_CTL_ADD) != 0) drop(ep, nc);
        }
        continue;
      }
      int r = (events[i].events & EPOLLOUT) ? flush_pending(ep, c) : echo(ep, c, buf);
      if (r != 0) drop(ep, c);
    }
  }
  /* Connections still open are closed by exit; nothing else to release. */
  close(ep);
  close(lfd);
  return 0;
}
