// The symmetric schedule (DESIGN.md §1.3) for joint t-SNE: van der Maaten's objective, an Affinity
// target symmetrised and normalised over all pairs, P_ij = (p_{j|i} + p_{i|j}) / 2N, and one learned
// distribution q_ij = e^{s_ij} / Z (DESIGN.md §1.2), in self mode. P and q are both symmetric, so one
// value per pair serves both rows. Per pair of row blocks I <= J (cpu_tile_pairs.h's blocks):
//   pass 1    the z tile gives LSE^p of the rows of I (over J) and of J (over I, transposed),
//             merged online (the conditional p_{j|i} that P is made of);
//   forward   the x and z tiles give, once per pair, the learned term (Cauchy: r = e^s = 1/(1+d^2);
//             otherwise s), P and P (log P - s), with one log per pair and one exp (one target
//             parameter for every row: pair_factors) or two; their row sums (rows of I) and column sums (rows
//             of J) make each row's sum_j P, sum_j P (log P - s) and its own LSE_i, and the rows are
//             put under log Z = logsumexp_i LSE_i afterwards (cpu_global_rows.h: put_under_log_z);
//   backward  H_ij = weight(-(g_i + g_j) P_ij + 2 q_ij C, d_ij) with C = sum_k g_k P_k / sum_k q_k
//             (every row moves Z), then dX_I += H X_J, dX_J += H^T X_I.
// 1/2 + 1 + 2 = three and a half GEMM-equivalents (the plain joint rows take seven). The stats are the plain
// joint rows' (log Z, -sum_j P, LSE^p, the row's share of q), so the plain backward can run after
// this forward (a learned parameter's gradient) and this backward after the plain forward; which
// backward runs follows ICON_KERNELS_SYMMETRIC at the backward (no row is free for a record: a
// switch flipped between the forward and the backward recomputes the tiles with other blocks, at
// the cost of an ulp of each logit).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_global_rows.h"          // put_under_log_z
#include "cpu_symmetric_affinity.h"   // target_coefs, target_aux, with_affinity_kernels, affinity_tiles

namespace icon {
namespace cpu {

// Whether pb is joint t-SNE with the structure of this schedule (the off switch aside):
// symmetric_affinity_structure's, with joint normalisation and a symmetrised target.
template <typename T>
bool symmetric_joint_fit(const Problem<T>& pb) {
  return pb.joint && pb.symmetrize && symmetric_affinity_structure(pb);
}

template <typename T>
bool symmetric_joint_apply(const Problem<T>& pb) {
  return symmetric_joint_fit(pb) && symmetric_schedule_enabled();
}

// One row's online max and sum of exps (LSE).
struct OnlineLse {
  double m = -std::numeric_limits<double>::infinity(), s = 0;
  void add(double seg_max, double seg_sum_at_max) {   // a segment's sum of e^{v - seg_max}
    if (seg_max == -std::numeric_limits<double>::infinity()) return;
    if (seg_max > m) {
      s = s * std::exp(m - seg_max) + seg_sum_at_max;
      m = seg_max;
    } else {
      s += seg_sum_at_max * std::exp(seg_max - m);
    }
  }
  double lse() const { return m + std::log(s); }   // -inf without a term; NaN stays NaN
};

// Pass 1: LSE^p of every row, unrounded (NaN where a target logit is).
template <typename T, bool T_DIST>
std::vector<double> joint_target_lse_wide(const Problem<T>& pb, int64_t block) {
  const int64_t n = pb.n;
  std::vector<OnlineLse> acc(static_cast<size_t>(n));
  std::vector<double> nan_seen(static_cast<size_t>(n), 0.0);
  const std::vector<T> coef = target_coefs(pb);
  const bool linear = linear_target(pb), uniform = pair_target_logits_once(pb);
  const T* z_sq = pb.z_sq.template data_ptr<T>();
  const auto opts = pb.x.options();
  at::Tensor t_buf = at::empty({block, block}, opts), tt_buf = at::empty({block, block}, opts);
  T* t_p = t_buf.template data_ptr<T>();
  T* tt_p = tt_buf.template data_ptr<T>();
  for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      const int64_t ni = i1 - i0, nj = j1 - j0;
      const bool one_side = i0 == j0;
      target_tile(pb, i0, i1, j0, j1, t_buf);
      if (uniform) tile_target_logits(pb, i0, ni, j0, nj, t_p);   // (both sides' logits, once per pair)
      if (!one_side) transpose_tile<T, false>(t_p, ni, nj, tt_p);
      at::parallel_for(0, one_side ? ni : ni + nj, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const bool rows_of_i = r < ni;
          const int64_t i = rows_of_i ? i0 + r : j0 + (r - ni), col0 = rows_of_i ? j0 : i0;
          const int64_t len = rows_of_i ? nj : ni;
          T* t = rows_of_i ? t_p + r * nj : tt_p + (r - ni) * ni;
          const int64_t self = pb.exclude_self && one_side ? r : -1;
          if (!linear && !uniform) target_row_logits(pb, i, t, t, col0, len);   // (the row's own copy; coef 1)
          const T ci = coef[i], zi_sq = z_sq[i];
          const T* zc_sq = z_sq + col0;
          const T inf = std::numeric_limits<T>::infinity();
          T mx = -inf, nan = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nan)
          for (int64_t j = 0; j < len; ++j) {
            const T v = target_aux<T, T_DIST>(t[j], zi_sq, zc_sq[j]) * ci;
            t[j] = j != self ? v : -inf;
            mx = t[j] > mx ? t[j] : mx;
            nan += t[j] != t[j] ? T(1) : T(0);
          }
          if (nan > 0) nan_seen[i] = 1;
          if (mx == -inf) continue;
          acc[i].add(double(mx), blocked_exp_sum(t, len, mx));
        }
      });
  });
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = nan_seen[i] != 0 ? std::numeric_limits<double>::quiet_NaN() : acc[i].lse();
  return out;
}

