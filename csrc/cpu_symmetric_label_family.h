// The symmetric schedule (DESIGN.md §1.3) for the Labels targets on the family rows
// (cpu_row_paths.h), in self mode: debiased InfoNCE / SupCon (beta > 0), the f-divergences off
// their closed forms (alpha or beta > 0, or a kernel other than dot and Gaussian) and the kernels
// the hot path lacks (Student-t: t-SimCLR; power); and for Dense and Neighbors targets (the kNN
// graph) in self mode, every divergence, alpha and beta. Each pair of row blocks I <= J is one Gram
// tile S_IJ = X_I X_J^T, read by the rows of I and, column by column, by the rows of J
// (for_each_family_row; the pair loop and H of cpu_tile_pairs.h). Each row reads its own target
// over the other block (cpu_target_segments.h: the one place that tells the targets apart), so the
// sweeps below are one code for the three targets.
//
// A row's loss here needs its LSE before its pairs (log q~ is the log of a mixture, an
// f-divergence's terms take q), so the forward sweeps the tile pairs twice:
//   pass 1   each row's LSE merged online over its column blocks (add_lse_segment);
//   pass 2   each row's divergence sums under it, block by block (f_row of cpu_f_rows.h: the loss,
//            Gamma = sum_j q g and sum_j q over these very q).
// Forward KL and cross-entropy without beta (Student-t, power; any kernel on Dense and Neighbors,
// and under joint normalisation: joint_target_kl_rows) need pass 1 alone: their loss is a closed
// form of the LSE and the target's sums (the hot path's for Labels, cpu_symmetric_target_kl.h's
// for Dense and Neighbors, which forms no logit per pair for t-SNE's Cauchy kernel), and Gamma is
// -1 (conditional rows; the joint rows' is -sum_j p~).
// The backward cannot take Gamma from a sweep of the whole row first (the plain backward does), so
// the forward saves it: G_ij = g_i (1 - beta) (q_ij g_ij - q_ij Gamma_i) for both sides of the one
// recomputed tile, then H_IJ = W_IJ + W_JI^T, dX_I += H_IJ X_J and dX_J += H_IJ^T X_I
// (add_h_tile). Two and a half N^2 d GEMM-equivalents instead of four (two without pass 2).
//
// Joint normalisation of a Dense or Neighbors target, or of a Labels target whose column labels are
// not its rows' (every divergence, alpha and beta): P_ij = w_ij / (every row's total) is not
// symmetric, but q_ij = e^{s_ij - log Z} is, so the same two
// sweeps serve: pass 1 each row's LSE, then log Z = logsumexp_i LSE_i; pass 2 each row's terms
// under log Z (the segments divide by the joint total, cpu_target_segments.h). Forward KL and
// cross-entropy without beta need pass 1 alone (joint_target_kl_rows: the conditional one sweep's
// sums, each row's share of the loss under log Z after it). The backward takes
// G_ij = (1 - beta) (g_i q_ij g_ij - q_ij C), C = sum_k g_k Gamma_k / sum_k q_k (joint_centre: s_ij
// moves every q through Z), for both sides of the one recomputed tile. The stats are the plain
// joint rows' (log Z, Gamma_i = sum_j q g, 0, the row's share of q) with no record, so either
// backward runs after either forward (the switch at the backward decides, as the joint family
// schedule's, cpu_symmetric_joint_family.h); the learned parameter's gradient runs the plain one.
// Two and a half N^2 d GEMM-equivalents instead of the plain joint rows' five (their pass over
// every row's LSE, S again in the forward and the backward's three); two instead of four for KL and
// cross-entropy without beta (both put their rows under log Z afterwards, Problem::defers_log_z).
//
// The closed-form rows (cpu_f_label_rows.h: tv, hellinger, js, chi2 with alpha = beta = 0, the dot
// or Gaussian kernel; up to 2^22 positive pairs) need one sweep: each row merges its max and its
// negatives' sum of exps online and keeps its positives' logits, and the loss and D = sum_pos d
// follow from the LSE in closed form (f_label_forward_of's formulas). Their backward forms G as
// f_label_backward_of does: g_i q D at the negatives (learned_backward with q g' = 0 and Gamma' =
// Gamma - c = -D, which the stats keep in rows 1 and 2 instead of Gamma) and g_i (q D - d) at the
// positives, in double. A row that is not finite sends the forward to the two sweeps, with no
// record (the plain backward then runs, as the plain closed-form rows leave such a row to the
// family rows). Two GEMM-equivalents instead of four.
//
// Stats: row 0 the LSE rounded to T (as the plain rows), rows 1 and 2 Gamma / sum_j q in two
// parts (hi, lo), row 3 the record 8 * block + the LSE's residual in units of its last place
// (pair_record). Both pass 2 and the backward take q = exp((s - hi) - lo): they sum to 1 up to
// each entry's rounding, and Gamma is the q-weighted mean of g over exactly the backward's q, so
// sum_j G_ij = 0 up to those roundings with no row sweep. The plain forward leaves rows 2 and 3 at
// 0 for a Labels, Dense or Neighbors target, so the backward runs this schedule only after its forward (the record
// and its block); the plain backward after this forward reads row 0 only and renormalises itself.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_cauchy_rows.h"
#include "cpu_f_label_rows.h"   // label_neg_g, label_pos_d
#include "cpu_f_rows.h"
#include "cpu_family_rows.h"
#include "cpu_global_rows.h"   // log_sum_exp, q_masses, joint_centre
#include "cpu_problem.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"
#include "cpu_symmetric_target_kl.h"
#include "cpu_target_segments.h"
#include "cpu_tile_pairs.h"
#include "divergence_math.h"

