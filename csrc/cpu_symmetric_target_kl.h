// Forward KL and cross-entropy without beta on Dense and Neighbors targets (and, under joint
// normalisation, Labels with other column labels) in the symmetric schedule (cpu_symmetric_label_family.h): one sweep over the tile pairs, as the Labels rows take
// with the hot path's closed form. With sum_j p~_j = 1 over the valid columns,
//   L_i = sum_j p~ log p~  -  (1 - alpha) sum_j p_j s_j  -  (alpha / M') sum_{j valid} s_j  +  LSE_i
// (cross-entropy drops the first term, which the target segments compute once per row:
// cpu_target_segments.h), so a row needs its LSE merged online and the p-weighted sum of its
// logits, both of which each column block adds to. A Neighbors row forms the logits of its k
// entries only.
//
// t-SNE's Cauchy kernel (student_t with nu = 1, alpha = 0: the kNN-graph embedding) forms no logit
// per pair at all: e^s = 1 / (1 + d^2) <= 1, so the LSE is the log of a sum of reciprocals with no
// running max (cpu_cauchy_rows.h), and its backward takes q = r e^{-LSE} and W = 2 G r from one
// reciprocal per pair (cauchy_learned_row_scaled, cauchy_learned_backward).
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_cauchy_rows.h"
#include "cpu_family_rows.h"
#include "cpu_global_rows.h"   // q_masses
#include "cpu_target_segments.h"
#include "cpu_tile_pairs.h"

namespace icon {
namespace cpu {

// Whether the rows of pb take the Cauchy reciprocals in this one sweep: student_t with one
// parameter nu = 1 and no uniform target mixture (alpha > 0 needs every logit's sum).
template <typename T>
bool cauchy_target_rows(const Problem<T>& pb) {
  return pb.kernel == kStudentT && pb.prm.template data_ptr<T>()[0] == T(1) && pb.alpha == T(0);
}

// sum_{j != self} s_j over a block, blocked as label_value_sums (before add_lse_segment sets
// s[self] to -inf).
template <typename T>
double valid_logit_sum(const T* s, const ColumnSpan& seg) {
  double out = 0;
  for (int64_t j0 = 0; j0 < seg.m; j0 += kSumBlock) {
    const int64_t j1 = std::min(seg.m, j0 + kSumBlock);
    T b = 0;
#pragma omp simd reduction(+ : b)
    for (int64_t j = j0; j < j1; ++j) b += j != seg.self ? s[j] : T(0);
    out += b;
  }
  return out;
}

// Adds row i's column block to its one-sweep statistics (acc: mx and se the LSE's, pos_s the sum
// of p s, sum_s the sum of the valid logits). ab: the block's Gram entries; s: its logits (unread
// when cauchy; then acc->mx stays 0 and se sums the reciprocals).
template <typename T, int K, typename Segs>
void add_target_kl_segment(const Segs& segs, int64_t i, const ColumnSpan& seg, const KernelRow<T, K>& k, const T* ab,
                           T* s, const T* col_sq, T row_sq, bool cauchy, OnlineLabelRow<T>* acc) {
  if (cauchy) {
    acc->pos_s += segs.p_dot(i, seg, [&](int64_t j) { return k.logit(k.aux(ab[j], row_sq, col_sq[j])); });
    acc->se += cauchy_reciprocal_sum<T>(ab, col_sq, row_sq, seg.self, seg.m);
    return;
  }
  acc->pos_s += segs.p_dot(i, seg, [&](int64_t j) { return s[j]; });
  if (segs.alpha > T(0)) acc->sum_s += valid_logit_sum<T>(s, seg);
  add_lse_segment<T>(seg, s, acc);
}

// The row's loss from its merged statistics and its unrounded LSE, in double; returns included
// (the row has target mass and a valid column), writes the loss (0 when left out).
template <typename T, typename Segs>
bool target_kl_row_loss(const Segs& segs, int64_t i, const OnlineLabelRow<T>& acc, double lse, bool kl, T* loss) {
  if (!(segs.has(i) && segs.m_valid > 0)) {
    *loss = T(0);
    return false;
  }
  const double b = double(segs.b);
  // sum_j p~ log q = (1 - alpha) sum p s + b sum s - LSE (b = 0: no uniform part, also where a
  // logit is -inf)
  const double cross = (1.0 - double(segs.alpha)) * acc.pos_s + (b > 0 ? b * acc.sum_s : 0.0) - lse;
  *loss = T(kl ? segs.entropy[i] - cross : -cross);
  return true;
}

// Joint normalisation (Dense, Neighbors, Labels with other column labels: segs divide by the joint
// total; a Labels row's pos_s is already p-weighted, family_sweeps): every row's loss from its
// one-sweep statistics under log Z, sum_j p~ (log p~ - s) + log Z sum_j p~ (cross-entropy without
// the first term), and the plain joint rows' stats (put_under_log_z's): log Z, Gamma_i = -sum_j p~,
// 0, the row's share of q. A NaN log Z makes every loss NaN, as the plain rows.
template <typename T, typename Segs>
void joint_target_kl_rows(const Problem<T>& pb, const Segs& segs, const std::vector<OnlineLabelRow<T>>& acc,
                          const std::vector<double>& lse, T log_z, RowOutputs<T>* out) {
  const int64_t n = pb.n;
  T* st = out->st;
  const std::vector<double> q_mass = q_masses(lse, log_z);
  const double b = double(segs.b), keep = 1.0 - double(segs.alpha);
  for (int64_t i = 0; i < n; ++i) {
    const bool inc = segs.has(i) && segs.m_valid > 0;
    const double mass = segs.p_mass[i];
    const double cross = keep * acc[i].pos_s + (b > 0 ? b * acc[i].sum_s : 0.0) - double(log_z) * mass;
    out->inc_p[i] = inc;
    out->loss_p[i] = std::isnan(log_z) ? log_z : inc ? T(pb.kl ? segs.entropy[i] - cross : -cross) : T(0);
    st[i] = log_z;
    st[n + i] = T(-mass);
    st[2 * n + i] = T(0);
    st[3 * n + i] = T(q_mass[i]);
  }
}

}  // namespace cpu
}  // namespace icon
