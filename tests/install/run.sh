#!/usr/bin/env bash
# Installs ringpark from BUILD_DIR into a scratch prefix and builds and runs
# consumers that find it with find_package(ringpark) and with pkg-config.
set -euo pipefail
build=$1
work=$(cd "$build" && pwd)/install-check
rm -rf "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
here=$(cd "$(dirname "$0")" && pwd)
PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig" cmake -S "$here" -B "$work/build" \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/build" -j"$(nproc)" >/dev/null
for exe in consumer_cmake consumer_cmake_cxx consumer_pkgconfig; do
  LD_LIBRARY_PATH="$work/prefix/lib" "$work/build/$exe"
done
echo "install-check: 3 passed, 0 failed"
