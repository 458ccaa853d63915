"""Bad input raises ValueError/TypeError naming the argument (DESIGN.md §2); NaN/Inf propagate.

Each case builds the target and calls icon_loss inside `pytest.raises`, so the check passes
whether the library validates in the target's constructor or in icon_loss. Argument names are
matched as whole words (r"\\bx\\b"), so "x" is not satisfied by an unrelated word like "expected".
"""
import os
import re
import signal

import pytest
import torch

import icon_kernels as ik

BACKENDS = ["reference", "torch", "cpu", "triton"]
N, D = 6, 4


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in ik.available_backends():
        pytest.skip(f"backend {request.param!r} not available")
    if request.param == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these CPU-tensor tests reach triton only through the interpreter")
    return request.param


def word(name):
    return rf"\b{re.escape(name)}\b"


def data(n=N, d=D, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype)


def labels(n=N):
    return torch.arange(n) // 2


def raises(exc, name, fn):
    with pytest.raises(exc, match=word(name)):
        fn()


# ----------------------------------------------------------------------------------------------
# Shapes, dtypes, devices of x and y
# ----------------------------------------------------------------------------------------------
def test_y_wrong_feature_dim(backend):
    x, y = data(), data(7, D + 1)
    raises(ValueError, "y", lambda: ik.icon_loss(
        x, y, target=ik.Labels(labels(), torch.zeros(7, dtype=torch.long)), backend=backend))


def test_y_wrong_ndim(backend):
    x = data()
    raises(ValueError, "y", lambda: ik.icon_loss(
        x, torch.randn(N, dtype=torch.float64), target=ik.Labels(labels()), backend=backend))


def test_x_wrong_ndim(backend):
    raises(ValueError, "x", lambda: ik.icon_loss(
        torch.randn(N, dtype=torch.float64), target=ik.Labels(labels()), backend=backend))


def test_x_not_floating(backend):
    x = torch.randint(0, 5, (N, D))
    raises(TypeError, "x", lambda: ik.icon_loss(x, target=ik.Labels(labels()), backend=backend))


def test_y_not_floating(backend):
    y = torch.randint(0, 5, (N, D))
    raises(TypeError, "y", lambda: ik.icon_loss(
        data(), y, target=ik.Labels(labels(), labels()), backend=backend))


def test_x_empty(backend):
    x = torch.empty(0, D, dtype=torch.float64)
    raises(ValueError, "x", lambda: ik.icon_loss(
        x, target=ik.Labels(torch.empty(0, dtype=torch.long)), backend=backend))


def test_y_on_other_device(backend):
    y = torch.empty(N, D, dtype=torch.float64, device="meta")
    raises(ValueError, "y", lambda: ik.icon_loss(
        data(), y, target=ik.Labels(labels(), labels()), backend=backend))


def test_row_labels_on_other_device(backend):
    lab = torch.empty(N, dtype=torch.long, device="meta")
    raises(ValueError, "row_labels", lambda: ik.icon_loss(
        data(), target=ik.Labels(lab), backend=backend))


def test_col_labels_on_other_device(backend):
    cl = torch.empty(7, dtype=torch.long, device="meta")
    raises(ValueError, "col_labels", lambda: ik.icon_loss(
        data(), data(7, D, seed=1), target=ik.Labels(labels(), cl), backend=backend))


def test_indices_on_other_device(backend):
    idx = torch.empty(N, 2, dtype=torch.long, device="meta")
    raises(ValueError, "indices", lambda: ik.icon_loss(
        data(), target=ik.Neighbors(idx), backend=backend))


def test_weight_on_other_device(backend):
    w = torch.empty(N, dtype=torch.float64, device="meta")
    raises(ValueError, "weight", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), weight=w, backend=backend))


def test_exclude_self_needs_square(backend):
    raises(ValueError, "exclude_self", lambda: ik.icon_loss(
        data(), data(7, D, seed=1), target=ik.Labels(labels(), torch.zeros(7, dtype=torch.long)),
        exclude_self=True, backend=backend))


# ----------------------------------------------------------------------------------------------
# Scalar parameters
# ----------------------------------------------------------------------------------------------
TEMPERATURES = [0.0, -0.5,
                lambda: torch.tensor(0.0, dtype=torch.float64),
                lambda: torch.tensor(-1.0, dtype=torch.float64),
                lambda: torch.tensor([0.1, 0.2, -0.1, 0.3, 0.4, 0.5], dtype=torch.float64),
                lambda: torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4, 0.5], dtype=torch.float64)]


