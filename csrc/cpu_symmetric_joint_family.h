// The symmetric schedule (DESIGN.md §1.3) for the rest of joint normalisation on a symmetrised
// Affinity target in self mode (DESIGN.md §1.2): van der Maaten's P_ij = (p_{j|i} + p_{i|j}) / 2N
// against q_ij = e^{s_ij} / Z under an f-divergence (reverse KL, TV, Hellinger, JS, chi^2), or
// KL / cross-entropy with alpha or beta > 0 (KL and cross-entropy without them have their own,
// cheaper schedule: cpu_symmetric_joint.h); and joint normalisation of a Labels target whose
// column labels are its rows', P_ij = [y_i = y_j] / (the positive pairs over every row), under
// every divergence, alpha and beta (joint SupCon; no other schedule takes it). Under joint
// normalisation both P and q are symmetric in the pair, and so is every term of the divergence
// and its q g: each pair of row blocks I <= J is one Gram tile of x (and one of z for Affinity),
// and each pair's values are computed once for both rows:
//   pass 1    each row's learned LSE_i and target LSE^p_i over the tile pairs, merged online (the
//             conditional Affinity family's rows, cpu_symmetric_affinity_family.h; t-SNE's Cauchy
//             kernel sums its weights; a Labels target's LSE_i alone, learned_row_lses); then
//             log Z = logsumexp_i LSE_i;
//   pass 2    per pair: q = e^{s - log Z}, log P exact where P underflows (joint_log_p_row: one
//             exp and one log1p per pair where every row has one target parameter, pair_factors)
//             and the plain rows' per-pair terms (f_pair), whose q~ f and q g go to the row sums of
//             both rows: each row's loss and Gamma_i = sum_j q g;
//   backward  per pair H_ij = weight((1 - beta) ((g_i + g_j) q g_ij - 2 q_ij C), d_ij), the sum
//             G_ij + G_ji of both rows' dL/ds (C = sum_k g_k Gamma_k / sum_k q_k: s_ij moves every
//             q through Z), then dX_I += H X_J, dX_J += H^T X_I.
// Four N^2 d GEMM-equivalents (each sweep half of both Grams, the backward half of both and two
// products) instead of the plain joint rows' eight, and half their per-pair terms. The stats are
// the plain joint rows' (log Z, Gamma_i, LSE^p_i, the row's share of q), so either backward runs
// after either forward; which one runs follows ICON_KERNELS_SYMMETRIC at the backward (as
// cpu_symmetric_joint.h's, no row is free for a record). Both take LSE^p rounded to T, as the
// plain rows do (their symmetrised P is not renormalised either). The target's gradient (a
// symmetrised target has none on the CPU), the learned parameter's gradient and a y that is not
// x's autograd input run the plain backward.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
  if (!pb.joint || !pb.self_pairs || !pb.scalar_param || pb.n < 2 || pb.kernel == kLogDot) return false;
  switch (pb.target) {
    case kAffinity: return pb.symmetrize && pb.z_self && !symmetric_joint_fit(pb);
    case kLabels: return same_row_and_column_labels(pb);   // P_ij = [y_i = y_j] / total: symmetric
    default: return false;   // Dense, Neighbors: P_ij != P_ji (cpu_symmetric_label_family.h's joint rows)
  }
}

template <typename T>
bool symmetric_joint_family_apply(const Problem<T>& pb) {
  return symmetric_joint_family_fit(pb) && symmetric_schedule_enabled();
}

// log P_ij = log((p_{j|i} + p_{i|j}) / 2N) and P of row i over the columns [j0, j0 + len) into lp
// and p (symmetrised_log_p_row with the shift log N, then one exp for P; 0 at self).
template <typename T>
void joint_log_p_row(const PairFactors<T>& pf, const T* lse_p, int64_t i, int64_t j0, int64_t len, int64_t self,
                     T log_n, const T* own, T* other, T* lp, T* p) {
  symmetrised_log_p_row(pf, lse_p, i, j0, len, self, log_n, own, other, lp);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) p[j] = vexp(lp[j]);
}

