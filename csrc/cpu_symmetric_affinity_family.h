// The symmetric schedule (DESIGN.md §1.3) for the Affinity targets on the family rows in self mode
// (y = x, z_cols = z): t-SNE and SNE with an f-divergence (reverse KL, TV, Hellinger, JS, chi^2),
// and KL or cross-entropy with alpha or beta > 0 (the KL / cross-entropy rows without them have
// their own one-sweep schedule, cpu_symmetric_affinity.h); and a symmetrised target's conditional
// rows under every divergence (below). Each pair of row blocks I <= J is one Gram tile of x and one
// of z, read by the rows of I and, column by column, by the rows of J.
//
// An f-divergence's terms take p and q themselves, so the forward sweeps the tile pairs twice:
//   pass 1   each row's learned LSE and target LSE^p, merged online (add_lse_segment; t-SNE's
//            Student-t at nu = 1 sums its weights 1 / (1 + d^2), add_weight_segment: no log per
//            pair for the logit, no max pass and no exp per row entry);
//   pass 2   each row's divergence sums under them, block by block (f_row of cpu_f_rows.h: the
//            loss, Gamma = sum_j q g and sum_j q), with q = exp(s - LSE) and p = exp(t - LSE^p),
//            log p = t - LSE^p exactly (alpha = 0) or the log of the mixture; reverse KL with
//            alpha = 0 reads log p only and forms no p (family_rows_read_p), here and in the
//            backward.
//            t-SNE's Cauchy kernel under TV (alpha = beta = 0) takes q = r e^{-LSE} from the
//            reciprocals here and in the backward (cauchy_tv_rows): no log or exp per pair for q.
// A symmetrised target (DESIGN.md §1.2 with conditional rows): row i's P_ij = h_ij / M_i with h_ij =
// (p_{j|i} + p_{i|j}) / 2 (symmetric in the pair) and M_i = sum_j h_ij. Pass 1 is the same; then
//   pass 1b  each row's mass M_i over the z tiles alone, each pair's h once into its row's sum and
//            its column's (symmetrised_masses: one exp per pair under the pair factors of
//            cpu_symmetric_joint.h, where every row has one target parameter; else two);
//   pass 2   as above, with the z tile turned into log h once per pair (symmetrised_tile_row) for
//            both sides, and log M_i in place of LSE^p as each row's shift.
// The backward sweeps the masses again (no stats row is free for them) and then runs as above.
// Five N^2 d GEMM-equivalents (the four above and half of z's Gram in each mass sweep) instead of
// the plain rows' seven (their six and a first pass over the full z Gram).
// Stats row 2 holds LSE^p rounded to T, which both schedules' pairs take (as the plain rows round
// it); the record in row 3 has no residual then.
// The backward recomputes each tile pair once and forms W for both sides with learned_backward
// and the saved Gamma, then H_IJ = W_IJ + W_JI^T, dX_I += H_IJ X_J and dX_J += H_IJ^T X_I
// (add_h_tile). Four N^2 d GEMM-equivalents instead of six (each sweep half of both Grams; the
// backward half of both Grams and two products); the exps per pair do not change.
//
// Stats (conditional rows): row 0 the LSE and row 2 LSE^p rounded to T (what the plain backward reads: it
// renormalises p and q over its own rows), row 1 Gamma rounded to T, row 3 the record 8 * block +
// LSE^p's residual in units of its last place (pair_record): target logits are often far from 0
// (a small sigma_i), and p must sum to 1 in the backward with no row sweep. Pass 2 and the backward
// take q = exp(s - LSE) from the T-rounded LSE (as the plain rows do: their forward takes the same
// q, their backward renormalises; t-SNE's TV rows r e^{-LSE} from the same LSE, cauchy_tv_rows),
// so q sums to 1 up to that rounding, but both take the same q
// and p, and Gamma is the q-weighted mean of g over exactly them: sum_j G_ij = 0 up to each entry's
// rounding and Gamma's. No row is free for the LSE's residual or Gamma's (the stats are [4, n] in
// T); at learned logits in the thousands (fp32 ulp 1e-4) the losses are off by 1e-6 relative, as
// the plain forward's. The plain forward leaves row 3 at 0 for these problems, so this backward
// runs only after this forward. The target's gradient (z or its parameter) and a y that is not
// x's autograd input run the plain backward on these stats; the learned parameter's runs here.
//
// Joint normalisation of a target that is not symmetrised (DESIGN.md §1.2): P_ij = p_{j|i} / N is
// not symmetric, but q_ij = e^{s_ij - log Z} is. Pass 1 is the same, then log Z = logsumexp_i LSE_i;
// pass 2 takes q under log Z and each row's shift LSE^p_i + log N (unrounded, in two parts:
// joint_shifts); the stats are the plain joint rows' (log Z, Gamma_i = sum_j q g, LSE^p_i, the
// row's share of q) with no record, so either backward runs after either forward (the switch at
// the backward decides, as cpu_symmetric_label_family.h's joint rows). The backward takes G_ij =
// (1 - beta) (g_i q g_ij - q_ij C), C = sum_k g_k Gamma_k / sum_k q_k (joint_centre), and sweeps
// z's tiles once for the unrounded LSE^p (joint_target_lse_wide: no stats row is free for its
// residual, and p must sum to 1 without a row sweep). Four and a half N^2 d GEMM-equivalents (with
// d_z = d) instead of the plain joint rows' six or seven. The learned parameter's gradient runs the
// plain backward (as do the target's gradient and a y that is not x's autograd input).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu_cauchy_rows.h"   // cauchy_tv_row, cauchy_reciprocals, cauchy_learned_backward
#include "cpu_f_rows.h"
#include "cpu_family_rows.h"
#include "cpu_global_rows.h"   // log_sum_exp, q_masses, joint_centre, fold_joint_upstream
#include "cpu_problem.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_affinity.h"   // symmetric_affinity_fit, target_coefs, target_aux
#include "cpu_symmetric_joint.h"      // PairFactors, half_p_row, symmetrised_log_p_row
#include "cpu_symmetric_labels.h"
#include "cpu_tile_pairs.h"

