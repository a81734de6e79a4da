// libringpark-preload.so: loaded with LD_PRELOAD into a dynamically linked
// libuv 1.x program (or linked ahead of libuv), it interposes
// - uv_run, so that the program runs on ringpark without a rebuild, and
//   uv_loop_close, which then also releases the loop's ringpark state;
// - the asynchronous file requests uv_fs_open, close, read, write, fsync,
//   fdatasync, stat, fstat, lstat, unlink, rename, mkdir and ftruncate, so that
//   the program's file I/O goes through the loop's ring instead of libuv's
//   thread pool (each is its rp_fs_* twin, with the same contract);
// - the stream calls uv_read_start, uv_read_stop, uv_write, uv_write2,
//   uv_try_write, uv_try_write2, uv_shutdown, uv_close and
//   uv_stream_set_blocking, so that the program's own TCP streams are adopted
//   (runtime/uv/adopt/adopt.hpp). libuv calls uv_write2, uv_try_write2,
//   uv_read_stop and uv_close from inside itself through its PLT (uv_write,
//   uv_try_write, uv_close's stream close, uv_tcp_close_reset), so those
//   reach the interposers too; its other internal calls do not need to;
// - the UDP calls uv_udp_init, uv_udp_init_ex, uv_udp_recv_start,
//   uv_udp_recv_stop, uv_udp_send, uv_udp_try_send and uv_close's UDP path,
//   so that the program's own UDP sockets are adopted
//   (runtime/uv/adopt/udp.hpp). Of these libuv calls only uv_udp_init_ex from
//   inside itself (uv_udp_init, through its PLT); its internal UDP helpers
//   (uv__udp_send, uv__udp_recv_start...) are reached only through the
//   public calls interposed here, and uv__udp_recvmsg's call of
//   uv_udp_using_recvmmsg (PLT) is left alone: an adopted socket's receives
//   are never libuv's, and the answer stays libuv's own.
// Calls with cb == NULL (libuv's synchronous fs mode) go straight to libuv.
// RINGPARK_BACKEND=epoll still selects the fallback, where rp_fs_* are libuv's
// own calls and no stream is adopted; RINGPARK_PRELOAD_FS=0 leaves every
// uv_fs_* call to libuv, RINGPARK_ADOPT=0 every stream. RINGPARK_STATS=1
// prints one line per loop, at its uv_loop_close or at exit: the backend,
// what adoption did, and the counts of the loop's chain.
//
// Recursion: ringpark's own calls to uv_run, uv_fs_* and the stream calls
// (rp_fs_* fall back on their uv_fs_* twin, adoption hands streams back to
// libuv) would resolve to the definitions below, which call back into
// ringpark. So every such call goes through a pointer that the constructor
// aims at the next definition in the lookup order (libuv's): set_real_uv_run,
// set_uv_fs_twins and set_uv_stream_fns, each set once (init_once), whichever
// thread gets there first: programs with a loop per thread call uv_run from
// many threads at once.
//
// When a loop comes up on the epoll fallback although io_uring was not turned
// off on purpose (RINGPARK_BACKEND=epoll), the first time it happens the
// reason goes to stderr, once per process: an operator then sees why
// (a seccomp filter, kernel.io_uring_disabled, RLIMIT_MEMLOCK...).
#include <dlfcn.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "ringpark.h"
#include "runtime/uv/adopt/adopt.hpp"
#include "runtime/uv/adopt/udp.hpp"
#include "runtime/uv/fs.hpp"
#include "runtime/uv/loop.hpp"

