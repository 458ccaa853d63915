"""Triangular kernels of self mode (DESIGN.md §1.3): y is x, a Labels target whose column labels
are its rows', beta = 0, kl or cross_entropy, one kernel parameter (launchers._self_mode_structure).
Then s_ij = s_ji, and each pair of row blocks (I, J), I <= J, is computed once.

Blocks and tiles: row block I is BLOCK_M rows, and so is column block J (the same rows of x); a
block pair is swept in BLOCK_M x BLOCK_N tiles (BLOCK_N divides BLOCK_M), so the tile shapes of
the plain kernels serve here too. Program (I, c) of a launch takes the column blocks
J = I + c, I + c + chunks, ... below n_blocks: a strided share, so that the programs of one row
block have equal work and all of them can run at once.

- ``icon_symmetric_forward_kernel``: one Gram tile feeds the row statistics of rows I over the
  columns of J (the row side) and those of rows J over the columns of I (the column side, the
  tile read down its columns; not on the diagonal block, where the row side already sees every
  pair). The statistics are those of forward_kernels.icon_forward_kernel's ONE_PASS Labels
  branch: running max m, sum of exps l, sum_j p s, sum_j s and sum_j p~ log p~. It runs over a
  panel of row blocks block0 .. block0 + panel_blocks - 1 and writes partial statistics, no N x N
  storage: the column side of rows J per (row block k of the panel) to COL_PART [5, panel_cap, N]
  (statistics m, l, sum p s, sum s, sum p~ log p~ along the leading axis),
  the row side per (k, c) to ROW_PART [5, panel_cap, chunks, BLOCK_M].
- ``icon_symmetric_merge_kernel``: folds a panel's partials into the running statistics of every
  row block at or after the panel (RUN [5, N]) with the online max rescaling; a row block of the
  panel is then complete (every tile (I, R), I <= R, has been seen), and the program writes its
  loss and stats rows 0 and 1 as the plain forward does.
- ``icon_symmetric_backward_kernel``: from one recomputed tile S_IJ, row i's G_ij (with LSE_i) and
  row j's G_ji (with LSE_j), H = G_IJ + G_JI^T, then dX_I += H X_J and dX_J += H^T X_I (the row-norm
  correction of the distance kernels from H's row and column sums). On the diagonal block H is
  G_II alone, every row's G from its own logits as in the forward (s_ij and s_ji of one fp32 tile
  may differ in the last bit, and at logits of 1e5 and more that moves q by percents), and
  dX_I += H X_I + H^T X_I. dX_I stays in registers over
  the program's tiles; dX_J, and every sum across programs, is added to fp32 buffers with
  atomics. dparam per row is the row's own term, sum_j G_ij ds_ij / dparam, as the plain row
  kernel's (its s shifted by the row's LSE; the launcher sums the rows for the one parameter).

GEMM-equivalents: the forward's Grams ½, the backward's S ½ plus H X_J and H^T X_I ½ each: 2
instead of the plain 4. These kernels are launched with one tile shape (no autotuning: the
panel's partial buffers are laid out by BLOCK_M, which the launcher must know before launching).
Everything accumulates in fp32.

What does not depend on the target is shared with the Affinity target's triangular kernels
(symmetric_affinity_kernels.py): NO_MAX, merge_max_sum, the partials' store_statistics /
load_statistics (five statistics per row), the merge kernels' walk over a panel's partials
(panel_statistics, with the Affinity statistics' merge_target_sums) and the backward's
chain_pair_tile (one tile's H to dX_I, dX_J and dparam) and finish_rows.
"""
import triton
import triton.language as tl

from .tile_helpers import (exp_, finite_shift, grad_dot, grad_weight, gram_block, load_rows, load_vec,
                           pair_logits, param_grad, shifted_param_grad, valid_pairs)

NO_MAX = tl.constexpr(-1.0e30)       # the running max of no column yet (as icon_forward_kernel's)