@pytest.mark.parametrize("kernel", ["cosine", "dot"])
@pytest.mark.parametrize("tau", TEMPERATURES, ids=lambda t: "tensor" if callable(t) else str(t))
def test_temperature_not_positive(backend, kernel, tau):
    tau = tau() if callable(tau) else tau
    raises(ValueError, "temperature", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel=kernel, temperature=tau, backend=backend))


def test_temperature_wrong_shape(backend):
    tau = torch.full((N + 1,), 0.1, dtype=torch.float64)
    raises(ValueError, "temperature", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), temperature=tau, backend=backend))


@pytest.mark.parametrize("sigma", [0.0, -1.0, lambda: torch.tensor(-2.0, dtype=torch.float64),
                                   lambda: torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0],
                                                        dtype=torch.float64)],
                         ids=lambda s: "tensor" if callable(s) else str(s))
def test_sigma_not_positive(backend, sigma):
    sigma = sigma() if callable(sigma) else sigma
    raises(ValueError, "sigma", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel="gaussian", sigma=sigma, backend=backend))


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_affinity_sigma_not_positive(backend, sigma):
    raises(ValueError, "sigma", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(seed=1), kernel="gaussian", sigma=sigma),
        kernel="gaussian", backend=backend))


@pytest.mark.parametrize("dof", [0.0, -1.0])
def test_dof_not_positive(backend, dof):
    raises(ValueError, "dof", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel="student_t", dof=dof, backend=backend))


@pytest.mark.parametrize("dof", [0.0, -3.0])
def test_affinity_dof_not_positive(backend, dof):
    raises(ValueError, "dof", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(seed=1), kernel="student_t", dof=dof),
        kernel="gaussian", backend=backend))


@pytest.mark.parametrize("exponent", [0.0, -1.0, float("nan")])
def test_exponent_not_positive(backend, exponent):
    if exponent != exponent:        # a NaN float passes (NaN inputs give a NaN loss), as for dof
        loss = ik.icon_loss(data(), target=ik.Labels(labels()), kernel="power", exponent=exponent,
                            backend=backend)
        assert torch.isnan(loss).item()
        return
    raises(ValueError, "exponent", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel="power", exponent=exponent, backend=backend))
    raises(ValueError, "exponent", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel="power",
        exponent=torch.full((N,), exponent, dtype=torch.float64), backend=backend))


@pytest.mark.parametrize("exponent", [0.0, -2.0])
def test_affinity_exponent_not_positive(backend, exponent):
    raises(ValueError, "exponent", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(seed=1), kernel="power", exponent=exponent),
        kernel="gaussian", backend=backend))


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_affinity_temperature_not_positive(backend, tau):
    raises(ValueError, "temperature", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(seed=1), kernel="cosine", temperature=tau),
        backend=backend))


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_alpha_beta_out_of_range(backend, name, value):
    raises(ValueError, name, lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), backend=backend, **{name: value}))


# ----------------------------------------------------------------------------------------------
# Strings: kernel, divergence, reduction, backend
# ----------------------------------------------------------------------------------------------
def test_unknown_kernel(backend):
    raises(ValueError, "kernel", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), kernel="laplace", backend=backend))


def test_unknown_affinity_kernel(backend):
    raises(ValueError, "kernel", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(seed=1), kernel="laplace"), backend=backend))


def test_unknown_divergence(backend):
    raises(ValueError, "divergence", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), divergence="jensen-shannon", backend=backend))


def test_unknown_reduction(backend):
    raises(ValueError, "reduction", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), reduction="max", backend=backend))


def test_unknown_backend():
    raises(ValueError, "backend", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), backend="no_such_backend"))


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_unavailable_backend(name):
    available = ik.available_backends()
    if name in available:
        pytest.skip(f"backend {name!r} is available here")
    with pytest.raises(ValueError, match=word("backend")) as info:
        ik.icon_loss(data(), target=ik.Labels(labels()), backend=name)
    msg = str(info.value)
    assert name in msg
    for b in available:
        assert b in msg, f"message does not list available backend {b!r}: {msg}"


def test_available_backends_has_oracle():
    available = ik.available_backends()
    assert isinstance(available, list)
    assert "reference" in available and "torch" in available


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------
def test_row_labels_wrong_length(backend):
    raises(ValueError, "row_labels", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels(N - 1)), backend=backend))


def test_col_labels_wrong_length(backend):
    x, y = data(), data(7, D, seed=1)
    raises(ValueError, "col_labels", lambda: ik.icon_loss(
        x, y, target=ik.Labels(labels(), torch.zeros(6, dtype=torch.long)), backend=backend))


