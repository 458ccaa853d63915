"""ik.KMeans and ik.SpectralClustering against dense formulas written here without icon_kernels:
the cluster kernel q(j|i) = sum_c phi_ic phi_jc / n_c, a Gaussian affinity or a kNN graph on the
inputs (the kNN found here by sorting all distances), and each divergence's per-pair term. Loss
and gradients in float64 to 1e-9 relative, on every usable backend that computes the divergence
(not triton: it computes float64 in fp32), for the presets' own reverse_kl and for other
divergences. Also the k-means identity N * loss = inertia / sigma^2 - sum_i H(q_i) + sum_i log Z_i,
and the bad-input errors."""
import math

import pytest
import torch

import icon_kernels as ik
from icon_kernels.families import DIVERGENCES

TOL = 1e-9


def backends_for(divergence):
    usable = [b for b in ik.available_backends() if b != "triton" and b in DIVERGENCES[divergence].backends]
    return ["auto"] + usable


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(preset_call, dense_call, leaves, upstream=1.3):
    got = preset_call()
    got_grads = torch.autograd.grad(got * upstream, leaves)
    want = dense_call()
    want_grads = torch.autograd.grad(want * upstream, leaves)
    assert rel(got.detach(), want.detach()) <= TOL, f"loss {got.item()} vs {want.item()}"
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert rel(g, w) <= TOL, f"gradient of input {i}: relative error {rel(g, w):.3g}"


# ---- dense formulas ----

def cluster_q(logits, exclude_self):
    """(log q, q) of the cluster kernel; the self pair dropped and q renormalised if asked."""
    phi = logits.softmax(1)
    q = phi @ (phi / phi.sum(0)).T
    if exclude_self:
        q = q * (1 - torch.eye(q.shape[0], dtype=q.dtype))
        q = q / q.sum(1, keepdim=True)
    return q


def valid_mask(n, exclude_self):
    return ~torch.eye(n, dtype=torch.bool) if exclude_self else torch.ones(n, n, dtype=torch.bool)


def gaussian_p(x, sigma, exclude_self):
    d2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
    logits = (-d2 / (2 * sigma ** 2)).masked_fill(~valid_mask(x.shape[0], exclude_self), -math.inf)
    return logits.softmax(1)


def knn_graph_p(x, k):
    """Uniform over the k nearest other points: every distance sorted, self excluded."""
    n = x.shape[0]
    d2 = (x[:, None, :] - x[None, :, :]).square().sum(-1)
    d2 = d2.masked_fill(torch.eye(n, dtype=torch.bool), math.inf)
    idx = d2.argsort(1)[:, :k]
    p = torch.zeros(n, n, dtype=x.dtype)
    p[torch.arange(n)[:, None], idx] = 1.0 / k
    return p, idx


def mix(p, a, exclude_self):
    valid = valid_mask(p.shape[0], exclude_self)
    m = valid.sum(1, keepdim=True).to(p.dtype)
    return torch.where(valid, (1 - a) * p + a / m, torch.zeros_like(p))


def row_divergence(p, q, divergence, exclude_self):
    """Per-row D(p || q) over the valid j, each term from its textbook form."""
    valid = valid_mask(p.shape[0], exclude_self)
    zero = torch.zeros_like(p)
    p, q = p.where(valid, 1.0), q.where(valid, 1.0)   # keeps sqrt / log of the masked pairs finite

    def xlogy(a, b):                              # a log(a / b), 0 where a = 0
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), zero)

    if divergence == "reverse_kl":
        term = xlogy(q, p)
    elif divergence == "kl":
        term = xlogy(p, q)
    elif divergence == "tv":
        term = 0.5 * (p - q).abs()
    elif divergence == "js":
        m = 0.5 * (p + q)
        term = 0.5 * (xlogy(p, m) + xlogy(q, m))
    elif divergence == "hellinger":
        term = (p.sqrt() - q.sqrt()).square()
    else:
        raise AssertionError(divergence)
    return torch.where(valid, term, zero).sum(1)


def make(n=13, d=4, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64).requires_grad_(True)
    inputs = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return logits, inputs


# ---- KMeans ----

