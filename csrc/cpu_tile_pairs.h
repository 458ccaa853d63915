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

// A record in stats row 3 of a schedule that keeps a row statistic hi (rounded to T) with its
// rounding residual and has no row free for the residual: 8 * block + the residual in units of the
// last place of hi (|r| <= 1/2; in float32 beside a block of 256, 12 bits of it survive). The
// symmetric Affinity schedule records LSE^p so (cpu_symmetric_affinity.h), the symmetric label
// family schedule the LSE (cpu_symmetric_label_family.h).
template <typename T>
T last_place(T hi) {
  const T a = std::fabs(hi);
  return std::nextafter(a, std::numeric_limits<T>::infinity()) - a;
}

template <typename T>
T pair_record(int64_t block, double wide, T hi) {
  const double r = std::isfinite(wide) ? (wide - double(hi)) / double(last_place(hi)) : 0.0;
  return T(8.0 * double(block) + r);
}

// The block side recorded in v, or 0 (not such a forward's stats); *r_out its residual unit count.
template <typename T>
int64_t decode_pair_record(T v, int64_t limit, double* r_out) {
  const double b = std::nearbyint(double(v) / 8.0), r = double(v) - 8.0 * b;
  if (!(b >= 1 && b <= double(limit) && std::fabs(r) <= 1.0)) return 0;
  *r_out = r;
  return int64_t(b);
}

// The block side that every row of stats (T, contiguous, n rows) records in row 3, with the
// residual of each row's statistic in row hi_row into lo; 0 when some row records none or another
// block (not such a forward's stats: the plain backward runs then).
template <typename T>
int64_t recorded_pair_residuals(const T* st, int64_t n, int hi_row, std::vector<T>* lo) {
  lo->assign(size_t(n), T(0));
  int64_t block = 0;
  for (int64_t i = 0; i < n; ++i) {
    double r = 0;
    const int64_t b = decode_pair_record<T>(st[3 * n + i], n, &r);
    if (b == 0 || (block != 0 && b != block)) return 0;
    block = b;
    const T hi = st[hi_row * n + i];
    (*lo)[i] = std::isfinite(hi) ? T(r * double(last_place(hi))) : T(0);
  }
  return block;
}

