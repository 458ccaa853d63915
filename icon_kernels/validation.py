"""All argument checking of the public API, in one place (DESIGN.md §2).

Kernels and backends never check arguments; they receive what ``check_arguments`` returns.
Checks that read tensor *values* (signs, index ranges) are skipped while torch.compile traces,
because they would need a host sync; shape, dtype and device checks always run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .families import DIVERGENCES as DIVERGENCE_ROWS
from .families import LEARNED_KERNELS
from .families import NORMALIZATIONS as NORMALIZATION_ROWS

KERNELS = tuple(LEARNED_KERNELS)
# which keyword carries each kernel's parameter; log_dot has none
KERNEL_PARAM = {name: row.param for name, row in LEARNED_KERNELS.items()}
DIVERGENCES = tuple(DIVERGENCE_ROWS)
# the kernels with a parameter (the presets that take a kernel choice accept these)
PARAMETRIC_KERNELS = tuple(name for name, row in LEARNED_KERNELS.items() if row.param)
# The loss options of ik.icon_loss with their defaults, besides target, exclude_self, reduction,
# weight and backend: the one list that ik.icon_loss's signature, the presets and the
# distributed rank agreement read (tests/test_api.py checks the signature against it).
LOSS_OPTIONS = dict(kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0, exponent=1.0, alpha=0.0,
                    beta=0.0, divergence="kl", normalization="conditional")
REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = tuple(NORMALIZATION_ROWS)     # conditional | joint (DESIGN.md §1.2)

Scalar = Union[float, torch.Tensor]


@dataclass
class Problem:
    """The checked, normalised description of one loss evaluation."""

    x: torch.Tensor
    y: Optional[torch.Tensor]          # None: the columns are the rows
    kernel: str
    param: Scalar                       # the kernel's parameter (tau, sigma, nu or n); 1.0 for log_dot
    target: object
    alpha: float
    beta: float
    exclude_self: bool
    kl: bool
    divergence: str                    # kl, cross_entropy, or an f-divergence (DESIGN.md §1.1)
    reduction: str
    weight: Optional[torch.Tensor]
    # conditional (one distribution per row) or joint (one over all valid pairs; DESIGN.md §1.2)
    normalization: str = "conditional"

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def n_cols(self) -> int:
        return self.x.shape[0] if self.y is None else self.y.shape[0]


def checking_values() -> bool:
    return not torch.compiler.is_compiling()


def check_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put them on one device")


def check_matrix(name: str, t, rows: Optional[int] = None) -> torch.Tensor:
    """A 2-D floating tensor (rows x features), with ``rows`` rows when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    return t


def check_unit_interval(name: str, value) -> float:
    """A mixing weight (alpha, beta): a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")
    return float(value)


def check_features(name: str, t, rows: Optional[int], d: Optional[int], x: torch.Tensor) -> None:
    check_matrix(name, t, rows)
    if t.shape[1] == 0:
        raise ValueError(f"{name} has d = 0 features; the kernels need at least one")
    if d is not None and t.shape[1] != d:
        raise ValueError(f"{name} has feature dimension {t.shape[1]} but x has {d}")
    check_device(name, t, x)


def check_positive(name: str, value, x: torch.Tensor, n_rows: int) -> None:
    """A kernel parameter: a positive number, or a 0-d / (N,) floating tensor of positive values."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n_rows):
            raise ValueError(f"{name} must be a scalar or have shape ({n_rows},), got {tuple(value.shape)}")
        check_device(name, value, x)
        if checking_values() and bool((value <= 0).any()):
            raise ValueError(f"{name} must be > 0")
    elif value <= 0 or value == math.inf:  # NaN passes on purpose: NaN inputs give a NaN loss
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def inf_to_nan(value):
    """A tensor parameter with +-inf entries becomes NaN there (no host sync): Inf inside an
    input tensor gives a NaN loss (DESIGN.md §2), where tau = inf would otherwise give a finite
    uniform q. Floats (checked finite above) pass unchanged."""
    if isinstance(value, torch.Tensor):
        return torch.where(torch.isinf(value), float("nan"), value)
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def is_index_tensor(t) -> bool:
    """A tensor of signed integers (indices with -1 padding; unsigned dtypes would wrap -1)."""
    return (isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()
            and t.dtype.is_signed)


