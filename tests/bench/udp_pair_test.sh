#!/bin/bash
# The datagram benchmark's pair works on plain libuv: bench/uv_udp_echo_server
# (an ordinary libuv program, on uv_run) answers bench/udp_loadgen, which
# checks every reply byte for byte (it exits 1 on any mismatch).
#
#   udp_pair_test.sh [--preload LIB] SERVER LOADGEN [server flags...]
#
# With --preload, the server runs unchanged under LD_PRELOAD=LIB (and
# RINGPARK_STATS=1): its uv_udp_t must then be adopted (the stats line says
# so), and every request must be answered (no lost or late reply: 64 in
# flight cannot overflow a socket's receive buffer).
#
# Bounded: the load runs 1 s after a 0.2 s warm-up; the server is stopped with
# SIGTERM (SIGKILL after 5 s) and must exit 0 having echoed datagrams.
set -u
preload=
if [ "${1:-}" = --preload ]; then
  preload=$2
  shift 2
fi
server=$1
loadgen=$2
shift 2
out=$(mktemp)
lg=$(mktemp)
trap 'rm -f "$out" "$lg"' EXIT

if [ -n "$preload" ]; then
  # A sanitizer build: the sanitizer's runtime must come first in the library
  # list, before the preload (ASan refuses to start otherwise).
  list=""
  for name in asan tsan lsan ubsan; do
    lib=$(ldd "$preload" | awk -v n="lib$name.so" 'index($1, n) == 1 && $3 ~ /^\// { print $3 }')
    [ -n "$lib" ] && list="$list$lib "
  done
  # The server also links libringpark (for its --rp mode), whose symbols the
  # preload interposes by design: ASan reports the two copies' globals as an
  # ODR violation, which is not one here.
  env LD_PRELOAD="$list$preload" RINGPARK_STATS=1 \
    ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0" "$server" "$@" >"$out" 2>&1 &
else
  "$server" "$@" >"$out" &
fi
pid=$!
stop_server() {
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid"
}

port=
for _ in $(seq 50); do
  port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$out")
  [ -n "$port" ] && break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "udp_pair_test: the server did not start"
  cat "$out"
  stop_server
  exit 1
fi

"$loadgen" --port "$port" --clients 16 --depth 4 --size 200 --warmup 0.2 --seconds 1 >"$lg"
load=$?
stop_server
status=$?
cat "$lg" "$out"
if [ "$load" -ne 0 ] || [ "$status" -ne 0 ]; then
  echo "udp_pair_test: loadgen exited $load, server $status"
  exit 1
fi
grep -q 'echoed=[1-9]' "$out" || { echo "udp_pair_test: the server echoed nothing"; exit 1; }
grep -q 'send_errors=0 truncated=0' "$out" || { echo "udp_pair_test: send errors"; exit 1; }
if [ -n "$preload" ]; then
  grep -q 'adopted 1 UDP sockets' "$out" || { echo "udp_pair_test: the server's socket was not adopted"; exit 1; }
  grep -q ' lost=0 late=0 ' "$lg" || { echo "udp_pair_test: requests went unanswered"; exit 1; }
fi
