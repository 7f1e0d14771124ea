// CUDA GAE: one thread per sequence runs the same masked reverse scan as the CPU
// (gae_sequence in gae.h). The scan is sequential in t, so the parallelism is the
// batch; neighbouring threads read addresses `length` apart (uncoalesced), which
// is acceptable at the sizes GAE sees (B * T of a rollout).
#include <climits>

#include "../cuda_ops.h"
#include "../gae.h"
#include "launch.cuh"

namespace grpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, typename M>
__global__ void gae_kernel(
    // pointers
    const T* __restrict__ rewards, const T* __restrict__ values, const M* __restrict__ mask,
    T* __restrict__ advantages, T* __restrict__ returns,
    // sizes
    int64_t batch, int64_t length,
    // scalars
    double gamma, double lam) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t row = b * length;
  gae_sequence(rewards + row, values + row, mask + row, length, gamma, lam, advantages + row,
               returns + row);
}

template <typename T, typename M>
void launch(std::uintptr_t rewards, std::uintptr_t values, std::uintptr_t mask, int64_t batch,
            int64_t length, double gamma, double lam, std::uintptr_t advantages,
            std::uintptr_t returns, cudaStream_t stream) {
  if (batch <= 0 || length <= 0) return;
  const int64_t blocks = (batch + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) throw std::runtime_error("grpo_fast CUDA: batch too large");
  gae_kernel<T, M><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      as_ptr<const T>(rewards), as_ptr<const T>(values), as_ptr<const M>(mask),
      as_ptr<T>(advantages), as_ptr<T>(returns), batch, length, gamma, lam);
  check(cudaGetLastError(), "gae launch");
}

template <typename T>
void launch_mask(int mask_kind, std::uintptr_t rewards, std::uintptr_t values,
                 std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
                 std::uintptr_t advantages, std::uintptr_t returns, cudaStream_t stream) {
  switch (static_cast<MaskKind>(mask_kind)) {
    case MaskKind::kUInt8:
      return launch<T, uint8_t>(rewards, values, mask, batch, length, gamma, lam, advantages,
                                returns, stream);
    case MaskKind::kInt32:
      return launch<T, int32_t>(rewards, values, mask, batch, length, gamma, lam, advantages,
                                returns, stream);
    case MaskKind::kInt64:
      return launch<T, int64_t>(rewards, values, mask, batch, length, gamma, lam, advantages,
                                returns, stream);
    case MaskKind::kFloat32:
      return launch<T, float>(rewards, values, mask, batch, length, gamma, lam, advantages,
                              returns, stream);
    case MaskKind::kFloat64:
      return launch<T, double>(rewards, values, mask, batch, length, gamma, lam, advantages,
                               returns, stream);
  }
  throw std::invalid_argument("grpo_fast CUDA: unknown mask kind");
}

}  // namespace

void gae(int dtype, std::uintptr_t rewards, std::uintptr_t values, int mask_kind,
         std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
         std::uintptr_t advantages, std::uintptr_t returns, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  if (static_cast<DType>(dtype) == DType::kFloat64)
    launch_mask<double>(mask_kind, rewards, values, mask, batch, length, gamma, lam, advantages,
                        returns, as_stream(stream));
  else
    launch_mask<float>(mask_kind, rewards, values, mask, batch, length, gamma, lam, advantages,
                       returns, as_stream(stream));
}

}  // namespace cuda
}  // namespace grpo_fast
