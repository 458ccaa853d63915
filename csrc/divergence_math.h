// Per-pair math of the divergences of DESIGN.md §1.1, shared by the fused CPU and CUDA kernels.
// Host/device ready. The torch paths have the same three quantities in
// icon_kernels/backends/f_divergences.py.
//
// Row loss L_i = sum_j q~ f(r), r = p~ / q~. Per pair, from p~, q~ and their logs (-inf where 0):
//   term   = q~ f(r)
//   q_g    = q~ g,   g = f(r) - r f'(r)   (dL/ds_k = (1 - beta) q_k (g_k - Gamma_i), Gamma_i = sum_j q_j g_j)
//   p_fp   = p~ f'(r)                     (dL/dt_k = (1 - alpha) p_k (f'_k - Phi_i), Phi_i = sum_j p_j f'_j)
// Each is written with p~ and q~ outside and the logs inside, so none overflows where r would
// (an underflowed p~ or q~); a term whose own factor is 0 is 0 (structural zeros contribute
// nothing, as in the dense reference). A term that is +inf because one probability is 0 (reverse KL
// at p~ = 0 < q~, chi2 at q~ = 0 < p~) is a constant, as in the reference: its q_g and p_fp are 0.
#pragma once
#include <cmath>
#include <limits>

#include "tile_math.h"

namespace icon {

// The codes of icon_kernels/families.py DIVERGENCES (tests/test_families.py checks them).
enum Divergence : int { kKl = 0, kCrossEntropy = 1, kReverseKl = 2, kTv = 3, kHellinger = 4, kJs = 5, kChi2 = 6 };
constexpr int kDivergenceCount = 7;

ICON_HD bool is_f_divergence(int divergence) { return divergence >= kReverseKl && divergence < kDivergenceCount; }

template <typename T>
struct PairTerms {
  T term, q_g, p_fp;
};

template <typename T>
ICON_HD T pos_inf() { return T(INFINITY); }

// lp = log p~, lq = log q~ (-inf where the probability is 0).
template <typename T>
ICON_HD PairTerms<T> f_pair_terms(int divergence, T p, T q, T lp, T lq) {
  // a NaN log counts as present, so NaN inputs reach the loss as NaN
  const bool has_p = !(lp == -pos_inf<T>()), has_q = !(lq == -pos_inf<T>());
  switch (divergence) {
    case kReverseKl: {           // q (log q - log p); g = log q - log p + 1; f' = -q / p
      if (!has_q) return {T(0), T(0), -q};
      if (!has_p) return {pos_inf<T>(), T(0), T(0)};   // an infinite term is a constant (the oracle's)
      return {q * (lq - lp), q * (lq - lp + T(1)), -q};
    }
    case kTv: {                  // 1/2 |p - q|; g = -1/2 sign(p - q); f' = 1/2 sign(p - q)
      const T sign = p > q ? T(1) : (p < q ? T(-1) : T(0));
      return {T(0.5) * std::fabs(p - q), T(-0.5) * q * sign, T(0.5) * p * sign};
    }
    case kHellinger: {           // (sqrt p - sqrt q)^2; g = 1 - sqrt(p / q); f' = 1 - sqrt(q / p)
      const T root_p = has_p ? std::exp(T(0.5) * lp) : T(0), root_q = has_q ? std::exp(T(0.5) * lq) : T(0);
      const T root_pq = (has_p && has_q) ? std::exp(T(0.5) * (lp + lq)) : T(0);
      const T gap = root_p - root_q;
      return {gap * gap, q - root_pq, p - root_pq};
    }
    case kJs: {                  // m = (p + q) / 2; g = 1/2 log(q / m); f' = 1/2 log(p / m)
      if (!has_p && !has_q) return {T(0), T(0), T(0)};
      const T hi = lp > lq ? lp : lq, lo = lp > lq ? lq : lp;
      const T log_m = hi + std::log1p(std::exp(lo - hi)) - T(0.69314718055994530942);
      const T p_part = has_p ? p * (lp - log_m) : T(0), q_part = has_q ? q * (lq - log_m) : T(0);
      return {T(0.5) * (p_part + q_part), T(0.5) * q_part, T(0.5) * p_part};
    }
    case kChi2: {                // (p - q)^2 / q; g = 1 - (p / q)^2; f' = 2 (p / q - 1)
      const T p2_over_q = has_p ? (has_q ? std::exp(T(2) * lp - lq) : pos_inf<T>()) : T(0);
      const T gap = std::fabs(p - q);
      T term = T(0);
      if (gap != T(0)) term = has_q ? std::exp(T(2) * std::log(gap) - lq) : pos_inf<T>();
      if (!has_q) return {term, T(0), T(0)};            // q = 0 < p: an infinite constant term
      return {term, q - p2_over_q, T(2) * (p2_over_q - p)};
    }
    default: {
      const T nan = unknown_code<T>();
      return {nan, nan, nan};
    }
  }
}

}  // namespace icon
