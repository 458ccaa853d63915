"""What the benchmark measures: the synthetic workloads, the contenders that compute them, one timed
forward + backward, the GEMM floor and the error against a reference.

Configurations. Every one builds its inputs from a fixed seed (no data to download) and defines
the loss as one ``ik.icon_loss`` call, so that every backend, naive PyTorch (backend "reference")
and naive PyTorch under ``torch.compile`` compute the same thing.

- ``infonce``: InfoNCE / SupCon. Labels target with two views per sample (labels = arange(N)//2,
  one positive per row), kernel ``dot`` on unit-norm rows, temperature 0.1, y = x with
  self-pairs excluded.
- ``tsne``: t-SNE-style. Affinity target, a Gaussian kernel (sigma 4) on input features z (N x d),
  learned ``student_t`` kernel (dof 1, t-SNE's Cauchy) on the embeddings x (N x d); self-pairs
  excluded.
- ``clip``: CLIP-style, rectangular. N image rows against M = N/2 caption columns (two images per
  caption): x (N x d), y (M x d), Labels(arange(N)//2, arange(M)), kernel ``cosine``,
  temperature 0.07; every pair is valid.
- ``clip-both``: CLIP's loss, both directions: ``ik.icon_loss_bidirectional`` over N image rows
  and N caption rows (pair i is image i with caption i), kernel ``cosine``, temperature 0.07. Its
  floor is one direction's four GEMMs: the one-pass ``cpu`` schedule computes both directions in
  that many GEMM-equivalents, two ``icon_loss`` calls ("cpu-plain") in twice as many.
- ``tsne-reverse_kl``, ``tsne-tv``, ``tsne-js``, ``infonce-tv``, ``infonce-js``: the same
  configurations with another divergence of DESIGN.md §1.1 ("Beyond I-Con"); their cost ratio is
  the time of a variant over its kl row on the same backend.
- ``jointtsne``: the ``tsne`` inputs under joint normalisation with a symmetrised target
  (van der Maaten's t-SNE: ``ik.JointTSNE``'s objective at one sigma); only naive PyTorch
  computes it so far (the fused backends say so in their cells).

Contenders of a row.

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
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import icon_kernels as ik


# --- configurations --------------------------------------------------------------------------------

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
    # why some fused backends do not run it (None: they all do), e.g. joint normalisation, and
    # the fused backends that do run it then
    fused_missing: Optional[str] = None
    fused_running: Tuple[str, ...] = ()
    # inputs whose Gram an Affinity target adds to the floor (DESIGN.md §5: two N x M x dz GEMMs,
    # its Gram in forward and backward; none of these targets requires grad)
    target_grams: Tuple[str, ...] = ()


def _infonce_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // 2
    base = torch.randn((n + 1) // 2, d, generator=gen)
    x = F.normalize(base[labels] + 0.5 * torch.randn(n, d, generator=gen), dim=1)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(), "labels": labels.to(device)}


def _infonce_loss(inp, backend, divergence="kl"):
    return ik.icon_loss(inp["x"], target=ik.Labels(inp["labels"]), kernel="dot", temperature=0.1,
                        divergence=divergence, backend=backend)


TSNE_SIGMA = 4.0


def _tsne_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    x = 0.1 * torch.randn(n, d, generator=gen)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(), "z": z.to(device=device, dtype=dtype)}


def _tsne_loss(inp, backend, divergence="kl"):
    return ik.icon_loss(inp["x"], target=ik.Affinity(inp["z"], kernel="gaussian", sigma=TSNE_SIGMA),
                        kernel="student_t", dof=1.0, divergence=divergence, backend=backend)


def _divergence_variant(loss, divergence):
    """The loss of a configuration with another divergence (DESIGN.md §1.1)."""
    return lambda inp, backend: loss(inp, backend, divergence=divergence)


def _jointtsne_loss(inp, backend, **options):
    return ik.icon_loss(inp["x"], target=ik.Affinity(inp["z"], kernel="gaussian", sigma=TSNE_SIGMA,
                                                     symmetrize=True),
                        kernel="student_t", dof=1.0, normalization="joint", backend=backend, **options)


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


def _clip_both_inputs(n, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n, d, generator=gen)
    x = y + 0.7 * torch.randn(n, d, generator=gen)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(),
            "y": y.to(device=device, dtype=dtype).requires_grad_(), "ids": torch.arange(n).to(device)}


def _clip_both_loss(inp, backend):
    return ik.icon_loss_bidirectional(inp["x"], inp["y"], target=ik.Labels(inp["ids"], inp["ids"]),
                                      kernel="cosine", temperature=0.07, backend=backend)


def _tsne_symmetrised_loss(inp, backend):
    """t-SNE's conditional rows against a symmetrised target, P_ij = (p_{j|i} + p_{i|j}) / (2 M_i)."""
    return ik.icon_loss(inp["x"], target=ik.Affinity(inp["z"], kernel="gaussian", sigma=TSNE_SIGMA,
                                                     symmetrize=True),
                        kernel="student_t", dof=1.0, backend=backend)


