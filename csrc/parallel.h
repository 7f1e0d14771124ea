// A minimal parallel-for over an index range with std::thread: no OpenMP, so the
// build needs nothing beyond a C++17 compiler. Threads are started per call, which
// costs tens of microseconds, so work below kParallelThreshold elements runs inline.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace grpo_fast {

constexpr int64_t kParallelThreshold = int64_t(1) << 15;
constexpr int64_t kMinWorkPerThread = int64_t(1) << 14;

// Threads the last parallel_for ran on (the calling one included), for the tests.
inline std::atomic<int64_t> last_parallel_threads{0};

// Calls fn(lo, hi) over chunks covering [0, count). `work` is the number of
// elements the whole range touches, used only to decide whether threads pay off.
template <typename Fn>
void parallel_for(int64_t count, int64_t work, Fn&& fn) {
  if (count <= 0) return;
  if (work < kParallelThreshold || count < 2) {
    last_parallel_threads.store(1, std::memory_order_relaxed);
    fn(int64_t(0), count);
    return;
  }
  // hardware_concurrency() reads /sys on Linux: ask once.
  static const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t nthreads = std::min({hw, work / kMinWorkPerThread, count});
  if (nthreads <= 1) {
    last_parallel_threads.store(1, std::memory_order_relaxed);
    fn(int64_t(0), count);
    return;
  }
  const int64_t chunk = (count + nthreads - 1) / nthreads;
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(nthreads - 1));
  for (int64_t t = 1; t < nthreads; ++t) {
    const int64_t lo = t * chunk;
    const int64_t hi = std::min(count, lo + chunk);
    if (lo >= hi) break;
    pool.emplace_back([&fn, lo, hi] { fn(lo, hi); });
  }
  last_parallel_threads.store(static_cast<int64_t>(pool.size()) + 1, std::memory_order_relaxed);
  fn(int64_t(0), std::min(count, chunk));  // the calling thread takes the first chunk
  for (auto& th : pool) th.join();
}

}  // namespace grpo_fast
