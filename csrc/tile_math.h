// Tile math shared by the fused CPU and CUDA kernels of the I-Con loss (DESIGN.md §1): the
// learned kernels' logits, their gradient weights and parameter terms. Host/device ready.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ICON_HD __host__ __device__ __forceinline__
#else
#define ICON_HD inline
#endif

namespace icon {

enum Kernel : int { kDot = 0, kGaussian = 1, kStudentT = 2, kLogDot = 3 };
enum Target : int { kLabels = 0, kNeighbors = 1, kAffinity = 2, kDense = 3 };

// s_ij from the Gram entry ab = a_i.b_j (and the squared norms for distance kernels); *aux gets
// a.b (dot, log_dot) or the squared distance clamped at 0 (NaN kept).
template <typename T>
ICON_HD T logit(int kernel, T ab, T a_sq, T b_sq, T prm, T* aux) {
  if (kernel == kDot) { *aux = ab; return ab / prm; }
  if (kernel == kLogDot) { *aux = ab; return std::log(ab); }
  T sq = a_sq + b_sq - T(2) * ab;
  sq = sq < T(0) ? T(0) : sq;
  *aux = sq;
  if (kernel == kGaussian) return -sq / (T(2) * prm * prm);
  return -T(0.5) * (prm + T(1)) * std::log1p(sq / prm);
}

// W_ij such that dL/da_i = sum_j W_ij b_j - [distance kernel] (sum_j W_ij) a_i, from G = dL/ds.
template <typename T>
ICON_HD T grad_weight(int kernel, T g, T aux, T prm) {
  if (kernel == kDot) return g / prm;
  if (kernel == kLogDot) return g == T(0) ? T(0) : g / aux;
  if (kernel == kGaussian) return g / (prm * prm);
  return g * (prm + T(1)) / (prm + aux);
}

ICON_HD bool is_distance(int kernel) { return kernel == kGaussian || kernel == kStudentT; }

// This pair's share of dL/dparam. Rows of G sum to zero, so s is shifted by the row LSE to keep
// the sum from cancelling catastrophically.
template <typename T>
ICON_HD T param_term(int kernel, T g, T s, T aux, T prm, T shift) {
  if (g == T(0)) return T(0);
  if (kernel == kDot) return -g * (s - shift) / prm;
  if (kernel == kGaussian) return T(-2) * g * (s - shift) / prm;
  if (kernel == kStudentT) {
    T ds = -T(0.5) * std::log1p(aux / prm) + T(0.5) * (prm + T(1)) * aux / (prm * (prm + aux));
    return g * ds;
  }
  return T(0);
}

// The same split in two: param_term = g * param_basis * param_scale. A row's dL/dparam is then
// param_scale * sum_j G_ij b_ij, and, since the G_ij of a row sum to zero, any row constant may be
// taken off b_ij: the CPU kernel takes off b's q-weighted mean, which cancels the rounding that
// G's row sum carries (DESIGN.md §5, accuracy at large M).
template <typename T>
ICON_HD T param_basis(int kernel, T s, T aux, T prm, T shift) {
  if (kernel == kDot || kernel == kGaussian) return s - shift;
  if (kernel == kStudentT)
    return -T(0.5) * std::log1p(aux / prm) + T(0.5) * (prm + T(1)) * aux / (prm * (prm + aux));
  return T(0);
}

template <typename T>
ICON_HD T param_scale(int kernel, T prm) {
  if (kernel == kDot) return T(-1) / prm;
  if (kernel == kGaussian) return T(-2) / prm;
  return kernel == kStudentT ? T(1) : T(0);
}

}  // namespace icon
