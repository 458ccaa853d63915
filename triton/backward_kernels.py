"""Backward kernels: tiles recomputed from the saved row statistics (FlashAttention-2 style).

``icon_backward_rows_kernel`` is row-parallel and writes dX, d(param) per row and, for Affinity
targets with grad, dZ and d(target param); ``icon_backward_cols_kernel`` is column-parallel and
writes dY (and dZ_cols), so no atomics are needed. In self mode autograd adds dX and dY.

BIDIR (a Labels target, beta = 0, kl or cross_entropy; launchers.bidirectional_backward) makes one
backward of both directions of 1/2 [L(x->y) + L(y->x)] (DESIGN.md §1.3): each tile's gradient is
G_ij + G'_ji, G' the reverse direction's (y's row j over x: q' = exp(s_ij - LSE'_j), its labels'
p' and upstream gradient g'_j, read per column from STATS2 and GRAD2), so the two kernels make dX
and dY of both directions from one recomputed tile each: four GEMM-equivalents instead of eight.
(Self mode on a Labels, Dense or Neighbors target runs symmetric_kernels.py's triangular backward
instead, and on an Affinity target symmetric_affinity_kernels.py's, unless the target's z or
parameter needs a gradient.)

For an f-divergence (DIVERGENCE 2..6, DESIGN.md §1.1) dL/ds_k = (1 - beta) q_k (g_k - Gamma_i) and
dL/dt_k = (1 - alpha) p_k (f'_k - Phi_i), with Gamma_i and Phi_i read from the forward's saved
statistics (rows 1 and 3): both kernels see a row's columns one tile at a time, so recomputing
them would take a third pass over the tiles.
"""
import triton
import triton.language as tl

from .tile_helpers import (exp_, f_tile, finite_shift, grad_dot, grad_weight, gram_block, load_rows, load_vec,
                           pair_logits, param_grad, shifted_param_grad, tile_target_weights, valid_pairs)


@triton.jit
def tile_gradients(s, valid, p, lse, g, r_stat, h_stat, m_valid, alpha, beta,
                   KL: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr):
    """(dL/ds, dL/dt) of one tile (kl, cross_entropy); g is the upstream gradient per row, 0 for
    rows left out. lse, g, r_stat and h_stat come broadcast along the tile (the rows': [:, None];
    self mode's triangular backward also passes the columns' rows', [None, :])."""
    log_q = tl.where(valid, s - lse, float("-inf"))
    q = exp_(log_q)
    p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
    if HAS_BETA:
        q_mix = (1.0 - beta) * q + beta / m_valid
        grad_s = g * (1.0 - beta) * q * (r_stat - p_mix / q_mix)
        log_q_mix = tl.log(q_mix)
    else:
        grad_s = g * (q - p_mix)
        log_q_mix = log_q
    grad_s = tl.where(valid, grad_s, 0.0)
    grad_t = grad_s
    if TARGET_GRAD:
        if KL:
            h = tl.log(p_mix) - log_q_mix
        else:
            h = -log_q_mix
        grad_t = tl.where(p != 0.0, g * (1.0 - alpha) * p * (h - h_stat), 0.0)
    return grad_s, grad_t


@triton.jit
def f_tile_gradients(s, valid, p, t, lse, lse_p, g, gamma, phi, m_valid, alpha, beta,
                     TARGET: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr,
                     DIVERGENCE: tl.constexpr):
    """(dL/ds, dL/dt) of one tile for an f-divergence: g (1 - beta) (q g - q Gamma) and
    g (1 - alpha) (p f' - p Phi), 0 off the valid set and on rows left out (g = 0; a term there
    may be infinite). lse, lse_p, g, gamma and phi come broadcast along the tile, as for
    tile_gradients."""
    term, q_g, p_fp, q = f_tile(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, TARGET,
                                HAS_BETA, DIVERGENCE)
    keep = valid & (g != 0.0)
    grad_s = tl.where(keep, g * (1.0 - beta) * (q_g - q * gamma), 0.0)
    grad_t = grad_s
    if TARGET_GRAD:
        grad_t = tl.where(keep, g * (1.0 - alpha) * (p_fp - p * phi), 0.0)
    return grad_s, grad_t


