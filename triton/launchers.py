"""Launchers of the Triton kernels: the ``forward`` / ``backward`` implementations of the
``icon_kernels::triton_*`` ops (same flat arguments as the op schema in icon_kernels/backends/ops.py).

They prepare O(N + M) side inputs in torch (squared norms, per-row parameters, the target's
per-row normaliser), choose block sizes and launch. No N x M buffer is allocated; a Dense target
is itself N x M and is read in place. The target's normaliser is computed by the forward only
(_forward_target) and handed to the backward in the stats it returns (NORM_ROW).
"""
import contextlib
import os
from typing import NamedTuple, Optional

import torch
import triton

from . import triangular_launches
from .backward_kernels import icon_backward_cols_kernel, icon_backward_rows_kernel
from .forward_kernels import icon_forward_kernel, icon_mixture_kernel

# The Neighbors targets' sparse O(N k d) gather (icon_kernels/backends/neighbor_pairs.py) is handed in by
# the package when it registers this backend (icon_kernels/backends/triton.py): this folder imports
# nothing from icon_kernels.
neighbor_pairs = None


def use_neighbor_pairs(module) -> None:
    global neighbor_pairs
    neighbor_pairs = module


KERNEL_CODES = {"dot": 0, "gaussian": 1, "student_t": 2, "log_dot": 3, "power": 4}
TARGET_CODES = {"labels": 0, "neighbors": 1, "affinity": 2, "dense": 3}
# the divergences these kernels compute (the codes of families.DIVERGENCES; tests/test_families.py):
# kl and cross_entropy in closed form where they have one; the f-divergences (DESIGN.md §1.1) by a
# second pass over the tiles (forward_kernels.icon_mixture_kernel, DIVERGENCE constexpr)
DIVERGENCE_CODES = {"kl": 0, "cross_entropy": 1, "reverse_kl": 2, "tv": 3, "hellinger": 4, "js": 5,
                    "chi2": 6}
CLOSED_FORM_CODES = (DIVERGENCE_CODES["kl"], DIVERGENCE_CODES["cross_entropy"])
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_D = 256     # larger feature dims are looped over in chunks of D_CHUNK
D_CHUNK = 128


FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")


def fp32_precision() -> str:
    """tl.dot input precision for fp32 inputs, from ICON_KERNELS_TRITON_FP32.

    "tf32x3" (default): three TF32 tensor-core products per dot (hi*hi + hi*lo + lo*hi), close to
    fp32 accuracy at tensor-core speed. "ieee": exact fp32 FMA dots; on sm_90 they spill 10-60 KB
    per thread and compile for minutes, so they are an opt-in for bit-level fp32 checks. "tf32":
    one TF32 product (about 1e-3 relative error per dot), the fastest."""
    value = os.environ.get("ICON_KERNELS_TRITON_FP32", "tf32x3")
    if value not in FP32_PRECISIONS:
        raise ValueError(f"ICON_KERNELS_TRITON_FP32 must be one of {', '.join(FP32_PRECISIONS)}, "
                         f"got {value!r}")
    return value


AUTOTUNE_SHAPES = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2),
                   (32, 32, 4, 2)]      # (BLOCK_M, BLOCK_N, warps, stages); the last always fits
INTERPRETER_SHAPE = (32, 32, 4, 2)      # warps and stages mean nothing to the interpreter


def _configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in AUTOTUNE_SHAPES]


def default_shape(args) -> tuple:
    """The one shape used without autotuning: 64 x 64 tiles when the Grams' operands are bf16 and
    there is no target Gram; else 64 x 32. On sm_90 64 x 64 tiles spill 1.2-2.2 KB per thread in
    the fp32 (and fp16: its gradient dots run in fp32) backward, and 1.1 KB with a bf16 Affinity
    target; 64 x 32 tiles stay under 1 KB (tests/test_triton_resources.py). An f-divergence's
    second pass and backward keep more tiles live (its per-pair terms): 64 x 32 there too (bf16
    Labels, hellinger, sm_90: the second pass spills 1.1 KB per thread at 64 x 64, none at 64 x 32)."""
    bf16 = not args["UPCAST"] and args["X"].dtype == torch.bfloat16
    f_divergence = args.get("DIVERGENCE", 0) not in CLOSED_FORM_CODES     # the first pass has none
    wide = bf16 and _target(args) != TARGET_CODES["affinity"] and not f_divergence
    return (64, 64, 4, 2) if wide else (64, 32, 4, 2)


# Shared memory of one program on sm_90, an upper bound fitted to the cubins of every recorded
# variant (tests/test_triton_resources.py checks that it stays above them): the column tiles staged
# once per pipeline stage and the row block, for the features and (Affinity) the target features;
# fp32 operands take 5/3 of their size (tf32x3 stages hi and lo parts), bf16 1x; the backward adds
# four BLOCK_M x BLOCK_N fp32 tiles (the gradient weights, transposed for the column dots); a Dense
# target stages its BLOCK_M x BLOCK_N tiles; 4 KB for the rest.
SHARED_LIMIT = 232448          # bytes per block on sm_90 (227 KB)


def _target(args) -> int:
    """A launch's target code; the Affinity target's triangular kernels have no TARGET argument
    (symmetric_affinity_kernels.py), and the estimate of a triangular launch gets it from its
    launcher (_triangular_launch_args: Affinity and Dense; a Labels or Neighbors launch, like any
    launch without it, is taken for a Labels one: neither stages a target tile)."""
    return args.get("TARGET", TARGET_CODES["labels"])


def _operand_bytes(args, tensor: str, upcast: str, stage: str) -> float:
    """Shared bytes per staged operand element: fp16 operands of the backward's gradient dots are
    upcast to fp32 there (grad_dot in tile_helpers.py)."""
    element = args[tensor].element_size()
    fp32_dot = args[upcast] or element != 2 or (stage == "backward" and args[tensor].dtype == torch.float16)
    return max(element, 4) * 5 / 3 if fp32_dot else element


