"""fp32 accuracy at large M (DESIGN.md §5): on fp32 inputs, the error of a fused backend against a
float64 evaluation is at most twice PyTorch's own fp32 error, for the loss and every gradient.

PyTorch's own error is that of the dense ``reference`` backend run in fp32 on the same
fp32-rounded inputs; both are measured against the reference in float64 on those inputs, as
norm-wise relative errors ||got - want|| / ||want|| of the per-row losses (reduction="none", an
upstream gradient != 1) and of the gradient of every leaf (x, y, the kernel parameter, and the
target's tensors: Affinity z, z_cols and sigma, Neighbors weights, Dense p). The bound is

    err_backend <= 2 * err_pytorch + FLOOR,   FLOOR = 2.4e-7 (two fp32 ulps, relative),

the floor because an fp32 result cannot be more accurate than its own rounding: where PyTorch is
lucky to be exact, a backend that rounds once more must still pass. Few rows (N = 4) and
M = 20,000 columns keep the dense reference cheap while the row sums run over 2e4 columns, where a
long running fp32 sum (one per row) was up to ~300x over the bound. The same tests run at
M = 200,000 with ICON_KERNELS_PRECISION_M=200000 (about a minute here; not in CI).
"""
import functools
import itertools
import os
import zlib

import pytest
import torch

import icon_kernels as ik
from cases import (DEFAULT_PARAM, KERNELS, PARAM_OF, TARGETS, clone_problem, features, loss_and_grads,
                   make_target, relative_error)

N, D = 4, 8
M = int(os.environ.get("ICON_KERNELS_PRECISION_M", 20_000))
FLOOR = 2.4e-7
OPTIONS = {
    "kl": dict(),
    "alpha-ce": dict(alpha=0.1, divergence="cross_entropy"),
    "beta-ce": dict(beta=0.2, divergence="cross_entropy"),
    "alpha-beta-kl": dict(alpha=0.2, beta=0.1),
}
# the f-divergences against Labels with alpha = beta = 0: the cpu backend's closed forms over the
# negatives (csrc/cpu_f_label_rows.h), whose q from the LSE rounded to fp32 sum to 1 only up to
# ~|LSE| ulps, so a row is renormalised where that sum is off; the torch backend's positives list
F_LABEL_OPTIONS = ("tv", "hellinger", "js", "chi2")
OPTIONS.update({name: dict(divergence=name) for name in F_LABEL_OPTIONS})
BACKENDS = [b for b in ("torch", "cpu") if b in ik.available_backends()]


def _problem(kernel, target_kind, option, n=N, m=M, rect=True):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kernel}{target_kind}{option}{n}{m}".encode()))
    x = features(n, D, kernel, torch.float64, gen).requires_grad_()
    y = features(m, D, kernel, torch.float64, gen).requires_grad_() if rect else None
    target = make_target(target_kind, n, m, rect, torch.float64, gen, target_grad=True,
                         missing_rows=False)
    kwargs = dict(kernel=kernel, reduction="none", exclude_self=not rect, **OPTIONS[option])
    if kernel in PARAM_OF:
        name = PARAM_OF[kernel]
        kwargs[name] = torch.tensor(DEFAULT_PARAM[name], dtype=torch.float64, requires_grad=True)
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    f32 = clone_problem(x, y, target, kwargs, torch.float32)
    return f32, upstream


@functools.lru_cache(maxsize=None)
def _baseline(kernel, target_kind, option, n=N, m=M, rect=True):
    """(the fp32 problem, upstream, float64 loss and grads, PyTorch's fp32 errors)."""
    f32, upstream = _problem(kernel, target_kind, option, n, m, rect)
    want = loss_and_grads(*clone_problem(*f32, torch.float64), "reference", upstream)
    got = loss_and_grads(*clone_problem(*f32, torch.float32), "reference", upstream)
    return f32, upstream, want, _errors(got, want)


def _errors(got, want):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert len(got_grads) == len(want_grads)
    return [relative_error(got_loss, want_loss)] + [relative_error(g, w) for g, w in zip(got_grads, want_grads)]


def _check(backend, key):
    f32, upstream, want, pytorch = _baseline(*key)
    ours = _errors(loss_and_grads(*clone_problem(*f32, torch.float32), backend, upstream), want)
    names = ["loss"] + [f"grad {i}" for i in range(len(ours) - 1)]
    over = [f"{name}: {e:.2e} > 2 x {r:.2e} + {FLOOR:.1e}"
            for name, e, r in zip(names, ours, pytorch) if not e <= 2 * r + FLOOR]
    assert not over, f"{backend} {key}: " + "; ".join(over)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [o for o in OPTIONS if o not in F_LABEL_OPTIONS])
@pytest.mark.parametrize("kernel,target_kind", list(itertools.product(KERNELS, TARGETS)))
def test_fp32_error_at_most_twice_pytorchs(kernel, target_kind, option, backend):
    _check(backend, (kernel, target_kind, option))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", F_LABEL_OPTIONS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_fp32_f_divergence_labels_error_at_most_twice_pytorchs(kernel, divergence, backend):
    _check(backend, (kernel, "labels", divergence))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel,target_kind", [("cosine", "labels"), ("student_t", "affinity"),
                                                ("gaussian", "neighbors"), ("log_dot", "dense")])
def test_fp32_error_with_self_pairs_excluded(kernel, target_kind, backend):
    """y = None (exclude_self), square: N = M = 1500."""
    _check(backend, (kernel, target_kind, "alpha-beta-kl", 1500, 1500, False))
