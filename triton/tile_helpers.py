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
def pair_logits(ab, a_sq, b_sq, prm, KERNEL: tl.constexpr):
    """(s, aux) from the Gram block ab [BM, BN]; prm is per row [BM].

    aux is a.b (dot, log_dot) or the clamped squared distance (gaussian, student_t, power)."""
    if KERNEL == 0:
        s = ab / prm[:, None]
        aux = ab
    elif KERNEL == 3:
        s = tl.log(ab)
        aux = ab
    else:
        aux = a_sq[:, None] + b_sq[None, :] - 2.0 * ab
        aux = tl.where(aux < 0.0, 0.0, aux)        # clamp at 0, but keep NaN (tl.maximum drops it)
        if KERNEL == 1:
            s = -aux / (2.0 * prm * prm)[:, None]
        elif KERNEL == 2:
            s = -0.5 * (prm + 1.0)[:, None] * tl.log(1.0 + aux / prm[:, None])
        elif KERNEL == 4:
            s = -0.5 * prm[:, None] * tl.log(aux + POWER_EPS)
        else:
            tl.static_assert(False, "pair_logits: unknown kernel code")
    return s, aux


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
    if KERNEL == 0:
        d = -tl.sum(grad * (s - shift[:, None]), 1) / prm
    elif KERNEL == 1:
        d = -2.0 * tl.sum(grad * (s - shift[:, None]), 1) / prm
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
