"""The Triton backward reuses what the forward prepared (issue 15, item 3): the forward stores the
row normaliser of a Labels, Dense or Neighbors target (positive count, p row total, weight total)
in the stats row that only Affinity targets use (launchers.NORM_ROW), and the backward reads it
there. So the backward never calls torch.unique or torch.bincount, never sums p, and still equals
the float64 reference. Also: the launchers' named op arguments match the op schema."""
import re

import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends import ops

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=f"triton backend unavailable: {ik.available_backends(with_reasons=True)['triton']}")

N, M, D, K = 24, 20, 8, 5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # the interpreter runs on CPU tensors


class _Spy:
    """While ``active``: the names of the torch.unique / torch.bincount calls, and of the sums
    whose input equals one of ``weights`` (the target's p, raw or with its dropped entries
    zeroed). A sum of anything else (the squared norms, the pair gradients) is not recorded."""

    def __init__(self, monkeypatch, weights=()):
        self.active, self.calls = False, []
        self.weights = [w.detach().float() for w in weights]
        for owner, name in ((torch, "unique"), (torch, "bincount"), (torch, "sum"), (torch.Tensor, "sum")):
            monkeypatch.setattr(owner, name, self._wrap(name, getattr(owner, name)))

    def _is_target(self, t) -> bool:
        return (isinstance(t, torch.Tensor) and t.is_floating_point()
                and any(t.shape == w.shape and torch.equal(t.detach().float(), w) for w in self.weights))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.active and (name != "sum" or (args and self._is_target(args[0]))):
                self.calls.append(name)
            return fn(*args, **kwargs)
        return wrapper


def _features(gen, rows):
    return (torch.randn(rows, D, generator=gen, dtype=torch.float64) * 0.7).float()


def _problem(case, gen):
    """(x, y or None, target, options, the target's weights for the spy)."""
    if case.startswith("labels"):
        rect = case == "labels-rect"
        rows = torch.randint(0, 4, (N,), generator=gen) * 7 - 5       # raw labels, negative ones too
        rows[-1] = 1000                                                # no positive anywhere
        cols = torch.randint(0, 4, (M,), generator=gen) * 7 - 5 if rect else None
        y = _features(gen, M) if rect else None
        return y, ik.Labels(rows, cols), dict(kernel="cosine", alpha=0.1 if rect else 0.0), []
    if case.startswith("dense"):
        p = torch.rand(N, N, generator=gen)
        p[2] = 0                                                       # a row with no target
        extra = dict(alpha=0.1, beta=0.2) if case == "dense-beta" else {}
        return None, ik.Dense(p), dict(kernel="student_t", dof=1.5, **extra), [p]
    idx = torch.randint(-1, N, (N, K), generator=gen)
    idx[:, 0] = idx[:, 1]                                              # repeats add up
    idx[0] = -1                                                        # an empty list
    weights = torch.rand(N, K, generator=gen) + 0.1
    keep = (idx >= 0) & (idx != torch.arange(N)[:, None])
    extra = dict(alpha=0.1, beta=0.2) if case == "neighbors-beta" else {}
    return (None, ik.Neighbors(idx, weights), dict(kernel="gaussian", sigma=1.3, **extra),
            [weights, torch.where(keep, weights, 0.0)])


def _loss_and_grads(x, y, target, options, backend, spy=None):
    x = x.detach().clone().requires_grad_()
    y = None if y is None else y.detach().clone().requires_grad_()
    loss = ik.icon_loss(x, y, target=target, backend=backend, **options)
    if spy is not None:
        spy.active = True
    try:
        grads = torch.autograd.grad(loss, [x] if y is None else [x, y])
    finally:
        if spy is not None:
            spy.active = False
    return loss.detach(), grads


def _as_float64(target):
    if isinstance(target, ik.Dense):
        return ik.Dense(target.p.double())
    if isinstance(target, ik.Neighbors):
        return ik.Neighbors(target.indices, target.weights.double())
    return target


def _on(device, target):
    if isinstance(target, ik.Dense):
        return ik.Dense(target.p.to(device))
    if isinstance(target, ik.Neighbors):
        return ik.Neighbors(target.indices.to(device), target.weights.to(device))
    return ik.Labels(target.row_labels.to(device),
                     None if target.col_labels is None else target.col_labels.to(device))


@pytest.mark.parametrize("case", ["labels-self", "labels-rect", "dense", "dense-beta", "neighbors",
                                  "neighbors-beta"])
def test_the_backward_reuses_the_forward_normaliser(monkeypatch, case):
    gen = torch.Generator().manual_seed(len(case))
    x = _features(gen, N)
    y, target, options, weights = _problem(case, gen)
    spy = _Spy(monkeypatch, [w.to(DEVICE) for w in weights])
    loss, grads = _loss_and_grads(x.to(DEVICE), None if y is None else y.to(DEVICE), _on(DEVICE, target),
                                  options, "triton", spy)
    assert spy.calls == [], f"the Triton backward recomputed the target's normaliser: {spy.calls}"
    loss, grads = loss.cpu(), [g.cpu() for g in grads]
    want_loss, want_grads = _loss_and_grads(x.double(), None if y is None else y.double(),
                                            _as_float64(target), options, "reference")
    rtol = 5e-5 if DEVICE == "cpu" else 2e-4       # a GPU's default fp32 dots are tf32x3
    torch.testing.assert_close(loss, want_loss.float(), rtol=rtol, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want.float(), rtol=rtol, atol=2e-6)


def _schema_names(params: str):
    """The argument names of a schema's parameter list, e.g. 'Tensor x, Tensor? z' -> [x, z]."""
    return [re.split(r"\s+", p.strip())[-1] for p in params.split(",")]


def test_the_launchers_named_arguments_match_the_op_schema():
    from icon_kernels._triton import launchers

    assert list(launchers.OpArgs._fields) == _schema_names(ops.ARGS)
    assert len(launchers.OpArgs._fields) == ops.N_ARGS
    backward_params = ops.BACKWARD_SCHEMA[1:ops.BACKWARD_SCHEMA.index(")")]
    assert _schema_names(backward_params) == ["grad_rows", *launchers.OpArgs._fields,
                                              *launchers.BackwardArgs._fields]