// What every pair's terms take: log Z, and the mixtures' weights (f_row_span's).
template <typename T>
struct JointTermConsts {
  T log_z, b, keep_p, keep_q, bq;
  T log_pos, log_zero;   // a Labels target's two levels of log p~ (kTwoLevelLogP)
};

// label_total: a Labels target's positive pairs over every row (what each weight 1 is divided by).
template <typename T>
JointTermConsts<T> joint_term_consts(const Problem<T>& pb, T log_z, double label_total) {
  const FRow<T> r = pb.f_row(0, nullptr, log_z, nullptr, nullptr, T(0), 0.0, label_total);   // (its levels)
  return {log_z, r.alpha / r.mv, T(1) - r.alpha, T(1) - r.beta, r.beta / r.mv, r.log_pos, r.log_zero};
}

// One row's pair terms over a column block: q~ f into term (or nullptr), q g into qg and q into q
// (f_pair: the plain rows' per-pair values), 0 at self; returns the sums of term and q g. The
// joint pair is symmetric (P_ij = P_ji, q_ij = q_ji), so these serve row i and row j alike.
struct JointRowSums {
  double term = 0, qg = 0;
};

// The columns [j0, j1), none of them self: no index mask in the loop (f_row_span's note).
template <typename T, int D, int LOGP, bool BETA>
ICON_SIMD_INLINE void joint_span_terms(const T* s, const T* p, const T* lp, int64_t j0, int64_t j1,
                                       const JointTermConsts<T>& c, T* term, T* qg, T* q, JointRowSums* out) {
  // locals (f_row_span's note)
  const T log_z = c.log_z, b = c.b, keep_p = c.keep_p, keep_q = c.keep_q, bq = c.bq, log_pos = c.log_pos,
          log_zero = c.log_zero;
  T ts = 0, gs = 0;
#pragma omp simd reduction(+ : ts, gs)
  for (int64_t j = j0; j < j1; ++j) {
    const FPair<T> e = f_pair<T, D, LOGP, BETA, true>(s[j], p[j], lp[j], log_z, T(0), T(0), log_pos, log_zero, b,
                                                      keep_p, keep_q, bq);
    if (term != nullptr) term[j] = e.term;
    qg[j] = e.qg;
    q[j] = e.q;
    ts += e.term;
    gs += e.qg;
  }
  out->term += double(ts);
  out->qg += double(gs);
}

template <typename T, int D, int LOGP, bool BETA>
JointRowSums joint_row_terms(const T* s, const T* p, const T* lp, int64_t len, int64_t self,
                             const JointTermConsts<T>& c, T* term, T* qg, T* q) {
  JointRowSums out;
  for (int64_t j0 = 0; j0 < len; j0 += kSumBlock) {
    const int64_t j1 = std::min(len, j0 + kSumBlock);
    if (self >= j0 && self < j1) {   // the span around the self column, which adds nothing
      joint_span_terms<T, D, LOGP, BETA>(s, p, lp, j0, self, c, term, qg, q, &out);
      if (term != nullptr) term[self] = T(0);
      qg[self] = q[self] = T(0);
      joint_span_terms<T, D, LOGP, BETA>(s, p, lp, self + 1, j1, c, term, qg, q, &out);
    } else {
      joint_span_terms<T, D, LOGP, BETA>(s, p, lp, j0, j1, c, term, qg, q, &out);
    }
  }
  return out;
}

template <typename T>
using JointRowTermsFn = JointRowSums (*)(const T*, const T*, const T*, int64_t, int64_t, const JointTermConsts<T>&, T*,
                                         T*, T*);

