"""Self mode's triangular schedule on the Triton backend (triton/symmetric_kernels.py, routed by
triton/launchers.py: the forward when x and y are one tensor, the backward when they are one autograd
input; a Labels target with any column labels, beta = 0, kl or cross_entropy, one kernel
parameter): each pair of row blocks once, the column-side statistics merged per panel of row blocks,
dL/dx from one kernel (the column kernel is not launched). Under TRITON_INTERPRET=1 without a GPU;
fp32 against the float64 reference (test_backends_vs_reference.TRITON_F32), and against the plain
schedule (ICON_KERNELS_SYMMETRIC=0)."""
import os

import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
              "power": "exponent"}
TRIANGULAR = ("_triangular_forward_kernel", "_triangular_merge_kernel", "_triangular_backward_kernel")
PLAIN = ("_forward_kernel", "_rows_kernel", "_cols_kernel")


class Launches:
    """Counts the launches of the launchers' kernels, by the names that launchers.py (the plain
    kernels) and triangular_launches.py (the triangular ones) launch them by (``names``;
    tests/test_triton_symmetric_affinity.py counts the Affinity target's triangular kernels too)."""

    def __init__(self, monkeypatch, names=TRIANGULAR + PLAIN):
        from icon_kernels._triton import launchers, triangular_launches
        self.count = dict.fromkeys(names, 0)
        for name in self.count:
            module = triangular_launches if hasattr(triangular_launches, name) else launchers
            monkeypatch.setattr(module, name, self._counted(name, getattr(module, name)))

    def _counted(self, name, kernel):
        count = self.count

        class Counted:
            def __getitem__(self, grid):
                count[name] += 1
                return kernel[grid]
        return Counted()

    def reset(self):
        self.count.update(dict.fromkeys(self.count, 0))

    def triangular(self) -> int:
        return sum(self.count[name] for name in TRIANGULAR)


def _run(x0, labels, kernel, backend, upstream, param, device, **options):
    x = x0.detach().clone().to(device).requires_grad_()
    p = torch.tensor(param, dtype=x.dtype, device=device, requires_grad=True)
    named = {PARAM_NAME[kernel]: p} if kernel in PARAM_NAME else {}          # (log_dot has no parameter)
    rows = ik.icon_loss(x, target=ik.Labels(labels.to(device)), kernel=kernel, backend=backend, reduction="none",
                        **named, **options)
    grads = torch.autograd.grad(rows, (x, *named.values()), grad_outputs=upstream.to(device, rows.dtype))
    return [t.detach().cpu() for t in (rows, *grads)]


def _inputs(n, seed, d=6, dtype=torch.float64, classes=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=gen)
    upstream = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    return x, labels, upstream


