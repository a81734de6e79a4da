#!/usr/bin/env bash
# The file benchmark of issue 4: 4 KiB random reads of a 1 GiB file at queue
# depth 1, 32 and 128, from the page cache and with O_DIRECT, on one core:
# uv_fs_read on libuv's thread pool (its 4 threads on that same core) against
# rp_fs_read through the ring, from one program (bench/files/fsbench), with
# fio's io_uring engine as the ceiling.
#
#   bench/files/run.sh [--full] [options] [BUILD_DIR]
#
# BUILD_DIR (default build-release, relative to the current directory or to the
# repository) must already hold a Release build with bench/files/fsbench; this
# script builds nothing. fio is a Debian package, installed with apt-get when
# missing (as root); without it the fio rows are left out, with a note.
#
# The test file, FILE=DIR/file-1g, is made once (real data, fsync'd) and kept
# for later runs; DIR is --dir, default ${TMPDIR:-/tmp}/ringpark-bench. The
# page cache is warmed (the file read once) before each round's cached runs and
# its residency checked with fincore. When the file system refuses O_DIRECT
# (EINVAL, as tmpfs and some overlays do) the O_DIRECT rows say so instead.
#
# Contenders, each pinned to one core (taskset; default cpu 0):
#   uv    fsbench --mode uv: uv_fs_read, uv_run (the base of every ratio)
#   rp    fsbench --mode rp: rp_fs_read, rp_uv_run
#   fio   fio --ioengine=io_uring --rw=randread --bs=4k --iodepth=QD
#         --direct=0|1 --invalidate=0 --time_based --cpus_allowed=CPU --thread
#         --norandommap --randrepeat=0 (one round in the short run); with these
#         settings fio submits each read with its own io_uring_enter
#   fio_b the same with --iodepth_batch_submit=QD --iodepth_batch_complete_max=QD,
#         so that fio batches as ringpark does
# The ceiling ("x fio") is the better of fio and fio_b for each row.
# Each run keeps QD reads in flight for a fixed time after a short warm-up and
# reports IOPS, and IOPS per second of the process's CPU time (all threads).
# Contenders run interleaved (the order rotated each round), rounds outermost;
# medians and min-max are printed, with ratios to uv and to fio.
# A syscalls pass (one round; QD 32 only in the short run) counts each
# process's syscalls over its whole run with perf stat -e raw_syscalls:sys_enter
# (perf on another core) per read, warm-up and start-up included; for rp,
# "enters/op" is rp_stats' io_uring_enter calls per read in the window.
#
# Options:
#   --full            5 rounds of 3 s windows, fio every round, syscalls at
#                     every QD (default: 3 rounds of 0.3 s, about 30 s)
#   --rounds N        rounds;  --seconds S  window per run (may be fractional)
#   --qds 1,32,128    queue depths
#   --dir DIR         where the 1 GiB file lives
#   --cpu N           the core (default 0); perf uses another one
#   --no-cached  --no-direct  --no-fio  --no-syscalls
#
# Prints one table and exits 0; a failed run shows FAIL in its cells and a note
# under the table. Exits 2 on bad arguments, a missing build, or no room for the
# file.
set -uo pipefail
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FULL=0
ROUNDS=""
WINDOW=""
QDS="1 32 128"
DIR="${TMPDIR:-/tmp}/ringpark-bench"
CPU=0
DO_CACHED=1
DO_DIRECT=1
DO_FIO=1
DO_SYSCALLS=1
BUILD_ARG="build-release"

while [ $# -gt 0 ]; do
  case "$1" in
    --full) FULL=1 ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    --seconds) WINDOW=${2:?}; shift ;;
    --qds) QDS=${2:?}; QDS=${QDS//,/ }; shift ;;
    --dir) DIR=${2:?}; shift ;;
    --cpu) CPU=${2:?}; shift ;;
    --no-cached) DO_CACHED=0 ;;
    --no-direct) DO_DIRECT=0 ;;
    --no-fio) DO_FIO=0 ;;
    --no-syscalls) DO_SYSCALLS=0 ;;
    -h|--help) usage ;;
    -*) echo "files/run.sh: unknown option $1" >&2; usage ;;
    *) BUILD_ARG=$1 ;;
  esac
  shift
