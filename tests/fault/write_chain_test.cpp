// The most common libuv write pattern, at volume: each write's request is
// heap-allocated and freed in its own callback, and the callback queues the
// next write (up to four in flight, 1 to 64 KiB each). Every write must call
// back exactly once, after which its request is never touched again, and the
// peer must receive every byte in order; and so when the stream is closed
// right after a callback queued more writes.
//
// The second case is a regression test for a bug the soak (tests/soak) found:
// a close from a write callback started the writes still queued over the
// ones being finished, whose requests their callbacks then freed while the
// kernel held them (heap-use-after-free under AddressSanitizer, an abort or
// memory corruption without it). Runs on both backends.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <uv.h>

#include <chrono>
#include <random>
#include <string>

#include "ringpark.h"
#include "test_util.hpp"

namespace ringpark::test {
namespace {

struct Chain {
  rp_tcp_t server{}, client{}, peer{};
  rp_connect_t connect{};
  std::string sent, got;
  int in_flight = 0;
  int writes_left = 0;
  int callbacks = 0;
  int errors = 0;
  int closes = 0;
  int close_after = -1;  // rp_close(client) from the callback of this write, after queuing more
  std::mt19937 rng{7};
};

struct Write {
  rp_write_t req{};
  Chain* chain;
  std::string bytes;
};

void pump(Chain* c);

void on_write(rp_write_t* req, int status) {
  auto* w = static_cast<Write*>(req->data);
  Chain* c = w->chain;
  delete w;  // the request goes at once, as most libuv programs do
  ++c->callbacks;
  --c->in_flight;
  if (status != 0 && status != UV_ECANCELED) ++c->errors;
  if (rp_is_closing(&c->client)) return;
  pump(c);  // and the next write is queued from the callback
  if (c->callbacks == c->close_after) {
    rp_close(&c->client, [](rp_tcp_t* h) { ++static_cast<Chain*>(h->data)->closes; });
  }
}

void pump(Chain* c) {
  while (c->in_flight < 4 && c->writes_left > 0) {
    auto* w = new Write{{}, c, std::string(1 + c->rng() % 65536, '\0')};
    for (std::size_t i = 0; i < w->bytes.size(); ++i) {
      w->bytes[i] = static_cast<char>((c->sent.size() + i) * 31 % 251);
    }
    w->req.data = w;
    uv_buf_t b = uv_buf_init(w->bytes.data(), static_cast<unsigned>(w->bytes.size()));
    c->sent += w->bytes;
    ASSERT_EQ(rp_write(&w->req, &c->client, &b, 1, on_write), 0);
    ++c->in_flight;
    --c->writes_left;
  }
}

void run_chain(int close_after) {
  Watchdog watchdog(std::chrono::seconds(60), "the write chain");
  uv_loop_t loop;
  ASSERT_EQ(uv_loop_init(&loop), 0);
  Chain c;
  c.writes_left = 2000;
  c.close_after = close_after;
  c.server.data = c.client.data = c.peer.data = &c;
  ASSERT_EQ(rp_tcp_init(&loop, &c.server), 0);
  ASSERT_EQ(rp_tcp_init(&loop, &c.client), 0);
  ASSERT_EQ(rp_tcp_init(&loop, &c.peer), 0);
  sockaddr_in addr{};
  uv_ip4_addr("127.0.0.1", 0, &addr);
  ASSERT_EQ(rp_tcp_bind(&c.server, reinterpret_cast<const sockaddr*>(&addr), 0), 0);
  int len = sizeof addr;
  ASSERT_EQ(rp_tcp_getsockname(&c.server, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  ASSERT_EQ(rp_listen(&c.server, 4,
                      [](rp_tcp_t* s, int status) {
                        auto* c = static_cast<Chain*>(s->data);
                        if (status != 0 || rp_accept(s, &c->peer) != 0) return;
                        rp_read_start(
                            &c->peer,
                            [](rp_tcp_t*, size_t n, uv_buf_t* b) {
                              *b = uv_buf_init(static_cast<char*>(std::malloc(n)),
                                               static_cast<unsigned>(n));
                            },
                            [](rp_tcp_t* h, ssize_t n, const uv_buf_t* b) {
                              auto* c = static_cast<Chain*>(h->data);
                              if (n > 0) c->got.append(b->base, static_cast<std::size_t>(n));
                              std::free(b->base);
                            });
                      }),
            0);
  ASSERT_EQ(rp_tcp_connect(&c.connect, &c.client, reinterpret_cast<const sockaddr*>(&addr),
                           [](rp_connect_t* r, int status) {
                             auto* c = static_cast<Chain*>(r->handle->data);
                             ASSERT_EQ(status, 0);
                             pump(c);
                           }),
            0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  const int writes = 2000 - (close_after >= 0 ? c.writes_left : 0);
  auto done = [&] {
    if (close_after >= 0) return c.closes == 1 && c.callbacks == 2000 - c.writes_left;
    return c.callbacks == 2000 && c.got.size() == c.sent.size();
  };
  while (!done() && std::chrono::steady_clock::now() < deadline) rp_uv_run(&loop, UV_RUN_ONCE);
  EXPECT_EQ(c.errors, 0);
  auto on_close = [](rp_tcp_t* h) { ++static_cast<Chain*>(h->data)->closes; };
  if (close_after < 0) {
    EXPECT_EQ(c.callbacks, 2000);
    EXPECT_EQ(c.got.size(), c.sent.size());
    EXPECT_TRUE(c.got == c.sent) << "bytes lost, repeated or reordered";
    rp_close(&c.client, on_close);
  } else {
    // Every write queued before the close called back once (0 or UV_ECANCELED).
    EXPECT_EQ(c.callbacks, 2000 - c.writes_left) << writes;
    EXPECT_TRUE(c.sent.compare(0, c.got.size(), c.got) == 0) << "the peer got bytes never sent";
  }
  rp_close(&c.server, on_close);
  rp_close(&c.peer, on_close);
  while (c.closes < 3 && std::chrono::steady_clock::now() < deadline + std::chrono::seconds(10)) {
    rp_uv_run(&loop, UV_RUN_ONCE);
  }
  EXPECT_EQ(rp_uv_run(&loop, UV_RUN_DEFAULT), 0);
  EXPECT_EQ(rp_loop_close(&loop), 0);
}

TEST(WriteChain, EachCallbackFreesItsRequestAndQueuesTheNextWrite) { run_chain(-1); }

TEST(WriteChain, CloseRightAfterQueuingWritesFromAWriteCallback) { run_chain(300); }

}  // namespace
}  // namespace ringpark::test
