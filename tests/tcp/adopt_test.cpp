// The uv_* calls that only an adopted uv_tcp_t has (no rp_tcp_t twin), each
// with the results libuv 1.44.2 gives (src/unix/stream.c, tcp.c, core.c);
// also loop liveness, uv_walk, the hand-back to libuv and the memory an idle
// connection costs. The same binary runs with adoption on, and off (the epoll
// fallback, RINGPARK_ADOPT=0), where the streams are libuv's own: every
// expectation here is checked against libuv itself.
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>

#include "tcp/tcp_harness.hpp"

namespace ringpark::test::tcp {
namespace {

class Adopt : public TcpTest<AdoptedTcp> {
 protected:
  static uv_stream_t* st(C* c) { return AdoptedTcp::stream(&c->h); }
  static uv_handle_t* hd(C* c) { return AdoptedTcp::handle(&c->h); }

  // A connected pair whose ends both read (and are adopted when adoption is
  // on); the listener is closed, so the two streams are all the loop has.
  std::pair<C*, C*> reading_pair() {
    L* l = listen();
    l->echo = false;
    l->close_on_error = false;
    auto [client, peer] = pair(l);
    EXPECT_NE(peer, nullptr);
    EXPECT_EQ(read_start(client), 0);
    EXPECT_EQ(close(l), 0);
    EXPECT_TRUE(run_until([&] { return l->close_calls == 1; }));
    return {client, peer};
  }

