#!/usr/bin/env bash
# The datagram benchmark of issue 10: the unchanged libuv UDP echo server
# (bench/uv_udp_echo_server) under the preload, against itself on plain
# uv_run, with bench/udp_loadgen (N clients each keeping K requests in flight,
# every reply checked byte for byte).
#
#   bench/udp/run.sh [options] [BUILD_DIR]
#
# BUILD_DIR (default build-release, relative to the current directory or to the
# repository) must already hold a Release build; this script builds nothing:
#   cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release && cmake --build build-release
#
# Two passes, each run on a fresh server, bounded in time, server and load
# generator both pinned to one core (taskset), contenders interleaved (A B A B
# ..., the order rotated each round) so that drift and a colleague's build hit
# all alike:
#  1. throughput: datagrams answered per second (median [min-max] over the
#     rounds), p50/p99 round trip, and the ratio to plain uv_run;
#  2. syscalls: the kernel's own count of the server's syscalls in the window
#     (perf stat -e raw_syscalls:sys_enter -p PID, enabled by the load
#     generator exactly for the window) per datagram answered, one run each.
#
# Contenders: uv (plain uv_run: the base), uv_preload (LD_PRELOAD=
# libringpark-preload.so: the server's uv_udp_t adopted), and with --mmsg the
# same two with UV_UDP_RECVMMSG (uv_mmsg, uv_mmsg_preload).
#
# Options:
#   --workloads 64x1,64x16   CLIENTSxDEPTH pairs (default 64x1,64x16)
#   --scale                  also 1x16 8x16 256x16 1024x16: how the figure
#                            changes with the number of clients
#   --rounds N               rounds of pass 1 (default 5)
#   --seconds S              measured window per run (default 2; a 0.5 s
#                            warm-up comes before it)
#   --size N                 datagram size in bytes (default 64)
#   --mmsg                   add the UV_UDP_RECVMMSG contenders
#   --no-syscalls            skip pass 2
#   --cpu N                  the core (default 0)
#
# Prints one table and exits 0; a contender that fails a run (a wrong byte,
# no reply) shows FAIL and is listed under the table. Exits 2 on bad
# arguments or a missing build.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORKLOADS="64x1 64x16"
SCALE=0
ROUNDS=5
WINDOW=2
WARMUP=0.5
SIZE=64
MMSG=0
DO_SYSCALLS=1
CPU=0
BUILD_ARG="build-release"

while [ $# -gt 0 ]; do
  case "$1" in
    --workloads) WORKLOADS=${2:?}; WORKLOADS=${WORKLOADS//,/ }; shift ;;
    --scale) SCALE=1 ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --seconds) WINDOW=${2:?}; shift ;;
    --size) SIZE=${2:?}; shift ;;
    --mmsg) MMSG=1 ;;
    --no-syscalls) DO_SYSCALLS=0 ;;
    --cpu) CPU=${2:?}; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "udp/run.sh: unknown option $1" >&2; usage ;;
    *) BUILD_ARG=$1 ;;
  esac
  shift
done
[ "$SCALE" = 1 ] && WORKLOADS="$WORKLOADS 1x16 8x16 256x16 1024x16"
for w in $WORKLOADS; do
  [[ $w =~ ^[0-9]+x[0-9]+$ ]] || { echo "udp/run.sh: bad workload '$w' (want CLIENTSxDEPTH)" >&2; exit 2; }
done

B=$(resolve_build_dir udp/run.sh "$BUILD_ARG" "$ROOT") || exit 2
LOADGEN=$B/bench/udp_loadgen
SERVER=$B/bench/uv_udp_echo_server
PRELOAD=$B/libringpark-preload.so
for f in "$LOADGEN" "$SERVER" "$PRELOAD"; do
  [ -e "$f" ] || { echo "udp/run.sh: $f is missing: build the bench targets" >&2; exit 2; }
done
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$B/CMakeCache.txt" 2>/dev/null)

CONTENDERS="uv uv_preload"
[ "$MMSG" = 1 ] && CONTENDERS="$CONTENDERS uv_mmsg uv_mmsg_preload"

# Sets CMD to contender $1's command line (port 0: the server picks one and
# prints "127.0.0.1:PORT").
contender_cmd() {
  case "$1" in
    uv) CMD=("$SERVER") ;;
    uv_preload) CMD=(env "LD_PRELOAD=$PRELOAD" "$SERVER") ;;
    uv_mmsg) CMD=("$SERVER" --mmsg) ;;
    uv_mmsg_preload) CMD=(env "LD_PRELOAD=$PRELOAD" "$SERVER" --mmsg) ;;
    *) return 1 ;;
  esac
}

