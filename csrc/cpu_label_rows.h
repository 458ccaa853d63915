// Fast row loops for the hot case of the CPU kernel: a Labels target with beta = 0 and a dot or
// Gaussian kernel (InfoNCE / SimCLR / SupCon / CLIP). The kernel is a template parameter, the
// self pair is masked by index, and exp is the vectorisable icon::vexp, so `omp simd` loops run
// as SIMD code. Every other case takes the family rows (cpu_family_rows.h, cpu_row_paths.h).
#pragma once
#include <algorithm>
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

// L: the label type. The ops take int64 labels; the bidirectional op codes them as int32 (one
// AVX2 compare per 8 lanes, where int64 takes two and a pack).
template <typename L>
struct LabelRowOf {
  const L* col_labels;
  L label;
  int64_t m, self;   // self = i when self pairs are excluded, else -1
  double alpha;
  int64_t m_valid;
};
using LabelRow = LabelRowOf<int64_t>;

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

// Row sums run in blocks of kSumBlock columns: the SIMD lanes sum a block in T and the block sums
// add up in double, so sums over 1e5 columns and more keep about T's own accuracy (DESIGN.md §5:
// no long running fp32 sum) at the speed of the plain SIMD loop.
constexpr int64_t kSumBlock = 512;

// label_value_sums over the columns [j0, j1), without the self column's test: the caller leaves
// the self column out of the span (an int64 index compare per lane costs as much as the sums).
template <typename T, typename L>
inline void label_value_span(const L* col_labels, L label, const T* s, int64_t j0, int64_t j1, T* bs, T* bp,
                             int32_t* hits) {
  T vs = 0, vp = 0;
  int32_t h = 0;
#pragma omp simd reduction(+ : vs, vp, h)
  for (int64_t j = j0; j < j1; ++j) {
    const bool hit = col_labels[j] == label;
    vs += s[j];
    vp += hit ? s[j] : T(0);
    h += hit;
  }
  *bs += vs;
  *bp += vp;
  *hits += h;
}

// The sums of s over the row's valid columns and over its positives, and the positive count, each
// block of kSumBlock in T and the blocks in double (the symmetric schedule's column blocks too).
template <typename T, typename L>
inline void label_value_sums(const LabelRowOf<L>& r, const T* s, double* sum_s, double* pos_s, int64_t* k) {
  const int64_t m = r.m;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bs = 0, bp = 0;
    int32_t hits = 0;   // at most kSumBlock
    if (r.self >= j0 && r.self < j1) {   // the self column is no pair: the spans either side of it
      label_value_span(r.col_labels, r.label, s, j0, r.self, &bs, &bp, &hits);
      label_value_span(r.col_labels, r.label, s, r.self + 1, j1, &bs, &bp, &hits);
    } else {
      label_value_span(r.col_labels, r.label, s, j0, j1, &bs, &bp, &hits);
    }
    *sum_s += bs;
    *pos_s += bp;
    *k += hits;
  }
}

// sum_j exp(s_j - top) over s[0..m), in blocks as above (-inf entries add 0).
template <typename T>
inline double blocked_exp_sum(const T* s, int64_t m, T top) {
  double se = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bse = 0;
#pragma omp simd reduction(+ : bse)
    for (int64_t j = j0; j < j1; ++j) bse += vexp(s[j] - top);
    se += bse;
  }
  return se;
}

// The largest of s[0..m) (-inf when none is larger; NaN entries are passed over).
template <typename T>
inline T row_max(const T* s, int64_t m) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < m; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// The statistics of the logits s (overwritten: the self entry becomes -inf).
template <typename T>
inline LabelSums<T> label_row_sums(const LabelRow& r, T* s) {
  double sum_s = 0, pos_s = 0;
  int64_t k = 0;
  label_value_sums(r, s, &sum_s, &pos_s, &k);
  if (r.self >= 0) s[r.self] = -std::numeric_limits<T>::infinity();
  const T mx = row_max(s, r.m);
  T lse;
  if (mx == -std::numeric_limits<T>::infinity()) {
    lse = std::isnan(sum_s) ? std::numeric_limits<T>::quiet_NaN() : mx;
  } else {
    lse = T(double(mx) + std::log(blocked_exp_sum(s, r.m, mx)));
  }
  return {lse, T(sum_s), T(pos_s), k};
}

