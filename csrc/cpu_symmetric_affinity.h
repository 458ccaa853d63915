// The symmetric schedule (DESIGN.md §1.3) for an Affinity target in self mode: SNE and t-SNE with
// conditional rows, y = x and z_cols = z, where both the learned logits s_ij and the target's
// Gram entries are symmetric. The plain schedule pays six N^2 GEMM-equivalents for forward +
// backward (S and T in the forward, S and T again in the backward, W Y and W^T X); here each pair
// of row blocks I <= J is one Gram tile of x and one of z (cpu_tile_pairs.h's blocks):
//   forward   the rows of I take their statistics over the columns J from the tiles, and the rows
//             of J theirs over the columns I from the transposed tiles, merged online: for each
//             row its learned and target maxima, sum_j e^{s - m}, sum_j e^{t - m^p} and
//             C = sum_j e^{t - m^p} ((t - m^p) - (s - m)) (cross-entropy: -(s - m)), rescaled
//             when a maximum grows; KL = C / S^p - log S^p + log S, each pair's difference taken
//             before the sum as the plain rows take log p - log q;
//   backward  one pass over the same tiles (the same GEMM calls, bit for bit) forms
//             H_ij = W_ij + W_ji = weight(g_i (q_ij - p_ij) + g_j (q_ji - p_ji), d_ij) directly, since
//             the kernel's weight is linear in dL/ds and depends on the pair only; then
//             dX_I += H X_J and dX_J += H^T X_I (a distance kernel minus diag(H 1) X).
// Three GEMM-equivalents instead of six; the exps per pair do not change. A diagonal tile's upper
// triangle is mirrored onto its lower one in both passes, so that s_ij and s_ji are one value.
// t-SNE's Cauchy kernel (student_t, nu = 1) takes e^s = 1 / (1 + d^2) in both passes, as
// cpu_cauchy_rows.h does.
//
// It applies to KL and cross-entropy with alpha = beta = 0, one scalar learned parameter (any
// kernel but log_dot), any target kernel with a parameter per row or one for all
// (perplexity-calibrated sigma_i), a target that is not symmetrised, and conditional rows; the backward to
// y_is_x without a target or learned-parameter gradient (anything else runs the plain backward,
// which renormalises its rows itself and reads only stats rows 0 and 2).
//
// Stats: row 0 LSE, row 1 its rounding residual, row 2 LSE^p (as the plain rows), row 3 the
// record 8 b + r: b the block side (the backward recomputes the forward's very tiles) and r the
// residual of LSE^p in units of the last place of row 2 (|r| <= 1/2; fp32 keeps it to 2^-12 of
// that unit at b <= 256). The plain forward leaves row 3 at 0 (no record) for these problems.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_family_rows.h"
#include "cpu_problem.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"   // symmetric_schedule_enabled, symmetric_schedule_counters
#include "cpu_tile_pairs.h"         // pair_block, dense_tile, transpose_tile

