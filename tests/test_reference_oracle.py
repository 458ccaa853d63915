"""The dense oracle (and the blockwise torch backend) against hand-derived closed forms.

Every expected value here is computed with explicit Python loops over plain floats, straight
from the formulas of DESIGN.md §1 and of the papers (InfoNCE / NT-Xent, SupCon L_out, SNE,
t-SNE, I-Con debiasing).  Nothing is imported from icon_kernels except its public API, so
these tests are an independent check of `backend="reference"` (the oracle the other tests
trust) and, parametrised, of `backend="torch"`.

Everything runs in float64 with a relative tolerance of 1e-10.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import icon_kernels as ik

RTOL = 1e-10
ATOL = 1e-12
BACKENDS = ["reference", "torch", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in ik.available_backends():
        pytest.skip(f"backend {request.param!r} not available")
    return request.param


# ----------------------------------------------------------------------------------------------
# Plain-Python helpers (no torch math, no library internals)
# ----------------------------------------------------------------------------------------------
def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def rows(t):
    """A float64 tensor as nested Python lists."""
    return t.detach().to(torch.float64).tolist()


def dotp(a, b):
    return sum(u * v for u, v in zip(a, b))


def norm(a):
    return math.sqrt(dotp(a, a))


def sqdist(a, b):
    return sum((u - v) ** 2 for u, v in zip(a, b))


def per_row(param, n):
    """A float or a per-row list/tensor -> list of n floats."""
    if isinstance(param, torch.Tensor):
        param = param.tolist()
    if isinstance(param, (int, float)):
        return [float(param)] * n
    assert len(param) == n
    return [float(v) for v in param]


def logit(a, b, kernel, tau=0.1, sigma=1.0, dof=1.0):
    if kernel == "dot":
        return dotp(a, b) / tau
    if kernel == "cosine":
        return dotp(a, b) / (norm(a) * norm(b)) / tau
    if kernel == "gaussian":
        return -sqdist(a, b) / (2.0 * sigma * sigma)
    if kernel == "student_t":
        return -((dof + 1.0) / 2.0) * math.log(1.0 + sqdist(a, b) / dof)
    if kernel == "log_dot":
        return math.log(dotp(a, b))
    raise AssertionError(kernel)


def logit_matrix(X, Y, kernel, tau=0.1, sigma=1.0, dof=1.0):
    """s_ij over all pairs; tau and sigma may be per row."""
    taus, sigmas = per_row(tau, len(X)), per_row(sigma, len(X))
    return [[logit(X[i], Y[j], kernel, taus[i], sigmas[i], dof) for j in range(len(Y))]
            for i in range(len(X))]


def lse(vals):
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals))


def valid_cols(i, m, exclude_self):
    return [j for j in range(m) if not (exclude_self and j == i)]


def softmax_rows(T, exclude_self):
    """Row-wise softmax over the valid columns, as a full matrix (0 at invalid columns)."""
    out = []
    for i, row in enumerate(T):
        V = valid_cols(i, len(row), exclude_self)
        L = lse([row[j] for j in V])
        out.append([math.exp(row[j] - L) if j in V else 0.0 for j in range(len(row))])
    return out


def icon_row_losses(S, P, exclude_self, alpha=0.0, beta=0.0, divergence="kl"):
    """L_i by loops: p renormalised over V_i, uniform mixing, KL or cross entropy.

    Returns a list with None for rows that have no positives (left out)."""
    out = []
    for i, srow in enumerate(S):
        V = valid_cols(i, len(srow), exclude_self)
        Mp = len(V)
        psum = sum(P[i][j] for j in V)
        if psum == 0.0:
            out.append(None)
            continue
        L_s = lse([srow[j] for j in V])
        total = 0.0
        for j in V:
            p = P[i][j] / psum
            pt = (1.0 - alpha) * p + alpha / Mp
            logq = srow[j] - L_s
            logqt = logq if beta == 0.0 else math.log((1.0 - beta) * math.exp(logq) + beta / Mp)
            if pt == 0.0:
                continue
            if divergence == "kl":
                total += pt * (math.log(pt) - logqt)
            else:
                total += -pt * logqt
        out.append(total)
    return out


def reduce_rows(Ls, reduction="mean", weight=None):
    if reduction == "none":
        return [0.0 if L is None else L for L in Ls]
    if reduction == "sum":
        return sum(L for L in Ls if L is not None)
    w = per_row(1.0 if weight is None else weight, len(Ls))
    num = sum(wi * L for wi, L in zip(w, Ls) if L is not None)
    den = sum(wi for wi, L in zip(w, Ls) if L is not None)
    return num / den if den else 0.0


def label_matrix(row_labels, col_labels):
    return [[1.0 if a == b else 0.0 for b in col_labels] for a in row_labels]


def check(got, expected):
    assert isinstance(got, torch.Tensor)
    exp = torch.as_tensor(expected, dtype=torch.float64)
    assert got.shape == exp.shape, (got.shape, exp.shape)
    torch.testing.assert_close(got.detach().to(torch.float64), exp, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# InfoNCE / NT-Xent: two views, one positive per row
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("kernel", ["dot", "cosine"])
def test_infonce_one_positive(backend, kernel, tau, divergence):
    N, d = 8, 5
    x = randn(N, d, seed=1, scale=0.6)
    labels = torch.arange(N) // 2
    X = rows(x)

    per = []
    for i in range(N):
        pos = i ^ 1  # the other view of the same sample
        num = math.exp(logit(X[i], X[pos], kernel, tau))
        den = sum(math.exp(logit(X[i], X[j], kernel, tau)) for j in range(N) if j != i)
        per.append(-math.log(num / den))
    expected = sum(per) / N

    kw = dict(target=ik.Labels(labels), kernel=kernel, temperature=tau,
              divergence=divergence, backend=backend)
    check(ik.icon_loss(x, **kw), expected)
    check(ik.icon_loss(x, reduction="none", **kw), per)
    check(ik.icon_loss(x, reduction="sum", **kw), sum(per))

    # The usual NT-Xent implementation: cross entropy over the masked similarity matrix.
    z = F.normalize(x, dim=1) if kernel == "cosine" else x
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    ntxent = F.cross_entropy(sim, torch.arange(N) ^ 1)
    check(ik.icon_loss(x, **kw), ntxent.item())


def test_infonce_tensor_temperature(backend):
    """A 0-dim tensor temperature equals the float; a per-row (N,) one divides row i by tau_i."""
    N, d = 6, 4
    x = randn(N, d, seed=2, scale=0.5)
    labels = torch.arange(N) // 2
    X = rows(x)
    taus = [0.1, 0.2, 0.3, 0.15, 0.5, 0.25]

    base = dict(target=ik.Labels(labels), kernel="dot", backend=backend)
    S = logit_matrix(X, X, "dot", tau=0.3)
    exp_scalar = reduce_rows(icon_row_losses(S, label_matrix(labels.tolist(), labels.tolist()), True))
    check(ik.icon_loss(x, temperature=torch.tensor(0.3, dtype=torch.float64), **base), exp_scalar)
    check(ik.icon_loss(x, temperature=0.3, **base), exp_scalar)

    S = logit_matrix(X, X, "dot", tau=taus)
    per = []
    for i in range(N):
        pos = i ^ 1
        per.append(-(S[i][pos] - lse([S[i][j] for j in range(N) if j != i])))
    tau_t = torch.tensor(taus, dtype=torch.float64)
    check(ik.icon_loss(x, temperature=tau_t, reduction="none", **base), per)
    check(ik.icon_loss(x, temperature=tau_t, **base), sum(per) / N)


# ----------------------------------------------------------------------------------------------
# SupCon (Khosla et al., L_out)
# ----------------------------------------------------------------------------------------------
SUPCON_LABELS = [0, 0, 0, 1, 1, 2, 3, 3, 1, 0]  # class 2 has one member: row 5 has no positives


def supcon_rows(X, labels, tau):
    """-1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) ), None if P(i) empty."""
    N = len(X)
    out = []
    for i in range(N):
        P = [p for p in range(N) if p != i and labels[p] == labels[i]]
        if not P:
            out.append(None)
            continue
        den = sum(math.exp(logit(X[i], X[a], "cosine", tau)) for a in range(N) if a != i)
        out.append(-sum(math.log(math.exp(logit(X[i], X[p], "cosine", tau)) / den) for p in P)
                   / len(P))
    return out


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_lout(backend, tau):
    labels = torch.tensor(SUPCON_LABELS)
    N = len(SUPCON_LABELS)
    x = randn(N, 6, seed=3)
    per = supcon_rows(rows(x), SUPCON_LABELS, tau)
    assert per[5] is None and all(L is not None for k, L in enumerate(per) if k != 5)

    kw = dict(target=ik.Labels(labels), kernel="cosine", temperature=tau,
              divergence="cross_entropy", backend=backend)
    included = [L for L in per if L is not None]
    check(ik.icon_loss(x, **kw), sum(included) / len(included))  # 9 rows, not 10

    none = ik.icon_loss(x, reduction="none", **kw)
    check(none, [0.0 if L is None else L for L in per])
    assert none[5].item() == 0.0
    assert torch.isfinite(none).all()
    check(ik.icon_loss(x, reduction="sum", **kw), sum(included))


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_supcon_kl_minus_ce_is_label_entropy(backend, tau):
    """KL_i - CE_i = sum_j p log p = -log K_i for a uniform label target."""
    labels = torch.tensor(SUPCON_LABELS)
    N = len(SUPCON_LABELS)
    x = randn(N, 6, seed=4)
    K = [sum(1 for p in range(N) if p != i and SUPCON_LABELS[p] == SUPCON_LABELS[i])
         for i in range(N)]
    neg_log_k = [-math.log(k) if k else 0.0 for k in K]

    kw = dict(target=ik.Labels(labels), kernel="cosine", temperature=tau, backend=backend)
    kl = ik.icon_loss(x, divergence="kl", reduction="none", **kw)
    ce = ik.icon_loss(x, divergence="cross_entropy", reduction="none", **kw)
    check(kl - ce, neg_log_k)
    incl = [v for v, k in zip(neg_log_k, K) if k]
    diff = ik.icon_loss(x, divergence="kl", **kw) - ik.icon_loss(x, divergence="cross_entropy", **kw)
    check(diff, sum(incl) / len(incl))
    # and the KL rows themselves, by loops
    per = supcon_rows(rows(x), SUPCON_LABELS, tau)
    check(kl, [0.0 if L is None else L + h for L, h in zip(per, neg_log_k)])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_left_out(backend, reduction):
    """Every sample has a unique label and self-pairs are excluded: no row has a positive."""
    N = 5
    x = randn(N, 3, seed=5).requires_grad_(True)
    loss = ik.icon_loss(x, target=ik.Labels(torch.arange(N)), kernel="cosine",
                        reduction=reduction, backend=backend)
    expected = [0.0] * N if reduction == "none" else 0.0
    check(loss, expected)
    assert not torch.isnan(loss).any()
    (loss.sum() * 3.0).backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# SNE / t-SNE (conditional)
# ----------------------------------------------------------------------------------------------
def sne_rows(X, Z, sigma_p, learned):
    """KL(P(.|i) || Q(.|i)) by loops; P gaussian on Z with sigma_p, Q from `learned(xi, xj)`."""
    N = len(X)
    out = []
    for i in range(N):
        Pw = {j: math.exp(-sqdist(Z[i], Z[j]) / (2 * sigma_p ** 2)) for j in range(N) if j != i}
        Qw = {j: math.exp(learned(X[i], X[j])) for j in range(N) if j != i}
        zp, zq = sum(Pw.values()), sum(Qw.values())
        out.append(sum((Pw[j] / zp) * math.log((Pw[j] / zp) / (Qw[j] / zq)) for j in Pw))
    return out


def test_sne_gaussian(backend):
    N = 7
    x = randn(N, 2, seed=6)
    z = randn(N, 5, seed=7)
    sp, sq = 1.3, 0.8
    per = sne_rows(rows(x), rows(z), sp, lambda a, b: -sqdist(a, b) / (2 * sq ** 2))
    target = ik.Affinity(z, kernel="gaussian", sigma=sp)
    kw = dict(target=target, kernel="gaussian", sigma=sq, backend=backend)
    check(ik.icon_loss(x, **kw), sum(per) / N)
    check(ik.icon_loss(x, reduction="none", **kw), per)
    # sigma as a 0-dim tensor
    kw["sigma"] = torch.tensor(sq, dtype=torch.float64)
    check(ik.icon_loss(x, **kw), sum(per) / N)


def test_sne_gaussian_per_row_sigma(backend):
    """A per-row sigma_i on the learned side: s_ij = -|x_i - x_j|^2 / (2 sigma_i^2)."""
    N = 7
    x = randn(N, 3, seed=8)
    z = randn(N, 4, seed=9)
    sig = [0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 2.0]
    X, Z = rows(x), rows(z)
    per = []
    for i in range(N):
        learned = lambda a, b, s=sig[i]: -sqdist(a, b) / (2 * s ** 2)
        per.append(sne_rows(X, Z, 1.0, learned)[i])
    out = ik.icon_loss(x, target=ik.Affinity(z, kernel="gaussian", sigma=1.0), kernel="gaussian",
                       sigma=torch.tensor(sig, dtype=torch.float64), reduction="none",
                       backend=backend)
    check(out, per)


def test_sne_affinity_per_row_sigma(backend):
    """Per-point target bandwidths sigma_i (SNE's perplexity calibration) on the Affinity side."""
    N = 6
    x = randn(N, 2, seed=10)
    z = randn(N, 4, seed=11)
    sig = [0.6, 0.8, 1.0, 1.2, 1.4, 1.6]
    X, Z = rows(x), rows(z)
    T = [[-sqdist(Z[i], Z[j]) / (2 * sig[i] ** 2) for j in range(N)] for i in range(N)]
    S = logit_matrix(X, X, "gaussian", sigma=1.0)
    per = icon_row_losses(S, softmax_rows(T, True), True)
    target = ik.Affinity(z, kernel="gaussian", sigma=torch.tensor(sig, dtype=torch.float64))
    check(ik.icon_loss(x, target=target, kernel="gaussian", sigma=1.0, reduction="none",
                       backend=backend), per)


@pytest.mark.parametrize("dof", [1.0, 3.0])
def test_tsne_student_t(backend, dof):
    N = 8
    x = randn(N, 2, seed=12)
    z = randn(N, 5, seed=13)
    if dof == 1.0:
        learned = lambda a, b: -math.log(1.0 + sqdist(a, b))  # Cauchy
    else:
        learned = lambda a, b: -2.0 * math.log(1.0 + sqdist(a, b) / 3.0)
    sp = 1.7
    per = sne_rows(rows(x), rows(z), sp, learned)
    kw = dict(target=ik.Affinity(z, kernel="gaussian", sigma=sp), kernel="student_t", dof=dof,
              backend=backend)
    check(ik.icon_loss(x, **kw), sum(per) / N)
    check(ik.icon_loss(x, reduction="none", **kw), per)


def test_affinity_cosine_and_student_t_targets(backend):
    """Affinity targets with other kernels (distillation-style)."""
    N = 7
    x = randn(N, 4, seed=14)
    z = randn(N, 3, seed=15)
    X, Z = rows(x), rows(z)
    S = logit_matrix(X, X, "cosine", tau=0.2)

    T = logit_matrix(Z, Z, "cosine", tau=0.5)
    per = icon_row_losses(S, softmax_rows(T, True), True)
    target = ik.Affinity(z, kernel="cosine", temperature=0.5)
    check(ik.icon_loss(x, target=target, kernel="cosine", temperature=0.2, reduction="none",
                       backend=backend), per)

    T = logit_matrix(Z, Z, "student_t", dof=2.0)
    per = icon_row_losses(S, softmax_rows(T, True), True)
    target = ik.Affinity(z, kernel="student_t", dof=2.0)
    check(ik.icon_loss(x, target=target, kernel="cosine", temperature=0.2, backend=backend),
          sum(per) / N)


# ----------------------------------------------------------------------------------------------
# Debiasing (uniform mixing)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
@pytest.mark.parametrize("alpha,beta", [(0.2, 0.0), (0.0, 0.3), (0.2, 0.3)])
def test_debias_labels(backend, alpha, beta, divergence):
    labels = [0, 0, 1, 1, 1, 2, 2]
    N = len(labels)
    x = randn(N, 4, seed=16)
    X = rows(x)
    per = []
    for i in range(N):
        V = [j for j in range(N) if j != i]
        Mp = len(V)
        K = sum(1 for j in V if labels[j] == labels[i])
        s = {j: logit(X[i], X[j], "cosine", 0.5) for j in V}
        Z = sum(math.exp(s[j]) for j in V)
        L = 0.0
        for j in V:
            p = (1.0 if labels[j] == labels[i] else 0.0) / K
            pt = (1 - alpha) * p + alpha / Mp
            qt = (1 - beta) * math.exp(s[j]) / Z + beta / Mp
            if pt > 0:
                L += pt * (math.log(pt) - math.log(qt)) if divergence == "kl" else -pt * math.log(qt)
        per.append(L)
    kw = dict(target=ik.Labels(torch.tensor(labels)), kernel="cosine", temperature=0.5,
              alpha=alpha, beta=beta, divergence=divergence, backend=backend)
    check(ik.icon_loss(x, **kw), sum(per) / N)
    check(ik.icon_loss(x, reduction="none", **kw), per)


def test_debias_labels_row_without_positives_left_out(backend):
    """With alpha > 0 a row with K_i = 0 still has no p: it is left out (DESIGN §1)."""
    labels = [0, 0, 1, 1, 2, 1]  # row 4 alone in class 2
    N = len(labels)
    x = randn(N, 3, seed=17)
    S = logit_matrix(rows(x), rows(x), "dot", tau=0.5)
    per = icon_row_losses(S, label_matrix(labels, labels), True, alpha=0.25, beta=0.1)
    assert per[4] is None
    kw = dict(target=ik.Labels(torch.tensor(labels)), kernel="dot", temperature=0.5,
              alpha=0.25, beta=0.1, backend=backend)
    check(ik.icon_loss(x, **kw), reduce_rows(per))
    check(ik.icon_loss(x, reduction="none", **kw), reduce_rows(per, "none"))


@pytest.mark.parametrize("alpha,beta", [(0.15, 0.0), (0.0, 0.25), (0.15, 0.25)])
def test_debias_affinity(backend, alpha, beta):
    N = 6
    x = randn(N, 2, seed=18)
    z = randn(N, 4, seed=19)
    X, Z = rows(x), rows(z)
    T = logit_matrix(Z, Z, "gaussian", sigma=1.2)
    S = logit_matrix(X, X, "student_t", dof=1.0)
    per = icon_row_losses(S, softmax_rows(T, True), True, alpha=alpha, beta=beta)
    kw = dict(target=ik.Affinity(z, kernel="gaussian", sigma=1.2), kernel="student_t", dof=1.0,
              alpha=alpha, beta=beta, backend=backend)
    check(ik.icon_loss(x, **kw), sum(per) / N)
    check(ik.icon_loss(x, reduction="none", **kw), per)


# ----------------------------------------------------------------------------------------------
# Rectangular y (CLIP / CMC-like)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["kl", "cross_entropy"])
@pytest.mark.parametrize("kernel", ["dot", "cosine"])
def test_rectangular_clip(backend, kernel, divergence):
    N, M, d = 5, 7, 4
    x = randn(N, d, seed=20)
    y = randn(M, d, seed=21)
    rl = [0, 1, 2, 3, 4]
    cl = [0, 1, 1, 2, 5, 3, 0]  # row 4 (label 4) has no match: left out
    X, Y = rows(x), rows(y)
    tau = 0.3
    per = []
    for i in range(N):
        pos = [j for j in range(M) if cl[j] == rl[i]]
        if not pos:
            per.append(None)
            continue
        logZ = math.log(sum(math.exp(logit(X[i], Y[j], kernel, tau)) for j in range(M)))
        L = 0.0
        for j in pos:
            p = 1.0 / len(pos)
            logq = logit(X[i], Y[j], kernel, tau) - logZ
            L += p * (math.log(p) - logq) if divergence == "kl" else -p * logq
        per.append(L)
    assert per[4] is None

    target = ik.Labels(torch.tensor(rl), torch.tensor(cl))
    kw = dict(target=target, kernel=kernel, temperature=tau, divergence=divergence,
              backend=backend)
    check(ik.icon_loss(x, y, **kw), reduce_rows(per))
    check(ik.icon_loss(x, y, exclude_self=False, **kw), reduce_rows(per))
    check(ik.icon_loss(x, y, reduction="none", **kw), reduce_rows(per, "none"))
    check(ik.icon_loss(x, y, reduction="sum", **kw), reduce_rows(per, "sum"))


def test_square_y_given_keeps_self_pairs(backend):
    """y given (even equal to x): exclude_self defaults to False, so j = i is a valid column."""
    N = 6
    x = randn(N, 3, seed=22)
    labels = [0, 0, 1, 1, 2, 2]
    X = rows(x)
    S = logit_matrix(X, X, "cosine", tau=0.4)
    per = icon_row_losses(S, label_matrix(labels, labels), False)
    lab = torch.tensor(labels)
    kw = dict(kernel="cosine", temperature=0.4, backend=backend)
    check(ik.icon_loss(x, x.clone(), target=ik.Labels(lab, lab), **kw), reduce_rows(per))
    check(ik.icon_loss(x, target=ik.Labels(lab), exclude_self=False, **kw), reduce_rows(per))
    # and y = x given with exclude_self=True equals y = None
    per_ex = icon_row_losses(S, label_matrix(labels, labels), True)
    check(ik.icon_loss(x, x.clone(), target=ik.Labels(lab, lab), exclude_self=True, **kw),
          reduce_rows(per_ex))


def test_rectangular_affinity_z_cols(backend):
    N, M = 5, 7
    x, y = randn(N, 3, seed=23), randn(M, 3, seed=24)
    z, zc = randn(N, 2, seed=25), randn(M, 2, seed=26)
    T = logit_matrix(rows(z), rows(zc), "gaussian", sigma=1.1)
    S = logit_matrix(rows(x), rows(y), "gaussian", sigma=0.9)
    per = icon_row_losses(S, softmax_rows(T, False), False)
    target = ik.Affinity(z, zc, kernel="gaussian", sigma=1.1)
    check(ik.icon_loss(x, y, target=target, kernel="gaussian", sigma=0.9, reduction="none",
                       backend=backend), per)


# ----------------------------------------------------------------------------------------------
# Reductions and weights
# ----------------------------------------------------------------------------------------------
def test_sum_and_weighted_mean(backend):
    labels = torch.tensor(SUPCON_LABELS)
    N = len(SUPCON_LABELS)
    x = randn(N, 5, seed=27)
    X = rows(x)
    S = logit_matrix(X, X, "dot", tau=0.5)
    per = icon_row_losses(S, label_matrix(SUPCON_LABELS, SUPCON_LABELS), True)
    w = [0.5, 1.0, 2.0, 0.25, 1.5, 100.0, 0.75, 1.25, 3.0, 0.1]  # row 5 (left out) has a huge w
    num = sum(wi * L for wi, L in zip(w, per) if L is not None)
    den = sum(wi for wi, L in zip(w, per) if L is not None)
    kw = dict(target=ik.Labels(labels), kernel="dot", temperature=0.5, backend=backend)
    check(ik.icon_loss(x, weight=torch.tensor(w, dtype=torch.float64), **kw), num / den)
    check(ik.icon_loss(x, reduction="sum", **kw), sum(L for L in per if L is not None))
    check(ik.icon_loss(x, **kw), sum(L for L in per if L is not None) / (N - 1))
    check(ik.icon_loss(x, weight=torch.ones(N, dtype=torch.float64), **kw),
          sum(L for L in per if L is not None) / (N - 1))


# ----------------------------------------------------------------------------------------------
# Neighbors and Dense targets
# ----------------------------------------------------------------------------------------------
NB_INDICES = [
    [1, 1, 2, -1],    # repeated j = 1 adds up; padding
    [1, 0, 3, 3],     # self index 1 dropped, the rest renormalised
    [-1, -1, -1, -1],  # empty: left out
    [3, -1, 3, -1],   # only self: left out
    [5, 0, 1, 2],
    [4, 4, 4, -1],
]
NB_WEIGHTS = [
    [0.5, 0.25, 1.0, 7.0],  # the weight at a padding slot is ignored
    [9.0, 1.0, 2.0, 0.5],
    [1.0, 1.0, 1.0, 1.0],
    [1.0, 2.0, 3.0, 4.0],
    [0.1, 0.2, 0.3, 0.4],
    [1.0, 2.0, 3.0, 5.0],
]


def neighbor_matrix(indices, weights, n_rows, n_cols, exclude_self):
    P = [[0.0] * n_cols for _ in range(n_rows)]
    for i in range(n_rows):
        for k, j in enumerate(indices[i]):
            if j == -1 or (exclude_self and j == i):
                continue
            P[i][j] += 1.0 if weights is None else weights[i][k]
    return P  # renormalised over V_i by icon_row_losses


@pytest.mark.parametrize("alpha", [0.0, 0.2])
@pytest.mark.parametrize("use_weights", [True, False])
def test_neighbors(backend, use_weights, alpha):
    N = len(NB_INDICES)
    x = randn(N, 3, seed=28)
    X = rows(x)
    W = NB_WEIGHTS if use_weights else None
    S = logit_matrix(X, X, "cosine", tau=0.5)
    per = icon_row_losses(S, neighbor_matrix(NB_INDICES, W, N, N, True), True, alpha=alpha)
    assert per[2] is None and per[3] is None
    # hand check of one row: row 0 has p(1) = 0.75/1.75, p(2) = 1/1.75
    if use_weights and alpha == 0.0:
        L0 = lse([S[0][j] for j in range(1, N)])
        p1, p2 = 0.75 / 1.75, 1.0 / 1.75
        assert per[0] == pytest.approx(p1 * (math.log(p1) - S[0][1] + L0)
                                       + p2 * (math.log(p2) - S[0][2] + L0), rel=1e-13)
    target = ik.Neighbors(torch.tensor(NB_INDICES),
                          None if W is None else torch.tensor(W, dtype=torch.float64))
    kw = dict(target=target, kernel="cosine", temperature=0.5, alpha=alpha, backend=backend)
    check(ik.icon_loss(x, **kw), reduce_rows(per))
    check(ik.icon_loss(x, reduction="none", **kw), reduce_rows(per, "none"))


def test_neighbors_rectangular(backend):
    N, M = 4, 6
    x, y = randn(N, 3, seed=29), randn(M, 3, seed=30)
    idx = [[0, 5, 5], [-1, 2, -1], [1, 1, 1], [3, 0, -1]]
    S = logit_matrix(rows(x), rows(y), "dot", tau=0.7)
    per = icon_row_losses(S, neighbor_matrix(idx, None, N, M, False), False)
    check(ik.icon_loss(x, y, target=ik.Neighbors(torch.tensor(idx)), kernel="dot",
                       temperature=0.7, reduction="none", backend=backend), per)


def test_dense(backend):
    N = 6
    x = randn(N, 4, seed=31)
    g = torch.Generator().manual_seed(32)
    p = torch.rand(N, N, generator=g, dtype=torch.float64)
    p[1, 3] = 0.0
    p[3] = 0.0
    p[3, 3] = 5.0  # only the (excluded) self entry: row 3 is left out
    S = logit_matrix(rows(x), rows(x), "gaussian", sigma=1.5)
    per = icon_row_losses(S, rows(p), True)
    assert per[3] is None
    kw = dict(target=ik.Dense(p), kernel="gaussian", sigma=1.5, backend=backend)
    check(ik.icon_loss(x, **kw), reduce_rows(per))
    check(ik.icon_loss(x, reduction="none", **kw), reduce_rows(per, "none"))
    # exclude_self=False: the diagonal counts
    per_in = icon_row_losses(S, rows(p), False)
    check(ik.icon_loss(x, exclude_self=False, **kw), reduce_rows(per_in))


# ----------------------------------------------------------------------------------------------
# log_dot (cluster kernel)
# ----------------------------------------------------------------------------------------------
def test_log_dot_cluster_kernel(backend):
    N, C = 7, 3
    phi = torch.softmax(randn(N, C, seed=33), dim=1)  # positive soft assignments
    n = phi.sum(0)
    b = phi / n
    labels = [0, 0, 1, 1, 1, 2, 2]
    Phi, B = rows(phi), rows(b)
    # q(j|i) ∝ sum_c phi_ic phi_jc / n_c, over j != i
    per = []
    for i in range(N):
        V = [j for j in range(N) if j != i]
        w = {j: sum(Phi[i][c] * Phi[j][c] / n[c].item() for c in range(C)) for j in V}
        Z = sum(w.values())
        pos = [j for j in V if labels[j] == labels[i]]
        per.append(sum((1 / len(pos)) * (math.log(1 / len(pos)) - math.log(w[j] / Z))
                       for j in pos))
    lab = torch.tensor(labels)
    kw = dict(target=ik.Labels(lab, lab), kernel="log_dot", exclude_self=True, backend=backend)
    check(ik.icon_loss(phi, b, reduction="none", **kw), per)
    check(ik.icon_loss(phi, b, **kw), sum(per) / N)


def test_log_dot_self(backend):
    N, C = 6, 4
    phi = torch.softmax(randn(N, C, seed=34), dim=1)
    idx = [[1, 2], [0, -1], [3, 3], [2, 1], [5, -1], [4, 0]]
    S = logit_matrix(rows(phi), rows(phi), "log_dot")
    per = icon_row_losses(S, neighbor_matrix(idx, None, N, N, True), True, alpha=0.1)
    out = ik.icon_loss(phi, target=ik.Neighbors(torch.tensor(idx)), kernel="log_dot", alpha=0.1,
                       reduction="none", backend=backend)
    check(out, per)