TMP=$(mktemp -d /tmp/ringpark-udp-bench.XXXXXX)
CHILDREN=()
NOTES=()
trap cleanup_children EXIT
trap 'echo "udp/run.sh: interrupted" >&2; exit 130' INT TERM

# Starts contender $1 on core $CPU; sets SERVER_PID, SERVER_PORT, SERVER_LOG.
RUN_ID=0
start_server() {
  contender_cmd "$1" || return 1
  RUN_ID=$((RUN_ID + 1))
  SERVER_LOG=$TMP/server.$RUN_ID.log
  env --default-signal=INT taskset -c "$CPU" "${CMD[@]}" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  CHILDREN+=("$SERVER_PID")
  SERVER_PORT=""
  local i
  for ((i = 0; i < 100; i++)); do
    SERVER_PORT=$(grep -o -m1 '127\.0\.0\.1:[0-9]\+' "$SERVER_LOG" 2>/dev/null | cut -d: -f2)
    [ -n "$SERVER_PORT" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { stop_process "$SERVER_PID" KILL; return 1; }
    sleep 0.05
  done
  stop_process "$SERVER_PID" TERM KILL
  return 1
}

PERF_OK=0
if [ "$DO_SYSCALLS" = 1 ]; then
  if ! command -v perf >/dev/null; then
    NOTES+=("syscalls not counted: no perf (apt-get install linux-perf)")
  else
    mkfifo "$TMP/check.ctl" "$TMP/check.ack"
    if perf stat -e raw_syscalls:sys_enter -x, --delay=-1 --control "fifo:$TMP/check.ctl,$TMP/check.ack" \
        -o "$TMP/perf.check" true >/dev/null 2>&1; then
      PERF_OK=1
    else
      NOTES+=("syscalls not counted: perf stat -e raw_syscalls:sys_enter --control fifo: fails here")
    fi
  fi
fi

# run_one PASS WORKLOAD CONTENDER: one fresh server, one load generator run.
declare -A TPUT P50 P99 SYS ENT FAILS
run_one() {
  local pass=$1 wl=$2 c=$3 key="$2|$3"
  local clients=${wl%x*} depth=${wl#*x}
  local extra=() perf_pid=""
  if ! start_server "$c"; then
    FAILS[$key]+=" $pass:no-port"
    NOTES+=("$c ($wl, $pass): the server did not start: $(tail -n 2 "$SERVER_LOG" 2>/dev/null | tr '\n' ' ')")
    return 1
  fi
  if [ "$pass" = syscalls ]; then
    rm -f "$TMP/ctl" "$TMP/ack" && mkfifo "$TMP/ctl" "$TMP/ack"
    perf stat -e raw_syscalls:sys_enter -x, --delay=-1 --control "fifo:$TMP/ctl,$TMP/ack" \
      -p "$SERVER_PID" -o "$TMP/perf.out" >/dev/null 2>&1 &
    perf_pid=$!
    CHILDREN+=("$perf_pid")
    extra+=(--perf-ctl "$TMP/ctl" --perf-ack "$TMP/ack")
    sleep 0.2  # perf opens the FIFOs; the load generator waits for its acks
  fi
  local budget rc lg_pid out
  budget=$(awk -v w="$WINDOW" -v u="$WARMUP" 'BEGIN { printf "%d", w + u + 20 }')
  timeout -k 2 "$budget" taskset -c "$CPU" "$LOADGEN" --port "$SERVER_PORT" --clients "$clients" \
    --depth "$depth" --size "$SIZE" --seconds "$WINDOW" --warmup "$WARMUP" "${extra[@]}" \
    >"$TMP/lg.out" 2>"$TMP/lg.err" &
  lg_pid=$!
  CHILDREN+=("$lg_pid")
  wait "$lg_pid"
  rc=$?
  forget_child "$lg_pid"
  out=$(cat "$TMP/lg.out")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null
    wait "$perf_pid" 2>/dev/null
    forget_child "$perf_pid"
  fi
  stop_process "$SERVER_PID" TERM KILL || NOTES+=("$c ($wl, $pass): the server did not exit within 2 s of SIGTERM")
  if [ $rc -ne 0 ]; then
    FAILS[$key]+=" $pass"
    NOTES+=("$c ($wl, $pass): FAILED (exit $rc): $(head -c 200 "$TMP/lg.err")")
    return 1
  fi
  local dgrams
  dgrams=$(kv dgrams "$out")
  case "$pass" in
    same)
      TPUT[$key]+=" $(kv dgrams_per_s "$out")"
      P50[$key]+=" $(kv p50_us "$out")"
      P99[$key]+=" $(kv p99_us "$out")"
      local enters echoed
      enters=$(grep -o -m1 'enters=[0-9]\+' "$SERVER_LOG" | cut -d= -f2)
      echoed=$(grep -o -m1 'echoed=[0-9]\+' "$SERVER_LOG" | cut -d= -f2)
      [ -n "$enters" ] && [ -n "$echoed" ] && [ "$echoed" -gt 0 ] &&
        ENT[$key]+=" $(awk -v e="$enters" -v t="$echoed" 'BEGIN { printf "%.4f", e / t }')"
      ;;
    syscalls)
      local count
      count=$(perf_syscalls "$TMP/perf.out")
      if [ -n "$count" ] && [ "$dgrams" -gt 0 ]; then
        SYS[$key]+=" $(awk -v s="$count" -v m="$dgrams" 'BEGIN { printf "%.4f", s / m }')"
      else
        NOTES+=("$c ($wl): perf gave no count: $(perf_output "$TMP/perf.out")")
      fi
      ;;
  esac
  return 0
}

