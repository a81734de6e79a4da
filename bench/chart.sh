#!/usr/bin/env bash
# Draws the echo and HTTP figures of one benchmark run as a picture: the
# tables that bench/run.sh and bench/http/run.sh printed (saved to files) in,
# one SVG out, with gnuplot (Debian's gnuplot-nox, installed with apt-get when
# missing).
#
#   bench/chart.sh OUT.svg ECHO_TABLE HTTP_TABLE
#
# Left: throughput as a ratio to plain libuv ("x uv"), per workload, for the
# unchanged libuv program under the preload (uv_preload) and the same program
# rewritten to rp_tcp_t (rp_echo, HTTP: rp); right: server syscalls per
# message or request, libuv against the preload. Only rows the tables have are
# drawn.
set -uo pipefail
[ $# -eq 3 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
out=$1
echo_table=$2
http_table=$3
command -v gnuplot >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >/dev/null 2>&1
command -v gnuplot >/dev/null || { echo "chart.sh: no gnuplot (apt-get install gnuplot-nox)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# rows TABLE PREFIX: "PREFIXworkload contender ratio sys" per row of the
# table (its header's two-word names joined first, so that the words of the
# header and of the rows line up).
rows() {
  awk -v prefix="$2" '
    /^workload[ \t]/ {
      gsub(/x uv/, "x_uv"); gsub(/p50 us/, "p50_us"); gsub(/p99 us/, "p99_us"); gsub(/sep eff/, "sep_eff")
      n = split($0, h, /[ \t]+/)
      for (i = 1; i <= n; i++) { if (h[i] == "x_uv" && !ratio) ratio = i; if (h[i] ~ /^sys\/(msg|req)$/) sys = i }
      header = 1; next
    }
    header && NF > 3 && $1 ~ /^[a-z0-9]+$/ {
      split($0, f, /[ \t]+/)
      r = f[ratio]; s = f[sys]; sub(/x$/, "", r)
      print prefix $1, $2, (r == "" ? "-" : r), (s == "" ? "-" : s)
    }' "$1"
}
rows "$echo_table" "echo " >"$tmp/rows"
rows "$http_table" "http " >>"$tmp/rows"

# One line per workload: ratio of each contender, and sys of uv and uv_preload.
awk '
  { key = $1 " " $2; keys[key] = 1; order[++n] = key
    ratio[key, $3] = $4; sys[key, $3] = $5 }
  END {
    for (i = 1; i <= n; i++) {
      k = order[i]; if (seen[k]++) continue
      rp = ratio[k, "rp_echo"] != "" ? ratio[k, "rp_echo"] : ratio[k, "rp"]
      printf "\"%s\" %s %s %s %s\n", k, (ratio[k, "uv_preload"] == "" ? "-" : ratio[k, "uv_preload"]),
        (rp == "" ? "-" : rp), (sys[k, "uv"] == "" ? "-" : sys[k, "uv"]),
        (sys[k, "uv_preload"] == "" ? "-" : sys[k, "uv_preload"])
    }
  }' "$tmp/rows" >"$tmp/data"
[ -s "$tmp/data" ] || { echo "chart.sh: no rows found in the tables" >&2; exit 1; }

gnuplot <<EOF
set terminal svg size 1100,460 dynamic font "sans,12" background "white" noenhanced
set output "$out"
set datafile missing "-"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set xtics rotate by -30 nomirror
set key top left
set grid ytics
set multiplot layout 1,2 title "ringpark: the unchanged libuv echo and HTTP servers under the preload (same core, ratio to plain libuv)"
set title "throughput, x plain libuv"
set yrange [0:*]
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 linecolor rgb "#555555"
plot "$tmp/data" using 2:xtic(1) title "unchanged, under the preload" linecolor rgb "#2b6cb0", \
     "" using 3 title "rewritten to rp_tcp_t" linecolor rgb "#9ac1e6"
unset arrow 1
set title "server syscalls per message / request"
set logscale y
set yrange [0.005:10]
plot "$tmp/data" using 4:xtic(1) title "plain libuv" linecolor rgb "#c05621", \
     "" using 5 title "under the preload" linecolor rgb "#2b6cb0"
unset multiplot
EOF
echo "chart.sh: wrote $out"
