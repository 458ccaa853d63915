"""Triangular kernels of self mode for an Affinity target: SNE, t-SNE and the rest of the family
(DESIGN.md §1.3). y is x and z_cols is z, conditional rows, any divergence, alpha and beta, one
learned kernel parameter, and any target kernel (dot, gaussian, student_t, power, log_dot; cosine
arrives as dot) whose parameter is one value or one per row (launchers._self_mode_structure). Then
s_ij = s_ji, and the target's aux term a_ij (z_i.z_j for dot and log_dot, the clamped squared
distance for the others) is symmetric too: t_ij = k(a_ij; theta_i) and t_ji = k(a_ij; theta_j), each
side the target kernel's logit of the one tile entry a_ij under its own row's parameter
(tile_helpers.kernel_logits with the parameter broadcast along the rows, as pair_logits, or along
the columns, column_target_logits). A per-row parameter (sigma_i from perplexity calibration, a
per-row dof, exponent or temperature) makes t_ij != t_ji; log_dot has none. Each pair of row blocks
(I, J), I <= J, is one Gram tile of x and one of z.

Blocks, tiles, programs, panels and partial buffers are those of symmetric_kernels.py (whose
target-free helpers these kernels share), and so are the passes (PASS, a constexpr of the forward
and merge kernels; triangular_launches.py sweeps them):
- CLOSED_FORM_PASS (kl or cross_entropy at alpha = beta = 0: SNE, t-SNE), one sweep. The five
  statistics per row are m_q, l_q (the learned max and sum of exps), m_p, l_p (the target's) and
  A = sum_j e^{t_j - m_p} a_j with a_j = t_j - s_j (kl) or s_j (cross_entropy), online in m_p like
  l_p. Then KL_i = A / l_p - LSE^p_i + LSE_i and CE_i = LSE_i - A / l_p: icon_forward_kernel's
  ONE_PASS Affinity rows (sum_j p t - LSE^p - sum_j p s + LSE), with t - s taken per pair, so that
  five statistics hold both sums.
- LSE_PASS then SECOND_PASS (an f-divergence, alpha > 0 or beta > 0: log p~ or log q~ is the log of
  a mixture, and an f-divergence's per-pair term needs p and q themselves). The LSE pass keeps m_q,
  l_q, m_p, l_p (A = 0) and writes every row's LSE and LSE^p; the second pass sums, per side of each
  tile, tile_helpers.second_pass_terms under that side's rows' own LSE and LSE^p (rows i: LSE_i,
  LSE^p_i and t_ij; rows j: LSE_j, LSE^p_j and t_ji under theta_j): the five sums of
  forward_kernels.icon_mixture_kernel (kl, cross_entropy: sum p~ log q~, sum p~ log p~, R_i's sum,
  H_i's sum, 0; an f-divergence: sum q~ f, sum q g, sum q, sum p f', sum p).

- ``icon_symmetric_affinity_forward_kernel``: one pair of Gram tiles feeds the pass's statistics of
  rows I over the columns of J (row side, t with the rows' parameters) and of rows J over the
  columns of I (column side, t with the columns' parameters; not on the diagonal block), written as
  partials per panel of row blocks (COL_PART [5, panel_cap, N], ROW_PART [5, panel_cap, chunks,
  BLOCK_M]).
- ``icon_symmetric_affinity_merge_kernel``: folds a panel's partials into the running statistics
  (RUN [5, N]: both maxima rescaled online, A with m_p; the second pass's plain sums) and finishes
  the row blocks the panel completes as the plain forward does: the closed form's loss and stats
  rows 0 (LSE), 2 (LSE^p) and 3 (H_i = L_i); the LSE pass's rows 0 and 2; the second pass's loss,
  row 1 (R_i, or Gamma_i as a row mean: tile_helpers.second_pass_rows) and row 3 (H_i, or Phi_i as a
  row mean: target_row_statistic), so that the plain backward (the target's gradient) can follow
  this forward. The launcher then writes its record over row 1 where no backward reads it (kl,
  cross_entropy at beta = 0) or over row 3 (launchers._record_row).
- ``icon_symmetric_affinity_backward_kernel``: from one recomputed pair of tiles (_tile_logits and
  column_target_logits, the forward's calls: the same logits bit for bit), G_ij with row i's LSE,
  LSE^p and row statistic (R_i, Gamma_i: stats row 1), G_ji with row j's (and t_ji under its
  parameter), each the plain backward's: g (q - p~) at beta = 0 under kl or cross_entropy,
  g (1 - beta) q (R - p~ / q~) at beta > 0, g (1 - beta) q (g_f - Gamma) under an f-divergence
  (backward_kernels.tile_gradients, f_tile_gradients); then H = G_IJ + G_JI^T to dX_I, dX_J and the
  learned parameter per row (symmetric_kernels.chain_pair_tile). On the diagonal block every row's
  G comes from its own row side, as in the forward. The target's gradient is the plain backward's.

GEMM-equivalents (x's Grams and z's counted alike): each forward sweep's Grams ½ + ½, the
backward's S and T ½ + ½, H X_J and H^T X_I ½ each: 3 for the closed form instead of the plain
kernels' 8 (S and T in the forward, both again in each of the two backward kernels, G Y and G^T X),
4 for two sweeps instead of their 10 (S and T in the second pass too). The per-pair exps, logs and
f-divergence terms do not change in number: each pair's terms are formed once for row i and once
for row j, as the plain kernels form them, so where those dominate (the f-divergences' second pass
and backward) the saving is smaller than the Grams'. Everything accumulates in fp32.
"""
import triton
import triton.language as tl

