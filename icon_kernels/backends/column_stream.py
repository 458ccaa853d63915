"""The loss over a stream of column blocks, as one autograd function: ring mode's, and the
``torch`` backend's joint normalisation and symmetrised targets on one device.

A *stream* shows this process's rows every global column block once per pass and reduces small
tensors over the processes that share the problem:

* ``visit(own, fn, acc)`` calls ``fn(block)`` on every non-empty column block (``own`` is this
  process's block of columns; the blocks come in the accumulation dtype ``acc``);
* ``visit_with_accumulators(own, fn, accumulators, acc)`` does the same with dL/dy (and
  dL/dz_cols) accumulators that travel with their block, returned complete for ``own``;
* ``reduce(t, op)`` sums (``"sum"``) or maximises (``"max"``) a tensor over the processes.

``distributed/ring.py``'s Ring is the stream of ring mode (blocks rotate between ranks over
P2P); ``LocalStream`` here is one process's: its own columns are all the columns, one block.

Forward makes two passes (column_blocks.py has the math): pass 1 merges the row normalisers, pass
2 the loss sums under them. A symmetrised Affinity target's blocks carry their columns' LSE^p
after pass 1, and under conditional normalisation one more target-only pass (1b) gives each
row's symmetrised mass; joint normalisation (DESIGN.md §1.2) turns the merged normalisers into
global ones (one reduction) between the passes. Backward is one more pass.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import column_blocks, label_blocks, second_backward
from .column_blocks import Block, RowSide


class LocalStream:
    """One process: its own block holds every column; reductions are the identity."""

    def visit(self, own: Block, fn, acc) -> None:
        fn(cast_block(own, acc))

    def visit_with_accumulators(self, own: Block, fn, accumulators, acc):
        fn(cast_block(own, acc), accumulators)
        return accumulators

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduction {op!r}; known: sum, max")
        return t


def cast_block(block: Block, acc) -> Block:
    """The block with its features in the accumulation dtype (labels and statistics as they are)."""
    return dataclasses.replace(block, y=block.y.to(acc),
                               z_cols=None if block.z_cols is None else block.z_cols.to(acc))


def _forward(ctx, rows: RowSide, own: Block, stream):
    """Pass 1 (row normalisers), the symmetrised target's column statistics and pass 1b, the
    joint normalisers, then pass 2 (the loss sums under them)."""
    acc = rows.x.dtype
    normalisers: Optional[dict] = None

    def pass1(block):
        nonlocal normalisers
        normalisers = column_blocks.merge(normalisers, column_blocks.normaliser_partials(rows, block))
    stream.visit(own, pass1, acc)
    if rows.symmetrize:            # a square problem: this process's rows are its own columns
        own = dataclasses.replace(own, lse_p=normalisers["lse_p"],
                                  t_param=rows.t_param if rows.t_param.dim() == 1 else None)
        if not rows.joint:
            sym: Optional[dict] = None

            def pass1b(block):
                nonlocal sym
                sym = column_blocks.merge(sym, column_blocks.symmetric_mass_partials(rows, block, normalisers))
            stream.visit(own, pass1b, acc)
            normalisers.update(sym)
    mass, has_p = column_blocks.row_normalisers(rows, normalisers)
    if rows.joint:
        mass, has_p = column_blocks.joint_normalisers(rows, normalisers, mass, stream.reduce)
    sums: Optional[dict] = None

    def pass2(block):
        nonlocal sums
        sums = column_blocks.merge(sums, column_blocks.loss_partials(rows, block, normalisers, mass))
    stream.visit(own, pass2, acc)
    stats = {**normalisers, **sums}
    row_loss, included = column_blocks.finish_rows(rows, stats, mass, has_p)
    ctx.own, ctx.stats, ctx.mass, ctx.included = own, stats, mass, included
    return row_loss, included


def _fused_forward(ctx, rows: RowSide, own: Block, stream):
    """One pass of the fused label blocks; the loss follows from the merged statistics."""
    stats: Optional[dict] = None

    def visit(block):
        nonlocal stats
        stats = column_blocks.merge(stats, label_blocks.partials(rows, block))
    stream.visit(own, visit, rows.x.dtype)
    row_loss, included = label_blocks.finish_rows(rows, stats)
    ctx.own, ctx.stats, ctx.mass, ctx.included = own, stats, None, included
    return row_loss, included


# where ColumnStreamRowLosses.forward's z, z_cols, t_param and target_weights sit in ctx.needs_input_grad
_Z, _Z_COLS, _T_PARAM, _TARGET_WEIGHTS = 7, 8, 9, 10


class ColumnStreamRowLosses(torch.autograd.Function):
    """(x, y_local, param, z, z_cols_local, t_param, target_weights) -> (L_i of this process's
    rows, included); target_weights is Dense p or Neighbors weights (local rows), or None.
    ``where`` names the caller in the double-backward error."""

    @staticmethod
    def forward(ctx, rows: RowSide, own: Block, stream, where: str, x, y_local, param, z, z_cols, t_param,
                target_weights=None):
        ctx.rows, ctx.stream, ctx.where = rows, stream, where
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, y_local, param, z, z_cols, t_param, target_weights)]
        ctx.weights_shape = None if target_weights is None else target_weights.shape
        row_loss, included = (_fused_forward if rows.fused else _forward)(ctx, rows, own, stream)
        ctx.mark_non_differentiable(included)
        return row_loss, included

    @staticmethod
    def backward(ctx, grad_rows, _grad_included):
        create_graph = torch.is_grad_enabled()          # torch.autograd.grad(..., create_graph=True)
        with torch.no_grad():
            grads = ColumnStreamRowLosses._gradients(ctx, grad_rows)
        with torch.set_grad_enabled(create_graph):
            grads = second_backward.guard(grads, ctx.where)
        return (None, None, None, None, *grads)

    @staticmethod
    def _gradients(ctx, grad_rows):
        rows, own, stream = ctx.rows, ctx.own, ctx.stream
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
        if rows.symmetrize and (need_target or weight_grads is not None):   # the callers refuse it first
            raise ValueError("symmetrize=True: the column stream does not differentiate the target's own tensors")
        centres = column_blocks.joint_centres(rows, ctx.stats, g, stream.reduce) if rows.joint else None

        def visit(block, block_grads):
            if rows.fused:
                label_blocks.gradient_block(rows, block, ctx.stats, g, row_grads, block_grads)
            else:
                column_blocks.gradient_block(rows, block, ctx.stats, ctx.mass, g, row_grads, block_grads,
                                             weight_grads, centres)
        stream.visit_with_accumulators(own, visit, col_grads, acc)

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
