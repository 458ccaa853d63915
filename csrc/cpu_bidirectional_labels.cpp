// Both directions of a rectangular label loss in one pass (DESIGN.md §1.3, "Bidirectional"):
// 1/2 [L(x->y) + L(y->x)] over one S = x y^T (CLIP, CMC), on the label hot path (Labels target,
// beta = 0, KL or cross-entropy, dot or Gaussian kernel with one scalar parameter: cosine arrives
// here as dot on normalised rows). Two separate fused calls pay eight N M d GEMMs for forward +
// backward. Here S is made in strips of rows of x against all of y (one GEMM per strip): x's rows
// take their statistics from their strip, y's rows are the strip's columns, whose statistics are
// merged online over the strips (forward: one GEMM-equivalent); the backward recomputes each
// strip, forms H = W_row + W_col^T in place and adds dX_I = H y, dY += H^T x_I (three): four in
// all, one direction's floor. From cpu_tile_pairs.h it shares the sides (LabelSide), the online
// row statistics, the row finish and the exactness rule (the record in stats row 3), not the
// tile-pair loop.
//
// icon_kernels::cpu_bidirectional_forward returns (rows, included, stats) of x's rows (direction
// x -> y) and then of y's rows (y -> x), each as cpu_forward's for that direction; the stats
// rows are the tile-pair schedule's (LSE, -, its rounding residual, the block side).
// icon_kernels::cpu_bidirectional_backward takes the upstream gradients of both directions' row
// losses and returns (dx, dy, dparam); it runs only after that forward (it reads the record). A
// gradient not needed (need_x_grad, need_y_grad false: a frozen tower) is zeros, without its GEMM.
#include "cpu_bidirectional_labels.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_problem.h"   // tile_elements
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"   // symmetric_schedule_counters
#include "cpu_tile_pairs.h"
#include "op_checks.h"
#include "op_codes.h"

