// The symmetric schedule (DESIGN.md §1.3) for the Labels targets on the family rows
// (cpu_row_paths.h), in self mode: debiased InfoNCE / SupCon (beta > 0), the f-divergences off
// their closed forms (alpha or beta > 0, or a kernel other than dot and Gaussian) and the kernels
// the hot path lacks (Student-t: t-SimCLR; power). Each pair of row blocks I <= J is one Gram tile
// S_IJ = X_I X_J^T, read by the rows of I and, column by column, by the rows of J
// (for_each_family_row; the pair loop and H of cpu_tile_pairs.h).
//
// A row's loss here needs its LSE before its pairs (log q~ is the log of a mixture, an
// f-divergence's terms take q), so the forward sweeps the tile pairs twice:
//   pass 1   each row's LSE merged online over its column blocks (add_lse_segment);
//   pass 2   each row's divergence sums under it, block by block (f_row of cpu_f_rows.h: the loss,
//            Gamma = sum_j q g and sum_j q over these very q).
// Forward KL and cross-entropy without beta (Student-t, power) need pass 1 alone: their loss is
// the hot path's closed form of the LSE and the label sums, and Gamma is -1.
// The backward cannot take Gamma from a sweep of the whole row first (the plain backward does), so
// the forward saves it: G_ij = g_i (1 - beta) (q_ij g_ij - q_ij Gamma_i) for both sides of the one
// recomputed tile, then H_IJ = W_IJ + W_JI^T, dX_I += H_IJ X_J and dX_J += H_IJ^T X_I
// (add_h_tile). Two and a half N^2 d GEMM-equivalents instead of four (two without pass 2).
//
// Stats: row 0 the LSE rounded to T (as the plain rows), rows 1 and 2 Gamma / sum_j q in two
// parts (hi, lo), row 3 the record 8 * block + the LSE's residual in units of its last place
// (pair_record). Both pass 2 and the backward take q = exp((s - hi) - lo): they sum to 1 up to
// each entry's rounding, and Gamma is the q-weighted mean of g over exactly the backward's q, so
// sum_j G_ij = 0 up to those roundings with no row sweep. The plain forward leaves rows 2 and 3 at
// 0 for a Labels target, so the backward runs this schedule only after its forward (the record
// and its block); the plain backward after this forward reads row 0 only and renormalises itself.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_f_rows.h"
#include "cpu_family_rows.h"
#include "cpu_problem.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"
#include "cpu_tile_pairs.h"

