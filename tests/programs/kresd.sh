#!/usr/bin/env bash
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

# shellcheck source=tests/programs/debs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debs.sh"

kresd_fetch() {
  KRESD_ROOT=$1/kresd
  debs_unpack "$1" kresd usr/sbin/kresd "${KRESD_PACKAGES[@]}"
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
