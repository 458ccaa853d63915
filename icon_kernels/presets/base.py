"""What every preset loss shares: debiasing, reduction, backend and placement arguments, their
checks, and the evaluation through ``dispatch.run_loss``.

Debiasing (I-Con §3.3.2, uniform mixing): ``alpha`` mixes a uniform distribution into the
target, p~ = (1 - alpha) p + alpha / M'; ``beta`` mixes one into the learned side,
q~ = (1 - beta) q + beta / M'. Both default to 0 (the original method). The I-Con paper uses
small target-side mixing for its debiased InfoNCE clustering; values of about 0.1 to 0.3 are a
reasonable start (this range is our reading, not a figure checked against the paper's tables).
"""
from __future__ import annotations

import math

import torch

from ..backends.registry import ALL_BACKENDS
from ..validation import DIVERGENCES, REDUCTIONS, check_choice, check_matrix, check_unit_interval
from .dispatch import make_placement, run_loss


def check_positive(name: str, value):
    """A positive float, or a floating tensor (e.g. an nn.Parameter) of positive values."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if bool((value.detach() <= 0).any()):
            raise ValueError(f"{name} must be > 0")
        return value
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_views(view1, view2):
    check_matrix("view1", view1)
    check_matrix("view2", view2)
    if view1.shape != view2.shape:
        raise ValueError(f"view2 must have the shape of view1 {tuple(view1.shape)}, got {tuple(view2.shape)}")
    if view1.dtype != view2.dtype or view1.device != view2.device:
        raise ValueError("view2 must have the dtype and device of view1")


class PresetLoss(torch.nn.Module):
    """Base of the presets: holds alpha, beta, reduction, backend and where the loss runs.

    ``process_group`` (or ``distributed=True`` for the default group) makes the preset evaluate
    ``ik.distributed.icon_loss`` on this rank's rows with ``dist_mode`` ("gather" or "ring");
    otherwise it calls ``ik.icon_loss``. ``divergence`` replaces the preset's own (its paper's:
    ``DIVERGENCE``), e.g. SupCon with "tv" (Beyond I-Con, arXiv 2509.04734, reports TV and JS
    winning on supervised contrastive learning).
    """

    DIVERGENCE = "kl"

    def __init__(self, *, alpha=0.0, beta=0.0, reduction="mean", backend="auto",
                 process_group=None, dist_mode="gather", distributed=False, divergence=None):
        super().__init__()
        if divergence is not None:
            check_choice("divergence", divergence, DIVERGENCES)
        self.divergence = type(self).DIVERGENCE if divergence is None else divergence
        self.alpha = check_unit_interval("alpha", alpha)
        self.beta = check_unit_interval("beta", beta)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
        if not isinstance(backend, str) or (backend != "auto" and backend not in ALL_BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {', '.join(ALL_BACKENDS)}; got {backend!r}")
        self.reduction, self.backend = reduction, backend
        self.placement = make_placement(process_group, dist_mode, distributed)

    def _loss(self, x, y=None, *, target, **kwargs):
        return run_loss(x, y, target=target, placement=self.placement, alpha=self.alpha,
                        beta=self.beta, reduction=self.reduction, backend=self.backend,
                        divergence=self.divergence, **kwargs)

    def extra_repr(self) -> str:
        where = f", dist_mode={self.placement.dist_mode!r}" if self.placement.distributed else ""
        return (f"divergence={self.divergence!r}, alpha={self.alpha}, beta={self.beta}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}{where}")
