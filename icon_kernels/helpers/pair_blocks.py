"""Blockwise pairwise scores for the helpers (knn, calibrate_sigma): never an N x M matrix.

Rows are processed in chunks of R rows against at most ``COLUMN_TILE`` columns at a time, so a
block holds about ``BLOCK_ELEMENTS`` entries whatever N and M are.
"""
from __future__ import annotations

import torch

from ..backends.tile_math import row_ranges
from ..validation import check_matrix

BLOCK_ELEMENTS = 1 << 21      # entries of one (rows x columns) block
COLUMN_TILE = 4096            # columns per tile in knn


def row_chunks(n_rows: int, width: int):
    """(r0, r1) row ranges whose blocks of ``width`` columns hold about BLOCK_ELEMENTS entries."""
    return row_ranges(n_rows, width, BLOCK_ELEMENTS)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for one block (not clamped, so equal inputs rank as they compute)."""
    return a.square().sum(1, keepdim=True) + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)


def self_pair_mask(r0: int, r1: int, c0: int, c1: int, self_start, device) -> torch.Tensor:
    """(r1-r0, c1-c0) bool: True where column c is row r's own point (column self_start + r)."""
    rows = torch.arange(r0, r1, device=device)[:, None] + self_start
    cols = torch.arange(c0, c1, device=device)[None, :]
    return rows == cols


def check_points(name: str, z) -> None:
    """A 2-D floating tensor of points with at least two rows and finite values."""
    check_matrix(name, z)
    if z.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows (points), got {z.shape[0]}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_count(name: str, value, low: int, high=None) -> int:
    """An int in [low, high] (no upper bound when high is None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value