def _check_both_schedules(monkeypatch, x, labels, upstream, kernel, param=0.6, **options):
    """The triangular schedule (every triangular kernel launched, no plain one) and the plain one
    (ICON_KERNELS_SYMMETRIC=0: no triangular kernel) against the float64 reference: loss rows, dx
    and dparam. Returns the launch counts of the triangular run."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    want = _run(x, labels, kernel, "reference", upstream, param, "cpu", **options)
    launches = Launches(monkeypatch)
    got = _run(x.float(), labels, kernel, "triton", upstream, param, device, **options)
    counts = dict(launches.count)
    assert all(counts[name] >= 1 for name in TRIANGULAR), counts
    assert all(counts[name] == 0 for name in PLAIN), counts
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = _run(x.float(), labels, kernel, "triton", upstream, param, device, **options)
    assert launches.triangular() == 0 and launches.count["_cols_kernel"] == 1, launches.count
    for what, mine, theirs, exact in zip(("rows", "dx", "dparam"), got, plain, want):
        assert relative_error(mine, exact) <= TRITON_F32, what
        assert relative_error(mine, theirs) <= TRITON_F32, what
    return counts


@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
@pytest.mark.parametrize("n,exclude_self,alpha,divergence", [(37, True, 0.0, "kl"), (45, False, 0.3, "cross_entropy"),
                                                              (2, True, 0.0, "kl"), (45, True, 0.2, "kl"),
                                                              (37, False, 0.0, "cross_entropy"), (1, False, 0.2, "kl")])
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, kernel, n, exclude_self, alpha, divergence):
    x, labels, upstream = _inputs(n, seed=n)
    _check_both_schedules(monkeypatch, x, labels, upstream, kernel, exclude_self=exclude_self, alpha=alpha,
                          divergence=divergence)


# each kernel once, under one of the two settings (every kernel under both: test_equals_the_reference_...)
@pytest.mark.parametrize("kernel,n,exclude_self,alpha,divergence", [
    ("dot", 100, True, 0.1, "kl"), ("student_t", 100, True, 0.1, "kl"), ("cosine", 77, False, 0.0, "cross_entropy"),
    ("gaussian", 77, False, 0.0, "cross_entropy")])
def test_several_panels_chunks_and_tiles_per_block(monkeypatch, kernel, n, exclude_self, alpha, divergence):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel (every panel's partials merged
    into the running statistics of the blocks after it) and one column block per program (so a row
    block's programs each take one block pair, the diagonal's with the column side left out)."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    x, labels, upstream = _inputs(n, seed=n + 1)
    counts = _check_both_schedules(monkeypatch, x, labels, upstream, kernel, exclude_self=exclude_self, alpha=alpha,
                                   divergence=divergence)
    n_blocks = -(-n // 32)
    assert counts["_triangular_forward_kernel"] == counts["_triangular_merge_kernel"] == n_blocks
    assert counts["_triangular_backward_kernel"] == 1


@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_feature_dim_in_chunks(monkeypatch, kernel):
    """d beyond the register budget (shrunk here: d = 50 in 4 ragged chunks of 16): the forward's
    Gram loops over the chunks, the backward has one program per chunk of dX (each recomputing S)
    and dparam from the first chunk's programs."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    x, labels, upstream = _inputs(45, seed=11, d=50)
    _check_both_schedules(monkeypatch, x, labels, upstream, kernel, exclude_self=True, alpha=0.1, divergence="kl")


