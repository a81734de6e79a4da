// The C++ handles: File, TcpListener and TcpStream. Every test runs once per
// backend (RINGPARK_BACKEND=uring and =epoll), uses loopback sockets, pipes and
// files in a fresh mkdtemp directory only, and is bounded by a watchdog that
// also covers the Runtime's destruction.
//
// GoogleTest's ASSERT_* macros `return`, which a coroutine may not; inside
// coroutines the tests use EXPECT_* and co_return by hand. Coroutine lambdas
// capture nothing: what they use is passed as parameters, which live in the
// frame.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "ringpark/file.hpp"
#include "ringpark/net.hpp"
#include "ringpark/ops.hpp"
#include "ringpark/runtime.hpp"
#include "ringpark/task.hpp"
#include "tests/test_util.hpp"

namespace ringpark::test {
namespace {

using namespace std::chrono_literals;

const char* env_backend() {
  const char* value = std::getenv("RINGPARK_BACKEND");
  return value ? value : "";
}

// Skips when io_uring was demanded and the machine does not have it.
std::optional<Runtime> try_build() {
  try {
    return Runtime::Builder().build();
  } catch (const std::system_error&) {
    if (std::string(env_backend()) == "uring") return std::nullopt;
    throw;
  }
}

class HandlesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rt_ = try_build();
    if (!rt_) GTEST_SKIP() << "RINGPARK_BACKEND=uring but io_uring is unusable here";
  }
  Runtime& rt() { return *rt_; }

  // Declared first, so destroyed last: it bounds ~Runtime as well.
  Watchdog watchdog_{20s, "test"};
  std::optional<Runtime> rt_;
};

struct Pipe {
  Pipe() { EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0); }
  ~Pipe() {
    for (int fd : fds) {
      if (fd >= 0) ::close(fd);
    }
  }
  int release_read() { return std::exchange(fds[0], -1); }
  int fds[2] = {-1, -1};
};

// Counts the frames destroyed; lives in a coroutine's frame.
struct Tracker {
  explicit Tracker(int& counter) : counter(&counter) {}
  Tracker(Tracker&& other) noexcept : counter(std::exchange(other.counter, nullptr)) {}
  ~Tracker() {
    if (counter != nullptr) ++*counter;
  }
  int* counter;
};

Buffer bytes_of(const std::string& s) { return Buffer(s.begin(), s.end()); }
std::string text_of(const Buffer& b, std::size_t n) { return std::string(b.data(), n); }

Buffer pattern(std::size_t size, unsigned seed) {
  Buffer b(size);
  for (std::size_t i = 0; i < size; ++i) b[i] = static_cast<char>((i * 131 + seed * 7) % 251);
  return b;
}

bool fd_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

Task<void> nap(Runtime& rt, std::chrono::milliseconds d) { co_await sleep_for(rt, d); }

template <class Pred>
Task<void> wait_until(Runtime& rt, Pred done) {
  while (!done()) co_await sleep_for(rt, 1ms);
}

// Receives until `n` bytes came or the stream ended; returns what came.
Task<std::string> recv_exactly(TcpStream& s, std::size_t n) {
  std::string got;
  Buffer buf(64 * 1024);
  while (got.size() < n) {
    BufferResult r = co_await s.recv(std::move(buf));
    buf = std::move(r.buffer);
    EXPECT_TRUE(r) << r.error.message();
    if (!r || r.bytes == 0) break;
    got.append(buf.data(), r.bytes);
  }
  co_return got;
}

// Receives until the end of the stream.
Task<std::string> recv_to_end(TcpStream& s) {
  std::string got;
  Buffer buf(64 * 1024);
  for (;;) {
    BufferResult r = co_await s.recv(std::move(buf));
    buf = std::move(r.buffer);
    EXPECT_TRUE(r) << r.error.message();
    if (!r || r.bytes == 0) break;
    got.append(buf.data(), r.bytes);
  }
  co_return got;
}

// A connected pair through `listener`: {client, server side}.
struct Pair {
  TcpStream client;
  TcpStream server;
};

Task<Pair> connect_pair(Runtime& rt, TcpListener& listener) {
  Pair p;
  // A loopback connect completes from the backlog, before any accept.
  Result<TcpStream> c = co_await TcpStream::connect(rt, "127.0.0.1", listener.local_port());
  EXPECT_TRUE(c) << c.error.message();
  Result<TcpStream> s = co_await listener.accept();
  EXPECT_TRUE(s) << s.error.message();
  p.client = std::move(c.value);
  p.server = std::move(s.value);
  co_return p;
}

