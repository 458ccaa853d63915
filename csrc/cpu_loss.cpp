// Fused CPU implementation of the I-Con loss ops icon_kernels::cpu_forward / cpu_backward
// (schemas in icon_kernels/backends/ops.py; math in DESIGN.md §1).
//
// Rows are processed in chunks of about kTileElements pairs. A chunk's Gram tile X_c Y^T comes
// from one GEMM (multithreaded by the BLAS) into a buffer reused by every chunk. Every per-pair
// quantity (logit, q, p, the gradient weight) is then computed in place, with the rows of the
// chunk split across threads by at::parallel_for while each row is in cache, by the row loops
// that cpu_row_paths.h picks for the combination (the two label hot paths, or the family rows of
// cpu_family_rows.h; no generic per-pair loop). The backward pass recomputes the tile from the
// saved row statistics and chains it with two more GEMMs: dX_c = W Y and dY += W^T X_c, so dY
// needs no per-thread copies. GEMMs stay outside the parallel region on purpose: BLAS calls from
// worker threads retained hundreds of MB here. Memory: a few tiles of kTileElements on top of the
// inputs and gradients.
//
// Accuracy: every per-row sum over the columns (LSE, the loss terms, the row statistics, the
// parameter and row sums of the backward) runs in blocks of columns in T and the blocks in
// double, so that rows of 2e5 columns keep fp32's own accuracy (csrc/README.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_cauchy_rows.h"
#include "cpu_f_label_rows.h"
#include "cpu_f_rows.h"
#include "cpu_family_rows.h"
#include "cpu_global_rows.h"
#include "cpu_label_rows.h"
#include "cpu_loss.h"
#include "divergence_math.h"
#include "op_checks.h"
#include "op_codes.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_affinity.h"
#include "cpu_symmetric_affinity_family.h"
#include "cpu_symmetric_joint.h"
#include "cpu_symmetric_joint_family.h"
#include "cpu_symmetric_label_family.h"
#include "cpu_symmetric_labels.h"
#include "tile_math.h"

