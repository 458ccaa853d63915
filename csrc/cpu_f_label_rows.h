// The f-divergence rows of a Labels target with alpha = beta = 0 (InfoNCE / SupCon with divergence
// tv, hellinger, js or chi2; DESIGN.md §1.1) for the dot and Gaussian kernels, in closed form
// over the negatives.
//
// p~ is 1/K at the K positives of a row and exactly 0 at the other valid columns (the negatives).
// At p~ = 0 each of these divergences has q~ f = q g = c q and p f' = 0 with a constant c
// (js: log(2)/2, tv: 1/2, hellinger and chi2: 1; DESIGN.md's table at p~ = 0), so a negative
// needs its q alone: one exp per pair, as forward KL. The logs of the mixture (js), the roots
// (hellinger) or the ratios (chi2) are needed at the K positives only, which are taken in scalar
// double. With q normalised over the row, d_j = q_j (c - g_j) at a positive j and D = sum_pos d_j:
//   L_i     = c Q_neg + sum_pos q~ f                         (Q_neg = sum of q over the negatives)
//   Gamma_i = sum_j q g = c - D
//   G_j     = g_i q_j (g_j - Gamma_i) = g_i q_j D            at a negative
//                                     = g_i (q_j D - d_j)     at a positive
// d_j is formed directly (js: q/2 softplus(log p - log q); tv: q (1 + sign(p - q)) / 2;
// hellinger: sqrt(p q); chi2: p^2 / q), never as c q - q g, which cancels. Rows that are not
// finite (a NaN or infinite logit, no valid column, a non-finite LSE or upstream gradient) are
// left to the family rows (cpu_family_rows.h): these functions say so before they change anything.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_label_rows.h"   // LabelRow, LabelGradSums, kSumBlock
#include "divergence_math.h"
#include "fast_math.h"

namespace icon {

// The divergences with a constant g at p~ = 0 (reverse KL is +inf there: its op entry refuses
// Labels with alpha = 0).
inline bool has_label_closed_form(int divergence) {
  return divergence == kTv || divergence == kHellinger || divergence == kJs || divergence == kChi2;
}

// c = g at p~ = 0 (and q~ f = c q there).
template <int D>
constexpr double label_neg_g() {
  return D == kJs ? 0.34657359027997265471 : (D == kTv ? 0.5 : 1.0);
}

// d = q (c - g) at a positive pair, from p, q and their logs (lq = -inf where q = 0); 0 where q
// is 0, as f_pair_terms's q g (0 there).
template <int D>
inline double label_pos_d(double p, double q, double lp, double lq) {
  if (!(lq > -std::numeric_limits<double>::infinity()) && !std::isnan(lq)) return 0.0;
  if constexpr (D == kJs) {   // c - g = 1/2 log((p + q) / q) = 1/2 softplus(lp - lq)
    const double x = lp - lq;
    const double sp = x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
    return 0.5 * q * sp;
  } else if constexpr (D == kTv) {   // c - g = 1/2 (1 + sign(p - q))
    return p > q ? q : (p < q ? 0.0 : 0.5 * q);
  } else if constexpr (D == kHellinger) {   // c - g = sqrt(p / q)
    return std::exp(0.5 * (lp + lq));
  } else {   // chi2: c - g = (p / q)^2
    return std::exp(2.0 * lp - lq);
  }
}

// The positives of row r (self excluded) into idx[0..k); returns k. Blocks without one are
// skipped after a SIMD compare, so a row of few positives costs about one pass of compares.
inline int64_t label_positives(const LabelRow& r, int64_t* idx) {
  constexpr int64_t kBlock = 64;
  const int64_t* const col_labels = r.col_labels;   // locals: idx is written below
  const int64_t label = r.label, self = r.self, m = r.m;
  int64_t k = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kBlock) {
    const int64_t j1 = std::min(m, j0 + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < j1; ++j) hit |= int(col_labels[j] == label);
    if (!hit) continue;
    for (int64_t j = j0; j < j1; ++j) {   // idx[k] with k <= j < m: in bounds
      idx[k] = j;
      k += int64_t(col_labels[j] == label && j != self);
    }
  }
  return k;
}

// The forward of one row from its logits s (the self entry becomes -inf): loss, included, LSE
// and Gamma. Returns false, with s otherwise unchanged, where the row is left to the family rows.
template <typename T, int D>
inline bool f_label_forward_of(const LabelRow& r, T* s, int64_t* idx, T* loss, bool* included, T* lse_out,
                               T* gamma_out) {
  const T inf = std::numeric_limits<T>::infinity();
  if (r.self >= 0) s[r.self] = -inf;
  T mx = -inf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < r.m; ++j) mx = s[j] > mx ? s[j] : mx;
  if (!std::isfinite(mx)) return false;
  const int64_t k = label_positives(r, idx);
  // sum over the negatives of e^(s - max); the self entry is -inf (0) whatever its label
  const int64_t* const col_labels = r.col_labels;
  const int64_t label = r.label, m = r.m;
  double se_neg = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bse = 0;
