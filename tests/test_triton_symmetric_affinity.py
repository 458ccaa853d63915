"""Self mode's triangular schedule for an Affinity target (SNE, t-SNE) on the Triton backend
(triton/symmetric_affinity_kernels.py, routed by triton/launchers.py: y omitted, z_cols z, conditional
rows, kl or cross_entropy with alpha = beta = 0, one learned kernel parameter, any target kernel
(gaussian, dot, student_t, power, log_dot) with one parameter or one per row). Under TRITON_INTERPRET=1
without a GPU: fp32 against the float64 reference (test_backends_vs_reference.TRITON_F32) and against
the plain schedule (ICON_KERNELS_SYMMETRIC=0), with launch counts that show which kernels ran. Ragged
N over row blocks of the interpreter's 32 rows; a per-row target parameter makes t_ij != t_ji."""
import os

import pytest
import torch

import icon_kernels as ik
from cases import device_of, relative_error
from test_triton_symmetric_schedule import PLAIN as PLAIN_LABELS, TRIANGULAR as LABELS, Launches

pytestmark = pytest.mark.skipif("triton" not in ik.available_backends(),
                                reason=ik.available_backends(with_reasons=True).get("triton") or "")
TRITON_F32 = 5e-5
PARAM_NAME = {"dot": "temperature", "gaussian": "sigma", "student_t": "dof", "power": "exponent"}
TRIANGULAR = ("_triangular_affinity_forward_kernel", "_triangular_affinity_merge_kernel",
              "_triangular_affinity_backward_kernel")
PLAIN = PLAIN_LABELS + ("_mixture_kernel",)
ALL = TRIANGULAR + LABELS + PLAIN