def test_col_labels_wrong_length_self(backend):
    raises(ValueError, "col_labels", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels(), labels(N + 2)), backend=backend))


@pytest.mark.parametrize("bad", [N, N + 3, -2])
def test_neighbor_indices_out_of_range(backend, bad):
    idx = torch.tensor([[1, 2]] * N)
    idx[3, 1] = bad
    raises(ValueError, "indices", lambda: ik.icon_loss(
        data(), target=ik.Neighbors(idx), backend=backend))


def test_neighbor_indices_out_of_range_rectangular(backend):
    idx = torch.tensor([[0, 6]] * N)  # M = 6 columns: 6 is out of range
    raises(ValueError, "indices", lambda: ik.icon_loss(
        data(), data(6, D, seed=1), target=ik.Neighbors(idx), backend=backend))


def test_neighbor_indices_wrong_rows(backend):
    idx = torch.tensor([[1, 2]] * (N + 1))
    raises(ValueError, "indices", lambda: ik.icon_loss(
        data(), target=ik.Neighbors(idx), backend=backend))


def test_neighbor_weights_wrong_shape(backend):
    idx = torch.tensor([[1, 2]] * N)
    w = torch.ones(N, 3, dtype=torch.float64)
    raises(ValueError, "weights", lambda: ik.icon_loss(
        data(), target=ik.Neighbors(idx, w), backend=backend))


def test_weight_wrong_length(backend):
    raises(ValueError, "weight", lambda: ik.icon_loss(
        data(), target=ik.Labels(labels()), weight=torch.ones(N + 1, dtype=torch.float64),
        backend=backend))


@pytest.mark.parametrize("target", ["labels", None, 3, "tensor"])
def test_target_wrong_type(backend, target):
    if target == "tensor":
        target = labels()
    raises(TypeError, "target", lambda: ik.icon_loss(data(), target=target, backend=backend))


def test_target_missing():
    raises(TypeError, "target", lambda: ik.icon_loss(data()))


@pytest.mark.parametrize("shape", [(N, N + 1), (N + 1, N), (N,)])
def test_dense_p_wrong_shape(backend, shape):
    p = torch.rand(*shape, dtype=torch.float64)
    raises(ValueError, "p", lambda: ik.icon_loss(data(), target=ik.Dense(p), backend=backend))


def test_affinity_z_wrong_rows(backend):
    raises(ValueError, "z", lambda: ik.icon_loss(
        data(), target=ik.Affinity(data(N + 1, 3, seed=1)), kernel="gaussian", backend=backend))


def test_affinity_z_cols_wrong_rows(backend):
    x, y = data(), data(7, D, seed=1)
    target = ik.Affinity(data(N, 3, seed=2), data(5, 3, seed=3))
    raises(ValueError, "z_cols", lambda: ik.icon_loss(
        x, y, target=target, kernel="gaussian", backend=backend))


def test_affinity_z_cols_wrong_dim(backend):
    x, y = data(), data(7, D, seed=1)
    target = ik.Affinity(data(N, 3, seed=2), data(7, 4, seed=3))
    raises(ValueError, "z_cols", lambda: ik.icon_loss(
        x, y, target=target, kernel="gaussian", backend=backend))


# ----------------------------------------------------------------------------------------------
# NaN / Inf propagate: NaN loss, no exception, no hang
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_hang():
    def _alarm(signum, frame):
        raise TimeoutError("icon_loss hung on non-finite input")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kernel", ["cosine", "dot", "gaussian", "student_t"])
def test_nonfinite_x_gives_nan(backend, kernel, bad, no_hang):
    x = data()
    x[2, 1] = bad
    x.requires_grad_(True)
    loss = ik.icon_loss(x, target=ik.Labels(labels()), kernel=kernel, backend=backend)
    if bad != bad:
        assert torch.isnan(loss).item()
    else:
        # DESIGN §2 says NaN; +inf is also an honest answer for an Inf input (e.g. a dense
        # logsumexp that handles inf gives a -inf log q at a positive), so accept any non-finite.
        assert not torch.isfinite(loss).item()
    loss.backward()  # must not raise either


