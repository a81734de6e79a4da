#!/usr/bin/env bash
# The HTTP plaintext benchmark of issue 4: samples/http_hello on ringpark's
# rp_tcp_t and the same program on plain libuv, with nginx as the reference a
# user would otherwise pick, all measured with wrk on 127.0.0.1.
#
#   bench/http/run.sh [--full] [options] [BUILD_DIR]
#
# BUILD_DIR (default build-release, relative to the current directory or to the
# repository) must already hold a Release build with http_hello in it
# (bench/http/ or samples/); this script builds nothing. wrk and nginx are
# Debian packages; when missing they are installed with apt-get (as root),
# else the script says how and exits 2 (nginx alone may be missing: it is then
# left out, with a note).
#
# Workloads, each a wrk run of C connections (default 50) and one thread:
#   plain   one request per write (wrk as it is);
#   pipe16  16 requests per write (wrk -s pipeline.lua: 16 requests built once
#           into one string; wrk counts every response).
# Contenders:
#   uv      http_hello --uv            uv_tcp_t on uv_run (the base of every ratio)
#   rp      http_hello                 rp_tcp_t on rp_uv_run
#   nginx   nginx, one process (master_process off), return 200 "Hello, World!",
#           access_log off, keepalive_requests unbounded; its answers carry
#           three headers more (Server, Date, Connection), 154 bytes to 84
#   uv_rp   http_hello --uv --rp-run   uv_tcp_t under rp_uv_run (not by default)
#   uv_preload  http_hello --uv under LD_PRELOAD=libringpark-preload.so: the
#           unchanged libuv server, its streams adopted (not by default)
# Passes, each run on a fresh server, bounded in time (timeout(1) on wrk, and
# every process killed on exit):
#  1. same core: server and wrk pinned to one core (taskset), which ranks
#     servers by throughput on a 2-core VM (see issue 4); requests/s, wrk's
#     p50/p99 latency, and the server's efficiency, requests per second of
#     server CPU time (utime + stime from /proc/PID/stat around the wrk run);
#  2. separate cores (--full or --separate): server on one core, wrk on the
#     other; requests/s and efficiency;
#  3. syscalls (one round): same core, the kernel's count of the server's
#     syscalls while wrk runs (perf stat -e raw_syscalls:sys_enter -p PID, perf
#     on the other core) per request that wrk counted.
# ringpark contenders print rp_stats when stopped; "enters/req" is their
# io_uring_enter calls per request they answered (pass 1, whole server life).
# Contenders run interleaved (A B C A B C ..., the order rotated each round),
# rounds outermost; medians and min-max are printed, and ratios to uv.
#
# Options:
#   --full              5 rounds of 5 s windows and the separate-cores pass
#                       (default: 3 rounds of 1 s, about 30 s in all)
#   --rounds N          rounds per pass
#   --seconds S         wrk duration per run (whole seconds)
#   --conns C           wrk connections (default 50)
#   --contenders a,b    a subset of: uv rp nginx uv_rp uv_preload ("uv" is always added)
#   --separate          add pass 2;  --no-syscalls  skip pass 3
#   --cpus A,B          the two cores to use (default 0,1)
#
# Prints one table and exits 0; a failed run (no port, wrk socket errors or
# non-2xx answers, a timeout) shows FAIL in its cells and a note under the
# table. Exits 2 on bad arguments or a missing build.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FULL=0
ROUNDS=""
WINDOW=""
CONNS=50
DEPTH=16
CONTENDERS_ARG=""
DO_SEPARATE=""
DO_SYSCALLS=1
CPUS="0,1"
BUILD_ARG="build-release"

while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --seconds) WINDOW=${2:?}; shift ;;
    --conns) CONNS=${2:?}; shift ;;
    --contenders) CONTENDERS_ARG=${2:?}; shift ;;
    --separate) DO_SEPARATE=1 ;;
    --no-syscalls) DO_SYSCALLS=0 ;;
    --cpus) CPUS=${2:?}; shift ;;
    -h|--help) usage ;;
    -*) echo "http/run.sh: unknown option $1" >&2; usage ;;
    *) BUILD_ARG=$1 ;;
  esac
  shift
done

B=$(resolve_build_dir http/run.sh "$BUILD_ARG" "$ROOT") || exit 2
HELLO=""
for f in "$B/bench/http/http_hello" "$B/samples/http_hello"; do
  [ -x "$f" ] && { HELLO=$f; break; }
