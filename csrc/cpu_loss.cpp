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

#include "cpu_f_label_rows.h"
#include "cpu_f_rows.h"
#include "cpu_family_rows.h"
#include "cpu_label_rows.h"
#include "cpu_loss.h"
#include "divergence_math.h"
#include "op_checks.h"
#include "op_codes.h"
#include "cpu_row_paths.h"
#include "tile_math.h"

namespace icon {
namespace {

constexpr int64_t kTileElements = 1 << 21;   // entries of one chunk's Gram tile

// ICON_KERNELS_CPU_TILE_ELEMENTS overrides kTileElements (read at every call): the tests force
// many ragged row chunks on small problems with it (tests/test_cpu_row_chunks.py).
int64_t tile_elements() {
  const char* env = std::getenv("ICON_KERNELS_CPU_TILE_ELEMENTS");
  if (env == nullptr || *env == '\0') return kTileElements;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0,
              "ICON_KERNELS_CPU_TILE_ELEMENTS must be a positive integer, got '", env, "'");
  return v;
}

at::Tensor per_row(const at::Tensor& p, int64_t n, at::ScalarType acc) {
  return p.to(acc).expand({n}).contiguous();
}

// The op's arguments, converted once to the accumulation type and made contiguous.
template <typename T>
struct Problem {
  int64_t n, m, d, dz = 0, m_valid;
  int kernel, target, t_kernel, divergence;
  T alpha, beta;
  bool exclude_self, kl, f_div;   // forward KL (entropy term); an f-divergence of DESIGN.md §1.1
  at::Tensor x, y, x_sq, y_sq, prm, labels, col_labels, nbr_index, nbr_weight, dense, z, zc,
      z_sq, zc_sq, t_prm;

  Problem(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& param,
          c10::string_view kernel_name, c10::string_view target_name,
          const c10::optional<at::Tensor>& row_labels, const c10::optional<at::Tensor>& col_lab,
          const c10::optional<at::Tensor>& nbr_idx, const c10::optional<at::Tensor>& nbr_w,
          const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& z_cols,
          const c10::optional<at::Tensor>& t_param, c10::string_view t_kernel_name,
          const c10::optional<at::Tensor>& dense_p, double alpha_, double beta_, bool excl,
          int64_t divergence_) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    n = x_in.size(0);
    m = y_in.size(0);
    d = x_in.size(1);
    m_valid = m - (excl ? 1 : 0);
    kernel = kernel_code(kernel_name);
    target = target_code(target_name);
    t_kernel = kernel_code(t_kernel_name);
    alpha = T(alpha_);
    beta = T(beta_);
    exclude_self = excl;
    divergence = int(divergence_);
    kl = divergence == kKl;
    f_div = is_f_divergence(divergence);
    x = x_in.to(acc).contiguous();
    y = y_in.to(acc).contiguous();
    const bool distance = is_distance(kernel);   // only distance kernels need norms
    x_sq = distance ? x.square().sum(1) : at::zeros({n}, x.options());
    y_sq = distance ? y.square().sum(1) : at::zeros({m}, y.options());
    prm = per_row(param, n, acc);
    if (target == kLabels) {
      TORCH_CHECK(row_labels.has_value() && col_lab.has_value(), "labels target needs row and column labels");
      labels = row_labels->to(at::kLong).contiguous();
      col_labels = col_lab->to(at::kLong).contiguous();
    } else if (target == kNeighbors) {
      nbr_index = nbr_idx->to(at::kLong).contiguous();
      nbr_weight = nbr_w.has_value() ? nbr_w->to(acc).contiguous()
                                     : at::ones(nbr_index.sizes(), x.options());
    } else if (target == kDense) {
      dense = dense_p->to(acc).contiguous();
    } else {
      z = z_in->to(acc).contiguous();
      zc = z_cols->to(acc).contiguous();
      dz = z.size(1);
      z_sq = z.square().sum(1);
      zc_sq = zc.square().sum(1);
      t_prm = per_row(*t_param, n, acc);
    }
  }

