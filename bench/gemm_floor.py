"""The GEMM floor: the time of the four N x M x d matmuls that any fused forward + backward does."""
from __future__ import annotations

import time

import torch

from fwd_bwd import sync


def gemm_floor(x, y, device, block_elems=None):
    """Seconds for the four N x M x d GEMMs of one fused forward + backward: S = X Y^T (forward),
    S again (the backward recomputes it), G Y and G^T X with an N x M G. Done in row blocks of at
    most ``block_elems`` entries of S (2^26 on CPU, 2^28 on GPU): the same FLOPs, O(block) memory,
    and exactly four whole GEMMs whenever N x M fits in one block."""
    n, m = x.shape[0], y.shape[0]
    block_elems = block_elems or (2**28 if device == "cuda" else 2**26)
    rows = max(1, min(n, block_elems // max(m, 1)))
    with torch.no_grad():
        s = torch.empty(rows, m, dtype=x.dtype, device=x.device)
        gy = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
        gtx = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
        yt = y.t()
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, rows):
            xb = x[i:i + rows]
            sb, gyb = s[:xb.shape[0]], gy[:xb.shape[0]]
            torch.mm(xb, yt, out=sb)
            torch.mm(xb, yt, out=sb)
            torch.mm(sb, y, out=gyb)
            gtx.addmm_(sb.t(), xb)
        sync(device)
        return time.perf_counter() - t0