namespace icon {
namespace cpu {

// Whether pb has this schedule's structure: an Affinity target with conditional rows in self mode
// (x is y, z_cols is z), one scalar learned parameter and any learned kernel but log_dot, any
// target kernel (a parameter per row or one: symmetric_affinity_structure's note), and what the
// one-sweep Affinity schedule does not take: an f-divergence, alpha or beta > 0, or a symmetrised
// target (every divergence: its rows need their masses first, symmetrised_masses); and joint
// normalisation of a target that is not symmetrised (every divergence; a symmetrised one's joint
// rows: cpu_symmetric_joint.h, cpu_symmetric_joint_family.h).
template <typename T>
bool symmetric_affinity_family_fit(const Problem<T>& pb) {
  if (pb.target != kAffinity || (pb.joint && pb.symmetrize) || !pb.self_pairs || !pb.z_self || !pb.scalar_param ||
      pb.n < 2)
    return false;
  return pb.kernel != kLogDot && !symmetric_affinity_fit(pb);
}

template <typename T>
bool symmetric_affinity_family_apply(const Problem<T>& pb) {
  return symmetric_affinity_family_fit(pb) && symmetric_schedule_enabled();
}

// A thread's row buffers (one block of columns each): learned logits, target logits less LSE^p
// (log p), p, q, q g, and a row of J's Gram entries of x and of z gathered from the tiles' columns.
template <typename T>
struct AffinityRowScratch {
  std::vector<T> s, t, p, q, qg, col, t_col;
  explicit AffinityRowScratch(int64_t block)
      : s(size_t(block)), t(size_t(block)), p(size_t(block)), q(size_t(block)), qg(size_t(block)),
        col(size_t(block)), t_col(size_t(block)) {}
};

// What every row of both passes reads: the learned kernel, x's and z's squared norms, each row's
// target coefficient (target_coefs), whether the target kernel is linear (linear_target: else each
// row's logits are target_row_logits'), whether its logits are made once per pair in the tile
// (pair_target_logits_once: the rows then read them as a linear kernel's with coefficient 1) and
// the self pair rule.
template <typename T, int K>
struct AffinityPairRows {
  KernelRow<T, K> k;
  const T* x_sq;
  const T* z_sq;
  std::vector<T> coef;
  bool linear_t;
  bool t_once;
  bool exclude_self;
  // a symmetrised target (symmetrised_pair_rows): every row's LSE^p (T, as the plain rows round it),
  // the pair factors, whether t_ij = t_ji, and the target's own coefficients; the tiles then hold
  // log((p_{j|i} + p_{i|j}) / 2) once per pair (symmetrised_tile_row), which both sides read with
  // coef 1 (t_once)
  const T* sym_lse_p = nullptr;
  PairFactors<T> sym_pf;
  bool sym_uniform = false;
  std::vector<T> sym_coef;
};

// rows for the passes of a symmetrised target after pass 1, with every row's LSE^p rounded to T.
template <typename T, int K>
AffinityPairRows<T, K> symmetrised_pair_rows(const Problem<T>& pb, const AffinityPairRows<T, K>& rows,
                                             const T* lse_p) {
  AffinityPairRows<T, K> out = rows;
  out.sym_coef = target_coefs(pb);
  out.coef.assign(out.coef.size(), T(1));
  out.t_once = true;
  out.sym_lse_p = lse_p;
  out.sym_pf = pair_factors(pb, lse_p);
  out.sym_uniform = same_pair_target_logits(pb);
  return out;
}

// Row i's Gram entries of z over the columns [j0, j0 + nj) into log((p_{j|i} + p_{i|j}) / 2) in
// place (-inf at self): both orientations' target logits (own, other: scratch), then
// symmetrised_log_p_row, as the plain rows' symmetric_log_p. The pair's value is the same for row
// i and row j, so both sides of a tile pair read it from the tile.
template <typename T, int K, bool T_DIST>
void symmetrised_tile_row(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t i, int64_t j0,
                          int64_t nj, int64_t self, T* row, T* own, T* other) {
  pair_target_logits<T, T_DIST>(pb, rows.linear_t, rows.sym_uniform, rows.sym_coef.data(), i, j0, row, own, other,
                                nj);
  symmetrised_log_p_row(rows.sym_pf, rows.sym_lse_p, i, j0, nj, self, T(0), own, other, row);
}

// A tile pair's z tile (ni x nj Gram entries) into the pairs' symmetrised log p~ (above).
template <typename T, int K, bool T_DIST>
void symmetrised_tile(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t i0, int64_t ni, int64_t j0,
                      int64_t nj, T* t_p) {
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> own(static_cast<size_t>(nj)), other(own.size());
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t self = rows.exclude_self && i0 == j0 ? r : -1;
      symmetrised_tile_row<T, K, T_DIST>(pb, rows, i0 + r, j0, nj, self, t_p + r * nj, own.data(), other.data());
    }
  });
}