template <typename T, int D>
JointRowTermsFn<T> joint_row_terms_of(int log_p, bool beta) {
  switch (log_p) {   // an Affinity target's modes and a Labels target's (log_p_mode_of)
    case kExactLogP: return beta ? &joint_row_terms<T, D, kExactLogP, true> : &joint_row_terms<T, D, kExactLogP, false>;
    case kLogOfP: return beta ? &joint_row_terms<T, D, kLogOfP, true> : &joint_row_terms<T, D, kLogOfP, false>;
    case kTwoLevelLogP:
      return beta ? &joint_row_terms<T, D, kTwoLevelLogP, true> : &joint_row_terms<T, D, kTwoLevelLogP, false>;
    default: TORCH_CHECK(false, "icon_kernels cpu: the joint family schedule has no log p mode ", log_p);
  }
}

// The row-terms function of pb's divergence, log p mode and beta, chosen once per call.
template <typename T>
JointRowTermsFn<T> joint_row_terms_fn(const Problem<T>& pb) {
  const int log_p = pb.log_p_mode();
  const bool beta = pb.beta > T(0);
  switch (pb.divergence) {
    case kKl: return joint_row_terms_of<T, kKl>(log_p, beta);
    case kCrossEntropy: return joint_row_terms_of<T, kCrossEntropy>(log_p, beta);
    case kReverseKl: return joint_row_terms_of<T, kReverseKl>(log_p, beta);
    case kTv: return joint_row_terms_of<T, kTv>(log_p, beta);
    case kHellinger: return joint_row_terms_of<T, kHellinger>(log_p, beta);
    case kJs: return joint_row_terms_of<T, kJs>(log_p, beta);
    case kChi2: return joint_row_terms_of<T, kChi2>(log_p, beta);
    default: TORCH_CHECK(false, "icon_kernels cpu: the joint family schedule has no divergence code ", pb.divergence);
  }
}

// What a tile pair's rows read: the learned kernel, the target's coefficients (target_coefs) and
// whether its logits are one per pair (pair_target_logits_once), the factors, every row's LSE^p
// and the pair terms' function and constants.
template <typename T, int K>
struct JointFamilyRows {
  KernelRow<T, K> k;
  std::vector<T> coef;
  bool linear_t, t_once, t_dist;
  PairFactors<T> pf;
  const T* lse_p;
  JointRowTermsFn<T> terms;
  JointTermConsts<T> c;
  T log_n;
  const int64_t* labels;   // a Labels target's (nullptr for Affinity), and 1 / its positive pairs
  T inv_total;
};

// The number of positive pairs of a self-mode Labels target over every row: sum over classes of
// n_c (n_c - 1), or n_c^2 with the self pair kept.
template <typename T>
double joint_label_total(const Problem<T>& pb) {
  std::vector<int64_t> lab(pb.labels.template data_ptr<int64_t>(), pb.labels.template data_ptr<int64_t>() + pb.n);
  std::sort(lab.begin(), lab.end());
  double total = 0;
  for (size_t a = 0; a < lab.size();) {
    size_t b = a;
    while (b < lab.size() && lab[b] == lab[a]) ++b;
    const double c = double(b - a);
    total += pb.exclude_self ? c * (c - 1) : c * c;
    a = b;
  }
  return total;
}

// What a tile pair's rows read (JointFamilyRows) for pb, with every row's LSE^p (Affinity; T) and
// log Z.
template <typename T, int K>
JointFamilyRows<T, K> joint_family_rows(const Problem<T>& pb, bool t_dist, const T* lse_p, T log_z) {
  const bool affinity = pb.target == kAffinity;
  const double total = affinity ? 0.0 : joint_label_total(pb);
  return {KernelRow<T, K>(pb.prm.template data_ptr<T>()[0]),
          affinity ? target_coefs(pb) : std::vector<T>(),
          affinity && linear_target(pb),
          affinity && pair_target_logits_once(pb),
          t_dist,
          affinity ? pair_factors(pb, lse_p) : PairFactors<T>(),
          lse_p,
          joint_row_terms_fn(pb),
          joint_term_consts(pb, log_z, total),
          T(std::log(double(pb.n))),
          affinity ? nullptr : pb.labels.template data_ptr<int64_t>(),
          total > 0 ? T(1.0 / total) : T(0)};
}

