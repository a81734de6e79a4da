#!/usr/bin/env bash
# rp_cat copies a file exactly (to a file and to a pipe) and fails cleanly on a
# missing one.
set -euo pipefail
rp_cat=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
head -c 1000003 /dev/urandom >"$dir/src"
"$rp_cat" "$dir/src" "$dir/dst" 2>"$dir/log"
cmp "$dir/src" "$dir/dst"
"$rp_cat" "$dir/src" 2>>"$dir/log" | cmp - "$dir/src"
if "$rp_cat" "$dir/missing" 2>"$dir/err"; then
  echo "rp_cat succeeded on a missing file" >&2
  exit 1
fi
grep -q "no such file or directory" "$dir/err"
cat "$dir/log"