namespace icon {
namespace {

void check_bidirectional_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& param,
                              c10::string_view kernel, const at::Tensor& row_labels, const at::Tensor& col_labels,
                              double alpha, bool exclude_self, int64_t divergence) {
  check::features(x, y);
  const int64_t n = x.size(0), m = y.size(0);
  // (the backward reads row 3 of both stats: an empty side has none)
  TORCH_CHECK(n > 0 && m > 0, "x and y must have at least one row each, got ", n, " and ", m);
  TORCH_CHECK(param.dim() <= 1 && param.numel() == 1,
              "param must hold one value (the kernel's parameter for both directions), got shape ", param.sizes());
  check::floating("param", param);
  check::same_device("param", param, x);
  const int k = kernel_code(kernel);
  TORCH_CHECK(k == kDot || k == kGaussian, "kernel must be dot or gaussian for the bidirectional label ops, got ",
              kernel);
  check::vector("row_labels", row_labels, n, "one label per row of x", x);
  check::vector("col_labels", col_labels, m, "one label per row of y", x);
  TORCH_CHECK(at::isIntegralType(row_labels.scalar_type(), /*includeBool=*/true),
              "row_labels must be an integer tensor, got ", row_labels.scalar_type());
  TORCH_CHECK(at::isIntegralType(col_labels.scalar_type(), /*includeBool=*/true),
              "col_labels must be an integer tensor, got ", col_labels.scalar_type());
  TORCH_CHECK(alpha >= 0 && alpha < 1, "alpha must lie in [0, 1), got ", alpha);
  TORCH_CHECK(!exclude_self || n == m, "exclude_self needs as many rows in y as in x: x has ", n, ", y ", m);
  TORCH_CHECK(divergence == kKl || divergence == kCrossEntropy,
              "divergence must be kl (0) or cross_entropy (1) for the bidirectional label ops, got code ", divergence);
}

void check_side_grads(const char* grad_name, const at::Tensor& grad, const char* valid_name, const at::Tensor& valid,
                      const char* stats_name, const at::Tensor& stats, int64_t rows, const at::Tensor& x) {
  check::vector(grad_name, grad, rows, "the upstream gradient of every row loss of that direction", x);
  check::floating(grad_name, grad);
  check::vector(valid_name, valid, rows, "the forward's included rows of that direction", x);
  TORCH_CHECK(valid.scalar_type() == at::kBool, valid_name, " must be a bool tensor, got ", valid.scalar_type());
  check::matrix(stats_name, stats, 4, rows, "the forward's row statistics of that direction", x);
  check::floating(stats_name, stats);
}

// Rows of x per strip: the strip S_I = x_I y^T (rows x M) is one GEMM. Large strips run the GEMMs
// faster: each strip's three GEMMs pack all of y again, and dY += H^T x_I reads and writes all of dY.
// CLIP (N = M = 8192, d = 128, fp32, forward + backward over the 4-GEMM floor, median of 7
// alternating runs on the development VM): 128 rows 1.42x, 256 1.29x, 512 1.22x, 1024 1.11x. So up
// to kStripRows rows, within kStripBytes (1024 rows at M = 8192, 512 at 16384);
// ICON_KERNELS_CPU_TILE_ELEMENTS (entries) replaces that budget, down to one row, so that tests force
// ragged strips.
constexpr int64_t kStripRows = 1024;
constexpr int64_t kStripBytes = int64_t(32) << 20;
// Columns per task of the column loops (their per-column state stays in L1).
constexpr int64_t kColumnChunk = 256;

// Both sides' labels as int32 codes, equal exactly where the labels are: the element loops compare
// them, one AVX2 instruction per 8 lanes where int64 takes two and a pack. Labels within int32's
// range are their own codes; others are numbered through unique (both sides at once).
std::pair<at::Tensor, at::Tensor> int32_label_codes(const at::Tensor& row_labels, const at::Tensor& col_labels) {
  const int64_t n = row_labels.numel();
  at::Tensor both = at::cat({row_labels.reshape({-1}).to(at::kLong), col_labels.reshape({-1}).to(at::kLong)});
  const auto range = at::aminmax(both);
  if (std::get<0>(range).item<int64_t>() < std::numeric_limits<int32_t>::min() ||
      std::get<1>(range).item<int64_t>() > std::numeric_limits<int32_t>::max())
    both = std::get<1>(at::_unique(both, /*sorted=*/false, /*return_inverse=*/true));
  both = both.to(at::kInt);
  return {both.narrow(0, 0, n).contiguous(), both.narrow(0, n, both.size(0) - n).contiguous()};
}

// The op's arguments in the accumulation type T: features, norms, labels, the kernel.
template <typename T>
struct Bidirectional {
  at::Tensor x, y, x_sq, y_sq, labels, col_labels;
  at::Tensor codes, col_codes;   // the labels as int32_label_codes, for the element loops
  int64_t n, m, d;
  int kernel;
  T prm;
  double alpha;
  bool exclude_self, kl;

  Bidirectional(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& param, c10::string_view k,
                const at::Tensor& row_labels, const at::Tensor& col_lab, double alpha_, bool excl,
                int64_t divergence)
      : n(x_in.size(0)), m(y_in.size(0)), d(x_in.size(1)), kernel(kernel_code(k)), alpha(alpha_),
        exclude_self(excl), kl(divergence == kKl) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    x = x_in.to(acc).contiguous();
    y = y_in.to(acc).contiguous();
    x_sq = is_distance(kernel) ? x.square().sum(1) : at::zeros({n}, x.options());
    y_sq = is_distance(kernel) ? y.square().sum(1) : at::zeros({m}, y.options());
    labels = row_labels.to(at::kLong).contiguous();
    col_labels = col_lab.to(at::kLong).contiguous();
    std::tie(codes, col_codes) = int32_label_codes(labels, col_labels);
    prm = param.to(acc).reshape({}).template item<T>();
  }
  // the sides as cpu_tile_pairs.h reads them: x's rows over y's, y's over x's
  cpu::LabelSide<T> side(int s) const {
    const int64_t self = exclude_self ? 1 : 0;
    const int64_t *lr = labels.data_ptr<int64_t>(), *lc = col_labels.data_ptr<int64_t>();
    if (s == 0) return {x, x_sq.template data_ptr<T>(), lr, lc, m - self, alpha, exclude_self};
    return {y, y_sq.template data_ptr<T>(), lc, lr, n - self, alpha, exclude_self};
  }
  int64_t strip_rows() const {
    const int64_t entries = cpu::tile_elements(kStripBytes / int64_t(sizeof(T)));
    return std::max<int64_t>(1, std::min({kStripRows, entries / std::max<int64_t>(m, 1), n}));
  }
  // Row i's logits in place of its Gram entries: one out-of-line function for the forward (which
  // takes each row's logits right before its statistics, while the row is in cache) and the
  // backward (strip_logits), so that both passes compute them bit for bit.
  __attribute__((noipa)) void row_logits(T* row, int64_t i) const {
    const T* ysq = y_sq.template data_ptr<T>();
    const T* xsq = x_sq.template data_ptr<T>();
    cpu::with_label_kernel(kernel, [&](auto code) { fast_logits<T, decltype(code)::value>(row, ysq, xsq[i], prm, m); });
  }
  void strip_logits(T* s, int64_t i0, int64_t ni) const {
    at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_logits(s + r * m, i0 + r);
    });
  }
  // x's row i over all of y as the forward's row statistics read it (int32 label codes)
  LabelRowOf<int32_t> x_row(int64_t i) const {
    const int32_t* code = codes.data_ptr<int32_t>();
    return {col_codes.data_ptr<int32_t>(), code[i], m, exclude_self ? i : -1, alpha, m - (exclude_self ? 1 : 0)};
  }
  // The strip's Gram entries x_I y^T (rows x M, in buf); strip() then makes them logits.
  at::Tensor strip_gram(at::Tensor& buf, int64_t i0, int64_t ni) const {
    at::Tensor tile = cpu::dense_tile(buf, ni, m);
    at::mm_out(tile, x.narrow(0, i0, ni), y.t());
    return tile;
  }
  at::Tensor strip(at::Tensor& buf, int64_t i0, int64_t ni) const {
    at::Tensor tile = strip_gram(buf, i0, ni);
    strip_logits(buf.template data_ptr<T>(), i0, ni);
    return tile;
  }
};

