// Test hook for parallel.h: runs kdengine::parallel_for (or parallel_for_dynamic, whose grain is
// the chunk) over [0, n) with `grain` and returns, per
// index, which distinct OS thread ran it (0, 1, ... in order of first appearance), so a test can
// check that the CPU kernels really use more than one thread, that ranges are disjoint and cover
// [0, n), and that no range is shorter than the grain except the last. No math, no traffic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <thread>
#include <vector>

#include "common/parallel.h"

namespace {

at::Tensor parallel_probe(int64_t n, int64_t grain, bool dynamic) {
  TORCH_CHECK(n >= 0, "parallel_probe: n must be >= 0, got ", n);
  at::Tensor owner = at::full({n}, -1, at::TensorOptions().dtype(at::kLong));
  int64_t* o = owner.data_ptr<int64_t>();
  std::mutex mu;
  std::vector<std::thread::id> seen;
  auto task = [&](int64_t b, int64_t e) {
    int64_t id;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto me = std::this_thread::get_id();
      id = -1;
      for (size_t i = 0; i < seen.size(); ++i)
        if (seen[i] == me) id = static_cast<int64_t>(i);
      if (id < 0) {
        id = static_cast<int64_t>(seen.size());
        seen.push_back(me);
      }
    }
    for (int64_t i = b; i < e; ++i) {
      TORCH_CHECK(o[i] == -1, "parallel_probe: index ", i, " visited twice");
      o[i] = id;
    }
  };
  if (dynamic)
    kdengine::parallel_for_dynamic(0, n, grain, task);
  else
    kdengine::parallel_for(0, n, grain, task);
  return owner;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdengine_cpu, m) {
  m.def("parallel_probe(int n, int grain, bool dynamic=False) -> Tensor", &parallel_probe);
}
