// Both directions of a rectangular label loss in one pass (DESIGN.md §1.3, "Bidirectional"):
// 1/2 [L(x->y) + L(y->x)] over one S = x y^T (CLIP, CMC), on the label hot path (Labels target,
// beta = 0, KL or cross-entropy, dot or Gaussian kernel with one scalar parameter: cosine arrives
// here as dot on normalised rows). Two separate fused calls pay eight N M d GEMMs for forward +
// backward; here every tile pair (I of x, J of y) is one Gram tile whose rows give the
// statistics of x's rows over y and whose columns give y's rows over x (forward: one GEMM), and
// whose backward forms H = W_row + W_col^T from one recomputed tile, dx += H y and dy += H^T x
// (three): four in all, one direction's floor. The driver is cpu_tile_pairs.h's.
//
// icon_kernels::cpu_bidirectional_forward returns (rows, included, stats) of x's rows (direction
// x -> y) and then of y's rows (y -> x), each as cpu_forward's for that direction; the stats
// rows are the tile-pair schedule's (LSE, -, its rounding residual, the block side).
// icon_kernels::cpu_bidirectional_backward takes the upstream gradients of both directions' row
// losses and returns (dx, dy, dparam); it runs only after that forward (it reads the record).
#include "cpu_bidirectional_labels.h"

#include <ATen/ATen.h>

#include <atomic>
#include <vector>

#include "cpu_problem.h"   // tile_elements
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"   // symmetric_schedule_counters
#include "cpu_tile_pairs.h"
#include "op_checks.h"
#include "op_codes.h"

namespace icon {
namespace {

void check_bidirectional_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& param,
                              c10::string_view kernel, const at::Tensor& row_labels, const at::Tensor& col_labels,
                              double alpha, bool exclude_self, int64_t divergence) {
  check::features(x, y);
  const int64_t n = x.size(0), m = y.size(0);
  TORCH_CHECK(param.dim() <= 1 && param.numel() == 1,
              "param must hold one value (the kernel's parameter for both directions), got shape ", param.sizes());
  check::floating("param", param);
  check::same_device("param", param, x);
  const int k = kernel_code(kernel);
  TORCH_CHECK(k == kDot || k == kGaussian, "kernel must be dot or gaussian for the bidirectional label ops, got ",
              kernel);
  check::vector("row_labels", row_labels, n, "one label per row of x", x);
  check::vector("col_labels", col_labels, m, "one label per row of y", x);
  TORCH_CHECK(!at::isFloatingType(row_labels.scalar_type()) && !at::isFloatingType(col_labels.scalar_type()),
              "row_labels and col_labels must be integer tensors, got ", row_labels.scalar_type(), " and ",
              col_labels.scalar_type());
  TORCH_CHECK(alpha >= 0 && alpha < 1, "alpha must lie in [0, 1), got ", alpha);
  TORCH_CHECK(!exclude_self || n == m, "exclude_self needs as many rows in y as in x: x has ", n, ", y ", m);
  TORCH_CHECK(divergence == kKl || divergence == kCrossEntropy,
              "divergence must be kl (0) or cross_entropy (1) for the bidirectional label ops, got code ", divergence);
}

void check_side_grads(const char* grad_name, const at::Tensor& grad, const char* valid_name, const at::Tensor& valid,
                      const char* stats_name, const at::Tensor& stats, int64_t rows, const at::Tensor& x) {
  check::vector(grad_name, grad, rows, "the upstream gradient of every row loss of that direction", x);
  check::floating(grad_name, grad);
  check::vector(valid_name, valid, rows, "the forward's included rows of that direction", x);
  TORCH_CHECK(valid.scalar_type() == at::kBool, valid_name, " must be a bool tensor, got ", valid.scalar_type());
  check::matrix(stats_name, stats, 4, rows, "the forward's row statistics of that direction", x);
  check::floating(stats_name, stats);
}

// The op's arguments in the accumulation type T: features, norms, labels; the two sides.
template <typename T>
struct Bidirectional {
  at::Tensor x, y, x_sq, y_sq, labels, col_labels;
  cpu::TilePair<T> tp;
  bool kl;

  Bidirectional(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& param, c10::string_view kernel,
                const at::Tensor& row_labels, const at::Tensor& col_lab, double alpha, bool exclude_self,
                int64_t divergence) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    const int k = kernel_code(kernel);
    x = x_in.to(acc).contiguous();
    y = y_in.to(acc).contiguous();
    x_sq = is_distance(k) ? x.square().sum(1) : at::zeros({x.size(0)}, x.options());
    y_sq = is_distance(k) ? y.square().sum(1) : at::zeros({y.size(0)}, y.options());
    labels = row_labels.to(at::kLong).contiguous();
    col_labels = col_lab.to(at::kLong).contiguous();
    const int64_t n = x.size(0), m = y.size(0), self = exclude_self ? 1 : 0;
    const int64_t *lr = labels.data_ptr<int64_t>(), *lc = col_labels.data_ptr<int64_t>();
    tp.side[0] = {x, x_sq.template data_ptr<T>(), lr, lc, m - self, alpha, exclude_self};
    tp.side[1] = {y, y_sq.template data_ptr<T>(), lc, lr, n - self, alpha, exclude_self};
    tp.same = false;
    tp.kernel = k;
    tp.prm = param.to(acc).reshape({}).template item<T>();
    kl = divergence == kKl;
  }
  int64_t block() const { return cpu::pair_block(cpu::tile_elements(), std::max(x.size(0), y.size(0))); }
};