#pragma omp simd reduction(+ : bse)
    for (int64_t j = j0; j < j1; ++j) bse += col_labels[j] != label ? vexp(s[j] - mx) : T(0);
    se_neg += bse;
  }
  double se_pos = 0;
  for (int64_t t = 0; t < k; ++t) se_pos += std::exp(double(s[idx[t]]) - double(mx));
  const double se = se_neg + se_pos;
  const double lse = double(mx) + std::log(se);
  const double c = label_neg_g<D>();
  double row_loss = c * (se_neg / se), d_sum = 0;
  if (k > 0) {
    const double p = 1.0 / double(k), lp = -std::log(double(k));
    for (int64_t t = 0; t < k; ++t) {
      const double lq = double(s[idx[t]]) - lse, q = std::exp(lq);
      row_loss += f_pair_terms<double>(D, p, q, lp, lq).term;
      d_sum += label_pos_d<D>(p, q, lp, lq);
    }
  }
  const bool inc = k > 0 && r.m_valid > 0;
  *included = inc;
  *loss = inc ? T(row_loss) : T(0);
  *lse_out = T(lse);
  *gamma_out = T(c - d_sum);
  return true;
}

template <typename T>
inline bool f_label_forward(int divergence, const LabelRow& r, T* s, int64_t* idx, T* loss, bool* included,
                            T* lse_out, T* gamma_out) {
  switch (divergence) {
    case kTv: return f_label_forward_of<T, kTv>(r, s, idx, loss, included, lse_out, gamma_out);
    case kHellinger: return f_label_forward_of<T, kHellinger>(r, s, idx, loss, included, lse_out, gamma_out);
    case kJs: return f_label_forward_of<T, kJs>(r, s, idx, loss, included, lse_out, gamma_out);
    case kChi2: return f_label_forward_of<T, kChi2>(r, s, idx, loss, included, lse_out, gamma_out);
    default: return false;
  }
}

// s from a Gram entry w as fast_logits computes it (inv = 1 / prm, c = -1 / (2 prm^2)).
template <typename T, int K>
ICON_SIMD_INLINE T label_logit(T w, T b_sq, T a_sq, T inv, T c) {
  if constexpr (K == kDot) {
    return w * inv;
  } else {
    const T sq = a_sq + b_sq - T(2) * w;
    return (sq < T(0) ? T(0) : sq) * c;
  }
}

// The backward of one row: W = G w_scale in place of the Gram row w, from the saved LSE and the
// upstream gradient g, in one SIMD pass with one exp per pair (as fast_label_backward). The q of
// that pass are exp(s - LSE) with the LSE rounded to T, so they sum to Z = 1 only up to ~|LSE|
// ulps; where Z is off by more than 4 ulps the row is renormalised to q / Z afterwards: the
// negatives' G scale by one factor (no exp again) and the positives are recomputed, so that
// sum_j G = 0 and Gamma is the q-weighted mean of g over these very q (learned_backward's rule, cpu_family_rows.h).
// pos_s: scratch of m doubles. Returns false, with w unchanged, where the row is left to the
// family rows; else *out gets the row's sums (fast_label_backward's).
template <typename T, int K, int D>
inline bool f_label_backward_of(const LabelRow& r, T* w, const T* b_sq, T a_sq, T prm, T lse, T g,
                                int64_t* idx, double* pos_s, LabelGradSums* out) {
  if (!std::isfinite(lse) || !std::isfinite(g)) return false;
  const int64_t k = label_positives(r, idx);
  if (k == 0) return false;
  const T inv = T(1) / prm, cg = T(-1) / (T(2) * prm * prm), w_scale = K == kDot ? inv : inv * inv;
  const double p = 1.0 / double(k), lp = -std::log(double(k)), lse_d = double(lse);
  double q_pos = 0, d_first = 0;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t j = idx[t];
    pos_s[t] = double(label_logit<T, K>(w[j], K == kDot ? T(0) : b_sq[j], a_sq, inv, cg));
    const double lq = pos_s[t] - lse_d, q = std::exp(lq);
    q_pos += q;
    d_first += label_pos_d<D>(p, q, lp, lq);
  }
  // the negatives' G = g D q; D = 1 for this pass where D is 0 or not finite (scaled after)
  const double d_used = (d_first > 0 && std::isfinite(d_first)) ? d_first : 1.0;
  const T gd = T(double(g) * d_used);
  const T shift = lse;
  // the row's fields in locals: w is written in the loop, and r (a reference) might alias it
  const int64_t* const col_labels = r.col_labels;
  const int64_t label = r.label, self = r.self, m = r.m;
  // the products below are taken unconditionally, with the basis clamped from below: GCC 12.2 at
  // -O3 -fopenmp -march=native (AVX-512) miscompiled the select form `grad == 0 ? 0 : grad * basis`
  // in this reduction (dL/dtemperature 2e35 instead of 0.13 on a 200-column fp32 row). grad = g D q
  // is 0 wherever q is, so a clamped -inf basis only ever meets grad = 0 (a +inf logit, as the
  // oracle's, gives NaN)
  const T lowest = std::numeric_limits<T>::lowest();
  double dp = 0, gs = 0, qb = 0, qs = 0, rs = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bdp = 0, bgs = 0, bqb = 0, bqs = 0, brs = 0;