// A thread's row buffers over one column block.
template <typename T>
struct JointFamilyScratch {
  std::vector<T> s, own, other, lp, p, q, qg;
  explicit JointFamilyScratch(int64_t len)
      : s(size_t(len)), own(size_t(len)), other(size_t(len)), lp(size_t(len)), p(size_t(len)), q(size_t(len)),
        qg(size_t(len)) {}
};

// Row i's learned logits (from its Gram entries of x, ab), target logits of both orientations
// (from its Gram entries of z, tab) and pair terms over the columns [j0, j0 + nj): into sc, with
// q~ f into term when given (the forward) and q g into qg (sc.qg, or the z tile's row once read).
template <typename T, int K>
JointRowSums joint_family_row(const Problem<T>& pb, const JointFamilyRows<T, K>& rows, int64_t i, int64_t j0,
                              int64_t nj, int64_t self, const T* ab, const T* tab, T* term, T* qg,
                              JointFamilyScratch<T>& sc) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  kernel_logits<T, K>(rows.k, ab, sc.s.data(), x_sq + j0, x_sq[i], nj);
  if (rows.labels != nullptr) {   // P_ij = [y_i = y_j] / total (the self column: the terms skip it)
    const int64_t li = rows.labels[i];
    const int64_t* lc = rows.labels + j0;
    const T inv = rows.inv_total;
    T* p = sc.p.data();
#pragma omp simd
    for (int64_t j = 0; j < nj; ++j) p[j] = lc[j] == li ? inv : T(0);
    return rows.terms(sc.s.data(), p, p, nj, self, rows.c, term, qg, sc.q.data());   // (no log p read)
  }
  if (rows.t_dist) {
    pair_target_logits<T, true>(pb, rows.linear_t, rows.t_once, rows.coef.data(), i, j0, tab, sc.own.data(),
                                sc.other.data(), nj);
  } else {
    pair_target_logits<T, false>(pb, rows.linear_t, rows.t_once, rows.coef.data(), i, j0, tab, sc.own.data(),
                                 sc.other.data(), nj);
  }
  joint_log_p_row(rows.pf, rows.lse_p, i, j0, nj, self, rows.log_n, sc.own.data(), sc.other.data(), sc.lp.data(),
                  sc.p.data());
  return rows.terms(sc.s.data(), sc.p.data(), sc.lp.data(), nj, self, rows.c, term, qg, sc.q.data());
}

