// The symmetric schedule (DESIGN.md §1.3) for the rest of joint normalisation on a symmetrised
// Affinity target in self mode (DESIGN.md §1.2): van der Maaten's P_ij = (p_{j|i} + p_{i|j}) / 2N
// against q_ij = e^{s_ij} / Z under an f-divergence (reverse KL, TV, Hellinger, JS, chi^2), or
// KL / cross-entropy with alpha or beta > 0 (KL and cross-entropy without them have their own,
// cheaper schedule: cpu_symmetric_joint.h). Each pair of row blocks I <= J is one Gram tile of x
// and one of z, read by the rows of I and, column by column, by the rows of J, as the conditional
// Affinity family schedule's rows (cpu_symmetric_affinity_family.h), whose row iterators this uses:
//   pass 1    each row's learned LSE_i and target LSE^p_i, merged online (add_lse_segment; t-SNE's
//             Cauchy kernel sums its weights, add_weight_segment); then log Z = logsumexp_i LSE_i;
//   pass 2    each row's divergence sums under log Z (f_row: the loss and Gamma_i = sum_j q g),
//             with log P from both orientations' target logits (symmetric_log_p: t_ij under row
//             i's parameter, t_ji under row j's, OTHER) less log N;
//   backward  each row's W from dL/ds_ij = (1 - beta) (g_i q_ij g_ij - q_ij C), C = sum_k g_k
//             Gamma_k / sum_k q_k over every row (s_ij moves every q through Z; rows with g_i = 0
//             still take the C part), then H_IJ = W_IJ + W_JI^T, dX_I += H X_J, dX_J += H^T X_I.
// Three N^2 d GEMM-equivalents (each sweep half of both Grams, the backward half of both and two
// products) instead of the plain joint rows' seven. The stats are the plain joint rows' (log Z,
// Gamma_i, LSE^p_i, the row's share of q), so either backward runs after either forward; which
// one runs follows ICON_KERNELS_SYMMETRIC at the backward (as cpu_symmetric_joint.h's, no row is
// free for a record). Both take LSE^p rounded to T, as the plain rows do (their symmetrised P is
// not renormalised either). The target's gradient (a symmetrised target has none on the CPU) and
// a y that is not x's autograd input run the plain rows; the learned parameter's gradient runs
// here (PARAM), centred once over every row as the plain joint rows centre it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_f_rows.h"
#include "cpu_global_rows.h"   // log_sum_exp, q_masses, symmetric_log_p
#include "cpu_symmetric_affinity_family.h"
#include "cpu_symmetric_joint.h"   // symmetric_joint_fit
#include "cpu_symmetric_labels.h"  // symmetric_schedule_enabled, count_schedule_call
#include "cpu_tile_pairs.h"

