// A TCP echo server on 127.0.0.1 written with ringpark's C++20 coroutines: one
// task accepts, one task per connection echoes. Every recv and send is an
// io_uring operation (or the epoll fallback's), and all those issued in one
// turn go to the kernel in one submission.
//
//   coro_echo [port]             serve until killed; port 0 (the default) picks
//                                a free one; the port is printed
//   coro_echo --self-test [N]    also run N clients (default 8) in the same
//                                process, check every echoed byte, print the
//                                counters and exit 0 (1 on any error), within
//                                a 60 s alarm: safe to run in CI
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <system_error>

#include "ringpark/net.hpp"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"

namespace rp = ringpark;

namespace {

constexpr int kMessagesPerClient = 200;
constexpr std::size_t kMaxMessage = 32 * 1024;  // large enough for short sends

// Echoes go out in pieces as they arrive; without TCP_NODELAY, Nagle's
// algorithm would hold each piece back until the peer's delayed ACK.
rp::Task<void> echo(rp::TcpStream conn) {
  conn.set_nodelay(true);
  rp::Buffer buffer(16 * 1024);
  for (;;) {
    rp::BufferResult r = co_await conn.recv(std::move(buffer));
    if (!r || r.bytes == 0) break;  // an error, or the peer closed
    rp::Buffer out(r.buffer.begin(), r.buffer.begin() + static_cast<std::ptrdiff_t>(r.bytes));
    if (!co_await conn.send_all(std::move(out))) break;  // send_all finishes short sends
    buffer = std::move(r.buffer);                        // the buffer comes back with the result
  }
  co_await conn.close();
}

rp::Task<void> serve(rp::Runtime& rt, rp::TcpListener& listener) {
  for (;;) {
    rp::Result<rp::TcpStream> conn = co_await listener.accept();
    if (!conn) {
      // operation_canceled: the listener was closed, which is how main() stops us.
      if (conn.error != std::errc::operation_canceled) {
        std::fprintf(stderr, "accept: %s\n", conn.error.message().c_str());
      }
      co_return;
    }
    rp::spawn(rt, echo(std::move(conn.value)));  // runs detached; freed when it ends
  }
}

// Counts clients down and resumes the one task waiting for zero.
struct Latch {
  rp::Runtime& rt;
  int left;
  std::coroutine_handle<> waiter;

  void count_down() {
    if (--left == 0 && waiter) {
      // Resume from the executor rather than from inside this client's frame.
      rp::post(rt, [h = waiter] { h.resume(); });
    }
  }
  bool await_ready() const noexcept { return left == 0; }
  void await_suspend(std::coroutine_handle<> h) noexcept { waiter = h; }
  void await_resume() const noexcept {}
};

struct Totals {
  long messages = 0;
  long bytes = 0;
  int failures = 0;
};

rp::Task<void> client(rp::Runtime& rt, std::uint16_t port, int id, Totals& totals, Latch& latch) {
  rp::Result<rp::TcpStream> c = co_await rp::TcpStream::connect(rt, "127.0.0.1", port);
  if (!c) std::fprintf(stderr, "client %d: connect: %s\n", id, c.error.message().c_str());
  bool ok = static_cast<bool>(c);
  rp::TcpStream& conn = c.value;
  if (ok) conn.set_nodelay(true);
  rp::Buffer in(kMaxMessage);
  for (int m = 0; ok && m < kMessagesPerClient; ++m) {
    // Sizes from 1 byte to kMaxMessage, with content that names its position.
    const auto mix = static_cast<std::size_t>(id) * 7919 + static_cast<std::size_t>(m) * 104729;
    const std::size_t size = 1 + mix % kMaxMessage;
    rp::Buffer out(size);
    for (std::size_t i = 0; i < size; ++i) out[i] = static_cast<char>('a' + (id + m + i) % 26);
    rp::BufferResult sent = co_await conn.send_all(std::move(out));
    if (!sent) {
      std::fprintf(stderr, "client %d: send: %s\n", id, sent.error.message().c_str());
      ok = false;
      break;
    }
    const rp::Buffer& expected = sent.buffer;  // send_all gives the buffer back whole
    std::size_t got = 0;
    while (ok && got < size) {
      rp::BufferResult r = co_await conn.recv(std::move(in));
      in = std::move(r.buffer);
      if (!r || r.bytes == 0) {
        std::fprintf(stderr, "client %d: recv: %s\n", id,
                     r ? "connection closed" : r.error.message().c_str());
        ok = false;
      } else if (got + r.bytes > size ||
                 std::memcmp(in.data(), expected.data() + got, r.bytes) != 0) {
        std::fprintf(stderr, "client %d: message %d came back wrong\n", id, m);
        ok = false;
      } else {
        got += r.bytes;
      }
    }
    if (ok) {
      ++totals.messages;
      totals.bytes += static_cast<long>(size);
    }
  }
  if (conn.is_open()) co_await conn.close();
  if (!ok) ++totals.failures;
  latch.count_down();
}

rp::Task<void> self_test(rp::Runtime& rt, std::uint16_t port, int clients, Totals& totals) {
  Latch latch{rt, clients, {}};
  for (int i = 0; i < clients; ++i) rp::spawn(rt, client(rt, port, i, totals, latch));
  co_await latch;
}

}  // namespace