def estimated_shared_bytes(config, args, stage: str) -> int:
    meta = config.kwargs
    bm, bn, stages = meta["BLOCK_M"], meta["BLOCK_N"], max(1, config.num_stages)
    rows = (max(bm, bn) + stages * max(bm, bn))      # either side may be the staged one
    total = rows * args["BLOCK_D"] * _operand_bytes(args, "X", "UPCAST", stage)
    if _target(args) == TARGET_CODES["affinity"]:
        total += rows * args["BLOCK_DZ"] * _operand_bytes(args, "Z", "UPCAST_Z", stage)
    if _target(args) == TARGET_CODES["dense"]:           # the target's tiles are staged too
        total += stages * bm * bn * max(args["DENSE"].element_size(), 4)
    if stage == "backward":
        total += 4 * bm * bn * 4
    return int(total) + 4096                              # reduction and barrier scratch


def _config(shape):
    bm, bn, warps, stages = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def fixed_shape(args, stage: str) -> tuple:
    """The shape of a launch without autotuning: default_shape(), or the smallest if it cannot fit."""
    shape = default_shape(args)
    if estimated_shared_bytes(_config(shape), args, stage) <= SHARED_LIMIT:
        return shape
    return min(AUTOTUNE_SHAPES, key=lambda s: estimated_shared_bytes(_config(s), args, stage))


def _pruner(stage: str):
    """early_config_prune: drop the configs that cannot fit in shared memory before they are
    compiled (compiling one takes seconds, and then it fails); never all of them."""
    def prune(configs, _named_args, **kwargs):
        fit = [c for c in configs if estimated_shared_bytes(c, kwargs, stage) <= SHARED_LIMIT]
        return fit or [min(configs, key=lambda c: estimated_shared_bytes(c, kwargs, stage))]
    return prune


# The key holds every constexpr that changes the compiled code (a config tuned for a light
# variant may not fit a heavy one, e.g. Affinity targets with target grads) and the power-of-two
# buckets of N and M, not N and M: a new batch size must not benchmark every config again.
_KEY = ["N_BUCKET", "M_BUCKET", "D", "DZ", "KERNEL", "T_KERNEL", "TARGET", "EXCLUDE_SELF", "KL",
        "ONE_PASS", "HAS_BETA", "TARGET_GRAD", "DIVERGENCE", "BIDIR", "UPCAST", "UPCAST_Z", "D_CHUNKED"]


class _Launcher:
    """One kernel: autotuned, or with one fixed shape straight through the jit function under the
    interpreter and with ICON_KERNELS_TRITON_AUTOTUNE=0 (tests and the first benchmark on a GPU,
    where each autotune miss compiles every config; and Triton < 3.7 benchmarks even the single
    config a pruning leaves)."""

    def __init__(self, kernel, stage: str):
        self.kernel, self.stage = kernel, stage
        self.tuned = None if INTERPRET else triton.autotune(
            _configs(), key=_KEY, prune_configs_by={"early_config_prune": _pruner(stage)})(kernel)

    def __getitem__(self, grid):
        def launch(**kwargs):
            if self.tuned is not None and os.environ.get("ICON_KERNELS_TRITON_AUTOTUNE") != "0":
                return self.tuned[grid](**kwargs)
            bm, bn, warps, stages = INTERPRETER_SHAPE if INTERPRET else fixed_shape(kwargs, self.stage)
            return self.kernel[grid](**kwargs, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        return launch


_forward_kernel = _Launcher(icon_forward_kernel, "forward")
_mixture_kernel = _Launcher(icon_mixture_kernel, "forward")
_rows_kernel = _Launcher(icon_backward_rows_kernel, "backward")
_cols_kernel = _Launcher(icon_backward_cols_kernel, "backward")


def _upcast(dtype: torch.dtype) -> bool:
    """Convert to fp32 right after loading? Not for fp16/bf16 on a GPU (tensor cores), but bf16
    under the interpreter, which cannot do bf16 arithmetic."""
    if dtype == torch.float16:
        return False
    return dtype != torch.bfloat16 or INTERPRET


def _block_d(d: int) -> int:
    """All of d in one block up to MAX_BLOCK_D; beyond, chunks of D_CHUNK (no register spills)."""
    return max(16, triton.next_power_of_2(d)) if d <= MAX_BLOCK_D else D_CHUNK


def _rows_grid(n, d_chunks=1):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), d_chunks)


def _row_param(param, n):
    return param.detach().float().expand(n).contiguous()


def _sq(t):
    return t.float().square().sum(1)


def _bucket(n: int) -> int:
    """The autotuner's size key: the next power of two, at least 16 (so that, as an integer
    argument, it always has the same divisibility and never adds a compile variant)."""
    return max(16, triton.next_power_of_2(n))


class OpArgs(NamedTuple):
    """The arguments of the forward op, named as in its schema (ARGS in
    icon_kernels/backends/ops.py; tests/test_triton_prepared_inputs.py checks the names)."""
    x: torch.Tensor
    y: torch.Tensor
    param: torch.Tensor
    kernel: str
    target: str
    row_labels: Optional[torch.Tensor]
    col_labels: Optional[torch.Tensor]
    nbr_index: Optional[torch.Tensor]
    nbr_weight: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    z_cols: Optional[torch.Tensor]
    t_param: Optional[torch.Tensor]
    t_kernel: str
    dense_p: Optional[torch.Tensor]
    alpha: float
    beta: float
    exclude_self: bool
    divergence: int             # the op code of DIVERGENCE_CODES
    normalization: str          # these kernels compute "conditional" only
    symmetrize: bool            # ... and no symmetrised target

    @property
    def kl(self) -> bool:
        return self.divergence == DIVERGENCE_CODES["kl"]

    @property
    def f_divergence(self) -> bool:
        """An f-divergence of DESIGN.md §1.1 beyond kl: evaluated per pair in a second pass."""
        return self.divergence not in CLOSED_FORM_CODES


