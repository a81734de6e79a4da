#include "runtime/stream/stream.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ringpark::detail::stream {
namespace {

// libuv's suggested read size.
constexpr std::size_t kSuggestedSize = 64 * 1024;
// Bytes held for a reader that cannot take them (alloc gives no buffer)
// beyond which the multishot recv is paused, so that the socket, not our
// memory, holds the backlog; it resumes once they are delivered.
constexpr std::size_t kHeldPause = std::size_t{1} << 20;
// A bulk stream fills every provided buffer, and copying out of them costs
// more than the multishot recv saves (measured: 15-25% of a 2 GiB transfer on
// loopback). After this many full buffers in a row a stream that may lend
// buffers reads with plain recv, straight into alloc's buffer...
constexpr std::uint8_t kBulkRun = 4;
// ...until this many plain reads in a row would each have fitted in one
// provided buffer: then it goes back to multishot recv.
constexpr std::uint8_t kSmallRun = 16;
// The most one send asks for: its result must fit an int.
constexpr std::size_t kMaxSend = std::size_t{1} << 30;
// The most iovecs one gathered send carries (IOV_MAX on Linux).
constexpr unsigned kGatherMax = IOV_MAX;
// How many reads one readiness report may run (Role::ready), as libuv's
// uv__read reads at most 32 times per wakeup so that one busy stream cannot
// starve the others.
constexpr int kReadsPerReady = 32;
// How long a listener waits before accepting again after an error that the
// next attempt would most likely hit too (EMFILE...): the connection that
// failed is still queued, so an immediate retry would spin.
constexpr std::uint64_t kAcceptBackoffNs = 10'000'000;

static_assert(sizeof(uv_buf_t) == sizeof(iovec) &&
                  offsetof(uv_buf_t, base) == offsetof(iovec, iov_base) &&
                  offsetof(uv_buf_t, len) == offsetof(iovec, iov_len),
              "uv_buf_t is an iovec on unix");

bool usable(const uv_buf_t& buf) noexcept { return buf.base != nullptr && buf.len > 0; }

bool reads_now(const Stream* s) noexcept { return (s->flags & (kReading | kClosing)) == kReading; }

void on_handle_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_write_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_connect_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_shutdown_op(Op* op, int res, std::uint32_t flags) noexcept;

// Points the stream's op at a new job; the op is idle (role none).
void prepare_handle_op(Stream* s, Role role, OpCode code) noexcept {
  Op& op = s->op;
  op.code = code;
  op.fd = s->fd();
  op.flags = 0;
  op.len = 0;
  op.offset = -1;
  op.buf = nullptr;
  op.addr = nullptr;
  op.addrlen = nullptr;
  op.complete = &on_handle_op;
  op.data = s;
  s->role = role;
}

// Last in every completion: the close goes on once nothing is in flight; an
// open stream tells its host, which may let go of it. Nothing may touch the
// stream after this returns.
void settle(Stream* s) noexcept {
  if (s->closing()) return s->life.settle();
  if (s->host->settled) s->host->settled(s);
}

void submit_handle_op(Stream* s, Role role, OpCode code) noexcept {
  prepare_handle_op(s, role, code);
  s->life.submit(&s->op);
}

// ---- Closing ------------------------------------------------------------------

void finish_write(Stream* s, WriteReq* w, int status) noexcept;
void finish_shutdown(Stream* s, int status) noexcept;

void cancel_all(FdLife* life) noexcept {
  auto* s = static_cast<Stream*>(life->owner());
  // Requests, not releases: every op still ends with its own final CQE.
  IoBackend& io = life->io();
  if (s->role != Role::none) io.cancel(&s->op);
  if (s->ms_active) io.cancel(&s->ms_op);
  if (s->write_active) io.cancel(&s->write_head->op);
  if (s->connect) io.cancel(&s->connect->op);
  if (s->shutdown && s->shutdown->started) io.cancel(&s->shutdown->op);
}

// The last op of a closing stream has completed: nothing of it is in the
// kernel any more. Complete what is still owed; the socket's close follows.
void drained(FdLife* life) noexcept {
  auto* s = static_cast<Stream*>(life->owner());
  // libuv's order (uv__stream_destroy): connect (done with its op), the writes
  // in order, then the shutdown.
  while (s->write_head) finish_write(s, s->write_head, UV_ECANCELED);
  if (s->shutdown) finish_shutdown(s, UV_ECANCELED);
  // Held bytes nobody will read: dropped (dispose, below), as libuv drops
  // unread data at close.
  s->held_end = 0;
  if (s->buf_lent) {
    // The lent buffer goes back so the front end can free it (libuv on Windows
    // does the same for a read that close cancels).
    uv_buf_t buf = s->buf;
    s->buf = uv_buf_t{};
    s->buf_lent = s->stashed = false;
    if (buf.base != nullptr) s->host->read(s, UV_ECANCELED, &buf);
  }
  // Connections nobody took: ours to close. They have no ops.
  while (s->acc_count > 0) {
    ::close(s->accepted[s->acc_head]);
    s->acc_head = (s->acc_head + 1) % s->acc_cap;
    --s->acc_count;
  }
  dispose(s);
}

void closed(FdLife* life) noexcept {
  auto* s = static_cast<Stream*>(life->owner());
  s->flags |= kClosed;
  s->role = Role::none;
  s->host->closed(s);  // the Stream may be gone from here on
}

constexpr FdLife::Hooks kLifeHooks = {&cancel_all, &drained, &closed};

// ---- Reading ------------------------------------------------------------------

void arm_read(Stream* s) noexcept;
void ms_resume(Stream* s) noexcept;
void schedule_drain(Stream* s) noexcept;

// Starts the next read if the stream reads and nothing else holds its op.
void maybe_arm_read(Stream* s) noexcept {
  if ((s->flags & (kReading | kClosing | kConnecting | kListening)) != kReading || s->in_alloc ||
      s->fd() < 0) {
    return;
  }
  if (s->flags & kQuiescing) {
    // Only what is held goes out; nothing new is read.
    if (s->held_len > 0 || s->held_end != 0) schedule_drain(s);
    return;
  }
  if (s->read_mode == ReadMode::multishot || s->held_len > 0 || s->held_end != 0) {
    return ms_resume(s);  // held bytes first, whatever reads next
  }
  if (s->role == Role::none) arm_read(s);
}

void arm_read(Stream* s) noexcept {
  if (!s->host->lend_buffers) {
    // As libuv: wait for readability, then read into alloc's buffer with a
    // syscall; no buffer of the front end's is held while waiting.
    submit_handle_op(s, Role::ready, OpCode::poll);
    s->op.flags = POLLIN;
    return;
  }
  if (s->stashed) {
    if (s->stash_res != -ECANCELED) {
      // A result that came in while stopped: deliver it from the loop.
      submit_handle_op(s, Role::stash, OpCode::nop);
      return;
    }
    s->stashed = false;  // a cancelled recv: its buffer is reused as is
  } else {
    s->buf = uv_buf_init(nullptr, 0);
    s->buf_lent = true;
    s->in_alloc = true;
    s->host->alloc(s, kSuggestedSize, &s->buf);
    s->in_alloc = false;
    if ((s->flags & (kReading | kClosing)) != kReading || s->role != Role::none) {
      // alloc stopped reading or closed the stream: keep the buffer for the
      // next start, or for the close.
      s->stashed = true;
      s->stash_res = -ECANCELED;
      return;
    }
  }
  if (usable(s->buf)) {
    prepare_handle_op(s, Role::recv, OpCode::recv);
    // The buffer is the front end's, lent until this op's final CQE: read
    // hands it back after that, and the close returns it only after that too.
    s->op.buf = s->buf.base;
    s->op.len = static_cast<std::uint32_t>(s->buf.len < kMaxSend ? s->buf.len : kMaxSend);
  } else {
    // No buffer: as libuv, wait until readable, then say UV_ENOBUFS.
    prepare_handle_op(s, Role::poll, OpCode::poll);
    s->op.flags = POLLIN;
  }
  s->life.submit(&s->op);
}

// Delivers the end of the stream (nread == UV_EOF) or a read error, in
// libuv's order: at the end reading stops before the callback; after an error
// the stream is no longer readable or writable at the callback, and reading
// stops after it unless the callback stopped it.
void end_read(Stream* s, ssize_t nread, const uv_buf_t* buf) noexcept {
  if (nread == UV_EOF) {
    s->flags = (s->flags & ~kReading) | kReadEof;
    if (s->host->reading_ended) s->host->reading_ended(s);
    s->host->read(s, nread, buf);
    return;
  }
  s->flags &= ~(kReadable | kWritable);  // the front end should close
  s->host->read(s, nread, buf);
  if (s->flags & kReading) {
    s->flags &= ~kReading;
    if (s->host->reading_ended) s->host->reading_ended(s);
  }
}

// Hands a read result to the front end, with the lent buffer.
void deliver(Stream* s, int res) noexcept {
  uv_buf_t buf = s->buf;
  s->buf = uv_buf_t{};
  s->buf_lent = s->stashed = false;
  ssize_t nread;
  if (res > 0) {
    nread = res;
    if (s->read_mode == ReadMode::bulk) {
      // Back to multishot recv once the stream is no longer bulk.
      const unsigned small = s->life.io().provided_buffer_size();
      s->run = static_cast<unsigned>(res) < small ? s->run + 1 : 0;
      if (s->run >= kSmallRun) {
        s->run = 0;
        s->read_mode = ReadMode::multishot;
      }
    }
  } else if (res == 0) {
    nread = UV_EOF;
  } else if (res == -EAGAIN || res == -EWOULDBLOCK) {
    nread = 0;
  } else {
    nread = res;
  }
  if (nread < 0) {
    end_read(s, nread, &buf);
  } else {
    s->host->read(s, nread, &buf);
  }
  maybe_arm_read(s);
}

// Role::ready: the socket is readable. Reads as libuv's uv__read does: an
// alloc, a recv(2), a read, while data keeps coming and the stream reads.
void read_ready(Stream* s) noexcept {
  for (int i = 0; i < kReadsPerReady && reads_now(s); ++i) {
    uv_buf_t buf = uv_buf_init(nullptr, 0);
    s->host->alloc(s, kSuggestedSize, &buf);
    if (!usable(buf)) {
      s->host->read(s, UV_ENOBUFS, &buf);
      break;
    }
    if (s->closing()) {
      // alloc closed the stream: its buffer goes back unfilled, as at close.
      s->host->read(s, UV_ECANCELED, &buf);
      break;
    }
    // Also when alloc stopped reading: libuv reads into the buffer it asked
    // for all the same.
    ssize_t n;
    do {
      n = ::recv(s->fd(), buf.base, buf.len, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      s->host->read(s, 0, &buf);  // as libuv: nothing after all
      break;
    }
    if (n <= 0) {
      end_read(s, n == 0 ? UV_EOF : -errno, &buf);
      break;
    }
    s->host->read(s, n, &buf);
    if (static_cast<std::size_t>(n) < buf.len) break;  // drained, as libuv reckons it
  }
  maybe_arm_read(s);
}

void on_read_op(Stream* s, Role role, int res, bool we_cancelled) noexcept {
  if (role == Role::stash) {
    // The nop only carried us back into the loop; the stash is the result.
    if (reads_now(s)) deliver(s, s->stash_res);
    return;
  }
  if (role == Role::ready) {
    if (reads_now(s) && res >= 0) return read_ready(s);
    if (reads_now(s) && !(res == -ECANCELED && we_cancelled)) {
      // The poll itself failed: as a read error.
      uv_buf_t buf = uv_buf_init(nullptr, 0);
      end_read(s, res, &buf);
    }
    return maybe_arm_read(s);
  }
  if (s->closing() || !(s->flags & kReading)) {
    // Nobody reads now: keep the buffer, and what came with it, for the next
    // read_start (or hand the buffer back at the close).
    s->stashed = true;
    s->stash_res = role == Role::recv ? res : -ECANCELED;
    return;
  }
  if (res == -ECANCELED && we_cancelled) {
    // Stopped and started again before the cancel came back: go on reading
    // into the same buffer.
    s->stashed = true;
    s->stash_res = -ECANCELED;
    maybe_arm_read(s);
    return;
  }
  if (role == Role::poll && res >= 0) {
    uv_buf_t buf = s->buf;
    s->buf = uv_buf_t{};
    s->buf_lent = false;
    s->host->read(s, UV_ENOBUFS, &buf);
    maybe_arm_read(s);
    return;
  }
  deliver(s, res);
}

// ---- Reading with multishot recv ------------------------------------------------
//
// A reading stream keeps ONE multishot recv in flight (ms_op), from read_start
// until read_stop, EOF or an error. Each completion's bytes sit in a buffer of
// the backend's: they are copied into buffers from alloc (as many alloc/read
// rounds as the front end's buffers need), and the provided buffer is recycled
// before the completion returns. Bytes that cannot be delivered now (reading
// stopped, or alloc gave no buffer) are copied into `held`, and delivered in
// order, before anything newer, from the loop once the stream reads again (a
// drain nop): nothing is lost. EOF and errors that come while bytes are held
// wait behind them in held_end.

void arm_multishot(Stream* s) noexcept {
  Op& op = s->ms_op;
  op.code = OpCode::recv_multishot;
  op.fd = s->fd();
  op.flags = 0;
  op.len = 0;
  op.buf = nullptr;  // the kernel picks buffers from the backend's ring
  op.complete = &on_ms_op;
  op.data = s;
  s->ms_active = true;
  s->ms_cancelled = false;
  s->life.submit(&op);
}

void cancel_multishot(Stream* s) noexcept {
  if (!s->ms_active || s->ms_cancelled) return;
  s->ms_cancelled = true;
  s->life.io().cancel(&s->ms_op);
}

// Brings held bytes back from the loop (never from inside a call of the front end's).
void schedule_drain(Stream* s) noexcept {
  if (s->role != Role::none || s->closing()) return;  // one is on its way already
  submit_handle_op(s, Role::drain, OpCode::nop);
}

void ms_resume(Stream* s) noexcept {
  if (s->held_len > 0 || s->held_end != 0) return schedule_drain(s);  // old bytes first
  if (s->read_mode != ReadMode::multishot) {
    if (s->role == Role::none) arm_read(s);  // the held bytes are out: plain recv goes on
    return;
  }
  if (!s->ms_active) arm_multishot(s);
  // Otherwise it is armed, or its cancel is on the way and its final
  // completion resumes.
}

// Keeps `n` bytes for later. Out of memory, they cannot be kept: the reader
// gets UV_ENOMEM after the bytes held before them, and reading stops.
void hold(Stream* s, const char* p, std::size_t n) noexcept {
  if (s->held_end != 0) return;  // nothing is read past an error
  if (s->held_off > 0 && s->held_len + n > s->held_cap) {
    std::memmove(s->held, s->held + s->held_off, s->held_len - s->held_off);
    s->held_len -= s->held_off;
    s->held_off = 0;
  }
  if (s->held_len + n > s->held_cap) {
    std::size_t cap = s->held_cap ? s->held_cap : 16 * 1024;
    while (cap < s->held_len + n) cap *= 2;
    auto* grown = static_cast<char*>(std::realloc(s->held, cap));
    if (grown == nullptr) {
      s->held_end = UV_ENOMEM;
      cancel_multishot(s);
      return;
    }
    s->held = grown;
    s->held_cap = cap;
  }
  std::memcpy(s->held + s->held_len, p, n);
  s->held_len += n;
  // The reader cannot keep up (alloc gives no buffer): let the socket hold
  // the rest. ms_resume() re-arms once the held bytes are delivered.
  if (s->held_len - s->held_off >= kHeldPause) cancel_multishot(s);
}

// Copies [p, p + n) into buffers from alloc, one read each, while the stream
// reads. Returns the bytes delivered; sets *starved when alloc gave no buffer
// (read got UV_ENOBUFS, as libuv does).
std::size_t hand_over(Stream* s, const char* p, std::size_t n, bool* starved) noexcept {
  std::size_t done = 0;
  while (done < n && reads_now(s)) {
    uv_buf_t buf = uv_buf_init(nullptr, 0);
    // Unless the host wants libuv's blind 64 KiB: the bytes waiting, so that
    // a program that allocates what is suggested allocates what it needs.
    // (Measured on rp_echo at 50 x 16: with 64 KiB, mallocs that no lent read
    // pins any more made glibc trim and re-fault its heap, and the server
    // spent ~15% more CPU per message.)
    const std::size_t left = n - done;
    s->host->alloc(s, s->host->fixed_suggestion || left > kSuggestedSize ? kSuggestedSize : left,
                   &buf);
    if (!usable(buf)) {
      *starved = true;
      s->host->read(s, UV_ENOBUFS, &buf);
      break;
    }
    if (s->closing()) {
      // alloc closed the stream: its buffer goes back unfilled, as at close.
      s->host->read(s, UV_ECANCELED, &buf);
      break;
    }
    // Also when alloc stopped reading: libuv, too, fills the buffer it asked
    // for and hands it back with the bytes.
    const std::size_t k = left < buf.len ? left : buf.len;
    std::memcpy(buf.base, p + done, k);
    done += k;
    s->host->read(s, static_cast<ssize_t>(k), &buf);
  }
  return done;
}

// Hands the stream's pending end (EOF or an error) to the reader. With
// end_with_buffer the end comes with a buffer from alloc, as libuv's does; if
// alloc has none, the reader gets UV_ENOBUFS and the end waits for the next
// try.
void deliver_end(Stream* s) noexcept {
  uv_buf_t buf = uv_buf_init(nullptr, 0);
  if (s->host->end_with_buffer) {
    s->host->alloc(s, kSuggestedSize, &buf);
    if (!reads_now(s)) {
      s->host->read(s, s->closing() ? UV_ECANCELED : 0, &buf);
      return;
    }
    if (!usable(buf)) {
      s->host->read(s, UV_ENOBUFS, &buf);
      return schedule_drain(s);
    }
  }
  const int end = s->held_end;
  s->held_end = 0;
  end_read(s, end, &buf);
}

// From the loop: delivers the held bytes, then the held end, then goes on
// reading.
void drain(Stream* s) noexcept {
  bool starved = false;
  while (reads_now(s) && s->held_off < s->held_len && !starved) {
    s->held_off += hand_over(s, s->held + s->held_off, s->held_len - s->held_off, &starved);
  }
  if (s->held_off == s->held_len) s->held_off = s->held_len = 0;
  if (!reads_now(s)) return;
  if (s->held_len > 0) return schedule_drain(s);  // no buffer now: try again next turn, as libuv
  if (s->held_end != 0) return deliver_end(s);
  maybe_arm_read(s);
}

// The bytes of one completion, while the provided buffer holding them is ours.
void take_bytes(Stream* s, const char* p, std::size_t n) noexcept {
  if (s->closing()) return;  // nobody reads any more: dropped, as libuv does at close
  std::size_t done = 0;
  if (reads_now(s) && s->held_len == 0 && s->held_end == 0) {
    bool starved = false;
    done = hand_over(s, p, n, &starved);
    if (s->closing()) return;
  }
  if (done < n) {
    hold(s, p + done, n - done);
    if (reads_now(s)) schedule_drain(s);
  }
}

// The multishot recv's final completion: it ended because we asked
// (read_stop, a pause, close), at EOF, on an error, or because the kernel
// lacks it.
void ms_ended(Stream* s, int res, bool we_cancelled) noexcept {
  if (s->closing()) return;
  if (s->to_bulk) {
    s->to_bulk = false;
    s->run = 0;
    if (s->read_mode == ReadMode::multishot) s->read_mode = ReadMode::bulk;
  }
  if (res == -EOPNOTSUPP) {
    // The kernel refused multishot recv (before Linux 6.0): plain recv from now
    // on, for this stream and, through the backend, every later one.
    s->read_mode = ReadMode::plain;
  } else if (res == 0 && s->held_end == 0) {
    s->held_end = UV_EOF;
  } else if (res < 0 && !(res == -ECANCELED && we_cancelled) && s->held_end == 0) {
    s->held_end = res;  // also an EOF or error that came after read_stop: kept
  }
  if (reads_now(s) && s->held_len == 0 && s->held_end != 0) return deliver_end(s);
  maybe_arm_read(s);
}

void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept {
  auto* s = static_cast<Stream*>(op->data);
  const bool more = flags & kMore;
  const bool we_cancelled = s->ms_cancelled;
  if (!more) {
    s->life.ended();
    s->ms_active = false;
    s->ms_cancelled = false;
  }
  if (flags & kBuffer) {
    // The backend's buffer is ours from this completion until recycle(); the
    // backend (and so the buffer) outlives every op in flight.
    IoBackend& io = s->life.io();
    const std::uint16_t id = buffer_id(flags);
    if (res > 0) take_bytes(s, io.provided_buffer(id), static_cast<std::size_t>(res));
    io.recycle(id);
    // A full buffer after full buffer: a bulk stream, better read plain (where
    // buffers may be lent).
    s->run = res > 0 && static_cast<unsigned>(res) >= io.provided_buffer_size() ? s->run + 1 : 0;
    if (s->run >= kBulkRun && s->host->lend_buffers && s->ms_active && !s->ms_cancelled &&
        reads_now(s)) {
      s->to_bulk = true;
      cancel_multishot(s);
    }
  } else if (res > 0) {
    std::fprintf(stderr, "ringpark: multishot recv of stream %p got %d bytes without a buffer\n",
                 static_cast<void*>(s), res);
    std::abort();
  }
  if (!more) ms_ended(s, res, we_cancelled);
  settle(s);
}

// ---- Listening ----------------------------------------------------------------

bool push_accepted(Stream* s, int fd) noexcept {
  if (s->acc_count == s->acc_cap) {
    std::uint32_t cap = s->acc_cap ? s->acc_cap * 2 : 16;
    auto* ring = static_cast<int*>(std::malloc(cap * sizeof(int)));
    if (ring == nullptr) return false;
    for (std::uint32_t i = 0; i < s->acc_count; ++i)
      ring[i] = s->accepted[(s->acc_head + i) % s->acc_cap];
    std::free(s->accepted);
    s->accepted = ring;
    s->acc_cap = cap;
    s->acc_head = 0;
  }
  s->accepted[(s->acc_head + s->acc_count) % s->acc_cap] = fd;
  ++s->acc_count;
  return true;
}

void arm_accept(Stream* s) noexcept {
  prepare_handle_op(s, Role::accept, OpCode::accept_multishot);
  s->op.flags = SOCK_NONBLOCK | SOCK_CLOEXEC;  // accept4's flags, as libuv's accept
  s->life.submit(&s->op);
}

void on_accept(Stream* s, int res, bool more) noexcept {
  if (res >= 0) {
    if (s->closing()) {
      ::close(res);  // came in while the cancel was on its way
    } else if (!push_accepted(s, res)) {
      ::close(res);
      s->host->connection(s, UV_ENOMEM);
    } else {
      s->host->connection(s, 0);
    }
  } else if (res != -ECANCELED && res != -ECONNABORTED && !s->closing()) {
    s->host->connection(s, res);  // libuv skips ECONNABORTED silently too
  }
  if (more || s->closing() || !(s->flags & kListening) || s->role != Role::none) return;
  // The multishot accept ended (the backend re-arms one that ends without an
  // error, so this is an error). Listen on unless the socket itself is wrong or
  // the backend is going away.
  switch (res) {
    case -ECANCELED:
    case -EBADF:
    case -EINVAL:
    case -ENOTSOCK:
    case -EOPNOTSUPP:
    case -EFAULT:
      s->flags &= ~kListening;
      return;
    case -ECONNABORTED:
    case -EPERM:
    case -EPROTO:
    case -EINTR:
    case -EAGAIN:
      // That one connection failed and is gone from the queue: go on at once.
      arm_accept(s);
      return;
    default:
      // EMFILE, ENFILE, ENOBUFS, ENOMEM or anything unknown: the next attempt
      // would fail the same way right now. Retry after a pause, not in a spin;
      // each failed retry is reported again.
      prepare_handle_op(s, Role::backoff, OpCode::timeout);
      s->op.timeout_ns = kAcceptBackoffNs;
      s->life.submit(&s->op);
  }
}

// ---- Writing ------------------------------------------------------------------

// Sends the queued writes from the head on, as many as one op can carry (the
// writes of a whole turn, when the stream's kick runs at the turn's end): one
// send for a lone buffer, else one sendmsg gathering every buffer of up to
// kGatherMax iovecs. Their bytes stay the callers' and the iovec array the
// stream's, untouched, until the op's final completion.
void start_writes(Stream* s) noexcept {
  WriteReq* head = s->write_head;
  unsigned iovs = 0;
  std::size_t bytes = 0;
  WriteReq* end = head;
  for (; end != nullptr && iovs < kGatherMax && bytes < kMaxSend; end = end->next) {
    while (end->index < end->nbufs && end->iov[end->index].iov_len == 0) ++end->index;
    const unsigned left = end->nbufs - end->index;
    if (iovs > 0 && iovs + left > kGatherMax) break;  // whole requests only, but the first
    iovs += left;
    bytes += end->size;
  }
  s->flight_end = end;
  Op& op = head->op;
  op.fd = s->fd();
  op.offset = -1;
  op.complete = &on_write_op;
  op.data = head;
  if (iovs == 0) {
    op.code = OpCode::nop;  // zero bytes: completes with 0, in order
  } else if (iovs == 1 && head->next == end) {
    const iovec& v = head->iov[head->index];
    op.code = OpCode::send;
    op.buf = v.iov_base;  // the caller's bytes, valid until the write callback
    op.len = static_cast<std::uint32_t>(v.iov_len < kMaxSend ? v.iov_len : kMaxSend);
    // MSG_WAITALL: the kernel finishes a short send itself where it can.
    op.flags = MSG_NOSIGNAL | MSG_WAITALL;
  } else {
    const iovec* iov = &head->iov[head->index];  // one write: its own copy of the array
    if (head->next != end) {
      if (iovs > s->gather_cap) {
        const unsigned cap = iovs > 16 ? iovs : 16;
        auto* grown = static_cast<iovec*>(std::realloc(s->gather, cap * sizeof(iovec)));
        if (grown != nullptr) {
          s->gather = grown;
          s->gather_cap = cap;
        }
      }
      if (iovs <= s->gather_cap) {
        unsigned k = 0;
        for (WriteReq* w = head; w != end; w = w->next) {
          for (unsigned i = w->index; i < w->nbufs; ++i) s->gather[k++] = w->iov[i];
        }
        iov = s->gather;
      } else {
        // No memory to gather: the head write alone.
        s->flight_end = head->next;
        iovs = head->nbufs - head->index;
      }
    }
    s->gather_msg = msghdr{};
    s->gather_msg.msg_iov = const_cast<iovec*>(iov);  // kept until the final CQE
    s->gather_msg.msg_iovlen = iovs < IOV_MAX ? iovs : IOV_MAX;
    op.code = OpCode::sendmsg;
    op.buf = &s->gather_msg;  // in the stream, kept until the final CQE
    // Without MSG_WAITALL: a short send completes the op, and with it the
    // writes it finished, as libuv reports each write once it is out, rather
    // than holding an early write's callback until the last one is sent.
    op.flags = MSG_NOSIGNAL;
  }
  s->write_active = true;
  s->life.submit(&op);
}

// Takes the head write off the queue and hands it back to the front end.
void finish_write(Stream* s, WriteReq* w, int status) noexcept {
  s->queued_bytes -= w->size;  // what an error or the close left unsent
  s->write_head = w->next;
  if (s->write_head == nullptr) s->write_tail = nullptr;
  if (w->iov != w->small) std::free(w->iov);
  w->iov = nullptr;
  s->host->write_done(s, w, status);  // the request may be freed from here on
}

void finish_shutdown(Stream* s, int status) noexcept {
  ShutdownReq* r = s->shutdown;
  s->shutdown = nullptr;
  s->flags &= ~kShutting;
  if (status == 0) s->flags |= kShut;
  s->host->shutdown_done(s, r, status);
}

void start_shutdown(Stream* s) noexcept {
  ShutdownReq* r = s->shutdown;
  r->started = true;
  r->op.code = OpCode::shutdown;
  r->op.fd = s->fd();
  r->op.flags = SHUT_WR;
  r->op.complete = &on_shutdown_op;
  r->op.data = r;
  s->life.submit(&r->op);
}

// The stream's kick, run by the backend at the end of the turn (Deferred):
// sends what the turn queued, or the shutdown once no write is left.
void kick_writes(Deferred* d) noexcept {
  Stream* s = reinterpret_cast<Stream*>(reinterpret_cast<char*>(d) - offsetof(Stream, kick));
  if ((s->flags & (kClosing | kConnecting)) || s->fd() < 0 || s->write_active) return;
  if (s->write_head) return start_writes(s);
  if (s->shutdown && !s->shutdown->started) start_shutdown(s);
}

// Has the writes (or the shutdown) started at the end of the turn, when the
// stream may write: every write queued until then goes in the same op.
void pump_writes(Stream* s) noexcept {
  if ((s->flags & (kClosing | kConnecting)) || s->fd() < 0 || s->write_active) return;
  if (s->write_head || (s->shutdown && !s->shutdown->started)) {
    s->kick.run = &kick_writes;
    s->life.io().defer(&s->kick);
  }
}

// Consumes `n` sent bytes from the front of the write's buffers.
void advance(Stream* s, WriteReq* w, std::size_t n) noexcept {
  const std::size_t sent = n < w->size ? n : w->size;
  w->size -= sent;
  s->queued_bytes -= sent;
  while (n > 0 && w->index < w->nbufs) {
    iovec& v = w->iov[w->index];
    const std::size_t k = n < v.iov_len ? n : v.iov_len;
    v.iov_base = static_cast<char*>(v.iov_base) + k;
    v.iov_len -= k;
    n -= k;
    if (v.iov_len == 0) ++w->index;
  }
  while (w->index < w->nbufs && w->iov[w->index].iov_len == 0) ++w->index;
}

// Writes queued this turn, whose send waits for the turn's end, at a close:
// libuv would have written them inside uv_write already, so they go out now,
// ahead of the cancel (which then finds them done, or ends what is left).
void send_before_close(Stream* s) noexcept {
  if (!s->write_head || s->write_active || (s->flags & kConnecting) || s->fd() < 0) return;
  start_writes(s);
  // Closing already (a close from a write callback): the cancel comes now.
  if (s->closing()) s->life.io().cancel(&s->write_head->op);
}

void on_write_op(Op* op, int res, std::uint32_t) noexcept {
  auto* head = static_cast<WriteReq*>(op->data);
  Stream* s = head->stream;
  s->life.ended();
  s->write_active = false;
  // The bytes sent fill the writes in flight in order; those complete have
  // their callbacks, in order, with the stream's write queue size already
  // down by everything sent (libuv, too, writes what it can before it runs
  // the callbacks).
  std::size_t sent = res > 0 ? static_cast<std::size_t>(res) : 0;
  unsigned complete = 0;
  for (WriteReq* w = head; w != s->flight_end; w = w->next) {
    const std::size_t k = sent < w->size ? sent : w->size;
    advance(s, w, k);
    sent -= k;
    if (w->index < w->nbufs) break;
    ++complete;
  }
  if (res < 0 && complete == 0) {
    // An error ends the head write; a cancel ends it only if the stream closes.
    if (!s->closing() && (res == -EAGAIN || res == -EINTR)) {
      pump_writes(s);  // retried at the end of the turn
      return settle(s);
    }
    finish_write(s, head, s->closing() ? UV_ECANCELED : res);
  } else {
    // Callbacks may close the stream or queue more writes; neither touches
    // the writes already complete, which stay at the head of the queue (a
    // close in a callback leaves the writes queued since for after the loop).
    s->finishing_writes = true;
    for (; complete > 0; --complete) finish_write(s, s->write_head, 0);
    s->finishing_writes = false;
  }
  if (s->send_at_close) {
    // A callback above closed the stream: what it queued goes out now.
    s->send_at_close = false;
    send_before_close(s);
  } else {
    // The rest (a short send, more writes, the shutdown) at the end of the turn.
    pump_writes(s);
  }
  settle(s);
}

// ---- Connecting and shutting down ----------------------------------------------

void on_connect_op(Op* op, int res, std::uint32_t) noexcept {
  auto* c = static_cast<ConnectReq*>(op->data);
  Stream* s = c->stream;
  s->life.ended();
  s->connect = nullptr;
  s->flags &= ~kConnecting;
  int status = c->forced != 0 ? c->forced : res;
  if (s->closing()) status = UV_ECANCELED;  // as libuv: the handle went first
  s->host->connect_done(s, c, status);
  if (!s->closing()) {
    // As libuv: writes queued behind a failed connect are cancelled.
    if (status < 0) {
      while (s->write_head) finish_write(s, s->write_head, UV_ECANCELED);
    }
    pump_writes(s);
    maybe_arm_read(s);
  }
  settle(s);
}

void on_shutdown_op(Op* op, int res, std::uint32_t) noexcept {
  auto* r = static_cast<ShutdownReq*>(op->data);
  Stream* s = r->stream;
  s->life.ended();
  finish_shutdown(s, res == 0 || !s->closing() ? res : UV_ECANCELED);
  settle(s);
}

// ---- After a fork ---------------------------------------------------------------

void forget(Op* op) noexcept {
  op->state = Op::State::idle;
  op->next_ = op->prev_ = nullptr;
}

// The nop that after_fork() queued: the requests the old backend held end
// with UV_ECANCELED (this process never sent them), and reading and
// listening go on in the new backend.
void resume_after_fork(Stream* s) noexcept {
  if (s->connect) {
    ConnectReq* c = s->connect;
    s->connect = nullptr;
    s->flags &= ~kConnecting;
    s->host->connect_done(s, c, UV_ECANCELED);
  }
  while (s->write_head) finish_write(s, s->write_head, UV_ECANCELED);
  if (s->shutdown) finish_shutdown(s, UV_ECANCELED);
  if (s->closing()) return;
  if (s->flags & kListening) return arm_accept(s);
  maybe_arm_read(s);
}

// ---- The stream's op ------------------------------------------------------------

void on_handle_op(Op* op, int res, std::uint32_t flags) noexcept {
  auto* s = static_cast<Stream*>(op->data);
  const bool more = flags & kMore;
  const Role role = s->role;
  const bool we_cancelled = s->read_cancelled;
  if (!more) {
    s->life.ended();
    s->role = Role::none;
    s->read_cancelled = false;
  }
  switch (role) {
    case Role::recv:
    case Role::poll:
    case Role::ready:
    case Role::stash:
      on_read_op(s, role, res, we_cancelled);
      break;
    case Role::accept:
      on_accept(s, res, more);
      break;
    case Role::backoff:
      if (!s->closing() && (s->flags & kListening)) arm_accept(s);
      break;
    case Role::drain:
      if (reads_now(s)) drain(s);
      break;
    case Role::resume:
      resume_after_fork(s);
      break;
    case Role::none:
      std::fprintf(stderr, "ringpark: completion for idle stream %p\n", static_cast<void*>(s));
      std::abort();
  }
  settle(s);
}

}  // namespace

// ---- The engine's entry points ----------------------------------------------------

void init(Stream* s, IoBackend* io, const Host* host, void* owner) noexcept {
  s->host = host;
  s->owner = owner;
  s->life.init(io, &kLifeHooks, s);
}

void set_socket(Stream* s, int fd) noexcept { s->life.set_fd(fd, true); }

IoBackend& io(Stream* s) noexcept { return s->life.io(); }

void set_backend(Stream* s, IoBackend* io) noexcept {
  s->life.init(io, &kLifeHooks, s);
  s->kick.queued = false;  // deferred in the old backend, which is gone
}

int read_start(Stream* s) noexcept {
  if (s->flags & kReading) return UV_EALREADY;
  if (!(s->flags & kReadable) || (s->flags & kListening) || s->fd() < 0) return UV_ENOTCONN;
  s->flags = (s->flags | kReading) & ~kReadEof;
  if (s->read_mode == ReadMode::undecided) {
    s->read_mode =
        s->life.io().native(OpCode::recv_multishot) ? ReadMode::multishot : ReadMode::plain;
  }
  maybe_arm_read(s);
  return 0;
}

void read_stop(Stream* s) noexcept {
  if (!(s->flags & kReading)) return;
  s->flags &= ~kReading;
  if (s->role == Role::recv || s->role == Role::poll || s->role == Role::ready ||
      s->role == Role::stash) {
    // A request: a lent buffer stays lent until the op's final CQE.
    s->read_cancelled = true;
    s->life.io().cancel(&s->op);
  }
  // Bytes that still come before its final CQE are held for the next start.
  cancel_multishot(s);
}

int write_prepare(WriteReq* w, const uv_buf_t bufs[], unsigned nbufs) noexcept {
  w->iov = w->small;
  if (nbufs > sizeof w->small / sizeof w->small[0]) {
    w->iov = static_cast<iovec*>(std::malloc(nbufs * sizeof(iovec)));
    if (w->iov == nullptr) return UV_ENOMEM;
  }
  std::memcpy(w->iov, bufs, nbufs * sizeof(iovec));  // uv_buf_t is an iovec
  w->nbufs = nbufs;
  w->index = 0;
  w->size = 0;
  for (unsigned i = 0; i < nbufs; ++i) w->size += bufs[i].len;
  w->next = nullptr;
  return 0;
}

void write(Stream* s, WriteReq* w) noexcept {
  w->stream = s;
  s->queued_bytes += w->size;
  if (s->write_tail) {
    s->write_tail->next = w;
  } else {
    s->write_head = w;
  }
  s->write_tail = w;
  pump_writes(s);
}


int try_write(Stream* s, const uv_buf_t bufs[], unsigned nbufs) noexcept {
  if (s->write_head != nullptr || (s->flags & kConnecting)) return UV_EAGAIN;
  if (nbufs > IOV_MAX) nbufs = IOV_MAX;
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(reinterpret_cast<const iovec*>(bufs));  // uv_buf_t is an iovec
  msg.msg_iovlen = nbufs;
  ssize_t n;
  do {
    n = ::sendmsg(s->fd(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return static_cast<int>(n < INT_MAX ? n : INT_MAX);
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return UV_EAGAIN;
  return -errno;
}

void connect(Stream* s, ConnectReq* c, unsigned len) noexcept {
  c->stream = s;
  c->op.complete = &on_connect_op;
  c->op.data = c;
  if (c->forced != 0) {
    c->op.code = OpCode::nop;  // reported from the loop, as libuv does
  } else {
    // The request keeps the copy of the address until the op's final CQE: the
    // kernel reads it when the SQE is issued, after this returns.
    c->op.code = OpCode::connect;
    c->op.fd = s->fd();
    c->op.addr = &c->addr.sa;
    c->op.len = len;
    s->flags |= kReadable | kWritable;
  }
  s->connect = c;
  s->flags |= kConnecting;
  s->life.submit(&c->op);
}

void shutdown(Stream* s, ShutdownReq* r) noexcept {
  r->stream = s;
  r->started = false;
  s->shutdown = r;
  s->flags = (s->flags | kShutting) & ~kWritable;
  pump_writes(s);
}

void listen(Stream* s) noexcept {
  s->flags |= kListening;
  if (s->role == Role::none) arm_accept(s);
}

int accept(Stream* s) noexcept {
  if (s->acc_count == 0) return UV_EAGAIN;
  const int fd = s->accepted[s->acc_head];
  s->acc_head = (s->acc_head + 1) % s->acc_cap;
  --s->acc_count;
  return fd;
}

void quiesce(Stream* s) noexcept {
  s->flags |= kQuiescing;
  if (s->role == Role::recv || s->role == Role::poll || s->role == Role::ready) {
    s->read_cancelled = true;
    s->life.io().cancel(&s->op);
  }
  cancel_multishot(s);
}

bool quiet(const Stream* s) noexcept {
  return s->life.in_flight() == 0 && s->write_head == nullptr && s->shutdown == nullptr &&
         s->connect == nullptr && s->held_len == 0 && s->held_end == 0 && !s->buf_lent;
}

void dispose(Stream* s) noexcept {
  std::free(s->held);
  s->held = nullptr;
  s->held_off = s->held_len = s->held_cap = 0;
  std::free(s->accepted);
  s->accepted = nullptr;
  s->acc_cap = s->acc_head = s->acc_count = 0;
  std::free(s->gather);
  s->gather = nullptr;
  s->gather_cap = 0;
}

bool close(Stream* s) noexcept {
  if (s->closing()) return false;
  // Inside a write callback the writes before it are still being finished:
  // on_write_op sends what is queued once they are.
  if (s->finishing_writes) {
    s->send_at_close = true;
  } else {
    send_before_close(s);
  }
  s->flags = (s->flags | kClosing) & ~(kReading | kListening);
  return s->life.close();
}

void after_fork(Stream* s, IoBackend* io) noexcept {
  // Nothing of the old backend's completes here: every op is idle again.
  s->life.forget_in_flight(io);
  forget(&s->op);
  forget(&s->ms_op);
  if (s->write_head) forget(&s->write_head->op);
  if (s->connect) forget(&s->connect->op);
  if (s->shutdown) forget(&s->shutdown->op);
  if (s->role == Role::recv || s->role == Role::poll) {
    s->stashed = true;  // the lent buffer is reused as is
    s->stash_res = -ECANCELED;
  }
  s->role = Role::none;
  s->ms_active = s->ms_cancelled = s->to_bulk = false;
  s->write_active = s->read_cancelled = false;
  if (s->closing()) return;  // the FdLife finishes the close in the new backend
  submit_handle_op(s, Role::resume, OpCode::nop);
}

}  // namespace ringpark::detail::stream