@triton.jit
def _label_statistics(s, valid, same, k, m_valid, alpha, AXIS: tl.constexpr):
    """The statistics of one tile along AXIS (1: the rows' over the tile's columns; 0: the
    columns' over the tile's rows): max, sum of exps under it, sum p s, sum s, sum p~ log p~,
    with p = 1/K where the labels match (k: K broadcast along AXIS). The max is at least NO_MAX,
    so a line without a valid pair merges as (NO_MAX, 0)."""
    s_m = tl.where(valid, s, float("-inf"))
    m = tl.maximum(tl.max(s_m, AXIS), NO_MAX)
    if AXIS == 1:
        l = tl.sum(exp_(s_m - m[:, None]), 1)
    else:
        l = tl.sum(exp_(s_m - m[None, :]), 0)
    p = tl.where(same, 1.0 / k, 0.0)
    sum_ps = tl.sum(tl.where(p != 0.0, p * s, 0.0), AXIS)
    p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
    ent = tl.sum(tl.where(p_mix != 0.0, p_mix * tl.log(p_mix), 0.0), AXIS)
    sum_s = tl.sum(tl.where(valid, s, 0.0), AXIS)
    return m, l, sum_ps, sum_s, ent


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
def _combine(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, AFFINITY: tl.constexpr):
    """Two partials of the same rows as one: (max, sum of exps) merged online, then the Labels
    sums (sum p s, sum s, sum p~ log p~) added, or the Affinity target's (max, sum, A) merged."""
    m, l = merge_max_sum(x0, x1, y0, y1)
    if AFFINITY:
        m_p, l_p, a = merge_target_sums(x2, x3, x4, y2, y3, y4)
        return m, l, m_p, l_p, a
    else:
        return m, l, x2 + y2, x3 + y3, x4 + y4


@triton.jit
def panel_statistics(COL_PART, ROW_PART, RUN, R, rows, in_rows, N, block0, panel_blocks, panel_cap, chunks,
                     BLOCK_M: tl.constexpr, AFFINITY: tl.constexpr):
    """Row block R's running statistics (RUN) with a panel's partials folded in: the column-side
    ones of the panel's row blocks before R and, when the panel holds R (then R is complete), its
    row-side ones, in that order (the merge kernels of both targets)."""
    s0, s1, s2, s3, s4 = load_statistics(RUN + rows, N, in_rows)
    for k in range(0, tl.minimum(panel_blocks, R - block0)):
        c0, c1, c2, c3, c4 = load_statistics(COL_PART + k * N + rows, panel_cap * N, in_rows)
        s0, s1, s2, s3, s4 = _combine(s0, s1, s2, s3, s4, c0, c1, c2, c3, c4, AFFINITY)
    if R - block0 < panel_blocks:
        for c in range(0, chunks):
            r0, r1, r2, r3, r4 = load_statistics(
                ROW_PART + ((R - block0) * chunks + c) * BLOCK_M + tl.arange(0, BLOCK_M),
                panel_cap * chunks * BLOCK_M, in_rows)
            s0, s1, s2, s3, s4 = _combine(s0, s1, s2, s3, s4, r0, r1, r2, r3, r4, AFFINITY)
    return s0, s1, s2, s3, s4


