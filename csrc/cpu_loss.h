// Declarations of the fused CPU ops (their schemas are defined in icon_kernels/ops.py).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#define ICON_FORWARD_PARAMS                                                                      \
  const at::Tensor &x, const at::Tensor &y, const at::Tensor &param, c10::string_view kernel,    \
      c10::string_view target, const c10::optional<at::Tensor> &row_labels,                      \
      const c10::optional<at::Tensor> &col_labels, const c10::optional<at::Tensor> &nbr_index,   \
      const c10::optional<at::Tensor> &nbr_weight, const c10::optional<at::Tensor> &z,           \
      const c10::optional<at::Tensor> &z_cols, const c10::optional<at::Tensor> &t_param,         \
      c10::string_view t_kernel, const c10::optional<at::Tensor> &dense_p, double alpha,          \
      double beta, bool exclude_self, bool kl

namespace icon {
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_forward(ICON_FORWARD_PARAMS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_backward(
    const at::Tensor &grad_rows, ICON_FORWARD_PARAMS, const at::Tensor &valid,
    const at::Tensor &stats, bool need_target_grad);
}  // namespace icon