CONFIGS: Dict[str, Config] = {
    "infonce": Config("infonce", "InfoNCE/SupCon: labels, dot kernel, tau 0.1, y = x",
                      "labels arange(N)//2", "dot", _infonce_inputs, _infonce_loss),
    "tsne": Config("tsne", "t-SNE: Affinity(gaussian, sigma 4) target, student_t kernel (dof 1)",
                   "affinity gaussian sigma=4", "student_t", _tsne_inputs, _tsne_loss, target_grams=("z",)),
    "clip": Config("clip", "CLIP-style: N x M=N/2 rectangular, labels, cosine, tau 0.07",
                   "labels rows arange(N)//2, cols arange(M)", "cosine", _clip_inputs, _clip_loss,
                   m_of_n=_clip_m, leaves=("x", "y")),
    "clip-both": Config("clip-both", "CLIP, both directions: icon_loss_bidirectional, N x N pairs, cosine, tau 0.07 "
                        "(floor: one direction's 4 GEMMs)", "labels arange(N) both sides", "cosine",
                        _clip_both_inputs, _clip_both_loss, leaves=("x", "y")),
    # the divergences of "Beyond I-Con" on the same configurations (the kl rows above are their
    # baseline: cost ratio = time of the variant / time of its kl row, same backend)
    **{f"tsne-{div}": Config(f"tsne-{div}", f"t-SNE as 'tsne', divergence {div}", "affinity gaussian sigma=4",
                             "student_t", _tsne_inputs, _divergence_variant(_tsne_loss, div),
                             target_grams=("z",))
       for div in ("reverse_kl", "tv", "js")},
    **{f"infonce-{div}": Config(f"infonce-{div}", f"InfoNCE as 'infonce', divergence {div}",
                                "labels arange(N)//2", "dot", _infonce_inputs,
                                _divergence_variant(_infonce_loss, div))
       for div in ("tv", "js")},
    "jointtsne": Config("jointtsne", "t-SNE, joint (van der Maaten): symmetrised Affinity(gaussian, sigma 4), "
                        "student_t (dof 1), normalization='joint' (ik.JointTSNE's objective at one sigma)",
                        "affinity gaussian sigma=4 symmetrize", "student_t", _tsne_inputs, _jointtsne_loss,
                        fused_missing="the triton and cuda kernels do not compute joint normalisation yet",
                        fused_running=("torch", "cpu"), target_grams=("z",)),
    # conditional rows against a symmetrised target: the cpu's Affinity family schedule (a mass sweep)
    "tsne-sym": Config("tsne-sym", "t-SNE's conditional rows against a symmetrised Affinity(gaussian, sigma 4) "
                       "target, student_t (dof 1)", "affinity gaussian sigma=4 symmetrize", "student_t",
                       _tsne_inputs, _tsne_symmetrised_loss,
                       fused_missing="the triton and cuda kernels do not compute a symmetrised target yet",
                       fused_running=("torch", "cpu"), target_grams=("z",)),
    # joint t-SNE under a bounded f-divergence ("Beyond I-Con"): the cpu's joint family schedule
    "jointtsne-js": Config("jointtsne-js", "joint t-SNE as 'jointtsne', divergence js",
                           "affinity gaussian sigma=4 symmetrize", "student_t", _tsne_inputs,
                           _divergence_variant(_jointtsne_loss, "js"),
                           fused_missing="the triton and cuda kernels do not compute joint normalisation yet",
                           fused_running=("torch", "cpu"), target_grams=("z",)),
}


# --- the family sweep (issue 17): the members off the Labels / beta = 0 hot path -----------------