// Column sums of one or two ni x nj tiles a and b (row-major; b may be nullptr) into col_a and
// col_b: each thread a range of columns over every row (sums in T over at most a block of rows,
// then in double).
template <typename T>
void add_column_sums(const T* a, const T* b, int64_t ni, int64_t nj, double* col_a, double* col_b) {
  at::parallel_for(0, nj, 64, [&](int64_t c0, int64_t c1) {
    const int64_t len = c1 - c0;
    std::vector<T> sa(static_cast<size_t>(len), T(0)), sb(b != nullptr ? sa.size() : 0, T(0));
    T* va = sa.data();
    T* vb = sb.data();
    for (int64_t r = 0; r < ni; ++r) {
      const T* ar = a + r * nj + c0;
      if (b == nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) va[j] += ar[j];
        continue;
      }
      const T* br = b + r * nj + c0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        va[j] += ar[j];
        vb[j] += br[j];
      }
    }
    for (int64_t j = 0; j < len; ++j) col_a[c0 + j] += double(va[j]);
    if (b != nullptr)
      for (int64_t j = 0; j < len; ++j) col_b[c0 + j] += double(vb[j]);
  });
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
template <typename T, typename L>
void add_label_segment(const LabelRowOf<L>& seg, T* s, OnlineLabelRow<T>* acc) {
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

// add_label_segment without the label sums, for a row whose loss takes its pairs under the LSE
// (cpu_symmetric_label_family.h): the running max and sum of exps. A NaN logit makes the sum NaN,
// also in a block without a finite logit. seg: any row segment with m and self (a LabelRow, or a
// Dense or Neighbors row's ColumnSpan).
template <typename T, typename Seg>
void add_lse_segment(const Seg& seg, T* s, OnlineLabelRow<T>* acc) {
  const T inf = std::numeric_limits<T>::infinity();
  if (seg.self >= 0) s[seg.self] = -inf;
  const T mx = row_max(s, seg.m);
  if (mx > acc->mx) {
    acc->se *= std::exp(double(acc->mx) - double(mx));
    acc->mx = mx;
  }
  if (acc->mx == -inf) {   // no finite logit yet (row_max passes NaN over): keep a NaN
    for (int64_t j = 0; j < seg.m; ++j)
      if (std::isnan(s[j])) acc->se = acc->sum_s = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  acc->se += blocked_exp_sum(s, seg.m, acc->mx);
}

// add_lse_segment for a row of weights w = exp(s) in (0, 1] (a Cauchy kernel's 1 / (1 + d^2)):
// their sum under the fixed max 0, so that online_lse is log sum_j w, with no max pass and no exp.
// w[self] becomes 0; a NaN weight makes the sum NaN, a row of zeros gives -inf.
template <typename T, typename Seg>
void add_weight_segment(const Seg& seg, T* w, OnlineLabelRow<T>* acc) {
  if (seg.self >= 0) w[seg.self] = T(0);
  acc->mx = T(0);
  double sum = 0;
  for (int64_t j0 = 0; j0 < seg.m; j0 += kSumBlock) {
    const int64_t j1 = std::min(seg.m, j0 + kSumBlock);
    T block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = j0; j < j1; ++j) block += w[j];
    sum += block;
  }
  acc->se += sum;
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

// The Gram tile A_I A_J^T of a pair of row blocks into buf (ni x nj, dense; every pass makes it
// with the same GEMM call, bit for bit). Off the diagonal, its transpose into *t_buf for the rows of
// J (when t_buf is given). On the diagonal, its upper triangle mirrored onto its lower one (the
// pairs (i, j) and (j, i) one value) and, for a distance kernel (sq: the rows' squared norms, else
// nullptr), the self pairs made exact: the Gram entry |a_i|^2 itself, so that d_ii^2 = 0 (from
// a_i . a_i it is rounding noise, which the power kernel's log(d^2 + eps) makes 1e-3 of a row's
// loss).
template <typename T>
void pair_gram(const at::Tensor& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const T* sq, at::Tensor& buf,
               at::Tensor* t_buf = nullptr) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  at::Tensor tile = dense_tile(buf, ni, nj);
  at::mm_out(tile, a.narrow(0, i0, ni), a.narrow(0, j0, nj).t());
  T* p = buf.template data_ptr<T>();
  if (i0 != j0) {
    if (t_buf != nullptr) transpose_tile<T, false>(p, ni, nj, t_buf->template data_ptr<T>());
    return;
  }
  at::parallel_for(0, ni, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < r; ++c) p[r * ni + c] = p[c * ni + r];
      if (sq != nullptr) p[r * ni + r] = sq[i0 + r];
    }
  });
}

// Row r of a tile pair's rows: side s (0: a row of I over the columns J, in the tile; 1: a row
// of J over the columns I, in its transpose), its index k in its block, row i = (i0 or j0) + k,
// the columns [col0, col0 + len), and its entries at offset in its buffer (buf for side 0, t_buf
// for side 1). Off the diagonal the sides alternate (I's row 0, J's row 0, I's row 1, ...; the
// longer side's rest last), so that each thread's contiguous range of r holds as many rows of
// each side: a row of J that gathers its entries from the tile's columns costs more than a row
// of I, and with I's rows first one thread took all of them (tsne-tv at N = 4096: 12% of the
// time was OpenMP threads waiting at the end of a row loop).
struct SideRow {
  int s;
  int64_t k, i, col0, len, offset;
};