// ... rounded to T, as the plain rows' (global_rows).
template <typename T, bool T_DIST>
std::vector<T> joint_target_lse(const Problem<T>& pb, int64_t block) {
  const std::vector<double> wide = joint_target_lse_wide<T, T_DIST>(pb, block);
  return std::vector<T>(wide.begin(), wide.end());
}

// Both sides' conditional target probabilities of a pair from one exp, where the pair's target
// logit is one value (same_pair_target_logits): with L_lo = min(LSE^p_i, LSE^p_j) and L_hi the
// other, e = e^{t - L_lo} is the larger of p_{j|i} and p_{i|j} and the smaller is e f, f =
// e^{L_lo - L_hi} = u_lo v_hi with u = e^{L - c} and v = e^{c - L} per row (c the midpoint of
// the LSE range). Only where every LSE^p is finite and the range keeps u and v normal (ok);
// otherwise every pair takes its two exps.
template <typename T>
struct PairFactors {
  bool ok = false;
  std::vector<T> u, v;
};

template <typename T>
PairFactors<T> pair_factors(const Problem<T>& pb, const T* lse_p) {
  PairFactors<T> pf;
  if (!same_pair_target_logits(pb)) return pf;
  // half the range in e-folds that keeps e^{+-range/2} normal, with a margin (float32: e^{+-80})
  const double half_range = std::is_same<T, float>::value ? 80.0 : 700.0;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t i = 0; i < pb.n; ++i) {
    const double l = double(lse_p[i]);
    if (!std::isfinite(l)) return pf;
    lo = std::min(lo, l);
    hi = std::max(hi, l);
  }
  if (hi - lo > 2 * half_range) return pf;
  const double c = 0.5 * (lo + hi);
  pf.u.resize(static_cast<size_t>(pb.n));
  pf.v.resize(pf.u.size());
  for (int64_t i = 0; i < pb.n; ++i) {
    pf.u[i] = T(std::exp(double(lse_p[i]) - c));
    pf.v[i] = T(std::exp(c - double(lse_p[i])));
  }
  pf.ok = true;
  return pf;
}

// half of P's numerator, (p_{j|i} + p_{i|j}) / 2, of one pair: one exp from the pair's logit t and
// the factors (pair_factors), or two from both orientations' logits (t, t_other)
// The pair's smaller LSE^p and f = e^{-|LSE^p_i - LSE^p_j|} from the factors (pair_factors)
template <typename T>
struct LowLse {
  T lse, f;
};

template <typename T>
ICON_SIMD_INLINE LowLse<T> low_lse(T li, T lj, T ui, T vi, T uj, T vj) {
  const bool i_low = li <= lj;
  return {i_low ? li : lj, i_low ? ui * vj : uj * vi};
}