// Pass 1b of a symmetrised target: each row's mass M_i = sum_j (p_{j|i} + p_{i|j}) / 2 (what its
// row of P divides by), over the z tiles alone: each pair's half p once (half_p_row: one exp under
// the factors, else two) into its row's sum and its column's. The forward and the backward both
// run it (no stats row is free for the mass; the z tiles are the same GEMM calls, bit for bit).
template <typename T, int K, bool T_DIST>
std::vector<double> symmetrised_masses(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t block,
                                       at::Tensor& t_buf) {
  const int64_t n = pb.n;
  std::vector<double> mass(static_cast<size_t>(n)), col(static_cast<size_t>(block));
  for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t ni = i1 - i0, nj = j1 - j0;
    target_tile(pb, i0, i1, j0, j1, t_buf);
    T* t_p = t_buf.template data_ptr<T>();
    at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
      std::vector<T> own(static_cast<size_t>(nj)), other(own.size());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = i0 + r;
        T* row = t_p + r * nj;
        pair_target_logits<T, T_DIST>(pb, rows.linear_t, rows.sym_uniform, rows.sym_coef.data(), i, j0, row,
                                      own.data(), other.data(), nj);
        half_p_row(rows.sym_pf, rows.sym_lse_p, i, j0, nj, own.data(), other.data(), row);
        if (rows.exclude_self && i0 == j0) row[r] = T(0);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < nj; ++j) sum += row[j];
        mass[i] += double(sum);
      }
    });
    if (i0 == j0) return;   // (the rows of I saw every pair of the diagonal tile)
    std::fill(col.begin(), col.end(), 0.0);
    add_column_sums<T>(t_p, nullptr, ni, nj, col.data(), nullptr);
    for (int64_t j = 0; j < nj; ++j) mass[j0 + j] += col[j];
  });
  symmetric_schedule_counters()[kSymmetrisedMassCounter].fetch_add(1, std::memory_order_relaxed);
  return mass;
}

// Each row's log M_i rounded to T (hi) and its residual (lo): the shift that makes a row's log p
// from the tiles' symmetrised log p~; 0 for a row without mass, as the plain rows
// (family_target_row).
template <typename T>
void symmetrised_shifts(const std::vector<double>& mass, std::vector<T>* hi, std::vector<T>* lo) {
  hi->resize(mass.size());
  lo->resize(mass.size());
  for (size_t i = 0; i < mass.size(); ++i) {
    const double log_m = mass[i] > 0 ? std::log(mass[i]) : 0.0;
    (*hi)[i] = T(log_m);
    (*lo)[i] = T(log_m - double((*hi)[i]));
  }
}

// What pass 2 and the backward read after pass 1: the rows (a symmetrised target's,
// symmetrised_pair_rows) and each row's shift in two parts, LSE^p (stats row 2 and the recorded
// residual lo) or a symmetrised target's log M_i after its mass sweep.
template <typename T, int K>
struct AffinityShifts {
  AffinityPairRows<T, K> rows;
  std::vector<T> hi, lo;
};

// Joint normalisation (not symmetrised): row i's P_ij = p_{j|i} / N, so its shift is LSE^p_i + log N,
// from the unrounded LSE^p (pass 1's, or the backward's sweep of z, joint_target_lse_wide).
template <typename T, int K>
AffinityShifts<T, K> joint_shifts(const AffinityPairRows<T, K>& rows, const std::vector<double>& lse_p) {
  const size_t n = lse_p.size();
  const double log_n = std::log(double(n));
  AffinityShifts<T, K> out{rows, std::vector<T>(n), std::vector<T>(n)};
  for (size_t i = 0; i < n; ++i) {
    const double shift = lse_p[i] + log_n;
    out.hi[i] = T(shift);
    out.lo[i] = std::isfinite(shift) ? T(shift - double(out.hi[i])) : T(0);
  }
  return out;
}

template <typename T, int K, bool T_DIST>
AffinityShifts<T, K> affinity_shifts(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, const T* st,
                                     const std::vector<T>& lo, int64_t block, at::Tensor& t_buf) {
  const int64_t n = pb.n;
  if (!pb.symmetrize) return {rows, std::vector<T>(st + 2 * n, st + 3 * n), lo};
  AffinityShifts<T, K> out{symmetrised_pair_rows(pb, rows, st + 2 * n), {}, {}};
  symmetrised_shifts(symmetrised_masses<T, K, T_DIST>(pb, out.rows, block, t_buf), &out.hi, &out.lo);
  return out;
}