namespace icon {
namespace cpu {

// What both Affinity schedules (this one and joint t-SNE's, cpu_symmetric_joint.h) need: self mode
// (x is y, z_cols is z), one scalar learned parameter and any learned kernel but log_dot, KL or
// cross-entropy with alpha = beta = 0. Any target kernel, with a parameter per row or one: with
// z_cols = z its Gram term (z_i . z_j or the squared distance) is the pair's, and each side takes
// its logit under its own row's parameter (target_coefs, pair_target_logits).
template <typename T>
bool symmetric_affinity_structure(const Problem<T>& pb) {
  if (!pb.self_pairs || !pb.z_self || !pb.scalar_param || pb.n < 2 || pb.target != kAffinity) return false;
  if (pb.alpha != T(0) || pb.beta != T(0) || pb.kernel == kLogDot) return false;
  return pb.divergence == kKl || pb.divergence == kCrossEntropy;
}

// Whether pb runs this schedule's conditional rows (the off switch aside).
template <typename T>
bool symmetric_affinity_fit(const Problem<T>& pb) {
  return !pb.joint && !pb.symmetrize && symmetric_affinity_structure(pb);
}

template <typename T>
bool symmetric_affinity_apply(const Problem<T>& pb) {
  return symmetric_affinity_fit(pb) && symmetric_schedule_enabled();
}

// The target's logits. The Gaussian and dot target kernels' are linear in their Gram term,
// t_ij = coef_i aux_ij with aux the squared distance (T_DIST) or z_i . z_j and coef_i = -1 / (2
// sigma_i^2) or 1 / tau_i (one per row, so that each side scales by its own), which the fused
// loops compute inline. The others (Student-t, power, log_dot: a log per pair) are not: their rows
// take the plain rows' row_logits (target_row_logits; pair_target_logits for both orientations)
// before those loops, which then read the logits as a dot kernel's Gram terms with coefficient 1
// (t * 1 = t exactly; with_affinity_kernels gives them T_DIST = false).
template <typename T>
bool linear_target(const Problem<T>& pb) {
  return pb.t_kernel == kGaussian || pb.t_kernel == kDot;
}

template <typename T, bool T_DIST>
ICON_SIMD_INLINE T target_aux(T ab, T a_sq, T b_sq) {
  if constexpr (T_DIST) return squared_distance(ab, a_sq, b_sq);
  else return ab;
}

template <typename T>
std::vector<T> target_coefs(const Problem<T>& pb) {
  const T* tp = pb.t_prm.template data_ptr<T>();
  std::vector<T> coef(static_cast<size_t>(pb.n), T(1));   // (1: a nonlinear kernel's, see above)
  if (!linear_target(pb)) return coef;
  for (int64_t i = 0; i < pb.n; ++i)
    coef[i] = pb.t_kernel == kGaussian ? T(-1) / (T(2) * tp[i] * tp[i]) : T(1) / tp[i];
  return coef;
}

// Whether every pair's target logit is one value for both its rows, t_ij = t_ji (one target
// parameter for every row).
template <typename T>
bool same_pair_target_logits(const Problem<T>& pb) {
  const T* tp = pb.t_prm.template data_ptr<T>();
  for (int64_t i = 1; i < pb.n; ++i)
    if (!(tp[i] == tp[0])) return false;
  return true;
}

// Whether a nonlinear target kernel's logits are symmetric in the pair: then each pair's logit is
// computed once, in the tile, for both sides (a log per pair instead of two).
template <typename T>
bool pair_target_logits_once(const Problem<T>& pb) {
  return !linear_target(pb) && same_pair_target_logits(pb);
}

// Row i's target logits over the columns [col0, col0 + len) from its Gram entries of z under a
// nonlinear target kernel (gram may be t: in place), as the plain rows compute them.
template <typename T>
void target_row_logits(const Problem<T>& pb, int64_t i, const T* gram, T* t, int64_t col0, int64_t len) {
  const T* z_sq = pb.z_sq.template data_ptr<T>();
  row_logits<T>(pb.t_kernel, pb.t_prm.template data_ptr<T>()[i], gram, t, z_sq + col0, z_sq[i], len);
}

// Both orientations of the target logits over row i's Gram entries of z with the columns [j0, j0 +
// nj): own[j] = t_ij (row i's parameter) and other[j] = t_ji (column j's), one Gram term for both
// (the squared distance is symmetric bit for bit: a + b = b + a in IEEE arithmetic); uniform:
// pair_target_logits_once's.
template <typename T, bool T_DIST>
void pair_target_logits(const Problem<T>& pb, bool linear, bool uniform, const T* coef, int64_t i, int64_t j0,
                        const T* gram, T* own, T* other, int64_t nj) {
  const T* z_sq = pb.z_sq.template data_ptr<T>();
  const T zi_sq = z_sq[i];
  const T* zc_sq = z_sq + j0;
  if (!linear) {
    const T* tp = pb.t_prm.template data_ptr<T>();
    row_logits<T>(pb.t_kernel, tp[i], gram, own, zc_sq, zi_sq, nj);
    if (uniform) std::copy(own, own + nj, other);   // (pair_target_logits_once: t_ji = t_ij)
    else column_logits<T>(pb.t_kernel, tp + j0, gram, other, zc_sq, zi_sq, nj);
    return;
  }
  const T ci = coef[i];
  const T* cc = coef + j0;
#pragma omp simd
  for (int64_t j = 0; j < nj; ++j) {
    const T taux = target_aux<T, T_DIST>(gram[j], zi_sq, zc_sq[j]);
    own[j] = taux * ci;
    other[j] = taux * cc[j];
  }
}

// A row's statistics merged over column blocks (see the top): the learned and target maxima and
// sums, and C. The Cauchy kernel's sum is sum_j r_j = sum_j e^{s_j} unshifted (every r is at most
// 1), with the largest r (rmax): its loss takes log(ss / rmax) where the others take log ss, so
// that both are over the same logit as C's shift.
struct OnlineAffinityRow {
  double ms = -std::numeric_limits<double>::infinity(), mt = -std::numeric_limits<double>::infinity();
  double ss = 0, sp = 0, c = 0, rmax = 0;
};

// Adds row i's logits over one column block to its statistics: ab and tab its Gram entries of x
// and z over the block's len columns (they become s and t), x_sq and z_sq the columns' squared
// norms (zeros unless a distance needs them), self the row's own column in the block or -1.
// CAUCHY: e^s = r = 1 / (1 + d^2), summed unshifted.
template <typename T, int K, bool T_DIST, bool CAUCHY, bool KL>
void add_affinity_segment(const KernelRow<T, K> k, T coef,   // k by value (affinity_h_tile's note)
                          T* ab, T* tab, const T* x_sq, T xi_sq, const T* z_sq,
                          T zi_sq, int64_t len, int64_t self, OnlineAffinityRow* acc) {
  const double dinf = std::numeric_limits<double>::infinity();
  const T inf = std::numeric_limits<T>::infinity();
  T ms = -inf, mt = -inf, rsum = 0, rmax = 0;
#pragma omp simd reduction(max : ms, mt, rmax) reduction(+ : rsum)
  for (int64_t j = 0; j < len; ++j) {
    const T aux = k.aux(ab[j], xi_sq, x_sq[j]);
    const T s = CAUCHY ? -vlog1p(aux) : k.logit(aux);
    const T t = target_aux<T, T_DIST>(tab[j], zi_sq, z_sq[j]) * coef;
    ab[j] = s;
    tab[j] = t;
    const bool valid = j != self;
    if constexpr (CAUCHY) {
      const T r = valid ? T(1) / (T(1) + aux) : T(0);
      rsum += r;
      rmax = r > rmax ? r : rmax;
    }
    ms = valid && s > ms ? s : ms;
    mt = valid && t > mt ? t : mt;
  }
  // the merged maxima; the sums so far rescaled to them (C as the top says)
  if (double(mt) > acc->mt) {
    if (acc->sp > 0) {
      const double f = std::exp(acc->mt - double(mt));
      acc->c = KL ? f * (acc->c + (acc->mt - double(mt)) * acc->sp) : f * acc->c;
      acc->sp *= f;
    }
    acc->mt = double(mt);
  }
  if (double(ms) > acc->ms) {
    if (!CAUCHY && acc->ss > 0) acc->ss *= std::exp(acc->ms - double(ms));
    if (acc->sp > 0) acc->c += (double(ms) - acc->ms) * acc->sp;
    acc->ms = double(ms);
  }
  if constexpr (CAUCHY) {
    acc->ss += double(rsum);
    acc->rmax = std::max(acc->rmax, double(rmax));
  }
  // no finite learned (target) logit yet: shift 0, so that -inf logits add 0 to the sums (and
  // give C = inf where p > 0 = q) and NaN ones NaN; the learned sum must still take this block
  const T top_s = acc->ms == -dinf ? T(0) : T(acc->ms), top_t = acc->mt == -dinf ? T(0) : T(acc->mt);
  T ss = 0, sp = 0, c = 0;
#pragma omp simd reduction(+ : ss, sp, c)
  for (int64_t j = 0; j < len; ++j) {
    const bool valid = j != self;
    const T e = valid ? vexp(tab[j] - top_t) : T(0);
    const T ds = ab[j] - top_s;
    const T d = KL ? (tab[j] - top_t) - ds : -ds;
    if constexpr (!CAUCHY) ss += valid ? vexp(ds) : T(0);
    sp += e;
    c += e == T(0) ? T(0) : e * d;
  }
  if constexpr (!CAUCHY) acc->ss += double(ss);
  acc->sp += double(sp);
  acc->c += double(c);
}

// A tile pair's z tile (ni x nj Gram entries from rows i0 and columns j0) into the target's logits
// in place, under pair_target_logits_once's one parameter: each pair's logit once for both sides.
template <typename T>
void tile_target_logits(const Problem<T>& pb, int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* t_p) {
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) target_row_logits(pb, i0 + r, t_p + r * nj, t_p + r * nj, j0, nj);
  });
}

