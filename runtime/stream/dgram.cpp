#include "runtime/stream/dgram.hpp"

#include <poll.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace ringpark::detail::dgram {

// A datagram or receive error copied out of the backend's buffer, waiting for
// the reader; the bytes follow the node in the same allocation. Ours alone:
// the kernel never sees this memory.
struct Kept {
  Kept* next = nullptr;
  int error = 0;
  unsigned addrlen = 0;
  sockaddr_storage addr{};
  std::size_t len = 0;       // bytes kept (what the backend's buffer held)
  std::size_t full_len = 0;  // the datagram's real length
  char* data() noexcept { return reinterpret_cast<char*>(this + 1); }
};

// One plain recvmsg: its op, msghdr, source address and buffer stay in place
// until its final completion, and the buffer until its datagram is handed
// over (`held`).
struct Plain {
  Op op;
  msghdr msg{};
  iovec iov{};
  sockaddr_storage addr{};
  Dgram* d = nullptr;
  char* buf = nullptr;  // kDatagramMax bytes
  bool active = false;
  bool cancelled = false;
  bool held = false;
};

namespace {

// Kept datagrams beyond which the receive pauses, so that the socket holds the
// backlog (and the kernel counts what it drops), not our memory; it resumes
// once they are handed over.
constexpr std::size_t kKeptPauseBytes = std::size_t{1} << 20;
constexpr std::size_t kKeptPauseCount = 1024;
// Plain receives in flight at once where the backend keeps their order (the
// fallback completes one socket's receives in submission order); io_uring
// keeps none between several receives waiting on one socket, so one there.
constexpr unsigned kPlainDepth = 4;
// The most sends one chain asks for (the backend may take fewer).
constexpr std::size_t kMaxChain = 256;
// A Held with no buffer behind it (a receive error).
constexpr std::int32_t kNoSource = INT32_MIN;

// One thing to hand over, wherever it sits.
struct Item {
  const sockaddr* addr = nullptr;
  unsigned addrlen = 0;
  const char* data = nullptr;
  std::size_t len = 0;
  std::size_t full_len = 0;
  int error = 0;
};

Item item_of(const Held& h) noexcept {
  Item it;
  it.error = h.error;
  if (h.error == 0) {
    it.addr = h.d.addr;
    it.addrlen = h.d.addrlen;
    it.data = h.d.data;
    it.len = h.d.len;
    it.full_len = h.d.full_len > h.d.len ? h.d.full_len : h.d.len;
    if ((h.d.msg_flags & MSG_TRUNC) && it.full_len == it.len) ++it.full_len;  // cut, length unknown
  }
  return it;
}

Item item_of(Kept& k) noexcept {
  Item it;
  it.error = k.error;
  if (k.error == 0) {
    it.addr = k.addrlen > 0 ? reinterpret_cast<const sockaddr*>(&k.addr) : nullptr;
    it.addrlen = k.addrlen;
    it.data = k.data();
    it.len = k.len;
    it.full_len = k.full_len;
  }
  return it;
}

bool reads_now(const Dgram* d) noexcept {
  return (d->flags & (kReceiving | kClosing)) == kReceiving;
}

bool usable(const iovec& buf) noexcept { return buf.iov_base != nullptr && buf.iov_len > 0; }

// A datagram always comes with an address, as libuv's (its storage, zeroed,
// then filled by recvmsg): a sender without a name (an unbound unix socket)
// gives an empty one. A null address means "no datagram" to libuv programs.
const sockaddr* address_of(const Item& it) noexcept {
  static const sockaddr_storage kNoName{};
  return it.addr != nullptr ? it.addr : reinterpret_cast<const sockaddr*>(&kNoName);
}

// On io_uring a send never waits in the kernel for room (MSG_DONTWAIT: it
// ends with -EAGAIN, and the engine waits for POLLOUT, as libuv does), so
// that nothing of a closing socket can stay stuck there; the fallback waits
// itself, keeping order.
bool sends_dont_wait(Dgram* d) noexcept { return d->life.io().native(OpCode::sendmsg); }

bool watched(const Dgram* d) noexcept { return d->member.in; }

// A watched socket's receive ended, having brought `taken` datagrams. True
// when it ended with -EAGAIN, which is no error: it found the socket empty,
// unless it took datagrams (from Linux 6.7 the kernel ends a multishot
// recvmsg with -EAGAIN after 33 taken at once, whether or not more wait). Any
// end but an empty socket (datagrams, an error, a cancel) may leave datagrams
// behind: then the next arm_receive drains again.
bool ended_dry(Dgram* d, int res, std::uint32_t taken) noexcept {
  if (!watched(d)) return false;
  const bool eagain = res == -EAGAIN || res == -EWOULDBLOCK;
  if (!eagain || taken > 0) d->may_read = true;
  return eagain;
}

void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_plain_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_nop(Op* op, int res, std::uint32_t flags) noexcept;
void on_wait_op(Op* op, int res, std::uint32_t flags) noexcept;
void on_send_op(Op* op, int res, std::uint32_t flags) noexcept;
void arm_receive(Dgram* d) noexcept;
void catch_up(Dgram* d) noexcept;

// Last in every completion (and deferred run): once a closing Dgram has
// nothing in flight the close goes on. Nothing may touch the Dgram after.
void settle(Dgram* d) noexcept {
  if (d->closing()) d->life.settle();
}

// ---- The way back into the loop -----------------------------------------------

void schedule_nop(Dgram* d) noexcept {
  if (d->nop_active) return;
  Op& op = d->nop;
  op.code = OpCode::nop;
  op.complete = &on_nop;
  op.data = d;
  d->nop_active = true;
  d->life.submit(&op);
}

// Asks for catch_up() after the completions running now: the end of a batch,
// a chain of this round's sends.
void want_deferred(Dgram* d) noexcept {
  if (d->deferred || d->closing()) return;
  if (d->host->defer != nullptr && d->host->defer(d)) {
    d->deferred = true;
    d->life.hold();  // the Dgram stays until run_deferred
    return;
  }
  schedule_nop(d);
}

// ---- Keeping what cannot be handed over now ------------------------------------------

void pause_receive(Dgram* d) noexcept {
  d->flags |= kPaused;
  IoBackend& io = d->life.io();
  if (d->ms_active && !d->ms_cancelled) {
    d->ms_cancelled = true;
    io.cancel(&d->ms_op);
  }
  // Plain receives are simply not armed again.
}

// Copies `it` to the end of the kept queue. Out of memory it cannot be kept:
// the reader gets -ENOMEM in its place (a tiny node), or, failing that too,
// the datagram is gone and counted by nobody, which is said on stderr.
void keep(Dgram* d, const Item& it) noexcept {
  const std::size_t len = it.error == 0 ? it.len : 0;
  auto* k = static_cast<Kept*>(std::malloc(sizeof(Kept) + len));
  if (k == nullptr) {
    k = static_cast<Kept*>(std::malloc(sizeof(Kept)));
    if (k == nullptr) {
      std::fprintf(stderr, "ringpark: out of memory keeping a datagram of socket %d\n", d->fd());
      return;
    }
    new (k) Kept;
    k->error = -ENOMEM;
  } else {
    new (k) Kept;
    k->error = it.error;
    if (it.error == 0) {
      if (it.addr != nullptr && it.addrlen > 0) {
        k->addrlen = it.addrlen < sizeof k->addr ? it.addrlen : sizeof k->addr;
        std::memcpy(&k->addr, it.addr, k->addrlen);
      }
      if (len > 0) std::memcpy(k->data(), it.data, len);
      k->len = len;
      k->full_len = it.full_len;
    }
  }
  if (d->kept_tail) {
    d->kept_tail->next = k;
  } else {
    d->kept_head = k;
  }
  d->kept_tail = k;
  d->kept_bytes += k->len;
  ++d->kept_n;
  if (d->kept_bytes >= kKeptPauseBytes || d->kept_n >= kKeptPauseCount) pause_receive(d);
}

void pop_kept(Dgram* d) noexcept {
  Kept* k = d->kept_head;
  d->kept_head = k->next;
  if (d->kept_head == nullptr) d->kept_tail = nullptr;
  d->kept_bytes -= k->len;
  --d->kept_n;
  k->~Kept();
  std::free(k);
}

void free_kept(Dgram* d) noexcept {
  while (d->kept_head) pop_kept(d);
}

// The backend's buffer (or the plain receive) behind `h` is done with.
void release(Dgram* d, const Held& h) noexcept {
  if (h.source == kNoSource) return;
  if (h.source >= 0) {
    d->life.io().recycle_datagram(static_cast<std::uint16_t>(h.source));
    return;
  }
  Plain& p = d->plain[~h.source];
  p.held = false;
  arm_receive(d);
}

// The batch's datagrams go to the kept queue (reading stopped, or alloc gave
// no buffer); the kept queue is empty while any are held.
void keep_held(Dgram* d) noexcept {
  for (unsigned i = 0; i < d->held_n; ++i) {
    keep(d, item_of(d->held[i]));
    release(d, d->held[i]);
  }
  d->held_n = 0;
}

// alloc gave no buffer: what is kept waits for the next round, as libuv's
// datagrams wait in the socket until its next wakeup.
void starve(Dgram* d) noexcept {
  d->flags |= kStarved;
  schedule_nop(d);
}

// ---- Handing over ------------------------------------------------------------

enum class Out : std::uint8_t { taken, no_buffer, stopped };

// One datagram or error in a buffer of its own, as libuv's recvmsg path.
Out hand_over(Dgram* d, const Item& it) noexcept {
  iovec buf{nullptr, 0};
  d->host->alloc(d, kDatagramMax, &buf);
  if (!usable(buf)) {
    d->host->recv(d, -ENOBUFS, &buf, nullptr, 0);
    return Out::no_buffer;
  }
  if (!reads_now(d)) {
    // alloc stopped reading or closed the socket: the buffer goes back
    // unfilled ("nothing now"), the datagram stays for the next start.
    d->host->recv(d, 0, &buf, nullptr, 0);
    return Out::stopped;
  }
  if (it.error != 0) {
    d->host->recv(d, it.error, &buf, nullptr, 0);
    return Out::taken;
  }
  const std::size_t k = it.len < buf.iov_len ? it.len : buf.iov_len;
  if (k > 0) std::memcpy(buf.iov_base, it.data, k);
  d->flags |= kBatchOpen;
  d->host->recv(d, static_cast<ssize_t>(k), &buf, address_of(it), k < it.full_len ? kPartial : 0);
  return Out::taken;
}

// items[0..n) in one batch buffer, as libuv's recvmmsg path: a chunk of
// kDatagramMax bytes per datagram, kMmsgChunk on each, then kMmsgFree.
// Returns how many it took; *out says why it took no more.
unsigned hand_over_batch(Dgram* d, const Item* items, unsigned n, Out* out) noexcept {
  iovec buf{nullptr, 0};
  d->host->alloc(d, kDatagramMax, &buf);
  if (!usable(buf)) {
    d->host->recv(d, -ENOBUFS, &buf, nullptr, 0);
    *out = Out::no_buffer;
    return 0;
  }
  if (!reads_now(d)) {
    d->host->recv(d, 0, &buf, nullptr, 0);
    *out = Out::stopped;
    return 0;
  }
  *out = Out::taken;
  if (items[0].error != 0) {
    // As libuv: an error comes alone, with the whole buffer and no kMmsgFree.
    d->host->recv(d, items[0].error, &buf, nullptr, 0);
    return 1;
  }
  std::size_t chunks = buf.iov_len / kDatagramMax;
  std::size_t chunk_len = kDatagramMax;
  if (chunks > kMaxChunks) chunks = kMaxChunks;
  if (chunks == 0) {
    // Smaller than one chunk: libuv would ask recvmmsg for no message at all,
    // and spin on "nothing now". One short chunk instead.
    chunks = 1;
    chunk_len = buf.iov_len;
  }
  d->batch_chunks = static_cast<unsigned>(chunks);
  unsigned k = 0;
  auto* base = static_cast<char*>(buf.iov_base);
  while (k < n && k < chunks && items[k].error == 0) {
    const Item& it = items[k];
    iovec chunk{base + k * kDatagramMax, chunk_len};
    const std::size_t m = it.len < chunk_len ? it.len : chunk_len;
    if (m > 0) std::memcpy(chunk.iov_base, it.data, m);
    d->flags |= kBatchOpen;
    d->host->recv(d, static_cast<ssize_t>(m), &chunk, address_of(it),
                  kMmsgChunk | (m < it.full_len ? kPartial : 0));
    ++k;
    // As libuv: a reader that stops (or closes) gets no more chunks, and no
    // kMmsgFree; the rest are kept for its next start.
    if (!reads_now(d)) {
      *out = Out::stopped;
      return k;
    }
  }
  d->host->recv(d, 0, &buf, nullptr, kMmsgFree);
  return k;
}

// The batch of this round, from the backend's buffers.
void deliver_held(Dgram* d) noexcept {
  while (d->held_n > 0 && reads_now(d) && !(d->flags & kStarved)) {
    Item items[kMaxChunks];
    for (unsigned i = 0; i < d->held_n; ++i) items[i] = item_of(d->held[i]);
    Out out;
    const unsigned k = hand_over_batch(d, items, d->held_n, &out);
    for (unsigned i = 0; i < k; ++i) release(d, d->held[i]);
    for (unsigned i = k; i < d->held_n; ++i) d->held[i - k] = d->held[i];
    d->held_n -= k;
    if (out == Out::no_buffer) starve(d);
    if (out != Out::taken) break;
  }
  if (d->held_n > 0 && !d->closing()) keep_held(d);
}

// What was kept, oldest first, while the reader takes it; with `full_only`,
// batches only as full as the reader's last batch buffer.
void deliver_kept(Dgram* d, bool full_only) noexcept {
  while (d->kept_head != nullptr && reads_now(d) && !(d->flags & kStarved)) {
    Out out;
    if (d->flags & kBatch) {
      if (full_only && d->kept_n < d->batch_chunks) break;
      Item items[kMaxChunks];
      unsigned n = 0;
      for (Kept* k = d->kept_head; k != nullptr && n < kMaxChunks; k = k->next) {
        items[n++] = item_of(*k);
      }
      const unsigned taken = hand_over_batch(d, items, n, &out);
      for (unsigned i = 0; i < taken; ++i) pop_kept(d);
    } else {
      out = hand_over(d, item_of(*d->kept_head));
      if (out == Out::taken) pop_kept(d);
    }
    if (out == Out::no_buffer) starve(d);
    if (out != Out::taken) break;
  }
  if (d->kept_head == nullptr && (d->flags & kPaused)) {
    d->flags &= ~kPaused;
    arm_receive(d);
  }
}

// The end of a round, as libuv's last recvmsg of a wakeup finds nothing:
// alloc, then recv(0, buffer, no address).
void end_batch(Dgram* d) noexcept {
  d->flags &= ~kBatchOpen;
  iovec buf{nullptr, 0};
  d->host->alloc(d, kDatagramMax, &buf);
  d->host->recv(d, usable(buf) ? 0 : -ENOBUFS, &buf, nullptr, 0);
}

// A datagram or receive error that came in.
void on_item(Dgram* d, const Held& h) noexcept {
  if (d->closing()) return release(d, h);  // nobody reads any more: dropped, as libuv does at close
  if (!reads_now(d) || d->kept_head != nullptr || (d->flags & kStarved)) {
    // Behind what is kept, or nobody to take it now.
    keep(d, item_of(h));
    release(d, h);
    if (reads_now(d) && !(d->flags & kStarved)) want_deferred(d);
    return;
  }
  if (d->flags & kBatch) {
    d->held[d->held_n++] = h;
    if (d->held_n >= d->batch_chunks || d->held_n == kMaxChunks) {
      deliver_held(d);
    } else {
      want_deferred(d);  // the round's batch goes out once its completions have run
    }
    return;
  }
  const Out out = hand_over(d, item_of(h));
  if (out != Out::taken && !d->closing()) keep(d, item_of(h));
  if (out == Out::no_buffer) starve(d);
  release(d, h);
  if (out == Out::taken) want_deferred(d);  // the round's end
}

// A receive ended with an error of the socket's: an ICMP error the kernel
// keeps for the socket's next call (ECONNREFUSED from a closed port, with
// IP_RECVERR or on a connected socket; EHOSTUNREACH...). libuv reads only
// once epoll says readable, and epoll reports such an error as POLLERR, not
// POLLIN: with a send waiting (POLLOUT armed) libuv's send goes first and
// takes the error (status ECONNREFUSED), and only a socket with nothing to
// send reads it, handing it to recv_cb. The engine's receive is always armed,
// so it takes every such error first; it gives it to the send libuv's would
// have given it to, the first one not yet done, and to the reader only when
// no send waits.
void finish_sends(Dgram* d) noexcept;

void on_socket_error(Dgram* d, int err) noexcept {
  for (SendReq* r = d->send_head; r != nullptr; r = r->next) {
    if (r->state == SendReq::State::done || r->taken_error != 0) continue;
    if (r->state == SendReq::State::queued && d->chain_left == 0) {
      // Not sent yet: as libuv's, it fails with the error and does not leave.
      r->state = SendReq::State::done;
      r->res = err;
      if (d->unsent == r) d->unsent = r->next;
      finish_sends(d);
    } else {
      r->taken_error = err;  // on its way: it reports the error when it ends
    }
    return;
  }
  Held h{};
  h.error = err;
  h.source = kNoSource;
  on_item(d, h);
}

// ---- Receiving ----------------------------------------------------------------

void arm_multishot(Dgram* d) noexcept {
  Op& op = d->ms_op;
  d->ms_msg = msghdr{};
  // Room for the source address in each of the backend's buffers; no control
  // messages (libuv asks for none).
  d->ms_msg.msg_namelen = sizeof(sockaddr_storage);
  op.code = OpCode::recvmsg_multishot;
  op.fd = d->fd();
  op.flags = watched(d) ? MSG_DONTWAIT : 0;  // see arm_receive
  op.buf = &d->ms_msg;
  op.complete = &on_ms_op;
  op.data = d;
  d->ms_active = true;
  d->ms_cancelled = false;
  d->may_read = false;  // until it ends otherwise than empty
  d->ms_taken = 0;
  d->life.submit(&op);
}

bool ensure_plain(Dgram* d) noexcept {
  if (d->plain != nullptr) return true;
  const unsigned n = d->life.io().native(OpCode::recvmsg) ? 1 : kPlainDepth;
  auto* plain = new (std::nothrow) Plain[n];
  if (plain == nullptr) return false;
  for (unsigned i = 0; i < n; ++i) {
    plain[i].d = d;
    plain[i].buf = static_cast<char*>(std::malloc(kDatagramMax));
    if (plain[i].buf == nullptr) {
      for (unsigned j = 0; j < i; ++j) std::free(plain[j].buf);
      delete[] plain;
      return false;
    }
  }
  d->plain = plain;
  d->plain_n = n;
  return true;
}

void free_plain(Dgram* d) noexcept {
  for (unsigned i = 0; i < d->plain_n; ++i) std::free(d->plain[i].buf);
  delete[] d->plain;
  d->plain = nullptr;
  d->plain_n = 0;
}

void arm_plain(Dgram* d, Plain& p) noexcept {
  p.iov = iovec{p.buf, kDatagramMax};
  p.msg = msghdr{};
  p.msg.msg_name = &p.addr;
  p.msg.msg_namelen = sizeof p.addr;
  p.msg.msg_iov = &p.iov;
  p.msg.msg_iovlen = 1;
  Op& op = p.op;
  op.code = OpCode::recvmsg;
  op.fd = d->fd();
  // MSG_TRUNC: the result is the datagram's real length.
  op.flags = MSG_TRUNC | (watched(d) ? MSG_DONTWAIT : 0);
  op.buf = &p.msg;
  op.complete = &on_plain_op;
  op.data = &p;
  p.active = true;
  p.cancelled = false;
  d->may_read = false;  // until it ends otherwise than empty
  d->life.submit(&op);
}

// Keeps the socket's receive armed while it reads: the multishot recvmsg, or
// the plain receives that hold no datagram. A watched socket (in the loop's
// EdgeSet) has its receive in the kernel only from an edge until the socket
// is empty: MSG_DONTWAIT, so that it ends with -EAGAIN rather than wait in
// the ring, where it would keep the socket open past the death of the
// process (edges.hpp).
void arm_receive(Dgram* d) noexcept {
  if (!reads_now(d) || (d->flags & kPaused) || d->fd() < 0) return;
  if ((d->flags & kErrorsComeBack) && d->chain_left > 0) return;  // see submit_chain
  if (watched(d) && !d->may_read) return;  // waits for an edge
  if (d->mode == RecvMode::multishot) {
    // Armed, or its cancel is on the way and its final completion re-arms.
    if (!d->ms_active) arm_multishot(d);
    return;
  }
  if (!ensure_plain(d)) {
    // No memory for the receive buffers: the reader is told, from the loop,
    // as libuv tells it of a receive error, and it is tried again after.
    Held h{};
    h.error = -ENOMEM;
    h.source = kNoSource;
    keep(d, item_of(h));
    want_deferred(d);
    return;
  }
  for (unsigned i = 0; i < d->plain_n; ++i) {
    Plain& p = d->plain[i];
    if (!p.active && !p.held) arm_plain(d, p);
  }
}

void cancel_receive(Dgram* d) noexcept {
  IoBackend& io = d->life.io();
  if (d->ms_active && !d->ms_cancelled) {
    d->ms_cancelled = true;
    io.cancel(&d->ms_op);
  }
  for (unsigned i = 0; i < d->plain_n; ++i) {
    Plain& p = d->plain[i];
    if (p.active && !p.cancelled) {
      p.cancelled = true;
      io.cancel(&p.op);
    }
  }
}

void submit_chain(Dgram* d) noexcept;
void on_edge(EdgeSet::Member* m, std::uint32_t events) noexcept;

// Puts the socket in the loop's EdgeSet, if it has one and is not in it yet,
// at its first receive or wait for room. Only on io_uring, whose ops would
// pin the socket (edges.hpp); the fallback's wait in its own epoll set,
// which does not. Returns whether the socket is watched.
bool watch(Dgram* d) noexcept {
  if (watched(d) || d->edges == nullptr || d->closing() ||
      !d->life.io().native(OpCode::recvmsg)) {
    return watched(d);
  }
  d->member.edge = &on_edge;
  d->member.data = d;
  d->may_read = true;  // it may hold datagrams already
  return d->edges->add(&d->member, d->fd());
}

// The wait for room in the EdgeSet ends.
void end_edge_wait(Dgram* d) noexcept {
  d->wait_active = false;
  d->wait_on_edge = false;
  if (watched(d)) d->edges->want_out(&d->member, false);
}

// The loop's EdgeSet saw the watched socket become readable, writable or
// take an error: the sends that waited for room go again (first, so that an
// error goes to them, as after the poll's wait), and the receive drains the
// socket, now if it reads.
void on_edge(EdgeSet::Member* m, std::uint32_t events) noexcept {
  auto* d = static_cast<Dgram*>(m->data);
  if (d->closing()) return;
  if (d->wait_on_edge && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    end_edge_wait(d);
    submit_chain(d);
  }
  if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
    d->may_read = true;
    arm_receive(d);
  }
}

