"""From a checked problem to a backend's answer: the op arguments of a target, the choice of
backend, and the loss reduced over rows. ``ik.icon_loss``, the presets and ``ik.distributed``
all evaluate the loss through here, so it sits below them (DESIGN.md §3)."""
from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F

from ..families import (DIVERGENCES, JOINT_WEIGHT_GRAD_BACKENDS, NORMALIZATIONS, SYMMETRIZED_TARGET_BACKENDS,
                        SYMMETRIZED_TARGET_GRAD_BACKENDS)
from ..reduction import reduce_rows
from ..target_adapters import adapter_for
from ..validation import LOSS_OPTIONS, Problem, check_arguments
from . import blockwise, column_blocks, column_stream, neighbor_pairs, reference, registry, symmetric_torch
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
        same = b is a              # y=x given explicitly: one normalised tensor (self mode)
        a = F.normalize(a, dim=1)
        b = None if b is None or same else F.normalize(b, dim=1)
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
    """The forward op's flat arguments (ops.ARGS order) of a checked problem. A symmetrised
    Neighbors target goes to the op as the plain Neighbors target it is (its rows' entries
    (j, p_{j|i} / 2) and (j, p_{i|j} / 2), padded to the longest row): only an Affinity target
    reaches the op with symmetrize=True."""
    x, y, kernel, param = kernel_inputs(problem.kernel, problem.x, problem.y, problem.param)
    t = target_arguments(problem.target)
    symmetrize = bool(getattr(problem.target, "symmetrize", False))
    if symmetrize and t.target == "neighbors":
        index, weight = neighbor_pairs.padded_symmetric_neighbors(
            t.nbr_index, t.nbr_weight, x.shape[0], problem.exclude_self, accumulation_dtype(x.dtype))
        t, symmetrize = t._replace(nbr_index=index, nbr_weight=weight), False
    return (x, y, param, kernel, *t, problem.alpha, problem.beta, problem.exclude_self,
            DIVERGENCES[problem.divergence].code, problem.normalization, symmetrize)


def computing_backends(problem: Problem, backend: str):
    """(the backends that compute ``problem``: those of its divergence, its normalization and a
    symmetrised target, all at once; what the named ``backend`` lacks, for its error)."""
    needs = [(DIVERGENCES[problem.divergence].backends, "this divergence"),
             (NORMALIZATIONS[problem.normalization], "joint normalisation")]
    if getattr(problem.target, "symmetrize", False):
        needs.append((SYMMETRIZED_TARGET_BACKENDS, "a target with symmetrize=True"))
        if any(isinstance(t, torch.Tensor) and t.requires_grad
               for t in adapter_for(problem.target).grad_tensors(problem.target).values()):
            needs.append((SYMMETRIZED_TARGET_GRAD_BACKENDS,
                          "the gradient of a target with symmetrize=True (its z, parameters or weights)"))
    if problem.normalization == "joint" and _weights_need_grad(problem.target):
        needs.append((JOINT_WEIGHT_GRAD_BACKENDS,
                      "the gradient of a Neighbors or Dense target's weights under joint normalisation"))
    only = tuple(name for name in registry.ALL_BACKENDS if all(name in allowed for allowed, _ in needs))
    what = next((label for allowed, label in needs if backend not in allowed), "this problem")
    return only, what


def _weights_need_grad(target) -> bool:
    weights = adapter_for(target).weight_tensor(target)
    return weights is not None and weights.requires_grad and torch.is_grad_enabled()


def row_losses(problem: Problem, backend: str):
    """(L_i per row, 0 where left out; which rows are included) on the chosen backend; under
    joint normalisation, each row's contribution to the one divergence."""
    only, what = computing_backends(problem, backend)
    name = registry.resolve_backend(backend, problem.x.device, only=only, what=what)
    if name == "triton" and problem.x.dtype == torch.float64:
        registry.warn_triton_float64()
    if name == "reference":
        return reference.row_losses(problem)
    if name == "cpu" and _hub_heavy_symmetric_neighbors(problem):
        name = "torch"                 # its column stream keeps the entries as lists: O(entries)
    if name == "torch" and symmetric_torch.fits(problem) and symmetric_torch.schedules_enabled():
        x, _, kernel, param = kernel_inputs(problem.kernel, problem.x, None, problem.param)
        return symmetric_torch.row_losses(problem, x, param, kernel)      # self mode: each tile pair once
    if name == "torch" and needs_column_stream(problem):
        rows, own, inputs = column_problem(problem, problem.x, problem.y, row_offset=0,
                                           tile_elements=blockwise.CHUNK_ELEMENTS)
        return column_stream.ColumnStreamRowLosses.apply(rows, own, column_stream.LocalStream(),
                                                         "the torch backend's column stream", *inputs)
    rows, included, _ = forward_op(name)(*op_arguments(problem))
    return rows, included


