"""Double backward (torch.autograd.grad(..., create_graph=True), then a second backward, e.g. a
gradient penalty) is supported by the dense reference only. Everywhere else the second backward
raises this module's NotImplementedError, never an opaque error or a silently constant gradient.
"""
from __future__ import annotations

import torch


def message(where: str) -> str:
    return (f"double backward (torch.autograd.grad(..., create_graph=True) and a second backward, "
            f"e.g. a gradient penalty) is not supported by {where}; use the single-process "
            f"ik.icon_loss with backend='reference', which supports it")


class _Raise(torch.autograd.Function):
    """Passes gradients through; differentiating them again raises."""

    @staticmethod
    def forward(ctx, where, *grads):
        ctx.where = where
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(message(ctx.where))


def guard(grads, where: str):
    """Inside a custom backward run with create_graph=True: the gradients (None kept), each behind
    a node whose backward raises. A gradient computed without a graph would otherwise be taken as
    a constant by the second backward, silently."""
    if not torch.is_grad_enabled():
        return grads
    slots = [k for k, g in enumerate(grads) if g is not None]
    wrapped = _Raise.apply(where, *[grads[k].detach().requires_grad_() for k in slots])
    out = list(grads)
    for k, g in zip(slots, wrapped):
        out[k] = g
    return out