TcpListener listen_local(Runtime& rt) {
  Result<TcpListener> l = TcpListener::bind(rt, "127.0.0.1", 0);
  EXPECT_TRUE(l) << l.error.message();
  EXPECT_NE(l.value.local_port(), 0);
  return std::move(l.value);
}

// ---- File --------------------------------------------------------------------

TEST_F(HandlesTest, FileWriteReadStatFsyncClose) {
  TempDir dir;
  auto body = [](Runtime& rt, std::string path) -> Task<void> {
    Result<File> opened = co_await File::open(rt, path, O_CREAT | O_RDWR | O_TRUNC, 0600);
    EXPECT_TRUE(opened) << opened.error.message();
    if (!opened) co_return;
    File f = std::move(opened.value);
    EXPECT_TRUE(f.is_open());
    EXPECT_NE(::fcntl(f.fd(), F_GETFD) & FD_CLOEXEC, 0);

    BufferResult w = co_await f.write(bytes_of("hello, ring"), 0);
    EXPECT_TRUE(w) << w.error.message();
    EXPECT_EQ(w.bytes, 11u);
    EXPECT_EQ(text_of(w.buffer, w.buffer.size()), "hello, ring");  // given back whole
    w = co_await f.write(bytes_of("RING"), 7);
    EXPECT_EQ(w.bytes, 4u);

    Result<void> synced = co_await f.fsync();
    EXPECT_TRUE(synced) << synced.error.message();
    synced = co_await f.fdatasync();
    EXPECT_TRUE(synced) << synced.error.message();

    Result<FileStat> st = co_await f.stat();
    EXPECT_TRUE(st) << st.error.message();
    EXPECT_EQ(st.value.size, 11u);
    EXPECT_TRUE(S_ISREG(st.value.mode));
    EXPECT_EQ(st.value.mode & 0777, 0600u);
    EXPECT_EQ(st.value.nlink, 1u);
    EXPECT_EQ(st.value.uid, ::getuid());
    EXPECT_GT(st.value.mtime_ns, 0);

    BufferResult r = co_await f.read(Buffer(64, '\0'), 0);
    EXPECT_TRUE(r) << r.error.message();
    EXPECT_EQ(r.buffer.size(), 64u);  // the size is not changed
    EXPECT_EQ(text_of(r.buffer, r.bytes), "hello, RING");
    r = co_await f.read(Buffer(4), 7);
    EXPECT_EQ(text_of(r.buffer, r.bytes), "RING");
    r = co_await f.read(Buffer(8), 11);  // the end of the file
    EXPECT_TRUE(r);
    EXPECT_EQ(r.bytes, 0u);

    const int fd = f.fd();
    Result<void> closed = co_await f.close();
    EXPECT_TRUE(closed) << closed.error.message();
    EXPECT_FALSE(f.is_open());
    EXPECT_FALSE(fd_open(fd));  // closed through the backend
    closed = co_await f.close();
    EXPECT_EQ(closed.error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt(), dir.file("data")));
}

TEST_F(HandlesTest, FileReadsAndWritesAtThePosition) {
  TempDir dir;
  auto body = [](Runtime& rt, std::string path) -> Task<void> {
    Result<File> f = co_await File::open(rt, path, O_CREAT | O_RDWR | O_TRUNC);
    EXPECT_TRUE(f) << f.error.message();
    EXPECT_EQ((co_await f.value.write(bytes_of("abc"))).bytes, 3u);  // offset -1
    EXPECT_EQ((co_await f.value.write(bytes_of("def"))).bytes, 3u);
    BufferResult r = co_await f.value.read(Buffer(16), 0);
    EXPECT_EQ(text_of(r.buffer, r.bytes), "abcdef");
    r = co_await f.value.read(Buffer(16));  // at the position: the end
    EXPECT_TRUE(r);
    EXPECT_EQ(r.bytes, 0u);
    EXPECT_TRUE(co_await f.value.close());
  };
  block_on(rt(), body(rt(), dir.file("pos")));
}