@triton.jit
def reverse_gradients(s, valid, rows, cols, N, M, LAB, CLAB, lse2, g2, norm2, m_valid2, alpha):
    """dL/ds_ij of the reverse direction (y's row j over x's columns) on one tile, Labels target,
    beta = 0: g'_j (q'_ji - p~'_ji), 0 off the valid set and where g'_j = 0 (a row left out)."""
    li = tl.load(LAB + rows, mask=rows < N, other=0)
    cj = tl.load(CLAB + cols, mask=cols < M, other=0)
    q2 = exp_(tl.where(valid, s - lse2[None, :], float("-inf")))
    p2 = tl.where((li[:, None] == cj[None, :]) & valid, 1.0 / norm2[None, :], 0.0)
    p2_mix = tl.where(valid, (1.0 - alpha) * p2 + alpha / m_valid2, 0.0)
    return tl.where(valid & (g2 != 0.0)[None, :], g2[None, :] * (q2 - p2_mix), 0.0)


@triton.jit
def pair_tile(rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
              z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
              N, M, LAB, CLAB, NORM, DENSE, stride_dense,
              m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D: tl.constexpr,
              D_CHUNKED: tl.constexpr, UPCAST: tl.constexpr, KERNEL: tl.constexpr,
              T_KERNEL: tl.constexpr, TARGET: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
              KL: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr,
              PRECISION: tl.constexpr, DIVERGENCE: tl.constexpr,
              lse2, g2, norm2, m_valid2, BIDIR: tl.constexpr):
    """Everything the two backward kernels need from one (rows, cols) tile. With BIDIR, w holds
    both directions' gradient weights and grad_s2 the reverse direction's dL/ds (else grad_s)."""
    valid = valid_pairs(rows, cols, N, M, EXCLUDE_SELF)
    ab = gram_block(x, y, X, Y, rows, cols, N, M, stride_x, stride_y, D, BLOCK_D, D_CHUNKED,
                    UPCAST, PRECISION)
    s, aux = pair_logits(ab, x_sq, y_sq, prm, KERNEL)
    if TARGET == 2:
        t, t_aux = pair_logits(tl.dot(z, tl.trans(zc), input_precision=PRECISION), z_sq, zc_sq, t_prm, T_KERNEL)
        p = tl.where(valid, exp_(t - lse_p[:, None]), 0.0)
    else:
        p = tile_target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM,
                                DENSE, stride_dense, TARGET, DIVERGENCE)
        t = s
        t_aux = aux
    if DIVERGENCE == 0 or DIVERGENCE == 1:
        grad_s, grad_t = tile_gradients(s, valid, p, lse[:, None], g[:, None], r_stat[:, None], h_stat[:, None],
                                        m_valid, alpha, beta, KL, HAS_BETA, TARGET_GRAD)
    else:                     # r_stat and h_stat hold Gamma_i and Phi_i
        grad_s, grad_t = f_tile_gradients(s, valid, p, t, lse[:, None], lse_p[:, None], g[:, None], r_stat[:, None],
                                          h_stat[:, None], m_valid, alpha, beta, TARGET, HAS_BETA, TARGET_GRAD,
                                          DIVERGENCE)
    grad_s2 = grad_s
    if BIDIR:
        grad_s2 = reverse_gradients(s, valid, rows, cols, N, M, LAB, CLAB, lse2, g2, norm2, m_valid2, alpha)
        w = grad_weight(grad_s + grad_s2, aux, prm, KERNEL)
    else:
        w = grad_weight(grad_s, aux, prm, KERNEL)
    w_t = w
    if TARGET_GRAD:
        w_t = grad_weight(grad_t, t_aux, t_prm, T_KERNEL)
    return w, grad_s, s, aux, w_t, grad_t, t, t_aux, grad_s2


