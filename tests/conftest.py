import pytest

from icon_kernels import torch_backend


@pytest.fixture
def small_chunks(monkeypatch):
    """Forces the torch backend into many ragged row chunks on tiny problems."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 150)