// The z tile of one tile pair (pair_gram), as every pass makes it: the same GEMM call, bit for bit.
template <typename T>
void target_tile(const Problem<T>& pb, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& t_buf) {
  pair_gram<T>(pb.z, i0, i1, j0, j1, is_distance(pb.t_kernel) ? pb.z_sq.template data_ptr<T>() : nullptr, t_buf);
}

// The x and z tiles of one tile pair: X_I X_J^T into s_buf and Z_I Z_J^T into t_buf (a Labels
// target, cpu_symmetric_joint_family.h: the x tile alone).
template <typename T>
void affinity_tiles(const Problem<T>& pb, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& s_buf,
                    at::Tensor& t_buf) {
  pair_gram<T>(pb.x, i0, i1, j0, j1, is_distance(pb.kernel) ? pb.x_sq.template data_ptr<T>() : nullptr, s_buf);
  if (pb.target == kAffinity) target_tile(pb, i0, i1, j0, j1, t_buf);
}

// The forward's row statistics over every tile pair.
template <typename T, int K, bool T_DIST, bool CAUCHY, bool KL>
std::vector<OnlineAffinityRow> affinity_pair_statistics(const Problem<T>& pb, int64_t block) {
  const int64_t n = pb.n;
  std::vector<OnlineAffinityRow> acc(static_cast<size_t>(n));
  const std::vector<T> coef = target_coefs(pb);
  const bool linear = linear_target(pb), uniform = pair_target_logits_once(pb);
  const KernelRow<T, K> k(pb.prm.template data_ptr<T>()[0]);
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const T* z_sq = pb.z_sq.template data_ptr<T>();
  const auto opts = pb.x.options();
  at::Tensor s_buf = at::empty({block, block}, opts), st_buf = at::empty({block, block}, opts),
             t_buf = at::empty({block, block}, opts), tt_buf = at::empty({block, block}, opts);
  T* s_p = s_buf.template data_ptr<T>();
  T* st_p = st_buf.template data_ptr<T>();
  T* t_p = t_buf.template data_ptr<T>();
  T* tt_p = tt_buf.template data_ptr<T>();
  for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      const int64_t ni = i1 - i0, nj = j1 - j0;
      const bool one_side = i0 == j0;
      affinity_tiles(pb, i0, i1, j0, j1, s_buf, t_buf);
      if (uniform) tile_target_logits(pb, i0, ni, j0, nj, t_p);   // (both sides' logits, once per pair)
      if (!one_side) {
        transpose_tile<T, false>(s_p, ni, nj, st_p);
        transpose_tile<T, false>(t_p, ni, nj, tt_p);
      }
      at::parallel_for(0, one_side ? ni : ni + nj, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const bool rows_of_i = r < ni;   // else a row of J over the columns I (the transposed tiles)
          const int64_t i = rows_of_i ? i0 + r : j0 + (r - ni), col0 = rows_of_i ? j0 : i0;
          const int64_t len = rows_of_i ? nj : ni;
          T* ab = rows_of_i ? s_p + r * nj : st_p + (r - ni) * ni;
          T* tab = rows_of_i ? t_p + r * nj : tt_p + (r - ni) * ni;
          const int64_t self = pb.exclude_self && one_side ? r : -1;
          if (!linear && !uniform) target_row_logits(pb, i, tab, tab, col0, len);   // (the row's own copy)
          add_affinity_segment<T, K, T_DIST, CAUCHY, KL>(k, coef[i], ab, tab, x_sq + col0, x_sq[i], z_sq + col0,
                                                         z_sq[i], len, self, &acc[i]);
        }
      });
  });
  return acc;
}

