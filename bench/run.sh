#!/usr/bin/env bash
# The TCP echo benchmark of issue 4: every echo server contender against our
# own load generator (bench/loadgen), side by side with natural plain libuv.
#
#   bench/run.sh [--full] [options] [BUILD_DIR]
#
# BUILD_DIR (default build-release, relative to the current directory or to the
# repository) must already hold a Release build; this script builds nothing:
#   cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release && cmake --build build-release
#
# Three passes, each run on a fresh server, bounded in time:
#  1. same core: server and load generator both pinned to core 0 (taskset), so
#     that a 2-core VM ranks servers by throughput without the load generator
#     owning a core of its own or the host stealing time from a busy pair;
#     msgs/s, p50/p99 round-trip latency;
#  2. separate cores: server on core 0, load generator on core 1; the figure is
#     the server's efficiency, messages per second of server CPU time
#     (utime + stime from /proc/PID/stat over the measured window);
#  3. syscalls: same core, the kernel's own count of the server's syscalls in
#     the window (perf stat -e raw_syscalls:sys_enter -p PID, enabled by the
#     load generator exactly for the window) per echoed message.
# Contenders run interleaved (A B C A B C ..., the order rotated each round),
# rounds outermost, so drift and a colleague's build hit all alike. Every
# figure is also given as a ratio to natural libuv ("uv") of the same pass.
# ringpark contenders that print rp_stats when stopped (SIGINT) also get
# io_uring_enter calls per message (over the server's life, warm-up included).
#
# Options:
#   --full              all six workloads, 5 rounds, 3 s windows (default: the
#                       short subset 1x1 50x1 50x16 500x16, 3 rounds, 1.5 s)
#   --rounds N          rounds per pass
#   --seconds S         measured window per run (a warm-up comes before it)
#   --contenders a,b    a subset of: uv uv_pool uv_rp uv_preload rp_echo
#                       rp_pool coro_echo epoll ("uv" is always added: it is
#                       the base; rp_pool is rp_echo --pool, buffers from a
#                       free list as uv_pool's)
#   --workloads 1x1,..  CONNSxDEPTH pairs (64-byte messages)
#   --size N            message size in bytes (default 64)
#   --no-separate       skip pass 2;  --no-syscalls  skip pass 3
#   --cpus A,B          the two cores to use (default 0,1)
#   --verbose           print every run's load generator line as it ends
#
# Prints one table and exits 0; a contender that fails a run (a wrong byte, a
# dropped connection, no answer) shows FAIL in its cells and is listed under
# the table. Exits 2 on bad arguments or a missing build.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FULL=0
ROUNDS=""
WINDOW=""
SIZE=64
CONTENDERS_ARG=""
WORKLOADS_ARG=""
DO_SEPARATE=1
DO_SYSCALLS=1
CPUS="0,1"
VERBOSE=0
BUILD_ARG="build-release"

while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --seconds) WINDOW=${2:?}; shift ;;
    --contenders) CONTENDERS_ARG=${2:?}; shift ;;
    --workloads) WORKLOADS_ARG=${2:?}; shift ;;
    --size) SIZE=${2:?}; shift ;;
    --no-separate) DO_SEPARATE=0 ;;
    --no-syscalls) DO_SYSCALLS=0 ;;
    --cpus) CPUS=${2:?}; shift ;;
    --verbose) VERBOSE=1 ;;
    -h|--help) usage 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage ;;
    *) BUILD_ARG=$1 ;;
  esac
  shift
done

B=$(resolve_build_dir run.sh "$BUILD_ARG" "$ROOT") || exit 2
LOADGEN=$B/bench/loadgen
if [ ! -x "$LOADGEN" ]; then
  echo "run.sh: $LOADGEN is missing: build the 'loadgen' target (-DRINGPARK_BUILD_BENCH=ON)" >&2
  exit 2
fi
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$B/CMakeCache.txt" 2>/dev/null)

