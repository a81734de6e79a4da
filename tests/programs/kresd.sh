# Debian 12's knot-resolver 5.6 (kresd, linked to the system libuv1), for
# tests/programs/run.sh: fetched with `apt-get download` and unpacked with
# `dpkg -x` into the build folder, as node 18 is; nothing is installed.
# kresd finds its Lua files and modules at the paths it was built with, so it
# runs in a private mount namespace whose /usr/lib/x86_64-linux-gnu and
# /usr/share are overlays with the unpacked tree on top; and in a network
# namespace with loopback only, since it would ask the root servers too.
# Sourced; needs root.

KRESD_PACKAGES=(knot-resolver libknot13 libzscanner4 libdnssec9 libfstrm0 libjemalloc2 liblmdb0
                libxdp1 libprotobuf-c1 libluajit-5.1-2 libluajit-5.1-common dns-root-data)
KRESD_ROOT=""

kresd_fetch() {
  local dir=$1 debs deb
  KRESD_ROOT=$dir/kresd
  [ -x "$KRESD_ROOT/usr/sbin/kresd" ] && return 0
  debs=$dir/kresd-debs
  rm -rf "$debs" "$KRESD_ROOT"
  mkdir -p "$debs"
  (cd "$debs" && apt-get download "${KRESD_PACKAGES[@]}") >"$dir/kresd-download.log" 2>&1 ||
    (apt-get update >/dev/null 2>&1 && cd "$debs" && apt-get download "${KRESD_PACKAGES[@]}") \
      >>"$dir/kresd-download.log" 2>&1 || return 1
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$KRESD_ROOT" || return 1; done
}

# kresd_namespace COMMAND...: runs COMMAND (a shell command line, with
# $KRESD_ROOT/usr/sbin/kresd reachable) inside the namespaces described above.
kresd_namespace() {
  unshare -m -n --propagation private sh -c '
    ip link set lo up &&
    lib=/usr/lib/x86_64-linux-gnu &&
    mount -t overlay overlay -o "lowerdir=$0$lib:$lib" "$lib" &&
    mount -t overlay overlay -o "lowerdir=$0/usr/share:/usr/share" /usr/share &&
    LD_LIBRARY_PATH=$0$lib exec "$@"' "$KRESD_ROOT" "$@"
}
