// Reuse pool for large CPU output tensors (the spiking kernels' outputs).
//
// Why. A fresh multi-MB tensor comes from mmap: every first touch of a page is a fault in which
// the OS zeroes the page, and on this class of VM that costs more than the kernel itself (64 MB
// of spikes: ~7 ms of faults with transparent huge pages, ~30 ms without, vs ~9 ms for the IF
// forward's own reads and writes). torch's CPU allocator hands such blocks back to the OS on free,
// so a training or streaming loop pays the faults on every call. Like the CUDA caching allocator,
// this pool keeps freed output buffers (2 MB-aligned, THP-advised) and hands them out again for a
// request of the same rounded size: a repeated call touches already-mapped memory.
//
// What it holds. Only blocks of >= 8 MB; at most `limit` bytes of free blocks (default 1 GiB,
// KDENGINE_CPU_POOL_MB overrides, 0 disables); blocks in use belong to their tensors as usual and
// return to the pool when the last tensor using them is freed (or go back to the OS when the pool
// is full). kdengine.ops.cpu_pool_clear() frees the cached blocks. The pool is process-wide,
// guarded by a mutex, and deliberately never destroyed (a tensor may be freed during exit).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdengine {

struct OutputPool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // rounded bytes -> block
  size_t held = 0;                           // bytes in free_blocks
  int64_t limit = -1;                        // -1: not read from the environment yet
  int64_t hits = 0, misses = 0;
};

inline OutputPool& output_pool() {
  static OutputPool* pool = new OutputPool();  // leaked on purpose (see above)
  return *pool;
}

constexpr size_t kPoolMinBytes = size_t{8} << 20;
constexpr size_t kPoolAlign = size_t{2} << 20;

// First touch of fresh memory is a page fault per 4 KB page, which on some virtual machines costs
// more than the kernels themselves (measured here: 64 MB allocate + fill 150 ms vs fill 27 ms on a
// loaded VM). Transparent huge pages make it one fault per 2 MB; with THP in "madvise" mode the
// range must ask. Advice only: harmless if the kernel declines.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t a = (p + kPoolAlign - 1) & ~(kPoolAlign - 1), e = (p + bytes) & ~(kPoolAlign - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// caller holds the mutex
inline int64_t pool_limit_locked(OutputPool& p) {
  if (p.limit < 0) {
    const char* env = std::getenv("KDENGINE_CPU_POOL_MB");
    p.limit = env != nullptr ? std::max<int64_t>(0, std::atoll(env)) << 20 : int64_t{1} << 30;
  }
  return p.limit;
}

inline void pool_trim_locked(OutputPool& p) {
  while (p.held > static_cast<size_t>(pool_limit_locked(p)) && !p.free_blocks.empty()) {
    auto it = std::prev(p.free_blocks.end());  // largest first
    p.held -= it->first;
    std::free(it->second);
    p.free_blocks.erase(it);
  }
}

inline void pool_release(void* block, size_t bytes) {
  OutputPool& p = output_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  if (bytes <= static_cast<size_t>(pool_limit_locked(p))) {
    p.free_blocks.emplace(bytes, block);
    p.held += bytes;
    pool_trim_locked(p);
  } else {
    std::free(block);
  }
}

// at::empty(sizes, opts) for CPU tensors, from the pool when large enough and the pool is on;
// large fresh memory (pooled or not) gets the huge-page advice.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * opts.dtype().itemsize();
  OutputPool& p = output_pool();
  void* block = nullptr;
  size_t bytes = (nbytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (nbytes < kPoolMinBytes) return at::empty(sizes, opts);
    if (pool_limit_locked(p) == 0) {  // pool off: a fresh tensor, still with the THP advice
      at::Tensor t = at::empty(sizes, opts);
      advise_huge_pages(t.data_ptr(), nbytes);
      return t;
    }
    auto it = p.free_blocks.find(bytes);
    if (it != p.free_blocks.end()) {
      block = it->second;
      p.free_blocks.erase(it);
      p.held -= bytes;
      ++p.hits;
    } else {
      ++p.misses;
    }
  }
  if (block == nullptr) {
    block = std::aligned_alloc(kPoolAlign, bytes);
    if (block == nullptr) throw std::bad_alloc();
    advise_huge_pages(block, bytes);
  }
  return at::from_blob(block, sizes, [bytes](void* q) { pool_release(q, bytes); },
                       opts.device(at::kCPU));
}

}  // namespace kdengine