// Pass 1 for a Labels target: every row's learned LSE merged online over the tile pairs (the x
// tile for the rows of I, its transpose for the rows of J).
template <typename T, int K>
void learned_row_lses(const Problem<T>& pb, int64_t block, at::Tensor& s_buf, at::Tensor& t_buf,
                      std::vector<OnlineLabelRow<T>>& acc) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const KernelRow<T, K> k_in(pb.prm.template data_ptr<T>()[0]);
  for_each_block_pair(pb.n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t ni = i1 - i0, nj = j1 - j0;
    pair_gram<T>(pb.x, i0, i1, j0, j1, is_distance(K) ? x_sq : nullptr, s_buf, &t_buf);
    const T* s_p = s_buf.template data_ptr<T>();
    const T* t_p = t_buf.template data_ptr<T>();
    at::parallel_for(0, tile_pair_rows(i0, ni, j0, nj), 1, [&](int64_t r0, int64_t r1) {
      const KernelRow<T, K> k = k_in;   // a local copy (joint_pair_values' note)
      std::vector<T> s(static_cast<size_t>(block));
      for (int64_t r = r0; r < r1; ++r) {
        const SideRow sr = side_row(r, i0, ni, j0, nj);
        const T* ab = (sr.s == 0 ? s_p : t_p) + sr.offset;
        kernel_logits<T, K>(k, ab, s.data(), x_sq + sr.col0, x_sq[sr.i], sr.len);
        const int64_t self = pb.exclude_self && sr.i >= sr.col0 && sr.i < sr.col0 + sr.len ? sr.i - sr.col0 : -1;
        const LabelRow seg{nullptr, 0, sr.len, self, double(pb.alpha), pb.m_valid};
        add_lse_segment<T>(seg, s.data(), &acc[sr.i]);
      }
    });
  });
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
  const bool affinity = pb.target == kAffinity;
  T log_z = 0;
  with_affinity_kernels(pb, [&](auto kc, auto t_dist, auto is_cauchy) {
    constexpr int K = decltype(kc)::value;
    constexpr bool T_DIST = decltype(t_dist)::value;
    {
      // pass 1: every row's LSE (and an Affinity target's LSE^p: the conditional family's pass 1)
      if (affinity) {
        const AffinityPairRows<T, K> rows{KernelRow<T, K>(pb.prm.template data_ptr<T>()[0]),
                                          pb.x_sq.template data_ptr<T>(), pb.z_sq.template data_ptr<T>(),
                                          target_coefs(pb), linear_target(pb), pair_target_logits_once(pb),
                                          pb.exclude_self};
        affinity_row_lses<T, K, T_DIST, decltype(is_cauchy)::value>(pb, rows, block, s_buf, t_buf, acc_q, acc_p);
      } else {
        learned_row_lses<T, K>(pb, block, s_buf, t_buf, acc_q);
      }
      for (int64_t i = 0; i < n; ++i) {
        lse_q[i] = online_lse(acc_q[i]);
        if (affinity) lse_p[i] = T(online_lse(acc_p[i]));
      }
      log_z = T(log_sum_exp(lse_q));
      // pass 2: every pair's terms once, under log Z, summed into both of its rows
      const JointFamilyRows<T, K> jr = joint_family_rows<T, K>(pb, T_DIST, lse_p.data(), log_z);
      if (jr.pf.ok) symmetric_schedule_counters()[kJointOneExpCounter].fetch_add(1, std::memory_order_relaxed);
      std::vector<double> col_loss(static_cast<size_t>(block)), col_gamma(col_loss.size());
      for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
        const int64_t ni = i1 - i0, nj = j1 - j0;
        const bool diag = i0 == j0;
        affinity_tiles(pb, i0, i1, j0, j1, s_buf, t_buf);   // (a Labels target: the x tile alone)
        T* term = s_buf.template data_ptr<T>();   // the x tile becomes q~ f, the z tile (or its buffer) q g
        T* qg = t_buf.template data_ptr<T>();
        at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
          JointFamilyScratch<T> sc(nj);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t i = i0 + r, self = pb.exclude_self && diag ? r : -1;
            const JointRowSums sums = joint_family_row<T, K>(pb, jr, i, j0, nj, self, term + r * nj, qg + r * nj,
                                                             term + r * nj, qg + r * nj, sc);
            loss[i] += sums.term;
            gamma[i] += sums.qg;
          }
        });
        if (diag) return;   // (the rows of I saw every pair of the diagonal tile)
        std::fill(col_loss.begin(), col_loss.end(), 0.0);
        std::fill(col_gamma.begin(), col_gamma.end(), 0.0);
        add_column_sums<T>(term, qg, ni, nj, col_loss.data(), col_gamma.data());
        for (int64_t j = 0; j < nj; ++j) {
          loss[j0 + j] += col_loss[j];
          gamma[j0 + j] += col_gamma[j];
        }
      });
    }
    return 0;
  });
  // the plain joint rows' stats (cpu_loss.cpp): log Z, Gamma_i, LSE^p, the row's share of q
  const std::vector<double> q_mass = q_masses(lse_q, log_z);
  // a Labels target without a positive pair leaves every row out (the plain rows' some_p)
  const bool has = pb.m_valid > 0 && (affinity || joint_label_total(pb) > 0);
  for (int64_t i = 0; i < n; ++i) {
    out.inc_p[i] = has;
    out.loss_p[i] = std::isnan(log_z) ? log_z : has ? T(loss[i]) : T(0);   // NaN logits: NaN, even without p
    st[i] = log_z;
    st[n + i] = T(gamma[i]);
    st[2 * n + i] = affinity ? lse_p[i] : T(0);
    st[3 * n + i] = T(q_mass[i]);
  }
  count_schedule_call(pb.row_path(), n, 0, kJointFamilyForwardCounter);
  return out.tuple();
}

