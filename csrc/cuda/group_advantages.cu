// CUDA group advantages: one warp per group. Each lane accumulates shifted sums
// over a strided slice of the group, the lanes' moments are merged with shuffles,
// then the lanes write the advantages of their slice (the second read of the
// rewards hits the cache). Scale batch needs the batch std before any output:
// stats pass -> one-block merge -> write pass, with per-group moments in a
// workspace the caller allocates.
#include <climits>

#include "../cuda_ops.h"
#include "../group_advantages.h"
#include "launch.cuh"

namespace grpo_fast {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kReduceThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

enum class Phase { kFused, kStats, kWrite };

__device__ __forceinline__ Moments shfl_down(const Moments& m, int delta) {
  return Moments{__shfl_down_sync(kFullMask, m.n, delta),
                 __shfl_down_sync(kFullMask, m.mean, delta),
                 __shfl_down_sync(kFullMask, m.m2, delta)};
}

// The merged moments of all 32 lanes, identical in every lane. Lane 0's result is
// broadcast rather than using a butterfly, because merge() is not exactly
// symmetric in floating point and every lane must use the same mean.
__device__ __forceinline__ Moments warp_merge(Moments m) {
  for (int delta = kWarp / 2; delta > 0; delta /= 2) m = merge(m, shfl_down(m, delta));
  return Moments{__shfl_sync(kFullMask, m.n, 0), __shfl_sync(kFullMask, m.mean, 0),
                 __shfl_sync(kFullMask, m.m2, 0)};
}

template <typename T, Phase P>
__global__ void group_advantages_kernel(
    // pointers
    const T* __restrict__ rewards, const int64_t* __restrict__ offsets,
    float* __restrict__ out, double* __restrict__ workspace,
    // sizes
    int64_t n, int64_t group_size, int64_t groups,
    // options
    Estimator estimator, Scale scale, double eps) {
  const int lane = threadIdx.x % kWarp;
  const int64_t g = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (g >= groups) return;  // uniform across the warp: g is per warp
  int64_t begin, end;
  group_bounds(offsets, group_size, g, &begin, &end);
  // Offsets on the device are not validated by the host (that would synchronise);
  // clamping keeps bad offsets from reading or writing out of bounds.
  begin = min(max(begin, int64_t(0)), n);
  end = min(max(end, begin), n);

  Moments m;
  if (P == Phase::kWrite) {
    m = Moments{workspace[3 * g], workspace[3 * g + 1], workspace[3 * g + 2]};
  } else {
    ShiftedSums acc;
    for (int64_t i = begin + lane; i < end; i += kWarp) acc.add(static_cast<double>(rewards[i]));
    m = warp_merge(acc.moments());
    if (P == Phase::kStats) {
      if (lane == 0) {
        workspace[3 * g] = m.n;
        workspace[3 * g + 1] = m.mean;
        workspace[3 * g + 2] = m.m2;
      }
      return;
    }
  }
  const double batch_std = P == Phase::kWrite ? workspace[3 * groups] : 0.0;
  const double factor = advantage_factor(m, estimator, scale, batch_std, eps);
  for (int64_t i = begin + lane; i < end; i += kWarp)
    out[i] = advantage_of(static_cast<double>(rewards[i]), m.mean, factor);
}

// One block: merges the per-group moments in workspace[0 : 3 * groups] and stores
// the batch's Bessel std in workspace[3 * groups]. Fixed order: deterministic.
__global__ void batch_std_kernel(double* __restrict__ workspace, int64_t groups) {
  __shared__ double partial[3 * (kReduceThreads / kWarp)];
  Moments m{0.0, 0.0, 0.0};
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x)
    m = merge(m, Moments{workspace[3 * g], workspace[3 * g + 1], workspace[3 * g + 2]});
  m = warp_merge(m);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) {
    partial[3 * warp] = m.n;
    partial[3 * warp + 1] = m.mean;
    partial[3 * warp + 2] = m.m2;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / kWarp;
    Moments w = lane < warps ? Moments{partial[3 * lane], partial[3 * lane + 1], partial[3 * lane + 2]}
                             : Moments{0.0, 0.0, 0.0};
    w = warp_merge(w);
    if (lane == 0) workspace[3 * groups] = bessel_std(w);
  }
}

template <typename T>
void launch(const T* rewards, int64_t n, const int64_t* offsets, int64_t group_size,
            int64_t groups, Estimator estimator, Scale scale, double eps, float* out,
            double* workspace, cudaStream_t stream) {
  if (groups <= 0 || n <= 0) return;
  const int64_t blocks = (groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT_MAX) throw std::runtime_error("grpo_fast CUDA: too many groups");
  const dim3 grid(static_cast<unsigned>(blocks));
  const dim3 block(kWarpsPerBlock * kWarp);
  if (scale != Scale::kBatch) {
    group_advantages_kernel<T, Phase::kFused><<<grid, block, 0, stream>>>(
        rewards, offsets, out, nullptr, n, group_size, groups, estimator, scale, eps);
  } else {
    if (workspace == nullptr)
      throw std::invalid_argument("grpo_fast CUDA: scale batch needs a workspace");
    group_advantages_kernel<T, Phase::kStats><<<grid, block, 0, stream>>>(
        rewards, offsets, out, workspace, n, group_size, groups, estimator, scale, eps);
    batch_std_kernel<<<1, kReduceThreads, 0, stream>>>(workspace, groups);
    group_advantages_kernel<T, Phase::kWrite><<<grid, block, 0, stream>>>(
        rewards, offsets, out, workspace, n, group_size, groups, estimator, scale, eps);
  }
  check(cudaGetLastError(), "group_advantages launch");
}

}  // namespace

void group_advantages(int dtype, std::uintptr_t rewards, int64_t n, std::uintptr_t offsets,
                      int64_t group_size, int64_t groups, int estimator, int scale, double eps,
                      std::uintptr_t out, std::uintptr_t workspace, int device,
                      std::uintptr_t stream) {
  DeviceGuard guard(device);
  const auto* off = as_ptr<const int64_t>(offsets);
  auto* dst = as_ptr<float>(out);
  auto* ws = as_ptr<double>(workspace);
  const auto est = static_cast<Estimator>(estimator);
  const auto sc = static_cast<Scale>(scale);
  if (static_cast<DType>(dtype) == DType::kFloat64)
    launch(as_ptr<const double>(rewards), n, off, group_size, groups, est, sc, eps, dst, ws,
           as_stream(stream));
  else
    launch(as_ptr<const float>(rewards), n, off, group_size, groups, est, sc, eps, dst, ws,
           as_stream(stream));
}

}  // namespace cuda
}  // namespace grpo_fast
