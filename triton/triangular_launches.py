"""The launches of self mode's triangular schedule (DESIGN.md §1.3): the kernels of
symmetric_kernels.py (a Labels target with any column labels, a Dense target, a Neighbors target:
each side of a tile from its own rows' target, symmetric_kernels.side_target) and
symmetric_affinity_kernels.py (an Affinity target, z_cols z), each pair of row blocks I <= J once.

launchers.py decides whether a problem takes this schedule (launchers._self_mode_structure, the
switch, triangular_fits), with which launch (triangular_launch: one tile, warps and stages for both
stages, not autotuned, since the forward's partial buffers are laid out by BLOCK_M) and records the
tile in the stats for the backward (launchers._record_row); this file only launches, and imports
nothing from launchers.py (which imports it).

- ``forward``: one sweep over the triangle (kl and cross_entropy at beta = 0, for an Affinity
  target at alpha = 0 too: the closed form, CLOSED_FORM_PASS) or two (beta > 0, an
  f-divergence, an Affinity target's alpha > 0: every row's LSE, and LSE^p for an Affinity target,
  in the LSE_PASS; then the per-pair terms with LSE_i for the row side of a tile and LSE_j for its
  column side, the SECOND_PASS). A sweep runs, per panel of row blocks, the forward kernel (the
  panel's partial statistics) and the merge kernel (folds them into the running statistics and
  finishes the row blocks the panel completes).
- ``backward``: one launch, H = G_IJ + G_JI^T to dX_I, dX_J and the learned parameter per row.
"""
import torch
import triton

from .symmetric_affinity_kernels import (icon_symmetric_affinity_backward_kernel,
                                         icon_symmetric_affinity_forward_kernel, icon_symmetric_affinity_merge_kernel)
from .symmetric_kernels import (CLOSED_FORM_PASS, LSE_PASS, SECOND_PASS, icon_symmetric_backward_kernel,
                                icon_symmetric_forward_kernel, icon_symmetric_merge_kernel)

# The kernels are reached through these names (tests count their launches). A column block is
# BLOCK_M rows, swept in BLOCK_N-wide tiles.
_triangular_forward_kernel = icon_symmetric_forward_kernel
_triangular_merge_kernel = icon_symmetric_merge_kernel
_triangular_backward_kernel = icon_symmetric_backward_kernel
_triangular_affinity_forward_kernel = icon_symmetric_affinity_forward_kernel
_triangular_affinity_merge_kernel = icon_symmetric_affinity_merge_kernel
_triangular_affinity_backward_kernel = icon_symmetric_affinity_backward_kernel
# Column blocks per program at most (program (I, c) takes every chunks-th block from I + c on): the
# programs of row block 0 do this many block pairs, those of the last row blocks one or none.
BLOCKS_PER_PROGRAM = 8
# The forward's partial statistics of one panel of row blocks: 5 fp32 per (row block of the panel,
# row) for the column side and per (row block, program, row of the block) for the row side. Panels
# hold as many row blocks as fit in PANEL_BYTES (at least one): O(panel * N) memory, never
# O(N^2 / BLOCK_M); at BLOCK_M = 64, 64 MiB holds the 128 row blocks of N = 8192 (one panel) and
# 45 of the 1024 of N = 65536 (23 panels, 46 launches per sweep). Past N of about 3.3M one row
# block's partials alone exceed it (a panel is never empty).
PANEL_BYTES = 64 << 20
# the partials' statistics per row: the closed form's (Labels m, l, sum p s, sum s, sum p~ log p~;
# Affinity m_q, l_q, m_p, l_p, A), the LSE pass's maxima and sums of exps, the second pass's sums
STATISTICS = 5


def _chunks(n_blocks: int) -> int:
    return max(1, triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM))


def _arguments(target: str, tensors, sizes, flags) -> dict:
    """The arguments that the forward and backward kernels of the target share."""
    common = dict(X=tensors["X"], XSQ=tensors["XSQ"], PRM=tensors["PRM"], N=sizes["N"], D=sizes["D"],
                  stride_x=sizes["stride_x"], m_valid=sizes["m_valid"], alpha=sizes["alpha"],
                  KERNEL=flags["KERNEL"], EXCLUDE_SELF=flags["EXCLUDE_SELF"], BLOCK_D=flags["BLOCK_D"],
                  PRECISION=flags["PRECISION"], UPCAST=flags["UPCAST"], D_CHUNKED=flags["D_CHUNKED"])
    if target == "affinity":          # z's rows are also its columns (z_cols is z)
        return dict(common, Z=tensors["Z"], ZSQ=tensors["ZSQ"], TPRM=tensors["TPRM"], DZ=sizes["DZ"],
                    stride_z=sizes["stride_z"], T_KERNEL=flags["T_KERNEL"], BLOCK_DZ=flags["BLOCK_DZ"],
                    UPCAST_Z=flags["UPCAST_Z"])
    if target in ("labels", "dense", "neighbors"):   # symmetric_kernels.side_target reads the one it is given
        return dict(common, LAB=tensors["LAB"], CLAB=tensors["CLAB"], DENSE=tensors["DENSE"],
                    stride_dense=tensors["stride_dense"], TARGET=flags["TARGET"])
    raise ValueError(f"the triangular schedule has no kernels for target {target!r}")


