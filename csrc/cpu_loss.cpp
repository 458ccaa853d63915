// Fused CPU implementation of the I-Con loss ops icon_kernels::cpu_forward / cpu_backward
// (schemas in icon_kernels/backends/ops.py; math in DESIGN.md §1).
//
// Rows are processed in chunks of about kTileElements pairs. A chunk's Gram tile X_c Y^T comes
// from one GEMM (multithreaded by the BLAS). Every per-pair quantity (logit, q, p, the gradient
// weight) is then computed in place, with the rows of the chunk split across threads by
// at::parallel_for while each row is in cache. The backward pass recomputes the tile from the
// saved row statistics and chains it with two more GEMMs: dX_c = W Y and dY += W^T X_c, so dY
// needs no per-thread copies. GEMMs stay outside the parallel region on purpose: BLAS calls from
// worker threads retained hundreds of MB here. Memory: a few tiles of kTileElements on top of the
// inputs and gradients.
//
// Accuracy: every per-row sum over the columns (LSE, the loss terms, the row statistics, the
// parameter and row sums of the backward) accumulates in double, also for float inputs, so that
// rows of 1e5 columns keep fp32's own accuracy; the hot SIMD loops (cpu_label_rows.h) sum blocks
// of columns in T and the blocks in double. dL/dparam is centred (tile_math.h, param_basis).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_label_rows.h"
#include "cpu_f_label_rows.h"
#include "cpu_f_rows.h"
#include "cpu_loss.h"
#include "divergence_math.h"
#include "op_checks.h"
#include "op_codes.h"
#include "tile_math.h"

namespace icon {
namespace {

constexpr int64_t kTileElements = 1 << 21;   // entries of one chunk's Gram tile

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

  int64_t chunk_rows() const { return std::max<int64_t>(1, kTileElements / std::max<int64_t>(m, 1)); }
  bool valid(int64_t i, int64_t j) const { return !(exclude_self && i == j); }
  // the hot case with SIMD row loops (cpu_label_rows.h)
  // an f-divergence with the dot or Gaussian kernel: logits, LSE and backward rows in SIMD
  bool fast_f_div() const { return f_div && (kernel == kDot || kernel == kGaussian); }
  // a Labels target with alpha = beta = 0 and tv, hellinger, js or chi2: closed forms over the
  // negatives, one exp per pair (cpu_f_label_rows.h)
  bool fast_f_labels() const {
    return fast_f_div() && target == kLabels && alpha == T(0) && beta == T(0) && has_label_closed_form(divergence);
  }
  bool fast_labels() const {
    return target == kLabels && beta == T(0) && !f_div && (kernel == kDot || kernel == kGaussian);
  }
  // how an f-divergence row forms log p~ (cpu_f_rows.h): an Affinity target with alpha = 0 takes
  // t - LSE^p - log(row total), exact where p underflows; a Labels row has two levels
  int log_p_mode() const {
    if (target == kAffinity && alpha == T(0)) return kExactLogP;
    return target == kLabels ? kTwoLevelLogP : kLogOfP;
  }
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

// Turns a Gram row into logits in place (aux discarded); returns the row LSE over valid j.
template <typename T>
T logits_and_lse(const Problem<T>& pb, int kernel, T* row, const T* b_sq, T a_sq, T prm, int64_t i,
                 int64_t m) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < m; ++j) {
    T aux;
    row[j] = logit<T>(kernel, row[j], a_sq, b_sq[j], prm, &aux);
    if (pb.valid(i, j) && row[j] > mx) mx = row[j];
  }
  if (mx == -std::numeric_limits<T>::infinity()) {  // no valid column, or all at -inf
    bool nan = false;
    for (int64_t j = 0; j < m; ++j) nan |= pb.valid(i, j) && std::isnan(row[j]);
    return nan ? std::numeric_limits<T>::quiet_NaN() : mx;
  }
  double sum = 0;
  for (int64_t j = 0; j < m; ++j)
    if (pb.valid(i, j)) sum += std::exp(row[j] - mx);
  return T(double(mx) + std::log(sum));
}

