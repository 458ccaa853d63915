// Argument checks of the public C++ ops (DESIGN.md §2, "Ops are public"): everything reachable
// through torch.ops.icon_kernels.* checks, with TORCH_CHECK and before any data is read, every
// size it indexes with, the devices, and the optional tensors its target needs. One helper per op
// family, shared by the CPU ops (cpu_loss.cpp, cpu_label_blocks.cpp) and the CUDA ops
// (cuda_loss.cu). Every message starts with the name of the argument at fault.
//
// NoAutocast: the fused ops run their GEMMs in their own accumulation type. Under torch.autocast
// the at::mm inside an op would otherwise come back in bf16/fp16 while the kernel reads fp32.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstdint>

#include "cpu_loss.h"   // ICON_FORWARD_PARAMS
#include "divergence_math.h"
#include "op_codes.h"

namespace icon {

// Autocast excluded for the lifetime of the guard (declare one at the top of every fused op).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

namespace check {

inline void same_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

// (n,): one entry per row or column.
inline void vector(const char* name, const at::Tensor& t, int64_t n, const char* what, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",) (", what, "), got ", t.sizes());
  same_device(name, t, x);
}

// (rows, cols); cols < 0: any.
inline void matrix(const char* name, const at::Tensor& t, int64_t rows, int64_t cols, const char* what,
                   const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && (cols < 0 || t.size(1) == cols), name, " must have shape (",
              rows, ", ", cols < 0 ? c10::str("k") : c10::str(cols), ") (", what, "), got ", t.sizes());
  same_device(name, t, x);
}

inline void floating(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_floating_point(), name, " must be a floating-point tensor, got ", t.scalar_type());
}

// A kernel parameter: one value (0-d or (1,)) or one per row (n,).
inline void param(const char* name, const at::Tensor& p, int64_t n, const at::Tensor& x) {
  TORCH_CHECK(p.dim() <= 1 && (p.numel() == 1 || p.numel() == n), name,
              " must hold one value or one per row (N = ", n, "), got shape ", p.sizes());
  floating(name, p);
  same_device(name, p, x);
}

// The optional tensor ``name``, which target ``target`` needs.
inline const at::Tensor& needed(const char* name, const c10::optional<at::Tensor>& t, c10::string_view target) {
  TORCH_CHECK(t.has_value() && t->defined(), name, " is required by the ", target, " target, got None");
  return *t;
}

// x (N, d) and y (M, d), floating point, on one device.
inline void features(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (N, d), got shape ", x.sizes());
  floating("x", x);
  TORCH_CHECK(y.dim() == 2 && y.size(1) == x.size(1), "y must have shape (M, ", x.size(1),
              ") (d as x), got ", y.sizes());
  floating("y", y);
  same_device("y", y, x);
}

}  // namespace check

// The arguments of icon_kernels::{cpu,cuda}_forward (and the forward part of _backward).
inline void check_forward_args(ICON_FORWARD_PARAMS) {
  (void)alpha; (void)beta;
  TORCH_CHECK(divergence >= 0 && divergence < kDivergenceCount, "unknown divergence code ", divergence,
              " (icon_kernels.families.DIVERGENCES has 0..", kDivergenceCount - 1, ")");
  check::features(x, y);
  const int64_t n = x.size(0), m = y.size(0);
  // the self pair of row i is column i: the kernels index it (and the CPU rows write it)
  TORCH_CHECK(!exclude_self || n <= m, "exclude_self needs a column for every row's self pair: x has ", n,
              " rows, y ", m);
  check::param("param", param, n, x);
  kernel_code(kernel);
  const int tgt = target_code(target);
  if (tgt == kLabels) {
    check::vector("row_labels", check::needed("row_labels", row_labels, target), n, "one label per row of x", x);
    check::vector("col_labels", check::needed("col_labels", col_labels, target), m, "one label per row of y", x);
  } else if (tgt == kNeighbors) {
    const at::Tensor& idx = check::needed("nbr_index", nbr_index, target);
    check::matrix("nbr_index", idx, n, -1, "k neighbour indices per row of x", x);
    TORCH_CHECK(at::isIntegralType(idx.scalar_type(), /*includeBool=*/false),
                "nbr_index must be an integer tensor, got ", idx.scalar_type());
    // Values: on the CPU a cheap O(N k) check. On CUDA it would cost a host sync per call, and the
    // kernels test 0 <= j < M on every entry they read anyway (an index outside is never read).
    if (idx.numel() > 0 && idx.device().is_cpu()) {
      const auto [lo, hi] = at::aminmax(idx);
      const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
      TORCH_CHECK(lo_v >= -1 && hi_v < m, "nbr_index values must lie in [-1, M) = [-1, ", m,
                  ") (-1 is padding), got values in [", lo_v, ", ", hi_v, "]");
    }
    if (nbr_weight.has_value() && nbr_weight->defined()) {
      TORCH_CHECK(nbr_weight->sizes() == idx.sizes(), "nbr_weight must have the shape of nbr_index ",
                  idx.sizes(), ", got ", nbr_weight->sizes());
      check::floating("nbr_weight", *nbr_weight);
      check::same_device("nbr_weight", *nbr_weight, x);
    }
  } else if (tgt == kAffinity) {
    kernel_code(t_kernel);
    const at::Tensor& zr = check::needed("z", z, target);
    TORCH_CHECK(zr.dim() == 2 && zr.size(0) == n, "z must have shape (", n,
                ", dz) (target features of the rows), got ", zr.sizes());
    check::floating("z", zr);
    check::same_device("z", zr, x);
    check::matrix("z_cols", check::needed("z_cols", z_cols, target), m, zr.size(1),
                  "target features of the columns, dz as z", x);
    check::floating("z_cols", *z_cols);
    check::param("t_param", check::needed("t_param", t_param, target), n, x);
  } else {
    const at::Tensor& p = check::needed("dense_p", dense_p, target);
    check::matrix("dense_p", p, n, m, "the target matrix, N x M", x);
    check::floating("dense_p", p);
  }
  normalization_code(normalization);
  // a symmetrised Affinity target reads p(i|j) from row j's LSE^p and parameter: the columns are
  // the rows (z_cols is z; the Python layer checks that it is the same tensor)
  TORCH_CHECK(!symmetrize || (tgt == kAffinity && n == m),
              "symmetrize needs an affinity target on a square problem (z_cols = z), got target ", target,
              " with ", n, " rows and ", m, " columns");
}

