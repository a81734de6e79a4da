#!/usr/bin/env bash
# Debian 12's node 18 (nodejs + libnode108, linked to the system libuv1), for
# the real-program tests and benchmarks: fetched with `apt-get download` and
# unpacked with `dpkg -x` into a folder of ours, so that no node the machine
# already has is touched. Sourced; defines
#   node18_fetch DIR   unpacks it under DIR/node18 (once); returns non-zero if
#                      the packages cannot be had (log in DIR/node18-download.log)
#   node18 ARGS...     runs it (exec: the caller's pid becomes node's); needs
#                      root, for the overlay of its externalized builtins onto
#                      /usr/share in a mount namespace of its own.
NODE18_PACKAGES=(nodejs=18.20.4+dfsg-1~deb12u3 libnode108=18.20.4+dfsg-1~deb12u3
                 node-acorn node-cjs-module-lexer node-undici)
NODE18_ROOT=""

# shellcheck source=tests/programs/debs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debs.sh"

node18_fetch() {
  NODE18_ROOT=$1/node18
  debs_unpack "$1" node18 usr/bin/node "${NODE18_PACKAGES[@]}"
}

# The node binary looks for its externalized builtins (acorn, cjs-module-lexer,
# undici) under /usr/share/nodejs.
node18() {
  exec unshare -m --propagation private sh -c \
    'mount -t overlay overlay -o "lowerdir=$0/usr/share:/usr/share" /usr/share &&
     LD_LIBRARY_PATH=$0/usr/lib/x86_64-linux-gnu exec "$0/usr/bin/node" "$@"' "$NODE18_ROOT" "$@"
}
