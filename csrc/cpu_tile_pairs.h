// Tile pairs of the label hot path (DESIGN.md §1.3): one Gram tile S_IJ = A_I B_J^T serves the rows
// of I (over the columns J) and the rows of J (over the columns I, from its transpose). The self
// mode's symmetric schedule (cpu_symmetric_labels.h: A = B = x, the pairs I <= J, 2 GEMM-
// equivalents for forward + backward instead of 4) runs on it; the bidirectional ops
// (cpu_bidirectional_labels.cpp: strips of x against all of y, no transposes) share its sides,
// online statistics, row finish and exactness rule.
// Forward: each side's rows merge their statistics over the column blocks online (running max,
// rescaled sum of exps, the label sums). Backward: the same GEMM recomputes the tile bit for bit;
// the rows of I give W_IJ, the rows of J give W_JI, H_IJ = W_IJ + W_JI^T, dA_I += H_IJ B_J and
// dB_J += H_IJ^T A_I (for a distance kernel minus diag(H 1) A and diag(H^T 1) B).
//
// Exactness: the backward takes the logits exactly as its forward stored them and the LSE with
// its rounding residual (stats row 2), and has no full-row renormalisation to fall back on, so it
// runs only after a forward of the same schedule with the same blocks: the forward records its
// block side in stats row 3 (free for a Labels target) and the backward follows that record.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <unordered_map>
#include <vector>

#include "cpu_label_rows.h"
#include "cpu_row_paths.h"
#include "op_codes.h"

namespace icon {
namespace cpu {

// The side of a pair block. A self-mode diagonal tile computes its whole B x B Gram for half of it
// new, so the GEMM work is N^2 d (1/2 + B/(2N)): small blocks waste less, large ones run the GEMM
// faster. InfoNCE fwd+bwd on the development VM (d = 128, fp32, seconds, B = 128 / 256 / 512 /
// 1024): N = 2048 0.027 / 0.024 / 0.024 / 0.032; 8192 0.61 / 0.46 / 0.46 / 0.50; 16384 3.06 /
// 2.16 / 2.29 / 2.44. ICON_KERNELS_CPU_TILE_ELEMENTS (tile_elements: entries of two tiles) caps
// it, down to 1 row, so that tests force ragged blocks.
constexpr int64_t kPairBlock = 256;
inline int64_t pair_block(int64_t tile_elements, int64_t rows) {
  const int64_t side = std::min<int64_t>(kPairBlock, int64_t(std::sqrt(double(tile_elements) / 2)));
  return std::max<int64_t>(1, std::min(side, rows));
}

// The block side a tile-pair forward recorded in stats row 3 of its n rows, or 0 when the stats
// are not such a forward's (a plain forward: the backward must not run the tile-pair schedule).
template <typename T>
int64_t recorded_pair_block(const T* stats, int64_t n, int64_t limit) {
  const double b = double(stats[3 * n]);
  return b >= 1 && b <= double(limit) && b == std::floor(b) ? int64_t(b) : 0;
}

// The first rows * cols entries of a tile buffer as a dense rows x cols matrix (the GEMMs write
// it, the row loops read it with row stride cols).
inline at::Tensor dense_tile(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

// f(KernelCode) for the label hot path's two kernels (cpu_row_paths.h: dot or Gaussian only).
template <typename F>
decltype(auto) with_label_kernel(int kernel, F&& f) {
  switch (kernel) {
    case kDot: return f(std::integral_constant<int, kDot>{});
    case kGaussian: return f(std::integral_constant<int, kGaussian>{});
    default: TORCH_CHECK(false, "icon_kernels cpu: the label hot path has no kernel code ", kernel);
  }
}

// dst (cols x rows) = src^T (rows x cols), both row-major and dense, in cache blocks; dst += src^T
// with ACCUMULATE.
template <typename T, bool ACCUMULATE>
void transpose_tile(const T* src, int64_t rows, int64_t cols, T* dst) {
  constexpr int64_t kBlock = 32;
  at::parallel_for(0, (cols + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kBlock; c0 < std::min(cols, b1 * kBlock); c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        const int64_t r1 = std::min(rows, r0 + kBlock);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) {
            if constexpr (ACCUMULATE) dst[c * rows + r] += src[r * cols + c];
            else dst[c * rows + r] = src[r * cols + c];
          }
      }
    }
  });
}

// A row's statistics merged over column blocks: the running max and the sum of exps under it
// (rescaled when the max grows), the sums of s over valid columns and over positives, the count.
template <typename T>
struct OnlineLabelRow {
  T mx = -std::numeric_limits<T>::infinity();
  double se = 0, sum_s = 0, pos_s = 0;
  int64_t k = 0;
};

