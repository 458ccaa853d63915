// Declarations of the ring-mode block ops of the CPU hot case (schemas in
// icon_kernels/backends/label_block_ops.py).
#pragma once
#include <ATen/ATen.h>

namespace icon {
at::Tensor cpu_label_block_stats(const at::Tensor& x, const at::Tensor& y, const at::Tensor& param,
                                 c10::string_view kernel, const at::Tensor& row_labels,
                                 const at::Tensor& col_labels, bool exclude_self, int64_t diagonal,
                                 int64_t tile_elements);
void cpu_label_block_backward(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& y,
                              const at::Tensor& param, c10::string_view kernel,
                              const at::Tensor& row_labels, const at::Tensor& col_labels, double alpha,
                              bool exclude_self, int64_t diagonal, int64_t m_valid,
                              const at::Tensor& lse, const at::Tensor& count, int64_t tile_elements,
                              at::Tensor& dx, at::Tensor& dy, at::Tensor& dparam);
}  // namespace icon