// The multishot recvmsg's final completion: it ended because we asked (stop,
// pause, close), on an error of the socket's (a connected socket's
// ECONNREFUSED...), or because the kernel lacks it.
void ms_ended(Dgram* d, int res, bool we_cancelled) noexcept {
  if (d->closing()) return;
  if (ended_dry(d, res, d->ms_taken)) {
    // Nothing more now: wait for the socket's next edge (or drain again).
  } else if (res == -EOPNOTSUPP) {
    d->mode = RecvMode::plain;  // plain recvmsg from now on
  } else if (res < 0 && !(res == -ECANCELED && we_cancelled)) {
    on_socket_error(d, res);  // and receiving goes on, as libuv's
  }
  arm_receive(d);
}

void on_ms_op(Op* op, int res, std::uint32_t flags) noexcept {
  auto* d = static_cast<Dgram*>(op->data);
  const bool more = flags & kMore;
  const bool we_cancelled = d->ms_cancelled;
  if (!more) {
    d->life.ended();
    d->ms_active = false;
    d->ms_cancelled = false;
  }
  if (flags & kDry) d->flags |= kDryRound;
  if (flags & kBuffer) {
    // The backend's buffer is ours from this completion until release(); the
    // backend (and so the buffer) outlives every op in flight.
    IoBackend& io = d->life.io();
    Held h{};
    h.source = buffer_id(flags);
    ++d->ms_taken;
    if (io.datagram(*op, res, flags, &h.d)) {
      on_item(d, h);
    } else {
      io.recycle_datagram(buffer_id(flags));
    }
  }
  if (!more) ms_ended(d, res, we_cancelled);
  settle(d);
}

