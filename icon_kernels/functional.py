"""``icon_loss`` and ``icon_loss_bidirectional``: the public functional entry points (DESIGN.md §2)."""
from __future__ import annotations

from .backends import bidirectional
from .backends.dispatch import loss


def icon_loss(x, y=None, *, target, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0,
              exponent=1.0, alpha=0.0, beta=0.0, exclude_self=None, divergence="kl",
              normalization="conditional", reduction="mean", weight=None, backend="auto"):
    """The I-Con loss mean_i D(p(.|i) || q(.|i)) between a supervisory target and a learned kernel
    (D is the KL divergence by default).

    x: (N, d) row embeddings; y: (M, d) column embeddings, or None for y = x. target:
    ik.Labels | ik.Neighbors | ik.Affinity | ik.Dense. kernel: dot, cosine, gaussian, student_t,
    power or log_dot, with temperature (dot, cosine), sigma (gaussian), dof (student_t) or
    exponent (power: s = -(n/2) log(||x_i - y_j||^2 + eps), eps = families.POWER_EPS = 1e-12, a
    library constant), each a finite float > 0 or a scalar / (N,) tensor that may require grad.
    alpha / beta mix a uniform distribution into p / q. divergence: "kl" or "cross_entropy", or one of the
    f-divergences "reverse_kl", "tv", "hellinger", "js", "chi2" (DESIGN.md §1.1), on every
    backend.

    normalization: "conditional" (the default: one distribution q(.|i) per row, the loss a mean
    of row divergences) or "joint" (DESIGN.md §1.2; van der Maaten's t-SNE): q_ij = e^{s_ij} / Z
    over all valid pairs, p the target's weights renormalised over all valid pairs (Labels: 1
    on positives; Neighbors: its weights; Dense: p; Affinity: its rows p(j|i)), alpha / beta
    mix in 1 / (number of valid pairs), and the loss is the single divergence
    sum_ij D-term(p_ij, q_ij). Under "joint", reduction "mean" and "sum" both return that one
    divergence (no mean over rows), "none" returns the per-row contributions sum_j D-term(p_ij,
    q_ij), which sum to it (a row's contribution may be negative for kl); ``weight`` raises
    (there are no row losses to weight). Joint normalisation and a target with symmetrize=True
    (Affinity, Neighbors: p_ij ∝ (p_{j|i} + p_{i|j}) / 2; square problems only) run on the fused
    ``cpu`` kernel ("auto" picks it on the CPU; in self mode its symmetric schedules, README
    "Backends"), on the ``torch`` backend's column stream (O(N d) memory, rows x all columns
    tiles, two forward passes with the global normalisers between them; any device), on the
    dense reference, and through ik.distributed in either dist_mode; the ``triton`` and ``cuda``
    kernels raise. The gradient of a symmetrised target's own tensors (its z, parameters or
    weights) needs backend="reference" ("auto" picks it then); that of a Neighbors or Dense
    target's weights under joint normalisation needs "torch" or "reference".

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
                exponent=exponent, alpha=alpha, beta=beta, exclude_self=exclude_self, divergence=divergence,
                normalization=normalization, reduction=reduction, weight=weight, backend=backend)


def icon_loss_bidirectional(x, y, *, target, kernel="cosine", temperature=0.1, sigma=1.0, dof=1.0, exponent=1.0,
                            alpha=0.0, beta=0.0, exclude_self=False, divergence="kl", normalization="conditional",
                            reduction="mean", backend="auto"):
    """Both directions of the I-Con loss between x and y: 1/2 [L(x->y) + L(y->x)] (CLIP, CMC;
    DESIGN.md §1.3), each L as ``icon_loss`` computes it with the same options.

    L(x->y) is ``icon_loss(x, y, target=target, ...)``: x's rows over y's columns. L(y->x) has y's
    rows over x's columns, the same kernel and parameter, and the transposed target: the
    transpose of the target's weights renormalised over y's rows (Labels(row_labels, col_labels)
    becomes Labels(col_labels, row_labels); Dense(p) becomes Dense(p.T); Neighbors lists, for each
    row of y, the rows of x that list it, with their weights; Affinity(z, z_cols) becomes
    Affinity(z_cols, z); a symmetrised target stays itself). The kernel's parameter must be one
    value (a float or a one-element tensor, which may require grad); an Affinity target's too.

    A Labels target with beta = 0 and divergence "kl" or "cross_entropy" takes one pass for both
    directions on three backends. ``cpu`` (also "auto" on the CPU; dot, cosine or gaussian
    kernel): the row and column statistics from the same strips of S = x y^T, and one backward
    with H = W_row + W_col^T, four N M d GEMM-equivalents for forward + backward where two
    ``icon_loss`` calls take eight. ``triton`` (every kernel): one backward for both directions.
    ``torch`` (every kernel; two calls under torch.compile): the same algorithm in PyTorch. Every
    other problem, and every problem under ICON_KERNELS_SYMMETRIC=0, is computed as the two
    ``icon_loss`` calls on the chosen backend.

    exclude_self (square problems only) leaves out the pairs (i, i) in both directions.
    normalization must be "conditional" (under "joint" the two directions are one divergence:
    call ``icon_loss``). reduction: "mean" is 1/2 (mean of L(x->y)'s rows + mean of L(y->x)'s
    rows), each over its included rows; "sum" is 1/2 (sum + sum); "none" returns the pair
    (L(x->y)_i / 2 for x's N rows, L(y->x)_j / 2 for y's M rows), whose total is "sum".
    """
    return bidirectional.loss(x, y, target=target, kernel=kernel, temperature=temperature, sigma=sigma, dof=dof,
                              exponent=exponent, alpha=alpha, beta=beta, exclude_self=exclude_self,
                              divergence=divergence, normalization=normalization, reduction=reduction,
                              backend=backend)
