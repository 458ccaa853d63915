"""The torch backend's symmetric schedule (DESIGN.md §1.3, icon_kernels/backends/symmetric_torch.py):
in self mode on a Labels target, each pair of row blocks I <= J is one tile whose rows and
columns both give statistics, and whose backward carries both rows' terms.

It must equal the plain blockwise schedule (ICON_KERNELS_SYMMETRIC=0) and the dense reference to
1e-12 in float64 with ragged blocks forced, keep fp32 and half precision within twice naive
PyTorch's own error, pass gradcheck, and run exactly where it applies."""
import itertools

import pytest
import torch

import icon_kernels as ik
from cases import relative_error
from icon_kernels.backends import blockwise as torch_backend
from icon_kernels.backends import symmetric_torch

F64, F32 = torch.float64, torch.float32
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
              "power": "exponent"}
# blockwise.CHUNK_ELEMENTS: 30 gives blocks of 5 rows (ragged at N = 37), 400 of 20, 2^20 one block
CHUNKS = (30, 400, 1 << 20)


class Calls:
    def __init__(self, monkeypatch):
        self.calls = 0
        apply = symmetric_torch.SymmetricLabels.apply

        def counted(*args):
            self.calls += 1
            return apply(*args)
        monkeypatch.setattr(symmetric_torch.SymmetricLabels, "apply", counted)


@pytest.fixture(autouse=True)
def _switch_on(monkeypatch):
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)


def _run(x0, labels, kernel, backend, upstream, param=0.6, **options):
    """(row losses, dL/dx, dL/dparam) of sum_i upstream_i L_i."""
    x = x0.detach().clone().requires_grad_()
    p = torch.tensor(param, dtype=x0.dtype if x0.dtype in (F32, F64) else F32, requires_grad=True)
    rows = ik.icon_loss(x, target=ik.Labels(labels), kernel=kernel, backend=backend, reduction="none",
                        **{PARAM_NAME[kernel]: p}, **options)
    return [rows.detach(), *torch.autograd.grad(rows, (x, p), grad_outputs=upstream.to(rows.dtype))]


def _close(got, want, tol):
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tol, (relative_error(g, w), tol)


# (the power kernel with its self pairs kept: its logit at d² = 0 is rounding noise, on which the
# backends agree only to be finite: tests/cases.py keeps_self_pair_at_zero)
CASES = [c for c in itertools.product(("dot", "cosine", "gaussian", "student_t", "power"), (1, 2, 37), (True, False),
                                      (0.0, 0.3), ("kl", "cross_entropy"))
         if not (c[0] == "power" and c[2] is False)]


@pytest.mark.parametrize("kernel,n,exclude_self,alpha,divergence", CASES)
def test_float64_equals_the_plain_schedule_and_the_reference(monkeypatch, kernel, n, exclude_self, alpha,
                                                             divergence):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 5, generator=gen, dtype=F64)
    labels = torch.randint(0, 4, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    options = dict(exclude_self=exclude_self, alpha=alpha, divergence=divergence)
    want = _run(x, labels, kernel, "reference", upstream, **options)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, labels, kernel, "torch", upstream, **options)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC")
    calls = Calls(monkeypatch)
    for chunk in CHUNKS:
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", chunk)
        got = _run(x, labels, kernel, "torch", upstream, **options)
        _close(got, want, 1e-12)
        _close(got, plain, 1e-12)
    assert calls.calls == len(CHUNKS)


def test_runs_only_where_it_applies(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=gen, dtype=F64)
    labels = torch.arange(12) // 3
    calls = Calls(monkeypatch)

    def ran(y=None, **kw):
        calls.calls = 0
        ik.icon_loss(x, y, **{"target": ik.Labels(labels), "backend": "torch", **kw})
        return calls.calls

    assert ran() == 1
    assert ran(kernel="student_t", dof=2.0) == 1
    assert ran(y=x) == 0                                                  # an explicit y: plain
    assert ran(beta=0.1) == 0
    assert ran(divergence="tv", alpha=0.1) == 0
    assert ran(temperature=torch.full((12,), 0.5, dtype=F64)) == 0        # one temperature per row
    assert ran(target=ik.Labels(labels, labels.flip(0))) == 0            # other column labels
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    assert ran() == 0
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "2")
    with pytest.raises(ValueError, match="ICON_KERNELS_SYMMETRIC"):
        ran()


@pytest.mark.parametrize("temperature,scale", [(0.01, 1.0), (0.01, 30.0)])
def test_float32_huge_logits_within_twice_pytorchs_own_error(monkeypatch, temperature, scale):
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 400)
    gen = torch.Generator().manual_seed(5)
    n = 40
    x = (scale * torch.randn(n, 16, generator=gen, dtype=F64)).float().double()
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    exact = _run(x, labels, "dot", "reference", upstream, param=temperature)
    naive = _run(x.float(), labels, "dot", "reference", upstream, param=temperature)
    got = _run(x.float(), labels, "dot", "torch", upstream, param=temperature)
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 2.4e-7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_pytorchs_own_error(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(48, 32, generator=gen, dtype=F64).to(dtype)
    labels = torch.arange(48) // 2
    upstream = torch.rand(48, generator=gen, dtype=F64) + 0.5
    exact = _run(x.double(), labels, "cosine", "reference", upstream, param=0.1)
    naive = _run(x, labels, "cosine", "reference", upstream, param=0.1)
    got = _run(x, labels, "cosine", "torch", upstream, param=0.1)
    assert got[1].dtype == dtype
    for mine, theirs, want in zip(got, naive, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


def test_gradcheck_and_double_backward(monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 4)      # blocks of 2 rows, N = 7
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor(0.7, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    for kernel in ("dot", "gaussian", "student_t"):
        def f(x, t):
            return ik.icon_loss(x, target=ik.Labels(labels), kernel=kernel, backend="torch", alpha=0.1,
                                reduction="none", **{PARAM_NAME[kernel]: t})
        assert torch.autograd.gradcheck(f, (x, t))
    loss = ik.icon_loss(x, target=ik.Labels(labels), kernel="dot", backend="torch")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


def test_torch_compile_runs_the_plain_schedule():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 8, generator=gen)
    labels = torch.arange(20) // 2

    def step(x):
        return ik.icon_loss(x, target=ik.Labels(labels), kernel="cosine", temperature=0.2, backend="torch")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xi = x.clone().requires_grad_()
        loss = fn(xi)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
