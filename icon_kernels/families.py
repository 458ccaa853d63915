"""One table per axis of the I-Con family: learned kernels, target types, divergences.

Every layer reads names, parameter keywords and op codes from here: validation, the torch paths
(whose per-pair math is the ``logit`` / ``weight`` / parameter functions of each kernel row), the
presets and the tests. The Triton launchers (triton/launchers.py) and the C++ enums
(csrc/tile_math.h) hold copies of the codes, since those layers do not import this package;
tests/test_families.py checks that all three agree. The oracle (reference.py) keeps its own formulas. DESIGN.md §1 gives the math.

To add a learned kernel: a row in LEARNED_KERNELS here (CONTRIBUTING.md has the whole recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .targets import Affinity, Dense, Labels, Neighbors


@dataclass(frozen=True)
class LearnedKernel:
    """One learned kernel q_ij ∝ exp(s_ij). ``aux`` is a_i·b_j, or the squared distance clamped
    at 0 for a distance kernel; ``prm`` is the per-row parameter (a column R x 1)."""
    name: str
    param: Optional[str]        # keyword of its parameter (None: no parameter)
    code: int                   # op code: triton/launchers.py KERNEL_CODES, csrc/tile_math.h enum Kernel
    distance: bool              # s depends on ||a - b||² (the op needs the squared norms)
    symmetric: bool             # s(a, b) = s(b, a) for a shared parameter
    normalise: bool             # rows are L2-normalised first (cosine: dot on unit rows)
    logit: Callable             # (aux, prm) -> s
    weight: Callable            # (G, aux, prm) -> W with dL/da_i = sum_j W_ij b_j - [distance] (sum_j W_ij) a_i
    param_from_sum: Optional[Callable] = None   # (sum_j G_ij basis_ij, prm_i) -> dL/dprm_i
    param_basis: Optional[Callable] = None   # (aux, prm) -> basis; None: basis = s (shifted by a row constant)


def _student_t_dlogit_ddof(aux: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """ds/dnu, evaluated in float64 and rounded once: in fp32 its two terms leave ~1 ulp of 1 on
    every pair, which came back in dL/dnu at up to 5x PyTorch's own error at M = 2e4."""
    acc = aux.dtype if aux.device.type == "mps" else torch.float64
    a64, p64 = aux.to(acc), prm.to(acc)
    return (-0.5 * torch.log1p(a64 / p64) + 0.5 * (p64 + 1) * a64 / (p64 * (p64 + a64))).to(aux.dtype)


# the power kernel's epsilon: s = -(n/2) log(d² + POWER_EPS) stays finite at d² = 0 (the self pair
# when it is valid). A library constant, not an argument; csrc/tile_math.h and
# triton/tile_helpers.py hold copies (tests/test_families.py checks they agree).
POWER_EPS = 1e-12


def _power_basis(aux: torch.Tensor, prm) -> torch.Tensor:
    """ds/dn of the power kernel: -(1/2) log(d² + eps)."""
    return -0.5 * torch.log(aux + POWER_EPS)


_DOT = dict(param="temperature", code=0, distance=False, symmetric=True,
            logit=lambda aux, prm: aux / prm,
            weight=lambda g, aux, prm: g / prm,
            param_from_sum=lambda total, prm: -total / prm)

LEARNED_KERNELS: Dict[str, LearnedKernel] = {k.name: k for k in (
    LearnedKernel("dot", normalise=False, **_DOT),
    LearnedKernel("cosine", normalise=True, **_DOT),
    LearnedKernel("gaussian", param="sigma", code=1, distance=True, symmetric=True, normalise=False,
                  logit=lambda aux, prm: aux / (-2 * prm * prm),
                  weight=lambda g, aux, prm: g / (prm * prm),
                  param_from_sum=lambda total, prm: -2 * total / prm),
    LearnedKernel("student_t", param="dof", code=2, distance=True, symmetric=True, normalise=False,
                  logit=lambda aux, prm: -0.5 * (prm + 1) * torch.log1p(aux / prm),
                  weight=lambda g, aux, prm: g * (prm + 1) / (prm + aux),
                  param_from_sum=lambda total, prm: total,
                  param_basis=_student_t_dlogit_ddof),
    # the cluster kernel of I-Con's k-means: s = log(a.b) on soft assignments, no parameter
    LearnedKernel("log_dot", param=None, code=3, distance=False, symmetric=True, normalise=False,
                  logit=lambda aux, prm: torch.log(aux),
                  weight=lambda g, aux, prm: torch.where(g != 0, g / aux, 0.0)),   # padding: a.b = 0, g = 0
    # harmonic loss (Baek et al., arXiv 2502.01628): q ∝ (d² + eps)^(-n/2), exponent n
    LearnedKernel("power", param="exponent", code=4, distance=True, symmetric=True, normalise=False,
                  logit=lambda aux, prm: prm * _power_basis(aux, prm),
                  weight=lambda g, aux, prm: g * prm / (aux + POWER_EPS),
                  param_from_sum=lambda total, prm: total,
                  param_basis=_power_basis),
)}
# the op codes (cosine arrives as dot on normalised rows)
KERNEL_CODES: Dict[str, int] = {k.name: k.code for k in LEARNED_KERNELS.values() if not k.normalise}


