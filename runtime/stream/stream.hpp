// The stream engine: one implementation of a TCP stream's socket I/O as ops
// on the loop's backend, shared by every front end (rp_tcp_t in
// runtime/uv/tcp.cpp, an adopted uv_tcp_t in runtime/uv/adopt/). It knows no
// front-end type: it talks to its front end through Host, a table of
// callbacks, and keeps its state in a Stream that the front end places where
// it likes (inside rp_tcp_t's private words, or beside an adopted handle).
//
// What it does, in libuv's terms (src/unix/stream.c is the model):
// - reading: one multishot recv from the backend's provided buffers for as
//   long as the stream reads, each completion copied into buffers from the
//   host's alloc (one alloc, then its read, before the next alloc); or, where
//   the host allows lending and it pays (the fallback, old kernels, a bulk
//   stream), a recv into alloc's buffer, queued again after each read. Bytes
//   that arrive while the stream does not read are held and delivered first
//   after the next read start: nothing is lost;
// - writing: requests queued in order, only the head in flight, short sends
//   continued before the callback;
// - shutdown after the queued writes; connect; the listener's accept queue;
// - close through the fd-lifetime protocol (fd_life.hpp): cancel, wait for
//   every final completion, complete what is owed, close the socket through
//   the backend, then the host's `closed`.
// Batching comes from never making a socket I/O syscall here: every recv,
// send, accept, connect, shutdown and close is an op, so what one turn's
// completions start goes out in the backend's next single submission.
//
// What the kernel may write into, and what keeps it alive until the final
// completion:
// - the Stream's two ops (`op`: a recv or poll, the accept, a nop; `ms_op`:
//   the multishot recv) live in the Stream, which the front end keeps in place
//   until `closed`;
// - each request's op and its copies (iovecs, the address) live in the
//   request, which the front end keeps until the request's callback;
// - a lent buffer (plain recv) is the host's, lent until the recv's final
//   completion and always handed back through `read` (or kept for the next
//   read start);
// - provided buffers are the backend's; each completion's bytes are copied
//   out and the buffer recycled before the completion returns.
//
// Loop thread only. No function here calls a host callback from inside a call
// the host made (callbacks come from completions), except where noted.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <uv.h>

#include <cstddef>
#include <cstdint>

#include "ringpark/op.hpp"
#include "runtime/stream/fd_life.hpp"

