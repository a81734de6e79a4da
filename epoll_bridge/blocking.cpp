#include "epoll_bridge/blocking.hpp"

#include <fcntl.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>

namespace ringpark::detail {

// Every pointer in `op` stays valid until the op's final completion, which
// cannot run before this returns.
int run_blocking(const Op& op) noexcept {
  const auto* iov = static_cast<const iovec*>(op.buf);
  const int iovcnt = static_cast<int>(op.len);
  const bool at_pos = op.offset == -1;  // -1: the file position, as read(2)
  long r;
  do {
    switch (op.code) {
      case OpCode::read:
        r = at_pos ? ::read(op.fd, op.buf, op.len) : ::pread(op.fd, op.buf, op.len, op.offset);
        break;
      case OpCode::write:
        r = at_pos ? ::write(op.fd, op.buf, op.len) : ::pwrite(op.fd, op.buf, op.len, op.offset);
        break;
      case OpCode::readv:
        r = at_pos ? ::readv(op.fd, iov, iovcnt) : ::preadv(op.fd, iov, iovcnt, op.offset);
        break;
      case OpCode::writev:
        r = at_pos ? ::writev(op.fd, iov, iovcnt) : ::pwritev(op.fd, iov, iovcnt, op.offset);
        break;
      case OpCode::fsync:
        r = ::fsync(op.fd);
        break;
      case OpCode::fdatasync:
        r = ::fdatasync(op.fd);
        break;
      case OpCode::openat:
        r = ::openat(op.dfd, op.path, op.flags, static_cast<mode_t>(op.mode));
        break;
      case OpCode::statx:
        r = ::statx(op.dfd, op.path, op.flags, op.len, op.statxbuf);
        break;
      case OpCode::unlinkat:
        r = ::unlinkat(op.dfd, op.path, op.flags);
        break;
      case OpCode::renameat:
        // io_uring's renameat is renameat2, with the flags (RENAME_NOREPLACE...).
        r = ::renameat2(op.dfd, op.path, op.dfd, op.path2, static_cast<unsigned>(op.flags));
        break;
      case OpCode::mkdirat:
        r = ::mkdirat(op.dfd, op.path, static_cast<mode_t>(op.mode));
        break;
      case OpCode::ftruncate:
        r = ::ftruncate(op.fd, op.offset);  // to length `offset`
        break;
      case OpCode::shutdown:
        r = ::shutdown(op.fd, static_cast<int>(op.flags));
        break;
      default:
        errno = EINVAL;
        r = -1;
        break;
    }
    // EINTR (rare: pool threads block signals) means nothing was done.
  } while (r < 0 && errno == EINTR);
  return errno_result(r);
}

bool blocking_call_is_bounded(const Op& op) noexcept {
  switch (op.code) {
    case OpCode::read:
    case OpCode::write:
    case OpCode::readv:
    case OpCode::writev: {
      struct stat st;
      return ::fstat(op.fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode));
    }
    case OpCode::fsync:
    case OpCode::fdatasync:
    case OpCode::openat:
    case OpCode::statx:
    case OpCode::unlinkat:
    case OpCode::renameat:
    case OpCode::mkdirat:
    case OpCode::ftruncate:
    case OpCode::shutdown:
      return true;
    default:
      return false;
  }
}

}  // namespace ringpark::detail
