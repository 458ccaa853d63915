"""The fused C++ CPU backend gives the same result with one thread and with two (its parallel row
blocks reduce in a fixed order). Its checks against the reference are in
test_backends_vs_reference.py."""
import pytest
import torch

from cases import SETTINGS, build, clone_problem, loss_and_grads, relative_error


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_threads_do_not_change_the_result(backend):
    problem, upstream = build("gaussian", "neighbors", SETTINGS[2], torch.float64, seed=8, n=300, m=280)
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(loss_and_grads(*clone_problem(*problem, torch.float64), backend, upstream))
        finally:
            torch.set_num_threads(old)
    assert relative_error(results[0][0], results[1][0]) <= 1e-13
    for a, b in zip(results[0][1], results[1][1]):
        assert relative_error(a, b) <= 1e-13