from .backward_kernels import f_tile_gradients, tile_gradients
from .symmetric_kernels import (AFFINITY_STATISTICS, CLOSED_FORM_PASS, LSE_PASS, NO_MAX, SECOND_PASS, SUM_STATISTICS,
                                chain_pair_tile, combine_statistics, finish_rows, gradient_statistic, panel_statistics,
                                second_pass_lse, store_statistics)
from .tile_helpers import (exp_, gram_block, kernel_logits, load_rows, load_vec, pair_logits, second_pass_rows,
                           second_pass_terms, target_row_statistic, valid_pairs)


@triton.jit
def column_target_logits(t_aux, prm_cols, T_KERNEL: tl.constexpr):
    """t_ji of the columns' rows j from the tile's target term a_ij (pair_logits' aux: z_i.z_j for
    dot and log_dot, the clamped squared distance for gaussian, student_t and power; symmetric, z_cols
    being z) under the columns' own parameters prm_cols: the tile read down its columns.
    tile_helpers.kernel_logits, the one formula per kernel that pair_logits applies to the rows' t_ij
    of the same a_ij, with the parameter broadcast along the other axis, so that row j's t_ji is what
    the plain kernels compute for it, up to the rounding of a_ij (an unknown code fails to compile
    there)."""
    return kernel_logits(t_aux, prm_cols[None, :], T_KERNEL)


@triton.jit
def _affinity_statistics(s, t, valid, KL: tl.constexpr, AXIS: tl.constexpr, SUMS: tl.constexpr):
    """(m_q, l_q, m_p, l_p, A) of one tile along AXIS (1: the rows' over the tile's columns; 0: the
    columns' over the tile's rows); without SUMS (the LSE pass of a two-pass loss) A is 0, not
    computed. The maxima are at least NO_MAX, as icon_forward_kernel's running maxima start there,
    so a line without a valid pair, or whose target logits are all -inf, merges as (NO_MAX, 0) and
    finishes as the plain forward does (LSE = -inf; A / l_p = 0 / 0). A pair whose e^{t - m_p} is 0
    (t = -inf, or underflow) adds nothing to A, as it adds nothing to the plain forward's sums
    (e (t - s) would be 0 * -inf = NaN at t = -inf)."""
    s_m = tl.where(valid, s, float("-inf"))
    m_q = tl.maximum(tl.max(s_m, AXIS), NO_MAX)
    l_q = tl.sum(exp_(s_m - tl.expand_dims(m_q, AXIS)), AXIS)
    t_m = tl.where(valid, t, float("-inf"))
    m_p = tl.maximum(tl.max(t_m, AXIS), NO_MAX)
    e = exp_(t_m - tl.expand_dims(m_p, AXIS))
    l_p = tl.sum(e, AXIS)
    if not SUMS:
        a = tl.zeros(l_p.shape, tl.float32)
    elif KL:
        a = tl.sum(tl.where(e != 0.0, e * (t - s), 0.0), AXIS)
    else:
        a = tl.sum(tl.where(e != 0.0, e * s, 0.0), AXIS)
    return m_q, l_q, m_p, l_p, a


