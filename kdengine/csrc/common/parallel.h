// Intra-op parallel loops for the CPU kernels, on ATen's own thread pool.
//
// Why not at::parallel_for directly: it is a header template. In a torch built with OpenMP (the
// PyPI and our CI builds: AT_PARALLEL_OPENMP) its parallel region is only emitted when the
// *including* file is compiled with -fopenmp; this extension is not (linking a second OpenMP
// runtime beside torch's bundled one would split the thread pools and ignore
// torch.set_num_threads), so there at::parallel_for silently runs on one thread. The loop of
// TensorIterator::for_each, however, is compiled into libtorch, so it is parallel in every build:
// we iterate over a tiny (tasks,) byte buffer and recover the task index from the data pointer.
// In builds whose ATen parallel backend is callable from headers (INTRA_OP_PARALLEL defined:
// native thread pool, or this file compiled with OpenMP) at::parallel_for is used as is.
//
// Semantics match at::parallel_for: f(b, e) receives contiguous, disjoint ranges covering
// [begin, end); at most get_num_threads() ranges, none shorter than `grain` except the last; a
// call from inside a parallel region runs serially. Exceptions thrown by f propagate.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace kdengine {

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
#ifdef INTRA_OP_PARALLEL
  at::parallel_for(begin, end, grain, f);
#else
  const int64_t threads = at::get_num_threads();
  const int64_t tasks = std::min<int64_t>(threads, (n + grain - 1) / grain);
  if (tasks <= 1 || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (n + tasks - 1) / tasks;
  at::Tensor slots = at::empty({tasks}, at::TensorOptions().dtype(at::kByte));
  auto iter = at::TensorIteratorConfig()
                  .add_output(slots)
                  .check_all_same_dtype(false)
                  .resize_outputs(false)
                  .build();
  const char* base = static_cast<const char*>(slots.data_ptr());
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
        for (int64_t j = 0; j < size1; ++j) {
          const int64_t t0 = data[0] + j * strides[1] - base;  // byte buffer: offset == index
          for (int64_t t = t0; t < t0 + size0; ++t) {
            const int64_t b = begin + t * chunk;
            if (b < end) f(b, std::min(end, b + chunk));
          }
        }
      },
      /*grain_size=*/1);
#endif
}

// [begin, end) in chunks of `chunk` indices that the workers pull from a shared counter: where
// the cores do not run at the same speed (a virtualised or shared machine), a faster one takes
// more chunks instead of waiting for the slower one's fixed half. f(b, e) gets one chunk per
// call; chunks are contiguous, disjoint and cover the range; which worker runs which chunk varies,
// so f must not depend on it (results never do in our kernels: each index is written by one f).
template <class F>
void parallel_for_dynamic(int64_t begin, int64_t end, int64_t chunk, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < nchunks; c = next.fetch_add(1)) {
      const int64_t b = begin + c * chunk;
      f(b, std::min(end, b + chunk));
    }
  };
  parallel_for(0, std::min<int64_t>(nchunks, at::get_num_threads()), 1, worker);
}

}  // namespace kdengine