done
if [ -z "$HELLO" ]; then
  echo "http/run.sh: no http_hello in $B/bench/http or $B/samples: build the 'http_hello' target" >&2
  exit 2
fi
PRELOAD_LIB=$B/libringpark-preload.so
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$B/CMakeCache.txt" 2>/dev/null)

if [ "$FULL" = 1 ]; then
  : "${ROUNDS:=5}" "${WINDOW:=5}" "${DO_SEPARATE:=1}"
else
  : "${ROUNDS:=3}" "${WINDOW:=1}" "${DO_SEPARATE:=0}"
fi
[[ $WINDOW =~ ^[1-9][0-9]*$ ]] || { echo "http/run.sh: --seconds takes whole seconds (wrk's -d)" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $CONNS =~ ^[1-9][0-9]*$ ]] || { echo "http/run.sh: bad --rounds or --conns" >&2; exit 2; }
CPU_SERVER=${CPUS%%,*}
CPU_CLIENT=${CPUS##*,}
WORKLOADS="plain pipe$DEPTH"

NOTES=()

# ---- tools ------------------------------------------------------------------

# Installs Debian package $2 for command $1 when missing and we are root.
need() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "http/run.sh: installing $2 (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; }
  fi
  command -v "$1" >/dev/null
}
if ! need wrk wrk; then
  echo "http/run.sh: wrk is missing: apt-get install wrk" >&2
  exit 2
fi
NGINX=""
if need nginx nginx || [ -x /usr/sbin/nginx ]; then
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi

ALL_CONTENDERS="uv rp nginx uv_rp uv_preload"
if [ -n "$CONTENDERS_ARG" ]; then
  WANTED="uv"
  for c in ${CONTENDERS_ARG//,/ }; do
    [[ " $ALL_CONTENDERS " == *" $c "* ]] || { echo "http/run.sh: unknown contender '$c'" >&2; exit 2; }
    [ "$c" = uv ] || WANTED="$WANTED $c"
  done
else
  WANTED="uv rp nginx"
fi
CONTENDERS=""
for c in $WANTED; do
  if [ "$c" = nginx ] && [ -z "$NGINX" ]; then
    NOTES+=("nginx skipped: not installed (apt-get install nginx)")
    continue
  fi
  CONTENDERS="$CONTENDERS $c"
done
CONTENDERS=${CONTENDERS# }

# ---- processes ----------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ringpark-http.XXXXXX")
CHILDREN=()
# Every process that may run long (servers, perf, wrk under timeout(1)) is a
# tracked background child: SIGTERM first (timeout passes it on to wrk; the
# servers exit on it), SIGKILL after 3 s.
trap cleanup_children EXIT
trap 'echo "http/run.sh: interrupted" >&2; exit 130' INT TERM

# A TCP port nobody listens on (nginx needs one in its config; a race with
# another program is caught by the retry in start_nginx).
free_port() {
  local p used
  used=$(ss -Htln 2>/dev/null | awk '{ n = split($4, a, ":"); print a[n] }')
  for ((;;)); do
    p=$((20000 + RANDOM % 40000))
    grep -qx "$p" <<<"$used" || { echo "$p"; return; }
  done
}

listening() {  # is 127.0.0.1:$1 accepting?
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# nginx, one process, in its own directory under $TMP.
start_nginx() {
  local dir=$TMP/nginx.$RUN_ID attempt i
  mkdir -p "$dir"
  for attempt in 1 2 3 4 5; do
    SERVER_PORT=$(free_port)
    cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  server_tokens off;
  default_type text/plain;
  keepalive_requests 1000000000;
  keepalive_timeout 60s;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  server {
    listen 127.0.0.1:$SERVER_PORT;
    location / { return 200 "Hello, World!"; }
  }
}
EOF
    taskset -c "$2" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    CHILDREN+=("$SERVER_PID")
    for ((i = 0; i < 100; i++)); do
      listening "$SERVER_PORT" && return 0
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.05
    done
    cat "$dir/error.log" >>"$SERVER_LOG" 2>/dev/null
    stop_process "$SERVER_PID" TERM KILL
    grep -q 'in use' "$SERVER_LOG" || return 1
  done
  return 1
}

# Starts contender $1 pinned to core $2; sets SERVER_PID, SERVER_PORT,
# SERVER_LOG. Returns 1 if it does not listen within 5 s.
RUN_ID=0
start_server() {
  local c=$1 cpu=$2 i
  RUN_ID=$((RUN_ID + 1))
  SERVER_LOG=$TMP/server.$RUN_ID.log
  [ "$c" = nginx ] && { start_nginx "$c" "$cpu"; return; }
  local args=() preload=""
  case "$c" in
    uv) args=(--uv) ;;
    uv_rp) args=(--uv --rp-run) ;;
    uv_preload) args=(--uv) preload=$PRELOAD_LIB ;;
  esac
  # env and taskset exec the server: $! is its own pid. A script's background
  # job starts with SIGINT ignored; the server gets it back at its default.
  env --default-signal=INT ${preload:+LD_PRELOAD=$preload} taskset -c "$cpu" "$HELLO" "${args[@]}" 0 \
    >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  CHILDREN+=("$SERVER_PID")
  SERVER_PORT=""
  for ((i = 0; i < 100; i++)); do
    SERVER_PORT=$(grep -o -m1 '127\.0\.0\.1:[0-9]\+' "$SERVER_LOG" 2>/dev/null | cut -d: -f2)
    [ -n "$SERVER_PORT" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.05
  done
  stop_process "$SERVER_PID" INT KILL
  return 1
}