// row(sr, self, ab, scratch) for every row of both sides of the tile pair (I, J), split across
// threads, after the Gram tiles of x (into s_buf) and z (into t_buf): ab the row's Gram entries
// of x, self its self column in the block or -1, scratch.s its logits and scratch.t its target
// logits (stored before anything reads them, as for_each_family_row's). A row of J gathers its
// entries from the tiles' columns. With w_out (the backward), ab is the row's copy in w_out (rows
// of I, ni x nj) or wt_out (rows of J, nj x ni), which it overwrites with W; without, read only.
// Without LOGITS scratch.s is left unset (a row that takes the reciprocals, cauchy_tv_rows).
template <typename T, int K, bool T_DIST, bool LOGITS, typename F>
void for_each_affinity_family_row(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t i0, int64_t i1,
                                  int64_t j0, int64_t j1, int64_t block, at::Tensor& s_buf, at::Tensor& t_buf,
                                  T* w_out, T* wt_out, F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  pair_gram<T>(pb.x, i0, i1, j0, j1, is_distance(K) ? rows.x_sq : nullptr, s_buf);
  target_tile(pb, i0, i1, j0, j1, t_buf);
  if (rows.sym_lse_p != nullptr) symmetrised_tile<T, K, T_DIST>(pb, rows, i0, ni, j0, nj, t_buf.template data_ptr<T>());
  else if (rows.t_once) tile_target_logits(pb, i0, ni, j0, nj, t_buf.template data_ptr<T>());
  const T* g_p = s_buf.template data_ptr<T>();
  const T* t_p = t_buf.template data_ptr<T>();
  at::parallel_for(0, tile_pair_rows(i0, ni, j0, nj), 1, [&](int64_t r0, int64_t r1) {
    const KernelRow<T, K> k = rows.k;   // a local copy (for_each_family_row's note)
    AffinityRowScratch<T> sc(block);
    for (int64_t r = r0; r < r1; ++r) {
      const SideRow sr = side_row(r, i0, ni, j0, nj);
      T* ab;
      const T* tab;
      if (sr.s == 0) {
        ab = const_cast<T*>(g_p) + sr.offset;
        if (w_out != nullptr) ab = std::copy(ab, ab + nj, w_out + sr.offset) - nj;
        tab = t_p + sr.offset;
      } else {
        const int64_t c = sr.k;
        ab = wt_out != nullptr ? wt_out + c * ni : sc.col.data();
        T* tc = sc.t_col.data();
        for (int64_t t = 0; t < ni; ++t) {
          ab[t] = g_p[t * nj + c];
          tc[t] = t_p[t * nj + c];
        }
        tab = tc;
      }
      const int64_t i = sr.i, len = sr.len;
      if constexpr (LOGITS) kernel_logits<T, K>(k, ab, sc.s.data(), rows.x_sq + sr.col0, rows.x_sq[i], len);
      const T coef = rows.coef[i], zi_sq = rows.z_sq[i];
      const T* zc_sq = rows.z_sq + sr.col0;
      T* t_row = sc.t.data();
      if (rows.t_once) {   // tab holds both sides' logits
        std::copy(tab, tab + len, t_row);
      } else if (rows.linear_t) {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) t_row[j] = target_aux<T, T_DIST>(tab[j], zi_sq, zc_sq[j]) * coef;
      } else {
        target_row_logits(pb, i, tab, t_row, sr.col0, len);
      }
      const int64_t self = rows.exclude_self && i >= sr.col0 && i < sr.col0 + len ? i - sr.col0 : -1;
      row(sr, self, ab, sc);
    }
  });
}

