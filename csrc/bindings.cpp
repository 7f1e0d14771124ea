// pybind11 bindings of the C++ core. No libtorch: tensors arrive as raw data
// pointers (tensor.data_ptr()) plus sizes and dtype codes, already validated and
// made contiguous by grpo_fast/ops/advantages.py. The GIL is released while computing.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <thread>

#include "common.h"
#include "cpu_ops.h"
#include "cuda_ops.h"

namespace py = pybind11;
using grpo_fast::DType;
using grpo_fast::Estimator;
using grpo_fast::MaskKind;
using grpo_fast::Scale;

namespace {

// The codes are private to advantages.py, but a wrong one must not reach a switch.
void check_codes(int dtype, int estimator, int scale) {
  if (dtype != int(DType::kFloat32) && dtype != int(DType::kFloat64))
    throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64)");
  if (estimator != int(Estimator::kGrpo) && estimator != int(Estimator::kRloo))
    throw std::invalid_argument("estimator code must be 0 (grpo) or 1 (rloo)");
  if (scale < int(Scale::kGroup) || scale > int(Scale::kNone))
    throw std::invalid_argument("scale code must be 0 (group), 1 (batch) or 2 (none)");
}

void check_mask(int mask_kind) {
  if (mask_kind < int(MaskKind::kUInt8) || mask_kind > int(MaskKind::kFloat64))
    throw std::invalid_argument("mask code must be in 0..4");
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

int64_t group_advantages_cpu(int dtype, std::uintptr_t rewards, int64_t n, std::uintptr_t offsets,
                             int64_t group_size, int64_t groups, int estimator, int scale,
                             double eps, std::uintptr_t out) {
  check_codes(dtype, estimator, scale);
  const auto est = static_cast<Estimator>(estimator);
  const auto sc = static_cast<Scale>(scale);
  const auto* off = ptr<const int64_t>(offsets);
  if (dtype == int(DType::kFloat64))
    return grpo_fast::cpu::group_advantages(ptr<const double>(rewards), n, off, group_size,
                                            groups, est, sc, eps, ptr<float>(out));
  return grpo_fast::cpu::group_advantages(ptr<const float>(rewards), n, off, group_size, groups,
                                          est, sc, eps, ptr<float>(out));
}

template <typename T>
void gae_cpu_typed(int mask_kind, std::uintptr_t rewards, std::uintptr_t values,
                   std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
                   std::uintptr_t advantages, std::uintptr_t returns) {
  const auto* r = ptr<const T>(rewards);
  const auto* v = ptr<const T>(values);
  auto* a = ptr<T>(advantages);
  auto* ret = ptr<T>(returns);
  switch (static_cast<MaskKind>(mask_kind)) {
    case MaskKind::kUInt8:
      return grpo_fast::cpu::gae(r, v, ptr<const uint8_t>(mask), batch, length, gamma, lam, a, ret);
    case MaskKind::kInt32:
      return grpo_fast::cpu::gae(r, v, ptr<const int32_t>(mask), batch, length, gamma, lam, a, ret);
    case MaskKind::kInt64:
      return grpo_fast::cpu::gae(r, v, ptr<const int64_t>(mask), batch, length, gamma, lam, a, ret);
    case MaskKind::kFloat32:
      return grpo_fast::cpu::gae(r, v, ptr<const float>(mask), batch, length, gamma, lam, a, ret);
    case MaskKind::kFloat64:
      return grpo_fast::cpu::gae(r, v, ptr<const double>(mask), batch, length, gamma, lam, a, ret);
  }
}

void gae_cpu(int dtype, std::uintptr_t rewards, std::uintptr_t values, int mask_kind,
             std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
             std::uintptr_t advantages, std::uintptr_t returns) {
  check_codes(dtype, 0, 0);
  check_mask(mask_kind);
  if (dtype == int(DType::kFloat64))
    gae_cpu_typed<double>(mask_kind, rewards, values, mask, batch, length, gamma, lam, advantages,
                          returns);
  else
    gae_cpu_typed<float>(mask_kind, rewards, values, mask, batch, length, gamma, lam, advantages,
                         returns);
}

#ifndef GRPO_FAST_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "grpo_fast._C was built without CUDA (no CUDA toolkit found at build time); "
      "reinstall with a CUDA toolkit on PATH, or -C cmake.define.GRPO_FAST_CUDA=ON");
}
#endif

