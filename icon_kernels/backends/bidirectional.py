"""``ik.icon_loss_bidirectional``: 1/2 [L(x->y) + L(y->x)] (CLIP, CMC; DESIGN.md §1.3) from a
checked problem to its reduced value.

The reverse direction has y's rows over x's columns, the same kernel and parameter, and the
transposed target (target_adapters: ``reverse``). For a Labels target with beta = 0, KL or
cross-entropy and one kernel parameter, both directions come from one pass over the strips of
S = x y^T: on ``cpu`` (dot, cosine, Gaussian) the fused ops (bidirectional_ops,
csrc/cpu_bidirectional_labels.cpp: four N M d GEMM-equivalents for forward + backward instead of
eight), on ``triton`` (every kernel) its bidirectional ops (the forward kernel once per direction,
then one pair of backward kernels for both: six GEMM-equivalents instead of ten), on ``torch``
(every kernel) bidirectional_torch, the readable version of the algorithm.
Everything else, and ``ICON_KERNELS_SYMMETRIC=0`` (the off switch of the tile-pair schedules,
for benchmarks), computes the two directions as two calls of the chosen backend.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..families import DIVERGENCES
from ..reduction import reduce_rows
from ..target_adapters import AFFINITY_PARAMS, adapter_for
from ..targets import Affinity
from ..validation import KERNEL_PARAM, LOSS_OPTIONS, Problem, check_arguments
from . import bidirectional_ops, bidirectional_torch, registry, symmetric_torch
from .dispatch import computing_backends, kernel_inputs, row_losses

CPU_KERNELS = ("dot", "cosine", "gaussian")      # the cpu ops' (the label hot path's)
one_pass_enabled = symmetric_torch.schedules_enabled


def _one_value(value):
    return value.reshape(()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def _scalar_param(problem: Problem) -> bool:
    return not isinstance(problem.param, torch.Tensor) or problem.param.numel() == 1


def one_pass_backend(problem: Problem, backend: str):
    """The one-pass version that computes ``problem`` (x -> y) and its reverse on ``backend``
    ("cpu" and "triton": their bidirectional ops; "torch": bidirectional_torch), or None (two
    calls). Under torch.compile the torch version is two calls: its backward pulls the gradient
    through each strip's logits with torch.autograd.grad, which Dynamo does not trace."""
    if backend == "cpu":
        fits = problem.kernel in CPU_KERNELS
    elif backend == "triton":
        fits = bidirectional_torch.fits(problem)
    elif backend == "torch":
        fits = bidirectional_torch.fits(problem) and not torch.compiler.is_compiling()
    else:
        return None
    if not (fits and adapter_for(problem.target).name == "labels" and problem.beta == 0
            and problem.divergence in ("kl", "cross_entropy") and problem.normalization == "conditional"):
        return None
    return backend if one_pass_enabled() else None


def _one_pass_rows(problem: Problem, version: str):
    """(rows, included) of x's rows over y and of y's rows over x, in one pass."""
    x, y, kernel, param = kernel_inputs(problem.kernel, problem.x, problem.y, problem.param)
    if version == "torch":
        return bidirectional_torch.row_losses(problem, x, y, param, kernel)
    if version == "triton" and x.dtype == torch.float64:
        registry.warn_triton_float64()
    t = problem.target
    rows_x, inc_x, _, rows_y, inc_y, _ = bidirectional_ops.forward_op(version)(
        x, y, param.reshape(()), kernel, t.row_labels, t.col_labels, problem.alpha, problem.exclude_self,
        DIVERGENCES[problem.divergence].code)
    return rows_x, inc_x, rows_y, inc_y


def loss(x, y, *, target, backend="auto", exclude_self=False, reduction="mean", **options):
    """The reduced bidirectional loss, as ``ik.icon_loss_bidirectional`` documents it."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor (the columns of x -> y, the rows of y -> x), got "
                        f"{type(y).__name__}")
    options = {**LOSS_OPTIONS, **options}
    # a one-element parameter is one value for both directions: 0-d, so that neither direction's
    # check reads a (1,) tensor as one value per row (of x at N = 1, of y at M = 1)
    options = {k: _one_value(v) for k, v in options.items()}
    if isinstance(target, Affinity):
        target = replace(target, **{k: _one_value(getattr(target, k)) for k in AFFINITY_PARAMS})
    forward = check_arguments(x, y, target=target, exclude_self=exclude_self, reduction=reduction, weight=None,
                              **options)
    if forward.normalization != "conditional":
        raise ValueError("normalization='joint' has one q over all pairs for both directions, so its two "
                         "directions are one divergence: use ik.icon_loss (normalization must be 'conditional')")
    if not _scalar_param(forward):          # (one-element tensors are 0-d by now)
        name = KERNEL_PARAM[forward.kernel]
        raise ValueError(f"{name} must be one value for both directions (a float or a one-element tensor), got "
                         f"shape {tuple(forward.param.shape)}")
    n, m = x.shape[0], y.shape[0]
    reverse_target = adapter_for(forward.target).reverse(forward.target, n, m)
    reverse = check_arguments(y, x, target=reverse_target, exclude_self=forward.exclude_self,
                              reduction=reduction, weight=None, **options)
    only, what = computing_backends(forward, backend)
    name = registry.resolve_backend(backend, x.device, only=only, what=what)
    version = one_pass_backend(forward, name)
    if version is not None:
        rows_x, inc_x, rows_y, inc_y = _one_pass_rows(forward, version)
    else:
        rows_x, inc_x = row_losses(forward, name)
        rows_y, inc_y = row_losses(reverse, name)
    if reduction == "none":
        return (rows_x / 2).to(x.dtype), (rows_y / 2).to(y.dtype)
    both = reduce_rows(rows_x, inc_x, None, reduction) + reduce_rows(rows_y, inc_y, None, reduction)
    return (both / 2).to(x.dtype)