// The forward's row loop: row(sr, self, scratch) for every row of both sides of the tile pair
// (I, J) with scratch.s its logits and scratch.t its target logits over the block, as
// for_each_affinity_family_row's, but each learned logit and target Gram term computed once per
// pair: the tiles become s (symmetric: one scalar parameter) and the target's aux (d^2 or z_i . z_j;
// each row scales it by its own coefficient), in place, before the rows read them (a row of J
// from the tiles' columns). The backward recomputes its logits per row from the same Gram entries
// with the same kernel_logits, so both passes and the backward see the same values. CAUCHY (t-SNE's
// Student-t with nu = 1: pass 1, and pass 2 under cauchy_tv_rows): scratch.s holds the pair's
// weight exp(s) = 1 / (1 + d^2) instead of its logit, a division per pair instead of a log
// (add_weight_segment takes its LSE, cauchy_tv_row its q). A symmetrised target's rows
// (rows.sym_lse_p) make the z tile log((p_{j|i} + p_{i|j}) / 2) instead (symmetrised_tile_row).
template <typename T, int K, bool T_DIST, bool CAUCHY, typename F>
void for_each_affinity_logit_row(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t i0, int64_t i1,
                                 int64_t j0, int64_t j1, int64_t block, at::Tensor& s_buf, at::Tensor& t_buf,
                                 F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  pair_gram<T>(pb.x, i0, i1, j0, j1, is_distance(K) ? rows.x_sq : nullptr, s_buf);
  target_tile(pb, i0, i1, j0, j1, t_buf);
  T* s_p = s_buf.template data_ptr<T>();
  T* t_p = t_buf.template data_ptr<T>();
  at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
    const KernelRow<T, K> k = rows.k;
    const T* zc_sq = rows.z_sq + j0;
    std::vector<T> own(rows.sym_lse_p != nullptr ? size_t(nj) : 0), other(own.size());
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = i0 + r;
      T* s_row = s_p + r * nj;
      T* aux = t_p + r * nj;
      if constexpr (CAUCHY) {
        cauchy_reciprocals<T>(s_row, s_row, rows.x_sq + j0, rows.x_sq[i], -1, nj);   // (the backward's)
      } else {
        kernel_logits<T, K>(k, s_row, s_row, rows.x_sq + j0, rows.x_sq[i], nj);
      }
      if (rows.sym_lse_p != nullptr) {   // (both sides' symmetrised log p~, once per pair)
        const int64_t self = rows.exclude_self && i0 == j0 ? r : -1;
        symmetrised_tile_row<T, K, T_DIST>(pb, rows, i, j0, nj, self, aux, own.data(), other.data());
        continue;
      }
      const T zi_sq = rows.z_sq[i];
#pragma omp simd
      for (int64_t j = 0; j < nj; ++j) aux[j] = target_aux<T, T_DIST>(aux[j], zi_sq, zc_sq[j]);
      if (rows.t_once) target_row_logits(pb, i, aux, aux, j0, nj);   // (both sides' logits, once per pair)
    }
  });
  at::parallel_for(0, tile_pair_rows(i0, ni, j0, nj), 1, [&](int64_t r0, int64_t r1) {
    AffinityRowScratch<T> sc(block);
    for (int64_t r = r0; r < r1; ++r) {
      const SideRow sr = side_row(r, i0, ni, j0, nj);
      const int64_t i = sr.i, len = sr.len;
      const T coef = rows.coef[i];
      T* s = sc.s.data();
      T* t = sc.t.data();
      if (sr.s == 0) {
        const T* s_row = s_p + sr.offset;
        const T* aux = t_p + sr.offset;
#pragma omp simd
        for (int64_t j = 0; j < nj; ++j) {
          s[j] = s_row[j];
          t[j] = aux[j] * coef;
        }
      } else {
        const int64_t c = sr.k;
        for (int64_t u = 0; u < ni; ++u) {
          s[u] = s_p[u * nj + c];
          t[u] = t_p[u * nj + c] * coef;
        }
      }
      if (!rows.linear_t && !rows.t_once) target_row_logits(pb, i, t, t, sr.col0, len);   // (coef 1: Gram terms)
      const int64_t self = rows.exclude_self && i >= sr.col0 && i < sr.col0 + len ? i - sr.col0 : -1;
      row(sr, self, sc);
    }
  });
}

// Pass 1 of the Affinity family schedules (conditional here, joint in cpu_symmetric_joint_family.h):
// every row's learned LSE and target LSE^p merged online over the tile pairs into acc_q and acc_p
// (the self column becomes -inf in the scratch, or 0 for a Cauchy weight: CAUCHY sums t-SNE's
// weights 1 / (1 + d^2), add_weight_segment, and counts the sweep).
template <typename T, int K, bool T_DIST, bool CAUCHY>
void affinity_row_lses(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t block, at::Tensor& s_buf,
                       at::Tensor& t_buf, std::vector<OnlineLabelRow<T>>& acc_q, std::vector<OnlineLabelRow<T>>& acc_p);

// Whether a row's terms read p itself: reverse KL with an exact log p (alpha = 0) reads log p and
// q only (f_terms_simd), so that affinity_family_segment leaves out its exp per pair.
template <typename T>
bool family_rows_read_p(const Problem<T>& pb) {
  return !(pb.divergence == kReverseKl && pb.log_p_mode() == kExactLogP);
}

// with_bool for a Cauchy-rows flag of kernel K: both instantiations only for Student-t (the one
// kernel with Cauchy rows), f(std::false_type{}) alone for the others, so that their row loops are
// not compiled twice.
template <int K, typename F>
decltype(auto) with_cauchy_flag(bool flag, F&& f) {
  if constexpr (K == kStudentT) return with_bool(flag, std::forward<F>(f));
  else return f(std::false_type{});
}

// One sweep over t-SNE's Cauchy weights (the counter of cpu_symmetric_labels.h's note).
inline void count_cauchy_sweep() {
  symmetric_schedule_counters()[kCauchySweepCounter].fetch_add(1, std::memory_order_relaxed);
}

template <typename T, int K, bool T_DIST, bool CAUCHY>
void affinity_row_lses(const Problem<T>& pb, const AffinityPairRows<T, K>& rows, int64_t block, at::Tensor& s_buf,
                       at::Tensor& t_buf, std::vector<OnlineLabelRow<T>>& acc_q, std::vector<OnlineLabelRow<T>>& acc_p) {
  for_each_block_pair(pb.n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for_each_affinity_logit_row<T, K, T_DIST, CAUCHY>(
        pb, rows, i0, i1, j0, j1, block, s_buf, t_buf, [&](const SideRow& sr, int64_t self, AffinityRowScratch<T>& sc) {
          const LabelRow seg{nullptr, 0, sr.len, self, double(pb.alpha), pb.m_valid};
          if constexpr (CAUCHY) add_weight_segment<T>(seg, sc.s.data(), &acc_q[sr.i]);
          else add_lse_segment<T>(seg, sc.s.data(), &acc_q[sr.i]);
          add_lse_segment<T>(seg, sc.t.data(), &acc_p[sr.i]);
        });
  });
  if constexpr (CAUCHY) count_cauchy_sweep();
}