void on_plain_op(Op* op, int res, std::uint32_t) noexcept {
  auto* p = static_cast<Plain*>(op->data);
  Dgram* d = p->d;
  d->life.ended();
  p->active = false;
  const bool we_cancelled = p->cancelled;
  p->cancelled = false;
  if (!d->closing()) {
    if (ended_dry(d, res, 0)) {  // a plain receive's datagram is its result
      // Nothing now: wait for the socket's next edge.
    } else if (res >= 0) {
      Held h{};
      h.source = ~static_cast<std::int32_t>(p - d->plain);
      h.d.addr = p->msg.msg_namelen > 0 ? reinterpret_cast<const sockaddr*>(&p->addr) : nullptr;
      h.d.addrlen = p->msg.msg_namelen;
      h.d.data = p->buf;
      h.d.full_len = static_cast<std::size_t>(res);
      h.d.len = h.d.full_len < kDatagramMax ? h.d.full_len : kDatagramMax;
      h.d.msg_flags = p->msg.msg_flags;
      p->held = true;  // until release(), which arms it again
      on_item(d, h);
    } else if (!(res == -ECANCELED && we_cancelled)) {
      on_socket_error(d, res);
    }
    arm_receive(d);
  }
  settle(d);
}

// ---- Sending -----------------------------------------------------------------