namespace icon {
namespace cpu {

// Whether pb has this schedule's structure: a plain Labels target (no joint normalisation) on the
// family rows (the hot path has its own schedule, cpu_symmetric_labels.h; the closed-form rows of
// cpu_f_label_rows.h take no log per pair, which two sweeps would cost more than they save), in
// self mode with one scalar parameter, the columns' labels the rows', a kernel other than log_dot.
template <typename T>
bool symmetric_label_family_fit(const Problem<T>& pb) {
  if (pb.target != kLabels || pb.global() || !pb.self_pairs || !pb.scalar_param || pb.n < 2) return false;
  if (pb.kernel == kLogDot || pb.row_path() != kFamilyRows) return false;
  return same_row_and_column_labels(pb);
}

template <typename T>
bool symmetric_label_family_apply(const Problem<T>& pb) {
  return symmetric_label_family_fit(pb) && symmetric_schedule_enabled();
}

// A thread's row buffers (one block of columns each): logits, p, q, q g, and a row of J's Gram
// entries gathered from the tile's column.
template <typename T>
struct FamilyRowScratch {
  std::vector<T> s, p, q, qg, col;
  explicit FamilyRowScratch(int64_t block)
      : s(size_t(block)), p(size_t(block)), q(size_t(block)), qg(size_t(block)), col(size_t(block)) {}
};

// row(seg, sr, ab, scratch) for every row of both sides of the tile pair (I, J), split across
// threads, after the Gram tile (pair_gram, into buf, which the rows only read): ab the row's Gram
// entries, scratch.s its logits (stored before anything reads them: an exp of an unstored product
// would be contracted into an fma, and pass 2 and the backward must see the same logits). A row
// of J gathers its entries from the tile's column in the thread that reads them (no transpose
// pass, with its own parallel region, per tile pair). With w_out (the backward), ab is the row's
// copy in w_out (rows of I, ni x nj) or wt_out (rows of J, nj x ni), which it overwrites with W;
// without (the forward), the Gram row itself or the gathered column, read only.
template <typename T, int K, typename F>
void for_each_family_row(const LabelSide<T>& side, const KernelRow<T, K>& k_in, int64_t i0, int64_t i1, int64_t j0,
                         int64_t j1, int64_t block, at::Tensor& buf, T* w_out, T* wt_out, F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  pair_gram<T>(side.rows, i0, i1, j0, j1, is_distance(K) ? side.sq : nullptr, buf);
  T* g_p = buf.template data_ptr<T>();
  at::parallel_for(0, tile_pair_rows(i0, ni, j0, nj), 1, [&](int64_t r0, int64_t r1) {
    const KernelRow<T, K> k = k_in;   // a local copy (loads through a reference kept GCC from vectorising)
    FamilyRowScratch<T> scratch(block);
    for (int64_t r = r0; r < r1; ++r) {
      const SideRow sr = side_row(r, i0, ni, j0, nj);
      T* ab;
      if (sr.s == 0) {
        ab = g_p + r * nj;
        if (w_out != nullptr) ab = std::copy(ab, ab + nj, w_out + r * nj) - nj;
      } else {
        const int64_t c = r - ni;
        ab = wt_out != nullptr ? wt_out + c * ni : scratch.col.data();
        for (int64_t t = 0; t < ni; ++t) ab[t] = g_p[t * nj + c];
      }
      kernel_logits<T, K>(k, ab, scratch.s.data(), side.sq + sr.col0, side.sq[sr.i], sr.len);
      row(side.segment(sr.i, sr.col0, sr.len), sr, ab, scratch);
    }
  });
}

// p over a row's column block: 1/K (inv) at the positives, 0 elsewhere and at the self column.
template <typename T>
void label_p_segment(const LabelRow& seg, T inv, T* p) {
  const int64_t* c = seg.col_labels;
  const int64_t label = seg.label, self = seg.self;
#pragma omp simd
  for (int64_t j = 0; j < seg.m; ++j) p[j] = c[j] == label && j != self ? inv : T(0);
}

// What both passes of a row read: its f_row (the LSE in two parts, the two levels of log p~), 1/K.
template <typename T>
struct FamilyRowsOfPairs {
  std::vector<FRow<T>> f;
  std::vector<T> inv_k;
  std::vector<int64_t> k;
};

// The rows' FRow with the LSE hi (rounded to T) and lo (its residual), and 1/K.
template <typename T>
FamilyRowsOfPairs<T> family_rows_of_pairs(const Problem<T>& pb, const LabelSide<T>& side, const T* hi,
                                          const std::vector<T>& lo) {
  FamilyRowsOfPairs<T> out;
  out.k = side.positive_counts(pb.n);
  out.f.resize(size_t(pb.n));
  out.inv_k.resize(size_t(pb.n));
  for (int64_t i = 0; i < pb.n; ++i) {
    const int64_t k = out.k[i];
    out.f[i] = pb.f_row(i, nullptr, hi[i], nullptr, nullptr, T(0), 0.0, double(k));
    out.f[i].lse_lo = lo[i];
    out.inv_k[i] = k > 0 ? T(1.0 / double(k)) : T(0);   // as target_row's p
  }
  return out;
}

// Row i over one column block, as f_row takes it: the block's logits, p, length and self column.
template <typename T>
FRow<T> family_segment(const FamilyRowsOfPairs<T>& rows, const LabelRow& seg, int64_t i, FamilyRowScratch<T>& sc) {
  label_p_segment<T>(seg, rows.inv_k[i], sc.p.data());
  FRow<T> r = rows.f[i];
  r.s = sc.s.data();
  r.p = sc.p.data();
  r.m = seg.m;
  r.self = seg.self;
  return r;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_family_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  const LabelSide<T> side = self_tile_pair(pb).side;
  const auto opts = pb.x.options();
  RowOutputs<T> out(n, opts);
  T* st = out.st;
  std::vector<OnlineLabelRow<T>> acc(static_cast<size_t>(n));
  std::vector<double> loss(static_cast<size_t>(n)), gamma(static_cast<size_t>(n)), q_sum(static_cast<size_t>(n));
  // forward KL and cross-entropy without beta (Student-t, power): the loss is the label hot path's
  // closed form of the row's LSE and label sums, one sweep; their Gamma is -sum_j p~ / sum_j q = -1
  // (q from the LSE in two parts sums to 1 up to each entry's rounding)
  const bool one_pass = !pb.f_div && pb.beta == T(0);
  at::Tensor buf = at::empty({block, block}, opts);
  T* const no_out = nullptr;   // the forward reads the Gram entries only
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const KernelRow<T, K> k(pb.prm.template data_ptr<T>()[0]);
    // pass 1: the LSE of every row (s[self] becomes -inf in the scratch)
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for_each_family_row(side, k, i0, i1, j0, j1, block, buf, no_out, no_out,
                          [&](const LabelRow& seg, const SideRow& sr, T*, FamilyRowScratch<T>& sc) {
                            if (one_pass) add_label_segment<T>(seg, sc.s.data(), &acc[sr.i]);
                            else add_lse_segment<T>(seg, sc.s.data(), &acc[sr.i]);
                          });
    });
    std::vector<T> lo(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const double lse = online_lse(acc[i]);
      st[i] = T(lse);
      st[3 * n + i] = pair_record<T>(block, lse, st[i]);
    }
    if (one_pass) {
      for (int64_t i = 0; i < n; ++i) {
        const LabelSums<T> sums{st[i], T(acc[i].sum_s), T(acc[i].pos_s), acc[i].k};
        out.inc_p[i] = label_row_loss<T>(side.segment(i, 0, 0), sums, pb.kl, &out.loss_p[i]);
        st[n + i] = T(-1);
      }
      return 0;
    }
    recorded_pair_residuals(st, n, 0, &lo);   // lo as the backward decodes it
    const FamilyRowsOfPairs<T> rows = family_rows_of_pairs(pb, side, st, lo);
    // pass 2: the divergence sums under it
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for_each_family_row(side, k, i0, i1, j0, j1, block, buf, no_out, no_out,
                          [&](const LabelRow& seg, const SideRow& sr, T*, FamilyRowScratch<T>& sc) {
                            const int64_t i = sr.i;
                            const FRow<T> r = family_segment(rows, seg, i, sc);
                            const FRowSums f = f_row<T>(pb.divergence, r, kTwoLevelLogP, nullptr, nullptr);
                            loss[i] += f.loss;
                            gamma[i] += f.gamma;
                            q_sum[i] += f.q_sum;
                          });
    });
    for (int64_t i = 0; i < n; ++i) {
      out.inc_p[i] = rows.k[i] > 0 && pb.m_valid > 0;
      out.loss_p[i] = out.inc_p[i] ? T(loss[i]) : T(0);
      // Gamma as the q-weighted mean of g over the backward's very q (learned_backward)
      const double g_mean = q_sum[i] > 0 ? gamma[i] / q_sum[i] : gamma[i];
      st[n + i] = T(g_mean);
      st[2 * n + i] = std::isfinite(g_mean) ? T(g_mean - double(st[n + i])) : T(0);
    }
    return 0;
  });
  count_schedule_call(pb.row_path(), n, 0, 8);
  return out.tuple();
}

