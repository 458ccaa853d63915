"""The f-divergences of DESIGN.md §1.1 on the fused backends that compute them (families.DIVERGENCES
lists them per divergence): against closed forms written here (the identity problem, where dL/dx
and dL/dz are dL/ds and dL/dt), over every kernel x target x option against the dense formula of
tests/dense_formula.py (the reference backend too) and the float64 dense reference, gradcheck, the
op checks, extreme logits and NaN inputs."""
import functools
import itertools

import pytest
import torch

import icon_kernels as ik
import dense_formula
from cases import (KERNELS, TARGETS, build, check_against_reference, clone_problem, keeps_self_pair_at_zero,
                   device_of, leaves, loss_and_grads, relative_error, seed_of, to_device)
from icon_kernels import families
from icon_kernels.backends.dispatch import op_arguments
from icon_kernels.backends.ops import forward_op
from icon_kernels.validation import LOSS_OPTIONS, check_arguments
from test_divergences import F_DIVERGENCES, GENERATOR, _identity_problem

FUSED = [name for name in ("torch", "cpu", "triton", "cuda")
         if all(name in families.DIVERGENCES[d].backends for d in F_DIVERGENCES)]
# the backends checked in float64 at 1e-9; Triton computes in fp32 (float64 inputs too) and has
# its own fp32 entries below ("Triton")
FLOAT64 = [name for name in FUSED if name != "triton"]

from icon_kernels.backends.blockwise import Problem as _OpArguments  # noqa: E402

DIVERGENCE_SLOT = _OpArguments._fields.index("divergence")   # in the op's flat arguments


def test_the_table_says_torch_cpu_triton_and_cuda():
    assert FUSED == ["torch", "cpu", "triton", "cuda"]


def _leaf_on(device, t):
    """A fresh copy of ``t`` on ``device`` (the cuda backend's inputs live there, cases.device_of),
    requiring grad as ``t`` does."""
    return t.detach().to(device).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend", FLOAT64, indirect=True)
@pytest.mark.parametrize("name", ["kl"] + F_DIVERGENCES)
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.1, 0.2)])
def test_gradients_are_the_closed_forms(backend, name, alpha, beta):
    device = device_of(backend)
    x, z, eye = (_leaf_on(device, t) for t in _identity_problem(n=9, m=7)[:3])
    target = ik.Affinity(z, eye, kernel="dot", temperature=1.0)
    upstream = torch.linspace(0.5, 1.5, 9, dtype=torch.float64, device=device)
    rows = ik.icon_loss(x, eye, target=target, kernel="dot", temperature=1.0, alpha=alpha, beta=beta,
                        divergence=name, reduction="none", backend=backend)
    dx, dz = torch.autograd.grad(rows, [x, z], grad_outputs=upstream)
    m = x.shape[1]
    q, p = x.detach().softmax(1), z.detach().softmax(1)
    q_mix, p_mix = (1 - beta) * q + beta / m, (1 - alpha) * p + alpha / m
    r = p_mix / q_mix
    f, g_of, f_prime = GENERATOR[name]
    g, fp = g_of(r), f_prime(r)
    want_rows = (q_mix * f(r)).sum(1)
    want_dx = upstream[:, None] * (1 - beta) * q * (g - (q * g).sum(1, keepdim=True))
    want_dz = upstream[:, None] * (1 - alpha) * p * (fp - (p * fp).sum(1, keepdim=True))
    torch.testing.assert_close(rows.detach(), want_rows, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dx, want_dx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dz, want_dz, rtol=1e-9, atol=1e-12)


# (name, rect, exclude_self, alpha, beta, reduction, weighted): the option settings of the matrix
F_SETTINGS = [
    ("self-mean", False, None, 0.0, 0.0, "mean", False),
    ("rect-alpha-none", True, False, 0.1, 0.0, "none", False),
    ("keepself-alpha-beta-sum-weighted", False, False, 0.15, 0.2, "sum", True),
]
F_SHAPE = (23, 19, 7)


def _has_zeros(target_kind, alpha):
    """reverse_kl needs alpha > 0 against a target with zeros (every type but Affinity)."""
    return target_kind != "affinity" and alpha == 0


def _matrix():
    return list(_matrix_cases())