TEST_F(HandlesTest, OpeningAMissingFileGivesENOENT) {
  TempDir dir;
  auto body = [](Runtime& rt, std::string dir) -> Task<void> {
    Result<File> f = co_await File::open(rt, dir + "/missing", O_RDONLY);
    EXPECT_EQ(f.error, std::errc::no_such_file_or_directory) << f.error.message();
    EXPECT_FALSE(f.value.is_open());
    // A directory opened for writing, and a path the kernel would cut at a NUL.
    f = co_await File::open(rt, dir, O_WRONLY);
    EXPECT_EQ(f.error, std::errc::is_a_directory) << f.error.message();
    f = co_await File::open(rt, dir + std::string("/a\0b", 4), O_RDONLY | O_CREAT);
    EXPECT_EQ(f.error, std::errc::invalid_argument) << f.error.message();
  };
  block_on(rt(), body(rt(), dir.path));
}

TEST_F(HandlesTest, ClosedEmptyAndMovedFromFilesGiveEBADF) {
  TempDir dir;
  auto body = [](Runtime& rt, std::string path) -> Task<void> {
    File empty;  // no Runtime at all
    BufferResult r = co_await empty.read(bytes_of("keep"), 0);
    EXPECT_EQ(r.error, std::errc::bad_file_descriptor);
    EXPECT_EQ(text_of(r.buffer, r.buffer.size()), "keep");  // the buffer comes back
    EXPECT_EQ((co_await empty.write(bytes_of("x"), 0)).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await empty.fsync()).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await empty.stat()).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await empty.close()).error, std::errc::bad_file_descriptor);

    Result<File> f = co_await File::open(rt, path, O_CREAT | O_RDWR);
    EXPECT_TRUE(f);
    File moved = std::move(f.value);
    EXPECT_EQ((co_await f.value.write(bytes_of("x"), 0)).error, std::errc::bad_file_descriptor);
    EXPECT_TRUE(co_await moved.close());
    r = co_await moved.read(Buffer(8, 'z'), 0);
    EXPECT_EQ(r.error, std::errc::bad_file_descriptor);
    EXPECT_EQ(r.buffer, Buffer(8, 'z'));
    EXPECT_EQ((co_await moved.stat()).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await moved.fdatasync()).error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt(), dir.file("f")));
}

TEST_F(HandlesTest, InvalidDescriptorsGiveErrorsInTheResult) {
  auto body = [](Runtime& rt) -> Task<void> {
    // A number no descriptor has: the kernel's own EBADF.
    constexpr int kNoSuchFd = 1 << 20;
    File f(rt, kNoSuchFd);
    BufferResult r = co_await f.read(Buffer(8), 0);
    EXPECT_EQ(r.error, std::errc::bad_file_descriptor) << r.error.message();
    EXPECT_EQ((co_await f.stat()).error, std::errc::bad_file_descriptor);
    f.release();
    TcpStream s(rt, kNoSuchFd);
    EXPECT_EQ((co_await s.recv(Buffer(8))).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await s.send(Buffer(8))).error, std::errc::bad_file_descriptor);
    s.release();
    TcpListener l(rt, kNoSuchFd);
    EXPECT_EQ((co_await l.accept()).error, std::errc::bad_file_descriptor);
    l.release();
    // A negative descriptor is a closed handle.
    TcpStream negative(rt, -5);
    EXPECT_FALSE(negative.is_open());
    EXPECT_EQ((co_await negative.recv(Buffer(8))).error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt()));
}

TEST_F(HandlesTest, EmptyBuffers) {
  TempDir dir;
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener, std::string path) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    // A recv of nothing would read as the end of the stream: refused.
    BufferResult r = co_await p.client.recv(Buffer{});
    EXPECT_EQ(r.error, std::errc::invalid_argument);
    r = co_await p.client.send(Buffer{});
    EXPECT_TRUE(r) << r.error.message();
    EXPECT_EQ(r.bytes, 0u);
    r = co_await p.client.send_all(Buffer{});
    EXPECT_TRUE(r) << r.error.message();
    EXPECT_EQ(r.bytes, 0u);

    Result<File> f = co_await File::open(rt, path, O_CREAT | O_RDWR);
    EXPECT_TRUE(f);
    EXPECT_EQ((co_await f.value.read(Buffer{}, 0)).error, std::errc::invalid_argument);
    r = co_await f.value.write(Buffer{}, 0);
    EXPECT_TRUE(r);
    EXPECT_EQ(r.bytes, 0u);
    // A closed handle says so, even for an empty buffer.
    EXPECT_TRUE(co_await p.client.close());
    EXPECT_EQ((co_await p.client.send(Buffer{})).error, std::errc::bad_file_descriptor);
    EXPECT_EQ((co_await p.client.send_all(Buffer{})).error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt(), listener, dir.file("empty")));
}

