"""What the tests of the cpu backend's symmetric schedules share (tests/test_cpu_symmetric_*.py):
the tile settings, the kernels' parameter names, the schedule counters and a fixture that starts
every test from the default schedule with its counters at zero."""
import pytest
import torch

import icon_kernels as ik

F64, F32 = torch.float64, torch.float32
# ICON_KERNELS_CPU_TILE_ELEMENTS: 8 gives blocks of 2 rows, 200 blocks of 10 (ragged at N = 37
# or 23), "" the default
TILES = ("8", "200", "")
# the argument of icon_loss that holds each learned kernel's parameter
PARAM = {"dot": "temperature", "cosine": "temperature", "gaussian": "sigma", "student_t": "dof",
         "power": "exponent"}
# learned kernels: (kernel, its parameter); student_t with dof 1 is t-SNE's Cauchy kernel
LEARNED = (("student_t", {"dof": 1.0}), ("student_t", {"dof": 3.0}), ("gaussian", {"sigma": 1.3}),
           ("cosine", {"temperature": 0.5}), ("dot", {"temperature": 2.0}), ("power", {"exponent": 2.0}))

# each Affinity target kernel's parameter argument (log_dot has none)
T_PARAM = {"gaussian": "sigma", "dot": "temperature", "cosine": "temperature", "student_t": "dof",
           "power": "exponent", "log_dot": None}


def affinity_target(z, t_kernel="gaussian", t_param=2.0, **options):
    """ik.Affinity(z) with the target kernel's parameter t_param (ignored for log_dot)."""
    name = T_PARAM[t_kernel]
    return ik.Affinity(z, kernel=t_kernel, **({name: t_param} if name else {}), **options)


def named_counts(*names) -> dict:
    """The named counters of _C.cpu_symmetric_counts() (calls per pass that ran a schedule since
    the last read, which resets every counter)."""
    from icon_kernels import _C
    every = _C.cpu_symmetric_counts()
    return {name: every[name] for name in names}


def counts(*names) -> tuple:
    """named_counts' values, in the order named."""
    return tuple(named_counts(*names).values())


@pytest.fixture(autouse=True)
def fresh_schedule(monkeypatch):
    """The default schedule and tile, and the counters at zero (import it into a test module)."""
    monkeypatch.delenv("ICON_KERNELS_SYMMETRIC", raising=False)
    monkeypatch.delenv("ICON_KERNELS_CPU_TILE_ELEMENTS", raising=False)
    counts()
    yield


def run_loss(x0, target, kernel, params, backend, upstream, param_grad=False, **options) -> list:
    """(row losses, dL/dx[, dL/dparam...]) of sum_i upstream_i L_i, params the learned kernel's
    parameters by name (a differentiable tensor each under param_grad)."""
    x = x0.detach().clone().requires_grad_()
    params = {k: torch.as_tensor(v, dtype=x0.dtype).clone().requires_grad_(param_grad) for k, v in params.items()}
    loss = ik.icon_loss(x, target=target, kernel=kernel, backend=backend, reduction="none", **params, **options)
    wrt = [x] + (list(params.values()) if param_grad else [])
    grads = torch.autograd.grad(loss, wrt, grad_outputs=upstream.to(loss.dtype))
    return [loss.detach(), *grads]


def assert_close(got, want, tol, atol=0.0) -> None:
    """Each pair within tol relative error (cases.relative_error), or within atol everywhere (a
    loss near 0 from a difference of O(1) sums: N = 2 with its self pair kept)."""
    from cases import relative_error
    for g, w in zip(got, want):
        err = relative_error(g, w)
        assert err <= tol or (g - w).abs().max().item() <= atol, (err, tol)


