// What every ernie45 CPU kernel shares: the bf16 storage type, torch's rounding to it, and a minimal
// work-sharing loop over OpenMP threads (no torch headers: see build.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <omp.h>

namespace ernie45 {

using bf16 = uint16_t;

// Round to nearest even, as torch casts; NaN stays NaN.
inline bf16 float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bf16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Runs body(i, t) for i in [0, count) on `threads` threads t (the caller's is t = 0), items handed out
// one at a time (items may differ in cost). The threads are OpenMP's: loaded into a torch process,
// this library shares torch's OpenMP runtime (libgomp.so.1) and so its thread pool, whose threads
// are already awake after torch's last parallel operator (new threads would wait for their cores).
template <typename Body>
void parallel_items(int64_t count, int64_t threads, Body body) {
  threads = std::max<int64_t>(1, std::min(threads, count));
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num();
    for (int64_t i = next++; i < count; i = next++) body(i, t);
  }
}

}  // namespace ernie45