namespace ringpark::detail::stream {

struct Stream;
struct WriteReq;
struct ConnectReq;
struct ShutdownReq;

// The front end: its callbacks, and how its reads behave.
struct Host {
  // libuv's alloc_cb: a buffer for up to `suggested` bytes (base null or len 0:
  // none now).
  void (*alloc)(Stream* s, std::size_t suggested, uv_buf_t* buf) noexcept;
  // libuv's read_cb.
  void (*read)(Stream* s, ssize_t nread, const uv_buf_t* buf) noexcept;
  // A write, connect or shutdown request has ended with `status`; the request
  // is the front end's again.
  void (*write_done)(Stream* s, WriteReq* w, int status) noexcept;
  void (*connect_done)(Stream* s, ConnectReq* c, int status) noexcept;
  void (*shutdown_done)(Stream* s, ShutdownReq* r, int status) noexcept;
  // A listener accepted a connection (status 0; take it with accept()) or an
  // accept failed (status < 0).
  void (*connection)(Stream* s, int status) noexcept;
  // The socket is closed and nothing of the stream is in flight: the Stream
  // may be freed from here on.
  void (*closed)(Stream* s) noexcept;
  // Last in every completion of an open stream's op, when the engine has
  // nothing more to do with the stream for now: the host may look at quiet()
  // and let go of the stream. May be null.
  void (*settled)(Stream* s) noexcept;
  // The engine stopped reading by itself (the end of the stream, an error),
  // at the point where libuv would: before the UV_EOF read, after an error's.
  // May be null.
  void (*reading_ended)(Stream* s) noexcept;
  // Whether alloc's buffers may be lent to the kernel (plain recv). A front
  // end whose program hands out one buffer at a time for the whole loop
  // (libuv programs do) must say no: the stream then reads only through
  // multishot recv, copying, and never holds a buffer of the program's
  // between an alloc and its read.
  bool lend_buffers;
  // Pass libuv's fixed 65536 to every alloc, as libuv does, rather than the
  // bytes waiting.
  bool fixed_suggestion;
  // Deliver UV_EOF and errors with a buffer from alloc, as libuv does, rather
  // than with a null buffer.
  bool end_with_buffer;
};

// Flags, in the Stream's `flags`.
enum Flag : std::uint32_t {
  kReadable = 1u << 0,     // may read (connected, accepted or opened), as libuv's flag
  kWritable = 1u << 1,     // may write; cleared by shutdown and by read errors
  kReading = 1u << 2,      // between read_start and read_stop (or EOF, error)
  kListening = 1u << 3,    // listen succeeded and the accept is (re-)armed
  kConnecting = 1u << 4,   // a connect op is in flight: I/O waits for it
  kShutting = 1u << 5,     // shutdown asked for, its op not yet completed
  kShut = 1u << 6,         // the writing side is shut down
  kClosing = 1u << 7,      // close asked for
  kClosed = 1u << 8,       // `closed` has run
  kReadEof = 1u << 9,      // the end of the stream was delivered
  kQuiescing = 1u << 10,   // quiesce(): no new reads, only what is held
};

// What the Stream's `op` is doing.
enum class Role : std::uint8_t {
  none,     // idle
  recv,     // a recv into the lent buffer
  poll,     // alloc gave no buffer: wait for readability, then UV_ENOBUFS
  ready,    // a readiness poll, then recv(2) into alloc's buffer (no lending)
  stash,    // a nop that delivers a result kept across read_stop
  drain,    // a nop that delivers held bytes (multishot reading) from the loop
  accept,   // the listener's multishot accept
  backoff,  // a timeout before accepting again after an error
  resume,   // a nop that resumes the stream in a forked child
};

// How a stream reads, decided at its first read_start.
enum class ReadMode : std::uint8_t {
  undecided,
  plain,      // a recv into alloc's buffer, queued again after each read
  multishot,  // one multishot recv into the backend's provided buffers
  bulk,       // multishot recv works here, but a bulk stream reads as plain
};

struct WriteReq {
  Op op;  // the send or writev; `iov` and the caller's bytes live until its final CQE
  WriteReq* next = nullptr;
  Stream* stream = nullptr;
  void* owner = nullptr;  // the front end's request
  iovec* iov = nullptr;   // `small`, or malloc'd when there are more buffers
  unsigned nbufs = 0;
  unsigned index = 0;  // first buffer not yet completely sent
  std::size_t size = 0;  // bytes not yet sent
  iovec small[4];
};

struct ConnectReq {
  Op op;  // reads `addr` until its final CQE
  Stream* stream = nullptr;
  void* owner = nullptr;
  int forced = 0;  // a deferred bind error to report instead of connecting
  union {
    sockaddr sa;
    sockaddr_in in;
    sockaddr_in6 in6;
  } addr{};
};

struct ShutdownReq {
  Op op;
  Stream* stream = nullptr;
  void* owner = nullptr;
  bool started = false;  // the op was submitted (the write queue had drained)
};

struct Stream {
  const Host* host = nullptr;
  void* owner = nullptr;  // the front end's handle
  FdLife life;            // the socket's fd, its ops in flight, the close
  std::uint32_t flags = 0;
  Role role = Role::none;
  bool buf_lent = false;        // `buf` came from alloc and is still ours
  bool stashed = false;         // a read result (stash_res) waits for read_start
  bool in_alloc = false;        // inside alloc: a nested read_start must not arm
  bool read_cancelled = false;  // read_stop cancelled the op in flight
  bool write_active = false;    // the head write's op is in flight
  bool finishing_writes = false;  // on_write_op is running the callbacks of sent writes
  bool send_at_close = false;     // closed meanwhile: send what is queued after them
  ReadMode read_mode = ReadMode::undecided;
  bool ms_active = false;     // ms_op is in flight
  bool ms_cancelled = false;  // we asked ms_op to end (read stop, pause, close)
  bool to_bulk = false;       // ms_op was cancelled to switch to ReadMode::bulk
  std::uint8_t run = 0;       // full provided buffers (multishot) or small reads (bulk) in a row
  int stash_res = 0;
  // Multishot reading: bytes received but not yet delivered, [held_off,
  // held_len) of a malloc'd block, and then held_end (UV_EOF or an error), if
  // not 0. Ours alone: the kernel never sees this memory.
  int held_end = 0;
  char* held = nullptr;
  std::size_t held_off = 0;
  std::size_t held_len = 0;
  std::size_t held_cap = 0;
  Op op;     // see Role; reads into `buf` until its final CQE
  Op ms_op;  // the multishot recv; points at no memory of ours
  uv_buf_t buf{};
  int* accepted = nullptr;  // ring of accepted fds not yet taken by accept()
  std::uint32_t acc_head = 0;
  std::uint32_t acc_count = 0;
  std::uint32_t acc_cap = 0;
  std::size_t queued_bytes = 0;    // of the queued writes, not yet sent (libuv's write_queue_size)
  WriteReq* write_head = nullptr;  // writes in order; [head, flight_end) are in flight
  WriteReq* write_tail = nullptr;
  WriteReq* flight_end = nullptr;  // the first write not in the op in flight
  // The gathered send of several writes (sendmsg): the iovec array and its
  // msghdr, kept unchanged until the op's final completion.
  iovec* gather = nullptr;
  unsigned gather_cap = 0;
  msghdr gather_msg{};
  // Starts the writes at the end of the turn, so that all the turn queued
  // goes out in one op (IoBackend::defer).
  Deferred kick;
  ConnectReq* connect = nullptr;
  ShutdownReq* shutdown = nullptr;

