#!/usr/bin/env bash
# Real libuv programs, unchanged, under LD_PRELOAD=libringpark-preload.so:
#   - the project's own uv echo server (bench/uv_echo_server) and HTTP server
#     (samples/http_hello --uv), which link libuv only;
#   - Debian 12's node 18 (nodejs + libnode108, linked to the system libuv1),
#     a `net` echo server and an `http` hello server, fetched with
#     `apt-get download` and unpacked with `dpkg -x` into the build folder, so
#     that no node the machine already has is touched;
#   - Debian 12's knot-resolver 5.6 (kresd), fetched the same way, answering
#     DNS over UDP and TCP from its hints module (kresd_check.sh: every answer
#     checked; and the port of a kresd killed with SIGKILL is free at once).
# For each: every byte is checked (bench/loadgen checks every echoed byte;
# every HTTP response is compared whole), the program's own TCP streams were
# adopted (RINGPARK_STATS at exit), and while it holds an idle connection its
# loop thread sleeps in io_uring_enter, not in epoll_wait (/proc/PID/syscall).
# Traffic is on 127.0.0.1 only; every step is bounded in time.
#
# Usage: tests/programs/run.sh BUILD_DIR
# Exit: 0 all passed; 1 a failure; 2 bad usage. Node needs root (its
# externalized builtins go on an overlay of /usr/share in a private mount
# namespace) and Debian's package archive: without them its part is skipped,
# and says so.
set -uo pipefail

build=${1:?usage: $0 BUILD_DIR}
build=$(cd "$build" && pwd)
preload=$build/libringpark-preload.so
loadgen=$build/bench/loadgen
uv_echo=$build/bench/uv_echo_server
http_hello=$build/samples/http_hello
for f in "$preload" "$loadgen" "$uv_echo" "$http_hello"; do
  [ -e "$f" ] || { echo "programs: missing $f (build with benchmarks and samples)" >&2; exit 2; }
done
here=$(cd "$(dirname "$0")" && pwd)
work=$build/programs
mkdir -p "$work"

failures=0
fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

