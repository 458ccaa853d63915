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
// through LSE_i != LSE_j). Memory: two tiles of pair_block^2 entries. The tile-pair driver and
// its exactness rule are cpu_tile_pairs.h's (the bidirectional ops share the rule and the row
// statistics, not the driver).
//
// It runs when the row path is the label hot path (cpu_row_paths.h), x and y are the same
// tensor (the columns' labels may be other than the rows': each row reads its own target, so only
// s_ij = s_ji is shared), the parameter is one scalar (a per-row temperature breaks s_ij = s_ji)
// and ICON_KERNELS_SYMMETRIC is not "0" (the off switch, read at every forward, for benchmarks to
// time both schedules in one process). The backward follows its
// forward's schedule (recorded in the stats) and also needs y_is_x.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_problem.h"
#include "cpu_row_paths.h"
#include "cpu_tile_pairs.h"

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

// Calls of the tile-pair schedules since the last read: the symmetric schedule's forward (0) and
// backward (1), the bidirectional ops' (2, 3; cpu_bidirectional_labels.cpp), the symmetric
// Affinity schedule's (4, 5; cpu_symmetric_affinity.h), joint t-SNE's (6, 7;
// cpu_symmetric_joint.h), the label family schedule's (8, 9; cpu_symmetric_label_family.h), the
// Affinity family schedule's (10, 11; cpu_symmetric_affinity_family.h) and the family schedule's on
// Dense and Neighbors targets (12, 13; cpu_symmetric_label_family.h as well); 14 counts the
// Affinity family schedules' sweeps that took t-SNE's Cauchy weights (pass 1, the joint one's too; pass 2 and
// the backward under cauchy_tv_rows), so that a test sees a silent fallback to the generic rows;
// 15 counts the joint schedules' sweeps (forward and backward; joint t-SNE's and the joint family's)
// that took both sides' p of a pair from one exp (cpu_symmetric_joint.h: pair_factors); 16 and 17 the joint family schedule's forward and
// backward (cpu_symmetric_joint_family.h); 18 the Affinity family schedule's sweeps over a symmetrised
// target's row masses (cpu_symmetric_affinity_family.h: symmetrised_masses, forward and backward).
// _C.cpu_symmetric_counts() reads and resets them, so a test sees which schedule ran.
constexpr int kSymmetricCounters = 19;
constexpr int kCauchySweepCounter = 14;
constexpr int kJointOneExpCounter = 15;
constexpr int kJointFamilyForwardCounter = 16;
constexpr int kJointFamilyBackwardCounter = 17;
constexpr int kSymmetrisedMassCounter = 18;
inline std::atomic<int64_t>* symmetric_schedule_counters() {
  static std::atomic<int64_t> counters[kSymmetricCounters];
  return counters;
}

// Counts one call of a tile-pair schedule: its n rows as run by row path `path` in pass `pass` (0
// forward, 1 backward; cpu_row_paths.h's counters) and the call in slot `counter` above.
inline void count_schedule_call(int path, int64_t n, int pass, int counter) {
  RowPathTally tally;
  tally.rows[path] = n;
  tally.add_to(pass);
  symmetric_schedule_counters()[counter].fetch_add(1, std::memory_order_relaxed);
}

// Whether the columns' labels are the rows' (the same tensor, or equal values).
template <typename T>
bool same_row_and_column_labels(const Problem<T>& pb) {
  return pb.labels.data_ptr() == pb.col_labels.data_ptr() || at::equal(pb.labels, pb.col_labels);
}

// Whether pb has the symmetric label schedule's structure: self mode on the label hot path, one
// scalar parameter. The columns' labels may differ from the rows': each row of a tile pair reads
// its own label against the other block's column labels (LabelSide::segment), so p_ij != p_ji
// needs no transposed view.
template <typename T>
bool symmetric_labels_fit(const Problem<T>& pb) {
  return pb.self_pairs && pb.scalar_param && pb.row_path() == kLabelHotRows && pb.n >= 2;
}

// Whether the forward of pb runs the symmetric label schedule.
template <typename T>
bool symmetric_labels_apply(const Problem<T>& pb) {
  return symmetric_labels_fit(pb) && symmetric_schedule_enabled();
}

template <typename T>
TilePair<T> self_tile_pair(const Problem<T>& pb) {
  const LabelSide<T> side{pb.x, pb.x_sq.template data_ptr<T>(), pb.labels.template data_ptr<int64_t>(),
                          pb.col_labels.template data_ptr<int64_t>(), pb.m_valid, double(pb.alpha), pb.exclude_self};
  return {side, pb.kernel, pb.prm.template data_ptr<T>()[0]};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_forward(const Problem<T>& pb) {
  const int64_t block = pair_block(pb.tile, pb.n);
  const TilePair<T> tp = self_tile_pair(pb);
  auto out = finish_label_side(tp.side, tile_pair_statistics(tp, block), pb.kl, block);
  count_schedule_call(kLabelHotRows, pb.n, 0, 0);
  return out;
}

// stats: the forward's, in T and contiguous; block: the forward's (recorded_pair_block).
template <typename T>
std::vector<at::Tensor> symmetric_label_backward(const Problem<T>& pb, const at::Tensor& grad_rows,
                                                 const at::Tensor& valid, const at::Tensor& stats,
                                                 bool param_grad, int64_t block) {
  const TilePair<T> tp = self_tile_pair(pb);
  const at::Tensor g = masked_grads(grad_rows, valid, pb.x.options());
  SideGrads<T> out = side_grads(tp.side, pb.n, g, stats, param_grad);
  tile_pair_backward(tp, block, out, param_grad);
  count_schedule_call(kLabelHotRows, pb.n, 1, 1);
  return {out.dfeat, at::zeros({pb.m, pb.d}, pb.x.options()), param_grads(out, pb.kernel, tp.prm),
          at::Tensor(), at::Tensor(), at::Tensor()};
}

}  // namespace cpu
}  // namespace icon
