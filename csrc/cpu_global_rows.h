// Rows that need statistics of every row before their own (DESIGN.md §1.2):
//   joint normalisation   one q over all valid pairs, q_ij = e^{s_ij} / Z with
//                         log Z = logsumexp_i LSE_i, and p the target's weights over their total
//                         on every pair (an Affinity target's rows p(j|i) over the number of rows);
//   a symmetrised target  an Affinity target's p_ij from (p_{j|i} + p_{i|j}) / 2, where p_{i|j}
//                         needs row j's LSE^p; renormalised per row (conditional) or over all
//                         pairs (joint).
// Pass 1 (global_rows) makes these statistics over every row chunk; then the family rows of the
// forward and the backward (cpu_loss.cpp) read them through family_target_row. A row is still
// one row of the tile: the statistics are O(N), never N x N.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_family_rows.h"
#include "cpu_problem.h"

namespace icon {
namespace cpu {

template <typename T>
struct GlobalRows {
  T log_z = 0;                 // joint: log Z rounded to T (every row's saved LSE)
  double target_total = 0;     // joint, not Affinity: the target's weights summed over every valid pair
  bool some_p = true;          // joint: some pair has p (else every row is left out, loss 0)
  std::vector<T> lse_p;        // a symmetrised target: LSE^p of every row, as the forward saved it
  // joint forward: each row's share of q, sum_j e^{s_ij - log Z} = e^{LSE_i - log Z} with the
  // T-rounded log Z that its q take (forward KL without beta computes no q per pair)
  std::vector<double> q_mass;
};

// log Z = logsumexp of the row LSEs: NaN if one is, -inf without a valid pair.
inline double log_sum_exp(const std::vector<double>& lse) {
  double top = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (double v : lse) {
    nan |= std::isnan(v);
    top = v > top ? v : top;
  }
  if (nan) return std::numeric_limits<double>::quiet_NaN();
  if (!std::isfinite(top)) return top;
  double se = 0;
  for (double v : lse) se += std::exp(v - top);
  return top + std::log(se);
}

// Each row's share of q, e^{LSE_i - log Z}, with the T-rounded log Z its q take.
template <typename T>
std::vector<double> q_masses(const std::vector<double>& lse, T log_z) {
  std::vector<double> out(lse.size());
  for (size_t i = 0; i < lse.size(); ++i)
    out[i] = lse[i] == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(lse[i] - double(log_z));
  return out;
}

// The joint centre C = sum_k g_k Gamma_k / sum_k q_k over every row from the joint stats (row 1
// Gamma_k = sum_j q g, -sum_j P~ under forward KL; row 3 the row's share of q): s_ij moves every q
// through Z. 0 without a valid pair (not 0 / 0).
template <typename T>
double joint_centre(const T* g, const T* st, int64_t n) {
  double num = 0, q_total = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (g[i] != T(0)) num += double(g[i]) * double(st[n + i]);
    q_total += double(st[3 * n + i]);
  }
  return q_total > 0 ? num / q_total : 0.0;
}

// Joint normalisation's dL/ds of row i as learned_backward takes it: g_i folded into the row's q g
// (m entries), so that scale (q g - q Gamma) with scale 1 - beta and Gamma = C (joint_centre) is
// (1 - beta) (g_i q g - q C).
template <typename T>
inline void fold_joint_upstream(T* qg, int64_t m, T gi) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) qg[j] *= gi;
}

// Joint forward KL or cross-entropy without beta (Problem::defers_log_z): the rows' losses under
// their own LSE_i (0 where LSE_i = -inf) put under log Z, L_i += (log Z - LSE_i) sum_j p~_ij, and
// the statistics the backward reads: log Z, Gamma_i = -sum_j p~ and the row's share of q.
template <typename T>
void put_under_log_z(const Problem<T>& pb, const std::vector<double>& row_lse, const std::vector<double>& row_loss,
                     const std::vector<double>& p_mass, T* loss, const bool* included, T* st) {
  const int64_t n = pb.n;
  const double log_z = log_sum_exp(row_lse);
  const T log_z_t = T(log_z);
  const std::vector<double> q_mass = q_masses(row_lse, log_z_t);
  for (int64_t i = 0; i < n; ++i) {
    const double shift = double(finite_shift(T(row_lse[i])));
    const double moved = p_mass[i] == 0 ? 0.0 : (log_z - shift) * p_mass[i];
    loss[i] = std::isnan(log_z) ? T(log_z) : included[i] ? T(row_loss[i] + moved) : T(0);
    st[i] = log_z_t;
    st[n + i] = T(-p_mass[i]);
    st[3 * n + i] = T(q_mass[i]);
  }
}