namespace icon {
namespace cpu {

// The positive pairs of a self-mode Labels target (every row's count, self excluded).
template <typename T>
int64_t total_positives(const Problem<T>& pb) {
  const LabelSide<T> side = self_tile_pair(pb).side;
  int64_t total = 0;
  for (int64_t k : side.positive_counts(pb.n)) total += k;
  return total;
}
constexpr int64_t kClosedFormPositives = int64_t(1) << 22;   // 16 MiB of logits in fp32, 32 in fp64

// Whether pb has this schedule's structure: self mode with one scalar parameter, a kernel other
// than log_dot, a target that is not symmetrised, and
//   Labels     conditional rows on the family rows or the closed-form rows (cpu_f_label_rows.h: one
//              sweep here, up to kClosedFormPositives positive pairs; the hot path has its own
//              schedule, cpu_symmetric_labels.h), any column labels; joint rows where the columns'
//              labels are not the rows' (P_ij != P_ji; with the rows' labels P is symmetric and
//              cpu_symmetric_joint_family.h takes one value per pair);
//   Dense, Neighbors   every divergence, alpha and beta (they run the family rows only), conditional
//              or joint rows (family_sweeps below).
template <typename T>
bool symmetric_label_family_fit(const Problem<T>& pb) {
  if (pb.symmetrize || !pb.self_pairs || !pb.scalar_param || pb.n < 2 || pb.kernel == kLogDot) return false;
  if (pb.joint)
    return pb.target == kDense || pb.target == kNeighbors || (pb.target == kLabels && !same_row_and_column_labels(pb));
  const RowPath path = pb.row_path();
  switch (pb.target) {
    case kDense:
    case kNeighbors: return path == kFamilyRows;
    case kLabels:
      if (path != kFamilyRows && path != kLabelClosedFormRows) return false;
      // the closed-form rows keep every positive's logit until the LSE is known: at most
      // kClosedFormPositives of them (few classes, K ~ N / 2, run the plain rows)
      return path != kLabelClosedFormRows || total_positives(pb) <= kClosedFormPositives;
    default: return false;   // Affinity: cpu_symmetric_affinity.h, cpu_symmetric_affinity_family.h
  }
}

// The counter slots (cpu_symmetric_labels.h) of a target's forward; its backward's is the next.
inline int family_schedule_counter(int target) {
  switch (target) {
    case kLabels: return 8;      // label_family_forward
    case kDense:
    case kNeighbors: return 12;  // target_family_forward
    default: TORCH_CHECK(false, "icon_kernels: no symmetric family schedule counter for target code ", target);
  }
}

template <typename T>
bool symmetric_label_family_apply(const Problem<T>& pb) {
  return symmetric_label_family_fit(pb) && symmetric_schedule_enabled();
}

// A thread's row buffers (one block of columns each): logits, p, log p~ (a Neighbors row's), q,
// q g, and a row of J's Gram entries gathered from the tile's column.
template <typename T>
struct FamilyRowScratch {
  std::vector<T> s, p, lp, q, qg, col;
  explicit FamilyRowScratch(int64_t block)
      : s(size_t(block)), p(size_t(block)), lp(size_t(block)), q(size_t(block)), qg(size_t(block)),
        col(size_t(block)) {}
};

// row(seg, sr, ab, scratch) for every row of both sides of the tile pair (I, J), split across
// threads, after the Gram tile (pair_gram, into buf, which the rows only read): seg the row's
// segment over the pair's other block (segs.segment: a LabelRow, or a ColumnSpan; segs also gives
// the rows and their squared norms), ab the row's Gram entries, scratch.s its logits (stored
// before anything reads them: an exp of an unstored product would be contracted into an fma, and
// pass 2 and the backward must see the same logits; not formed without `logits`: the Cauchy rows
// take reciprocals of the Gram entries). A row of J gathers its entries from the tile's column in
// the thread that reads them (no transpose pass, with its own parallel region, per tile pair).
// With w_out (the backward), ab is the row's copy in w_out (rows of I, ni x nj) or wt_out (rows of
// J, nj x ni), which it overwrites with W; without (the forward), the Gram row itself or the
// gathered column, read only.
template <typename T, int K, typename Segs, typename F>
void for_each_family_row(const Segs& side, const KernelRow<T, K>& k_in, int64_t i0, int64_t i1, int64_t j0,
                         int64_t j1, int64_t block, at::Tensor& buf, T* w_out, T* wt_out, F&& row,
                         bool logits = true) {
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
        ab = g_p + sr.offset;
        if (w_out != nullptr) ab = std::copy(ab, ab + nj, w_out + sr.offset) - nj;
      } else {
        const int64_t c = sr.k;
        ab = wt_out != nullptr ? wt_out + c * ni : scratch.col.data();
        for (int64_t t = 0; t < ni; ++t) ab[t] = g_p[t * nj + c];
      }
      if (logits) kernel_logits<T, K>(k, ab, scratch.s.data(), side.sq + sr.col0, side.sq[sr.i], sr.len);
      row(side.segment(sr.i, sr.col0, sr.len), sr, ab, scratch);
    }
  });
}

