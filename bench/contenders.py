"""The contenders of a benchmark row: what computes the loss of a configuration, forward + backward.

- ``naive``: naive PyTorch, eager: ``ik.icon_loss(..., backend="reference")``, the dense
  reference that materialises every N x M matrix (the denominator of every "x naive" ratio).
- ``compiled``: the same naive function under ``torch.compile(dynamic=True)`` (one graph per
  configuration, reused for every N). A configuration that does not compile reports
  "compile failed: <reason>".
- every usable fused backend of the device: ``torch`` (blockwise PyTorch), ``cpu`` (fused C++,
  CPU only), ``triton`` and ``cuda`` (GPU only; Triton is never benchmarked on the CPU, where it
  would run in the interpreter).
- optional peers, when installed (``pip install .[peers]``): ``pml-supcon``,
  pytorch-metric-learning's SupConLoss (infonce and clip); ``keops``, the same InfoNCE loss as
  KeOps LazyTensor log-sum-exp reductions (infonce, CPU).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Dict, List, Optional

import torch

import icon_kernels as ik

from configs import CONFIGS, Config

FUSED = ("torch", "cpu", "triton", "cuda")
ORDER = ("naive", "compiled", "torch", "cpu", "triton", "cuda", "pml-supcon", "keops")
PEERS = ("pml-supcon", "keops")
LABEL = {"naive": "naive", "compiled": "naive+compile", "pml-supcon": "pml-supcon", "keops": "keops"}
NAIVE = "naive"


def label(name: str) -> str:
    return LABEL.get(name, name)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(name: str, config: Config, device: str) -> Optional[str]:
    """None when ``name`` can run ``config`` on ``device``, else why not (a short phrase)."""
    if name in ("naive", "compiled"):
        return None
    if name in FUSED:
        why = ik.available_backends(with_reasons=True).get(name)
        if why:
            return why
        if name == "cpu" and device != "cpu":
            return "CPU backend"
        if name in ("triton", "cuda") and device != "cuda":
            return "GPU backend (Triton would run in the interpreter on CPU)"
        return None
    if name == "pml-supcon":
        if not _installed("pytorch_metric_learning"):
            return "not installed (pip install .[peers])"
        return None if config.name in ("infonce", "clip") else "SupConLoss has no affinity target"
    if name == "keops":
        if not _installed("pykeops"):
            return "not installed (pip install .[peers])"
        return None if config.name == "infonce" and device == "cpu" else "benchmarked on infonce on CPU only"
    return f"unknown contender {name!r}"


def contenders_for(config: Config, device: str, wanted: Optional[List[str]] = None,
                   skip=()) -> Dict[str, Optional[str]]:
    """{name: None (runs) or reason (not applicable)} in table order; peers only when installed."""
    names = [n for n in ORDER if wanted is None or n in wanted]
    out = {}
    for n in names:
        if n in skip:
            continue
        why = unavailable_reason(n, config, device)
        if why and wanted is None:
            continue     # not applicable here (device, configuration, peer not installed): left out
        out[n] = why
    return out


# --- building the forward+backward callables --------------------------------------------------------

_COMPILED: Dict[str, Callable] = {}


def _compiled_naive(config: Config) -> Callable:
    if config.name not in _COMPILED:
        _COMPILED[config.name] = torch.compile(functools.partial(config.loss, backend="reference"),
                                               dynamic=True)
    return _COMPILED[config.name]


def _pml_supcon(config: Config, inp) -> Callable:
    from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity
    from pytorch_metric_learning.losses import SupConLoss
    if config.name == "infonce":
        # dot kernel: SupCon on plain dot products (the rows are unit-norm already)
        fn = SupConLoss(temperature=0.1, distance=DotProductSimilarity(normalize_embeddings=False))
        return lambda: fn(inp["x"], inp["labels"])
    fn = SupConLoss(temperature=0.07, distance=CosineSimilarity())
    return lambda: fn(inp["x"], inp["row_labels"], ref_emb=inp["y"], ref_labels=inp["col_labels"])


def _keops_infonce(config: Config, inp) -> Callable:
    """InfoNCE with KeOps symbolic N x N LazyTensors: log-sum-exp over j != i of x_i.x_j / tau minus
    the mean positive logit; self-pairs and positives are masks built from row indices and labels."""
    from pykeops.torch import LazyTensor
    x, labels = inp["x"], inp["labels"]
    n = x.shape[0]
    idx = torch.arange(n, dtype=x.dtype, device=x.device)
    lab = labels.to(x.dtype)
    tau = 0.1

    def run():
        xi, xj = LazyTensor(x[:, None, :]), LazyTensor(x[None, :, :])
        ii, jj = LazyTensor(idx[:, None, None]), LazyTensor(idx[None, :, None])
        li, lj = LazyTensor(lab[:, None, None]), LazyTensor(lab[None, :, None])
        not_self = ((ii - jj).abs() - 0.5).step()
        s = (xi | xj) / tau
        lse = (s - 1e4 * (1 - not_self)).logsumexp(dim=1)[:, 0]
        pos = (1 - ((li - lj).abs() - 0.5).step()) * not_self
        k = pos.sum(dim=1)[:, 0]
        mean_pos = (pos * s).sum(dim=1)[:, 0] / k
        keep = k > 0
        return (lse - mean_pos)[keep].mean()
    return run


def build(name: str, config: Config, inp) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the loss (forward only; the caller runs backward)."""
    if name == "naive":
        return lambda: config.loss(inp, "reference")
    if name == "compiled":
        fn = _compiled_naive(config)
        return lambda: fn(inp)
    if name in FUSED:
        return lambda: config.loss(inp, name)
    if name == "pml-supcon":
        return _pml_supcon(config, inp)
    if name == "keops":
        return _keops_infonce(config, inp)
    raise ValueError(f"unknown contender {name!r}")


def get_config(name: str) -> Config:
    return CONFIGS[name]