// The block side of the forward that made stats (T, contiguous), with every row's LSE residual into
// lo; 0 when they are not this schedule's forward's.
template <typename T>
int64_t recorded_label_family_block(const T* st, int64_t n, std::vector<T>* lo) {
  return recorded_pair_residuals(st, n, 0, lo);
}

// stats: the forward's (T, contiguous); block and lo: recorded_label_family_block's.
template <typename T>
std::vector<at::Tensor> symmetric_label_family_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                        const at::Tensor& valid, const at::Tensor& stats,
                                                        bool param_grad, int64_t block, const std::vector<T>& lo) {
  const int64_t n = pb.n;
  const LabelSide<T> side = self_tile_pair(pb).side;
  const auto opts = pb.x.options();
  const at::Tensor g_t = masked_grads(grad_rows, valid, opts);
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const FamilyRowsOfPairs<T> rows = family_rows_of_pairs(pb, side, st, lo);
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T keep_q = T(1) - pb.beta;
  const bool dist = is_distance(pb.kernel);
  auto dfeat = at::zeros({n, pb.d}, opts), h_sum = at::zeros({n}, opts.dtype(at::kDouble));
  const size_t np = param_grad ? size_t(n) : 0;
  std::vector<double> dp(np), gs(np), qb(np), qs(np);   // a row's dL/dparam sums (centred_sum)
  at::Tensor buf = at::empty({block, block}, opts), w_buf = at::empty({block, block}, opts),
             wt_buf = at::empty({block, block}, opts);
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const KernelRow<T, K> k(prm);
    return with_bool(param_grad, [&](auto with_param) {
      return with_bool(pb.f_div, [&](auto zero_at_q0) {   // learned_backward's Q_ZERO_GRAD
        constexpr bool PARAM = decltype(with_param)::value, Q_ZERO_GRAD = decltype(zero_at_q0)::value;
        for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
          // W_IJ in w_buf and W_JI in wt_buf, in place of their Gram entries
          for_each_family_row(side, k, i0, i1, j0, j1, block, buf, w_buf.template data_ptr<T>(),
                              wt_buf.template data_ptr<T>(),
                              [&](const LabelRow& seg, const SideRow& sr, T* ab, FamilyRowScratch<T>& sc) {
            const int64_t i = sr.i;
            if (g[i] == T(0)) {   // left out, or zero upstream gradient: no contribution
              std::fill(ab, ab + seg.m, T(0));
              return;
            }
            const FRow<T> r = family_segment(rows, seg, i, sc);
            f_row<T>(pb.divergence, r, kTwoLevelLogP, sc.qg.data(), nullptr, sc.q.data());
            // the self column's Gram entry: any finite value (G is 0 there; cpu_loss.cpp's note)
            if (seg.self >= 0) ab[seg.self] = T(0);
            const double row_gamma = double(st[n + i]) + double(st[2 * n + i]);
            const LabelGradSums sums = learned_backward<T, K, PARAM, Q_ZERO_GRAD>(
                KernelRow<T, K>(prm), ab, sc.s.data(), sc.q.data(), sc.qg.data(), side.sq + sr.col0, side.sq[i],
                seg.m, g[i] * keep_q, row_gamma, finite_shift(st[i]));
            // a distance kernel's kept self pair (d^2 = 0 exactly, pair_gram): its dX term is
            // W_ii (x_i - x_i) = 0, so W_ii = 0; formed as H_ii x_i - diag(H 1)_i x_i, the power
            // kernel's W_ii = G n / eps (~1e12) left its rounding (its dL/dparam term stays)
            if (is_distance(K) && i0 == j0 && seg.self < 0) ab[i - sr.col0] = T(0);
            if constexpr (PARAM) {
              dp[i] += sums.dp;
              gs[i] += sums.g_sum;
              qb[i] += sums.q_basis;
              qs[i] += sums.q_sum;
            }
          });
          add_h_tile<T>(side.rows, i0, i1 - i0, j0, j1 - j0, w_buf, wt_buf, dist, dfeat, h_sum);
        });
        return 0;
      });
    });
  });
  if (dist) dfeat -= h_sum.to(opts.dtype()).unsqueeze(1) * side.rows;
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble));
  if (param_grad) {
    double* p = dprm.template data_ptr<double>();
    const double scale = param_scale<double>(pb.kernel, prm);
    for (int64_t i = 0; i < n; ++i) p[i] = scale * centred_sum(dp[i], gs[i], qb[i], qs[i]);
  }
  count_schedule_call(pb.row_path(), n, 1, 9);
  return {dfeat, at::zeros({pb.m, pb.d}, opts), dprm, at::Tensor(), at::Tensor(), at::Tensor()};
}

}  // namespace cpu
}  // namespace icon