def _matrix_cases():
    # the reference too: it is checked against the dense formula (and is what the others are
    # checked against besides)
    for backend, divergence, kernel, target_kind, setting in itertools.product(
            ["reference"] + FLOAT64, F_DIVERGENCES, KERNELS, TARGETS, F_SETTINGS):
        if divergence == "reverse_kl" and _has_zeros(target_kind, setting[3]):
            continue
        if keeps_self_pair_at_zero(kernel, (setting[0], setting[1], setting[2])):
            continue     # the power kernel's d^2_ii rounding: checked finite in the main suite
        yield pytest.param(backend, divergence, kernel, target_kind, setting,
                           id=f"{backend}-{divergence}-{kernel}-{target_kind}-{setting[0]}")


def _matrix_problem(divergence, kernel, target_kind, setting, t_kernel="gaussian"):
    """The float64 problem (fresh leaves) and upstream gradient of one case of the matrix
    (``t_kernel``: an Affinity target's kernel)."""
    name, rect, exclude_self, alpha, beta, reduction, weighted = setting
    full = (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted)
    n, m, d = F_SHAPE
    seed = seed_of(kernel, target_kind, name) if t_kernel == "gaussian" else seed_of(kernel, t_kernel, name)
    return build(kernel, target_kind, full, torch.float64, seed=seed, param_tensor="scalar", target_grad=True,
                 t_kernel=t_kernel, n=n, m=m, d=d)


@functools.lru_cache(maxsize=None)
def _dense_formula_result(*case):
    """The loss and the gradient of every leaf (cases.leaves' order) by tests/dense_formula.py,
    computed once per case (_matrix_problem's arguments) for every backend."""
    (x, y, target, kwargs), upstream = _matrix_problem(*case)
    loss = dense_formula.icon_loss(x, y, target=target, **kwargs)
    ins = leaves(x, y, target, kwargs)
    grads = torch.autograd.grad(loss, ins, grad_outputs=upstream, allow_unused=True)
    return loss.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]


@functools.lru_cache(maxsize=None)
def _reference_result(*case):
    """The reference backend's loss and gradients of one case, computed once for every backend."""
    problem, upstream = _matrix_problem(*case)
    return loss_and_grads(*problem, "reference", upstream)


@pytest.mark.parametrize("backend,divergence,kernel,target_kind,setting", _matrix(), indirect=["backend"])
def test_every_kernel_target_and_option(backend, divergence, kernel, target_kind, setting):
    """Loss and every gradient (x, y, the kernel parameter, the target's features, sigma,
    Neighbors weights, Dense p) within 1e-9 of the dense formula written in tests/dense_formula.py
    (issue 16, acceptance 1), and of the float64 reference (for the backends other than it)."""
    check_dense_formula_and_reference(backend, (divergence, kernel, target_kind, setting))


def _target_kernel_cases():
    """Every target kernel of an Affinity target under every setting (the power kernel's kept
    self pair left out, cases.keeps_self_pair_at_zero), the divergences in turn."""
    settings = [(t_kernel, setting) for t_kernel, setting in itertools.product(KERNELS, F_SETTINGS)
                if not keeps_self_pair_at_zero("student_t", setting, t_kernel)]
    for i, (t_kernel, setting) in enumerate(settings):
        divergence = F_DIVERGENCES[i % len(F_DIVERGENCES)]
        for backend in ["reference"] + FLOAT64:
            yield pytest.param(backend, divergence, t_kernel, setting,
                               id=f"{backend}-{divergence}-{t_kernel}-{setting[0]}")


@pytest.mark.parametrize("backend,divergence,t_kernel,setting", list(_target_kernel_cases()),
                         indirect=["backend"])
def test_every_affinity_target_kernel(backend, divergence, t_kernel, setting):
    """The matrix's Affinity target has the Gaussian kernel: here each target kernel's chain (dz,
    dz_cols, its sigma or exponent) against the dense formula and the reference, 1e-9."""
    check_dense_formula_and_reference(backend, (divergence, "student_t", "affinity", setting, t_kernel))


def check_dense_formula_and_reference(backend, case):
    """The backend's loss and gradients of ``case`` (_matrix_problem's arguments) within 1e-9 of
    the dense formula, and of the reference for a backend other than it."""
    if backend == "reference":
        got = _reference_result(*case)
    else:
        problem, upstream = _matrix_problem(*case)
        device = device_of(backend)
        loss, grads = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
        got = (loss.cpu(), [g.cpu() for g in grads])
    assert_close_in_float64(got, _dense_formula_result(*case), "dense formula")
    if backend != "reference":
        assert_close_in_float64(got, _reference_result(*case), "reference")


