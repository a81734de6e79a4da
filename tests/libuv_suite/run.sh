#!/usr/bin/env bash
# Runs libuv 1.44.2's own test suite with every uv_run call of the tests routed
# to ringpark's rp_uv_run (link-time -Wl,--wrap=uv_run), on the system libuv.
# See README.md in this folder.
set -euo pipefail

SELF="$(realpath "${BASH_SOURCE[0]}")"
HERE="$(dirname "$SELF")"
UV_VERSION=1.44.2
SRC_NAME="libuv1-${UV_VERSION}"
LOCK_FILE=/tmp/ringpark-libuv-suite.lock   # the tests use fixed /tmp paths

usage() {
  cat <<EOF
usage: $0 --ringpark-lib PATH/libringpark.so --include DIR [options] [WORK_DIR] [-- TEST...]
       $0 --plain [options] [WORK_DIR] [-- TEST...]
       $0 --preload PATH/libringpark-preload.so [options] [WORK_DIR] [-- TEST...]

  --ringpark-lib PATH  libringpark.so to route uv_run to (defines rp_uv_run)
  --include DIR        folder holding ringpark.h
  --plain              build and run the suite on plain uv_run (no wrap, no
                       ringpark): the baseline to compare failures against
  --preload PATH       the plain runner, unchanged, run with LD_PRELOAD=PATH:
                       every uv_run, uv_fs_* and stream call of the tests goes
                       through the preload, so the tests' own TCP streams are
                       adopted (runtime/uv/adopt/)
  --work-dir DIR       work dir (also accepted as the one positional argument);
                       default: \${BUILD_DIR:-build}/libuv_suite = $(printf %q "${BUILD_DIR:-build}/libuv_suite")
  --timeout SECONDS    bound on the whole run (default 1800)
  --test-timeout SECS  bound on one test, on top of libuv's own per-test
                       timeout (default 300)
  --build-only         fetch and build, do not run
  -j N                 build jobs (default 2)
  -- TEST...           run only these tests (excluded.txt does not apply)

Prints 'libuv-suite: N passed, M failed, K skipped' (K = skipped by libuv
itself + excluded by excluded.txt) and exits non-zero if any test failed.
EOF
}

die() { echo "run.sh: error: $*" >&2; exit 2; }
log() { echo "run.sh: $*" >&2; }

# ---------------------------------------------------------------------------
# Inner mode: runs inside the network namespace (see run_suite below).
# Args: RUNNER SRC_DIR RESULTS_DIR TEST_TIMEOUT; test names on stdin.
# ---------------------------------------------------------------------------
if [[ "${1:-}" == "--inner" ]]; then
  shift
  runner="$1" src="$2" results="$3" test_timeout="$4"
  cd "$src"
  # A test in one process, its helpers in others; libuv's runner kills them on
  # its own per-test timeout. The outer `timeout` only guards the runner itself.
  while IFS= read -r name; do
    [[ -n "$name" ]] || continue
    out="$results/logs/$name.log"
    set +e
    timeout -k 10 "$test_timeout" "$runner" "$name" </dev/null >"$out" 2>&1
    rc=$?
    set -e
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
      echo "# run.sh: killed after ${test_timeout}s" >>"$out"
    fi
    tap="$(grep -m1 -E '^(not )?ok [0-9]+ - ' "$out" || true)"
    if [[ $rc -eq 0 && "$tap" == "ok 1 - $name" ]]; then
      verdict=PASS
    elif [[ $rc -eq 7 && "$tap" == "ok 1 - $name # SKIP"* ]]; then
      verdict=SKIP
    else
      verdict=FAIL
    fi
    echo "$verdict $name" >>"$results/verdicts"
    case "$verdict" in
      PASS) echo "ok - $name" ;;
      SKIP) echo "skip - $name${tap#"ok 1 - $name # SKIP"}" ;;
      FAIL) echo "FAIL - $name (exit $rc)"; sed 's/^/    /' "$out" ;;
    esac
  done
  exit 0
fi

# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------
RP_LIB="" RP_INCLUDE="" PLAIN=0 PRELOAD="" WORK="" TOTAL_TIMEOUT=1800 TEST_TIMEOUT=300
BUILD_ONLY=0 JOBS=2
ONLY=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ringpark-lib) RP_LIB="${2:?--ringpark-lib needs a path}"; shift 2 ;;
    --ringpark-lib=*) RP_LIB="${1#*=}"; shift ;;
    --include) RP_INCLUDE="${2:?--include needs a folder}"; shift 2 ;;
    --include=*) RP_INCLUDE="${1#*=}"; shift ;;
    --plain) PLAIN=1; shift ;;
    --preload) PRELOAD="${2:?--preload needs a path}"; PLAIN=1; shift 2 ;;
    --preload=*) PRELOAD="${1#*=}"; PLAIN=1; shift ;;
    --work-dir) WORK="${2:?--work-dir needs a folder}"; shift 2 ;;
    --work-dir=*) WORK="${1#*=}"; shift ;;
    --timeout) TOTAL_TIMEOUT="${2:?}"; shift 2 ;;
    --test-timeout) TEST_TIMEOUT="${2:?}"; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    -j) JOBS="${2:?}"; shift 2 ;;
    -j*) JOBS="${1#-j}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; ONLY=("$@"); break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z "$WORK" ]] || die "more than one work dir given"; WORK="$1"; shift ;;
  esac
done
[[ -n "$WORK" ]] || WORK="${BUILD_DIR:-build}/libuv_suite"
[[ "$TOTAL_TIMEOUT" =~ ^[0-9]+$ && "$TEST_TIMEOUT" =~ ^[0-9]+$ && "$JOBS" =~ ^[0-9]+$ ]] \
  || die "--timeout, --test-timeout and -j take whole numbers"

if [[ $PLAIN -eq 1 ]]; then
  MODE=plain
  [[ -z "$RP_LIB$RP_INCLUDE" ]] || log "--plain: ignoring --ringpark-lib/--include"
else
  MODE=ringpark
  [[ -n "$RP_LIB" && -n "$RP_INCLUDE" ]] \
    || { usage >&2; die "need --ringpark-lib and --include (or --plain)"; }
  [[ -f "$RP_LIB" ]] || die "no such file: $RP_LIB"
  [[ -f "$RP_INCLUDE/ringpark.h" ]] || die "no ringpark.h in $RP_INCLUDE"
  RP_LIB="$(realpath "$RP_LIB")"
  RP_INCLUDE="$(realpath "$RP_INCLUDE")"
fi

for tool in apt-get cmake cc ldd nm readelf unshare ip timeout flock; do
  command -v "$tool" >/dev/null || die "'$tool' not found"
done

mkdir -p "$WORK"
WORK="$(realpath "$WORK")"
SRC="$WORK/$SRC_NAME"
BUILD="$WORK/build-$MODE"
RESULTS="$WORK/results-$MODE"
RUN_ENV=()
if [[ -n "$PRELOAD" ]]; then
  [[ -f "$PRELOAD" ]] || die "no such file: $PRELOAD"
  PRELOAD="$(realpath "$PRELOAD")"
  RESULTS="$WORK/results-preload"
  RUN_ENV=("LD_PRELOAD=$PRELOAD")
fi

# The system libuv the tests must run on.
INSTALLED="$(dpkg-query -W -f='${Version}' libuv1 2>/dev/null || true)"
[[ "$INSTALLED" == "$UV_VERSION"-* ]] \
  || die "system libuv1 is '${INSTALLED:-not installed}', need $UV_VERSION (apt-get install libuv1-dev)"