@pytest.mark.parametrize("kernel", ["power", "log_dot"])
def test_the_other_kernels(monkeypatch, kernel):
    """Every kernel is symmetric when y is x: power (a parameter) and log_dot (none; positive x.x)."""
    x, labels, upstream = _inputs(45, seed=3)
    if kernel == "log_dot":
        x = x.abs() + 0.1
    _check_both_schedules(monkeypatch, x, labels, upstream, kernel, param=1.3, exclude_self=True, alpha=0.1,
                          divergence="kl")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_as_the_plain_schedule(monkeypatch, dtype):
    """fp16 (native under the interpreter: its gradient dots upcast) and bf16 inputs: the two
    schedules differ by rounding only (fp32 accumulation both)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, labels, upstream = _inputs(45, seed=5)
    device = device_of("triton")
    launches = Launches(monkeypatch)
    got = _run(x.to(dtype), labels, "gaussian", "triton", upstream, 1.5, device)
    assert launches.count["_triangular_backward_kernel"] == 1
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x.to(dtype), labels, "gaussian", "triton", upstream, 1.5, device)
    for mine, theirs in zip(got, plain):
        assert relative_error(mine, theirs) <= 1e-2


def test_plain_where_the_symmetry_breaks(monkeypatch):
    """An explicit y that is another tensor, a per-row temperature and other column labels run the
    plain kernels (both backward kernels); y = x given explicitly, the same tensor, runs the
    triangular ones, and so does beta > 0, in two sweeps of the forward and merge kernels
    (tests/test_triton_symmetric_family.py)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=gen).to(device)
    labels = (torch.arange(20) // 2).to(device)
    launches = Launches(monkeypatch)

    def launched(y=None, **kw):
        launches.reset()
        xx = x.clone().requires_grad_()
        loss = ik.icon_loss(xx, xx if isinstance(y, str) else y, **{"target": ik.Labels(labels), "backend": "triton", **kw})
        loss.backward()
        return launches.triangular(), launches.count["_cols_kernel"]

    assert launched() == (3, 0)
    assert launched(y="same", exclude_self=True) == (3, 0)
    assert launched(y=x.clone()) == (0, 1)
    assert launched(temperature=torch.full((20,), 0.5, device=device)) == (0, 1)
    assert launched(target=ik.Labels(labels, labels.flip(0))) == (3, 0)   # other column labels: each side reads its own
    assert launched(beta=0.1) == (5, 0)


def test_the_forward_decides_from_its_own_arguments(monkeypatch):
    """The forward op sees no autograd context: x and y one tensor object (the autograd layer's
    y_is_x) run the triangular forward, which records its BLOCK_M in stats row 3; a view of x or a
    copy is another tensor and runs the plain forward (row 3 zero). Rows 0-2 agree."""
    from icon_kernels._triton import launchers
    from icon_kernels.backends.ops import forward_op
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x, labels, _ = _inputs(40, seed=7, dtype=torch.float32)
    x, labels = x.to(device), labels.to(device)
    launches = Launches(monkeypatch)

    def forward(y):
        launches.reset()
        out = forward_op("triton")(x, y, torch.tensor(0.5, device=device), "dot", "labels", labels, labels, None,
                                   None, None, None, None, "dot", None, 0.1, 0.0, True, 0, "conditional", False)
        return launches.count["_triangular_forward_kernel"], out

    (tri_same, same), (tri_view, view), (tri_copy, copy) = forward(x), forward(x.view(40, 6)), forward(x.clone())
    assert (tri_same, tri_view, tri_copy) == (1, 0, 0)
    block = launchers.INTERPRETER_SHAPE[0] if launchers.INTERPRET else None
    assert torch.all(same[2][3] == same[2][3, 0]) and same[2][3, 0] >= 1
    if block is not None:
        assert same[2][3, 0] == block
    assert torch.all(view[2][3] == 0) and torch.all(copy[2][3] == 0)
    for mine in (same, view):
        assert relative_error(mine[0], copy[0]) <= TRITON_F32
        assert torch.equal(mine[1], copy[1])
        assert relative_error(mine[2][:3], copy[2][:3]) <= TRITON_F32


def _huge_logit_run(x0, labels, y_of, upstream, device, switch_at_backward=None):
    """(rows, dx) of icon_loss(x, y_of(x)) at tau = 0.01, the switch set to switch_at_backward
    between forward and backward if given."""
    x = x0.detach().clone().to(device).requires_grad_()
    rows = ik.icon_loss(x, y_of(x), target=ik.Labels(labels.to(device)), temperature=0.01, backend="triton",
                        reduction="none", exclude_self=True)
    if switch_at_backward is not None:
        os.environ["ICON_KERNELS_SYMMETRIC"] = switch_at_backward
    (dx,) = torch.autograd.grad(rows, (x,), grad_outputs=upstream.to(device, rows.dtype))
    return rows.detach().cpu(), dx.detach().cpu()


@pytest.mark.parametrize("case", ["detached_y", "switch_off_at_backward", "switch_on_at_backward"])
def test_the_backward_follows_its_forward(monkeypatch, case):
    """At logits near 1e6 an ulp of s moves q by percents, so the backward must take each pair's
    logit from the same tile orientation as the forward did. y = x.detach() (another tensor, no
    y_is_x) runs plain in both passes; a switch changed between forward and backward does not change
    the backward's schedule (the forward's record in stats row 3 decides). Each agrees with the
    float64 reference on the same fp32 features."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    gen = torch.Generator().manual_seed(5)
    n = 64                        # two row blocks of the interpreter's tile
    x = (30 * torch.randn(n, 16, generator=gen, dtype=torch.float64)).float()   # as test_low_temperature_...
    labels = torch.arange(n) // 2
    upstream = torch.rand(n, generator=gen) + 0.5
    launches = Launches(monkeypatch)
    if case == "detached_y":
        got = _huge_logit_run(x, labels, lambda t: t.detach(), upstream, device)
        assert launches.triangular() == 0, launches.count
    elif case == "switch_off_at_backward":
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "1")
        got = _huge_logit_run(x, labels, lambda t: None, upstream, device, switch_at_backward="0")
        assert launches.count["_triangular_backward_kernel"] == 1 and launches.count["_cols_kernel"] == 0
    else:
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
        got = _huge_logit_run(x, labels, lambda t: None, upstream, device, switch_at_backward="1")
        assert launches.triangular() == 0 and launches.count["_cols_kernel"] == 1, launches.count
    xr = x.double().requires_grad_()
    y_of = (lambda t: t.detach()) if case == "detached_y" else (lambda t: None)
    want_rows = ik.icon_loss(xr, y_of(xr), target=ik.Labels(labels), temperature=0.01, backend="reference",
                             reduction="none", exclude_self=True)
    (want_dx,) = torch.autograd.grad(want_rows, (xr,), grad_outputs=upstream.double())
    assert relative_error(got[0], want_rows.detach()) <= 1e-5      # test_low_temperature_and_huge_logits'
    assert relative_error(got[1], want_dx) <= 1e-5