def _inputs(n, seed, d=5, dz=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    z = torch.randn(n, dz, generator=gen, dtype=dtype)
    sigma = torch.rand(n, generator=gen, dtype=dtype) + 0.7        # per row, as calibrate_sigma gives
    upstream = torch.rand(n, generator=gen, dtype=dtype) + 0.5
    return x, z, sigma, upstream


def _run(x0, z0, t_param, kernel, backend, upstream, dtype, param=1.3, t_kernel="gaussian", target_grad=False,
         **options):
    """(loss rows, dx, dparam[, dz, dt_param]) of icon_loss(x, target=Affinity(z)), y omitted, with
    upstream gradients ``upstream`` (reduction "none"); no dparam for log_dot."""
    device = "cpu" if backend == "reference" else device_of("triton")
    x = x0.detach().to(device, dtype).requires_grad_()
    z = z0.detach().to(device, dtype).requires_grad_(target_grad)
    t = t_param.to(device, dtype).requires_grad_(target_grad) if isinstance(t_param, torch.Tensor) else t_param
    p = torch.tensor(param, dtype=dtype, device=device, requires_grad=True)
    named = {PARAM_NAME[kernel]: p} if kernel in PARAM_NAME else {}          # (log_dot has no parameter)
    t_named = {PARAM_NAME[t_kernel]: t} if t_kernel in PARAM_NAME else {}
    target = ik.Affinity(z, kernel=t_kernel, **t_named, z_cols=options.pop("z_cols", None))
    rows = ik.icon_loss(x, target=target, kernel=kernel, **named, backend=backend, reduction="none", **options)
    wrt = (x, *named.values(), z, *t_named.values()) if target_grad else (x, *named.values())
    grads = torch.autograd.grad(rows, wrt, grad_outputs=upstream.to(device, rows.dtype))
    return [g.detach().cpu() for g in (rows, *grads)]


def _check_both_schedules(monkeypatch, x, z, t_param, upstream, kernel, target_grad=False, **options):
    """The triangular schedule against the float64 reference and against the plain schedule
    (ICON_KERNELS_SYMMETRIC=0): loss rows, dx, dparam (and dz, dt_param with target_grad, which the
    plain backward makes after the triangular forward). Returns the triangular run's launch counts."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    want = _run(x, z, t_param, kernel, "reference", upstream, torch.float64, target_grad=target_grad, **options)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, t_param, kernel, "triton", upstream, torch.float32, target_grad=target_grad, **options)
    counts = dict(launches.count)
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    launches.reset()
    plain = _run(x, z, t_param, kernel, "triton", upstream, torch.float32, target_grad=target_grad, **options)
    assert sum(launches.count[name] for name in TRIANGULAR + LABELS) == 0, launches.count
    assert launches.count["_cols_kernel"] == 1, launches.count
    names = ("rows", "dx", "dparam", "dz", "dt_param")
    for what, mine, theirs, exact in zip(names, got, plain, want):
        assert relative_error(mine, exact) <= TRITON_F32, (what, relative_error(mine, exact))
        assert relative_error(mine, theirs) <= TRITON_F32, (what, relative_error(mine, theirs))
    return counts


def _only_triangular(counts, backward=True):
    """Every triangular Affinity kernel ran (the backward kernel unless the plain backward makes
    the target's gradient) and no Labels triangular or plain forward kernel did."""
    assert counts["_triangular_affinity_forward_kernel"] >= 1 and counts["_triangular_affinity_merge_kernel"] >= 1
    assert counts["_triangular_affinity_backward_kernel"] == int(backward), counts
    assert all(counts[name] == 0 for name in LABELS + ("_forward_kernel", "_mixture_kernel")), counts
    assert counts["_rows_kernel"] == counts["_cols_kernel"] == int(not backward), counts


@pytest.mark.parametrize("kernel", ["student_t", "gaussian", "dot"])
@pytest.mark.parametrize("n,per_row,divergence,exclude_self", [
    (37, False, "kl", True), (45, True, "cross_entropy", False), (2, True, "kl", True),
    (1, False, "cross_entropy", True), (1, True, "kl", False)])
def test_equals_the_reference_and_the_plain_schedule(monkeypatch, kernel, n, per_row, divergence, exclude_self):
    """t-SNE (student_t, dof 1.3), SNE (gaussian) and a dot kernel on a Gaussian target, sigma one
    value or one per row; N = 37 and 45 are two row blocks (an off-diagonal block pair, ragged), N =
    2 one pair per row, N = 1 a row without columns (left out: 0, zero gradients) or, with the self
    pair kept, with one."""
    x, z, sigma, upstream = _inputs(n, seed=n)
    counts = _check_both_schedules(monkeypatch, x, z, sigma if per_row else 1.1, upstream, kernel,
                                   divergence=divergence, exclude_self=exclude_self)
    _only_triangular(counts)


@pytest.mark.parametrize("kernel,divergence,per_row", [("student_t", "kl", True), ("dot", "cross_entropy", False)])
def test_several_panels_chunks_and_tiles_per_block(monkeypatch, kernel, divergence, per_row):
    """32-row blocks swept in 32 x 16 tiles, one row block per panel (each panel's partials merged
    into the running statistics of the blocks after it) and one column block per program (four
    programs for row block 0: the diagonal pair's, without its column side, and three others)."""
    from icon_kernels._triton import launchers, triangular_launches
    monkeypatch.setattr(launchers, "INTERPRETER_SHAPE", (32, 16, 4, 2))
    monkeypatch.setattr(triangular_launches, "PANEL_BYTES", 1)
    monkeypatch.setattr(triangular_launches, "BLOCKS_PER_PROGRAM", 1)
    x, z, sigma, upstream = _inputs(100, seed=4)
    counts = _check_both_schedules(monkeypatch, x, z, sigma if per_row else 0.9, upstream, kernel,
                                   divergence=divergence)
    _only_triangular(counts)
    assert counts["_triangular_affinity_forward_kernel"] == counts["_triangular_affinity_merge_kernel"] == 4


def test_dot_target_kernel_with_a_temperature_per_row(monkeypatch):
    """A dot target kernel (the cosine one arrives as dot on normalised rows) with one temperature
    per row: t_ij = z_i.z_j / tau_i and t_ji = z_i.z_j / tau_j."""
    x, z, sigma, upstream = _inputs(45, seed=8)
    counts = _check_both_schedules(monkeypatch, x, z, sigma, upstream, "student_t", t_kernel="dot")
    _only_triangular(counts)


def test_weighted_mean(monkeypatch):
    """reduction="mean" with row weights: the upstream gradient of each row is its weight over
    their sum (reduction "none" above gives random ones)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, weight = _inputs(40, seed=2)

    def run(backend, dtype):
        device = "cpu" if backend == "reference" else device_of("triton")
        xx = x.to(device, dtype).requires_grad_()
        target = ik.Affinity(z.to(device, dtype), kernel="gaussian", sigma=sigma.to(device, dtype))
        loss = ik.icon_loss(xx, target=target, kernel="student_t", dof=1.0, weight=weight.to(device, dtype),
                            backend=backend)
        return loss.detach().cpu(), torch.autograd.grad(loss, xx)[0].cpu()

    launches = Launches(monkeypatch, ALL)
    got, want = run("triton", torch.float32), run("reference", torch.float64)
    assert launches.count["_triangular_affinity_backward_kernel"] == 1, launches.count
    for mine, exact in zip(got, want):
        assert relative_error(mine, exact) <= TRITON_F32


@pytest.mark.parametrize("per_row", [False, True])
def test_target_gradients_run_the_plain_backward_after_the_triangular_forward(monkeypatch, per_row):
    """z and sigma requiring grad: the forward cannot know and runs the triangular kernels; the
    backward is the plain one (rows and column kernels), reading the stats rows 0, 2 and 3 (H_i =
    L_i) that the triangular forward wrote as the plain one does."""
    x, z, sigma, upstream = _inputs(45, seed=6)
    t_param = sigma if per_row else torch.tensor(1.2, dtype=torch.float64)
    counts = _check_both_schedules(monkeypatch, x, z, t_param, upstream, "student_t", target_grad=True)
    _only_triangular(counts, backward=False)


def test_feature_dims_in_chunks(monkeypatch):
    """d beyond the register budget (shrunk here: d = 50 in 4 ragged chunks of 16): the forward's
    Gram of x loops over the chunks, the backward has one program per chunk of dX (each recomputing
    S over all of d and T over all of z's features), dparam from the first chunk's programs."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "MAX_BLOCK_D", 32)
    monkeypatch.setattr(launchers, "D_CHUNK", 16)
    x, z, sigma, upstream = _inputs(45, seed=11, d=50, dz=20)
    counts = _check_both_schedules(monkeypatch, x, z, sigma, upstream, "gaussian")
    _only_triangular(counts)


def test_bf16_as_the_plain_schedule(monkeypatch):
    """bf16 inputs (upcast at load under the interpreter): the two schedules differ by rounding
    only (fp32 accumulation both)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, upstream = _inputs(45, seed=5)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, sigma, "student_t", "triton", upstream, torch.bfloat16)
    assert launches.count["_triangular_affinity_backward_kernel"] == 1, launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, z, sigma, "student_t", "triton", upstream, torch.bfloat16)
    for mine, theirs in zip(got, plain):
        assert relative_error(mine, theirs) <= 1e-2


def test_plain_where_the_structure_does_not_fit(monkeypatch):
    """Other column features z_cols, a per-row learned parameter and an explicit y that is another
    tensor run the plain kernels; the default run, z_cols equal to z (another tensor) and every
    target kernel the triangular ones, and alpha > 0, beta > 0 or an f-divergence their two forward
    sweeps (tests/test_triton_symmetric_affinity_family.py)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x0, z0, _, _ = _inputs(20, seed=1, dtype=torch.float32)
    x0, z = x0.to(device), z0.to(device)
    launches = Launches(monkeypatch, ALL)

    def launched(y=None, sigma=1.5, z_cols=None, t_kernel="gaussian", **kw):
        launches.reset()
        x = x0.clone().requires_grad_()
        target = ik.Affinity(z.abs() + 0.1 if t_kernel == "log_dot" else z, z_cols=z_cols, kernel=t_kernel,
                             sigma=sigma)
        ik.icon_loss(x, y, target=target, kernel="student_t", backend="triton", **kw).backward()
        return sum(launches.count[name] for name in TRIANGULAR), launches.count["_cols_kernel"]

    assert launched() == (3, 0)
    assert launched(z_cols=z.clone()) == (3, 0)
    assert launched(alpha=0.1) == (5, 0)
    assert launched(beta=0.1) == (5, 0)
    assert launched(divergence="tv") == (5, 0)
    assert launched(z_cols=z.flip(0)) == (0, 1)
    for t_kernel in ("student_t", "power", "log_dot"):
        assert launched(t_kernel=t_kernel) == (3, 0), t_kernel
    assert launched(dof=torch.full((20,), 1.5, device=device)) == (0, 1)
    assert launched(y=x0.clone(), exclude_self=True) == (0, 1)
    assert sum(launches.count[name] for name in LABELS) == 0


def test_the_record_and_the_plain_rows(monkeypatch):
    """The forward op: x and y one tensor run the triangular forward, which records its BLOCK_M in
    stats row 1 (AFFINITY_RECORD_ROW; the plain forward writes 1 there) and writes rows 0 (LSE), 2
    (LSE^p) and 3 (H_i = L_i) as the plain forward does."""
    from icon_kernels._triton import launchers
    from icon_kernels.backends.ops import forward_op
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    device = device_of("triton")
    x, z, sigma, _ = _inputs(40, seed=7, dtype=torch.float32)
    x, z, sigma = x.to(device), z.to(device), sigma.to(device)
    launches = Launches(monkeypatch, ALL)

    def forward(y):
        launches.reset()
        out = forward_op("triton")(x, y, torch.tensor(1.0, device=device), "student_t", "affinity", None, None,
                                   None, None, z, z, sigma, "gaussian", None, 0.0, 0.0, True, 0, "conditional", False)
        return launches.count["_triangular_affinity_forward_kernel"], out

    (tri_same, same), (tri_copy, copy) = forward(x), forward(x.clone())
    assert (tri_same, tri_copy) == (1, 0)
    assert launchers.AFFINITY_RECORD_ROW == 1
    tensors = dict(X=x, Z=z)
    flags = dict(UPCAST=True, UPCAST_Z=True, BLOCK_D=8, BLOCK_DZ=8, TARGET=launchers.TARGET_CODES["affinity"])
    assert torch.all(same[2][1] == launchers._triangular_tile(tensors, flags)[0])   # (the interpreter's, on a CPU)
    if launchers.INTERPRET:
        assert torch.all(same[2][1] == launchers.INTERPRETER_SHAPE[0])
    assert torch.all(copy[2][1] == 1.0)
    assert relative_error(same[0], copy[0]) <= TRITON_F32
    assert torch.equal(same[1], copy[1])
    for row in (0, 2, 3):
        assert relative_error(same[2][row], copy[2][row]) <= TRITON_F32, row
    assert torch.equal(same[2][3], same[0].float())


def test_plain_kernels_where_the_triangular_backward_would_not_fit(monkeypatch):
    """Where triangular_fits says no (an fp32 t-SNE launch at d = dz = 256 on a GPU; forced here),
    the forward runs the plain kernels and records nothing (stats row 1 stays the plain forward's
    1), and the backward follows it: the plain kernels, equal to the reference."""
    from icon_kernels._triton import launchers
    monkeypatch.setattr(launchers, "_triangular_fits", lambda tensors, flags: False)
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, upstream = _inputs(37, seed=11)
    want = _run(x, z, sigma, "student_t", "reference", upstream, torch.float64)
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, sigma, "student_t", "triton", upstream, torch.float32)
    assert sum(launches.count[name] for name in TRIANGULAR + LABELS) == 0, launches.count
    assert launches.count["_forward_kernel"] == 1 and launches.count["_cols_kernel"] == 1, launches.count
    for mine, exact in zip(got, want):
        assert relative_error(mine, exact) <= TRITON_F32


@pytest.mark.parametrize("switch_at_backward", ["0", "1"])
def test_the_backward_follows_its_forward_at_huge_logits(monkeypatch, switch_at_backward):
    """Logits near 1e5 (dot kernel at tau = 0.01 on features of scale 30; a Gaussian target with
    per-row sigma of about 0.1 on z of scale 3), where an ulp of s or t moves q or p by percents:
    the backward takes each pair's logits from the forward's tile orientation (the forward's record
    decides, not the switch at backward time), and so agrees with the float64 reference on the same
    fp32 features."""
    gen = torch.Generator().manual_seed(5)
    n = 64                        # two row blocks of the interpreter's tile
    x = (30 * torch.randn(n, 16, generator=gen, dtype=torch.float64)).float().double()
    z = (3 * torch.randn(n, 8, generator=gen, dtype=torch.float64)).float().double()
    sigma = (0.1 + 0.05 * torch.rand(n, generator=gen, dtype=torch.float64)).float().double()
    upstream = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "1" if switch_at_backward == "0" else "0")
    launches = Launches(monkeypatch, ALL)
    device = device_of("triton")
    xt = x.float().to(device).requires_grad_()
    rows = ik.icon_loss(xt, target=ik.Affinity(z.float().to(device), kernel="gaussian", sigma=sigma.float().to(device)),
                        kernel="dot", temperature=0.01, backend="triton", reduction="none")
    os.environ["ICON_KERNELS_SYMMETRIC"] = switch_at_backward
    (dx,) = torch.autograd.grad(rows, (xt,), grad_outputs=upstream.float().to(device))
    ran_triangular = switch_at_backward == "0"
    assert launches.count["_triangular_affinity_backward_kernel"] == int(ran_triangular), launches.count
    assert launches.count["_cols_kernel"] == int(not ran_triangular), launches.count
    xr = x.clone().requires_grad_()
    want = ik.icon_loss(xr, target=ik.Affinity(z, kernel="gaussian", sigma=sigma), kernel="dot", temperature=0.01,
                        backend="reference", reduction="none")
    (want_dx,) = torch.autograd.grad(want, (xr,), grad_outputs=upstream)
    assert relative_error(rows.detach().cpu(), want.detach()) <= 1e-5
    assert relative_error(dx.cpu(), want_dx) <= 1e-5


def test_rows_whose_target_logits_are_all_minus_infinity_as_the_plain_forward(monkeypatch):
    """Rows 3 and 40 have a sigma so small that 2 sigma^2 underflows (t = -d^2 / 0 = -inf at every
    column): no p, and the plain kernels give NaN for their loss (0 / 0) and for the gradients they
    reach; the triangular ones give NaN at the same places and the same values elsewhere."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    x, z, sigma, upstream = _inputs(45, seed=9)
    sigma[[3, 40]] = 1e-30
    launches = Launches(monkeypatch, ALL)
    got = _run(x, z, sigma, "student_t", "triton", upstream, torch.float32)
    assert launches.count["_triangular_affinity_backward_kernel"] == 1, launches.count
    monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", "0")
    plain = _run(x, z, sigma, "student_t", "triton", upstream, torch.float32)
    rows = got[0]
    assert torch.isnan(rows[[3, 40]]).all() and torch.isnan(got[1]).any()
    assert torch.isfinite(rows[:3]).all() and torch.isfinite(rows[4:40]).all()
    for mine, theirs in zip(got, plain):
        assert torch.equal(torch.isnan(mine), torch.isnan(theirs))
        finite = ~torch.isnan(mine)
        assert relative_error(mine[finite], theirs[finite]) <= TRITON_F32


def test_minus_infinite_target_logits_of_some_pairs(monkeypatch):
    """A dot target on which z_3 . z_40 overflows to -inf in fp32 (a feature that only rows 3 and
    40 have, +-1e20), all other logits moderate: e^{t - m_p} = 0 there, and the pair adds nothing to
    A (not 0 * -inf = NaN), as it adds nothing to the plain forward's sums; the float64 reference
    has a finite logit of -1e40 there, with the same p of 0."""
    x, z, sigma, upstream = _inputs(45, seed=10)
    z = torch.cat([z, torch.zeros(45, 1, dtype=z.dtype)], 1)
    z[3, -1], z[40, -1] = 1e20, -1e20
    counts = _check_both_schedules(monkeypatch, x, z, sigma, upstream, "student_t", t_kernel="dot")
    _only_triangular(counts)


@pytest.mark.parametrize("kernel", ["power", "log_dot"])
def test_the_other_learned_kernels(monkeypatch, kernel):
    """Every learned kernel is symmetric when y is x: power (a parameter) and log_dot (none;
    positive x.x) take the triangular kernels too."""
    x, z, sigma, upstream = _inputs(45, seed=12)
    if kernel == "log_dot":
        x = x.abs() + 0.1
    counts = _check_both_schedules(monkeypatch, x, z, sigma, upstream, kernel)
    _only_triangular(counts)


@pytest.mark.parametrize("t_kernel,per_row,kernel,divergence", [
    ("student_t", True, "student_t", "kl"), ("student_t", False, "gaussian", "cross_entropy"),
    ("power", True, "dot", "kl"), ("log_dot", False, "student_t", "cross_entropy")])
def test_every_target_kernel(monkeypatch, t_kernel, per_row, kernel, divergence):
    """Student-t (dof), power (exponent) and log_dot (no parameter; z positive, so that z_i.z_j > 0)
    target kernels, whose logits are not a coefficient times the aux term: the row side takes
    k(a_ij; theta_i), the column side k(a_ij; theta_j) (symmetric_affinity_kernels.column_target_logits),
    with theta one value or one per row (t_ij != t_ji). N = 45: a diagonal and an off-diagonal block
    pair, ragged."""
    x, z, sigma, upstream = _inputs(45, seed=13)
    if t_kernel == "log_dot":
        z = z.abs() + 0.1
    counts = _check_both_schedules(monkeypatch, x, z, sigma if per_row else 1.7, upstream, kernel,
                                   t_kernel=t_kernel, divergence=divergence)
    _only_triangular(counts)


def test_student_t_target_gradients_after_the_triangular_forward(monkeypatch):
    """A Student-t target whose z and per-row dof require grad: the triangular forward's stats rows
    0, 2 and 3 feed the plain backward, which makes dz and ddof."""
    x, z, sigma, upstream = _inputs(45, seed=14)
    counts = _check_both_schedules(monkeypatch, x, z, sigma, upstream, "student_t", t_kernel="student_t",
                                   target_grad=True)
    _only_triangular(counts, backward=False)
