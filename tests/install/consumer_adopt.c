/* A plain libuv program (uv_* calls only, uv_run included) linked against
 * ringpark-preload ahead of libuv: one echo round trip over 127.0.0.1, then
 * it prints whether adoption was on. run.sh checks, with RINGPARK_STATS=1,
 * that its streams were adopted. */
#include <ringpark.h>
#include <stdio.h>
#include <string.h>

static uv_tcp_t server, client, peer;
static uv_connect_t connect_req;
static uv_write_t client_write, peer_write;
static char peer_buf[64], client_buf[64];
static char echoed[64];
static size_t echoed_len;

static void alloc_peer(uv_handle_t* h, size_t size, uv_buf_t* buf) {
  (void)h, (void)size;
  *buf = uv_buf_init(peer_buf, sizeof peer_buf);
}
static void alloc_client(uv_handle_t* h, size_t size, uv_buf_t* buf) {
  (void)h, (void)size;
  *buf = uv_buf_init(client_buf, sizeof client_buf);
}
static void on_peer_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  if (n > 0) {
    uv_buf_t out = uv_buf_init(buf->base, (unsigned)n);
    uv_write(&peer_write, s, &out, 1, NULL);
  } else if (n < 0) {
    uv_close((uv_handle_t*)s, NULL);
  }
}
static void on_client_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  if (n > 0 && echoed_len + (size_t)n <= sizeof echoed) {
    memcpy(echoed + echoed_len, buf->base, (size_t)n);
    echoed_len += (size_t)n;
  }
  if (n < 0 || echoed_len >= 5) {
    uv_close((uv_handle_t*)s, NULL);
    uv_close((uv_handle_t*)&server, NULL);
  }
}
static void on_connection(uv_stream_t* srv, int status) {
  if (status < 0) return;
  uv_tcp_init(srv->loop, &peer);
  if (uv_accept(srv, (uv_stream_t*)&peer) == 0) uv_read_start((uv_stream_t*)&peer, alloc_peer, on_peer_read);
}
static void on_connect(uv_connect_t* req, int status) {
  if (status < 0) return;
  uv_buf_t out = uv_buf_init("hello", 5);
  uv_write(&client_write, req->handle, &out, 1, NULL);
  uv_read_start(req->handle, alloc_client, on_client_read);
}

int main(void) {
  uv_loop_t* loop = uv_default_loop();
  struct sockaddr_in addr;
  int len = sizeof addr;
  uv_ip4_addr("127.0.0.1", 0, &addr);
  uv_tcp_init(loop, &server);
  uv_tcp_bind(&server, (const struct sockaddr*)&addr, 0);
  uv_listen((uv_stream_t*)&server, 8, on_connection);
  uv_tcp_getsockname(&server, (struct sockaddr*)&addr, &len);
  uv_tcp_init(loop, &client);
  uv_tcp_connect(&connect_req, &client, (const struct sockaddr*)&addr, on_connect);
  uv_run(loop, UV_RUN_DEFAULT);
  printf("consumer_adopt: echoed \"%.*s\", adoption %s\n", (int)echoed_len, echoed, rp_adoption(loop));
  return echoed_len == 5 && memcmp(echoed, "hello", 5) == 0 && uv_loop_close(loop) == 0 ? 0 : 1;
}