def assert_close_in_float64(got, want, against, tol=1e-9, floor=1e-13):
    """``got`` = (loss, gradients) within ``tol`` of ``want``, relative in norm for the loss and for
    each gradient, with an absolute floor: a gradient that is 0 in exact arithmetic (tv's dL/dw
    when every neighbour sits on one side of q) is 1e-16 noise on both sides, where a relative
    error means nothing."""
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert torch.isfinite(want_loss).all(), against
    assert len(got_grads) == len(want_grads), against
    for i, (g, w) in enumerate(zip([got_loss, *got_grads], [want_loss, *want_grads])):
        assert g.shape == w.shape, (against, i)
        err = (g - w).norm().item()
        assert err <= tol * w.norm().item() + floor, f"{against}, output {i}: error {err}, norm {w.norm().item()}"


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_fp32_within_tolerance(backend, divergence):
    problem, upstream = build("gaussian", "affinity", ("f32", False, None, 0.1, 0.1, divergence, "mean", False),
                              torch.float32, seed=3, target_grad=True, n=41, m=41, d=9)
    check_against_reference(problem, upstream, torch.float32, 2e-5, backend)


@pytest.mark.parametrize("backend", FLOAT64, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_gradcheck(backend, divergence):
    gen = torch.Generator().manual_seed(3)
    device = device_of(backend)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    z = torch.randn(6, 2, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    sigma = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    dof = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)

    def loss(x, z, sigma, dof):
        return ik.icon_loss(x, target=ik.Affinity(z, kernel="gaussian", sigma=sigma), kernel="student_t",
                            dof=dof, alpha=0.1, beta=0.05, divergence=divergence, backend=backend)
    assert torch.autograd.gradcheck(loss, (x, z, sigma, dof))


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("target_kind", ["labels", "affinity"])
def test_opcheck(backend, divergence, target_kind):
    gen = torch.Generator().manual_seed(4)
    device = device_of(backend)
    x = torch.randn(9, 4, generator=gen).to(device)
    target = (ik.Labels(torch.arange(9, device=device) % 3) if target_kind == "labels"
              else ik.Affinity(torch.randn(9, 3, generator=gen).to(device).requires_grad_()))
    problem = check_arguments(x.requires_grad_(), None, target=target, exclude_self=None, reduction="mean",
                              weight=None, **{**LOSS_OPTIONS, "divergence": divergence, "alpha": 0.1,
                                              "beta": 0.1})
    torch.library.opcheck(forward_op(backend), op_arguments(problem))


@pytest.mark.parametrize("backend", FLOAT64, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_extreme_logits_match_the_reference(backend, divergence):
    # tau = 0.01 and far-apart target points: p and q reach e^-200 and below, and log p of the
    # Affinity target (alpha = 0) is finite where p itself underflows
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    z = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 30
    alpha = 0.05 if divergence == "chi2" else 0.0    # chi2 with alpha = 0 is e^+400 here: inf in any dtype

    def run(name):
        device = device_of(name)
        xs, zs = x.to(device).requires_grad_(), z.to(device).requires_grad_()
        loss = ik.icon_loss(xs, target=ik.Affinity(zs, kernel="gaussian", sigma=1.0), kernel="cosine",
                            temperature=0.01, alpha=alpha, divergence=divergence, backend=name)
        return [t.cpu() for t in (loss, *torch.autograd.grad(loss, [xs, zs]))]
    got, want = run(backend), run("reference")
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        # 1e-6, not 1e-9: dL/dz = p (f' - Phi) cancels here (tv: f' - Phi = 1/2 - Phi with
        # Phi -> 1/2), and the two sides round that difference differently
        assert relative_error(g, w) <= 1e-6


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("where", ["x", "z"])
def test_nan_inputs_give_nan(backend, divergence, where):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    (x if where == "x" else z)[2, 1] = float("nan")
    for name in (backend, "reference"):
        device = device_of(name)
        loss = ik.icon_loss(x.to(device), target=ik.Affinity(z.to(device)), kernel="gaussian", alpha=0.1,
                            divergence=divergence, backend=name)
        assert torch.isnan(loss), name


@pytest.mark.parametrize("backend", FUSED, indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_error_within_twice_pytorchs_own(backend, divergence, dtype):
    """DESIGN §5, as test_backends_vs_reference's test of the same name: fp16/bf16 inputs, the
    loss and gradients within twice the dense reference's own error in that dtype (+1e-4)."""
    setting = ("half", False, None, 0.1, 0.0, divergence, "mean", False)
    problem, upstream = build("cosine", "labels", setting, dtype, seed=5, n=64, m=64, d=32)
    exact = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    naive = loss_and_grads(*problem, "reference", upstream)
    device = device_of(backend)
    ours = loss_and_grads(*to_device(problem, device), backend, upstream.to(device))
    ours = (ours[0].cpu(), [g.cpu() for g in ours[1]])
    assert ours[0].dtype == dtype
    for mine, theirs, want in zip([ours[0], *ours[1]], [naive[0], *naive[1]], [exact[0], *exact[1]]):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-4


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_auto_picks_a_fused_backend(divergence):
    x, z, eye, target = _identity_problem()
    auto = ik.icon_loss(x, eye, target=target, alpha=0.1, divergence=divergence)
    ref = ik.icon_loss(x, eye, target=target, alpha=0.1, divergence=divergence, backend="reference")
    torch.testing.assert_close(auto, ref, rtol=1e-9, atol=0)
    from icon_kernels.backends import registry
    picked = registry.resolve_backend("auto", x.device, only=families.DIVERGENCES[divergence].backends)
    assert picked in ("cpu", "torch")          # a fused backend, not the dense reference


def test_the_triton_op_refuses_an_unknown_divergence_code():
    # a second gate behind the table: a direct op call with a code its kernels lack
    pytest.importorskip("triton")
    from icon_kernels._triton import launchers
    x = torch.randn(5, 3)
    problem = check_arguments(x, None, target=ik.Labels(torch.arange(5) % 2), exclude_self=None,
                              reduction="mean", weight=None, **LOSS_OPTIONS)
    args = list(op_arguments(problem))
    args[DIVERGENCE_SLOT] = 7
    with pytest.raises(ValueError, match="triton backend computes kl, cross_entropy, reverse_kl, tv, "
                                         "hellinger, js, chi2 only; divergence code 7"):
        launchers.forward(*args)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_the_triton_kernels_reject_an_unlisted_divergence_code(backend, monkeypatch):
    """A code the launcher lets through but f_pair_terms does not list fails to compile
    (tl.static_assert) instead of computing chi2."""
    from icon_kernels._triton import launchers
    monkeypatch.setitem(launchers.DIVERGENCE_CODES, "planted", 9)
    x = torch.randn(5, 3)
    problem = check_arguments(x, None, target=ik.Labels(torch.arange(5) % 2), exclude_self=None,
                              reduction="mean", weight=None, **{**LOSS_OPTIONS, "alpha": 0.1})
    args = list(op_arguments(problem))
    args[DIVERGENCE_SLOT] = 9
    with pytest.raises(Exception, match="unknown divergence code"):
        launchers.forward(*args)


def test_an_unknown_divergence_code_is_refused_by_the_ops():
    x = torch.randn(5, 3)
    problem = check_arguments(x, None, target=ik.Labels(torch.arange(5) % 2), exclude_self=None,
                              reduction="mean", weight=None, **LOSS_OPTIONS)
    args = list(op_arguments(problem))
    args[DIVERGENCE_SLOT] = 99
    with pytest.raises(ValueError, match="unknown divergence code 99"):
        forward_op("torch")(*args)
    if "cpu" in ik.available_backends():
        with pytest.raises(RuntimeError, match="unknown divergence code 99"):
            forward_op("cpu")(*args)
    if "cuda" in ik.available_backends():
        with pytest.raises(RuntimeError, match="unknown divergence code 99"):
            forward_op("cuda")(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])


# --- Triton: fp32 inside, so fp32 inputs against the float64 reference ------------------------------
# The interpreter costs seconds per case: instead of the float64 matrix, one ragged selection that
# covers every divergence x target, every kernel and option setting several times, and the
# Affinity target's gradients (features, sigma) with every target kernel.

TRITON_F32 = 5e-5            # as test_backends_vs_reference.TRITON_F32
TRITON_SHAPES = ((45, 38, 16), (33, 61, 20), (40, 40, 9))    # n, m (rectangular settings), d


def _triton_setting(divergence, target_kind, kernel, first):
    """The first of F_SETTINGS from index ``first`` on that the problem allows: reverse_kl needs
    alpha > 0 against a target with zeros, and the power kernel's kept self pair is left out of
    reference comparisons (cases.keeps_self_pair_at_zero)."""
    for k in range(len(F_SETTINGS)):
        setting = F_SETTINGS[(first + k) % len(F_SETTINGS)]
        if not (divergence == "reverse_kl" and _has_zeros(target_kind, setting[3])
                or keeps_self_pair_at_zero(kernel, setting)):
            return setting
    raise AssertionError("no setting fits")


def _triton_cases():
    for i, (divergence, target_kind) in enumerate(itertools.product(F_DIVERGENCES, TARGETS)):
        kernel = KERNELS[i % len(KERNELS)]
        setting = _triton_setting(divergence, target_kind, kernel, i)
        shape = TRITON_SHAPES[i % len(TRITON_SHAPES)]
        yield divergence, kernel, target_kind, setting, shape


def check_fp32_against_reference(problem, upstream, backend, tol=TRITON_F32, floor=1e-7):
    """The loss and every gradient of the fp32 problem within ``tol`` (relative, in norm) of the
    float64 reference, with an absolute ``floor`` for a gradient that is 0 in exact arithmetic
    (as assert_close_in_float64)."""
    want_loss, want_grads = loss_and_grads(*clone_problem(*problem, torch.float64), "reference", upstream)
    device = device_of(backend)        # Triton: cuda on a GPU, CPU tensors under the interpreter
    got_loss, got_grads = loss_and_grads(*to_device(clone_problem(*problem, torch.float32), device), backend,
                                         upstream.to(device))
    got_loss, got_grads = got_loss.cpu(), [g.cpu() for g in got_grads]
    assert got_loss.dtype == torch.float32 and torch.isfinite(want_loss).all()
    assert len(got_grads) == len(want_grads)
    for i, (g, w) in enumerate(zip([got_loss, *got_grads], [want_loss, *want_grads])):
        err = (g.double() - w).norm().item()
        assert err <= tol * w.norm().item() + floor, f"output {i}: error {err}, norm {w.norm().item()}"


def test_the_triton_selection_covers_every_divergence_target_kernel_and_option():
    cases = list(_triton_cases())
    assert {(c[0], c[2]) for c in cases} == set(itertools.product(F_DIVERGENCES, TARGETS))
    assert {c[1] for c in cases} == set(KERNELS)
    assert {c[3][0] for c in cases} == {s[0] for s in F_SETTINGS}
    assert any(c[2] == "affinity" and c[3][3] == 0 for c in cases)       # the exact log p
    assert any(c[2] == "affinity" and c[3][3] > 0 and c[3][4] > 0 for c in cases)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("divergence,kernel,target_kind,setting,shape", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}-{case[3][0]}-{case[4][0]}x{case[4][1] if case[3][1] else case[4][0]}x{case[4][2]}")
    for case in _triton_cases()])