@pytest.mark.parametrize("divergence", ["reverse_kl", "kl", "tv", "js"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_kmeans_equals_dense_formula(divergence, exclude_self):
    logits, inputs = make()
    sigma, alpha = 1.4, 0.0
    for backend in backends_for(divergence):
        crit = ik.KMeans(3, sigma=sigma, backend=backend, exclude_self=exclude_self,
                         **({} if divergence == "reverse_kl" else {"divergence": divergence}))
        assert crit.divergence == divergence

        def dense():
            p = mix(gaussian_p(inputs, sigma, exclude_self), alpha, exclude_self)
            return row_divergence(p, cluster_q(logits, exclude_self), divergence, exclude_self).mean()
        check(lambda: crit(logits, inputs), dense, [logits])


def test_kmeans_with_debiasing_and_reduction_sum():
    logits, inputs = make(seed=3)
    alpha, beta, sigma = 0.2, 0.1, 0.8
    crit = ik.KMeans(3, sigma=sigma, alpha=alpha, beta=beta, reduction="sum")

    def dense():
        p = mix(gaussian_p(inputs, sigma, False), alpha, False)
        q = mix(cluster_q(logits, False), beta, False)
        return row_divergence(p, q, "reverse_kl", False).sum()
    check(lambda: crit(logits, inputs), dense, [logits])


def test_kmeans_is_the_soft_kmeans_objective():
    """N * loss = sum_ic phi_ic ||x_i - mu_c||^2 / sigma^2 - sum_i H(q(.|i)) + sum_i log Z_i,
    mu_c the phi-weighted mean of cluster c: the loss is soft k-means plus an entropy term."""
    logits, inputs = make(n=17, d=5, c=4, seed=1)
    sigma = 0.9
    n = inputs.shape[0]

    def identity():
        phi = logits.softmax(1)
        mu = (phi.T @ inputs) / phi.sum(0)[:, None]
        inertia = (phi * (inputs[:, None, :] - mu[None]).square().sum(-1)).sum()
        q = cluster_q(logits, False)
        entropy = -(q * q.log()).sum()
        d2 = (inputs[:, None, :] - inputs[None, :, :]).square().sum(-1)
        log_z = torch.logsumexp(-d2 / (2 * sigma ** 2), 1).sum()
        return (inertia / sigma ** 2 - entropy + log_z) / n
    check(lambda: ik.KMeans(4, sigma=sigma)(logits, inputs), identity, [logits])


def test_kmeans_does_not_differentiate_the_inputs():
    logits, inputs = make()
    inputs.requires_grad_(True)
    ik.KMeans(3)(logits, inputs).backward()
    assert inputs.grad is None and logits.grad is not None


# ---- SpectralClustering ----

@pytest.mark.parametrize("divergence", ["reverse_kl", "kl", "tv", "hellinger"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_spectral_equals_dense_formula(divergence, exclude_self):
    logits, inputs = make(n=15, seed=2)
    k, alpha = 4, 0.15
    for backend in backends_for(divergence):
        crit = ik.SpectralClustering(3, k, alpha=alpha, backend=backend, exclude_self=exclude_self,
                                     **({} if divergence == "reverse_kl" else {"divergence": divergence}))

        def dense():
            p, _ = knn_graph_p(inputs, k)
            p = mix(p, alpha, exclude_self)
            return row_divergence(p, cluster_q(logits, exclude_self), divergence, exclude_self).mean()
        check(lambda: crit(logits, inputs), dense, [logits])


def test_spectral_given_neighbors_and_default_alpha():
    logits, inputs = make(n=15, seed=4)
    k = 3
    crit = ik.SpectralClustering(3, k)
    assert crit.alpha == 0.1 and crit.divergence == "reverse_kl"
    p, idx = knn_graph_p(inputs, k)

    def dense():
        return row_divergence(mix(p, 0.1, False), cluster_q(logits, False), "reverse_kl", False).mean()
    check(lambda: crit(logits, neighbors=idx), dense, [logits])
    check(lambda: crit(logits, neighbors=ik.Neighbors(idx)), dense, [logits])
    check(lambda: crit(logits, inputs), dense, [logits])


def test_spectral_kl_with_alpha_zero_is_allowed():
    logits, inputs = make(n=15, seed=5)
    crit = ik.SpectralClustering(3, 4, alpha=0.0, divergence="kl")
    p, _ = knn_graph_p(inputs, 4)
    check(lambda: crit(logits, inputs),
          lambda: row_divergence(p, cluster_q(logits, False), "kl", False).mean(), [logits])


# ---- bad input ----

@pytest.mark.parametrize("build, call, message", [
    (lambda: ik.SpectralClustering(3, 4, alpha=0.0), None, "alpha > 0"),
    (lambda: ik.SpectralClustering(3, 0), None, "k must be"),
    (lambda: ik.SpectralClustering(3, 4, metric="manhattan"), None, "metric"),
    (lambda: ik.KMeans(1), None, "n_clusters"),
    (lambda: ik.KMeans(3, sigma=0.0), None, "sigma"),
    (lambda: ik.KMeans(3, divergence="nope"), None, "divergence"),
    (lambda: ik.KMeans(3), lambda c: c(torch.randn(5, 2), torch.randn(5, 2)), "n_clusters"),
    (lambda: ik.KMeans(3), lambda c: c(torch.randn(5, 3), torch.randn(4, 2)), "inputs"),
    (lambda: ik.SpectralClustering(3, 2), lambda c: c(torch.randn(5, 3)), "inputs"),
    (lambda: ik.SpectralClustering(3, 2), lambda c: c(torch.randn(5, 3), torch.randn(5, 2),
                                                      neighbors=torch.zeros(5, 2, dtype=torch.long)), "not both"),
    (lambda: ik.SpectralClustering(3, 2), lambda c: c(torch.randn(5, 3), neighbors=torch.zeros(4, 2, dtype=torch.long)),
     "5 rows"),
    (lambda: ik.SpectralClustering(3, 9), lambda c: c(torch.randn(5, 3), torch.randn(5, 2)), "k must"),
])
def test_bad_input(build, call, message):
    if call is None:
        with pytest.raises((ValueError, TypeError), match=message):
            build()
        return
    crit = build()
    with pytest.raises((ValueError, TypeError), match=message):
        call(crit)


def test_repr_names_the_settings():
    text = repr(ik.SpectralClustering(4, 7, alpha=0.3))
    assert "k=7" in text and "n_clusters=4" in text and "reverse_kl" in text and "alpha=0.3" in text
    text = repr(ik.KMeans(4, sigma=2.0, divergence="tv"))
    assert "sigma=2.0" in text and "'tv'" in text