// What both passes of a row read: its f_row with the LSE hi (rounded to T) and lo (its residual),
// and a Labels row's two levels of log p~.
template <typename T, typename Segs>
std::vector<FRow<T>> family_rows_of_pairs(const Problem<T>& pb, const Segs& segs, const T* hi,
                                          const std::vector<T>& lo) {
  std::vector<FRow<T>> f(static_cast<size_t>(pb.n));
  for (int64_t i = 0; i < pb.n; ++i) {
    f[i] = pb.f_row(i, nullptr, hi[i], nullptr, nullptr, T(0), 0.0, segs.label_divisor(i));
    f[i].lse_lo = lo[i];
  }
  return f;
}

// Row i over one column block, as f_row takes it: the block's logits, p (and log p~ where the
// target has it per entry, when log_p), length and self column.
template <typename T, typename Segs, typename Seg>
FRow<T> family_segment(const std::vector<FRow<T>>& rows, const Segs& segs, const Seg& seg, int64_t i,
                       FamilyRowScratch<T>& sc, bool log_p) {
  segs.fill(i, seg, sc.p.data(), sc.lp.data(), log_p);
  FRow<T> r = rows[i];
  r.s = sc.s.data();
  r.p = sc.p.data();
  r.t = sc.lp.data();
  r.m = seg.m;
  r.self = seg.self;
  return r;
}

// The closed-form rows (cpu_f_label_rows.h: tv, hellinger, js or chi2 with alpha = beta = 0, the
// dot or Gaussian kernel) need one sweep: each row merges its max and its negatives' sum of exps
// online and keeps its positives' logits; the LSE, the loss and Gamma then follow as
// f_label_forward_of's (the negatives in closed form, the positives in double).
template <typename T>
struct ClosedFormRow {
  OnlineLabelRow<T> acc;   // mx, se: the negatives' sum of exps under mx; sum_s NaN: a NaN logit
  std::vector<T> pos;      // the positives' logits
};

template <typename T>
void add_closed_form_segment(const LabelRow& seg, T* s, ClosedFormRow<T>* row) {
  const T inf = std::numeric_limits<T>::infinity();
  OnlineLabelRow<T>* acc = &row->acc;
  const int64_t* const c = seg.col_labels;
  const int64_t label = seg.label, self = seg.self, m = seg.m;
  if (self >= 0) s[self] = -inf;
  for (int64_t j = 0; j < m; ++j) {
    if (c[j] == label && j != self) row->pos.push_back(s[j]);
    if (std::isnan(s[j])) acc->sum_s = std::numeric_limits<double>::quiet_NaN();
  }
  const T mx = row_max(s, m);
  if (mx > acc->mx) {
    acc->se *= std::exp(double(acc->mx) - double(mx));
    acc->mx = mx;
  }
  if (acc->mx == -inf) return;   // no finite logit yet
  const T top = acc->mx;
  double se = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
    const int64_t j1 = std::min(m, j0 + kSumBlock);
    T b = 0;
#pragma omp simd reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) b += c[j] != label ? vexp(s[j] - top) : T(0);
    se += b;
  }
  acc->se += se;
}

