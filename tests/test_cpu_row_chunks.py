"""Issue 17, acceptance 2: the fused cpu kernel's row paths (csrc/cpu_row_paths.h) equal the dense
reference in float64 to 1e-9 with its row chunking forced small, on rows longer than one SIMD sum
block.

ICON_KERNELS_CPU_TILE_ELEMENTS = 7 N makes chunks of 7 rows (the last one ragged: N = 600 is
85 x 7 + 5), and N = 600 columns are two sum blocks of 512 (the second ragged), so the self column
of an exclude_self row falls at every position of a block and the family rows' split around it
(f_row_impl) runs at block starts, middles and ends (N was 1100, three blocks, until the CI time
neared its limit: 0.3x the time, the same positions). Every kernel and target, with a kernel
parameter that needs a gradient and an Affinity target whose z needs one (learned_backward's and
target_backward's parameter sums), over KL, cross-entropy and three f-divergences with alpha and
beta. Every case runs twice against one reference: under the default switch (self mode then takes
a symmetric tile-pair schedule wherever one applies; the same setting makes its blocks 45 rows,
sqrt(7 N / 2), the last one 15) and under ICON_KERNELS_SYMMETRIC=0 (the plain row paths)."""
import pytest
import torch

import icon_kernels as ik
from cases import KERNELS, TARGETS, build, keeps_self_pair_at_zero, loss_and_grads, relative_error, seed_of

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

N, D = 600, 5
ROWS_PER_CHUNK = 7
SETTINGS = [
    # (name, rect, exclude_self, alpha, beta, divergence, reduction, weighted): cases.SETTINGS' layout
    ("self-kl-mean", False, None, 0.0, 0.0, "kl", "mean", False),
    ("self-debiased-ce-none", False, None, 0.2, 0.3, "cross_entropy", "none", False),
    ("keepself-beta-kl", False, False, 0.0, 0.15, "kl", "mean", True),
    ("self-tv-alpha", False, None, 0.1, 0.0, "tv", "none", False),
    ("self-js", False, None, 0.0, 0.0, "js", "sum", False),
    ("self-reverse_kl-alpha-beta", False, None, 0.2, 0.1, "reverse_kl", "none", False),
    ("self-hellinger-beta", False, None, 0.0, 0.2, "hellinger", "mean", False),
    ("self-chi2-alpha", False, None, 0.3, 0.0, "chi2", "mean", False),
]
TOL = 1e-9


def _both_schedules_equal_reference(monkeypatch, problem, upstream):
    """cpu under ICON_KERNELS_SYMMETRIC=1 (self mode takes a symmetric schedule where one applies,
    blocks of 45 rows) and 0 (the plain row paths), each against one reference."""
    want_loss, want_grads = loss_and_grads(*problem, "reference", upstream)
    for schedule in ("1", "0"):
        monkeypatch.setenv("ICON_KERNELS_SYMMETRIC", schedule)
        got_loss, got_grads = loss_and_grads(*problem, "cpu", upstream)
        assert relative_error(got_loss, want_loss) < TOL, schedule
        for i, (got, want) in enumerate(zip(got_grads, want_grads)):
            assert relative_error(got, want) < TOL, f"{schedule} leaf {i}: {relative_error(got, want):.2e}"


@pytest.fixture
def small_cpu_chunks(monkeypatch):
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", str(ROWS_PER_CHUNK * N))


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
@pytest.mark.parametrize("target_kind", TARGETS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_ragged_chunks_and_blocks_equal_reference(small_cpu_chunks, monkeypatch, kernel, target_kind, setting):
    if keeps_self_pair_at_zero(kernel, setting):
        pytest.skip("the power kernel's kept self pair: backends agree only on a finite value (cases.py)")
    if setting[5] == "reverse_kl" and target_kind == "labels" and setting[3] == 0:
        pytest.skip("reverse_kl against Labels needs alpha > 0")
    problem, upstream = build(kernel, target_kind, setting, torch.float64, seed_of(kernel, target_kind, setting[0]),
                              param_tensor="scalar", target_grad=target_kind == "affinity", n=N, d=D)
    _both_schedules_equal_reference(monkeypatch, problem, upstream)


def test_the_tile_setting_is_read(monkeypatch):
    """The override reaches the kernel (else the test above would run one chunk): a bad value raises."""
    x = torch.randn(9, 3, dtype=torch.float64)
    target = ik.Labels(torch.arange(9) // 3)
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "seven")
    with pytest.raises(RuntimeError, match="ICON_KERNELS_CPU_TILE_ELEMENTS"):
        ik.icon_loss(x, target=target, backend="cpu")
    monkeypatch.setenv("ICON_KERNELS_CPU_TILE_ELEMENTS", "9")
    ik.icon_loss(x, target=target, backend="cpu")


@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[3], SETTINGS[5]], ids=lambda s: s[0])
@pytest.mark.parametrize("t_kernel", ["dot", "student_t", "log_dot", "power"])
def test_every_affinity_target_kernel_on_ragged_chunks(small_cpu_chunks, monkeypatch, t_kernel, setting):
    """target_backward per target kernel (the test above takes the default gaussian target)."""
    problem, upstream = build("student_t", "affinity", setting, torch.float64, seed_of(t_kernel, setting[0]),
                              param_tensor="scalar", target_grad=True, t_kernel=t_kernel, n=N, d=D)
    _both_schedules_equal_reference(monkeypatch, problem, upstream)