  // RINGPARK_TRY_WRITE=queue: uv_try_write on an adopted stream answers
  // UV_EAGAIN, so that the program's uv_write joins the batch.
  bool try_write_queues() const {
    const char* v = std::getenv("RINGPARK_TRY_WRITE");
    return adoption() && v != nullptr && std::strcmp(v, "queue") == 0;
  }
  // What uv_try_write of `n` bytes returns when nothing is queued.
  int sent_at_once(int n) const { return try_write_queues() ? UV_EAGAIN : n; }
};

// ---- The binary ---------------------------------------------------------------------

// The stream calls of this binary are the preload's (it is linked ahead of
// libuv), libuv's own listen, accept and connect are libuv's, and the
// configuration's adoption state holds (checked in SetUp and at each
// read_start).
TEST_F(Adopt, TheStreamCallsReachThePreloadAheadOfLibuv) {
  auto where = [](void* fn) {
    Dl_info info{};
    if (::dladdr(fn, &info) == 0 || info.dli_fname == nullptr) return std::string("?");
    return std::string(info.dli_fname);
  };
  for (void* fn : {reinterpret_cast<void*>(&uv_read_start), reinterpret_cast<void*>(&uv_read_stop),
                   reinterpret_cast<void*>(&uv_write), reinterpret_cast<void*>(&uv_write2),
                   reinterpret_cast<void*>(&uv_try_write), reinterpret_cast<void*>(&uv_try_write2),
                   reinterpret_cast<void*>(&uv_shutdown), reinterpret_cast<void*>(&uv_close),
                   reinterpret_cast<void*>(&uv_stream_set_blocking),
                   reinterpret_cast<void*>(&uv_run), reinterpret_cast<void*>(&uv_loop_close)}) {
    EXPECT_NE(where(fn).find("libringpark-preload"), std::string::npos) << where(fn);
  }
  for (void* fn : {reinterpret_cast<void*>(&uv_listen), reinterpret_cast<void*>(&uv_accept),
                   reinterpret_cast<void*>(&uv_tcp_connect)}) {
    EXPECT_NE(where(fn).find("libuv"), std::string::npos) << where(fn);
  }
  auto [client, peer] = reading_pair();
  EXPECT_EQ(AdoptedTcp::adopted(&client->h), adoption());
  EXPECT_EQ(AdoptedTcp::adopted(&peer->h), adoption());
  std::printf("backend %s, adoption %s\n", rp_backend(&loop_), adoption_state_.c_str());
}

// ---- uv_read_start, uv_read_stop ------------------------------------------------------

TEST_F(Adopt, ReadStartAndStopGiveLibuvsCodes) {
  // No socket yet: not readable.
  C* idle = make_conn();
  EXPECT_EQ(read_start(idle), UV_ENOTCONN);
  auto [client, peer] = reading_pair();
  EXPECT_EQ(uv_read_start(st(client), nullptr, &read_thunk<C, uv_stream_t, 0>), UV_EINVAL);
  EXPECT_EQ(uv_read_start(st(client), &alloc_thunk<C, uv_handle_t, 0>, nullptr), UV_EINVAL);
  EXPECT_EQ(read_start(client), UV_EALREADY);
  EXPECT_EQ(uv_is_active(hd(client)), 1);
  EXPECT_EQ(read_stop(client), 0);
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  EXPECT_EQ(read_stop(client), 0);  // not reading: 0
  ASSERT_EQ(read_start(client), 0);
  EXPECT_EQ(uv_is_active(hd(client)), 1);
  ASSERT_EQ(write_copy(peer, "still here"), 0);
  ASSERT_TRUE(run_until([&] { return client->received == "still here"; }));
  ASSERT_EQ(close(client), 0);
  EXPECT_EQ(read_start(client), UV_EINVAL);  // closing
  EXPECT_EQ(read_stop(client), 0);
}

// At the end of the stream reading stops before read_cb runs (the handle is
// no longer active inside it), the stream stays readable and writable, and
// reading may start again (and sees the end again).
TEST_F(Adopt, EofStopsReadingBeforeTheCallbackAndKeepsTheStreamReadable) {
  auto [client, peer] = reading_pair();
  int eofs = 0;
  client->read = [&](C& c, ssize_t n, const uv_buf_t* buf) {
    if (n == UV_EOF) {
      ++eofs;
      EXPECT_EQ(uv_is_active(hd(&c)), 0);
      EXPECT_EQ(uv_is_readable(st(&c)), 1);
      EXPECT_EQ(uv_is_writable(st(&c)), 1);
      EXPECT_NE(buf->base, nullptr);  // alloc_cb's buffer, as libuv gives it
    }
    on_read(c, n, buf);
  };
  ASSERT_EQ(write_copy(peer, "then the end"), 0);
  ASSERT_EQ(shutdown(peer), 0);
  ASSERT_TRUE(run_until([&] { return eofs == 1; }));
  EXPECT_EQ(client->received, "then the end");
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  ASSERT_EQ(read_start(client), 0);
  ASSERT_TRUE(run_until([&] { return eofs == 2; }));
  // The half close leaves the other direction open.
  ASSERT_EQ(write_copy(client, "reply"), 0);
  ASSERT_TRUE(run_until([&] { return peer->received == "reply"; }));
}

// A read error (the peer reset the connection): inside read_cb the stream is
// no longer readable or writable (libuv clears both before the callback);
// after it reading has stopped, and a new read_start says UV_ENOTCONN.
TEST_F(Adopt, ReadErrorClearsReadableAndWritableBeforeTheCallback) {
  auto [client, peer] = reading_pair();
  int errors = 0;
  client->read = [&](C& c, ssize_t n, const uv_buf_t* buf) {
    if (n < 0 && n != UV_EOF) {
      ++errors;
      EXPECT_EQ(n, UV_ECONNRESET);
      EXPECT_EQ(uv_is_readable(st(&c)), 0);
      EXPECT_EQ(uv_is_writable(st(&c)), 0);
    }
    on_read(c, n, buf);
  };
  linger lg{1, 0};
  ASSERT_EQ(::setsockopt(fd_of(peer), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  ASSERT_EQ(close(peer), 0);
  ASSERT_TRUE(run_until([&] { return errors > 0; }));
  run_for(20ms);
  EXPECT_EQ(errors, 1);
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  EXPECT_EQ(read_start(client), UV_ENOTCONN);
  EXPECT_EQ(write_copy(client, "x"), UV_EPIPE);
  std::string data = "x";
  uv_buf_t b = uv_buf_init(data.data(), 1);
  EXPECT_EQ(uv_try_write(st(client), &b, 1), UV_EPIPE);
}

// ---- uv_write2 with a handle to send ------------------------------------------------

// libuv sends handles only over IPC pipes: on a TCP stream uv_write2 with a
// send handle is UV_EINVAL, queues nothing and never calls back, whether or
// not writes are queued.
// Many clients start reading right after uv_tcp_connect, before it completes:
// libuv reads those streams. The first write after the connect hands the
// stream to the ring (libuv's reading stops, the engine's starts with the
// same callbacks), and nothing is lost or reordered on the way.
TEST_F(Adopt, AStreamLibuvReadsIsTakenOverAtItsFirstWrite) {
  L* l = listen();  // its peers echo
  C* c = connect(port_of(l), /*wait=*/false);
  c->expect_adoption = false;  // libuv reads it until the write below
  ASSERT_EQ(read_start(c), 0);
  ASSERT_TRUE(run_until([&] { return c->connect_calls > 0; }));
  ASSERT_EQ(c->connect_status, 0);
  EXPECT_FALSE(AdoptedTcp::adopted(&c->h));
  EXPECT_TRUE(AdoptedTcp::libuv_watches(&c->h));
  ASSERT_EQ(write_copy(c, "one,"), 0);
  EXPECT_EQ(AdoptedTcp::adopted(&c->h), adoption());
  ASSERT_EQ(write_copy(c, "two,"), 0);
  ASSERT_TRUE(run_until([&] { return c->received.size() >= 8; }));
  ASSERT_EQ(write_copy(c, "three"), 0);
  ASSERT_TRUE(run_until([&] { return c->received.size() >= 13; }));
  EXPECT_EQ(c->received, "one,two,three");
  EXPECT_EQ(uv_is_active(hd(c)), 1);
  EXPECT_EQ(c->write_errors, 0);
}

TEST_F(Adopt, Write2WithASendHandleIsEinvalAndQueuesNothing) {
  auto [client, peer] = reading_pair();
  std::string data = "not sent";
  uv_buf_t b = uv_buf_init(data.data(), static_cast<unsigned>(data.size()));
  int calls = 0;
  uv_write_t req;
  req.data = &calls;
  auto cb = [](uv_write_t* r, int) { ++*static_cast<int*>(r->data); };
  EXPECT_EQ(uv_write2(&req, st(client), &b, 1, st(peer), cb), UV_EINVAL);
  EXPECT_EQ(uv_stream_get_write_queue_size(st(client)), 0u);
  // With a write queued (nobody reads it) too.
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int status = 1;
  write_all(client, big, &status);
  run_for(30ms);
  const std::size_t queued = uv_stream_get_write_queue_size(st(client));
  EXPECT_GT(queued, 0u);
  EXPECT_EQ(uv_write2(&req, st(client), &b, 1, st(peer), cb), UV_EINVAL);
  EXPECT_EQ(uv_stream_get_write_queue_size(st(client)), queued);
  // A uv_write2 without one is a uv_write, behind the big one.
  std::string after = "after";
  uv_buf_t a = uv_buf_init(after.data(), 5);
  uv_write_t ok;
  ok.data = &calls;
  ASSERT_EQ(uv_write2(&ok, st(client), &a, 1, nullptr, cb), 0);
  const std::string expected = big + after;
  peer->expect = &expected;
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return peer->got >= expected.size() && calls == 1; }, 30s));
  run_for(20ms);
  EXPECT_EQ(calls, 1) << "a refused uv_write2 called back";
  EXPECT_EQ(status, 0);
  EXPECT_EQ(peer->got, expected.size());
  EXPECT_EQ(peer->mismatch, std::string::npos);
}

// ---- uv_try_write, uv_try_write2 --------------------------------------------------------

TEST_F(Adopt, TryWriteSendsAtOnceWhenNothingIsQueued) {
  auto [client, peer] = reading_pair();
  std::string data = "now";
  uv_buf_t b = uv_buf_init(data.data(), 3);
  EXPECT_EQ(uv_try_write(st(client), &b, 1), sent_at_once(3));
  if (try_write_queues()) return;
  ASSERT_TRUE(run_until([&] { return peer->received == "now"; }));
  // Several buffers, one call.
  std::string x = "ab", y = "cde";
  uv_buf_t two[2] = {uv_buf_init(x.data(), 2), uv_buf_init(y.data(), 3)};
  EXPECT_EQ(uv_try_write(st(client), two, 2), 5);
  ASSERT_TRUE(run_until([&] { return peer->received == "nowabcde"; }));
}

// While writes are queued, uv_try_write says UV_EAGAIN and sends nothing, so
// nothing overtakes them.
TEST_F(Adopt, TryWriteWhileWritesAreQueuedIsEagain) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int status = 1;
  write_all(client, big, &status);
  std::string data = "overtaker";
  uv_buf_t b = uv_buf_init(data.data(), static_cast<unsigned>(data.size()));
  EXPECT_EQ(uv_try_write(st(client), &b, 1), UV_EAGAIN);
  run_for(30ms);
  ASSERT_GT(uv_stream_get_write_queue_size(st(client)), 0u);
  EXPECT_EQ(uv_try_write(st(client), &b, 1), UV_EAGAIN);
  EXPECT_EQ(uv_try_write2(st(client), &b, 1, nullptr), UV_EAGAIN);
  peer->expect = &big;
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return peer->got >= big.size() && status != 1; }, 30s));
  run_for(20ms);
  EXPECT_EQ(status, 0);
  EXPECT_EQ(peer->got, big.size()) << "bytes of a refused try_write arrived";
  EXPECT_EQ(peer->mismatch, std::string::npos);
  // Nothing queued any more: it sends.
  EXPECT_EQ(uv_try_write(st(client), &b, 1), sent_at_once(static_cast<int>(data.size())));
}

