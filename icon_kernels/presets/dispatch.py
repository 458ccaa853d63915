"""The one place where a preset loss picks ``ik.icon_loss`` or ``ik.distributed.icon_loss``.

``run_loss`` is the only entry point the presets use to evaluate the loss. The other helpers
here give the presets what they need across ranks: the world (rank, size), globally unique
sample ids, a gather of non-differentiable rows, and a differentiable all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..backends.dispatch import loss as icon_loss
from ..backends.dispatch import row_losses
from ..distributed import entry as _distributed
from ..distributed.rank_agreement import DIST_MODES
from ..validation import LOSS_OPTIONS, check_arguments


@dataclass
class Placement:
    """Where a preset runs: one process, or a shard of a torch.distributed group."""

    distributed: bool = False
    process_group: Optional[object] = None
    dist_mode: str = "gather"

    @property
    def group(self):
        return dist.group.WORLD if self.process_group is None else self.process_group


def make_placement(process_group, dist_mode, distributed) -> Placement:
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    if dist_mode not in DIST_MODES:
        raise ValueError(f"dist_mode must be one of {', '.join(DIST_MODES)}; got {dist_mode!r}")
    return Placement(distributed or process_group is not None, process_group, dist_mode)


def run_loss(x, y=None, *, target, placement: Placement, **kwargs):
    """ik.icon_loss, or ik.distributed.icon_loss on this rank's rows when the preset is distributed."""
    if placement.distributed:
        return _distributed.icon_loss(x, y, target=target, process_group=placement.process_group,
                                      dist_mode=placement.dist_mode, **kwargs)
    return icon_loss(x, y, target=target, **kwargs)


def run_loss_replicated_columns(x, y, *, target, placement: Placement, reduction, backend, **kwargs):
    """The loss when every rank holds the *same* columns y (class prototypes): rows stay local,
    columns are not gathered; the reduction is global. As in ik.distributed.icon_loss, the value is
    the global loss and each rank's gradient is its own rows' share."""
    if not placement.distributed:
        return icon_loss(x, y, target=target, reduction=reduction, backend=backend, **kwargs)
    group = checked_group(placement)
    problem = check_arguments(x, y, target=target, reduction=reduction, weight=None,
                              **{"exclude_self": None, **LOSS_OPTIONS, **kwargs})
    rows, included = row_losses(problem, backend)
    return _distributed.reduce_global(rows, included, None, reduction, group).to(x.dtype)


def checked_group(placement: Placement):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group)")
    return placement.group


def world(placement: Placement):
    """(rank, world size): (0, 1) for a single process."""
    if not placement.distributed:
        return 0, 1
    group = checked_group(placement)
    return dist.get_rank(group), dist.get_world_size(group)


def global_ids(n_local: int, placement: Placement, device) -> torch.Tensor:
    """Sample ids unique across ranks without communication: local i on rank r is i * W + r."""
    rank, size = world(placement)
    return torch.arange(n_local, device=device) * size + rank


def gather_rows(t: torch.Tensor, placement: Placement):
    """(all ranks' rows of t in rank order, the first global row of this rank). No gradient."""
    if not placement.distributed:
        return t.detach(), 0
    return _distributed.gather_rows(t, checked_group(placement))


def global_first_row(n_local: int, placement: Placement, device) -> int:
    """The global index of this rank's first row (0 in one process): rows are numbered in rank
    order, as ik.distributed.icon_loss numbers its global columns."""
    if not placement.distributed:
        return 0
    return _distributed.first_global_row(n_local, device, checked_group(placement))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients over ranks too (every rank's loss uses it)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(t: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Differentiable sum of t over the ranks (t itself in one process)."""
    if not placement.distributed:
        return t
    return _AllReduceSum.apply(t, checked_group(placement))


def all_ranks_agree(flag: bool, placement: Placement, device) -> bool:
    """True only when ``flag`` is True on every rank (so cached work is reused collectively)."""
    if not placement.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=checked_group(placement))
    return bool(t.item())
