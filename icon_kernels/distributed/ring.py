"""Ring mode of the distributed loss: column blocks rotate around the ranks (torch.distributed P2P).

Each rank keeps its rows and sees the global columns one block at a time: while block k is
computed, block k + 1 is already in flight (isend / irecv). A rank's columns travel as
``pieces`` blocks of at most ``block_rows`` rows (the same number of pieces on every rank, so
uneven shards give pieces of different, possibly zero, sizes; a zero-row piece is neither sent
nor visited). Forward makes two passes over all blocks: pass 1 merges the row normalisers (LSE,
target mass or LSE^p), pass 2 the loss sums under the global normalisers (see backends/column_blocks.py
for the math and the one shared merge; backends/column_stream.py runs the passes); the fused CPU
label blocks (backends/label_blocks.py) need only
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

from ..backends.column_blocks import Block
from ..backends.column_stream import cast_block


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

    # the stream of backends/column_stream.py: every global column block, reductions over the group
    def visit(self, own: Block, fn, acc) -> None:
        rotate(self, own, fn, acc)

    def visit_with_accumulators(self, own: Block, fn, accumulators, acc):
        return rotate_with_accumulators(self, own, fn, accumulators, acc)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"unknown reduction {op!r}; known: {', '.join(ops)}")
        out = t.detach().clone()
        dist.all_reduce(out, op=ops[op], group=self.group)
        return out

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


_TRAVELLING = ("y", "col_labels", "z_cols", "lse_p", "t_param")     # a block's tensors, in order


def _block_tensors(block: Block):
    return [getattr(block, name) for name in _TRAVELLING if getattr(block, name) is not None]


def _block_from(tensors, template: Block, offset: int) -> Block:
    """A block like ``template`` (the same fields present) from its received tensors."""
    remaining = iter(tensors)
    fields = {name: next(remaining) if getattr(template, name) is not None else None for name in _TRAVELLING}
    return Block(offset=offset, **fields)


def _own_piece(ring: Ring, own: Block, piece: int) -> Block:
    lo, hi = ring.bounds(ring.rank, piece)
    return _block_from([t[lo:hi] for t in _block_tensors(own)], own, own.offset + lo)




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
        yield step, (cast_block(block, acc) if block.y.shape[0] > 0 else None)
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
                visit(cast_block(_own_piece(ring, own, piece), acc), [a[lo:hi] for a in accumulators])
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