// A program that writes with uv_write and then with uv_try_write (falling
// back to uv_write on UV_EAGAIN or a short write) sees its bytes in the order
// it issued them, whatever each call decided.
TEST_F(Adopt, TryWriteNeverOvertakesQueuedWrites) {
  auto [client, peer] = reading_pair();
  constexpr int kRounds = 500;
  std::vector<std::string> parts;
  parts.reserve(2 * kRounds);
  std::string expected;
  int direct = 0, eagain = 0, callbacks = 0;
  for (int i = 0; i < kRounds; ++i) {
    parts.push_back("<w" + std::to_string(i) + ">");
    parts.push_back("<t" + std::to_string(i) + ">");
    expected += parts[2 * i] + parts[2 * i + 1];
    uv_buf_t w = uv_buf_init(parts[2 * i].data(), static_cast<unsigned>(parts[2 * i].size()));
    ASSERT_EQ(write(client, &w, 1, [&](int s) { callbacks += s == 0; }), 0);
    std::string& t = parts[2 * i + 1];
    uv_buf_t tb = uv_buf_init(t.data(), static_cast<unsigned>(t.size()));
    const int r = uv_try_write(st(client), &tb, 1);
    if (r == UV_EAGAIN) {
      ++eagain;
      ASSERT_EQ(write(client, &tb, 1, [&](int s) { callbacks += s == 0; }), 0);
    } else {
      ASSERT_GE(r, 0);
      ++direct;
      if (static_cast<std::size_t>(r) < t.size()) {
        uv_buf_t rest = uv_buf_init(t.data() + r, static_cast<unsigned>(t.size() - r));
        ASSERT_EQ(write(client, &rest, 1, [&](int s) { callbacks += s == 0; }), 0);
      }
    }
    if (i % 50 == 0) run_for(1ms);
  }
  ASSERT_TRUE(run_until([&] { return peer->received.size() >= expected.size(); }));
  EXPECT_EQ(peer->received, expected);
  std::printf("try_write: %d sent at once, %d UV_EAGAIN\n", direct, eagain);
  if (adoption()) {
    // A write queued in the ring and not yet sent is a queued write.
    EXPECT_EQ(direct, 0);
  }
}

// uv_try_write2 with a handle to send on a TCP stream: adoption leaves it to
// libuv (1.44.2 then sends the bytes, and the kernel ignores the SCM_RIGHTS
// message on TCP; a later libuv may refuse it with UV_EINVAL). Either way
// nothing overtakes a queued write: UV_EAGAIN while any is queued.
TEST_F(Adopt, TryWrite2WithASendHandleKeepsLibuvsAnswerAndTheOrder) {
  auto [client, peer] = reading_pair();
  std::string data = "handle?";
  uv_buf_t b = uv_buf_init(data.data(), static_cast<unsigned>(data.size()));
  const int r = uv_try_write2(st(client), &b, 1, st(peer));
  std::printf("uv_try_write2 with a send handle on TCP: %d\n", r);
  std::string expected;
  if (r > 0) {
    expected = data.substr(0, static_cast<std::size_t>(r));
  } else {
    EXPECT_EQ(r, UV_EINVAL);
  }
  ASSERT_TRUE(run_until([&] { return peer->received.size() >= expected.size(); }));
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int status = 1;
  write_all(client, big, &status);
  run_for(20ms);
  ASSERT_GT(uv_stream_get_write_queue_size(st(client)), 0u);
  EXPECT_EQ(uv_try_write2(st(client), &b, 1, st(peer)), UV_EAGAIN) << "overtook a queued write";
  expected += big;
  peer->expect = &expected;
  peer->got = peer->received.size();
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return peer->got >= expected.size() && status != 1; }, 30s));
  run_for(20ms);
  EXPECT_EQ(status, 0);
  EXPECT_EQ(peer->got, expected.size());
  EXPECT_EQ(peer->mismatch, std::string::npos);
}

// ---- uv_shutdown -----------------------------------------------------------------------

