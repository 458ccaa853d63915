"""Triangular kernels of self mode (DESIGN.md §1.3): y is x, a Labels target (any column labels), a
Dense or a Neighbors target (TARGET 0, 3, 1), any divergence, alpha and beta, one kernel parameter
(launchers._self_mode_structure). Then s_ij = s_ji, and each pair of row blocks (I, J), I <= J, is
computed once.

Targets (side_target): each side of a tile takes its own rows' p. The row side (rows I over the
columns of J) p_ij as the plain kernels form it (tile_helpers.target_weights: 1[l_i = c_j] / K_i with
l the row labels (LAB) and c the column labels (CLAB), or w_ij / W_i; neighbor_weights: row i's
entries); the column side (rows J over the columns of I) row j's own p_ji at tile entry (i, j)
(column_target_weights: 1[l_j = c_i] / K_j, LAB read at the tile's columns and CLAB at its rows, or
w_ji / W_j from the transposed tile of w, read in place, and row j's total; column_neighbor_weights:
row j's entries that fall into I's block). Column labels that are the row labels' tensor arrive as
that tensor twice (launchers._labels; no compile variant of their own: Triton specialises a pointer
on its alignment, not on aliasing). A Neighbors target's p is formed in the tiles under every
divergence, kl and cross_entropy too (the plain kernels gather kl's pairs outside the tile loop
instead): O(BLOCK_M BLOCK_N k) compares per side of a tile in each pass that reads p.

Blocks and tiles: row block I is BLOCK_M rows, and so is column block J (the same rows of x); a
block pair is swept in BLOCK_M x BLOCK_N tiles (BLOCK_N divides BLOCK_M), so the tile shapes of
the plain kernels serve here too. Program (I, c) of a launch takes the column blocks
J = I + c, I + c + chunks, ... below n_blocks: a strided share, so that the programs of one row
block have equal work and all of them can run at once.

Passes (PASS, a constexpr of the forward and merge kernels). kl and cross_entropy at beta = 0 have
a closed form in LSE_i and row sums (DESIGN.md §1 'Streaming forward'): one pass over the triangle,
CLOSED_FORM_PASS. beta > 0 and the f-divergences (DESIGN.md §1.1) need every LSE before their
per-pair terms (log q~ is the log of a mixture; q~ f(p~ / q~) per pair): the launcher sweeps the
triangle twice, LSE_PASS (the online max and sum of exps alone) and then SECOND_PASS, whose tile
gives the terms of rows I from LSE_i and of rows J from LSE_j (tile_helpers.second_pass_terms, the
plain second pass's, forward_kernels.icon_mixture_kernel: the row loss and R_i or Gamma_i).

- ``icon_symmetric_forward_kernel``: one Gram tile feeds the row statistics of rows I over the
  columns of J (the row side) and those of rows J over the columns of I (the column side, the
  tile read down its columns; not on the diagonal block, where the row side already sees every
  pair). The statistics (_tile_statistics): in the closed form those of
  forward_kernels.icon_forward_kernel's ONE_PASS Labels branch, running max m, sum of exps l,
  sum_j p s, sum_j s and sum_j p~ log p~ (the LSE pass: m and l, the sums 0); in the second pass
  three plain sums (kl, cross_entropy: sum p~ log q~, sum p~ log p~, R_i's sum p~ q / q~; an
  f-divergence: sum q~ f, sum q g, sum q), then 0, 0. It runs over a panel of row blocks
  block0 .. block0 + panel_blocks - 1 and writes partial statistics, no N x N storage: the column
  side of rows J per (row block k of the panel) to COL_PART [5, panel_cap, N] (the five statistics
  along the leading axis), the row side per (k, c) to ROW_PART [5, panel_cap, chunks, BLOCK_M].
- ``icon_symmetric_merge_kernel``: folds a panel's partials into the running statistics of every
  row block at or after the panel (RUN [5, N]) with the online max rescaling (the second pass's:
  plain sums); a row block of the panel is then complete (every tile (I, R), I <= R, has been
  seen), and the program writes what the plain forward writes: the closed form's loss and stats
  rows 0 and 1, the LSE pass's row 0, the second pass's loss and row 1 (R_i, or Gamma_i divided by
  the row's sum of q, as the plain second pass: tile_helpers.second_pass_rows).
- ``icon_symmetric_backward_kernel``: from one recomputed tile S_IJ, row i's G_ij (with LSE_i and
  its row statistic) and row j's G_ji (with LSE_j and its own), H = G_IJ + G_JI^T, then
  dX_I += H X_J and dX_J += H^T X_I (the row-norm correction of the distance kernels from H's row
  and column sums). G is the plain backward's (_pair_gradients): g (q - p~) at beta = 0 under kl or
  cross_entropy, g (1 - beta) q (R - p~ / q~) at beta > 0, g (1 - beta) q (g_f - Gamma) under an
  f-divergence (backward_kernels.tile_gradients, f_tile_gradients). On the diagonal block H is
  G_II alone, every row's G from its own logits as in the forward (s_ij and s_ji of one fp32 tile
  may differ in the last bit, and at logits of 1e5 and more that moves q by percents), and
  dX_I += H X_I + H^T X_I. dX_I stays in registers over
  the program's tiles; dX_J, and every sum across programs, is added to fp32 buffers with
  atomics. dparam per row is the row's own term, sum_j G_ij ds_ij / dparam, as the plain row
  kernel's (its s shifted by the row's LSE; the launcher sums the rows for the one parameter).

GEMM-equivalents: the forward's Grams ½ per pass, the backward's S ½ plus H X_J and H^T X_I ½ each:
2 in one pass instead of the plain kernels' 5 (the floor's 4, plus S recomputed by both backward
kernels), 2.5 in two instead of their 6, for every target. A Dense target's w is read once per side
of a tile (each entry once per pass that reads p); a Neighbors target's compares are as many per
pass as the plain in-tile kernels' (half the tiles, both sides), which under kl the plain kernels
do not pay (their O(N k d) gather). These kernels are
launched with one tile shape (no autotuning: the panel's partial buffers are laid out by BLOCK_M,
which the launcher must know before launching). Everything accumulates in fp32.

What does not depend on the target is shared with the Affinity target's triangular kernels
(symmetric_affinity_kernels.py): NO_MAX, the pass codes, merge_max_sum, combine_statistics (with
the Affinity statistics' merge_target_sums), the partials' store_statistics / load_statistics (five
statistics per row), the merge kernels' walk over a panel's partials (panel_statistics), the
second pass's second_pass_lse, and the backward's gradient_statistic (stats row 1 where a gradient
reads it), chain_pair_tile (one tile's H to dX_I, dX_J and dparam) and finish_rows. The launches
are triangular_launches.py's.
"""
import triton
import triton.language as tl