// Adds the logits of one row over one column block (seg: the block's labels, length and the row's
// self column in it) to its statistics; s[self] becomes -inf. The sums as label_row_sums'.
template <typename T>
void add_label_segment(const LabelRow& seg, T* s, OnlineLabelRow<T>* acc) {
  const T inf = std::numeric_limits<T>::infinity();
  label_value_sums(seg, s, &acc->sum_s, &acc->pos_s, &acc->k);
  if (seg.self >= 0) s[seg.self] = -inf;
  const T mx = row_max(s, seg.m);
  if (mx > acc->mx) {
    // exp(-inf - mx) = 0 for the first block with a finite logit
    acc->se *= std::exp(double(acc->mx) - double(mx));
    acc->mx = mx;
  }
  if (acc->mx == -inf) return;   // no finite logit yet: nothing to add (NaN shows in sum_s)
  acc->se += blocked_exp_sum(s, seg.m, acc->mx);
}

// The row's LSE unrounded: NaN when a logit is, -inf without a valid column.
template <typename T>
double online_lse(const OnlineLabelRow<T>& acc) {
  if (acc.mx == -std::numeric_limits<T>::infinity())
    return std::isnan(acc.sum_s) ? std::numeric_limits<double>::quiet_NaN() : double(acc.mx);
  return double(acc.mx) + std::log(acc.se);
}

// One side of a tile pair: its rows (in T, contiguous), their squared norms (zeros unless the
// kernel is a distance), their labels and their columns' labels (the other side's rows), and
// what a row's loss reads (alpha, its valid column count).
template <typename T>
struct LabelSide {
  at::Tensor rows;
  const T* sq;
  const int64_t* labels;
  const int64_t* col_labels;
  int64_t m_valid;
  double alpha;
  bool exclude_self;   // the self pair of row i is column i (a square problem)

  int64_t size() const { return rows.size(0); }
  // Row i over the columns [col0, col0 + len) as fast_label_backward and add_label_segment read
  // it: the block's labels, its length, the row's self column in it or -1 (alpha and M' stay the
  // whole row's).
  LabelRow segment(int64_t i, int64_t col0, int64_t len) const {
    const int64_t self = exclude_self && i >= col0 && i < col0 + len ? i - col0 : -1;
    return {col_labels + col0, labels[i], len, self, alpha, m_valid};
  }
  // The positive count of every row over its valid columns (all of the other side's rows).
  std::vector<int64_t> positive_counts(int64_t n_cols) const {
    std::unordered_map<int64_t, int64_t> count;
    count.reserve(size_t(n_cols));
    for (int64_t j = 0; j < n_cols; ++j) ++count[col_labels[j]];
    std::vector<int64_t> k(size());
    for (int64_t i = 0; i < size(); ++i) {
      auto it = count.find(labels[i]);
      k[i] = (it == count.end() ? 0 : it->second) - (exclude_self && col_labels[i] == labels[i] ? 1 : 0);
    }
    return k;
  }
};

// Self mode's tile pairs: one matrix (the rows are the columns) and the learned kernel.
template <typename T>
struct TilePair {
  LabelSide<T> side;
  int kernel;
  T prm;
};

// Runs body(i0, i1, j0, j1) over the pairs of row blocks I = [i0, i1) <= J = [j0, j1) of n rows, in
// order (every tile-pair schedule: this file's, cpu_symmetric_affinity.h's, cpu_symmetric_joint.h's).
template <typename F>
void for_each_block_pair(int64_t n, int64_t block, F&& body) {
  for (int64_t i0 = 0; i0 < n; i0 += block)
    for (int64_t j0 = i0; j0 < n; j0 += block) body(i0, std::min(n, i0 + block), j0, std::min(n, j0 + block));
}

template <typename T, typename F>
void for_each_tile_pair(const TilePair<T>& tp, int64_t block, F&& body) {
  for_each_block_pair(tp.side.size(), block, std::forward<F>(body));
}

// A forward op's outputs for n rows (loss, included, stats [4, n]), zeroed, with their pointers.
template <typename T>
struct RowOutputs {
  at::Tensor loss, included, stats;
  T* loss_p;
  bool* inc_p;
  T* st;
  RowOutputs(int64_t n, const at::TensorOptions& opts)
      : loss(at::zeros({n}, opts)), included(at::zeros({n}, opts.dtype(at::kBool))), stats(at::zeros({4, n}, opts)),
        loss_p(loss.template data_ptr<T>()), inc_p(included.template data_ptr<bool>()),
        st(stats.template data_ptr<T>()) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {loss, included, stats}; }
};