TEST_F(HandlesTest, CancellingAPipeReadGivesTheBufferBack) {
  Pipe pipe;
  File reader(rt(), pipe.release_read());
  auto body = [](Runtime& rt, File& reader, int write_fd) -> Task<void> {
    CancelToken token;
    auto cancel_later = [](Runtime& rt, CancelToken& token) -> Task<void> {
      co_await sleep_for(rt, 10ms);
      token.cancel();
    };
    spawn(rt, cancel_later(rt, token));
    BufferResult r = co_await reader.read(bytes_of("untouched"), -1, &token);
    EXPECT_EQ(r.error, std::errc::operation_canceled) << r.error.message();
    EXPECT_EQ(text_of(r.buffer, r.buffer.size()), "untouched");
    token.reset();
    EXPECT_EQ(::write(write_fd, "hi", 2), 2);
    r = co_await reader.read(Buffer(16), -1, &token);
    EXPECT_EQ(text_of(r.buffer, r.bytes), "hi");
  };
  block_on(rt(), body(rt(), reader, pipe.fds[1]));
}

// ---- TCP -----------------------------------------------------------------------

TEST_F(HandlesTest, TcpEcho) {
  TcpListener listener = listen_local(rt());
  auto server = [](TcpListener& listener) -> Task<void> {
    Result<TcpStream> conn = co_await listener.accept();
    EXPECT_TRUE(conn) << conn.error.message();
    EXPECT_FALSE(conn.value.set_nodelay(true));
    Buffer buf(4096);
    for (;;) {
      BufferResult r = co_await conn.value.recv(std::move(buf));
      if (!r || r.bytes == 0) break;
      BufferResult s = co_await conn.value.send_all(
          Buffer(r.buffer.begin(), r.buffer.begin() + static_cast<std::ptrdiff_t>(r.bytes)));
      EXPECT_TRUE(s) << s.error.message();
      buf = std::move(r.buffer);
    }
    EXPECT_TRUE(co_await conn.value.close());
  };
  spawn(rt(), server(listener));
  auto client = [](Runtime& rt, std::uint16_t port) -> Task<void> {
    Result<TcpStream> c = co_await TcpStream::connect(rt, "127.0.0.1", port);
    EXPECT_TRUE(c) << c.error.message();
    TcpStream& s = c.value;
    EXPECT_FALSE(s.set_nodelay(true));
    Result<SocketAddress> peer = s.peer_address();
    EXPECT_TRUE(peer);
    EXPECT_EQ(peer.value.port(), port);
    EXPECT_EQ(peer.value.to_string(), "127.0.0.1:" + std::to_string(port));
    EXPECT_NE(s.local_address().value.port(), 0);
    for (int i = 0; i < 20; ++i) {
      const std::string msg = "ping " + std::to_string(i);
      BufferResult sent = co_await s.send_all(bytes_of(msg));
      EXPECT_EQ(sent.bytes, msg.size());
      EXPECT_EQ(co_await recv_exactly(s, msg.size()), msg);
    }
    EXPECT_TRUE(co_await s.shutdown());
    EXPECT_EQ(co_await recv_to_end(s), "");  // the server closes after our end
    EXPECT_TRUE(co_await s.close());
  };
  block_on(rt(), client(rt(), listener.local_port()));
}

