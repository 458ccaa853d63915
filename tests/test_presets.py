"""The presets against independent dense implementations of their literature formulas, written
here without icon_kernels: NT-Xent (InfoNCE / SimCLR), SupCon's L_out, CLIP's symmetric
cross-entropy, t-SimCLR, softmax cross-entropy on prototypes, SNE / t-SNE's conditional KL,
uniform-kNN t-SNE, InfoNCE clustering and the harmonic loss. Loss and gradients, float64, every
usable backend (the Triton interpreter included when it is on), relative error <= 1e-6."""
import math

import pytest
import torch
import torch.nn.functional as F

import icon_kernels as ik

BACKENDS = ik.available_backends()
TOL = 1e-6


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(got, want, what, tol=TOL):
    assert rel(got, want) <= tol, f"{what}: relative error {rel(got, want):.3g}"


def leaf(*shape, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)


def check(preset_call, dense_call, leaves, upstream=1.7, tol=TOL):
    """Loss and gradients (with an upstream gradient != 1) of the preset against the dense formula."""
    got = preset_call()
    got_grads = torch.autograd.grad(got * upstream, leaves)
    want = dense_call()
    want_grads = torch.autograd.grad(want * upstream, leaves)
    assert_close(got.detach(), want.detach(), "loss", tol)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, f"gradient of input {i}", tol)


def sq_dists(a, b):
    return (a[:, None, :] - b[None, :, :]).square().sum(-1)


def masked_log_softmax(logits):
    eye = torch.eye(logits.shape[0], dtype=torch.bool)
    return logits.masked_fill(eye, -math.inf).log_softmax(1)


# ---- dense formulas of the literature ----

def nt_xent(v1, v2, tau):
    """SimCLR's NT-Xent: for each of the 2B views, -log softmax over the other 2B-1 at its partner."""
    z = F.normalize(torch.cat([v1, v2]), dim=1)
    n2, b = z.shape[0], v1.shape[0]
    log_q = masked_log_softmax(z @ z.T / tau)
    partner = (torch.arange(n2) + b) % n2
    return -log_q[torch.arange(n2), partner].mean()


def supcon_l_out(z, labels, tau):
    """Khosla et al. L_out: mean over anchors with positives of -(1/|P|) sum_p log softmax_{a != i}."""
    z = F.normalize(z, dim=1)
    log_q = masked_log_softmax(z @ z.T / tau)
    pos = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    n_pos = pos.sum(1)
    per_anchor = -torch.where(pos, log_q, 0.0).sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


def clip_symmetric(img, txt, logit_scale):
    logits = logit_scale.exp() * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def student_t_logits(z, dof):
    return -(dof + 1) / 2 * torch.log1p(sq_dists(z, z) / dof)


def t_simclr(v1, v2, dof):
    z = torch.cat([v1, v2])
    n2, b = z.shape[0], v1.shape[0]
    log_q = masked_log_softmax(student_t_logits(z, dof))
    return -log_q[torch.arange(n2), (torch.arange(n2) + b) % n2].mean()


def conditional_kl(p, log_q):
    """mean_i sum_{j != i} p_ij log(p_ij / q_ij); p has a zero diagonal."""
    eye = torch.eye(p.shape[0], dtype=torch.bool)
    terms = torch.where(p > 0, p * (torch.log(torch.where(p > 0, p, 1.0)) - torch.where(eye, 0.0, log_q)), 0.0)
    return terms.sum(1).mean()


def sne_p(x, sigma):
    return masked_log_softmax(-sq_dists(x, x) / (2 * sigma[:, None] ** 2)).exp()


# ---- the tests ----