TEST_F(Adopt, ShutdownMakesTheStreamUnwritableAtOnce) {
  auto [client, peer] = reading_pair();
  int status = 1;
  ASSERT_EQ(shutdown(client, [&](int s) { status = s; }), 0);
  EXPECT_EQ(uv_is_writable(st(client)), 0);
  EXPECT_EQ(uv_is_readable(st(client)), 1);
  EXPECT_EQ(shutdown(client), UV_ENOTCONN);
  std::string data = "late";
  uv_buf_t b = uv_buf_init(data.data(), 4);
  EXPECT_EQ(uv_try_write(st(client), &b, 1), UV_EPIPE);
  EXPECT_EQ(write_copy(client, "late"), UV_EPIPE);
  ASSERT_TRUE(run_until([&] { return status != 1 && peer->eof == 1; }));
  EXPECT_EQ(status, 0);
  EXPECT_EQ(shutdown(client), UV_ENOTCONN);  // shut down already
  // Reading goes on after a half close.
  ASSERT_EQ(write_copy(peer, "more"), 0);
  ASSERT_TRUE(run_until([&] { return client->received == "more"; }));
}

// ---- uv_tcp_close_reset -------------------------------------------------------------------

TEST_F(Adopt, CloseResetGivesThePeerEconnreset) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(write_copy(client, "hello"), 0);
  ASSERT_TRUE(run_until([&] { return peer->received == "hello"; }));
  ASSERT_EQ(uv_tcp_close_reset(&client->h, &close_thunk<C, uv_handle_t>), 0);
  EXPECT_EQ(uv_is_closing(hd(client)), 1);
  ASSERT_TRUE(run_until([&] { return client->close_calls == 1 && peer->read_errors == 1; }));
  EXPECT_EQ(peer->last_error, UV_ECONNRESET);
  EXPECT_EQ(peer->eof, 0);
  EXPECT_TRUE(client->nreads.empty());
}

// With a write in the kernel (nobody reads it): its callback gets
// UV_ECANCELED before the close callback, and the peer, reading later, gets
// a prefix of the bytes, then the end: UV_ECONNRESET on the ring; libuv's own
// stream may say UV_EOF (see PeerResetMidStreamEndsTheStreamOnce).
TEST_F(Adopt, CloseResetWithAWriteInFlight) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  std::vector<std::string> log;
  uv_buf_t b = uv_buf_init(const_cast<char*>(big.data()), static_cast<unsigned>(big.size()));
  ASSERT_EQ(write(client, &b, 1, [&](int s) { log.push_back("write:" + std::to_string(s)); }), 0);
  run_for(30ms);
  client->on_closed = [&] { log.push_back("close"); };
  ASSERT_EQ(uv_tcp_close_reset(&client->h, &close_thunk<C, uv_handle_t>), 0);
  ASSERT_TRUE(run_until([&] { return client->close_calls == 1; }));
  EXPECT_EQ(log, (std::vector<std::string>{"write:" + std::to_string(UV_ECANCELED), "close"}));
  peer->expect = &big;
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return peer->read_errors + peer->eof > 0; }));
  EXPECT_EQ(peer->read_errors + peer->eof, 1);
  if (adoption()) {
    EXPECT_EQ(peer->last_error, UV_ECONNRESET);
    EXPECT_EQ(peer->eof, 0);
  } else {
    EXPECT_TRUE(peer->last_error == UV_ECONNRESET || peer->eof == 1);
  }
  EXPECT_LT(peer->got, big.size());
  EXPECT_EQ(peer->mismatch, std::string::npos);
}

// libuv 1.44.2 refuses a reset while a shutdown is pending (UV_EINVAL) and
// leaves the handle open.
TEST_F(Adopt, CloseResetWhileShuttingDownIsEinval) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int wstatus = 1, sstatus = 1;
  write_all(client, big, &wstatus);
  ASSERT_EQ(shutdown(client, [&](int s) { sstatus = s; }), 0);
  EXPECT_EQ(uv_tcp_close_reset(&client->h, &close_thunk<C, uv_handle_t>), UV_EINVAL);
  EXPECT_EQ(uv_is_closing(hd(client)), 0);
  run_for(20ms);
  EXPECT_EQ(client->close_calls, 0);
  peer->expect = &big;
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return peer->eof == 1 && sstatus != 1; }, 30s));
  EXPECT_EQ(wstatus, 0);
  EXPECT_EQ(sstatus, 0);
  EXPECT_EQ(peer->got, big.size());
}

// ---- uv_stream_get_write_queue_size -----------------------------------------------------

// Non-zero while bytes wait to be sent, grown by exactly a queued write's
// size, and 0 once the callbacks have run.
TEST_F(Adopt, WriteQueueSizeCountsTheBytesNotYetSent) {
  auto [client, peer] = reading_pair();
  EXPECT_EQ(uv_stream_get_write_queue_size(st(client)), 0u);
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int status = 1;
  write_all(client, big, &status);
  run_for(30ms);
  const std::size_t queued = uv_stream_get_write_queue_size(st(client));
  EXPECT_GT(queued, 0u);
  EXPECT_LE(queued, big.size());
  std::string tail(1000, 't');
  uv_buf_t b = uv_buf_init(tail.data(), 1000);
  std::size_t in_last_cb = 1;
  ASSERT_EQ(write(client, &b, 1,
                  [&](int s) {
                    EXPECT_EQ(s, 0);
                    in_last_cb = uv_stream_get_write_queue_size(st(client));
                  }),
            0);
  EXPECT_EQ(uv_stream_get_write_queue_size(st(client)), queued + 1000);
  const std::string expected = big + tail;
  peer->expect = &expected;
  ASSERT_EQ(read_start(peer), 0);
  ASSERT_TRUE(run_until([&] { return in_last_cb != 1 && status != 1; }, 30s));
  EXPECT_EQ(status, 0);
  EXPECT_EQ(in_last_cb, 0u);
  EXPECT_EQ(uv_stream_get_write_queue_size(st(client)), 0u);
}

// ---- State queries -----------------------------------------------------------------------