void tally_rows(int pass, int64_t rows) {
  RowPathTally tally;
  tally.rows[kLabelHotRows] = rows;
  tally.add_to(pass);
  cpu::symmetric_schedule_counters()[2 + pass].fetch_add(1, std::memory_order_relaxed);
}

// One strip row's entries in the columns [j0, j1) of a chunk (c: the chunk's column labels, top:
// its shifts) into the chunk's block sums. The row's self column is left out of the span by the
// caller (no index compare per lane).
template <typename T>
inline void add_column_span(const T* row, const int32_t* c, int32_t label, const T* top, int64_t j0, int64_t j1,
                            T* bse, T* bs, T* bp, T* bk) {
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const bool hit = c[j] == label;
    bse[j] += vexp(row[j] - top[j]);
    bs[j] += row[j];
    bp[j] += hit ? row[j] : T(0);
    bk[j] += hit ? T(1) : T(0);
  }
}

// y's rows (the strips' columns) merged over the strips online, per column: the running max, the
// sum of exps under it, the sums of s over valid entries and over positives, the positive count.
template <typename T>
struct ColumnStats {
  std::vector<T> mx;
  std::vector<double> se, sum_s, pos_s;
  std::vector<int64_t> k;
  explicit ColumnStats(int64_t m)
      : mx(size_t(m), -std::numeric_limits<T>::infinity()), se(size_t(m)), sum_s(size_t(m)), pos_s(size_t(m)),
        k(size_t(m)) {}

