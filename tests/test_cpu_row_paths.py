"""Issue 17, acceptance 3: every (kernel, target, divergence) combination of the families table,
with alpha and beta zero or not, dispatches to a row path of the fused CPU kernel that is
specialised for it at compile time, never to a generic per-pair loop.

The query icon_kernels._C.cpu_row_path names the instantiation for a combination
(csrc/cpu_row_paths.h), and the kernels count the rows each path runs
(_C.cpu_row_path_counts): the last test runs every combination forward and backward and checks
that every row ran the path the query names and no other. Whether each path computes the right
numbers is the correctness matrix's business (test_f_divergences_backends.py,
test_backends_vs_reference.py, test_cpu_row_chunks.py)."""
import itertools
import re

import pytest
import torch

import icon_kernels as ik
from icon_kernels import families

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

KERNELS = sorted(families.KERNEL_CODES)
TARGETS = sorted(families.TARGET_CODES)
DIVERGENCES = sorted(families.DIVERGENCES)
ALPHAS, BETAS = (0.0, 0.2), (0.0, 0.1)
PATH = re.compile(r"^(label_hot_rows|label_closed_form_rows|family_rows)<(.*)>$")
LOG_P = {"labels": "two_level_log_p", "neighbors": "sparse_log_p", "dense": "log_of_p"}


def _row_path(kernel, target, divergence, alpha, beta):
    from icon_kernels import _C
    return _C.cpu_row_path(kernel, target, families.DIVERGENCES[divergence].code, alpha, beta)


def _expected(kernel, target, divergence, alpha, beta):
    """The path the kernel must take, from the combination alone (the contract of cpu_row_paths.h)."""
    dot_like = kernel in ("dot", "gaussian")
    if target == "labels" and dot_like and beta == 0 and divergence in ("kl", "cross_entropy"):
        return f"label_hot_rows<{kernel}, {divergence}>"
    if (target == "labels" and dot_like and alpha == 0 and beta == 0
            and divergence in ("tv", "hellinger", "js", "chi2")):
        return f"label_closed_form_rows<{kernel}, {divergence}>"
    log_p = "exact_log_p" if target == "affinity" and alpha == 0 else LOG_P.get(target, "log_of_p")
    return f"family_rows<{kernel}, {divergence}, {log_p}, {'beta>0' if beta > 0 else 'beta=0'}>"


COMBINATIONS = list(itertools.product(KERNELS, TARGETS, DIVERGENCES, ALPHAS, BETAS))


def test_the_table_is_whole():
    """Every kernel, target and divergence of the families table is in the matrix below."""
    assert len(COMBINATIONS) == 5 * 4 * 7 * 2 * 2
    assert set(KERNELS) == {"dot", "gaussian", "student_t", "log_dot", "power"}


@pytest.mark.parametrize("kernel,target,divergence,alpha,beta", COMBINATIONS)
def test_every_combination_has_a_specialised_row_path(kernel, target, divergence, alpha, beta):
    name = _row_path(kernel, target, divergence, alpha, beta)
    match = PATH.match(name)
    assert match, f"{name!r} is not one of the specialised row paths"
    params = [p.strip() for p in match.group(2).split(",")]
    assert params[0] == kernel and params[1] == divergence, name   # instantiated on both
    assert name == _expected(kernel, target, divergence, alpha, beta)


def test_unknown_codes_raise():
    from icon_kernels import _C
    with pytest.raises(ValueError, match="divergence"):
        _C.cpu_row_path("dot", "labels", 99, 0.0, 0.0)
    with pytest.raises(ValueError, match="kernel"):
        _C.cpu_row_path("cosine", "labels", 0, 0.0, 0.0)   # cosine reaches the op as dot
    with pytest.raises(ValueError, match="target"):
        _C.cpu_row_path("dot", "graph", 0, 0.0, 0.0)


# --- what the kernels run: the row counters of cpu_row_paths.h, read through _C.cpu_row_path_counts --
N_ROWS = 8
PARAMS = {"dot": {"temperature": 0.5}, "gaussian": {"sigma": 1.5}, "student_t": {"dof": 1.0},
          "log_dot": {}, "power": {"exponent": 2.0}}


def _features(kernel, gen):
    x = torch.randn(N_ROWS, 4, generator=gen, dtype=torch.float64)
    return (x.abs() + 0.1 if kernel == "log_dot" else x).requires_grad_()   # log_dot needs a.b > 0