stop_server() {  # $1 contender
  # http_hello prints its counters on SIGINT; nginx stops at once on SIGTERM.
  if [ "$1" = nginx ]; then stop_process "$SERVER_PID" TERM KILL; else stop_process "$SERVER_PID" INT KILL; fi
}

# utime + stime of process $1 in clock ticks
cpu_ticks() {
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null
}
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)

# ---- perf ---------------------------------------------------------------------

PERF_OK=0
if [ "$DO_SYSCALLS" = 1 ]; then
  if ! command -v perf >/dev/null; then
    NOTES+=("syscalls not counted: no perf (apt-get install linux-perf)")
  elif ! perf stat -e raw_syscalls:sys_enter -x, -o "$TMP/perf.check" true >/dev/null 2>&1; then
    NOTES+=("syscalls not counted: 'perf stat -e raw_syscalls:sys_enter true' fails here ($(perf stat -e raw_syscalls:sys_enter true 2>&1 | grep -m1 -i -E 'error|denied|not' || echo 'see perf'))")
  else
    PERF_OK=1
  fi
fi

# ---- one run --------------------------------------------------------------------

# wrk's latency line "50%  1.23ms" -> microseconds
wrk_latency_us() {
  awk -v q="$1" '$1 == q {
      v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
      f = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : -1
      # wrk prints 0.00us for a percentile it has no sample for (seen with pipelining)
      if (f > 0 && v + 0 > 0) printf "%.1f\n", v * f; exit }' "$2"
}

