// Control and statistics of the output reuse pool (output_pool.h) for Python: kdengine.cpu_pool.
#include <torch/library.h>

#include <vector>

#include "common/output_pool.h"

namespace {

// [free bytes held, free blocks, hits, misses, limit bytes]
std::vector<int64_t> cpu_pool_stats() {
  kdengine::OutputPool& p = kdengine::output_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return {static_cast<int64_t>(p.held), static_cast<int64_t>(p.free_blocks.size()), p.hits,
          p.misses, kdengine::pool_limit_locked(p)};
}

// Sets the limit on free bytes held (0 disables pooling; trims at once); returns the old limit.
int64_t cpu_pool_set_limit(int64_t limit_bytes) {
  TORCH_CHECK_VALUE(limit_bytes >= 0, "limit_bytes must be >= 0, got ", limit_bytes);
  kdengine::OutputPool& p = kdengine::output_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  const int64_t old = kdengine::pool_limit_locked(p);
  p.limit = limit_bytes;
  kdengine::pool_trim_locked(p);
  return old;
}

// Frees every cached block; returns the bytes freed.
int64_t cpu_pool_clear() {
  kdengine::OutputPool& p = kdengine::output_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  const int64_t freed = static_cast<int64_t>(p.held);
  for (auto& kv : p.free_blocks) std::free(kv.second);
  p.free_blocks.clear();
  p.held = 0;
  return freed;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdengine_cpu, m) {
  m.def("cpu_pool_stats() -> int[]", &cpu_pool_stats);
  m.def("cpu_pool_set_limit(int limit_bytes) -> int", &cpu_pool_set_limit);
  m.def("cpu_pool_clear() -> int", &cpu_pool_clear);
}
