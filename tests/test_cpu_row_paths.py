"""Issue 17, acceptance 3: every (kernel, target, divergence) combination of the families table,
with alpha and beta zero or not, dispatches to a row path of the fused CPU kernel that is
specialised for it at compile time, never to a generic per-pair loop.

The query icon_kernels._C.cpu_row_path returns the instantiation that cpu_forward and
cpu_backward run (csrc/cpu_row_paths.h: the kernels switch on the same choose_row_path, and that
switch ends in an error). Whether each path computes the right numbers is the correctness
matrix's business (test_f_divergences_backends.py, test_backends_vs_reference.py)."""
import itertools
import re

import pytest

import icon_kernels as ik
from icon_kernels import families

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="the cpu backend is not built")

KERNELS = sorted(families.KERNEL_CODES)
TARGETS = sorted(families.TARGET_CODES)
DIVERGENCES = sorted(families.DIVERGENCES)
ALPHAS, BETAS = (0.0, 0.2), (0.0, 0.1)
PATH = re.compile(r"^(label_hot_rows|label_closed_form_rows|family_rows)<(.*)>$")
LOG_P = {"labels": "two_level_log_p", "neighbors": "log_of_p", "dense": "log_of_p"}


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