// Hands the done sends at the head of the queue back, in order.
void finish_sends(Dgram* d) noexcept {
  while (d->send_head != nullptr && d->send_head->state == SendReq::State::done) {
    SendReq* r = d->send_head;
    d->send_head = r->next;
    if (d->send_head == nullptr) d->send_tail = nullptr;
    --d->queued_count;
    d->queued_bytes -= r->size;
    if (r->iov != r->small) std::free(r->iov);
    r->iov = nullptr;
    d->host->send_done(d, r, r->res >= 0 ? 0 : r->res);  // the request may be freed from here on
  }
}

void wait_writable(Dgram* d) noexcept {
  d->wait_active = true;
  if (watch(d) && d->edges->want_out(&d->member, true)) {
    // In the EdgeSet, like the receive: nothing waits in the ring.
    d->wait_on_edge = true;
    return;
  }
  Op& op = d->wait_op;
  op.code = OpCode::poll;
  op.fd = d->fd();
  op.flags = POLLOUT;
  op.complete = &on_wait_op;
  op.data = d;
  d->life.submit(&op);
}

// Sends the queued requests not yet sent as one chain, unless a chain (or the
// wait for room) is in flight: the next one only once it has ended.
void submit_chain(Dgram* d) noexcept {
  if (d->chain_left > 0 || d->wait_active || d->unsent == nullptr || d->fd() < 0) return;
  Op* ops[kMaxChain];
  std::size_t n = 0;
  const int flags = MSG_NOSIGNAL | (sends_dont_wait(d) ? MSG_DONTWAIT : 0);
  for (SendReq* r = d->unsent; r != nullptr && n < kMaxChain; r = r->next) {
    Op& op = r->op;
    op.code = OpCode::sendmsg;
    op.fd = d->fd();
    op.flags = flags;
    op.buf = &r->msg;
    op.complete = &on_send_op;
    op.data = r;
    r->state = SendReq::State::in_flight;
    ops[n++] = &op;
  }
  if (d->flags & kErrorsComeBack) {
    // ICMP errors come back to this socket (IP_RECVERR, or connected): the
    // kernel keeps one for the socket's next call, and libuv, whose sends go
    // before its next read, gives it to the next send, which then does not
    // leave. An armed receive would take it first, and the send behind would
    // leave and draw another. So no receive while the chain is in flight:
    // its cancel goes ahead of the chain's sends, and chain_ended() arms it
    // again (datagrams meanwhile wait in the socket).
    cancel_receive(d);
  }
  // Counted before the submit: a backend that is going away completes them
  // inside it.
  d->chain_left += n;
  const std::size_t taken = d->life.submit_in_order(ops, n);
  SendReq* r = d->unsent;
  for (std::size_t i = 0; i < taken; ++i) r = r->next;
  d->unsent = r;
  // Those it did not take wait for the next chain.
  for (; r != nullptr && r->state == SendReq::State::in_flight; r = r->next) {
    r->state = SendReq::State::queued;
    --d->chain_left;
  }
}

