// The f-divergence row loops of the CPU kernel (DESIGN.md §1.1): per pair q~ f(r), q g and p f'
// (the products of csrc/divergence_math.h's f_pair_terms), summed over a row. The divergence,
// whether log p is exact (an Affinity target with alpha = 0) and whether beta > 0 are template
// parameters, every branch is a select and exp/log are the vectorisable icon::vexp/vlog, so the
// `omp simd` loops run as SIMD code (scalar std::exp/std::log per pair made reverse KL and JS
// cost 1.2-2x the forward KL of the same configuration). Sums run in blocks of kSumBlock in T,
// the blocks in double, as the label rows do. double inputs take std::exp/std::log (the
// precision path); tests check the float64 results against the dense reference to 1e-9.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_label_rows.h"   // kSumBlock
#include "divergence_math.h"
#include "fast_math.h"

namespace icon {

// One row: log q = s[j] - lse (j != self), the target row p (normalised, 0 off the valid set) and,
// when log p is exact, log p = t[j] + log_p_shift.
template <typename T>
struct FRow {
  const T* s;
  T lse;
  const T* p;
  const T* t;
  T log_p_shift;
  int64_t m, self;
  T alpha, beta, mv;
};

struct FRowSums {
  double loss, gamma, phi, p_sum;   // sum_j q~ f, Gamma = sum_j q g, sum_j p f', sum_j p
};

template <typename T>
ICON_SIMD_INLINE T vsel(bool c, T a, T b) { return c ? a : b; }

// q~ f, q~ g, p~ f' of divergence D from p~, q~ and their logs (-inf where 0): f_pair_terms with
// selects instead of branches (a NaN log counts as present, so NaN reaches the loss).
template <typename T, int D>
ICON_SIMD_INLINE PairTerms<T> f_terms_simd(T p, T q, T lp, T lq) {
  const T inf = std::numeric_limits<T>::infinity();
  const bool has_p = !(lp == -inf), has_q = !(lq == -inf);
  if constexpr (D == kReverseKl) {
    const T term = vsel(has_q, vsel(has_p, q * (lq - lp), inf), T(0));
    const T q_g = vsel(has_q, vsel(has_p, q * (lq - lp + T(1)), inf), T(0));
    return {term, q_g, -q};
  } else if constexpr (D == kTv) {
    const T sign = vsel(p > q, T(1), vsel(p < q, T(-1), T(0)));
    return {T(0.5) * std::fabs(p - q), T(-0.5) * q * sign, T(0.5) * p * sign};
  } else if constexpr (D == kHellinger) {
    const T root_p = vsel(has_p, vexp(T(0.5) * lp), T(0)), root_q = vsel(has_q, vexp(T(0.5) * lq), T(0));
    const T root_pq = root_p * root_q;
    const T gap = root_p - root_q;
    return {gap * gap, q - root_pq, p - root_pq};
  } else if constexpr (D == kJs) {
    const T hi = vsel(lp > lq, lp, lq), lo = vsel(lp > lq, lq, lp);
    // one side 0 (lo = -inf): exp(lo - hi) = 0 and log m = hi - log 2; both 0: NaN, masked below
    const T log_m = hi + vlog(T(1) + vexp(lo - hi)) - T(0.69314718055994530942);
    const T p_part = vsel(has_p, p * (lp - log_m), T(0)), q_part = vsel(has_q, q * (lq - log_m), T(0));
    const bool none = !has_p && !has_q;
    return {vsel(none, T(0), T(0.5) * (p_part + q_part)), vsel(none, T(0), T(0.5) * q_part),
            vsel(none, T(0), T(0.5) * p_part)};
  } else if constexpr (D == kChi2) {
    const T p2_over_q = vsel(has_p, vsel(has_q, vexp(T(2) * lp - lq), inf), T(0));
    const T gap = std::fabs(p - q);
    const T term = vsel(gap != T(0), vsel(has_q, vexp(T(2) * vlog(gap) - lq), inf), T(0));
    return {term, q - p2_over_q, T(2) * (p2_over_q - p)};
  } else {
    static_assert(D == kReverseKl || D == kTv || D == kHellinger || D == kJs || D == kChi2,
                  "not an f-divergence of divergence_math.h");
    return {T(0), T(0), T(0)};
  }
}

// The sums of one row; q g and p f' per column into qg and pf (0 off the valid set).
template <typename T, int D, bool EXACT, bool BETA>
inline FRowSums f_row_impl(const FRow<T>& r, T* qg, T* pf) {
  const T inf = std::numeric_limits<T>::infinity();
  const T b = r.alpha / r.mv, keep_p = T(1) - r.alpha, keep_q = T(1) - r.beta, bq = r.beta / r.mv;
  FRowSums out{0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < r.m; j0 += kSumBlock) {
    const int64_t j1 = std::min(r.m, j0 + kSumBlock);
    T loss = 0, gamma = 0, phi = 0, p_sum = 0;
#pragma omp simd reduction(+ : loss, gamma, phi, p_sum)
    for (int64_t j = j0; j < j1; ++j) {
      const bool valid = j != r.self;
      const T lq = vsel(valid, r.s[j] - r.lse, -inf);
      const T q = vexp(lq);
      const T pj = r.p[j];
      const T pm = keep_p * pj + b;
      T lp, pr;
      if constexpr (EXACT) {
        lp = vsel(valid, r.t[j] + r.log_p_shift, -inf);
        pr = T(1);
      } else {
        lp = vsel(pm == T(0), -inf, vlog(pm));
        pr = vsel(pm != T(0), pj / pm, T(0));
      }
      T qm = q, lqm = lq, qr = T(1);
      if constexpr (BETA) {
        qm = keep_q * q + bq;
        lqm = vlog(qm);
        qr = q / qm;
      }
      const PairTerms<T> f = f_terms_simd<T, D>(pm, qm, lp, lqm);
      const T qgj = vsel(valid && qr != T(0), qr * f.q_g, T(0));
      const T pfj = vsel(valid && pr != T(0), pr * f.p_fp, T(0));
      loss += vsel(valid, f.term, T(0));
      gamma += qgj;
      phi += pfj;
      p_sum += vsel(valid, pj, T(0));
      qg[j] = qgj;
      pf[j] = pfj;
    }
    out.loss += loss;
    out.gamma += gamma;
    out.phi += phi;
    out.p_sum += p_sum;
  }
  return out;
}

template <typename T, int D>
inline FRowSums f_row_of(const FRow<T>& r, bool exact, T* qg, T* pf) {
  const bool beta = r.beta > T(0);
  if (exact) return beta ? f_row_impl<T, D, true, true>(r, qg, pf) : f_row_impl<T, D, true, false>(r, qg, pf);
  return beta ? f_row_impl<T, D, false, true>(r, qg, pf) : f_row_impl<T, D, false, false>(r, qg, pf);
}

// The row of f-divergence ``divergence``; an unknown code gives NaN sums (the op entry checks codes).
template <typename T>
inline FRowSums f_row(int divergence, const FRow<T>& r, bool exact, T* qg, T* pf) {
  switch (divergence) {
    case kReverseKl: return f_row_of<T, kReverseKl>(r, exact, qg, pf);
    case kTv: return f_row_of<T, kTv>(r, exact, qg, pf);
    case kHellinger: return f_row_of<T, kHellinger>(r, exact, qg, pf);
    case kJs: return f_row_of<T, kJs>(r, exact, qg, pf);
    case kChi2: return f_row_of<T, kChi2>(r, exact, qg, pf);
    default: {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      return {nan, nan, nan, nan};
    }
  }
}

}  // namespace icon