  // The strip's rows [i0, i0 + ni) (logits s, self entries -inf already) into the columns [c0, c1).
  void add(const Bidirectional<T>& b, const T* s, int64_t i0, int64_t ni, int64_t c0, int64_t c1) {
    const T inf = std::numeric_limits<T>::infinity();
    const int64_t w = c1 - c0, m = b.m;
    const int32_t *lr = b.codes.template data_ptr<int32_t>(), *lc = b.col_codes.template data_ptr<int32_t>() + c0;
    T top[kColumnChunk];
    for (int64_t j = 0; j < w; ++j) top[j] = -inf;
    for (int64_t r = 0; r < ni; ++r) {   // the strip's column max (NaN passed over, as row_max)
      const T* row = s + r * m + c0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) top[j] = row[j] > top[j] ? row[j] : top[j];
    }
    for (int64_t j = 0; j < w; ++j) {   // the running max grows: rescale the sum under it
      const int64_t c = c0 + j;
      if (top[j] > mx[c]) {
        se[c] *= std::exp(double(mx[c]) - double(top[j]));
        mx[c] = top[j];
      }
      // no finite logit yet in the column: every entry is -inf (or NaN), and exp(s - 0) adds 0
      // (or NaN), where exp(-inf - -inf) would be NaN
      top[j] = mx[c] == -inf ? T(0) : mx[c];
    }
    // the sums over kSumBlock rows at a time in T, those in double (cpu_label_rows.h); a count in
    // T is exact
    T bse[kColumnChunk], bs[kColumnChunk], bp[kColumnChunk], bk[kColumnChunk];
    for (int64_t rb = 0; rb < ni; rb += kSumBlock) {
      for (int64_t j = 0; j < w; ++j) bse[j] = bs[j] = bp[j] = bk[j] = T(0);
      for (int64_t r = rb; r < std::min(ni, rb + kSumBlock); ++r) {
        const T* row = s + r * m + c0;
        const int64_t i = i0 + r, self = b.exclude_self ? i - c0 : -1;
        if (self >= 0 && self < w) {   // the self entry (-inf, no pair) adds nothing
          add_column_span(row, lc, lr[i], top, 0, self, bse, bs, bp, bk);
          add_column_span(row, lc, lr[i], top, self + 1, w, bse, bs, bp, bk);
        } else {
          add_column_span(row, lc, lr[i], top, 0, w, bse, bs, bp, bk);
        }
      }
      for (int64_t j = 0; j < w; ++j) {
        const int64_t c = c0 + j;
        se[c] += bse[j];
        sum_s[c] += bs[j];
        pos_s[c] += bp[j];
        k[c] += int64_t(bk[j]);
      }
    }
  }

  std::vector<cpu::OnlineLabelRow<T>> rows() const {
    std::vector<cpu::OnlineLabelRow<T>> out(mx.size());
    for (size_t c = 0; c < mx.size(); ++c) out[c] = {mx[c], se[c], sum_s[c], pos_s[c], k[c]};
    return out;
  }
};

// Runs f(c0, c1) over the column chunks of [0, m), split across threads.
template <typename F>
void for_each_column_chunk(int64_t m, F&& f) {
  at::parallel_for(0, (m + kColumnChunk - 1) / kColumnChunk, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) f(k * kColumnChunk, std::min(m, (k + 1) * kColumnChunk));
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const Bidirectional<T>& b) {
  const int64_t n = b.n, m = b.m, rows = b.strip_rows();
  const cpu::LabelSide<T> xs = b.side(0);
  std::vector<cpu::OnlineLabelRow<T>> x_acc{size_t(n)};
  ColumnStats<T> cols(m);
  at::Tensor buf = at::empty({rows, m}, b.x.options());
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t ni = std::min(rows, n - i0);
    b.strip_gram(buf, i0, ni);
    T* s = buf.template data_ptr<T>();
    // x's rows, every column at once: each row's logits, then its statistics while it is in cache
    // (the strip, 32 MiB at M = 8192, is far larger than L2: a separate logits pass read it once more)
    at::parallel_for(0, ni, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        b.row_logits(s + r * m, i0 + r);
        cpu::add_label_segment<T>(b.x_row(i0 + r), s + r * m, &x_acc[i0 + r]);
      }
    });
    for_each_column_chunk(m, [&](int64_t c0, int64_t c1) { cols.add(b, s, i0, ni, c0, c1); });
  }
  auto [rows_x, inc_x, st_x] = cpu::finish_label_side(xs, x_acc, b.kl, rows);
  auto [rows_y, inc_y, st_y] = cpu::finish_label_side(b.side(1), cols.rows(), b.kl, rows);
  tally_rows(0, n + m);
  return {rows_x, inc_x, st_x, rows_y, inc_y, st_y};
}

// One direction's per-row constants of the backward, in T: upstream gradient (0 where left out),
// LSE with its residual, the shift of dL/dparam's basis, a positive's weight (1 - alpha) / K and
// the uniform part alpha / M'.
template <typename T>
struct DirectionRows {
  std::vector<T> g, lse, lo, shift, pos;
  T uniform;
  DirectionRows(const cpu::LabelSide<T>& side, int64_t n_cols, const at::Tensor& g_t, const at::Tensor& stats) {
    const int64_t n = side.size();
    const T* gp = g_t.template data_ptr<T>();
    const T* st = stats.template data_ptr<T>();
    const std::vector<int64_t> k = side.positive_counts(n_cols);
    g.assign(gp, gp + n);
    lse.assign(st, st + n);
    lo.assign(st + 2 * n, st + 3 * n);
    shift.resize(size_t(n));
    pos.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      shift[i] = lse[i] == -std::numeric_limits<T>::infinity() ? T(0) : lse[i];
      pos[i] = k[i] > 0 ? T((1 - side.alpha) / double(k[i])) : T(0);
    }
    uniform = T(side.alpha / double(std::max<int64_t>(side.m_valid, 1)));
  }
};