def _supcon_inputs(n, d, dtype, device, seed=0, classes=100):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(classes, d, generator=gen)
    x = F.normalize(centres[labels] + 1.5 * torch.randn(n, d, generator=gen), dim=1)
    return {"x": x.to(device=device, dtype=dtype).requires_grad_(), "labels": labels.to(device)}


def _knn_inputs(n, d, dtype, device, seed=0, k=15):
    """Embeddings x, and the k = 15 nearest neighbours of fixed input features z (ik.knn, set up
    once: not timed)."""
    inp = _tsne_inputs(n, d, dtype, device, seed)
    inp["nbr"] = ik.knn(inp["z"].float(), k).to(device)
    return inp


def _cluster_inputs(n, d, dtype, device, seed=0, clusters=100):
    """Cluster probabilities phi (N x 100, the rows of a softmax) for the log_dot kernel, and a
    k = 15 nearest-neighbour target on input features; d is the input features' width."""
    gen = torch.Generator().manual_seed(seed)
    inp = _knn_inputs(n, d, dtype, device, seed)
    phi = torch.softmax(2.0 * torch.randn(n, clusters, generator=gen), dim=1)
    inp["x"] = phi.to(device=device, dtype=dtype).requires_grad_()
    return inp


def _family_loss(target_of, kernel, **options):
    """The loss (inputs, backend) -> icon_loss(x, target_of(inputs), kernel, **options)."""
    return lambda inp, backend: ik.icon_loss(inp["x"], target=target_of(inp), kernel=kernel, backend=backend,
                                             **options)


def _labels(inp):
    return ik.Labels(inp["labels"])


def _neighbors(inp):
    return ik.Neighbors(inp["nbr"])


def _affinity(inp):
    return ik.Affinity(inp["z"], kernel="gaussian", sigma=TSNE_SIGMA)


FAMILY_LOSSES = {
    # name: (title, target, kernel, inputs, loss, Affinity Grams of the floor)
    "supcon100": ("SupCon: labels of 100 classes, dot kernel, tau 0.1", "labels randint(100)", "dot",
                  _supcon_inputs, _family_loss(_labels, "dot", temperature=0.1), ()),
    "infonce-debiased": ("debiased InfoNCE: as 'infonce', alpha = beta = 0.2", "labels arange(N)//2", "dot",
                         _infonce_inputs, _family_loss(_labels, "dot", temperature=0.1, alpha=0.2, beta=0.2), ()),
    "sne": ("SNE: Affinity(gaussian, sigma 4) target, gaussian kernel (sigma 1)", "affinity gaussian sigma=4",
            "gaussian", _tsne_inputs, _family_loss(_affinity, "gaussian", sigma=1.0), ("z",)),
    "tsimclr5": ("t-SimCLR: as 'infonce', student_t kernel (dof 5)", "labels arange(N)//2", "student_t",
                 _infonce_inputs, _family_loss(_labels, "student_t", dof=5.0), ()),
    "knn-graph": ("kNN graph: Neighbors(k = 15) target, student_t kernel (dof 1)", "neighbors k=15", "student_t",
                  _knn_inputs, _family_loss(_neighbors, "student_t", dof=1.0), ()),
    "cluster": ("cluster kernel: log_dot on 100 cluster probabilities, Neighbors(k = 15) target",
                "neighbors k=15", "log_dot", _cluster_inputs, _family_loss(_neighbors, "log_dot"), ()),
}
CONFIGS.update({name: Config(name, title, target, kernel, make, loss, target_grams=grams)
                for name, (title, target, kernel, make, loss, grams) in FAMILY_LOSSES.items()})
# the kNN graph under joint normalisation (one Q over every pair): the cpu's target family schedule
CONFIGS["knn-joint"] = Config("knn-joint", "kNN graph as 'knn-graph', normalization='joint'", "neighbors k=15",
                              "student_t", _knn_inputs,
                              _family_loss(_neighbors, "student_t", dof=1.0, normalization="joint"),
                              fused_missing="the triton and cuda kernels do not compute joint normalisation yet",
                              fused_running=("torch", "cpu"))
# InfoNCE against other column labels (each row's positive the next pair's column: p_ij != p_ji),
# conditional and joint: the cpu's symmetric Labels schedules read each row's own label
def _other_columns_loss(inp, backend, normalization="conditional"):
    labels = inp["labels"]
    return ik.icon_loss(inp["x"], target=ik.Labels(labels, labels.roll(1)), kernel="dot", temperature=0.1,
                        normalization=normalization, backend=backend)