@dataclass(frozen=True)
class TargetType:
    name: str                   # the op's target argument
    code: int                   # triton/launchers.py TARGET_CODES, csrc/tile_math.h enum Target
    cls: type                   # its public class (targets.py)


TARGET_TYPES_BY_NAME: Dict[str, TargetType] = {t.name: t for t in (
    TargetType("labels", 0, Labels), TargetType("neighbors", 1, Neighbors),
    TargetType("affinity", 2, Affinity), TargetType("dense", 3, Dense),
)}
TARGET_CODES: Dict[str, int] = {t.name: t.code for t in TARGET_TYPES_BY_NAME.values()}


@dataclass(frozen=True)
class Divergence:
    name: str
    code: int
    has_entropy: bool           # kl adds sum p~ log p~ to the cross term; cross_entropy does not
    # the backends that compute it; "auto" picks among these (every backend computes every
    # divergence of DESIGN.md §1.1 now; a new divergence may start on fewer)
    backends: Tuple[str, ...] = ("reference", "torch", "cpu", "triton", "cuda")


_F_DIVERGENCE_BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
DIVERGENCES: Dict[str, Divergence] = {d.name: d for d in (
    Divergence("kl", 0, has_entropy=True),
    Divergence("cross_entropy", 1, has_entropy=False),
    Divergence("reverse_kl", 2, has_entropy=False, backends=_F_DIVERGENCE_BACKENDS),
    Divergence("tv", 3, has_entropy=False, backends=_F_DIVERGENCE_BACKENDS),
    Divergence("hellinger", 4, has_entropy=False, backends=_F_DIVERGENCE_BACKENDS),
    Divergence("js", 5, has_entropy=False, backends=_F_DIVERGENCE_BACKENDS),
    Divergence("chi2", 6, has_entropy=False, backends=_F_DIVERGENCE_BACKENDS),
)}


# normalization= (DESIGN.md §1.2) -> the backends that compute it: "conditional" is one distribution
# per row (everywhere), "joint" one distribution over all valid pairs (the dense reference, and
# the torch backend on its column stream, backends/column_stream.py)
NORMALIZATIONS: Dict[str, Tuple[str, ...]] = {
    "conditional": ("reference", "torch", "cpu", "triton", "cuda"),
    "joint": ("reference", "torch", "cpu"),
}
# ... and those that differentiate a Neighbors or Dense target's weights under joint normalisation
# (the fused ops' weight gradients, backends/target_weight_grads.py, are the conditional rule)
JOINT_WEIGHT_GRAD_BACKENDS: Tuple[str, ...] = ("reference", "torch")
# the backends that build a symmetrised target (Affinity / Neighbors with symmetrize=True)
SYMMETRIZED_TARGET_BACKENDS: Tuple[str, ...] = ("reference", "torch", "cpu")
# ... and those that also differentiate a symmetrised target's own tensors (Affinity z and
# parameters, Neighbors weights): the torch backend's column stream does not
SYMMETRIZED_TARGET_GRAD_BACKENDS: Tuple[str, ...] = ("reference",)


_DIVERGENCE_BY_CODE: Dict[int, Divergence] = {d.code: d for d in DIVERGENCES.values()}
F_DIVERGENCE_CODES = tuple(d.code for d in DIVERGENCES.values() if d.name not in ("kl", "cross_entropy"))


def divergence_by_code(code: int) -> Divergence:
    """The row of op code ``code``; ValueError for a code not in the table."""
    try:
        return _DIVERGENCE_BY_CODE[int(code)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown divergence code {code!r}; known: {sorted(_DIVERGENCE_BY_CODE)}") from None


def learned_kernel(name: str) -> LearnedKernel:
    """The row of ``name``; ValueError for a name not in the table (never a fall-through)."""
    try:
        return LEARNED_KERNELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(LEARNED_KERNELS)}") from None