def _computed_divergence(op: OpArgs) -> None:
    """A direct op call with a code these kernels do not list is refused (the package never
    sends one: families.DIVERGENCES lists the backends of each divergence)."""
    if op.divergence not in DIVERGENCE_CODES.values():
        raise ValueError(f"the triton backend computes {', '.join(DIVERGENCE_CODES)} only; divergence "
                         f"code {op.divergence} is not in its kernels")
    if op.normalization != "conditional" or op.symmetrize:
        raise ValueError("the triton kernels compute conditional normalisation without symmetrize, got "
                         f"normalization={op.normalization!r}, symmetrize={op.symmetrize}")


class BackwardArgs(NamedTuple):
    """The backward op's arguments after grad_rows and the forward's (BACKWARD_SCHEMA)."""
    valid: torch.Tensor
    stats: torch.Tensor
    need_target_grad: bool
    need_param_grad: bool
    y_is_x: bool              # x and y one autograd input: the symmetric schedule may return dy = 0


# The row of the forward's stats [4, N] that keeps a Labels, Dense or Neighbors target's row
# normaliser (its positive count after exclude_self, p's row total, the weight total; 1 for a row
# without target) for the backward (the plain and the triangular ones). These targets have no LSE^p:
# only Affinity targets use this row for it, and outside the Triton backward only row 0
# (LSE) of a forward's stats is ever read (icon_kernels/backends/target_weight_grads.py, for a
# target that requires grad); the loss itself drops them.
NORM_ROW = 2
# A Labels, Dense or Neighbors forward's free row, 3: the triangular forward's BLOCK_M, else 0. Free in either forward:
# the closed form writes rows 0 and 1, a second pass (beta > 0, an f-divergence) rows 0 and 1 too
# (R_i or Gamma_i; the plain second pass writes H_i / Phi_i into row 3 for Affinity targets only), so
# a plain forward's row 3 stays the zeros it was made of and never reads as a tile size. It is also
# the record of an Affinity forward at beta > 0 or under an f-divergence, which has no free row: rows
# 0-2 (LSE, R_i or Gamma_i, LSE^p) are what the triangular backward reads, row 3 (H_i or Phi_i) what
# the plain backward reads for the target's gradient (z, its parameter) only; so the triangular forward
# writes its record over H_i / Phi_i, and a self-mode backward that makes the target's gradient
# computes row 3 again first (_target_statistics). A plain forward writes H_i / Phi_i there, which
# _triangular_record does not take for a record unless every row's equals the tile size.
TRIANGULAR_RECORD_ROW = 3
# An Affinity forward's record where row 1 is free: kl or cross_entropy at beta = 0 (alpha = 0: the
# closed form, which writes 1 there; alpha > 0: two passes, whose second writes the row's sum of p~),
# where no backward kernel reads R_i, and a plain forward never writes a tile size. Rows 0, 2 and 3
# (LSE, LSE^p, H_i) are then the plain forward's, for the plain backward of the target's gradient.
# The triangular forward writes its BLOCK_M (>= 16).
AFFINITY_RECORD_ROW = 1


def _record_row(op: OpArgs) -> int:
    """The stats row of a triangular forward's record for op's target (_self_mode_structure's
    targets only)."""
    if op.target == "affinity":
        if float(op.beta) == 0 and not op.f_divergence:
            return AFFINITY_RECORD_ROW
        return TRIANGULAR_RECORD_ROW
    if op.target in ("labels", "dense", "neighbors"):     # row 3 is free for all three
        return TRIANGULAR_RECORD_ROW
    raise ValueError(f"the triangular schedule has no record row for target {op.target!r}")


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous at a 16-byte aligned address (a copy if need be): Triton specialises pointer
    arguments on that alignment, so e.g. a view into stats would add compile variants."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _no_target(x, y) -> dict:
    """The target arguments of the kernels, with dummies for what the target does not use."""
    dummy_f = torch.zeros(1, dtype=torch.float32, device=x.device)
    dummy_i = torch.zeros(1, dtype=torch.int64, device=x.device)
    return dict(LAB=dummy_i, CLAB=dummy_i, NORM=dummy_f, DENSE=dummy_f, Z=x, ZC=y, ZSQ=dummy_f,
                ZCSQ=dummy_f, TPRM=dummy_f)


def _labels(op: OpArgs) -> dict:
    """The raw labels as int64: the kernels only test them for equality (target_weights). Column
    labels that are the row labels' tensor (ik.Labels without col_labels) are passed as the row
    labels' int64 tensor twice: one conversion, and the same compiled kernel as any other CLAB."""
    lab = _aligned(op.row_labels.long())
    return dict(LAB=lab, CLAB=lab if op.col_labels is op.row_labels else _aligned(op.col_labels.long()))


def _affinity(op: OpArgs, n: int) -> dict:
    # the input dtype, not fp32: fp16/bf16 target Grams then run on tensor cores too
    z_dtype = torch.promote_types(op.z.dtype, op.z_cols.dtype)
    zz, zc = op.z.to(z_dtype).contiguous(), op.z_cols.to(z_dtype).contiguous()
    return dict(Z=zz, ZC=zc, ZSQ=_sq(zz), ZCSQ=_sq(zc), TPRM=_row_param(op.t_param, n))


def _neighbor_weights(op: OpArgs, n: int):
    """(the kept entries, their fp32 weights, 0 where dropped) of a Neighbors target."""
    idx = op.nbr_index
    w = torch.ones(idx.shape, device=idx.device) if op.nbr_weight is None else op.nbr_weight.float()
    keep = idx >= 0
    if op.exclude_self:
        keep &= idx != torch.arange(n, device=idx.device)[:, None]
    return keep, torch.where(keep, w, 0.0)


