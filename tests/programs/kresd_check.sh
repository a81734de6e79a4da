#!/usr/bin/env bash
# The knot-resolver part of tests/programs/run.sh, run inside kresd_namespace
# (kresd.sh): loopback only, kresd's paths overlaid. kresd answers a name from
# its hints module; every answer is checked (dns_check.py).
#
#   kresd_check.sh PRELOAD KRESD WORK
#
# 1. kresd under the preload: 2,000 UDP queries (32 in flight) and 200
#    pipelined on one TCP connection, every answer right; idle, its loop
#    sleeps in io_uring_enter; SIGINT, exit 0; RINGPARK_STATS says its UDP
#    sockets and TCP stream were adopted.
# 2. kresd under the preload killed with SIGKILL: its port is free the moment
#    it is reaped, as without the preload (a restart at once gets it).
# Prints "kresd: ..." lines; exit 0, or 1 after the first failure.
set -uo pipefail

preload=$1 kresd=$2 work=$3
here=$(cd "$(dirname "$0")" && pwd)
check=$here/dns_check.py
port=5353
name=test.ringpark.
address=192.0.2.7

cat >"$work/kresd.conf" <<EOF
net.listen('127.0.0.1', $port, { kind = 'dns' })
modules = { 'hints > iterate' }
hints.set('$name $address')
cache.size = 10 * MB
EOF

fail() {
  echo "kresd: FAIL: $*"
  [ -f "$work/kresd.log" ] && sed 's/^/    /' "$work/kresd.log"
  exit 1
}

# start: kresd under the preload, answering; sets $pid.
start() {
  rm -rf "$work/kresd-run"
  mkdir -p "$work/kresd-run"
  RINGPARK_STATS=1 LD_PRELOAD=$preload "$kresd" -n -c "$work/kresd.conf" "$work/kresd-run" \
    >"$work/kresd.log" 2>&1 &
  pid=$!
  timeout 15 python3 "$check" ready "$port" "$name" || fail "kresd did not answer"
}

start
timeout 60 python3 "$check" query "$port" "$name" "$address" 2000 200 || fail "wrong answers"
nr=""
for _ in $(seq 50); do
  nr=$(cut -d' ' -f1 "/proc/$pid/syscall" 2>/dev/null)
  [ "$nr" = 426 ] && break
  sleep 0.05
done
[ "$nr" = 426 ] || fail "idle, its loop is in syscall ${nr:-?}, not io_uring_enter (426)"
echo "kresd: idle, the loop sleeps in io_uring_enter"
kill -INT "$pid"
timeout 10 tail --pid="$pid" -f /dev/null || { kill -KILL "$pid"; fail "still running 10 s after SIGINT"; }
wait "$pid" || fail "exit status $? after SIGINT"
line=$(grep -m1 'adopted [1-9][0-9]* UDP sockets' "$work/kresd.log") ||
  fail "no UDP socket was adopted"
echo "kresd: ${line#ringpark: }"
grep -q 'adopted [1-9][0-9]* streams' <<<"$line" || fail "no TCP stream was adopted"

# A kill, and the port at once: the binder waits on a pipe, so that it binds
# the moment the shell has reaped kresd (starting it then would be too slow
# to see a port held for a few milliseconds).
start
exec 4> >(exec python3 "$check" bind-on-line "$port")
binder=$!
sleep 0.5  # the binder is waiting for its line
{ kill -KILL "$pid"; wait "$pid"; } 2>/dev/null  # no "Killed" notice
echo >&4
exec 4>&-
wait "$binder" || fail "the killed kresd's port was still bound"
echo "kresd: killed with SIGKILL, its port is free at once"
