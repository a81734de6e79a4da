#include "uring_driver/probe.hpp"

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace ringpark::detail {

const char* errno_name(int err) noexcept {
  if (err < 0) err = -err;
  switch (err) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case ENOMEM: return "ENOMEM";
    case EINVAL: return "EINVAL";
    case EACCES: return "EACCES";
    case EMFILE: return "EMFILE";
    case ENFILE: return "ENFILE";
    case EFAULT: return "EFAULT";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default: return strerrorname_np(err) ? strerrorname_np(err) : "unknown error";
  }
}

namespace {

// What the driver cannot work without. Everything else is optional and checked
// where it is used.
constexpr io_uring_op kRequired[] = {
    IORING_OP_NOP,    IORING_OP_READ,    IORING_OP_WRITE,        IORING_OP_POLL_ADD,
    IORING_OP_TIMEOUT, IORING_OP_ASYNC_CANCEL, IORING_OP_RECV,   IORING_OP_SEND,
    IORING_OP_ACCEPT, IORING_OP_CONNECT, IORING_OP_CLOSE,
};

const char* op_name(io_uring_op op) noexcept {
  switch (op) {
    case IORING_OP_NOP: return "NOP";
    case IORING_OP_READ: return "READ";
    case IORING_OP_WRITE: return "WRITE";
    case IORING_OP_POLL_ADD: return "POLL_ADD";
    case IORING_OP_TIMEOUT: return "TIMEOUT";
    case IORING_OP_ASYNC_CANCEL: return "ASYNC_CANCEL";
    case IORING_OP_RECV: return "RECV";
    case IORING_OP_SEND: return "SEND";
    case IORING_OP_ACCEPT: return "ACCEPT";
    case IORING_OP_CONNECT: return "CONNECT";
    case IORING_OP_CLOSE: return "CLOSE";
    default: return "?";
  }
}

std::size_t round_to_pages(std::size_t bytes, std::size_t page) noexcept {
  return (bytes + page - 1) / page * page;
}

// Whether the kernel skips the locked-memory accounting for this process.
bool has_cap_ipc_lock() noexcept {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_IPC_LOCK / 32].effective & (1u << (CAP_IPC_LOCK % 32))) != 0;
}

std::string kib(unsigned long long bytes) {
  return std::to_string((bytes + 1023) / 1024) + " KiB";
}

// Why io_uring_setup said ENOMEM, when it is the locked-memory limit.
std::string enomem_reason() {
  std::string reason = "io_uring_setup: ENOMEM";
  rlimit limit{};
  if (::getrlimit(RLIMIT_MEMLOCK, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY ||
      has_cap_ipc_lock()) {
    return reason;  // not the limit: the machine is out of memory
  }
  reason += " (RLIMIT_MEMLOCK: a ring of " + std::to_string(kMinRingEntries) + " entries needs " +
            kib(ring_locked_bytes(kMinRingEntries)) + " of locked memory, the limit is " +
            kib(limit.rlim_cur) + ", shared by all of this user's processes; raise it with ulimit -l)";
  return reason;
}

// A value of /proc/sys/kernel/<name>, or `otherwise` when it cannot be read
// (a kernel before 6.6 has neither io_uring_disabled nor io_uring_group).
long read_sysctl(const char* name, long otherwise) noexcept {
  char path[96];
  std::snprintf(path, sizeof path, "/proc/sys/kernel/%s", name);
  std::FILE* f = std::fopen(path, "re");
  if (f == nullptr) return otherwise;
  long value = otherwise;
  if (std::fscanf(f, "%ld", &value) != 1) value = otherwise;
  std::fclose(f);
  return value;
}

// Why io_uring_setup said EPERM: kernel.io_uring_disabled, or (when that is 0
// or absent) something this process cannot see, such as a seccomp filter.
std::string eperm_reason() {
  std::string reason = "io_uring_setup: EPERM";
  const long disabled = read_sysctl("io_uring_disabled", 0);
  if (disabled == 2) return reason + " (kernel.io_uring_disabled=2: io_uring is off for everyone)";
  if (disabled == 1) {
    const long group = read_sysctl("io_uring_group", -1);
    if (group < 0) {
      return reason +
             " (kernel.io_uring_disabled=1, kernel.io_uring_group=-1: only processes with "
             "CAP_SYS_ADMIN may set up a ring)";
    }
    return reason + " (kernel.io_uring_disabled=1: only processes with CAP_SYS_ADMIN or in group " +
           std::to_string(group) + ", kernel.io_uring_group, may set up a ring)";
  }
  return reason;
}

// Test seam: RINGPARK_PROBE_HIDE=OPENAT,STATX (names without IORING_OP_, or
// opcode numbers) makes the probe report those opcodes as missing, so that the
// tests can run the per-operation fallback (and, hiding a required opcode, the
// whole fallback) on a kernel that has them all. Read once per process. Not
// for production use.
std::bitset<256> hidden_ops() noexcept {
  static const std::bitset<256> hidden = [] {
    static constexpr struct {
      const char* name;
      unsigned op;
    } kNames[] = {
        {"NOP", IORING_OP_NOP},       {"READ", IORING_OP_READ},
        {"WRITE", IORING_OP_WRITE},   {"READV", IORING_OP_READV},
        {"WRITEV", IORING_OP_WRITEV}, {"FSYNC", IORING_OP_FSYNC},
        {"OPENAT", IORING_OP_OPENAT}, {"CLOSE", IORING_OP_CLOSE},
        {"STATX", IORING_OP_STATX},   {"RENAMEAT", IORING_OP_RENAMEAT},
        {"UNLINKAT", IORING_OP_UNLINKAT}, {"MKDIRAT", IORING_OP_MKDIRAT},
        {"FTRUNCATE", 55},  // Linux 6.9, newer than liburing 2.3's header
    };
    std::bitset<256> set;
    const char* p = std::getenv("RINGPARK_PROBE_HIDE");
    while (p != nullptr && *p != '\0') {
      const std::string word(p, std::strcspn(p, ","));
      p += word.size() + (p[word.size()] == ',');
      if (word.empty()) continue;
      char* end = nullptr;
      const unsigned long number = std::strtoul(word.c_str(), &end, 10);
      bool known = *end == '\0' && number < set.size();
      if (known) set.set(number);
      for (const auto& entry : kNames) {
        if (word != entry.name) continue;
        set.set(entry.op);
        known = true;
      }
      if (!known) {
        std::fprintf(stderr, "ringpark: RINGPARK_PROBE_HIDE: no opcode %s\n", word.c_str());
      }
    }
    return set;
  }();
  return hidden;
}

}  // namespace

