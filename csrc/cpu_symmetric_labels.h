// The symmetric schedule of the CPU kernel (DESIGN.md §1.3) on its label hot path: InfoNCE /
// SimCLR / SupCon in self mode (y is x), where s_ij = s_ji. The plain schedule pays four N^2 d
// GEMMs (S in the forward, S again, W Y and W^T X in the backward). Here each pair of row blocks
// (I, J), I <= J, is one Gram tile S_IJ = X_I X_J^T:
//   forward   the rows of I take their statistics over the columns J from S_IJ, and the rows of J
//             theirs over the columns I from its transpose, merged online (running max, rescaled
//             sum of exps): 1/2 a GEMM instead of 1;
//   backward  the same tile (bit for bit: the same GEMM call) gives W_IJ from the rows of I and
//             W_JI from the rows of J; H_IJ = W_IJ + W_JI^T, then dX_I += H_IJ X_J and
//             dX_J += H_IJ^T X_I: 1/2 + 1 GEMM instead of 3, and no dy (the caller adds dy into
//             dx when x and y are one autograd input: the backward op's y_is_x).
// Two GEMM-equivalents instead of four; the exps per pair do not change (q_ij and q_ji differ
// through LSE_i != LSE_j). Memory: two tiles of pair_block^2 entries.
//
// It runs when the row path is the label hot path (cpu_row_paths.h), x and y are the same
// tensor, the columns' labels are the rows', the parameter is one scalar (a per-row temperature
// breaks s_ij = s_ji) and ICON_KERNELS_SYMMETRIC is not "0" (the off switch, read at every
// forward, for benchmarks to time both schedules in one process). The backward follows its
// forward's schedule (recorded in the stats) and also needs y_is_x.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "cpu_label_rows.h"
#include "cpu_problem.h"
#include "cpu_row_paths.h"

