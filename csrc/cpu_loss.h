// Declarations of the fused CPU ops (their schemas are defined in icon_kernels/backends/ops.py).
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#define ICON_FORWARD_PARAMS                                                                      \
  const at::Tensor &x, const at::Tensor &y, const at::Tensor &param, c10::string_view kernel,    \
      c10::string_view target, const c10::optional<at::Tensor> &row_labels,                      \
      const c10::optional<at::Tensor> &col_labels, const c10::optional<at::Tensor> &nbr_index,   \
      const c10::optional<at::Tensor> &nbr_weight, const c10::optional<at::Tensor> &z,           \
      const c10::optional<at::Tensor> &z_cols, const c10::optional<at::Tensor> &t_param,         \
      c10::string_view t_kernel, const c10::optional<at::Tensor> &dense_p, double alpha,          \
      double beta, bool exclude_self, int64_t divergence, c10::string_view normalization,    \
      bool symmetrize

// The flat forward arguments again, to pass them on.
#define ICON_FORWARD_ARGS                                                                        \
  x, y, param, kernel, target, row_labels, col_labels, nbr_index, nbr_weight, z, z_cols, t_param, \
      t_kernel, dense_p, alpha, beta, exclude_self, divergence, normalization, symmetrize

namespace icon {
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward op's outputs from the accumulation-type gradients {dx, dy, dparam per row, dz,
// dz_cols, dt_param per row} (the CPU kernel keeps the per-row parameter gradients in double):
// input dtypes, scalar parameters summed, empty target grads.
inline BackwardOutputs backward_outputs(const std::vector<at::Tensor>& g, ICON_FORWARD_PARAMS,
                                        bool target_grad) {
  auto reduce = [](const at::Tensor& per_row, const at::Tensor& p) {   // p: one value, or one per row
    return (p.numel() == 1 ? per_row.sum().reshape(p.sizes()) : per_row).to(p.scalar_type());
  };
  auto empty = [&]() { return at::empty({0}, x.options()); };
  return {g[0].to(x.scalar_type()), g[1].to(y.scalar_type()), reduce(g[2], param),
          target_grad ? g[3].to(z->scalar_type()) : empty(),
          target_grad ? g[4].to(z_cols->scalar_type()) : empty(),
          target_grad ? reduce(g[5], *t_param) : empty()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(ICON_FORWARD_PARAMS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor &grad_rows, ICON_FORWARD_PARAMS, const at::Tensor &valid,
    const at::Tensor &stats, bool need_target_grad, bool need_param_grad, bool y_is_x);
}  // namespace icon