template <typename T>
ICON_SIMD_INLINE T half_p_one_exp(T t, T li, T lj, T ui, T vi, T uj, T vj) {
  const LowLse<T> lo = low_lse(li, lj, ui, vi, uj, vj);
  return vexp(t - lo.lse) * (T(1) + lo.f) * T(0.5);
}

template <typename T>
ICON_SIMD_INLINE T half_p_two_exps(T t, T t_other, T li, T lj) {
  return (vexp(t - li) + vexp(t_other - lj)) * T(0.5);
}

// Row i's (p_{j|i} + p_{i|j}) / 2 over the columns [j0, j0 + nj) into out (which may be other),
// from both orientations' target logits own and other: one exp per pair under pf, else two.
template <typename T>
void half_p_row(const PairFactors<T>& pf, const T* lse_p, int64_t i, int64_t j0, int64_t nj, const T* own,
                const T* other, T* out) {
  const T li = lse_p[i];
  const T* lc = lse_p + j0;
  if (pf.ok) {
    const T ui = pf.u[i], vi = pf.v[i];
    const T* uc = pf.u.data() + j0;
    const T* vc = pf.v.data() + j0;
#pragma omp simd
    for (int64_t j = 0; j < nj; ++j) out[j] = half_p_one_exp(own[j], li, lc[j], ui, vi, uc[j], vc[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < nj; ++j) out[j] = half_p_two_exps(own[j], other[j], li, lc[j]);
  }
}

// log((p_{j|i} + p_{i|j}) / 2) - log_shift of row i over the columns [j0, j0 + len) into lp, exact
// where both p underflow, from both orientations' target logits own (t_ij) and other (t_ji, which
// it may overwrite): under the factors (pf.ok: e^{t - min(LSE^p_i, LSE^p_j)} is the larger of both
// sides' p) a log1p per pair, else symmetric_log_p's exp and log1p; -inf at self. Joint
// normalisation shifts by log N (cpu_symmetric_joint_family.h); a symmetrised target's conditional
// rows by 0, and divide by each row's mass afterwards (cpu_symmetric_affinity_family.h).
template <typename T>
void symmetrised_log_p_row(const PairFactors<T>& pf, const T* lse_p, int64_t i, int64_t j0, int64_t len,
                           int64_t self, T log_shift, const T* own, T* other, T* lp) {
  const T li = lse_p[i], shift = log_shift + T(0.69314718055994530942);   // and log 2
  const T* lc = lse_p + j0;
  if (pf.ok) {
    const T ui = pf.u[i], vi = pf.v[i];
    const T* uc = pf.u.data() + j0;
    const T* vc = pf.v.data() + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const LowLse<T> lo = low_lse(li, lc[j], ui, vi, uc[j], vc[j]);
      lp[j] = (own[j] - lo.lse) + vlog1p(lo.f) - shift;
    }
  } else {
    symmetric_log_p<T>(own, li, other, lc, -1, len);   // log((p_{j|i} + p_{i|j}) / 2) into other
    const T only = log_shift;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) lp[j] = other[j] - only;
  }
  if (self >= 0) lp[self] = -std::numeric_limits<T>::infinity();
}

// The per-pair values of one tile pair in place, after affinity_tiles: the s tile becomes the
// learned term (Cauchy: r; else s), the z tile P_ij, and k_buf P (log P - s) (cross-entropy:
// -P s); 0 (s: -inf) at an excluded self pair. P = h / N with h = (p_{j|i} + p_{i|j}) / 2 (one exp
// under pf, else two), and log P - s = log(h (1 + d^2)) - log N under the Cauchy kernel (one log
// for both, s = -log(1 + d^2)), log h - log N - s otherwise: P = 0 where both p underflow, as the
// plain rows' exp of their symmetrised log p (symmetric_log_p); the products stored before exp
// reads them (cpu_symmetric_affinity.h's LOGITS note).
template <typename T, int K, bool T_DIST, bool CAUCHY, bool KL>
void joint_pair_values(const Problem<T>& pb, const KernelRow<T, K>& k_in, const T* coef, bool uniform, const T* lse_p,
                       const PairFactors<T>& pf, int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* ab, T* tab,
                       T* kv) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const bool diag = i0 == j0, linear = linear_target(pb);
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    // a local copy: through the reference its constants might alias the stores, and a load of them
    // in the loop kept GCC from vectorising it (scalar code, 3x slower)
    const KernelRow<T, K> k = k_in;
    std::vector<T> own(static_cast<size_t>(nj)), other(own.size());
    T* ov = own.data();
    T* tv = other.data();
    const T inf = std::numeric_limits<T>::infinity();
    // locals, not the captured references: a load through one in the loop (it might alias the
    // stores) kept GCC from vectorising it (scalar code, 3x slower)
    const T log_n = T(std::log(double(pb.n))), inv_n = T(1.0 / double(pb.n));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      const int64_t self = pb.exclude_self && diag ? r : -1;
      T* w = ab + r * nj;
      T* p = tab + r * nj;
      T* kr = kv + r * nj;
      const T xi_sq = x_sq[i];
      const T* xc_sq = x_sq + j0;
      pair_target_logits<T, T_DIST>(pb, linear, uniform, coef, i, j0, p, ov, tv, nj);   // t_ij, t_ji
      half_p_row(pf, lse_p, i, j0, nj, ov, tv, p);
