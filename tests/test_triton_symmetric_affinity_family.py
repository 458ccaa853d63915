"""Self mode's triangular schedule on the Triton backend for an Affinity target beyond SNE and
t-SNE's closed form: an f-divergence (reverse_kl, tv, hellinger, js, chi2), and kl or cross_entropy
with alpha > 0 or beta > 0 (triton/symmetric_affinity_kernels.py, PASS 1 then PASS 2; launched by
triton/triangular_launches.py, routed by triton/launchers.py: y omitted, z_cols z, one learned
parameter, any target kernel with one parameter or one per row). The forward sweeps the triangle
twice (every row's LSE and LSE^p, then the per-pair terms of both sides of each tile, the column
side under its own rows' LSE_j, LSE^p_j and target parameter), the backward once. Under
TRITON_INTERPRET=1 without a GPU: fp32 against the float64 reference (within TRITON_F32 plus twice
the float32 reference's own error, as tests/test_triton_symmetric_family.py) and against the plain
kernels (ICON_KERNELS_SYMMETRIC=0), with upstream gradients != 1 (reduction "none", or row weights),
and launch counts that show which kernels ran."""
import os

import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error
from test_triton_symmetric_affinity import ALL, LABELS, TRIANGULAR, _inputs
from test_triton_symmetric_schedule import Launches

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
              "power": "exponent"}
PLAIN = ("_forward_kernel", "_mixture_kernel", "_rows_kernel", "_cols_kernel")
PARAM = {"dot": 0.8, "cosine": 0.3, "gaussian": 1.3, "student_t": 1.3}


def _run(x0, z0, t_param, kernel, backend, upstream, dtype, t_kernel="gaussian", target_grad=False, weight=None,
         **options):
    """(loss, dx, dparam[, dz, dt_param]) of icon_loss(x, target=Affinity(z)), y omitted: the rows
    with upstream gradients ``upstream`` (reduction "none"), or the mean weighted by ``weight``."""
    device = "cpu" if backend == "reference" else device_of("triton")
    x = x0.detach().to(device, dtype).requires_grad_()
    z = z0.detach().to(device, dtype).requires_grad_(target_grad)
    t = t_param.to(device, dtype).requires_grad_(target_grad) if isinstance(t_param, torch.Tensor) else t_param
    p = torch.tensor(PARAM[kernel], dtype=dtype, device=device, requires_grad=True)
    t_named = {PARAM_NAME[t_kernel]: t}
    target = ik.Affinity(z, kernel=t_kernel, **t_named)
    if weight is None:
        loss = ik.icon_loss(x, target=target, kernel=kernel, **{PARAM_NAME[kernel]: p}, backend=backend,
                            reduction="none", **options)
        outputs = upstream.to(device, loss.dtype)
    else:
        loss = ik.icon_loss(x, target=target, kernel=kernel, **{PARAM_NAME[kernel]: p}, backend=backend,
                            weight=weight.to(device, dtype), **options)
        outputs = None
    wrt = (x, p, z, t) if target_grad else (x, p)
    grads = torch.autograd.grad(loss, wrt, grad_outputs=outputs)
    return [g.detach().cpu() for g in (loss, *grads)]


def _counts(panels=1, backward="triangular"):
    """The launches of a two-pass triangular forward (per panel of row blocks, the forward and merge
    kernels once in each pass) and its backward: "triangular" (one kernel), "plain" (the rows and
    column kernels) or "plain after row 3" (those and the plain second pass again: the target's
    gradient at beta > 0 or under an f-divergence, launchers._target_statistics)."""
    return {"_triangular_affinity_forward_kernel": 2 * panels, "_triangular_affinity_merge_kernel": 2 * panels,
            "_triangular_affinity_backward_kernel": int(backward == "triangular"), "_forward_kernel": 0,
            "_mixture_kernel": int(backward == "plain after row 3"),
            "_rows_kernel": int(backward != "triangular"), "_cols_kernel": int(backward != "triangular"),
            **dict.fromkeys(LABELS, 0)}