// One tile pair of both passes: the Gram tile X_I X_J^T into buf (ni x nj, dense; the forward and
// the backward make it with the same GEMM, bit for bit), its transpose into t_buf for the rows of
// J (off the diagonal), the logits of every row of both sides (s in place), then
// row(s, i, seg, logits) for each, split across threads: row i of side s (0: I, 1: J) over the
// columns [col0, col0 + seg.m), seg its label segment, logits its entries, which it may overwrite
// (in buf for side 0, in t_buf for side 1).
template <typename T, typename F>
void for_each_tile_row(const TilePair<T>& tp, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& buf,
                       at::Tensor& t_buf, F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  const bool one_side = i0 == j0;
  at::Tensor tile = dense_tile(buf, ni, nj);
  at::mm_out(tile, tp.side.rows.narrow(0, i0, ni), tp.side.rows.narrow(0, j0, nj).t());
  T* s_p = buf.template data_ptr<T>();
  T* st_p = t_buf.template data_ptr<T>();
  if (!one_side) transpose_tile<T, false>(s_p, ni, nj, st_p);
  at::parallel_for(0, one_side ? ni : ni + nj, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int s = r < ni ? 0 : 1;
      const LabelSide<T>& own = tp.side;
      const int64_t i = s == 0 ? i0 + r : j0 + (r - ni), col0 = s == 0 ? j0 : i0, len = s == 0 ? nj : ni;
      T* logits = s == 0 ? s_p + r * nj : st_p + (r - ni) * ni;
      // the logits stored once, and read as stored (the exactness note above)
      with_label_kernel(tp.kernel, [&](auto code) {
        fast_logits<T, decltype(code)::value>(logits, own.sq + col0, own.sq[i], tp.prm, len);
      });
      row(s, i, own.segment(i, col0, len), logits);
    }
  });
}

// The forward of one side from its merged statistics: (loss, included, stats) with stats rows 0
// LSE (in T), 2 its rounding residual and 3 the block side (recorded_pair_block).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_label_side(const LabelSide<T>& side,
                                                                 const std::vector<OnlineLabelRow<T>>& acc,
                                                                 bool kl, int64_t block) {
  const int64_t n = side.size();
  RowOutputs<T> out(n, side.rows.options());
  T* loss_p = out.loss_p;
  bool* inc_p = out.inc_p;
  T* st = out.st;
  for (int64_t i = 0; i < n; ++i) {
    const double lse = online_lse(acc[i]);
    const T hi = T(lse);
    const LabelSums<T> sums{hi, T(acc[i].sum_s), T(acc[i].pos_s), acc[i].k};
    inc_p[i] = label_row_loss<T>(side.segment(i, 0, 0), sums, kl, &loss_p[i]);
    st[i] = hi;
    // row 2 (LSE^p for Affinity targets, free for Labels): the LSE's rounding, for the backward's q
    st[2 * n + i] = std::isfinite(lse) ? T(lse - double(hi)) : T(0);
    st[3 * n + i] = T(block);
  }
  return out.tuple();
}

// The forward's merged statistics of every row.
template <typename T>
std::vector<OnlineLabelRow<T>> tile_pair_statistics(const TilePair<T>& tp, int64_t block) {
  std::vector<OnlineLabelRow<T>> acc(size_t(tp.side.size()));
  const auto opts = tp.side.rows.options();
  at::Tensor s_buf = at::empty({block, block}, opts), st_buf = at::empty({block, block}, opts);
  for_each_tile_pair(tp, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for_each_tile_row(tp, i0, i1, j0, j1, s_buf, st_buf, [&](int, int64_t i, const LabelRow& seg, T* logits) {
      add_label_segment<T>(seg, logits, &acc[i]);
    });
  });
  return acc;
}

// What the backward reads and writes: the upstream gradients (0 for a row left out), the
// forward's stats (in T, contiguous), the positive counts; dfeat (dL/d rows, in T) and, for the
// parameter's gradient, each row's sums over every column block (centred once per row at the end).
template <typename T>
struct SideGrads {
  const T* g;
  const T* stats;
  int64_t n;
  std::vector<int64_t> k;
  at::Tensor dfeat, h_sum;    // h_sum: diag(H 1) of a distance kernel, in double
  std::vector<double> dp, gs, qb, qs;
};