TEST_F(Adopt, StateQueriesFollowTheStream) {
  auto [client, peer] = reading_pair();
  // Connected and reading.
  EXPECT_EQ(uv_is_readable(st(client)), 1);
  EXPECT_EQ(uv_is_writable(st(client)), 1);
  EXPECT_EQ(uv_is_active(hd(client)), 1);
  EXPECT_EQ(uv_is_closing(hd(client)), 0);
  uv_os_fd_t fd = -1;
  ASSERT_EQ(uv_fileno(hd(client), &fd), 0);
  sockaddr_in by_fd{}, by_uv{};
  socklen_t flen = sizeof by_fd;
  int ulen = sizeof by_uv;
  ASSERT_EQ(::getsockname(fd, reinterpret_cast<sockaddr*>(&by_fd), &flen), 0);
  ASSERT_EQ(uv_tcp_getsockname(&client->h, reinterpret_cast<sockaddr*>(&by_uv), &ulen), 0);
  EXPECT_EQ(by_fd.sin_port, by_uv.sin_port);
  // Not reading: inactive; a write pending does not make the handle active.
  ASSERT_EQ(read_stop(client), 0);
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  ASSERT_EQ(read_stop(peer), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int status = 1;
  write_all(client, big, &status);
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  EXPECT_EQ(uv_loop_alive(&loop_), 1);  // the write request keeps the loop alive
  // Closing, with the write in flight.
  ASSERT_EQ(close(client), 0);
  EXPECT_EQ(uv_is_closing(hd(client)), 1);
  EXPECT_EQ(uv_is_active(hd(client)), 0);
  EXPECT_EQ(uv_is_readable(st(client)), 0);
  EXPECT_EQ(uv_is_writable(st(client)), 0);
  EXPECT_EQ(uv_fileno(hd(client), &fd), UV_EBADF);
  ASSERT_TRUE(run_until([&] { return client->close_calls == 1; }));
  EXPECT_EQ(status, UV_ECANCELED);
  EXPECT_EQ(uv_is_closing(hd(client)), 1);
  EXPECT_EQ(uv_fileno(hd(client), &fd), UV_EBADF);
}

// The calls a program may still make on a closing handle get libuv's errors
// and change nothing: the close callback runs once.
TEST_F(Adopt, CallsOnAClosingHandleGiveLibuvsErrors) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(close(client), 0);
  std::string data = "x";
  uv_buf_t b = uv_buf_init(data.data(), 1);
  EXPECT_EQ(read_start(client), UV_EINVAL);
  EXPECT_EQ(read_stop(client), 0);
  EXPECT_EQ(write_copy(client, "x"), UV_EBADF);
  EXPECT_EQ(uv_try_write(st(client), &b, 1), UV_EBADF);
  EXPECT_EQ(shutdown(client), UV_ENOTCONN);
  uv_os_fd_t fd;
  EXPECT_EQ(uv_fileno(hd(client), &fd), UV_EBADF);
  sockaddr_in a{};
  int len = sizeof a;
  EXPECT_EQ(uv_tcp_getpeername(&client->h, reinterpret_cast<sockaddr*>(&a), &len), UV_EBADF);
  ASSERT_TRUE(run_until([&] { return client->close_calls > 0; }));
  run_for(20ms);
  EXPECT_EQ(client->close_calls, 1);
}

// The two calls that use the socket's fd without looking at the closing flag:
// libuv has closed its fd in uv_close (io_watcher.fd is -1), so both say
// UV_EBADF and touch nothing; the close callback given to uv_close is the one
// that runs.
TEST_F(Adopt, SetBlockingAndCloseResetOnAClosingHandleAreEbadf) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(close(client), 0);
  const uv_os_fd_t fd = client->h.io_watcher.fd;
  EXPECT_EQ(uv_stream_set_blocking(st(client), 1), UV_EBADF);
  if (fd >= 0) {
    EXPECT_TRUE(::fcntl(fd, F_GETFL) & O_NONBLOCK) << "made blocking while closing";
  }
  static int second_cb_calls;
  second_cb_calls = 0;
  EXPECT_EQ(uv_tcp_close_reset(&client->h, [](uv_handle_t*) { ++second_cb_calls; }), UV_EBADF);
  ASSERT_TRUE(run_until([&] { return client->close_calls + second_cb_calls > 0; }));
  run_for(20ms);
  EXPECT_EQ(client->close_calls, 1) << "the close callback given to uv_close did not run";
  EXPECT_EQ(second_cb_calls, 0);
  // The peer sees an orderly end, not a reset.
  ASSERT_TRUE(run_until([&] { return peer->eof + peer->read_errors > 0; }));
  EXPECT_EQ(peer->eof, 1);
}

// ---- Options and addresses on an adopted stream ------------------------------------------

TEST_F(Adopt, NodelayKeepaliveAndAddresses) {
  auto [client, peer] = reading_pair();
  const uv_os_fd_t fd = fd_of(client);
  int v = 0;
  socklen_t len = sizeof v;
  ASSERT_EQ(uv_tcp_nodelay(&client->h, 1), 0);
  ASSERT_EQ(::getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &len), 0);
  EXPECT_NE(v, 0);
  ASSERT_EQ(uv_tcp_keepalive(&client->h, 1, 7), 0);
  ASSERT_EQ(::getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &v, &len), 0);
  EXPECT_NE(v, 0);
  ASSERT_EQ(::getsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &v, &len), 0);
  EXPECT_EQ(v, 7);
  ASSERT_EQ(uv_tcp_keepalive(&client->h, 0, 0), 0);
  ASSERT_EQ(::getsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &v, &len), 0);
  EXPECT_EQ(v, 0);
  ASSERT_EQ(uv_tcp_nodelay(&client->h, 0), 0);
  ASSERT_EQ(::getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &v, &len), 0);
  EXPECT_EQ(v, 0);
  sockaddr_in mine{}, theirs{}, peer_mine{}, peer_theirs{};
  int n = sizeof mine;
  ASSERT_EQ(uv_tcp_getsockname(&client->h, reinterpret_cast<sockaddr*>(&mine), &n), 0);
  n = sizeof theirs;
  ASSERT_EQ(uv_tcp_getpeername(&client->h, reinterpret_cast<sockaddr*>(&theirs), &n), 0);
  n = sizeof peer_mine;
  ASSERT_EQ(uv_tcp_getsockname(&peer->h, reinterpret_cast<sockaddr*>(&peer_mine), &n), 0);
  n = sizeof peer_theirs;
  ASSERT_EQ(uv_tcp_getpeername(&peer->h, reinterpret_cast<sockaddr*>(&peer_theirs), &n), 0);
  EXPECT_EQ(mine.sin_port, peer_theirs.sin_port);
  EXPECT_EQ(theirs.sin_port, peer_mine.sin_port);
  EXPECT_EQ(theirs.sin_addr.s_addr, htonl(INADDR_LOOPBACK));
  ASSERT_EQ(write_copy(client, "options set"), 0);
  ASSERT_TRUE(run_until([&] { return peer->received == "options set"; }));
}