// t-SNE's Cauchy kernel (Student-t, nu = 1) under total variation with alpha = beta = 0: pass 2
// and the backward take q = r e^{-LSE} from the reciprocals r = 1 / (1 + d^2) (cauchy_tv_row: no
// log and no exp per pair for q), both from the same q_scales, so that Gamma is the q-weighted
// mean of g over the backward's very q.
template <typename T>
bool cauchy_tv_rows(const Problem<T>& pb) {
  return cauchy_kernel(pb) && pb.divergence == kTv && pb.alpha == T(0) && pb.beta == T(0);
}

// Every row's e^{-LSE} in T from the stats' T-rounded LSE (row 0), as both passes take it.
template <typename T>
std::vector<T> q_scales(const T* st, int64_t n) {
  std::vector<T> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = T(std::exp(-double(st[i])));
  return out;
}

// p and log p of a row over one column block from its target logits (in sc.t, which become
// t - LSE^p) and LSE^p; p = 0 at the self column. Then the row as f_row takes it. Without
// form_p (family_rows_read_p false) only log p: sc.p stays as the scratch was made (zeros), and
// the sums' p_sum, which this schedule does not read, is 0.
template <typename T>
FRow<T> affinity_family_segment(const Problem<T>& pb, int64_t i, int64_t len, int64_t self, T lse, T lse_p,
                                T lse_p_lo, AffinityRowScratch<T>& sc, bool form_p) {
  // a row without a finite target logit keeps its LSE^p as the shift (-inf - -inf: NaN, as the
  // plain rows' affinity_row and the reference), not finite_shift's 0 (p = 0, a finite loss)
  const T lo = std::isfinite(lse_p) ? lse_p_lo : T(0);
  const T shift = lse_p;
  T* t = sc.t.data();
  T* p = sc.p.data();
  if (form_p) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const T lp = (t[j] - shift) - lo;
      t[j] = lp;
      p[j] = j != self ? vexp(lp) : T(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) t[j] = (t[j] - shift) - lo;
  }
  FRow<T> r = pb.f_row(i, sc.s.data(), lse, p, t, T(0), 0.0, 0.0);
  r.m = len;
  r.self = self;
  return r;
}