namespace icon {
namespace cpu {

// Whether pb has this schedule's structure: joint normalisation of a symmetrised Affinity target
// in self mode (x is y, z_cols is z), one scalar learned parameter, any learned kernel but log_dot
// and any target kernel (its parameter one or per row), and what joint t-SNE's schedule does not
// take (an f-divergence, or alpha or beta > 0).
template <typename T>
bool symmetric_joint_family_fit(const Problem<T>& pb) {
  if (!pb.joint || !pb.symmetrize || pb.target != kAffinity || !pb.self_pairs || !pb.z_self || !pb.scalar_param ||
      pb.n < 2)
    return false;
  return pb.kernel != kLogDot && !symmetric_joint_fit(pb);
}

template <typename T>
bool symmetric_joint_family_apply(const Problem<T>& pb) {
  return symmetric_joint_family_fit(pb) && symmetric_schedule_enabled();
}

// Row i's terms over one column block as f_row takes them, after a row iterator with OTHER: sc.s
// its learned logits, sc.t its target logits t_ij and sc.t_other the other orientation's t_ji,
// which becomes log((p_{j|i} + p_{i|j}) / 2) (-inf at self); sc.p becomes P = e^{that - log N}
// (0 at self). lse_p: every row's LSE^p in T.
template <typename T>
FRow<T> joint_family_segment(const Problem<T>& pb, int64_t i, int64_t col0, int64_t len, int64_t self, T log_z,
                             const T* lse_p, double log_n, AffinityRowScratch<T>& sc) {
  T* lp = sc.t_other.data();
  T* p = sc.p.data();
  symmetric_log_p<T>(sc.t.data(), lse_p[i], lp, lse_p + col0, self, len);
  FRow<T> r = pb.f_row(i, sc.s.data(), log_z, p, lp, T(0), log_n, 0.0);
  const T shift = r.log_p_shift;   // -log N
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) p[j] = vexp(lp[j] + shift);   // (0 at self: lp = -inf)
  r.m = len;
  r.self = self;
  return r;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_joint_family_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const auto opts = pb.x.options();
  RowOutputs<T> out(n, opts);
  T* st = out.st;
  std::vector<OnlineLabelRow<T>> acc_q(static_cast<size_t>(n)), acc_p(static_cast<size_t>(n));
  std::vector<double> loss(static_cast<size_t>(n)), gamma(static_cast<size_t>(n)), lse_q(static_cast<size_t>(n));
  std::vector<T> lse_p(static_cast<size_t>(n));
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts);
  const int log_p = pb.log_p_mode();
  const double log_n = std::log(double(n));
  T log_z = 0;
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    return with_target_distance(pb.t_kernel, [&](auto td) {
      constexpr bool T_DIST = decltype(td)::value;
      const AffinityPairRows<T, K> rows{KernelRow<T, K>(pb.prm.template data_ptr<T>()[0]),
                                        pb.x_sq.template data_ptr<T>(), pb.z_sq.template data_ptr<T>(),
                                        target_coefs(pb), linear_target(pb), pair_target_logits_once(pb),
                                        pb.exclude_self};
      // pass 1: every row's LSE and LSE^p (the conditional family's pass 1)
      with_cauchy_flag<K>(cauchy_kernel(pb), [&](auto is_cauchy) {
        constexpr bool CAUCHY = decltype(is_cauchy)::value;
        for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
          for_each_affinity_logit_row<T, K, T_DIST, CAUCHY>(
              pb, rows, i0, i1, j0, j1, block, s_buf, t_buf,
              [&](const SideRow& sr, int64_t self, AffinityRowScratch<T>& sc) {
                const LabelRow seg{nullptr, 0, sr.len, self, double(pb.alpha), pb.m_valid};
                if constexpr (CAUCHY) add_weight_segment<T>(seg, sc.s.data(), &acc_q[sr.i]);
                else add_lse_segment<T>(seg, sc.s.data(), &acc_q[sr.i]);
                add_lse_segment<T>(seg, sc.t.data(), &acc_p[sr.i]);
              });
        });
        return 0;
      });
      for (int64_t i = 0; i < n; ++i) {
        lse_q[i] = online_lse(acc_q[i]);
        lse_p[i] = T(online_lse(acc_p[i]));
      }
      log_z = T(log_sum_exp(lse_q));
      // pass 2: every row's divergence sums under log Z
      for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
        for_each_affinity_logit_row<T, K, T_DIST, false, true>(
            pb, rows, i0, i1, j0, j1, block, s_buf, t_buf,
            [&](const SideRow& sr, int64_t self, AffinityRowScratch<T>& sc) {
              const FRow<T> r = joint_family_segment(pb, sr.i, sr.col0, sr.len, self, log_z, lse_p.data(), log_n, sc);
              const FRowSums f = f_row<T>(pb.divergence, r, log_p, nullptr, nullptr);
              loss[sr.i] += f.loss;
              gamma[sr.i] += f.gamma;
            });
      });
      return 0;
    });
  });
  // the plain joint rows' stats (cpu_loss.cpp): log Z, Gamma_i, LSE^p, the row's share of q
  const std::vector<double> q_mass = q_masses(lse_q, log_z);
  const bool has = pb.m_valid > 0;
  for (int64_t i = 0; i < n; ++i) {
    out.inc_p[i] = has;
    out.loss_p[i] = std::isnan(log_z) ? log_z : has ? T(loss[i]) : T(0);   // NaN logits: NaN, even without p
    st[i] = log_z;
    st[n + i] = T(gamma[i]);
    st[2 * n + i] = lse_p[i];
    st[3 * n + i] = T(q_mass[i]);
  }
  count_schedule_call(pb.row_path(), n, 0, kJointFamilyForwardCounter);
  return out.tuple();
}