// A row's LSE from its merged sums (the positives' in double); false where the row is not finite
// (a NaN or infinite logit, no finite one): the caller then runs the two sweeps.
template <typename T>
bool closed_form_lse(const ClosedFormRow<T>& row, double* lse_out) {
  const OnlineLabelRow<T>& acc = row.acc;
  if (!std::isfinite(acc.mx) || std::isnan(acc.sum_s) || !std::isfinite(acc.se)) return false;
  const double mx = double(acc.mx);
  double se_pos = 0;
  for (const T v : row.pos) se_pos += std::exp(double(v) - mx);
  *lse_out = mx + std::log(acc.se + se_pos);
  return std::isfinite(*lse_out);
}

// The row's loss and Gamma - c = -D under lse, as f_label_forward_of: the negatives' share of q is
// one minus the positives' (their sum of exps over the row's, from the merged sums).
template <int D, typename T>
void closed_form_row(const ClosedFormRow<T>& row, double lse, double* loss_out, double* gamma_out) {
  const double c = label_neg_g<D>();
  const double q_neg = std::exp(double(row.acc.mx) - lse) * row.acc.se;
  double loss = c * q_neg, d_sum = 0;
  const int64_t k = int64_t(row.pos.size());
  if (k > 0) {
    const double p = 1.0 / double(k), lp = -std::log(double(k));
    for (const T v : row.pos) {
      const double lq = double(v) - lse, q = std::exp(lq);
      loss += f_pair_terms<double>(D, p, q, lp, lq).term;
      d_sum += label_pos_d<D>(p, q, lp, lq);
    }
  }
  *loss_out = loss;
  *gamma_out = -d_sum;   // Gamma - c = -D (closed_form_negatives)
}

template <typename T>
void closed_form_row_of(int divergence, const ClosedFormRow<T>& row, double lse, double* loss, double* gamma) {
  switch (divergence) {
    case kTv: return closed_form_row<kTv>(row, lse, loss, gamma);
    case kHellinger: return closed_form_row<kHellinger>(row, lse, loss, gamma);
    case kJs: return closed_form_row<kJs>(row, lse, loss, gamma);
    case kChi2: return closed_form_row<kChi2>(row, lse, loss, gamma);
    default: TORCH_CHECK(false, "icon_kernels cpu: no closed-form Labels rows for divergence code ", divergence);
  }
}

// The closed-form rows' forward in one sweep into out (stats as the two sweeps': LSE, Gamma in two
// parts, the record); false, with out untouched, where a row is not finite.
template <typename T>
bool closed_form_forward(const Problem<T>& pb, const LabelSide<T>& side, int64_t block, RowOutputs<T>* out) {
  const int64_t n = pb.n;
  std::vector<ClosedFormRow<T>> rows(static_cast<size_t>(n));
  const std::vector<int64_t> k = side.positive_counts(n);
  for (int64_t i = 0; i < n; ++i) rows[i].pos.reserve(size_t(std::max<int64_t>(k[i], 0)));
  at::Tensor buf = at::empty({block, block}, pb.x.options());
  with_label_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const KernelRow<T, K> kr(pb.prm.template data_ptr<T>()[0]);
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for_each_family_row(side, kr, i0, i1, j0, j1, block, buf, static_cast<T*>(nullptr), static_cast<T*>(nullptr),
                          [&](const LabelRow& seg, const SideRow& sr, T*, FamilyRowScratch<T>& sc) {
                            add_closed_form_segment<T>(seg, sc.s.data(), &rows[sr.i]);
                          });
    });
    return 0;
  });
  std::vector<double> lse(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    if (!closed_form_lse(rows[i], &lse[i])) return false;
  T* st = out->st;
  for (int64_t i = 0; i < n; ++i) {
    st[i] = T(lse[i]);
    st[3 * n + i] = pair_record<T>(block, lse[i], st[i]);
  }
  // the loss and D under the LSE as the backward decodes it (hi + the recorded residual): its q
  // and d at the positives are then these very values, so that q D - d cancels exactly where it
  // should (a row whose q sits on one positive: G = 0 there)
  std::vector<T> lo;
  recorded_pair_residuals(st, n, 0, &lo);
  for (int64_t i = 0; i < n; ++i) {
    double loss = 0, gamma = 0;
    closed_form_row_of(pb.divergence, rows[i], double(st[i]) + double(lo[i]), &loss, &gamma);
    const bool inc = k[i] > 0 && pb.m_valid > 0;
    out->inc_p[i] = inc;
    out->loss_p[i] = inc ? T(loss) : T(0);
    st[n + i] = T(gamma);   // Gamma' = Gamma - c = -D in two parts
    st[2 * n + i] = std::isfinite(gamma) ? T(gamma - double(st[n + i])) : T(0);
  }
  return true;
}