// The chain ended: what did not leave (it found no room, or the link behind
// a failure cancelled it) goes again, after a wait for room if it found none.
void chain_ended(Dgram* d, bool no_room) noexcept {
  d->unsent = d->send_head;  // every request still queued is unsent now
  if (d->closing()) return;
  arm_receive(d);
  if (d->unsent == nullptr) return;
  if (no_room) return wait_writable(d);
  want_deferred(d);
}

void on_send_op(Op* op, int res, std::uint32_t) noexcept {
  auto* r = static_cast<SendReq*>(op->data);
  Dgram* d = r->dgram;
  d->life.ended();
  --d->chain_left;
  const bool no_room = res == -EAGAIN || res == -EWOULDBLOCK || res == -ENOBUFS;
  if (!d->closing() && (no_room || res == -ECANCELED)) {
    // Not sent: it goes again, in its place. (-ECANCELED without a close:
    // the link ended it because one before it did not leave.)
    r->state = SendReq::State::queued;
    if (no_room) d->flags |= kNoRoom;
  } else {
    r->state = SendReq::State::done;
    // A send the close kept from leaving is cancelled, as libuv's.
    r->res = d->closing() && (no_room || res == -ECANCELED) ? -ECANCELED : res;
    if (r->res >= 0 && r->taken_error != 0) r->res = r->taken_error;  // see on_socket_error
  }
  finish_sends(d);
  if (d->chain_left == 0) {
    const bool waited = d->flags & kNoRoom;
    d->flags &= ~kNoRoom;
    chain_ended(d, waited);
  }
  settle(d);
}

