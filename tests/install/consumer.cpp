// The C++ API from an installed ringpark: a coroutine sleeps and returns.
#include <ringpark/runtime.hpp>

#include <chrono>
#include <cstdio>

ringpark::Task<int> answer(ringpark::Runtime& rt) {
  co_await ringpark::sleep_for(rt, std::chrono::milliseconds(1));
  co_return 42;
}

int main() {
  auto rt = ringpark::Runtime::Builder().build();
  int value = ringpark::block_on(rt, answer(rt));
  std::printf("consumer (C++): %d on %s\n", value, rt.backend_name().c_str());
  return value == 42 ? 0 : 1;
}
