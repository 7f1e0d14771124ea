// Group-relative advantages (GRPO, RLOO) over raw buffers.
//
// For a group g with non-NaN rewards r_1..r_n (NaN rewards are left out of every
// statistic and get advantage 0):
//   centred_i = r_i - mean_g                          estimator grpo
//             = r_i - (sum_g - r_i) / (n - 1)         estimator rloo
//             = n / (n - 1) * (r_i - mean_g)          (the same, written without sum_g)
//   adv_i     = centred_i / (std + eps)               std = std_g (scale group) or
//                                                     std_batch (scale batch), Bessel
//   adv_i     = centred_i                             scale none
// A group of one, or one whose rewards are all equal, gets 0 exactly (never NaN,
// even with eps = 0). Statistics are accumulated in double. An infinite reward
// makes its group's statistics non-finite, and the advantages it touches (its
// group's; every group's with scale batch) come out non-finite, never a plausible
// number (with scale batch: every group with a learning signal); the CPU code
// reports the first such index instead (cpu_ops.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace grpo_fast {

// Count, mean and sum of squared deviations (M2) of a set of values.
struct Moments {
  double n;
  double mean;
  double m2;
};

// One pass, shifted by the first value seen: sums of (x - shift) and its square.
// Shifting by a member of the set keeps the cancellation in m2 small, and makes a
// set of equal values give mean == value and m2 == 0 exactly.
struct ShiftedSums {
  double n = 0.0, shift = 0.0, s = 0.0, q = 0.0;

  GRPO_HD void add(double x) {
    if (x != x) return;  // NaN: not part of the statistics
    if (n == 0.0) shift = x;
    const double d = x - shift;
    s += d;
    q += d * d;
    n += 1.0;
  }

  GRPO_HD Moments moments() const {
    if (n == 0.0) return Moments{0.0, 0.0, 0.0};
    const double mean_d = s / n;
    double m2 = q - s * mean_d;
    if (m2 < 0.0) m2 = 0.0;
    return Moments{n, shift + mean_d, m2};
  }
};

// Chan et al.'s pairwise combination. Equal means combine exactly (delta == 0).
GRPO_HD Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0.0) return b;
  if (b.n == 0.0) return a;
  const double n = a.n + b.n;
  const double delta = b.mean - a.mean;
  return Moments{n, a.mean + delta * (b.n / n), a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

// Bessel-corrected standard deviation; 0 for fewer than two values.
GRPO_HD double bessel_std(const Moments& m) {
  return m.n < 2.0 ? 0.0 : sqrt(m.m2 / (m.n - 1.0));
}

// The factor f with adv_i = (r_i - mean_g) * f for every non-NaN member of the group.
// batch_std is read only for Scale::kBatch.
GRPO_HD double advantage_factor(const Moments& g, Estimator estimator, Scale scale,
                                double batch_std, double eps) {
  // Groups of one and groups of equal rewards: the centred rewards are all 0, and
  // returning 0 here keeps 0 / 0 (std 0, eps 0) out of the result.
  if (g.n < 2.0 || g.m2 == 0.0) return 0.0;
  const double centre = estimator == Estimator::kRloo ? g.n / (g.n - 1.0) : 1.0;
  double denom = 1.0;
  if (scale == Scale::kGroup) denom = bessel_std(g) + eps;
  else if (scale == Scale::kBatch) denom = batch_std + eps;
  if (denom != denom) return denom;  // statistics of an infinite reward: NaN, not 0
  return denom > 0.0 ? centre / denom : 0.0;
}

GRPO_HD float advantage_of(double r, double mean, double factor) {
  return (r != r || factor == 0.0) ? 0.0f : static_cast<float>((r - mean) * factor);
}

// Bounds [begin, end) of group g: fixed size when offsets is null, else CSR offsets.
GRPO_HD void group_bounds(const int64_t* offsets, int64_t group_size, int64_t g,
                          int64_t* begin, int64_t* end) {
  if (offsets == nullptr) {
    *begin = g * group_size;
    *end = *begin + group_size;
  } else {
    *begin = offsets[g];
    *end = offsets[g + 1];
  }
}

}  // namespace grpo_fast