std::size_t ring_locked_bytes(unsigned entries) noexcept {
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t sqes = std::size_t{entries} * sizeof(io_uring_sqe);
  // The kernel's struct io_rings (64 bytes of heads, tails and flags), the CQEs
  // (2 per SQE), and the SQ index array.
  const std::size_t rings =
      64 + 2 * std::size_t{entries} * sizeof(io_uring_cqe) + std::size_t{entries} * sizeof(unsigned);
  return round_to_pages(sqes, page) + round_to_pages(rings, page);
}

int setup_ring(io_uring* ring, const RingOptions& options, RingProbe* probe) noexcept {
  // From the most to the least wanted; a kernel that rejects a flag says EINVAL
  // and the next set drops it.
  const unsigned kDefer = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  // COOP_TASKRUN: a completion does not interrupt the thread while it runs user
  // code; it is posted when the thread next enters the kernel (any syscall, or
  // the next timer tick). A sleeping thread is still woken, in epoll_wait too,
  // so libuv's sleep keeps its wake-ups. TASKRUN_FLAG says when some are
  // waiting (UringDriver::taskrun_pending).
  const unsigned kCoop =
      IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_SUBMIT_ALL;
  std::initializer_list<unsigned> candidates_defer = {kDefer, kCoop, IORING_SETUP_SUBMIT_ALL, 0};
  std::initializer_list<unsigned> candidates_plain = {kCoop, IORING_SETUP_SUBMIT_ALL, 0};
  int err = -EINVAL;
  for (unsigned flags : options.defer_taskrun ? candidates_defer : candidates_plain) {
    // The kernel checks the flags before it allocates, so an ENOMEM says these
    // flags are fine and the size is what to change.
    unsigned entries = options.entries;
    for (;;) {
      io_uring_params params;
      std::memset(&params, 0, sizeof params);
      params.flags = flags;
      err = io_uring_queue_init_params(entries, ring, &params);
      if (err == 0) {
        probe->setup_flags = flags;
        probe->features = params.features;
        probe->entries = params.sq_entries;
        break;
      }
      if (err != -ENOMEM || entries <= kMinRingEntries) break;
      // Half of what the kernel would have made (it rounds up to a power of two).
      entries = std::bit_ceil(entries) / 2;
      if (entries < kMinRingEntries) entries = kMinRingEntries;
    }
    if (err != -EINVAL) break;
  }
  if (err != 0) {
    probe->error = err;
    try {
      if (err == -ENOMEM) {
        probe->reason = enomem_reason();
      } else if (err == -EPERM) {
        probe->reason = eperm_reason();
      } else {
        probe->reason = std::string("io_uring_setup: ") + errno_name(err);
      }
    } catch (...) {
      probe->reason.clear();  // out of memory for the message; the error stands
    }
    return err;
  }

  io_uring_probe* ops = io_uring_get_probe_ring(ring);
  if (ops == nullptr) {
    // IORING_REGISTER_PROBE came in 5.6, with most of the opcodes we need.
    io_uring_queue_exit(ring);
    probe->error = -EOPNOTSUPP;
    probe->reason = "io_uring has no opcode probe (kernel before 5.6)";
    return probe->error;
  }
  for (int op = 0; op <= ops->last_op && op < 256; ++op) {
    if (io_uring_opcode_supported(ops, op)) probe->ops.set(op);
  }
  io_uring_free_probe(ops);
  probe->ops &= ~hidden_ops();  // the test seam above; nothing unless set

  for (io_uring_op op : kRequired) {
    if (!probe->has(op)) {
      io_uring_queue_exit(ring);
      probe->error = -EOPNOTSUPP;
      probe->reason = std::string("io_uring lacks IORING_OP_") + op_name(op);
      return probe->error;
    }
  }
  if (!(probe->features & IORING_FEAT_NODROP)) {
    // Without NODROP a full CQ loses completions, and with them the only proof
    // that the kernel let go of an operation's memory.
    io_uring_queue_exit(ring);
    probe->error = -EOPNOTSUPP;
    probe->reason = "io_uring lacks IORING_FEAT_NODROP (kernel before 5.5)";
    return probe->error;
  }
  return 0;
}

}  // namespace ringpark::detail
