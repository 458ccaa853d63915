"""@triton.jit helpers shared by the I-Con forward and backward kernels.

Codes (constexpr, launchers.KERNEL_CODES / TARGET_CODES, the same numbers as
icon_kernels/families.py and csrc/tile_math.h; tests/test_families.py checks they agree): kernel
0 dot, 1 gaussian, 2 student_t, 3 log_dot, 4 power (cosine arrives as dot on normalised rows); target
0 labels, 1 neighbors, 2 affinity, 3 dense. Every switch over a code ends in a static_assert, so an
unknown code fails to compile instead of computing the last kernel. Everything is fp32.
"""
import triton
import triton.language as tl

# the power kernel's epsilon, s = -(n/2) log(d² + eps): a library constant, not an op argument
# (icon_kernels/families.py POWER_EPS, csrc/tile_math.h kPowerEps; tests/test_families.py)
POWER_EPS = tl.constexpr(1e-12)


@triton.jit
def exp_(v):
    return tl.exp2(v * 1.4426950408889634)


@triton.jit
def load_rows(ptr, idx, n, stride, BLOCK_D: tl.constexpr, d, UPCAST: tl.constexpr, d0):
    """Columns d0 : d0 + BLOCK_D of rows idx of a row-major (n, d) matrix, zero padded. UPCAST
    converts to fp32 at once (fp32/fp64 inputs, and bf16 under the interpreter, which cannot do
    bf16 arithmetic); otherwise fp16/bf16 stay native so tl.dot runs on tensor cores."""
    dk = d0 + tl.arange(0, BLOCK_D)
    mask = (idx < n)[:, None] & (dk < d)[None, :]
    block = tl.load(ptr + idx.to(tl.int64)[:, None] * stride + dk[None, :], mask=mask, other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def load_vec(ptr, idx, n, other):
    return tl.load(ptr + idx, mask=idx < n, other=other)


@triton.jit
def gram_block(a, b, A, B, ia, ib, na, nb, stride_a, stride_b, d, BLOCK_D: tl.constexpr,
               D_CHUNKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a_i . b_j for row blocks ia of A and ib of B: from the loaded blocks a, b, or, when d is
    too large to hold in registers (D_CHUNKED), by a loop over d in BLOCK_D chunks."""
    if D_CHUNKED:
        ab = tl.zeros([ia.shape[0], ib.shape[0]], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            a_c = load_rows(A, ia, na, stride_a, BLOCK_D, d, UPCAST, d0)
            b_c = load_rows(B, ib, nb, stride_b, BLOCK_D, d, UPCAST, d0)
            ab += tl.dot(a_c, tl.trans(b_c), input_precision=PRECISION)
    else:
        ab = tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return ab


@triton.jit
def kernel_logits(aux, prm, KERNEL: tl.constexpr):
    """The logits of kernel KERNEL from the pair term aux (pair_logits' aux: a.b for dot and log_dot,
    the clamped squared distance otherwise) under the parameter prm, broadcast along the tile:
    prm[:, None] gives the rows' logits s_ij (pair_logits), prm[None, :] the columns' rows' s_ji of a
    symmetric aux (the tile read down its columns: symmetric_affinity_kernels.column_target_logits).
    One formula per kernel for both, so that a column side computes exactly what the plain kernels
    compute for that row from the same aux."""
    if KERNEL == 0:
        s = aux / prm
    elif KERNEL == 3:
        s = tl.log(aux)
    elif KERNEL == 1:
        s = -aux / (2.0 * prm * prm)
    elif KERNEL == 2:
        s = -0.5 * (prm + 1.0) * tl.log(1.0 + aux / prm)
    elif KERNEL == 4:
        s = -0.5 * prm * tl.log(aux + POWER_EPS)
    else:
        tl.static_assert(False, "kernel_logits: unknown kernel code")
    return s


@triton.jit
def pair_logits(ab, a_sq, b_sq, prm, KERNEL: tl.constexpr):
    """(s, aux) from the Gram block ab [BM, BN]; prm is per row [BM].

    aux is a.b (dot, log_dot) or the clamped squared distance (gaussian, student_t, power); s is
    kernel_logits of aux with the rows' parameters."""
    if KERNEL == 0 or KERNEL == 3:
        aux = ab
    else:
        aux = a_sq[:, None] + b_sq[None, :] - 2.0 * ab
        aux = tl.where(aux < 0.0, 0.0, aux)        # clamp at 0, but keep NaN (tl.maximum drops it)
    return kernel_logits(aux, prm[:, None], KERNEL), aux


@triton.jit
def grad_weight(grad, aux, prm, KERNEL: tl.constexpr):
    """W with dL/da_i = sum_j W_ij b_j - DIST * (sum_j W_ij) a_i (and symmetrically for b)."""
    if KERNEL == 0:
        w = grad / prm[:, None]
    elif KERNEL == 3:
        w = tl.where(grad != 0.0, grad / aux, 0.0)     # padding has a.b = 0 and grad = 0
    elif KERNEL == 1:
        w = grad / (prm * prm)[:, None]
    elif KERNEL == 2:
        w = grad * (prm + 1.0)[:, None] / (prm[:, None] + aux)
    elif KERNEL == 4:
        w = grad * prm[:, None] / (aux + POWER_EPS)
    else:
        tl.static_assert(False, "grad_weight: unknown kernel code")
    return w


@triton.jit
def param_grad(grad, s, aux, prm, shift, KERNEL: tl.constexpr):
    """Per-row dL/dparam of one tile. Rows of G sum to zero, so s is shifted by the row LSE."""
    return shifted_param_grad(grad, s, aux, prm, shift[:, None], KERNEL)


@triton.jit
def shifted_param_grad(grad, s, aux, prm, shift, KERNEL: tl.constexpr):
    """Per-row sums of dL/dparam of one tile, s shifted by ``shift`` (broadcast to the tile): a
    constant along each line of the tile whose G sums to zero (the row LSE for a row's G, the
    column's for the reverse direction's G of the bidirectional pass)."""
    if KERNEL == 0:
        d = -tl.sum(grad * (s - shift), 1) / prm
    elif KERNEL == 1:
        d = -2.0 * tl.sum(grad * (s - shift), 1) / prm
    elif KERNEL == 2:
        nu = prm[:, None]
        ds = -0.5 * tl.log(1.0 + aux / nu) + 0.5 * (nu + 1.0) * aux / (nu * (nu + aux))
        d = tl.sum(grad * ds, 1)
    elif KERNEL == 4:
        d = tl.sum(grad * (-0.5 * tl.log(aux + POWER_EPS)), 1)
    elif KERNEL == 3:
        d = tl.sum(grad * 0.0, 1)                 # log_dot has no parameter
    else:
        tl.static_assert(False, "param_grad: unknown kernel code")
    return d


@triton.jit
def grad_dot(w, b, PRECISION: tl.constexpr):
    """w (fp32 gradient weights) times feature block b. For bf16 b, w is rounded to bf16 for the
    tensor cores; fp16 would flush the tiny weights of a large batch to zero, so there b is
    upcast instead."""
    if b.dtype == tl.float16:
        return tl.dot(w, b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(w.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def finite_shift(lse):
    """A row LSE as the shift of param_grad: 0 for a row without valid columns (LSE = -inf)."""
    return tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def valid_pairs(rows, cols, N, M, EXCLUDE_SELF: tl.constexpr):
    ok = (rows < N)[:, None] & (cols < M)[None, :]
    if EXCLUDE_SELF:
        ok = ok & (rows[:, None] != cols[None, :])
    return ok


@triton.jit
def target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM, DENSE, stride_dense,
                   TARGET: tl.constexpr):
    """p_ij for labels and dense targets (zero off the valid set); 0 for Neighbors, whose pairs
    are handled by a sparse gather outside the tile loop (icon_kernels/backends/neighbor_pairs.py).

    LAB / CLAB hold the row and column labels (int64, as given: only their equality matters);
    NORM the per-row normaliser: K_i for labels, the row sum for dense (launchers.NORM_ROW)."""
    if TARGET == 0:
        li = tl.load(LAB + rows, mask=rows < N, other=0)
        cj = tl.load(CLAB + cols, mask=cols < M, other=0)
        k = tl.load(NORM + rows, mask=rows < N, other=1.0)
        p = tl.where((li[:, None] == cj[None, :]) & valid, 1.0 / k[:, None], 0.0)
    elif TARGET == 1:
        p = tl.zeros(valid.shape, tl.float32)
    elif TARGET == 3:
        offsets = rows.to(tl.int64)[:, None] * stride_dense + cols[None, :]   # N*M may pass 2^31
        w = tl.load(DENSE + offsets, mask=valid, other=0.0)
        norm = tl.load(NORM + rows, mask=rows < N, other=1.0)
        p = w.to(tl.float32) / norm[:, None]
    else:
        tl.static_assert(False, "target_weights: unknown or Affinity target code (Affinity p comes from its own Gram)")
    return p


@triton.jit
def neighbor_weights(rows, cols, valid, N, NBR, NBR_W, k):
    """p_ij of a Neighbors target formed inside the tile, for the f-divergences (whose per-pair
    term is needed at every column, not only on the support): sum over row i's k entries of
    w_ie [index_ie == j]. NBR holds the (N, k) column indices (-1 where dropped), NBR_W the
    normalised weights; repeated indices add up. O(BLOCK_M BLOCK_N k) compares per tile."""
    in_rows = rows < N
    base = rows.to(tl.int64) * k
    p = tl.zeros(valid.shape, tl.float32)
    for e in range(0, k):
        j = tl.load(NBR + base + e, mask=in_rows, other=-1)
        w = tl.load(NBR_W + base + e, mask=in_rows, other=0.0)
        p += tl.where(j[:, None] == cols[None, :], w[:, None], 0.0)
    return tl.where(valid, p, 0.0)


@triton.jit
def column_neighbor_weights(rows, cols, valid, N, NBR, NBR_W, k):
    """neighbor_weights with the roles swapped, for self mode's triangular kernels (the tile's
    column side): at (i, j) the weight p_ji of row j (a column of the tile) on column i, the sum over
    row j's k entries of w_je [index_je == i]. The same (N, k) lists, read per column; as many
    compares as neighbor_weights."""
    in_cols = cols < N
    base = cols.to(tl.int64) * k
    p = tl.zeros(valid.shape, tl.float32)
    for e in range(0, k):
        i = tl.load(NBR + base + e, mask=in_cols, other=-1)
        w = tl.load(NBR_W + base + e, mask=in_cols, other=0.0)
        p += tl.where(i[None, :] == rows[:, None], w[None, :], 0.0)
    return tl.where(valid, p, 0.0)


@triton.jit
def column_target_weights(rows, cols, valid, N, LAB, CLAB, NORM, DENSE, stride_dense, TARGET: tl.constexpr):
    """target_weights of the columns' rows j over the tile's rows i, for self mode's triangular
    kernels (y is x, so a column is a row too): at (i, j) p_ji, zero off the (symmetric) valid set.
    Labels: [l_j = c_i] / K_j, row j's label (LAB at the tile's columns) against column i's (CLAB at
    the tile's rows; CLAB may be LAB itself), K_j row j's positive count over the columns; Dense:
    w_ji / W_j, the transposed tile of w read in place and row j's normaliser (NORM,
    launchers.NORM_ROW). A Neighbors target's is column_neighbor_weights."""
    if TARGET == 0:
        ci = tl.load(CLAB + rows, mask=rows < N, other=0)
        lj = tl.load(LAB + cols, mask=cols < N, other=0)
        k = tl.load(NORM + cols, mask=cols < N, other=1.0)
        p = tl.where((ci[:, None] == lj[None, :]) & valid, 1.0 / k[None, :], 0.0)
    elif TARGET == 3:
        offsets = cols.to(tl.int64)[None, :] * stride_dense + rows[:, None]   # w[j, i]
        w = tl.load(DENSE + offsets, mask=valid, other=0.0)
        norm = tl.load(NORM + cols, mask=cols < N, other=1.0)
        p = w.to(tl.float32) / norm[None, :]
    else:
        tl.static_assert(False, "column_target_weights: Labels and Dense targets only")
    return p


@triton.jit
def tile_target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM, DENSE, stride_dense,
                        TARGET: tl.constexpr, DIVERGENCE: tl.constexpr):
    """target_weights, except for a Neighbors target under an f-divergence (DIVERGENCE not kl 0
    or cross_entropy 1), whose p is formed in the tile (neighbor_weights): then LAB holds the
    (N, k) neighbour indices, DENSE their normalised weights and stride_dense is k
    (launchers._neighbor_lists)."""
    if TARGET == 1 and DIVERGENCE != 0 and DIVERGENCE != 1:
        p = neighbor_weights(rows, cols, valid, N, LAB, DENSE, stride_dense)
    else:
        p = target_weights(rows, cols, valid, N, M, LAB, CLAB, NORM, DENSE, stride_dense, TARGET)
    return p


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0 to fp32 accuracy also where 1 + u rounds (the classic correction)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def f_pair_terms(p, q, lp, lq, DIVERGENCE: tl.constexpr):
    """(q~ f(r), q~ g, p~ f') per pair of the f-divergence DIVERGENCE (DESIGN.md §1.1; the codes of
    families.DIVERGENCES: 2 reverse_kl, 3 tv, 4 hellinger, 5 js, 6 chi2), from p~, q~ and their
    logs (-inf where 0), as csrc/divergence_math.h f_pair_terms and
    icon_kernels/backends/f_divergences.py pair_terms: p~ and q~ outside, the logs inside, so
    nothing overflows where r = p~ / q~ would. A NaN log counts as present (NaN in, NaN out)."""
    inf = float("inf")
    has_p = lp != -inf
    has_q = lq != -inf
    if DIVERGENCE == 2:          # q (log q - log p); g = log q - log p + 1; f' = -q / p
        both = has_p & has_q
        term = tl.where(both, q * (lq - lp), tl.where(has_q, inf, 0.0))
        q_g = tl.where(both, q * (lq - lp + 1.0), 0.0)   # an infinite term is a constant (the oracle's)
        p_fp = tl.where(has_p, -q, 0.0)
    elif DIVERGENCE == 3:        # 1/2 |p - q|; g = -1/2 sign(p - q); f' = 1/2 sign(p - q)
        sign = tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))
        term = 0.5 * tl.abs(p - q)
        q_g = -0.5 * q * sign
        p_fp = 0.5 * p * sign
    elif DIVERGENCE == 4:        # (sqrt p - sqrt q)^2; g = 1 - sqrt(p / q); f' = 1 - sqrt(q / p)
        root_p = tl.where(has_p, exp_(0.5 * lp), 0.0)
        root_q = tl.where(has_q, exp_(0.5 * lq), 0.0)
        root_pq = tl.where(has_p & has_q, exp_(0.5 * (lp + lq)), 0.0)
        gap = root_p - root_q
        term = gap * gap
        q_g = q - root_pq
        p_fp = p - root_pq
    elif DIVERGENCE == 5:        # m = (p + q) / 2; g = 1/2 log(q / m); f' = 1/2 log(p / m)
        hi = tl.where(lp > lq, lp, lq)                  # where, not tl.maximum: keeps NaN
        lo = tl.where(lp > lq, lq, lp)
        log_m = hi + _log1p(exp_(lo - hi)) - 0.6931471805599453
        p_part = tl.where(has_p, p * (lp - log_m), 0.0)
        q_part = tl.where(has_q, q * (lq - log_m), 0.0)
        term = 0.5 * (p_part + q_part)
        q_g = 0.5 * q_part
        p_fp = 0.5 * p_part
    elif DIVERGENCE == 6:        # (p - q)^2 / q; g = 1 - (p / q)^2; f' = 2 (p / q - 1)
        p2_over_q = tl.where(has_p, tl.where(has_q, exp_(2.0 * lp - lq), inf), 0.0)
        gap = tl.abs(p - q)
        nonzero = gap != 0.0
        log_gap = tl.log(tl.where(nonzero, gap, 1.0))
        term = tl.where(nonzero, tl.where(has_q, exp_(2.0 * log_gap - lq), inf), 0.0)
        q_g = tl.where(has_q, q - p2_over_q, 0.0)          # q = 0 < p: an infinite constant term
        p_fp = tl.where(has_q, 2.0 * (p2_over_q - p), 0.0)
    else:
        tl.static_assert(False, "f_pair_terms: unknown divergence code")
    return term, q_g, p_fp