def _check_both_schedules(monkeypatch, x, z, t_param, upstream, kernel, panels=1, backward="triangular",
                          target_grad=False, **options):
    """The triangular schedule (exactly _counts' launches) and the plain one (the forward, second
    pass and both backward kernels, no triangular kernel) against each other and against the float64
    reference: loss, dx, dparam (and dz, dt_param with target_grad). Returns the worst relative error
    against the reference."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, t_param, kernel, "triton", upstream, torch.float32, target_grad=target_grad, **options)
    assert launches.count == _counts(panels, backward), launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = _run(x, z, t_param, kernel, "triton", upstream, torch.float32, target_grad=target_grad, **options)
    assert sum(launches.count[name] for name in TRIANGULAR + LABELS) == 0, launches.count
    # (the target's gradient at beta > 0 or under an f-divergence in self mode runs the second pass
    # again after a plain forward too: the backward cannot tell the forwards apart by the record alone)
    again = int(backward == "plain after row 3")
    assert {name: launches.count[name] for name in PLAIN} == dict(_forward_kernel=1, _mixture_kernel=1 + again,
                                                                  _rows_kernel=1, _cols_kernel=1), launches.count
    want = _run(x, z, t_param, kernel, "reference", upstream, torch.float64, target_grad=target_grad, **options)
    naive = _run(x, z, t_param, kernel, "reference", upstream, torch.float32, target_grad=target_grad, **options)
    assert want[1].norm() > 0, "a problem without gradient tests nothing"
    names = ("loss", "dx", "dparam", "dz", "dt_param")
    errors = []
    for what, mine, theirs, exact, fp32 in zip(names, got, plain, want, naive):
        assert torch.isfinite(mine).all(), what
        assert relative_error(mine, theirs) <= TRITON_F32, (what, relative_error(mine, theirs))
        errors.append(relative_error(mine, exact))
        assert errors[-1] <= TRITON_F32 + 2 * relative_error(fp32, exact), (what, errors[-1])
    return max(errors)


# (divergence, alpha, beta): every f-divergence (each also with alpha or beta > 0 below), and kl and
# cross_entropy with alpha > 0 (the record in stats row 1), beta > 0 (row 3) or both
OBJECTIVES = [("reverse_kl", 0.0, 0.0), ("tv", 0.0, 0.0), ("hellinger", 0.1, 0.0), ("js", 0.0, 0.2),
              ("chi2", 0.2, 0.1), ("kl", 0.2, 0.0), ("kl", 0.0, 0.2), ("cross_entropy", 0.1, 0.2),
              ("cross_entropy", 0.3, 0.0)]
# (N, exclude_self, target kernel, its parameter one per row): ragged N (37, 45: two row blocks of
# the interpreter's 32, the second partly empty; 33: one row past a block), N = 2 (the diagonal block
# only; with the self pair kept, else one pair per row and no gradient), both exclude_self, Gaussian
# (sigma one value or one per row), dot and Student-t targets
SHAPES = [(37, True, "gaussian", True), (45, False, "gaussian", False), (33, True, "student_t", True),
          (2, False, "dot", False), (45, True, "dot", True), (33, False, "student_t", False),
          (37, False, "gaussian", True), (2, False, "gaussian", True)]


@pytest.mark.parametrize("kernel", ["dot", "cosine", "gaussian", "student_t"])
@pytest.mark.parametrize("divergence,alpha,beta", OBJECTIVES)
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, divergence, alpha, beta, kernel):
    """Every objective under every learned kernel, on a shape of SHAPES that turns with them (so
    each objective meets four shapes and each shape several objectives)."""
    objective = OBJECTIVES.index((divergence, alpha, beta))
    index = (objective + 3 * ["dot", "cosine", "gaussian", "student_t"].index(kernel)) % len(SHAPES)
    n, exclude_self, t_kernel, per_row = SHAPES[index]
    x, z, sigma, upstream = _inputs(n, seed=n + objective)
    t_param = sigma if per_row else {"gaussian": 1.1, "dot": 0.7, "student_t": 1.5}[t_kernel]
    _check_both_schedules(monkeypatch, x, z, t_param, upstream, kernel, t_kernel=t_kernel, divergence=divergence,
                          alpha=alpha, beta=beta, exclude_self=exclude_self)


@pytest.mark.parametrize("divergence,alpha,beta,exclude_self", [("js", 0.0, 0.0, True), ("kl", 0.1, 0.0, False),
                                                                ("chi2", 0.0, 0.1, False)])
def test_one_row(monkeypatch, divergence, alpha, beta, exclude_self):
    """N = 1: without the self pair a row without columns (left out: loss 0, zero gradients), with
    it one pair (q = p = 1: no gradient either). Both schedules as the reference."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, upstream = _inputs(1, seed=3)
    options = dict(divergence=divergence, alpha=alpha, beta=beta, exclude_self=exclude_self)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, sigma, "student_t", "triton", upstream, torch.float32, **options)
    assert launches.count == _counts(), launches.count
    want = _run(x, z, sigma, "student_t", "reference", upstream, torch.float64, **options)
    for mine, exact in zip(got, want):
        assert torch.isfinite(mine).all()
        assert (mine - exact).abs().max() <= 1e-6