// The backward over every tile pair: dfeat (dL/dx, x being both the rows and the columns), and
// the parameter sums when param_grad.
template <typename T>
void tile_pair_backward(const TilePair<T>& tp, int64_t block, SideGrads<T>& o, bool param_grad) {
  const auto opts = tp.side.rows.options();
  const bool dist = is_distance(tp.kernel);
  at::Tensor w_buf = at::empty({block, block}, opts), wt_buf = at::empty({block, block}, opts);
  for_each_tile_pair(tp, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t ni = i1 - i0, nj = j1 - j0;
    const bool one_side = i0 == j0;
    // the Gram tile, then W_IJ (and W_JI in wt_buf), then H_IJ in w_buf
    for_each_tile_row(tp, i0, i1, j0, j1, w_buf, wt_buf, [&](int s, int64_t i, const LabelRow& seg, T* row) {
      const T gi = o.g[i];
      if (gi == T(0)) {   // left out, or zero upstream gradient: no contribution
        std::fill(row, row + seg.m, T(0));
        return;
      }
      const int64_t col0 = s == 0 ? j0 : i0;
      const LabelGradSums sums = with_label_kernel(tp.kernel, [&](auto code) {
        return fast_label_backward<T, decltype(code)::value, true>(seg, o.k[i], row, tp.side.sq + col0,
                                                                   tp.side.sq[i], tp.prm, o.stats[i], gi,
                                                                   o.stats[2 * o.n + i]);
      });
      if (param_grad) {
        o.dp[i] += sums.dp;
        o.gs[i] += sums.g_sum;
        o.qb[i] += sums.q_basis;
        o.qs[i] += sums.q_sum;
      }
    });
    at::Tensor h = dense_tile(w_buf, ni, nj);
    T* w_p = w_buf.template data_ptr<T>();
    T* wt_p = wt_buf.template data_ptr<T>();
    // H = W_IJ + W_JI^T (on the diagonal, W_II + W_II^T), then both sides' gradients
    if (one_side) dense_tile(wt_buf, ni, nj).copy_(h);   // W_II, whose transpose is added
    transpose_tile<T, true>(wt_p, nj, ni, w_p);
    o.dfeat.narrow(0, i0, ni).addmm_(h, tp.side.rows.narrow(0, j0, nj));
    if (!one_side) o.dfeat.narrow(0, j0, nj).addmm_(h.t(), tp.side.rows.narrow(0, i0, ni));
    if (dist) {   // diag(H 1) of both sides: H's row sums and column sums
      o.h_sum.narrow(0, i0, ni) += h.sum(1, false, at::kDouble);
      if (!one_side) o.h_sum.narrow(0, j0, nj) += h.sum(0, false, at::kDouble);
    }
  });
  if (dist) o.dfeat -= o.h_sum.to(o.dfeat.scalar_type()).unsqueeze(1) * tp.side.rows;
}

// SideGrads of one side: g and stats in T (contiguous tensors kept alive by the caller).
template <typename T>
SideGrads<T> side_grads(const LabelSide<T>& side, int64_t n_cols, const at::Tensor& g, const at::Tensor& stats,
                        bool param_grad) {
  const int64_t n = side.size();
  const auto opts = side.rows.options();
  const size_t np = param_grad ? size_t(n) : 0;
  return {g.template data_ptr<T>(), stats.template data_ptr<T>(), n, side.positive_counts(n_cols),
          at::zeros({n, side.rows.size(1)}, opts), at::zeros({n}, opts.dtype(at::kDouble)),
          std::vector<double>(np), std::vector<double>(np), std::vector<double>(np), std::vector<double>(np)};
}

// dL/dparam of every row of a side (double): fast_param_scale times the row's centred sum.
template <typename T>
at::Tensor param_grads(const SideGrads<T>& o, int kernel, T prm) {
  auto out = at::zeros({o.n}, at::TensorOptions().dtype(at::kDouble));
  if (o.dp.empty()) return out;
  double* p = out.template data_ptr<double>();
  const double scale = kernel == kDot ? fast_param_scale<double, kDot>(prm) : fast_param_scale<double, kGaussian>(prm);
  for (int64_t i = 0; i < o.n; ++i) p[i] = scale * centred_sum(o.dp[i], o.gs[i], o.qb[i], o.qs[i]);
  return out;
}

// Upstream gradients where the rows are included, 0 elsewhere, in T and contiguous.
inline at::Tensor masked_grads(const at::Tensor& grad_rows, const at::Tensor& valid, const at::TensorOptions& opts) {
  return at::where(valid, grad_rows.to(opts.dtype()), at::zeros({}, opts)).contiguous();
}

}  // namespace cpu
}  // namespace icon
