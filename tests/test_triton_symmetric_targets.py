"""Self mode's triangular schedule on the Triton backend for Dense and Neighbors targets
(triton/symmetric_kernels.py with TARGET 3 or 1, launched by triton/triangular_launches.py, routed by
triton/launchers.py: y omitted, one learned parameter, conditional rows, every divergence, alpha and
beta). Each side of a tile takes its own rows' target: the column side (rows j over the columns of I)
reads p_ji = w[j, i] / W_j (the transposed tile of w and row j's total) or row j's neighbour entries
that fall into I's block (tile_helpers.column_target_weights, column_neighbor_weights). A Neighbors
target's p is formed in the tiles under every divergence there (kl and cross_entropy too: no sparse
gather). Under TRITON_INTERPRET=1 without a GPU: fp32 against the float64 reference (within TRITON_F32
plus twice the float32 reference's own error, as tests/test_triton_symmetric_affinity_family.py) and
against the plain kernels (ICON_KERNELS_SYMMETRIC=0), with upstream gradients != 1, rows without
target (left out), the learned parameter's gradient, the target weights' gradient after the triangular
forward, and launch counts that show which kernels ran."""

import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error
from test_triton_symmetric_affinity import ALL
from test_triton_symmetric_schedule import TRIANGULAR, Launches

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof"}
PARAM = {"dot": 0.8, "cosine": 0.3, "gaussian": 1.3, "student_t": 1.3}
K = 5            # neighbour entries per row