// f(T_DIST) for the target kernel: true for the Gaussian's squared distance, false for the dot
// kernel's z_i . z_j and for the nonlinear kernels, whose rows make their logits from the Gram
// entries themselves (target_row_logits; pair_gram still makes their self pairs exact).
template <typename F>
decltype(auto) with_target_distance(int t_kernel, F&& f) {
  switch (t_kernel) {
    case kGaussian: return f(std::true_type{});
    case kDot:
    case kStudentT:
    case kPower:
    case kLogDot: return f(std::false_type{});
    default: TORCH_CHECK(false, "icon_kernels cpu: the symmetric Affinity family schedule has no target kernel code ",
                         t_kernel);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_affinity_family_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const auto opts = pb.x.options();
  RowOutputs<T> out(n, opts);
  T* st = out.st;
  std::vector<OnlineLabelRow<T>> acc_q(static_cast<size_t>(n)), acc_p(static_cast<size_t>(n));
  std::vector<double> loss(static_cast<size_t>(n)), gamma(static_cast<size_t>(n)), q_sum(static_cast<size_t>(n));
  std::vector<T> lo_p;
  std::vector<double> lse_q(static_cast<size_t>(n));   // unrounded
  // forward KL and cross-entropy without beta: f_row's sums take no q (q g = -p~), so sum_j q is the
  // backward's: exp(LSE - LSE rounded to T), up to each entry's rounding
  const bool q_sum_of_lse = !pb.f_div && pb.beta == T(0);
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts);
  const int log_p = pb.log_p_mode();
  const bool form_p = family_rows_read_p(pb);
  const bool sym = pb.symmetrize, joint = pb.joint;
  T log_z = T(0);
  std::vector<double> lse_p_wide(joint ? size_t(n) : 0);
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    return with_target_distance(pb.t_kernel, [&](auto td) {
      constexpr bool T_DIST = decltype(td)::value;
      const AffinityPairRows<T, K> rows{KernelRow<T, K>(pb.prm.template data_ptr<T>()[0]),
                                        pb.x_sq.template data_ptr<T>(), pb.z_sq.template data_ptr<T>(),
                                        target_coefs(pb), linear_target(pb), pair_target_logits_once(pb),
                                        pb.exclude_self};
      // pass 1: every row's LSE and LSE^p
      with_cauchy_flag<K>(cauchy_kernel(pb), [&](auto is_cauchy) {
        affinity_row_lses<T, K, T_DIST, decltype(is_cauchy)::value>(pb, rows, block, s_buf, t_buf, acc_q, acc_p);
        return 0;
      });
      for (int64_t i = 0; i < n; ++i) lse_q[i] = online_lse(acc_q[i]);
      if (joint) log_z = T(log_sum_exp(lse_q));   // every row's q under log Z rounded to T, as the plain joint rows
      for (int64_t i = 0; i < n; ++i) {
        st[i] = joint ? log_z : T(lse_q[i]);
        const double lse_p = online_lse(acc_p[i]);
        st[2 * n + i] = T(lse_p);
        if (joint) lse_p_wide[i] = lse_p;
        // (a symmetrised target takes LSE^p rounded to T, as the plain rows: no residual; joint: no record)
        else st[3 * n + i] = pair_record<T>(block, sym ? double(st[2 * n + i]) : lse_p, st[2 * n + i]);
      }
      if (!joint) recorded_pair_residuals(st, n, 2, &lo_p);   // as the backward decodes it
      // a symmetrised target: the tiles become log p~ and each row's shift is its log mass; joint:
      // LSE^p + log N
      const AffinityShifts<T, K> sh = joint ? joint_shifts(rows, lse_p_wide)
                                            : affinity_shifts<T, K, T_DIST>(pb, rows, st, lo_p, block, t_buf);
      // pass 2: the divergence sums under them (cauchy_tv_rows: the tiles hold the reciprocals)
      const std::vector<T> q_scale = cauchy_tv_rows(pb) && !joint ? q_scales(st, n) : std::vector<T>();
      with_cauchy_flag<K>(!q_scale.empty(), [&](auto tv_weights) {
        constexpr bool TV_R = decltype(tv_weights)::value;
        for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
          for_each_affinity_logit_row<T, K, T_DIST, TV_R>(
              pb, sh.rows, i0, i1, j0, j1, block, s_buf, t_buf,
              [&](const SideRow& sr, int64_t self, AffinityRowScratch<T>& sc) {
                const int64_t i = sr.i;
                [[maybe_unused]] const FRow<T> r = affinity_family_segment(pb, i, sr.len, self, st[i], sh.hi[i],
                                                                           sh.lo[i], sc, form_p);
                FRowSums f;
                if constexpr (TV_R) {
                  if (self >= 0) sc.s[self] = T(0);   // (r = 1 at d_ii = 0)
                  f = cauchy_tv_row<T, false>(sc.s.data(), q_scale[i], sc.p.data(), sr.len, nullptr, nullptr);
                } else {
                  f = f_row<T>(pb.divergence, r, log_p, nullptr, nullptr);
                }
                loss[i] += f.loss;
                gamma[i] += f.gamma;
                q_sum[i] += f.q_sum;
              });
        });
        if constexpr (TV_R) count_cauchy_sweep();
        return 0;
      });
      return 0;
    });
  });
  const bool has = pb.m_valid > 0;
  if (joint) {   // the plain joint rows' stats: log Z, Gamma_i = sum_j q g, LSE^p_i, the row's share of q
    const std::vector<double> q_mass = q_masses(lse_q, log_z);
    for (int64_t i = 0; i < n; ++i) {
      out.inc_p[i] = has;
      // NaN logits: NaN, even without p (cpu_loss.cpp)
      out.loss_p[i] = std::isnan(log_z) ? log_z : has ? T(loss[i]) : T(0);
      st[n + i] = T(gamma[i]);
      st[3 * n + i] = T(q_mass[i]);
    }
    count_schedule_call(pb.row_path(), n, 0, 10);
    return out.tuple();
  }
  for (int64_t i = 0; i < n; ++i) {
    out.inc_p[i] = has;
    out.loss_p[i] = has ? T(loss[i]) : T(0);
    if (q_sum_of_lse) q_sum[i] = std::isfinite(lse_q[i]) ? std::exp(lse_q[i] - double(st[i])) : 0.0;
    // Gamma as the q-weighted mean of g over the backward's very q (learned_backward)
    const double g_mean = q_sum[i] > 0 ? gamma[i] / q_sum[i] : gamma[i];
    st[n + i] = T(g_mean);
  }
  count_schedule_call(pb.row_path(), n, 0, 10);
  return out.tuple();
}

// The block side of the forward that made stats (T, contiguous), with every row's LSE^p residual
// into lo; 0 when they are not this schedule's forward's.
template <typename T>
int64_t recorded_affinity_family_block(const T* st, int64_t n, std::vector<T>* lo) {
  return recorded_pair_residuals(st, n, 2, lo);
}