TEST_F(HandlesTest, FiftyConcurrentConnections) {
  static constexpr int kClients = 50;
  static constexpr std::size_t kBytes = 64 * 1024;
  TcpListener listener = listen_local(rt());
  auto echo = [](TcpStream conn) -> Task<void> {
    Buffer buf(16 * 1024);
    for (;;) {
      BufferResult r = co_await conn.recv(std::move(buf));
      if (!r || r.bytes == 0) break;
      Buffer out(r.buffer.begin(), r.buffer.begin() + static_cast<std::ptrdiff_t>(r.bytes));
      if (!co_await conn.send_all(std::move(out))) break;
      buf = std::move(r.buffer);
    }
    co_await conn.close();
  };
  auto server = [](Runtime& rt, TcpListener& listener, int n, auto echo) -> Task<void> {
    for (int i = 0; i < n; ++i) {
      Result<TcpStream> conn = co_await listener.accept();
      EXPECT_TRUE(conn) << conn.error.message();
      if (!conn) co_return;
      spawn(rt, echo(std::move(conn.value)));
    }
  };
  auto client = [](Runtime& rt, std::uint16_t port, unsigned id, int& ok) -> Task<void> {
    Result<TcpStream> c = co_await TcpStream::connect(rt, "127.0.0.1", port);
    EXPECT_TRUE(c) << c.error.message();
    if (!c) co_return;
    Buffer data = pattern(kBytes, id);
    const std::string expected(data.begin(), data.end());
    // Send and receive at once, or both sides' buffers could fill up.
    auto sender = [](TcpStream& s, Buffer data, int& sent) -> Task<void> {
      BufferResult r = co_await s.send_all(std::move(data));
      EXPECT_TRUE(r) << r.error.message();
      sent = 1;
    };
    int sent = 0;
    spawn(rt, sender(c.value, std::move(data), sent));
    const std::string got = co_await recv_exactly(c.value, kBytes);
    co_await wait_until(rt, [&] { return sent == 1; });
    EXPECT_TRUE(got == expected) << "client " << id << " got " << got.size() << " bytes";
    if (got == expected) ++ok;
    EXPECT_TRUE(co_await c.value.close());
  };
  spawn(rt(), server(rt(), listener, kClients, echo));
  int ok = 0;
  for (int i = 0; i < kClients; ++i) {
    spawn(rt(), client(rt(), listener.local_port(), static_cast<unsigned>(i), ok));
  }
  block_on(rt(), wait_until(rt(), [&] { return ok == kClients; }));
  EXPECT_EQ(ok, kClients);
}

TEST_F(HandlesTest, SendAllOfFourMebibytes) {
  static constexpr std::size_t kBytes = 4 << 20;
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    auto reader = [](TcpStream& s, std::string& got, bool& done) -> Task<void> {
      got = co_await recv_to_end(s);
      done = true;
    };
    std::string got;
    bool done = false;
    spawn(rt, reader(p.server, got, done));
    Buffer data = pattern(kBytes, 3);
    const Buffer original = data;
    BufferResult r = co_await p.client.send_all(std::move(data));
    EXPECT_TRUE(r) << r.error.message();
    EXPECT_EQ(r.bytes, kBytes);
    EXPECT_TRUE(r.buffer == original);  // given back whole and unchanged
    EXPECT_TRUE(co_await p.client.shutdown());
    co_await wait_until(rt, [&] { return done; });
    EXPECT_EQ(got.size(), kBytes);
    EXPECT_TRUE(got == std::string(original.begin(), original.end()));
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, RecvGivesZeroBytesAfterThePeerShutsDown) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    EXPECT_TRUE(co_await p.client.send_all(bytes_of("last words")));
    EXPECT_TRUE(co_await p.client.shutdown(SHUT_WR));
    EXPECT_EQ(co_await recv_to_end(p.server), "last words");
    BufferResult r = co_await p.server.recv(Buffer(16));  // and again: still the end
    EXPECT_TRUE(r);
    EXPECT_EQ(r.bytes, 0u);
    // Half-closed: the other direction still works.
    EXPECT_TRUE(co_await p.server.send_all(bytes_of("bye")));
    EXPECT_TRUE(co_await p.server.close());
    EXPECT_EQ(co_await recv_to_end(p.client), "bye");
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, SendingToAClosedPeerIsAnErrorNotASignal) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    EXPECT_TRUE(co_await p.server.close());
    BufferResult r;
    for (int i = 0; i < 100 && r; ++i) r = co_await p.client.send_all(Buffer(64 * 1024));
    EXPECT_TRUE(r.error == std::errc::broken_pipe || r.error == std::errc::connection_reset)
        << r.error.message();
    EXPECT_EQ(r.buffer.size(), 64u * 1024);
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, BadAddresses) {
  EXPECT_EQ(TcpListener::bind(rt(), "not an address", 0).error, std::errc::invalid_argument);
  EXPECT_EQ(TcpListener::bind(rt(), nullptr, 0).error, std::errc::invalid_argument);
  TcpListener first = listen_local(rt());
  Result<TcpListener> second = TcpListener::bind(rt(), "127.0.0.1", first.local_port());
  EXPECT_EQ(second.error, std::errc::address_in_use) << second.error.message();
  EXPECT_FALSE(second.value.is_open());

  auto body = [](Runtime& rt, TcpListener& first) -> Task<void> {
    Result<TcpStream> c = co_await TcpStream::connect(rt, "localhost", 80);  // no name lookup
    EXPECT_EQ(c.error, std::errc::invalid_argument);
    c = co_await TcpStream::connect(rt, nullptr, 0);
    EXPECT_EQ(c.error, std::errc::invalid_argument);
    // A port nobody listens on any more.
    const std::uint16_t port = first.local_port();
    EXPECT_TRUE(co_await first.close());
    EXPECT_EQ(first.local_port(), 0);
    c = co_await TcpStream::connect(rt, "127.0.0.1", port);
    EXPECT_EQ(c.error, std::errc::connection_refused) << c.error.message();
    EXPECT_FALSE(c.value.is_open());
    EXPECT_EQ((co_await first.accept()).error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt(), first));
}