# run_one PASS WORKLOAD CONTENDER: one fresh server, one wrk run. Appends the
# figures to the result tables; returns 1 on a failed run.
declare -A TPUT P50 P99 EFF SEPT SEPE SYS RPE FAILS
run_one() {
  local pass=$1 wl=$2 c=$3 key="$2|$3"
  local wrk_cpu=$CPU_SERVER perf_pid="" script=()
  [ "$pass" = separate ] && wrk_cpu=$CPU_CLIENT
  [ "$wl" != plain ] && script=(-s "$HERE/pipeline.lua")
  if ! start_server "$c" "$CPU_SERVER"; then
    FAILS[$key]+=" $pass:no-port"
    NOTES+=("$c ($wl, $pass): the server did not start: $(tail -n 2 "$SERVER_LOG" 2>/dev/null | tr '\n' ' ')")
    return 1
  fi
  if [ "$pass" = syscalls ]; then
    # perf stays off the server's core; it counts while wrk runs.
    taskset -c "$CPU_CLIENT" perf stat -e raw_syscalls:sys_enter -x, -p "$SERVER_PID" \
      -o "$TMP/perf.out" >/dev/null 2>&1 &
    perf_pid=$!
    CHILDREN+=("$perf_pid")
    sleep 0.2  # perf attaches
  fi
  local t0 t1 rc
  t0=$(cpu_ticks "$SERVER_PID")
  timeout -k 2 $((WINDOW + 10)) taskset -c "$wrk_cpu" wrk -t 1 -c "$CONNS" -d "${WINDOW}s" \
    --latency "${script[@]}" "http://127.0.0.1:$SERVER_PORT/" \
    >"$TMP/wrk.out" 2>&1 &
  local wrk_pid=$!
  CHILDREN+=("$wrk_pid")
  wait "$wrk_pid"
  rc=$?
  forget_child "$wrk_pid"
  t1=$(cpu_ticks "$SERVER_PID")
  # perf writes its count on SIGINT.
  [ -n "$perf_pid" ] && stop_process "$perf_pid" INT KILL
  stop_server "$c" || NOTES+=("$c ($wl, $pass): the server did not stop within 2 s")
  local rps reqs errs non2xx
  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$TMP/wrk.out")
  reqs=$(awk '/ requests in / { print $1 }' "$TMP/wrk.out")
  errs=$(sed -n 's/.*Socket errors: \(.*\)/\1/p' "$TMP/wrk.out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $NF }' "$TMP/wrk.out")
  if [ $rc -ne 0 ] || [ -z "$rps" ] || [ -n "$non2xx" ] || [ -n "$errs" ]; then
    FAILS[$key]+=" $pass"
    NOTES+=("$c ($wl, $pass): FAILED (wrk exit $rc${errs:+; socket errors: $errs}${non2xx:+; $non2xx non-2xx answers}): $(grep -m1 -i -E 'error|unable|timeout' "$TMP/wrk.out" | cut -c1-120)")
    return 1
  fi
  local eff="-"
  if [ -n "$t0" ] && [ -n "$t1" ] && [ "$t1" -gt "$t0" ]; then
    eff=$(awk -v r="$reqs" -v t=$((t1 - t0)) -v hz="$HZ" 'BEGIN { printf "%.0f", r / (t / hz) }')
  fi
  case "$pass" in
    same)
      TPUT[$key]+=" $rps"
      P50[$key]+=" $(wrk_latency_us 50% "$TMP/wrk.out")"
      P99[$key]+=" $(wrk_latency_us 99% "$TMP/wrk.out")"
      [ "$eff" != - ] && EFF[$key]+=" $eff"
      # io_uring_enter calls per request from the server's own counters.
      local enters served
      enters=$(grep -o -m1 'enters [0-9]\+' "$SERVER_LOG" | grep -o '[0-9]\+$')
      served=$(grep -o -m1 'requests [0-9]\+' "$SERVER_LOG" | grep -o '[0-9]\+$')
      [ -n "$enters" ] && [ "${served:-0}" -gt 0 ] &&
        RPE[$key]+=" $(awk -v e="$enters" -v n="$served" 'BEGIN { printf "%.4f", e / n }')"
      ;;
    separate)
      SEPT[$key]+=" $rps"
      [ "$eff" != - ] && SEPE[$key]+=" $eff"
      ;;
    syscalls)
      local count
      count=$(perf_syscalls "$TMP/perf.out")
      if [ -n "$count" ] && [ "${reqs:-0}" -gt 0 ]; then
        SYS[$key]+=" $(awk -v s="$count" -v m="$reqs" 'BEGIN { printf "%.4f", s / m }')"
      else
        NOTES+=("$c ($wl): perf gave no count: $(perf_output "$TMP/perf.out")")
      fi
      ;;
  esac
  return 0
}