// dL/dparam's sums of one row (or column): G (s - shift), G, q (s - shift), q (centred_sum).
struct ParamSums {
  std::vector<double> dp, gs, qb, qs;
  explicit ParamSums(int64_t n) : dp(size_t(n)), gs(size_t(n)), qb(size_t(n)), qs(size_t(n)) {}
  double centred(int64_t i) const { return centred_sum(dp[i], gs[i], qb[i], qs[i]); }
};

// What the backward's element loop reads of x's row i (direction x -> y) and of a chunk of y's rows
// (the columns, direction y -> x), and where it adds the columns' sums for dL/dparam.
template <typename T>
struct HRow {
  T g, lse, lo, shift, pos, uniform;
  int32_t label;   // (its int32_label_codes code)
  int64_t self;    // the row's self column in the chunk, or -1
};
template <typename T>
struct HColumns {
  const T *g, *lse, *lo, *shift, *pos;
  T uniform;
  const int32_t* labels;
  T *dp, *gs, *qb, *qs;
};

// h_row over the columns [j0, j1), all valid pairs (VALID) or the row's self entry (no pair: H is
// the same formula with q = p = 0, so that a NaN or infinite g shows as in the other entries).
// Adds the row's sums for dL/dparam into sums[0..4) and the columns' into c's arrays.
template <typename T, bool PARAM, bool VALID>
inline void h_span(const HRow<T>& x, const HColumns<T>& c, T* row, int64_t j0, int64_t j1, T w_scale, T* sums) {
  T dp = 0, gs = 0, qb = 0, qs = 0;
#pragma omp simd reduction(+ : dp, gs, qb, qs)
  for (int64_t j = j0; j < j1; ++j) {
    const T sv = row[j];
    const bool hit = c.labels[j] == x.label;
    const T q1 = VALID ? vexp((sv - x.lse) - x.lo) : T(0);
    const T p1 = VALID ? (hit ? x.pos : T(0)) + x.uniform : T(0);
    const T q2 = VALID ? vexp((sv - c.lse[j]) - c.lo[j]) : T(0);
    const T p2 = VALID ? (hit ? c.pos[j] : T(0)) + c.uniform : T(0);
    // a row left out (g = 0) adds nothing, also where its q is NaN
    const T gr1 = x.g == T(0) ? T(0) : x.g * (q1 - p1);
    const T gr2 = c.g[j] == T(0) ? T(0) : c.g[j] * (q2 - p2);
    row[j] = (gr1 + gr2) * w_scale;
    if constexpr (PARAM) {
      // a select, not a clamped basis: G is nonzero where q = 0 (a positive), and s = -inf there
      // must give an infinite dL/dparam (cpu_label_rows.h)
      const T b1 = sv - x.shift, b2 = sv - c.shift[j];
      dp += gr1 == T(0) ? T(0) : gr1 * b1;
      gs += gr1;
      qb += q1 == T(0) ? T(0) : q1 * b1;
      qs += q1;
      c.dp[j] += gr2 == T(0) ? T(0) : gr2 * b2;
      c.gs[j] += gr2;
      c.qb[j] += q2 == T(0) ? T(0) : q2 * b2;
      c.qs[j] += q2;
    }
  }
  if constexpr (PARAM) {
    sums[0] += dp; sums[1] += gs; sums[2] += qb; sums[3] += qs;
  }
}