TEST_F(HandlesTest, Ipv6Loopback) {
  Result<TcpListener> l = TcpListener::bind(rt(), "::1", 0);
  if (!l) GTEST_SKIP() << "no IPv6 loopback: " << l.error.message();
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Result<TcpStream> c = co_await TcpStream::connect(rt, "::1", listener.local_port());
    EXPECT_TRUE(c) << c.error.message();
    Result<TcpStream> s = co_await listener.accept();
    EXPECT_TRUE(s) << s.error.message();
    EXPECT_EQ(c.value.peer_address().value.to_string(),
              "[::1]:" + std::to_string(listener.local_port()));
  };
  block_on(rt(), body(rt(), l.value));
}

// ---- Cancellation ----------------------------------------------------------------

TEST_F(HandlesTest, CancellingAPendingRecvGivesTheBufferBackIntact) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    CancelToken token;
    auto cancel_later = [](Runtime& rt, CancelToken& token) -> Task<void> {
      co_await sleep_for(rt, 10ms);
      token.cancel();
    };
    spawn(rt, cancel_later(rt, token));
    const Buffer original = pattern(1000, 9);
    BufferResult r = co_await p.client.recv(original, &token);
    EXPECT_EQ(r.error, std::errc::operation_canceled) << r.error.message();
    EXPECT_EQ(r.bytes, 0u);
    EXPECT_TRUE(r.buffer == original);
    // The stream still works once the token is reset.
    token.reset();
    EXPECT_TRUE(co_await p.server.send_all(bytes_of("after")));
    r = co_await p.client.recv(Buffer(16), &token);
    EXPECT_EQ(text_of(r.buffer, r.bytes), "after");
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, CancellingAPendingAccept) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    CancelToken token;
    auto cancel_later = [](Runtime& rt, CancelToken& token) -> Task<void> {
      co_await sleep_for(rt, 10ms);
      token.cancel();
    };
    spawn(rt, cancel_later(rt, token));
    Result<TcpStream> s = co_await listener.accept(&token);
    EXPECT_EQ(s.error, std::errc::operation_canceled) << s.error.message();
    EXPECT_FALSE(s.value.is_open());
    token.reset();
    Result<TcpStream> c = co_await TcpStream::connect(rt, "127.0.0.1", listener.local_port());
    EXPECT_TRUE(c);
    s = co_await listener.accept(&token);
    EXPECT_TRUE(s) << s.error.message();
  };
  block_on(rt(), body(rt(), listener));
}

// A task blocked in recv on `s`; `out` receives the result. It does not touch
// `s` after resuming.
Task<void> pending_recv(TcpStream& s, Buffer buffer, CancelToken* token,
                        std::optional<BufferResult>& out) {
  BufferResult r = co_await s.recv(std::move(buffer), token);
  out = std::move(r);
}