def test_triton_every_divergence_and_target(backend, divergence, kernel, target_kind, setting, shape):
    """Loss and every gradient (x, y, the kernel parameter, the Affinity target's features and
    sigma, Neighbors weights, Dense p) of fp32 inputs within 5e-5 of the float64 reference."""
    name, rect, exclude_self, alpha, beta, reduction, weighted = setting
    full = (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted)
    n, m, d = shape
    problem, upstream = build(kernel, target_kind, full, torch.float32, seed=seed_of(kernel, target_kind, name),
                              param_tensor="scalar", target_grad=True, n=n, m=m, d=d)
    check_fp32_against_reference(problem, upstream, backend)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("t_kernel", KERNELS)
def test_triton_affinity_target_gradients(backend, t_kernel):
    """Every target kernel's chain (dz, dz_cols, its parameter), one divergence and setting each."""
    i = KERNELS.index(t_kernel)
    divergence = F_DIVERGENCES[i % len(F_DIVERGENCES)]
    setting = _triton_setting(divergence, "affinity", t_kernel, i)
    name, rect, exclude_self, alpha, beta, reduction, weighted = setting
    full = (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted)
    problem, upstream = build("student_t", "affinity", full, torch.float32, seed=11, param_tensor="scalar",
                              target_grad=True, t_kernel=t_kernel, n=35, m=40, d=12)
    check_fp32_against_reference(problem, upstream, backend)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("name", ["kl"] + F_DIVERGENCES)
