"""``icon_loss``: the public functional entry point (DESIGN.md §2)."""
from __future__ import annotations

from .backends.dispatch import loss


def icon_loss(x, y=None, *, target, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0,
              alpha=0.0, beta=0.0, exclude_self=None, divergence="kl", reduction="mean",
              weight=None, backend="auto"):
    """The I-Con loss mean_i D(p(.|i) || q(.|i)) between a supervisory target and a learned kernel
    (D is the KL divergence by default).

    x: (N, d) row embeddings; y: (M, d) column embeddings, or None for y = x. target:
    ik.Labels | ik.Neighbors | ik.Affinity | ik.Dense. kernel: dot, cosine, gaussian, student_t
    or log_dot, with temperature (dot, cosine), sigma (gaussian) or dof (student_t), each a
    finite float > 0 or a scalar / (N,) tensor that may require grad. alpha / beta mix a uniform
    distribution into p / q. divergence: "kl" or "cross_entropy", or one of the
    f-divergences "reverse_kl", "tv", "hellinger", "js", "chi2" (DESIGN.md §1.1), which run on
    the dense reference backend for now ("auto" picks it; the fused backends raise).

    exclude_self: None (the default) leaves the self pairs (i, i) out exactly when y is None;
    passing y=x explicitly keeps them (give exclude_self=True to drop them). A row with no valid
    column or no positive is left out: 0 in "none", out of the mean's denominator.

    reduction: "mean" (weighted by ``weight`` over the rows that are included), "sum" (of
    w_i L_i), or "none": an N-vector of w_i L_i when ``weight`` is given (L_i without it), 0 for
    rows left out. ``weight`` is an (N,) tensor of weights >= 0; all-zero weights give a loss of
    0 with zero gradients.

    Gradients reach x, y, the kernel parameters and every target tensor that requires grad
    (Affinity z, z_cols and parameters, Neighbors weights, Dense p) on every backend. Double
    backward (create_graph=True, then a second backward) needs backend="reference"; the fused
    backends raise NotImplementedError there. Under torch.autocast the fused backends run
    their GEMMs outside autocast and accumulate in fp32. NaN or Inf inside an input tensor gives
    a NaN loss. backend: "auto", or one of ik.available_backends().
    """
    return loss(x, y, target=target, kernel=kernel, temperature=temperature, sigma=sigma, dof=dof,
                alpha=alpha, beta=beta, exclude_self=exclude_self, divergence=divergence,
                reduction=reduction, weight=weight, backend=backend)