  int fd() const noexcept { return life.fd(); }
  bool closing() const noexcept { return flags & kClosing; }
};

// Sets `s` up on backend `io` for front end `host`, with no socket yet.
void init(Stream* s, IoBackend* io, const Host* host, void* owner) noexcept;
// Gives the stream socket `fd` (non-blocking), which it owns and closes.
void set_socket(Stream* s, int fd) noexcept;
// The backend the stream's ops go to.
IoBackend& io(Stream* s) noexcept;
// Moves an idle stream (nothing in flight) to another backend: the loop's
// context was made anew.
void set_backend(Stream* s, IoBackend* io) noexcept;

// Starts reading: 0, or UV_EALREADY / UV_ENOTCONN. The front end checks its
// own arguments. On the plain path alloc runs inside this call (its buffer is
// lent at once); no read runs inside it.
int read_start(Stream* s) noexcept;
// Stops reading; what still arrives is held for the next start.
void read_stop(Stream* s) noexcept;
// Queues `w` (its owner and buffers filled by write_prepare) behind the
// stream's other writes.
// Copies `bufs` into `w` (the bytes are not copied). Returns 0 or UV_ENOMEM.
int write_prepare(WriteReq* w, const uv_buf_t bufs[], unsigned nbufs) noexcept;
void write(Stream* s, WriteReq* w) noexcept;
// libuv's uv_try_write: sends at once, with a non-blocking syscall, when no
// write is queued or in flight. Returns the bytes sent (maybe fewer than
// asked), UV_EAGAIN when the socket is full or writes are queued, or an
// error.
int try_write(Stream* s, const uv_buf_t bufs[], unsigned nbufs) noexcept;
// Connects to `c->addr` (filled by the front end, `len` bytes), or reports
// `c->forced` from the loop.
void connect(Stream* s, ConnectReq* c, unsigned len) noexcept;
// Shuts the writing side down once the queued writes are out.
void shutdown(Stream* s, ShutdownReq* r) noexcept;
// Starts the listener's multishot accept (after listen(2) succeeded).
void listen(Stream* s) noexcept;
// Takes the oldest accepted connection: its fd, or UV_EAGAIN.
int accept(Stream* s) noexcept;
// Stops reading anything new (the recv in flight is cancelled); held bytes
// are still delivered while the stream reads. For a host that wants to hand
// the socket back to another owner once quiet().
void quiesce(Stream* s) noexcept;
// Nothing in flight, queued, held or lent: the socket can change owners.
bool quiet(const Stream* s) noexcept;
// Frees what the engine allocated for the stream (held bytes, the accept
// queue, the gather array): for a host that lets go of a quiet() stream
// without closing it. The close does it by itself.
void dispose(Stream* s) noexcept;
// Cancels everything and runs the close protocol; `closed` comes last. Returns
// false when already closing.
bool close(Stream* s) noexcept;

// In a forked child: the ops in the old backend will never complete. Forget
// them (writes and requests in flight end with UV_ECANCELED, from the loop)
// and re-arm reading and listening on `io`.
void after_fork(Stream* s, IoBackend* io) noexcept;

}  // namespace ringpark::detail::stream
