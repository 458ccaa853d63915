// Fast row loops for the hot case of the CPU kernel: a Labels target with beta = 0 and a dot or
// Gaussian kernel (InfoNCE / SimCLR / SupCon / CLIP). The kernel is a template parameter, the
// self pair is masked by index, and exp is the vectorisable icon::vexp, so `omp simd` loops run
// as SIMD code. Every other case takes the generic per-pair path in cpu_loss.cpp.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"
#include "tile_math.h"

namespace icon {

// s_j in place from Gram entries; the Gaussian clamp keeps NaN.
template <typename T, int K>
inline void fast_logits(T* row, const T* b_sq, T a_sq, T prm, int64_t m) {
  if constexpr (K == kDot) {
    const T inv = T(1) / prm;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) row[j] *= inv;
  } else {
    const T c = T(-1) / (T(2) * prm * prm);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T sq = a_sq + b_sq[j] - T(2) * row[j];
      row[j] = (sq < T(0) ? T(0) : sq) * c;
    }
  }
}

struct LabelRow {
  const int64_t* col_labels;
  int64_t label, m, self;   // self = i when self pairs are excluded, else -1
  double alpha;
  int64_t m_valid;
};

// Positives of a row among its valid columns.
inline int64_t label_count(const LabelRow& r) {
  int64_t k = 0;
#pragma omp simd reduction(+ : k)
  for (int64_t j = 0; j < r.m; ++j) k += r.col_labels[j] == r.label && j != r.self;
  return k;
}

// A row's statistics over its columns (all of them, or one block of them in ring mode, where
// they are merged across blocks): LSE and the sums of s over valid columns and over positives.
template <typename T>
struct LabelSums {
  T lse, sum_s, pos_s;
  int64_t k;
};

// The statistics of the logits s (overwritten: the self entry becomes -inf).
template <typename T>
inline LabelSums<T> label_row_sums(const LabelRow& r, T* s) {
  const int64_t m = r.m;
  T sum_s = 0, pos_s = 0;
  int64_t k = 0;
#pragma omp simd reduction(+ : sum_s, pos_s, k)
  for (int64_t j = 0; j < m; ++j) {
    const bool hit = r.col_labels[j] == r.label && j != r.self;
    const bool valid = j != r.self;
    sum_s += valid ? s[j] : T(0);
    pos_s += hit ? s[j] : T(0);
    k += hit;
  }
  if (r.self >= 0) s[r.self] = -std::numeric_limits<T>::infinity();
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) mx = s[j] > mx ? s[j] : mx;
  T lse;
  if (mx == -std::numeric_limits<T>::infinity()) {
    lse = std::isnan(sum_s) ? std::numeric_limits<T>::quiet_NaN() : mx;
  } else {
    T se = 0;
#pragma omp simd reduction(+ : se)
    for (int64_t j = 0; j < m; ++j) se += vexp(s[j] - mx);
    lse = mx + std::log(se);
  }
  return {lse, sum_s, pos_s, k};
}

// Row loss from logits s (overwritten); returns included, writes loss and LSE.
template <typename T>
inline bool fast_label_forward(const LabelRow& r, T* s, bool kl, T* loss, T* lse_out) {
  const LabelSums<T> st = label_row_sums(r, s);
  const int64_t k = st.k;
  *lse_out = st.lse;
  const bool included = k > 0 && r.m_valid > 0;
  if (!included) { *loss = T(0); return false; }
  const T alpha = T(r.alpha), b = alpha / T(r.m_valid);
  const T cross = (T(1) - alpha) * st.pos_s / T(k) + b * st.sum_s - st.lse;
  T ent = 0;
  if (kl) {
    const T a = (T(1) - alpha) / T(k) + b;
    ent = T(k) * a * std::log(a) + (b > 0 ? T(r.m_valid - k) * b * std::log(b) : T(0));
  }
  *loss = kl ? ent - cross : -cross;
  return true;
}

// W in place of the Gram row w (beta = 0) under the row's LSE and positive count k (over all
// columns, also when w is one block of them); returns this row's dL/dparam and sum_j W_ij.
template <typename T, int K>
inline void fast_label_backward(const LabelRow& r, int64_t k, T* w, const T* b_sq, T a_sq, T prm,
                                T lse, T g, T* d_prm, T* row_sum) {
  const int64_t m = r.m;
  const T alpha = T(r.alpha), b = alpha / T(std::max<int64_t>(r.m_valid, 1));
  const T pos = k > 0 ? (T(1) - alpha) / T(k) : T(0);
  const T shift = lse == -std::numeric_limits<T>::infinity() ? T(0) : lse;
  const T inv = T(1) / prm, c = T(-1) / (T(2) * prm * prm), w_scale = K == kDot ? inv : inv * inv;
  T dp = 0, rs = 0;
#pragma omp simd reduction(+ : dp, rs)
  for (int64_t j = 0; j < m; ++j) {
    T s;
    if constexpr (K == kDot) {
      s = w[j] * inv;
    } else {
      T sq = a_sq + b_sq[j] - T(2) * w[j];
      s = (sq < T(0) ? T(0) : sq) * c;
    }
    const bool valid = j != r.self;
    const T q = valid ? vexp(s - lse) : T(0);
    const T p_mix = valid ? (r.col_labels[j] == r.label ? pos : T(0)) + b : T(0);
    const T grad = g * (q - p_mix);
    dp += grad == T(0) ? T(0) : grad * (s - shift);
    const T wj = grad * w_scale;
    w[j] = wj;
    rs += wj;
  }
  *d_prm = (K == kDot ? -dp : T(-2) * dp) * inv;
  *row_sum = rs;
}

}  // namespace icon