// t-SNE's Cauchy kernel: student_t with nu = 1 (cpu_cauchy_rows.h)
template <typename T>
bool cauchy_kernel(const Problem<T>& pb) {
  return pb.kernel == kStudentT && pb.prm.template data_ptr<T>()[0] == T(1);
}

template <typename F>
decltype(auto) with_flag(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// f(K, T_DIST, CAUCHY) for pb's kernels: the one switch from codes to instantiations. T_DIST is the
// Gaussian target's; the others run as the dot kernel (linear_target's note).
template <typename T, typename F>
decltype(auto) with_affinity_kernels(const Problem<T>& pb, F&& f) {
  const bool cauchy = cauchy_kernel(pb);
  auto rest = [&](auto kc) {
    return with_flag(pb.t_kernel == kGaussian, [&](auto t_dist) {
      return with_flag(cauchy && decltype(kc)::value == kStudentT, [&](auto c) { return f(kc, t_dist, c); });
    });
  };
  switch (pb.kernel) {   // symmetric_affinity_fit's kernels
    case kDot: return rest(KernelCode<kDot>{});
    case kGaussian: return rest(KernelCode<kGaussian>{});
    case kStudentT: return rest(KernelCode<kStudentT>{});
    case kPower: return rest(KernelCode<kPower>{});
    default: TORCH_CHECK(false, "icon_kernels cpu: the symmetric Affinity schedule has no kernel code ", pb.kernel);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_affinity_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const bool kl = pb.divergence == kKl;
  const bool cauchy = cauchy_kernel(pb);
  const std::vector<OnlineAffinityRow> acc = with_affinity_kernels(pb, [&](auto kc, auto t_dist, auto is_cauchy) {
    return with_flag(kl, [&](auto is_kl) {
      return affinity_pair_statistics<T, decltype(kc)::value, decltype(t_dist)::value, decltype(is_cauchy)::value,
                                      decltype(is_kl)::value>(pb, block);
    });
  });
  RowOutputs<T> out(n, pb.x.options());
  T* st = out.st;
  for (int64_t i = 0; i < n; ++i) {
    const OnlineAffinityRow& a = acc[i];
    const double log_sp = std::log(a.sp);
    // log sum_j e^{s_j - m}: the Cauchy sums are unshifted (over the largest r for the loss)
    const double log_ss = cauchy ? std::log(a.ss) - std::log(a.rmax) : std::log(a.ss);
    const double lse = cauchy ? std::log(a.ss) : a.ms + log_ss, lse_p = a.mt + log_sp;
    const double row = kl ? a.c / a.sp - log_sp + log_ss : a.c / a.sp + log_ss;
    out.inc_p[i] = pb.m_valid > 0;
    out.loss_p[i] = out.inc_p[i] ? T(row) : T(0);
    const T hi = T(lse), hi_p = T(lse_p);
    st[i] = hi;
    st[n + i] = std::isfinite(lse) ? T(lse - double(hi)) : T(0);
    st[2 * n + i] = hi_p;
    st[3 * n + i] = pair_record<T>(block, lse_p, hi_p);
  }
  count_schedule_call(kFamilyRows, n, 0, 4);
  return out.tuple();
}

// The block side of the forward that made stats (T, contiguous), with every row's LSE^p residual
// into lo_p; 0 when they are not the symmetric Affinity forward's (the plain backward runs then).
template <typename T>
int64_t recorded_affinity_block(const T* st, int64_t n, std::vector<T>* lo_p) {
  return recorded_pair_residuals(st, n, 2, lo_p);
}

// H over one tile pair in place of its Gram tile ab (ni x nj, rows from i0, columns from j0), with
// the z tile tab: H_ij = weight(g_i (q_ij - p_ij) + g_j (q_ji - p_ji), d_ij), 0 at an excluded
// self pair; the rows' sums of H into row_sum (ni values). a: the Cauchy kernel's e^{-LSE} of
// every row, high parts then low parts (2n values). uniform: pair_target_logits_once(pb).
template <typename T, int K, bool T_DIST, bool CAUCHY>
void affinity_h_tile(const Problem<T>& pb, const KernelRow<T, K>& k_in, const T* coef, bool uniform, const T* g,
                     const T* hi, const T* lo, const T* hp, const T* lp, const T* a, int64_t i0, int64_t ni,
                     int64_t j0, int64_t nj, T* ab, const T* tab, double* row_sum) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const bool diag = i0 == j0, linear = linear_target(pb);
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    // a local copy: through the reference its constants might alias the stores, and a load of them
    // in the loop kept GCC from vectorising it (scalar code, 3x slower)
    const KernelRow<T, K> k = k_in;
    // the logits of the row's pairs, stored before exp reads them: an expression such as
    // exp(aux * c - lse) would be contracted into an fma, whose unrounded product moves p or q by
    // up to an ulp of the logit (1e-4 relative at target logits of 1e3), and the forward's sums
    // were of the rounded logits (cpu_label_rows.h's LOGITS note)
    std::vector<T> s_row(static_cast<size_t>(nj)), tr_row(s_row.size()), tc_row(s_row.size());
    T* sv = s_row.data();
    T* trv = tr_row.data();
    T* tcv = tc_row.data();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      // the self pair adds nothing when excluded, and nothing to a distance kernel's dX (x_i - x_i)
      // where its Gram-made d^2 is rounding noise (power: W_ii = G n / (d^2 + eps) up to 1e12)
      const int64_t self = (pb.exclude_self || is_distance(K)) && diag ? r : -1;
      T* w = ab + r * nj;
      const T* tr = tab + r * nj;
      const T gi = g[i], hi_i = hi[i], lo_i = lo[i], hp_i = hp[i], lp_i = lp[i], ai = a[i], ai_lo = a[pb.n + i];
      const T xi_sq = x_sq[i];
      const T* gc = g + j0;
      const T* hic = hi + j0;
      const T* loc = lo + j0;
      const T* hpc = hp + j0;
      const T* lpc = lp + j0;
      const T* acol = a + j0;
      const T* acol_lo = a + pb.n + j0;
      const T* xc_sq = x_sq + j0;
      if constexpr (!CAUCHY) {
#pragma omp simd
        for (int64_t j = 0; j < nj; ++j) sv[j] = k.logit(k.aux(w[j], xi_sq, xc_sq[j]));
      }
      pair_target_logits<T, T_DIST>(pb, linear, uniform, coef, i, j0, tr, trv, tcv, nj);
      T rs = 0;
#pragma omp simd reduction(+ : rs)
      for (int64_t j = 0; j < nj; ++j) {
        const T aux = k.aux(w[j], xi_sq, xc_sq[j]);
        T q_r, q_c, rr = 0;
        if constexpr (CAUCHY) {
          rr = T(1) / (T(1) + aux);
          q_r = rr * ai + rr * ai_lo;
          q_c = rr * acol[j] + rr * acol_lo[j];
        } else {
          q_r = vexp((sv[j] - hi_i) - lo_i);
          q_c = vexp((sv[j] - hic[j]) - loc[j]);
        }
        const T p_r = vexp((trv[j] - hp_i) - lp_i), p_c = vexp((tcv[j] - hpc[j]) - lpc[j]);
        const T grad = (gi != T(0) ? gi * (q_r - p_r) : T(0)) + (gc[j] != T(0) ? gc[j] * (q_c - p_c) : T(0));
        T h = CAUCHY ? T(2) * grad * rr : k.weight(grad, aux);
        h = j == self ? T(0) : h;
        w[j] = h;
        rs += h;
      }
      row_sum[r] = double(rs);
    }
  });
}