@pytest.mark.parametrize("divergence,alpha,beta,per_row", [("js", 0.1, 0.0, True), ("kl", 0.0, 0.2, False),
                                                           ("tv", 0.0, 0.1, True)])
def test_several_panels_chunks_and_tiles_per_block(monkeypatch, divergence, alpha, beta, per_row):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel (every panel's partials merged
    into the running statistics of the blocks after it, in both passes: the second's sums start
    from zero again) and one column block per program."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    x, z, sigma, upstream = _inputs(100, seed=4)
    _check_both_schedules(monkeypatch, x, z, sigma if per_row else 0.9, upstream, "student_t", panels=4,
                          t_kernel="student_t" if per_row else "gaussian", divergence=divergence, alpha=alpha,
                          beta=beta)


def test_feature_dims_in_chunks(monkeypatch):
    """d beyond the register budget (shrunk here: d = 50 in 4 ragged chunks of 16): both passes'
    Grams of x loop over the chunks, the backward has one program per chunk of dX (each recomputing
    both sides' per-pair gradients)."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    x, z, sigma, upstream = _inputs(45, seed=11, d=50, dz=20)
    _check_both_schedules(monkeypatch, x, z, sigma, upstream, "gaussian", divergence="hellinger", alpha=0.1, beta=0.1)


@pytest.mark.parametrize("divergence,alpha,beta", [("tv", 0.0, 0.0), ("cross_entropy", 0.2, 0.1)])
def test_weighted_mean(monkeypatch, divergence, alpha, beta):
    """reduction="mean" with row weights: each row's upstream gradient is its weight over their sum."""
    x, z, sigma, weight = _inputs(40, seed=2)
    _check_both_schedules(monkeypatch, x, z, sigma, None, "student_t", weight=weight, divergence=divergence,
                          alpha=alpha, beta=beta)