CONFIGS["infonce-cols"] = Config("infonce-cols", "InfoNCE as 'infonce' against column labels rolled by one",
                                 "labels arange(N)//2, cols rolled by 1", "dot", _infonce_inputs,
                                 _other_columns_loss)
CONFIGS["infonce-cols-joint"] = Config(
    "infonce-cols-joint", "InfoNCE as 'infonce-cols', normalization='joint'", "labels arange(N)//2, cols rolled by 1",
    "dot", _infonce_inputs, lambda inp, backend: _other_columns_loss(inp, backend, "joint"),
    fused_missing="the triton and cuda kernels do not compute joint normalisation yet", fused_running=("torch", "cpu"))
# SNE under joint normalisation of a target that is not symmetrised (P_ij = p_{j|i} / N): the cpu's
# Affinity family schedule with its joint rows
CONFIGS["sne-joint"] = Config("sne-joint", "SNE as 'sne', normalization='joint' (the target not symmetrised)",
                              "affinity gaussian sigma=4", "gaussian", _tsne_inputs,
                              _family_loss(_affinity, "gaussian", sigma=1.0, normalization="joint"),
                              fused_missing="the triton and cuda kernels do not compute joint normalisation yet",
                              fused_running=("torch", "cpu"), target_grams=("z",))
# issue 17's sweep: every family member, the divergences on t-SNE and InfoNCE, and joint t-SNE,
# N = 4096, 8192
FAMILY = ("infonce", "supcon100", "infonce-debiased", "sne", "tsne", "tsimclr5", "knn-graph", "cluster",
          "tsne-reverse_kl", "tsne-tv", "tsne-js", "infonce-tv", "infonce-js", "jointtsne")

PROBE_CONFIG = "infonce"      # the configuration of the largest-N probe


def floor_operands(config: Config, inputs):
    """The (a, b, GEMMs) operands of the compute floor (DESIGN.md §5): four N x M x d GEMMs of
    x and y, and two of each Affinity target's features (its Gram in forward and backward)."""
    x = inputs["x"].detach()
    y = inputs["y"].detach() if "y" in config.leaves else x
    return [(x, y, 4)] + [(inputs[k].detach(), inputs[k].detach(), 2) for k in config.target_grams]


def config_floor(operands, device) -> float:
    """Seconds of a configuration's floor, ``floor_operands``'s GEMMs one after another."""
    return sum(gemm_floor(a, b, device, gemms=gemms) for a, b, gemms in operands)


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
    # the divergence and joint rows last: the deadline cuts the tail first. CLIP's both directions
    # (issue 18's target at 8192) before the one-direction rectangular rows: after them, the
    # 560 s deadline cut clip-both at 8192 on the 2-core VM (2026-12-05)
    ("cpu", "default"): Mode([("infonce", ("float32",), (2048, 4096, 8192, 16384), ()),
                              ("tsne", ("float32",), (2048, 8192), ()),
                              ("clip-both", ("float32",), (4096, 8192), ()),
                              ("clip", ("float32",), (4096, 16384), ())]
                             + [(c, ("float32",), (8192,), ("compiled",))
                                for c in ("tsne-reverse_kl", "tsne-tv", "tsne-js", "infonce-tv", "infonce-js")]
                             + [("jointtsne", ("float32",), (2048, 8192), ())],
                             repeats=5, budget_s=25, probe_mem_gib=4.0, probe_step_s=25,
                             probe_steps=7, deadline_s=560),
    ("cpu", "full"): Mode([(c, ("float32",), (2048, 4096, 8192, 16384, 32768), ())
                           for c in ("infonce", "tsne", "clip", "tsne-reverse_kl", "tsne-tv", "tsne-js",
                                     "infonce-tv", "infonce-js")]
                          + [("jointtsne", ("float32",), (2048, 4096, 8192), ())],
                          repeats=5, budget_s=900, probe_mem_gib=8.0, probe_step_s=300, probe_steps=10),
    # issue 17's family sweep (--family): every contender, the floor, N = 4096 and 8192
    ("cpu", "family"): Mode([(c, ("float32",), (4096, 8192), ()) for c in FAMILY],
                            repeats=3, budget_s=60, probe_mem_gib=4.0, probe_step_s=25, probe_steps=7),
    ("cuda", "quick"): Mode([("infonce", ("bfloat16",), (4096, 16384), ())],
                            repeats=5, budget_s=10, probe_mem_gib=0, probe_step_s=5, probe_steps=4,
                            deadline_s=110),
    # in order of priority (the deadline cuts the tail); torch.compile on infonce bf16 only
    ("cuda", "default"): Mode([("infonce", ("bfloat16",), (4096, 16384, 65536), ()),
                               ("tsne", ("bfloat16",), (16384, 65536), ("compiled",)),
                               ("clip", ("bfloat16",), (16384, 65536), ("compiled",)),
                               ("infonce", ("float32",), (4096, 16384, 65536), ("compiled",))]
                              + [(c, ("bfloat16",), (16384,), ("compiled",))
                                 for c in ("tsne-reverse_kl", "tsne-tv", "tsne-js", "infonce-tv", "infonce-js")]
                              + [("jointtsne", ("bfloat16",), (16384,), ("compiled",))],
                              repeats=5, budget_s=20, probe_mem_gib=0, probe_step_s=5, probe_steps=6,
                              deadline_s=200),
    ("cuda", "family"): Mode([(c, ("bfloat16",), (16384,), ("compiled",)) for c in FAMILY],
                             repeats=5, budget_s=20, probe_mem_gib=0, probe_step_s=5, probe_steps=6),
    ("cuda", "full"): Mode([(c, ("bfloat16", "float32"), (4096, 16384, 65536, 131072, 262144), ())
                            for c in ("infonce", "tsne", "clip")],
                           repeats=10, budget_s=300, probe_mem_gib=0, probe_step_s=60, probe_steps=10),
}
# probe_mem_gib 0 on CUDA: 90% of the device's memory.