// The backward of both Affinity schedules over every tile pair: the x and z tiles (affinity_tiles),
// fill(kernel, t_dist, cauchy)(i0, ni, j0, nj, x tile, z tile, row sums) turning the x tile into H
// and its row sums, then dX_I += H X_J, dX_J += H^T X_I and a distance's -diag(H 1) X. Returns the
// backward op's outputs (the whole dL/dx as dx, zeros for dy and dparam); counter: the
// symmetric_schedule_counters slot of the calling schedule.
template <typename T, typename Fill>
std::vector<at::Tensor> h_tile_backward(const Problem<T>& pb, int64_t block, int counter, Fill&& fill) {
  const int64_t n = pb.n;
  const auto opts = pb.x.options();
  const bool dist = is_distance(pb.kernel);
  auto dfeat = at::zeros({n, pb.d}, opts);
  auto h_sum = at::zeros({n}, opts.dtype(at::kDouble));
  double* hs = h_sum.template data_ptr<double>();
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts);
  std::vector<double> row_sum(static_cast<size_t>(block));
  with_affinity_kernels(pb, [&](auto kc, auto t_dist, auto cauchy) {
    auto h_tile = fill(kc, t_dist, cauchy);
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      const int64_t ni = i1 - i0, nj = j1 - j0;
      affinity_tiles(pb, i0, i1, j0, j1, s_buf, t_buf);
      h_tile(i0, ni, j0, nj, s_buf.template data_ptr<T>(), t_buf.template data_ptr<T>(), row_sum.data());
      at::Tensor h = dense_tile(s_buf, ni, nj);
      dfeat.narrow(0, i0, ni).addmm_(h, pb.x.narrow(0, j0, nj));
      if (i0 != j0) dfeat.narrow(0, j0, nj).addmm_(h.t(), pb.x.narrow(0, i0, ni));
      if (dist) {   // diag(H 1) of both sides: H's row sums and (off the diagonal) column sums
        for (int64_t r = 0; r < ni; ++r) hs[i0 + r] += row_sum[r];
        if (i0 != j0) h_sum.narrow(0, j0, nj) += h.sum(0, false, at::kDouble);
      }
    });
    return 0;
  });
  if (dist) dfeat -= h_sum.to(opts.dtype()).unsqueeze(1) * pb.x;
  count_schedule_call(kFamilyRows, n, 1, counter);
  return {dfeat, at::zeros({pb.m, pb.d}, opts), at::zeros({n}, opts.dtype(at::kDouble)), at::Tensor(), at::Tensor(),
          at::Tensor()};
}