inline SideRow side_row(int64_t r, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
  int s = 0;
  int64_t k = r;
  if (i0 != j0) {
    const int64_t both = 2 * std::min(ni, nj);
    s = r < both ? int(r & 1) : (ni > nj ? 0 : 1);
    k = r < both ? r >> 1 : both / 2 + (r - both);
  }
  return s == 0 ? SideRow{0, k, i0 + k, j0, nj, k * nj} : SideRow{1, k, j0 + k, i0, ni, k * ni};
}

// The rows a tile pair's row loop runs: both sides, or one on a diagonal tile.
inline int64_t tile_pair_rows(int64_t i0, int64_t ni, int64_t j0, int64_t nj) { return i0 == j0 ? ni : ni + nj; }

// One tile pair of both passes: the Gram tile and its transpose (pair_gram), the logits of every
// row of both sides (s in place), then row(s, i, seg, logits) for each, split across threads: row
// i of side s (0: I, 1: J) over the columns [col0, col0 + seg.m), seg its label segment, logits
// its entries, which it may overwrite (in buf for side 0, in t_buf for side 1).
template <typename T, typename F>
void for_each_tile_row(const TilePair<T>& tp, int64_t i0, int64_t i1, int64_t j0, int64_t j1, at::Tensor& buf,
                       at::Tensor& t_buf, F&& row) {
  const int64_t ni = i1 - i0, nj = j1 - j0;
  pair_gram<T>(tp.side.rows, i0, i1, j0, j1, is_distance(tp.kernel) ? tp.side.sq : nullptr, buf, &t_buf);
  T* s_p = buf.template data_ptr<T>();
  T* st_p = t_buf.template data_ptr<T>();
  at::parallel_for(0, tile_pair_rows(i0, ni, j0, nj), 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const SideRow sr = side_row(r, i0, ni, j0, nj);
      const LabelSide<T>& own = tp.side;
      T* logits = (sr.s == 0 ? s_p : st_p) + sr.offset;
      // the logits stored once, and read as stored (the exactness note above)
      with_label_kernel(tp.kernel, [&](auto code) {
        fast_logits<T, decltype(code)::value>(logits, own.sq + sr.col0, own.sq[sr.i], tp.prm, sr.len);
      });
      row(sr.s, sr.i, own.segment(sr.i, sr.col0, sr.len), logits);
    }
  });
}

// A tile pair's backward from W_IJ (in w_buf, the rows of I) and W_JI (in wt_buf, the rows of J;
// on a diagonal tile w_buf alone holds W_II): H_IJ = W_IJ + W_JI^T in w_buf (on the diagonal
// W_II + W_II^T), then dfeat_I += H_IJ A_J, dfeat_J += H_IJ^T A_I and, for a distance kernel,
// diag(H 1) of both sides into h_sum (double; the caller takes h_sum * A off at the end).
template <typename T>
void add_h_tile(const at::Tensor& rows, int64_t i0, int64_t ni, int64_t j0, int64_t nj, at::Tensor& w_buf,
                at::Tensor& wt_buf, bool dist, at::Tensor& dfeat, at::Tensor& h_sum) {
  const bool one_side = i0 == j0;
  at::Tensor h = dense_tile(w_buf, ni, nj);
  if (one_side) dense_tile(wt_buf, ni, nj).copy_(h);   // W_II, whose transpose is added
  transpose_tile<T, true>(wt_buf.template data_ptr<T>(), nj, ni, w_buf.template data_ptr<T>());
  dfeat.narrow(0, i0, ni).addmm_(h, rows.narrow(0, j0, nj));
  if (!one_side) dfeat.narrow(0, j0, nj).addmm_(h.t(), rows.narrow(0, i0, ni));
  if (dist) {   // diag(H 1) of both sides: H's row sums and column sums
    h_sum.narrow(0, i0, ni) += h.sum(1, false, at::kDouble);
    if (!one_side) h_sum.narrow(0, j0, nj) += h.sum(0, false, at::kDouble);
  }
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
    add_h_tile<T>(tp.side.rows, i0, ni, j0, nj, w_buf, wt_buf, dist, o.dfeat, o.h_sum);
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
