"""The f-divergences of DESIGN.md §1.1 (reverse_kl, tv, hellinger, js, chi2) on the dense
reference, the oracle the fused backends will be checked against: the per-pair terms against
q f(p / q) written independently, both gradients against the closed forms of §1.1, gradcheck,
extreme logits. The fused backends are checked against it in test_f_divergences_backends.py."""
import math

import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends.reference import f_divergence_terms

F_DIVERGENCES = ["reverse_kl", "tv", "hellinger", "js", "chi2"]

# f(r) (the generator), g(r) = f(r) - r f'(r) and f'(r), as functions of r = p / q
GENERATOR = {
    "kl": (lambda r: r * torch.log(r), lambda r: -r, lambda r: torch.log(r) + 1),
    "reverse_kl": (lambda r: -torch.log(r), lambda r: 1 - torch.log(r), lambda r: -1 / r),
    "tv": (lambda r: 0.5 * (r - 1).abs(), lambda r: -0.5 * torch.sign(r - 1), lambda r: 0.5 * torch.sign(r - 1)),
    "hellinger": (lambda r: (r.sqrt() - 1) ** 2, lambda r: 1 - r.sqrt(), lambda r: 1 - 1 / r.sqrt()),
    "js": (lambda r: 0.5 * (r * torch.log(2 * r / (r + 1)) + torch.log(2 / (r + 1))),
           lambda r: 0.5 * torch.log(2 / (r + 1)), lambda r: 0.5 * torch.log(2 * r / (r + 1))),
    "chi2": (lambda r: (r - 1) ** 2, lambda r: 1 - r ** 2, lambda r: 2 * (r - 1)),
}
AT_P_ZERO = {"reverse_kl": lambda q: torch.where(q > 0, math.inf, 0.0).to(q.dtype), "tv": lambda q: 0.5 * q,
             "hellinger": lambda q: q, "js": lambda q: 0.5 * math.log(2) * q, "chi2": lambda q: q}


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_terms_are_q_f_of_the_ratio(name):
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(50, generator=gen, dtype=torch.float64) * 0.3
    q = torch.rand(50, generator=gen, dtype=torch.float64) * 0.3 + 1e-3
    p[:5] = 0
    got = f_divergence_terms(name, torch.log(p), torch.log(q))     # log 0 = -inf marks p = 0
    f = GENERATOR[name][0]
    torch.testing.assert_close(got[5:], q[5:] * f(p[5:] / q[5:]), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[:5], AT_P_ZERO[name](q[:5]), rtol=1e-12, atol=0)