  int64_t tile = tile_elements();   // read once per op
  int64_t chunk_rows() const { return std::max<int64_t>(1, tile / std::max<int64_t>(m, 1)); }
  // which row loops run (cpu_row_paths.h): the same choice the dispatch query reports
  RowPath row_path() const { return choose_row_path(kernel, target, divergence, double(alpha), double(beta)); }
  int log_p_mode() const { return log_p_mode_of(target, double(alpha)); }
  // row i of an f-divergence (cpu_f_rows.h): logits s with their LSE, the target row p and, for
  // Affinity, its logits t with LSE^p and the log of p's renormalising total; for Labels, the
  // row's positive count
  FRow<T> f_row(int64_t i, const T* s, T lse, const T* p, const T* t, T lse_p, double log_total,
                int64_t count) const {
    const T mv = T(std::max<int64_t>(m_valid, 1)), b = alpha / mv;
    const T inf = std::numeric_limits<T>::infinity();
    const T pos = count > 0 ? (T(1) - alpha) / T(count) + b : b;
    return {s, lse, p, t, T(-double(lse_p) - log_total), m, exclude_self ? i : -1, alpha, beta, mv,
            pos > T(0) ? std::log(pos) : -inf, b > T(0) ? std::log(b) : -inf};
  }
  LabelRow label_row(int64_t i) const {
    return {col_labels.template data_ptr<int64_t>(), labels.template data_ptr<int64_t>()[i], m,
            exclude_self ? i : -1, double(alpha), m_valid};
  }
};

// p(.|i) of a Labels, Neighbors or Dense target into p[0..m) (0 off the valid set); returns
// whether the row has any target mass. An Affinity row is affinity_row (cpu_family_rows.h).
template <typename T>
bool target_row(const Problem<T>& pb, int64_t i, T* p, int64_t* count) {
  const int64_t m = pb.m;
  const int64_t self = pb.exclude_self ? i : -1;
  *count = -1;
  if (pb.target == kLabels) {
    const int64_t li = pb.labels.template data_ptr<int64_t>()[i];
    const int64_t* c = pb.col_labels.template data_ptr<int64_t>();
    int64_t k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t j = 0; j < m; ++j) k += (c[j] == li && j != self);
    const T inv = k > 0 ? T(1) / T(k) : T(0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) p[j] = (c[j] == li && j != self) ? inv : T(0);
    *count = k;
    return k > 0;
  }
  double total = 0;
  if (pb.target == kDense) {
    const T* w = pb.dense.template data_ptr<T>() + i * m;
    for (int64_t j0 = 0; j0 < m; j0 += kSumBlock) {
      const int64_t j1 = std::min(m, j0 + kSumBlock);
      T bt = 0;
#pragma omp simd reduction(+ : bt)
      for (int64_t j = j0; j < j1; ++j) {
        const T pj = j != self ? w[j] : T(0);
        p[j] = pj;
        bt += pj;
      }
      total += bt;
    }
  } else if (pb.target == kNeighbors) {   // scatter the k weights; repeats add up
    std::fill(p, p + m, T(0));
    const int64_t k = pb.nbr_index.size(1);
    const int64_t* idx = pb.nbr_index.template data_ptr<int64_t>() + i * k;
    const T* w = pb.nbr_weight.template data_ptr<T>() + i * k;
    for (int64_t c = 0; c < k; ++c)
      if (idx[c] >= 0 && idx[c] < m && idx[c] != self) { p[idx[c]] += w[c]; total += w[c]; }
  } else {
    TORCH_CHECK(false, "icon_kernels cpu: target_row has no rows of target code ", pb.target);
  }
  if (total == 0) return false;  // a NaN total keeps its row, so NaN gives a NaN loss
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) p[j] = T(double(p[j]) / total);   // one rounding, as the reference
  return true;
}

