// The CPU kernel's view of the op's arguments (Problem<T>: converted once to the accumulation
// type, with the codes and sizes the row loops need), the target rows of Labels, Neighbors and
// Dense targets, and the Gram tiles of a pass. Shared by the forward and backward of
// cpu_loss.cpp and the global row statistics of cpu_global_rows.h.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>

#include "cpu_f_rows.h"
#include "cpu_label_rows.h"
#include "cpu_row_paths.h"
#include "divergence_math.h"
#include "op_codes.h"
#include "tile_math.h"

namespace icon {
namespace cpu {

constexpr int64_t kTileElements = 1 << 21;   // entries of one chunk's Gram tile

// ICON_KERNELS_CPU_TILE_ELEMENTS overrides kTileElements, or a pass's own fallback (read at every call): the tests force
// many ragged row chunks on small problems with it (tests/test_cpu_row_chunks.py).
inline int64_t tile_elements(int64_t fallback = kTileElements) {
  const char* env = std::getenv("ICON_KERNELS_CPU_TILE_ELEMENTS");
  if (env == nullptr || *env == '\0') return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && v > 0,
              "ICON_KERNELS_CPU_TILE_ELEMENTS must be a positive integer, got '", env, "'");
  return v;
}

// A row normaliser as a shift: 0 for -inf (a row without valid columns, or whose logits are all
// -inf), whose q are then 0 rather than NaN.
template <typename T>
T finite_shift(T v) { return v == -std::numeric_limits<T>::infinity() ? T(0) : v; }

inline at::Tensor per_row(const at::Tensor& p, int64_t n, at::ScalarType acc) {
  return p.to(acc).expand({n}).contiguous();
}

// The op's arguments, converted once to the accumulation type and made contiguous.
template <typename T>
struct Problem {
  int64_t n, m, d, dz = 0, m_valid;
  int kernel, target, t_kernel, divergence;
  T alpha, beta;
  bool exclude_self, kl, f_div;   // forward KL (entropy term); an f-divergence of DESIGN.md §1.1
  bool joint, symmetrize;         // normalization="joint"; a symmetrised Affinity target (§1.2)
  bool scalar_param;              // one learned-kernel parameter for every row
  bool self_pairs;                // x and y are the same tensor (self mode): s_ij = s_ji for a symmetric kernel
  bool z_self = false;            // an Affinity target's z_cols is its z (the same tensor)
  at::Tensor x, y, x_sq, y_sq, prm, labels, col_labels, nbr_index, nbr_weight, dense, z, zc,
      z_sq, zc_sq, t_prm;

  Problem(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& param,
          c10::string_view kernel_name, c10::string_view target_name,
          const c10::optional<at::Tensor>& row_labels, const c10::optional<at::Tensor>& col_lab,
          const c10::optional<at::Tensor>& nbr_idx, const c10::optional<at::Tensor>& nbr_w,
          const c10::optional<at::Tensor>& z_in, const c10::optional<at::Tensor>& z_cols,
          const c10::optional<at::Tensor>& t_param, c10::string_view t_kernel_name,
          const c10::optional<at::Tensor>& dense_p, double alpha_, double beta_, bool excl,
          int64_t divergence_, c10::string_view normalization, bool symmetrize_) {
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
    joint = normalization_code(normalization) == kJoint;
    symmetrize = symmetrize_;
    scalar_param = param.numel() == 1;
    self_pairs = x_in.data_ptr() == y_in.data_ptr() && x_in.sizes() == y_in.sizes() &&
                 x_in.strides() == y_in.strides() && x_in.scalar_type() == y_in.scalar_type();
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
      z_self = z_in->data_ptr() == z_cols->data_ptr() && z_in->sizes() == z_cols->sizes() &&
               z_in->strides() == z_cols->strides() && z_in->scalar_type() == z_cols->scalar_type();
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
  // the rows under joint normalisation or a symmetrised target take global statistics first
  // (cpu_global_rows.h), and only the family rows take them
  bool global() const { return joint || symmetrize; }
  // joint forward KL or cross-entropy without beta: a row's loss is linear in log Z (its terms
  // are p~ (log p~ - s + log Z)), so the forward takes each row's own LSE and adds
  // (log Z - LSE_i) sum_j p~ once log Z is known, with no pass over the logits before
  bool defers_log_z() const { return joint && (divergence == kKl || divergence == kCrossEntropy) && beta == T(0); }
  RowPath row_path() const {
    return choose_row_path(kernel, target, divergence, double(alpha), double(beta), global());
  }
  int log_p_mode() const { return log_p_mode_of(target, double(alpha)); }
  // the uniform mixtures' 1 / size: M' valid columns, or every valid pair under joint normalisation
  T mix_size() const { return T(std::max<int64_t>(joint ? n * m_valid : m_valid, 1)); }
  // row i of an f-divergence (cpu_f_rows.h): logits s with their LSE, the target row p and, for
  // Affinity, its logits t with LSE^p and the log of what p was divided by beyond exp(t - LSE^p);
  // for Labels, what a positive's weight 1 was divided by (the row's positive count, or every
  // row's under joint normalisation; 0 for a row without positives)
  FRow<T> f_row(int64_t i, const T* s, T lse, const T* p, const T* t, T lse_p, double log_total,
                double label_divisor) const {
    const T mv = mix_size(), b = alpha / mv;
    const T inf = std::numeric_limits<T>::infinity();
    const T pos = label_divisor > 0 ? T((1 - double(alpha)) / label_divisor) + b : b;
    return {s, lse, p, t, T(-double(lse_p) - log_total), m, exclude_self ? i : -1, alpha, beta, mv,
            pos > T(0) ? std::log(pos) : -inf, b > T(0) ? std::log(b) : -inf};
  }
  LabelRow label_row(int64_t i) const {
    return {col_labels.template data_ptr<int64_t>(), labels.template data_ptr<int64_t>()[i], m,
            exclude_self ? i : -1, double(alpha), m_valid};
  }
};

// p(.|i) of a Labels, Neighbors or Dense target into p[0..m) (0 off the valid set): the row's
// weights over their total, or over ``divisor`` when it is positive (joint normalisation: the
// total over every row). Returns whether the row has any target mass; *count is a Labels row's
// positive count (-1 otherwise), *total the row's own total. An Affinity row is affinity_row
// (cpu_family_rows.h).
template <typename T>
bool target_row(const Problem<T>& pb, int64_t i, T* p, int64_t* count, double* total_out = nullptr,
                double divisor = 0) {
  const int64_t m = pb.m;
  const int64_t self = pb.exclude_self ? i : -1;
  *count = -1;
  if (pb.target == kLabels) {
    const int64_t li = pb.labels.template data_ptr<int64_t>()[i];
    const int64_t* c = pb.col_labels.template data_ptr<int64_t>();
    int64_t k = 0;
#pragma omp simd reduction(+ : k)
    for (int64_t j = 0; j < m; ++j) k += (c[j] == li && j != self);
    const double by = divisor > 0 ? divisor : double(k);
    const T inv = k > 0 ? T(1.0 / by) : T(0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) p[j] = (c[j] == li && j != self) ? inv : T(0);
    *count = k;
    if (total_out != nullptr) *total_out = double(k);
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
  if (total_out != nullptr) *total_out = total;
  if (total == 0) return false;  // a NaN total keeps its row, so NaN gives a NaN loss
  const double by = divisor > 0 ? divisor : total;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) p[j] = T(double(p[j]) / by);   // one rounding, as the reference
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
}  // namespace cpu
}  // namespace icon
