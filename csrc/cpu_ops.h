// CPU implementations: loops over the per-group / per-sequence maths in
// group_advantages.h and gae.h, parallel over groups / sequences for large inputs.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gae.h"
#include "group_advantages.h"
#include "parallel.h"

namespace grpo_fast {
namespace cpu {

// The first index holding an infinite reward, over every thread (kNoIndex: none).
constexpr int64_t kNoIndex = INT64_MAX;

inline void record_min(std::atomic<int64_t>* first, int64_t i) {
  int64_t seen = first->load(std::memory_order_relaxed);
  while (i < seen && !first->compare_exchange_weak(seen, i, std::memory_order_relaxed)) {
  }
}

// ShiftedSums over [begin, end), in two flavours. The fast one assumes finite
// rewards and has no compare or select in its loop; a NaN or an infinity anywhere
// in the group makes its sums non-finite, and the group is then redone by the
// careful one (rare: NaN marks a missing reward), which also finds the infinite
// rewards: the first one's index goes to *first_inf. So the check for infinite
// rewards costs one test per group on the pass that reads every reward anyway.
// *has_nan tells the writer which loop to use.
template <typename T>
Moments group_moments(const T* rewards, int64_t begin, int64_t end, bool* has_nan,
                      std::atomic<int64_t>* first_inf) {
  *has_nan = false;
  if (begin >= end) return Moments{0.0, 0.0, 0.0};
  ShiftedSums acc;
  acc.shift = static_cast<double>(rewards[begin]);
  for (int64_t i = begin; i < end; ++i) {
    const double d = static_cast<double>(rewards[i]) - acc.shift;
    acc.s += d;
    acc.q += d * d;
  }
  acc.n = static_cast<double>(end - begin);
  if (std::isfinite(acc.s + acc.q)) return acc.moments();
  *has_nan = true;
  acc = ShiftedSums();
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(rewards[i]);
    if (std::isinf(x)) {
      record_min(first_inf, i);
      break;  // the caller raises: these numbers are not used
    }
    acc.add(x);
  }
  return acc.moments();
}

template <typename T>
void write_group(const T* rewards, int64_t begin, int64_t end, double mean, double factor,
                 bool has_nan, float* out) {
  if (factor == 0.0) {
    for (int64_t i = begin; i < end; ++i) out[i] = 0.0f;
  } else if (!has_nan) {
    for (int64_t i = begin; i < end; ++i)
      out[i] = static_cast<float>((static_cast<double>(rewards[i]) - mean) * factor);
  } else {
    for (int64_t i = begin; i < end; ++i)
      out[i] = advantage_of(static_cast<double>(rewards[i]), mean, factor);
  }
}

// rewards (n,) -> out (n,) float32. offsets: null for fixed groups of group_size,
// else groups + 1 non-decreasing int64 offsets from 0 to n. Returns -1, or the
// first index of an infinite reward (then `out` holds nothing meaningful).
template <typename T>
int64_t group_advantages(const T* rewards, int64_t n, const int64_t* offsets, int64_t group_size,
                         int64_t groups, Estimator estimator, Scale scale, double eps, float* out) {
  std::atomic<int64_t> first_inf{kNoIndex};
  const auto result = [&first_inf]() {
    const int64_t i = first_inf.load();
    return i == kNoIndex ? int64_t(-1) : i;
  };
  if (scale != Scale::kBatch) {
    parallel_for(groups, n, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        int64_t begin, end;
        group_bounds(offsets, group_size, g, &begin, &end);
        bool has_nan;
        const Moments m = group_moments(rewards, begin, end, &has_nan, &first_inf);
        write_group(rewards, begin, end, m.mean,
                    advantage_factor(m, estimator, scale, 0.0, eps), has_nan, out);
      }
    });
    return result();
  }
  // Batch scale: the group means and the batch std are needed before any output,
  // so keep the per-group moments and merge them (in group order: deterministic).
  std::vector<Moments> stats(static_cast<size_t>(groups));
  std::vector<unsigned char> nan_flags(static_cast<size_t>(groups));
  parallel_for(groups, n, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      int64_t begin, end;
      group_bounds(offsets, group_size, g, &begin, &end);
      bool has_nan;
      stats[static_cast<size_t>(g)] = group_moments(rewards, begin, end, &has_nan, &first_inf);
      nan_flags[static_cast<size_t>(g)] = has_nan;
    }
  });
  if (first_inf.load() != kNoIndex) return result();
  Moments batch{0.0, 0.0, 0.0};
  for (const Moments& m : stats) batch = merge(batch, m);
  const double batch_std = bessel_std(batch);
  parallel_for(groups, n, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g) {
      int64_t begin, end;
      group_bounds(offsets, group_size, g, &begin, &end);
      const Moments& m = stats[static_cast<size_t>(g)];
      write_group(rewards, begin, end, m.mean,
                  advantage_factor(m, estimator, scale, batch_std, eps),
                  nan_flags[static_cast<size_t>(g)] != 0, out);
    }
  });
  return -1;
}

// (batch, length) row-major buffers; one sequence per row.
template <typename T, typename M>
void gae(const T* rewards, const T* values, const M* mask, int64_t batch, int64_t length,
         double gamma, double lam, T* advantages, T* returns) {
  parallel_for(batch, batch * length, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t row = b * length;
      gae_sequence(rewards + row, values + row, mask + row, length, gamma, lam,
                   advantages + row, returns + row);
    }
  });
}

}  // namespace cpu
}  // namespace grpo_fast