// The statistics of pass 1. The forward computes them (stats == nullptr); the backward reads
// log Z and LSE^p from its forward's stats rows 0 and 2 and recounts the target's total (one pass
// over each target row: no Gram).
template <typename T>
GlobalRows<T> global_rows(const Problem<T>& pb, const T* stats) {
  GlobalRows<T> gr;
  const int64_t n = pb.n, m = pb.m, rows = pb.chunk_rows();
  const bool affinity = pb.target == kAffinity;
  const bool lse_pass = pb.joint && stats == nullptr && !pb.defers_log_z();
  std::vector<double> lse(lse_pass ? n : 0), mass(pb.joint && !affinity ? n : 0);
  // only a symmetrised row reads other rows' LSE^p: a plain Affinity row computes its own (or
  // reads its saved one)
  if (pb.symmetrize) gr.lse_p.resize(n);
  if (stats != nullptr) {
    gr.log_z = stats[0];
    if (pb.symmetrize) std::copy(stats + 2 * n, stats + 3 * n, gr.lse_p.begin());
  }
  // a plain Affinity row's p(j|i) is its own; a symmetrised one needs every row's LSE^p
  const bool target_gram = pb.symmetrize && stats == nullptr;
  if (lse_pass || target_gram || !mass.empty()) {
    at::Tensor s_buf = lse_pass ? tile_buffer(pb) : at::Tensor();
    at::Tensor t_buf = target_gram ? tile_buffer(pb) : at::Tensor();
    const T* prm = pb.prm.template data_ptr<T>();
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
      const int64_t r1 = std::min(n, r0 + rows);
      at::Tensor s_tile = lse_pass ? gram<T>(s_buf, pb.x, r0, r1, pb.y) : at::Tensor();
      at::Tensor t_tile = target_gram ? gram<T>(t_buf, pb.z, r0, r1, pb.zc) : at::Tensor();
      at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
        std::vector<T> p(mass.empty() ? 0 : m);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t self = pb.exclude_self ? i : -1;
          if (lse_pass) {
            T* s = s_tile.template data_ptr<T>() + (i - r0) * m;
            row_logits<T>(pb.kernel, prm[i], s, s, pb.y_sq.template data_ptr<T>(),
                          pb.x_sq.template data_ptr<T>()[i], m);
            lse[i] = simd_row_lse_wide<T>(s, self, m);
          }
          if (target_gram) {
            T* t = t_tile.template data_ptr<T>() + (i - r0) * m;
            row_logits<T>(pb.t_kernel, pb.t_prm.template data_ptr<T>()[i], t, t, pb.zc_sq.template data_ptr<T>(),
                          pb.z_sq.template data_ptr<T>()[i], m);
            gr.lse_p[i] = simd_row_lse<T>(t, self, m);
          }
          if (!mass.empty()) {
            int64_t count = -1;
            target_row<T>(pb, i, p.data(), &count, &mass[i]);
          }
        }
      });
    }
  }
  if (lse_pass) {
    gr.log_z = T(log_sum_exp(lse));
    gr.q_mass = q_masses(lse, gr.log_z);
  }
  if (!mass.empty()) {
    double total = 0;
    for (double v : mass) total += v;
    gr.target_total = total;
    gr.some_p = total != 0;   // a NaN total keeps the rows, so NaN inputs give a NaN loss
  }
  return gr;
}

// lp[j] = (p_{j|i} + p_{i|j}) / 2 over j != self (0 at self), two exps and no log: the rows that
// read p only (symmetric_log_p's arguments).
template <typename T>
inline void symmetric_p(const T* t, T lse_i, T* lp, const T* lse_p, int64_t self, int64_t m) {
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) lp[j] = T(0.5) * (vexp(t[j] - lse_i) + vexp(lp[j] - lse_p[j]));
  if (self >= 0) lp[self] = T(0);
}

// lp[j] = log((p_{j|i} + p_{i|j}) / 2) over j != self (-inf at self), exact where either p
// underflows: from the row's logits t (t_ij), lp holding the column side's t_ji on entry, and
// the LSE^p of row i and of every row. A NaN on either side gives NaN.
template <typename T>
inline void symmetric_log_p(const T* t, T lse_i, T* lp, const T* lse_p, int64_t self, int64_t m) {
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  const T log2 = T(0.69314718055994530942);
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const T a = t[j] - lse_i, b = lp[j] - lse_p[j];
    const T hi = a > b ? a : b, lo = a > b ? b : a;
    const T r = hi == -inf ? -inf : hi + vlog1p(vexp(lo - hi)) - log2;
    lp[j] = (a != a || b != b) ? nan : r;
  }
  if (self >= 0) lp[self] = -inf;
}