done

B=$(resolve_build_dir files/run.sh "$BUILD_ARG" "$ROOT") || exit 2
FSBENCH=$B/bench/files/fsbench
if [ ! -x "$FSBENCH" ]; then
  echo "files/run.sh: $FSBENCH is missing: build the 'fsbench' target" >&2
  exit 2
fi
build_type=$(sed -n 's/^CMAKE_BUILD_TYPE:[A-Z]*=//p' "$B/CMakeCache.txt" 2>/dev/null)

if [ "$FULL" = 1 ]; then
  : "${ROUNDS:=5}" "${WINDOW:=3}"
  WARMUP=0.5
  FIO_ROUNDS=$ROUNDS
  SYS_QDS=$QDS
else
  : "${ROUNDS:=3}" "${WINDOW:=0.3}"
  WARMUP=0.15
  FIO_ROUNDS=1
  SYS_QDS=32
  [[ " $QDS " == *" 32 "* ]] || SYS_QDS=${QDS%% *}
fi
for q in $QDS; do [[ $q =~ ^[1-9][0-9]*$ ]] || { echo "files/run.sh: bad queue depth '$q'" >&2; exit 2; }; done
awk -v w="$WINDOW" 'BEGIN { exit !(w > 0) }' || { echo "files/run.sh: bad --seconds" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "files/run.sh: bad --rounds" >&2; exit 2; }
OTHER_CPU=$(awk -v c="$CPU" -v n="$(nproc)" 'BEGIN { print (n > 1) ? (c + 1) % n : c }')

NOTES=()

if [ "$DO_FIO" = 1 ] && ! command -v fio >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "files/run.sh: installing fio (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null 2>&1; }
  fi
  command -v fio >/dev/null || { DO_FIO=0; NOTES+=("fio skipped: not installed (apt-get install fio)"); }
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ringpark-files.XXXXXX")
CHILDREN=()
# Every process that may run long is a tracked background child: SIGTERM
# first (timeout(1) passes it on to its command), SIGKILL after 3 s.
trap cleanup_children EXIT
trap 'echo "files/run.sh: interrupted" >&2; exit 130' INT TERM

# bounded OUT CMD...: runs CMD with stdout to OUT and stderr to $TMP/err, in
# the background (so that the EXIT trap can stop it), bounded by $LIMIT
# seconds; waits for it and returns its status.
bounded() {
  local out=$1
  shift
  timeout -k 2 "$LIMIT" "$@" >"$out" 2>"$TMP/err" &
  local pid=$! rc
  CHILDREN+=("$pid")
  wait "$pid"
  rc=$?
  forget_child "$pid"
  return $rc
}
LIMIT=$(awk -v w="$WINDOW" -v u="$WARMUP" 'BEGIN { printf "%d", w + u + 30 }')

# ---- the file ---------------------------------------------------------------------

mkdir -p "$DIR" || { echo "files/run.sh: cannot make $DIR" >&2; exit 2; }
FILE=$DIR/file-1g
SIZE=$((1 << 30))
if [ "$(stat -c %s "$FILE" 2>/dev/null)" != "$SIZE" ]; then
  avail=$(df -P -k "$DIR" | awk 'NR == 2 { print $4 }')
  if [ "${avail:-0}" -lt $((SIZE / 1024 + 65536)) ]; then
    echo "files/run.sh: $DIR has $((avail / 1024)) MiB free; the test file needs 1 GiB" >&2
    exit 2
  fi
  echo "files/run.sh: writing the 1 GiB test file $FILE (once)" >&2
  LIMIT=600 bounded /dev/null "$FSBENCH" --create "$FILE" --size "$SIZE" ||
    { echo "files/run.sh: could not create $FILE: $(head -n 1 "$TMP/err")" >&2; exit 2; }
