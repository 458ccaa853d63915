"""The benchmark's embedded synthetic workload: three I-Con configurations and the sweep plans.

Every configuration builds its inputs from a fixed seed (no data to download) and defines the loss
as one ``ik.icon_loss`` call, so that every backend, naive PyTorch (backend "reference") and
naive PyTorch under ``torch.compile`` compute the same thing.

- ``infonce``: InfoNCE / SupCon. Labels target with two views per sample (labels = arange(N)//2,
  one positive per row), kernel ``dot`` on unit-norm rows, temperature 0.1, y = x with
  self-pairs excluded.
- ``tsne``: t-SNE-style. Affinity target, a Gaussian kernel (sigma 4) on input features z (N x d),
  learned ``student_t`` kernel (dof 1, t-SNE's Cauchy) on the embeddings x (N x d); self-pairs
  excluded.
- ``clip``: CLIP-style, rectangular. N image rows against M = N/2 caption columns (two images per
  caption): x (N x d), y (M x d), Labels(arange(N)//2, arange(M)), kernel ``cosine``,
  temperature 0.07; every pair is valid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import icon_kernels as ik


@dataclass(frozen=True)
class Config:
    name: str
    title: str
    target: str                     # what goes in the CSV's "target" column
    kernel: str
    make: Callable                  # (n, d, dtype, device, seed) -> dict of tensors
    loss: Callable                  # (inputs dict, backend) -> scalar loss
    m_of_n: Callable = lambda n: n  # number of columns
    leaves: Tuple[str, ...] = ("x",)  # inputs that require grad (the error check compares their grads)


def _infonce_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // 2
    base = torch.randn((n + 1) // 2, d, generator=gen)
    x = F.normalize(base[labels] + 0.5 * torch.randn(n, d, generator=gen), dim=1)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(), "labels": labels.to(device)}


def _infonce_loss(inp, backend):
    return ik.icon_loss(inp["x"], target=ik.Labels(inp["labels"]), kernel="dot", temperature=0.1,
                        backend=backend)


TSNE_SIGMA = 4.0


def _tsne_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    x = 0.1 * torch.randn(n, d, generator=gen)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(), "z": z.to(device=device, dtype=dtype)}


def _tsne_loss(inp, backend):
    return ik.icon_loss(inp["x"], target=ik.Affinity(inp["z"], kernel="gaussian", sigma=TSNE_SIGMA),
                        kernel="student_t", dof=1.0, backend=backend)


def _clip_m(n):
    return max(1, n // 2)


def _clip_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = _clip_m(n)
    row_labels = torch.arange(n) // 2 % m
    y = torch.randn(m, d, generator=gen)
    x = y[row_labels] + 0.7 * torch.randn(n, d, generator=gen)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(),
            "y": y.to(device=device, dtype=dtype).requires_grad_(),
            "row_labels": row_labels.to(device), "col_labels": torch.arange(m).to(device)}


def _clip_loss(inp, backend):
    return ik.icon_loss(inp["x"], inp["y"], target=ik.Labels(inp["row_labels"], inp["col_labels"]),
                        kernel="cosine", temperature=0.07, backend=backend)


CONFIGS: Dict[str, Config] = {
    "infonce": Config("infonce", "InfoNCE/SupCon: labels, dot kernel, tau 0.1, y = x",
                      "labels arange(N)//2", "dot", _infonce_inputs, _infonce_loss),
    "tsne": Config("tsne", "t-SNE: Affinity(gaussian, sigma 4) target, student_t kernel (dof 1)",
                   "affinity gaussian sigma=4", "student_t", _tsne_inputs, _tsne_loss),
    "clip": Config("clip", "CLIP-style: N x M=N/2 rectangular, labels, cosine, tau 0.07",
                   "labels rows arange(N)//2, cols arange(M)", "cosine", _clip_inputs, _clip_loss,
                   m_of_n=_clip_m, leaves=("x", "y")),
}


def floor_operands(config: Config, inputs):
    """The (N x d, M x d) pair whose four N x M x d GEMMs are the compute floor."""
    x = inputs["x"].detach()
    y = inputs["y"].detach() if "y" in config.leaves else x
    return x, y


# --- sweep plans -----------------------------------------------------------------------------------
# One entry per (config, dtypes, sizes); "skip" removes contenders from that entry (time: e.g.
# torch.compile takes tens of seconds per graph on a GPU). Budgets are per contender and row:
# memory run + warm-up + timed runs must fit, else the cell says "skipped: over time budget".

@dataclass
class Mode:
    plan: List[Tuple[str, Tuple[str, ...], Tuple[int, ...], Tuple[str, ...]]]
    repeats: int                    # timed runs per contender after the warm-up (at most)
    budget_s: float                 # time budget per contender and row
    probe_mem_gib: float            # largest-N probe: memory budget
    probe_step_s: float             # largest-N probe: no step predicted to take longer
    probe_steps: int                # largest-N probe: at most this many runs per contender
    deadline_s: Optional[float] = None   # whole run; later cells are skipped
    extra: dict = field(default_factory=dict)


MODES: Dict[Tuple[str, str], Mode] = {
    ("cpu", "quick"): Mode([("infonce", ("float32",), (1024, 2048), ()),
                            ("tsne", ("float32",), (1024,), ()),
                            ("clip", ("float32",), (2048,), ())],
                           repeats=3, budget_s=8, probe_mem_gib=1.0, probe_step_s=4, probe_steps=5,
                           deadline_s=110),
    ("cpu", "default"): Mode([("infonce", ("float32",), (2048, 4096, 8192, 16384), ()),
                              ("tsne", ("float32",), (2048, 8192), ()),
                              ("clip", ("float32",), (4096, 16384), ())],
                             repeats=5, budget_s=25, probe_mem_gib=4.0, probe_step_s=25,
                             probe_steps=7, deadline_s=560),
    ("cpu", "full"): Mode([(c, ("float32",), (2048, 4096, 8192, 16384, 32768), ())
                           for c in ("infonce", "tsne", "clip")],
                          repeats=5, budget_s=900, probe_mem_gib=8.0, probe_step_s=300, probe_steps=10),
    ("cuda", "quick"): Mode([("infonce", ("bfloat16",), (4096, 16384), ())],
                            repeats=5, budget_s=10, probe_mem_gib=0, probe_step_s=5, probe_steps=4,
                            deadline_s=110),
    # in order of priority (the deadline cuts the tail); torch.compile on infonce bf16 only
    ("cuda", "default"): Mode([("infonce", ("bfloat16",), (4096, 16384, 65536), ()),
                               ("tsne", ("bfloat16",), (16384, 65536), ("compiled",)),
                               ("clip", ("bfloat16",), (16384, 65536), ("compiled",)),
                               ("infonce", ("float32",), (4096, 16384, 65536), ("compiled",))],
                              repeats=5, budget_s=20, probe_mem_gib=0, probe_step_s=5, probe_steps=6,
                              deadline_s=200),
    ("cuda", "full"): Mode([(c, ("bfloat16", "float32"), (4096, 16384, 65536, 131072, 262144), ())
                            for c in ("infonce", "tsne", "clip")],
                           repeats=10, budget_s=300, probe_mem_gib=0, probe_step_s=60, probe_steps=10),
}
# probe_mem_gib 0 on CUDA: 90% of the device's memory.

PROBE_CONFIG = "infonce"


def round_n(n: float, multiple: int = 256) -> int:
    return max(multiple, int(math.floor(n / multiple)) * multiple)