@triton.jit
def f_tile(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, TARGET: tl.constexpr,
           HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The f-divergence quantities of one tile, 0 off the valid set: (q~ f, q g, p f', q), where
    q g = (q / q~) q~ g and p f' = (p / p~) p~ f' feed Gamma_i = sum_j q g and Phi_i = sum_j p f'
    (DESIGN.md §1.1). p is the target's (unmixed); an Affinity target with alpha = 0 takes the exact
    log p = t - LSE^p (finite where p underflows), as the torch and C++ backends do. lse and lse_p
    come broadcast along the tile (the rows': [:, None]; in self mode's triangular kernels also the
    columns' rows', [None, :], with the tile read down its columns), so one function serves both."""
    neg_inf = float("-inf")
    log_q = tl.where(valid, s - lse, neg_inf)
    q = exp_(log_q)
    if HAS_BETA:
        q_mix = tl.where(valid, (1.0 - beta) * q + beta / m_valid, 0.0)
        log_q_mix = tl.where(valid, tl.log(q_mix), neg_inf)
        q_ratio = tl.where(valid, q / q_mix, 0.0)
    else:
        q_mix = q
        log_q_mix = log_q
        q_ratio = tl.where(valid, 1.0, 0.0)
    p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
    positive = p_mix != 0.0                  # NaN counts: a NaN target gives a NaN loss
    safe = tl.where(positive, p_mix, 1.0)
    log_p_mix = tl.where(positive, tl.log(safe), neg_inf)
    p_ratio = tl.where(positive, p / safe, 0.0)
    if TARGET == 2:
        exact = alpha == 0.0
        log_p_mix = tl.where(exact, tl.where(valid, t - lse_p, neg_inf), log_p_mix)
        p_ratio = tl.where(exact, tl.where(valid, 1.0, 0.0), p_ratio)
    term, q_g, p_fp = f_pair_terms(p_mix, q_mix, log_p_mix, log_q_mix, DIVERGENCE)
    term = tl.where(valid, term, 0.0)
    q_g = tl.where(q_ratio != 0.0, q_ratio * q_g, 0.0)
    p_fp = tl.where(p_ratio != 0.0, p_ratio * p_fp, 0.0)
    return term, q_g, p_fp, q


@triton.jit
def second_pass_terms(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, TARGET: tl.constexpr, KL: tl.constexpr,
                      HAS_BETA: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The per-pair terms of the second pass over the tiles (the LSEs known; lse and lse_p broadcast
    along the tile as for f_tile), 0 off the valid set, whose line sums make the row loss and the
    row statistic (second_pass_rows): (a, b, c, h, w) =
    - kl, cross_entropy (DIVERGENCE 0, 1; beta > 0, or an Affinity target with alpha > 0):
      p~ log q~, p~ log p~, R_i's p~ q / q~ (p~ at beta = 0), p h (H_i's, the target's gradient;
      h = log p~ - log q~ for kl, - log q~ for cross_entropy), 0;
    - an f-divergence (2..6): q~ f, q g, q, p f', p (f_tile: Gamma_i's and Phi_i's sums and the
      row totals of the q and p that divide them).
    forward_kernels.icon_mixture_kernel sums all five along the rows; self mode's triangular
    kernels a, b, c along either axis of the tile (symmetric_kernels.py, a Labels target: H and Phi
    unread), or all five (symmetric_affinity_kernels.py, an Affinity target's stats row 3)."""
    if DIVERGENCE == 0 or DIVERGENCE == 1:
        log_q = tl.where(valid, s - lse, float("-inf"))
        q = exp_(log_q)
        if HAS_BETA:
            q_mix = (1.0 - beta) * q + beta / m_valid
            log_q_mix = tl.log(q_mix)
        else:
            q_mix = q
            log_q_mix = log_q
        p_mix = tl.where(valid, (1.0 - alpha) * p + alpha / m_valid, 0.0)
        used = p_mix != 0.0
        log_p_mix = tl.log(p_mix)
        a = tl.where(used, p_mix * log_q_mix, 0.0)
        b = tl.where(used, p_mix * log_p_mix, 0.0)
        if HAS_BETA:
            c = tl.where(used, p_mix * q / q_mix, 0.0)
        else:
            c = p_mix
        if KL:
            h = log_p_mix - log_q_mix
        else:
            h = -log_q_mix
        h = tl.where(p != 0.0, p * h, 0.0)
        w = tl.zeros(valid.shape, tl.float32)
    elif DIVERGENCE >= 2 and DIVERGENCE <= 6:
        a, b, h, c = f_tile(valid, s, lse, p, t, lse_p, alpha, beta, m_valid, TARGET, HAS_BETA, DIVERGENCE)
        w = p
    else:
        tl.static_assert(False, "second_pass_terms: unknown divergence code")
    return a, b, c, h, w


@triton.jit
def second_pass_rows(a, b, c, KL: tl.constexpr, DIVERGENCE: tl.constexpr):
    """(row loss, stats row 1) from the row sums a, b, c of second_pass_terms: kl's
    sum p~ log p~ - sum p~ log q~ (cross_entropy's - sum p~ log q~) and R_i; an f-divergence's
    sum q~ f and Gamma_i = sum q g as a row mean: divided by the row total of the q these kernels
    form (1 up to the fp32 LSE's rounding, an error common to the row), so that the backward's
    q (g - Gamma) sums to 0 over the row whatever that rounding, as the torch backend's
    _minus_row_mean (dL/dx is a weighted covariance)."""
    if DIVERGENCE == 0 or DIVERGENCE == 1:
        if KL:
            loss = b - a
        else:
            loss = -a
        stat = c
    elif DIVERGENCE >= 2 and DIVERGENCE <= 6:
        loss = a
        stat = b / tl.where(c > 0.0, c, 1.0)
    else:
        tl.static_assert(False, "second_pass_rows: unknown divergence code")
    return loss, stat


@triton.jit
def target_row_statistic(h, w, DIVERGENCE: tl.constexpr):
    """Stats row 3 of an Affinity target from the row sums h, w of second_pass_terms: H_i (kl,
    cross_entropy: h as summed) or Phi_i as a row mean (an f-divergence: divided by the row total
    of p, as Gamma_i by that of q in second_pass_rows). The target's gradient reads it
    (backward_kernels.tile_gradients, f_tile_gradients)."""
    if DIVERGENCE != 0 and DIVERGENCE != 1:
        h = h / tl.where(w > 0.0, w, 1.0)
    return h