def _neighbor_lists(op: OpArgs, pairs) -> dict:
    """A Neighbors target under an f-divergence, or under any divergence on the triangular schedule,
    whose p the kernels form inside each tile (tile_helpers.neighbor_weights and, for the triangular
    kernels' column side, column_neighbor_weights): LAB = the (N, k) indices (-1 where dropped),
    DENSE = their normalised fp32 weights, stride_dense = k. No O(N k d) gather then, but
    O(BLOCK_M BLOCK_N k) compares per tile (and side) in each pass that reads p."""
    idx, w = pairs
    k = idx.shape[1]
    if k == 0:             # no entries: one dummy column that the kernels never read
        idx, w = idx.new_full((idx.shape[0], 1), -1), w.new_zeros(w.shape[0], 1)
    return dict(LAB=_aligned(idx.long()), DENSE=_aligned(w.float()), stride_dense=k)


def _forward_target(op: OpArgs, x, y):
    """The target's kernel arguments, its row normaliser (None for Affinity), the rows that have
    a target, and the Neighbors pairs (index with -1 where dropped, normalised weight) for the
    sparse gather of kl and cross_entropy (None under an f-divergence: _neighbor_lists)."""
    n, dev = x.shape[0], x.device
    target, norm, pairs = _no_target(x, y), None, None
    if op.target == "labels":
        _, inverse = torch.unique(torch.cat([op.row_labels, op.col_labels]), return_inverse=True)
        ri, ci = inverse[:n], inverse[n:]
        count = torch.bincount(ci, minlength=int(inverse.max()) + 1 if inverse.numel() else 1)[ri]
        if op.exclude_self:
            count = count - (ri == ci[:n]).long()
        has = count > 0
        norm = torch.where(has, count, 1).float()
        target.update(_labels(op), NORM=norm)
    elif op.target == "neighbors":
        keep, w = _neighbor_weights(op, n)
        total = w.sum(1)
        has = total != 0
        norm = torch.where(has, total, 1.0)
        pairs = (torch.where(keep, op.nbr_index, -1), w / norm[:, None])
        if op.f_divergence:
            target.update(_neighbor_lists(op, pairs))
            pairs = None
    elif op.target == "dense":
        dense = op.dense_p.contiguous()
        total = dense.sum(1, dtype=torch.float32)           # no fp32 copy of the N x M target
        if op.exclude_self:
            total = total - dense.diagonal().float()
        has = total != 0
        norm = torch.where(has, total, 1.0)
        target.update(DENSE=dense, NORM=norm)
    else:
        target.update(_affinity(op, n))
        has = torch.ones(n, dtype=torch.bool, device=dev)
    return target, norm, has, pairs


def _backward_target(op: OpArgs, x, y, stats):
    """The target's kernel arguments and Neighbors pairs as the forward made them, with the row
    normaliser read from stats[NORM_ROW]: no torch.unique / bincount, no sum over p."""
    n = x.shape[0]
    target, pairs = _no_target(x, y), None
    norm = _aligned(stats[NORM_ROW]) if op.target != "affinity" else None
    if op.target == "labels":
        target.update(_labels(op), NORM=norm)
    elif op.target == "neighbors":
        keep, w = _neighbor_weights(op, n)
        pairs = (torch.where(keep, op.nbr_index, -1), w / norm[:, None])
        if op.f_divergence:
            target.update(_neighbor_lists(op, pairs))
            pairs = None
    elif op.target == "dense":
        target.update(DENSE=op.dense_p.contiguous(), NORM=norm)
    else:
        target.update(_affinity(op, n))
    return target, pairs


def _kernel_arguments(op: OpArgs, x, y, target: dict):
    """The kernels' tensors, sizes and flags: the features' side (norms, per-row parameter) with
    the target's arguments (from _forward_target or _backward_target)."""
    n, m = x.shape[0], y.shape[0]
    m_valid = m - int(op.exclude_self)
    target = dict(target)
    zz, zc, dense = target["Z"], target["ZC"], target["DENSE"]
    stride_dense = target.pop("stride_dense", dense.stride(0) if dense.dim() == 2 else 0)
    tensors = dict(X=x, Y=y, XSQ=_sq(x), YSQ=_sq(y), PRM=_row_param(op.param, n), **target,
                   stride_dense=stride_dense)
    sizes = dict(N=n, M=m, D=x.shape[1], DZ=zz.shape[1], stride_x=x.stride(0),
                 stride_y=y.stride(0), stride_z=zz.stride(0), stride_zc=zc.stride(0),
                 m_valid=float(max(m_valid, 1)), alpha=float(op.alpha), N_BUCKET=_bucket(n),
                 M_BUCKET=_bucket(m))
    flags = dict(KERNEL=KERNEL_CODES[op.kernel], T_KERNEL=KERNEL_CODES[op.t_kernel],
                 TARGET=TARGET_CODES[op.target], EXCLUDE_SELF=bool(op.exclude_self), KL=bool(op.kl),
                 PRECISION=fp32_precision(), UPCAST=_upcast(x.dtype), UPCAST_Z=_upcast(zz.dtype),
                 D_CHUNKED=x.shape[1] > MAX_BLOCK_D, BLOCK_D=_block_d(x.shape[1]),
                 BLOCK_DZ=max(16, triton.next_power_of_2(zz.shape[1])))
    return tensors, sizes, flags


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the inputs' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(*args):
    op = OpArgs(*args)
    _computed_divergence(op)
    with _on_device(op.x):
        return _forward(op)


def backward(grad_rows, *rest):
    op, saved = OpArgs(*rest[:len(OpArgs._fields)]), BackwardArgs(*rest[len(OpArgs._fields):])
    _computed_divergence(op)
    with _on_device(op.x):
        return _backward(grad_rows, op, saved)


