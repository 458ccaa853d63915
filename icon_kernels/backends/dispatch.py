"""From a checked problem to a backend's answer: the op arguments of a target, the choice of
backend, and the loss reduced over rows. ``ik.icon_loss``, the presets and ``ik.distributed``
all evaluate the loss through here, so it sits below them (DESIGN.md §3)."""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

from ..families import DIVERGENCES, NORMALIZATIONS, SYMMETRIZED_TARGET_BACKENDS
from ..reduction import reduce_rows
from ..target_adapters import adapter_for
from ..validation import LOSS_OPTIONS, Problem, check_arguments
from . import reference, registry
from .blockwise import Problem as OpArguments
from .ops import forward_op
from .tile_math import accumulation_dtype


def loss(x, y=None, *, target, backend="auto", exclude_self=None, reduction="mean", weight=None,
         **options):
    """The reduced loss, as ``ik.icon_loss`` documents it; options missing take its defaults."""
    problem = check_arguments(x, y, target=target, exclude_self=exclude_self, reduction=reduction,
                              weight=weight, **{**LOSS_OPTIONS, **options})
    rows, included = row_losses(problem, backend)
    reduction = problem.reduction
    if problem.normalization == "joint" and reduction == "mean":
        reduction = "sum"      # the one divergence over all pairs: no mean over rows (DESIGN.md §1.2)
    return reduce_rows(rows, included, problem.weight, reduction).to(x.dtype)


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


# The target's slots of the op schema (ops.ARGS, named by blockwise.Problem): from `target` up to
# `alpha`, prepared like x and y.
_OP_FIELDS = OpArguments._fields
TargetArguments = namedtuple("TargetArguments",
                             _OP_FIELDS[_OP_FIELDS.index("target"):_OP_FIELDS.index("alpha")])


def target_arguments(target) -> TargetArguments:
    """The op's target arguments of a checked target, from its adapter; an Affinity target's
    features and parameter are prepared as the learned kernel's are (cosine: normalised rows)."""
    adapter = adapter_for(target)
    slots = adapter.op_slots(target)
    z = z_cols = t_param = None
    t_kernel = "dot"
    if slots.affinity is not None:
        z, z_cols, t_kernel, t_param = kernel_inputs(*slots.affinity)
    return TargetArguments(adapter.name, slots.row_labels, slots.col_labels, slots.nbr_index,
                           slots.nbr_weight, z, z_cols, t_param, t_kernel, slots.dense_p)


def op_arguments(problem: Problem):
    """The forward op's flat arguments (ops.ARGS order) of a checked problem."""
    x, y, kernel, param = kernel_inputs(problem.kernel, problem.x, problem.y, problem.param)
    return (x, y, param, kernel, *target_arguments(problem.target), problem.alpha, problem.beta,
            problem.exclude_self, DIVERGENCES[problem.divergence].code)


def computing_backends(problem: Problem, backend: str):
    """(the backends that compute ``problem``: those of its divergence, its normalization and a
    symmetrised target, all at once; what the named ``backend`` lacks, for its error)."""
    needs = [(DIVERGENCES[problem.divergence].backends, "this divergence"),
             (NORMALIZATIONS[problem.normalization], "joint normalisation")]
    if getattr(problem.target, "symmetrize", False):
        needs.append((SYMMETRIZED_TARGET_BACKENDS, "a target with symmetrize=True"))
    only = tuple(name for name in registry.ALL_BACKENDS if all(name in allowed for allowed, _ in needs))
    what = next((label for allowed, label in needs if backend not in allowed), "this problem")
    return only, what


def row_losses(problem: Problem, backend: str):
    """(L_i per row, 0 where left out; which rows are included) on the chosen backend; under
    joint normalisation, each row's contribution to the one divergence."""
    only, what = computing_backends(problem, backend)
    name = registry.resolve_backend(backend, problem.x.device, only=only, what=what)
    if name == "triton" and problem.x.dtype == torch.float64:
        registry.warn_triton_float64()
    if name == "reference":
        return reference.row_losses(problem)
    rows, included, _ = forward_op(name)(*op_arguments(problem))
    return rows, included
