#!/usr/bin/env bash
# Debian 12's node 18, unchanged, serving HTTP hello (tests/programs/node_http.js):
# plain, against the same node under LD_PRELOAD=libringpark-preload.so (its
# streams adopted), measured with wrk on 127.0.0.1.
#
#   bench/node/run.sh [options] [BUILD_DIR]
#
# BUILD_DIR (default build-release) must hold libringpark-preload.so. node 18
# is fetched with apt-get download into BUILD_DIR/programs (as the real-program
# tests do; root is needed for its mount namespace); wrk and perf are Debian
# packages, installed with apt-get when missing.
#
# Contenders, interleaved (A B C A B C ..., the order rotated each round):
#   node        node, plain (the base of every ratio)
#   preload     node under the preload
#   queue       node under the preload with RINGPARK_TRY_WRITE=queue:
#               uv_try_write on an adopted stream says UV_EAGAIN, so node's
#               fallback uv_write joins the ring's batch (node falls back so;
#               knot-resolver 5.7.4+ would not, which is why it is not the
#               default)
# Each run: a fresh server, node and wrk pinned to the same core (taskset;
# a 2-core VM then ranks servers by throughput), wrk -t1 -c C for S seconds;
# requests/s and wrk's p50/p99; and, once per contender (after the rounds),
# the kernel's count of the server's syscalls (every thread) per request while
# wrk runs (perf stat -e raw_syscalls:sys_enter -p PID).
#
# Options:
#   --rounds N     rounds (default 5)
#   --seconds S    wrk duration per run (default 3)
#   --conns C      wrk connections (default 50)
#   --cpu N        the core (default 0)
#
# Prints one table and exits 0; a failed run shows FAIL. Exits 2 on bad
# arguments or a missing build.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=5
SECONDS_=3
CONNS=50
CPU=0
BUILD_ARG=build-release
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=${2:?}; shift ;;
    --seconds) SECONDS_=${2:?}; shift ;;
    --conns) CONNS=${2:?}; shift ;;
    --cpu) CPU=${2:?}; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "node/run.sh: unknown option $1" >&2; usage ;;
    *) BUILD_ARG=$1 ;;
  esac
  shift
done
B=$(resolve_build_dir node/run.sh "$BUILD_ARG" "$ROOT") || exit 2
PRELOAD_LIB=$B/libringpark-preload.so
[ -e "$PRELOAD_LIB" ] || { echo "node/run.sh: no $PRELOAD_LIB" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "node/run.sh: node 18 needs root (a mount namespace)" >&2; exit 2; }
for tool in wrk perf; do
  command -v "$tool" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$([ $tool = perf ] && echo linux-perf || echo wrk)" >/dev/null 2>&1
done
command -v wrk >/dev/null || { echo "node/run.sh: no wrk (apt-get install wrk)" >&2; exit 2; }
# shellcheck source=tests/programs/node18.sh
source "$ROOT/tests/programs/node18.sh"
mkdir -p "$B/programs"
node18_fetch "$B/programs" || { echo "node/run.sh: cannot fetch node 18 (see $B/programs/node18-download.log)" >&2; exit 2; }
SERVER_JS=$ROOT/tests/programs/node_http.js

TMP=$(mktemp -d)
CHILDREN=()
trap cleanup_children EXIT
CONTENDERS=(node preload queue)

# start_server CONTENDER: sets SERVER_PID and SERVER_PORT; 1 if it did not listen.
RUN_ID=0
start_server() {
  RUN_ID=$((RUN_ID + 1))
  local c=$1 log=$TMP/server.$RUN_ID.log i
  local env_args=()
  case "$c" in
    preload) env_args=("LD_PRELOAD=$PRELOAD_LIB") ;;
    queue) env_args=("LD_PRELOAD=$PRELOAD_LIB" RINGPARK_TRY_WRITE=queue) ;;
  esac
  (exec env --default-signal=INT "${env_args[@]}" taskset -c "$CPU" bash -c \
    'source "$0"; NODE18_ROOT=$1; shift; node18 "$@"' "$ROOT/tests/programs/node18.sh" \
    "$NODE18_ROOT" "$SERVER_JS") >"$log" 2>&1 &
  SERVER_PID=$!
  CHILDREN+=("$SERVER_PID")
  SERVER_PORT=""
  for ((i = 0; i < 100; i++)); do
    SERVER_PORT=$(sed -n 's/^port \([0-9]*\)$/\1/p' "$log" 2>/dev/null | head -n1)
    [ -n "$SERVER_PORT" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  return 1
}