def _forward(op: OpArgs):
    x, y = op.x.contiguous(), op.y.contiguous()
    target, norm, has, pairs = _forward_target(op, x, y)
    tensors, sizes, flags = _kernel_arguments(op, x, y, target)
    n, dev, beta = sizes["N"], x.device, float(op.beta)
    included = has & (y.shape[0] - int(op.exclude_self) > 0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    stats = torch.zeros(4, n, dtype=torch.float32, device=dev)
    if norm is not None:
        stats[NORM_ROW] = norm              # for the backward (_backward_target)
    two_pass = (beta > 0 or (flags["TARGET"] == TARGET_CODES["affinity"] and sizes["alpha"] > 0)
                or op.f_divergence)
    triangular = _triangular_flags(op, flags)
    if _one_input(op) and _self_mode_triangular(op) and _triangular_fits(tensors, triangular):
        if pairs is not None:     # a Neighbors target under kl or cross_entropy: its p in the tiles too
            tensors.update(_neighbor_lists(op, pairs))
            pairs = None
        triangular_launches.forward(op.target, tensors, sizes, triangular, _triangular_shape(tensors, triangular),
                                    beta, two_pass, loss, stats)
        stats[_record_row(op)] = _triangular_tile(tensors, triangular)[0]    # (the backward follows it)
    else:
        _forward_kernel[_rows_grid(n)](**tensors, LOSS=loss, STATS=stats, **sizes,
                                       ONE_PASS=not two_pass, **flags)
        if two_pass:
            _mixture_kernel[_rows_grid(n)](**tensors, LOSS=loss, STATS=stats, **sizes, beta=beta,
                                           HAS_BETA=beta > 0, DIVERGENCE=op.divergence, **flags)
    if pairs is not None:
        loss = loss + _neighbor_forward(op, tensors, sizes, stats, beta, pairs)
    loss = torch.where(included, loss, 0.0)
    return loss.to(acc), included, stats.to(acc)


def _neighbor_forward(op: OpArgs, tensors, sizes, stats, beta, pairs):
    """What the kernels (which saw p = 0) miss of a Neighbors target: the pairs' share of the
    cross term (linear in p) and of R_i, and the entropy over the merged support."""
    idx, w = pairs
    alpha, m_valid = sizes["alpha"], sizes["m_valid"]
    s, _ = neighbor_pairs.pair_logits(op.kernel, tensors["X"], tensors["Y"], idx, tensors["PRM"])
    if beta == 0:
        cross = (1 - alpha) * neighbor_pairs.weighted_sum(w, s)
    else:
        q = torch.exp(s - stats[0, :, None])
        q_mix = (1 - beta) * q + beta / m_valid
        cross = (1 - alpha) * neighbor_pairs.weighted_sum(w, torch.log(q_mix))
        stats[1] += (1 - alpha) * neighbor_pairs.weighted_sum(w, q / q_mix)
    correction = -cross
    if op.kl:
        correction = correction + neighbor_pairs.entropy_correction(idx, w, alpha, int(m_valid))
    return correction


def _neighbor_backward(op: OpArgs, tensors, sizes, stats, g, beta, pairs):
    """Gradient of the pairs' share: dL/ds on each pair is -g (1 - alpha) w (beta = 0), or
    -g (1 - beta)(1 - alpha) w q / q~ (beta > 0), chained in O(N k d)."""
    idx, w = pairs
    alpha, m_valid = sizes["alpha"], sizes["m_valid"]
    s, aux = neighbor_pairs.pair_logits(op.kernel, tensors["X"], tensors["Y"], idx, tensors["PRM"])
    grad = -g[:, None] * (1 - alpha) * w
    if beta > 0:
        q = torch.exp(s - stats[0, :, None])
        grad = grad * (1 - beta) * q / ((1 - beta) * q + beta / m_valid)
    shift = torch.where(stats[0] == float("-inf"), 0.0, stats[0])
    return neighbor_pairs.chain(op.kernel, torch.where(w != 0, grad, 0.0), tensors["X"], tensors["Y"],
                                idx, s, aux, tensors["PRM"], shift)


def _backward(grad_rows, op: OpArgs, saved: BackwardArgs):
    """dparam is always computed (saved.need_param_grad is not read)."""
    x, y = op.x.contiguous(), op.y.contiguous()
    stats = saved.stats.float().contiguous()
    target, pairs = _backward_target(op, x, y, stats)
    tensors, sizes, flags = _kernel_arguments(op, x, y, target)
    n, m, d, dz, beta = sizes["N"], sizes["M"], sizes["D"], sizes["DZ"], float(op.beta)
    target_grad = bool(saved.need_target_grad) and op.target == "affinity"
    dev = x.device
    g = torch.where(saved.valid, grad_rows.float(), 0.0).contiguous()
    dx = torch.empty(n, d, dtype=torch.float32, device=dev)
    dy = torch.empty(m, d, dtype=torch.float32, device=dev)
    dprm = torch.empty(n, dtype=torch.float32, device=dev)
    dz_rows = torch.empty(n, dz, dtype=torch.float32, device=dev) if target_grad else tensors["XSQ"]
    dz_cols = torch.empty(m, dz, dtype=torch.float32, device=dev) if target_grad else tensors["XSQ"]
    dtprm = torch.empty(n, dtype=torch.float32, device=dev) if target_grad else tensors["XSQ"]
    # the structure (an Affinity target's torch.equal, a host sync, once) where it decides something: the
    # triangular backward (x and y one autograd input), or row 3 computed again for the target's gradient where
    # the forward may have been triangular and left its record there. That forward chose by op.x is
    # op.y (_one_input), not by y_is_x, which a direct call of the backward op may set otherwise;
    # a record from another tile is no record to _triangular_record, so row 3 is computed again
    # after a plain forward of the same structure too.
    row_3_again = target_grad and _record_row(op) == TRIANGULAR_RECORD_ROW and _one_input(op)
    structure = ((saved.y_is_x and not target_grad) or row_3_again) and _self_mode_structure(op)
    if row_3_again and structure:
        stats = _target_statistics(op, tensors, sizes, flags, stats)
    self_mode = saved.y_is_x and structure
    triangular = _triangular_flags(op, flags)
    common = dict(**tensors, STATS=stats, GRAD=g, **sizes, beta=beta, HAS_BETA=beta > 0,
                  TARGET_GRAD=target_grad, DIVERGENCE=op.divergence, **flags,
                  STATS2=stats, GRAD2=g, m_valid2=1.0, BIDIR=False)     # (one direction: no reverse)
    d_chunks = triton.cdiv(d, flags["BLOCK_D"])
    if _symmetric(op, self_mode, target_grad, stats, tensors, triangular):
        # self mode: each block pair once, and the triangular kernel makes the whole dL/dx (x and
        # y are one autograd input: dy is zeros); a Neighbors target's p in the tiles, as its forward's
        if pairs is not None:
            tensors.update(_neighbor_lists(op, pairs))
            pairs = None
        dx, dprm = triangular_launches.backward(op.target, tensors, sizes, triangular,
                                                _triangular_shape(tensors, triangular), beta, stats, g)
        dy.zero_()
    else:
        _rows_kernel[_rows_grid(n, d_chunks)](DX=dx, DPRM=dprm, DZ_ROWS=dz_rows, DTPRM=dtprm, reverse_param=0.0,
                                              **common)
        _cols_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), d_chunks)](DY=dy, DZ_COLS=dz_cols,
                                                                                **common)
    if pairs is not None:
        pair_dx, pair_dy, pair_dprm = _neighbor_backward(op, tensors, sizes, stats, g, beta, pairs)
        dx += pair_dx
        dy += pair_dy
        dprm += pair_dprm
    grads = [dx.to(op.x.dtype), dy.to(op.y.dtype), _reduce_param(dprm, op.param)]
    if target_grad:
        grads += [dz_rows.to(op.z.dtype), dz_cols.to(op.z_cols.dtype), _reduce_param(dtprm, op.t_param)]
    else:
        grads += [op.x.new_empty(0) for _ in range(3)]
    return tuple(grads)