@pytest.mark.parametrize("alpha,beta", [(0.0, 0.0), (0.1, 0.2)])
def test_triton_gradients_are_the_closed_forms(backend, name, alpha, beta):
    """test_gradients_are_the_closed_forms with fp32 inputs: dL/ds and dL/dt themselves."""
    x64, z64, _, _ = _identity_problem(n=9, m=7)
    device = device_of(backend)
    x = x64.detach().float().to(device).requires_grad_()
    z = z64.detach().float().to(device).requires_grad_()
    eye = torch.eye(7, device=device)
    upstream = torch.linspace(0.5, 1.5, 9)
    rows = ik.icon_loss(x, eye, target=ik.Affinity(z, eye, kernel="dot", temperature=1.0), kernel="dot",
                        temperature=1.0, alpha=alpha, beta=beta, divergence=name, reduction="none",
                        backend=backend)
    dx, dz = (t.cpu() for t in torch.autograd.grad(rows, [x, z], grad_outputs=upstream.to(device)))
    rows = rows.cpu()
    m, up = 7, upstream.double()[:, None]
    q, p = x64.detach().softmax(1), z64.detach().softmax(1)
    q_mix, p_mix = (1 - beta) * q + beta / m, (1 - alpha) * p + alpha / m
    r = p_mix / q_mix
    f, g_of, f_prime = GENERATOR[name]
    g, fp = g_of(r), f_prime(r)
    want = [(q_mix * f(r)).sum(1), up * (1 - beta) * q * (g - (q * g).sum(1, keepdim=True)),
            up * (1 - alpha) * p * (fp - (p * fp).sum(1, keepdim=True))]
    for got, w in zip([rows.detach(), dx, dz], want):
        assert relative_error(got, w) <= 2e-6, relative_error(got, w)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_triton_extreme_logits(backend, divergence):
    """test_extreme_logits_match_the_reference in fp32 (DESIGN.md §5): q and p reach e^-200, far
    below fp32's smallest number, every output stays finite (terms from logs, the exact log p),
    and its error is within twice the dense fp32 PyTorch's own. The gradients here are tiny
    differences (tv's dL/dz is 3e-10 against a loss of 1), which fp32 PyTorch gets 20% to 100%
    wrong: a fixed tolerance would mean nothing; this bounds Triton by it. chi2 takes beta > 0:
    with q~ = q its value, e^+120, is beyond fp32 in any backend."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    z = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 30
    alpha, beta = (0.05, 0.05) if divergence == "chi2" else (0.0, 0.0)

    def run(name, dtype):
        device = "cpu" if name == "reference" else device_of(name)
        xs, zs = x.to(device, dtype).requires_grad_(), z.to(device, dtype).requires_grad_()
        loss = ik.icon_loss(xs, target=ik.Affinity(zs, kernel="gaussian", sigma=1.0), kernel="cosine",
                            temperature=0.01, alpha=alpha, beta=beta, divergence=divergence, backend=name)
        return [t.cpu() for t in (loss, *torch.autograd.grad(loss, [xs, zs]))]
    exact, naive, ours = run("reference", torch.float64), run("reference", torch.float32), run(backend, torch.float32)
    for i, (mine, theirs, want) in enumerate(zip(ours, naive, exact)):
        assert torch.isfinite(mine).all() and torch.isfinite(want).all()
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-5, \
            (i, relative_error(mine, want), relative_error(theirs, want))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"], indirect=True)
def test_an_infinite_term_is_a_constant(backend):
    # reverse KL against an Affinity target that is exactly 0 at some pairs (log_dot on features
    # with disjoint supports: t = log 0 = -inf), alpha = 0: +inf, and the gradient is that of the
    # finite terms, as the oracle's (whose +inf branch has no gradient); not NaN
    gen = torch.Generator().manual_seed(8)
    dtype = torch.float32 if backend == "triton" else torch.float64
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    z = torch.eye(2, dtype=torch.float64)[torch.arange(8) % 2] + 0.0

    def run(name, dt):
        device = "cpu" if name == "reference" else device_of(name)
        xs = x.to(device, dt).requires_grad_()
        loss = ik.icon_loss(xs, target=ik.Affinity(z.to(device, dt), kernel="log_dot"), kernel="gaussian",
                            divergence="reverse_kl", backend=name)
        return loss.cpu(), torch.autograd.grad(loss, xs)[0].cpu()
    loss, dx = run(backend, dtype)
    want_loss, want_dx = run("reference", torch.float64)
    assert loss == float("inf") and want_loss == float("inf")
    assert torch.isfinite(want_dx).all() and want_dx.abs().max() > 0
    assert relative_error(dx, want_dx) <= (1e-9 if dtype == torch.float64 else 5e-5)


def test_reverse_kl_against_a_dense_target_with_zeros_asks_for_alpha():
    x = torch.randn(5, 3, dtype=torch.float64)
    p = torch.rand(5, 5, dtype=torch.float64)
    p[1, 3] = 0
    with pytest.raises(ValueError, match="Dense target with zeros.*alpha > 0"):
        ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl")
    p[1, 3], p[2] = 0.5, 0          # zeros on the diagonal (excluded) and a row left out: finite
    p.fill_diagonal_(0)
    assert torch.isfinite(ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl"))
    p[0, 0] = 0.0
    with pytest.raises(ValueError, match="alpha > 0"):    # the diagonal is valid with exclude_self=False
        ik.icon_loss(x, target=ik.Dense(p), divergence="reverse_kl", exclude_self=False)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("divergence", [d for d in F_DIVERGENCES if d != "chi2"])    # chi2 is +inf here
@pytest.mark.parametrize("kernel,scale,param", [("gaussian", 30.0, 1.0), ("dot", 1.0, 0.03)])
def test_fp32_large_logits_within_twice_pytorchs_own_error(backend, divergence, kernel, scale, param):
    """The CPU's SIMD path (dot or Gaussian kernel, no target gradient) at large logits, where the
    fp32 LSE's rounding leaves sum_j q = 1 + O(|LSE| ulps): dL/dx within twice fp32 PyTorch's own
    error (Gamma must be the mean of g over the very q used, or dx was up to 1000x worse)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(600, 8, generator=gen, dtype=torch.float64) * scale
    labels = ik.Labels(torch.arange(600) % 7)
    alpha = 0.1 if divergence in ("reverse_kl", "chi2") else 0.0
    option = {"sigma" if kernel == "gaussian" else "temperature": param}

    def dx(name, dtype):
        xs = x.to(dtype).requires_grad_()
        loss = ik.icon_loss(xs, target=labels, kernel=kernel, alpha=alpha, divergence=divergence, backend=name,
                            **option)
        return torch.autograd.grad(loss, xs)[0]
    exact, naive, ours = dx("reference", torch.float64), dx("reference", torch.float32), dx(backend, torch.float32)
    assert relative_error(ours, exact) <= 2 * relative_error(naive, exact) + 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("divergence", F_DIVERGENCES)
