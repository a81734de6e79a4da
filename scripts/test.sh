#!/usr/bin/env bash
# Builds ringpark and passes every test, on a fresh Debian 12 machine:
#   1. the GoogleTest suite (each test once per backend: io_uring and epoll);
#   2. real programs under the preload (tests/programs/run.sh: our uv echo and
#      HTTP servers, Debian 12's node 18), every byte checked;
#   3. the GoogleTest suite under AddressSanitizer and UndefinedBehaviorSanitizer;
#   4. the tests that use threads, and the soak, under ThreadSanitizer;
#   5. libuv 1.44.2's own test suite with every uv_run routed to rp_uv_run,
#      inside a network namespace that has only loopback; and once more,
#      unchanged, under LD_PRELOAD=libringpark-preload.so, so that the tests'
#      own TCP streams are adopted.
# Every CTest run includes the fault tests (tests/fault) and the soak's short
# form (tests/soak, about 10 s per backend and build).
# Set RINGPARK_QUICK=1 to skip 2 to 5.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
jobs=$(nproc)

build() {  # build DIR [cmake args...]
  local dir=$1
  shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$dir" -j"$jobs"
}

build build
ctest --test-dir build -j"$jobs" --output-on-failure
bash tests/install/run.sh build

# The tests that run code on more than one thread, for ThreadSanitizer: the
# unparker and post() from other threads (the Park conformance suite, the
# executor, the C++ Runtime), the fallback's thread pool (its driver, the
# backend-neutral op tests, the C++ file handles), libuv's thread pool and
# uv_async under rp_uv_run and rp_uv_attach, threads that wake a sleeping
# loop (rp_poll_t, rp_tcp_t, an adopted uv_tcp_t), loops on several threads
# at once (and under the preload, a loop per thread), fork with threads and
# pools alive, the fault tests with helper threads or pools (signal storm,
# credentials, exec), and the soak.
# (CTest's regular expressions take at most nine groups: one pattern a line,
# joined with |, none with a group.)
tsan_tests=(
  '^ParkConformance\.' '^ExecutorTest\.' '^ExecutorOverEpoll\.'
  '^FallbackDriverTest\.' '^FallbackDriverInner\.' '^ThreadPool\.' '^BackendTest\.'
  '^[a-z]+\.UvRun\.' '^[a-z]+\.UvFs\.' '^[a-z]+\.Attach\.' '^[a-z]+\.Phases/AttachPhase\.'
  '^[a-z]+\.RuntimeTest\.' '^[a-z]+\.RuntimeOnUv\.' '^[a-z]+\.RuntimeBuild\.'
  '^[a-z]+\.HandlesTest\.'
  '^[a-z]+\.Runners/RpPoll\.BlockingRunWakesForReadiness' '^[a-z]+\.UvTcp\.DataArrivingDuring'
  '^tcp\.[a-z]+\.Adopt\.DataFromAnotherThread'
  '^preload\.loop_per_thread'
  '^[a-z]+\.Fork[A-Za-z]*\.'
  '^[a-z]+\.LoopsOnThreads\.' '^[a-z]+\.Restart/SignalStorm\.' '^[a-z]+\.Files\.'
  '^[a-z]+\.Exec\.'
  '\.soak\.'
)
tsan_regex=$(IFS='|'; echo "${tsan_tests[*]}")

if [ "${RINGPARK_QUICK:-0}" != 1 ]; then
  # Real libuv programs, unchanged, under the preload: our uv echo and HTTP
  # servers and Debian's node 18 (fetched into build/programs).
  bash tests/programs/run.sh build
  build build-asan -DRINGPARK_SANITIZE=address -DRINGPARK_BUILD_SAMPLES=OFF
  ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-asan -j"$jobs" --output-on-failure
  build build-ubsan -DRINGPARK_SANITIZE=undefined -DRINGPARK_BUILD_SAMPLES=OFF
  ctest --test-dir build-ubsan -j"$jobs" --output-on-failure
  # ThreadSanitizer (samples off). tests/tsan.supp is for libuv's own known
  # reports; tests/tsan/ring_memory.cpp tells TSan about the ring memory
  # liburing maps behind its back.
  build build-tsan -DRINGPARK_SANITIZE=thread -DRINGPARK_BUILD_SAMPLES=OFF -DRINGPARK_BUILD_BENCH=OFF
  TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp" \
    ctest --test-dir build-tsan -j"$jobs" --output-on-failure -R "$tsan_regex"
  if [ -x tests/libuv_suite/run.sh ] || [ -f tests/libuv_suite/run.sh ]; then
    # io_uring, the fallback, and io_uring sleeping in the ring on every turn
    # (by default the loop sleeps there only while ringpark has work in flight).
    for env in RINGPARK_BACKEND=uring RINGPARK_BACKEND=epoll RINGPARK_SLEEP=ring; do
      echo "== libuv's test suite under rp_uv_run, $env"
      env "$env" bash tests/libuv_suite/run.sh \
        --ringpark-lib "$PWD/build/libringpark.so" --include "$PWD/include" \
        --work-dir "$PWD/build/libuv_suite"
    done
    # The unchanged suite under the preload: its TCP streams adopted, its
    # uv_run interposed. The preload's file interposition stays off here
    # (RINGPARK_PRELOAD_FS=0): with it, threadpool_cancel_fs fails, because
    # file requests in the ring never wait in libuv's saturated thread pool
    # where that test cancels them (README, "Known limits").
    echo "== libuv's test suite under LD_PRELOAD=libringpark-preload.so (streams adopted)"
    RINGPARK_PRELOAD_FS=0 bash tests/libuv_suite/run.sh \
      --preload "$PWD/build/libringpark-preload.so" --work-dir "$PWD/build/libuv_suite"
  fi
fi