int main(int argc, char** argv) {
  bool self = argc > 1 && std::strcmp(argv[1], "--self-test") == 0;
  int clients = self && argc > 2 ? std::atoi(argv[2]) : 8;
  int port = !self && argc > 1 ? std::atoi(argv[1]) : 0;
  if (clients <= 0 || port < 0 || port > 65535) {
    std::fprintf(stderr, "usage: %s [port] | --self-test [clients]\n", argv[0]);
    return 2;
  }
  if (self) ::alarm(60);  // bounded in CI: a hang ends the process with SIGALRM

  int status = 1;
  try {
    rp::Runtime rt = rp::Runtime::Builder().build();
    // Declared after the Runtime, so destroyed before it.
    rp::Result<rp::TcpListener> bound =
        rp::TcpListener::bind(rt, "127.0.0.1", static_cast<std::uint16_t>(port));
    if (!bound) {
      std::fprintf(stderr, "coro_echo: listen: %s\n", bound.error.message().c_str());
      return 1;
    }
    rp::TcpListener& listener = bound.value;
    std::printf("coro_echo: listening on 127.0.0.1:%d (%s)\n", listener.local_port(),
                rt.backend_name().c_str());
    std::fflush(stdout);

    if (!self) {
      rp::block_on(rt, serve(rt, listener));  // returns only if accept fails
    } else {
      rp::spawn(rt, serve(rt, listener));
      Totals totals;
      auto start = std::chrono::steady_clock::now();
      rp::block_on(rt, self_test(rt, listener.local_port(), clients, totals));
      std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      rp::Stats s = rt.stats();
      std::printf(
          "coro_echo: %d clients, %ld messages, %ld bytes echoed in %.3f s; %d failed\n"
          "coro_echo: turns %llu, enters %llu, sqes %llu, cqes %llu\n",
          clients, totals.messages, totals.bytes, took.count(), totals.failures,
          static_cast<unsigned long long>(s.turns), static_cast<unsigned long long>(s.enters),
          static_cast<unsigned long long>(s.sqes_submitted),
          static_cast<unsigned long long>(s.cqes_reaped));
      if (totals.failures == 0 && totals.messages == long{clients} * kMessagesPerClient) status = 0;
      // Closing the listener cancels the server's accept (it returns quietly).
      rp::block_on(rt, listener.close());
    }
    // Leaving the scope destroys the Runtime: any task still in accept or recv
    // is cancelled, reaped and freed, and its handles closed.
  } catch (const std::exception& e) {
    std::fprintf(stderr, "coro_echo: %s\n", e.what());
  }
  return status;
}