@pytest.mark.parametrize("target_kind", ["dense", "neighbors"])
def test_nan_in_target_weights_gives_nan(backend, divergence, target_kind):
    if backend not in ik.available_backends():
        pytest.skip(f"{backend} unavailable")
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    if target_kind == "dense":
        p = torch.rand(6, 6, generator=gen, dtype=torch.float64) + 0.1
        p[2, 4] = float("nan")
        target = ik.Dense(p)
    else:
        w = torch.rand(6, 2, generator=gen, dtype=torch.float64) + 0.1
        w[3, 1] = float("nan")
        target = ik.Neighbors(torch.tensor([[1, 2], [0, 2], [3, 4], [4, 5], [5, 0], [0, 1]]), w)
    loss = ik.icon_loss(x, target=target, kernel="gaussian", alpha=0.1, divergence=divergence, backend=backend)
    assert torch.isnan(loss)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_torch_left_out_affinity_row_has_zero_target_gradients(divergence):
    # N = 1 with y omitted: the row has no valid column (M' = 0) and is left out; the torch
    # backend's Affinity tile path must not turn its 0 / 0 target tile into NaN gradients
    x = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    loss = ik.icon_loss(x, target=ik.Affinity(z, sigma=sigma), kernel="student_t", divergence=divergence,
                        backend="torch")
    grads = torch.autograd.grad(loss, [x, z, sigma])
    assert loss.item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_torch_js_affinity_rows_match_in_float64_where_log_p_far_exceeds_log_q():
    # js's log(1 + e^d) at d = log p - log q > 20: torch's softplus returns d there, ~2e-9 off,
    # which came back as 1e-10 relative in float64 row losses
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    target = ik.Affinity(z, kernel="student_t", dof=0.8)
    rows = [ik.icon_loss(x, target=target, kernel="dot", divergence="js", reduction="none", backend=b)
            for b in ("reference", "torch")]
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-13, atol=0)