// The wait for room ended: the sends that found none go again (a socket
// error the poll saw, the first of them reports). After a close's cancel,
// drained() ends them.
void on_wait_op(Op* op, int, std::uint32_t) noexcept {
  auto* d = static_cast<Dgram*>(op->data);
  d->life.ended();
  d->wait_active = false;
  if (!d->closing()) submit_chain(d);
  settle(d);
}

// ---- Closing ------------------------------------------------------------------

// The fallback's close barrier: the sends submitted before it have been
// tried (the fallback starts ops in submission order); those still in
// flight wait for room, and the close cancels them.
void on_barrier(Op* op, int, std::uint32_t) noexcept {
  auto* d = static_cast<Dgram*>(op->data);
  d->life.ended();
  d->barrier_active = false;
  IoBackend& io = d->life.io();
  for (SendReq* r = d->send_head; r != nullptr; r = r->next) {
    if (r->state == SendReq::State::in_flight) io.cancel(&r->op);
  }
  settle(d);
}

void cancel_all(FdLife* life) noexcept {
  auto* d = static_cast<Dgram*>(life->owner());
  // Requests, not releases: every op still ends with its own final CQE.
  IoBackend& io = life->io();
  cancel_receive(d);
  if (d->wait_on_edge) {
    d->wait_active = d->wait_on_edge = false;  // out of the EdgeSet already (close)
  } else if (d->wait_active) {
    io.cancel(&d->wait_op);
  }
  if (!sends_dont_wait(d) && d->chain_left > 0 && !d->barrier_active) {
    // The fallback's sends wait for room in its lists, and its cancel ends an
    // op it has not started yet without trying it: the sends the close just
    // submitted would never be tried. So the cancel comes from a nop queued
    // behind them. (On io_uring no send waits: each ends by itself at once.)
    Op& op = d->barrier;
    op.code = OpCode::nop;
    op.complete = &on_barrier;
    op.data = d;
    d->barrier_active = true;
    d->life.submit(&op);
  }
}

