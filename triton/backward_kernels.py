"""Backward kernels: tiles recomputed from the saved row statistics (FlashAttention-2 style).

``icon_backward_rows_kernel`` is row-parallel and writes dX, d(param) per row and, for Affinity
targets with grad, dZ and d(target param); ``icon_backward_cols_kernel`` is column-parallel and
writes dY (and dZ_cols), so no atomics are needed. In self mode autograd adds dX and dY.

For an f-divergence (DIVERGENCE 2..6, DESIGN.md §1.1) dL/ds_k = (1 - beta) q_k (g_k - Gamma_i) and
dL/dt_k = (1 - alpha) p_k (f'_k - Phi_i), with Gamma_i and Phi_i read from the forward's saved
statistics (rows 1 and 3): both kernels see a row's columns one tile at a time, so recomputing
them would take a third pass over the tiles.
"""
import triton
import triton.language as tl

from .tile_helpers import (exp_, f_tile, grad_weight, gram_block, load_rows, load_vec, pair_logits,
                           param_grad, tile_target_weights, valid_pairs)


@triton.jit
def tile_gradients(s, valid, p, lse, g, r_stat, h_stat, m_valid, alpha, beta,
                   KL: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr):
    """(dL/ds, dL/dt) of one tile (kl, cross_entropy); g is the upstream gradient per row, 0 for
    rows left out."""
    log_q = tl.where(valid, s - lse[:, None], float("-inf"))
    q = exp_(log_q)
    p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
    if HAS_BETA:
        q_mix = (1.0 - beta) * q + beta / m_valid
        grad_s = g[:, None] * (1.0 - beta) * q * (r_stat[:, None] - p_mix / q_mix)
        log_q_mix = tl.log(q_mix)
    else:
        grad_s = g[:, None] * (q - p_mix)
        log_q_mix = log_q
    grad_s = tl.where(valid, grad_s, 0.0)
    grad_t = grad_s
    if TARGET_GRAD:
        if KL:
            h = tl.log(p_mix) - log_q_mix
        else:
            h = -log_q_mix
        grad_t = tl.where(p != 0.0, g[:, None] * (1.0 - alpha) * p * (h - h_stat[:, None]), 0.0)
    return grad_s, grad_t


@triton.jit
def f_tile_gradients(s, valid, p, t, lse, lse_p, g, gamma, phi, m_valid, alpha, beta,
                     TARGET: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr,
                     DIVERGENCE: tl.constexpr):
    """(dL/ds, dL/dt) of one tile for an f-divergence: g (1 - beta) (q g - q Gamma) and
    g (1 - alpha) (p f' - p Phi), 0 off the valid set and on rows left out (g = 0; a term there
    may be infinite)."""
    term, q_g, p_fp, q = f_tile(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, TARGET,
                                HAS_BETA, DIVERGENCE)
    keep = valid & (g != 0.0)[:, None]
    grad_s = tl.where(keep, g[:, None] * (1.0 - beta) * (q_g - q * gamma[:, None]), 0.0)
    grad_t = grad_s
    if TARGET_GRAD:
        grad_t = tl.where(keep, g[:, None] * (1.0 - alpha) * (p_fp - p * phi[:, None]), 0.0)
    return grad_s, grad_t