@pytest.mark.parametrize("pad_weight", [float("nan"), float("inf")])
def test_a_padding_slots_weight_is_ignored(backend, pad_weight, no_hang):
    # -1 pads carry no weight, whatever their weights slot holds: every backend (the torch
    # backend and the oracle used to give NaN here while cpu, Triton and ring mode ignored it)
    idx = torch.tensor([[1, -1], [0, 2], [3, -1], [2, 4], [5, 3], [4, -1]])
    w = torch.rand(N, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    clean = ik.icon_loss(data(), target=ik.Neighbors(idx, w), kernel="gaussian", backend=backend)
    w[idx < 0] = pad_weight
    padded = ik.icon_loss(data(), target=ik.Neighbors(idx, w), kernel="gaussian", backend=backend)
    assert torch.isfinite(padded).item()
    torch.testing.assert_close(padded, clean, rtol=0, atol=0)


def test_nan_x_with_affinity_target(backend, no_hang):
    x = data()
    x[0, 0] = float("nan")
    loss = ik.icon_loss(x, target=ik.Affinity(data(seed=1)), kernel="gaussian", backend=backend)
    assert torch.isnan(loss).item()


def test_nan_target_features(backend, no_hang):
    z = data(seed=1)
    z[4, 2] = float("nan")
    loss = ik.icon_loss(data(), target=ik.Affinity(z), kernel="gaussian", backend=backend)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize("per_row", [False, True])
def test_nan_temperature_gives_nan(backend, per_row, no_hang):
    if per_row:
        tau = torch.full((N,), 0.2, dtype=torch.float64)
        tau[1] = float("nan")
    else:
        tau = torch.tensor(float("nan"), dtype=torch.float64)
    loss = ik.icon_loss(data(), target=ik.Labels(labels()), kernel="cosine", temperature=tau,
                        backend=backend)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_nan_affinity_sigma(backend, alpha, no_hang):
    target = ik.Affinity(data(seed=1), sigma=torch.tensor(float("nan"), dtype=torch.float64))
    loss = ik.icon_loss(data(), target=target, kernel="gaussian", alpha=alpha, backend=backend)
    assert torch.isnan(loss).item()


def test_nan_target_features_debiased(backend, no_hang):
    z = data(seed=1)
    z[0, 0] = float("nan")
    loss = ik.icon_loss(data(), target=ik.Affinity(z), kernel="gaussian", alpha=0.1,
                        backend=backend)
    assert torch.isnan(loss).item()


def test_nan_dense_p(backend, no_hang):
    """A NaN in p must not make its row look like a row without positives (silently dropped)."""
    p = torch.rand(N, N, dtype=torch.float64)
    p[2, 3] = float("nan")
    loss = ik.icon_loss(data(), target=ik.Dense(p), backend=backend)
    assert torch.isnan(loss).item()


def test_nan_neighbor_weights(backend, no_hang):
    idx = torch.tensor([[1, 2]] * N)
    w = torch.ones(N, 2, dtype=torch.float64)
    w[1, 1] = float("nan")
    loss = ik.icon_loss(data(), target=ik.Neighbors(idx, w), backend=backend)
    assert torch.isnan(loss).item()


def test_nan_row_weight(backend, no_hang):
    wt = torch.ones(N, dtype=torch.float64)
    wt[3] = float("nan")
    loss = ik.icon_loss(data(), target=ik.Labels(labels()), weight=wt, backend=backend)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize("kernel", ["gaussian", "student_t", "power"])
def test_nan_sigma_dof(backend, kernel, no_hang):
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    kw = {{"gaussian": "sigma", "student_t": "dof", "power": "exponent"}[kernel]: nan}
    loss = ik.icon_loss(data(), target=ik.Labels(labels()), kernel=kernel, backend=backend, **kw)
    assert torch.isnan(loss).item()


def test_nan_y_rectangular(backend, no_hang):
    y = data(7, D, seed=1)
    y[5, 0] = float("nan")
    loss = ik.icon_loss(data(), y, target=ik.Labels(labels(), torch.arange(7) // 2),
                        kernel="cosine", backend=backend)
    assert torch.isnan(loss).item()


# ----------------------------------------------------------------------------------------------
# Issue 13, items 11-15: bad input that used to be accepted, and an Inf that gave +inf
# ----------------------------------------------------------------------------------------------
def test_negative_row_weights_raise(backend):
    wt = torch.ones(N, dtype=torch.float64)
    wt[2] = -0.5
    raises(ValueError, "weight", lambda: ik.icon_loss(data(), target=ik.Labels(labels()), weight=wt,
                                                      backend=backend))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_zero_row_weights_give_zero_loss_and_zero_gradients(backend, reduction):
    x = data().requires_grad_()
    loss = ik.icon_loss(x, target=ik.Labels(labels()), weight=torch.zeros(N, dtype=torch.float64),
                        reduction=reduction, backend=backend)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


INFINITE_FLOATS = [("temperature", "cosine", {}), ("sigma", "gaussian", {}), ("dof", "student_t", {}),
                   ("exponent", "power", {}),
                   ("sigma", "dot", {"affinity": True}), ("temperature", "dot", {"affinity": True}),
                   ("dof", "dot", {"affinity": True}), ("exponent", "dot", {"affinity": True})]


@pytest.mark.parametrize("name,kernel,where", INFINITE_FLOATS)
def test_infinite_float_parameter_raises(backend, name, kernel, where):
    if where:
        target = ik.Affinity(data(seed=1), kernel={"sigma": "gaussian", "temperature": "dot",
                                                   "dof": "student_t", "exponent": "power"}[name],
                             **{name: float("inf")})
        call = lambda: ik.icon_loss(data(), target=target, kernel=kernel, backend=backend)
    else:
        call = lambda: ik.icon_loss(data(), target=ik.Labels(labels()), kernel=kernel, backend=backend,
                                    **{name: float("inf")})
    raises(ValueError, name, call)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("name,kernel", [("temperature", "dot"), ("temperature", "cosine"),
                                         ("sigma", "gaussian"), ("dof", "student_t"), ("exponent", "power")])
def test_infinite_tensor_parameter_gives_nan(backend, name, kernel, per_row, no_hang):
    """tau = inf would make q uniform and the loss finite; Inf inside a tensor gives NaN."""
    value = torch.full((N,) if per_row else (), 0.7, dtype=torch.float64)
    value.view(-1)[0] = float("inf")
    loss = ik.icon_loss(data(), target=ik.Labels(labels()), kernel=kernel, backend=backend,
                        **{name: value})
    assert torch.isnan(loss).item()
    target = ik.Affinity(data(seed=1), kernel=kernel, **{name: value})
    loss = ik.icon_loss(data(), target=target, kernel="gaussian", backend=backend)
    assert torch.isnan(loss).item()


@pytest.mark.parametrize("which", ["x", "y", "z"])
def test_zero_feature_dim_raises(backend, which):
    x, y, z = data(d=0 if which in "xy" else D), None, data(seed=1, d=0 if which == "z" else 3)
    if which == "y":
        x, y = data(), data(7, 0)
        raises(ValueError, "y", lambda: ik.icon_loss(x, y, target=ik.Labels(labels(), labels(7)),
                                                     backend=backend))
        return
    target = ik.Affinity(z) if which == "z" else ik.Labels(labels())
    raises(ValueError, which, lambda: ik.icon_loss(x, target=target, backend=backend))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float32, torch.bool, torch.uint8, torch.uint32])