from .backward_kernels import f_tile_gradients, tile_gradients
from .tile_helpers import (column_neighbor_weights, column_target_weights, exp_, finite_shift, grad_dot, grad_weight,
                           gram_block, load_rows, load_vec, neighbor_weights, pair_logits, param_grad, second_pass_rows,
                           second_pass_terms, shifted_param_grad, target_weights, valid_pairs)

NO_MAX = tl.constexpr(-1.0e30)       # the running max of no column yet (as icon_forward_kernel's)
# The passes of the triangular kernels over the triangle, Labels and Affinity alike (PASS, a constexpr;
# triangular_launches passes .value):
CLOSED_FORM_PASS = tl.constexpr(0)   # beta = 0, kl or cross_entropy: LSE and the closed form's sums at once
LSE_PASS = tl.constexpr(1)           # the first of two passes: the LSE alone
SECOND_PASS = tl.constexpr(2)        # the second: the per-pair terms with every row's LSE known
# How two partials of the same rows combine (KIND, a constexpr of combine_statistics and panel_statistics):
LABEL_STATISTICS = tl.constexpr(0)     # (max, sum of exps) merged online, three sums added
AFFINITY_STATISTICS = tl.constexpr(1)  # (max, sum of exps) twice, A rescaled with the target's max
SUM_STATISTICS = tl.constexpr(2)       # five plain sums (the second pass)