#pragma omp simd
      for (int64_t j = 0; j < nj; ++j) {
        const T aux = k.aux(w[j], xi_sq, xc_sq[j]);
        const T h = p[j], pj = h * inv_n;
        T kj;
        if constexpr (KL && CAUCHY) kj = pj * (vlog(h * (T(1) + aux)) - log_n);
        else if constexpr (KL) kj = pj * (vlog(h) - log_n - k.logit(aux));
        else if constexpr (CAUCHY) kj = pj * vlog1p(aux);   // cross-entropy: -P s, no P log P
        else kj = -pj * k.logit(aux);
        kj = pj == T(0) ? T(0) : kj;
        const bool valid = j != self;
        p[j] = valid ? pj : T(0);
        kr[j] = valid ? kj : T(0);
        if constexpr (CAUCHY) w[j] = valid ? T(1) / (T(1) + aux) : T(0);
        else w[j] = valid ? k.logit(aux) : -inf;
      }
    }
  });
}

// A row's sums of the forward: sum_j P, sum_j P (log P - s), and its learned LSE (Cauchy: sum_j r
// unshifted in ls.s with ls.m = 0).
struct JointRow {
  double pm = 0, c = 0;
  OnlineLse ls;
};

// The sums of one tile pair into the rows of I (the tile's rows) and, off the diagonal, of J (its
// columns: SIMD across them, no transposes).
template <typename T, bool CAUCHY>
void add_joint_sums(int64_t i0, int64_t ni, int64_t j0, int64_t nj, const T* w, const T* p, const T* kv,
                    std::vector<JointRow>& acc) {
  const bool diag = i0 == j0;
  const T inf = std::numeric_limits<T>::infinity();
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * nj;
      const T* pr = p + r * nj;
      const T* kr = kv + r * nj;
      T pm = 0, c = 0;
#pragma omp simd reduction(+ : pm, c)
      for (int64_t j = 0; j < nj; ++j) {
        pm += pr[j];
        c += kr[j];
      }
      JointRow& a = acc[i0 + r];
      a.pm += double(pm);
      a.c += double(c);
      if constexpr (CAUCHY) {
        T rs = 0;
#pragma omp simd reduction(+ : rs)
        for (int64_t j = 0; j < nj; ++j) rs += wr[j];
        a.ls.m = 0;
        a.ls.s += double(rs);
      } else {
        const T mx = row_max(wr, nj);
        if (mx != -inf) a.ls.add(double(mx), blocked_exp_sum(wr, nj, mx));
      }
    }
  });
  if (diag) return;
  // the columns: each thread a range of them, over every row of the tile (sums in T: <= 256 rows)
  at::parallel_for(0, nj, 64, [&](int64_t c0, int64_t c1) {
    const int64_t len = c1 - c0;
    std::vector<T> pm(static_cast<size_t>(len), T(0)), c(pm.size(), T(0)), mx(pm.size(), -inf), se(pm.size(), T(0));
    T* pmv = pm.data();
    T* cv = c.data();
    T* mv = mx.data();
    T* sv = se.data();
    for (int64_t r = 0; r < ni; ++r) {
      const T* wr = w + r * nj + c0;
      const T* pr = p + r * nj + c0;
      const T* kr = kv + r * nj + c0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        pmv[j] += pr[j];
        cv[j] += kr[j];
        if constexpr (CAUCHY) sv[j] += wr[j];
        else mv[j] = wr[j] > mv[j] ? wr[j] : mv[j];
      }
    }
    if constexpr (!CAUCHY) {
      for (int64_t r = 0; r < ni; ++r) {
        const T* wr = w + r * nj + c0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) sv[j] += mv[j] == -inf ? T(0) : vexp(wr[j] - mv[j]);
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      JointRow& a = acc[j0 + c0 + j];
      a.pm += double(pmv[j]);
      a.c += double(cv[j]);
      if constexpr (CAUCHY) {
        a.ls.m = 0;
        a.ls.s += double(sv[j]);
      } else if (mv[j] != -inf) {
        a.ls.add(double(mv[j]), double(sv[j]));
      }
    }
  });
}

