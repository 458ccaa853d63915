// The family row path of the CPU kernel: every (kernel, target, divergence) combination that the
// two hot label paths (cpu_label_rows.h, cpu_f_label_rows.h) do not take runs here, as a few SIMD
// passes over the row, each instantiated on one axis at compile time:
//   logits      KernelRow<T, K>        (the learned kernel, and an Affinity target's kernel)
//   LSE         simd_row_lse           (cpu_f_rows.h)
//   target row  affinity_row / target_row (cpu_loss.cpp: Labels, Neighbors, Dense)
//   divergence  f_row<T, D, LOGP, BETA> (cpu_f_rows.h; KL and cross-entropy included)
//   backward    learned_backward<T, K, PARAM, Q_ZERO_GRAD>, target_backward<T, TK, PARAM>
// No pass branches per pair (selects only) and exp/log are icon::vexp/vlog/vlog1p, so the
// `omp simd` loops run as SIMD code. The row buffers (m values each) stay in cache between the
// passes. The switch from a runtime code to its instantiation happens once per row
// (with_kernel) and ends in an explicit error.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_f_rows.h"
#include "cpu_label_rows.h"   // kSumBlock, LabelGradSums
#include "fast_math.h"
#include "tile_math.h"

namespace icon {

// log(1 + x) within a few ulps also for tiny x: log(u) x / (u - 1) with u = 1 + x corrects the
// rounding of u (Goldberg's trick), one division more than vlog. log1p(inf) = inf.
ICON_SIMD_INLINE float vlog1p(float x) {
  const float u = 1.0f + x;
  const float r = vlog(u) * (x / (u - 1.0f));
  const float out = u == 1.0f ? x : r;
  return u == INFINITY ? INFINITY : out;
}

inline double vlog1p(double x) { return std::log1p(x); }

// One learned (or target) kernel of one row, with the row's parameter folded into constants:
//   aux(ab, a_sq, b_sq)  a.b (dot, log_dot) or the squared distance clamped at 0 (NaN kept)
//   logit(aux)           s, as tile_math.h's logit
//   weight(G, aux)       W = dL/d(ab) from G = dL/ds, as grad_weight
//   basis(s, aux, shift) ds/dparam up to the row's param_scale, as param_basis
template <typename T, int K>
struct KernelRow;

template <typename T>
ICON_SIMD_INLINE T squared_distance(T ab, T a_sq, T b_sq) {
  const T sq = a_sq + b_sq - T(2) * ab;
  return sq < T(0) ? T(0) : sq;
}

template <typename T>
struct KernelRow<T, kDot> {
  T inv;
  explicit KernelRow(T prm) : inv(T(1) / prm) {}
  ICON_SIMD_INLINE T aux(T ab, T, T) const { return ab; }
  ICON_SIMD_INLINE T logit(T aux) const { return aux * inv; }
  ICON_SIMD_INLINE T weight(T g, T) const { return g * inv; }
  ICON_SIMD_INLINE double basis(T s, T, T shift) const { return double(s) - double(shift); }
};

template <typename T>
struct KernelRow<T, kGaussian> {
  T c, w;   // s = c d^2 with c = -1 / (2 sigma^2); W = G / sigma^2
  explicit KernelRow(T prm) : c(T(-1) / (T(2) * prm * prm)), w(T(1) / (prm * prm)) {}
  ICON_SIMD_INLINE T aux(T ab, T a_sq, T b_sq) const { return squared_distance(ab, a_sq, b_sq); }
  ICON_SIMD_INLINE T logit(T aux) const { return aux * c; }
  ICON_SIMD_INLINE T weight(T g, T) const { return g * w; }
  ICON_SIMD_INLINE double basis(T s, T, T shift) const { return double(s) - double(shift); }
};

// s = -(nu + 1)/2 log(1 + d^2 / nu). At nu = 1 (t-SNE) inv_nu is exactly 1 and the coefficient
// -1: one vlog1p per pair, one division per pair in the backward.
template <typename T>
struct KernelRow<T, kStudentT> {
  T nu, inv_nu, nu1, coef;
  explicit KernelRow(T prm) : nu(prm), inv_nu(T(1) / prm), nu1(prm + T(1)), coef(T(-0.5) * (prm + T(1))) {}
  ICON_SIMD_INLINE T aux(T ab, T a_sq, T b_sq) const { return squared_distance(ab, a_sq, b_sq); }
  ICON_SIMD_INLINE T logit(T aux) const { return coef * vlog1p(aux * inv_nu); }
  ICON_SIMD_INLINE T weight(T g, T aux) const { return g * nu1 / (nu + aux); }
  // student_t_ddof with its log term taken from s: -1/2 log1p(d^2 / nu) = s / (nu + 1); the
  // second term as (nu + 1) / (2 nu (nu / a + 1)), finite at a = inf (a / (nu + a) was inf / inf)
  ICON_SIMD_INLINE double basis(T s, T aux, T) const {
    const double n = nu, a = aux;
    return double(s) / (n + 1) + 0.5 * (n + 1) / (n * (n / a + 1));
  }
};

template <typename T>
struct KernelRow<T, kLogDot> {
  explicit KernelRow(T) {}
  ICON_SIMD_INLINE T aux(T ab, T, T) const { return ab; }
  ICON_SIMD_INLINE T logit(T aux) const { return vlog(aux); }
  ICON_SIMD_INLINE T weight(T g, T aux) const { return g == T(0) ? T(0) : g / aux; }
  ICON_SIMD_INLINE double basis(T, T, T) const { return 0.0; }   // no parameter
};

template <typename T>
struct KernelRow<T, kPower> {
  T n;
  explicit KernelRow(T prm) : n(prm) {}
  ICON_SIMD_INLINE T aux(T ab, T a_sq, T b_sq) const { return squared_distance(ab, a_sq, b_sq); }
  ICON_SIMD_INLINE T logit(T aux) const { return n * (T(-0.5) * vlog(aux + T(kPowerEps))); }
  ICON_SIMD_INLINE T weight(T g, T aux) const { return g * n / (aux + T(kPowerEps)); }
  ICON_SIMD_INLINE double basis(T, T aux, T) const { return double(T(-0.5) * vlog(aux + T(kPowerEps))); }
};

template <int K>
using KernelCode = std::integral_constant<int, K>;

// f(KernelCode<K>{}) for the kernel code `kernel`: the one switch from a runtime code to an
// instantiation, once per row. The op entry has checked the code (kernel_code in op_codes.h).
template <typename F>
inline decltype(auto) with_kernel(int kernel, F&& f) {
  switch (kernel) {
    case kDot: return f(KernelCode<kDot>{});
    case kGaussian: return f(KernelCode<kGaussian>{});
    case kStudentT: return f(KernelCode<kStudentT>{});
    case kLogDot: return f(KernelCode<kLogDot>{});
    case kPower: return f(KernelCode<kPower>{});
    default: TORCH_CHECK(false, "icon_kernels cpu: no row path for kernel code ", kernel);
  }
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <typename F>
inline decltype(auto) with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// s[j] = the logit of Gram entry ab[j] (s may be ab: in place).
template <typename T, int K>
inline void kernel_logits(const KernelRow<T, K>& k, const T* ab, T* s, const T* b_sq, T a_sq, int64_t m) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) s[j] = k.logit(k.aux(ab[j], a_sq, b_sq[j]));
}