CPU_SERVER=${CPUS%%,*}
CPU_CLIENT=${CPUS##*,}

if [ "$FULL" = 1 ]; then
  : "${ROUNDS:=5}" "${WINDOW:=3}"
  WARMUP=0.5
  WORKLOADS="1x1 1x16 50x1 50x16 500x1 500x16"
  SEP_WORKLOADS="1x1 50x1 50x16 500x16"
  SYS_WORKLOADS="1x1 50x1 50x16 500x16"
else
  : "${ROUNDS:=3}" "${WINDOW:=1.5}"
  WARMUP=0.4
  WORKLOADS="1x1 50x1 50x16 500x16"
  SEP_WORKLOADS="50x16 500x16"
  SYS_WORKLOADS="1x1 50x1 50x16"
fi
if [ -n "$WORKLOADS_ARG" ]; then
  WORKLOADS=${WORKLOADS_ARG//,/ }
  SEP_WORKLOADS=$WORKLOADS
  SYS_WORKLOADS=$WORKLOADS
fi
for w in $WORKLOADS; do
  [[ $w =~ ^[0-9]+x[0-9]+$ ]] || { echo "run.sh: bad workload '$w' (want CONNSxDEPTH)" >&2; exit 2; }
done

ALL_CONTENDERS="uv uv_pool uv_rp uv_preload rp_echo rp_pool coro_echo epoll"
if [ -n "$CONTENDERS_ARG" ]; then
  WANTED="uv"
  for c in ${CONTENDERS_ARG//,/ }; do
    [[ " $ALL_CONTENDERS " == *" $c "* ]] || { echo "run.sh: unknown contender '$c'" >&2; exit 2; }
    [ "$c" = uv ] || WANTED="$WANTED $c"
  done
else
  WANTED=$ALL_CONTENDERS
fi

# ---- contenders -------------------------------------------------------------

# Sets CMD to the command line of contender $1 (port 0: the server picks one
# and prints "127.0.0.1:PORT"), or returns 1 when its binary is missing.
contender_cmd() {
  case "$1" in
    uv) CMD=("$B/bench/uv_echo_server") ;;
    uv_pool) CMD=("$B/bench/uv_echo_server" --pool) ;;
    uv_rp) CMD=("$B/bench/uv_echo_server" --rp) ;;
    uv_preload)
      [ -f "$B/libringpark-preload.so" ] || return 1
      CMD=(env "LD_PRELOAD=$B/libringpark-preload.so" "$B/bench/uv_echo_server") ;;
    rp_echo) CMD=("$B/samples/rp_echo" 0) ;;      # rp_echo [port]
    rp_pool) CMD=("$B/samples/rp_echo" --pool 0) ;;
    coro_echo) CMD=("$B/samples/coro_echo" 0) ;;  # coro_echo [port]
    epoll) CMD=("$B/bench/epoll_echo") ;;
    *) return 1 ;;
  esac
  local bin
  for bin in "${CMD[@]}"; do
    case "$bin" in "$B"/*) [ -x "$bin" ] || return 1 ;; esac
  done
  return 0
}

NOTES=()
CONTENDERS=""
for c in $WANTED; do
  if contender_cmd "$c"; then
    CONTENDERS="$CONTENDERS $c"
  else
    NOTES+=("$c skipped: its program (or the preload library) is not built in $B")
  fi
done
CONTENDERS=${CONTENDERS# }
if [[ " $CONTENDERS " != *" uv "* ]]; then
  echo "run.sh: the base contender uv ($B/bench/uv_echo_server) is missing" >&2
  exit 2
fi

# ---- processes ----------------------------------------------------------------

TMP=$(mktemp -d /tmp/ringpark-bench.XXXXXX)
CHILDREN=()
# Every server, perf and load generator (through its timeout) is a child
# listed here; at exit each gets SIGTERM, then SIGKILL.
trap cleanup_children EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT TERM

# Servers are stopped with SIGINT (every one prints its counters on it), then
# SIGTERM, then SIGKILL.
stop_server() { stop_process "$1" INT TERM KILL; }

# Starts contender $1 pinned to core $2; sets SERVER_PID, SERVER_PORT,
# SERVER_LOG. Returns 1 if it does not print its port within 5 s.
RUN_ID=0
start_server() {
  contender_cmd "$1" || return 1
  RUN_ID=$((RUN_ID + 1))
  SERVER_LOG=$TMP/server.$RUN_ID.log
  # env and taskset exec the server: $! is the server's own pid. A script's
  # background job inherits SIGINT ignored; the server gets it back at its
  # default, so SIGINT stops even a server that sets no handler.
  env --default-signal=INT taskset -c "$2" "${CMD[@]}" >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  CHILDREN+=("$SERVER_PID")
  SERVER_PORT=""
  local i
  for ((i = 0; i < 100; i++)); do
    SERVER_PORT=$(grep -o -m1 '127\.0\.0\.1:[0-9]\+' "$SERVER_LOG" 2>/dev/null | cut -d: -f2)
    [ -n "$SERVER_PORT" ] && return 0
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" 2>/dev/null
      local st=$?
      forget_child "$SERVER_PID"
      SERVER_EXIT="exited with status $st"
      [ "$st" -gt 128 ] && SERVER_EXIT="was killed by SIG$(kill -l $((st - 128)) 2>/dev/null)"
      return 1
    fi
    sleep 0.05
  done
  stop_server "$SERVER_PID"
  SERVER_EXIT="printed no 127.0.0.1:PORT within 5 s"
  return 1
}

# ---- perf ---------------------------------------------------------------------

PERF_OK=0
if [ "$DO_SYSCALLS" = 1 ]; then
  if ! command -v perf >/dev/null; then
    NOTES+=("syscalls not counted: no perf (apt-get install linux-perf)")
  elif ! perf stat -e raw_syscalls:sys_enter -x, -o "$TMP/perf.check" true >/dev/null 2>&1; then
    NOTES+=("syscalls not counted: 'perf stat -e raw_syscalls:sys_enter true' fails here ($(perf stat -e raw_syscalls:sys_enter true 2>&1 | grep -m1 -i -E 'error|denied|not' || echo 'see perf'))")
  else
    mkfifo "$TMP/check.ctl" "$TMP/check.ack"
    if perf stat -e raw_syscalls:sys_enter -x, --delay=-1 --control "fifo:$TMP/check.ctl,$TMP/check.ack" \
        -o "$TMP/perf.check" true >/dev/null 2>&1; then
      PERF_OK=1
    else
      NOTES+=("syscalls not counted: this perf lacks --delay=-1 --control fifo:, needed to count exactly the window")
    fi
  fi
fi

# ---- one run --------------------------------------------------------------------


# run_one PASS WORKLOAD CONTENDER: one fresh server, one load generator run.
# Appends the figures to the result tables; returns 1 on a failed run.
declare -A TPUT P50 P99 EFF SYS RPE FAILS
run_one() {
  local pass=$1 wl=$2 c=$3 key="$2|$3"
  local conns=${wl%x*} depth=${wl#*x}
  local lg_cpu=$CPU_SERVER extra=() perf_pid=""
  [ "$pass" = separate ] && lg_cpu=$CPU_CLIENT
  if ! start_server "$c" "$CPU_SERVER"; then
    FAILS[$key]+=" $pass:no-port"
    NOTES+=("$c ($wl, $pass): the server did not start: it $SERVER_EXIT; $(tail -n 2 "$SERVER_LOG" 2>/dev/null | tr '\n' ' ')")
    return 1
  fi
  [ "$pass" = separate ] && extra+=(--server-pid "$SERVER_PID")
  if [ "$pass" = syscalls ]; then
    rm -f "$TMP/ctl" "$TMP/ack" && mkfifo "$TMP/ctl" "$TMP/ack"
    # perf itself stays off the server's core; its counters are enabled by the
    # load generator for the window only.
    taskset -c "$CPU_CLIENT" perf stat -e raw_syscalls:sys_enter -x, --delay=-1 \
      --control "fifo:$TMP/ctl,$TMP/ack" -p "$SERVER_PID" -o "$TMP/perf.out" >/dev/null 2>&1 &
    perf_pid=$!
    CHILDREN+=("$perf_pid")
    extra+=(--perf-ctl "$TMP/ctl" --perf-ack "$TMP/ack")
    sleep 0.2  # perf opens the FIFOs; the load generator waits for its acks
  fi
  local budget out rc lg_pid
  budget=$(awk -v w="$WINDOW" -v u="$WARMUP" -v n="$conns" 'BEGIN { printf "%d", w + u + 20 + n / 50 }')
  # In the background and waited for, so that a signal to this script is
  # handled at once (the trap stops everything) rather than after the run.
  timeout -k 2 "$budget" taskset -c "$lg_cpu" "$LOADGEN" --port "$SERVER_PORT" \
    --conns "$conns" --depth "$depth" --size "$SIZE" --seconds "$WINDOW" --warmup "$WARMUP" \
    "${extra[@]}" >"$TMP/loadgen.out" 2>"$TMP/loadgen.err" &
  lg_pid=$!
  CHILDREN+=("$lg_pid")
  wait "$lg_pid"
  rc=$?
  forget_child "$lg_pid"
  out=$(cat "$TMP/loadgen.out")
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null
    wait "$perf_pid" 2>/dev/null
    forget_child "$perf_pid"
  fi
  stop_server "$SERVER_PID" ||
    NOTES+=("$c ($wl, $pass): the server did not exit within 2 s of SIGINT")
  if [ $rc -ne 0 ]; then
    FAILS[$key]+=" $pass"
    local why
    why=$(grep -m1 -v warning "$TMP/loadgen.err" | cut -c1-160)
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why="no result within ${budget} s; $why"
    NOTES+=("$c ($wl, $pass): FAILED (exit $rc): $why")
    return 1
  fi
  grep -q warning "$TMP/loadgen.err" && NOTES+=("$c ($wl, $pass): $(grep -m1 warning "$TMP/loadgen.err")")
  [ "$VERBOSE" = 1 ] && printf '\n    %s %s %s: %s' "$pass" "$wl" "$c" "$out" >&2
  local msgs total
  msgs=$(kv msgs "$out")
  total=$(kv total_msgs "$out")
  case "$pass" in
    same)
      TPUT[$key]+=" $(kv msgs_per_s "$out")"
      P50[$key]+=" $(kv p50_us "$out")"
      P99[$key]+=" $(kv p99_us "$out")"
      # io_uring_enter calls per message from the server's own counters
      # ("enters=N" or "enters N"), over its life.
      local enters
      enters=$(grep -o -m1 'enters[=: ]*[0-9]\+' "$SERVER_LOG" | grep -o '[0-9]\+$')
      [ -n "$enters" ] && RPE[$key]+=" $(awk -v e="$enters" -v t="$total" 'BEGIN { printf "%.4f", e / t }')"
      ;;
    separate)
      EFF[$key]+=" $(kv server_msgs_per_cpu_s "$out")"
      ;;
    syscalls)
      local count
      count=$(perf_syscalls "$TMP/perf.out")
      if [ -n "$count" ] && [ "$msgs" -gt 0 ]; then
        SYS[$key]+=" $(awk -v s="$count" -v m="$msgs" 'BEGIN { printf "%.4f", s / m }')"
      else
        NOTES+=("$c ($wl): perf gave no count: $(perf_output "$TMP/perf.out")")
      fi
      ;;
  esac
  return 0
}

# run_pass PASS "WORKLOADS" ROUNDS: rounds outermost, contenders interleaved,
# the order rotated by one each round.
run_pass() {
  local pass=$1 wls=$2 rounds=$3 r wl i n
  local -a cs=($CONTENDERS)
  n=${#cs[@]}
  for ((r = 0; r < rounds; r++)); do
    for wl in $wls; do
      printf '  %-9s round %d/%d  %-7s' "$pass" $((r + 1)) "$rounds" "$wl" >&2
      for ((i = 0; i < n; i++)); do
        local c=${cs[$(((i + r) % n))]}
        printf ' %s' "$c" >&2
        run_one "$pass" "$wl" "$c" || printf '(FAIL)' >&2
      done
      printf '\n' >&2
    done
  done
}

# ---- statistics and the table ------------------------------------------------------


# ---- main ---------------------------------------------------------------------------

count_runs() { local n=0 w; for w in $1; do n=$((n + 1)); done; echo $((n * $2)); }
n_contenders=$(wc -w <<<"$CONTENDERS")
runs=$(( $(count_runs "$WORKLOADS" "$ROUNDS") * n_contenders ))
[ "$DO_SEPARATE" = 1 ] && runs=$((runs + $(count_runs "$SEP_WORKLOADS" "$ROUNDS") * n_contenders))
[ "$PERF_OK" = 1 ] && runs=$((runs + $(count_runs "$SYS_WORKLOADS" 1) * n_contenders))
est=$(awk -v r="$runs" -v w="$WINDOW" -v u="$WARMUP" 'BEGIN { printf "%d", r * (w + u + 0.6) }')
echo "ringpark echo benchmark: $([ "$FULL" = 1 ] && echo full || echo short), $runs runs, about ${est} s" >&2
echo "  contenders: $CONTENDERS" >&2

# What was measured: the source tree now, and when the library was built.
rev=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')
built=$(date -u -r "$B/libringpark.so" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo '?')
started=$(date -u '+%Y-%m-%d %H:%M UTC')

run_pass same "$WORKLOADS" "$ROUNDS"
[ "$DO_SEPARATE" = 1 ] && run_pass separate "$SEP_WORKLOADS" "$ROUNDS"
[ "$PERF_OK" = 1 ] && run_pass syscalls "$SYS_WORKLOADS" 1

model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
libuv_v=$(pkg-config --modversion libuv 2>/dev/null || echo '?')
liburing_v=$(pkg-config --modversion liburing 2>/dev/null || echo '?')
echo
echo "TCP echo, ${SIZE}-byte messages, 127.0.0.1; $([ "$FULL" = 1 ] && echo full || echo short) run: $ROUNDS rounds x ${WINDOW} s windows (+${WARMUP} s warm-up), contenders interleaved"
echo "machine: $(nproc) cpus, $model, kernel $(uname -r), libuv $libuv_v, liburing $liburing_v, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "ringpark: tree $rev at the start ($started), ${build_type:-?} build of $built in $B"
echo "same core: server and loadgen on cpu $CPU_SERVER (median [min-max] msgs/s, ratio to uv; latency medians)."
echo "separate: server on cpu $CPU_SERVER, loadgen on cpu $CPU_CLIENT; efficiency = msgs per second of server CPU (/proc/PID/stat)."
echo "sys/msg: server syscalls per echoed message (perf raw_syscalls:sys_enter, same core, one run); enters/msg: rp_stats io_uring_enter per message."
echo
{
  printf 'workload\tcontender\tmsgs/s\t[min-max]\tx uv\tp50 us\tp99 us\tsep eff\tx uv\tsys/msg\tx uv\tenters/msg\n'
  for wl in $WORKLOADS; do
    read -r base_t _ _ <<<"$(stats "${TPUT[$wl|uv]:-}")"
    read -r base_e _ _ <<<"$(stats "${EFF[$wl|uv]:-}")"
    read -r base_s _ _ <<<"$(stats "${SYS[$wl|uv]:-}")"
    for c in $CONTENDERS; do
      k="$wl|$c"
      read -r t tmin tmax <<<"$(stats "${TPUT[$k]:-}")"
      read -r p50 _ _ <<<"$(stats "${P50[$k]:-}")"
      read -r p99 _ _ <<<"$(stats "${P99[$k]:-}")"
      read -r e _ _ <<<"$(stats "${EFF[$k]:-}")"
      read -r s _ _ <<<"$(stats "${SYS[$k]:-}")"
      read -r en _ _ <<<"$(stats "${RPE[$k]:-}")"
      range="[$(human "$tmin")-$(human "$tmax")]"
      [ "$tmin" = - ] && range="-"
      tcell=$(human "$t")
      fails=${FAILS[$k]:-}
      fails=${fails# }
      [ -n "$fails" ] && tcell="$tcell FAIL(${fails// /,})"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$c" "$tcell" "$range" \
        "$(ratio "$t" "$base_t")" "$(fixed "$p50" 1)" "$(fixed "$p99" 1)" "$(human "$e")" \
        "$(ratio "$e" "$base_e")" "$(fixed "$s" 3)" "$(ratio "$s" "$base_s")" "$(fixed "$en" 3)"
    done
  done
} | align
echo
if [ "${#NOTES[@]}" -gt 0 ]; then
  echo "notes:"
  printf '  - %s\n' "${NOTES[@]}"
fi
exit 0
