// Ring-mode column blocks of the CPU hot case (Labels target, beta = 0, dot or Gaussian kernel).
//
// In ring mode a rank sees the global columns one block at a time (icon_kernels/distributed/ring.py).
// icon_kernels::cpu_label_block_stats gives every row's partial statistics over one block: LSE,
// positive count K, sum of s over the positives and over the valid columns; they are merged across
// blocks in one place, icon_kernels/distributed/column_blocks.py, and the loss follows from the merged
// statistics in closed form (no second pass). icon_kernels::cpu_label_block_backward adds the
// block's dL/dx, dL/dy and per-row dL/dparam, under the merged LSE and K, into its outputs in
// place. Row loops are the single-process kernel's (cpu_label_rows.h); the self pair of local row
// i is block column i + diagonal. Chunks of rows keep one Gram tile of at most tile_elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_label_blocks.h"
#include "cpu_label_rows.h"
#include "op_checks.h"
#include "op_codes.h"

namespace icon {
namespace {

// The block's arguments in the accumulation type T, contiguous.
template <typename T>
struct LabelBlock {
  int kernel;
  int64_t n, m, diagonal, m_valid, chunk;
  bool exclude_self;
  double alpha;
  at::Tensor x, y, x_sq, y_sq, prm, labels, col_labels;

  LabelBlock(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& param, c10::string_view k,
             const at::Tensor& row_labels, const at::Tensor& col_lab, bool excl, int64_t diag,
             int64_t m_valid_, double alpha_, int64_t tile_elements)
      : kernel(kernel_code(k)), n(x_in.size(0)), m(y_in.size(0)), diagonal(diag), m_valid(m_valid_),
        exclude_self(excl), alpha(alpha_) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    x = x_in.to(acc).contiguous();
    y = y_in.to(acc).contiguous();
    x_sq = kernel == kGaussian ? x.square().sum(1) : at::zeros({n}, x.options());
    y_sq = kernel == kGaussian ? y.square().sum(1) : at::zeros({m}, x.options());
    prm = param.to(acc).expand({n}).contiguous();
    labels = row_labels.to(at::kLong).contiguous();
    col_labels = col_lab.to(at::kLong).contiguous();
    chunk = std::max<int64_t>(1, tile_elements / std::max<int64_t>(m, 1));
  }

  LabelRow row(int64_t i) const {
    const int64_t self = i + diagonal;
    return {col_labels.data_ptr<int64_t>(), labels.data_ptr<int64_t>()[i], m,
            exclude_self && self >= 0 && self < m ? self : -1, alpha, m_valid};
  }

  void logits(T* s, int64_t i) const {
    if (kernel == kDot) fast_logits<T, kDot>(s, y_sq.data_ptr<T>(), x_sq.data_ptr<T>()[i], prm.data_ptr<T>()[i], m);
    else fast_logits<T, kGaussian>(s, y_sq.data_ptr<T>(), x_sq.data_ptr<T>()[i], prm.data_ptr<T>()[i], m);
  }
};

template <typename T>
at::Tensor stats_impl(const LabelBlock<T>& b) {
  auto out = at::empty({4, b.n}, b.x.options());
  T* st = out.template data_ptr<T>();
  for (int64_t r0 = 0; r0 < b.n; r0 += b.chunk) {
    const int64_t r1 = std::min(b.n, r0 + b.chunk);
    at::Tensor tile = at::mm(b.x.narrow(0, r0, r1 - r0), b.y.t());
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* s = tile.template data_ptr<T>() + (i - r0) * b.m;
        b.logits(s, i);
        const LabelSums<T> sums = label_row_sums<T>(b.row(i), s);
        st[i] = sums.lse;
        st[b.n + i] = T(sums.k);
        st[2 * b.n + i] = sums.pos_s;
        st[3 * b.n + i] = sums.sum_s;
      }
    });
  }
  return out;
}