fi
fstype=$(df --output=fstype "$DIR" 2>/dev/null | tail -n 1)
[ -n "$fstype" ] || fstype=$(stat -f -c %T "$DIR" 2>/dev/null || echo '?')

CONFIGS=""
[ "$DO_CACHED" = 1 ] && CONFIGS="cached"
if [ "$DO_DIRECT" = 1 ]; then
  LIMIT=30 bounded "$TMP/out" taskset -c "$CPU" "$FSBENCH" --mode rp --qd 1 --direct --count 1 "$FILE"
  rc=$?
  out=$(cat "$TMP/out" "$TMP/err")
  if [ $rc -eq 3 ]; then
    NOTES+=("O_DIRECT unsupported on this filesystem ($fstype at $DIR): the direct rows are left out; try --dir on a disk-backed file system")
    DIRECT_UNSUPPORTED=1
  else
    [ $rc -ne 0 ] && NOTES+=("O_DIRECT probe failed (exit $rc): $(head -c 200 <<<"$out")")
    CONFIGS="$CONFIGS direct"
  fi
fi
CONFIGS=${CONFIGS# }

warm_cache() {
  LIMIT=120 bounded /dev/null "$FSBENCH" --warm "$FILE" || NOTES+=("warming the page cache failed")
  if command -v fincore >/dev/null; then
    local res
    res=$(fincore -b -n -o RES "$FILE" 2>/dev/null | tr -d ' ')
    if [[ $res =~ ^[0-9]+$ ]] && [ "$res" -lt $((SIZE * 95 / 100)) ]; then
      NOTES+=("round $1: only $((res >> 20)) MiB of the 1 GiB file stayed in the page cache after warming; cached figures include disk reads")
    fi
  fi
}

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


# run_one PASS CONFIG QD CONTENDER; appends to the result tables.
declare -A IOPS EFF SYS RPE FAILS
run_one() {
  local pass=$1 cfg=$2 qd=$3 c=$4 key="$2|$3|$4"
  local d=0 perf=() out rc iops eff total
  [ "$cfg" = direct ] && d=1
  if [ "$pass" = syscalls ]; then
    perf=(taskset -c "$OTHER_CPU" perf stat -e raw_syscalls:sys_enter -x, -o "$TMP/perf.out" --)
  fi
  local window=$WINDOW warmup=$WARMUP
  if [ "$c" = fio ] || [ "$c" = fio_b ]; then
    local ramp=() batch=()
    [ "$c" = fio_b ] && batch=(--iodepth_batch_submit="$qd" --iodepth_batch_complete_max="$qd")
    # The syscall count covers the whole run, so it is divided by every read.
    [ "$pass" = syscalls ] || ramp=(--ramp_time="$(awk -v u="$warmup" 'BEGIN { printf "%d", u * 1000 }')ms")
    bounded "$TMP/out" "${perf[@]}" taskset -c "$CPU" fio --name=randread --filename="$FILE" \
      --size="$SIZE" --ioengine=io_uring --rw=randread --bs=4k --iodepth="$qd" --direct=$d \
      --invalidate=0 --time_based --runtime="$(awk -v w="$window" 'BEGIN { printf "%d", w * 1000 }')ms" \
      "${ramp[@]}" "${batch[@]}" --cpus_allowed="$CPU" --thread --norandommap --randrepeat=0 \
      --output-format=terse --terse-version=3
    rc=$?
    out=$(cat "$TMP/out")
    # terse v3: field 5 error, 6 read KiB, 8 read IOPS
    local terse
    terse=$(grep -m1 '^3;' <<<"$out")
    iops=$(cut -d';' -f8 <<<"$terse")
    total=$(awk -F';' '{ printf "%d", $6 / 4 }' <<<"$terse")
    eff=""
    [ -n "$terse" ] && [ "$(cut -d';' -f5 <<<"$terse")" != 0 ] && rc=1
  else
    local flags=(--mode "$c" --qd "$qd" --seconds "$window" --warmup "$warmup")
    [ $d = 1 ] && flags+=(--direct)
    bounded "$TMP/out" "${perf[@]}" taskset -c "$CPU" "$FSBENCH" "${flags[@]}" "$FILE"
    rc=$?
    out=$(cat "$TMP/out")
    iops=$(kv iops "$out")
    eff=$(kv iops_per_cpu_s "$out")
    total=$(kv total_ops "$out")
  fi
  if [ $rc -ne 0 ] || [ -z "$iops" ]; then
    FAILS[$key]+=" $pass"
    NOTES+=("$c ($cfg, QD $qd, $pass): FAILED (exit $rc): $(head -n 2 "$TMP/err" | tr '\n' ' ' | cut -c1-160)$(head -c 160 <<<"$out")")
    return 1
  fi
  case "$pass" in
    main)
      IOPS[$key]+=" $iops"
      [ -n "$eff" ] && EFF[$key]+=" $eff"
      local en
      en=$(kv enters_per_op "$out")
      [ -n "$en" ] && RPE[$key]+=" $en"
      ;;
    syscalls)
      local count
      count=$(perf_syscalls "$TMP/perf.out")
      if [ -n "$count" ] && [ "${total:-0}" -gt 0 ]; then
        SYS[$key]+=" $(awk -v s="$count" -v m="$total" 'BEGIN { printf "%.4f", s / m }')"
        awk -v s="$count" -v m="$total" 'BEGIN { exit !(s > 10 * m) }' &&
          NOTES+=("$c ($cfg, QD $qd): $count syscalls for $total reads in the syscalls pass: an outlier (the machine was busy?)")
      else
        NOTES+=("$c ($cfg, QD $qd): perf gave no count: $(perf_output "$TMP/perf.out")")
      fi
      ;;
  esac
  return 0
}

