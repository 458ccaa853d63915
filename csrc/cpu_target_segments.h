// The target row of row i over one column block [col0, col0 + len), for the symmetric schedule's
// family rows (cpu_symmetric_label_family.h): a tile pair's rows of I read their targets over the
// columns J and its rows of J theirs over the columns I, but each side always reads its OWN row's
// target, so no transposed view of the target is needed. One instantiation per target:
//   LabelSegments     p = 1/K at the positives (the labels of the block's columns; joint: one over
//                     the positive pairs of every row);
//   DenseSegments     p = w[i, col0:col0+len] over the row's total (directly addressable);
//   NeighborSegments  the row's k entries, sorted by column with repeats merged once, filtered to
//                     the block (a binary search and a walk: no per-block scan of the k list).
// Each gives p exactly as target_row (cpu_problem.h) forms the whole row (the same roundings), and
// log p~ as the plain family rows take it (log_p_mode_of: two levels, sparse entries, the log of
// p~ per pair in f_row), so that the symmetric and plain schedules agree to the last bits that a
// reordered sum allows. with_target_segments is the one switch from a target code to an
// instantiation; it ends in an error.
// Under joint normalisation (Labels with other column labels, Dense and Neighbors) every row
// divides by the total over every row (target_row's divisor, as global_rows sums it: each row's
// total in double, in row order), and every row has a target when that total is not 0 (a row
// without weights still has q in the one distribution).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_f_rows.h"
#include "cpu_label_rows.h"
#include "cpu_problem.h"
#include "cpu_symmetric_labels.h"   // self_tile_pair
#include "cpu_tile_pairs.h"
#include "op_codes.h"

