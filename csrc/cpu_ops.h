// CPU implementations: loops over the per-group / per-sequence maths in
// group_advantages.h and gae.h, parallel over groups / sequences for large inputs.
#pragma once

#include <cstdint>
#include <vector>

#include "gae.h"
#include "group_advantages.h"
#include "parallel.h"

namespace grpo_fast {
namespace cpu {

// ShiftedSums over [begin, end), in two flavours. The fast one assumes no NaN and
// has no compare or select in its loop; a NaN anywhere in the group makes its sum
// NaN, and the group is then redone by the careful one (rare: NaN marks a missing
// reward). *has_nan tells the writer which loop to use.
template <typename T>
Moments group_moments(const T* rewards, int64_t begin, int64_t end, bool* has_nan) {
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
  if (acc.s == acc.s) return acc.moments();
  *has_nan = true;
  acc = ShiftedSums();
  for (int64_t i = begin; i < end; ++i) acc.add(static_cast<double>(rewards[i]));
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
// else groups + 1 non-decreasing int64 offsets from 0 to n.
template <typename T>
void group_advantages(const T* rewards, int64_t n, const int64_t* offsets, int64_t group_size,
                      int64_t groups, Estimator estimator, Scale scale, double eps, float* out) {
  if (scale != Scale::kBatch) {
    parallel_for(groups, n, [&](int64_t lo, int64_t hi) {
      for (int64_t g = lo; g < hi; ++g) {
        int64_t begin, end;
        group_bounds(offsets, group_size, g, &begin, &end);
        bool has_nan;
        const Moments m = group_moments(rewards, begin, end, &has_nan);
        write_group(rewards, begin, end, m.mean,
                    advantage_factor(m, estimator, scale, 0.0, eps), has_nan, out);
      }
    });
    return;
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
      stats[static_cast<size_t>(g)] = group_moments(rewards, begin, end, &has_nan);
      nan_flags[static_cast<size_t>(g)] = has_nan;
    }
  });
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