run_pass() {
  local pass=$1 rounds=$2 r wl i n
  local -a cs=($CONTENDERS)
  n=${#cs[@]}
  for ((r = 0; r < rounds; r++)); do
    for wl in $WORKLOADS; do
      printf '  %-9s round %d/%d  %-8s' "$pass" $((r + 1)) "$rounds" "$wl" >&2
      for ((i = 0; i < n; i++)); do
        local c=${cs[$(((i + r) % n))]}
        printf ' %s' "$c" >&2
        run_one "$pass" "$wl" "$c" || printf '(FAIL)' >&2
      done
      printf '\n' >&2
    done
  done
}

rev=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
run_pass same "$ROUNDS"
[ "$PERF_OK" = 1 ] && run_pass syscalls 1

model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
echo
echo "UDP echo, ${SIZE}-byte datagrams, 127.0.0.1; $ROUNDS rounds x ${WINDOW} s windows (+${WARMUP} s warm-up), contenders interleaved, server and loadgen on cpu $CPU"
echo "machine: $(nproc) cpus, $model, kernel $(uname -r), libuv $(pkg-config --modversion libuv 2>/dev/null || echo '?'), load average $load_before at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo "ringpark: tree $rev ($started), ${build_type:-?} build in $B"
echo "dgrams/s: median [min-max] of the rounds, ratio to uv (plain uv_run); sys/dgram: the server's syscalls per datagram answered (perf, one run); enters/dgram: io_uring_enter calls per datagram over the server's life (rp_stats)"
echo
{
  printf 'workload\tcontender\tdgrams/s\t[min-max]\tx uv\tp50 us\tp99 us\tsys/dgram\tx uv\tenters/dgram\n'
  for wl in $WORKLOADS; do
    for pair in "uv uv" "uv uv_preload" "uv_mmsg uv_mmsg" "uv_mmsg uv_mmsg_preload"; do
      read -r base c <<<"$pair"
      [[ " $CONTENDERS " == *" $c "* ]] || continue
      read -r base_t _ _ <<<"$(stats "${TPUT[$wl|$base]:-}")"
      read -r base_s _ _ <<<"$(stats "${SYS[$wl|$base]:-}")"
      k="$wl|$c"
      read -r t tmin tmax <<<"$(stats "${TPUT[$k]:-}")"
      read -r p50 _ _ <<<"$(stats "${P50[$k]:-}")"
      read -r p99 _ _ <<<"$(stats "${P99[$k]:-}")"
      read -r s _ _ <<<"$(stats "${SYS[$k]:-}")"
      read -r en _ _ <<<"$(stats "${ENT[$k]:-}")"
      range="[$(human "$tmin")-$(human "$tmax")]"
      [ "$tmin" = - ] && range="-"
      tcell=$(human "$t")
      fails=${FAILS[$k]:-}
      [ -n "$fails" ] && tcell="$tcell FAIL(${fails# })"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$c" "$tcell" "$range" \
        "$(ratio "$t" "$base_t")" "$(fixed "$p50" 1)" "$(fixed "$p99" 1)" "$(fixed "$s" 3)" \
        "$(ratio "$s" "$base_s")" "$(fixed "$en" 4)"
    done
  done
} | align
echo
if [ "${#NOTES[@]}" -gt 0 ]; then
  echo "notes:"
  printf '  - %s\n' "${NOTES[@]}"
fi
exit 0