template <typename T>
inline void row_logits(int kernel, T prm, const T* ab, T* s, const T* b_sq, T a_sq, int64_t m) {
  with_kernel(kernel, [&](auto code) {
    constexpr int K = decltype(code)::value;
    kernel_logits<T, K>(KernelRow<T, K>(prm), ab, s, b_sq, a_sq, m);
  });
}

// s[j] = the logit of Gram entry ab[j] under column j's parameter prm[j]: a symmetrised target's
// t_ji, and the symmetric Affinity schedules' (z_cols = z, so a.b and the distance of the pair are
// the same; the parameter is row j's).
template <typename T>
inline void column_logits(int kernel, const T* prm, const T* ab, T* s, const T* b_sq, T a_sq, int64_t m) {
  with_kernel(kernel, [&](auto code) {
    constexpr int K = decltype(code)::value;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const KernelRow<T, K> k(prm[j]);
      s[j] = k.logit(k.aux(ab[j], a_sq, b_sq[j]));
    }
  });
}

// An Affinity target's row: p[j] = exp(t[j] - lse_p) over j != self, renormalised to sum 1 (the
// T-rounded LSE^p leaves the sum 1 only up to its rounding), and divided by ``divisor`` (joint
// normalisation: the number of rows). Returns log of the total before renormalising (0 when it
// is not positive), which an exact log p (kExactLogP) takes off.
template <typename T>
inline double affinity_row(const T* t, T lse_p, int64_t self, int64_t m, T* p, double divisor = 1.0) {
  double total = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bt = 0;
#pragma omp simd reduction(+ : bt)
    for (int64_t j = j0; j < j1; ++j) {
      const T pj = j != self ? vexp(t[j] - lse_p) : T(0);
      p[j] = pj;
      bt += pj;
    }
    total += bt;
  }
  if (!(total > 0)) return 0.0;
  const T inv = T(1.0 / (total * divisor));   // a multiply in T, not a division in double: one rounding more, and
  // test_large_m_precision.py holds at M = 2e5
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) p[j] *= inv;
  return std::log(total);
}

