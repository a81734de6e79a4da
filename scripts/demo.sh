#!/usr/bin/env bash
# The main job: builds ringpark and runs an unmodified libuv echo program on
# plain uv_run and on rp_uv_run, side by side, printing ringpark's counters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DRINGPARK_BUILD_TESTS=OFF >/dev/null
cmake --build build-release -j"$(nproc)" --target uv_echo ringpark-preload
for args in "1 20000" "50 2000"; do
  echo "== uv_echo $args (connections, messages each)"
  ./build-release/samples/uv_echo --plain $args
  ./build-release/samples/uv_echo $args
  RINGPARK_BACKEND=epoll ./build-release/samples/uv_echo $args
done