// stats: the forward's (T, contiguous); block and lo: recorded_affinity_family_block's (joint rows:
// pair_block's, and lo unread: joint_shifts sweeps z for it).
template <typename T>
std::vector<at::Tensor> symmetric_affinity_family_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                           const at::Tensor& valid, const at::Tensor& stats,
                                                           bool param_grad, int64_t block, const std::vector<T>& lo) {
  const int64_t n = pb.n;
  const auto opts = pb.x.options();
  const at::Tensor g_t = masked_grads(grad_rows, valid, opts);
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T keep_q = T(1) - pb.beta;
  const bool dist = is_distance(pb.kernel);
  const int log_p = pb.log_p_mode();
  const bool form_p = family_rows_read_p(pb);
  const bool joint = pb.joint;
  TORCH_CHECK(!(joint && param_grad), "icon_kernels cpu: the symmetric joint Affinity backward has no parameter gradient");
  // joint: G_ij = (1 - beta) (g_i q g_ij - q_ij C), C = sum_k g_k Gamma_k / sum_k q_k (s_ij moves
  // every q through Z), from the plain joint rows' stats (log Z in row 0)
  const double centre = joint ? joint_centre(g, st, n) : 0.0;
  auto dfeat = at::zeros({n, pb.d}, opts), h_sum = at::zeros({n}, opts.dtype(at::kDouble));
  const size_t np = param_grad ? size_t(n) : 0;
  std::vector<double> dp(np), gs(np), qb(np), qs(np);   // a row's dL/dparam sums (centred_sum)
  at::Tensor s_buf = at::empty({block, block}, opts), t_buf = at::empty({block, block}, opts),
             w_buf = at::empty({block, block}, opts), wt_buf = at::empty({block, block}, opts);
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    return with_target_distance(pb.t_kernel, [&](auto td) {
      constexpr bool T_DIST = decltype(td)::value;
      const AffinityPairRows<T, K> plain_rows{KernelRow<T, K>(prm), pb.x_sq.template data_ptr<T>(),
                                              pb.z_sq.template data_ptr<T>(), target_coefs(pb), linear_target(pb),
                                              pair_target_logits_once(pb), pb.exclude_self};
      // a symmetrised target: the forward's log p~ tiles and row masses again (symmetrised_masses);
      // joint: the unrounded LSE^p again, from z's tiles alone
      const AffinityShifts<T, K> sh =
          joint ? joint_shifts(plain_rows, joint_target_lse_wide<T, T_DIST>(pb, block))
                : affinity_shifts<T, K, T_DIST>(pb, plain_rows, st, lo, block, t_buf);
      const AffinityPairRows<T, K>& rows = sh.rows;
      const std::vector<T> q_scale = cauchy_tv_rows(pb) && !joint ? q_scales(st, n) : std::vector<T>();
      return with_bool(param_grad, [&](auto with_param) {
        return with_bool(pb.f_div, [&](auto zero_at_q0) {   // learned_backward's Q_ZERO_GRAD
         return with_cauchy_flag<K>(!q_scale.empty(), [&](auto tv_weights) {
          constexpr bool PARAM = decltype(with_param)::value, Q_ZERO_GRAD = decltype(zero_at_q0)::value;
          constexpr bool TV_R = decltype(tv_weights)::value;
          for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
            // W_IJ in w_buf and W_JI in wt_buf, in place of their Gram entries
            for_each_affinity_family_row<T, K, T_DIST, !TV_R || PARAM>(
                pb, rows, i0, i1, j0, j1, block, s_buf, t_buf, w_buf.template data_ptr<T>(),
                wt_buf.template data_ptr<T>(), [&](const SideRow& sr, int64_t self, T* ab, AffinityRowScratch<T>& sc) {
              const int64_t i = sr.i, len = sr.len;
              // left out, or zero upstream gradient: no contribution (joint: unless the row moves Z)
              if (g[i] == T(0) && !(joint && centre != 0 && pb.m_valid > 0)) {
                std::fill(ab, ab + len, T(0));
                return;
              }
              [[maybe_unused]] const FRow<T> r =
                  affinity_family_segment(pb, i, len, self, st[i], sh.hi[i], sh.lo[i], sc, form_p);
              const double row_gamma = joint ? centre : double(st[n + i]);
              if constexpr (TV_R) {
                // q and q g from the reciprocals (sc.col: free in the backward, whose rows of J are in
                // wt_buf), then W = 2 G r without the dof's gradient
                T* rr = sc.col.data();
                cauchy_reciprocals<T>(ab, rr, rows.x_sq + sr.col0, rows.x_sq[i], self, len);
                cauchy_tv_row<T, true>(rr, q_scale[i], sc.p.data(), len, sc.q.data(), sc.qg.data());
                if constexpr (!PARAM) {
                  cauchy_learned_backward<T>(ab, rr, sc.q.data(), sc.qg.data(), len, g[i] * keep_q, row_gamma);
                  if (i0 == j0 && self < 0) ab[i - sr.col0] = T(0);   // the kept self pair (below)
                  return;
                }
              } else {
                f_row<T>(pb.divergence, r, log_p, sc.qg.data(), nullptr, sc.q.data());
                if (joint) fold_joint_upstream(sc.qg.data(), len, g[i]);   // G = (1 - beta) (g_i q g - q C)
              }
              // the self column's Gram entry: any finite value (G is 0 there; cpu_loss.cpp's note)
              if (self >= 0) ab[self] = T(0);
              const LabelGradSums sums = learned_backward<T, K, PARAM, Q_ZERO_GRAD>(
                  KernelRow<T, K>(prm), ab, sc.s.data(), sc.q.data(), sc.qg.data(), rows.x_sq + sr.col0,
                  rows.x_sq[i], len, joint ? keep_q : g[i] * keep_q, row_gamma, finite_shift(st[i]));
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
          if constexpr (TV_R) count_cauchy_sweep();
          return 0;
         });
        });
      });
    });
  });
  if (dist) dfeat -= h_sum.to(opts.dtype()).unsqueeze(1) * pb.x;
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble));
  if (param_grad) {
    double* p = dprm.template data_ptr<double>();
    const double scale = param_scale<double>(pb.kernel, prm);
    for (int64_t i = 0; i < n; ++i) p[i] = scale * centred_sum(dp[i], gs[i], qb[i], qs[i]);
  }
  count_schedule_call(pb.row_path(), n, 1, 11);
  return {dfeat, at::zeros({pb.m, pb.d}, opts), dprm, at::Tensor(), at::Tensor(), at::Tensor()};
}

}  // namespace cpu
}  // namespace icon