// The Gram tile a[r0:r1] b^T, written into the first r1 - r0 rows of buf (one buffer for every
// chunk of a pass: a fresh tile per chunk went back to the OS and came back as page faults, 7% of
// the t-SNE forward + backward in `perf`).
template <typename T>
at::Tensor gram(at::Tensor& buf, const at::Tensor& a, int64_t r0, int64_t r1, const at::Tensor& b) {
  at::Tensor tile = buf.narrow(0, 0, r1 - r0);
  at::mm_out(tile, a.narrow(0, r0, r1 - r0), b.t());
  return tile;
}

// One tile buffer of a pass: chunk_rows rows (at most n) of m columns.
template <typename T>
at::Tensor tile_buffer(const Problem<T>& pb) {
  return at::empty({std::min(pb.n, pb.chunk_rows()), pb.m}, pb.x.options());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem<T>& pb) {
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
  at::Tensor s_buf = tile_buffer(pb), t_buf = pb.target == kAffinity ? tile_buffer(pb) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    at::Tensor s_tile = gram<T>(s_buf, pb.x, r0, r1, pb.y);
    at::Tensor t_tile;
    if (pb.target == kAffinity) t_tile = gram<T>(t_buf, pb.z, r0, r1, pb.zc);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> p(m);                 // the target row
      std::vector<int64_t> pos_idx(path == kLabelClosedFormRows ? m : 0);   // a row's positives
      RowPathTally tally;
      for (int64_t i = i0; i < i1; ++i) {
        T* s = s_tile.template data_ptr<T>() + (i - r0) * m;
        const int64_t self = pb.exclude_self ? i : -1;
        row_logits<T>(pb.kernel, prm[i], s, s, y_sq, x_sq[i], m);
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
        const T lse = simd_row_lse<T>(s, self, m);
        T lse_p = 0;
        const T* t = nullptr;
        double log_total = 0;
        int64_t count = -1;
        bool has = pb.m_valid > 0;
        if (pb.target == kAffinity) {
          T* tr = t_tile.template data_ptr<T>() + (i - r0) * m;
          row_logits<T>(pb.t_kernel, pb.t_prm.template data_ptr<T>()[i], tr, tr, pb.zc_sq.template data_ptr<T>(),
                        pb.z_sq.template data_ptr<T>()[i], m);
          lse_p = simd_row_lse<T>(tr, self, m);
          log_total = affinity_row<T>(tr, lse_p, self, m, p.data());
          t = tr;
        } else {
          has = target_row<T>(pb, i, p.data(), &count);
        }
        const FRowSums f = f_row<T>(pb.divergence, pb.f_row(i, s, lse, p.data(), t, lse_p, log_total, count),
                                    pb.log_p_mode(), nullptr, nullptr);
        const bool inc = has && pb.m_valid > 0;
        loss_p[i] = inc ? T(f.loss) : T(0);
        inc_p[i] = inc;
        // the statistics rows of ops.py: LSE; R (KL and cross-entropy with beta > 0; f.gamma is
        // -R there) or an f-divergence's Gamma; LSE^p and H = sum_j p h (KL: p f' = p (h + 1)) or
        // an f-divergence's Phi. The backward recomputes all but the LSEs from its own row.
        st[i] = lse;
        if (pb.f_div) st[n + i] = T(f.gamma);
        else if (pb.beta > 0) st[n + i] = T(-f.gamma);
        if (pb.target == kAffinity) {
          st[2 * n + i] = lse_p;
          st[3 * n + i] = T(pb.kl ? f.phi - f.p_sum : f.phi);
        }
      }
      tally.add_to(0);
    });
  }
  return {loss, included, stats};
}

template <typename T>
T finite_shift(T v) { return v == -std::numeric_limits<T>::infinity() ? T(0) : v; }