namespace {

void* next_symbol(const char* name) noexcept {
  void* sym = ::dlsym(RTLD_NEXT, name);
  if (sym == nullptr) {
    std::fprintf(stderr, "ringpark-preload: no %s after this library: %s\n", name, ::dlerror());
    std::abort();
  }
  return sym;
}

ringpark::detail::UvReactor::RunFn next_uv_run() noexcept {
  static auto next = reinterpret_cast<ringpark::detail::UvReactor::RunFn>(next_symbol("uv_run"));
  return next;
}

void notice_fallback(const char* reason) noexcept {
  static std::atomic<bool> said{false};
  if (said.exchange(true, std::memory_order_relaxed)) return;
  std::fprintf(stderr, "ringpark: io_uring is not available, running on epoll: %s\n", reason);
}

template <typename Fn>
void aim(Fn& fn, const char* name) noexcept {
  fn = reinterpret_cast<Fn>(next_symbol(name));
}

// libuv's uv_fs_* (never ours), and whether the file part is on.
struct Fs {
  ringpark::detail::UvFsTwins real;
  bool enabled = true;
};

const Fs& fs() noexcept {
  static std::once_flag once;
  static Fs state;
  std::call_once(once, [] {
    auto& r = state.real;
    aim(r.open, "uv_fs_open");
    aim(r.close, "uv_fs_close");
    aim(r.read, "uv_fs_read");
    aim(r.write, "uv_fs_write");
    aim(r.fsync, "uv_fs_fsync");
    aim(r.fdatasync, "uv_fs_fdatasync");
    aim(r.stat, "uv_fs_stat");
    aim(r.fstat, "uv_fs_fstat");
    aim(r.lstat, "uv_fs_lstat");
    aim(r.unlink, "uv_fs_unlink");
    aim(r.rename, "uv_fs_rename");
    aim(r.mkdir, "uv_fs_mkdir");
    aim(r.ftruncate, "uv_fs_ftruncate");
    // rp_fs_* fall back on libuv's functions, not on the interposers below.
    ringpark::detail::set_uv_fs_twins(r);
    const char* env = std::getenv("RINGPARK_PRELOAD_FS");
    state.enabled = env == nullptr || std::strcmp(env, "0") != 0;
  });
  return state;
}

// libuv's stream calls (never ours), aimed once.
void aim_stream_fns() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    ringpark::detail::adopt::UvStreamFns f;
    aim(f.read_start, "uv_read_start");
    aim(f.read_stop, "uv_read_stop");
    aim(f.write2, "uv_write2");
    aim(f.try_write2, "uv_try_write2");
    aim(f.shutdown, "uv_shutdown");
    aim(f.close, "uv_close");
    aim(f.set_blocking, "uv_stream_set_blocking");
    ringpark::detail::adopt::set_uv_stream_fns(f);
    ringpark::detail::adopt::udp::UvUdpFns u;
    aim(u.init, "uv_udp_init");
    aim(u.init_ex, "uv_udp_init_ex");
    aim(u.recv_start, "uv_udp_recv_start");
    aim(u.recv_stop, "uv_udp_recv_stop");
    aim(u.send, "uv_udp_send");
    aim(u.try_send, "uv_udp_try_send");
    aim(u.close, "uv_close");
    ringpark::detail::adopt::udp::set_uv_udp_fns(u);
  });
}

bool stats_wanted() noexcept {
  static const bool wanted = [] {
    const char* v = std::getenv("RINGPARK_STATS");
    return v != nullptr && std::strcmp(v, "0") != 0 && *v != '\0';
  }();
  return wanted;
}

void print_stats(ringpark::detail::LoopContext* ctx) noexcept {
  try {
    std::fprintf(stderr, "%s\n", ringpark::detail::adopt::stats_line(ctx).c_str());
  } catch (...) {
  }
}

// Everything the interposers need, once: the next definitions of what they
// replace, and the one-line notices.
void init_once() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    ringpark::detail::set_real_uv_run(next_uv_run());
    ringpark::detail::set_fallback_notice(&notice_fallback);
    ringpark::detail::LoopCloseFn loop_close;
    aim(loop_close, "uv_loop_close");
    ringpark::detail::set_real_uv_loop_close(loop_close);
    (void)fs();
    aim_stream_fns();
    if (stats_wanted()) {
      std::atexit([] { ringpark::detail::LoopContext::for_each(&print_stats); });
    }
    // Say it once when adoption cannot work in this process at all; a user
    // who turned it off with RINGPARK_ADOPT=0 knows.
    const char* why = ringpark::detail::adopt::process_gate();
    if (why != nullptr && std::strcmp(why, "RINGPARK_ADOPT=0") != 0) {
      std::fprintf(stderr, "ringpark-preload: streams stay libuv's: %s\n", why);
    }
  });
}

}  // namespace

// Ringpark's own calls to uv_run, uv_fs_* and the stream calls would otherwise
// resolve to the definitions below.
__attribute__((constructor)) static void ringpark_preload_init() { init_once(); }

#define RP_EXPORT extern "C" __attribute__((visibility("default")))

RP_EXPORT int uv_run(uv_loop_t* loop, uv_run_mode mode) {
  init_once();  // a uv_run from another library's constructor may come before ours ran
  return rp_uv_run(loop, mode);
}

RP_EXPORT int uv_loop_close(uv_loop_t* loop) {
  init_once();
  if (loop != nullptr && stats_wanted()) {
    if (auto* ctx = ringpark::detail::LoopContext::find(loop)) print_stats(ctx);
  }
  return rp_loop_close(loop);
}

