"""Supervisory targets p(.|i) of the I-Con loss (DESIGN.md §1).

Each target is a small record of tensors; the math lives in the backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Scalar = Union[float, torch.Tensor]


@dataclass
class Labels:
    """p_ij = 1[l_i = c_j] / K_i over valid columns j (augmentations, SupCon, CLIP pair ids).

    ``col_labels`` defaults to ``row_labels`` when the columns are the rows (or M == N).
    """

    row_labels: torch.Tensor
    col_labels: Optional[torch.Tensor] = None


@dataclass
class Neighbors:
    """p_ij = w_ik / sum_k w_ik at j = indices[i, k]; -1 pads (their weights are ignored),
    repeats add up, invalid j drop.

    ``symmetrize=True`` (a square problem only) uses p_ij ∝ (p_{j|i} + p_{i|j}) / 2 of those
    rows, renormalised over row i (normalization="conditional") or over all valid pairs
    ("joint": p_ij = (p_{j|i} + p_{i|j}) / 2N, DESIGN.md §1.2).
    """

    indices: torch.Tensor
    weights: Optional[torch.Tensor] = None
    symmetrize: bool = False


@dataclass
class Affinity:
    """p(.|i) = softmax over valid j of a learned-kernel logit t_ij computed on target features z.

    ``kernel`` is one of dot, cosine, gaussian, student_t, power, log_dot with its parameter
    (temperature, sigma, dof or exponent). Parameters may be floats, 0-d tensors or (N,) per-row tensors,
    and tensors may require grad, as may ``z`` and ``z_cols``.

    ``symmetrize=True`` (a square problem, z_cols None) uses p_ij ∝ (p_{j|i} + p_{i|j}) / 2,
    renormalised over row i (normalization="conditional") or over all valid pairs ("joint":
    p_ij = (p_{j|i} + p_{i|j}) / 2N, van der Maaten's t-SNE; DESIGN.md §1.2).
    """

    z: torch.Tensor
    z_cols: Optional[torch.Tensor] = None
    kernel: str = "gaussian"
    sigma: Scalar = 1.0
    temperature: Scalar = 1.0
    dof: Scalar = 1.0
    exponent: Scalar = 1.0
    symmetrize: bool = False


@dataclass
class Dense:
    """A given N x M matrix of nonnegative weights, renormalised over the valid columns."""

    p: torch.Tensor


TARGET_TYPES = (Labels, Neighbors, Affinity, Dense)