// Renormalises a row's q = exp(s - lse) over j != self: returns the LSE that makes them sum to 1
// up to T's rounding of their own terms (the saved LSE was rounded to T from another Gram, and
// an error shared by the whole row would come back in dL/dx times the q-mean of y - x_i).
template <typename T>
inline T renormalised_lse(const T* s, T lse, int64_t self, int64_t m) {
  double q_total = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T bq = 0;
#pragma omp simd reduction(+ : bq)
    for (int64_t j = j0; j < j1; ++j) bq += j != self ? vexp(s[j] - lse) : T(0);
    q_total += bq;
  }
  return q_total > 0 ? T(double(lse) + std::log(q_total)) : lse;
}

// The learned side of a row's backward. w holds the row's Gram entries and becomes
// W = weight(G, aux) with G = scale (q g - q Gamma), q and q g from f_row (0 at self); Gamma is taken
// off as two parts in T (its double value's rounding would otherwise come back times the q-mean
// of y - x_i). PARAM: the row sums of dL/dparam (centred_sum). Q_ZERO_GRAD: G = 0 wherever
// q = 0 (the f-divergences), so the basis is clamped and the products unconditional (GCC 12's
// AVX-512 code for the selected form gave NaN there, cpu_f_label_rows.h); otherwise (KL,
// cross-entropy: G = -scale p where q underflowed) a select keeps an infinite basis infinite.
template <typename T, int K, bool PARAM, bool Q_ZERO_GRAD>
inline LabelGradSums learned_backward(const KernelRow<T, K>& k, T* w, const T* s, const T* q_row, const T* qg,
                                      const T* b_sq, T a_sq, int64_t m, T scale, double gamma, T shift) {
  const T gamma_hi = T(gamma), gamma_lo = T(gamma - double(gamma_hi));
  const double lowest = std::numeric_limits<double>::lowest();
  LabelGradSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T rs = 0;
    // dL/dparam's sums in double: s - shift in T rounds coarser than s, and centred_sum takes
    // g_sum times the basis mean off dp, where g_sum is a cancelling sum (sum_j G = 0)
    double dp = 0, gs = 0, qb = 0, qs = 0;
#pragma omp simd reduction(+ : dp, gs, qb, qs, rs)
    for (int64_t j = j0; j < j1; ++j) {
      const T q = q_row[j];
      const T grad = scale * ((qg[j] - q * gamma_hi) - q * gamma_lo);
      const T aux = k.aux(w[j], a_sq, b_sq[j]);
      if constexpr (PARAM) {
        const double basis = k.basis(s[j], aux, shift);
        if constexpr (Q_ZERO_GRAD) {
          const double clamped = std::max(basis, lowest);
          dp += double(grad) * clamped;
          qb += double(q) * clamped;
        } else {
          dp += grad == T(0) ? 0.0 : double(grad) * basis;
          qb += q == T(0) ? 0.0 : double(q) * basis;
        }
        gs += double(grad);
        qs += double(q);
      }
      const T wj = k.weight(grad, aux);
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

// The target side (an Affinity target whose z, z_cols or parameter needs a gradient): wt holds
// the row's target Gram entries and becomes W^t = weight(G^t, aux), G^t = scale (p f' - p Phi)
// wherever p or p f' is nonzero (an f-divergence's p f' may be nonzero where p underflowed),
// with Phi in two parts as Gamma above. PARAM: the row sums of dL/dt_param, centred on p.
template <typename T, int TK, bool PARAM>
inline LabelGradSums target_backward(const KernelRow<T, TK>& k, T* wt, const T* t, const T* p, const T* pf,
                                     const T* b_sq, T a_sq, int64_t m, T scale, double phi, T shift) {
  const T phi_hi = T(phi), phi_lo = T(phi - double(phi_hi));
  LabelGradSums out{0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T rs = 0;
    double dp = 0, gs = 0, pb = 0, ps = 0;   // in double as learned_backward's
#pragma omp simd reduction(+ : dp, gs, pb, ps, rs)
    for (int64_t j = j0; j < j1; ++j) {
      const bool has = p[j] != T(0) || pf[j] != T(0);
      const T gt = has ? scale * ((pf[j] - p[j] * phi_hi) - p[j] * phi_lo) : T(0);
      const T aux = k.aux(wt[j], a_sq, b_sq[j]);
      if constexpr (PARAM) {
        const double basis = k.basis(t[j], aux, shift);
        dp += gt == T(0) ? 0.0 : double(gt) * basis;
        gs += double(gt);
        pb += has ? double(p[j]) * basis : 0.0;
        ps += double(p[j]);
      }
      const T wj = k.weight(gt, aux);
      wt[j] = wj;
      rs += wj;
    }
    out.dp += dp;
    out.g_sum += gs;
    out.q_basis += pb;
    out.q_sum += ps;
    out.row_sum += rs;
  }
  return out;
}

}  // namespace icon
