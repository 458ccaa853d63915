"""Issue 17 item 3: joint normalisation and symmetrised targets on the fused cpu kernel
(csrc/cpu_global_rows.h) equal the dense reference in float64 to 1e-9, with its row chunking
forced small (7-row chunks, the last ragged) on rows longer than one SIMD sum block (600 columns:
512 + a ragged 88), for every kernel, every target (Affinity and Neighbors also symmetrised),
every divergence with alpha and beta, per-row upstream gradients (reduction="none"), a kernel
parameter that needs a gradient (one scalar, or one per row) and, where the kernel differentiates
it, the Affinity target's z and sigma.

Under joint normalisation dL/ds_ij = (1 - beta)(g_i q_ij g_ij - q_ij C) with one centre C over
every row: per-row upstream gradients and per-row parameters are where a wrong centre shows."""
import zlib

import pytest
import torch

import icon_kernels as ik
from icon_kernels import families

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

N, D, DZ, K = 600, 4, 3, 5
ROWS_PER_CHUNK = 7
TOL = 1e-9
KERNELS = sorted(families.KERNEL_CODES)
PARAMS = {"dot": "temperature", "gaussian": "sigma", "student_t": "dof", "power": "exponent"}
PARAM_VALUE = {"dot": 0.7, "gaussian": 1.3, "student_t": 1.5, "power": 2.0}
TARGETS = ["labels", "neighbors", "dense", "affinity", "neighbors-symmetrised", "affinity-symmetrised"]
SETTINGS = [  # (divergence, alpha, beta)
    ("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0), ("kl", 0.1, 0.2), ("tv", 0.1, 0.0), ("js", 0.0, 0.1),
    ("reverse_kl", 0.2, 0.1), ("hellinger", 0.0, 0.2), ("chi2", 0.3, 0.0)]


@pytest.fixture
def small_cpu_chunks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", str(ROWS_PER_CHUNK * N))


def _problem(kernel, target, per_row_param, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    if kernel == "log_dot":                       # a.b > 0
        x = x.abs() + 0.1
    x.requires_grad_(True)
    leaves, options = [x], {}
    if kernel in PARAMS:
        shape = (N,) if per_row_param else ()
        value = (PARAM_VALUE[kernel] * (0.8 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64)))
        value.requires_grad_(True)
        options[PARAMS[kernel]] = value
        leaves.append(value)
    symmetrize = target.endswith("-symmetrised")
    kind = target.split("-")[0]
    if kind == "labels":
        tgt = ik.Labels(torch.randint(0, 40, (N,), generator=gen))
    elif kind == "neighbors":
        idx = torch.randint(-1, N, (N, K), generator=gen)
        tgt = ik.Neighbors(idx, torch.rand(N, K, generator=gen, dtype=torch.float64) + 0.1, symmetrize=symmetrize)
    elif kind == "dense":
        tgt = ik.Dense(torch.rand(N, N, generator=gen, dtype=torch.float64))
    else:
        z = torch.randn(N, DZ, generator=gen, dtype=torch.float64)
        sigma = torch.rand(N, generator=gen, dtype=torch.float64) + 0.7
        if not symmetrize:                        # a symmetrised target's tensors: the reference only
            z.requires_grad_(True)
            sigma.requires_grad_(True)
            leaves += [z, sigma]
        tgt = ik.Affinity(z, kernel="gaussian", sigma=sigma, symmetrize=symmetrize)
    upstream = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    return x, tgt, options, leaves, upstream


def _run(backend, x, tgt, options, leaves, upstream, **loss_options):
    rows = ik.icon_loss(x, target=tgt, reduction="none", backend=backend, **options, **loss_options)
    return rows.detach(), torch.autograd.grad(rows, leaves, upstream)


def _relative(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


# joint normalisation for every target; a symmetrised target under conditional normalisation too
# (the conditional rows of a plain target: test_cpu_row_chunks.py)
CASES = [(k, t, s, norm) for k in KERNELS for t in TARGETS for s in SETTINGS
         for norm in (("joint", "conditional") if t.endswith("-symmetrised") else ("joint",))
         if not (s[0] == "reverse_kl" and t.startswith(("labels", "neighbors")) and s[1] == 0)]


@pytest.mark.parametrize("kernel,target,setting,normalization", CASES,
                         ids=[f"{n}-{k}-{t}-{s[0]}-{s[1]}-{s[2]}" for k, t, s, n in CASES])
def test_global_rows_equal_reference_on_ragged_chunks(small_cpu_chunks, kernel, target, setting, normalization):
    divergence, alpha, beta = setting
    seed = zlib.crc32(f"{kernel} {target} {setting} {normalization}".encode())
    per_row = seed % 2 == 0 and kernel in PARAMS
    problem = _problem(kernel, target, per_row, seed)
    options = dict(kernel=kernel, divergence=divergence, alpha=alpha, beta=beta, normalization=normalization)
    want_rows, want_grads = _run("reference", *problem, **options)
    got_rows, got_grads = _run("cpu", *problem, **options)
    assert _relative(got_rows, want_rows) < TOL
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert _relative(got, want) < TOL, f"leaf {i}: {_relative(got, want):.2e}"