// stats: a joint forward's, plain or this schedule's (T, contiguous).
template <typename T>
std::vector<at::Tensor> symmetric_joint_family_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                        const at::Tensor& valid, const at::Tensor& stats,
                                                        bool param_grad) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const auto opts = pb.x.options();
  const at::Tensor g_t = masked_grads(grad_rows, valid, opts);
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T keep_q = T(1) - pb.beta, log_z = st[0];
  const bool dist = is_distance(pb.kernel);
  const int log_p = pb.log_p_mode();
  const double log_n = std::log(double(n));
  // C = sum_k g_k Gamma_k / sum_k q_k, as the plain joint rows' centre
  double num = 0, q_total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] != T(0)) num += double(g[i]) * double(st[n + i]);
    q_total += double(st[3 * n + i]);
  }
  const double centre = q_total > 0 ? num / q_total : 0.0;
  const bool moves_z = centre != 0 && pb.m_valid > 0;   // a row without upstream gradient still moves Z
  auto dfeat = at::zeros({n, pb.d}, opts), h_sum = at::zeros({n}, opts.dtype(at::kDouble));
  const size_t np = param_grad ? size_t(n) : 0;
  std::vector<double> dp(np), gs(np), qb(np), qs(np);   // each row's dL/dparam sums, centred over all rows
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts),
             w_buf = at::empty({block, block}, opts), wt_buf = at::empty({block, block}, opts);
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    return with_target_distance(pb.t_kernel, [&](auto td) {
      constexpr bool T_DIST = decltype(td)::value;
      const AffinityPairRows<T, K> rows{KernelRow<T, K>(prm), pb.x_sq.template data_ptr<T>(),
                                        pb.z_sq.template data_ptr<T>(), target_coefs(pb), linear_target(pb),
                                        pair_target_logits_once(pb), pb.exclude_self};
      return with_bool(param_grad, [&](auto with_param) {
        return with_bool(pb.f_div, [&](auto zero_at_q0) {   // learned_backward's Q_ZERO_GRAD
          constexpr bool PARAM = decltype(with_param)::value, Q_ZERO_GRAD = decltype(zero_at_q0)::value;
          for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
            // W_IJ in w_buf and W_JI in wt_buf, in place of their Gram entries
            for_each_affinity_family_row<T, K, T_DIST, true, true>(
                pb, rows, i0, i1, j0, j1, block, s_buf, t_buf, w_buf.template data_ptr<T>(),
                wt_buf.template data_ptr<T>(), [&](const SideRow& sr, int64_t self, T* ab, AffinityRowScratch<T>& sc) {
              const int64_t i = sr.i, len = sr.len;
              const T gi = g[i];
              if (gi == T(0) && !moves_z) {   // left out, or no upstream gradient and no centre
                std::fill(ab, ab + len, T(0));
                return;
              }
              const FRow<T> r = joint_family_segment(pb, i, sr.col0, len, self, log_z, st + 2 * n, log_n, sc);
              T* qg = sc.qg.data();
              f_row<T>(pb.divergence, r, log_p, qg, nullptr, sc.q.data());
#pragma omp simd
              for (int64_t j = 0; j < len; ++j) qg[j] *= gi;   // g_i into q g; C is every row's
              // the self column's Gram entry: any finite value (G is 0 there; cpu_loss.cpp's note)
              if (self >= 0) ab[self] = T(0);
              const LabelGradSums sums = learned_backward<T, K, PARAM, Q_ZERO_GRAD>(
                  KernelRow<T, K>(prm), ab, sc.s.data(), sc.q.data(), qg, rows.x_sq + sr.col0, rows.x_sq[i], len,
                  keep_q, centre, finite_shift(log_z));
              // a distance kernel's kept self pair: W_ii = 0 (cpu_symmetric_label_family.h's note)
              if (is_distance(K) && i0 == j0 && self < 0) ab[i - sr.col0] = T(0);
              if constexpr (PARAM) {
                dp[i] += sums.dp;
                gs[i] += sums.g_sum;
                qb[i] += sums.q_basis;
                qs[i] += sums.q_sum;
              }
            });
            add_h_tile<T>(pb.x, i0, i1 - i0, j0, j1 - j0, w_buf, wt_buf, dist, dfeat, h_sum);
          });
          return 0;
        });
      });
    });
  });
  if (dist) dfeat -= h_sum.to(opts.dtype()).unsqueeze(1) * pb.x;
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble));
  if (param_grad) {   // every row's sum, then the one centring over every row (the plain joint rows')
    double* out = dprm.template data_ptr<double>();
    const double scale = param_scale<double>(pb.kernel, prm);
    double g_sum = 0, q_basis = 0, q_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = scale * dp[i];
      g_sum += gs[i];
      q_basis += qb[i];
      q_sum += qs[i];
    }
    if (q_sum > 0) out[0] -= scale * g_sum * (q_basis / q_sum);
  }
  count_schedule_call(pb.row_path(), n, 1, kJointFamilyBackwardCounter);
  return {dfeat, at::zeros({pb.m, pb.d}, opts), dprm, at::Tensor(), at::Tensor(), at::Tensor()};
}

}  // namespace cpu
}  // namespace icon
