#!/usr/bin/env bash
# Debian packages unpacked into a folder of ours (`apt-get download`, then
# `dpkg -x`), so that nothing is installed on the machine. Sourced by
# node18.sh and kresd.sh.

# debs_unpack DIR NAME FILE PACKAGE...: unpacks the packages under DIR/NAME,
# once (FILE, relative to DIR/NAME, says that it is there); returns non-zero
# if they cannot be had (log in DIR/NAME-download.log).
debs_unpack() {
  local dir=$1 name=$2 file=$3 root debs deb
  shift 3
  root=$dir/$name
  [ -x "$root/$file" ] && return 0
  debs=$dir/$name-debs
  rm -rf "$debs" "$root"
  mkdir -p "$debs"
  (cd "$debs" && apt-get download "$@") >"$dir/$name-download.log" 2>&1 ||
    (apt-get update >/dev/null 2>&1 && cd "$debs" && apt-get download "$@") \
      >>"$dir/$name-download.log" 2>&1 || return 1
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$root" || return 1; done
}