@triton.jit
def row_side(rows, X, XSQ, PRM, STATS, GRAD, Z, ZSQ, TPRM, N, D, DZ, stride_x, stride_z, d0,
             TARGET: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr,
             UPCAST: tl.constexpr, UPCAST_Z: tl.constexpr):
    """Everything the backward needs about a block of rows: features (columns d0 : d0 + BLOCK_D),
    norms, parameter, saved statistics, upstream gradient and, for Affinity, the target side."""
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, d0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lse = load_vec(STATS, rows, N, 0.0)
    r_stat = load_vec(STATS + N, rows, N, 0.0)
    g = load_vec(GRAD, rows, N, 0.0)
    z = x
    z_sq = x_sq
    t_prm = prm
    lse_p = lse
    h_stat = r_stat
    if TARGET == 2:
        z = load_rows(Z, rows, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
        z_sq = load_vec(ZSQ, rows, N, 0.0)
        t_prm = load_vec(TPRM, rows, N, 1.0)
        lse_p = load_vec(STATS + 2 * N, rows, N, 0.0)
        h_stat = load_vec(STATS + 3 * N, rows, N, 0.0)
    return x, x_sq, prm, lse, r_stat, g, z, z_sq, t_prm, lse_p, h_stat


@triton.jit
def column_side(cols, STATS2, GRAD2, M, dummy, BIDIR: tl.constexpr):
    """The reverse direction's per-column LSE', upstream gradient g' and positive count K' (its
    forward's stats rows 0 and NORM_ROW = 2) for BIDIR; else ``dummy`` three times."""
    if BIDIR:
        return (load_vec(STATS2, cols, M, 0.0), load_vec(GRAD2, cols, M, 0.0),
                load_vec(STATS2 + 2 * M, cols, M, 1.0))
    return dummy, dummy, dummy


@triton.jit
def icon_backward_rows_kernel(
        X, Y, XSQ, YSQ, PRM, LAB, CLAB, NORM, DENSE, stride_dense,
        Z, ZC, ZSQ, ZCSQ, TPRM, STATS, GRAD, STATS2, GRAD2, DX, DPRM, DZ_ROWS, DTPRM,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, m_valid2, reverse_param, alpha, beta, N_BUCKET,
        M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, HAS_BETA: tl.constexpr,
        TARGET_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, BIDIR: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    c = tl.program_id(1)          # the chunk of d this program writes (all of d unless D_CHUNKED)
    first = c == 0                # per-row outputs are written by the first chunk's program
    x, x_sq, prm, lse, r_stat, g, z, z_sq, t_prm, lse_p, h_stat = row_side(
        rows, X, XSQ, PRM, STATS, GRAD, Z, ZSQ, TPRM, N, D, DZ, stride_x, stride_z, c * BLOCK_D,
        TARGET, BLOCK_D, BLOCK_DZ, UPCAST, UPCAST_Z)
    dx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    dprm = tl.zeros([BLOCK_M], tl.float32)
    dz = tl.zeros([BLOCK_M, BLOCK_DZ], tl.float32)
    wt_sum = tl.zeros([BLOCK_M], tl.float32)
    dtprm = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        y = load_rows(Y, cols, M, stride_y, BLOCK_D, D, UPCAST, c * BLOCK_D)
        y_sq = load_vec(YSQ, cols, M, 0.0)
        zc = y
        zc_sq = y_sq
        if TARGET == 2:
            zc = load_rows(ZC, cols, M, stride_zc, BLOCK_DZ, DZ, UPCAST_Z, 0)
            zc_sq = load_vec(ZCSQ, cols, M, 0.0)
        lse2, g2, norm2 = column_side(cols, STATS2, GRAD2, M, y_sq, BIDIR)
        w, grad_s, s, aux, w_t, grad_t, t, t_aux, grad_s2 = pair_tile(
            rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
            z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
            N, M, LAB, CLAB, NORM, DENSE, stride_dense,
            m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D, D_CHUNKED, UPCAST,
            KERNEL, T_KERNEL, TARGET, EXCLUDE_SELF, KL, HAS_BETA, TARGET_GRAD, PRECISION,
            DIVERGENCE, lse2, g2, norm2, m_valid2, BIDIR)
        dx += grad_dot(w, y, PRECISION)
        w_sum += tl.sum(w, 1)
        dprm += param_grad(grad_s, s, aux, prm, finite_shift(lse), KERNEL)
        if BIDIR:           # (the reverse direction's G sums to zero along columns)
            dprm += reverse_param * shifted_param_grad(grad_s2, s, aux, prm, finite_shift(lse2)[None, :], KERNEL)
        if TARGET_GRAD:
            dz += grad_dot(w_t, zc, PRECISION)
            wt_sum += tl.sum(w_t, 1)
            dtprm += param_grad(grad_t, t, t_aux, t_prm, finite_shift(lse_p), T_KERNEL)
    if KERNEL == 1 or KERNEL == 2 or KERNEL == 4:
        dx -= w_sum[:, None] * x.to(tl.float32)
    dk = c * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(DX + rows.to(tl.int64)[:, None] * D + dk[None, :], dx,
             mask=in_rows[:, None] & (dk < D)[None, :])
    tl.store(DPRM + rows, dprm, mask=in_rows & first)
    if TARGET_GRAD:
        if T_KERNEL == 1 or T_KERNEL == 2 or T_KERNEL == 4:
            dz -= wt_sum[:, None] * z.to(tl.float32)
        dkz = tl.arange(0, BLOCK_DZ)
        tl.store(DZ_ROWS + rows.to(tl.int64)[:, None] * DZ + dkz[None, :], dz,
                 mask=(in_rows & first)[:, None] & (dkz < DZ)[None, :])
        tl.store(DTPRM + rows, dtprm, mask=in_rows & first)


@triton.jit
def icon_backward_cols_kernel(
        X, Y, XSQ, YSQ, PRM, LAB, CLAB, NORM, DENSE, stride_dense,
        Z, ZC, ZSQ, ZCSQ, TPRM, STATS, GRAD, STATS2, GRAD2, DY, DZ_COLS,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, m_valid2, alpha, beta, N_BUCKET,
        M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, HAS_BETA: tl.constexpr,
        TARGET_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, BIDIR: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_cols = cols < M
    c = tl.program_id(1)          # the chunk of d this program writes (all of d unless D_CHUNKED)
    first = c == 0
    y = load_rows(Y, cols, M, stride_y, BLOCK_D, D, UPCAST, c * BLOCK_D)
    y_sq = load_vec(YSQ, cols, M, 0.0)
    zc = y
    zc_sq = y_sq
    if TARGET == 2:
        zc = load_rows(ZC, cols, M, stride_zc, BLOCK_DZ, DZ, UPCAST_Z, 0)
        zc_sq = load_vec(ZCSQ, cols, M, 0.0)
    lse2, g2, norm2 = column_side(cols, STATS2, GRAD2, M, y_sq, BIDIR)
    dy = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_N], tl.float32)
    dzc = tl.zeros([BLOCK_N, BLOCK_DZ], tl.float32)
    wt_sum = tl.zeros([BLOCK_N], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        x, x_sq, prm, lse, r_stat, g, z, z_sq, t_prm, lse_p, h_stat = row_side(
            rows, X, XSQ, PRM, STATS, GRAD, Z, ZSQ, TPRM, N, D, DZ, stride_x, stride_z, c * BLOCK_D,
            TARGET, BLOCK_D, BLOCK_DZ, UPCAST, UPCAST_Z)
        w, grad_s, s, aux, w_t, grad_t, t, t_aux, grad_s2 = pair_tile(
            rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
            z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
            N, M, LAB, CLAB, NORM, DENSE, stride_dense,
            m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D, D_CHUNKED, UPCAST,
            KERNEL, T_KERNEL, TARGET, EXCLUDE_SELF, KL, HAS_BETA, TARGET_GRAD, PRECISION,
            DIVERGENCE, lse2, g2, norm2, m_valid2, BIDIR)
        dy += grad_dot(tl.trans(w), x, PRECISION)
        w_sum += tl.sum(w, 0)
        if TARGET_GRAD:
            dzc += grad_dot(tl.trans(w_t), z, PRECISION)
            wt_sum += tl.sum(w_t, 0)
    if KERNEL == 1 or KERNEL == 2 or KERNEL == 4:
        dy -= w_sum[:, None] * y.to(tl.float32)
    dk = c * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(DY + cols.to(tl.int64)[:, None] * D + dk[None, :], dy,
             mask=in_cols[:, None] & (dk < D)[None, :])
    if TARGET_GRAD:
        if T_KERNEL == 1 or T_KERNEL == 2 or T_KERNEL == 4:
            dzc -= wt_sum[:, None] * zc.to(tl.float32)
        dkz = tl.arange(0, BLOCK_DZ)
        tl.store(DZ_COLS + cols.to(tl.int64)[:, None] * DZ + dkz[None, :], dzc,
                 mask=(in_cols & first)[:, None] & (dkz < DZ)[None, :])