namespace icon {
namespace cpu {

// A row over one column block: the block's first column, its length and the row's self column in
// it (or -1), as f_row and add_lse_segment read a row.
struct ColumnSpan {
  int64_t col0, m, self;
};

inline ColumnSpan column_span(bool exclude_self, int64_t i, int64_t col0, int64_t len) {
  return {col0, len, exclude_self && i >= col0 && i < col0 + len ? i - col0 : -1};
}

// Labels: the geometry of LabelSide (each row's own label against the block's column labels), the
// positive counts and 1/K as target_row's p. Under joint normalisation (the columns' labels not
// the rows': cpu_symmetric_label_family.h's fit) every positive's weight 1 is divided by the
// positive pairs of every row (by_joint, target_row's divisor), every row has a target when that
// is not 0, and the one sweep (forward KL, cross-entropy without beta: joint_target_kl_rows) reads
// each row's sum p~ and sum p~ log p~ in closed form: K_i pairs at p~ = (1 - alpha) / by_joint + b,
// the other M' - K_i at b.
template <typename T>
struct LabelSegments : LabelSide<T> {
  static constexpr int kTarget = kLabels;
  static constexpr int kLogP = kTwoLevelLogP;
  std::vector<int64_t> k;
  std::vector<T> inv_k;
  bool joint;
  T b;                 // p~ = (1 - alpha) p + b, b = alpha / M' (joint: alpha / (N M'))
  double by_joint = 0;
  T inv_joint = 0;     // T(1 / by_joint), every positive's p (0 without a positive pair)
  std::vector<double> p_mass, entropy;   // joint, the one sweep only
  LabelSegments(const Problem<T>& pb, bool with_entropy)
      : LabelSide<T>(self_tile_pair(pb).side), k(this->positive_counts(pb.n)), inv_k(size_t(pb.n)), joint(pb.joint),
        b(pb.alpha / pb.mix_size()) {
    const int64_t n = pb.n;
    if (joint) {
      for (int64_t i = 0; i < n; ++i) by_joint += double(k[i]);
      inv_joint = by_joint > 0 ? T(1.0 / by_joint) : T(0);
    }
    for (int64_t i = 0; i < n; ++i)   // as target_row's p
      inv_k[i] = k[i] <= 0 ? T(0) : joint ? inv_joint : T(1.0 / double(k[i]));
    if (!joint || pb.f_div || pb.beta > T(0)) return;
    // the positives' level as Problem::f_row's (b where no row has a positive: no pair at a, but
    // 0 * inf would make every row's mass NaN)
    const double a = by_joint > 0 ? double(T((1 - double(pb.alpha)) / by_joint) + b) : double(b), bd = double(b);
    const double a_log_a = a > 0 ? a * std::log(a) : 0.0, b_log_b = bd > 0 ? bd * std::log(bd) : 0.0;
    p_mass.resize(size_t(n));
    if (with_entropy) entropy.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      const double pos = double(k[i]), rest = double(this->m_valid) - pos;
      p_mass[i] = pos * a + rest * bd;
      if (with_entropy) entropy[i] = pos * a_log_a + rest * b_log_b;
    }
  }
  bool has(int64_t i) const { return joint ? by_joint != 0 : k[i] > 0; }
  double label_divisor(int64_t i) const { return joint ? by_joint : double(k[i]); }
  // p over the block: 1/K (joint: 1 / by_joint) at the positives, 0 elsewhere and at the self
  // column (log p~ has two levels, from FRow's log_pos and log_zero: lp is not written)
  void fill(int64_t i, const LabelRow& seg, T* p, T*, bool) const {
    const int64_t* c = seg.col_labels;
    const int64_t label = seg.label, self = seg.self;
    const T inv = inv_k[i];
#pragma omp simd
    for (int64_t j = 0; j < seg.m; ++j) p[j] = c[j] == label && j != self ? inv : T(0);
  }
};

// What every non-label instantiation shares: the rows (x, contiguous, in T), their squared norms
// (zeros unless the kernel is a distance), the self rule, and each row's target total (double, as
// target_row sums it) with whether it has any mass (a NaN total keeps its row: NaN loss); under
// joint normalisation (joint) what every row divides by instead (by_joint: every row's total).
template <typename T>
struct WeightSegmentsBase {
  at::Tensor rows;
  const T* sq;
  bool exclude_self;
  T alpha, b;                  // p~ = (1 - alpha) p + b, b = alpha / M' (joint: alpha / (N M'))
  int64_t m_valid;
  bool joint;
  double by_joint = 0;
  std::vector<double> total;
  std::vector<char> has_mass;
  std::vector<double> entropy;   // sum_j p~ log p~ over the valid columns (forward KL only)
  std::vector<double> p_mass;    // joint: sum_j p~ of each row (the one sweep's share of log Z)
  explicit WeightSegmentsBase(const Problem<T>& pb)
      : rows(pb.x), sq(pb.x_sq.template data_ptr<T>()), exclude_self(pb.exclude_self), alpha(pb.alpha),
        b(pb.alpha / pb.mix_size()), m_valid(pb.m_valid), joint(pb.joint), total(size_t(pb.n)),
        has_mass(size_t(pb.n)) {}
  // joint normalisation, once every row's total is in: the divisor of every row, and whether any
  // row has a target (then every row does)
  void set_joint_divisor() {
    double all = 0;
    for (double v : total) all += v;
    by_joint = all;
    std::fill(has_mass.begin(), has_mass.end(), char(all != 0));
  }
  // what row i's weights are divided by (target_row's rule: the joint total where it is positive)
  double divisor(int64_t i) const { return joint && by_joint > 0 ? by_joint : total[i]; }
  ColumnSpan segment(int64_t i, int64_t col0, int64_t len) const { return column_span(exclude_self, i, col0, len); }
  bool has(int64_t i) const { return has_mass[i] != 0; }
  double label_divisor(int64_t) const { return 0.0; }
  // log p~ as the plain rows take it for a pair of p~ = pm (T): -inf at 0
  static T log_mix(T pm) { return pm == T(0) ? -std::numeric_limits<T>::infinity() : T(std::log(pm)); }
};

// Dense: p = w_ij / W_i over j != self (W_i the row's total over its valid columns).
template <typename T>
struct DenseSegments : WeightSegmentsBase<T> {
  static constexpr int kTarget = kDense;
  static constexpr int kLogP = kLogOfP;
  const T* w;
  int64_t m;
  DenseSegments(const Problem<T>& pb, bool with_entropy)
      : WeightSegmentsBase<T>(pb), w(pb.dense.template data_ptr<T>()), m(pb.m) {
    if (with_entropy) this->entropy.assign(size_t(pb.n), 0.0);
    at::parallel_for(0, pb.n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t self = this->exclude_self ? i : -1;
        const T* wi = w + i * m;
        double total = 0;   // blocked as target_row's
        for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
          const int64_t j1 = std::min(m, j0 + kSumBlock);
          T bt = 0;
#pragma omp simd reduction(+ : bt)
          for (int64_t j = j0; j < j1; ++j) bt += j != self ? wi[j] : T(0);
          total += bt;
        }
        this->total[i] = total;
        this->has_mass[i] = total != 0;
        if (with_entropy && !this->joint && total != 0) this->entropy[i] = mixture_sums(i, total, true).ent;
      }
    });
    if (!this->joint) return;
    this->set_joint_divisor();
    // only the one sweep (forward KL, cross-entropy without beta: joint_target_kl_rows) reads the
    // rows' sum p~ and entropy; the two sweeps' rows form p per block
    if (pb.f_div || pb.beta > T(0)) return;
    this->p_mass.assign(size_t(pb.n), 0.0);
    at::parallel_for(0, pb.n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const MixtureSums sums = mixture_sums(i, this->divisor(i), with_entropy);
        this->p_mass[i] = sums.mass;
        if (with_entropy) this->entropy[i] = sums.ent;
      }
    });
  }
  // Row i's sum_j p~ log p~ (with_entropy: a log per entry) and sum_j p~ over its valid columns,
  // p = w / by as fill forms it (0 for a row without weight: p~ = b there).
  struct MixtureSums {
    double ent = 0, mass = 0;
  };
  MixtureSums mixture_sums(int64_t i, double by, bool with_entropy) const {
    const T keep = T(1) - this->alpha, b = this->b;
    const int64_t self = this->exclude_self ? i : -1;
    const T* wi = w + i * m;
    const bool none = this->total[i] == 0;
    MixtureSums out;
    for (int64_t j = 0; j < m; ++j) {
      if (j == self) continue;
      const T pm = keep * (none ? T(0) : T(double(wi[j]) / by)) + b;
      if (with_entropy && pm != T(0)) out.ent += double(pm) * double(this->log_mix(pm));
      out.mass += double(pm);
    }
    return out;
  }
  // p over the block, one division in double per pair as target_row's (0 for a row without mass,
  // which is left out); log p~ is f_row's own (kLogOfP): lp is not written
  void fill(int64_t i, const ColumnSpan& seg, T* p, T*, bool) const {
    const T* wi = w + i * m + seg.col0;
    if (!this->has(i) || this->total[i] == 0) {   // (joint: a row without weight, target_row's early out)
      std::fill(p, p + seg.m, T(0));
      return;
    }
    const double by = this->divisor(i);
    for (int64_t j = 0; j < seg.m; ++j) p[j] = T(double(j != seg.self ? wi[j] : T(0)) / by);
  }
  // sum_j p_ij s_ij over the block's valid columns where p != 0 (an s of -inf at p = 0 adds
  // nothing, as f_row's select); logit(j): the logit of the block's column j
  template <typename F>
  double p_dot(int64_t i, const ColumnSpan& seg, F&& logit) const {
    if (!this->has(i) || this->total[i] == 0) return 0.0;
    const T* wi = w + i * m + seg.col0;
    const double by = this->divisor(i);
    double out = 0;
    for (int64_t j = 0; j < seg.m; ++j) {
      const T pj = T(double(j != seg.self ? wi[j] : T(0)) / by);
      if (pj != T(0)) out += double(pj) * double(logit(j));
    }
    return out;
  }
};