SYS_LIBUV="$(cc -print-file-name=libuv.so)"
[[ "$SYS_LIBUV" == /* && -e "$SYS_LIBUV" ]] || die "libuv.so not found by cc (install libuv1-dev)"

# ---------------------------------------------------------------------------
# 1. libuv source (apt-get source libuv1, the installed version if possible)
# ---------------------------------------------------------------------------
have_deb_src() {
  grep -rqsE '^[[:space:]]*(deb-src[[:space:]]|Types:.*deb-src)' \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

add_deb_src() {
  local f=/etc/apt/sources.list.d/ringpark-deb-src.sources
  log "no deb-src configured: writing $f"
  cat >"$f" <<'EOF'
# Added by ringpark tests/libuv_suite/run.sh for `apt-get source libuv1`.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

apt_source() {
  # Prefer the exact installed version; any 1.44.2 source is fine otherwise.
  (cd "$WORK" && { apt-get source "libuv1=$INSTALLED" || apt-get source libuv1; })
}

fetch_source() {
  if [[ -f "$WORK/.source-ok" && -f "$SRC/test/run-tests.c" ]]; then
    return
  fi
  command -v dpkg-source >/dev/null || die "apt-get source needs dpkg-dev (apt-get install dpkg-dev)"
  rm -rf "$SRC" "$WORK/.source-ok"
  log "fetching libuv source with apt-get source into $WORK"
  if ! apt_source; then
    have_deb_src || add_deb_src
    log "apt-get update"
    apt-get update
    rm -rf "$SRC"
    apt_source || die "apt-get source libuv1 failed"
  fi
  [[ -f "$SRC/test/run-tests.c" && -f "$SRC/CMakeLists.txt" ]] \
    || die "apt-get source did not produce $SRC (wrong libuv1 version in the archive?)"
  grep -q "AC_INIT(\[libuv\], \[$UV_VERSION\]" "$SRC/configure.ac" \
    || die "$SRC is not libuv $UV_VERSION"
  touch "$WORK/.source-ok"
}

# Debian's skip-multicast-test patch turns udp_multicast_join and
# udp_multicast_join6 into skips (its build daemons have no multicast). The
# test namespace has multicast (NETNS_UP), so both run as upstream wrote them:
# the patch is reverted, once, in the fetched source.
unskip_multicast() {
  local p="$SRC/debian/patches/skip-multicast-test"
  [[ -f $p ]] && grep -q 'Debian build deamons' "$SRC/test/test-udp-multicast-join.c" || return 0
  if ! command -v patch >/dev/null; then
    log "no patch(1): udp_multicast_join{,6} stay skipped as Debian patched them"
    return 0
  fi
  patch -R -p1 -s -d "$SRC" <"$p" || die "could not revert $p"
  log "reverted Debian's skip-multicast-test: udp_multicast_join{,6} run"
}

# The test namespace's network, set up inside it before the tests run:
# loopback, with multicast (224.0.0.0/4 routed to lo) for udp_multicast_join;
# and a veth pair with IPv6 addresses, both ends inside the namespace (nothing
# leaves the machine), for udp_multicast_join6, which needs a non-loopback
# IPv6 interface. Where veth is missing, that test skips itself.
NETNS_UP='ip link set lo up && { ip link set lo multicast on; ip route add 224.0.0.0/4 dev lo;
  ip link add rp-v0 type veth peer name rp-v1 && ip link set rp-v0 up && ip link set rp-v1 up &&
  ip -6 addr add fd00:7270::1/64 dev rp-v0 nodad && ip -6 addr add fd00:7270::2/64 dev rp-v1 nodad;
} >/dev/null 2>&1; exec "$@"'

# ---------------------------------------------------------------------------
# 2. Build uv_run_tests (libuv's CMake + uv_hook.cmake), incrementally
# ---------------------------------------------------------------------------
build_runner() {
  local cfg=(
    -DBUILD_TESTING=ON -DLIBUV_BUILD_TESTS=ON -DLIBUV_BUILD_BENCH=OFF
    -DCMAKE_BUILD_TYPE=Debug
    "-DCMAKE_PROJECT_INCLUDE=$HERE/uv_hook.cmake"
    "-DRP_MODE=$MODE" "-DRP_LIBUV=$SYS_LIBUV" "-DRP_WRAP_SOURCE=$HERE/uv_run_wrap.c"
  )
  if [[ $MODE == ringpark ]]; then
    cfg+=("-DRP_LIB=$RP_LIB" "-DRP_INCLUDE=$RP_INCLUDE")
  fi
  if [[ ! -f "$BUILD/CMakeCache.txt" ]] && command -v ninja >/dev/null; then
    cfg+=(-G Ninja)
  fi
  log "configuring $BUILD ($MODE)"
  cmake -S "$SRC" -B "$BUILD" "${cfg[@]}" >"$WORK/cmake-$MODE.log" 2>&1 \
    || { cat "$WORK/cmake-$MODE.log" >&2; die "cmake configure failed"; }
  log "building uv_run_tests ($MODE)"
  cmake --build "$BUILD" --target uv_run_tests -j "$JOBS"
  RUNNER="$BUILD/uv_run_tests"
  [[ -x "$RUNNER" ]] || die "no $RUNNER after the build"

  # The tiny probe that reads the version of the libuv the runner resolves.
  PROBE="$BUILD/uv_version_probe"
  if [[ ! -x "$PROBE" || "$HERE/uv_version_probe.c" -nt "$PROBE" ]]; then
    cc -O1 -o "$PROBE" "$HERE/uv_version_probe.c" -ldl
  fi
}

ldd_path() {  # ldd_path FILE SONAME -> resolved path (empty if none)
  ldd "$1" | awk -v so="$2" '$1 == so && $2 == "=>" { print $3 }'
}

check_runner() {
  local uv_runner uv_rp n_uv version
  n_uv="$(ldd "$RUNNER" | grep -c 'libuv\.so' || true)"
  [[ "$n_uv" == 1 ]] || { ldd "$RUNNER" >&2; die "runner resolves $n_uv libuv libraries, want 1"; }
  uv_runner="$(ldd_path "$RUNNER" libuv.so.1)"
  [[ -n "$uv_runner" ]] || { ldd "$RUNNER" >&2; die "runner does not resolve libuv.so.1"; }
  uv_runner="$(realpath "$uv_runner")"
  version="$("$PROBE" "$uv_runner")"
  [[ "$version" == "$UV_VERSION" ]] || die "runner's libuv $uv_runner is version $version, want $UV_VERSION"
  [[ "$uv_runner" == "$(realpath "$SYS_LIBUV")" ]] \
    || die "runner resolves $uv_runner, not the system libuv $(realpath "$SYS_LIBUV")"

  if [[ $MODE == ringpark ]]; then
    # Whatever name the runner records for it (soname or path), the library
    # it loads must be the one given.
    local found=0 p
    while read -r p; do
      [[ -e "$p" && "$(realpath "$p")" == "$RP_LIB" ]] && found=1
    done < <(ldd "$RUNNER" | awk '$2 == "=>" { print $3; next } $1 ~ /^\// { print $1 }')
    [[ $found -eq 1 ]] || { ldd "$RUNNER" >&2; die "runner does not load $RP_LIB"; }
    readelf -d "$RP_LIB" | grep 'NEEDED.*\[libuv\.so\.1\]' >/dev/null \
      || die "$RP_LIB does not link libuv.so.1 (DT_NEEDED)"
    uv_rp="$(ldd_path "$RP_LIB" libuv.so.1)"
    [[ -n "$uv_rp" && "$(realpath "$uv_rp")" == "$uv_runner" ]] \
      || die "libringpark.so resolves libuv.so.1 to '${uv_rp}', the runner to '$uv_runner'"
    if nm -D --defined-only "$RP_LIB" | awk '{ print $NF }' | grep -E '^uv_(run|loop_init|default_loop)$' >/dev/null; then
      die "$RP_LIB defines libuv functions itself (a second, static libuv?)"
    fi
    # The wrap took: no test object references uv_run any more.
    nm -u "$RUNNER" | grep -w rp_uv_run >/dev/null || die "runner does not reference rp_uv_run"
    if nm -u "$RUNNER" | grep -w uv_run >/dev/null; then die "runner still calls uv_run directly"; fi
    nm --defined-only "$RUNNER" | grep -w __wrap_uv_run >/dev/null || die "runner has no __wrap_uv_run"
    log "runner: libuv $version at $uv_runner (shared with $RP_LIB), uv_run -> rp_uv_run"
  else
    nm -u "$RUNNER" | grep -w uv_run >/dev/null || die "plain runner does not call uv_run"
    log "runner: libuv $version at $uv_runner, plain uv_run"
  fi
}

# ---------------------------------------------------------------------------
# 3. Run, one test at a time, inside a network namespace with only loopback
# ---------------------------------------------------------------------------
read_excluded() {
  local f="$HERE/excluded.txt" line name
  EXCLUDED=()
  [[ -f "$f" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    name="${line%%#*}"
    name="${name//[[:space:]]/}"
    [[ -n "$name" ]] && EXCLUDED+=("$name")
  done <"$f"
  return 0
}

run_suite() {
  local env_root=() all=() to_run=() excluded_run=() name
  [[ $(id -u) -eq 0 ]] && env_root=(UV_RUN_AS_ROOT=1)

  mapfile -t all < <(env "${env_root[@]}" "$RUNNER" --list | awk '{ print $1 }')
  [[ ${#all[@]} -gt 0 ]] || die "uv_run_tests --list printed nothing"
  declare -A known=() excl=()
  for name in "${all[@]}"; do known[$name]=1; done

  read_excluded
  for name in "${EXCLUDED[@]}"; do
    [[ -n "${known[$name]:-}" ]] || die "excluded.txt names an unknown test: $name"
    excl[$name]=1
  done

  if [[ ${#ONLY[@]} -gt 0 ]]; then
    for name in "${ONLY[@]}"; do
      [[ -n "${known[$name]:-}" ]] || die "unknown test: $name"
    done
    to_run=("${ONLY[@]}")
    all=("${ONLY[@]}")
  else
    for name in "${all[@]}"; do
      if [[ -n "${excl[$name]:-}" ]]; then excluded_run+=("$name"); else to_run+=("$name"); fi
    done
  fi

  rm -rf "$RESULTS"
  mkdir -p "$RESULTS/logs"
  : >"$RESULTS/verdicts"
  printf '%s\n' "${to_run[@]}" >"$RESULTS/to_run"

  if [[ -n "$PRELOAD" ]]; then
    # A run in which adoption silently stayed off would prove nothing: one
    # test that writes through a TCP stream must report adopted streams.
    local probe
    probe="$(cd "$SRC" && env "${env_root[@]}" "${RUN_ENV[@]}" RINGPARK_STATS=1 \
      unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh \
      "$RUNNER" tcp_write_queue_order tcp_write_queue_order 2>&1)" || true
    grep -qE 'adopted [1-9][0-9]* streams' <<<"$probe" \
      || die "under the preload no stream was adopted in tcp_write_queue_order: $probe"
    log "adoption is on: $(grep -oE 'adopted [0-9]+ streams[^;]*' <<<"$probe")"
  fi
  log "running ${#to_run[@]} tests ($MODE, ${#excluded_run[@]} excluded) in a loopback-only network namespace, cwd $SRC"
  local start end rc=0
  start=$(date +%s)
  # The fixed /tmp socket paths (TEST_PIPENAME) and the files the tests create
  # in the source dir are shared by every run: one run at a time.
  exec 9>"$LOCK_FILE"
  flock -w 3600 9 || die "could not lock $LOCK_FILE (another run?)"
  set +e
  # -n: a network namespace with nothing but loopback and a veth pair whose
  # two ends are both in it (NETNS_UP), so no test reaches outside the
  # machine. -p --kill-child --mount-proc: the driver is pid 1 of
  # its own pid namespace, so every process a test leaves behind (a helper of
  # a failed spawn test, say) is killed when the driver ends or is killed.
  # timeout sends SIGKILL: unshare ignores SIGTERM while it waits, and on its
  # death --kill-child takes the whole namespace down with it.
  env "${env_root[@]}" "${RUN_ENV[@]}" timeout -s KILL "$TOTAL_TIMEOUT" \
    unshare -n -p --kill-child --mount-proc -- sh -c "$NETNS_UP" sh \
      bash "$SELF" --inner "$RUNNER" "$SRC" "$RESULTS" "$TEST_TIMEOUT" \
      <"$RESULTS/to_run" 9>&-
  rc=$?
  set -e
  flock -u 9
  end=$(date +%s)
  if [[ $rc -eq 137 && $((end - start)) -ge $TOTAL_TIMEOUT ]]; then
    log "the run hit its time bound (--timeout $TOTAL_TIMEOUT) and was killed"
  elif [[ $rc -ne 0 ]]; then
    log "test driver exited with $rc"
  fi

  # Verdicts; a test without one (time bound hit, driver died) failed.
  local passed=0 failed=0 skipped=0 failures=() verdict
  declare -A got=()
  while read -r verdict name; do got[$name]=$verdict; done <"$RESULTS/verdicts"
  for name in "${to_run[@]}"; do
    case "${got[$name]:-NONE}" in
      PASS) passed=$((passed + 1)) ;;
      SKIP) skipped=$((skipped + 1)) ;;
      FAIL) failed=$((failed + 1)); failures+=("$name") ;;
      NONE) failed=$((failed + 1)); failures+=("$name (no result: not run or driver killed)") ;;
    esac
  done
  local self_skipped=$skipped
  skipped=$((skipped + ${#excluded_run[@]}))

  echo
  echo "libuv $UV_VERSION test suite, mode $MODE${PRELOAD:+ under LD_PRELOAD=$PRELOAD}, $((end - start))s; logs in $RESULTS/logs"
  echo "skipped: $self_skipped by libuv itself, ${#excluded_run[@]} excluded by excluded.txt${excluded_run[*]:+ (${excluded_run[*]})}"
  if [[ ${#failures[@]} -gt 0 ]]; then
    echo "failed tests:"
    printf '  %s\n' "${failures[@]}"
  fi
  echo "libuv-suite: $passed passed, $failed failed, $skipped skipped"
  [[ $failed -eq 0 && $rc -eq 0 ]]
}

fetch_source
unskip_multicast
build_runner
check_runner
[[ $BUILD_ONLY -eq 1 ]] && exit 0
run_suite
