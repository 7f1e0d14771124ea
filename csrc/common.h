// Shared by the CPU code (g++) and the CUDA code (nvcc): plain structs and
// arithmetic only, no CUDA headers and no libtorch.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GRPO_HD __host__ __device__ __forceinline__
#else
#define GRPO_HD inline
#endif

namespace grpo_fast {

// Codes passed from Python as plain ints (grpo_fast/ops/advantages.py holds the same tables).
enum class DType : int { kFloat32 = 0, kFloat64 = 1 };
enum class MaskKind : int { kUInt8 = 0, kInt32 = 1, kInt64 = 2, kFloat32 = 3, kFloat64 = 4 };
enum class Estimator : int { kGrpo = 0, kRloo = 1 };
enum class Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

}  // namespace grpo_fast
