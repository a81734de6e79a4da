#!/usr/bin/env bash
# The LD_PRELOAD drop-in on a libuv program with a loop per thread
# (uv_threads.c: 4 threads, each with its own loop, timer and file requests,
# calling uv_run many times at once).
#
#   threads_test.sh <uv_threads> <libringpark-preload.so>
#     plain, then under the preload: both must exit 0 with "threads: ok". The
#     preload must set its pointer to libuv's uv_run once, not on every call
#     (issue 8, defect 4); a ThreadSanitizer build of this test reports the race
#     if it does not.
#   threads_test.sh <uv_threads> <libringpark-preload.so> memlock
#     under the preload, as a fresh non-root user with RLIMIT_MEMLOCK 0: every
#     loop comes up on epoll, the program still works, and the preload says why
#     on stderr exactly once (naming RLIMIT_MEMLOCK), not once per loop.
#     Needs root (to switch users) and setpriv; exit 77 (skipped) without them,
#     or when this kernel does not charge rings to RLIMIT_MEMLOCK.
set -u

if [ $# -lt 2 ]; then
  echo "usage: $0 <uv_threads> <libringpark-preload.so> [memlock]" >&2
  exit 2
fi
program=$(readlink -f "$1")
# shellcheck source=tests/preload/preload_list.sh
source "$(dirname "$0")/preload_list.sh"
preload=$(preload_list "$(readlink -f "$2")")
mode=${3:-threads}
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# check NAME: the run's exit status and "threads: ok".
check() {
  echo "--- $1 (exit $rc)"
  echo "$out"
  [ -n "$err" ] && echo "stderr: $err"
  if [ "$rc" -ne 0 ]; then fail "$1: exit status $rc"; fi
  if ! grep -qx "threads: ok" <<<"$out"; then fail "$1: not \"threads: ok\""; fi
}

errfile=$(mktemp)
trap 'rm -f "$errfile"' EXIT

if [ "$mode" = threads ]; then
  out=$(env -u RINGPARK_BACKEND -u LD_PRELOAD timeout 30 "$program" 2>"$errfile")
  rc=$?
  err=$(cat "$errfile")
  check plain
  out=$(env -u LD_PRELOAD LD_PRELOAD="$preload" timeout 30 "$program" 2>"$errfile")
  rc=$?
  err=$(cat "$errfile")
  check preload
else
  if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP: switching to a fresh user with a small RLIMIT_MEMLOCK needs root" >&2
    exit 77
  fi
  if ! command -v setpriv >/dev/null; then
    echo "SKIP: no setpriv" >&2
    exit 77
  fi
  # A user id of its own: the limit is charged per user, across processes, and
  # the rings of other tests must not count against it.
  user=$((300000 + $$ % 100000))
  run_limited() {  # run_limited CMD...: as $user, RLIMIT_MEMLOCK 0, in /tmp
    (cd /tmp && ulimit -l 0 && exec setpriv --reuid="$user" --regid="$user" --clear-groups \
      env -u RINGPARK_BACKEND "$@")
  }
  out=$(run_limited env -u LD_PRELOAD LD_PRELOAD="$preload" timeout 30 "$program" 2>"$errfile")
  rc=$?
  err=$(cat "$errfile")
  check "preload, RLIMIT_MEMLOCK 0, user $user"
  notices=$(grep -c "^ringpark: io_uring is not available, running on epoll: " "$errfile")
  if [ "$notices" -eq 0 ]; then
    # Kernels from 5.12 until rings were charged again account them to the
    # memory cgroup instead: io_uring then works at any RLIMIT_MEMLOCK.
    if [ "$failures" -eq 0 ] && run_limited "$(dirname "$program")/preload_uv_program" \
        --probe-io-uring >/dev/null 2>&1; then
      echo "SKIP: this kernel sets up rings at RLIMIT_MEMLOCK 0 (it does not charge them)" >&2
      exit 77
    fi
    fail "no fallback notice on stderr"
  elif [ "$notices" -ne 1 ]; then
    fail "$notices fallback notices for 4 loops, expected exactly 1"
  fi
  if [ "$notices" -ge 1 ] && ! grep -q "io_uring_setup: ENOMEM (RLIMIT_MEMLOCK" "$errfile"; then
    fail "the notice does not name RLIMIT_MEMLOCK"
  fi
fi

if [ "$failures" -ne 0 ]; then
  echo "$failures failure(s)" >&2
  exit 1
fi
echo "PASS"