def _inputs(n, seed, d=5, dtype=torch.float64):
    """x, the Dense weights (n x n, about half zero, row 1 all zero: left out), the Neighbors lists
    (n x K: -1 padding, repeated entries, self entries, row 1 all padding: left out), their weights,
    and upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    w = torch.rand(n, n, generator=gen, dtype=dtype)
    w = torch.where(torch.rand(n, n, generator=gen, dtype=dtype) < 0.5, 0.0, w)
    idx = torch.randint(-1, n, (n, K), generator=gen)
    idx[:, K - 1] = idx[:, 0]                      # a repeated entry in every row (or padding twice)
    idx[0, 1] = 0                                  # row 0 lists itself
    nw = torch.rand(n, K, generator=gen, dtype=dtype) + 0.1
    if n > 1:
        w[1] = 0.0
        idx[1] = -1
    upstream = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    return x, w, (idx, nw), upstream


def _target(kind, w, nbrs, device, dtype, weight_grad):
    if kind == "dense":
        weights = w.to(device, dtype).requires_grad_(weight_grad)
        return ik.Dense(weights), weights
    weights = nbrs[1].to(device, dtype).requires_grad_(weight_grad)
    return ik.Neighbors(nbrs[0].to(device), weights), weights


def _run(x0, kind, w, nbrs, kernel, backend, upstream, dtype, weight_grad=False, **options):
    """(loss rows, dx, dparam[, dw]) of icon_loss(x, target=Dense(w) or Neighbors(idx, nw)), y
    omitted, with upstream gradients ``upstream`` (reduction "none")."""
    device = "cpu" if backend == "reference" else device_of("triton")
    x = x0.detach().to(device, dtype).requires_grad_()
    p = torch.tensor(PARAM[kernel], dtype=dtype, device=device, requires_grad=True)
    target, weights = _target(kind, w, nbrs, device, dtype, weight_grad)
    rows = ik.icon_loss(x, target=target, kernel=kernel, **{PARAM_NAME[kernel]: p}, backend=backend,
                        reduction="none", **options)
    wrt = (x, p, weights) if weight_grad else (x, p)
    grads = torch.autograd.grad(rows, wrt, grad_outputs=upstream.to(device, rows.dtype))
    return [g.detach().cpu() for g in (rows, *grads)]


def _two_pass(divergence, beta):
    return beta > 0 or divergence not in ("kl", "cross_entropy")


def _check_both_schedules(monkeypatch, x, kind, w, nbrs, upstream, kernel, panels=1, weight_grad=False,
                          divergence="kl", alpha=0.0, beta=0.0, **options):
    """The triangular schedule (its forward and merge kernels once per panel and pass, its backward
    once, no plain kernel, no Neighbors gather) and the plain one (no triangular kernel) against
    each other and the float64 reference: loss rows, dx, dparam (and the target weights' gradient)."""
    from icon_kernels._triton import launchers
    options = dict(options, divergence=divergence, alpha=alpha, beta=beta)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    gathers = []
    for name in ("_neighbor_forward", "_neighbor_backward"):      # the kernels' sparse gather of kl's pairs
        monkeypatch.setattr(launchers, name, lambda *a, gather=getattr(launchers, name): gathers.append(1) or gather(*a))
    launches = Launches(monkeypatch, ALL)
    got = _run(x, kind, w, nbrs, kernel, "triton", upstream, torch.float32, weight_grad, **options)
    sweeps = 2 if _two_pass(divergence, beta) else 1
    want_counts = dict.fromkeys(ALL, 0)
    want_counts.update(_triangular_forward_kernel=sweeps * panels, _triangular_merge_kernel=sweeps * panels,
                       _triangular_backward_kernel=1)
    assert launches.count == want_counts, launches.count
    assert not gathers
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = _run(x, kind, w, nbrs, kernel, "triton", upstream, torch.float32, weight_grad, **options)
    assert launches.triangular() == 0, launches.count
    assert launches.count["_forward_kernel"] == launches.count["_cols_kernel"] == 1, launches.count
    assert launches.count["_mixture_kernel"] == int(sweeps == 2), launches.count
    assert len(gathers) == 2 * (kind == "neighbors" and divergence in ("kl", "cross_entropy")), gathers
    want = _run(x, kind, w, nbrs, kernel, "reference", upstream, torch.float64, weight_grad, **options)
    naive = _run(x, kind, w, nbrs, kernel, "reference", upstream, torch.float32, weight_grad, **options)
    if x.shape[0] > 2:
        assert want[1].norm() > 0, "a problem without gradient tests nothing"
    errors = []
    for what, mine, theirs, exact, fp32 in zip(("rows", "dx", "dparam", "dw"), got, plain, want, naive):
        assert torch.isfinite(mine).all(), what
        assert relative_error(mine, theirs) <= TRITON_F32, (what, relative_error(mine, theirs))
        errors.append(relative_error(mine, exact))
        assert errors[-1] <= TRITON_F32 + 2 * relative_error(fp32, exact), (what, errors[-1])
    if x.shape[0] > 1:
        assert got[0][1] == 0 and want[0][1] == 0, got[0]      # row 1 has no target: left out
    return max(errors)


# (divergence, alpha, beta): the closed form (kl, cross_entropy at beta = 0, with and without alpha),
# beta > 0, and every f-divergence (reverse_kl needs alpha > 0 against a target with zeros)
OBJECTIVES = [("kl", 0.0, 0.0), ("cross_entropy", 0.0, 0.0), ("kl", 0.2, 0.0), ("kl", 0.0, 0.2),
              ("cross_entropy", 0.1, 0.2), ("reverse_kl", 0.1, 0.0), ("tv", 0.0, 0.0), ("hellinger", 0.0, 0.1),
              ("js", 0.1, 0.0), ("chi2", 0.2, 0.1)]
KERNELS = ["dot", "cosine", "gaussian", "student_t"]
# (N, exclude_self): ragged over the interpreter's 32-row blocks (33: one row past a block; 45: the
# second block partly empty), N = 2 (the diagonal block only), both exclude_self
SHAPES = [(37, True), (45, False), (33, True), (2, False), (45, True), (33, False)]


@pytest.mark.parametrize("kind", ["dense", "neighbors"])
@pytest.mark.parametrize("divergence,alpha,beta", OBJECTIVES)
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, kind, divergence, alpha, beta):
    """Every objective for both targets, the learned kernel and the shape turning with them (so that
    each target meets every kernel and several shapes)."""
    objective = OBJECTIVES.index((divergence, alpha, beta))
    shift = int(kind == "neighbors")
    kernel = KERNELS[(objective + shift) % len(KERNELS)]
    n, exclude_self = SHAPES[(objective + 3 * shift) % len(SHAPES)]
    x, w, nbrs, upstream = _inputs(n, seed=n + objective)
    _check_both_schedules(monkeypatch, x, kind, w, nbrs, upstream, kernel, divergence=divergence, alpha=alpha,
                          beta=beta, exclude_self=exclude_self)