// ---- uv_ref, uv_unref, uv_run's return value, uv_walk ------------------------------------

// Runs uv_run(DEFAULT) under a watchdog: a bug that keeps the loop alive
// becomes a failure with a message, not a hang.
int run_default_bounded(uv_loop_t* loop) {
  Watchdog dog(10s, "uv_run(UV_RUN_DEFAULT)");
  return uv_run(loop, UV_RUN_DEFAULT);
}

// The bug the three tests below skip for, where adoption is on.
TEST_F(Adopt, UnreferencedReadingStreamsDoNotKeepTheLoopAlive) {
  auto [client, peer] = reading_pair();
  EXPECT_EQ(uv_has_ref(hd(client)), 1);
  uv_unref(hd(client));
  uv_unref(hd(peer));
  EXPECT_EQ(uv_has_ref(hd(client)), 0);
  EXPECT_EQ(uv_has_ref(hd(peer)), 0);
  EXPECT_EQ(uv_is_active(hd(client)), 1);
  EXPECT_EQ(uv_loop_alive(&loop_), 0);
  EXPECT_EQ(run_default_bounded(&loop_), 0);
  EXPECT_EQ(uv_run(&loop_, UV_RUN_NOWAIT), 0);
  // Still reading, unreferenced: data is delivered while something else runs
  // the loop.
  ASSERT_EQ(write_copy(peer, "still read"), 0);
  ASSERT_TRUE(run_until([&] { return client->received == "still read"; }));
  uv_ref(hd(client));
  EXPECT_EQ(uv_has_ref(hd(client)), 1);
  EXPECT_EQ(uv_loop_alive(&loop_), 1);
}

// A referenced reading stream keeps uv_run(DEFAULT) going until uv_stop; its
// return value then says the loop is still alive.
TEST_F(Adopt, ReferencedReadingStreamKeepsTheLoopAlive) {
  auto [client, peer] = reading_pair();
  uv_unref(hd(peer));
  uv_timer_t stop;
  ASSERT_EQ(uv_timer_init(&loop_, &stop), 0);
  uv_unref(reinterpret_cast<uv_handle_t*>(&stop));
  int fired = 0;
  stop.data = &fired;
  ASSERT_EQ(uv_timer_start(
                &stop,
                [](uv_timer_t* t) {
                  ++*static_cast<int*>(t->data);
                  uv_stop(t->loop);
                },
                100, 0),
            0);
  EXPECT_NE(run_default_bounded(&loop_), 0);
  EXPECT_EQ(fired, 1) << "uv_run returned before uv_stop";
  uv_unref(hd(client));
  EXPECT_EQ(run_default_bounded(&loop_), 0);
  uv_close(reinterpret_cast<uv_handle_t*>(&stop), nullptr);
  uv_run(&loop_, UV_RUN_NOWAIT);
}

// A pending write (and shutdown) is an active request: it keeps
// uv_run(DEFAULT) going, even with every handle unreferenced, until its
// callback has run.
TEST_F(Adopt, PendingWriteAndShutdownKeepTheLoopAlive) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(read_stop(peer), 0);
  uv_unref(hd(client));
  uv_unref(hd(peer));
  EXPECT_EQ(uv_loop_alive(&loop_), 0);
  const std::string big = pattern(32 * 1024 * 1024);
  int wstatus = 1, sstatus = 1;
  write_all(client, big, &wstatus);
  ASSERT_EQ(shutdown(client, [&](int s) { sstatus = s; }), 0);
  EXPECT_EQ(uv_loop_alive(&loop_), 1);
  EXPECT_NE(uv_run(&loop_, UV_RUN_NOWAIT), 0);
  EXPECT_EQ(wstatus, 1);
  // The peer reads (unreferenced): uv_run(DEFAULT) returns once both
  // callbacks have run, and not before.
  peer->expect = &big;
  ASSERT_EQ(read_start(peer), 0);
  EXPECT_EQ(run_default_bounded(&loop_), 0);
  EXPECT_EQ(wstatus, 0);
  EXPECT_EQ(sstatus, 0);
  ASSERT_TRUE(run_until([&] { return peer->eof == 1; }));
  EXPECT_EQ(peer->got, big.size());
}

TEST_F(Adopt, WalkSeesTheAdoptedHandles) {
  auto [client, peer] = reading_pair();
  ASSERT_EQ(write_copy(client, "x"), 0);  // a write in flight too
  std::vector<uv_handle_t*> seen;
  uv_walk(
      &loop_,
      [](uv_handle_t* h, void* arg) { static_cast<std::vector<uv_handle_t*>*>(arg)->push_back(h); },
      &seen);
  auto has = [&](uv_handle_t* h) { return std::find(seen.begin(), seen.end(), h) != seen.end(); };
  EXPECT_TRUE(has(hd(client)));
  EXPECT_TRUE(has(hd(peer)));
  EXPECT_EQ(uv_handle_get_type(hd(client)), UV_TCP);
  // The tick timer, the two streams: ringpark's own handles are hidden.
  EXPECT_EQ(seen.size(), 3u);
  ASSERT_TRUE(run_until([&] { return peer->received == "x"; }));
}