namespace icon {
namespace cpu {

// ICON_KERNELS_SYMMETRIC: unset, "" or "1" runs the symmetric schedule where it applies, "0" the
// plain one; anything else is an error (a typo must not silently time the wrong schedule).
inline bool symmetric_schedule_enabled() {
  const char* env = std::getenv("ICON_KERNELS_SYMMETRIC");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(env, "0") == 0, "ICON_KERNELS_SYMMETRIC must be 0 or 1, got '", env, "'");
  return false;
}

// Calls of the symmetric schedule per pass (0 forward, 1 backward) since the last read:
// _C.cpu_symmetric_counts() reads and resets them, so a test sees which schedule ran.
inline std::atomic<int64_t>* symmetric_schedule_counters() {
  static std::atomic<int64_t> counters[2];
  return counters;
}

// Whether pb has the symmetric label schedule's structure: self mode on the label hot path, one
// scalar parameter, the columns' labels the rows'.
template <typename T>
bool symmetric_labels_fit(const Problem<T>& pb) {
  if (!pb.self_pairs || !pb.scalar_param || pb.row_path() != kLabelHotRows || pb.n < 2) return false;
  return pb.labels.data_ptr() == pb.col_labels.data_ptr() || at::equal(pb.labels, pb.col_labels);
}

// Whether the forward of pb runs the symmetric label schedule.
template <typename T>
bool symmetric_labels_apply(const Problem<T>& pb) {
  return symmetric_labels_fit(pb) && symmetric_schedule_enabled();
}

// The symmetric backward is right only after a symmetric forward with the same blocks: it needs
// the very logits of the forward's GEMMs (same tile shapes) and the LSE residuals of stats row 2,
// and has no full-row renormalisation to fall back on. So the forward records its block side in
// stats row 3 (unused for Labels) and the backward follows the record, never the switches as
// they are at backward time (ICON_KERNELS_SYMMETRIC or the tile size may have changed between).
// 0: the forward ran the plain schedule (or the stats are not a symmetric forward's).
template <typename T>
int64_t recorded_pair_block(const T* stats, int64_t n) {
  const double b = double(stats[3 * n]);
  return b >= 1 && b <= double(n) && b == std::floor(b) ? int64_t(b) : 0;
}

// The side of a pair block. A diagonal tile computes its whole B x B Gram for half of it new, so
// the GEMM work is N^2 d (1/2 + B/(2N)): small blocks waste less, large ones run the GEMM faster.
// InfoNCE fwd+bwd on the development VM (d = 128, fp32, seconds, B = 128 / 256 / 512 / 1024):
// N = 2048 0.027 / 0.024 / 0.024 / 0.032; 8192 0.61 / 0.46 / 0.46 / 0.50; 16384 3.06 / 2.16 /
// 2.29 / 2.44. ICON_KERNELS_CPU_TILE_ELEMENTS (entries of two tiles) caps it, down to 1 row, so
// that tests force ragged blocks.
constexpr int64_t kPairBlock = 256;
template <typename T>
int64_t pair_block(const Problem<T>& pb) {
  const int64_t side = std::min<int64_t>(kPairBlock, int64_t(std::sqrt(double(pb.tile) / 2)));
  return std::max<int64_t>(1, std::min(side, pb.n));
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

// The labels' positive counts per row over the valid columns (the rows' own labels: self mode).
inline std::vector<int64_t> positive_counts(const at::Tensor& labels, bool exclude_self) {
  const int64_t n = labels.size(0);
  const int64_t* l = labels.data_ptr<int64_t>();
  std::unordered_map<int64_t, int64_t> count;
  count.reserve(size_t(n));
  for (int64_t i = 0; i < n; ++i) ++count[l[i]];
  std::vector<int64_t> k(n);
  for (int64_t i = 0; i < n; ++i) k[i] = count[l[i]] - (exclude_self ? 1 : 0);
  return k;
}

// Runs body(i0, i1, j0, j1) over the pairs of row blocks I = [i0, i1) <= J = [j0, j1), in order.
template <typename F>
void for_each_pair_block(int64_t n, int64_t block, F&& body) {
  for (int64_t i0 = 0; i0 < n; i0 += block)
    for (int64_t j0 = i0; j0 < n; j0 += block) body(i0, std::min(n, i0 + block), j0, std::min(n, j0 + block));
}

// The column-block view of row i over the columns [col0, col0 + len) as fast_label_backward and
// add_label_segment read it: the block's labels, its length, the row's self column in it or -1
// (alpha and M' stay the whole row's).
template <typename T>
LabelRow label_segment(const Problem<T>& pb, int64_t i, int64_t col0, int64_t len) {
  const int64_t* lab = pb.labels.template data_ptr<int64_t>();
  const int64_t self = pb.exclude_self && i >= col0 && i < col0 + len ? i - col0 : -1;
  return {lab + col0, lab[i], len, self, double(pb.alpha), pb.m_valid};
}

// One tile pair of both passes: the Gram tile X_I X_J^T into buf (ni x nj, dense; the forward and
// the backward make it with the same GEMM, bit for bit), its transpose into t_buf for the rows of
// J (off the diagonal), then row(i, col0, r) for every row of the tile's two sides, split across
// threads: row i over the columns [col0, col0 + r.m), r its label segment, whose entries it reads
// and may overwrite at tile_row(...) (the row side in buf, the column side in t_buf).
template <typename T, typename F>
void for_each_tile_row(const Problem<T>& pb, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& buf,
                       at::Tensor& t_buf, F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  const bool diagonal = i0 == j0;
  at::Tensor tile = dense_tile(buf, ni, nj);
  at::mm_out(tile, pb.x.narrow(0, i0, ni), pb.x.narrow(0, j0, nj).t());
  T* s_p = buf.template data_ptr<T>();
  T* st_p = t_buf.template data_ptr<T>();
  if (!diagonal) transpose_tile<T, false>(s_p, ni, nj, st_p);
  at::parallel_for(0, diagonal ? ni : ni + nj, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const bool row_side = r < ni;
      const int64_t i = row_side ? i0 + r : j0 + (r - ni), col0 = row_side ? j0 : i0;
      row(i, label_segment(pb, i, col0, row_side ? nj : ni), row_side ? s_p + r * nj : st_p + (r - ni) * ni,
          col0);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb);
  auto loss = at::zeros({n}, pb.x.options());
  auto included = at::zeros({n}, pb.x.options().dtype(at::kBool));
  auto stats = at::zeros({4, n}, pb.x.options());
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  std::vector<OnlineLabelRow<T>> acc(n);
  at::Tensor s_buf = at::empty({block, block}, pb.x.options()), st_buf = at::empty({block, block}, pb.x.options());
  for_each_pair_block(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    for_each_tile_row(pb, i0, i1, j0, j1, s_buf, st_buf, [&](int64_t i, const LabelRow& seg, T* row, int64_t col0) {
      with_label_kernel(pb.kernel, [&](auto code) {
        fast_logits<T, decltype(code)::value>(row, x_sq + col0, x_sq[i], prm, seg.m);
      });
      add_label_segment<T>(seg, row, &acc[i]);
    });
  });
  T* loss_p = loss.template data_ptr<T>();
  bool* inc_p = included.template data_ptr<bool>();
  T* st = stats.template data_ptr<T>();
  RowPathTally tally;
  for (int64_t i = 0; i < n; ++i) {
    const double lse = online_lse(acc[i]);
    const T hi = T(lse);
    const LabelSums<T> sums{hi, T(acc[i].sum_s), T(acc[i].pos_s), acc[i].k};
    inc_p[i] = label_row_loss<T>(pb.label_row(i), sums, pb.kl, &loss_p[i]);
    st[i] = hi;
    // row 2 (LSE^p for Affinity targets, free for Labels): the LSE's rounding, for the backward's q
    st[2 * n + i] = std::isfinite(lse) ? T(lse - double(hi)) : T(0);
    st[3 * n + i] = T(block);   // the schedule's record for the backward (recorded_pair_block)
  }
  tally.rows[kLabelHotRows] = n;
  tally.add_to(0);
  symmetric_schedule_counters()[0].fetch_add(1, std::memory_order_relaxed);
  return {loss, included, stats};
}

// stats: the forward's, in T and contiguous; block: the forward's (recorded_pair_block).
template <typename T>
std::vector<at::Tensor> symmetric_label_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                 const at::Tensor& valid, const at::Tensor& stats,
                                                 bool param_grad, int64_t block) {
  const int64_t n = pb.n, d = pb.d;
  const auto opts = pb.x.options();
  auto g_t = at::where(valid, grad_rows.to(opts.dtype()), at::zeros({}, opts)).contiguous();
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const bool dist = is_distance(pb.kernel);
  const std::vector<int64_t> k = positive_counts(pb.labels, pb.exclude_self);
  // dL/dparam's row sums over every column block, centred once per row at the end (centred_sum)
  std::vector<double> dp(param_grad ? n : 0), gs(dp.size()), qb(dp.size()), qs(dp.size());
  auto dx = at::zeros({n, d}, opts), h_sum = at::zeros({n}, opts.dtype(at::kDouble));
  at::Tensor w_buf = at::empty({block, block}, opts), wt_buf = at::empty({block, block}, opts);
  for_each_pair_block(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t ni = i1 - i0, nj = j1 - j0;
    const bool diagonal = i0 == j0;
    // the Gram tile, then W_IJ (and W_JI in wt_buf), then H_IJ in w_buf
    for_each_tile_row(pb, i0, i1, j0, j1, w_buf, wt_buf, [&](int64_t i, const LabelRow& seg, T* row, int64_t col0) {
      if (g[i] == T(0)) {   // left out, or zero upstream gradient: no contribution
        std::fill(row, row + seg.m, T(0));
        return;
      }
      // the logits stored first, as the forward's (fast_label_backward's LOGITS)
      const LabelGradSums sums = with_label_kernel(pb.kernel, [&](auto code) {
        constexpr int K = decltype(code)::value;
        fast_logits<T, K>(row, x_sq + col0, x_sq[i], prm, seg.m);
        return fast_label_backward<T, K, true>(seg, k[i], row, x_sq + col0, x_sq[i], prm, st[i], g[i], st[2 * n + i]);
      });
      if (param_grad) {
        dp[i] += sums.dp;
        gs[i] += sums.g_sum;
        qb[i] += sums.q_basis;
        qs[i] += sums.q_sum;
      }
    });
    at::Tensor h = dense_tile(w_buf, ni, nj);
    T* w_p = w_buf.template data_ptr<T>();
    T* wt_p = wt_buf.template data_ptr<T>();
    // H = W_IJ + W_JI^T (on the diagonal, W_II + W_II^T), then both sides' dX from it
    if (diagonal) dense_tile(wt_buf, ni, nj).copy_(h);   // W_II, whose transpose is added
    transpose_tile<T, true>(wt_p, nj, ni, w_p);
    dx.narrow(0, i0, ni).addmm_(h, pb.x.narrow(0, j0, nj));
    if (!diagonal) dx.narrow(0, j0, nj).addmm_(h.t(), pb.x.narrow(0, i0, ni));
    if (dist) {   // diag(H 1): row sums of H over both of its blocks
      h_sum.narrow(0, i0, ni) += h.sum(1, false, at::kDouble);
      if (!diagonal) h_sum.narrow(0, j0, nj) += h.sum(0, false, at::kDouble);
    }
  });
  if (dist) dx -= h_sum.to(opts.dtype()).unsqueeze(1) * pb.x;
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble));
  if (param_grad) {
    double* dprm_p = dprm.template data_ptr<double>();
    const double scale = pb.kernel == kDot ? fast_param_scale<double, kDot>(prm) : fast_param_scale<double, kGaussian>(prm);
    for (int64_t i = 0; i < n; ++i) dprm_p[i] = scale * centred_sum(dp[i], gs[i], qb[i], qs[i]);
  }
  RowPathTally tally;
  tally.rows[kLabelHotRows] = n;
  tally.add_to(1);
  symmetric_schedule_counters()[1].fetch_add(1, std::memory_order_relaxed);
  return {dx, at::zeros({pb.m, d}, opts), dprm, at::Tensor(), at::Tensor(), at::Tensor()};
}

}  // namespace cpu
}  // namespace icon