// The last op of a closing Dgram has completed: nothing of it is in the
// kernel any more. Complete what is still owed; the socket's close follows.
void drained(FdLife* life) noexcept {
  auto* d = static_cast<Dgram*>(life->owner());
  for (unsigned i = 0; i < d->held_n; ++i) release(d, d->held[i]);
  d->held_n = 0;
  free_kept(d);  // datagrams nobody will read: dropped, as libuv's at close
  free_plain(d);
  // libuv's order (uv__udp_finish_close): every send still queued, in order,
  // with UV_ECANCELED.
  for (SendReq* r = d->send_head; r != nullptr; r = r->next) {
    if (r->state != SendReq::State::done) {
      r->state = SendReq::State::done;
      r->res = -ECANCELED;
    }
  }
  d->unsent = nullptr;
  finish_sends(d);
}

void closed(FdLife* life) noexcept {
  auto* d = static_cast<Dgram*>(life->owner());
  d->flags |= kClosed;
  d->host->closed(d);  // the Dgram may be gone from here on
}

constexpr FdLife::Hooks kLifeHooks = {&cancel_all, &drained, &closed};

// ---- Coming back from the loop ------------------------------------------------------

// Everything that waited for the end of a round: the round's chain of sends,
// the batch and the kept datagrams for the reader, the batch's end, and the
// receive re-armed after a pause.
void catch_up(Dgram* d) noexcept {
  if (d->closing()) return;
  const bool dry = d->flags & kDryRound;
  d->flags &= ~kDryRound;
  submit_chain(d);
  if (!reads_now(d)) {
    if (d->held_n > 0) keep_held(d);
    return;
  }
  if (d->flags & kStarved) return;  // the nop comes back next round
  if (dry && (d->flags & kBatch)) {
    // More datagrams wait in the socket: only full batches now; the rest
    // waits, copied out of the backend's buffers, for the next round's.
    keep_held(d);
    deliver_kept(d, /*full_only=*/true);
    return arm_receive(d);
  }
  deliver_held(d);  // older than anything kept
  deliver_kept(d, /*full_only=*/false);
  // The round's end, unless the socket still has datagrams: libuv's wakeup
  // ends with "nothing now" only once recvmsg finds the socket empty.
  if (!dry && reads_now(d) && !(d->flags & kStarved) && d->held_n == 0 &&
      d->kept_head == nullptr && (d->flags & kBatchOpen)) {
    end_batch(d);
  }
  arm_receive(d);
}

void resume_after_fork(Dgram* d) noexcept;

void on_nop(Op* op, int, std::uint32_t) noexcept {
  auto* d = static_cast<Dgram*>(op->data);
  d->life.ended();
  d->nop_active = false;
  if (d->resume) resume_after_fork(d);
  d->flags &= ~kStarved;
  catch_up(d);
  settle(d);
}

void resume_after_fork(Dgram* d) noexcept {
  d->resume = false;
  finish_sends(d);  // those the old backend held end with -ECANCELED
  if (!d->closing()) chain_ended(d, false);
}

void forget(Op* op) noexcept {
  op->state = Op::State::idle;
  op->next_ = op->prev_ = nullptr;
}

}  // namespace

void init(Dgram* d, IoBackend* io, const Host* host, void* owner, int fd) noexcept {
  d->host = host;
  d->owner = owner;
  d->life.init(io, &kLifeHooks, d);
  d->life.set_fd(fd, true);
}

int recv_start(Dgram* d, bool batch) noexcept {
  if (d->flags & kReceiving) return -EALREADY;
  d->flags |= kReceiving;
  if (batch) {
    d->flags |= kBatch;
  } else {
    d->flags &= ~kBatch;
  }
  if (d->mode == RecvMode::undecided) {
    d->mode = d->life.io().native(OpCode::recvmsg_multishot) ? RecvMode::multishot : RecvMode::plain;
  }
  watch(d);
  // What was kept goes first, from the loop (never inside this call).
  if (d->kept_head != nullptr || d->held_n > 0) want_deferred(d);
  arm_receive(d);
  return 0;
}