// Neighbors: each row's valid entries (0 <= j < M, j != i when self pairs are excluded; -1 pads),
// sorted by column with repeats merged: their weights added in T in the order of the row's list,
// as target_row's scatter adds them, then divided by the row's total in double. An entry's log p~
// is neighbor_log_p's; off the entries p = 0 and log p~ = log(alpha / M') (-inf at alpha = 0).
template <typename T>
struct NeighborSegments : WeightSegmentsBase<T> {
  static constexpr int kTarget = kNeighbors;
  static constexpr int kLogP = kSparseLogP;
  int64_t k;                      // slots per row: the entries of row i are [i k, i k + count[i])
  std::vector<int64_t> count, col;
  std::vector<T> p, lp;
  T lp_off;
  NeighborSegments(const Problem<T>& pb, bool with_entropy)
      : WeightSegmentsBase<T>(pb), k(pb.nbr_index.size(1)), count(size_t(pb.n)), col(size_t(pb.n * k)),
        p(size_t(pb.n * k)), lp(size_t(pb.n * k)), lp_off(WeightSegmentsBase<T>::log_mix(this->b)) {
    if (with_entropy) this->entropy.assign(size_t(pb.n), 0.0);
    const int64_t m = pb.m;
    const int64_t* idx_all = pb.nbr_index.template data_ptr<int64_t>();
    const T* w_all = pb.nbr_weight.template data_ptr<T>();
    at::parallel_for(0, pb.n, 64, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> order(static_cast<size_t>(k));
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t self = this->exclude_self ? i : -1;
        const int64_t* idx = idx_all + i * k;
        const T* w = w_all + i * k;
        int64_t valid = 0;
        double total = 0;
        for (int64_t c = 0; c < k; ++c)
          if (idx[c] >= 0 && idx[c] < m && idx[c] != self) {
            order[valid++] = c;
            total += w[c];
          }
        // stable: repeats keep the list's order, so their sum in T is the scatter's
        std::stable_sort(order.begin(), order.begin() + valid, [&](int64_t a, int64_t c) { return idx[a] < idx[c]; });
        int64_t n_e = 0;
        int64_t* cols = col.data() + i * k;
        T* ps = p.data() + i * k;
        for (int64_t e = 0; e < valid; ++e) {
          const int64_t c = order[e];
          if (n_e > 0 && cols[n_e - 1] == idx[c]) {
            ps[n_e - 1] += w[c];
          } else {
            cols[n_e] = idx[c];
            ps[n_e++] = T(0) + w[c];
          }
        }
        count[i] = n_e;
        this->total[i] = total;
        this->has_mass[i] = total != 0;
        if (!this->joint) divide_row(i, total, with_entropy);
      }
    });
    if (!this->joint) return;
    this->set_joint_divisor();
    this->p_mass.assign(size_t(pb.n), 0.0);
    at::parallel_for(0, pb.n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) divide_row(i, this->divisor(i), with_entropy);
    });
  }
  // Row i's merged weights over `by` (one rounding, as target_row's; none when by is 0), their
  // log p~, and with with_entropy the row's sum p~ log p~.
  void divide_row(int64_t i, double by, bool with_entropy) {
    const T keep = T(1) - this->alpha, b = this->b;
    T* ps = p.data() + i * k;
    T* lps = lp.data() + i * k;
    const int64_t n_e = count[i];
    double ent = 0, mass = 0;
    for (int64_t e = 0; e < n_e; ++e) {
      if (by != 0) ps[e] = T(double(ps[e]) / by);
      const T pm = keep * ps[e] + b;
      lps[e] = this->log_mix(pm);
      if (pm != T(0)) ent += double(pm) * double(lps[e]);
      mass += double(pm);
    }
    // the uniform remainder: M' - (distinct entries) columns at p~ = b
    const double rest = double(this->m_valid - n_e) * double(b);
    if (with_entropy && b > T(0)) ent += rest * double(lp_off);
    if (with_entropy) this->entropy[i] = ent;
    if (!this->p_mass.empty()) this->p_mass[i] = mass + rest;
  }
  // The entries of row i inside the block: [first, last) of its sorted slots.
  std::pair<int64_t, int64_t> entries_in(int64_t i, const ColumnSpan& seg) const {
    const int64_t* c0 = col.data() + i * k;
    const int64_t* c1 = c0 + count[i];
    const int64_t* first = std::lower_bound(c0, c1, seg.col0);
    const int64_t* last = std::lower_bound(first, c1, seg.col0 + seg.m);
    return {i * k + (first - c0), i * k + (last - c0)};
  }
  // p (and, with log_p, log p~) over the block. A row whose total is NaN has p = NaN on every
  // column (target_row divides every column by it).
  void fill(int64_t i, const ColumnSpan& seg, T* p_out, T* lp_out, bool log_p) const {
    const bool nan_row = std::isnan(this->divisor(i));
    std::fill(p_out, p_out + seg.m, nan_row ? std::numeric_limits<T>::quiet_NaN() : T(0));
    if (log_p) std::fill(lp_out, lp_out + seg.m, lp_off);
    if (!this->has(i)) return;
    const auto range = entries_in(i, seg);
    for (int64_t e = range.first; e < range.second; ++e) {
      p_out[col[e] - seg.col0] = p[e];
      if (log_p) lp_out[col[e] - seg.col0] = lp[e];
    }
  }
  // sum_e p_e s_e over the row's entries in the block where p != 0; logit(j) the logit of the
  // block's column j (only the entries' logits are formed)
  template <typename F>
  double p_dot(int64_t i, const ColumnSpan& seg, F&& logit) const {
    if (!this->has(i)) return 0.0;
    const auto range = entries_in(i, seg);
    double out = 0;
    for (int64_t e = range.first; e < range.second; ++e)
      if (p[e] != T(0)) out += double(p[e]) * double(logit(col[e] - seg.col0));
    return out;
  }
};

// f(segments) for the target of pb in self mode: Labels, Dense or Neighbors; with_entropy: the rows'
// sum p~ log p~ (the one-sweep forward KL; Labels: its joint rows only, the conditional ones take the
// hot path's closed form).
template <typename T, typename F>
decltype(auto) with_target_segments(const Problem<T>& pb, bool with_entropy, F&& f) {
  switch (pb.target) {
    case kLabels: return f(LabelSegments<T>(pb, with_entropy));
    case kDense: return f(DenseSegments<T>(pb, with_entropy));
    case kNeighbors: return f(NeighborSegments<T>(pb, with_entropy));
    default: TORCH_CHECK(false, "icon_kernels cpu: no symmetric family rows for target code ", pb.target);
  }
}

}  // namespace cpu
}  // namespace icon
