"""Forward kernels of the I-Con loss: one program per block of rows, a loop over column tiles.

``icon_forward_kernel`` keeps the online LSE of q (and of p for Affinity targets). When the loss
is linear in log q (beta = 0) and p's entropy has a closed form (not Affinity with alpha > 0) it
also finishes the row loss in the same pass. Otherwise ``icon_mixture_kernel`` makes the second
pass over the tiles with the LSEs known (DESIGN.md §1 'Streaming forward'); for the f-divergences
(DIVERGENCE 2..6, DESIGN.md §1.1) it is always run: it evaluates q~ f(p~ / q~) per pair and the row
statistics Gamma_i = sum_j q g (row 1) and, for Affinity targets, Phi_i = sum_j p f' (row 3), each
divided by the row total of the q or p the kernels form (1 in exact arithmetic).
Statistics rows: 0 LSE, 1 R (Gamma for an f-divergence), 2 LSE^p, 3 H (Phi; Affinity targets only:
for the others row 3 is launchers.TRIANGULAR_RECORD_ROW, which a plain forward leaves 0). The per-pair
terms of the second pass and its finish (tile_helpers.second_pass_terms, second_pass_rows,
target_row_statistic) are shared with self mode's triangular kernels (symmetric_kernels.py,
symmetric_affinity_kernels.py), which compute the same rows (an Affinity target's triangular forward
at beta > 0 or under an f-divergence then writes its record over row 3: launchers._record_row).

Every kernel here and in backward_kernels.py takes N_BUCKET and M_BUCKET, the next powers of two
of N and M. The kernels never read them: they are the autotuner's key (launchers.py), so a new
batch size reuses the configuration tuned for its bucket instead of benchmarking again.
UPCAST (features) and UPCAST_Z (Affinity target features) convert loaded blocks to fp32; fp16 and
bf16 stay native so both Grams run on tensor cores with fp32 accumulation.
"""
import triton
import triton.language as tl

from .tile_helpers import (exp_, gram_block, load_rows, load_vec, pair_logits, second_pass_rows, second_pass_terms,
                           target_row_statistic, target_weights, tile_target_weights, valid_pairs)


@triton.jit
def icon_forward_kernel(
        X, Y, XSQ, YSQ, PRM, LAB, CLAB, NORM, DENSE, stride_dense,
        Z, ZC, ZSQ, ZCSQ, TPRM, LOSS, STATS,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, alpha, N_BUCKET, M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, ONE_PASS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, 0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    if TARGET == 2:
        z = load_rows(Z, rows, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
        z_sq = load_vec(ZSQ, rows, N, 0.0)
        t_prm = load_vec(TPRM, rows, N, 1.0)
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    m_p = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_p = tl.zeros([BLOCK_M], tl.float32)
    sum_ps = tl.zeros([BLOCK_M], tl.float32)     # sum_j p s   (Affinity: rescaled like l_p)
    sum_s = tl.zeros([BLOCK_M], tl.float32)      # sum_{j valid} s
    ent = tl.zeros([BLOCK_M], tl.float32)        # sum_j p~ log p~ (Affinity: sum_j p t, rescaled)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        valid = valid_pairs(rows, cols, N, M, EXCLUDE_SELF)
        y = load_rows(Y, cols, M, stride_y, BLOCK_D, D, UPCAST, 0)
        ab = gram_block(x, y, X, Y, rows, cols, N, M, stride_x, stride_y, D, BLOCK_D, D_CHUNKED,
                        UPCAST, PRECISION)
        s, aux = pair_logits(ab, x_sq, load_vec(YSQ, cols, M, 0.0), prm, KERNEL)
        s_m = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s_m, 1))
        l = l * exp_(m - m_new) + tl.sum(exp_(s_m - m_new[:, None]), 1)
        m = m_new
        if TARGET == 2:
            zc = load_rows(ZC, cols, M, stride_zc, BLOCK_DZ, DZ, UPCAST_Z, 0)
            t, t_aux = pair_logits(tl.dot(z, tl.trans(zc), input_precision=PRECISION), z_sq,
                                   load_vec(ZCSQ, cols, M, 0.0), t_prm, T_KERNEL)
            t_m = tl.where(valid, t, float("-inf"))
            mp_new = tl.maximum(m_p, tl.max(t_m, 1))
            rescale = exp_(m_p - mp_new)
            e = exp_(t_m - mp_new[:, None])
            l_p = l_p * rescale + tl.sum(e, 1)
            if ONE_PASS:
                sum_ps = sum_ps * rescale + tl.sum(tl.where(e != 0.0, e * s, 0.0), 1)
                ent = ent * rescale + tl.sum(tl.where(e != 0.0, e * t, 0.0), 1)
            m_p = mp_new
        elif ONE_PASS:
            p = target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM,
                               DENSE, stride_dense, TARGET)
            sum_ps += tl.sum(tl.where(p != 0.0, p * s, 0.0), 1)
            p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
            ent += tl.sum(tl.where(p_mix != 0.0, p_mix * tl.log(p_mix), 0.0), 1)
        if ONE_PASS:
            sum_s += tl.sum(tl.where(valid, s, 0.0), 1)
    lse = m + tl.log(l)
    in_rows = rows < N
    tl.store(STATS + rows, lse, mask=in_rows)
    if TARGET == 2:
        lse_p = m_p + tl.log(l_p)
        tl.store(STATS + 2 * N + rows, lse_p, mask=in_rows)
    if ONE_PASS:
        if TARGET == 2:
            sum_ps = sum_ps / l_p
            ent = ent / l_p - lse_p
        cross = (1.0 - alpha) * sum_ps + alpha / m_valid * sum_s - lse
        if KL:
            loss = ent - cross
        else:
            loss = -cross
        tl.store(LOSS + rows, loss, mask=in_rows)
        tl.store(STATS + N + rows, tl.full([BLOCK_M], 1.0, tl.float32), mask=in_rows)
        if TARGET == 2:
            tl.store(STATS + 3 * N + rows, loss, mask=in_rows)