// The stream calls: adoption decides, and forwards what it does not take.
RP_EXPORT int uv_read_start(uv_stream_t* stream, uv_alloc_cb alloc_cb, uv_read_cb read_cb) {
  init_once();
  return ringpark::detail::adopt::read_start(stream, alloc_cb, read_cb);
}
RP_EXPORT int uv_read_stop(uv_stream_t* stream) {
  init_once();
  return ringpark::detail::adopt::read_stop(stream);
}
RP_EXPORT int uv_write2(uv_write_t* req, uv_stream_t* handle, const uv_buf_t bufs[],
                        unsigned int nbufs, uv_stream_t* send_handle, uv_write_cb cb) {
  init_once();
  return ringpark::detail::adopt::write2(req, handle, bufs, nbufs, send_handle, cb);
}
RP_EXPORT int uv_write(uv_write_t* req, uv_stream_t* handle, const uv_buf_t bufs[],
                       unsigned int nbufs, uv_write_cb cb) {
  init_once();
  return ringpark::detail::adopt::write2(req, handle, bufs, nbufs, nullptr, cb);
}
RP_EXPORT int uv_try_write2(uv_stream_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
                            uv_stream_t* send_handle) {
  init_once();
  return ringpark::detail::adopt::try_write2(handle, bufs, nbufs, send_handle);
}
RP_EXPORT int uv_try_write(uv_stream_t* handle, const uv_buf_t bufs[], unsigned int nbufs) {
  init_once();
  return ringpark::detail::adopt::try_write2(handle, bufs, nbufs, nullptr);
}
RP_EXPORT int uv_shutdown(uv_shutdown_t* req, uv_stream_t* handle, uv_shutdown_cb cb) {
  init_once();
  return ringpark::detail::adopt::shutdown(req, handle, cb);
}
RP_EXPORT void uv_close(uv_handle_t* handle, uv_close_cb close_cb) {
  init_once();
  ringpark::detail::adopt::close(handle, close_cb);
}
RP_EXPORT int uv_stream_set_blocking(uv_stream_t* handle, int blocking) {
  init_once();
  return ringpark::detail::adopt::set_blocking(handle, blocking);
}

// The UDP calls: adoption decides, and forwards what it does not take.
RP_EXPORT int uv_udp_init(uv_loop_t* loop, uv_udp_t* handle) {
  init_once();
  return ringpark::detail::adopt::udp::init(loop, handle);
}
RP_EXPORT int uv_udp_init_ex(uv_loop_t* loop, uv_udp_t* handle, unsigned int flags) {
  init_once();
  return ringpark::detail::adopt::udp::init_ex(loop, handle, flags);
}
RP_EXPORT int uv_udp_recv_start(uv_udp_t* handle, uv_alloc_cb alloc_cb, uv_udp_recv_cb recv_cb) {
  init_once();
  return ringpark::detail::adopt::udp::recv_start(handle, alloc_cb, recv_cb);
}
RP_EXPORT int uv_udp_recv_stop(uv_udp_t* handle) {
  init_once();
  return ringpark::detail::adopt::udp::recv_stop(handle);
}
RP_EXPORT int uv_udp_send(uv_udp_send_t* req, uv_udp_t* handle, const uv_buf_t bufs[],
                          unsigned int nbufs, const struct sockaddr* addr, uv_udp_send_cb cb) {
  init_once();
  return ringpark::detail::adopt::udp::send(req, handle, bufs, nbufs, addr, cb);
}
RP_EXPORT int uv_udp_try_send(uv_udp_t* handle, const uv_buf_t bufs[], unsigned int nbufs,
                              const struct sockaddr* addr) {
  init_once();
  return ringpark::detail::adopt::udp::try_send(handle, bufs, nbufs, addr);
}

// Each interposer: the real function when the file part is off or the call is
// synchronous, else its rp_fs_* twin. fs() also covers a call made from
// another library's constructor, before ours ran.
#define RP_INTERPOSE(name, rp_name, member, params, args)       \
  RP_EXPORT int name params {                                   \
    const Fs& f = fs();                                         \
    if (!f.enabled || cb == nullptr) return f.real.member args; \
    return rp_name args;                                        \
  }

RP_INTERPOSE(uv_fs_open, rp_fs_open, open,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, int flags, int mode, uv_fs_cb cb),
             (loop, req, path, flags, mode, cb))
RP_INTERPOSE(uv_fs_close, rp_fs_close, close,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_read, rp_fs_read, read,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
              unsigned int nbufs, int64_t offset, uv_fs_cb cb),
             (loop, req, file, bufs, nbufs, offset, cb))
RP_INTERPOSE(uv_fs_write, rp_fs_write, write,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, const uv_buf_t bufs[],
              unsigned int nbufs, int64_t offset, uv_fs_cb cb),
             (loop, req, file, bufs, nbufs, offset, cb))
RP_INTERPOSE(uv_fs_fsync, rp_fs_fsync, fsync,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_fdatasync, rp_fs_fdatasync, fdatasync,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_stat, rp_fs_stat, stat,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_fstat, rp_fs_fstat, fstat,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, uv_fs_cb cb), (loop, req, file, cb))
RP_INTERPOSE(uv_fs_lstat, rp_fs_lstat, lstat,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_unlink, rp_fs_unlink, unlink,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, uv_fs_cb cb), (loop, req, path, cb))
RP_INTERPOSE(uv_fs_rename, rp_fs_rename, rename,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, const char* new_path, uv_fs_cb cb),
             (loop, req, path, new_path, cb))
RP_INTERPOSE(uv_fs_mkdir, rp_fs_mkdir, mkdir,
             (uv_loop_t * loop, uv_fs_t* req, const char* path, int mode, uv_fs_cb cb),
             (loop, req, path, mode, cb))
RP_INTERPOSE(uv_fs_ftruncate, rp_fs_ftruncate, ftruncate,
             (uv_loop_t * loop, uv_fs_t* req, uv_file file, int64_t offset, uv_fs_cb cb),
             (loop, req, file, offset, cb))

#undef RP_INTERPOSE
#undef RP_EXPORT