void tally_rows(int pass, int64_t rows) {
  RowPathTally tally;
  tally.rows[kLabelHotRows] = rows;
  tally.add_to(pass);
  cpu::symmetric_schedule_counters()[2 + pass].fetch_add(1, std::memory_order_relaxed);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const Bidirectional<T>& b) {
  const int64_t block = b.block();
  const auto acc = cpu::tile_pair_statistics(b.tp, block);
  auto [rows_x, inc_x, st_x] = cpu::finish_label_side(b.tp.side[0], acc[0], b.kl, block);
  auto [rows_y, inc_y, st_y] = cpu::finish_label_side(b.tp.side[1], acc[1], b.kl, block);
  tally_rows(0, b.x.size(0) + b.y.size(0));
  return {rows_x, inc_x, st_x, rows_y, inc_y, st_y};
}

template <typename T>
std::vector<at::Tensor> backward_impl(const Bidirectional<T>& b, const at::Tensor& grad_x, const at::Tensor& grad_y,
                                      const at::Tensor& valid_x, const at::Tensor& stats_x,
                                      const at::Tensor& valid_y, const at::Tensor& stats_y, bool param_grad) {
  const int64_t n = b.x.size(0), m = b.y.size(0);
  const auto opts = b.x.options();
  const at::Tensor st_x = stats_x.to(opts.dtype()).contiguous(), st_y = stats_y.to(opts.dtype()).contiguous();
  const int64_t limit = std::max(n, m);
  const int64_t block = cpu::recorded_pair_block(st_x.template data_ptr<T>(), n, limit);
  TORCH_CHECK(block > 0 && cpu::recorded_pair_block(st_y.template data_ptr<T>(), m, limit) == block,
              "stats_x and stats_y must be the statistics of one icon_kernels::cpu_bidirectional_forward call "
              "(row 3 records its block side)");
  const at::Tensor g_x = cpu::masked_grads(grad_x, valid_x, opts), g_y = cpu::masked_grads(grad_y, valid_y, opts);
  std::vector<cpu::SideGrads<T>> out;
  out.push_back(cpu::side_grads(b.tp.side[0], m, g_x, st_x, param_grad));
  out.push_back(cpu::side_grads(b.tp.side[1], n, g_y, st_y, param_grad));
  cpu::tile_pair_backward(b.tp, block, out, param_grad);
  at::Tensor dprm = at::zeros({}, opts.dtype(at::kDouble));
  if (param_grad)
    dprm = cpu::param_grads(out[0], b.tp.kernel, b.tp.prm).sum() + cpu::param_grads(out[1], b.tp.kernel, b.tp.prm).sum();
  tally_rows(1, n + m);
  return {out[0].dfeat, out[1].dfeat, dprm};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_forward(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& param, c10::string_view kernel,
    const at::Tensor& row_labels, const at::Tensor& col_labels, double alpha, bool exclude_self, int64_t divergence) {
  const NoAutocast no_autocast;
  check_bidirectional_args(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence);
  if (x.scalar_type() == at::kDouble)
    return forward_impl(Bidirectional<double>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                              divergence));
  return forward_impl(Bidirectional<float>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                           divergence));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_bidirectional_backward(
    const at::Tensor& grad_x_rows, const at::Tensor& grad_y_rows, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& param, c10::string_view kernel, const at::Tensor& row_labels, const at::Tensor& col_labels,
    double alpha, bool exclude_self, int64_t divergence, const at::Tensor& valid_x, const at::Tensor& stats_x,
    const at::Tensor& valid_y, const at::Tensor& stats_y, bool need_param_grad) {
  const NoAutocast no_autocast;
  check_bidirectional_args(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence);
  check_side_grads("grad_x_rows", grad_x_rows, "valid_x", valid_x, "stats_x", stats_x, x.size(0), x);
  check_side_grads("grad_y_rows", grad_y_rows, "valid_y", valid_y, "stats_y", stats_y, y.size(0), x);
  const std::vector<at::Tensor> g = x.scalar_type() == at::kDouble
      ? backward_impl(Bidirectional<double>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                            divergence),
                      grad_x_rows, grad_y_rows, valid_x, stats_x, valid_y, stats_y, need_param_grad)
      : backward_impl(Bidirectional<float>(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self,
                                           divergence),
                      grad_x_rows, grad_y_rows, valid_x, stats_x, valid_y, stats_y, need_param_grad);
  return {g[0].to(x.scalar_type()), g[1].to(y.scalar_type()), g[2].reshape(param.sizes()).to(param.scalar_type())};
}

}  // namespace icon