# run_pass PASS ROUNDS "QDS": rounds outermost, then configurations and queue
# depths, contenders innermost, their order rotated by one each round.
run_pass() {
  local pass=$1 rounds=$2 qds=$3 r cfg qd i
  for ((r = 0; r < rounds; r++)); do
    for cfg in $CONFIGS; do
      [ "$cfg" = cached ] && warm_cache $((r + 1))
      for qd in $qds; do
        local -a cs=(uv rp)
        if [ "$DO_FIO" = 1 ]; then
          if [ "$pass" = syscalls ]; then
            cs+=(fio)
          elif [ "$r" -lt "$FIO_ROUNDS" ]; then
            cs+=(fio fio_b)
          fi
        fi
        local n=${#cs[@]}
        printf '  %-8s round %d/%d  %-6s QD %-4s' "$pass" $((r + 1)) "$rounds" "$cfg" "$qd" >&2
        for ((i = 0; i < n; i++)); do
          local c=${cs[$(((i + r) % n))]}
          printf ' %s' "$c" >&2
          run_one "$pass" "$cfg" "$qd" "$c" || printf '(FAIL)' >&2
        done
        printf '\n' >&2
      done
    done
  done
}

# ---- statistics and the table ------------------------------------------------------


# ---- main ---------------------------------------------------------------------------

n_cfg=$(wc -w <<<"$CONFIGS")
n_qd=$(wc -w <<<"$QDS")
runs=$((ROUNDS * n_cfg * n_qd * 2))
[ "$DO_FIO" = 1 ] && runs=$((runs + 2 * FIO_ROUNDS * n_cfg * n_qd))
[ "$PERF_OK" = 1 ] && runs=$((runs + n_cfg * $(wc -w <<<"$SYS_QDS") * (2 + DO_FIO)))
echo "ringpark file benchmark: $([ "$FULL" = 1 ] && echo full || echo short), $runs runs, about $(awk -v r="$runs" -v w="$WINDOW" -v u="$WARMUP" 'BEGIN { printf "%d", r * (w + u + 0.15) }') s; $FILE ($fstype)" >&2

if [ -n "$CONFIGS" ]; then
  run_pass main "$ROUNDS" "$QDS"
  [ "$PERF_OK" = 1 ] && run_pass syscalls 1 "$SYS_QDS"
fi

model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
libuv_v=$(pkg-config --modversion libuv 2>/dev/null || echo '?')
fio_v=$(fio --version 2>/dev/null || echo '-')
rev=$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')
dev=$(df -P "$DIR" | awk 'NR == 2 { print $1 }')
echo
echo "Files: 4 KiB random reads of a 1 GiB file ($FILE, $fstype on $dev), all on cpu $CPU; $([ "$FULL" = 1 ] && echo full || echo short) run: $ROUNDS rounds x ${WINDOW} s (+${WARMUP} s warm-up), contenders interleaved$([ "$DO_FIO" = 1 ] && [ "$FIO_ROUNDS" != "$ROUNDS" ] && echo ", fio in round 1 only")"
echo "machine: $(nproc) cpus, $model, $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, kernel $(uname -r), libuv $libuv_v (pool ${UV_THREADPOOL_SIZE:-4} threads), $fio_v, ringpark $rev (${build_type:-?} build), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "IOPS: median [min-max]; x uv, x fio: ratios of medians (x fio: to the better of fio and fio_b); IOPS/cpu-s: reads per second of the process's CPU time (all threads);"
echo "sys/op: the process's syscalls per read over its whole run (perf, one run); enters/op: rp_stats io_uring_enter per read."
echo
{
  printf 'config\tQD\tcontender\tIOPS\t[min-max]\tx uv\tx fio\tIOPS/cpu-s\tx uv\tsys/op\tenters/op\n'
  for cfg in $CONFIGS; do
    for qd in $QDS; do
      read -r base _ _ <<<"$(stats "${IOPS[$cfg|$qd|uv]:-}")"
      read -r base_e _ _ <<<"$(stats "${EFF[$cfg|$qd|uv]:-}")"
      read -r fio _ _ <<<"$(stats "${IOPS[$cfg|$qd|fio]:-}")"
      read -r fio_b _ _ <<<"$(stats "${IOPS[$cfg|$qd|fio_b]:-}")"
      ceiling=$(awk -v a="$fio" -v b="$fio_b" 'BEGIN { if (a == "-") print b; else if (b == "-" || a >= b) print a; else print b }')
      for c in uv rp fio fio_b; do
        [[ $c == fio* ]] && [ "$DO_FIO" = 0 ] && continue
        k="$cfg|$qd|$c"
        read -r t tmin tmax <<<"$(stats "${IOPS[$k]:-}")"
        read -r e _ _ <<<"$(stats "${EFF[$k]:-}")"
        read -r s _ _ <<<"$(stats "${SYS[$k]:-}")"
        read -r en _ _ <<<"$(stats "${RPE[$k]:-}")"
        range="[$(human "$tmin")-$(human "$tmax")]"
        [ "$tmin" = - ] && range="-"
        tcell=$(human "$t")
        [ -n "${FAILS[$k]:-}" ] && tcell="$tcell FAIL:${FAILS[$k]// /,}"
        xfio=$(ratio "$t" "$ceiling")
        [[ $c == fio* ]] && xfio=""
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$cfg" "$qd" "$c" "$tcell" "$range" \
          "$(ratio "$t" "$base")" "$xfio" "$(human "$e")" "$(ratio "$e" "$base_e")" \
          "$(fixed "$s" 3)" "$(fixed "$en" 3)"
      done
    done
  done
  [ "${DIRECT_UNSUPPORTED:-0}" = 1 ] && printf 'direct\t-\t-\tO_DIRECT unsupported on this filesystem\n'
} | align
echo
if [ "${#NOTES[@]}" -gt 0 ]; then
  echo "notes:"
  printf '  - %s\n' "${NOTES[@]}"
fi
exit 0