// p(.|i) into p[0..m) (0 off the valid set); returns whether the row has any target mass.
// For Affinity, t holds the row's target logits and lse_p their LSE.
template <typename T>
bool target_row(const Problem<T>& pb, int64_t i, T* p, const T* t, T lse_p, int64_t* count,
                double* log_total = nullptr) {
  const int64_t m = pb.m;
  *count = -1;
  if (pb.target == kLabels) {
    const int64_t li = pb.labels.template data_ptr<int64_t>()[i];
    const int64_t* c = pb.col_labels.template data_ptr<int64_t>();
    const int64_t self = pb.exclude_self ? i : -1;
    int64_t k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t j = 0; j < m; ++j) k += (c[j] == li && j != self);
    const T inv = k > 0 ? T(1) / T(k) : T(0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) p[j] = (c[j] == li && j != self) ? inv : T(0);
    *count = k;
    return k > 0;
  }
  if (pb.target == kAffinity) {   // renormalised: the fp32 LSE^p leaves sum_j p = 1 only up to its rounding
    double total = 0;
    for (int64_t j = 0; j < m; ++j) {
      p[j] = pb.valid(i, j) ? std::exp(t[j] - lse_p) : T(0);
      total += p[j];
    }
    if (total > 0)
      for (int64_t j = 0; j < m; ++j) p[j] = T(p[j] / total);
    if (log_total) *log_total = total > 0 ? std::log(total) : 0.0;
    return pb.m_valid > 0;
  }
  double total = 0;
  if (pb.target == kDense) {
    const T* w = pb.dense.template data_ptr<T>() + i * m;
    for (int64_t j = 0; j < m; ++j) { p[j] = pb.valid(i, j) ? w[j] : T(0); total += p[j]; }
  } else {  // neighbors: scatter the k weights; repeats add up
    std::fill(p, p + m, T(0));
    const int64_t k = pb.nbr_index.size(1);
    const int64_t* idx = pb.nbr_index.template data_ptr<int64_t>() + i * k;
    const T* w = pb.nbr_weight.template data_ptr<T>() + i * k;
    for (int64_t c = 0; c < k; ++c)
      if (idx[c] >= 0 && idx[c] < m && pb.valid(i, idx[c])) { p[idx[c]] += w[c]; total += w[c]; }
  }
  if (total == 0) return false;  // a NaN total keeps its row, so NaN gives a NaN loss
  for (int64_t j = 0; j < m; ++j) p[j] = T(p[j] / total);
  return true;
}