TEST_F(HandlesTest, CloseCancelsTheOperationsInFlight) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    // One recv started without a token (the stream cancels it through its
    // own) and one accept with a caller's token that nobody cancels (the
    // listener needs a cancel op for it).
    std::optional<BufferResult> recv_result;
    spawn(rt, pending_recv(p.client, bytes_of("intact"), nullptr, recv_result));
    CancelToken never;
    std::optional<Result<TcpStream>> accept_result;
    auto pending_accept = [](TcpListener& l, CancelToken& t,
                             std::optional<Result<TcpStream>>& out) -> Task<void> {
      out = co_await l.accept(&t);
    };
    spawn(rt, pending_accept(listener, never, accept_result));
    co_await sleep_for(rt, 10ms);
    EXPECT_FALSE(recv_result.has_value());
    EXPECT_FALSE(accept_result.has_value());

    const int fd = p.client.fd();
    EXPECT_TRUE(co_await p.client.close());
    EXPECT_TRUE(co_await listener.close());
    co_await wait_until(rt, [&] { return recv_result && accept_result; });
    EXPECT_EQ(recv_result->error, std::errc::operation_canceled) << recv_result->error.message();
    EXPECT_EQ(text_of(recv_result->buffer, recv_result->buffer.size()), "intact");
    EXPECT_EQ(accept_result->error, std::errc::operation_canceled)
        << accept_result->error.message();
    EXPECT_FALSE(never.cancelled());
    EXPECT_FALSE(fd_open(fd));
    EXPECT_EQ((co_await p.client.recv(Buffer(8))).error, std::errc::bad_file_descriptor);
  };
  block_on(rt(), body(rt(), listener));
}

// Closes a stream with a recv in flight, gives its descriptor number to a new
// socket and sends to that socket: only the new owner may see the data.
void fd_reuse(Runtime& runtime, bool cancel_with_token) {
  TcpListener listener = listen_local(runtime);
  auto body = [](Runtime& rt, TcpListener& listener, bool with_token) -> Task<void> {
    Pair old = co_await connect_pair(rt, listener);
    CancelToken token;
    std::optional<BufferResult> stale;
    spawn(rt, pending_recv(old.client, Buffer(64, 'x'), with_token ? &token : nullptr, stale));
    co_await sleep_for(rt, 10ms);
    EXPECT_FALSE(stale.has_value());

    const int number = old.client.fd();
    if (with_token) token.cancel();
    EXPECT_TRUE(co_await old.client.close());

    // At once, before looking at the stale recv: a new socket on the same
    // number, connected, with data for it and for the old connection.
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_GE(fd, 0);
    if (fd != number) {
      EXPECT_EQ(::dup3(fd, number, O_CLOEXEC), number);  // `number` is free: nothing is replaced
      ::close(fd);
    }
    TcpStream fresh(rt, number);
    Result<SocketAddress> addr = listener.local_address();
    EXPECT_TRUE(co_await connect(rt, number, addr.value.get(), addr.value.length));
    Result<TcpStream> fresh_peer = co_await listener.accept();
    EXPECT_TRUE(fresh_peer);
    co_await old.server.send_all(bytes_of("old"));  // may fail: that socket is closed
    EXPECT_TRUE(co_await fresh_peer.value.send_all(bytes_of("new")));
    EXPECT_TRUE(co_await fresh_peer.value.shutdown());

    // Only the new owner sees its data, all of it, and nothing of the old.
    EXPECT_EQ(co_await recv_to_end(fresh), "new");
    co_await wait_until(rt, [&] { return stale.has_value(); });
    EXPECT_EQ(stale->error, std::errc::operation_canceled) << stale->error.message();
    EXPECT_EQ(stale->bytes, 0u);
    EXPECT_EQ(stale->buffer, Buffer(64, 'x'));
  };
  block_on(runtime, body(runtime, listener, cancel_with_token));
}

TEST_F(HandlesTest, ReusedNumberGetsNoCompletionOfTheOldSocketAfterClose) {
  fd_reuse(rt(), /*cancel_with_token=*/false);
}

TEST_F(HandlesTest, ReusedNumberGetsNoCompletionOfTheOldSocketAfterCancelAndClose) {
  fd_reuse(rt(), /*cancel_with_token=*/true);
}

// ---- Lifetime --------------------------------------------------------------------