// H over one tile pair in place of its Gram tile ab, with the z tile tab (affinity_tiles'): both
// rows' dL/ds of the pair from one evaluation, H_ij = weight((1 - beta) ((g_i + g_j) q g_ij - 2
// q_ij C), d_ij) (G_ij + G_ji with the joint pair's q g_ij = q g_ji), 0 at an excluded self pair
// (and at a distance kernel's self pair, whose x_i - x_i is 0); the rows' sums of H into row_sum.
template <typename T, int K>
void joint_family_h_tile(const Problem<T>& pb, const JointFamilyRows<T, K>& rows, const T* g, double centre_exact,
                         int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* ab, const T* tab, double* row_sum) {
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const bool diag = i0 == j0;
  // 2 C in two parts (one rounding would be an error shared by every pair)
  const T c2 = T(2 * centre_exact), c2_lo = T(2 * centre_exact - double(c2));
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    JointFamilyScratch<T> sc(nj);
    const KernelRow<T, K> k = rows.k;   // a local copy (joint_pair_values' note)
    const T keep_q = rows.c.keep_q, cz = c2, cz_lo = c2_lo;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      const int64_t self = (pb.exclude_self || is_distance(K)) && diag ? r : -1;
      T* w = ab + r * nj;
      joint_family_row<T, K>(pb, rows, i, j0, nj, pb.exclude_self && diag ? r : -1, w, tab + r * nj, nullptr,
                             sc.qg.data(), sc);
      const T gi = g[i], xi_sq = x_sq[i];
      const T* gc = g + j0;
      const T* xc_sq = x_sq + j0;
      const T* q = sc.q.data();
      const T* qg = sc.qg.data();
      T rs = 0;
#pragma omp simd reduction(+ : rs)
      for (int64_t j = 0; j < nj; ++j) {
        const T grad = keep_q * (((gi + gc[j]) * qg[j] - q[j] * cz) - q[j] * cz_lo);
        T h = k.weight(grad, k.aux(w[j], xi_sq, xc_sq[j]));
        h = j == self ? T(0) : h;
        w[j] = h;
        rs += h;
      }
      row_sum[r] = double(rs);
    }
  });
}

// stats: a joint forward's, plain or this schedule's (T, contiguous): log Z (row 0), Gamma_i
// (row 1), LSE^p (row 2), each row's share of q (row 3).
template <typename T>
std::vector<at::Tensor> symmetric_joint_family_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                        const at::Tensor& valid, const at::Tensor& stats) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const at::Tensor g_t = masked_grads(grad_rows, valid, pb.x.options());
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const double centre = joint_centre(g, st, n);   // the plain joint rows' centre
  return h_tile_backward(pb, block, kJointFamilyBackwardCounter, [&](auto kc, auto t_dist, auto) {
    constexpr int K = decltype(kc)::value;
    JointFamilyRows<T, K> built = joint_family_rows<T, K>(pb, decltype(t_dist)::value, st + 2 * n, st[0]);
    if (built.pf.ok) symmetric_schedule_counters()[kJointOneExpCounter].fetch_add(1, std::memory_order_relaxed);
    return [&, rows = std::move(built)](int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* ab, const T* tab,
                                        double* row_sum) {
      joint_family_h_tile<T, K>(pb, rows, g, centre, i0, ni, j0, nj, ab, tab, row_sum);
    };
  });
}

}  // namespace cpu
}  // namespace icon
