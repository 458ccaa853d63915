"""From a checked problem to a backend's answer: the op arguments of a target, the choice of
backend, and the loss reduced over rows. ``ik.icon_loss``, the presets and ``ik.distributed``
all evaluate the loss through here, so it sits below them (DESIGN.md §3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import target_name
from ..reduction import reduce_rows
from ..targets import Affinity, Dense, Labels, Neighbors
from ..validation import KERNEL_PARAM, LOSS_OPTIONS, Problem, check_arguments
from . import reference, registry
from .ops import forward_op
from .tile_math import accumulation_dtype


def loss(x, y=None, *, target, backend="auto", exclude_self=None, reduction="mean", weight=None,
         **options):
    """The reduced loss, as ``ik.icon_loss`` documents it; options missing take its defaults."""
    problem = check_arguments(x, y, target=target, exclude_self=exclude_self, reduction=reduction,
                              weight=weight, **{**LOSS_OPTIONS, **options})
    rows, included = row_losses(problem, backend)
    return reduce_rows(rows, included, problem.weight, problem.reduction).to(x.dtype)


def _param_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=accumulation_dtype(like.dtype), device=like.device)


def kernel_inputs(kernel: str, a: torch.Tensor, b, param):
    """Op-level (a, b, kernel, param tensor): cosine becomes dot on normalised rows; b None is a."""
    if kernel == "cosine":
        a = F.normalize(a, dim=1)
        b = None if b is None else F.normalize(b, dim=1)
        kernel = "dot"
    return a, (a if b is None else b), kernel, _param_tensor(param, a)


def op_arguments(problem: Problem):
    x, y, kernel, param = kernel_inputs(problem.kernel, problem.x, problem.y, problem.param)
    t = problem.target
    labels = (t.row_labels, t.col_labels) if isinstance(t, Labels) else (None, None)
    neighbors = (t.indices, t.weights) if isinstance(t, Neighbors) else (None, None)
    dense_p = t.p if isinstance(t, Dense) else None
    z = z_cols = t_param = None
    t_kernel = "dot"
    if isinstance(t, Affinity):
        z, z_cols, t_kernel, t_param = affinity_inputs(t)
    return (x, y, param, kernel, target_kind(t), *labels, *neighbors, z, z_cols, t_param, t_kernel,
            dense_p, problem.alpha, problem.beta, problem.exclude_self, problem.kl)


def target_kind(t) -> str:
    """The op-level name of a target: labels, neighbors, affinity or dense."""
    return target_name(t)


def affinity_inputs(t: Affinity):
    """Op-level (z, z_cols, kernel, parameter tensor) of an Affinity target."""
    value = getattr(t, KERNEL_PARAM[t.kernel]) if KERNEL_PARAM[t.kernel] else 1.0
    return kernel_inputs(t.kernel, t.z, t.z_cols, value)


def row_losses(problem: Problem, backend: str):
    """(L_i per row, 0 where left out; which rows are included) on the chosen backend."""
    name = registry.resolve_backend(backend, problem.x.device)
    if name == "triton" and problem.x.dtype == torch.float64:
        registry.warn_triton_float64()
    if name == "reference":
        return reference.row_losses(problem)
    rows, included, _ = forward_op(name)(*op_arguments(problem))
    return rows, included
