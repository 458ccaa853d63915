// Declarations of the bidirectional label ops of the CPU kernel (cpu_bidirectional_labels.cpp;
// schemas in icon_kernels/backends/bidirectional_ops.py).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace icon {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& param, c10::string_view kernel,
    const at::Tensor& row_labels, const at::Tensor& col_labels, double alpha, bool exclude_self, int64_t divergence);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_backward(
    const at::Tensor& grad_x_rows, const at::Tensor& grad_y_rows, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& param, c10::string_view kernel, const at::Tensor& row_labels, const at::Tensor& col_labels,
    double alpha, bool exclude_self, int64_t divergence, const at::Tensor& valid_x, const at::Tensor& stats_x,
    const at::Tensor& valid_y, const at::Tensor& stats_y, bool need_param_grad, bool need_x_grad, bool need_y_grad);
}  // namespace icon