// A row's loss from its statistics over all of its columns (r.alpha and r.m_valid are read):
// returns included (the row has positives), writes the loss (0 when left out).
template <typename T>
inline bool label_row_loss(const LabelRow& r, const LabelSums<T>& st, bool kl, T* loss) {
  const int64_t k = st.k;
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

// Row loss from logits s (overwritten); returns included, writes loss and LSE.
template <typename T>
inline bool fast_label_forward(const LabelRow& r, T* s, bool kl, T* loss, T* lse_out) {
  const LabelSums<T> st = label_row_sums(r, s);
  *lse_out = st.lse;
  return label_row_loss(r, st, kl, loss);
}

// A row's sums from fast_label_backward, in double. dp = sum_j G_ij (s_ij - shift_i) with shift_i
// the row's LSE; g_sum = sum_j G_ij, q_basis = sum_j q_ij (s_ij - shift_i) and q_sum = sum_j q_ij
// centre it over a whole row (centred_sum); row_sum = sum_j W_ij.
struct LabelGradSums {
  double dp, g_sum, q_basis, q_sum, row_sum;
};

// sum_j G_ij (b_ij - c_i) = dp - g_sum * c_i, with c_i the q-weighted mean of b over the row: the
// G_ij of a row sum to zero in exact arithmetic, so this is dp; in floating point it drops the
// rounding that G's row sum carries (e.g. from the LSE), which dp alone multiplies by |b - 0|.
inline double centred_sum(double dp, double g_sum, double q_basis, double q_sum) {
  return q_sum > 0 ? dp - g_sum * (q_basis / q_sum) : dp;
}

// dL/dparam = fast_param_scale * sum_j G_ij (s_ij - shift_i) for the dot and Gaussian kernels.
template <typename T, int K>
inline T fast_param_scale(T prm) {
  return (K == kDot ? T(-1) : T(-2)) / prm;
}

// W in place of the Gram row w (beta = 0) under the row's LSE and positive count k (over all
// columns, also when w is one block of them); returns the row's sums (dL/dparam's and sum_j W_ij).
// LOGITS: w holds the row's logits already (fast_logits), not its Gram entries. The symmetric
// schedule takes them so, the very values its forward stored: s = Gram * inv recomputed here may
// be contracted into s - lse = fma(Gram, inv, -lse), whose unrounded product moves q by up to an
// ulp of s (3% at logits of 1e6), and its rows' q must sum to 1 without renormalise_label_row's
// full-row pass. lse_lo: what the LSE lost in its rounding to T, q = exp((s - lse) - lse_lo).
template <typename T, int K, bool LOGITS = false>
inline LabelGradSums fast_label_backward(const LabelRow& r, int64_t k, T* w, const T* b_sq, T a_sq, T prm,
                                         T lse, T g, T lse_lo = T(0)) {
  const int64_t m = r.m;
  const T alpha = T(r.alpha), b = alpha / T(std::max<int64_t>(r.m_valid, 1));
  const T pos = k > 0 ? (T(1) - alpha) / T(k) : T(0);
  const T shift = lse == -std::numeric_limits<T>::infinity() ? T(0) : lse;
  const T inv = T(1) / prm, c = T(-1) / (T(2) * prm * prm), w_scale = K == kDot ? inv : inv * inv;
  // the row's fields as locals: read through r inside the loop, where a store to w may alias them
  // (as far as GCC knows), the LOGITS instantiation stayed scalar for -march=znver3 (AVX2; the
  // symmetric schedule's backward ran 5x slower than the plain one's inlined loop there)
  const int64_t* const col_labels = r.col_labels;
  const int64_t label = r.label, self = r.self;
  LabelGradSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T dp = 0, gs = 0, qb = 0, qs = 0, rs = 0;
#pragma omp simd reduction(+ : dp, gs, qb, qs, rs)
    for (int64_t j = j0; j < j1; ++j) {
      T s;
      if constexpr (LOGITS) {
        s = w[j];
      } else if constexpr (K == kDot) {
        s = w[j] * inv;
      } else {
        T sq = a_sq + b_sq[j] - T(2) * w[j];
        s = (sq < T(0) ? T(0) : sq) * c;
      }
      const bool valid = j != self;
      T arg = s - lse;
      if constexpr (LOGITS) arg -= lse_lo;   // (the plain paths have no residual)
      const T q = valid ? vexp(arg) : T(0);
      const T p_mix = valid ? (col_labels[j] == label ? pos : T(0)) + b : T(0);
      const T grad = g * (q - p_mix);
      // a select, not cpu_f_label_rows.h's clamped basis: grad = g (q - p~) is nonzero where q = 0
      // (a positive, or alpha > 0), and s = -inf there must give an infinite dL/dparam
      const T basis = s - shift;
      dp += grad == T(0) ? T(0) : grad * basis;
      gs += grad;
      qb += q == T(0) ? T(0) : q * basis;
      qs += q;
      const T wj = grad * w_scale;
      w[j] = wj;
      rs += wj;
    }
    out.dp += dp;
    out.g_sum += gs;
    out.q_basis += qb;
    out.q_sum += qs;
    out.row_sum += rs;
  }
  return out;
}

