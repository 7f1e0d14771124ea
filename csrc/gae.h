// Generalised advantage estimation over one sequence, as a masked reverse scan.
//
// Over the tokens t where mask[t] != 0, from the last to the first:
//   delta_t = r_t + gamma * V_next - V_t      V_next: value of the next masked-in
//                                             token of the sequence, 0 after the last
//   A_t     = delta_t + gamma * lam * A_next
//   R_t     = A_t + V_t
// Masked-out tokens get A = R = 0 and are skipped (left and right padding, and holes,
// all work). Accumulates in double, stores in the input's type.
#pragma once

#include <cstdint>

#include "common.h"

namespace grpo_fast {

template <typename T, typename M>
GRPO_HD void gae_sequence(const T* rewards, const T* values, const M* mask, int64_t length,
                          double gamma, double lam, T* advantages, T* returns) {
  const double gamma_lam = gamma * lam;
  double next_value = 0.0;
  double next_adv = 0.0;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (mask[t] == M(0)) {
      advantages[t] = T(0);
      returns[t] = T(0);
      continue;
    }
    const double v = static_cast<double>(values[t]);
    const double delta = static_cast<double>(rewards[t]) + gamma * next_value - v;
    next_adv = delta + gamma_lam * next_adv;
    advantages[t] = static_cast<T>(next_adv);
    returns[t] = static_cast<T>(next_adv + v);
    next_value = v;
  }
}

}  // namespace grpo_fast
