"""Builders of small, ragged I-Con problems shared by the tests, and the check against the
float64 dense reference."""
from __future__ import annotations

import zlib

import torch

import icon_kernels as ik
from icon_kernels import families

KERNELS = tuple(families.LEARNED_KERNELS)        # a new kernel is checked on every backend
TARGETS = tuple(families.TARGET_TYPES_BY_NAME)
PARAM_OF = {name: row.param for name, row in families.LEARNED_KERNELS.items() if row.param}
DEFAULT_PARAM = {"temperature": 0.5, "sigma": 1.7, "dof": 1.5, "exponent": 1.3}

# (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted)
SETTINGS = [
    ("self-kl-mean", False, None, 0.0, 0.0, "kl", "mean", False),
    ("self-debiased-ce-none", False, None, 0.2, 0.3, "cross_entropy", "none", False),
    ("rect-alpha-kl-sum-weighted", True, False, 0.1, 0.0, "kl", "sum", True),
    ("square-keepself-beta-mean-weighted", False, False, 0.0, 0.15, "kl", "mean", True),
]


def keeps_self_pair_at_zero(kernel: str, setting, t_kernel: str = "gaussian") -> bool:
    """True for the power kernel (learned, or an Affinity target's) with the self pairs kept in
    self mode (y = x, exclude_self=False). Its logit at d² = 0 is -(n/2) log(eps), eps = 1e-12,
    but every backend forms d²_ii as ||x||² + ||x||² - 2 x.x, rounding noise above eps (about
    1e-15 in float64, 1e-7 in fp32), and W_ii = G_ii n / (d² + eps) ~ 1e12 G_ii cancels in
    W y - (sum W) x: the backends agree there only on a finite value, which is all DESIGN.md §1
    promises (test_power_kernel_with_the_self_pair_is_finite checks that instead)."""
    _, rect, exclude_self, *_ = setting
    return "power" in (kernel, t_kernel) and not rect and exclude_self is False