def seeded_inputs(n, seed, dtype=F64, d=5, dz=4) -> tuple:
    """x [n, d], z [n, dz] and an upstream gradient in [0.5, 1.5) from one seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    z = torch.randn(n, dz, generator=gen, dtype=dtype)
    upstream = torch.rand(n, generator=gen, dtype=F64) + 0.5
    return x, z, upstream


# A schedule switch between a forward and its backward (each test_the_backward_follows_its_forwards_
# schedule): the forward's environment, the backward's, and whether the symmetric backward runs
# (it follows its forward's record, never the switch at backward time).
SWITCHES = [
    ({"ICON_KERNELS_SYMMETRIC": "0"}, {"ICON_KERNELS_SYMMETRIC": "1"}, False),
    ({"ICON_KERNELS_SYMMETRIC": "1"}, {"ICON_KERNELS_SYMMETRIC": "0"}, True),
    ({}, {"ICON_KERNELS_CPU_TILE_ELEMENTS": "5000"}, True),
    ({"ICON_KERNELS_CPU_TILE_ELEMENTS": "200"}, {}, True),
]


def grads_across_a_switch(monkeypatch, x0, loss_of, upstream, forward_env, backward_env) -> tuple:
    """dL/dx of sum_i upstream_i L_i as (the cpu backend's in float32 with forward_env set for its
    forward and backward_env for its backward, the float64 reference's, the float32 reference's),
    from x0's values (float32) and loss_of(x, backend), the row losses. The schedule counters are
    read (reset) just before the cpu call, so the caller's next read sees its calls alone."""
    def grad(dtype, backend, between=None):
        x = x0.to(dtype).requires_grad_()
        loss = loss_of(x, backend)
        if between:
            between()
        (loss * upstream.to(dtype)).sum().backward()
        return x.grad

    def switch():
        for key in forward_env:
            monkeypatch.delenv(key)
        for key, value in backward_env.items():
            monkeypatch.setenv(key, value)

    exact, naive = grad(F64, "reference"), grad(F32, "reference")
    for key, value in forward_env.items():
        monkeypatch.setenv(key, value)
    counts()
    return grad(F32, "cpu", switch), exact, naive


def schedule_op_checks(op, args):
    """What torch.library.opcheck checks of an op, on the symmetric schedule's own path, and the
    op's real outputs. opcheck clones every argument, so x and y stop being one tensor and the op
    runs its plain schedule there; here they stay one tensor, and the op must leave its inputs as
    they were (the schema declares no mutation) and its fake implementation must give the real
    outputs' shapes, dtypes and strides (opcheck's test_faketensor). The caller asserts, through the
    schedule counters, that the symmetric kernels ran."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out = op(*args)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), "the op changed an input"
    mode = FakeTensorMode()
    fakes = {}

    def fake(a):   # one fake per tensor object: x and y stay one tensor
        if not isinstance(a, torch.Tensor):
            return a
        return fakes.setdefault(id(a), mode.from_tensor(a))

    with mode:
        fake_out = op(*[fake(a) for a in args])
    assert len(fake_out) == len(out)
    for real, meta in zip(out, fake_out):
        assert (real is None) == (meta is None)
        if real is not None:
            assert (real.shape, real.dtype, real.stride()) == (meta.shape, meta.dtype, meta.stride())
    return out


def opcheck_on_both_paths(args, param_grad, read_counts, after_forward, after_backward):
    """torch.library.opcheck of the cpu forward op on args (the forward op's arguments, ops.ARGS, x
    and y one tensor) and of its backward (an upstream gradient != 1, y_is_x, the learned parameter's
    gradient when param_grad), which checks the plain path (its clones part x and y), then
    schedule_op_checks of both on the schedule's path, with read_counts() (the schedule counters,
    read and reset) equal to after_forward after the forward and after_backward after the backward."""
    from icon_kernels.backends.ops import forward_op
    forward, backward = forward_op("cpu"), torch.ops.icon_kernels.cpu_backward.default
    torch.library.opcheck(forward, args)
    read_counts()
    _, valid, stats = schedule_op_checks(forward, args)
    assert read_counts() == after_forward
    x = args[0]
    backward_args = (torch.linspace(-1, 1, x.shape[0], dtype=x.dtype), *args, valid, stats, False, param_grad, True)
    torch.library.opcheck(backward, backward_args)
    read_counts()
    schedule_op_checks(backward, backward_args)
    assert read_counts() == after_backward