#pragma omp simd reduction(+ : bdp, bgs, bqb, bqs, brs)
    for (int64_t j = j0; j < j1; ++j) {
      const T s = label_logit<T, K>(w[j], K == kDot ? T(0) : b_sq[j], a_sq, inv, cg);
      const bool neg = col_labels[j] != label && j != self;
      const T q = neg ? vexp(s - lse) : T(0);
      const T grad = gd * q;
      const T basis = std::max(s - shift, lowest);   // s = -inf only where q = 0, so grad = 0 there
      bdp += grad * basis;
      bgs += grad;
      bqb += q * basis;
      bqs += q;
      const T wj = grad * w_scale;
      w[j] = wj;
      brs += wj;
    }
    dp += bdp;
    gs += bgs;
    qb += bqb;
    qs += bqs;
    rs += brs;
  }
  const double z = qs + q_pos;
  const bool fix = z > 0 && std::isfinite(z) &&
                   std::abs(z - 1) > 4 * double(std::numeric_limits<T>::epsilon());
  const double zf = fix ? z : 1.0, log_zf = fix ? std::log(z) : 0.0;
  double d_final = d_first;
  if (fix) {
    d_final = 0;
    for (int64_t t = 0; t < k; ++t) {
      const double lq = (pos_s[t] - lse_d) - log_zf;
      d_final += label_pos_d<D>(p, std::exp(lq), lp, lq);
    }
  }
  const double ratio = d_final / (zf * d_used);
  if (ratio != 1.0) {
    const T rt = T(ratio);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) w[j] *= rt;
    dp *= ratio;
    gs *= ratio;
    rs *= ratio;
  }
  qb /= zf;
  qs /= zf;
  const double gg = double(g), shift_d = double(shift);
  for (int64_t t = 0; t < k; ++t) {
    const int64_t j = idx[t];
    const double lq = (pos_s[t] - lse_d) - log_zf, q = std::exp(lq);
    const double grad = gg * (q * d_final - label_pos_d<D>(p, q, lp, lq));
    const double basis = pos_s[t] - shift_d;
    if (grad != 0) { dp += grad * basis; gs += grad; }
    if (q != 0) { qb += q * basis; qs += q; }
    const T wj = T(grad * double(w_scale));
    w[j] = wj;
    rs += double(wj);
  }
  *out = {dp, gs, qb, qs, rs};
  return true;
}

template <typename T, int K>
inline bool f_label_backward_k(int divergence, const LabelRow& r, T* w, const T* b_sq, T a_sq, T prm, T lse,
                               T g, int64_t* idx, double* pos_s, LabelGradSums* out) {
  switch (divergence) {
    case kTv: return f_label_backward_of<T, K, kTv>(r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
    case kHellinger: return f_label_backward_of<T, K, kHellinger>(r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
    case kJs: return f_label_backward_of<T, K, kJs>(r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
    case kChi2: return f_label_backward_of<T, K, kChi2>(r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
    default: return false;
  }
}

// The row's backward for the dot (kernel == kDot) or Gaussian kernel; see f_label_backward_of.
template <typename T>
inline bool f_label_backward(int divergence, int kernel, const LabelRow& r, T* w, const T* b_sq, T a_sq, T prm,
                             T lse, T g, int64_t* idx, double* pos_s, LabelGradSums* out) {
  if (kernel == kDot) return f_label_backward_k<T, kDot>(divergence, r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
  if (kernel == kGaussian)
    return f_label_backward_k<T, kGaussian>(divergence, r, w, b_sq, a_sq, prm, lse, g, idx, pos_s, out);
  return false;
}

}  // namespace icon
