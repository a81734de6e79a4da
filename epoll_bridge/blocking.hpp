// The calls io_uring runs on its worker threads (io-wq), made as plain
// syscalls in the calling thread: the fallback's pool runs them, and the
// io_uring driver makes one itself when io_uring could not start a worker.
#pragma once

#include <cerrno>

#include "ringpark/op.hpp"

namespace ringpark::detail {

// A syscall's return value as an op's result: itself, or the negative errno.
inline int errno_result(long r) noexcept { return r < 0 ? -errno : static_cast<int>(r); }

// Makes `op`'s call (read, write, readv, writev, fsync, fdatasync, openat,
// statx, unlinkat, renameat, mkdirat, ftruncate, shutdown; -EINVAL for any
// other) and returns its result, or a negative errno. Retries EINTR. May
// block.
int run_blocking(const Op& op) noexcept;

// Whether run_blocking makes `op`'s call, and that call returns without
// waiting for another party (a regular file or block device for reads and
// writes: not a pipe or socket, which could wait forever).
bool blocking_call_is_bounded(const Op& op) noexcept;

}  // namespace ringpark::detail