@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_and_simclr_equal_nt_xent(backend):
    gen = torch.Generator().manual_seed(1)
    v1, v2 = leaf(7, 5, gen=gen), leaf(7, 5, gen=gen)
    for cls in (ik.InfoNCE, ik.SimCLR):
        check(lambda: cls(0.3, backend=backend)(v1, v2), lambda: nt_xent(v1, v2, 0.3), [v1, v2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_debiased_infonce_equals_dense_mixture_cross_entropy(backend):
    """alpha / beta: -sum_j p~ log q~ with p~ = (1-a) p + a/M', q~ = (1-b) q + b/M'."""
    gen = torch.Generator().manual_seed(2)
    v1, v2 = leaf(6, 4, gen=gen), leaf(6, 4, gen=gen)
    alpha, beta, tau = 0.2, 0.1, 0.4

    def dense():
        z = F.normalize(torch.cat([v1, v2]), dim=1)
        n2 = z.shape[0]
        eye = torch.eye(n2, dtype=torch.bool)
        q = masked_log_softmax(z @ z.T / tau).exp()
        p = torch.zeros(n2, n2, dtype=torch.float64)
        p[torch.arange(n2), (torch.arange(n2) + n2 // 2) % n2] = 1.0
        m = n2 - 1
        p_mix = torch.where(eye, 0.0, (1 - alpha) * p + alpha / m)
        log_q_mix = torch.log(torch.where(eye, 1.0, (1 - beta) * q + beta / m))
        return -(p_mix * log_q_mix).sum(1).mean()

    check(lambda: ik.InfoNCE(tau, alpha=alpha, beta=beta, backend=backend)(v1, v2), dense, [v1, v2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_equals_l_out(backend):
    gen = torch.Generator().manual_seed(3)
    z = leaf(11, 5, gen=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 2, 4])      # classes 3 and 4 have no positive
    check(lambda: ik.SupCon(0.2, backend=backend)(z, labels), lambda: supcon_l_out(z, labels, 0.2), [z])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_equals_symmetric_cross_entropy_with_learnable_scale(backend):
    gen = torch.Generator().manual_seed(4)
    img, txt = leaf(6, 5, gen=gen), leaf(6, 5, gen=gen)
    crit = ik.CLIPLoss(logit_scale=math.log(3.0), backend=backend).double()
    scale = crit.logit_scale
    assert isinstance(scale, torch.nn.Parameter)
    check(lambda: crit(img, txt), lambda: clip_symmetric(img, txt, scale), [img, txt, scale])


def test_clip_scale_is_clamped_and_fixed_scale_is_a_buffer():
    gen = torch.Generator().manual_seed(5)
    img, txt = leaf(5, 3, gen=gen), leaf(5, 3, gen=gen)
    crit = ik.CLIPLoss(logit_scale=math.log(500.0), learnable=False, backend="reference").double()
    assert "logit_scale" in dict(crit.named_buffers()) and not list(crit.parameters())
    want = clip_symmetric(img, txt, torch.tensor(math.log(100.0), dtype=torch.float64))
    assert_close(crit(img, txt).detach(), want.detach(), "loss at the clamp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tsimclr_equals_student_t_nt_xent(backend):
    gen = torch.Generator().manual_seed(6)
    v1, v2 = leaf(6, 3, gen=gen), leaf(6, 3, gen=gen)
    check(lambda: ik.TSimCLR(dof=2.5, backend=backend)(v1, v2), lambda: t_simclr(v1, v2, 2.5), [v1, v2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_cross_entropy_equals_softmax_cross_entropy(backend):
    gen = torch.Generator().manual_seed(7)
    z = leaf(9, 4, gen=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1, 0])
    crit = ik.PrototypeCrossEntropy(3, 4, backend=backend).double()
    w = crit.prototypes
    check(lambda: crit(z, labels), lambda: F.cross_entropy(z @ w.T, labels), [z, w])
    # gaussian prototypes: logits -||z - w_c||^2 / (2 sigma^2)
    crit_g = ik.PrototypeCrossEntropy(3, 4, kernel="gaussian", sigma=0.8, backend=backend).double()
    wg = crit_g.prototypes
    check(lambda: crit_g(z, labels), lambda: F.cross_entropy(-sq_dists(z, wg) / (2 * 0.8**2), labels), [z, wg])


def harmonic_loss(z, w, labels, n):
    """Baek et al. (arXiv 2502.01628): distances d_c = ||z - w_c||, HarMax q_c = d_c^(-n) /
    sum_c' d_c'^(-n), the loss mean_i -log q_{label_i}."""
    log_q = (-n * sq_dists(z, w).sqrt().log()).log_softmax(1)
    return -log_q[torch.arange(z.shape[0]), labels].mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_harmonic_loss_equals_harmax_cross_entropy(backend):
    gen = torch.Generator().manual_seed(8)
    z = leaf(9, 4, gen=gen)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1, 0])
    crit = ik.HarmonicLoss(3, 4, exponent=2.5, backend=backend).double()
    w = crit.prototypes
    assert (crit.kernel, crit.divergence) == ("power", "cross_entropy")
    # Triton computes float64 inputs in fp32: its dx here came out 1.08e-6 on the 2026-12-02 VM,
    # 9 fp32 ulps (log(d^2 + eps) times the exponent), against 1e-6
    tol = 1e-5 if backend == "triton" else TOL
    check(lambda: crit(z, labels), lambda: harmonic_loss(z, w, labels, 2.5), [z, w], tol=tol)
    # a learnable exponent, and a given prototype matrix
    n = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    w2 = leaf(3, 4, gen=gen)
    crit_n = ik.HarmonicLoss(3, 4, exponent=n, backend=backend)
    check(lambda: crit_n(z, labels, prototypes=w2), lambda: harmonic_loss(z, w2, labels, n), [z, w2, n], tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sne_and_tsne_equal_conditional_kl(backend):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(14, 6, generator=gen, dtype=torch.float64)
    emb = leaf(14, 2, gen=gen)
    sigma = ik.calibrate_sigma(x, 5.0)
    p = sne_p(x, sigma)
    check(lambda: ik.SNE(5.0, backend=backend)(emb, x),
          lambda: conditional_kl(p, masked_log_softmax(-sq_dists(emb, emb))), [emb])
    check(lambda: ik.TSNE(5.0, backend=backend)(emb, x),
          lambda: conditional_kl(p, masked_log_softmax(student_t_logits(emb, 1.0))), [emb])
    check(lambda: ik.TSNE(5.0, dof=3.0, backend=backend)(emb, x),
          lambda: conditional_kl(p, masked_log_softmax(student_t_logits(emb, 3.0))), [emb])


def test_tsne_caches_sigma_per_inputs_tensor(monkeypatch):
    from icon_kernels.presets import embedding as embedding_presets
    calls = []
    real = embedding_presets.sigma_for_rows
    monkeypatch.setattr(embedding_presets, "sigma_for_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    emb = torch.randn(10, 2, generator=gen, dtype=torch.float64)
    crit = ik.TSNE(3.0, backend="reference")
    first = crit(emb, x)
    assert crit(emb, x) == first and len(calls) == 1          # same tensor: reused
    x.mul_(2.0)                                                # modified in place: recomputed
    crit(emb, x)
    assert len(calls) == 2
    crit(emb, x.clone())                                       # another tensor: recomputed
    assert len(calls) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2])
def test_uniform_knn_equals_dense_knn_target_kl(backend, steps):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(13, 4, generator=gen, dtype=torch.float64)
    emb = leaf(13, 2, gen=gen)

    def dense():
        d = sq_dists(x, x).fill_diagonal_(math.inf)
        a = torch.zeros(13, 13, dtype=torch.float64)
        a.scatter_(1, d.topk(3, largest=False).indices, 1.0)
        a = a / a.sum(1, keepdim=True)
        p = torch.linalg.matrix_power(a, steps).fill_diagonal_(0)
        p = p / p.sum(1, keepdim=True)
        return conditional_kl(p, masked_log_softmax(student_t_logits(emb, 1.0)))

    check(lambda: ik.UniformKNN(3, steps=steps, backend=backend)(emb, x), dense, [emb])


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_clustering_equals_dense_cluster_kernel_kl(backend):
    gen = torch.Generator().manual_seed(11)
    n, c = 12, 4
    logits = leaf(n, c, gen=gen, scale=2.0)
    ids = torch.arange(n) % 6                                   # two views of 6 samples
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    nbrs = ik.knn(x, 2)

    def dense(use_ids, use_knn, renormalised):
        """The paper's cluster kernel: q(j|i) = sum_c phi_ic phi_jc / n_c over all j, the self
        pair included (rows sum to 1 as they are); or without the self pair, renormalised."""
        phi = logits.softmax(1)
        q = (phi / phi.sum(0)) @ phi.T
        eye = torch.eye(n, dtype=torch.bool)
        if renormalised:
            q = torch.where(eye, 0.0, q)
            log_q = torch.log(torch.where(eye, 1.0, q / q.sum(1, keepdim=True)))
        else:
            assert torch.allclose(q.sum(1), torch.ones(n, dtype=torch.float64))
            log_q = torch.log(q)
        p = torch.zeros(n, n, dtype=torch.float64)
        if use_ids:
            p += (ids[:, None] == ids[None, :]).double()
        if use_knn:
            p.scatter_add_(1, nbrs, torch.ones(n, 2, dtype=torch.float64))
        p = torch.where(eye, 0.0, p)          # p is over the other points in both forms
        p = p / p.sum(1, keepdim=True)
        return conditional_kl(p, log_q)

    for renormalised in (False, True):
        crit = ik.InfoNCEClustering(c, backend=backend, **({"exclude_self": True} if renormalised else {}))
        check(lambda: crit(logits, sample_ids=ids), lambda: dense(True, False, renormalised), [logits])
        check(lambda: crit(logits, neighbors=nbrs), lambda: dense(False, True, renormalised), [logits])
        check(lambda: crit(logits, sample_ids=ids, neighbors=ik.Neighbors(nbrs)),
              lambda: dense(True, True, renormalised), [logits])
    # the two forms differ (by mean -log(1 - q_ii) for one positive per row)
    paper = ik.InfoNCEClustering(c, backend=backend)(logits, sample_ids=ids)
    renorm = ik.InfoNCEClustering(c, backend=backend, exclude_self=True)(logits, sample_ids=ids)
    assert abs((paper - renorm).item()) > 1e-3


def test_presets_are_modules_and_learnable_temperature_gets_a_gradient():
    tau = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    crit = ik.InfoNCE(tau, backend="torch")
    assert [p is tau for p in crit.parameters()] == [True]
    gen = torch.Generator().manual_seed(12)
    v1, v2 = leaf(5, 3, gen=gen), leaf(5, 3, gen=gen)
    (g,) = torch.autograd.grad(crit(v1, v2), [tau])
    (want,) = torch.autograd.grad(nt_xent(v1, v2, tau), [tau])
    assert_close(g, want, "d loss / d temperature")


@pytest.mark.parametrize("make, call, match", [
    (lambda: ik.InfoNCE(0.0), None, "temperature"),
    (lambda: ik.InfoNCE(0.1, alpha=1.0), None, "alpha"),
    (lambda: ik.SupCon(0.1, beta=-0.1), None, "beta"),
    (lambda: ik.SupCon(0.1, reduction="avg"), None, "reduction"),
    (lambda: ik.SupCon(0.1, backend="nope"), None, "backend"),
    (lambda: ik.SupCon(0.1, dist_mode="tree"), None, "dist_mode"),
    (lambda: ik.TSNE(1.0), None, "perplexity"),
    (lambda: ik.TSNE(5.0, dof=0.0), None, "dof"),
    (lambda: ik.UniformKNN(0), None, "k"),
    (lambda: ik.UniformKNN(3, steps=4), None, "steps"),
    (lambda: ik.UniformKNN(3, metric="manhattan"), None, "metric"),
    (lambda: ik.InfoNCEClustering(1), None, "n_clusters"),
    (lambda: ik.PrototypeCrossEntropy(3, 0), None, "dim"),
    (lambda: ik.HarmonicLoss(3, 2, exponent=0.0), None, "exponent"),
    (lambda: ik.HarmonicLoss(3, 2, exponent=float("inf")), None, "exponent"),
    (lambda: ik.HarmonicLoss(3, 2, kernel="dot"), None, "kernel"),
    (lambda: ik.HarmonicLoss(3, 2), lambda c: c(torch.randn(4, 2), torch.tensor([0, 1, 2, 3])), "labels"),
    (lambda: ik.InfoNCE(0.1), lambda c: c(torch.randn(4, 3), torch.randn(5, 3)), "view2"),
    (lambda: ik.SupCon(0.1), lambda c: c(torch.randn(4, 3), torch.zeros(3, dtype=torch.long)), "labels"),
    (lambda: ik.TSNE(2.0), lambda c: c(torch.randn(4, 2), torch.randn(5, 3)), "inputs"),
    (lambda: ik.TSNE(30.0), lambda c: c(torch.randn(6, 2), torch.randn(6, 3)), "perplexity"),
    (lambda: ik.CLIPLoss(), lambda c: c(torch.randn(4, 3), torch.randn(4, 2)), "text_emb"),
    (lambda: ik.PrototypeCrossEntropy(3, 2), lambda c: c(torch.randn(4, 2), torch.tensor([0, 1, 2, 3])), "labels"),
    (lambda: ik.InfoNCEClustering(3), lambda c: c(torch.randn(4, 3)), "sample_ids"),
    (lambda: ik.InfoNCEClustering(3), lambda c: c(torch.randn(4, 2), sample_ids=torch.arange(4)), "n_clusters"),
])
def test_bad_arguments_raise_naming_the_argument(make, call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        crit = make()
        if call is not None:
            call(crit)


def test_distributed_without_a_process_group_raises_naming_process_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ValueError, match="process_group"):
        ik.SupCon(0.1, distributed=True)(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
