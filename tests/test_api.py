"""Public API behaviour: backends, the module, reductions at the edges, dtypes, env report."""
import subprocess
import sys

import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends import blockwise as torch_backend
from cases import relative_error


def test_available_backends_and_reasons():
    usable = ik.available_backends()
    reasons = ik.available_backends(with_reasons=True)
    assert {"reference", "torch"} <= set(usable)
    assert set(reasons) == {"reference", "torch", "cpu", "triton", "cuda"}
    assert [name for name, why in reasons.items() if why is None] == usable
    for name, why in reasons.items():
        assert why is None or (isinstance(why, str) and why)
    if not torch.cuda.is_available():
        assert "cuda" not in usable and "CUDA" in reasons["cuda"]


def test_auto_picks_a_usable_fused_backend_and_matches_reference():
    x = torch.randn(20, 8, dtype=torch.float64)
    target = ik.Labels(torch.arange(20) // 4)
    auto = ik.icon_loss(x, target=target)
    assert auto.item() == pytest.approx(ik.icon_loss(x, target=target, backend="reference").item(), rel=1e-12)


def test_module_matches_functional_and_learns_temperature():
    tau = torch.nn.Parameter(torch.tensor(0.3))
    crit = ik.ICon(kernel="cosine", temperature=tau, alpha=0.1, backend="torch")
    x = torch.randn(16, 8, requires_grad=True)
    target = ik.Labels(torch.arange(16) // 2)
    loss = crit(x, target=target)
    assert loss.item() == pytest.approx(ik.icon_loss(x, target=target, temperature=tau, alpha=0.1,
                                                     backend="torch").item(), rel=1e-6)
    loss.backward()
    assert tau.grad is not None and torch.isfinite(tau.grad) and x.grad.abs().sum() > 0
    assert "cosine" in repr(crit)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_module_and_affinity_target_take_the_power_kernels_exponent(backend):
    """ik.ICon(kernel="power", exponent=<a parameter>) against an Affinity target with the power
    kernel: the conditional KL of q, p ∝ (||a_i - a_j||² + 1e-12)^(-n/2) over j != i, written
    densely here; loss and the gradients of x and of the learned exponent."""
    n_learned = torch.nn.Parameter(torch.tensor(1.7, dtype=torch.float64))
    crit = ik.ICon(kernel="power", exponent=n_learned, backend=backend)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(12, 3, generator=g, dtype=torch.float64)
    eye = torch.eye(12, dtype=torch.bool)

    def log_q(a, n):
        sq = (a[:, None, :] - a[None, :, :]).square().sum(-1)
        return (-n / 2 * torch.log(sq + 1e-12)).masked_fill(eye, float("-inf")).log_softmax(1)
    loss = crit(x, target=ik.Affinity(z, kernel="power", exponent=2.5))
    log_p = log_q(z, 2.5)
    want = torch.where(eye, 0.0, log_p.exp() * (log_p - log_q(x, n_learned))).sum(1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    got_grads = torch.autograd.grad(loss, [x, n_learned])
    for got, exact in zip(got_grads, torch.autograd.grad(want, [x, n_learned])):
        assert relative_error(got, exact) < 1e-10
    assert crit.exponent is n_learned


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_row_has_a_target_gives_zero_loss_and_zero_grads(backend, reduction):
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    loss = ik.icon_loss(x, target=ik.Labels(torch.arange(6)), reduction=reduction, backend=backend)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_result_does_not_depend_on_chunking(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(53, 7, generator=g, dtype=torch.float64, requires_grad=True)
    target = ik.Affinity(torch.randn(53, 3, generator=g, dtype=torch.float64), kernel="gaussian")
    results = []
    for elements in (1, 7 * 53, 1 << 22):
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", elements)
        loss = ik.icon_loss(x, target=target, kernel="student_t", beta=0.1, backend="torch")
        grad, = torch.autograd.grad(loss, x)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert relative_error(loss, results[0][0]) < 1e-13
        assert relative_error(grad, results[0][1]) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["cosine", "gaussian"])
def test_low_precision_error_within_twice_pytorchs_own(dtype, kernel):
    """DESIGN §5: error against the fp32 reference <= 2x naive PyTorch's same-dtype error."""
    g = torch.Generator().manual_seed(3)
    x32 = torch.randn(96, 32, generator=g)
    target = ik.Labels(torch.arange(96) // 3)

    def run(x, backend):
        x = x.detach().clone().requires_grad_()
        loss = ik.icon_loss(x, target=target, kernel=kernel, temperature=0.1, sigma=2.0, backend=backend)
        loss.backward()
        return loss.detach().float(), x.grad.float()

    want = run(x32.double(), "reference")
    naive = run(x32.to(dtype), "reference")
    ours = run(x32.to(dtype), "torch")
    floor = torch.finfo(dtype).eps * 1e-2
    for mine, theirs, exact in zip(ours, naive, want):
        assert relative_error(mine, exact) <= 2 * relative_error(theirs, exact) + floor
    assert ik.icon_loss(x32.to(dtype), target=target, backend="torch").dtype == dtype


def test_environment_report_runs():
    out = subprocess.run([sys.executable, "-m", "icon_kernels"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "torch" in out and "backends:" in out and "reference" in out


def test_auto_prefers_triton_for_cuda_tensors_when_usable():
    from icon_kernels.backends.registry import resolve_backend
    if "triton" not in ik.available_backends():
        pytest.skip("triton backend unavailable")
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")   # never the interpreter


def test_auto_picks_the_fused_cpu_kernel_for_cpu_tensors():
    from icon_kernels.backends.registry import resolve_backend
    if "cpu" not in ik.available_backends():
        pytest.skip("C++ extension not built")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_package_imports_without_the_extension_and_says_why():
    code = ("import sys; sys.modules['icon_kernels._C'] = None\n"   # makes `import _C` fail
            "import icon_kernels as ik\n"
            "assert 'cpu' not in ik.available_backends()\n"
            "print(ik.available_backends(with_reasons=True)['cpu'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "icon_kernels._C is not built" in out.stdout


def test_every_public_name_the_readme_shows_is_importable():
    # the package moved into subpackages (backends/, distributed/, presets/, helpers/); the names
    # a user reaches through `import icon_kernels as ik` stay where the README shows them
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = sorted(set(re.findall(r"\bik\.([A-Za-z_]+(?:\.[A-Za-z_]+)*)", readme)))
    assert len(shown) >= 20
    for dotted in shown + list(ik.__all__):
        value = ik
        for part in dotted.split("."):
            value = getattr(value, part)
        assert value is not None, dotted


def test_loss_options_are_icon_loss_defaults():
    # validation.LOSS_OPTIONS is what the presets and the distributed rank agreement read
    import inspect
    from icon_kernels.validation import LOSS_OPTIONS
    params = inspect.signature(ik.icon_loss).parameters
    own = {"target", "exclude_self", "reduction", "weight", "backend"}
    keywords = {n: p.default for n, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in own}
    assert keywords == LOSS_OPTIONS