// The forward: (loss, included, stats) as the plain joint rows' (put_under_log_z).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_joint_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const auto opts = pb.x.options();
  std::vector<T> lse_p;
  std::vector<JointRow> acc(static_cast<size_t>(n));
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts),
             k_buf = at::empty({block, block}, opts);
  with_affinity_kernels(pb, [&](auto kc, auto t_dist, auto is_cauchy) {
    constexpr int K = decltype(kc)::value;
    constexpr bool TD = decltype(t_dist)::value, C = decltype(is_cauchy)::value;
    lse_p = joint_target_lse<T, TD>(pb, block);
    const std::vector<T> coef = target_coefs(pb);
    const bool uniform = pair_target_logits_once(pb);
    const PairFactors<T> pf = pair_factors(pb, lse_p.data());
    if (pf.ok) symmetric_schedule_counters()[kJointOneExpCounter].fetch_add(1, std::memory_order_relaxed);
    const KernelRow<T, K> k(pb.prm.template data_ptr<T>()[0]);
    return with_flag(pb.divergence == kKl, [&](auto kl) {
      for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
          const int64_t ni = i1 - i0, nj = j1 - j0;
          affinity_tiles(pb, i0, i1, j0, j1, s_buf, t_buf);
          T* w = s_buf.template data_ptr<T>();
          T* p = t_buf.template data_ptr<T>();
          T* kv = k_buf.template data_ptr<T>();
          joint_pair_values<T, K, TD, C, decltype(kl)::value>(pb, k, coef.data(), uniform, lse_p.data(), pf, i0, ni,
                                                              j0, nj, w, p, kv);
          add_joint_sums<T, C>(i0, ni, j0, nj, w, p, kv, acc);
      });
      return 0;
    });
  });
  RowOutputs<T> out(n, opts);
  std::vector<double> row_lse(static_cast<size_t>(n)), row_loss(row_lse.size()), p_mass(row_lse.size());
  for (int64_t i = 0; i < n; ++i) {
    const JointRow& a = acc[i];
    row_lse[i] = a.ls.s > 0 || std::isnan(a.ls.s) ? a.ls.lse() : -std::numeric_limits<double>::infinity();
    const double shift = double(finite_shift(T(row_lse[i])));   // as put_under_log_z takes it off
    row_loss[i] = a.c + a.pm * shift;                           // sum_j P (log P - s + LSE_i)
    p_mass[i] = a.pm;
    out.inc_p[i] = pb.m_valid > 0;
    out.st[2 * n + i] = lse_p[i];
  }
  put_under_log_z<T>(pb, row_lse, row_loss, p_mass, out.loss_p, out.inc_p, out.st);
  count_schedule_call(kFamilyRows, n, 0, 6);
  return out.tuple();
}