template <typename T>
void backward_impl(const LabelBlock<T>& b, const at::Tensor& grad_rows, const at::Tensor& lse_in,
                   const at::Tensor& count_in, at::Tensor& dx, at::Tensor& dy, at::Tensor& dparam) {
  const auto opts = b.x.options();
  const at::Tensor g_t = grad_rows.to(opts.dtype()).contiguous();
  const at::Tensor lse_t = lse_in.to(opts.dtype()).contiguous(), k_t = count_in.to(at::kLong).contiguous();
  const T *g = g_t.data_ptr<T>(), *lse = lse_t.data_ptr<T>();
  const int64_t* count = k_t.data_ptr<int64_t>();
  const bool gaussian = b.kernel == kGaussian;
  at::Tensor colsum = at::zeros({b.m}, opts), d_prm = at::zeros({b.n}, opts);
  for (int64_t r0 = 0; r0 < b.n; r0 += b.chunk) {
    const int64_t r1 = std::min(b.n, r0 + b.chunk), nr = r1 - r0;
    at::Tensor w_tile = at::mm(b.x.narrow(0, r0, nr), b.y.t());   // Gram, then W in place
    at::Tensor w_rowsum = at::zeros({nr}, opts);
    at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* w = w_tile.template data_ptr<T>() + (i - r0) * b.m;
        if (g[i] == T(0)) {  // left out, or zero upstream gradient
          std::fill(w, w + b.m, T(0));
          continue;
        }
        const T *y_sq = b.y_sq.template data_ptr<T>(), x_sq = b.x_sq.template data_ptr<T>()[i];
        const T prm = b.prm.template data_ptr<T>()[i];
        // one block of the row's columns: dL/dparam stays shifted by the global LSE, not centred
        // (centred_sum needs the whole row)
        const LabelGradSums sums =
            gaussian ? fast_label_backward<T, kGaussian>(b.row(i), count[i], w, y_sq, x_sq, prm, lse[i], g[i])
                     : fast_label_backward<T, kDot>(b.row(i), count[i], w, y_sq, x_sq, prm, lse[i], g[i]);
        const T scale = gaussian ? fast_param_scale<T, kGaussian>(prm) : fast_param_scale<T, kDot>(prm);
        d_prm.template data_ptr<T>()[i] = T(scale * sums.dp);
        w_rowsum.template data_ptr<T>()[i - r0] = T(sums.row_sum);
      }
    });
    auto x_blk = b.x.narrow(0, r0, nr);
    auto dx_blk = dx.narrow(0, r0, nr);
    dx_blk.addmm_(w_tile, b.y);
    if (gaussian) dx_blk.addcmul_(w_rowsum.unsqueeze(1), x_blk, -1);
    dy.addmm_(w_tile.t(), x_blk);
    if (gaussian) colsum += w_tile.sum(0);
  }
  if (gaussian) dy.addcmul_(colsum.unsqueeze(1), b.y, -1);
  dparam += d_prm;
}

}  // namespace

at::Tensor cpu_label_block_stats(const at::Tensor& x, const at::Tensor& y, const at::Tensor& param,
                                 c10::string_view kernel, const at::Tensor& row_labels,
                                 const at::Tensor& col_labels, bool exclude_self, int64_t diagonal,
                                 int64_t tile_elements) {
  const NoAutocast no_autocast;
  check_label_block_args(x, y, param, kernel, row_labels, col_labels, diagonal, tile_elements);
  if (x.scalar_type() == at::kDouble)
    return stats_impl(LabelBlock<double>(x, y, param, kernel, row_labels, col_labels, exclude_self, diagonal,
                                         0, 0.0, tile_elements));
  return stats_impl(LabelBlock<float>(x, y, param, kernel, row_labels, col_labels, exclude_self, diagonal,
                                      0, 0.0, tile_elements));
}

void cpu_label_block_backward(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& y,
                              const at::Tensor& param, c10::string_view kernel,
                              const at::Tensor& row_labels, const at::Tensor& col_labels, double alpha,
                              bool exclude_self, int64_t diagonal, int64_t m_valid,
                              const at::Tensor& lse, const at::Tensor& count, int64_t tile_elements,
                              at::Tensor& dx, at::Tensor& dy, at::Tensor& dparam) {
  const NoAutocast no_autocast;
  check_label_block_args(x, y, param, kernel, row_labels, col_labels, diagonal, tile_elements);
  check_label_block_backward_args(grad_rows, x, y, exclude_self, m_valid, lse, count, dx, dy, dparam);
  if (x.scalar_type() == at::kDouble)
    backward_impl(LabelBlock<double>(x, y, param, kernel, row_labels, col_labels, exclude_self, diagonal,
                                     m_valid, alpha, tile_elements), grad_rows, lse, count, dx, dy, dparam);
  else
    backward_impl(LabelBlock<float>(x, y, param, kernel, row_labels, col_labels, exclude_self, diagonal,
                                    m_valid, alpha, tile_elements), grad_rows, lse, count, dx, dy, dparam);
}

}  // namespace icon