// Row r of a strip over one column chunk: H_ij = (G_ij + G'_ji) w_scale in place of s_ij, G from
// x's row i (q under LSE_i), G' from y's row j (q' under LSE'_j), both off the same logit. PARAM:
// the row's sums for dL/dparam into out[0..4), the columns' added into c's arrays. The self entry
// is its own span, so that the element loops test no index.
template <typename T, bool PARAM>
inline void h_row(const HRow<T>& x, const HColumns<T>& c, T* row, int64_t w, T w_scale, double* out) {
  T sums[4] = {0, 0, 0, 0};
  if (x.self >= 0 && x.self < w) {
    h_span<T, PARAM, true>(x, c, row, 0, x.self, w_scale, sums);
    h_span<T, PARAM, false>(x, c, row, x.self, x.self + 1, w_scale, sums);
    h_span<T, PARAM, true>(x, c, row, x.self + 1, w, w_scale, sums);
  } else {
    h_span<T, PARAM, true>(x, c, row, 0, w, w_scale, sums);
  }
  if constexpr (PARAM) {
    out[0] = sums[0]; out[1] = sums[1]; out[2] = sums[2]; out[3] = sums[3];
  }
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Bidirectional<T>& b, const at::Tensor& grad_x, const at::Tensor& grad_y,
                                      const at::Tensor& valid_x, const at::Tensor& stats_x,
                                      const at::Tensor& valid_y, const at::Tensor& stats_y, bool param_grad,
                                      bool x_grad, bool y_grad) {
  const int64_t n = b.n, m = b.m;
  const auto opts = b.x.options();
  const at::Tensor st_x = stats_x.to(opts.dtype()).contiguous(), st_y = stats_y.to(opts.dtype()).contiguous();
  const int64_t rows = cpu::recorded_pair_block(st_x.template data_ptr<T>(), n, n);
  TORCH_CHECK(rows > 0 && cpu::recorded_pair_block(st_y.template data_ptr<T>(), m, n) == rows,
              "stats_x and stats_y must be the statistics of one icon_kernels::cpu_bidirectional_forward call "
              "(row 3 records its strip rows)");
  const DirectionRows<T> rx(b.side(0), m, cpu::masked_grads(grad_x, valid_x, opts), st_x);
  const DirectionRows<T> ry(b.side(1), n, cpu::masked_grads(grad_y, valid_y, opts), st_y);
  const T inv = T(1) / b.prm, w_scale = b.kernel == kDot ? inv : inv * inv;
  const int64_t chunks = (m + kColumnChunk - 1) / kColumnChunk;
  ParamSums px(param_grad ? n : 0), py(param_grad ? m : 0);
  // x's rows' partial sums per column chunk (each chunk's task writes its own), added up per strip
  std::vector<double> part(param_grad ? size_t(4 * rows * chunks) : 0);
  const int32_t* lr = b.codes.template data_ptr<int32_t>();
  const int32_t* lc = b.col_codes.template data_ptr<int32_t>();
  // a gradient nobody needs (a frozen tower) is zeros, and its GEMM is skipped
  auto dx = x_grad ? at::empty({n, b.d}, opts) : at::zeros({n, b.d}, opts), dy = at::zeros({m, b.d}, opts);
  auto h_cols = at::zeros({m}, opts.dtype(at::kDouble));
  const bool dist = is_distance(b.kernel);
  at::Tensor buf = at::empty({rows, m}, opts);
  for (int64_t i0 = 0; i0 < n; i0 += rows) {
    const int64_t ni = std::min(rows, n - i0);
    at::Tensor h = b.strip(buf, i0, ni);
    T* s = buf.template data_ptr<T>();
    // H in place of the strip's logits (h_row)
    for_each_column_chunk(m, [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0, chunk = c0 / kColumnChunk;
      // the columns' sums for dL/dparam over kSumBlock rows at a time in T, those in double
      T cdp[kColumnChunk], cgs[kColumnChunk], cqb[kColumnChunk], cqs[kColumnChunk];
      const HColumns<T> cols{ry.g.data() + c0, ry.lse.data() + c0, ry.lo.data() + c0, ry.shift.data() + c0,
                             ry.pos.data() + c0, ry.uniform, lc + c0, cdp, cgs, cqb, cqs};
      for (int64_t rb = 0; rb < ni; rb += kSumBlock) {
        if (param_grad)
          for (int64_t j = 0; j < w; ++j) cdp[j] = cgs[j] = cqb[j] = cqs[j] = T(0);
        for (int64_t r = rb; r < std::min(ni, rb + kSumBlock); ++r) {
          const int64_t i = i0 + r;
          const HRow<T> x_row{rx.g[i], rx.lse[i], rx.lo[i], rx.shift[i], rx.pos[i], rx.uniform, lr[i],
                              b.exclude_self ? i - c0 : -1};
          double* pr = param_grad ? part.data() + 4 * (r * chunks + chunk) : nullptr;
          if (param_grad) h_row<T, true>(x_row, cols, s + r * m + c0, w, w_scale, pr);
          else h_row<T, false>(x_row, cols, s + r * m + c0, w, w_scale, pr);
        }
        if (param_grad)
          for (int64_t j = 0; j < w; ++j) {
            py.dp[c0 + j] += cdp[j]; py.gs[c0 + j] += cgs[j]; py.qb[c0 + j] += cqb[j]; py.qs[c0 + j] += cqs[j];
          }
      }
    });
    if (param_grad)
      for (int64_t r = 0; r < ni; ++r)
        for (int64_t c = 0; c < chunks; ++c) {
          const double* pr = part.data() + 4 * (r * chunks + c);
          px.dp[i0 + r] += pr[0]; px.gs[i0 + r] += pr[1]; px.qb[i0 + r] += pr[2]; px.qs[i0 + r] += pr[3];
        }
    if (x_grad) {
      at::Tensor dx_i = dx.narrow(0, i0, ni);
      at::mm_out(dx_i, h, b.y);                    // the strip's rows see every column: dX_I = H Y
      if (dist) dx_i -= h.sum(1, false, at::kDouble).to(opts.dtype()).unsqueeze(1) * b.x.narrow(0, i0, ni);
    }
    if (y_grad) {
      dy.addmm_(h.t(), b.x.narrow(0, i0, ni));      // dY += H^T X_I
      if (dist) h_cols += h.sum(0, false, at::kDouble);
    }
  }
  // (distance kernels: minus diag(H 1) X above, diag(H^T 1) Y here)
  if (dist && y_grad) dy -= h_cols.to(opts.dtype()).unsqueeze(1) * b.y;
  double dprm = 0;
  if (param_grad) {
    const double scale = b.kernel == kDot ? fast_param_scale<double, kDot>(b.prm)
                                          : fast_param_scale<double, kGaussian>(b.prm);
    for (int64_t i = 0; i < n; ++i) dprm += scale * px.centred(i);
    for (int64_t j = 0; j < m; ++j) dprm += scale * py.centred(j);
  }
  tally_rows(1, n + m);
  return {dx, dy, at::scalar_tensor(dprm, opts.dtype(at::kDouble))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& param, c10::string_view kernel,
    const at::Tensor& row_labels, const at::Tensor& col_labels, double alpha, bool exclude_self, int64_t divergence) {
  const NoAutocast no_autocast;
  check_bidirectional_args(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence);
  if (x.scalar_type() == at::kDouble)
    return forward_impl(Bidirectional<double>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                              divergence));
  return forward_impl(Bidirectional<float>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                           divergence));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_backward(
    const at::Tensor& grad_x_rows, const at::Tensor& grad_y_rows, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& param, c10::string_view kernel, const at::Tensor& row_labels, const at::Tensor& col_labels,
    double alpha, bool exclude_self, int64_t divergence, const at::Tensor& valid_x, const at::Tensor& stats_x,
    const at::Tensor& valid_y, const at::Tensor& stats_y, bool need_param_grad, bool need_x_grad, bool need_y_grad) {
  const NoAutocast no_autocast;
  check_bidirectional_args(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence);
  check_side_grads("grad_x_rows", grad_x_rows, "valid_x", valid_x, "stats_x", stats_x, x.size(0), x);
  check_side_grads("grad_y_rows", grad_y_rows, "valid_y", valid_y, "stats_y", stats_y, y.size(0), x);
  const std::vector<at::Tensor> g = x.scalar_type() == at::kDouble
      ? backward_impl(Bidirectional<double>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                            divergence),
                      grad_x_rows, grad_y_rows, valid_x, stats_x, valid_y, stats_y, need_param_grad, need_x_grad,
                      need_y_grad)
      : backward_impl(Bidirectional<float>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                           divergence),
                      grad_x_rows, grad_y_rows, valid_x, stats_x, valid_y, stats_y, need_param_grad, need_x_grad,
                      need_y_grad);
  return {g[0].to(x.scalar_type()), g[1].to(y.scalar_type()), g[2].reshape(param.sizes()).to(param.scalar_type())};
}

}  // namespace icon