@triton.jit
def icon_mixture_kernel(
        X, Y, XSQ, YSQ, PRM, LAB, CLAB, NORM, DENSE, stride_dense,
        Z, ZC, ZSQ, ZCSQ, TPRM, LOSS, STATS,
        N, M, D, DZ, stride_x, stride_y, stride_z, stride_zc, m_valid, alpha, beta, N_BUCKET,
        M_BUCKET,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, TARGET: tl.constexpr,
        EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr, HAS_BETA: tl.constexpr,
        DIVERGENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DZ: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Second pass: log q~ and log p~ are logs of mixtures, so the LSEs are needed first. For an
    f-divergence (DIVERGENCE not kl 0 or cross_entropy 1; KL is then False) the row loss is
    sum_j q~ f(p~ / q~) and the statistics are Gamma_i and Phi_i (tile_helpers.f_tile)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, 0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    lse = tl.load(STATS + rows, mask=in_rows, other=0.0)
    lse_p = lse                  # (read for Affinity targets only)
    if TARGET == 2:
        z = load_rows(Z, rows, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
        z_sq = load_vec(ZSQ, rows, N, 0.0)
        t_prm = load_vec(TPRM, rows, N, 1.0)
        lse_p = tl.load(STATS + 2 * N + rows, mask=in_rows, other=0.0)
    a_sum = tl.zeros([BLOCK_M], tl.float32)      # the row sums of tile_helpers.second_pass_terms
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    c_sum = tl.zeros([BLOCK_M], tl.float32)
    h_stat = tl.zeros([BLOCK_M], tl.float32)
    p_sum = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, M, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        valid = valid_pairs(rows, cols, N, M, EXCLUDE_SELF)
        y = load_rows(Y, cols, M, stride_y, BLOCK_D, D, UPCAST, 0)
        ab = gram_block(x, y, X, Y, rows, cols, N, M, stride_x, stride_y, D, BLOCK_D, D_CHUNKED,
                        UPCAST, PRECISION)
        s, aux = pair_logits(ab, x_sq, load_vec(YSQ, cols, M, 0.0), prm, KERNEL)
        t = s
        if TARGET == 2:
            zc = load_rows(ZC, cols, M, stride_zc, BLOCK_DZ, DZ, UPCAST_Z, 0)
            t, t_aux = pair_logits(tl.dot(z, tl.trans(zc), input_precision=PRECISION), z_sq,
                                   load_vec(ZCSQ, cols, M, 0.0), t_prm, T_KERNEL)
            p = tl.where(valid, exp_(t - lse_p[:, None]), 0.0)
        else:
            p = tile_target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM,
                                    DENSE, stride_dense, TARGET, DIVERGENCE)
        a, b, c, h, w = second_pass_terms(valid, s, lse[:, None], p, t, lse_p[:, None], alpha, beta, m_valid,
                                          TARGET, KL, HAS_BETA, DIVERGENCE)
        a_sum += tl.sum(a, 1)
        b_sum += tl.sum(b, 1)
        c_sum += tl.sum(c, 1)
        h_stat += tl.sum(h, 1)
        p_sum += tl.sum(w, 1)
    loss, r_stat = second_pass_rows(a_sum, b_sum, c_sum, KL, DIVERGENCE)
    tl.store(LOSS + rows, loss, mask=in_rows)
    tl.store(STATS + N + rows, r_stat, mask=in_rows)
    if TARGET == 2:
        # H_i (Phi_i), read for an Affinity target's gradient only. Other targets leave row 3 as the
        # launcher made it (zeros): a Labels forward's TRIANGULAR_RECORD_ROW, 0 after a plain forward
        tl.store(STATS + 3 * N + rows, target_row_statistic(h_stat, p_sum, DIVERGENCE), mask=in_rows)