@triton.jit
def pair_tile(rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
              z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
              N, M, LAB, CLAB, NORM, DENSE, stride_dense,
              m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D: tl.constexpr,
              D_CHUNKED: tl.constexpr, UPCAST: tl.constexpr, KERNEL: tl.constexpr,
              T_KERNEL: tl.constexpr, TARGET: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
              KL: tl.constexpr, HAS_BETA: tl.constexpr, TARGET_GRAD: tl.constexpr,
              PRECISION: tl.constexpr, DIVERGENCE: tl.constexpr):
    """Everything the two backward kernels need from one (rows, cols) tile."""
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
        grad_s, grad_t = tile_gradients(s, valid, p, lse, g, r_stat, h_stat, m_valid, alpha, beta,
                                        KL, HAS_BETA, TARGET_GRAD)
    else:                     # r_stat and h_stat hold Gamma_i and Phi_i
        grad_s, grad_t = f_tile_gradients(s, valid, p, t, lse, lse_p, g, r_stat, h_stat, m_valid,
                                          alpha, beta, TARGET, HAS_BETA, TARGET_GRAD, DIVERGENCE)
    w = grad_weight(grad_s, aux, prm, KERNEL)
    w_t = w
    if TARGET_GRAD:
        w_t = grad_weight(grad_t, t_aux, t_prm, T_KERNEL)
    return w, grad_s, s, aux, w_t, grad_t, t, t_aux


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
def grad_dot(w, b, PRECISION: tl.constexpr):
    """w (fp32 gradient weights) times feature block b. For bf16 b, w is rounded to bf16 for the
    tensor cores; fp16 would flush the tiny weights of a large batch to zero, so there b is
    upcast instead."""
    if b.dtype == tl.float16:
        return tl.dot(w, b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(w.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def _finite(lse):
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def icon_backward_rows_kernel(
        X, Y, XSQ, YSQ, PRM, LAB, CLAB, NORM, DENSE, stride_dense,
        Z, ZC, ZSQ, ZCSQ, TPRM, STATS, GRAD, DX, DPRM, DZ_ROWS, DTPRM,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, alpha, beta, N_BUCKET,
        M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, HAS_BETA: tl.constexpr,
        TARGET_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr,
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
        w, grad_s, s, aux, w_t, grad_t, t, t_aux = pair_tile(
            rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
            z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
            N, M, LAB, CLAB, NORM, DENSE, stride_dense,
            m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D, D_CHUNKED, UPCAST,
            KERNEL, T_KERNEL, TARGET, EXCLUDE_SELF, KL, HAS_BETA, TARGET_GRAD, PRECISION,
            DIVERGENCE)
        dx += grad_dot(w, y, PRECISION)
        w_sum += tl.sum(w, 1)
        dprm += param_grad(grad_s, s, aux, prm, _finite(lse), KERNEL)
        if TARGET_GRAD:
            dz += grad_dot(w_t, zc, PRECISION)
            wt_sum += tl.sum(w_t, 1)
            dtprm += param_grad(grad_t, t, t_aux, t_prm, _finite(lse_p), T_KERNEL)
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
        Z, ZC, ZSQ, ZCSQ, TPRM, STATS, GRAD, DY, DZ_COLS,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, alpha, beta, N_BUCKET,
        M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, HAS_BETA: tl.constexpr,
        TARGET_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr,
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
    dy = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_N], tl.float32)
    dzc = tl.zeros([BLOCK_N, BLOCK_DZ], tl.float32)
    wt_sum = tl.zeros([BLOCK_N], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        x, x_sq, prm, lse, r_stat, g, z, z_sq, t_prm, lse_p, h_stat = row_side(
            rows, X, XSQ, PRM, STATS, GRAD, Z, ZSQ, TPRM, N, D, DZ, stride_x, stride_z, c * BLOCK_D,
            TARGET, BLOCK_D, BLOCK_DZ, UPCAST, UPCAST_Z)
        w, grad_s, s, aux, w_t, grad_t, t, t_aux = pair_tile(
            rows, cols, x, x_sq, prm, lse, g, r_stat, y, y_sq,
            z, z_sq, t_prm, lse_p, h_stat, zc, zc_sq,
            N, M, LAB, CLAB, NORM, DENSE, stride_dense,
            m_valid, alpha, beta, X, Y, stride_x, stride_y, D, BLOCK_D, D_CHUNKED, UPCAST,
            KERNEL, T_KERNEL, TARGET, EXCLUDE_SELF, KL, HAS_BETA, TARGET_GRAD, PRECISION,
            DIVERGENCE)
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