namespace icon {
namespace {

using namespace cpu;

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem<T>& pb) {
  if (symmetric_labels_apply(pb)) return symmetric_label_forward<T>(pb);   // self mode: each tile pair once
  if (symmetric_label_family_apply(pb)) return symmetric_label_family_forward<T>(pb);   // beta > 0, f-divs, joint
  if (symmetric_affinity_apply(pb)) return symmetric_affinity_forward<T>(pb);
  if (symmetric_affinity_family_apply(pb)) return symmetric_affinity_family_forward<T>(pb);   // f-divs, alpha, beta, joint
  if (symmetric_joint_apply(pb)) return symmetric_joint_forward<T>(pb);       // joint t-SNE
  if (symmetric_joint_family_apply(pb)) return symmetric_joint_family_forward<T>(pb);   // joint f-divs, alpha, beta
  // (the symmetric Affinity backwards read a record in row 3: none from this forward)
  const bool row3_free = symmetric_affinity_fit(pb) || (symmetric_affinity_family_fit(pb) && !pb.joint);
  const int64_t n = pb.n, m = pb.m, rows = pb.chunk_rows();
  const RowPath path = pb.row_path();
  auto loss = at::zeros({n}, pb.x.options());
  auto included = at::zeros({n}, pb.x.options().dtype(at::kBool));
  auto stats = at::zeros({4, n}, pb.x.options());
  T* loss_p = loss.template data_ptr<T>();
  bool* inc_p = included.template data_ptr<bool>();
  T* st = stats.template data_ptr<T>();
  const T* prm = pb.prm.template data_ptr<T>();
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const T* y_sq = pb.y_sq.template data_ptr<T>();
  // joint normalisation and a symmetrised target: pass 1 over every row first
  const GlobalRows<T> gr = pb.global() ? global_rows<T>(pb, nullptr) : GlobalRows<T>{};
  // joint KL / cross-entropy without beta (Problem::defers_log_z): each row's LSE and loss under
  // it, put under log Z after the sweep
  const bool defer = pb.defers_log_z();
  std::vector<double> row_lse(defer ? n : 0), row_loss(defer ? n : 0), row_p_mass(defer ? n : 0);
  at::Tensor s_buf = tile_buffer(pb), t_buf = pb.target == kAffinity ? tile_buffer(pb) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    at::Tensor s_tile = gram<T>(s_buf, pb.x, r0, r1, pb.y);
    at::Tensor t_tile;
    if (pb.target == kAffinity) t_tile = gram<T>(t_buf, pb.z, r0, r1, pb.zc);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      // the target row; a symmetrised or Neighbors row's log p
      std::vector<T> p(m), lp(pb.symmetrize || pb.target == kNeighbors ? m : 0);
      std::vector<int64_t> pos_idx(path == kLabelClosedFormRows ? m : 0);   // a row's positives
      RowPathTally tally;
      for (int64_t i = i0; i < i1; ++i) {
        T* s = s_tile.template data_ptr<T>() + (i - r0) * m;
        const int64_t self = pb.exclude_self ? i : -1;
        // t-SNE's Cauchy kernel: the logits and their LSE in one pass (cpu_cauchy_rows.h)
        const bool cauchy = path == kFamilyRows && pb.kernel == kStudentT && prm[i] == T(1);
        const double cauchy_lse = cauchy ? cauchy_logits_lse<T>(s, s, y_sq, x_sq[i], self, m) : 0.0;
        if (!cauchy) row_logits<T>(pb.kernel, prm[i], s, s, y_sq, x_sq[i], m);
        switch (path) {
          case kLabelHotRows:
            inc_p[i] = fast_label_forward<T>(pb.label_row(i), s, pb.kl, &loss_p[i], &st[i]);
            ++tally.rows[kLabelHotRows];
            continue;
          case kLabelClosedFormRows:   // a row that is not finite falls to the family rows
            if (f_label_forward<T>(pb.divergence, pb.label_row(i), s, pos_idx.data(), &loss_p[i], &inc_p[i],
                                   &st[i], &st[n + i])) {
              ++tally.rows[kLabelClosedFormRows];
              continue;
            }
            break;
          case kFamilyRows:
            break;
          default:
            TORCH_CHECK(false, "icon_kernels cpu_forward: unknown row path ", int(path));
        }
        ++tally.rows[kFamilyRows];
        T lse;
        if (defer) {                     // the row's own LSE for now (0 when it is -inf: q = 0 there)
          row_lse[i] = cauchy ? cauchy_lse : simd_row_lse_wide<T>(s, self, m);
          lse = finite_shift(T(row_lse[i]));
        } else {
          lse = pb.joint ? gr.log_z : cauchy ? T(cauchy_lse) : simd_row_lse<T>(s, self, m);
        }
        T* tr = pb.target == kAffinity ? t_tile.template data_ptr<T>() + (i - r0) * m : nullptr;
        const TargetRow<T> tg = family_target_row<T>(pb, gr, i, tr, tr, lp.data(), p.data(), nullptr);
        const FRowSums f = f_row<T>(
            pb.divergence, pb.f_row(i, s, lse, p.data(), tg.t, tg.lse_p, tg.log_total, tg.label_divisor),
            pb.log_p_mode(), nullptr, nullptr);
        const bool inc = tg.has && pb.m_valid > 0;
        loss_p[i] = inc ? T(f.loss) : T(0);
        if (pb.joint && std::isnan(gr.log_z)) loss_p[i] = gr.log_z;   // NaN logits: NaN, even without p
        inc_p[i] = inc;
        if (defer) {
          row_loss[i] = f.loss;
          row_p_mass[i] = -f.gamma;     // sum_j p~ (forward KL's q g is -p~)
        }
        // the statistics rows of ops.py: LSE (log Z under joint normalisation); R (KL and
        // cross-entropy with beta > 0; f.gamma is -R there) or an f-divergence's Gamma (joint:
        // every divergence's sum_j q g); LSE^p; H = sum_j p h (KL: p f' = p (h + 1)) or an
        // f-divergence's Phi (joint: sum_j q, the row's share of the total q, GlobalRows::q_mass). The backward
        // recomputes the rest from its own row and reads log Z, LSE^p and (joint) the global
        // centre's sums from these.
        st[i] = lse;
        if (pb.joint || pb.f_div) st[n + i] = T(f.gamma);
        else if (pb.beta > 0) st[n + i] = T(-f.gamma);
        if (pb.target == kAffinity) st[2 * n + i] = pb.symmetrize ? gr.lse_p[i] : tg.lse_p;   // row i's own
        if (pb.joint && !defer) st[3 * n + i] = T(gr.q_mass[i]);   // (defer: put_under_log_z)
        else if (pb.target == kAffinity && !row3_free) st[3 * n + i] = T(pb.kl ? f.phi - f.p_sum : f.phi);
      }
      tally.add_to(0);
    });
  }
  if (defer) put_under_log_z<T>(pb, row_lse, row_loss, row_p_mass, loss_p, inc_p, st);
  return {loss, included, stats};
}