# the cpu op reads a symmetrised Neighbors target padded to its longest row
# (neighbor_pairs.padded_symmetric_neighbors); beyond this many times its entries, a hub (a point
# that many rows list) would make the padding O(N^2), and the column stream computes it instead
HUB_PADDING_FACTOR = 4


def _hub_heavy_symmetric_neighbors(problem: Problem) -> bool:
    """A symmetrised Neighbors target whose padded rows would hold more than HUB_PADDING_FACTOR
    times its entries: row i's symmetrised entries are its own valid ones plus one per row that
    lists i, counted in O(N k) without building them."""
    target = problem.target
    adapter = adapter_for(target)
    if not (getattr(target, "symmetrize", False) and adapter.name == "neighbors"):
        return False
    n = problem.x.shape[0]
    index = adapter.op_slots(target).nbr_index
    rows = torch.arange(n, device=index.device)[:, None].expand_as(index)
    keep = index >= 0
    if problem.exclude_self:
        keep &= index != rows
    degree = keep.sum(1) + torch.bincount(index[keep], minlength=n)
    entries = int(degree.sum())
    width = int(degree.max()) if n > 0 else 0
    return n * width > HUB_PADDING_FACTOR * entries + n


def needs_column_stream(problem: Problem) -> bool:
    """Joint normalisation and symmetrised targets: the torch backend computes them on the
    column stream (column_stream.py), whose passes have the global normalisers between them."""
    return problem.normalization == "joint" or bool(getattr(problem.target, "symmetrize", False))


def column_problem(problem: Problem, x, y, *, row_offset: int, tile_elements: int, m_total=None,
                   exclude_self=None, symmetric_neighbors=None):
    """(rows, own column block, the autograd inputs (x, y, param, z, z_cols, t_param, target
    weights)) of a checked problem for column_stream.ColumnStreamRowLosses: this process's
    rows x (its own columns ``y``, or x for y None), which start at global column
    ``row_offset``; ``m_total`` global columns (default: y's); ``exclude_self`` (default the
    problem's). A symmetrised Neighbors target becomes rows of (column, weight) entries through
    ``symmetric_neighbors(index, weight, exclude_self, dtype)`` (default: this process's rows
    are all the rows, neighbor_pairs.symmetric_neighbors)."""
    if exclude_self is None:
        exclude_self = problem.exclude_self
    acc = accumulation_dtype(x.dtype)
    xk, yk, kernel, param = kernel_inputs(problem.kernel, x, y, problem.param)
    t = target_arguments(problem.target)
    symmetrize = bool(getattr(problem.target, "symmetrize", False))
    rows = column_blocks.RowSide(
        x=xk.detach().to(acc), param=param.detach().to(acc), kernel=kernel, target=t.target,
        row_offset=row_offset, m_total=yk.shape[0] if m_total is None else m_total,
        exclude_self=exclude_self, alpha=problem.alpha, beta=problem.beta, kl=problem.kl,
        divergence=problem.divergence, tile_elements=tile_elements,
        joint=problem.normalization == "joint", symmetrize=symmetrize and t.target == "affinity")
    own = column_blocks.Block(yk.detach(), row_offset)
    # the target's op arguments split into the row side and the column block
    if t.row_labels is not None:
        rows.row_labels, own.col_labels = t.row_labels.long(), t.col_labels.long()
    rows.nbr_index = t.nbr_index
    rows.nbr_weight = None if t.nbr_weight is None else t.nbr_weight.detach().to(acc)
    if symmetrize and t.target == "neighbors":
        if symmetric_neighbors is None:
            def symmetric_neighbors(index, weight, drop_self, dtype):
                return neighbor_pairs.symmetric_neighbors(index, weight, x.shape[0], drop_self, dtype)
        rows.nbr_csr = symmetric_neighbors(t.nbr_index, rows.nbr_weight, exclude_self, acc)
    rows.dense_p = None if t.dense_p is None else t.dense_p.detach().to(acc)
    if t.z is not None:
        rows.z, rows.t_param, rows.t_kernel = t.z.detach().to(acc), t.t_param.detach().to(acc), t.t_kernel
        own.z_cols = t.z_cols.detach()
    weights = adapter_for(problem.target).weight_tensor(problem.target)
    rows.weight_grad = weights is not None and weights.requires_grad and torch.is_grad_enabled()
    rows.target_grad = (t.target == "affinity" and torch.is_grad_enabled()
                        and any(v is not None and v.requires_grad for v in (t.z, t.z_cols, t.t_param)))
    return rows, own, (xk, yk, param, t.z, t.z_cols, t.t_param, weights)
