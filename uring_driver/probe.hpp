// The one place that decides what the kernel's io_uring can do: by trying
// io_uring_setup with the optional flags (dropping each on EINVAL) and asking
// the opcode probe, never by reading the kernel version.
#pragma once

#include <liburing.h>

#include <bitset>
#include <cstddef>
#include <string>

namespace ringpark::detail {

struct RingOptions {
  unsigned entries = 256;
  // SINGLE_ISSUER + DEFER_TASKRUN: completions are only processed when this
  // thread enters the ring, and only this thread may. For a ring that one
  // thread owns for its whole life (the standalone Runtime). Other rings, and
  // these on a kernel without DEFER_TASKRUN, get COOP_TASKRUN where it exists.
  bool defer_taskrun = false;
  // The provided buffer ring that OpCode::recv_multishot receives into,
  // registered on first use: at most `buf_ring_entries` buffers (a power of
  // two, at most 32768; 0 turns multishot recv off, as RINGPARK_RECV_MULTISHOT=0
  // in the environment does) of `buf_ring_buf_size` bytes, of which the kernel
  // holds only as many as the most bytes in flight have needed (BufRing). One
  // CQE carries at most one buffer's worth of bytes.
  unsigned buf_ring_entries = 512;
  unsigned buf_ring_buf_size = 16 * 1024;
  // Fill those buffers incrementally where the kernel can (IOU_PBUF_RING_INC,
  // Linux 6.12): small messages then share a buffer instead of taking one
  // each, so the ring holds 8 MiB of messages rather than 512 of them.
  bool buf_ring_incremental = true;
  // The provided buffer ring that OpCode::recvmsg_multishot receives datagrams
  // into (a group of its own, registered on first use): at most
  // `dgram_ring_entries` buffers (a power of two; 0 turns multishot recvmsg
  // off) of `dgram_ring_buf_size` bytes, of which the kernel holds only as many
  // as the most datagrams in flight have needed. A datagram takes one whole
  // buffer (filling incrementally could cut one at a buffer's end), so each
  // holds the largest: 65,527 bytes (UDP over IPv6; 65,507 over IPv4), the
  // io_uring_recvmsg_out header, the source address and control messages.
  // Buffers are page-aligned, so a small datagram touches one page. 256: one
  // multishot recvmsg serves a whole socket and a dry ring costs one re-arm
  // per starved socket (its queue keeps the datagrams meanwhile); flooding one
  // socket with 100,000 datagrams ran 64 buffers dry 199 times and 256 only
  // while the ring grew to its need (the same with 1,024 or 4,096), and the
  // socket dropped as many with any of them: the receiver's CPU, not the ring,
  // limits a flood. The mapping (17 MiB) costs memory only where written.
  unsigned dgram_ring_entries = 256;
  unsigned dgram_ring_buf_size = 68 * 1024;
};

struct RingProbe {
  int error = 0;       // 0, or the negative errno that made the ring unusable
  std::string reason;  // why the ring is unusable, e.g. "io_uring_setup: EPERM"
  // The SQ size the ring got: RingOptions::entries rounded up to a power of
  // two, or fewer when the locked-memory limit refused that many (see
  // setup_ring).
  unsigned entries = 0;
  unsigned setup_flags = 0;
  unsigned features = 0;
  std::bitset<256> ops;  // by opcode number, also those newer than liburing's header

  bool has(unsigned op) const noexcept { return op < ops.size() && ops.test(op); }
};

// Sets up `ring` with the best flags the kernel accepts. On failure the ring is
// left uninitialised and probe->error/reason say why. Never throws.
//
// The kernel charges the ring's memory (its SQEs, and the SQ and CQ rings, in
// whole pages) to RLIMIT_MEMLOCK, per user across all of that user's
// processes, unless the process has CAP_IPC_LOCK. So on ENOMEM the setup is
// retried with half the entries, down to kMinRingEntries; the reason of a
// final ENOMEM names RLIMIT_MEMLOCK, what the smallest ring needs, and the
// limit. On EPERM the reason says whether kernel.io_uring_disabled refused it
// (a seccomp filter or an LSM reads as plain "io_uring_setup: EPERM").
int setup_ring(io_uring* ring, const RingOptions& options, RingProbe* probe) noexcept;

// The smallest ring setup_ring retries with after ENOMEM: as many SQEs as fill
// one 4 KiB page. A ring this size locks two pages (one of SQEs, one holding
// the SQ and CQ rings: 2,368 bytes at 64 entries), exactly what a ring of one
// entry locks, so going lower frees no locked memory; and 64 SQEs still let a
// loop iteration hand 64 operations to the kernel in one io_uring_enter (a
// full SQ costs one extra enter, never a lost operation).
inline constexpr unsigned kMinRingEntries = 64;

// About how many bytes of locked memory a ring of `entries` SQEs (and twice as
// many CQEs) costs: whole pages of SQEs, plus whole pages of the SQ and CQ
// rings. For messages; the kernel's own accounting decides.
std::size_t ring_locked_bytes(unsigned entries) noexcept;

// "EPERM" for EPERM: errno names for the messages users read.
const char* errno_name(int err) noexcept;

}  // namespace ringpark::detail