// Data that a peer in another thread sends while the loop sleeps in
// uv_run(DEFAULT) wakes it: the adopted stream's read completes in the ring,
// and read_cb stops the loop. No ticking timer: a missed wake-up hangs, and
// the watchdog turns that into a failure.
TEST_F(Adopt, DataFromAnotherThreadWakesTheSleepingLoop) {
  L* l = listen();
  l->echo = false;
  const int port = port_of(l);
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  const sockaddr_in to = loopback(port);
  ASSERT_EQ(::connect(fd, sa(to), sizeof to), 0);  // the backlog completes it
  ASSERT_TRUE(run_until([&] { return l->peers.size() == 1; }));
  C* peer = l->peers[0];
  ASSERT_EQ(close(l), 0);
  ASSERT_TRUE(run_until([&] { return l->close_calls == 1; }));
  peer->read = [this](C& c, ssize_t n, const uv_buf_t* buf) {
    on_read(c, n, buf);
    if (n > 0) uv_stop(&loop_);
  };
  for (int round = 0; round < 3; ++round) {
    std::thread sender([fd] {
      std::this_thread::sleep_for(50ms);
      EXPECT_EQ(::send(fd, "ping", 4, MSG_NOSIGNAL), 4);
    });
    {
      Watchdog dog(10s, "uv_run(DEFAULT) waiting for data from another thread");
      EXPECT_NE(uv_run(&loop_, UV_RUN_DEFAULT), 0);  // stopped, the stream still active
    }
    sender.join();
    EXPECT_EQ(peer->received.size(), 4u * (round + 1));
  }
  ::close(fd);
}

// ---- uv_stream_set_blocking --------------------------------------------------------------

// A blocking stream is libuv's: adoption hands it back once nothing of it is
// left in the ring, and reading and writing go on, in order, nothing lost.
TEST_F(Adopt, SetBlockingHandsTheStreamBackToLibuvWithNothingLost) {
  auto [client, peer] = reading_pair();
  // Non-blocking, as it is: nothing changes owners.
  ASSERT_EQ(uv_stream_set_blocking(st(client), 0), 0);
  EXPECT_EQ(AdoptedTcp::adopted(&client->h), adoption());
  // Small messages both ways (a blocking socket must never be asked for
  // more than it holds: libuv would block the loop).
  std::string to_peer, to_client;
  auto send = [&](C* from, std::string& log, const std::string& tag, int n) {
    for (int i = 0; i < n; ++i) {
      std::string m = "<" + tag + std::to_string(log.size()) + ">";
      log += m;
      ASSERT_EQ(write_copy(from, m), 0);
    }
  };
  send(client, to_peer, "c", 50);
  send(peer, to_client, "p", 50);
  run_for(5ms);
  send(client, to_peer, "c", 50);  // queued, maybe in the ring, at the switch
  send(peer, to_client, "p", 50);  // arriving while the stream changes owners
  ASSERT_EQ(uv_stream_set_blocking(st(client), 1), 0);
  const uv_os_fd_t fd = fd_of(client);
  EXPECT_FALSE(::fcntl(fd, F_GETFL) & O_NONBLOCK);
  send(client, to_peer, "c", 50);
  ASSERT_TRUE(run_until([&] {
    return peer->received.size() >= to_peer.size() && client->received.size() >= to_client.size();
  }));
  // Libuv's now: its epoll watches the socket; it is not adopted again.
  EXPECT_FALSE(AdoptedTcp::adopted(&client->h));
  EXPECT_TRUE(AdoptedTcp::libuv_watches(&client->h));
  send(peer, to_client, "p", 50);
  send(client, to_peer, "c", 50);
  ASSERT_EQ(read_stop(client), 0);
  client->expect_adoption = false;  // a stream handed back stays libuv's
  ASSERT_EQ(read_start(client), 0);
  EXPECT_FALSE(AdoptedTcp::adopted(&client->h));
  ASSERT_TRUE(run_until([&] {
    return peer->received.size() >= to_peer.size() && client->received.size() >= to_client.size();
  }));
  EXPECT_EQ(peer->received, to_peer);
  EXPECT_EQ(client->received, to_client);
  EXPECT_EQ(client->write_errors + peer->write_errors, 0);
  // And back to non-blocking, still libuv's.
  ASSERT_EQ(uv_stream_set_blocking(st(client), 0), 0);
  EXPECT_TRUE(::fcntl(fd, F_GETFL) & O_NONBLOCK);
}

// ---- Memory -----------------------------------------------------------------------------

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

// An idle connection of the memory test: the handle only (a program's
// smallest), reading into one buffer shared by all (libuv programs hand out
// one buffer at a time).
struct Idle {
  uv_tcp_t h;
};
char g_shared_buf[64 * 1024];
std::size_t g_idle_bytes = 0;
int g_idle_accepted = 0;
int g_idle_closed = 0;

// The connecting side, in a child process (so that each process needs only
// 10,000 descriptors): on each count read from `ctl` it connects that many
// sockets to `port`, sends "hi" on each, and writes the count back to
// `report`; it exits when `ctl` closes, or after a minute whatever happens.
[[noreturn]] void connector(int ctl, int report, int port) {
  ::alarm(60);
  std::vector<int> fds;
  const sockaddr_in to = loopback(port);
  int n = 0;
  while (::read(ctl, &n, sizeof n) == static_cast<ssize_t>(sizeof n)) {
    int done = 0;
    for (int i = 0; i < n; ++i) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (fd < 0 || ::connect(fd, sa(to), sizeof to) != 0 || ::send(fd, "hi", 2, 0) != 2) {
        done = -errno;
        break;
      }
      fds.push_back(fd);
      ++done;
    }
    if (::write(report, &done, sizeof done) != static_cast<ssize_t>(sizeof done)) break;
  }
  ::_exit(0);
}