@pytest.mark.parametrize("kind", ["dense", "neighbors"])
@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.1, 0.0), ("js", 0.0, 0.1)])
def test_several_panels_chunks_and_tiles_per_block(monkeypatch, kind, divergence, alpha, beta):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel and one column block per
    program: every tile's column side lands in a partial of its own, read back by the merge."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    x, w, nbrs, upstream = _inputs(70, seed=4)
    _check_both_schedules(monkeypatch, x, kind, w, nbrs, upstream, "gaussian", panels=3, divergence=divergence,
                          alpha=alpha, beta=beta)


@pytest.mark.parametrize("kind", ["dense", "neighbors"])
@pytest.mark.parametrize("divergence,alpha,beta", [("kl", 0.0, 0.0), ("cross_entropy", 0.1, 0.2), ("hellinger", 0.1, 0.0)])
def test_target_weights_gradient_after_the_triangular_forward(monkeypatch, kind, divergence, alpha, beta):
    """w (Dense) or the neighbour weights requiring grad: the triangular forward's stats row 0 (LSE)
    feeds the package's target weight gradient (backends/target_weight_grads.py), and the
    triangular backward still makes dx and dparam."""
    x, w, nbrs, upstream = _inputs(37, seed=9)
    _check_both_schedules(monkeypatch, x, kind, w, nbrs, upstream, "student_t", weight_grad=True,
                          divergence=divergence, alpha=alpha, beta=beta, exclude_self=True)


@pytest.mark.parametrize("kind", ["dense", "neighbors"])
def test_weighted_mean_and_feature_chunks(monkeypatch, kind):
    """reduction="mean" with row weights, and d beyond the register budget (shrunk: d = 50 in
    chunks of 16): the backward has one program per chunk of dX."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x0, w, nbrs, weight = _inputs(40, seed=2, d=50)
    options = dict(kernel="dot", temperature=0.5, divergence="tv", beta=0.1)

    def run(backend, dtype):
        device = "cpu" if backend == "reference" else device_of("triton")
        x = x0.to(device, dtype).requires_grad_()
        target, _ = _target(kind, w, nbrs, device, dtype, False)
        loss = ik.icon_loss(x, target=target, backend=backend, weight=weight.to(device, dtype), **options)
        return loss.detach().cpu(), torch.autograd.grad(loss, x)[0].cpu()

    launches = Launches(monkeypatch, ALL)
    got = run("triton", torch.float32)
    assert launches.count["_triangular_backward_kernel"] == 1 and launches.count["_cols_kernel"] == 0
    want = run("reference", torch.float64)
    for mine, exact in zip(got, want):
        assert relative_error(mine, exact) <= TRITON_F32


@pytest.mark.parametrize("kind", ["dense", "neighbors"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.0), ("chi2", 0.1)])
def test_the_stats_and_the_record(monkeypatch, kind, divergence, beta):
    """The forward op with x and y one tensor runs the triangular forward: the plain forward's stats
    rows 0 (LSE), 1 (1, R_i or Gamma_i) and 2 (the row normaliser), and its BLOCK_M in row 3, which
    a plain forward (y a copy) leaves 0."""
    from icon_kernels._triton import launchers
    from icon_kernels.backends.ops import forward_op
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x, w, (idx, nw), _ = _inputs(40, seed=7, dtype=torch.float32)
    x, w, idx, nw = x.to(device), w.to(device), idx.to(device), nw.to(device)
    code = ik.families.DIVERGENCES[divergence].code
    launches = Launches(monkeypatch, ALL)
    target = (None, None, w) if kind == "dense" else (idx, nw, None)

    def forward(y):
        launches.reset()
        out = forward_op("triton")(x, y, torch.tensor(0.7, device=device), "gaussian", kind, None, None, target[0],
                                   target[1], None, None, None, "dot", target[2], 0.1, beta, True, code,
                                   "conditional", False)
        return launches.count["_triangular_forward_kernel"], launches.count["_forward_kernel"], out

    (tri_same, plain_same, same), (tri_copy, plain_copy, copy) = forward(x), forward(x.clone())
    assert (tri_same, plain_same, tri_copy, plain_copy) == (1 + _two_pass(divergence, beta), 0, 0, 1)
    if launchers.INTERPRET:
        assert torch.all(same[2][3] == launchers.INTERPRETER_SHAPE[0])
    assert torch.all(copy[2][3] == 0)
    assert relative_error(same[0], copy[0]) <= TRITON_F32
    assert torch.equal(same[1], copy[1]) and not bool(same[1][1])
    assert relative_error(same[2][:3], copy[2][:3]) <= TRITON_F32


def test_plain_where_the_structure_does_not_fit(monkeypatch):
    """A per-row learned parameter, an explicit y that is another tensor, and the switch off run
    the plain kernels for both targets; y given as x itself the triangular ones."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x0, w, nbrs, _ = _inputs(20, seed=1, dtype=torch.float32)
    x0 = x0.to(device)
    launches = Launches(monkeypatch, ALL)

    def launched(kind, y=None, switch="1", **kw):
        launches.reset()
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", switch)
        x = x0.clone().requires_grad_()
        target, _ = _target(kind, w, nbrs, device, torch.float32, False)
        ik.icon_loss(x, x if y == "same" else y, target=target, kernel="gaussian", backend="triton", **kw).backward()
        return launches.triangular(), launches.count["_cols_kernel"]

    for kind in ("dense", "neighbors"):
        for objective in (dict(), dict(divergence="js", alpha=0.1)):
            sweeps = 1 + bool(objective)
            assert launched(kind, **objective) == (2 * sweeps + 1, 0), (kind, objective)
            assert launched(kind, y="same", exclude_self=True, **objective) == (2 * sweeps + 1, 0)
            assert launched(kind, sigma=torch.full((20,), 1.5, device=device), **objective) == (0, 1)
            assert launched(kind, y=x0.clone(), exclude_self=True, **objective) == (0, 1)
            assert launched(kind, switch="0", **objective) == (0, 1)
    assert sum(launches.count[name] for name in ALL if "affinity" in name) == 0


