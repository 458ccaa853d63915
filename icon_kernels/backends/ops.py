"""torch.library ops of the fused loss: one forward/backward op pair per backend.

Every backend implements the same two schemas (below) under the namespace ``icon_kernels``:
``icon_kernels::<backend>_forward`` and ``icon_kernels::<backend>_backward``. This module gives
them their fake (meta) implementations and one shared autograd rule, so a new backend (the C++,
Triton or CUDA kernels) only supplies the two compute functions, in Python or via
``TORCH_LIBRARY_IMPL``, and the public API does not change.

``normalization`` is "conditional" or "joint" (DESIGN.md §1.2) and ``symmetrize`` says an Affinity
target is symmetrised; only the backends that families.NORMALIZATIONS and
SYMMETRIZED_TARGET_BACKENDS list for them take anything but ("conditional", False); the others
refuse it. Under joint normalisation a row's loss is its contribution to the one divergence.

forward returns (row_loss [N] fp32/fp64, included [N] bool, stats [4, N] fp32/fp64) where the
statistics rows are LSE_i, R_i (beta > 0), LSE^p_i and H_i (Affinity targets), see blockwise.py.
For other targets a backend may keep its own data in rows 2-3 (the Triton forward keeps the
target's row normaliser in row 2 for its backward), so a backward op takes its own forward's stats.
The Triton forward's triangular schedule of self mode (triton/launchers.py) records its tile in
row 3 for a Labels, Dense or Neighbors target and for an Affinity target in row 1 under kl or
cross_entropy at beta = 0
(R_i, unread there; rows 0, 2 and 3 as the plain forward's, for the plain backward of the target's
gradient), else in row 3 (H_i or Phi_i, which the Triton backward of the target's gradient in self
mode computes again; rows 0-2 as the plain forward's).
Under joint normalisation the cpu op's rows are log Z (every row), sum_j q g (Gamma_i of the
global centre), LSE^p_i and the row's share of q (csrc/cpu_global_rows.h).
backward returns (dx, dy, dparam, dz, dz_cols, dt_param); the target's three are empty unless
need_target_grad, and dparam may be zeros when need_param_grad is False (a float parameter: a
backend may skip that work). y_is_x says that x and y are one autograd input (self mode: y=None),
whose gradient is dx + dy: a backend may then return that sum as dx and zeros as dy (the cpu
op's symmetric schedule, csrc/cpu_symmetric_labels.h, forms it with one GEMM instead of two, and
the triton backward with its triangular kernel, triton/launchers.py _symmetric).
That schedule's forward keeps, for a Labels target, each LSE's rounding residual in stats row 2
and its block size in row 3; its backward runs only after such a forward (it reads the record).
For an Affinity target in self mode (SNE, t-SNE: csrc/cpu_symmetric_affinity.h) the cpu op keeps
LSE's residual in row 1 and in row 3 the record 8 * block + LSE^p's residual in units of the last
place of row 2 (its plain forward leaves row 3 at 0 there: nothing reads H_i on the cpu).
For the other Labels members in self mode (beta > 0, f-divergences, Student-t:
csrc/cpu_symmetric_label_family.h) the cpu op keeps Gamma_i (sum_j q g / sum_j q) in rows 1 and 2
(high and low parts; Gamma_i - c = -D_i on the closed-form tv / hellinger / js / chi2 rows, whose
forward leaves no record where a row is not finite) and in row 3 the record 8 * block + LSE's
residual in units of the last place of row 0; so do Dense and Neighbors targets in self mode (the
same schedule; Gamma_i = -1 for forward KL and cross-entropy without beta). Under joint
normalisation (Dense, Neighbors, Labels with other column labels, an Affinity target not
symmetrised) these schedules write the plain joint rows' stats with no record.
For the other Affinity members in self mode (f-divergences, alpha or beta > 0:
csrc/cpu_symmetric_affinity_family.h) the cpu op keeps Gamma_i in row 1 and in row 3 the record
8 * block + LSE^p's residual in units of the last place of row 2 (rows 0 and 2 as the plain
forward's).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from . import second_backward, target_weight_grads
from .tile_math import accumulation_dtype

ARGS = ("Tensor x, Tensor y, Tensor param, str kernel, str target, Tensor? row_labels, "
        "Tensor? col_labels, Tensor? nbr_index, Tensor? nbr_weight, Tensor? z, Tensor? z_cols, "
        "Tensor? t_param, str t_kernel, Tensor? dense_p, float alpha, float beta, "
        "bool exclude_self, int divergence, str normalization, bool symmetrize")
FORWARD_SCHEMA = f"({ARGS}) -> (Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = (f"(Tensor grad_rows, {ARGS}, Tensor valid, Tensor stats, bool need_target_grad, "
                   "bool need_param_grad, bool y_is_x)"
                   " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
N_ARGS = 20          # arguments of the forward schema
NBR_WEIGHT, Z, Z_COLS, T_PARAM, DENSE_P = 8, 9, 10, 11, 13

_FORWARD_OPS: Dict[str, object] = {}


def _fake_forward(x, y, *rest):
    acc = accumulation_dtype(x.dtype)
    n = x.shape[0]
    return x.new_empty(n, dtype=acc), x.new_empty(n, dtype=torch.bool), x.new_empty(4, n, dtype=acc)


def _fake_backward(grad_rows, *rest):
    *args, valid, stats, need_target_grad, _need_param_grad, _y_is_x = rest
    x, y, param = args[0], args[1], args[2]
    grads = [torch.empty_like(x), torch.empty_like(y), torch.empty_like(param)]
    if need_target_grad and args[4] == "affinity":
        grads += [torch.empty_like(args[Z]), torch.empty_like(args[Z_COLS]), torch.empty_like(args[T_PARAM])]
    else:
        grads += [x.new_empty(0) for _ in range(3)]
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    _, valid, stats = output
    ctx.inputs = inputs
    ctx.y_is_x = inputs[0] is inputs[1]     # one tensor: autograd adds dy into dx
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)], valid, stats)
    ctx.tensor_slots = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    ctx.mark_non_differentiable(valid, stats)


def _make_autograd(backward_op):
    def backward(ctx, grad_rows, _grad_valid, _grad_stats):
        *saved, valid, stats = ctx.saved_tensors
        args = list(ctx.inputs)
        for slot, t in zip(ctx.tensor_slots, saved):
            args[slot] = t
        need = ctx.needs_input_grad
        need_target = args[4] == "affinity" and any(need[i] for i in (Z, Z_COLS, T_PARAM))
        dx, dy, dparam, dz, dz_cols, dt_param = backward_op(grad_rows, *args, valid, stats, need_target,
                                                            need[2], ctx.y_is_x)
        grads = [None] * N_ARGS
        grads[0], grads[1], grads[2] = dx, dy, dparam
        if need_target:
            grads[Z], grads[Z_COLS], grads[T_PARAM] = dz, dz_cols, dt_param
        if need[NBR_WEIGHT] or need[DENSE_P]:      # the weights of a Neighbors or Dense target
            g = torch.where(valid, grad_rows.to(stats.dtype), 0.0)
            slot, grad_of = ((NBR_WEIGHT, target_weight_grads.neighbors_grad) if need[NBR_WEIGHT]
                             else (DENSE_P, target_weight_grads.dense_grad))
            with no_autocast(g.device):
                grads[slot] = grad_of(args, g, stats).to(args[slot].dtype)
        return tuple(grads)
    return backward


def no_autocast(device: torch.device):
    """Autocast off for the op's own computation. The fused ops accumulate in fp32 and pick
    their own GEMM precision; under torch.autocast a matmul inside them would otherwise run in
    bf16/fp16 (and the C++ kernels, which read fp32 buffers, would get bf16 ones). The C++ ops
    exclude the autocast dispatch keys themselves."""
    return torch.autocast(device_type=device.type, enabled=False)


def without_autocast(impl: Callable, first_tensor: int) -> Callable:
    """``impl`` run with autocast disabled on the device of its argument ``first_tensor``."""
    def run(*args):
        with no_autocast(args[first_tensor].device):
            return impl(*args)
    return run


def _double_backward_error(name: str):
    """The autograd rule of a backward op: a second backward through it raises (gradient
    penalties need backend="reference", whose dense autograd graph is differentiable twice)."""
    def backward(ctx, *grads):
        raise NotImplementedError(second_backward.message(f"the fused backend {name!r}"))
    return backward


def _no_context(ctx, inputs, output):
    pass


def missing_extension_reason(module: str, what: str, switches, exc: Exception, otherwise: str = "") -> str:
    """Why a compiled backend is unavailable: its extension ``module`` did not import. Names the
    first of the build switches ``switches`` (environment variables) that is set to 1, else
    ``otherwise`` (what the build needs), then the import error and how to rebuild."""
    import os

    skipped = [name for name in switches if os.environ.get(name) == "1"]
    return (f"the {what} {module} is not built" + (f" ({skipped[0]}=1)" if skipped else otherwise)
            + f": {exc}. Reinstall with `pip install --no-build-isolation -e .`")


def register_backend(name: str, forward_impl: Optional[Callable] = None,
                     backward_impl: Optional[Callable] = None, device_types=None):
    """Defines icon_kernels::{name}_forward / _backward with fake and autograd; returns forward.

    With Python implementations they become torch.library custom ops. Without, only the schemas
    are defined here and the kernels come from C++ (TORCH_LIBRARY_IMPL in csrc/)."""
    fwd_name, bwd_name = f"icon_kernels::{name}_forward", f"icon_kernels::{name}_backward"
    if forward_impl is None:
        torch.library.define(fwd_name, FORWARD_SCHEMA)
        torch.library.define(bwd_name, BACKWARD_SCHEMA)
        torch.library.register_fake(fwd_name, _fake_forward)
        torch.library.register_fake(bwd_name, _fake_backward)
        fwd = getattr(torch.ops.icon_kernels, f"{name}_forward").default
        bwd = getattr(torch.ops.icon_kernels, f"{name}_backward").default
        torch.library.register_autograd(fwd_name, _make_autograd(bwd), setup_context=_setup_context)
        torch.library.register_autograd(bwd_name, _double_backward_error(name), setup_context=_no_context)
    else:
        fwd = torch.library.custom_op(fwd_name, without_autocast(forward_impl, 0), mutates_args=(),
                                      device_types=device_types, schema=FORWARD_SCHEMA)
        bwd = torch.library.custom_op(bwd_name, without_autocast(backward_impl, 1), mutates_args=(),
                                      device_types=device_types, schema=BACKWARD_SCHEMA)
        fwd.register_fake(_fake_forward)
        bwd.register_fake(_fake_backward)
        fwd.register_autograd(_make_autograd(bwd), setup_context=_setup_context)
        bwd.register_autograd(_double_backward_error(name), setup_context=_no_context)
    _FORWARD_OPS[name] = fwd
    return fwd


def forward_op(name: str):
    return _FORWARD_OPS[name]