def test_non_integer_neighbor_indices_raise_type_error(backend, dtype):
    idx = torch.zeros(N, 2).to(dtype)
    raises(TypeError, "indices", lambda: ik.icon_loss(data(), target=ik.Neighbors(idx), backend=backend))


def test_minus_inf_in_y_with_neighbors_and_dot_gives_nan(backend, no_hang):
    """A -inf feature makes row 1's logit at column 2 +inf: its log-softmax is NaN, as the dense
    reference gives (the torch backend's logsumexp returned +inf there, and the row loss at the
    other positives became +inf). Row 0 sees -inf at column 2, a non-positive (finite on most
    backends; NaN is within the contract too)."""
    x = torch.tensor([[1.0, 0.5, 0.2], [-0.3, 0.9, 0.0]], dtype=torch.float64)
    y = data(5, 3, seed=2)
    y[2, 0] = -float("inf")
    target = ik.Neighbors(torch.tensor([[0, 1], [0, 1]]))
    rows = ik.icon_loss(x, y, target=target, kernel="dot", reduction="none", backend=backend)
    assert torch.isnan(rows[1]).item() and not (rows == float("inf")).any()
    assert torch.isnan(ik.icon_loss(x, y, target=target, kernel="dot", backend=backend)).item()


@pytest.mark.parametrize("kwargs,name", [({"kernel": "bogus"}, "kernel"), ({"divergence": "bogus"}, "divergence"),
                                         ({"normalization": "bogus"}, "normalization"),
                                         ({"reduction": "bogus"}, "reduction"), ({"backend": "bogus"}, "backend"),
                                         ({"alpha": 1.0}, "alpha"), ({"beta": -0.1}, "beta")])
def test_icon_module_checks_its_choices_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ik.ICon(**kwargs)
    with pytest.raises(TypeError, match="exclude_self"):
        ik.ICon(exclude_self="yes")
