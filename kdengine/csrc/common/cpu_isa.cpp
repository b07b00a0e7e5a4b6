// The ISA test knobs and the names of the paths in use (kdengine.testing, `kdengine doctor`): thin
// ops over common/cpu_isa.h, which holds the choice itself.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "common/cpu_isa.h"

namespace {

kdengine::IsaFamily family_of(int64_t family) {
  TORCH_CHECK_VALUE(family == kdengine::kBinary || family == kdengine::kFloat,
                    "family must be 0 (binary) or 1 (float: kd_loss, topk_kd, if_multistep), got ",
                    family);
  return static_cast<kdengine::IsaFamily>(family);
}

// The level the family's kernels run now (forced, KDENGINE_CPU_PORTABLE, or the best).
int64_t cpu_isa(int64_t family) { return kdengine::cpu_isa(family_of(family)); }

int64_t cpu_best_isa(int64_t family) { return kdengine::best_cpu_isa(family_of(family)); }

bool cpu_has_isa(int64_t family, int64_t isa) { return kdengine::cpu_has_isa(family_of(family), isa); }

std::string cpu_isa_name(int64_t family, int64_t isa) {
  return kdengine::isa_name(family_of(family), isa);
}

// Forces the family's level for every later call (-1: automatic); returns the previous setting.
int64_t cpu_force_isa(int64_t family, int64_t isa) {
  const kdengine::IsaFamily f = family_of(family);
  const std::string err = kdengine::force_isa_error(f, isa);
  TORCH_CHECK_VALUE(err.empty(), err);
  return kdengine::force_isa(f, isa);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdengine_cpu, m) {
  m.def("cpu_isa(int family) -> int", &cpu_isa);
  m.def("cpu_best_isa(int family) -> int", &cpu_best_isa);
  m.def("cpu_has_isa(int family, int isa) -> bool", &cpu_has_isa);
  m.def("cpu_isa_name(int family, int isa) -> str", &cpu_isa_name);
  m.def("cpu_force_isa(int family, int isa) -> int", &cpu_force_isa);
}