def _identity_problem(n=7, m=6, seed=0):
    """Logits s = x and target logits t = z: the dot kernel at temperature 1 against y = I and
    an Affinity target with z_cols = I, so dL/dx and dL/dz are dL/ds and dL/dt."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, m, generator=gen, dtype=torch.float64).requires_grad_()
    z = torch.randn(n, m, generator=gen, dtype=torch.float64).requires_grad_()
    eye = torch.eye(m, dtype=torch.float64)
    target = ik.Affinity(z, eye, kernel="dot", temperature=1.0)
    return x, z, eye, target


@pytest.mark.parametrize("name", ["kl"] + F_DIVERGENCES)
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.1, 0.2)])
def test_gradients_are_the_closed_forms(name, alpha, beta):
    x, z, eye, target = _identity_problem()
    loss = ik.icon_loss(x, eye, target=target, kernel="dot", temperature=1.0, alpha=alpha, beta=beta,
                        divergence=name, reduction="sum", backend="reference")
    dx, dz = torch.autograd.grad(loss, [x, z])
    m = x.shape[1]
    q, p = x.detach().softmax(1), z.detach().softmax(1)
    q_mix, p_mix = (1 - beta) * q + beta / m, (1 - alpha) * p + alpha / m
    r = p_mix / q_mix
    _, g_of, f_prime = GENERATOR[name]
    g, fp = g_of(r), f_prime(r)
    want_dx = (1 - beta) * q * (g - (q * g).sum(1, keepdim=True))
    want_dz = (1 - alpha) * p * (fp - (p * fp).sum(1, keepdim=True))
    torch.testing.assert_close(dx, want_dx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dz, want_dz, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_gradcheck(name):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def loss(x, z, sigma):
        return ik.icon_loss(x, target=ik.Affinity(z, kernel="gaussian", sigma=sigma), kernel="student_t",
                            alpha=0.1, beta=0.05, divergence=name, backend="reference")
    assert torch.autograd.gradcheck(loss, (x, z, sigma))


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_extreme_logits_stay_finite(name):
    # tau = 0.01 on the learned side and far-apart target points: p and q reach e^-200 and below
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    z = (torch.randn(16, 4, generator=gen, dtype=torch.float64) * 30).requires_grad_()
    loss = ik.icon_loss(x, target=ik.Affinity(z, kernel="gaussian", sigma=1.0), kernel="cosine",
                        temperature=0.01, alpha=0.05, divergence=name, backend="reference")
    dx, dz = torch.autograd.grad(loss, [x, z])
    assert torch.isfinite(loss) and torch.isfinite(dx).all() and torch.isfinite(dz).all()


def test_reverse_kl_against_a_target_with_zeros_asks_for_alpha():
    x = torch.randn(6, 3, dtype=torch.float64)
    labels = ik.Labels(torch.arange(6) // 2)
    with pytest.raises(ValueError, match="alpha > 0"):
        ik.icon_loss(x, target=labels, divergence="reverse_kl")
    loss = ik.icon_loss(x, target=labels, divergence="reverse_kl", alpha=0.1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_ring_mode_accepts_them_before_anything_travels(name):
    # ring mode computes them (tests/test_distributed_f_divergences.py checks the values across
    # ranks); the local check before the ranks' first collective lets them through in both modes,
    # under joint normalisation too (tests/distributed_joint_worker.py checks those values)
    from icon_kernels.distributed import rank_agreement
    x = torch.randn(4, 3, dtype=torch.float64)
    target = ik.Labels(torch.arange(4) // 2)
    for mode in ("ring", "gather"):
        for normalization in ("conditional", "joint"):
            exclude_self, options, _ = rank_agreement._local_checks(
                x, None, target, mode, None, None, "auto", dict(divergence=name, alpha=0.1, normalization=normalization))
            assert exclude_self is True and options["divergence"] == name
            assert options["normalization"] == normalization


def _preset_calls():
    """(preset class, constructor keywords, a forward call on small float64 inputs)."""
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    views = (emb[:6], emb[6:])
    labels = torch.arange(12) % 3
    inputs = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    logits = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    return [
        (ik.InfoNCE, {}, lambda p: p(*views)), (ik.SimCLR, {}, lambda p: p(*views)),
        (ik.TSimCLR, {}, lambda p: p(*views)), (ik.SupCon, {}, lambda p: p(emb, labels)),
        (ik.CLIPLoss, {}, lambda p: p(*views)),
        (ik.PrototypeCrossEntropy, dict(n_classes=3, dim=5), lambda p: p(emb, labels)),
        (ik.HarmonicLoss, dict(n_classes=3, dim=5, exponent=2.0), lambda p: p(emb, labels)),
        (ik.SNE, dict(perplexity=4.0), lambda p: p(emb, inputs)),
        (ik.TSNE, dict(perplexity=4.0), lambda p: p(emb, inputs)),
        (ik.UniformKNN, dict(k=3), lambda p: p(emb, inputs)),
        (ik.InfoNCEClustering, dict(n_clusters=4), lambda p: p(logits.softmax(1), sample_ids=labels)),
    ]


# each preset's own divergence, as its paper reports it (the defaults did not change with divergence=)
OWN_DIVERGENCE = {"InfoNCE": "cross_entropy", "SimCLR": "cross_entropy", "TSimCLR": "cross_entropy",
                  "SupCon": "cross_entropy", "CLIPLoss": "cross_entropy", "PrototypeCrossEntropy": "cross_entropy",
                  "HarmonicLoss": "cross_entropy",
                  "SNE": "kl", "TSNE": "kl", "UniformKNN": "kl", "InfoNCEClustering": "kl"}


@pytest.mark.parametrize("index", range(11))
def test_every_preset_takes_a_divergence(index):
    cls, kwargs, call = _preset_calls()[index]
    own = cls(**kwargs, alpha=0.1).double()
    other = cls(**kwargs, divergence="hellinger", alpha=0.1).double()
    other.load_state_dict(own.state_dict())             # the same parameters: only the divergence differs
    assert other.divergence == "hellinger" and "divergence='hellinger'" in repr(other)
    assert own.divergence == OWN_DIVERGENCE[cls.__name__]
    value = call(other)
    assert torch.isfinite(value)
    assert not torch.allclose(value, call(own))          # it is passed on, not dropped
    with pytest.raises(ValueError, match="divergence"):
        cls(**kwargs, divergence="bogus")


def test_supcon_with_tv_is_icon_loss_with_tv():
    emb = torch.randn(10, 4, dtype=torch.float64)
    labels = torch.arange(10) % 3
    got = ik.SupCon(0.2, divergence="tv")(emb, labels)
    want = ik.icon_loss(emb, target=ik.Labels(labels), kernel="cosine", temperature=0.2, divergence="tv",
                        backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["tv", "hellinger", "js"])
@pytest.mark.parametrize("target_kind", ["labels", "dense"])
def test_zeros_in_the_target_at_tau_001(name, dtype, target_kind):
    # alpha = 0: p~ is exactly 0 off the positives, and q~ underflows at tau = 0.01 (the js mean
    # of a subnormal q once rounded to 0 and gave +inf). The bounded divergences stay finite;
    # chi2 is unbounded (2e54 here, beyond fp32, so +inf is its honest fp32 value)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(16, 8, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.arange(16) % 4
    target = (ik.Labels(labels) if target_kind == "labels"
              else ik.Dense((labels[:, None] == labels[None, :]).to(dtype)))
    loss = ik.icon_loss(x, target=target, kernel="cosine", temperature=0.01, divergence=name)
    dx, = torch.autograd.grad(loss, [x])
    assert torch.isfinite(loss) and torch.isfinite(dx).all()


@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_far_apart_clusters_keep_finite_gradients(name):
    # q underflows to 0 across the clusters while log q stays finite (two clusters 60 apart,
    # gaussian kernel), and p is 0 there: chi2's unpicked branch exp(-log q) once sent a NaN
    # through the gradient of a finite loss
    gen = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(6, 3, generator=gen, dtype=torch.float64),
                   torch.randn(6, 3, generator=gen, dtype=torch.float64) + 60]).requires_grad_()
    clusters = ik.Labels(torch.arange(12) // 6)
    loss = ik.icon_loss(x, target=clusters, kernel="gaussian", alpha=0.1 if name == "reverse_kl" else 0.0,
                        divergence=name)
    dx, = torch.autograd.grad(loss, [x])
    assert torch.isfinite(loss) and torch.isfinite(dx).all()


def test_reverse_kl_uses_the_targets_exact_log_probabilities():
    # an Affinity target's p underflows (log p ~ -5000) where q does not: q log(q / p) is finite
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(10, 2, generator=gen, dtype=torch.float64) * 30
    t = ik.Affinity(z, kernel="gaussian", sigma=1.0)
    loss = ik.icon_loss(x, target=t, kernel="gaussian", divergence="reverse_kl")
    valid = ~torch.eye(10, dtype=torch.bool)
    d2 = lambda a: torch.cdist(a, a) ** 2
    log_q = (-d2(x.detach()) / 2).masked_fill(~valid, -math.inf).log_softmax(1)
    log_p = (-d2(z) / 2).masked_fill(~valid, -math.inf).log_softmax(1)
    want = torch.where(valid, log_q.exp() * (log_q - log_p), 0.0).sum(1).mean()
    assert log_p[valid].min() < -1000
    torch.testing.assert_close(loss.detach(), want, rtol=1e-10, atol=0)


def test_reverse_kl_against_neighbors_asks_for_alpha_too():
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="alpha > 0"):
        ik.icon_loss(x, target=ik.Neighbors(torch.tensor([[1], [0], [3], [2], [5], [4]])),
                     divergence="reverse_kl")


def test_hellinger_has_no_cancellation_near_p_equals_q():
    p = torch.full((1000,), 1e-3, dtype=torch.float32)
    q = p * (1 + 1e-3)
    got = f_divergence_terms("hellinger", p.log(), q.log()).sum()
    want = ((p.double().sqrt() - q.double().sqrt()) ** 2).sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=0)