TEST_F(HandlesTest, MovingAStreamMovesItsOperations) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    std::optional<BufferResult> result;
    spawn(rt, pending_recv(p.client, Buffer(8), nullptr, result));
    co_await sleep_for(rt, 10ms);
    TcpStream moved = std::move(p.client);
    EXPECT_FALSE(p.client.is_open());
    EXPECT_EQ((co_await p.client.recv(Buffer(8))).error, std::errc::bad_file_descriptor);
    // The new owner's close finds and cancels the recv started on the old one.
    EXPECT_TRUE(co_await moved.close());
    co_await wait_until(rt, [&] { return result.has_value(); });
    EXPECT_EQ(result->error, std::errc::operation_canceled);
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, DestroyingAStreamWithARecvInFlightCancelsIt) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    std::optional<TcpStream> stream(std::move(p.client));
    std::optional<BufferResult> result;
    spawn(rt, pending_recv(*stream, bytes_of("mine"), nullptr, result));
    co_await sleep_for(rt, 10ms);
    const int fd = stream->fd();
    stream.reset();  // not closed: the destructor closes synchronously
    EXPECT_FALSE(fd_open(fd));
    co_await wait_until(rt, [&] { return result.has_value(); });
    EXPECT_EQ(result->error, std::errc::operation_canceled) << result->error.message();
    EXPECT_EQ(text_of(result->buffer, result->buffer.size()), "mine");
    // The peer sees the connection end: the socket is really gone.
    EXPECT_EQ(co_await recv_to_end(p.server), "");
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, ReleasedDescriptorsKeepTheirOperations) {
  TcpListener listener = listen_local(rt());
  auto body = [](Runtime& rt, TcpListener& listener) -> Task<void> {
    Pair p = co_await connect_pair(rt, listener);
    std::optional<BufferResult> result;
    spawn(rt, pending_recv(p.client, Buffer(16), nullptr, result));
    co_await sleep_for(rt, 10ms);
    const int fd = p.client.release();
    EXPECT_FALSE(p.client.is_open());
    EXPECT_EQ(p.client.release(), -1);
    { TcpStream gone = std::move(p.client); }  // cancels and closes nothing now
    EXPECT_TRUE(fd_open(fd));
    EXPECT_TRUE(co_await p.server.send_all(bytes_of("still here")));
    co_await wait_until(rt, [&] { return result.has_value(); });
    EXPECT_TRUE(*result) << result->error.message();
    EXPECT_EQ(text_of(result->buffer, result->bytes), "still here");
    EXPECT_TRUE(co_await close(rt, fd));  // the caller's to close
  };
  block_on(rt(), body(rt(), listener));
}

TEST_F(HandlesTest, DestroyingTheRuntimeWhileTasksAreBlockedInHandles) {
  int destroyed = 0;
  int resumed = 0;
  Pipe pipe;
  TcpListener listener = listen_local(rt());
  // The peers stay open here, so that nothing but the teardown ends the waits.
  auto peers = [](Runtime& rt, TcpListener& l) -> Task<Pair> {
    co_return co_await connect_pair(rt, l);
  };
  Pair recv_pair = block_on(rt(), peers(rt(), listener));
  Pair send_pair = block_on(rt(), peers(rt(), listener));
  const int fds[] = {recv_pair.client.fd(), send_pair.client.fd(), listener.fd(), pipe.fds[0]};

  auto in_recv = [](TcpStream s, Tracker, int& resumed) -> Task<void> {
    BufferResult r = co_await s.recv(Buffer(1 << 16));
    (void)r;
    ++resumed;
  };
  auto in_send_all = [](TcpStream s, Tracker, int& resumed) -> Task<void> {
    // Far more than the socket buffers hold, with a peer that never reads.
    BufferResult r = co_await s.send_all(Buffer(64 << 20));
    (void)r;
    ++resumed;
  };
  auto in_accept = [](TcpListener l, Tracker, int& resumed) -> Task<void> {
    Result<TcpStream> c = co_await l.accept();
    (void)c;
    ++resumed;
  };
  auto in_read = [](File f, Tracker, int& resumed) -> Task<void> {
    BufferResult r = co_await f.read(Buffer(4096), -1);
    (void)r;
    ++resumed;
  };
  spawn(rt(), in_recv(std::move(recv_pair.client), Tracker(destroyed), resumed));
  spawn(rt(), in_send_all(std::move(send_pair.client), Tracker(destroyed), resumed));
  spawn(rt(), in_accept(std::move(listener), Tracker(destroyed), resumed));
  spawn(rt(), in_read(File(rt(), pipe.release_read()), Tracker(destroyed), resumed));
  block_on(rt(), nap(rt(), 50ms));  // every task reaches its operation
  EXPECT_EQ(destroyed, 0);
  {
    Watchdog watchdog(5s, "~Runtime");
    rt_.reset();
  }
  EXPECT_EQ(destroyed, 4);  // every frame, with its handle and buffer
  EXPECT_EQ(resumed, 0);
  for (int fd : fds) EXPECT_FALSE(fd_open(fd)) << "fd " << fd << " leaked";
}

}  // namespace
}  // namespace ringpark::test