// H over one tile pair in place of its Gram tile ab, with the z tile tab (affinity_tiles'):
// H_ij = weight(-(g_i + g_j) P_ij + 2 q_ij C, d_ij), 0 at an excluded self pair (and at a distance
// kernel's self pair, whose x_i - x_i is 0); the rows' sums of H into row_sum.
template <typename T, int K, bool T_DIST, bool CAUCHY>
void joint_h_tile(const Problem<T>& pb, const KernelRow<T, K>& k_in, const T* coef, bool uniform, const T* lse_p,
                  const PairFactors<T>& pf, const T* g, T log_z, double centre_exact, int64_t i0, int64_t ni,
                  int64_t j0, int64_t nj, T* ab, const T* tab, double* row_sum) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const bool diag = i0 == j0, linear = linear_target(pb);
  // the Cauchy kernel's q / r = 1 / Z, and C, each in two parts (one rounding would be an error
  // shared by every pair)
  const T centre = T(centre_exact);
  const double a_exact = std::exp(-double(log_z));
  const T a_z = T(a_exact), a_z_lo = std::isfinite(a_exact) ? T(a_exact - double(a_z)) : T(0);
  const T centre_lo = T(centre_exact - double(centre));
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    // a local copy: through the reference its constants might alias the stores, and a load of them
    // in the loop kept GCC from vectorising it (scalar code, 3x slower)
    const KernelRow<T, K> k = k_in;
    std::vector<T> own(static_cast<size_t>(nj)), other(own.size()), s_row(own.size());
    T* ov = own.data();
    T* tv = other.data();
    T* sv = s_row.data();
    // locals (joint_pair_values' note)
    const T inv_n = T(1.0 / double(pb.n)), az = a_z, az_lo = a_z_lo, lz = log_z, cz = centre, cz_lo = centre_lo;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      const int64_t self = (pb.exclude_self || is_distance(K)) && diag ? r : -1;
      T* w = ab + r * nj;
      const T* tr = tab + r * nj;
      const T gi = g[i], xi_sq = x_sq[i];
      const T* gc = g + j0;
      const T* xc_sq = x_sq + j0;
      pair_target_logits<T, T_DIST>(pb, linear, uniform, coef, i, j0, tr, ov, tv, nj);
      // (p_{j|i} + p_{i|j}) / 2 into tv: P itself from one exp or two (joint_pair_values' h; here
      // P = 0 where both underflow is exact, the forward's P log P needs no more)
      half_p_row(pf, lse_p, i, j0, nj, ov, tv, tv);
      if constexpr (!CAUCHY) {
#pragma omp simd
        for (int64_t j = 0; j < nj; ++j) sv[j] = k.logit(k.aux(w[j], xi_sq, xc_sq[j]));
      }
      T rs = 0;
#pragma omp simd reduction(+ : rs)
      for (int64_t j = 0; j < nj; ++j) {
        const T aux = k.aux(w[j], xi_sq, xc_sq[j]);
        T q, rr = 0;
        if constexpr (CAUCHY) {
          rr = T(1) / (T(1) + aux);
          q = rr * az + rr * az_lo;
        } else {
          q = vexp(sv[j] - lz);
        }
        const T pj = tv[j] * inv_n;
        const T grad = (T(2) * q * cz + T(2) * q * cz_lo) - (gi + gc[j]) * pj;
        T h = CAUCHY ? T(2) * grad * rr : k.weight(grad, aux);
        h = j == self ? T(0) : h;
        w[j] = h;
        rs += h;
      }
      row_sum[r] = double(rs);
    }
  });
}

// The backward from the joint stats (T, contiguous): log Z (row 0), -sum_j P (row 1), LSE^p
// (row 2), each row's share of q (row 3).
template <typename T>
std::vector<at::Tensor> symmetric_joint_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                 const at::Tensor& valid, const at::Tensor& stats) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const auto opts = pb.x.options();
  const at::Tensor g_t = masked_grads(grad_rows, valid, opts);
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  // C = sum_k g_k P_k / sum_k q_k: the plain rows' centre, signed (row 1 holds -sum_j P)
  const double centre = -joint_centre(g, st, n);
  const std::vector<T> coef = target_coefs(pb);
  const bool uniform = pair_target_logits_once(pb);
  const PairFactors<T> pf = pair_factors(pb, st + 2 * n);
  if (pf.ok) symmetric_schedule_counters()[kJointOneExpCounter].fetch_add(1, std::memory_order_relaxed);
  return h_tile_backward(pb, block, 7, [&](auto kc, auto t_dist, auto cauchy) {
    constexpr int K = decltype(kc)::value;
    return [&, k = KernelRow<T, K>(pb.prm.template data_ptr<T>()[0])](int64_t i0, int64_t ni, int64_t j0, int64_t nj,
                                                                     T* ab, const T* tab, double* row_sum) {
      joint_h_tile<T, K, decltype(t_dist)::value, decltype(cauchy)::value>(pb, k, coef.data(), uniform, st + 2 * n, pf, g,
                                                                           st[0], centre, i0, ni, j0, nj, ab, tab,
                                                                           row_sum);
    };
  });
}

}  // namespace cpu
}  // namespace icon
