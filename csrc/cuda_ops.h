// Host-side entry points of the CUDA code (csrc/cuda/*.cu), declared without any
// CUDA header so bindings.cpp compiles with the plain C++ compiler. Defined only
// when the build has GRPO_FAST_WITH_CUDA. Each launches on `stream` (a
// cudaStream_t passed as an integer) on `device`, returns without synchronising,
// and throws std::runtime_error when a launch fails.
#pragma once

#include <cstdint>

namespace grpo_fast {
namespace cuda {

// workspace: (3 * groups + 1) doubles on the device, needed only for scale batch.
void group_advantages(int dtype, std::uintptr_t rewards, int64_t n, std::uintptr_t offsets,
                      int64_t group_size, int64_t groups, int estimator, int scale, double eps,
                      std::uintptr_t out, std::uintptr_t workspace, int device,
                      std::uintptr_t stream);

void gae(int dtype, std::uintptr_t rewards, std::uintptr_t values, int mask_kind,
         std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
         std::uintptr_t advantages, std::uintptr_t returns, int device, std::uintptr_t stream);

}  // namespace cuda
}  // namespace grpo_fast