def symmetric_schedule_enabled() -> bool:
    """ICON_KERNELS_SYMMETRIC, read as the C++ kernels and the package read it: unset, "" or "1"
    on, "0" off, anything else an error."""
    value = os.environ.get("ICON_KERNELS_SYMMETRIC", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"ICON_KERNELS_SYMMETRIC must be 0 or 1, got {value!r}")
    return value != "0"


def _self_mode_structure(op: OpArgs) -> bool:
    """Whether the loss has the triangular schedule's structure, y being x: one kernel parameter (a
    per-row one breaks s_ij = s_ji; every kernel is symmetric when y is x, log_dot too), and

    - a Labels target with any column labels (symmetric_kernels.py: the row side's p_ij =
      [l_i = c_j] / K_i and the column side's p_ji = [l_j = c_i] / K_j, each from LAB and CLAB, the
      row and column labels, and the row's own positive count; no condition, no host sync),
    - a Dense target (p_ji = w_ji / W_j, the transposed tile of w, and row j's total) or a Neighbors
      target (row j's own entries in the tile; p formed in the tiles under every divergence there,
      kl and cross_entropy too: _forward and _backward hand the kernels the lists instead of kl's
      pairs), with no further condition (symmetric_kernels.py, side_target), or
    - an Affinity target (symmetric_affinity_kernels.py: SNE, t-SNE and the rest of the family) with
      z_cols z (the same tensor or equal values) and any target kernel (dot, gaussian, student_t,
      power, log_dot; cosine arrives as dot), whose parameter may be one value or one per row: the
      target's aux term (z_i.z_j, or the clamped squared distance) is symmetric, and each side of a
      tile takes the kernel's logit of it under its own row's parameter (tile_helpers.kernel_logits),

    any divergence, alpha and beta: kl and cross_entropy at beta = 0 (and, for an Affinity target,
    alpha = 0) in one pass over the triangle (the closed form); beta > 0, the f-divergences and an
    Affinity target's alpha > 0 in two (every row's LSE, and LSE^p, then the per-pair terms with each
    side's own: triangular_launches.py). _computed_divergence has already refused joint normalisation
    and symmetrised targets.

    Everything else runs the plain kernels: a per-row learned parameter, other columns z_cols. At
    most one torch.equal (a host sync; an Affinity target's z_cols only) per call, and the forward
    and the backward call this once each."""
    if op.param.numel() != 1:
        return False
    if op.target == "affinity":
        return op.z_cols is op.z or (op.z_cols.shape == op.z.shape and torch.equal(op.z_cols, op.z))
    return op.target in ("labels", "dense", "neighbors")


def _self_mode_triangular(op: OpArgs) -> bool:
    """Whether the forward runs the triangular schedule's structure: _self_mode_structure and the
    switch on."""
    return _self_mode_structure(op) and symmetric_schedule_enabled()


def _one_input(op: OpArgs) -> bool:
    """Whether the forward's x and y are one tensor: the same object, as the autograd layer's
    y_is_x decides (ops.py: inputs[0] is inputs[1]), so that a triangular forward is followed by
    the triangular backward. A y of the same data that is another tensor (x.detach(), a view) runs
    the plain forward, whose statistics the plain backward reads: the row statistics of a
    triangular forward take s_ji from the column side of a tile, which can differ from the plain
    backward's s_ij in the last bit (fp32 dots are not symmetric in their rounding), and at logits
    of 1e6 that moves q by percents."""
    return op.x is op.y


