// The divergence row loops of the CPU kernel (DESIGN.md §1, §1.1): per pair q~ f(r), q g and p f'
// (the products of csrc/divergence_math.h's f_pair_terms; forward KL and cross-entropy as two
// more rows of f_terms_simd), summed over a row. The divergence, how log p is formed, whether
// beta > 0 and whether the backward's per-column values are stored are template parameters,
// every branch is a select and exp/log are the vectorisable icon::vexp/vlog, so the `omp simd`
// loops run as SIMD code. Sums run in blocks of kSumBlock in T, the blocks in double, as the
// label rows do. double inputs take std::exp/std::log (the precision path); tests check the
// float64 results against the dense formula to 1e-9.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_label_rows.h"   // kSumBlock, row_max, blocked_exp_sum
#include "divergence_math.h"
#include "fast_math.h"

namespace icon {

// How a row's log p~ is formed: log of p~ per pair; exact, t[j] + log_p_shift (an Affinity target
// with alpha = 0, finite where p underflows); two-level, log_pos where p != 0 and log_zero
// elsewhere (a Labels row, whose positives share p = 1/K: no log per pair); or sparse, t[j] read
// from a row of log p~ that the target wrote (a Neighbors row: log(alpha / M') off its k entries,
// so k logs per row instead of one per pair).
enum LogP : int { kLogOfP = 0, kExactLogP = 1, kTwoLevelLogP = 2, kSparseLogP = 3 };

// One row: log q = (s[j] - lse) - lse_lo (j != self; lse_lo: the LSE's rounding residual where a
// schedule keeps it, cpu_symmetric_label_family.h), the target row p (normalised, 0 off the valid
// set).
template <typename T>
struct FRow {
  const T* s;
  T lse;
  const T* p;
  const T* t;
  T log_p_shift;
  int64_t m, self;
  T alpha, beta, mv;
  T log_pos = 0, log_zero = 0;     // kTwoLevelLogP
  T lse_lo = 0;
};

struct FRowSums {
  double loss, gamma, phi, p_sum, q_sum;   // sum_j q~ f, sum_j q g, sum_j p f', sum_j p, sum_j q
};

template <typename T>
ICON_SIMD_INLINE T vsel(bool c, T a, T b) { return c ? a : b; }

// q~ f, q~ g, p~ f' of divergence D from p~, q~ and their logs (-inf where 0): f_pair_terms with
// selects instead of branches (a NaN log counts as present, so NaN reaches the loss).
template <typename T, int D>
ICON_SIMD_INLINE PairTerms<T> f_terms_simd(T p, T q, T lp, T lq) {
  const T inf = std::numeric_limits<T>::infinity();
  const bool has_p = !(lp == -inf), has_q = !(lq == -inf);
  if constexpr (D == kKl) {          // p (log p - log q); g = -r; f' = log r + 1 (p f' = p (log p - log q + 1))
    // gated on p, not on its log: an exact log p (kExactLogP) is finite where p underflowed
    const T gap = lp - lq;
    return {vsel(p != T(0), p * gap, T(0)), -p, vsel(p != T(0), p * (gap + T(1)), T(0))};
  } else if constexpr (D == kCrossEntropy) {   // -p log q: KL plus the target's entropy, so the
    // same g; its target gradient has h = -log q (p f' = -p log q)
    const T cross = vsel(p != T(0), -p * lq, T(0));
    return {cross, -p, cross};
  } else if constexpr (D == kReverseKl) {
    const T term = vsel(has_q, vsel(has_p, q * (lq - lp), inf), T(0));
    // an infinite term (p~ = 0 < q~) is a constant, as in the reference: no gradient
    const T q_g = vsel(has_q && has_p, q * (lq - lp + T(1)), T(0));
    return {term, q_g, vsel(has_p, -q, T(0))};
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
    return {term, vsel(has_q, q - p2_over_q, T(0)), vsel(has_q, T(2) * (p2_over_q - p), T(0))};
  } else {
    static_assert(D == kKl || D == kCrossEntropy || D == kReverseKl || D == kTv || D == kHellinger || D == kJs || D == kChi2,
                  "not an f-divergence of divergence_math.h");
    return {T(0), T(0), T(0)};
  }
}

// The sums over the columns [j0, j1) of a row, none of them the self column: no index mask in the
// loop (an int64 compare per column kept GCC 12 from vectorising the reverse KL rows, which then
// ran scalar at twice the forward KL's cost). q g and p f' per column into qg and pf.
// Forward KL and cross-entropy need no q without beta (q g = -p~, and the term takes log q);
// The forward only sums (kRowSums); the backward stores q and q g per column and skips the loss
// (kRowLearned: forward KL's log p~ is then dead code, one vlog per pair less on Neighbors and
// Dense rows), and p f' too where the target needs a gradient (kRowBoth).
enum FRowMode : int { kRowSums = 0, kRowLearned = 1, kRowBoth = 2 };

template <int D, bool BETA>
constexpr bool f_row_needs_q() { return BETA || !(D == kKl || D == kCrossEntropy); }

// One pair's q, q~ f, q g and p f' from its learned logit s, target weight pj and target logit
// tj (f_row_span's per-column values, FRow's fields; the joint family schedule's per pair,
// cpu_symmetric_joint_family.h). NEED_Q: q is computed (else 0: forward KL and cross-entropy
// without beta read log q only). Scalars by value: the callers' loops write arrays that a
// reference might alias, which kept GCC from hoisting the loads.
template <typename T>
struct FPair {
  T q, term, qg, pf;
};

template <typename T, int D, int LOGP, bool BETA, bool NEED_Q>
ICON_SIMD_INLINE FPair<T> f_pair(T s, T pj, T tj, T lse, T lse_lo, T log_p_shift, T log_pos, T log_zero, T b,
                                 T keep_p, T keep_q, T bq) {
  const T inf = std::numeric_limits<T>::infinity();
  const T lq = (s - lse) - lse_lo;
  const T q = NEED_Q ? vexp(lq) : T(0);
  const T pm = keep_p * pj + b;
  T lp, pr;
  if constexpr (LOGP == kExactLogP) {
    lp = tj + log_p_shift;
    pr = T(1);
  } else if constexpr (LOGP == kSparseLogP) {
    lp = tj;
    pr = vsel(pm != T(0), pj / pm, T(0));
  } else if constexpr (LOGP == kTwoLevelLogP) {
    lp = vsel(pj != T(0), log_pos, log_zero);
    pr = vsel(pm != T(0), pj / pm, T(0));
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
  return {q, f.term, vsel(qr != T(0), qr * f.q_g, T(0)), vsel(pr != T(0), pr * f.p_fp, T(0))};
}

template <typename T, int D, int LOGP, bool BETA, int MODE>
ICON_SIMD_INLINE void f_row_span(const FRow<T>& r, int64_t j0, int64_t j1, T* qg, T* pf, T* q_out, FRowSums* out) {
  constexpr bool kNeedQ = MODE != kRowSums || f_row_needs_q<D, BETA>();
  const T b = r.alpha / r.mv, keep_p = T(1) - r.alpha, keep_q = T(1) - r.beta, bq = r.beta / r.mv;
  // the row's fields in locals: qg and pf are written in the loop and might alias r (a
  // reference), which kept GCC from hoisting the loads (gathers in the SIMD loop)
  const T* const s_row = r.s;
  const T* const p_row = r.p;
  const T* const t_row = r.t;
  const T lse = r.lse, lse_lo = r.lse_lo, log_p_shift = r.log_p_shift, log_pos = r.log_pos, log_zero = r.log_zero;
  T loss = 0, gamma = 0, phi = 0, p_sum = 0, q_sum = 0;
#pragma omp simd reduction(+ : loss, gamma, phi, p_sum, q_sum)
  for (int64_t j = j0; j < j1; ++j) {
    const T pj = p_row[j];
    // t only where the mode reads it: Labels and Dense rows have none (a null r.t)
    T tj = T(0);
    if constexpr (LOGP == kExactLogP || LOGP == kSparseLogP) tj = t_row[j];
    const FPair<T> e = f_pair<T, D, LOGP, BETA, kNeedQ>(s_row[j], pj, tj, lse, lse_lo, log_p_shift, log_pos, log_zero,
                                                        b, keep_p, keep_q, bq);
    if constexpr (MODE == kRowSums) loss += e.term;
    gamma += e.qg;
    if constexpr (MODE != kRowLearned) phi += e.pf;
    p_sum += pj;
    q_sum += e.q;
    if constexpr (MODE != kRowSums) {
      qg[j] = e.qg;
      q_out[j] = e.q;
    }
    if constexpr (MODE == kRowBoth) pf[j] = e.pf;
  }
  out->loss += loss;
  out->gamma += gamma;
  out->phi += phi;
  out->p_sum += p_sum;
  out->q_sum += q_sum;
}

// The sums of one row; in the backward modes q, q g (and p f') per column into q_out, qg (and
// pf), 0 at the self column, which adds nothing. Blocks of kSumBlock columns are summed in T, the blocks in
// double; a block holding the self column is summed as the two spans around it.
template <typename T, int D, int LOGP, bool BETA, int MODE>
inline FRowSums f_row_impl(const FRow<T>& r, T* qg, T* pf, T* q_out) {
  const int64_t m = r.m, self = r.self;
  FRowSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    if (self >= j0 && self < j1) {
      f_row_span<T, D, LOGP, BETA, MODE>(r, j0, self, qg, pf, q_out, &out);
      if constexpr (MODE != kRowSums) qg[self] = q_out[self] = T(0);
      if constexpr (MODE == kRowBoth) pf[self] = T(0);
      f_row_span<T, D, LOGP, BETA, MODE>(r, self + 1, j1, qg, pf, q_out, &out);
    } else {
      f_row_span<T, D, LOGP, BETA, MODE>(r, j0, j1, qg, pf, q_out, &out);
    }
  }
  return out;
}

template <typename T, int D, int LOGP>
inline FRowSums f_row_with(const FRow<T>& r, T* qg, T* pf, T* q_out) {
  const bool beta = r.beta > T(0);
  if (q_out == nullptr)
    return beta ? f_row_impl<T, D, LOGP, true, kRowSums>(r, qg, pf, q_out)
                : f_row_impl<T, D, LOGP, false, kRowSums>(r, qg, pf, q_out);
  if (pf == nullptr)
    return beta ? f_row_impl<T, D, LOGP, true, kRowLearned>(r, qg, pf, q_out)
                : f_row_impl<T, D, LOGP, false, kRowLearned>(r, qg, pf, q_out);
  return beta ? f_row_impl<T, D, LOGP, true, kRowBoth>(r, qg, pf, q_out)
              : f_row_impl<T, D, LOGP, false, kRowBoth>(r, qg, pf, q_out);
}

template <typename T, int D>
inline FRowSums f_row_of(const FRow<T>& r, int log_p, T* qg, T* pf, T* q_out) {
  if (log_p == kExactLogP) return f_row_with<T, D, kExactLogP>(r, qg, pf, q_out);
  if (log_p == kTwoLevelLogP) return f_row_with<T, D, kTwoLevelLogP>(r, qg, pf, q_out);
  if (log_p == kSparseLogP) return f_row_with<T, D, kSparseLogP>(r, qg, pf, q_out);
  if (log_p == kLogOfP) return f_row_with<T, D, kLogOfP>(r, qg, pf, q_out);
  const double nan = std::numeric_limits<double>::quiet_NaN();   // an unknown mode (the callers pass
  return {nan, nan, nan, nan, nan};                                // log_p_mode_of's): NaN, never another
}

// The row of divergence ``divergence`` (KL and cross-entropy included). The backward passes q_out
// and qg (and pf where the target needs a gradient; no loss then); the forward passes nullptr and
// gets the sums only. An unknown code gives NaN sums (the op entry checks codes).
template <typename T>
inline FRowSums f_row(int divergence, const FRow<T>& r, int log_p, T* qg, T* pf, T* q_out = nullptr) {
  switch (divergence) {
    case kKl: return f_row_of<T, kKl>(r, log_p, qg, pf, q_out);
    case kCrossEntropy: return f_row_of<T, kCrossEntropy>(r, log_p, qg, pf, q_out);
    case kReverseKl: return f_row_of<T, kReverseKl>(r, log_p, qg, pf, q_out);
    case kTv: return f_row_of<T, kTv>(r, log_p, qg, pf, q_out);
    case kHellinger: return f_row_of<T, kHellinger>(r, log_p, qg, pf, q_out);
    case kJs: return f_row_of<T, kJs>(r, log_p, qg, pf, q_out);
    case kChi2: return f_row_of<T, kChi2>(r, log_p, qg, pf, q_out);
    default: {
      const double nan = std::numeric_limits<double>::quiet_NaN();
      return {nan, nan, nan, nan, nan};
    }
  }
}

// The LSE over j != self of a row of logits s (s[self] becomes -inf), in SIMD and unrounded
// (double): a NaN logit gives NaN, a row without a valid column -inf.
template <typename T>
inline double simd_row_lse_wide(T* s, int64_t self, int64_t m) {
  const T inf = std::numeric_limits<T>::infinity();
  if (self >= 0) s[self] = -inf;
  const T mx = row_max(s, m);
  if (mx == -inf) {
    bool nan = false;
    for (int64_t j = 0; j < m; ++j) nan |= std::isnan(s[j]);
    return nan ? std::numeric_limits<double>::quiet_NaN() : double(mx);
  }
  return double(mx) + std::log(blocked_exp_sum(s, m, mx));
}

// simd_row_lse_wide rounded to T.
template <typename T>
inline T simd_row_lse(T* s, int64_t self, int64_t m) {
  return T(simd_row_lse_wide<T>(s, self, m));
}

}  // namespace icon