@triton.jit
def _second_pass_statistics(s, t, valid, lse, lse_p, m_valid, alpha, beta, AXIS: tl.constexpr, KL: tl.constexpr,
                            HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The second pass's five sums of one tile along AXIS, t, lse and lse_p the side's (its rows'
    target logits, LSE and LSE^p; the last two broadcast along the other axis): p = e^{t - LSE^p},
    then tile_helpers.second_pass_terms' a, b, c, h, w as forward_kernels.icon_mixture_kernel sums
    them (kl, cross_entropy: sum p~ log q~, sum p~ log p~, R_i's sum, H_i's sum, 0; an f-divergence:
    sum q~ f, sum q g, sum q, sum p f', sum p)."""
    p = tl.where(valid, exp_(t - lse_p), 0.0)
    a, b, c, h, w = second_pass_terms(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, 2, KL, HAS_BETA,
                                      DIVERGENCE)
    return tl.sum(a, AXIS), tl.sum(b, AXIS), tl.sum(c, AXIS), tl.sum(h, AXIS), tl.sum(w, AXIS)


@triton.jit
def _pass_statistics(s, t, valid, lse, lse_p, m_valid, alpha, beta, AXIS: tl.constexpr, KL: tl.constexpr,
                     PASS: tl.constexpr, HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The five partial statistics of one tile along AXIS in pass PASS (lse, lse_p read in the
    SECOND_PASS only)."""
    if PASS == CLOSED_FORM_PASS:
        return _affinity_statistics(s, t, valid, KL, AXIS, True)
    elif PASS == LSE_PASS:
        return _affinity_statistics(s, t, valid, KL, AXIS, False)
    elif PASS == SECOND_PASS:
        return _second_pass_statistics(s, t, valid, lse, lse_p, m_valid, alpha, beta, AXIS, KL, HAS_BETA,
                                       DIVERGENCE)
    else:
        tl.static_assert(False, "_pass_statistics: unknown pass code")


@triton.jit
def _tile_logits(x, y, X, XSQ, rows, cols, x_sq, prm, z, Z, ZSQ, z_sq, t_prm, N, D, DZ, stride_x, stride_z,
                 KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, UPCAST_Z: tl.constexpr,
                 D_CHUNKED: tl.constexpr):
    """(s, aux, the rows' t, t_aux) of one tile, from the Gram tiles of x and z: the same calls in
    forward and backward, so that both passes see the same bits (fp32 Grams of the two orientations
    of a tile may differ in the last bit)."""
    ab = gram_block(x, y, X, X, rows, cols, N, N, stride_x, stride_x, D, BLOCK_D, D_CHUNKED, UPCAST,
                    PRECISION)
    s, aux = pair_logits(ab, x_sq, load_vec(XSQ, cols, N, 0.0), prm, KERNEL)
    zc = load_rows(Z, cols, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
    t, t_aux = pair_logits(tl.dot(z, tl.trans(zc), input_precision=PRECISION), z_sq, load_vec(ZSQ, cols, N, 0.0),
                           t_prm, T_KERNEL)
    return s, aux, t, t_aux


@triton.jit(do_not_specialize=["block0", "panel_cap", "chunks"])     # no compile variant per panel
def icon_symmetric_affinity_forward_kernel(
        X, XSQ, PRM, Z, ZSQ, TPRM, STATS, COL_PART, ROW_PART,
        N, D, DZ, stride_x, stride_z, m_valid, alpha, beta, block0, panel_cap, chunks,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, KL: tl.constexpr,
        PASS: tl.constexpr, HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Program (k, c): row block I = block0 + k, its share c of the column blocks (J = I + c, ... by
    chunks), as symmetric_kernels.icon_symmetric_forward_kernel. PASS: the statistics of
    _pass_statistics; the SECOND_PASS reads every row's LSE and LSE^p (STATS rows 0 and 2, from the
    LSE_PASS over the whole triangle), its rows' and, on the column side, its columns' rows'."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    KIND: tl.constexpr = SUM_STATISTICS if PASS == SECOND_PASS else AFFINITY_STATISTICS
    k = tl.program_id(0)
    c = tl.program_id(1)
    I = block0 + k
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, 0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    z = load_rows(Z, rows, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
    z_sq = load_vec(ZSQ, rows, N, 0.0)
    t_prm = load_vec(TPRM, rows, N, 1.0)
    lse = second_pass_lse(STATS, rows, N, PASS)
    lse_p = second_pass_lse(STATS + 2 * N, rows, N, PASS)
    if KIND == SUM_STATISTICS:
        s0 = tl.zeros([BLOCK_M], tl.float32)
        s2 = tl.zeros([BLOCK_M], tl.float32)
    else:
        s0 = tl.full([BLOCK_M], NO_MAX, tl.float32)     # the learned and the target running maxima
        s2 = tl.full([BLOCK_M], NO_MAX, tl.float32)
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s3 = tl.zeros([BLOCK_M], tl.float32)
    s4 = tl.zeros([BLOCK_M], tl.float32)
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, 0)
            s, aux, t, t_aux = _tile_logits(x, y, X, XSQ, rows, cols, x_sq, prm, z, Z, ZSQ, z_sq, t_prm, N, D, DZ,
                                            stride_x, stride_z, KERNEL, T_KERNEL, BLOCK_D, BLOCK_DZ, PRECISION,
                                            UPCAST, UPCAST_Z, D_CHUNKED)
            r0, r1, r2, r3, r4 = _pass_statistics(s, t, valid, lse[:, None], lse_p[:, None], m_valid, alpha, beta, 1,
                                                  KL, PASS, HAS_BETA, DIVERGENCE)
            s0, s1, s2, s3, s4 = combine_statistics(s0, s1, s2, s3, s4, r0, r1, r2, r3, r4, KIND)
            if J != I:        # rows J over the columns of I: the tiles read down their columns
                t_cols = column_target_logits(t_aux, load_vec(TPRM, cols, N, 1.0), T_KERNEL)
                lse_c = second_pass_lse(STATS, cols, N, PASS)
                lse_p_c = second_pass_lse(STATS + 2 * N, cols, N, PASS)
                c0, c1, c2, c3, c4 = _pass_statistics(s, t_cols, valid, lse_c[None, :], lse_p_c[None, :], m_valid,
                                                      alpha, beta, 0, KL, PASS, HAS_BETA, DIVERGENCE)
                store_statistics(COL_PART + k * N + cols, panel_cap * N, c0, c1, c2, c3, c4, cols < N)
    store_statistics(ROW_PART + (k * chunks + c) * BLOCK_M + tl.arange(0, BLOCK_M), panel_cap * chunks * BLOCK_M,
                     s0, s1, s2, s3, s4, rows < N)


@triton.jit(do_not_specialize=["block0", "panel_blocks", "panel_cap", "chunks"])
def icon_symmetric_affinity_merge_kernel(
        COL_PART, ROW_PART, RUN, LOSS, STATS,
        N, block0, panel_blocks, panel_cap, chunks,
        PASS: tl.constexpr, KL: tl.constexpr, DIVERGENCE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program r: row block R = block0 + r. Its column-side partials come from the panel's row
    blocks before it; if the panel holds R, its row-side partials too, and R is complete. A complete
    row block's finish depends on the PASS: the closed form's loss and stats rows 0, 2 and 3
    (icon_forward_kernel's ONE_PASS Affinity rows), the LSE_PASS's rows 0 and 2 (LSE, LSE^p), or the
    SECOND_PASS's loss and rows 1 and 3 (icon_mixture_kernel's: R_i or Gamma_i, H_i or Phi_i)."""
    KIND: tl.constexpr = SUM_STATISTICS if PASS == SECOND_PASS else AFFINITY_STATISTICS
    R = block0 + tl.program_id(0)
    rows = R * BLOCK_M + tl.arange(0, BLOCK_M)
    in_rows = rows < N
    s0, s1, s2, s3, s4 = panel_statistics(COL_PART, ROW_PART, RUN, R, rows, in_rows, N, block0, panel_blocks,
                                          panel_cap, chunks, BLOCK_M, KIND)
    if R - block0 < panel_blocks:
        if PASS == CLOSED_FORM_PASS:
            # the finish of icon_forward_kernel's ONE_PASS Affinity rows: m_q, l_q, m_p, l_p, A
            lse = s0 + tl.log(s1)
            lse_p = s2 + tl.log(s3)
            if KL:
                loss = s4 / s3 - lse_p + lse
            else:
                loss = lse - s4 / s3
            tl.store(LOSS + rows, loss, mask=in_rows)
            tl.store(STATS + rows, lse, mask=in_rows)
            tl.store(STATS + 2 * N + rows, lse_p, mask=in_rows)
            tl.store(STATS + 3 * N + rows, loss, mask=in_rows)        # H_i: the plain backward's dL/dt
        elif PASS == LSE_PASS:
            tl.store(STATS + rows, s0 + tl.log(s1), mask=in_rows)
            tl.store(STATS + 2 * N + rows, s2 + tl.log(s3), mask=in_rows)
        elif PASS == SECOND_PASS:
            # the finish of icon_mixture_kernel: the sums a, b, c, h, w of second_pass_terms
            loss, stat = second_pass_rows(s0, s1, s2, KL, DIVERGENCE)
            tl.store(LOSS + rows, loss, mask=in_rows)
            tl.store(STATS + N + rows, stat, mask=in_rows)
            tl.store(STATS + 3 * N + rows, target_row_statistic(s3, s4, DIVERGENCE), mask=in_rows)
        else:
            tl.static_assert(False, "icon_symmetric_affinity_merge_kernel: unknown pass code")
    else:
        store_statistics(RUN + rows, N, s0, s1, s2, s3, s4, in_rows)


@triton.jit
def _affinity_gradients(s, t, valid, lse, lse_p, g, stat, m_valid, alpha, beta, HAS_BETA: tl.constexpr,
                        DIVERGENCE: tl.constexpr):
    """dL/ds of one side of a tile, the side's rows' (LSE, LSE^p, upstream gradient, stats row 1)
    broadcast along it (rows i: [:, None], the G_ji of rows j: [None, :]; t is that side's), p =
    e^{t - LSE^p}: the plain backward's (backward_kernels.pair_tile) tile_gradients for kl and
    cross_entropy (one gradient: g (q - p~) at beta = 0, g (1 - beta) q (R - p~ / q~) at beta > 0)
    and f_tile_gradients for an f-divergence (g (1 - beta) q (g_f - Gamma)), whose target-side
    gradient is not asked for. 0 off the valid set (a row left out has no valid pair; a NaN p gives
    NaN as there, whatever g)."""
    p = tl.where(valid, exp_(t - lse_p), 0.0)
    if DIVERGENCE == 0 or DIVERGENCE == 1:
        grad, _ = tile_gradients(s, valid, p, lse, g, stat, stat, m_valid, alpha, beta, False, HAS_BETA, False)
    elif DIVERGENCE >= 2 and DIVERGENCE <= 6:
        grad, _ = f_tile_gradients(s, valid, p, t, lse, lse_p, g, stat, stat, m_valid, alpha, beta, 2, HAS_BETA,
                                   False, DIVERGENCE)
    else:
        tl.static_assert(False, "_affinity_gradients: unknown divergence code")
    return grad


@triton.jit(do_not_specialize=["chunks"])
def icon_symmetric_affinity_backward_kernel(
        X, XSQ, PRM, Z, ZSQ, TPRM, STATS, GRAD, DX, DPRM,
        N, D, DZ, stride_x, stride_z, m_valid, alpha, beta, chunks,
        KERNEL: tl.constexpr, T_KERNEL: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_BETA: tl.constexpr,
        DIVERGENCE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DZ: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, UPCAST_Z: tl.constexpr, D_CHUNKED: tl.constexpr):
    """Program (I, c, chunk of d): DX and DPRM are zeroed fp32 buffers that every program adds
    into. With D_CHUNKED each chunk's program recomputes S over all of d (as the plain kernels), and
    T always over all of z's features (as the plain kernels). DIVERGENCE: 0 for kl and cross_entropy
    (one gradient), else the f-divergence's code; the row statistic of beta > 0 or an f-divergence
    (R_i, Gamma_i) is stats row 1, each side's rows' own."""
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "a column block is swept in whole tiles")
    I = tl.program_id(0)
    c = tl.program_id(1)
    d0 = tl.program_id(2) * BLOCK_D
    first = tl.program_id(2) == 0         # per-row dparam: from the first chunk's programs
    rows = I * BLOCK_M + tl.arange(0, BLOCK_M)
    x = load_rows(X, rows, N, stride_x, BLOCK_D, D, UPCAST, d0)
    x_sq = load_vec(XSQ, rows, N, 0.0)
    prm = load_vec(PRM, rows, N, 1.0)
    z = load_rows(Z, rows, N, stride_z, BLOCK_DZ, DZ, UPCAST_Z, 0)
    z_sq = load_vec(ZSQ, rows, N, 0.0)
    t_prm = load_vec(TPRM, rows, N, 1.0)
    lse = load_vec(STATS, rows, N, 0.0)
    lse_p = load_vec(STATS + 2 * N, rows, N, 0.0)
    g = load_vec(GRAD, rows, N, 0.0)
    stat = gradient_statistic(STATS, rows, N, HAS_BETA, DIVERGENCE)
    dx = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    dprm = tl.zeros([BLOCK_M], tl.float32)
    dk = d0 + tl.arange(0, BLOCK_D)
    for J in range(I + c, tl.cdiv(N, BLOCK_M), chunks):
        for j0 in range(J * BLOCK_M, J * BLOCK_M + BLOCK_M, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            valid = valid_pairs(rows, cols, N, N, EXCLUDE_SELF)
            y = load_rows(X, cols, N, stride_x, BLOCK_D, D, UPCAST, d0)
            s, aux, t, t_aux = _tile_logits(x, y, X, XSQ, rows, cols, x_sq, prm, z, Z, ZSQ, z_sq, t_prm, N, D, DZ,
                                            stride_x, stride_z, KERNEL, T_KERNEL, BLOCK_D, BLOCK_DZ, PRECISION,
                                            UPCAST, UPCAST_Z, D_CHUNKED)
            grad_rows = _affinity_gradients(s, t, valid, lse[:, None], lse_p[:, None], g[:, None], stat[:, None],
                                            m_valid, alpha, beta, HAS_BETA, DIVERGENCE)
            # G_ji of the columns' rows, off the diagonal block only: on it, row j's G_ji is its
            # own row side's (the forward's values for row j), and reaches x_i through H^T
            lse_c = load_vec(STATS, cols, N, 0.0)
            t_cols = column_target_logits(t_aux, load_vec(TPRM, cols, N, 1.0), T_KERNEL)
            grad_cols = tl.where(J != I, _affinity_gradients(s, t_cols, valid, lse_c[None, :],
                                                             load_vec(STATS + 2 * N, cols, N, 0.0)[None, :],
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