// 10,000 idle adopted connections cost no more receive buffers than 10: the
// multishot recvs take the loop's provided buffers only while bytes are in
// them, and alloc_cb's buffer only while a read callback runs.
//
// The bound: what RSS grows by from 10 to 10,000 connections, per added
// connection. Each costs its own state, which is not a receive buffer:
// libuv's uv_tcp_t (~250 bytes, here malloc'd by the test), adoption's
// block for it (the engine's Stream: about 1 KiB), and libuv's watcher table
// (a pointer per fd). A receive buffer held per connection would cost at
// least a page (4 KiB) once a byte landed in it (each connection here
// received 2), and ringpark's provided buffers are 16 KiB, libuv's suggestion
// 64 KiB. So 2.5 KiB per connection separates the two with room for
// allocator slack, and a per-connection buffer of any size fails it.
TEST_F(Adopt, TenThousandIdleConnectionsCostNoMoreReceiveBuffersThanTen) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "RSS under AddressSanitizer measures its quarantine and shadow, not ours";
#endif
  constexpr int kFew = 10;
  constexpr int kMany = 10'000;
  constexpr std::size_t kBoundPerConnection = 2560;
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlimit raised = old;
  raised.rlim_cur = old.rlim_max;
  if (old.rlim_max != RLIM_INFINITY && old.rlim_max < kMany + 200) {
    GTEST_SKIP() << "RLIMIT_NOFILE's hard limit is " << old.rlim_max << ": 10,000 connections need "
                 << kMany + 200 << " descriptors in each process";
  }
  if (raised.rlim_cur == RLIM_INFINITY || raised.rlim_cur > 1'048'576) raised.rlim_cur = 1'048'576;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &raised), 0);

  int ctl[2], report[2];
  ASSERT_EQ(::pipe2(ctl, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(report, O_CLOEXEC | O_NONBLOCK), 0);
  uv_tcp_t server;
  ASSERT_EQ(uv_tcp_init(&loop_, &server), 0);
  sockaddr_in any = loopback(0);
  ASSERT_EQ(uv_tcp_bind(&server, sa(any), 0), 0);
  static std::vector<Idle*> idle;
  idle.clear();
  idle.reserve(kMany);
  g_idle_bytes = 0;
  g_idle_accepted = g_idle_closed = 0;
  ASSERT_EQ(uv_listen(reinterpret_cast<uv_stream_t*>(&server), 4096,
                      [](uv_stream_t* s, int status) {
                        ASSERT_EQ(status, 0);
                        auto* c = new Idle;
                        ASSERT_EQ(uv_tcp_init(s->loop, &c->h), 0);
                        ASSERT_EQ(uv_accept(s, reinterpret_cast<uv_stream_t*>(&c->h)), 0);
                        idle.push_back(c);
                        ++g_idle_accepted;
                        ASSERT_EQ(uv_read_start(
                                      reinterpret_cast<uv_stream_t*>(&c->h),
                                      [](uv_handle_t*, size_t, uv_buf_t* buf) {
                                        *buf = uv_buf_init(g_shared_buf, sizeof g_shared_buf);
                                      },
                                      [](uv_stream_t*, ssize_t n, const uv_buf_t*) {
                                        if (n > 0) g_idle_bytes += static_cast<std::size_t>(n);
                                      }),
                                  0);
                      }),
            0);
  const int port = port_of(&server);

  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ctl[1]);
    ::close(report[0]);
    connector(ctl[0], report[1], port);
  }
  ::close(ctl[0]);
  ::close(report[1]);
  // Asks the child for `n` more connections and runs the loop until they are
  // accepted, adopted and have each delivered their 2 bytes.
  auto grow = [&](int n) {
    ASSERT_EQ(::write(ctl[1], &n, sizeof n), static_cast<ssize_t>(sizeof n));
    const int want = g_idle_accepted + n;
    int got = -1;
    ASSERT_TRUE(run_until(
        [&] {
          if (got < 0 && ::read(report[0], &got, sizeof got) != static_cast<ssize_t>(sizeof got)) {
            got = -1;
          }
          return got >= 0 && g_idle_accepted == want && g_idle_bytes == 2u * want;
        },
        30s))
        << "accepted " << g_idle_accepted << " of " << want << ", child reported " << got;
    ASSERT_EQ(got, n) << "the child's connect failed (a negative errno)";
    run_for(50ms);  // settle: nothing left in flight but the idle reads
  };
  grow(kFew);
  const std::size_t rss_few = resident_bytes();
  for (int done = kFew; done < kMany && !HasFatalFailure(); done += 1000) {
    grow(std::min(1000, kMany - done));
  }
  const std::size_t rss_many = resident_bytes();
  if (!HasFatalFailure()) {
    const std::size_t added = kMany - kFew;
    const std::size_t per = rss_many > rss_few ? (rss_many - rss_few) / added : 0;
    std::printf(
        "RSS: %zu KiB with %d connections, %zu KiB with %d: %zu bytes per connection "
        "(adoption %s)\n",
        rss_few / 1024, kFew, rss_many / 1024, kMany, per, adoption_state_.c_str());
    EXPECT_LT(per, kBoundPerConnection);
    if (adoption()) {
      int adopted = 0;
      for (Idle* c : idle) adopted += AdoptedTcp::adopted(&c->h);
      EXPECT_EQ(adopted, kMany);
    }
  }
  // Tear down: the child exits when its control pipe closes; every handle
  // closes through the loop.
  ::close(ctl[1]);
  for (Idle* c : idle) {
    uv_close(reinterpret_cast<uv_handle_t*>(&c->h), [](uv_handle_t* h) {
      ++g_idle_closed;
      delete reinterpret_cast<Idle*>(h);
    });
  }
  const int to_close = static_cast<int>(idle.size());
  uv_close(reinterpret_cast<uv_handle_t*>(&server), nullptr);
  EXPECT_TRUE(run_until([&] { return g_idle_closed == to_close; }, 30s));
  idle.clear();
  int wstatus = 0;
  EXPECT_EQ(::waitpid(child, &wstatus, 0), child);
  ::close(report[0]);
  ::setrlimit(RLIMIT_NOFILE, &old);
}

}  // namespace
}  // namespace ringpark::test::tcp
