#include "uring_driver/probe.hpp"

#include <cerrno>
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

}  // namespace

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
    io_uring_params params;
    std::memset(&params, 0, sizeof params);
    params.flags = flags;
    err = io_uring_queue_init_params(options.entries, ring, &params);
    if (err == 0) {
      probe->setup_flags = flags;
      probe->features = params.features;
      break;
    }
    if (err != -EINVAL) break;
  }
  if (err != 0) {
    probe->error = err;
    probe->reason = std::string("io_uring_setup: ") + errno_name(err);
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