// A closed-form row's backward over one column block, as f_label_backward_of forms it: with
// D = sum_pos d = c - Gamma (stats rows 1 and 2 keep Gamma - c = -D), G = g_i q D at a negative
// and g_i (q D - d) at a positive, never as c q - q g, which cancels. closed_form_negatives gives
// learned_backward q at the negatives and 0 at the positives (q g' = 0 with g' = g - c, and Gamma'
// = -D: G = g_i q D there, 0 at the positives); closed_form_positives then writes the positives' W
// from G in double, with q and d from the LSE's double value, and their dL/dparam terms.
template <typename T>
void closed_form_negatives(const LabelRow& seg, const T* s, T hi, T lo, T* q, T* qg) {
  const int64_t* const c = seg.col_labels;
  const int64_t label = seg.label, self = seg.self, m = seg.m;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    q[j] = c[j] != label && j != self ? vexp((s[j] - hi) - lo) : T(0);
    qg[j] = T(0);
  }
}

struct ParamSums {
  double dp = 0, gs = 0, qb = 0, qs = 0;
};

template <typename T, int K, int D, bool PARAM>
void closed_form_positives_of(const LabelRow& seg, const KernelRow<T, K>& kr, T* w, const T* s, double lse, int64_t k,
                              double d_sum, double scale, T shift, ParamSums* ps) {
  if (k <= 0) return;
  const double p = 1.0 / double(k), lp = -std::log(double(k));
  const int64_t* const c = seg.col_labels;
  const int64_t label = seg.label, self = seg.self, m = seg.m;
  for (int64_t j = 0; j < m; ++j) {
    if (c[j] != label || j == self) continue;
    const double lq = double(s[j]) - lse, q = std::exp(lq);
    const double grad = scale * (q * d_sum - label_pos_d<D>(p, q, lp, lq));
    w[j] = kr.weight(T(grad), T(0));   // the label kernels' weight is linear in G, aux unread
    if constexpr (PARAM) {
      const double basis = kr.basis(s[j], T(0), shift);
      if (grad != 0) { ps->dp += grad * basis; ps->gs += grad; }
      if (q != 0) { ps->qb += q * basis; ps->qs += q; }
    }
  }
}

template <typename T, int K, bool PARAM>
void closed_form_positives(int divergence, const LabelRow& seg, const KernelRow<T, K>& kr, T* w, const T* s,
                           double lse, int64_t k, double d_sum, double scale, T shift, ParamSums* ps) {
  switch (divergence) {
    case kTv: return closed_form_positives_of<T, K, kTv, PARAM>(seg, kr, w, s, lse, k, d_sum, scale, shift, ps);
    case kHellinger:
      return closed_form_positives_of<T, K, kHellinger, PARAM>(seg, kr, w, s, lse, k, d_sum, scale, shift, ps);
    case kJs: return closed_form_positives_of<T, K, kJs, PARAM>(seg, kr, w, s, lse, k, d_sum, scale, shift, ps);
    case kChi2: return closed_form_positives_of<T, K, kChi2, PARAM>(seg, kr, w, s, lse, k, d_sum, scale, shift, ps);
    default: TORCH_CHECK(false, "icon_kernels cpu: no closed-form Labels rows for divergence code ", divergence);
  }
}