# run_wrk: requests/s p50_us p99_us, or FAIL.
run_wrk() {
  local out
  out=$(taskset -c "$CPU" timeout $((SECONDS_ + 10)) wrk -t1 -c "$CONNS" -d "${SECONDS_}s" --latency \
    "http://127.0.0.1:$SERVER_PORT/" 2>&1)
  local rc=$?
  echo "$out" >>"$TMP/wrk.log"
  if [ $rc -ne 0 ] || grep -q -E 'Socket errors|Non-2xx' <<<"$out"; then
    echo "$out" >&2
    echo FAIL
    return
  fi
  local rps p50 p99
  rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
  p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
  to_us() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.0f", v + 0; else if (v ~ /ms$/) printf "%.0f", v * 1000; else if (v ~ /s$/) printf "%.0f", v * 1e6; else print "-" }'; }
  echo "${rps:-FAIL} $(to_us "$p50") $(to_us "$p99")"
}

declare -A RPS P50 P99 SYS
echo "node 18 HTTP hello: ${ROUNDS} rounds x ${SECONDS_} s, wrk -t1 -c $CONNS, node and wrk on cpu $CPU"
for ((r = 0; r < ROUNDS; r++)); do
  for ((k = 0; k < ${#CONTENDERS[@]}; k++)); do
    c=${CONTENDERS[$(((k + r) % ${#CONTENDERS[@]}))]}
    if ! start_server "$c"; then
      RPS[$c]+=" FAIL"
      continue
    fi
    read -r rps p50 p99 <<<"$(run_wrk)"
    RPS[$c]+=" $rps"
    P50[$c]+=" $p50"
    P99[$c]+=" $p99"
    stop_process "$SERVER_PID" INT KILL
    echo "  round $((r + 1))/$ROUNDS $c: $rps req/s"
  done
done
# Syscalls per request, once each: perf on the server's pid (all its
# threads) for the wrk window.
for c in "${CONTENDERS[@]}"; do
  start_server "$c" || continue
  perf stat -x, -e raw_syscalls:sys_enter -p "$SERVER_PID" -o "$TMP/perf.$c" &
  perf_pid=$!
  CHILDREN+=("$perf_pid")
  sleep 0.3
  read -r rps _ <<<"$(run_wrk)"
  stop_process "$perf_pid" INT KILL
  n=$(perf_syscalls "$TMP/perf.$c")
  total=$(awk -v r="$rps" -v s="$SECONDS_" 'BEGIN { printf "%.0f", r * s }')
  [ -n "$n" ] && [ "$rps" != FAIL ] && SYS[$c]=$(awk -v n="$n" -v t="$total" 'BEGIN { printf "%.3f", n / t }')
  stop_process "$SERVER_PID" INT KILL
done

read -r base _ <<<"$(stats "$(tr ' ' '\n' <<<"${RPS[node]}" | grep -v FAIL)")"
{
  printf 'contender\treq/s\t[min-max]\tx node\tp50 us\tp99 us\tsys/req\tx node\n'
  for c in "${CONTENDERS[@]}"; do
    read -r m lo hi <<<"$(stats "$(tr ' ' '\n' <<<"${RPS[$c]}" | grep -v FAIL)")"
    read -r p50 _ <<<"$(stats "${P50[$c]:-}")"
    read -r p99 _ <<<"$(stats "${P99[$c]:-}")"
    printf '%s\t%s\t[%s-%s]\t%s\t%s\t%s\t%s\t%s\n' "$c" "$(human "$m")" "$(human "$lo")" "$(human "$hi")" \
      "$(ratio "$m" "$base")" "$p50" "$p99" "${SYS[$c]:--}" "$(ratio "${SYS[$c]:--}" "${SYS[node]:--}")"
  done
} | align
grep -q FAIL <<<"${RPS[*]}" && echo "note: a run failed (FAIL above)"
exit 0