// The backward's q = exp(s - LSE) takes the LSE that the forward computed from its own Gram; at
// logits around 1e5 an ulp of s is ~0.008, so the q of a row no longer sum to 1 (relative error of
// dL/dx up to 7e-3 at tau = 0.01 on features of norm 30 sqrt(d), against 3e-8 for naive fp32).
// A whole row (not a ring-mode block) is renormalised to q / Z, Z = sum_j q_ij, after
// fast_label_backward: G'_ij = g (q_ij / Z - p_ij) = G_ij / Z + g p_ij (1/Z - 1), which needs no
// logit again. sum_j W_ij changes by g w_scale (1 - Z); dL/dparam's centred sum does not change
// (G' - G is proportional to q, whose weighted mean is the centre), so the other sums stay.
template <typename T, int K>
inline void renormalise_label_row(const LabelRow& r, int64_t k, T* w, T prm, T g, LabelGradSums* sums) {
  const double z = sums->q_sum;
  // within 4 ulps of 1 the correction is below q's own rounding; skipping it spares the extra pass
  // over the row on well-conditioned data (about 5% of the InfoNCE fwd+bwd at N = 8192)
  if (!(z > 0) || !std::isfinite(z) || std::abs(z - 1) <= 4 * double(std::numeric_limits<T>::epsilon())) return;
  const T alpha = T(r.alpha), b = alpha / T(std::max<int64_t>(r.m_valid, 1));
  const T pos = k > 0 ? (T(1) - alpha) / T(k) : T(0);
  const T inv = T(1) / prm, w_scale = K == kDot ? inv : inv * inv;
  const T inv_z = T(1 / z), c_w = T(double(g) * (1 / z - 1)) * w_scale;
  const int64_t* const col_labels = r.col_labels;   // locals: fast_label_backward's note
  const int64_t label = r.label, self = r.self, m = r.m;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const T p_mix = j != self ? (col_labels[j] == label ? pos : T(0)) + b : T(0);
    w[j] = w[j] * inv_z + c_w * p_mix;
  }
  sums->row_sum += double(g) * double(w_scale) * (1 - z);
}

}  // namespace icon