pid=""
out=""
# start NAME LOG COMMAND...: starts the program under the preload, waits for
# its "port N" / "listening on 127.0.0.1:N" line, sets $pid and $port.
start() {
  local name=$1 log=$2
  shift 2
  out=$log
  RINGPARK_STATS=1 LD_PRELOAD=$preload "$@" >"$log" 2>&1 &
  pid=$!
  port=""
  for _ in $(seq 100); do
    port=$(sed -n 's/.*127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p; s/^port \([0-9][0-9]*\)$/\1/p' "$log" | head -n1)
    [ -n "$port" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$port" ]; then
    fail "$name: did not start listening"
    cat "$log" >&2
    stop "$name"
    return 1
  fi
  echo "--- $name: pid $pid, port $port"
}

# stop NAME: SIGINT (each program exits cleanly on it), then the exit status.
stop() {
  local name=$1 rc
  [ -n "$pid" ] || return 0
  kill -INT "$pid" 2>/dev/null
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    fail "$name: still running 5 s after SIGINT"
    kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid"
  rc=$?
  pid=""
  [ "$rc" -eq 0 ] || fail "$name: exit status $rc"
}

# Adoption must have happened: RINGPARK_STATS's line at exit.
expect_adopted() {
  local name=$1 line
  line=$(grep -m1 'adopted [1-9][0-9]* streams' "$out")
  if [ -z "$line" ]; then
    fail "$name: no stream was adopted"
    cat "$out" >&2
  else
    echo "$name: ${line#ringpark: }"
  fi
}

# The loop thread's current syscall while it holds an idle connection open:
# 426 is io_uring_enter; 232 and 281 are epoll_wait and epoll_pwait.
expect_sleeps_in_ring() {
  local name=$1 nr=""
  for _ in $(seq 50); do
    nr=$(cut -d' ' -f1 "/proc/$pid/syscall" 2>/dev/null)
    [ "$nr" = 426 ] && break
    sleep 0.05
  done
  if [ "$nr" = 426 ]; then
    echo "$name: idle with a connection open, the loop sleeps in io_uring_enter"
  else
    fail "$name: idle with a connection open, the loop is in syscall ${nr:-?}, not io_uring_enter (426)"
  fi
}

# An echo server: every byte of 20 x 4 pipelined messages checked for a
# second, then one idle connection that has echoed a line.
check_echo() {
  local name=$1 reply
  "$loadgen" --port "$port" --conns 20 --depth 4 --size 100 --seconds 1 --warmup 0.2 \
    || fail "$name: the load generator saw a wrong or missing byte"
  exec 3<>"/dev/tcp/127.0.0.1/$port" || { fail "$name: cannot connect"; return; }
  printf 'ping\n' >&3
  IFS= read -r -t 5 reply <&3
  [ "$reply" = ping ] || fail "$name: echoed '$reply', not 'ping'"
  expect_sleeps_in_ring "$name"
  exec 3>&-
}

# One HTTP/1.1 request on fd 3, kept alive; prints the response's body.
http_get_fd3() {
  local line len=0 body=""
  printf 'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n' >&3
  while IFS= read -r -t 5 line <&3; do
    line=${line%$'\r'}
    [ -z "$line" ] && break
    case "${line,,}" in content-length:*) len=${line#*:}; len=${len// /} ;; esac
  done
  [ "$len" -gt 0 ] && IFS= read -r -t 5 -N "$len" body <&3
  printf '%s' "$body"
}

# An HTTP server answering `body`: 20 requests on fresh connections and 200 on
# one kept alive, each response whole, then one idle keep-alive connection.
check_http() {
  local name=$1 body=$2 i got
  for i in $(seq 20); do
    got=$(curl -s --max-time 5 "http://127.0.0.1:$port/")
    [ "$got" = "$body" ] || { fail "$name: response $i was '$got'"; break; }
  done
  got=$(curl -s --max-time 20 $(for i in $(seq 200); do printf 'http://127.0.0.1:%s/ ' "$port"; done) |
    grep -o "$body" | wc -l)
  [ "$got" = 200 ] || fail "$name: $got of 200 keep-alive responses were whole"
  exec 3<>"/dev/tcp/127.0.0.1/$port" || { fail "$name: cannot connect"; return; }
  got=$(http_get_fd3)
  [ "${got%$'\n'}" = "$body" ] || fail "$name: the kept-alive connection answered '$got'"
  expect_sleeps_in_ring "$name"
  exec 3>&-
}

command -v curl >/dev/null || { echo "programs: curl is needed" >&2; exit 2; }

# ---- The project's own libuv programs ------------------------------------------
if start "uv echo" "$work/uv_echo.log" "$uv_echo" --port 0; then
  check_echo "uv echo"
  stop "uv echo"
  expect_adopted "uv echo"
fi
if start "uv http" "$work/uv_http.log" "$http_hello" --uv 0; then
  check_http "uv http" "Hello, World!"
  stop "uv http"
  expect_adopted "uv http"
fi

# ---- Debian 12's node 18 ----------------------------------------------------------
# shellcheck source=tests/programs/node18.sh
source "$here/node18.sh"
if [ "$(id -u)" -ne 0 ]; then
  echo "programs: node 18 skipped: needs root for its mount namespace"
elif ! node18_fetch "$work"; then
  echo "programs: node 18 skipped: apt-get download failed (see $work/node18-download.log)"
else
  version=$( (node18 -p 'process.version + " on libuv " + process.versions.uv') 2>&1)
  echo "programs: node $version"
  if start "node net echo" "$work/node_echo.log" node18 "$here/node_echo.js"; then
    check_echo "node net echo"
    stop "node net echo"
    expect_adopted "node net echo"
  fi
  if start "node http" "$work/node_http.log" node18 "$here/node_http.js"; then
    check_http "node http" "hello world"
    stop "node http"
    expect_adopted "node http"
  fi
fi

# ---- Debian 12's knot-resolver 5.6 ---------------------------------------------------
# shellcheck source=tests/programs/kresd.sh
source "$here/kresd.sh"
if [ "$(id -u)" -ne 0 ]; then
  echo "programs: kresd skipped: needs root for its namespaces"
elif ! kresd_fetch "$work"; then
  echo "programs: kresd skipped: apt-get download failed (see $work/kresd-download.log)"
else
  kresd_namespace bash "$here/kresd_check.sh" "$preload" "$KRESD_ROOT/usr/sbin/kresd" "$work" ||
    fail "kresd (see above)"
fi

if [ "$failures" -ne 0 ]; then
  echo "programs: $failures failure(s)"
  exit 1
fi
echo "programs: all passed"