# --- contenders ------------------------------------------------------------------------------------

FUSED = ("torch", "cpu", "triton", "cuda")
ORDER = ("naive", "compiled", "torch", "cpu", "cpu-plain", "triton", "cuda", "pml-supcon", "keops")
PEERS = ("pml-supcon", "keops")
LABEL = {"naive": "naive", "compiled": "naive+compile", "pml-supcon": "pml-supcon", "keops": "keops"}
NAIVE = "naive"
FLOOR = "GEMM floor"          # the floor's label in the table, the CSV and the plots

# extra seconds a job may take beyond its time budget: compiling (inductor, KeOps) and start-up
ALLOWANCE = {"compiled": 240.0, "keops": 300.0}
DEFAULT_ALLOWANCE = 60.0

# The configurations where the cpu backend runs a tile-pair schedule (DESIGN.md §1.3): the symmetric
# one in self mode on the label hot path (csrc/cpu_symmetric_labels.h), for the other Labels
# members on the family rows and the closed-form f-divergence rows (csrc/cpu_symmetric_label_family.h:
# beta > 0, Student-t; infonce-tv and infonce-js), for SNE / t-SNE
# (csrc/cpu_symmetric_affinity.h, csrc/cpu_symmetric_joint.h) and for t-SNE with an f-divergence
# (csrc/cpu_symmetric_affinity_family.h), for joint t-SNE with an f-divergence
# (csrc/cpu_symmetric_joint_family.h), for the kNN graph (a Neighbors target: the family
# schedule of csrc/cpu_symmetric_label_family.h with the Cauchy rows), the bidirectional one for
# both directions of CLIP (csrc/cpu_bidirectional_labels.cpp). There the sweep also times
# "cpu-plain", the same backend with ICON_KERNELS_SYMMETRIC=0 (plain schedule; two calls for
# clip-both), so that both schedules are in one run.
SYMMETRIC_CPU = ("infonce", "supcon100", "infonce-debiased", "tsimclr5", "clip-both", "sne", "tsne", "jointtsne",
                 "tsne-reverse_kl", "tsne-tv", "tsne-js", "infonce-tv", "infonce-js", "knn-graph", "jointtsne-js",
                 "tsne-sym", "knn-joint", "sne-joint", "infonce-cols", "infonce-cols-joint")