@triton.jit
def side_target(rows, cols, valid, N, LAB, CLAB, NORM, DENSE, stride_dense, COLUMN_SIDE: tl.constexpr,
                TARGET: tl.constexpr, NEEDED: tl.constexpr):
    """p of one side of a tile, zero off the valid set: the row side's p_ij (rows I over the
    columns of J: tile_helpers.target_weights, the plain kernels' own, or neighbor_weights) or, with
    COLUMN_SIDE, the column side's p_ji at (i, j) (rows J over the columns of I, each row j's own
    target: column_target_weights, column_neighbor_weights). TARGET: 0 Labels (LAB the row labels
    l, CLAB the column labels c, possibly LAB itself: the row side [l_i = c_j] / K_i, the column side
    [l_j = c_i] / K_j, each side reading LAB at its own rows and CLAB at the other side's), 3 Dense
    (w / W read in place from DENSE, row stride stride_dense), 1 Neighbors (LAB the (N, k) indices,
    DENSE their normalised weights, stride_dense k: launchers._neighbor_lists); CLAB read for Labels
    only, N entries as LAB (y is x: the package checks col_labels' length before the op, so nothing
    is checked here); NORM the rows' normaliser (launchers.NORM_ROW: K_i, W_i; unread for
    Neighbors). Without NEEDED (the LSE pass) 0, nothing loaded."""
    if not NEEDED:
        p = tl.zeros(valid.shape, tl.float32)
    elif TARGET == 1:
        if COLUMN_SIDE:
            p = column_neighbor_weights(rows, cols, valid, N, LAB, DENSE, stride_dense)
        else:
            p = neighbor_weights(rows, cols, valid, N, LAB, DENSE, stride_dense)
    elif COLUMN_SIDE:
        p = column_target_weights(rows, cols, valid, N, LAB, CLAB, NORM, DENSE, stride_dense, TARGET)
    else:
        p = target_weights(rows, cols, valid, N, N, LAB, CLAB, NORM, DENSE, stride_dense, TARGET)
    return p


@triton.jit
def _label_statistics(s, valid, p, m_valid, alpha, AXIS: tl.constexpr, SUMS: tl.constexpr):
    """The statistics of one tile along AXIS (1: the rows' over the tile's columns; 0: the
    columns' over the tile's rows): max, sum of exps under it, sum p s, sum s, sum p~ log p~, with
    p the side's target (side_target: each line's own row's p); without SUMS (the LSE pass of a
    two-pass loss) the three sums are 0, not computed (a log per pair). The max is at least
    NO_MAX, so a line without a valid pair merges as (NO_MAX, 0)."""
    s_m = tl.where(valid, s, float("-inf"))
    m = tl.maximum(tl.max(s_m, AXIS), NO_MAX)
    if AXIS == 1:
        l = tl.sum(exp_(s_m - m[:, None]), 1)
    else:
        l = tl.sum(exp_(s_m - m[None, :]), 0)
    if SUMS:
        sum_ps = tl.sum(tl.where(p != 0.0, p * s, 0.0), AXIS)
        p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
        ent = tl.sum(tl.where(p_mix != 0.0, p_mix * tl.log(p_mix), 0.0), AXIS)
        sum_s = tl.sum(tl.where(valid, s, 0.0), AXIS)
    else:
        sum_ps = tl.zeros(m.shape, tl.float32)
        sum_s = sum_ps
        ent = sum_ps
    return m, l, sum_ps, sum_s, ent