template <typename T>
at::Tensor gram(const at::Tensor& a, int64_t r0, int64_t r1, const at::Tensor& b) {
  return at::mm(a.narrow(0, r0, r1 - r0), b.t());
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Problem<T>& pb) {
  const int64_t n = pb.n, m = pb.m, rows = pb.chunk_rows();
  auto loss = at::zeros({n}, pb.x.options());
  auto included = at::zeros({n}, pb.x.options().dtype(at::kBool));
  auto stats = at::zeros({4, n}, pb.x.options());
  T* loss_p = loss.template data_ptr<T>();
  bool* inc_p = included.template data_ptr<bool>();
  T* st = stats.template data_ptr<T>();
  const T* prm = pb.prm.template data_ptr<T>();
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const T* y_sq = pb.y_sq.template data_ptr<T>();
  const T mv = T(std::max<int64_t>(pb.m_valid, 1));
  const T b = pb.alpha / mv;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    at::Tensor s_tile = gram<T>(pb.x, r0, r1, pb.y);
    at::Tensor t_tile;
    if (pb.target == kAffinity) t_tile = gram<T>(pb.z, r0, r1, pb.zc);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> p(m), f_scratch(pb.f_div ? 2 * m : 0);   // f-divergences: q g and p f' (unused here)
      std::vector<int64_t> pos_idx(pb.fast_f_labels() ? m : 0);   // a row's positives
      for (int64_t i = i0; i < i1; ++i) {
        T* s = s_tile.template data_ptr<T>() + (i - r0) * m;
        if (pb.fast_labels()) {
          if (pb.kernel == kDot) fast_logits<T, kDot>(s, y_sq, x_sq[i], prm[i], m);
          else fast_logits<T, kGaussian>(s, y_sq, x_sq[i], prm[i], m);
          inc_p[i] = fast_label_forward<T>(pb.label_row(i), s, pb.kl, &loss_p[i], &st[i]);
          continue;
        }
        T lse;
        if (pb.fast_f_div()) {   // the dot and Gaussian logits and their LSE in SIMD (cpu_f_rows.h)
          if (pb.kernel == kDot) fast_logits<T, kDot>(s, y_sq, x_sq[i], prm[i], m);
          else fast_logits<T, kGaussian>(s, y_sq, x_sq[i], prm[i], m);
          if (pb.fast_f_labels() &&
              f_label_forward<T>(pb.divergence, pb.label_row(i), s, pos_idx.data(), &loss_p[i], &inc_p[i], &st[i],
                                 &st[n + i]))
            continue;
          lse = simd_row_lse<T>(s, pb.exclude_self ? i : -1, m);
        } else {
          lse = logits_and_lse<T>(pb, pb.kernel, s, y_sq, x_sq[i], prm[i], i, m);
        }
        T lse_p = 0;
        const T* t = nullptr;
        if (pb.target == kAffinity) {
          T* tr = t_tile.template data_ptr<T>() + (i - r0) * m;
          lse_p = logits_and_lse<T>(pb, pb.t_kernel, tr, pb.zc_sq.template data_ptr<T>(),
                                    pb.z_sq.template data_ptr<T>()[i],
                                    pb.t_prm.template data_ptr<T>()[i], i, m);
          t = tr;
        }
        int64_t count;
        double log_total = 0;
        const bool has = target_row<T>(pb, i, p.data(), t, lse_p, &count, &log_total);
        if (pb.f_div) {   // L_i = sum_j q~ f(p~ / q~); Gamma_i and Phi_i into the R and H rows
          const FRowSums f = f_row<T>(pb.divergence, pb.f_row(i, s, lse, p.data(), t, lse_p, log_total, count),
                                      pb.log_p_mode(), f_scratch.data(), f_scratch.data() + m);
          const bool inc = has && pb.m_valid > 0;
          loss_p[i] = inc ? T(f.loss) : T(0);
          inc_p[i] = inc;
          st[i] = lse;
          st[n + i] = T(f.gamma);
          if (pb.target == kAffinity) { st[2 * n + i] = lse_p; st[3 * n + i] = T(f.phi); }
          continue;
        }
        double cross = 0, ent = 0, r_stat = 0, h_stat = 0;
        for (int64_t j = 0; j < m; ++j) {
          if (!pb.valid(i, j)) continue;
          const T pm = (T(1) - pb.alpha) * p[j] + b;
          const T log_q = s[j] - lse;
          T log_qm = log_q;
          if (pb.beta > 0) {
            const T q = std::exp(log_q);
            const T qm = (T(1) - pb.beta) * q + pb.beta / mv;
            log_qm = std::log(qm);
            if (pm != T(0)) r_stat += pm * q / qm;
          }
          if (pm != T(0)) {
            cross += pm * log_qm;
            if (pb.kl && count < 0) ent += pm * std::log(pm);
          }
          if (pb.target == kAffinity && p[j] != T(0))
            h_stat += p[j] * (pb.kl ? std::log(pm) - log_qm : -log_qm);
        }
        if (pb.kl && count >= 0 && count > 0) {  // labels: closed-form entropy
          const T a = (T(1) - pb.alpha) / T(count) + b;
          ent = T(count) * a * std::log(a) + (b > 0 ? T(pb.m_valid - count) * b * std::log(b) : T(0));
        }
        const bool inc = has && pb.m_valid > 0;
        loss_p[i] = inc ? T(pb.kl ? ent - cross : -cross) : T(0);
        inc_p[i] = inc;
        st[i] = lse;
        if (pb.beta > 0) st[n + i] = T(r_stat);
        if (pb.target == kAffinity) { st[2 * n + i] = lse_p; st[3 * n + i] = T(h_stat); }
      }
    });
  }
  return {loss, included, stats};
}