def check_labels(name: str, t, length: int, device, other: str = "x") -> torch.Tensor:
    """A 1-D integer (or bool) tensor of ``length`` labels on ``device`` (where ``other`` is)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor, got dtype {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {other} is on {device}; put them on one device")
    return t


def check_arguments(x, y, *, target, kernel, temperature, sigma, dof, exponent, alpha, beta, exclude_self,
                    divergence, reduction, weight, normalization="conditional") -> Problem:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    if n == 0:
        raise ValueError("x has N = 0 rows; the loss needs at least one row")
    if d == 0:
        raise ValueError("x has d = 0 features; the kernels need at least one")
    if y is not None:
        check_features("y", y, None, d, x)
        if y.dtype != x.dtype:
            raise TypeError(f"y has dtype {y.dtype} but x has {x.dtype}")
        if y.shape[0] == 0:
            raise ValueError("y has M = 0 rows")
    m = n if y is None else y.shape[0]
    check_choice("kernel", kernel, KERNELS)
    for name, value in (("temperature", temperature), ("sigma", sigma), ("dof", dof), ("exponent", exponent)):
        check_positive(name, value, x, n)
    for name, value in (("alpha", alpha), ("beta", beta)):
        check_unit_interval(name, value)
    if exclude_self is None:
        exclude_self = y is None
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool or None, got {type(exclude_self).__name__}")
    if exclude_self and m != n:
        raise ValueError(f"exclude_self=True needs as many columns as rows; y has {m} rows, x has {n}")
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    if normalization == "joint" and weight is not None:
        raise ValueError("weight is not defined with normalization='joint': the loss is one divergence over "
                         "all pairs, not a sum of row losses to weight (pass weight=None)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError("weight must be a floating-point tensor of shape (N,)")
        if tuple(weight.shape) != (n,):
            raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
        check_device("weight", weight, x)
        if checking_values() and bool((weight < 0).any()):
            raise ValueError("weight must be >= 0 (all-zero weights give a loss of 0 with zero gradients)")
    # the target's own checks live in its adapter, which builds on the checks above
    from .target_adapters import adapter_for
    target = adapter_for(target).check(target, x, y, n, m)
    if divergence == "reverse_kl" and alpha == 0 and adapter_for(target).name in ("labels", "neighbors"):
        raise ValueError("divergence='reverse_kl' against a Labels or Neighbors target with alpha = 0 is "
                         "+inf (p is 0 off the positives and q is not): set alpha > 0")
    if divergence == "reverse_kl" and alpha == 0 and adapter_for(target).name == "dense" and checking_values():
        valid = torch.ones(n, m, dtype=torch.bool, device=target.p.device)
        if exclude_self:
            valid &= ~torch.eye(n, m, dtype=torch.bool, device=target.p.device)
        # conditional rows with no mass are left out, not +inf; joint normalisation leaves no row
        # out, unless no pair has mass at all (then the loss is 0, as an all-left-out batch)
        mass = target.p * valid
        kept = mass.sum(1) != 0 if normalization == "conditional" else valid.any(1) & (mass.sum() != 0)
        if bool(((target.p == 0) & valid & kept[:, None]).any()):
            raise ValueError("divergence='reverse_kl' against a Dense target with zeros at valid pairs and "
                             "alpha = 0 is +inf (q log(q / 0)): set alpha > 0")
    param_name = KERNEL_PARAM[kernel]
    param = {"temperature": temperature, "sigma": sigma, "dof": dof, "exponent": exponent, None: 1.0}[param_name]
    return Problem(x=x, y=y, kernel=kernel, param=inf_to_nan(param), target=target, alpha=float(alpha),
                   beta=float(beta), exclude_self=exclude_self, kl=divergence == "kl", divergence=divergence,
                   reduction=reduction, weight=weight, normalization=normalization)


def check_parametric_kernel(kernel) -> str:
    """A learned kernel with a parameter (every kernel but log_dot)."""
    if not isinstance(kernel, str) or kernel not in PARAMETRIC_KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(PARAMETRIC_KERNELS)}; got {kernel!r}")
    return kernel