void recv_stop(Dgram* d) noexcept {
  if (!(d->flags & kReceiving)) return;
  d->flags &= ~kReceiving;
  // What still arrives before the receive's final completion is kept for the
  // next start; so is this round's batch (catch_up moves it).
  cancel_receive(d);
}

int send_prepare(SendReq* r, const iovec* bufs, unsigned nbufs, const sockaddr* addr,
                 unsigned addrlen) noexcept {
  r->iov = r->small;
  if (nbufs > sizeof r->small / sizeof r->small[0]) {
    r->iov = static_cast<iovec*>(std::malloc(nbufs * sizeof(iovec)));
    if (r->iov == nullptr) return -ENOMEM;
  }
  if (nbufs > 0) std::memcpy(r->iov, bufs, nbufs * sizeof(iovec));
  r->nbufs = nbufs;
  r->size = 0;
  for (unsigned i = 0; i < nbufs; ++i) r->size += bufs[i].iov_len;
  r->msg = msghdr{};
  if (addr != nullptr && addrlen > 0) {
    const unsigned len = addrlen < sizeof r->addr ? addrlen : sizeof r->addr;
    std::memcpy(&r->addr, addr, len);
    r->msg.msg_name = &r->addr;
    r->msg.msg_namelen = len;
  }
  r->msg.msg_iov = r->iov;
  r->msg.msg_iovlen = nbufs;
  r->next = nullptr;
  r->state = SendReq::State::queued;
  r->res = 0;
  r->taken_error = 0;
  return 0;
}

void send(Dgram* d, SendReq* r) noexcept {
  r->dgram = d;
  r->next = nullptr;
  if (d->send_tail) {
    d->send_tail->next = r;
  } else {
    d->send_head = r;
  }
  d->send_tail = r;
  if (d->unsent == nullptr) d->unsent = r;
  ++d->queued_count;
  d->queued_bytes += r->size;
  // With the round's other sends, in one chain, once this round's
  // completions have run.
  if (d->chain_left == 0 && !d->wait_active) want_deferred(d);
}

int try_send(Dgram* d, const iovec* bufs, unsigned nbufs, const sockaddr* addr,
             unsigned addrlen) noexcept {
  if (d->queued_count != 0) return -EAGAIN;  // never ahead of a queued send
  msghdr msg{};
  msg.msg_name = const_cast<sockaddr*>(addr);
  msg.msg_namelen = addr != nullptr ? addrlen : 0;
  msg.msg_iov = const_cast<iovec*>(bufs);
  msg.msg_iovlen = nbufs;
  ssize_t n;
  do {
    n = ::sendmsg(d->fd(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
  } while (n < 0 && errno == EINTR);
  if (n >= 0) return static_cast<int>(n < INT_MAX ? n : INT_MAX);
  if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return -EAGAIN;
  return -errno;
}

bool close(Dgram* d) noexcept {
  if (d->closing()) return false;
  // What could leave now leaves, as libuv's sends leave inside uv_udp_send:
  // the round's chain goes out ahead of the close, and what finds no room
  // is cancelled.
  submit_chain(d);
  d->flags = (d->flags | kClosing) & ~kReceiving;
  if (watched(d)) d->edges->remove(&d->member);  // while the fd is open
  return d->life.close();
}

void run_deferred(Dgram* d) noexcept {
  d->deferred = false;
  catch_up(d);
  d->life.release();
  settle(d);
}

void after_fork(Dgram* d, IoBackend* io) noexcept {
  // Nothing of the old backend's completes here: every op is idle again, and
  // the deferred run was the old loop's.
  d->life.forget_in_flight(io);
  forget(&d->ms_op);
  forget(&d->nop);
  forget(&d->wait_op);
  forget(&d->barrier);
  d->ms_active = d->ms_cancelled = false;
  d->nop_active = d->wait_active = d->wait_on_edge = d->barrier_active = false;
  d->deferred = false;
  for (unsigned i = 0; i < d->plain_n; ++i) {
    forget(&d->plain[i].op);
    d->plain[i].active = d->plain[i].cancelled = false;
  }
  // This round's batch sits in the old backend's buffers, still mapped now:
  // copied out, never recycled there.
  for (unsigned i = 0; i < d->held_n; ++i) {
    keep(d, item_of(d->held[i]));
    if (d->held[i].source < 0 && d->held[i].source != kNoSource) d->plain[~d->held[i].source].held = false;
  }
  d->held_n = 0;
  // Sends the old backend held: this process never sent them.
  for (SendReq* r = d->send_head; r != nullptr; r = r->next) {
    if (r->state != SendReq::State::in_flight) continue;
    forget(&r->op);
    r->state = SendReq::State::done;
    r->res = -ECANCELED;
  }
  d->chain_left = 0;
  d->flags &= ~(kStarved | kNoRoom | kPaused | kDryRound);
  d->may_read = true;  // the EdgeSet takes the socket again (EdgeSet::after_fork)
  if (d->closing()) return;  // the FdLife finishes the close in the new backend
  d->resume = true;
  schedule_nop(d);
}

}  // namespace ringpark::detail::dgram
