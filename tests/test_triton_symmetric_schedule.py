"""The Triton backward's symmetric schedule in self mode (triton/launchers.py _symmetric, the BIDIR
row kernel with the loss's own statistics as its columns'): the row kernel alone makes the whole
dL/dx, sum_j (W_ij + W_ji) x_j, and the column kernel is not launched. Under TRITON_INTERPRET=1
without a GPU; fp32 against the float64 reference (test_backends_vs_reference.TRITON_F32), and
against the plain schedule (ICON_KERNELS_SYMMETRIC=0)."""
import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof"}


class ColumnLaunches:
    """Counts the launches of the column-parallel backward kernel."""

    def __init__(self, monkeypatch):
        from icon_kernels._triton import launchers
        self.count = 0
        kernel = launchers._cols_kernel
        outer = self

        class Counted:
            def __getitem__(self, grid):
                outer.count += 1
                return kernel[grid]
        monkeypatch.setattr(launchers, "_cols_kernel", Counted())


def _run(x0, labels, kernel, backend, upstream, param, device, **options):
    x = x0.detach().clone().to(device).requires_grad_()
    p = torch.tensor(param, dtype=x.dtype, device=device, requires_grad=True)
    rows = ik.icon_loss(x, target=ik.Labels(labels.to(device)), kernel=kernel, backend=backend, reduction="none",
                        **{PARAM_NAME[kernel]: p}, **options)
    grads = torch.autograd.grad(rows, (x, p), grad_outputs=upstream.to(device, rows.dtype))
    return [t.detach().cpu() for t in (rows, *grads)]


@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
@pytest.mark.parametrize("n,exclude_self,alpha,divergence", [(37, True, 0.0, "kl"), (45, False, 0.3, "cross_entropy"),
                                                              (2, True, 0.0, "kl")])
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, kernel, n, exclude_self, alpha, divergence):
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    options = dict(exclude_self=exclude_self, alpha=alpha, divergence=divergence)
    device = device_of("triton")
    want = _run(x, labels, kernel, "reference", upstream, 0.6, "cpu", **options)
    launches = ColumnLaunches(monkeypatch)
    got = _run(x.float(), labels, kernel, "triton", upstream, 0.6, device, **options)
    assert launches.count == 0                         # dL/dx from the row kernel alone
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.float(), labels, kernel, "triton", upstream, 0.6, device, **options)
    assert launches.count == 1
    for mine, theirs, exact in zip(got, plain, want):
        assert relative_error(mine, exact) <= TRITON_F32
        assert relative_error(mine, theirs) <= TRITON_F32


def test_plain_where_the_symmetry_breaks(monkeypatch):
    """An explicit y (not one autograd input with x), a per-row temperature, other column labels
    and beta > 0 run both backward kernels."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=gen).to(device)
    labels = (torch.arange(20) // 2).to(device)
    launches = ColumnLaunches(monkeypatch)

    def columns(y=None, **kw):
        launches.count = 0
        xx = x.clone().requires_grad_()
        loss = ik.icon_loss(xx, y if y is None else y.to(device), **{"target": ik.Labels(labels),
                                                                      "backend": "triton", **kw})
        loss.backward()
        return launches.count

    assert columns() == 0
    assert columns(y=x.clone()) == 1
    assert columns(temperature=torch.full((20,), 0.5, device=device)) == 1
    assert columns(target=ik.Labels(labels, labels.flip(0))) == 1
    assert columns(beta=0.1) == 1
