"""One timed forward + backward of a contender (synchronised on CUDA), and the helpers around it."""
from __future__ import annotations

import time

import torch


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clear_grads(inp):
    for v in inp.values():
        if isinstance(v, torch.Tensor) and v.grad is not None:
            v.grad = None


def fwd_bwd(fn, inp, device):
    """Seconds for one forward + backward (synchronised on CUDA), and the loss."""
    clear_grads(inp)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        loss = fn()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, loss.detach()
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - t0, loss.detach()