// The log p~ row of a Neighbors row i (kSparseLogP) into lp: log(alpha / M') everywhere (-inf for
// alpha = 0), then log((1 - alpha) p + alpha / M') at each entry, as f_row forms p~ from p.
template <typename T>
inline void neighbor_log_p(const Problem<T>& pb, int64_t i, const T* p, T* lp) {
  const int64_t m = pb.m, self = pb.exclude_self ? i : -1, k = pb.nbr_index.size(1);
  const T b = pb.alpha / pb.mix_size(), keep = T(1) - pb.alpha;
  std::fill(lp, lp + m, b > T(0) ? T(std::log(b)) : -std::numeric_limits<T>::infinity());
  const int64_t* idx = pb.nbr_index.template data_ptr<int64_t>() + i * k;
  for (int64_t c = 0; c < k; ++c)
    if (idx[c] >= 0 && idx[c] < m && idx[c] != self) {
      const T pm = keep * p[idx[c]] + b;
      lp[idx[c]] = pm == T(0) ? -std::numeric_limits<T>::infinity() : std::log(pm);
    }
}

// Row i's target as f_row reads it: p (0 off the valid set), and for Affinity the logits t
// (or a symmetrised row's exact log p) with the shifts that make log p from them.
template <typename T>
struct TargetRow {
  bool has = true;             // the row has a target (else it is left out)
  const T* t = nullptr;
  T lse_p = 0;
  double log_total = 0;        // log of what p was divided by beyond exp(t - lse_p)
  double label_divisor = 0;    // Labels: what a positive's weight 1 was divided by
};

// Row i's target under the problem's normalisation into p. ab: an Affinity row's Gram entries
// z_i . z_cols, read before t_out is written (t_out may be ab); lp: m values of scratch for a
// symmetrised row; saved_lse_p: the row's LSE^p when its forward saved it (nullptr: from gr, or
// computed here). need_log_p: whether f_row reads log p (a symmetrised row without it has no
// t, and takes no log per pair).
template <typename T>
TargetRow<T> family_target_row(const Problem<T>& pb, const GlobalRows<T>& gr, int64_t i, const T* ab, T* t_out,
                               T* lp, T* p, const T* saved_lse_p, bool need_log_p = true) {
  const int64_t m = pb.m, self = pb.exclude_self ? i : -1;
  TargetRow<T> out;
  if (pb.target != kAffinity) {
    int64_t count = -1;
    out.has = target_row<T>(pb, i, p, &count, nullptr, pb.joint ? gr.target_total : 0.0);
    out.label_divisor = pb.joint ? gr.target_total : double(count);
    if (pb.joint) out.has = gr.some_p;   // a row without weights still has q in the one distribution
    if (pb.target == kNeighbors) {       // kSparseLogP: log p~ at the k entries, log(alpha / M') off them
      if (need_log_p) neighbor_log_p<T>(pb, i, p, lp);
      out.t = lp;                        // (unread without need_log_p: still a valid row)
    }
    return out;
  }
  const T* t_prm = pb.t_prm.template data_ptr<T>();
  const T* zc_sq = pb.zc_sq.template data_ptr<T>();
  const T z_sq = pb.z_sq.template data_ptr<T>()[i];
  out.has = pb.m_valid > 0;
  if (pb.symmetrize) {
    column_logits<T>(pb.t_kernel, t_prm, ab, lp, zc_sq, z_sq, m);
    row_logits<T>(pb.t_kernel, t_prm[i], ab, t_out, zc_sq, z_sq, m);
    // p (or log p) before dividing by the row's symmetrised mass (conditional) or the number of
    // rows (joint)
    if (need_log_p) symmetric_log_p<T>(t_out, gr.lse_p[i], lp, gr.lse_p.data(), self, m);
    else symmetric_p<T>(t_out, gr.lse_p[i], lp, gr.lse_p.data(), self, m);
    double log_scale = std::log(double(pb.n));
    if (!pb.joint) {
      double mass = 0;
      for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
        const int64_t j1 = std::min(m, j0 + kSumBlock);
        T bm = 0;
        if (need_log_p) {
#pragma omp simd reduction(+ : bm)
          for (int64_t j = j0; j < j1; ++j) bm += vexp(lp[j]);
        } else {
#pragma omp simd reduction(+ : bm)
          for (int64_t j = j0; j < j1; ++j) bm += lp[j];
        }
        mass += bm;
      }
      log_scale = mass > 0 ? std::log(mass) : 0.0;
    }
    if (need_log_p) {
      const T shift = T(-log_scale);
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) p[j] = vexp(lp[j] + shift);
      out.t = lp;
    } else {
      const T inv = T(std::exp(-log_scale));
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) p[j] = lp[j] * inv;
      out.t = lp;   // p, not log p: a valid row that f_row's unread log p may load from
    }
    out.log_total = log_scale;
    return out;
  }
  row_logits<T>(pb.t_kernel, t_prm[i], ab, t_out, zc_sq, z_sq, m);
  out.lse_p = saved_lse_p != nullptr ? *saved_lse_p : simd_row_lse<T>(t_out, self, m);
  out.log_total = affinity_row<T>(t_out, out.lse_p, self, m, p, pb.joint ? double(pb.n) : 1.0);
  if (pb.joint) out.log_total += std::log(double(pb.n));
  out.t = t_out;
  return out;
}

}  // namespace cpu
}  // namespace icon
