"""Ring mode of the distributed loss: column blocks rotate around the ranks (torch.distributed P2P).

Each rank keeps its rows and sees the global columns one block at a time: while block k is
computed, block k + 1 is already in flight (isend / irecv). Forward makes two rotations: pass 1
merges the row normalisers (LSE, target mass or LSE^p), pass 2 the loss sums under the global
normalisers (see column_blocks.py for the math and the one shared merge). Backward makes one
more rotation in which every block travels with its dL/dy accumulator; after the last step the
accumulator arrives at the block's owner, complete. Memory per rank is O((N_local + block) * d)
plus one rows-chunk x block tile.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from . import column_blocks as cb


class Ring:
    """Neighbours and block sizes of this rank in ``group``."""

    def __init__(self, group, col_sizes: List[int]):
        self.group, self.sizes = group, col_sizes
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def owner(self, step: int) -> int:
        """Whose block this rank holds at ``step`` of a rotation."""
        return (self.rank - step) % self.world

    def offset(self, owner: int) -> int:
        return sum(self.sizes[:owner])

    def start_shift(self, tensors, like_owner: int, into):
        """Posts sends of ``tensors`` to the next rank and receives of the previous rank's (the
        block of ``like_owner``) into the buffers ``into``; returns (received, pending requests)."""
        rows = self.sizes[like_owner]
        ops, received = [], []
        for tag, (t, buf) in enumerate(zip(tensors, into)):
            buf = buf[:rows]
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag))
            received.append(buf)
        return received, dist.batch_isend_irecv(ops)


class _DoubleBuffer:
    """Two alternating sets of receive buffers, each as large as the largest block: a rotation
    receives into one set while the other (already sent on) is free; nothing is allocated per step."""

    def __init__(self, templates, rows: int):
        self.sets = [[t.new_empty((rows,) + tuple(t.shape[1:])) for t in templates] for _ in range(2)]
        self.turn = 0

    def next(self):
        self.turn ^= 1
        return self.sets[self.turn]


def _wait(requests):
    for req in requests:
        req.wait()


def _block_tensors(block: cb.Block):
    return [t for t in (block.y, block.col_labels, block.z_cols) if t is not None]


def _block_from(tensors, template: cb.Block, offset: int) -> cb.Block:
    it = iter(tensors)
    y = next(it)
    labels = next(it) if template.col_labels is not None else None
    z_cols = next(it) if template.z_cols is not None else None
    return cb.Block(y, offset, labels, z_cols)


def _cast_block(block: cb.Block, acc) -> cb.Block:
    return cb.Block(block.y.to(acc), block.offset, block.col_labels,
                    None if block.z_cols is None else block.z_cols.to(acc))


def rotate(ring: Ring, own: cb.Block, visit, acc):
    """Calls ``visit(block)`` on every global column block, this rank's first; the next block's
    transfer overlaps the current block's compute."""
    block = own
    buffers = _DoubleBuffer(_block_tensors(own), max(ring.sizes)) if ring.world > 1 else None
    for step in range(ring.world):
        pending = []
        if step + 1 < ring.world:
            received, pending = ring.start_shift(_block_tensors(block), ring.owner(step + 1), buffers.next())
        visit(_cast_block(block, acc))
        if pending:
            _wait(pending)
            block = _block_from(received, own, ring.offset(ring.owner(step + 1)))


def rotate_with_accumulators(ring: Ring, own: cb.Block, visit, accumulators, acc):
    """Like ``rotate``, but each block carries accumulators (dL/dy, dL/dz_cols) to which
    ``visit(block, accumulators)`` adds in place. Returns this rank's own accumulators, summed
    over every rank."""
    block = own
    if ring.world > 1:
        buffers = _DoubleBuffer(_block_tensors(own), max(ring.sizes))
        acc_buffers = _DoubleBuffer(accumulators, max(ring.sizes))
    for step in range(ring.world):
        pending = []
        if step + 1 < ring.world:
            received, pending = ring.start_shift(_block_tensors(block), ring.owner(step + 1), buffers.next())
        visit(_cast_block(block, acc), accumulators)
        if ring.world > 1:
            # the accumulators follow their block; after the last step they reach its owner
            arrived, acc_pending = ring.start_shift(accumulators, ring.owner(step + 1), acc_buffers.next())
            _wait(pending + acc_pending)
            accumulators = arrived
            if step + 1 < ring.world:
                block = _block_from(received, own, ring.offset(ring.owner(step + 1)))
    return accumulators


class RingRowLosses(torch.autograd.Function):
    """(x, y_local, param, z, z_cols_local, t_param) -> (L_i of this rank's rows, included)."""

    @staticmethod
    def forward(ctx, rows: cb.RowSide, own: cb.Block, ring: Ring, x, y_local, param, z, z_cols, t_param):
        acc = rows.x.dtype
        normalisers: Optional[dict] = None

        def pass1(block):
            nonlocal normalisers
            normalisers = cb.merge(normalisers, cb.normaliser_partials(rows, block))
        rotate(ring, own, pass1, acc)
        mass, has_p = cb.row_normalisers(rows, normalisers)
        sums: Optional[dict] = None

        def pass2(block):
            nonlocal sums
            sums = cb.merge(sums, cb.loss_partials(rows, block, normalisers, mass))
        rotate(ring, own, pass2, acc)
        row_loss, included = cb.finish_rows(rows, sums, has_p)
        ctx.rows, ctx.own, ctx.ring = rows, own, ring
        ctx.stats, ctx.mass, ctx.included = {**normalisers, **sums}, mass, included
        ctx.dtypes = [None if t is None else t.dtype for t in (x, y_local, param, z, z_cols, t_param)]
        ctx.mark_non_differentiable(included)
        return row_loss, included

    @staticmethod
    def backward(ctx, grad_rows, _grad_included):
        rows, own, ring = ctx.rows, ctx.own, ctx.ring
        need = ctx.needs_input_grad
        need_target = rows.target == "affinity" and any(need[i] for i in (6, 7, 8))
        g = torch.where(ctx.included, grad_rows.to(rows.x.dtype), 0.0)
        n, acc = rows.x.shape[0], rows.x.dtype
        row_grads = [torch.zeros_like(rows.x), rows.x.new_zeros(n)]
        col_grads = [torch.zeros(own.y.shape, dtype=acc, device=own.y.device)]
        if need_target:
            row_grads += [torch.zeros_like(rows.z), rows.x.new_zeros(n)]
            col_grads.append(torch.zeros(own.z_cols.shape, dtype=acc, device=own.y.device))

        def visit(block, block_grads):
            cb.gradient_block(rows, block, ctx.stats, ctx.mass, g, row_grads, block_grads)
        col_grads = rotate_with_accumulators(ring, own, visit, col_grads, acc)

        def param_grad(rows_grad, param):
            return rows_grad if param.dim() == 1 else rows_grad.sum()
        x_dt, y_dt, p_dt, z_dt, zc_dt, tp_dt = ctx.dtypes
        grads = [row_grads[0].to(x_dt), col_grads[0].to(y_dt), param_grad(row_grads[1], rows.param).to(p_dt),
                 None, None, None]
        if need_target:
            grads[3:] = [row_grads[2].to(z_dt), col_grads[1].to(zc_dt),
                         param_grad(row_grads[3], rows.t_param).to(tp_dt)]
        return (None, None, None, *grads)