// The sweeps of every row into out: pass 1 its LSE, pass 2 its divergence sums under it; or pass 1
// alone for forward KL and cross-entropy without beta, whose loss is a closed form of the LSE and
// the target's sums (Labels: the hot path's, label_row_loss; Dense and Neighbors:
// target_kl_row_loss; joint rows: joint_target_kl_rows). Their Gamma is -sum_j p~ / sum_j q = -1
// (q from the LSE in two parts sums to 1 up to each entry's rounding); the joint rows' stats are
// the plain joint rows' (Gamma_i = sum_j q g, or -sum_j p~ after the one sweep).
template <typename T, typename Segs>
void family_sweeps(const Problem<T>& pb, const Segs& segs, int64_t block, RowOutputs<T>* out) {
  constexpr bool kLabelRows = Segs::kTarget == kLabels;
  const int64_t n = pb.n;
  T* st = out->st;
  std::vector<OnlineLabelRow<T>> acc(static_cast<size_t>(n));
  std::vector<double> loss(static_cast<size_t>(n)), gamma(static_cast<size_t>(n)), q_sum(static_cast<size_t>(n));
  const bool joint = pb.joint;
  const bool one_pass = !pb.f_div && pb.beta == T(0);
  // the Cauchy rows' one sweep: reciprocals summed with no running max and no logit per pair
  // (cpu_symmetric_target_kl.h), the max fixed at 0 (every e^s is at most 1)
  const bool cauchy = !kLabelRows && one_pass && cauchy_target_rows(pb);
  if (cauchy)
    for (OnlineLabelRow<T>& a : acc) a.mx = T(0);
  at::Tensor buf = at::empty({block, block}, pb.x.options());
  T* const no_out = nullptr;   // the forward reads the Gram entries only
  with_kernel(pb.kernel, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    const KernelRow<T, K> k(pb.prm.template data_ptr<T>()[0]);
    // pass 1: the LSE of every row (s[self] becomes -inf in the scratch), and in one_pass the sums
    // of the closed form
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for_each_family_row(segs, k, i0, i1, j0, j1, block, buf, no_out, no_out,
                          [&](const auto& seg, const SideRow& sr, T* ab, FamilyRowScratch<T>& sc) {
                            if (!one_pass) {
                              add_lse_segment<T>(seg, sc.s.data(), &acc[sr.i]);
                            } else if constexpr (kLabelRows) {
                              add_label_segment<T>(seg, sc.s.data(), &acc[sr.i]);
                            } else {
                              add_target_kl_segment<T, K>(segs, sr.i, seg, k, ab, sc.s.data(), segs.sq + sr.col0,
                                                          segs.sq[sr.i], cauchy, &acc[sr.i]);
                            }
                          }, !cauchy);
    });
    std::vector<double> lse(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) lse[i] = online_lse(acc[i]);
    // joint: every row's q under log Z rounded to T (the plain joint rows' q), no record
    const T log_z = joint ? T(log_sum_exp(lse)) : T(0);
    for (int64_t i = 0; i < n; ++i) {
      st[i] = joint ? log_z : T(lse[i]);
      st[3 * n + i] = joint ? T(0) : pair_record<T>(block, lse[i], st[i]);
    }
    if (one_pass && joint) {
      if constexpr (kLabelRows) {   // add_label_segment's pos_s is sum_pos s: every positive's p is 1 / by_joint
        for (OnlineLabelRow<T>& a : acc) a.pos_s = segs.by_joint > 0 ? a.pos_s * double(segs.inv_joint) : 0.0;
      }
      joint_target_kl_rows(pb, segs, acc, lse, log_z, out);
      return 0;
    }
    if (one_pass) {
      for (int64_t i = 0; i < n; ++i) {
        if constexpr (kLabelRows) {
          const LabelSums<T> sums{st[i], T(acc[i].sum_s), T(acc[i].pos_s), acc[i].k};
          out->inc_p[i] = label_row_loss<T>(segs.segment(i, 0, 0), sums, pb.kl, &out->loss_p[i]);
        } else {
          out->inc_p[i] = target_kl_row_loss<T>(segs, i, acc[i], lse[i], pb.kl, &out->loss_p[i]);
        }
        st[n + i] = T(-1);
      }
      return 0;
    }
    std::vector<T> lo(static_cast<size_t>(n), T(0));
    if (!joint) recorded_pair_residuals(st, n, 0, &lo);   // lo as the backward decodes it
    const std::vector<FRow<T>> rows = family_rows_of_pairs(pb, segs, st, lo);
    // pass 2: the divergence sums under it (a Neighbors row's log p~ per entry: kSparseLogP)
    const bool log_p = Segs::kLogP == kSparseLogP;
    for_each_block_pair(n, block, [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
      for_each_family_row(segs, k, i0, i1, j0, j1, block, buf, no_out, no_out,
                          [&](const auto& seg, const SideRow& sr, T*, FamilyRowScratch<T>& sc) {
                            const int64_t i = sr.i;
                            const FRow<T> r = family_segment(rows, segs, seg, i, sc, log_p);
                            const FRowSums f = f_row<T>(pb.divergence, r, Segs::kLogP, nullptr, nullptr);
                            loss[i] += f.loss;
                            gamma[i] += f.gamma;
                            q_sum[i] += f.q_sum;
                          });
    });
    if (joint) {   // the plain joint rows' stats: log Z, Gamma_i = sum_j q g, 0, the row's share of q
      const std::vector<double> q_mass = q_masses(lse, log_z);
      for (int64_t i = 0; i < n; ++i) {
        out->inc_p[i] = segs.has(i) && pb.m_valid > 0;
        // NaN logits: NaN, even without p (cpu_loss.cpp)
        out->loss_p[i] = std::isnan(log_z) ? log_z : out->inc_p[i] ? T(loss[i]) : T(0);
        st[n + i] = T(gamma[i]);
        st[2 * n + i] = T(0);
        st[3 * n + i] = T(q_mass[i]);
      }
      return 0;
    }
    for (int64_t i = 0; i < n; ++i) {
      out->inc_p[i] = segs.has(i) && pb.m_valid > 0;
      out->loss_p[i] = out->inc_p[i] ? T(loss[i]) : T(0);
      // Gamma as the q-weighted mean of g over the backward's very q (learned_backward)
      const double g_mean = q_sum[i] > 0 ? gamma[i] / q_sum[i] : gamma[i];
      st[n + i] = T(g_mean);
      st[2 * n + i] = std::isfinite(g_mean) ? T(g_mean - double(st[n + i])) : T(0);
    }
    // closed-form rows here have a row that is not finite: no record, so the plain backward runs
    // (its closed-form rows leave such a row to the family rows, which renormalise it)
    if (pb.row_path() == kLabelClosedFormRows) std::fill(st + 3 * n, st + 4 * n, T(0));
    return 0;
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_family_forward(const Problem<T>& pb) {
  const int64_t n = pb.n, block = pair_block(pb.tile, n);
  RowOutputs<T> out(n, pb.x.options());
  // the Dense and Neighbors rows' sum p~ log p~: only the one sweep's forward KL reads it
  const bool with_entropy = pb.kl && pb.beta == T(0);
  with_target_segments(pb, with_entropy, [&](const auto& segs) {
    using Segs = std::decay_t<decltype(segs)>;
    if constexpr (Segs::kTarget == kLabels) {
      // the closed-form rows in one sweep where every row is finite (else the two sweeps)
      if (pb.row_path() == kLabelClosedFormRows && closed_form_forward(pb, segs, block, &out)) {
        count_schedule_call(pb.row_path(), n, 0, family_schedule_counter(kLabels));
        return 0;
      }
    }
    family_sweeps(pb, segs, block, &out);
    // (closed-form rows here had a row that is not finite: they ran the family rows' two sweeps)
    count_schedule_call(kFamilyRows, n, 0, family_schedule_counter(Segs::kTarget));
    return 0;
  });
  return out.tuple();
}