template <typename F>
decltype(auto) with_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Problem<T>& pb, const at::Tensor& grad_rows,
                                      const at::Tensor& valid, const at::Tensor& stats_in,
                                      bool target_grad, bool param_grad) {
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
      std::vector<int64_t> pos_idx(path == kLabelClosedFormRows ? m : 0);   // a row's positives and
      std::vector<double> pos_s(path == kLabelClosedFormRows ? m : 0);      // their logits
      double* dprm_p = dprm.template data_ptr<double>();
      T* w_rs = w_rowsum.template data_ptr<T>();
      RowPathTally tally;
      for (int64_t i = i0; i < i1; ++i) {
        T* w = w_tile.template data_ptr<T>() + (i - r0) * m;
        T* tr = pb.target == kAffinity ? wt_tile.template data_ptr<T>() + (i - r0) * m : nullptr;
        const T lse = st[i], shift = finite_shift(lse);
        if (g[i] == T(0)) {  // left out, or zero upstream gradient: no contribution
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
        row_logits<T>(pb.kernel, prm[i], w, s_row.data(), y_sq, x_sq[i], m);
        // q renormalised over the row where G depends on q itself (f-divergences, beta > 0);
        // forward KL and cross-entropy take G = g (q Gamma' - p~) with Gamma' = sum p~ / sum q,
        // which renormalises q by itself (learned_backward)
        const T lse_q = renormalise_q ? renormalised_lse<T>(s_row.data(), lse, self, m) : lse;
        T lse_p = 0;
        const T* t = nullptr;
        double log_total = 0;
        int64_t count = -1;
        const T tp = pb.target == kAffinity ? pb.t_prm.template data_ptr<T>()[i] : T(1);
        if (pb.target == kAffinity) {
          row_logits<T>(pb.t_kernel, tp, tr, t_row.data(), pb.zc_sq.template data_ptr<T>(),
                        pb.z_sq.template data_ptr<T>()[i], m);
          lse_p = st[2 * n + i];
          log_total = affinity_row<T>(t_row.data(), lse_p, self, m, p.data());
          t = t_row.data();
        } else {
          target_row<T>(pb, i, p.data(), &count);
        }
        const FRowSums f = f_row<T>(pb.divergence, pb.f_row(i, s_row.data(), lse_q, p.data(), t, lse_p, log_total, count),
                                    pb.log_p_mode(), qg.data(), target_grad ? pf.data() : nullptr, q_row.data());
        // Gamma as the q-weighted mean of g over these very q: sum_j G = 0 up to their rounding
        const double gamma = f.q_sum > 0 ? f.gamma / f.q_sum : f.gamma;
        const T scale = g[i] * (T(1) - pb.beta);
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
        if (param_grad)
          dprm_p[i] = param_scale<double>(pb.kernel, prm[i]) * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
        w_rs[i - r0] = T(sums.row_sum);
        if (target_grad) {
          // G^t = g (1 - alpha) (p f' - p Phi), Phi = sum_j p f' / sum_j p of this very row in
          // double (the saved fp32 statistic's rounding would come back times the p-mean of
          // z_cols - z_i: dL/dz is a p-weighted covariance)
          const double phi = f.p_sum > 0 ? f.phi / f.p_sum : 0.0;
          const T scale_t = g[i] * (T(1) - pb.alpha);
          const LabelGradSums tsums = with_kernel(pb.t_kernel, [&](auto code) {
            constexpr int TK = decltype(code)::value;
            return target_backward<T, TK, true>(KernelRow<T, TK>(tp), tr, t_row.data(), p.data(), pf.data(),
                                                pb.zc_sq.template data_ptr<T>(), pb.z_sq.template data_ptr<T>()[i],
                                                m, scale_t, phi, finite_shift(lse_p));
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
    const at::Tensor& stats, bool need_target_grad, bool need_param_grad) {
  const NoAutocast no_autocast;
  check_backward_args(grad_rows, ICON_FORWARD_ARGS, valid, stats);
  const bool target_grad = need_target_grad && target == "affinity";
  std::vector<at::Tensor> g = x.scalar_type() == at::kDouble
      ? backward_impl<double>(Problem<double>(ICON_FORWARD_ARGS), grad_rows, valid, stats, target_grad, need_param_grad)
      : backward_impl<float>(Problem<float>(ICON_FORWARD_ARGS), grad_rows, valid, stats, target_grad, need_param_grad);
  return backward_outputs(g, ICON_FORWARD_ARGS, target_grad);
}

}  // namespace icon
