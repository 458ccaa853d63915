"""Ring mode of the distributed loss: column blocks rotate around the ranks (torch.distributed P2P).

Each rank keeps its rows and sees the global columns one block at a time: while block k is
computed, block k + 1 is already in flight (isend / irecv). A rank's columns travel as
``pieces`` blocks of at most ``block_rows`` rows (the same number of pieces on every rank, so
uneven shards give pieces of different, possibly zero, sizes; a zero-row piece is neither sent
nor visited). Forward makes two passes over all blocks: pass 1 merges the row normalisers (LSE,
target mass or LSE^p), pass 2 the loss sums under the global normalisers (see column_blocks.py
for the math and the one shared merge); the fused CPU label blocks (label_blocks.py) need only
one, since their loss follows from the merged statistics. Backward makes one more pass in which
every block travels with its dL/dy accumulator; after a piece's last step the accumulator
arrives at the piece's owner, complete. Memory per rank is O((N_local + block) * d) plus one
rows-chunk x block tile: two receive buffers of one block and two of its accumulator, whatever
the world size.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from ..backends import second_backward
from . import column_blocks
from .column_blocks import Block, RowSide
from . import label_blocks


class Ring:
    """Neighbours of this rank in ``group`` and how every rank's columns split into pieces."""

    def __init__(self, group, col_sizes: List[int], block_rows: int):
        self.group, self.sizes = group, col_sizes
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)
        self.pieces = max(1, -(-max(col_sizes) // block_rows))
        self.block_rows = -(-max(col_sizes) // self.pieces)      # the largest piece

    def owner(self, step: int) -> int:
        """Whose block this rank holds at ``step`` of a rotation."""
        return (self.rank - step) % self.world

    def bounds(self, owner: int, piece: int):
        """Rows [lo, hi) of ``owner``'s columns that form its piece ``piece``."""
        size = self.sizes[owner]
        return piece * size // self.pieces, (piece + 1) * size // self.pieces

    def rows(self, owner: int, piece: int) -> int:
        lo, hi = self.bounds(owner, piece)
        return hi - lo

    def offset(self, owner: int, piece: int) -> int:
        """Global index of the first column of ``owner``'s piece."""
        return sum(self.sizes[:owner]) + self.bounds(owner, piece)[0]

    def shift(self, tensors, incoming_rows: int, into, first_tag: int = 0):
        """Sends ``tensors`` (the block held now) to the next rank and receives the previous
        rank's (``incoming_rows`` rows) into the buffers ``into``; returns (received, requests).
        Both ends know every piece's size, so an empty piece is not posted on either side."""
        ops, received = [], []
        for tag, (t, buf) in enumerate(zip(tensors, into), start=first_tag):
            buf = buf[:incoming_rows]
            if t.shape[0] > 0:
                ops.append(dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag))
            if incoming_rows > 0:
                ops.append(dist.P2POp(dist.irecv, buf, self.prev, self.group, tag))
            received.append(buf)
        return received, (dist.batch_isend_irecv(ops) if ops else [])


_ACCUMULATOR_TAGS = 8      # accumulators travel with tags of their own, beside their block's


class _DoubleBuffer:
    """Two alternating sets of buffers, each as large as the largest piece: a rotation receives
    into one set while the other (already sent on) is free; nothing is allocated per step."""

    def __init__(self, templates, rows: int):
        self.sets = [[t.new_empty((rows,) + tuple(t.shape[1:])) for t in templates] for _ in range(2)]
        self.turn = 0

    def next(self):
        self.turn ^= 1
        return self.sets[self.turn]

    def zeroed(self, rows: int):
        """The next set, its first ``rows`` rows set to zero (a fresh accumulator)."""
        return [b[:rows].zero_() for b in self.next()]


def _wait(requests):
    for req in requests:
        req.wait()


def _block_tensors(block: Block):
    return [t for t in (block.y, block.col_labels, block.z_cols) if t is not None]


def _block_from(tensors, template: Block, offset: int) -> Block:
    remaining = iter(tensors)
    y = next(remaining)
    labels = next(remaining) if template.col_labels is not None else None
    z_cols = next(remaining) if template.z_cols is not None else None
    return Block(y, offset, labels, z_cols)


def _own_piece(ring: Ring, own: Block, piece: int) -> Block:
    lo, hi = ring.bounds(ring.rank, piece)
    return _block_from([t[lo:hi] for t in _block_tensors(own)], own, own.offset + lo)


def _cast_block(block: Block, acc) -> Block:
    return Block(block.y.to(acc), block.offset, block.col_labels,
                    None if block.z_cols is None else block.z_cols.to(acc))


def _travel(ring: Ring, own: Block, piece: int, buffers: Optional[_DoubleBuffer], acc):
    """Yields (step, block held at that step, or None when it has no rows) for one piece of
    every rank around the ring; the next block's transfer is posted before the current one is
    yielded, so it overlaps the caller's compute, and is awaited when the caller resumes."""
    block = _own_piece(ring, own, piece)
    for step in range(ring.world):
        last = step + 1 == ring.world
        if not last:
            incoming = ring.rows(ring.owner(step + 1), piece)
            received, pending = ring.shift(_block_tensors(block), incoming, buffers.next())
        yield step, (_cast_block(block, acc) if block.y.shape[0] > 0 else None)
        if not last:
            _wait(pending)
            block = _block_from(received, own, ring.offset(ring.owner(step + 1), piece))


def rotate(ring: Ring, own: Block, visit, acc):
    """Calls ``visit(block)`` on every non-empty global column block."""
    buffers = _DoubleBuffer(_block_tensors(own), ring.block_rows) if ring.world > 1 else None
    for piece in range(ring.pieces):
        for _, block in _travel(ring, own, piece, buffers, acc):
            if block is not None:
                visit(block)


def rotate_with_accumulators(ring: Ring, own: Block, visit, accumulators, acc):
    """Like ``rotate``, but each block carries accumulators (dL/dy, dL/dz_cols) to which
    ``visit(block, accumulators)`` adds in place. ``accumulators`` are this rank's, full size
    and zero; on return they hold the sum over every rank."""
    if ring.world == 1:                       # nothing travels: add straight into the result
        for piece in range(ring.pieces):
            lo, hi = ring.bounds(ring.rank, piece)
            if hi > lo:
                visit(_cast_block(_own_piece(ring, own, piece), acc), [a[lo:hi] for a in accumulators])
        return accumulators
    buffers = _DoubleBuffer(_block_tensors(own), ring.block_rows)
    acc_buffers = _DoubleBuffer(accumulators, ring.block_rows)
    for piece in range(ring.pieces):
        lo, hi = ring.bounds(ring.rank, piece)
        carried = acc_buffers.zeroed(hi - lo)
        for step, block in _travel(ring, own, piece, buffers, acc):
            if block is not None:
                visit(block, carried)
            # the accumulators follow their block; after the last step they reach its owner
            carried, pending = ring.shift(carried, ring.rows(ring.owner(step + 1), piece), acc_buffers.next(),
                                          first_tag=_ACCUMULATOR_TAGS)
            _wait(pending)
        for total, arrived in zip(accumulators, carried):
            total[lo:hi] = arrived
    return accumulators


def _forward(ctx, rows: RowSide, own: Block, ring: Ring):
    """Two rotations: the row normalisers, then the loss sums under them."""
    acc = rows.x.dtype
    normalisers: Optional[dict] = None

    def pass1(block):
        nonlocal normalisers
        normalisers = column_blocks.merge(normalisers, column_blocks.normaliser_partials(rows, block))
    rotate(ring, own, pass1, acc)
    mass, has_p = column_blocks.row_normalisers(rows, normalisers)
    sums: Optional[dict] = None

    def pass2(block):
        nonlocal sums
        sums = column_blocks.merge(sums, column_blocks.loss_partials(rows, block, normalisers, mass))
    rotate(ring, own, pass2, acc)
    row_loss, included = column_blocks.finish_rows(rows, sums, mass, has_p)
    ctx.stats, ctx.mass, ctx.included = {**normalisers, **sums}, mass, included
    return row_loss, included


def _fused_forward(ctx, rows: RowSide, own: Block, ring: Ring):
    """One rotation of the fused label blocks; the loss follows from the merged statistics."""
    stats: Optional[dict] = None

    def visit(block):
        nonlocal stats
        stats = column_blocks.merge(stats, label_blocks.partials(rows, block))
    rotate(ring, own, visit, rows.x.dtype)
    row_loss, included = label_blocks.finish_rows(rows, stats)
    ctx.stats, ctx.mass, ctx.included = stats, None, included
    return row_loss, included


# where RingRowLosses.forward's z, z_cols, t_param and target_weights sit in ctx.needs_input_grad
_Z, _Z_COLS, _T_PARAM, _TARGET_WEIGHTS = 6, 7, 8, 9


class RingRowLosses(torch.autograd.Function):
    """(x, y_local, param, z, z_cols_local, t_param, target_weights) -> (L_i of this rank's rows,
    included); target_weights is Dense p or Neighbors weights (local rows), or None."""

    @staticmethod
    def forward(ctx, rows: RowSide, own: Block, ring: Ring, x, y_local, param, z, z_cols, t_param,
                target_weights=None):
        ctx.rows, ctx.own, ctx.ring = rows, own, ring
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, y_local, param, z, z_cols, t_param, target_weights)]
        ctx.weights_shape = None if target_weights is None else target_weights.shape
        row_loss, included = (_fused_forward if rows.fused else _forward)(ctx, rows, own, ring)
        ctx.mark_non_differentiable(included)
        return row_loss, included

    @staticmethod
    def backward(ctx, grad_rows, _grad_included):
        create_graph = torch.is_grad_enabled()          # torch.autograd.grad(..., create_graph=True)
        with torch.no_grad():
            grads = RingRowLosses._gradients(ctx, grad_rows)
        with torch.set_grad_enabled(create_graph):
            grads = second_backward.guard(grads, "ik.distributed.icon_loss (ring mode)")
        return (None, None, None, *grads)

    @staticmethod
    def _gradients(ctx, grad_rows):
        rows, own, ring = ctx.rows, ctx.own, ctx.ring
        need = ctx.needs_input_grad
        need_target = rows.target == "affinity" and any(need[i] for i in (_Z, _Z_COLS, _T_PARAM))
        g = torch.where(ctx.included, grad_rows.to(rows.x.dtype), 0.0)
        n, acc = rows.x.shape[0], rows.x.dtype
        row_grads = [torch.zeros_like(rows.x), rows.x.new_zeros(n)]
        col_grads = [torch.zeros(own.y.shape, dtype=acc, device=own.y.device)]
        if need_target:
            row_grads += [torch.zeros_like(rows.z), rows.x.new_zeros(n)]
            col_grads.append(torch.zeros(own.z_cols.shape, dtype=acc, device=own.y.device))
        # Dense p / Neighbors weights: local rows, so their gradient never travels
        weight_grads = (rows.x.new_zeros(ctx.weights_shape) if rows.weight_grad and need[_TARGET_WEIGHTS]
                        else None)

        def visit(block, block_grads):
            if rows.fused:
                label_blocks.gradient_block(rows, block, ctx.stats, g, row_grads, block_grads)
            else:
                column_blocks.gradient_block(rows, block, ctx.stats, ctx.mass, g, row_grads, block_grads,
                                             weight_grads)
        rotate_with_accumulators(ring, own, visit, col_grads, acc)

        def param_grad(rows_grad, param):
            return rows_grad if param.dim() == 1 else rows_grad.sum()
        x_dtype, y_dtype, param_dtype, z_dtype, z_cols_dtype, t_param_dtype, weights_dtype = ctx.dtypes
        grads = [row_grads[0].to(x_dtype), col_grads[0].to(y_dtype),
                 param_grad(row_grads[1], rows.param).to(param_dtype), None, None, None, None]
        if need_target:
            grads[3:6] = [row_grads[2].to(z_dtype), col_grads[1].to(z_cols_dtype),
                          param_grad(row_grads[3], rows.t_param).to(t_param_dtype)]
        if weight_grads is not None:
            grads[6] = weight_grads.to(weights_dtype)
        return grads