// The block side of the forward that made stats (T, contiguous), with every row's LSE residual into
// lo; 0 when they are not this schedule's forward's.
template <typename T>
int64_t recorded_label_family_block(const T* st, int64_t n, std::vector<T>* lo) {
  return recorded_pair_residuals(st, n, 0, lo);
}

// stats: the forward's (T, contiguous); block and lo: recorded_label_family_block's.
template <typename T, typename Segs>
std::vector<at::Tensor> family_backward(const Problem<T>& pb, const Segs& segs, const at::Tensor& grad_rows,
                                        const at::Tensor& valid, const at::Tensor& stats, bool param_grad,
                                        int64_t block, const std::vector<T>& lo) {
  constexpr bool kLabelRows = Segs::kTarget == kLabels;
  const int64_t n = pb.n;
  const auto opts = pb.x.options();
  const at::Tensor g_t = masked_grads(grad_rows, valid, opts);
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const bool joint = pb.joint;
  // joint: G_ij = (1 - beta) (g_i q g_ij - q_ij C), C = sum_k g_k Gamma_k / sum_k q_k (s_ij moves
  // every q through Z), from the plain joint rows' stats (log Z in row 0, no residual)
  const double centre = joint ? joint_centre(g, st, n) : 0.0;
  const std::vector<FRow<T>> rows = family_rows_of_pairs(pb, segs, st, lo);   // (joint: lo is zeros)
  const T prm = pb.prm.template data_ptr<T>()[0];
  const T keep_q = T(1) - pb.beta;
  const bool dist = is_distance(pb.kernel);
  // the closed-form rows' one sweep keeps Gamma - c (closed_form_negatives)
  const bool closed = kLabelRows && pb.row_path() == kLabelClosedFormRows;
  // t-SNE's Cauchy rows where dL/ds needs no log q (forward KL, cross-entropy without beta, no dof
  // gradient): q = r e^{-LSE} and W = 2 G r from one reciprocal per pair, as the plain rows'
  // (joint too: q = r e^{-log Z}, and G = (1 - beta) (g_i q g - q C) as below)
  const bool cauchy = !kLabelRows && !param_grad && !pb.f_div && pb.beta == T(0) && pb.kernel == kStudentT &&
                      prm == T(1);
  // the f-divergences read log p~; KL's and cross-entropy's dL/ds is -p~ q / q~ (no log p)
  const bool log_p = pb.f_div && Segs::kLogP == kSparseLogP;
  std::vector<T> exp_neg_lse(cauchy ? size_t(n) : 0);   // e^{-LSE} from the LSE and its residual
  for (size_t i = 0; i < exp_neg_lse.size(); ++i) exp_neg_lse[i] = T(std::exp(-(double(st[i]) + double(lo[i]))));
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
          for_each_family_row(segs, k, i0, i1, j0, j1, block, buf, w_buf.template data_ptr<T>(),
                              wt_buf.template data_ptr<T>(),
                              [&](const auto& seg, const SideRow& sr, T* ab, FamilyRowScratch<T>& sc) {
            const int64_t i = sr.i;
            // left out, or zero upstream gradient: no contribution (joint: unless the row moves Z)
            if (g[i] == T(0) && !(joint && centre != 0 && pb.m_valid > 0)) {
              std::fill(ab, ab + seg.m, T(0));
              return;
            }
            const double row_gamma = joint ? centre : double(st[n + i]) + double(st[2 * n + i]);
            if (cauchy) {   // W = 2 G r in place of the Gram entries; r = 0 at the self column
              segs.fill(i, seg, sc.p.data(), sc.lp.data(), false);
              cauchy_reciprocals<T>(ab, sc.s.data(), segs.sq + sr.col0, segs.sq[i], seg.self, seg.m);
              cauchy_learned_row_scaled<T>(sc.s.data(), exp_neg_lse[i], sc.p.data(), seg.self, seg.m, pb.alpha,
                                           pb.mix_size(), sc.q.data(), sc.qg.data());
              if (joint) fold_joint_upstream(sc.qg.data(), seg.m, g[i]);
              cauchy_learned_backward<T>(ab, sc.s.data(), sc.q.data(), sc.qg.data(), seg.m,
                                         joint ? keep_q : g[i] * keep_q, row_gamma);
              if (i0 == j0 && seg.self < 0) ab[i - sr.col0] = T(0);   // the kept self pair (below)
              return;
            }
            if constexpr (kLabelRows) {
              if (closed) closed_form_negatives<T>(seg, sc.s.data(), st[i], lo[i], sc.q.data(), sc.qg.data());
            }
            if (!closed) {
              const FRow<T> r = family_segment(rows, segs, seg, i, sc, log_p);
              f_row<T>(pb.divergence, r, Segs::kLogP, sc.qg.data(), nullptr, sc.q.data());
            }
            if (joint) fold_joint_upstream(sc.qg.data(), seg.m, g[i]);   // G = (1 - beta) (g_i q g - q C)
            // the self column's Gram entry: any finite value (G is 0 there; cpu_loss.cpp's note)
            if (seg.self >= 0) ab[seg.self] = T(0);
            const LabelGradSums sums = learned_backward<T, K, PARAM, Q_ZERO_GRAD>(
                KernelRow<T, K>(prm), ab, sc.s.data(), sc.q.data(), sc.qg.data(), segs.sq + sr.col0, segs.sq[i],
                seg.m, joint ? keep_q : g[i] * keep_q, row_gamma, finite_shift(st[i]));
            ParamSums pos_sums;
            if constexpr (kLabelRows) {
              if (closed)
                closed_form_positives<T, K, PARAM>(pb.divergence, seg, KernelRow<T, K>(prm), ab, sc.s.data(),
                                                   double(st[i]) + double(lo[i]), segs.k[i], -row_gamma,
                                                   double(g[i] * keep_q), finite_shift(st[i]), &pos_sums);
            }
            // a distance kernel's kept self pair (d^2 = 0 exactly, pair_gram): its dX term is
            // W_ii (x_i - x_i) = 0, so W_ii = 0; formed as H_ii x_i - diag(H 1)_i x_i, the power
            // kernel's W_ii = G n / eps (~1e12) left its rounding (its dL/dparam term stays)
            if (is_distance(K) && i0 == j0 && seg.self < 0) ab[i - sr.col0] = T(0);
            if constexpr (PARAM) {
              dp[i] += sums.dp + pos_sums.dp;
              gs[i] += sums.g_sum + pos_sums.gs;
              qb[i] += sums.q_basis + pos_sums.qb;
              qs[i] += sums.q_sum + pos_sums.qs;
            }
          }, !cauchy);
          add_h_tile<T>(segs.rows, i0, i1 - i0, j0, j1 - j0, w_buf, wt_buf, dist, dfeat, h_sum);
        });
        return 0;
      });
    });
  });
  if (dist) dfeat -= h_sum.to(opts.dtype()).unsqueeze(1) * segs.rows;
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble));
  if (param_grad) {
    double* p = dprm.template data_ptr<double>();
    const double scale = param_scale<double>(pb.kernel, prm);
    for (int64_t i = 0; i < n; ++i) p[i] = scale * centred_sum(dp[i], gs[i], qb[i], qs[i]);
  }
  count_schedule_call(pb.row_path(), n, 1, family_schedule_counter(Segs::kTarget) + 1);
  return {dfeat, at::zeros({pb.m, pb.d}, opts), dprm, at::Tensor(), at::Tensor(), at::Tensor()};
}

template <typename T>
std::vector<at::Tensor> symmetric_label_family_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                        const at::Tensor& valid, const at::Tensor& stats,
                                                        bool param_grad, int64_t block, const std::vector<T>& lo) {
  return with_target_segments(pb, false, [&](const auto& segs) {
    return family_backward(pb, segs, grad_rows, valid, stats, param_grad, block, lo);
  });
}

}  // namespace cpu
}  // namespace icon
