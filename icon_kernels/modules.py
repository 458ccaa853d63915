"""``ICon``: the loss as an nn.Module, a drop-in criterion."""
from __future__ import annotations

import torch

from .backends.registry import ALL_BACKENDS
from .functional import icon_loss
from .validation import DIVERGENCES, KERNELS, NORMALIZATIONS, REDUCTIONS, check_choice, check_unit_interval


class ICon(torch.nn.Module):
    """``ICon(kernel="student_t", dof=1.0, ...)(x, y=None, target=..., weight=None)``.

    Holds every keyword of ``ik.icon_loss`` except the per-call tensors. A tensor temperature,
    sigma, dof or exponent given here is used as is (wrap it in nn.Parameter to learn it). As in
    ``ik.icon_loss``: ``reduction="none"`` returns w_i L_i per row when ``weight`` is given (0 for
    rows left out); ``exclude_self=None`` drops the self pairs only when y is None (passing
    y=x keeps them). ``normalization="joint"`` makes the loss one divergence over all pairs
    (see ``ik.icon_loss``: "mean" and "sum" return it, "none" its per-row contributions).
    """

    def __init__(self, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0, exponent=1.0, alpha=0.0,
                 beta=0.0, exclude_self=None, divergence="kl", reduction="mean", backend="auto",
                 normalization="conditional"):
        super().__init__()
        # the choices and mixing weights are checked here, so that a typo fails at construction and
        # not at the first call; the kernel parameters (floats or tensors) are checked per call
        check_choice("kernel", kernel, KERNELS)
        check_choice("divergence", divergence, DIVERGENCES)
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("backend", backend, ("auto",) + ALL_BACKENDS)
        alpha, beta = check_unit_interval("alpha", alpha), check_unit_interval("beta", beta)
        if exclude_self is not None and not isinstance(exclude_self, bool):
            raise TypeError(f"exclude_self must be a bool or None, got {type(exclude_self).__name__}")
        self.kernel, self.temperature, self.sigma, self.dof = kernel, temperature, sigma, dof
        self.exponent = exponent
        self.alpha, self.beta, self.exclude_self = alpha, beta, exclude_self
        self.divergence, self.reduction, self.backend = divergence, reduction, backend
        self.normalization = normalization

    def forward(self, x, y=None, *, target, weight=None):
        return icon_loss(x, y, target=target, kernel=self.kernel, temperature=self.temperature,
                         sigma=self.sigma, dof=self.dof, exponent=self.exponent, alpha=self.alpha, beta=self.beta,
                         exclude_self=self.exclude_self, divergence=self.divergence,
                         normalization=self.normalization, reduction=self.reduction, weight=weight, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel!r}, divergence={self.divergence!r}, "
                f"normalization={self.normalization!r}, reduction={self.reduction!r}, backend={self.backend!r}")