def test_half_inputs_as_the_plain_schedule(monkeypatch):
    """fp16 features and target features (native under the interpreter: the gradient dots upcast):
    the two schedules differ by rounding only (fp32 accumulation both)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, upstream = _inputs(45, seed=5)
    options = dict(divergence="js", alpha=0.1, beta=0.1)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, sigma, "student_t", "triton", upstream, torch.float16, **options)
    assert launches.count == _counts(), launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, z, sigma, "student_t", "triton", upstream, torch.float16, **options)
    for mine, theirs in zip(got, plain):
        assert relative_error(mine.float(), theirs.float()) <= 1e-2


@pytest.mark.parametrize("divergence,alpha,beta,record_row", [("kl", 0.2, 0.0, 1), ("cross_entropy", 0.1, 0.0, 1),
                                                              ("kl", 0.0, 0.1, 3), ("tv", 0.0, 0.0, 3),
                                                              ("chi2", 0.1, 0.1, 3)])
def test_the_stats_and_the_record(monkeypatch, divergence, alpha, beta, record_row):
    """The forward op with x and y one tensor runs the triangular forward: the plain forward's
    stats rows (0 LSE, 1 R_i or Gamma_i, 2 LSE^p, 3 H_i or Phi_i) but the record row, which holds
    its BLOCK_M: row 1 for kl or cross_entropy at beta = 0 (R_i, unread there; the plain forward
    writes the row's sum of p~ ~ 1), row 3 otherwise (rows 0-2 are read by the triangular backward;
    H_i or Phi_i only by the plain backward of the target's gradient, which writes it again)."""
    from icon_kernels._triton import launchers
    from icon_kernels.backends.ops import forward_op
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x, z, sigma, _ = _inputs(40, seed=7, dtype=torch.float32)
    x, z, sigma = x.to(device), z.to(device), sigma.to(device)
    launches = Launches(monkeypatch, ALL)
    code = ik.families.DIVERGENCES[divergence].code

    def forward(y):
        launches.reset()
        out = forward_op("triton")(x, y, torch.tensor(1.0, device=device), "student_t", "affinity", None, None,
                                   None, None, z, z, sigma, "gaussian", None, alpha, beta, True, code, "conditional",
                                   False)
        return launches.count["_triangular_affinity_forward_kernel"], launches.count["_mixture_kernel"], out

    (tri_same, mix_same, same), (tri_copy, mix_copy, copy) = forward(x), forward(x.clone())
    assert (tri_same, mix_same, tri_copy, mix_copy) == (2, 0, 0, 1)
    op = launchers.OpArgs(x, x, torch.tensor(1.0), "student_t", "affinity", None, None, None, None, z, z, sigma,
                          "gaussian", None, alpha, beta, True, code, "conditional", False)
    assert launchers._record_row(op) == record_row
    if launchers.INTERPRET:
        assert torch.all(same[2][record_row] == launchers.INTERPRETER_SHAPE[0])
    assert not torch.any(copy[2][record_row] == same[2][record_row, 0])
    assert relative_error(same[0], copy[0]) <= TRITON_F32
    assert torch.equal(same[1], copy[1])
    for row in {0, 1, 2, 3} - {record_row}:
        assert relative_error(same[2][row], copy[2][row]) <= TRITON_F32, row
    if record_row == 1:
        assert relative_error(copy[2][1], torch.ones_like(copy[2][1])) <= 1e-6     # sum_j p~


@pytest.mark.parametrize("divergence,alpha,beta,backward", [("kl", 0.2, 0.0, "plain"),
                                                            ("js", 0.1, 0.0, "plain after row 3"),
                                                            ("kl", 0.0, 0.2, "plain after row 3")])
@pytest.mark.parametrize("per_row", [False, True])
def test_target_gradients_run_the_plain_backward_after_the_triangular_forward(monkeypatch, divergence, alpha, beta,
                                                                              backward, per_row):
    """z and sigma requiring grad: the forward cannot know and runs the triangular kernels; the
    backward is the plain one, reading stats rows 0 and 2 and, for H_i (kl, cross_entropy) or Phi_i
    (an f-divergence), row 3: the triangular forward's at beta = 0 under kl or cross_entropy, else
    the plain second pass's again (the record is there). (Not cross_entropy at beta > 0 with one
    target parameter: the plain backward's d sigma there is a sum of row covariances against H_i, not
    renormalised by the row's sum of p, which the fp32 rounding of LSE^p moves by 1e-7; over four
    seeds that ill-conditioned sum was 5e-6 to 8e-5 off the float64 reference after the plain
    forward, 7e-6 to 2e-4 after the triangular one, PyTorch's fp32 5e-6 to 3e-5.)"""
    x, z, sigma, upstream = _inputs(45, seed=6)
    t_param = sigma if per_row else torch.tensor(1.2, dtype=torch.float64)
    _check_both_schedules(monkeypatch, x, z, t_param, upstream, "student_t", backward=backward, target_grad=True,
                          divergence=divergence, alpha=alpha, beta=beta)


@pytest.mark.parametrize("objective", [("tv", 0.0, 0.1), ("kl", 0.2, 0.0)])
@pytest.mark.parametrize("case", ["switch_off_at_backward", "other_tile_at_backward", "plain_forward"])
def test_the_backward_after_either_forward(monkeypatch, case, objective):
    """The backward follows its forward's record (row 3 for tv at beta > 0, row 1 for kl at alpha >
    0): the switch turned off between a triangular forward and its backward still runs the
    triangular backward; a record that does not match the backward's tile (another interpreter tile
    at backward time) runs the plain backward on the triangular forward's stats; a plain forward
    (switch off) followed by a backward with the switch on runs the plain backward, whatever its row
    3 holds. Each equals the float64 reference."""
    from icon_kernels._triton import launchers
    divergence, alpha, beta = objective
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0" if case == "plain_forward" else "1")
    device = device_of("triton")
    x0, z, sigma, upstream = _inputs(45, seed=3)
    options = dict(kernel="gaussian", sigma=0.7, divergence=divergence, alpha=alpha, beta=beta, reduction="none")
    launches = Launches(monkeypatch, ALL)
    x = x0.float().to(device).requires_grad_()
    target = ik.Affinity(z.float().to(device), sigma=sigma.float().to(device))
    rows = ik.icon_loss(x, target=target, backend="triton", **options)
    forward = dict(launches.count)
    if case == "switch_off_at_backward":
        os.environ["ICON_KERNELS_SYMMETRIC"] = "0"
    elif case == "other_tile_at_backward":
        monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (64, 32, 4, 2))
    else:
        os.environ["ICON_KERNELS_SYMMETRIC"] = "1"
    (dx,) = torch.autograd.grad(rows, (x,), grad_outputs=upstream.float().to(device))
    backward = {name: launches.count[name] - forward[name] for name in launches.count}
    triangular_backward = case == "switch_off_at_backward"
    assert forward["_triangular_affinity_forward_kernel"] == (0 if case == "plain_forward" else 2), forward
    assert forward["_mixture_kernel"] == int(case == "plain_forward"), forward
    assert backward["_triangular_affinity_backward_kernel"] == int(triangular_backward), backward
    assert backward["_rows_kernel"] == backward["_cols_kernel"] == int(not triangular_backward), backward
    assert backward["_mixture_kernel"] == 0, backward
    xr = x0.clone().requires_grad_()
    want = ik.icon_loss(xr, target=ik.Affinity(z, sigma=sigma), backend="reference", **options)
    (want_dx,) = torch.autograd.grad(want, (xr,), grad_outputs=upstream)
    assert relative_error(rows.detach().cpu(), want.detach()) <= TRITON_F32
    assert relative_error(dx.cpu(), want_dx) <= TRITON_F32