template <typename T>
T finite_shift(T v) { return v == -std::numeric_limits<T>::infinity() ? T(0) : v; }

// param_basis in double: s - shift exactly (s - LSE in T would round coarser than s itself), and
// the Student-t basis to well under T's rounding (in T it came out 5x PyTorch's error at M = 2e4).
template <typename T>
double basis_of(int kernel, T s, T aux, T prm, T shift) {
  return param_basis<double>(kernel, s, aux, prm, shift);
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Problem<T>& pb, const at::Tensor& grad_rows,
                                      const at::Tensor& valid, const at::Tensor& stats_in,
                                      bool target_grad, bool param_grad) {
  const int64_t n = pb.n, m = pb.m, d = pb.d, rows = pb.chunk_rows();
  const auto opts = pb.x.options();
  auto g_t = at::where(valid, grad_rows.to(opts.dtype()), at::zeros({}, opts)).contiguous();
  auto stats = stats_in.to(opts.dtype()).contiguous();
  const T* g = g_t.template data_ptr<T>();
  const T* st = stats.template data_ptr<T>();
  const T* prm = pb.prm.template data_ptr<T>();
  const T* x_sq = pb.x_sq.template data_ptr<T>();
  const T* y_sq = pb.y_sq.template data_ptr<T>();
  const T mv = T(std::max<int64_t>(pb.m_valid, 1));
  const T b = pb.alpha / mv;
  const bool dist = is_distance(pb.kernel), t_dist = is_distance(pb.t_kernel);
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
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows), nr = r1 - r0;
    at::Tensor w_tile = gram<T>(pb.x, r0, r1, pb.y);     // Gram, then W in place
    at::Tensor wt_tile;
    if (pb.target == kAffinity) wt_tile = gram<T>(pb.z, r0, r1, pb.zc);
    auto w_rowsum = at::zeros({nr}, opts), wt_rowsum = at::zeros({nr}, opts);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> p(m), t_aux(m), h(target_grad ? m : 0), s_row(m), aux_row(m), q_row(m);
      std::vector<T> qg_row(pb.f_div ? m : 0), pf_row(pb.f_div ? m : 0);   // q g, p f'
      std::vector<int64_t> pos_idx(pb.fast_f_labels() ? m : 0);             // a row's positives and
      std::vector<double> pos_s(pb.fast_f_labels() ? m : 0);                // their logits

      for (int64_t i = i0; i < i1; ++i) {
        T* w = w_tile.template data_ptr<T>() + (i - r0) * m;
        const T lse = st[i], shift = finite_shift(lse);
        T* tr = nullptr;
        T lse_p = 0;
        if (pb.target == kAffinity) {
          tr = wt_tile.template data_ptr<T>() + (i - r0) * m;
          lse_p = st[2 * n + i];
          const T zsq = pb.z_sq.template data_ptr<T>()[i], tp = pb.t_prm.template data_ptr<T>()[i];
          const T* zcsq = pb.zc_sq.template data_ptr<T>();
          for (int64_t j = 0; j < m; ++j) tr[j] = logit<T>(pb.t_kernel, tr[j], zsq, zcsq[j], tp, &t_aux[j]);
        }
        if (g[i] == T(0)) {  // left out, or zero upstream gradient: no contribution
          std::fill(w, w + m, T(0));
          if (tr) std::fill(tr, tr + m, T(0));
          continue;
        }
        if (pb.fast_labels()) {
          const LabelRow row = pb.label_row(i);
          const bool dot = pb.kernel == kDot;
          const int64_t k = label_count(row);
          LabelGradSums sums = dot ? fast_label_backward<T, kDot>(row, k, w, y_sq, x_sq[i], prm[i], lse, g[i])
                                   : fast_label_backward<T, kGaussian>(row, k, w, y_sq, x_sq[i], prm[i], lse, g[i]);
          if (dot) renormalise_label_row<T, kDot>(row, k, w, prm[i], g[i], &sums);
          else renormalise_label_row<T, kGaussian>(row, k, w, prm[i], g[i], &sums);
          const double scale =
              dot ? fast_param_scale<double, kDot>(prm[i]) : fast_param_scale<double, kGaussian>(prm[i]);
          dprm.template data_ptr<double>()[i] = scale * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
          w_rowsum.template data_ptr<T>()[i - r0] = T(sums.row_sum);
          continue;
        }
        if (pb.fast_f_labels()) {   // one SIMD pass, closed forms over the negatives (cpu_f_label_rows.h)
          LabelGradSums sums;
          if (f_label_backward<T>(pb.divergence, pb.kernel, pb.label_row(i), w, y_sq, x_sq[i], prm[i], lse, g[i],
                                  pos_idx.data(), pos_s.data(), &sums)) {
            dprm.template data_ptr<double>()[i] =
                param_scale<double>(pb.kernel, prm[i]) * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
            w_rowsum.template data_ptr<T>()[i - r0] = T(sums.row_sum);
            continue;
          }
        }
        int64_t count;
        double log_total = 0;
        target_row<T>(pb, i, p.data(), tr, lse_p, &count, &log_total);
        if (pb.fast_f_div() && !target_grad) {   // the whole row in SIMD (cpu_f_rows.h)
          const bool dot = pb.kernel == kDot;
          if (dot) fast_logits<T, kDot>(w, y_sq, x_sq[i], prm[i], m);
          else fast_logits<T, kGaussian>(w, y_sq, x_sq[i], prm[i], m);
          const T w_scale = dot ? T(1) / prm[i] : T(1) / (prm[i] * prm[i]);
          const LabelGradSums sums = f_fast_backward<T>(
              pb.divergence, pb.f_row(i, w, lse, p.data(), tr, lse_p, log_total, count), pb.log_p_mode(), g[i],
              shift, w_scale, qg_row.data(), pf_row.data());
          dprm.template data_ptr<double>()[i] =
              param_scale<double>(pb.kernel, prm[i]) * centred_sum(sums.dp, sums.g_sum, sums.q_basis, sums.q_sum);
          w_rowsum.template data_ptr<T>()[i - r0] = T(sums.row_sum);
          continue;
        }
        // learned side: sum_j G b, sum_j G, sum_j q b, sum_j q (b = param_basis; centred_sum), sum_j W;
        // target side: the same with G^t and p, and sum_j p h for H
        double d_prm = 0, g_sum = 0, q_basis = 0, q_sum = 0, rs = 0;
        double d_tprm = 0, gt_sum = 0, p_basis = 0, p_sum = 0, trs = 0, ph_sum = 0;
        const T r_stat = st[n + i];
        const T tp = pb.target == kAffinity ? pb.t_prm.template data_ptr<T>()[i] : T(1);
        const T shift_p = finite_shift(lse_p);
        // q = exp(s - LSE), renormalised over the row: the saved fp32 LSE leaves sum_j q = 1 only up
        // to its rounding, an error shared by the whole row that dL/dx would carry times the
        // q-mean of y - x_i (DESIGN.md §5, large M)
        double q_total = 0;
        for (int64_t j = 0; j < m; ++j) {
          s_row[j] = logit<T>(pb.kernel, w[j], x_sq[i], y_sq[j], prm[i], &aux_row[j]);
          q_row[j] = pb.valid(i, j) ? std::exp(s_row[j] - lse) : T(0);
          q_total += q_row[j];
        }
        const double q_scale = q_total > 0 ? 1.0 / q_total : 1.0;
        const T log_q_scale = T(std::log(q_scale));
        // f-divergence: q g and p f' per pair, and Gamma = sum_j q g, Phi = sum_j p f' / sum_j p of
        // this very row in double (not the saved fp32 statistics: G = q (g - Gamma) cancels to
        // the spread of g, and Gamma's rounding would come back times the q-mean of y - x_i)
        double gamma = 0, phi_sum = 0, fp_p_sum = 0;
        if (pb.f_div) {
          const FRowSums f = f_row<T>(pb.divergence,
                                      pb.f_row(i, s_row.data(), lse - log_q_scale, p.data(), tr, lse_p, log_total, count),
                                      pb.log_p_mode(), qg_row.data(), pf_row.data());
          gamma = f.q_sum > 0 ? f.gamma / f.q_sum : f.gamma;   // over these very q (f_fast_backward)
          phi_sum = f.phi;
          fp_p_sum = f.p_sum;
        }
        for (int64_t j = 0; j < m; ++j) {
          const T s = s_row[j], aux = aux_row[j];
          T grad = 0, log_qm = 0, pm = 0, q = 0;
          if (pb.valid(i, j)) {
            const T log_q = (s - lse) + log_q_scale;
            q = T(q_row[j] * q_scale);
            pm = (T(1) - pb.alpha) * p[j] + b;
            if (pb.f_div) {
              grad = T(double(g[i]) * (1.0 - double(pb.beta)) * (double(qg_row[j]) - double(q) * gamma));
            } else if (pb.beta > 0) {
              const T qm = (T(1) - pb.beta) * q + pb.beta / mv;
              grad = g[i] * (T(1) - pb.beta) * q * (r_stat - pm / qm);
              log_qm = std::log(qm);
            } else {
              grad = g[i] * (q - pm);
              log_qm = log_q;
            }
          }
          if (param_grad && (grad != T(0) || q != T(0))) {   // a float parameter needs none
            const double basis = basis_of<T>(pb.kernel, s, aux, prm[i], shift);
            if (grad != T(0)) { d_prm += grad * basis; g_sum += grad; }
            if (q != T(0)) { q_basis += q * basis; q_sum += q; }
          }
          w[j] = grad_weight<T>(pb.kernel, grad, aux, prm[i]);
          rs += w[j];
          if (target_grad && !pb.f_div && p[j] != T(0)) {
            h[j] = pb.kl ? std::log(pm) - log_qm : -log_qm;
            ph_sum += double(p[j]) * h[j];
            p_sum += p[j];
          }
        }
        if (target_grad) {
          // G^t = g (1 - alpha) p (h - H) with H = sum_j p h over this row's own h, in double: h - H
          // cancels to the spread of h and dL/dz is a p-weighted covariance, so the saved fp32 H's
          // rounding would come back times the p-mean of z_cols - z_i (DESIGN.md §5, large M).
          const double h_mean = p_sum > 0 ? ph_sum / p_sum : 0.0;
          const double phi = fp_p_sum > 0 ? phi_sum / fp_p_sum : 0.0;
          if (pb.f_div) p_sum = fp_p_sum;    // the p-weighted centring of dL/dt_param
          for (int64_t j = 0; j < m; ++j) {
            T gt = 0;
            // an f-divergence's p f' may be nonzero where p underflowed (reverse KL: -q~)
            if (p[j] != T(0) || (pb.f_div && pf_row[j] != T(0))) {
              gt = pb.f_div ? T(double(g[i]) * (1.0 - double(pb.alpha)) * (double(pf_row[j]) - double(p[j]) * phi))
                            : T(double(g[i]) * (1.0 - double(pb.alpha)) * p[j] * (h[j] - h_mean));
              const double basis = basis_of<T>(pb.t_kernel, tr[j], t_aux[j], tp, shift_p);
              if (gt != T(0)) { d_tprm += gt * basis; gt_sum += gt; }
              p_basis += p[j] * basis;
            }
            tr[j] = grad_weight<T>(pb.t_kernel, gt, t_aux[j], tp);
            trs += tr[j];
          }
        }
        dprm.template data_ptr<double>()[i] =
            param_scale<double>(pb.kernel, prm[i]) * centred_sum(d_prm, g_sum, q_basis, q_sum);
        w_rowsum.template data_ptr<T>()[i - r0] = T(rs);
        if (target_grad) {
          dtprm.template data_ptr<double>()[i] =
              param_scale<double>(pb.t_kernel, tp) * centred_sum(d_tprm, gt_sum, p_basis, p_sum);
          wt_rowsum.template data_ptr<T>()[i - r0] = T(trs);
        }
      }
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
