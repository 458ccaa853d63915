"""Replaced by test_backends_vs_reference.py (every backend against the reference, issue 15 item
4). Kept only for the imports of test_target_weight_grads.py and test_torch_backend_cuda.py: once
they import SETTINGS and build from cases.py, this file goes."""
from cases import SETTINGS, build  # noqa: F401
