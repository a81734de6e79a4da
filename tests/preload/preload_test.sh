#!/usr/bin/env bash
# The LD_PRELOAD drop-in on an unmodified libuv program (uv_program.c, which
# links libuv only; it runs a chain of 13 asynchronous uv_fs_* requests, then a
# TCP echo):
#   1. plain: the file results and the echo are right and ringpark is absent;
#   2. LD_PRELOAD=libringpark-preload.so: the same results, the backend is
#      io_uring (when this machine lets a process set up a ring), ringpark took
#      part in the loop's iterations (turns > 0), which it can only do if the
#      program's uv_run went through the preload, and the file requests went
#      through the ring (the SQEs they added are at least their number);
#   3. the same with RINGPARK_PRELOAD_FS=0: the file requests stay on libuv's
#      thread pool (fewer SQEs than requests);
#   4. the same with RINGPARK_BACKEND=epoll: the fallback, turns > 0.
# Also checks that the preload exports uv_run, the uv_fs_* it interposes,
# rp_backend and rp_stats.
#
# Usage: preload_test.sh <uv_program> <libringpark-preload.so>
# Exit status: 0 pass, 1 fail, 77 skipped part (io_uring unavailable here; all
# the rest passed).
set -u

if [ $# -ne 2 ]; then
  echo "usage: $0 <uv_program> <libringpark-preload.so>" >&2
  exit 2
fi
program=$1
preload=$2
failures=0
skipped=""

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# run NAME [env assignments...]: runs the program under `env -u RINGPARK_BACKEND`
# plus the assignments; sets $out and $rc and shows the output.
run() {
  local name=$1
  shift
  out=$(env -u RINGPARK_BACKEND -u LD_PRELOAD "$@" "$program" 2>&1)
  rc=$?
  echo "--- $name (exit $rc)"
  echo "$out"
  if [ "$rc" -ne 0 ]; then fail "$name: exit status $rc"; fi
  if ! grep -qx "echo: ok" <<<"$out"; then fail "$name: no correct echo"; fi
  if ! grep -qx "fs: ok" <<<"$out"; then fail "$name: wrong file results"; fi
}

expect_line() {  # expect_line NAME LINE
  if ! grep -qxF -- "$2" <<<"$out"; then fail "$1: expected the line \"$2\""; fi
}

expect_turns() {  # expect_turns NAME: "ringpark turns: N ..." with N > 0
  local turns
  turns=$(sed -n 's/^ringpark turns: \([0-9][0-9]*\) .*/\1/p' <<<"$out")
  if [ -z "$turns" ]; then
    fail "$1: no \"ringpark turns:\" line"
  elif [ "$turns" -eq 0 ]; then
    fail "$1: ringpark took no turns: the program's uv_run did not go through the preload"
  fi
}

# fs_sqes NAME: sets $requests and $sqes from "ringpark fs requests: N sqes: N ...".
fs_sqes() {
  requests=$(sed -n 's/^ringpark fs requests: \([0-9][0-9]*\) sqes: .*/\1/p' <<<"$out")
  sqes=$(sed -n 's/^ringpark fs requests: [0-9]* sqes: \([0-9][0-9]*\) .*/\1/p' <<<"$out")
  if [ -z "$requests" ] || [ -z "$sqes" ]; then
    fail "$1: no \"ringpark fs requests:\" line"
    requests=0
    sqes=0
    return 1
  fi
}

if [ ! -x "$program" ]; then
  echo "FAIL: $program is not an executable" >&2
  exit 1
fi
if [ ! -f "$preload" ]; then
  echo "FAIL: $preload does not exist" >&2
  exit 1
fi

# shellcheck source=tests/preload/preload_list.sh
source "$(dirname "$0")/preload_list.sh"
preload_list=$(preload_list "$preload")

# What the dynamic linker sees.
if command -v nm >/dev/null 2>&1; then
  exported=$(nm -D --defined-only "$preload" | awk '$2 == "T" || $2 == "W" { print $3 }')
  for sym in uv_run rp_uv_run rp_backend rp_stats rp_loop_close uv_fs_open uv_fs_close \
    uv_fs_read uv_fs_write uv_fs_fsync uv_fs_fdatasync uv_fs_stat uv_fs_fstat uv_fs_lstat \
    uv_fs_unlink uv_fs_rename uv_fs_mkdir uv_fs_ftruncate uv_udp_init uv_udp_init_ex \
    uv_udp_recv_start uv_udp_recv_stop uv_udp_send uv_udp_try_send; do
    if ! grep -qx "$sym" <<<"$exported"; then
      fail "$preload does not export $sym"
    fi
  done
else
  echo "note: no nm here, not checking the preload's exported symbols"
fi

run "plain"
expect_line "plain" "ringpark: absent"

run "preload" LD_PRELOAD="$preload_list"
if probe=$("$program" --probe-io-uring); then
  expect_line "preload" "ringpark backend: io_uring"
  # Every request is one SQE; ftruncate needs Linux 6.9's IORING_OP_FTRUNCATE
  # and runs on libuv's pool before that, hence the one spare.
  if fs_sqes "preload" && [ "$sqes" -lt $((requests - 1)) ]; then
    fail "preload: $requests file requests added only $sqes SQEs: they did not go through the ring"
  fi
else
  skipped="io_uring is unavailable to this process ($probe), so the default backend is not checked"
  if ! grep -q "^ringpark backend: epoll (" <<<"$out"; then
    fail "preload: expected the fallback backend without io_uring"
  fi
fi
expect_turns "preload"

run "preload, RINGPARK_PRELOAD_FS=0" LD_PRELOAD="$preload_list" RINGPARK_PRELOAD_FS=0
expect_turns "preload, RINGPARK_PRELOAD_FS=0"
if fs_sqes "preload, RINGPARK_PRELOAD_FS=0" && [ "$sqes" -ge $((requests - 1)) ]; then
  fail "preload, RINGPARK_PRELOAD_FS=0: the file requests added $sqes SQEs: they went through the ring"
fi

run "preload, RINGPARK_BACKEND=epoll" LD_PRELOAD="$preload_list" RINGPARK_BACKEND=epoll
expect_line "preload, RINGPARK_BACKEND=epoll" "ringpark backend: epoll (RINGPARK_BACKEND=epoll)"
expect_turns "preload, RINGPARK_BACKEND=epoll"

if [ "$failures" -ne 0 ]; then
  echo "$failures failure(s)" >&2
  exit 1
fi
if [ -n "$skipped" ]; then
  echo "SKIPPED: $skipped"
  exit 77
fi
echo "PASS"