// A backend whose kernels compute conditional normalisation and plain targets only (the Python
// layer routes joint normalisation and symmetrised targets elsewhere: families.NORMALIZATIONS).
inline void check_conditional_only(const char* backend, c10::string_view normalization, bool symmetrize) {
  TORCH_CHECK(normalization_code(normalization) == kConditional && !symmetrize, "the ", backend,
              " kernels compute conditional normalisation without symmetrize, got normalization=",
              normalization, ", symmetrize=", symmetrize);
}

// The arguments of icon_kernels::{cpu,cuda}_backward.
inline void check_backward_args(const at::Tensor& grad_rows, ICON_FORWARD_PARAMS, const at::Tensor& valid,
                                const at::Tensor& stats) {
  check_forward_args(ICON_FORWARD_ARGS);
  const int64_t n = x.size(0);
  check::vector("grad_rows", grad_rows, n, "the upstream gradient of every row loss", x);
  check::floating("grad_rows", grad_rows);
  check::vector("valid", valid, n, "the forward's included rows", x);
  TORCH_CHECK(valid.scalar_type() == at::kBool, "valid must be a bool tensor, got ", valid.scalar_type());
  check::matrix("stats", stats, 4, n, "the forward's row statistics", x);
  check::floating("stats", stats);
}

// The arguments shared by icon_kernels::cpu_label_block_stats and cpu_label_block_backward.
inline void check_label_block_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& param,
                                   c10::string_view kernel, const at::Tensor& row_labels,
                                   const at::Tensor& col_labels, int64_t diagonal, int64_t tile_elements) {
  check::features(x, y);
  const int64_t n = x.size(0), m = y.size(0);
  check::param("param", param, n, x);
  const int k = kernel_code(kernel);
  TORCH_CHECK(k == kDot || k == kGaussian, "kernel must be dot or gaussian for label blocks, got ", kernel);
  check::vector("row_labels", row_labels, n, "one label per row of x", x);
  check::vector("col_labels", col_labels, m, "one label per row of the block y", x);
  constexpr int64_t kFar = int64_t(1) << 62;   // i + diagonal must not overflow
  TORCH_CHECK(diagonal > -kFar && diagonal < kFar, "diagonal is out of range: ", diagonal);
  TORCH_CHECK(tile_elements > 0, "tile_elements must be positive, got ", tile_elements);
}

inline void check_label_block_backward_args(const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& y,
                                            bool exclude_self, int64_t m_valid, const at::Tensor& lse,
                                            const at::Tensor& count, const at::Tensor& dx, const at::Tensor& dy,
                                            const at::Tensor& dparam) {
  const int64_t n = x.size(0), m = y.size(0);
  check::vector("grad_rows", grad_rows, n, "the upstream gradient of every row", x);
  check::vector("lse", lse, n, "the merged LSE of every row", x);
  check::vector("count", count, n, "the merged positive count of every row", x);
  const int64_t least = std::max<int64_t>(0, m - (exclude_self ? 1 : 0));
  TORCH_CHECK(m_valid >= least, "m_valid (valid columns over all blocks) must be at least ", least,
              " for a block of ", m, " columns, got ", m_valid);
  check::matrix("dx", dx, n, x.size(1), "dL/dx, accumulated in place", x);
  check::matrix("dy", dy, m, x.size(1), "dL/dy of the block, accumulated in place", x);
  check::vector("dparam", dparam, n, "dL/dparam per row, accumulated in place", x);
  auto same_dtype = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(), ", got ",
                t.scalar_type());
  };
  same_dtype("dx", dx);
  same_dtype("dy", dy);
  same_dtype("dparam", dparam);
}

}  // namespace icon
