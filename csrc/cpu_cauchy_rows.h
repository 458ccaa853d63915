// Student-t with nu = 1 (t-SNE's Cauchy kernel) on the family rows: e^{s_ij} = 1 / (1 + d²_ij), so
// (issue 17 item 1) a row's LSE is the log of a sum of reciprocals (no exp, no max pass: every
// term is at most 1), and where dL/ds does not depend on log q (forward KL and cross-entropy
// without beta, and no target or dof gradient; total variation without alpha or beta in the
// symmetric Affinity family schedule, cauchy_tv_row) the backward takes q = r e^{-LSE} and
// W = 2 G r from one reciprocal r per pair, instead of a log1p, an exp and a division.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_family_rows.h"   // KernelRow<T, kStudentT>, squared_distance, vlog1p
#include "cpu_label_rows.h"    // kSumBlock

namespace icon {

// Logits s = -log1p(d²) of a row (in place over its Gram entries ab allowed) and its LSE over
// j != self, unrounded: log sum_j 1 / (1 + d²_j). NaN stays NaN; a row without a valid column, or
// whose distances are all infinite, has -inf.
template <typename T>
inline double cauchy_logits_lse(const T* ab, T* s, const T* b_sq, T a_sq, int64_t self, int64_t m) {
  double total = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bt = 0;
#pragma omp simd reduction(+ : bt)
    for (int64_t j = j0; j < j1; ++j) {
      const T a = squared_distance(ab[j], a_sq, b_sq[j]);
      s[j] = -vlog1p(a);
      bt += j != self ? T(1) / (T(1) + a) : T(0);
    }
    total += bt;
  }
  return std::log(total);   // log 0 = -inf; NaN stays NaN
}

// sum_j 1 / (1 + d²_j) over j != self of a row's Gram entries ab, blocked as cauchy_logits_lse's
// sum, unlogged: the symmetric schedule merges a row's column blocks before its log
// (cpu_symmetric_target_kl.h), with no logit formed.
template <typename T>
inline double cauchy_reciprocal_sum(const T* ab, const T* b_sq, T a_sq, int64_t self, int64_t m) {
  double total = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bt = 0;
#pragma omp simd reduction(+ : bt)
    for (int64_t j = j0; j < j1; ++j) bt += j != self ? T(1) / (T(1) + squared_distance(ab[j], a_sq, b_sq[j])) : T(0);
    total += bt;
  }
  return total;
}

// The backward rows' reciprocals r = 1 / (1 + d²) of a row's Gram entries ab (0 at self).
template <typename T>
inline void cauchy_reciprocals(const T* ab, T* r, const T* b_sq, T a_sq, int64_t self, int64_t m) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) r[j] = T(1) / (T(1) + squared_distance(ab[j], a_sq, b_sq[j]));
  if (self >= 0) r[self] = T(0);
}

// What f_row gives forward KL and cross-entropy without beta in the backward (kRowLearned), from
// the reciprocals: q = r e^{-lse} and q g = -p~ per column (0 at self; r is 0 there), and the
// row sums gamma = sum q g, q_sum and p_sum. mv: the mixtures' size (alpha / mv is p~'s floor).
// exp_neg_lse: e^{-LSE} (cauchy_learned_row's, or the symmetric schedule's from the LSE with its
// rounding residual, so that the q of a row sum to 1 with no renormalisation).
template <typename T>
inline FRowSums cauchy_learned_row_scaled(const T* r, T exp_neg_lse, const T* p, int64_t self, int64_t m, T alpha,
                                          T mv, T* q_out, T* qg) {
  const T scale = exp_neg_lse, keep = T(1) - alpha, b = alpha / mv;
  FRowSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T gamma = 0, q_sum = 0, p_sum = 0;
#pragma omp simd reduction(+ : gamma, q_sum, p_sum)
    for (int64_t j = j0; j < j1; ++j) {
      const T q = r[j] * scale;
      const T g = j != self ? -(keep * p[j] + b) : T(0);
      q_out[j] = q;
      qg[j] = g;
      gamma += g;
      q_sum += q;
      p_sum += p[j];
    }
    out.gamma += gamma;
    out.q_sum += q_sum;
    out.p_sum += p_sum;
  }
  return out;
}

template <typename T>
inline FRowSums cauchy_learned_row(const T* r, T lse, const T* p, int64_t self, int64_t m, T alpha, T mv,
                                   T* q_out, T* qg) {
  return cauchy_learned_row_scaled<T>(r, std::exp(-lse), p, self, m, alpha, mv, q_out, qg);
}

// Total variation's row sums from the reciprocals, alpha = beta = 0 (p~ = p, q~ = q): q = r scale
// (scale = e^{-LSE}) and |p - q| read no log, so the row takes no log and no exp per pair, where
// f_row forms q = exp(s - LSE) from the logit s = -log1p(d²). The terms as f_terms_simd's for TV:
// loss 1/2 |p - q|, q g = -1/2 q sign(p - q); the self column adds nothing (r = p = 0 there).
// STORE: q and q g per column into q_out and qg (the backward).
template <typename T, bool STORE>
inline FRowSums cauchy_tv_row(const T* r, T scale, const T* p, int64_t m, T* q_out, T* qg) {
  FRowSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T loss = 0, gamma = 0, q_sum = 0, p_sum = 0;
#pragma omp simd reduction(+ : loss, gamma, q_sum, p_sum)
    for (int64_t j = j0; j < j1; ++j) {
      const T q = r[j] * scale, pj = p[j];
      const T sign = pj > q ? T(1) : (pj < q ? T(-1) : T(0));
      const T g = T(-0.5) * q * sign;
      loss += T(0.5) * std::fabs(pj - q);
      gamma += g;
      q_sum += q;
      p_sum += pj;
      if constexpr (STORE) {
        q_out[j] = q;
        qg[j] = g;
      }
    }
    out.loss += loss;
    out.gamma += gamma;
    out.q_sum += q_sum;
    out.p_sum += p_sum;
  }
  return out;
}

// W = 2 G r in place of the row's Gram entries w, with G = scale (q g - q Gamma) and Gamma in two
// parts as learned_backward's (no dof gradient here); returns the row sum of W.
template <typename T>
inline double cauchy_learned_backward(T* w, const T* r, const T* q_row, const T* qg, int64_t m, T scale,
                                      double gamma) {
  const T gamma_hi = T(gamma), gamma_lo = T(gamma - double(gamma_hi));
  double row_sum = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T rs = 0;
#pragma omp simd reduction(+ : rs)
    for (int64_t j = j0; j < j1; ++j) {
      const T q = q_row[j];
      const T grad = scale * ((qg[j] - q * gamma_hi) - q * gamma_lo);
      const T wj = T(2) * grad * r[j];
      w[j] = wj;
      rs += wj;
    }
    row_sum += rs;
  }
  return row_sum;
}

}  // namespace icon