void group_advantages_cuda(int dtype, std::uintptr_t rewards, int64_t n, std::uintptr_t offsets,
                           int64_t group_size, int64_t groups, int estimator, int scale,
                           double eps, std::uintptr_t out, std::uintptr_t workspace, int device,
                           std::uintptr_t stream) {
  check_codes(dtype, estimator, scale);
#ifdef GRPO_FAST_WITH_CUDA
  grpo_fast::cuda::group_advantages(dtype, rewards, n, offsets, group_size, groups, estimator,
                                    scale, eps, out, workspace, device, stream);
#else
  (void)rewards, (void)n, (void)offsets, (void)group_size, (void)groups, (void)eps, (void)out,
      (void)workspace, (void)device, (void)stream;
  no_cuda();
#endif
}

void gae_cuda(int dtype, std::uintptr_t rewards, std::uintptr_t values, int mask_kind,
              std::uintptr_t mask, int64_t batch, int64_t length, double gamma, double lam,
              std::uintptr_t advantages, std::uintptr_t returns, int device,
              std::uintptr_t stream) {
  check_codes(dtype, 0, 0);
  check_mask(mask_kind);
#ifdef GRPO_FAST_WITH_CUDA
  grpo_fast::cuda::gae(dtype, rewards, values, mask_kind, mask, batch, length, gamma, lam,
                       advantages, returns, device, stream);
#else
  (void)rewards, (void)values, (void)mask, (void)batch, (void)length, (void)gamma, (void)lam,
      (void)advantages, (void)returns, (void)device, (void)stream;
  no_cuda();
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "grpo_fast C++ core: group advantages and GAE over raw buffers (no libtorch).";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "has_cuda",
      []() {
#ifdef GRPO_FAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA implementations were compiled in (says nothing about a GPU being present).");

  m.def("group_advantages_cpu", &group_advantages_cpu, release(), py::arg("dtype"),
        py::arg("rewards"), py::arg("n"), py::arg("offsets"), py::arg("group_size"),
        py::arg("groups"), py::arg("estimator"), py::arg("scale"), py::arg("eps"), py::arg("out"),
        "rewards (n,) float32/float64 -> out (n,) float32, raw contiguous host pointers. "
        "offsets = 0 for fixed groups of group_size, else a pointer to groups + 1 int64. "
        "Returns -1, or the first index of an infinite reward (out is then not meaningful).");
  m.def("group_advantages_cuda", &group_advantages_cuda, release(), py::arg("dtype"),
        py::arg("rewards"), py::arg("n"), py::arg("offsets"), py::arg("group_size"),
        py::arg("groups"), py::arg("estimator"), py::arg("scale"), py::arg("eps"), py::arg("out"),
        py::arg("workspace"), py::arg("device"), py::arg("stream"),
        "As group_advantages_cpu on device pointers, launched on `stream` without a sync. "
        "workspace: (3 * groups + 1) float64 on the device, needed for scale batch only. "
        "Nothing is returned (that would need a sync): an infinite reward makes the "
        "advantages of its group (every group with scale batch) non-finite instead.");
  m.def(
      "last_parallel_threads",
      []() { return grpo_fast::last_parallel_threads.load(); },
      "Threads (the calling one included) the last parallelised CPU loop ran on: 1 below the "
      "size threshold or on one core. For the tests.");
  m.def(
      "hardware_threads", []() { return static_cast<int64_t>(std::thread::hardware_concurrency()); },
      "std::thread::hardware_concurrency(), the most threads a CPU loop uses.");
  m.def("gae_cpu", &gae_cpu, release(), py::arg("dtype"), py::arg("rewards"), py::arg("values"),
        py::arg("mask_kind"), py::arg("mask"), py::arg("batch"), py::arg("length"),
        py::arg("gamma"), py::arg("lam"), py::arg("advantages"), py::arg("returns"),
        "(batch, length) row-major host buffers -> advantages, returns in the input dtype.");
  m.def("gae_cuda", &gae_cuda, release(), py::arg("dtype"), py::arg("rewards"),
        py::arg("values"), py::arg("mask_kind"), py::arg("mask"), py::arg("batch"),
        py::arg("length"), py::arg("gamma"), py::arg("lam"), py::arg("advantages"),
        py::arg("returns"), py::arg("device"), py::arg("stream"),
        "As gae_cpu on device pointers, launched on `stream` without a sync.");
}
