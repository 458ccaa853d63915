import os

import torch

# The Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must
# be set before icon_kernels (and so the kernels) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from icon_kernels import torch_backend


@pytest.fixture
def small_chunks(monkeypatch):
    """Forces the torch backend into many ragged row chunks on tiny problems."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 150)
