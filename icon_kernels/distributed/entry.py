"""The I-Con loss over a batch sharded across processes (torch.distributed; NCCL or gloo).

``icon_loss(x_local, y_local=None, target=..., process_group=None, dist_mode="gather", ...)``:
every rank passes only its own rows (and target rows). The columns of all ranks are gathered
with an autograd-aware all_gather whose backward all-reduces the column gradients (gloo has no
reduce_scatter), so the gradients with respect to the local inputs are those of the loss on the
concatenated global batch. This rank's columns are moved to the front, so a self pair is (i, i)
and every fused backend's exclude_self applies unchanged. Memory per rank is O(N_global * d).

``dist_mode="ring"`` never gathers: column blocks rotate around the ranks (ring.py), with the
row statistics merged block by block (column_blocks.py); memory per rank is
O((N_local + block) * d), with blocks of at most ``ring_block_rows`` rows. With the ``cpu``
backend (what "auto" picks on the CPU when it is built), the hot case (Labels, beta = 0, dot,
cosine or gaussian kernel, kl or cross_entropy) runs its blocks on the fused CPU kernel in one
forward rotation (label_blocks.py); every other case (the f-divergences of DESIGN.md §1.1
included), and every other backend, uses the blockwise torch tile math on the inputs' device.

Joint normalisation and symmetrised targets (DESIGN.md §1.2) run on the column stream in either
mode (dist_mode="gather" takes the ring's path for them: its passes need the global normalisers
log Z and the target's total between them, one all-reduce each): the columns' LSE^p of a
symmetrised Affinity target travel with their blocks, and a symmetrised Neighbors target is built
once from every rank's lists (O(N k) per rank). Under joint normalisation "mean" is the one
divergence over all pairs of all ranks, as in one process.

Targets across ranks: Labels column labels are gathered (or rotated); Neighbors indices are
global column indices; Affinity column features are gathered (or rotated) with gradients;
Dense holds local rows x global columns. Shards may be uneven. Dense p and Neighbors weights
that require grad get their gradient in both modes (gather: through the backend's op; ring:
``column_blocks``, on this rank's rows, so it never travels).

Agreement (DESIGN.md §2 "Distributed"): before any data moves, each rank checks what it can
alone and one all-gather shares its verdict, its shard sizes and a fixed-length code of every
loss option (``rank_agreement.agree``). The all-gather is the first collective of both modes, so even a
dist_mode that differs is reported, on every rank, by a ValueError that names each option that
differs and the ranks holding each value: never an abort (collectives of different sizes), a
hang (different collectives) or a silent wrong answer (different math per rank).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..backends import second_backward
from ..backends.dispatch import column_problem, computing_backends, needs_column_stream, row_losses
from ..backends.registry import resolve_backend
from ..families import DIVERGENCES
from ..target_adapters import adapter_for
from ..validation import check_arguments
from ..backends import column_blocks, column_stream, label_blocks, neighbor_pairs
from . import ring
from .rank_agreement import agree, invalid_on


def _sizes(n: int, device, group) -> list:
    t = torch.tensor([n], device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [int(v) for v in out]


def _gather_rows(t: torch.Tensor, sizes: list, group) -> torch.Tensor:
    """All ranks' row blocks, concatenated in rank order (uneven sizes padded for the collective)."""
    pad = max(sizes)
    buf = t.new_zeros((pad,) + tuple(t.shape[1:]))
    buf[: t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Forward: the global batch. Backward: the sum over ranks of its gradient, own rows only."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows(t.detach(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():                # the all-reduce is not differentiable again
            grad = grad.contiguous().clone()
            dist.all_reduce(grad, group=ctx.group)
            rank = dist.get_rank(ctx.group)
            start = sum(ctx.sizes[:rank])
        with torch.set_grad_enabled(create_graph):
            (grad,) = second_backward.guard([grad[start:start + ctx.sizes[rank]]],
                                            "ik.distributed.icon_loss (gather mode)")
        return grad, None, None


def _check_group(process_group):
    """The process group; raised on this rank only, since without a group nothing can be shared."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group)")
    group = dist.group.WORLD if process_group is None else process_group
    try:
        rank = dist.get_rank(group)
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        raise ValueError(f"process_group is not a valid process group for this rank: {exc}") from exc
    if rank < 0:
        raise ValueError("process_group does not contain this rank; call the loss only on its members")
    return group


def _collectively(group, device, check, *args, **kwargs):
    """``check(*args, **kwargs)`` on this rank's inputs, its verdict shared by one all-reduce: if
    it raises on any rank (anything: an unexpected error must not strand the others either),
    every rank raises (that error where it happened, a ValueError naming the rank elsewhere), so
    no rank is left waiting in a collective."""
    error, result = None, None
    try:
        result = check(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = exc
    failed = torch.tensor([-1 if error is None else dist.get_rank(group)], device=device, dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if error is not None:
        raise error
    if int(failed) >= 0:
        raise invalid_on([int(failed)])
    return result


def _flag_device(x, group) -> torch.device:
    """Where this rank's small control tensors live: x's device, or the current GPU for NCCL."""
    if isinstance(x, torch.Tensor):
        return x.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def icon_loss(x, y=None, *, target, process_group=None, dist_mode="gather", exclude_self=None,
              reduction="mean", weight=None, backend="auto", ring_block_rows=None, **kwargs):
    """``ik.icon_loss`` over the global batch; x, y, target and weight hold this rank's part.

    Returns the global loss ("mean" over all included rows of all ranks, or "sum") on every
    rank, or this rank's rows for "none". Every rank must call it, and backward, collectively.
    ``ring_block_rows`` (ring mode, the same on every rank) caps the rows of one travelling
    column block; the default is a quarter of the largest shard, so the ring's four transfer
    buffers (two blocks, two dL/dy accumulators) together hold one shard's features.
    Every loss option must be the same on every rank, and invalid inputs on any rank raise on
    every rank (never a hang): one all-gather of each rank's verdict and option codes comes
    before any data moves. No shard may be empty.
    """
    group = _check_group(process_group)
    device = _flag_device(x, group)
    exclude_self, options, col_sizes = agree(group, device, x, y, target, dist_mode, exclude_self, reduction,
                                              weight, backend, ring_block_rows, kwargs)
    options = dict(reduction=reduction, weight=weight, **options)
    column_stream_only = (options.get("normalization") == "joint" or getattr(target, "symmetrize", False) is True)
    if dist_mode == "gather" and not column_stream_only:
        rows, included = _gather_row_losses(x, y, target, col_sizes, bool(exclude_self), options, backend, group)
    else:
        rows, included = _ring_row_losses(x, y, target, col_sizes, bool(exclude_self), options, group,
                                          ring_block_rows, backend)
    if options.get("normalization") == "joint" and reduction == "mean":
        reduction = "sum"      # the one divergence over all pairs of all ranks (DESIGN.md §1.2)
    return reduce_global(rows, included, weight, reduction, group).to(x.dtype)


def reduce_global(rows, included, weight, reduction, group):
    """The reduction over every rank's rows: the global value on every rank, with each rank's
    gradient flowing through its own rows only ("none" returns this rank's rows)."""
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    if reduction == "none":
        return rows
    loss = _global_sum(rows.sum(), group)
    if reduction == "mean":
        counted = included.to(rows.dtype) if weight is None else torch.where(included, weight.to(rows.dtype), 0.0)
        # differentiable in the row weights too (d/dw of the mean's denominator), as in one process
        denominator = _global_sum(counted.sum(), group)
        loss = loss / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return loss


class _WithValue(torch.autograd.Function):
    """``value`` forward, the gradient straight to ``local``: unlike local + (value - local), an
    infinite local part (reverse KL against a Dense p with zeros) gives +inf, not inf - inf = NaN."""

    @staticmethod
    def forward(ctx, local, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _global_sum(local: torch.Tensor, group) -> torch.Tensor:
    """The sum of a scalar over the ranks: its global value, with this rank's gradient path."""
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return _WithValue.apply(local, total)


def first_global_row(n_local: int, device, group) -> int:
    """The global index of this rank's first row: rows are numbered in rank order (one
    all-gather of the row counts)."""
    return sum(_sizes(n_local, device, group)[:dist.get_rank(group)])


def gather_rows(t: torch.Tensor, group):
    """(every rank's rows of t in rank order, no gradient; the first global row of this rank)."""
    sizes = _sizes(t.shape[0], t.device, group)
    return _gather_rows(t.detach(), sizes, group), sum(sizes[:dist.get_rank(group)])


def _backend_and_problem(backend, x, cols, target, options):
    """The resolved backend and the checked problem (self pairs handled by the caller)."""
    divergence = options.get("divergence")
    row = DIVERGENCES.get(divergence) if isinstance(divergence, str) else None   # checked just below
    name = resolve_backend(backend, x.device, **({"only": row.backends} if row else {}))
    # a symmetrised target is square globally (rank_agreement checked each shard); this rank's
    # rows against the global columns are not, so it is checked without the flag
    symmetrize = getattr(target, "symmetrize", False) is True
    problem = check_arguments(x, cols, target=dataclasses.replace(target, symmetrize=False) if symmetrize else target,
                              exclude_self=False, **options)
    if symmetrize:
        problem.target = dataclasses.replace(problem.target, symmetrize=True)
    if needs_column_stream(problem):
        # computed by the torch tile math of the column stream; a backend named explicitly that
        # does not compute it raises as in one process
        only, what = computing_backends(problem, backend)
        name = resolve_backend(backend, x.device, only=only, what=what)
    return name, problem


def _gather_row_losses(x, y, target, col_sizes, exclude_self, options, backend, group):
    """Local rows x all gathered columns through the fused backend."""
    rank = dist.get_rank(group)
    start, n_cols, m = sum(col_sizes[:rank]), col_sizes[rank], sum(col_sizes)
    # this rank's columns first, so a self pair is (i, i)
    order = torch.cat([torch.arange(start, start + n_cols), torch.arange(0, start),
                       torch.arange(start + n_cols, m)]).to(x.device)
    position = torch.empty_like(order)
    position[order] = torch.arange(m, device=x.device)
    cols = _AllGatherRows.apply(x if y is None else y, col_sizes, group)[order]
    target = _global_columns(target, col_sizes, order, position, group)
    backend, problem = _collectively(group, x.device, _backend_and_problem, backend, x, cols, target, options)
    problem.exclude_self = exclude_self
    return row_losses(problem, backend)


def _ring_row_losses(x, y, target, col_sizes, exclude_self, options, group, block_rows, backend):
    """Local rows x the global columns, block by block around the ring (never gathered)."""
    rank = dist.get_rank(group)
    the_ring = ring.Ring(group, col_sizes, block_rows or max(1, -(-max(col_sizes) // 4)))
    cols_local = x if y is None else y
    # Neighbors / Dense address global columns: validate them against a stand-in of the global
    # column block (a zero-stride view, no memory); Labels / Affinity columns are local.
    if adapter_for(target).addresses_global_columns:
        m, d = sum(col_sizes), x.shape[1]
        check_cols = cols_local.new_zeros(1, d).expand(m, d)
    else:
        check_cols = y
    backend, problem = _collectively(group, x.device, _backend_and_problem, backend, x, check_cols, target,
                                     options)
    start = sum(col_sizes[:rank])

    def symmetric_neighbors(index, weight, drop_self, dtype):
        return _symmetric_neighbors_of_rank(index, weight, col_sizes, start, drop_self, dtype, group)
    rows, own, inputs = column_problem(
        problem, x, y, row_offset=start, m_total=sum(col_sizes), exclude_self=exclude_self,
        tile_elements=column_blocks.tile_budget(x.shape[0], the_ring.block_rows, x.shape[1], x.device),
        symmetric_neighbors=symmetric_neighbors)
    rows.fused = not rows.joint and label_blocks.applies(rows.target, rows.beta, rows.kernel, backend,
                                                         rows.divergence)
    return column_stream.ColumnStreamRowLosses.apply(rows, own, the_ring, "ik.distributed.icon_loss (ring mode)",
                                                     *inputs)


def _symmetric_neighbors_of_rank(index, weight, col_sizes, start, exclude_self, dtype, group):
    """This rank's rows of a symmetrised Neighbors target (neighbor_pairs.symmetric_neighbors):
    row i needs every row j that lists i, so the lists of all ranks (N k entries, padded to the
    widest k) are gathered once and the rows of this rank cut from the symmetrised whole."""
    k = max(_sizes(index.shape[1], index.device, group))
    pad = k - index.shape[1]
    index = torch.nn.functional.pad(index, (0, pad), value=-1)
    weight = torch.ones(index.shape, dtype=dtype, device=index.device) if weight is None else \
        torch.nn.functional.pad(weight.to(dtype), (0, pad))
    row_ptr, col, w = neighbor_pairs.symmetric_neighbors(
        _gather_rows(index, col_sizes, group), _gather_rows(weight, col_sizes, group), sum(col_sizes),
        exclude_self, dtype)
    end = start + col_sizes[dist.get_rank(group)]
    lo, hi = int(row_ptr[start]), int(row_ptr[end])
    return row_ptr[start:end + 1] - lo, col[lo:hi], w[lo:hi]


def _global_columns(target, col_sizes, order, position, group):
    """The target with its column side made global (and in the reordered column order)."""
    return adapter_for(target).global_columns(
        target, gather=lambda t: _gather_rows(t, col_sizes, group),
        gather_with_grad=lambda t: _AllGatherRows.apply(t, col_sizes, group), order=order, position=position)