def _triangular_record(stats, tensors, flags, row: int) -> bool:
    """Whether the stats are a triangular forward's with the tile the backward launches: every entry
    of stats row ``row`` (_record_row) holds its BLOCK_M. After a plain forward that row holds 0 (a
    Labels, Dense or Neighbors target's TRIANGULAR_RECORD_ROW), 1 or a row's sum of p~ (AFFINITY_RECORD_ROW) or an
    Affinity target's H_i or Phi_i (its TRIANGULAR_RECORD_ROW at beta > 0 or under an f-divergence),
    which could equal a tile size in one row but not in all. One host sync, as reading one entry."""
    return stats.shape[1] > 0 and bool((stats[row] == _triangular_tile(tensors, flags)[0]).all())


def _symmetric(op: OpArgs, self_mode: bool, target_grad: bool, stats, tensors, flags) -> bool:
    """Whether the backward runs self mode's triangular schedule: self_mode (x and y one autograd
    input, y_is_x, and _self_mode_structure), no gradient of an Affinity target's z or parameter
    (target_grad: the plain backward makes it, reading the stats rows 0, 2 and 3 that the triangular
    forward writes as the plain one does, or row 3 again from _target_statistics), and a triangular
    forward with the same tile before it (the record). The backward follows its forward, never the
    switch at backward time: each block pair's logits must be the very values (bitwise) that made
    the row statistics. The record is read last: only a problem with the structure has a triangular
    tile (and the read is a host sync)."""
    if not (self_mode and not target_grad):
        return False
    return _triangular_record(stats, tensors, flags, _record_row(op))


def _target_statistics(op: OpArgs, tensors, sizes, flags, stats):
    """A copy of the stats whose row 3 (H_i or Phi_i, which the plain backward reads for an Affinity
    target's gradient) is the plain forward's, for a self-mode backward that makes that gradient at
    beta > 0 or under an f-divergence: a triangular forward wrote its record there (_record_row). The
    plain second pass again (icon_mixture_kernel: from the forward's LSE and LSE^p, rows 0 and 2; it
    writes rows 1 and 3 and a loss that is dropped), one more sweep of the tiles of S and T than the
    plain schedule, paid only where the target needs a gradient; after a plain forward too, whose
    rows it writes again: a record of another tile than the backward's reads as no record
    (_triangular_record), so the record cannot say that row 3 is H_i or Phi_i."""
    stats = stats.clone()
    n = sizes["N"]
    _mixture_kernel[_rows_grid(n)](**tensors, LOSS=torch.empty(n, dtype=torch.float32, device=stats.device),
                                   STATS=stats, **sizes, beta=float(op.beta), HAS_BETA=float(op.beta) > 0,
                                   DIVERGENCE=op.divergence, **flags)
    return stats


# --- self mode's triangular schedule (symmetric_kernels.py for Labels targets, symmetric_affinity_kernels.py
# for Affinity targets; DESIGN.md §1.3; launched by triangular_launches.py) -------------------------------
# The kernels run with one tile shape, triangular_launch's (the interpreter's under TRITON_INTERPRET),
# not autotuned: the forward's partial buffers are laid out by BLOCK_M.


def triangular_shape(args, stage: str) -> tuple:
    """The triangular kernels' launch: fixed_shape's tile with twice its warps. They hold more
    than the plain kernels (the backward dX_I over its tiles and H^T X_I per tile, the forward
    both sides' statistics): in the sm_90 cubins 8 warps spill about half of what 4 do (the
    benchmark's InfoNCE, tests/test_triton_resources.py: the fp32 backward at 64 x 32 about 0.5-0.8
    KB per thread instead of 1 KB, bf16 at 64 x 64 under 0.1 KB instead of 0.25, the forward none
    instead of 136-176 B; the fp32 Student-t backward 1.2 KB instead of 2.1)."""
    bm, bn, warps, stages = fixed_shape(args, stage)
    return bm, bn, 2 * warps, stages


def triangular_launch(args, stage: str) -> tuple:
    """(BLOCK_M, BLOCK_N, warps, stages) of a triangular kernel's launch at ``stage``: the
    backward's (the stage that holds more) in both stages, so that the forward's block pairs are the
    backward's and every pair's logits come from the same tile, computed by the same dot layout
    (warps and stages included: the backward must see the forward's logits bit for bit, which at
    logits of 1e5 matters), whatever ``stage`` (tests/triton_aot_compile.py compiles these)."""
    del stage   # one launch for both stages (see above)
    return triangular_shape(args, "backward")


def _affinity_launch(flags) -> bool:
    return flags["TARGET"] == TARGET_CODES["affinity"]


def triangular_fits(args) -> bool:
    """Whether the triangular backward's launch (the stage that holds more) is estimated to fit in
    shared memory: estimated_shared_bytes, an upper bound of the sm_90 cubins'. Where it does not,
    the forward runs the plain kernels, whose smallest tile with 4 warps still fits: an fp32
    Affinity target at d = dz = 256 (the triangular backward's cubin at 32 x 32 needs 263 KB,
    tests/triton_aot_compile.py). A Labels or Neighbors target always fits (d is chunked past 256); a
    Dense one stages its tiles of w too (about 192 KB at 32 x 32, fp32, d = 256: it fits)."""
    shape = triangular_launch(args, "backward")
    return estimated_shared_bytes(_config(shape), args, "backward") <= SHARED_LIMIT


def _triangular_launch_args(tensors, flags) -> dict:
    """What triangular_launch and triangular_fits read of a launch. An Affinity target's kernels
    stage z's tiles too: TARGET, Z, UPCAST_Z and BLOCK_DZ go into the shared-memory estimate, and its
    tile is never the wide bf16 one (default_shape); nor is a Labels f-divergence's (DIVERGENCE, from
    _triangular_flags: its second pass and backward hold the per-pair terms of both sides of a tile;
    flags without it are a closed-form launch's, default_shape's default)."""
    args = dict(X=tensors["X"], UPCAST=flags["UPCAST"], BLOCK_D=flags["BLOCK_D"])
    if "DIVERGENCE" in flags:
        args["DIVERGENCE"] = flags["DIVERGENCE"]
    if _affinity_launch(flags):
        args.update(TARGET=flags["TARGET"], Z=tensors["Z"], UPCAST_Z=flags["UPCAST_Z"], BLOCK_DZ=flags["BLOCK_DZ"])
    elif flags["TARGET"] == TARGET_CODES["dense"]:    # its tile of w is staged (the estimate counts one)
        args.update(TARGET=flags["TARGET"], DENSE=tensors["DENSE"])
    # (else a Labels or Neighbors launch: estimated_shared_bytes' default target; a Neighbors target's
    # lists are read per column, k entries of BLOCK_N each, no tile staged)
    return args