SCHEDULE_SWITCH = "ICON_KERNELS_SYMMETRIC"


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
    if name == "cpu-plain":
        if config.name not in SYMMETRIC_CPU:
            return "cpu runs the plain schedule here already"
        return unavailable_reason("cpu", config, device)
    if name in FUSED:
        if config.fused_missing and name not in config.fused_running:
            return config.fused_missing
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
    if name in ("cpu", "cpu-plain"):
        # the switch is read at every op call: forward and backward of one step run under it
        symmetric = "1" if name == "cpu" else "0"

        def run():
            os.environ[SCHEDULE_SWITCH] = symmetric
            return config.loss(inp, "cpu")
        return run
    if name in FUSED:
        return lambda: config.loss(inp, name)
    if name == "pml-supcon":
        return _pml_supcon(config, inp)
    if name == "keops":
        return _keops_infonce(config, inp)
    raise ValueError(f"unknown contender {name!r}")


# --- one forward + backward, the GEMM floor, CUDA peak memory ---------------------------------------
# Every measurement of the benchmark, the pytest-benchmark suite and the memory-bound test goes
# through these, so that all of them time and count the same thing.

def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def clear_grads(inp):
    for v in inp.values():
        if isinstance(v, torch.Tensor) and v.grad is not None:
            v.grad = None


def fwd_bwd(fn, inp, device):
    """Seconds for one forward + backward (synchronised on CUDA), and the loss."""
    clear_grads(inp)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        loss = fn()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, loss.detach()
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    return time.perf_counter() - t0, loss.detach()


def cuda_peak_mib(fn, inp):
    """(MiB, seconds) of one forward + backward on CUDA: max_memory_allocated over the run minus
    memory_allocated before it (the gradients of an earlier run freed first)."""
    clear_grads(inp)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t, _ = fwd_bwd(fn, inp, "cuda")
    return (torch.cuda.max_memory_allocated() - base) / 2**20, t


def gemm_floor(x, y, device, block_elems=None, gemms=4):
    """Seconds for the four N x M x d GEMMs of one fused forward + backward: S = X Y^T (forward),
    S again (the backward recomputes it), G Y and G^T X with an N x M G; ``gemms=2``: the first
    two only (an Affinity target's Gram). Done in row blocks of at most ``block_elems`` entries of
    S (2^26 on CPU, 2^28 on GPU): the same FLOPs, O(block) memory, and exactly ``gemms`` whole
    GEMMs whenever N x M fits in one block."""
    if gemms not in (2, 4):
        raise ValueError(f"gemms must be 2 or 4, got {gemms!r}")
    n, m = x.shape[0], y.shape[0]
    block_elems = block_elems or (2**28 if device == "cuda" else 2**26)
    rows = max(1, min(n, block_elems // max(m, 1)))
    with torch.no_grad():
        s = torch.empty(rows, m, dtype=x.dtype, device=x.device)
        gy = torch.empty(rows, x.shape[1], dtype=x.dtype, device=x.device)
        gtx = torch.zeros(m, x.shape[1], dtype=x.dtype, device=x.device)
        yt = y.t()
        sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, rows):
            xb = x[i:i + rows]
            sb, gyb = s[:xb.shape[0]], gy[:xb.shape[0]]
            torch.mm(xb, yt, out=sb)
            torch.mm(xb, yt, out=sb)
            if gemms == 4:
                torch.mm(sb, y, out=gyb)
                gtx.addmm_(sb.t(), xb)
        sync(device)
        return time.perf_counter() - t0


# --- error against a reference: naive's own run, or fp32 on the upcast inputs for half dtypes ------

def grads_of(cfg, inp):
    return [inp[k].grad.detach().float().clone() if inp[k].grad is not None else None for k in cfg.leaves]


def errors_against(loss, grads, ref):
    """Relative loss error and max gradient error relative to max |reference gradient|."""
    ref_loss, ref_grads = ref
    out = {"err_loss_rel": abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)}
    g_err = 0.0
    for g, r in zip(grads, ref_grads):
        if g is None or r is None:
            continue
        scale = float(r.abs().max()) or 1.0
        g_err = max(g_err, float((g - r).abs().max()) / scale)
    out["err_grad_rel"] = g_err
    out["max_err"] = max(out["err_loss_rel"], g_err)
    return out


def reference_oracle(cfg, inp, device):
    """fp32 reference loss and gradients on the upcast inputs (for half-precision rows)."""
    up = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
          for k, v in inp.items()}
    _, loss = fwd_bwd(build(NAIVE, cfg, up), up, device)
    return loss, grads_of(cfg, up)