def _passes(flags, beta: float, two_pass: bool) -> list:
    """(PASS, KL, HAS_BETA, DIVERGENCE) of each sweep. The codes that a pass does not read are fixed
    (the closed form: HAS_BETA and DIVERGENCE; the LSE pass: all three), so that they add no compile
    variant. flags["DIVERGENCE"] is launchers._pair_code's: 0 for kl and cross_entropy alike."""
    if not two_pass:
        return [(CLOSED_FORM_PASS.value, flags["KL"], False, 0)]
    return [(LSE_PASS.value, False, False, 0), (SECOND_PASS.value, flags["KL"], beta > 0, flags["DIVERGENCE"])]


def forward(target: str, tensors, sizes, flags, shape, beta: float, two_pass: bool, loss, stats) -> None:
    """Fills loss and the stats rows that the plain forward writes (Labels, Dense, Neighbors: 0, and
    1 = 1 or, after two passes, R_i or Gamma_i, with the row normaliser in 2; Affinity: 0 and 2, then
    3 = H_i after the closed form, or 1 and 3,
    R_i or Gamma_i and H_i or Phi_i, after two), at the launch ``shape`` (BLOCK_M, BLOCK_N, warps,
    stages). launchers writes its record over one of them afterwards (launchers._record_row)."""
    n, dev = sizes["N"], tensors["X"].device
    bm, bn, warps, stages = shape
    n_blocks = triton.cdiv(n, bm)
    chunks = _chunks(n_blocks)
    per_block = STATISTICS * 4 * (n + chunks * bm)
    panel = max(1, min(n_blocks, PANEL_BYTES // per_block))
    col_part = torch.empty(STATISTICS, panel, n, dtype=torch.float32, device=dev)
    row_part = torch.empty(STATISTICS, panel, chunks, bm, dtype=torch.float32, device=dev)
    run = torch.empty(STATISTICS, n, dtype=torch.float32, device=dev)
    arguments = _arguments(target, tensors, sizes, flags)
    if target == "affinity":          # the learned and the target maxima
        forward_kernel, merge_kernel = _triangular_affinity_forward_kernel, _triangular_affinity_merge_kernel
        forward_only, merge_only, maxima = dict(STATS=stats, beta=beta), {}, (0, 2)
    else:
        forward_kernel, merge_kernel = _triangular_forward_kernel, _triangular_merge_kernel
        forward_only = dict(NORM=tensors["NORM"], STATS=stats, beta=beta)
        merge_only, maxima = dict(m_valid=sizes["m_valid"], alpha=sizes["alpha"]), (0,)
    for pass_code, kl, has_beta, divergence in _passes(flags, beta, two_pass):
        codes = dict(PASS=pass_code, DIVERGENCE=divergence)
        forward_codes = dict(codes, HAS_BETA=has_beta, **({"KL": kl} if target == "affinity" else {}))
        # the running statistics: sums from 0, maxima (the first two passes') from NO_MAX
        run.zero_()
        if pass_code != SECOND_PASS.value:
            run[list(maxima)] = -1.0e30
        for block0 in range(0, n_blocks, panel):
            blocks = min(panel, n_blocks - block0)
            forward_kernel[(blocks, chunks)](
                **arguments, **forward_only, **forward_codes, COL_PART=col_part, ROW_PART=row_part, block0=block0,
                panel_cap=panel, chunks=chunks, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            merge_kernel[(n_blocks - block0,)](
                COL_PART=col_part, ROW_PART=row_part, RUN=run, LOSS=loss, STATS=stats, N=n, **merge_only, **codes,
                KL=kl, block0=block0, panel_blocks=blocks, panel_cap=panel, chunks=chunks, BLOCK_M=bm, num_warps=4)


def backward(target: str, tensors, sizes, flags, shape, beta: float, stats, g):
    """(dx, per-row dparam) of self mode from the triangular kernel at the launch ``shape``,
    accumulated in fp32 with atomics (their order, and so the last bits, may vary between runs on a
    GPU)."""
    n, d, dev = sizes["N"], sizes["D"], tensors["X"].device
    bm, bn, warps, stages = shape
    n_blocks = triton.cdiv(n, bm)
    dx = torch.zeros(n, d, dtype=torch.float32, device=dev)
    dprm = torch.zeros(n, dtype=torch.float32, device=dev)
    grid = (n_blocks, _chunks(n_blocks), triton.cdiv(d, flags["BLOCK_D"]))
    kernel = _triangular_affinity_backward_kernel if target == "affinity" else _triangular_backward_kernel
    kernel[grid](**_arguments(target, tensors, sizes, flags), beta=beta, HAS_BETA=beta > 0,
                 DIVERGENCE=flags["DIVERGENCE"], STATS=stats, GRAD=g, DX=dx, DPRM=dprm, chunks=grid[1], BLOCK_M=bm,
                 BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dx, dprm