def features(n: int, d: int, kernel: str, dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows of norm ~2 whatever d, so logits stay O(10) (fp32-conditioned); log_dot needs
    x.y > 0: soft assignments (rows of a softmax)."""
    raw = torch.randn(n, d, generator=gen, dtype=torch.float64) * (2.0 / max(d, 1) ** 0.5)
    if kernel == "log_dot":
        raw = raw.softmax(dim=1)
    return raw.to(dtype)


def make_target(kind: str, n: int, m: int, rect: bool, dtype, gen, t_kernel="gaussian",
                target_grad=False, missing_rows=True):
    """A target with, where the type allows it, rows that have no positives."""
    if kind == "labels":
        rows = torch.randint(0, 4, (n,), generator=gen)
        cols = torch.randint(0, 4, (m,), generator=gen) if rect else None
        if missing_rows:
            rows[-1] = 99          # a class of its own: no positive anywhere
        return ik.Labels(rows, cols)
    if kind == "neighbors":
        idx = torch.randint(-1, m, (n, 5), generator=gen)
        idx[:, 0] = idx[:, 1]      # repeated neighbours add up
        if missing_rows:
            idx[0] = -1            # an empty list
            idx[1] = torch.tensor([1, 1, -1, -1, -1])  # only itself: empty once self is excluded
        weights = (torch.rand(n, 5, generator=gen, dtype=torch.float64).to(dtype) + 0.1).requires_grad_(target_grad)
        return ik.Neighbors(idx, weights if n % 2 or target_grad else None)
    if kind == "dense":
        p = torch.rand(n, m, generator=gen, dtype=torch.float64)
        if missing_rows:
            p[2] = 0
        return ik.Dense(p.to(dtype).requires_grad_(target_grad))
    z = features(n, 6, t_kernel, dtype, gen).requires_grad_(target_grad)
    z_cols = features(m, 6, t_kernel, dtype, gen).requires_grad_(target_grad) if rect else None
    sigma = torch.tensor(1.3, dtype=dtype, requires_grad=target_grad)
    exponent = torch.tensor(1.8, dtype=dtype, requires_grad=target_grad)
    return ik.Affinity(z, z_cols, kernel=t_kernel, sigma=sigma, temperature=0.7, dof=2.0, exponent=exponent)


def build(kernel, target_kind, setting, dtype, seed, param_tensor=False, target_grad=False,
          t_kernel="gaussian", n=37, m=29, d=13):
    """One problem ``(x, y, target, kwargs)`` in ``dtype`` (drawn in float64) and its upstream
    gradient. ``param_tensor``: the kernel parameter as a float (False), a 0-d tensor ("scalar")
    or one value per row ("rows"), tensors requiring grad; ``m`` is used only when the setting is
    rectangular."""
    _, rect, exclude_self, alpha, beta, divergence, reduction, weighted = setting
    gen = torch.Generator().manual_seed(seed)
    m = m if rect else n
    x = features(n, d, kernel, torch.float64, gen).requires_grad_()
    y = features(m, d, kernel, torch.float64, gen).requires_grad_() if rect else None
    target = make_target(target_kind, n, m, rect, torch.float64, gen, t_kernel, target_grad)
    kwargs = dict(kernel=kernel, alpha=alpha, beta=beta, exclude_self=exclude_self,
                  divergence=divergence, reduction=reduction)
    if kernel in PARAM_OF:
        name = PARAM_OF[kernel]
        value = DEFAULT_PARAM[name]
        if param_tensor == "scalar":
            value = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        elif param_tensor == "rows":
            spread = 0.75 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
            value = (value * spread).requires_grad_()
        kwargs[name] = value
    if weighted:
        kwargs["weight"] = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    if reduction == "none":
        upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    else:
        upstream = torch.tensor(0.7, dtype=torch.float64)
    return clone_problem(x, y, target, kwargs, dtype), upstream


def seed_of(*parts) -> int:
    """A seed in [0, 1000) that names a case: the CRC-32 of its parts' strings."""
    return zlib.crc32("".join(map(str, parts)).encode()) % 1000


def device_of(backend: str) -> str:
    """Where a backend's inputs live: cuda on a GPU; Triton without one runs under the
    interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU tensors."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_against_reference(problem, upstream, dtype, tol, backend):
    """The backend's loss and every gradient within relative error ``tol`` of the float64 dense
    reference (on CPU), the loss in the inputs' dtype."""
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    device = device_of(backend)
    got_loss, got_grads = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
    got_loss, got_grads = got_loss.cpu(), [g.cpu() for g in got_grads]
    assert got_loss.dtype == dtype
    assert torch.isfinite(want_loss).all()
    assert relative_error(got_loss, want_loss) <= tol, (got_loss, want_loss)
    assert len(got_grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.shape == w.shape
        assert relative_error(g, w) <= tol, f"gradient {i}: rel err {relative_error(g, w)}"


def leaves(x, y, target, kwargs):
    """Every tensor of the problem that requires grad, in a fixed order."""
    found = [x] + ([y] if y is not None else [])
    found += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if isinstance(target, ik.Affinity):
        found += [t for t in (target.z, target.z_cols, target.sigma, target.temperature, target.dof,
                              target.exponent) if isinstance(t, torch.Tensor)]
    if isinstance(target, ik.Neighbors) and target.weights is not None:
        found.append(target.weights)
    if isinstance(target, ik.Dense):
        found.append(target.p)
    return [t for t in found if t.requires_grad]


def clone_problem(x, y, target, kwargs, dtype):
    """The same problem in another dtype, with fresh leaves."""
    def conv(t):
        if not isinstance(t, torch.Tensor):
            return t
        out = t.detach().to(dtype) if t.is_floating_point() else t
        return out.requires_grad_(t.requires_grad) if t.is_floating_point() else out
    if isinstance(target, ik.Labels):
        target = ik.Labels(target.row_labels, target.col_labels)
    elif isinstance(target, ik.Neighbors):
        target = ik.Neighbors(target.indices, conv(target.weights))
    elif isinstance(target, ik.Dense):
        target = ik.Dense(conv(target.p))
    else:
        target = ik.Affinity(conv(target.z), conv(target.z_cols), kernel=target.kernel,
                             sigma=conv(target.sigma), temperature=conv(target.temperature),
                             dof=conv(target.dof), exponent=conv(target.exponent))
    return conv(x), conv(y), target, {k: conv(v) for k, v in kwargs.items()}


def loss_and_grads(x, y, target, kwargs, backend, upstream):
    """The loss and the grads of every leaf, for an upstream gradient ``upstream``."""
    loss = ik.icon_loss(x, y, target=target, backend=backend, **kwargs)
    ins = leaves(x, y, target, kwargs)
    grads = torch.autograd.grad(loss, ins, grad_outputs=upstream.to(loss.dtype), allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (the plain error norm when want is zero)."""
    got, want = got.double(), want.double()
    err = (got - want).norm().item()
    scale = want.norm().item()
    return err / scale if scale > 0 else err


def _move(t, device):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point():
        return t.detach().to(device).requires_grad_(t.requires_grad)
    return t.to(device)


def to_device(problem, device):
    """The same problem (x, y, target, kwargs) with fresh leaves on ``device``."""
    x, y, target, kwargs = problem
    fields = {k: _move(v, device) for k, v in vars(target).items()}
    return (_move(x, device), _move(y, device), type(target)(**fields),
            {k: _move(v, device) for k, v in kwargs.items()})
