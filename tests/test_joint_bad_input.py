"""Bad input under joint normalisation (DESIGN.md §1.2, §2): no row is left out, so the rules
that conditional rows satisfy by being left out or by their own log-softmax need their own
checks here."""
import math

import pytest
import torch

import icon_kernels as ik

BACKENDS = ["reference", "torch"]
N, D = 7, 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "tv", "js"])
@pytest.mark.parametrize("where", ["x", "z"])
def test_an_inf_coordinate_gives_nan(where, divergence, backend):
    # x: the student_t logits of row 2 are all -inf, which log Z takes as q = 0 (before this
    # check: a finite loss for tv and js, +inf for kl); z: the same on the target side
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    z = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    (x if where == "x" else z)[2, 1] = math.inf
    for symmetrize in (False, True):
        conditional = ik.icon_loss(x, target=ik.Affinity(z, symmetrize=symmetrize), kernel="student_t",
                                   divergence=divergence, backend=backend)
        joint = ik.icon_loss(x, target=ik.Affinity(z, symmetrize=symmetrize), kernel="student_t",
                             divergence=divergence, normalization="joint", backend=backend)
        assert torch.isnan(conditional) and torch.isnan(joint), (conditional, joint)


def test_a_finite_overflow_is_not_an_inf_input():
    # 1e200 is finite: its -inf logits (d^2 overflows) are q = 0 under joint normalisation
    x = torch.randn(N, D, dtype=torch.float64)
    x[1, 0] = 1e200
    loss = ik.icon_loss(x, target=ik.Affinity(torch.randn(N, 2, dtype=torch.float64)), kernel="student_t",
                        divergence="tv", normalization="joint", backend="torch")
    assert torch.isfinite(loss)


def test_reverse_kl_against_a_dense_row_without_mass_raises_under_joint():
    # conditional: the row is left out; joint: its pairs have p = 0 and q > 0, so +inf
    p = torch.rand(N, N, dtype=torch.float64)
    p[2] = 0
    x = torch.randn(N, D, dtype=torch.float64)
    assert torch.isfinite(ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl"))
    with pytest.raises(ValueError, match="Dense target with zeros.*alpha > 0"):
        ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl", normalization="joint")
    assert torch.isfinite(ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl", normalization="joint",
                                       alpha=0.1))
    # no pair with mass at all: the loss is 0 (an all-left-out batch), not an error
    zero = ik.icon_loss(x, target=ik.Dense(torch.zeros(N, N, dtype=torch.float64)), divergence="reverse_kl",
                        normalization="joint")
    assert zero == 0