@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("forward_switch,backward_switch", [("1", "0"), ("0", "1")])
@pytest.mark.parametrize("kind", ["dense", "neighbors"])
def test_the_backward_follows_its_forward(monkeypatch, kind, forward_switch, backward_switch, beta):
    """The switch turned off between a triangular forward and its backward: the record in row 3
    still runs the triangular backward (each pair's logits from the forward's tile orientation); a
    plain forward (no record) followed by the switch on runs the plain backward (for Neighbors
    under kl with the sparse gather of its pairs), one pass (beta = 0, the closed form) or two."""
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", forward_switch)
    device = device_of("triton")
    x0, w, nbrs, upstream = _inputs(45, seed=3)
    launches = Launches(monkeypatch, ALL)
    x = x0.float().to(device).requires_grad_()
    target, _ = _target(kind, w, nbrs, device, torch.float32, False)
    rows = ik.icon_loss(x, target=target, kernel="dot", temperature=0.3, beta=beta, backend="triton",
                        reduction="none")
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", backward_switch)
    launches.reset()
    (dx,) = torch.autograd.grad(rows, (x,), grad_outputs=upstream.float().to(device))
    triangular = forward_switch == "1"
    assert launches.count["_triangular_backward_kernel"] == int(triangular)
    assert launches.count["_cols_kernel"] == int(not triangular)
    xr = x0.clone().requires_grad_()
    target, _ = _target(kind, w, nbrs, "cpu", torch.float64, False)
    want = ik.icon_loss(xr, target=target, kernel="dot", temperature=0.3, beta=beta, backend="reference",
                        reduction="none")
    (want_dx,) = torch.autograd.grad(want, (xr,), grad_outputs=upstream)
    assert relative_error(rows.detach().cpu(), want.detach()) <= TRITON_F32
    assert relative_error(dx.cpu(), want_dx) <= TRITON_F32


assert set(TRIANGULAR) <= set(ALL)
