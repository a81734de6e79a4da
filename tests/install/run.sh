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
# Linked ahead of libuv, ringpark-preload adopts the program's streams with
# no LD_PRELOAD: when adoption is on here, the stats must say so.
out=$(RINGPARK_STATS=1 LD_LIBRARY_PATH="$work/prefix/lib" "$work/build/consumer_adopt" 2>&1)
echo "$out"
if grep -q "adoption on" <<<"$out" && ! grep -qE "adopted [1-9][0-9]* streams" <<<"$out"; then
  echo "install-check: consumer_adopt says adoption is on, but adopted no stream" >&2
  exit 1
fi
echo "install-check: 4 passed, 0 failed"
