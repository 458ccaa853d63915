"""``icon_loss``: the public functional entry point (DESIGN.md §2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, reference
from .families import target_name
from .ops import forward_op
from .reduction import reduce_rows
from .targets import Affinity, Dense, Labels, Neighbors
from .tile_math import accumulation_dtype
from .validation import KERNEL_PARAM, Problem, check_arguments


def _param_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=accumulation_dtype(like.dtype), device=like.device)


def _kernel_inputs(kernel: str, a: torch.Tensor, b, param):
    """Op-level (a, b, kernel, param tensor): cosine becomes dot on normalised rows; b None is a."""
    if kernel == "cosine":
        a = F.normalize(a, dim=1)
        b = None if b is None else F.normalize(b, dim=1)
        kernel = "dot"
    return a, (a if b is None else b), kernel, _param_tensor(param, a)


def _op_arguments(pb: Problem):
    x, y, kernel, param = _kernel_inputs(pb.kernel, pb.x, pb.y, pb.param)
    t = pb.target
    labels = (t.row_labels, t.col_labels) if isinstance(t, Labels) else (None, None)
    neighbors = (t.indices, t.weights) if isinstance(t, Neighbors) else (None, None)
    dense_p = t.p if isinstance(t, Dense) else None
    z = z_cols = t_param = None
    t_kernel = "dot"
    if isinstance(t, Affinity):
        z, z_cols, t_kernel, t_param = affinity_inputs(t)
    return (x, y, param, kernel, target_kind(t), *labels, *neighbors, z, z_cols, t_param, t_kernel,
            dense_p, pb.alpha, pb.beta, pb.exclude_self, pb.kl)


def target_kind(t) -> str:
    """The op-level name of a target: labels, neighbors, affinity or dense."""
    return target_name(t)


def affinity_inputs(t: Affinity):
    """Op-level (z, z_cols, kernel, parameter tensor) of an Affinity target."""
    value = getattr(t, KERNEL_PARAM[t.kernel]) if KERNEL_PARAM[t.kernel] else 1.0
    return _kernel_inputs(t.kernel, t.z, t.z_cols, value)


def icon_loss(x, y=None, *, target, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0,
              alpha=0.0, beta=0.0, exclude_self=None, divergence="kl", reduction="mean",
              weight=None, backend="auto"):
    """The I-Con loss mean_i KL(p(.|i) || q(.|i)) between a supervisory target and learned kernel.

    x: (N, d) row embeddings; y: (M, d) column embeddings, or None for y = x. target:
    ik.Labels | ik.Neighbors | ik.Affinity | ik.Dense. kernel: dot, cosine, gaussian, student_t
    or log_dot, with temperature (dot, cosine), sigma (gaussian) or dof (student_t), each a
    finite float > 0 or a scalar / (N,) tensor that may require grad. alpha / beta mix a uniform
    distribution into p / q. divergence: "kl" or "cross_entropy".

    exclude_self: None (the default) leaves the self pairs (i, i) out exactly when y is None;
    passing y=x explicitly keeps them (give exclude_self=True to drop them). A row with no valid
    column or no positive is left out: 0 in "none", out of the mean's denominator.

    reduction: "mean" (weighted by ``weight`` over the rows that are included), "sum" (of
    w_i L_i), or "none": an N-vector of w_i L_i when ``weight`` is given (L_i without it), 0 for
    rows left out. ``weight`` is an (N,) tensor of weights >= 0; all-zero weights give a loss of
    0 with zero gradients.

    Gradients reach x, y, the kernel parameters and every target tensor that requires grad
    (Affinity z, z_cols and parameters, Neighbors weights, Dense p) on every backend. Double
    backward (create_graph=True, then a second backward) needs backend="reference"; the fused
    backends raise NotImplementedError there. Under torch.autocast the fused backends run
    their GEMMs outside autocast and accumulate in fp32. NaN or Inf inside an input tensor gives
    a NaN loss. backend: "auto", or one of ik.available_backends().
    """
    problem = check_arguments(x, y, target=target, kernel=kernel, temperature=temperature,
                              sigma=sigma, dof=dof, alpha=alpha, beta=beta,
                              exclude_self=exclude_self, divergence=divergence,
                              reduction=reduction, weight=weight)
    rows, included = row_losses(problem, backend)
    return reduce_rows(rows, included, problem.weight, problem.reduction).to(x.dtype)


def row_losses(problem: Problem, backend: str):
    """(L_i per row, 0 where left out; which rows are included) on the chosen backend."""
    name = backends.resolve_backend(backend, problem.x.device)
    if name == "triton" and problem.x.dtype == torch.float64:
        backends.warn_triton_float64()
    if name == "reference":
        return reference.row_losses(problem)
    rows, included, _ = forward_op(name)(*_op_arguments(problem))
    return rows, included
