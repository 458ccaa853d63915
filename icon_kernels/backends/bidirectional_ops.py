"""Schemas, fake implementations and autograd of the bidirectional label ops (DESIGN.md §1.3): both
directions of 1/2 [L(x->y) + L(y->x)] over one S = x y^T, for a Labels target with beta = 0 and KL
or cross-entropy, one kernel parameter (cosine as dot on normalised rows). One op pair per backend,
``icon_kernels::<backend>_bidirectional_forward`` / ``_backward``: ``cpu`` (kernels in
csrc/cpu_bidirectional_labels.cpp: dot and Gaussian) and ``triton`` (triton/launchers.py
bidirectional_forward / _backward: every kernel).

The forward returns (rows_x, included_x, stats_x, rows_y, included_y, stats_y): the row losses,
included rows and [4, rows] statistics of x's rows over y (direction x -> y), then of y's rows over
x. The backward takes the upstream gradients of both directions' row losses and returns (dx, dy,
dparam); it reads its own forward's stats (the cpu op checks the record there). need_x_grad and
need_y_grad False let it skip a GEMM (a frozen tower, as in LiT): that gradient is then zeros.
"""
from __future__ import annotations

import torch

ARGS = ("Tensor x, Tensor y, Tensor param, str kernel, Tensor row_labels, Tensor col_labels, float alpha, "
        "bool exclude_self, int divergence")
FORWARD_SCHEMA = f"({ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = (f"(Tensor grad_x_rows, Tensor grad_y_rows, {ARGS}, Tensor valid_x, Tensor stats_x, "
                   "Tensor valid_y, Tensor stats_y, bool need_param_grad, bool need_x_grad, bool need_y_grad)"
                   " -> (Tensor, Tensor, Tensor)")
N_ARGS = 9


def _side(t: torch.Tensor, acc: torch.dtype):
    n = t.shape[0]
    return t.new_empty(n, dtype=acc), t.new_empty(n, dtype=torch.bool), t.new_empty(4, n, dtype=acc)


def _fake_forward(x, y, *rest):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (*_side(x, acc), *_side(y, acc))


def _fake_backward(grad_x_rows, grad_y_rows, x, y, param, *rest):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(param)


def _setup_context(ctx, inputs, output):
    _, valid_x, stats_x, _, valid_y, stats_y = output
    ctx.inputs = inputs
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], inputs[4], inputs[5], valid_x, stats_x, valid_y, stats_y)
    ctx.mark_non_differentiable(valid_x, stats_x, valid_y, stats_y)


def _make_backward(backward_op):
    def backward(ctx, grad_x_rows, _gvx, _gsx, grad_y_rows, _gvy, _gsy):
        x, y, param, row_labels, col_labels, valid_x, stats_x, valid_y, stats_y = ctx.saved_tensors
        _, _, _, kernel, _, _, alpha, exclude_self, divergence = ctx.inputs
        # an unused direction's upstream gradient arrives as None
        grad_x_rows = torch.zeros_like(stats_x[0]) if grad_x_rows is None else grad_x_rows
        grad_y_rows = torch.zeros_like(stats_y[0]) if grad_y_rows is None else grad_y_rows
        need = ctx.needs_input_grad
        dx, dy, dparam = backward_op(grad_x_rows, grad_y_rows, x, y, param, kernel, row_labels, col_labels, alpha,
                                     exclude_self, divergence, valid_x, stats_x, valid_y, stats_y,
                                     need[2], need[0], need[1])
        return (dx if need[0] else None, dy if need[1] else None, dparam) + (None,) * (N_ARGS - 3)
    return backward


def _double_backward(name: str):
    def backward(ctx, *grads):
        from .second_backward import message
        raise NotImplementedError(message(f"the fused backend {name!r} (bidirectional)"))
    return backward


def _no_context(ctx, inputs, output):
    pass


def register(name: str, forward_impl=None, backward_impl=None) -> None:
    """Defines icon_kernels::{name}_bidirectional_forward / _backward with fake and autograd: from
    the C++ kernels of icon_kernels._C without implementations, else as custom ops of them."""
    fwd_name = f"icon_kernels::{name}_bidirectional_forward"
    bwd_name = f"icon_kernels::{name}_bidirectional_backward"
    if forward_impl is None:
        torch.library.define(fwd_name, FORWARD_SCHEMA)
        torch.library.define(bwd_name, BACKWARD_SCHEMA)
        torch.library.register_fake(fwd_name, _fake_forward)
        torch.library.register_fake(bwd_name, _fake_backward)
        bwd = getattr(torch.ops.icon_kernels, f"{name}_bidirectional_backward").default
        torch.library.register_autograd(fwd_name, _make_backward(bwd), setup_context=_setup_context)
        torch.library.register_autograd(bwd_name, _double_backward(name), setup_context=_no_context)
        return
    fwd = torch.library.custom_op(fwd_name, forward_impl, mutates_args=(), schema=FORWARD_SCHEMA)
    bwd = torch.library.custom_op(bwd_name, backward_impl, mutates_args=(), schema=BACKWARD_SCHEMA)
    fwd.register_fake(_fake_forward)
    bwd.register_fake(_fake_backward)
    fwd.register_autograd(_make_backward(bwd), setup_context=_setup_context)
    bwd.register_autograd(_double_backward(name), setup_context=_no_context)


def forward_op(name: str):
    return getattr(torch.ops.icon_kernels, f"{name}_bidirectional_forward")