def test_plain_where_the_structure_does_not_fit(monkeypatch):
    """Under an f-divergence, alpha > 0 or beta > 0: other column features z_cols, a per-row learned
    parameter and an explicit y that is another tensor run the plain kernels (their forward, second
    pass and both backward kernels); z_cols equal to z (another tensor), every target kernel and
    both exclude_self the triangular ones (two forward sweeps and one backward)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x0, z0, _, _ = _inputs(20, seed=1, dtype=torch.float32)
    x0, z = x0.to(device), z0.to(device)
    launches = Launches(monkeypatch, ALL)

    def launched(y=None, z_cols=None, t_kernel="gaussian", **kw):
        launches.reset()
        x = x0.clone().requires_grad_()
        zz = z.abs() + 0.1 if t_kernel == "log_dot" else z
        target = ik.Affinity(zz, z_cols=zz if z_cols == "same" else z_cols, kernel=t_kernel)
        ik.icon_loss(x, y, target=target, kernel="student_t", backend="triton", **kw).backward()
        return (sum(launches.count[name] for name in TRIANGULAR), launches.count["_mixture_kernel"],
                launches.count["_cols_kernel"])

    for objective in (dict(divergence="hellinger"), dict(alpha=0.1), dict(beta=0.1),
                      dict(divergence="reverse_kl", alpha=0.1, beta=0.1)):
        assert launched(**objective) == (5, 0, 0), objective
        assert launched(z_cols=z.clone(), **objective) == (5, 0, 0), objective
        assert launched(z_cols="same", exclude_self=False, **objective) == (5, 0, 0), objective
        assert launched(z_cols=z.flip(0), **objective) == (0, 1, 1), objective
        assert launched(dof=torch.full((20,), 1.5, device=device), **objective) == (0, 1, 1), objective
        assert launched(y=x0.clone(), exclude_self=True, **objective) == (0, 1, 1), objective
    for t_kernel in ("student_t", "power", "log_dot", "dot"):
        assert launched(t_kernel=t_kernel, divergence="chi2") == (5, 0, 0), t_kernel
    assert sum(launches.count[name] for name in LABELS) == 0


@pytest.mark.parametrize("switch_at_backward", ["0", "1"])
def test_the_backward_follows_its_forward_at_huge_logits(monkeypatch, switch_at_backward):
    """Logits near 1e5 (dot kernel at tau = 0.01 on features of scale 30; a Gaussian target with
    per-row sigma of about 0.1 on z of scale 3), where an ulp of s or t moves q or p by percents,
    under js with beta > 0 (the record in row 3): the backward takes each pair's logits from the
    forward's tile orientation, whatever the switch at backward time, and agrees with the float64
    reference on the same fp32 features."""
    gen = torch.Generator().manual_seed(5)
    n = 64
    x = (30 * torch.randn(n, 16, generator=gen, dtype=torch.float64)).float().double()
    z = (3 * torch.randn(n, 8, generator=gen, dtype=torch.float64)).float().double()
    sigma = (0.1 + 0.05 * torch.rand(n, generator=gen, dtype=torch.float64)).float().double()
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    options = dict(kernel="dot", temperature=0.01, divergence="js", beta=0.1, reduction="none")
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "1" if switch_at_backward == "0" else "0")
    launches = Launches(monkeypatch, ALL)
    device = device_of("triton")
    xt = x.float().to(device).requires_grad_()
    target = ik.Affinity(z.float().to(device), kernel="gaussian", sigma=sigma.float().to(device))
    rows = ik.icon_loss(xt, target=target, backend="triton", **options)
    os.environ["ICON_KERNELS_SYMMETRIC"] = switch_at_backward
    (dx,) = torch.autograd.grad(rows, (xt,), grad_outputs=upstream.float().to(device))
    ran_triangular = switch_at_backward == "0"
    assert launches.count["_triangular_affinity_backward_kernel"] == int(ran_triangular), launches.count
    assert launches.count["_cols_kernel"] == int(not ran_triangular), launches.count
    xr = x.clone().requires_grad_()
    want = ik.icon_loss(xr, target=ik.Affinity(z, kernel="gaussian", sigma=sigma), backend="reference", **options)
    (want_dx,) = torch.autograd.grad(want, (xr,), grad_outputs=upstream)
    assert relative_error(rows.detach().cpu(), want.detach()) <= 1e-5
    assert relative_error(dx.cpu(), want_dx) <= 1e-5


@pytest.mark.parametrize("objective,target_grad,backward_reads", [
    (dict(divergence="js"), False, 1), (dict(divergence="js"), True, 1), (dict(alpha=0.1), True, 0)])
def test_the_structure_is_read_once_per_forward_and_backward(monkeypatch, objective, target_grad, backward_reads):
    """launchers._self_mode_structure (with z_cols equal to z but another tensor: its torch.equal, a
    host sync) once in the forward and at most once in the backward: there for the triangular
    backward or, with the target's gradient at beta > 0 or under an f-divergence, row 3 computed
    again; not at all for the target's gradient where the record is in row 1."""
    from icon_kernels._triton import launchers
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x0, z0, _, _ = _inputs(20, seed=1, dtype=torch.float32)
    z = z0.to(device).requires_grad_(target_grad)
    calls = []
    structure = launchers._self_mode_structure
    monkeypatch.setattr(launchers, "_self_mode_structure", lambda op: calls.append(op) or structure(op))
    launches = Launches(monkeypatch, ALL)
    x = x0.to(device).requires_grad_()
    loss = ik.icon_loss(x, target=ik.Affinity(z, z_cols=z.detach().clone()), kernel="student_t", backend="triton",
                        **objective)
    assert len(calls) == 1 and launches.count["_triangular_affinity_forward_kernel"] == 2
    loss.backward()
    assert len(calls) == 1 + backward_reads
    assert launches.count["_triangular_affinity_backward_kernel"] == int(not target_grad), launches.count
