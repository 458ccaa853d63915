"""Schemas of the ring-mode label block ops of the fused CPU backend (kernels in
csrc/cpu_label_blocks.cpp), for the hot case: Labels target, beta = 0, dot or gaussian kernel.

``icon_kernels::cpu_label_block_stats`` returns [4, N] partial row statistics over one block of
the global columns: LSE, positive count K, sum of s over the positives, sum of s over the valid
columns (merged across blocks by column_blocks.merge). ``icon_kernels::cpu_label_block_backward``
adds the block's dL/dx, dL/dy and per-row dL/dparam into ``dx``, ``dy``, ``dparam`` in place,
under the merged LSE and K. Local row i's self pair is block column i + ``diagonal``.
"""
from __future__ import annotations

import torch

STATS_SCHEMA = ("(Tensor x, Tensor y, Tensor param, str kernel, Tensor row_labels, Tensor col_labels, "
                "bool exclude_self, int diagonal, int tile_elements) -> Tensor")
BACKWARD_SCHEMA = ("(Tensor grad_rows, Tensor x, Tensor y, Tensor param, str kernel, Tensor row_labels, "
                   "Tensor col_labels, float alpha, bool exclude_self, int diagonal, int m_valid, Tensor lse, "
                   "Tensor count, int tile_elements, Tensor(a!) dx, Tensor(b!) dy, Tensor(c!) dparam) -> ()")


def _fake_stats(x, *rest):
    return x.new_empty(4, x.shape[0])


def _fake_backward(*args):
    return None


def register() -> None:
    """Defines the two ops (their CPU kernels come from icon_kernels._C)."""
    for name, schema, fake in (("cpu_label_block_stats", STATS_SCHEMA, _fake_stats),
                               ("cpu_label_block_backward", BACKWARD_SCHEMA, _fake_backward)):
        torch.library.define(f"icon_kernels::{name}", schema)
        torch.library.register_fake(f"icon_kernels::{name}", fake)