def _target(kind, gen):
    if kind == "labels":
        return ik.Labels(torch.arange(N_ROWS) // 2)            # every row has a positive
    if kind == "neighbors":
        return ik.Neighbors(torch.stack([(torch.arange(N_ROWS) + k) % N_ROWS for k in (1, 2)], 1))
    if kind == "dense":
        return ik.Dense(torch.rand(N_ROWS, N_ROWS, generator=gen, dtype=torch.float64) + 0.1)
    return ik.Affinity(torch.randn(N_ROWS, 3, generator=gen, dtype=torch.float64), kernel="gaussian")


def _path_of(name):
    return PATH.match(name).group(1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_kernels_run_the_path_the_query_names(kernel):
    """Forward and backward of every target, divergence, alpha and beta with this kernel: every row
    runs the row path that cpu_row_path names, none runs another (counted by the kernels)."""
    from icon_kernels import _C
    gen = torch.Generator().manual_seed(5)
    _C.cpu_row_path_counts()                                     # reset
    checked = 0
    for target, divergence, alpha, beta in itertools.product(TARGETS, DIVERGENCES, ALPHAS, BETAS):
        if divergence == "reverse_kl" and target in ("labels", "neighbors") and alpha == 0:
            continue                                             # refused: +inf at every negative
        x = _features(kernel, gen)
        loss = ik.icon_loss(x, target=_target(target, gen), kernel=kernel, divergence=divergence, alpha=alpha,
                            beta=beta, backend="cpu", **PARAMS[kernel])
        loss.backward()
        want = _path_of(_row_path(kernel, target, divergence, alpha, beta))
        counts = _C.cpu_row_path_counts()
        for pass_ in ("forward", "backward"):
            expected = {path: (N_ROWS if path == want else 0) for path in counts[pass_]}
            assert counts[pass_] == expected, f"{target} {divergence} alpha={alpha} beta={beta} {pass_}"
        checked += 1
    assert checked == len(TARGETS) * len(DIVERGENCES) * len(ALPHAS) * len(BETAS) - 2 * len(BETAS)


@pytest.mark.parametrize("kernel,target,divergence,alpha,beta", COMBINATIONS)
def test_joint_and_symmetrised_rows_are_family_rows(kernel, target, divergence, alpha, beta):
    """Joint normalisation and a symmetrised target need statistics of every row (DESIGN.md §1.2,
    csrc/cpu_global_rows.h): only the family rows take them, with the log p of the target."""
    from icon_kernels import _C
    code = families.DIVERGENCES[divergence].code
    want = _expected("student_t", target, divergence, alpha, beta).replace("student_t", kernel, 1)
    assert _C.cpu_row_path(kernel, target, code, alpha, beta, "joint") == want
    if target == "affinity":
        assert _C.cpu_row_path(kernel, target, code, alpha, beta, "conditional", True) == want
    with pytest.raises(ValueError, match="normalization"):
        _C.cpu_row_path(kernel, target, code, alpha, beta, "global")


@pytest.mark.parametrize("kernel", KERNELS)
def test_joint_and_symmetrised_runs_count_family_rows(kernel):
    """Every row of a joint or symmetrised problem runs the family rows, forward and backward,
    also where the conditional problem takes a label path (Labels with dot or gaussian)."""
    from icon_kernels import _C
    gen = torch.Generator().manual_seed(6)
    _C.cpu_row_path_counts()                                     # reset
    runs = [(t, "joint", False) for t in TARGETS] + [("affinity", "conditional", True), ("affinity", "joint", True)]
    for target, normalization, symmetrize in runs:
        tgt = _target(target, gen)
        if symmetrize:
            tgt = ik.Affinity(tgt.z, kernel="gaussian", symmetrize=True)
        x = _features(kernel, gen)
        loss = ik.icon_loss(x, target=tgt, kernel=kernel, normalization=normalization, backend="cpu",
                            **PARAMS[kernel])
        loss.backward()
        counts = _C.cpu_row_path_counts()
        for pass_ in ("forward", "backward"):
            expected = {path: (N_ROWS if path == "family_rows" else 0) for path in counts[pass_]}
            assert counts[pass_] == expected, f"{target} {normalization} symmetrize={symmetrize} {pass_}"