# run_pass PASS ROUNDS: rounds outermost, contenders interleaved, the order
# rotated by one each round.
run_pass() {
  local pass=$1 rounds=$2 r wl i n
  local -a cs=($CONTENDERS)
  n=${#cs[@]}
  for ((r = 0; r < rounds; r++)); do
    for wl in $WORKLOADS; do
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

n_contenders=$(wc -w <<<"$CONTENDERS")
n_wl=$(wc -w <<<"$WORKLOADS")
runs=$((ROUNDS * n_wl * n_contenders))
[ "$DO_SEPARATE" = 1 ] && runs=$((runs * 2))
[ "$PERF_OK" = 1 ] && runs=$((runs + n_wl * n_contenders))
echo "ringpark HTTP benchmark: $([ "$FULL" = 1 ] && echo full || echo short), $runs runs, about $((runs * (WINDOW * 10 + 3) / 10)) s" >&2
echo "  contenders: $CONTENDERS; $HELLO" >&2

run_pass same "$ROUNDS"
[ "$DO_SEPARATE" = 1 ] && run_pass separate "$ROUNDS"
[ "$PERF_OK" = 1 ] && run_pass syscalls 1

model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
libuv_v=$(pkg-config --modversion libuv 2>/dev/null || echo '?')
nginx_v=$("${NGINX:-nginx}" -v 2>&1 | sed -n 's|.*nginx/||p')
wrk_v=$(wrk -v 2>&1 | sed -n '1s/^wrk \([^ ]*\).*/\1/p')
rev=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')
backend=$(grep -h -o -m1 'listening on [^ ]* (.*)' "$TMP"/server.*.log 2>/dev/null | grep -v 'uv_run\|under' | head -n 1 | sed 's/.*(\(.*\))/\1/')
echo
echo "HTTP plaintext (\"Hello, World!\", keep-alive), wrk -t 1 -c $CONNS, 127.0.0.1; $([ "$FULL" = 1 ] && echo full || echo short) run: $ROUNDS rounds x ${WINDOW} s, contenders interleaved"
echo "machine: $(nproc) cpus, $model, kernel $(uname -r), libuv $libuv_v, nginx ${nginx_v:-?}, wrk ${wrk_v:-?}, ringpark $rev (${build_type:-?} build, backend ${backend:-?}), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "same core: server and wrk on cpu $CPU_SERVER (median [min-max] requests/s, ratio to uv; wrk's latency medians); eff = requests per second of server CPU (/proc/PID/stat)."
[ "$DO_SEPARATE" = 1 ] && echo "separate: server on cpu $CPU_SERVER, wrk on cpu $CPU_CLIENT."
echo "sys/req: server syscalls per request (perf raw_syscalls:sys_enter while wrk runs, same core, one run); enters/req: rp_stats io_uring_enter per request."
echo
{
  hdr='workload\tcontender\treq/s\t[min-max]\tx uv\tp50 us\tp99 us\teff\tx uv'
  [ "$DO_SEPARATE" = 1 ] && hdr+='\tsep req/s\tx uv\tsep eff\tx uv'
  hdr+='\tsys/req\tenters/req\n'
  printf "$hdr"
  for wl in $WORKLOADS; do
    read -r base_t _ _ <<<"$(stats "${TPUT[$wl|uv]:-}")"
    read -r base_e _ _ <<<"$(stats "${EFF[$wl|uv]:-}")"
    read -r base_st _ _ <<<"$(stats "${SEPT[$wl|uv]:-}")"
    read -r base_se _ _ <<<"$(stats "${SEPE[$wl|uv]:-}")"
    for c in $CONTENDERS; do
      k="$wl|$c"
      read -r t tmin tmax <<<"$(stats "${TPUT[$k]:-}")"
      read -r p50 _ _ <<<"$(stats "${P50[$k]:-}")"
      read -r p99 _ _ <<<"$(stats "${P99[$k]:-}")"
      read -r e _ _ <<<"$(stats "${EFF[$k]:-}")"
      read -r st _ _ <<<"$(stats "${SEPT[$k]:-}")"
      read -r se _ _ <<<"$(stats "${SEPE[$k]:-}")"
      read -r s _ _ <<<"$(stats "${SYS[$k]:-}")"
      read -r en _ _ <<<"$(stats "${RPE[$k]:-}")"
      range="[$(human "$tmin")-$(human "$tmax")]"
      [ "$tmin" = - ] && range="-"
      tcell=$(human "$t")
      [ -n "${FAILS[$k]:-}" ] && tcell="$tcell FAIL:${FAILS[$k]// /,}"
      row="$wl\t$c\t$tcell\t$range\t$(ratio "$t" "$base_t")\t$(fixed "$p50" 0)\t$(fixed "$p99" 0)\t$(human "$e")\t$(ratio "$e" "$base_e")"
      [ "$DO_SEPARATE" = 1 ] && row+="\t$(human "$st")\t$(ratio "$st" "$base_st")\t$(human "$se")\t$(ratio "$se" "$base_se")"
      row+="\t$(fixed "$s" 3)\t$(fixed "$en" 3)"
      printf '%b\n' "$row"
    done
  done
} | align
echo
if [[ " $CONTENDERS " == *" nginx "* ]]; then
  NOTES+=("nginx answers each pipelined request with its own writev (16 per batch, seen with strace), while http_hello answers all requests of one read with one write; nginx's answers are 154 bytes, http_hello's 84")
fi
if [ "${#NOTES[@]}" -gt 0 ]; then
  echo "notes:"
  printf '  - %s\n' "${NOTES[@]}"
fi
exit 0