template <typename T>
std::vector<at::Tensor> backward_impl(const Problem<T>& pb, const at::Tensor& grad_rows,
                                      const at::Tensor& valid, const at::Tensor& stats_in,
                                      bool target_grad, bool param_grad, bool y_is_x) {
  // self mode with one autograd input: H = W + W^T per tile pair, dx only (cpu_symmetric_labels.h)
  // (the forward's schedule, as its stats record it: recorded_pair_block)
  if (y_is_x && !target_grad && symmetric_labels_fit(pb)) {
    const at::Tensor st_acc = stats_in.to(pb.x.scalar_type()).contiguous();
    const int64_t block = recorded_pair_block(st_acc.template data_ptr<T>(), pb.n, pb.n);
    if (block > 0) return symmetric_label_backward<T>(pb, grad_rows, valid, st_acc, param_grad, block);
  }
  // joint normalisation of a Dense or Neighbors target, or Labels with other column labels, in self
  // mode (cpu_symmetric_label_family.h: the plain joint stats, no record: either backward after
  // either forward, as the switch says now)
  if (y_is_x && !target_grad && !param_grad && pb.joint && symmetric_label_family_apply(pb))
    return symmetric_label_family_backward<T>(pb, grad_rows, valid, stats_in.to(pb.x.scalar_type()).contiguous(),
                                              false, pair_block(pb.tile, pb.n), std::vector<T>(size_t(pb.n), T(0)));
  // the rest of the Labels family in self mode (cpu_symmetric_label_family.h), after its forward
  if (y_is_x && !target_grad && !pb.joint && symmetric_label_family_fit(pb)) {
    const at::Tensor st_acc = stats_in.to(pb.x.scalar_type()).contiguous();
    std::vector<T> lo;
    const int64_t block = recorded_label_family_block(st_acc.template data_ptr<T>(), pb.n, &lo);
    if (block > 0) return symmetric_label_family_backward<T>(pb, grad_rows, valid, st_acc, param_grad, block, lo);
  }
  // SNE / t-SNE in self mode: H = W + W^T per tile pair (cpu_symmetric_affinity.h), after its forward
  if (y_is_x && !target_grad && !param_grad && symmetric_affinity_fit(pb)) {
    const at::Tensor st_acc = stats_in.to(pb.x.scalar_type()).contiguous();
    std::vector<T> lo_p;
    const int64_t block = recorded_affinity_block(st_acc.template data_ptr<T>(), pb.n, &lo_p);
    if (block > 0) return symmetric_affinity_backward<T>(pb, grad_rows, valid, st_acc, block, lo_p);
  }
  // joint normalisation of an Affinity target that is not symmetrised (cpu_symmetric_affinity_family.h:
  // the plain joint stats, no record, as the Dense and Neighbors joint rows above)
  if (y_is_x && !target_grad && !param_grad && pb.joint && symmetric_affinity_family_apply(pb))
    return symmetric_affinity_family_backward<T>(pb, grad_rows, valid, stats_in.to(pb.x.scalar_type()).contiguous(),
                                                 false, pair_block(pb.tile, pb.n), std::vector<T>());
  // the rest of the Affinity family in self mode (cpu_symmetric_affinity_family.h), after its forward
  if (y_is_x && !target_grad && !pb.joint && symmetric_affinity_family_fit(pb)) {
    const at::Tensor st_acc = stats_in.to(pb.x.scalar_type()).contiguous();
    std::vector<T> lo;
    const int64_t block = recorded_affinity_family_block(st_acc.template data_ptr<T>(), pb.n, &lo);
    if (block > 0)
      return symmetric_affinity_family_backward<T>(pb, grad_rows, valid, st_acc, param_grad, block, lo);
  }
  // joint t-SNE in self mode (cpu_symmetric_joint.h: the plain joint stats, no record)
  if (y_is_x && !target_grad && !param_grad && symmetric_joint_apply(pb))
    return symmetric_joint_backward<T>(pb, grad_rows, valid, stats_in.to(pb.x.scalar_type()).contiguous());
  // the rest of joint normalisation on a symmetrised target (cpu_symmetric_joint_family.h: the plain joint stats)
  if (y_is_x && !target_grad && !param_grad && symmetric_joint_family_apply(pb))
    return symmetric_joint_family_backward<T>(pb, grad_rows, valid, stats_in.to(pb.x.scalar_type()).contiguous());
  const int64_t n = pb.n, m = pb.m, d = pb.d, rows = pb.chunk_rows();
  const RowPath path = pb.row_path();
  const auto opts = pb.x.options();
  auto g_t = at::where(valid, grad_rows.to(opts.dtype()), at::zeros({}, opts)).contiguous();
  auto stats = stats_in.to(opts.dtype()).contiguous();
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const T* prm = pb.prm.template data_ptr<T>();
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const T* y_sq = pb.y_sq.template data_ptr<T>();
  const bool dist = is_distance(pb.kernel), t_dist = is_distance(pb.t_kernel);
  // G = 0 wherever q = 0 for the f-divergences (learned_backward's Q_ZERO_GRAD)
  const bool q_zero_grad = pb.f_div;
  const bool renormalise_q = pb.f_div || pb.beta > 0;
  // forward KL's and cross-entropy's dL/ds is q g = -p~ (times q / q~): log p only for the target's
  // own gradient (p f')
  const bool backward_reads_log_p = pb.f_div || target_grad;
  // t-SNE's Cauchy kernel where dL/ds needs no log q: one reciprocal per pair (cpu_cauchy_rows.h)
  const bool cauchy_rows = pb.kernel == kStudentT && !param_grad && !target_grad && !pb.f_div && pb.beta == T(0);
  TORCH_CHECK(!(pb.symmetrize && target_grad),
              "icon_kernels cpu_backward: a symmetrised target's z and parameters have no gradient here");
  const GlobalRows<T> gr = pb.global() ? global_rows<T>(pb, st) : GlobalRows<T>{};
  // joint normalisation: dL/ds_ij = (1 - beta) (g_i q_ij g_ij - q_ij C), C = sum_k g_k Gamma_k /
  // sum_k q_k over every row (s_ij moves every q through Z), from the forward's row sums
  const double centre = pb.joint ? joint_centre(g, st, n) : 0.0;   // (no valid pair at all: 0)
  // joint with one parameter: its per-row sums, centred once over every row at the end (only
  // the total of dL/ds is zero, not each row's)
  std::vector<double> joint_g_sum(pb.joint && param_grad ? n : 0), joint_q_basis(joint_g_sum.size()),
      joint_q_sum(joint_g_sum.size());
  auto dx = at::zeros({n, d}, opts), dy = at::zeros({m, d}, opts);
  // dL/dparam per row in double: a scalar parameter's gradient is their sum, rounded once
  auto dprm = at::zeros({n}, opts.dtype(at::kDouble)), colsum = at::zeros({m}, opts);
  at::Tensor dz, dzc, dtprm, t_colsum;
  if (target_grad) {
    dz = at::zeros({n, pb.dz}, opts);
    dzc = at::zeros({m, pb.dz}, opts);
    dtprm = at::zeros({n}, opts.dtype(at::kDouble));
    t_colsum = at::zeros({m}, opts);
  }
  at::Tensor w_buf = tile_buffer(pb), wt_buf = pb.target == kAffinity ? tile_buffer(pb) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows), nr = r1 - r0;
    at::Tensor w_tile = gram<T>(w_buf, pb.x, r0, r1, pb.y);     // Gram, then W in place
    at::Tensor wt_tile;
    if (pb.target == kAffinity) wt_tile = gram<T>(wt_buf, pb.z, r0, r1, pb.zc);
    auto w_rowsum = at::zeros({nr}, opts), wt_rowsum = at::zeros({nr}, opts);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> p(m), s_row(m), t_row(pb.target == kAffinity ? m : 0), q_row(m), qg(m), pf(m);   // q, q g, p f'
      std::vector<T> lp(pb.symmetrize || pb.target == kNeighbors ? m : 0);   // a symmetrised or Neighbors row's log p
      std::vector<int64_t> pos_idx(path == kLabelClosedFormRows ? m : 0);   // a row's positives and
      std::vector<double> pos_s(path == kLabelClosedFormRows ? m : 0);      // their logits
      double* dprm_p = dprm.template data_ptr<double>();
      T* w_rs = w_rowsum.template data_ptr<T>();
      RowPathTally tally;
      for (int64_t i = i0; i < i1; ++i) {
        T* w = w_tile.template data_ptr<T>() + (i - r0) * m;
        T* tr = pb.target == kAffinity ? wt_tile.template data_ptr<T>() + (i - r0) * m : nullptr;
        const T lse = st[i];
        // a dot or Gaussian parameter's basis s - shift: the row's LSE; under joint normalisation
        // log Z for one parameter (the shifts cancel over all rows) and none for one per row
        const T shift = pb.joint && !pb.scalar_param ? T(0) : finite_shift(lse);
        // joint: a row without upstream gradient still moves Z (its q C part)
        const bool moves_z = pb.joint && centre != 0 && pb.m_valid > 0;
        if (g[i] == T(0) && !moves_z) {  // left out, or zero upstream gradient: no contribution
          std::fill(w, w + m, T(0));
          if (tr) std::fill(tr, tr + m, T(0));
          continue;
        }
        switch (path) {
          case kLabelHotRows: {
            const LabelRow row = pb.label_row(i);
            const bool dot = pb.kernel == kDot;
            const int64_t k = label_count(row);
            LabelGradSums sums = dot ? fast_label_backward<T, kDot>(row, k, w, y_sq, x_sq[i], prm[i], lse, g[i])
                                     : fast_label_backward<T, kGaussian>(row, k, w, y_sq, x_sq[i], prm[i], lse, g[i]);
            if (dot) renormalise_label_row<T, kDot>(row, k, w, prm[i], g[i], &sums);
            else renormalise_label_row<T, kGaussian>(row, k, w, prm[i], g[i], &sums);
            const double scale =
                dot ? fast_param_scale<double, kDot>(prm[i]) : fast_param_scale<double, kGaussian>(prm[i]);
            dprm_p[i] = scale * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
            w_rs[i - r0] = T(sums.row_sum);
            ++tally.rows[kLabelHotRows];
            continue;
          }
          case kLabelClosedFormRows: {   // one SIMD pass, closed forms over the negatives; a row
            LabelGradSums sums;          // that is not finite falls to the family rows
            if (f_label_backward<T>(pb.divergence, pb.kernel, pb.label_row(i), w, y_sq, x_sq[i], prm[i], lse, g[i],
                                    pos_idx.data(), pos_s.data(), &sums)) {
              dprm_p[i] = param_scale<double>(pb.kernel, prm[i]) *
                          centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
              w_rs[i - r0] = T(sums.row_sum);
              ++tally.rows[kLabelClosedFormRows];
              continue;
            }
            break;
          }
          case kFamilyRows:
            break;
          default:
            TORCH_CHECK(false, "icon_kernels cpu_backward: unknown row path ", int(path));
        }
        // the family rows (cpu_family_rows.h): logits, renormalised LSE, target row, divergence
        // terms, then W in place of the Gram row
        ++tally.rows[kFamilyRows];
        const int64_t self = pb.exclude_self ? i : -1;
        const bool cauchy = cauchy_rows && prm[i] == T(1);
        if (cauchy) cauchy_reciprocals<T>(w, s_row.data(), y_sq, x_sq[i], self, m);   // r, not s
        else row_logits<T>(pb.kernel, prm[i], w, s_row.data(), y_sq, x_sq[i], m);
        // q renormalised over the row where G depends on q itself (f-divergences, beta > 0);
        // forward KL and cross-entropy take G = g (q Gamma' - p~) with Gamma' = sum p~ / sum q,
        // which renormalises q by itself (learned_backward)
        // (joint: log Z, as the forward's, whose row sums make the centre)
        const T lse_q = renormalise_q && !pb.joint ? renormalised_lse<T>(s_row.data(), lse, self, m) : lse;
        const bool affinity = pb.target == kAffinity;
        const T tp = affinity ? pb.t_prm.template data_ptr<T>()[i] : T(1);
        const TargetRow<T> tg = family_target_row<T>(pb, gr, i, tr, t_row.data(), lp.data(), p.data(),
                                                     affinity ? &st[2 * n + i] : nullptr, backward_reads_log_p);
        const FRowSums f = cauchy
            ? cauchy_learned_row<T>(s_row.data(), lse_q, p.data(), self, m, pb.alpha, pb.mix_size(), q_row.data(),
                                    qg.data())
            : f_row<T>(pb.divergence,
                       pb.f_row(i, s_row.data(), lse_q, p.data(), tg.t, tg.lse_p, tg.log_total, tg.label_divisor),
                       pb.log_p_mode(), qg.data(), target_grad ? pf.data() : nullptr, q_row.data());
        // Gamma as the q-weighted mean of g over these very q: sum_j G = 0 up to their rounding;
        // joint: the global centre, with g_i moved into q g
        double gamma = f.q_sum > 0 ? f.gamma / f.q_sum : f.gamma;
        T scale = g[i] * (T(1) - pb.beta);
        if (pb.joint) {
          fold_joint_upstream(qg.data(), m, g[i]);
          gamma = centre;
          scale = T(1) - pb.beta;
        }
        // the self column's Gram entry: any finite value (G is 0 there), so that a row whose
        // distances overflow (|x_i|^2 = inf) takes no inf - inf = NaN distance into W
        if (self >= 0) w[self] = T(0);
        if (cauchy) {                    // no dof gradient, no target gradient (cauchy_rows)
          w_rs[i - r0] = T(cauchy_learned_backward<T>(w, s_row.data(), q_row.data(), qg.data(), m, scale, gamma));
          continue;
        }
        const LabelGradSums sums = with_kernel(pb.kernel, [&](auto code) {
          constexpr int K = decltype(code)::value;
          return with_bool(param_grad, [&](auto with_param) {
            return with_bool(q_zero_grad, [&](auto zero_at_q0) {
              return learned_backward<T, K, decltype(with_param)::value, decltype(zero_at_q0)::value>(
                  KernelRow<T, K>(prm[i]), w, s_row.data(), q_row.data(), qg.data(), y_sq, x_sq[i], m, scale,
                  gamma, shift);
            });
          });
        });
        if (param_grad && pb.joint) {
          dprm_p[i] = param_scale<double>(pb.kernel, prm[i]) * sums.dp;
          joint_g_sum[i] = sums.g_sum;
          joint_q_basis[i] = sums.q_basis;
          joint_q_sum[i] = sums.q_sum;
        } else if (param_grad) {
          dprm_p[i] = param_scale<double>(pb.kernel, prm[i]) * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
        }
        w_rs[i - r0] = T(sums.row_sum);
        if (target_grad && g[i] == T(0)) {   // joint: this row moved Z only
          std::fill(tr, tr + m, T(0));
        } else if (target_grad) {
          // G^t = g (1 - alpha) (p f' - p Phi), Phi = sum_j p f' / sum_j p of this very row in
          // double (the saved fp32 statistic's rounding would come back times the p-mean of
          // z_cols - z_i: dL/dz is a p-weighted covariance)
          const double phi = f.p_sum > 0 ? f.phi / f.p_sum : 0.0;
          const T scale_t = g[i] * (T(1) - pb.alpha);
          const LabelGradSums tsums = with_kernel(pb.t_kernel, [&](auto code) {
            constexpr int TK = decltype(code)::value;
            return target_backward<T, TK, true>(KernelRow<T, TK>(tp), tr, t_row.data(), p.data(), pf.data(),
                                                pb.zc_sq.template data_ptr<T>(), pb.z_sq.template data_ptr<T>()[i],
                                                m, scale_t, phi, finite_shift(tg.lse_p));
          });
          dtprm.template data_ptr<double>()[i] =
              param_scale<double>(pb.t_kernel, tp) * centred_sum(tsums.dp, tsums.g_sum, tsums.q_basis, tsums.q_sum);
          wt_rowsum.template data_ptr<T>()[i - r0] = T(tsums.row_sum);
        }
      }
      tally.add_to(1);
    });
    auto x_blk = pb.x.narrow(0, r0, nr);
    auto dx_blk = dx.narrow(0, r0, nr);
    at::mm_out(dx_blk, w_tile, pb.y);
    if (dist) dx_blk -= w_rowsum.unsqueeze(1) * x_blk;
    dy.addmm_(w_tile.t(), x_blk);
    if (dist) colsum += w_tile.sum(0);
    if (target_grad) {
      auto z_blk = pb.z.narrow(0, r0, nr);
      auto dz_blk = dz.narrow(0, r0, nr);
      at::mm_out(dz_blk, wt_tile, pb.zc);
      if (t_dist) dz_blk -= wt_rowsum.unsqueeze(1) * z_blk;
      dzc.addmm_(wt_tile.t(), z_blk);
      if (t_dist) t_colsum += wt_tile.sum(0);
    }
  }
  if (pb.joint && param_grad && pb.scalar_param) {   // the one centring over every row (centred_sum)
    double g_sum = 0, q_basis = 0, q_sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      g_sum += joint_g_sum[i];
      q_basis += joint_q_basis[i];
      q_sum += joint_q_sum[i];
    }
    if (q_sum > 0) dprm.template data_ptr<double>()[0] -= param_scale<double>(pb.kernel, prm[0]) * g_sum * (q_basis / q_sum);
  }
  if (dist) dy -= colsum.unsqueeze(1) * pb.y;
  if (target_grad && t_dist) dzc -= t_colsum.unsqueeze(1) * pb.zc;
  return {dx, dy, dprm, dz, dzc, dtprm};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(ICON_FORWARD_PARAMS) {
  const NoAutocast no_autocast;
  check_forward_args(ICON_FORWARD_ARGS);
  if (x.scalar_type() == at::kDouble) return forward_impl<double>(Problem<double>(ICON_FORWARD_ARGS));
  return forward_impl<float>(Problem<float>(ICON_FORWARD_ARGS));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor& grad_rows, ICON_FORWARD_PARAMS, const at::Tensor& valid,
    const at::Tensor& stats, bool need_target_grad, bool need_param_grad, bool y_is_x) {
  const NoAutocast no_autocast;
  check_backward_args(grad_rows, ICON_FORWARD_ARGS, valid, stats);
  const bool target_grad = need_target_grad && target == "affinity";
  std::vector<at::Tensor> g = x.scalar_type() == at::kDouble
      ? backward_impl<double>(Problem<double>(ICON_FORWARD_ARGS), grad_rows, valid, stats, target_grad, need_param_grad,
                              y_is_x)
      : backward_impl<float>(Problem<float>(ICON_FORWARD_ARGS), grad_rows, valid, stats, target_grad, need_param_grad,
                             y_is_x);
  return backward_outputs(g, ICON_FORWARD_ARGS, target_grad);
}

}  // namespace icon
