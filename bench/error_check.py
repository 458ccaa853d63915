"""Error of a contender's loss and gradients against a reference: naive's own run, or an fp32
reference on the upcast inputs for half-precision rows."""
from __future__ import annotations

from contenders import NAIVE, build
from fwd_bwd import fwd_bwd


def grads_of(cfg, inp):
    return [inp[k].grad.detach().float().clone() if inp[k].grad is not None else None for k in cfg.leaves]


def errors_against(loss, grads, ref):
    """Relative loss error and max gradient error relative to max |reference gradient|."""
    ref_loss, ref_grads = ref
    out = {"err_loss_rel": abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)}
    g_err = 0.0
    for g, r in zip(grads, ref_grads):
        if g is None or r is None:
            continue
        scale = float(r.abs().max()) or 1.0
        g_err = max(g_err, float((g - r).abs().max()) / scale)
    out["err_grad_rel"] = g_err
    out["max_err"] = max(out["err_loss_rel"], g_err)
    return out


def reference_oracle(cfg, inp, device):
    """fp32 reference loss and gradients on the upcast inputs (for half-precision rows)."""
    up = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
          for k, v in inp.items()}
    _, loss = fwd_bwd(build(NAIVE, cfg, up), up, device)
    return loss, grads_of(cfg, up)