@triton.jit(do_not_specialize=["block0", "panel_cap", "chunks"])     # no compile variant per panel
def icon_symmetric_forward_kernel(
        X, XSQ, PRM, LAB, NORM, COL_PART, ROW_PART,
        N, D, stride_x, m_valid, alpha, block0, panel_cap, chunks,
        KERNEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_CHUNKED: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    k = tl.program_id(0)                  # the row block's place in the panel
    c = tl.program_id(1)                  # its share of the column blocks
    I = block0 + k
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, 0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lab = tl.load(LAB + rows, mask=rows < N, other=0)
    k_rows = load_vec(NORM, rows, N, 1.0)
    m = tl.full([BLOCK_M], NO_MAX, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    sum_ps = tl.zeros([BLOCK_M], tl.float32)
    sum_s = tl.zeros([BLOCK_M], tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)
    col_stat = panel_cap * N              # the partials' stride from one statistic to the next
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, 0)
            ab = gram_block(x, y, X, X, rows, cols, N, N, stride_x, stride_x, D, BLOCK_D, D_CHUNKED,
                            UPCAST, PRECISION)
            s, aux = pair_logits(ab, x_sq, load_vec(XSQ, cols, N, 0.0), prm, KERNEL)
            same = (lab[:, None] == tl.load(LAB + cols, mask=cols < N, other=0)[None, :]) & valid
            t_m, t_l, t_ps, t_s, t_ent = _label_statistics(s, valid, same, k_rows[:, None], m_valid,
                                                           alpha, 1)
            m, l = merge_max_sum(m, l, t_m, t_l)
            sum_ps += t_ps
            sum_s += t_s
            ent += t_ent
            if J != I:        # rows J over the columns of I: this tile read down its columns
                k_cols = load_vec(NORM, cols, N, 1.0)
                c_m, c_l, c_ps, c_s, c_ent = _label_statistics(s, valid, same, k_cols[None, :], m_valid,
                                                               alpha, 0)
                store_statistics(COL_PART + k * N + cols, col_stat, c_m, c_l, c_ps, c_s, c_ent, cols < N)
    store_statistics(ROW_PART + (k * chunks + c) * BLOCK_M + tl.arange(0, BLOCK_M), panel_cap * chunks * BLOCK_M,
                     m, l, sum_ps, sum_s, ent, rows < N)


@triton.jit(do_not_specialize=["block0", "panel_blocks", "panel_cap", "chunks"])
def icon_symmetric_merge_kernel(
        COL_PART, ROW_PART, RUN, LOSS, STATS,
        N, m_valid, alpha, block0, panel_blocks, panel_cap, chunks,
        KL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program r: row block R = block0 + r. Its column-side partials come from the panel's row
    blocks before it; if the panel holds R, its row-side partials too, and R is complete."""
    R = block0 + tl.program_id(0)
    rows = R * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    m, l, sum_ps, sum_s, ent = panel_statistics(COL_PART, ROW_PART, RUN, R, rows, in_rows, N, block0, panel_blocks,
                                                panel_cap, chunks, BLOCK_M, False)
    if R - block0 < panel_blocks:
        # the finish of icon_forward_kernel's ONE_PASS Labels rows
        lse = m + tl.log(l)
        cross = (1.0 - alpha) * sum_ps + alpha / m_valid * sum_s - lse
        if KL:
            loss = ent - cross
        else:
            loss = -cross
        tl.store(LOSS + rows, loss, mask=in_rows)
        tl.store(STATS + rows, lse, mask=in_rows)
        tl.store(STATS + N + rows, tl.full([BLOCK_M], 1.0, tl.float32), mask=in_rows)
    else:
        store_statistics(RUN + rows, N, m, l, sum_ps, sum_s, ent, in_rows)


@triton.jit
def _label_gradients(s, valid, same, lse, g, k, m_valid, alpha):
    """g (q - p~) of the rows whose (LSE, upstream gradient, positive count) are lse, g, k, each
    broadcast along the tile (rows i: [:, None], the G_ji of rows j: [None, :]); 0 off the valid
    set and on rows left out (g = 0), as backward_kernels.tile_gradients and reverse_gradients."""
    q = exp_(tl.where(valid, s - lse, float("-inf")))
    p_mix = tl.where(valid, (1.0 - alpha) * tl.where(same, 1.0 / k, 0.0) + alpha / m_valid, 0.0)
    return tl.where(valid & (g != 0.0), g * (q - p_mix), 0.0)


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
        X, XSQ, PRM, LAB, STATS, GRAD, DX, DPRM,
        N, D, stride_x, m_valid, alpha, chunks,
        KERNEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Program (I, c, chunk of d): DX and DPRM are zeroed fp32 buffers that every program adds
    into. With D_CHUNKED each chunk's program recomputes S over all of d (as the plain kernels)."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    I = tl.program_id(0)
    c = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    first = tl.program_id(2) == 0         # per-row dparam: from the first chunk's programs
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, d0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lse = load_vec(STATS, rows, N, 0.0)
    k_rows = load_vec(STATS + 2 * N, rows, N, 1.0)       # launchers.NORM_ROW: K_i
    g = load_vec(GRAD, rows, N, 0.0)
    lab = tl.load(LAB + rows, mask=in_rows, other=0)
    dx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    dprm = tl.zeros([BLOCK_M], tl.float32)
    dk = d0 + tl.arange(0, BLOCK_D)
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            in_cols = cols < N
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, d0)
            y_sq = load_vec(XSQ, cols, N, 0.0)
            lse_c = load_vec(STATS, cols, N, 0.0)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            ab = gram_block(x, y, X, X, rows, cols, N, N, stride_x, stride_x, D, BLOCK_D, D_CHUNKED,
                            UPCAST, PRECISION)
            s, aux = pair_logits(ab, x_sq, y_sq, prm, KERNEL)
            same = (lab[:, None] == tl.load(LAB + cols, mask=in_cols, other=0)[None, :]) & valid
            grad_rows = _label_gradients(s, valid, same, lse[:, None], g[:, None], k_rows[:, None],
                                         m_valid, alpha)
            # G_ji of the columns' rows, off the diagonal block only: on it, row j's G_ji is its
            # own row side's, from s_ji (the forward's value for row j; the fp32 tile need not be
            # bitwise symmetric), and reaches x_i through H^T (chain_pair_tile)
            grad_cols = tl.where(J != I, _label_gradients(s, valid, same, lse_c[None, :],
                                                          load_vec(GRAD, cols, N, 0.0)[None, :],
                                                          load_vec(STATS + 2 * N, cols, N, 1.0)[None, :],
                                                          m_valid, alpha), 0.0)
            t_dx, t_w_sum, t_dprm = chain_pair_tile(grad_rows, grad_cols, s, aux, x, y, prm, lse, cols,
                                                    load_vec(PRM, cols, N, 1.0), lse_c, dk, DX, DPRM, N, D,
                                                    first, J != I, KERNEL, PRECISION)
            dx += t_dx
            w_sum += t_w_sum
            dprm += t_dprm
    finish_rows(dx, w_sum, dprm, x, rows, dk, DX, DPRM, N, D, first, KERNEL)

