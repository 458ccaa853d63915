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

// The codes of icon_kernels/families.py (and triton/launchers.py); tests/test_families.py checks
// that the three agree. Every switch below names each code and ends in a default that cannot be
// reached from an op, because the op's entry turns the kernel name into a code with kernel_code()
// (op_codes.h), which TORCH_CHECKs unknown names: the default returns NaN (the math here runs on
// the device and inside OpenMP loops, where it cannot throw), never the last kernel's value.
enum Kernel : int { kDot = 0, kGaussian = 1, kStudentT = 2, kLogDot = 3, kPower = 4 };
enum Target : int { kLabels = 0, kNeighbors = 1, kAffinity = 2, kDense = 3 };

template <typename T>
ICON_HD T unknown_code() { return T(NAN); }

ICON_HD bool is_distance(int kernel) { return kernel == kGaussian || kernel == kStudentT || kernel == kPower; }

// The power kernel's epsilon, s = -(n/2) log(d^2 + eps): a library constant, not an op argument
// (families.POWER_EPS; tests/test_families.py checks the copies agree).
constexpr double kPowerEps = 1e-12;

// ds/dn of the power kernel: -(1/2) log(d^2 + eps).
template <typename T>
ICON_HD T power_basis(T aux) { return T(-0.5) * std::log(aux + T(kPowerEps)); }

// s_ij from the Gram entry ab = a_i.b_j (and the squared norms for distance kernels); *aux gets
// a.b (dot, log_dot) or the squared distance clamped at 0 (NaN kept).
template <typename T>
ICON_HD T logit(int kernel, T ab, T a_sq, T b_sq, T prm, T* aux) {
  *aux = ab;
  if (is_distance(kernel)) {
    T sq = a_sq + b_sq - T(2) * ab;
    *aux = sq = sq < T(0) ? T(0) : sq;
  }
  switch (kernel) {
    case kDot: return ab / prm;
    case kLogDot: return std::log(ab);
    case kGaussian: return -*aux / (T(2) * prm * prm);
    case kStudentT: return -T(0.5) * (prm + T(1)) * std::log1p(*aux / prm);
    case kPower: return prm * power_basis(*aux);
    default: return unknown_code<T>();
  }
}

// W_ij such that dL/da_i = sum_j W_ij b_j - [distance kernel] (sum_j W_ij) a_i, from G = dL/ds.
template <typename T>
ICON_HD T grad_weight(int kernel, T g, T aux, T prm) {
  switch (kernel) {
    case kDot: return g / prm;
    case kLogDot: return g == T(0) ? T(0) : g / aux;
    case kGaussian: return g / (prm * prm);
    case kStudentT: return g * (prm + T(1)) / (prm + aux);
    case kPower: return g * prm / (aux + T(kPowerEps));
    default: return unknown_code<T>();
  }
}

// ds/dnu of the Student-t kernel.
template <typename T>
ICON_HD T student_t_ddof(T aux, T prm) {
  return -T(0.5) * std::log1p(aux / prm) + T(0.5) * (prm + T(1)) * aux / (prm * (prm + aux));
}

// This pair's share of dL/dparam. Rows of G sum to zero, so s is shifted by the row LSE to keep
// the sum from cancelling catastrophically.
template <typename T>
ICON_HD T param_term(int kernel, T g, T s, T aux, T prm, T shift) {
  if (g == T(0)) return T(0);
  switch (kernel) {
    case kDot: return -g * (s - shift) / prm;
    case kGaussian: return T(-2) * g * (s - shift) / prm;
    case kStudentT: return g * student_t_ddof(aux, prm);
    case kPower: return g * power_basis(aux);
    case kLogDot: return T(0);                 // no parameter
    default: return unknown_code<T>();
  }
}

// The same split in two: param_term = g * param_basis * param_scale. A row's dL/dparam is then
// param_scale * sum_j G_ij b_ij, and, since the G_ij of a row sum to zero, any row constant may be
// taken off b_ij: the CPU kernel takes off b's q-weighted mean, which cancels the rounding that
// G's row sum carries (DESIGN.md §5, accuracy at large M).
template <typename T>
ICON_HD T param_basis(int kernel, T s, T aux, T prm, T shift) {
  switch (kernel) {
    case kDot: case kGaussian: return s - shift;
    case kStudentT: return student_t_ddof(aux, prm);
    case kPower: return power_basis(aux);
    case kLogDot: return T(0);
    default: return unknown_code<T>();
  }
}

template <typename T>
ICON_HD T param_scale(int kernel, T prm) {
  switch (kernel) {
    case kDot: return T(-1) / prm;
    case kGaussian: return T(-2) / prm;
    case kStudentT: case kPower: return T(1);
    case kLogDot: return T(0);
    default: return unknown_code<T>();
  }
}

}  // namespace icon
