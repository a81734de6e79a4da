#!/usr/bin/env bash
# The main job: what ringpark does, measured side by side with what a user would
# otherwise use, in one short run (a few minutes; each part prints its table):
#   1. TCP echo: an unchanged libuv echo server under LD_PRELOAD of ringpark
#      (its own streams adopted onto the ring), and the same server rewritten
#      to rp_tcp_t, against plain libuv and a hand-written epoll loop;
#   2. HTTP plaintext: the unchanged libuv server under the preload, on
#      rp_tcp_t, on plain libuv, and nginx (wrk);
#   3. UDP echo: an unchanged libuv UDP echo server under the preload (its
#      uv_udp_t adopted), against itself on plain libuv, 64 clients with 1
#      and 16 datagrams in flight, every reply checked;
#   4. node: Debian 12's node 18, unchanged, serving HTTP, plain and under the
#      preload (needs root; fetched with apt-get download, skipped without);
#   5. files: 4 KiB random reads, rp_fs_read against uv_fs_read on libuv's pool,
#      and fio's io_uring engine (a 1 GiB file is made once in /tmp);
#   6. scale: the echo on one thread and on two (SO_REUSEPORT), as server
#      efficiency.
# Every bench script takes --full (or more rounds) for the long versions;
# bench/RESULTS.md holds the latest full tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
extra=()
for p in wrk nginx fio linux-perf util-linux; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || extra+=("$p")
done
if ((${#extra[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${extra[@]}" >/dev/null
fi
cmake -S . -B build-release -DCMAKE_BUILD_TYPE=Release -DRINGPARK_BUILD_TESTS=OFF >/dev/null
cmake --build build-release -j"$(nproc)" >/dev/null

echo "== 1. TCP echo (64-byte messages; CONNSxDEPTH)"
bash bench/run.sh --rounds 1 --seconds 1.5 --workloads 1x1,50x1,50x16 \
  --contenders uv,uv_preload,rp_echo,epoll --no-separate build-release
echo
echo "== 2. HTTP plaintext (wrk, 50 connections)"
bash bench/http/run.sh --rounds 1 --seconds 2 --contenders uv,uv_preload,rp,nginx build-release
echo
echo "== 3. UDP echo (64-byte datagrams; CLIENTSxDEPTH)"
bash bench/udp/run.sh --rounds 1 --seconds 1.5 build-release
echo
echo "== 4. node 18 HTTP hello (wrk, 50 connections)"
if [ "$(id -u)" -eq 0 ]; then
  bash bench/node/run.sh --rounds 1 --seconds 2 build-release || echo "(node part failed)"
else
  echo "(skipped: node 18 runs in a mount namespace of its own, which needs root)"
fi
echo
echo "== 5. Files (4 KiB random reads from the page cache, one core)"
bash bench/files/run.sh --rounds 1 --seconds 0.5 --qds 1,32 --no-direct build-release
echo
echo "== 6. Scale (rp_echo --pool on 1 and 2 threads, 500 connections x 16)"
bash bench/scale/run.sh --rounds 1 --seconds 1.5 --workloads 500x16 build-release