@triton.jit
def _second_pass_statistics(s, valid, p, lse, m_valid, alpha, beta, AXIS: tl.constexpr,
                            HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The second pass's sums of one tile along AXIS, p the side's target (side_target) and lse
    (the side's rows' LSE) broadcast along the other: tile_helpers.second_pass_terms' a, b, c (kl, cross_entropy:
    sum p~ log q~, sum p~ log p~, R_i's sum; an f-divergence: sum q~ f, sum q g, sum q), then 0, 0.
    H_i and Phi_i (its h and w) are for an Affinity target's gradient: these targets have none."""
    # (KL False: it selects only the h term, unused here)
    a, b, c, h, w = second_pass_terms(valid, s, lse, p, s, lse, alpha, beta, m_valid, 0, False, HAS_BETA,
                                      DIVERGENCE)
    a = tl.sum(a, AXIS)
    return a, tl.sum(b, AXIS), tl.sum(c, AXIS), tl.zeros(a.shape, tl.float32), tl.zeros(a.shape, tl.float32)


@triton.jit
def second_pass_lse(STATS, idx, N, PASS: tl.constexpr):
    """The LSE of rows idx for the SECOND_PASS (stats row 0 at STATS, from the LSE_PASS; an Affinity
    target's LSE^p, row 2, at STATS + 2 N); the other passes read none (0, not loaded)."""
    if PASS == SECOND_PASS:
        lse = load_vec(STATS, idx, N, 0.0)
    else:
        lse = tl.zeros(idx.shape, tl.float32)
    return lse


@triton.jit
def _tile_statistics(s, valid, p, lse, m_valid, alpha, beta, AXIS: tl.constexpr, PASS: tl.constexpr,
                     HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The five partial statistics of one tile along AXIS in pass PASS (p and lse unread in the LSE_PASS,
    lse read in the SECOND_PASS only)."""
    if PASS == CLOSED_FORM_PASS:
        return _label_statistics(s, valid, p, m_valid, alpha, AXIS, True)
    elif PASS == LSE_PASS:
        return _label_statistics(s, valid, p, m_valid, alpha, AXIS, False)
    elif PASS == SECOND_PASS:
        return _second_pass_statistics(s, valid, p, lse, m_valid, alpha, beta, AXIS, HAS_BETA, DIVERGENCE)
    else:
        tl.static_assert(False, "_tile_statistics: unknown pass code")


@triton.jit
def merge_max_sum(m, l, m2, l2):
    """Two (max, sum of exps under it) pairs of the same rows as one."""
    m_new = tl.maximum(m, m2)
    return m_new, l * exp_(m - m_new) + l2 * exp_(m2 - m_new)


@triton.jit
def store_statistics(at, stride, s0, s1, s2, s3, s4, mask):
    """The STATISTICS (5) per-row statistics of a partial or running buffer: s_k at at + k stride."""
    tl.store(at, s0, mask=mask)
    tl.store(at + stride, s1, mask=mask)
    tl.store(at + 2 * stride, s2, mask=mask)
    tl.store(at + 3 * stride, s3, mask=mask)
    tl.store(at + 4 * stride, s4, mask=mask)


@triton.jit
def load_statistics(at, stride, mask):
    """store_statistics' five statistics back (0 where masked: rows past N, never stored)."""
    return (tl.load(at, mask=mask, other=0.0), tl.load(at + stride, mask=mask, other=0.0),
            tl.load(at + 2 * stride, mask=mask, other=0.0), tl.load(at + 3 * stride, mask=mask, other=0.0),
            tl.load(at + 4 * stride, mask=mask, other=0.0))


@triton.jit
def merge_target_sums(m_p, l_p, a, m_p2, l_p2, a2):
    """Two (target max, sum of exps under it, A under it) triples of the same rows as one (the
    Affinity kernels' statistics): l_p and A are both sums of e^{t - m_p}, rescaled alike."""
    m_new = tl.maximum(m_p, m_p2)
    r = exp_(m_p - m_new)
    r2 = exp_(m_p2 - m_new)
    return m_new, l_p * r + l_p2 * r2, a * r + a2 * r2


@triton.jit
def combine_statistics(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, KIND: tl.constexpr):
    """Two partials of the same rows as one: LABEL_STATISTICS, (max, sum of exps) merged online,
    then the Labels sums (sum p s, sum s, sum p~ log p~) added; AFFINITY_STATISTICS, the same max
    and sum, then the Affinity target's (max, sum, A) merged; SUM_STATISTICS, five sums added."""
    if KIND == LABEL_STATISTICS:
        m, l = merge_max_sum(x0, x1, y0, y1)
        return m, l, x2 + y2, x3 + y3, x4 + y4
    elif KIND == AFFINITY_STATISTICS:
        m, l = merge_max_sum(x0, x1, y0, y1)
        m_p, l_p, a = merge_target_sums(x2, x3, x4, y2, y3, y4)
        return m, l, m_p, l_p, a
    elif KIND == SUM_STATISTICS:
        return x0 + y0, x1 + y1, x2 + y2, x3 + y3, x4 + y4
    else:
        tl.static_assert(False, "combine_statistics: unknown statistics kind")


@triton.jit
def panel_statistics(COL_PART, ROW_PART, RUN, R, rows, in_rows, N, block0, panel_blocks, panel_cap, chunks,
                     BLOCK_M: tl.constexpr, KIND: tl.constexpr):
    """Row block R's running statistics (RUN) with a panel's partials folded in: the column-side
    ones of the panel's row blocks before R and, when the panel holds R (then R is complete), its
    row-side ones, in that order (the merge kernels of both targets; KIND as combine_statistics')."""
    s0, s1, s2, s3, s4 = load_statistics(RUN + rows, N, in_rows)
    for k in range(0, tl.minimum(panel_blocks, R - block0)):
        c0, c1, c2, c3, c4 = load_statistics(COL_PART + k * N + rows, panel_cap * N, in_rows)
        s0, s1, s2, s3, s4 = combine_statistics(s0, s1, s2, s3, s4, c0, c1, c2, c3, c4, KIND)
    if R - block0 < panel_blocks:
        for c in range(0, chunks):
            r0, r1, r2, r3, r4 = load_statistics(
                ROW_PART + ((R - block0) * chunks + c) * BLOCK_M + tl.arange(0, BLOCK_M),
                panel_cap * chunks * BLOCK_M, in_rows)
            s0, s1, s2, s3, s4 = combine_statistics(s0, s1, s2, s3, s4, r0, r1, r2, r3, r4, KIND)
    return s0, s1, s2, s3, s4


@triton.jit(do_not_specialize=["block0", "panel_cap", "chunks"])     # no compile variant per panel
def icon_symmetric_forward_kernel(
        X, XSQ, PRM, LAB, CLAB, NORM, DENSE, STATS, COL_PART, ROW_PART,
        N, D, stride_x, stride_dense, m_valid, alpha, beta, block0, panel_cap, chunks,
        KERNEL: tl.constexpr, TARGET: tl.constexpr, EXCLUDE_SELF: tl.constexpr, PASS: tl.constexpr,
        HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Program (k, c): row block I = block0 + k, its share c of the column blocks. PASS: the
    statistics of _tile_statistics; the SECOND_PASS reads every row's LSE (STATS row 0, from the
    LSE_PASS over the whole triangle), its rows' and, on the column side, its columns' rows'. The
    target (TARGET, side_target): each side's p from its own rows' target, the LSE_PASS none."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    KIND: tl.constexpr = SUM_STATISTICS if PASS == SECOND_PASS else LABEL_STATISTICS
    NEEDS_P: tl.constexpr = PASS != LSE_PASS
    k = tl.program_id(0)                  # the row block's place in the panel
    c = tl.program_id(1)                  # its share of the column blocks
    I = block0 + k
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, 0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lse = second_pass_lse(STATS, rows, N, PASS)
    if KIND == SUM_STATISTICS:
        s0 = tl.zeros([BLOCK_M], tl.float32)
    else:
        s0 = tl.full([BLOCK_M], NO_MAX, tl.float32)    # the running max
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    s3 = tl.zeros([BLOCK_M], tl.float32)
    s4 = tl.zeros([BLOCK_M], tl.float32)
    col_stat = panel_cap * N              # the partials' stride from one statistic to the next
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, 0)
            ab = gram_block(x, y, X, X, rows, cols, N, N, stride_x, stride_x, D, BLOCK_D, D_CHUNKED,
                            UPCAST, PRECISION)
            s, aux = pair_logits(ab, x_sq, load_vec(XSQ, cols, N, 0.0), prm, KERNEL)
            p = side_target(rows, cols, valid, N, LAB, CLAB, NORM, DENSE, stride_dense, False, TARGET, NEEDS_P)
            t0, t1, t2, t3, t4 = _tile_statistics(s, valid, p, lse[:, None], m_valid, alpha, beta, 1, PASS, HAS_BETA,
                                                  DIVERGENCE)
            s0, s1, s2, s3, s4 = combine_statistics(s0, s1, s2, s3, s4, t0, t1, t2, t3, t4, KIND)
            if J != I:        # rows J over the columns of I: this tile read down its columns, row j's own p_ji
                p_cols = side_target(rows, cols, valid, N, LAB, CLAB, NORM, DENSE, stride_dense, True, TARGET,
                                     NEEDS_P)
                c0, c1, c2, c3, c4 = _tile_statistics(s, valid, p_cols, second_pass_lse(STATS, cols, N, PASS)[None, :],
                                                      m_valid, alpha, beta, 0, PASS, HAS_BETA, DIVERGENCE)
                store_statistics(COL_PART + k * N + cols, col_stat, c0, c1, c2, c3, c4, cols < N)
    store_statistics(ROW_PART + (k * chunks + c) * BLOCK_M + tl.arange(0, BLOCK_M), panel_cap * chunks * BLOCK_M,
                     s0, s1, s2, s3, s4, rows < N)


@triton.jit(do_not_specialize=["block0", "panel_blocks", "panel_cap", "chunks"])
def icon_symmetric_merge_kernel(
        COL_PART, ROW_PART, RUN, LOSS, STATS,
        N, m_valid, alpha, block0, panel_blocks, panel_cap, chunks,
        PASS: tl.constexpr, KL: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program r: row block R = block0 + r. Its column-side partials come from the panel's row
    blocks before it; if the panel holds R, its row-side partials too, and R is complete. A
    complete row block's finish depends on the PASS: the closed form's loss and stats rows 0 and 1
    (icon_forward_kernel's ONE_PASS Labels rows), the LSE_PASS's row 0 alone, or the SECOND_PASS's
    loss and row 1 (icon_mixture_kernel's, tile_helpers.second_pass_rows: R_i, or Gamma_i for an
    f-divergence, what the plain backward reads after it too)."""
    KIND: tl.constexpr = SUM_STATISTICS if PASS == SECOND_PASS else LABEL_STATISTICS
    R = block0 + tl.program_id(0)
    rows = R * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    s0, s1, s2, s3, s4 = panel_statistics(COL_PART, ROW_PART, RUN, R, rows, in_rows, N, block0, panel_blocks,
                                          panel_cap, chunks, BLOCK_M, KIND)
    if R - block0 < panel_blocks:
        if PASS == CLOSED_FORM_PASS:
            # the finish of icon_forward_kernel's ONE_PASS Labels rows: m, l, sum p s, sum s, sum p~ log p~
            lse = s0 + tl.log(s1)
            cross = (1.0 - alpha) * s2 + alpha / m_valid * s3 - lse
            if KL:
                loss = s4 - cross
            else:
                loss = -cross
            tl.store(LOSS + rows, loss, mask=in_rows)
            tl.store(STATS + rows, lse, mask=in_rows)
            tl.store(STATS + N + rows, tl.full([BLOCK_M], 1.0, tl.float32), mask=in_rows)
        elif PASS == LSE_PASS:
            tl.store(STATS + rows, s0 + tl.log(s1), mask=in_rows)
        elif PASS == SECOND_PASS:
            loss, stat = second_pass_rows(s0, s1, s2, KL, DIVERGENCE)
            tl.store(LOSS + rows, loss, mask=in_rows)
            tl.store(STATS + N + rows, stat, mask=in_rows)
        else:
            tl.static_assert(False, "icon_symmetric_merge_kernel: unknown pass code")
    else:
        store_statistics(RUN + rows, N, s0, s1, s2, s3, s4, in_rows)


@triton.jit
def _label_gradients(s, valid, p, lse, g, m_valid, alpha):
    """g (q - p~) of the rows whose (LSE, upstream gradient) are lse, g, each broadcast along the
    tile (rows i: [:, None], the G_ji of rows j: [None, :]), p that side's target (side_target); 0
    off the valid set and on rows left out (g = 0), as backward_kernels.tile_gradients and
    reverse_gradients."""
    q = exp_(tl.where(valid, s - lse, float("-inf")))
    p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
    return tl.where(valid & (g != 0.0), g * (q - p_mix), 0.0)


@triton.jit
def gradient_statistic(STATS, idx, N, HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Stats row 1 of rows idx where a side's gradient reads it (R_i at beta > 0, Gamma_i of an
    f-divergence: _pair_gradients here, the Affinity kernels' _affinity_gradients); else 0, not
    loaded (row 1 is then unread: 1 after the closed form, an Affinity forward's record)."""
    if HAS_BETA or (DIVERGENCE != 0 and DIVERGENCE != 1):
        stat = load_vec(STATS + N, idx, N, 0.0)
    else:
        stat = tl.zeros(idx.shape, tl.float32)
    return stat


@triton.jit
def _pair_gradients(s, valid, p, lse, g, stat, m_valid, alpha, beta, HAS_BETA: tl.constexpr,
                    DIVERGENCE: tl.constexpr):
    """dL/ds of one side of a tile, the side's target p (side_target) and its rows' (LSE, upstream
    gradient, stats row 1) broadcast along it: kl and cross_entropy (one gradient) at beta = 0, g (q - p~)
    (_label_gradients); at beta > 0, g (1 - beta) q (R - p~ / q~); an f-divergence's
    g (1 - beta) q (g_f - Gamma): the plain backward's tile_gradients and f_tile_gradients, whose
    target-side gradient (an Affinity target's) is not asked for."""
    if DIVERGENCE == 0 or DIVERGENCE == 1:
        if HAS_BETA:
            grad, _ = tile_gradients(s, valid, p, lse, g, stat, stat, m_valid, alpha, beta, False, True, False)
        else:
            grad = _label_gradients(s, valid, p, lse, g, m_valid, alpha)
    elif DIVERGENCE >= 2 and DIVERGENCE <= 6:
        grad, _ = f_tile_gradients(s, valid, p, s, lse, lse, g, stat, stat, m_valid, alpha, beta, 0, HAS_BETA, False,
                                   DIVERGENCE)
    else:
        tl.static_assert(False, "_pair_gradients: unknown divergence code")
    return grad


@triton.jit
def chain_pair_tile(grad_rows, grad_cols, s, aux, x, y, prm, lse, cols, prm_cols, lse_cols, dk, DX, DPRM, N, D,
                    first, off_diagonal, KERNEL: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of the triangular backward from its two sides' dL/ds (grad_rows: G_IJ of rows I;
    grad_cols: G_JI^T of rows J, zero on the diagonal block): H = G_IJ + G_JI^T through the kernel's
    gradient weights W (linear in dL/ds, a function of the pair only). Adds H^T X_I (with the distance
    kernels' row-norm correction) into the columns' rows of DX and, off the diagonal block
    (off_diagonal), the columns' rows' own dparam terms into DPRM (their G sums to zero along the
    tile's columns: s is shifted by their LSE); returns what stays in the program's registers: H X_J,
    W's row sums (the rows' correction, finish_rows) and the rows' own dparam terms."""
    w = grad_weight(grad_rows + grad_cols, aux, prm, KERNEL)
    dx = grad_dot(w, y, PRECISION)
    dprm = param_grad(grad_rows, s, aux, prm, finite_shift(lse), KERNEL)
    dy = grad_dot(tl.trans(w), x, PRECISION)
    if KERNEL == 1 or KERNEL == 2 or KERNEL == 4:
        dy -= tl.sum(w, 0)[:, None] * y.to(tl.float32)
    in_cols = cols < N
    tl.atomic_add(DX + cols.to(tl.int64)[:, None] * D + dk[None, :], dy,
                  mask=in_cols[:, None] & (dk < D)[None, :], sem="relaxed")
    if off_diagonal:
        dprm_c = shifted_param_grad(tl.trans(grad_cols), tl.trans(s), tl.trans(aux), prm_cols,
                                    finite_shift(lse_cols)[:, None], KERNEL)
        tl.atomic_add(DPRM + cols, dprm_c, mask=in_cols & first, sem="relaxed")
    return dx, tl.sum(w, 1), dprm


@triton.jit
def finish_rows(dx, w_sum, dprm, x, rows, dk, DX, DPRM, N, D, first, KERNEL: tl.constexpr):
    """The program's rows after its tiles: the distance kernels' row-norm correction of H X_J, then
    dX_I and the rows' dparam added to the buffers that every program adds into (dparam from the
    first chunk of d's programs only)."""
    if KERNEL == 1 or KERNEL == 2 or KERNEL == 4:
        dx -= w_sum[:, None] * x.to(tl.float32)
    in_rows = rows < N
    tl.atomic_add(DX + rows.to(tl.int64)[:, None] * D + dk[None, :], dx,
                  mask=in_rows[:, None] & (dk < D)[None, :], sem="relaxed")
    tl.atomic_add(DPRM + rows, dprm, mask=in_rows & first, sem="relaxed")


@triton.jit(do_not_specialize=["chunks"])
def icon_symmetric_backward_kernel(
        X, XSQ, PRM, LAB, CLAB, DENSE, STATS, GRAD, DX, DPRM,
        N, D, stride_x, stride_dense, m_valid, alpha, beta, chunks,
        KERNEL: tl.constexpr, TARGET: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_BETA: tl.constexpr,
        DIVERGENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Program (I, c, chunk of d): DX and DPRM are zeroed fp32 buffers that every program adds
    into. With D_CHUNKED each chunk's program recomputes S over all of d (as the plain kernels).
    DIVERGENCE: 0 for kl and cross_entropy (one gradient), else the f-divergence's code; the row
    statistic of beta > 0 or an f-divergence (R_i, Gamma_i) is stats row 1, each side's rows' own;
    the target's row normaliser (K_i, W_i) row 2 (launchers.NORM_ROW), read by side_target."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    I = tl.program_id(0)
    c = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    first = tl.program_id(2) == 0         # per-row dparam: from the first chunk's programs
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, d0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lse = load_vec(STATS, rows, N, 0.0)
    g = load_vec(GRAD, rows, N, 0.0)
    stat = gradient_statistic(STATS, rows, N, HAS_BETA, DIVERGENCE)
    dx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    dprm = tl.zeros([BLOCK_M], tl.float32)
    dk = d0 + tl.arange(0, BLOCK_D)
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, d0)
            y_sq = load_vec(XSQ, cols, N, 0.0)
            lse_c = load_vec(STATS, cols, N, 0.0)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            ab = gram_block(x, y, X, X, rows, cols, N, N, stride_x, stride_x, D, BLOCK_D, D_CHUNKED,
                            UPCAST, PRECISION)
            s, aux = pair_logits(ab, x_sq, y_sq, prm, KERNEL)
            p = side_target(rows, cols, valid, N, LAB, CLAB, STATS + 2 * N, DENSE, stride_dense, False, TARGET, True)
            grad_rows = _pair_gradients(s, valid, p, lse[:, None], g[:, None], stat[:, None], m_valid, alpha, beta,
                                        HAS_BETA, DIVERGENCE)
            # G_ji of the columns' rows, off the diagonal block only: on it, row j's G_ji is its
            # own row side's, from s_ji (the forward's value for row j; the fp32 tile need not be
            # bitwise symmetric), and reaches x_i through H^T (chain_pair_tile)
            p_cols = side_target(rows, cols, valid, N, LAB, CLAB, STATS + 2 * N, DENSE, stride_dense, True, TARGET,
                                 True)
            grad_cols = tl.where(J != I, _pair_gradients(s, valid, p_cols, lse_c[None, :],
                                                         load_vec(GRAD, cols, N, 0.0)[None, :],
                                                         gradient_statistic(STATS, cols, N, HAS_BETA,
                                                                             DIVERGENCE)[None, :],
                                                         m_valid, alpha, beta, HAS_BETA, DIVERGENCE), 0.0)
            t_dx, t_w_sum, t_dprm = chain_pair_tile(grad_rows, grad_cols, s, aux, x, y, prm, lse, cols,
                                                    load_vec(PRM, cols, N, 1.0), lse_c, dk, DX, DPRM, N, D,
                                                    first, J != I, KERNEL, PRECISION)
            dx += t_dx
            w_sum += t_w_sum
            dprm += t_dprm
    finish_rows(dx, w_sum, dprm, x, rows, dk, DX, DPRM, N, D, first, KERNEL)

