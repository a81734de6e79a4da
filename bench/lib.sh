# Shared by bench/run.sh, bench/http/run.sh and bench/files/run.sh: the
# statistics and table formatting every benchmark prints with. Sourced, not run.

# median min max of the numbers in $1 (or "- - -")
stats() {
  printf '%s\n' $1 | sort -g | awk 'NF { a[++n] = $1 }
    END { if (n == 0) { print "- - -"; exit }
          m = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
          print m, a[1], a[n] }'
}
# Aligns tab-separated columns (column(1) is not on every machine).
align() {
  awk -F '\t' '{ for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) }
                  if (NF > nf) nf = NF }
    END { for (r = 1; r <= NR; r++) { line = ""
            for (i = 1; i <= nf; i++) line = line sprintf(i < nf ? "%-" w[i] "s  " : "%s", cell[r, i])
            print line } }'
}
human() {  # 1234567 -> 1.23M, 45678 -> 45.7k
  awk -v v="$1" 'BEGIN { if (v == "-") print "-"; else if (v >= 1e6) printf "%.2fM\n", v / 1e6;
    else if (v >= 1e3) printf "%.1fk\n", v / 1e3; else printf "%.0f\n", v }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx\n", a / b }'; }
fixed() { awk -v v="$1" -v p="$2" 'BEGIN { if (v == "-") print "-"; else printf "%.*f\n", p, v }'; }
# Prints the calling script's header comment (its help) and exits with $1
# (default 2).
usage() {
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

# The value of key=value in a line of such pairs: kv KEY LINE
kv() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

# Stops every tracked background child (the array CHILDREN: servers, perf,
# load generators under timeout(1)): SIGTERM first, SIGKILL after 3 s; then
# removes $TMP. For `trap cleanup_children EXIT`.
cleanup_children() {
  local p i alive
  for p in "${CHILDREN[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for ((i = 0; i < 60; i++)); do
    alive=0
    for p in "${CHILDREN[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.05
  done
  for p in "${CHILDREN[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$TMP"
}

# Drops pid $1 from CHILDREN once it has been waited for.
forget_child() {
  local keep=() p
  for p in "${CHILDREN[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  CHILDREN=("${keep[@]}")
}

# stop_process PID SIGNAL...: sends each signal in turn, giving the process
# 2 s after each to exit; then waits for it and forgets it. Returns 1 if the
# first signal was not enough.
stop_process() {
  local pid=$1 i sig rc=0
  shift
  for sig in "$@"; do
    kill -"$sig" "$pid" 2>/dev/null || break
    for ((i = 0; i < 40; i++)); do
      kill -0 "$pid" 2>/dev/null || break 2
      sleep 0.05
    done
    rc=1
  done
  wait "$pid" 2>/dev/null
  forget_child "$pid"
  return $rc
}

# The syscall count in a `perf stat -x, -e raw_syscalls:sys_enter` output
# file, or nothing when perf gave none.
perf_syscalls() {
  grep 'raw_syscalls:sys_enter' "$1" 2>/dev/null | cut -d, -f1 | grep -m1 '^[0-9]\+$'
}
# What perf said instead, for a note: the first two lines of its output file.
perf_output() { grep -v '^#' "$1" 2>/dev/null | head -n 2 | tr '\n' ' '; }

# The absolute path of build directory $2 (as given, or relative to the
# repository $3), or exit 2 saying how to make one. $1 names the script.
resolve_build_dir() {
  if [ -d "$2" ]; then
    (cd "$2" && pwd)
  elif [ -d "$3/$2" ]; then
    (cd "$3/$2" && pwd)
  else
    echo "$1: no build directory '$2'; build first:" >&2
    echo "  cmake -S $3 -B $3/build-release -DCMAKE_BUILD_TYPE=Release && cmake --build $3/build-release -j" >&2
    exit 2
  fi
}