def _triangular_flags(op: OpArgs, flags: dict) -> dict:
    """_kernel_arguments' flags with the divergence's pair code (_pair_code), for the triangular
    launches: their kernels compile for it, and a Labels launch's tile depends on it
    (_triangular_launch_args; the plain kernels take DIVERGENCE as an argument of their own, and not
    all of them, so flags lacks it)."""
    return dict(flags, DIVERGENCE=_pair_code(op.divergence))


def _triangular_fits(tensors, flags) -> bool:
    """triangular_fits of this launch (always under the interpreter, which has no shared memory)."""
    return INTERPRET or triangular_fits(_triangular_launch_args(tensors, flags))


def _triangular_shape(tensors, flags) -> tuple:
    """triangular_launch of this launch, one for both stages (the interpreter's shape under
    TRITON_INTERPRET)."""
    if INTERPRET:
        return INTERPRETER_SHAPE
    return triangular_launch(_triangular_launch_args(tensors, flags), "backward")


def _triangular_tile(tensors, flags) -> tuple:
    """(BLOCK_M, BLOCK_N) of both triangular stages (triangular_launch)."""
    bm, bn, _, _ = _triangular_shape(tensors, flags)
    return bm, bn


def _pair_code(divergence: int) -> int:
    """The DIVERGENCE of the triangular kernels' per-pair terms and gradients: kl and cross_entropy
    have the same ones (they differ only in the row loss's entropy term, and an Affinity target's
    H_i, which the merge and forward kernels take from KL), so both launch code 0: one compile
    variant, not two."""
    return DIVERGENCE_CODES["kl"] if divergence in CLOSED_FORM_CODES else divergence


def _reduce_param(per_row, param):
    """Per-row parameter grads summed for a scalar parameter."""
    return (per_row if param.dim() == 1 else per_row.sum()).to(param.dtype)


# --- both directions of 1/2 [L(x->y) + L(y->x)] (icon_kernels/backends/bidirectional_ops.py) ---------
# The arguments of the bidirectional ops' schemas: x, y, param, kernel, row_labels, col_labels,
# alpha, exclude_self, divergence (a Labels target, beta = 0, kl or cross_entropy).

def _direction(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence) -> OpArgs:
    return OpArgs(x, y, param, kernel, "labels", row_labels, col_labels, None, None, None, None, None, "dot",
                  None, alpha, 0.0, exclude_self, divergence, "conditional", False)


def bidirectional_forward(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence):
    """(rows, included, stats) of x's rows over y, then of y's rows over x: the forward kernel once
    per direction (each stats keeps its rows' positive counts in NORM_ROW for the backward)."""
    forward_x = forward(*_direction(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence))
    forward_y = forward(*_direction(y, x, param, kernel, col_labels, row_labels, alpha, exclude_self, divergence))
    return (*forward_x, *forward_y)


def bidirectional_backward(grad_x_rows, grad_y_rows, x, y, param, kernel, row_labels, col_labels, alpha,
                           exclude_self, divergence, valid_x, stats_x, valid_y, stats_y, need_param_grad,
                           need_x_grad, need_y_grad):
    """(dx, dy, dparam) of both directions from one pair of backward kernels (BIDIR): each tile's
    gradient is the x -> y direction's plus the transposed y -> x direction's. The column kernel
    (dY) is skipped when y needs no gradient (dy zeros); the row kernel makes dparam too."""
    op = _direction(x, y, param, kernel, row_labels, col_labels, alpha, exclude_self, divergence)
    _computed_divergence(op)
    with _on_device(op.x):
        x, y = op.x.contiguous(), op.y.contiguous()
        stats = stats_x.float().contiguous()
        stats2 = _aligned(stats_y.float())
        target, _ = _backward_target(op, x, y, stats)
        tensors, sizes, flags = _kernel_arguments(op, x, y, target)
        n, m, d = sizes["N"], sizes["M"], sizes["D"]
        g = torch.where(valid_x, grad_x_rows.float(), 0.0).contiguous()
        g2 = torch.where(valid_y, grad_y_rows.float(), 0.0).contiguous()
        dx = torch.empty(n, d, dtype=torch.float32, device=x.device)
        dy = (torch.empty if need_y_grad else torch.zeros)(m, d, dtype=torch.float32, device=x.device)
        dprm = torch.empty(n, dtype=torch.float32, device=x.device)
        dummy = tensors["XSQ"]
        common = dict(**tensors, STATS=stats, GRAD=g, STATS2=stats2, GRAD2=g2, **sizes,
                      m_valid2=float(max(n - int(op.exclude_self), 1)), beta=0.0, HAS_BETA=False,
                      TARGET_GRAD=False, DIVERGENCE=op.divergence, BIDIR=True, **flags)
        d_chunks = triton.cdiv(d, flags["BLOCK_D"])
        _rows_kernel[_rows_grid(n, d_chunks)](DX=dx, DPRM=dprm, DZ_ROWS=dummy, DTPRM=dummy, reverse_param=1.0,
                                              **common)
        if need_y_grad:
            _cols_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_N"]), d_chunks)](DY=dy, DZ_COLS=dummy, **common)
        return dx.to(op.x.dtype), dy.to(op.y.dtype), dprm.sum().reshape(op.param.shape).to(op.param.dtype)