// stats: the forward's (T, contiguous); block and lo_p: recorded_affinity_block's.
template <typename T>
std::vector<at::Tensor> symmetric_affinity_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                    const at::Tensor& valid, const at::Tensor& stats, int64_t block,
                                                    const std::vector<T>& lo_p) {
  const int64_t n = pb.n;
  const at::Tensor g_t = masked_grads(grad_rows, valid, pb.x.options());
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const std::vector<T> coef = target_coefs(pb);
  const bool uniform = pair_target_logits_once(pb);   // (once per call, not per tile pair)
  // the Cauchy kernel's q / r = e^{-LSE} in two parts (q = r a_hi + r a_lo): one rounding of it
  // would be an error shared by the whole row, with no renormalisation to take it off
  std::vector<T> a(static_cast<size_t>(2 * n));
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::exp(-(double(st[i]) + double(st[n + i])));
    a[i] = T(v);
    a[n + i] = std::isfinite(v) ? T(v - double(a[i])) : T(0);
  }
  return h_tile_backward(pb, block, 5, [&](auto kc, auto t_dist, auto cauchy) {
    constexpr int K = decltype(kc)::value;
    return [&, k = KernelRow<T, K>(pb.prm.template data_ptr<T>()[0])](int64_t i0, int64_t ni, int64_t j0, int64_t nj,
                                                                     T* ab, const T* tab, double* row_sum) {
      affinity_h_tile<T, K, decltype(t_dist)::value, decltype(cauchy)::value>(
          pb, k, coef.data(), uniform, g, st, st + n, st + 2 * n, lo_p.data(), a.data(), i0, ni, j0, nj, ab, tab,
          row_sum);
    };
  });
}

}  // namespace cpu
}  // namespace icon
