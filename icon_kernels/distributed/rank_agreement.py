"""What every rank checks before the distributed loss moves any data (DESIGN.md §2 "Distributed").

Each rank first checks what it can alone (the shapes, types and devices of what will travel,
the options' values); then one all-gather shares every rank's verdict, its shard sizes and a
fixed-length code of every loss option. It is the first collective of both modes, so even a
dist_mode that differs is reported, on every rank, by a ValueError that names each option that
differs and the ranks holding each value: never an abort (collectives of different sizes), a
hang (different collectives) or a silent wrong answer (different math per rank). ``agree`` is
the entry point; the option list is read from ``ik.icon_loss``'s signature and ``ik.Affinity``'s
fields, so an option added there is checked here without an edit.
"""
from __future__ import annotations

import dataclasses
import math
import struct
import zlib

import torch
import torch.distributed as dist

from ..backends.registry import ALL_BACKENDS, resolve_backend
from .. import validation
from ..target_adapters import adapter_for, check_symmetrize
from ..targets import TARGET_TYPES, Affinity
from ..validation import KERNEL_PARAM, LOSS_OPTIONS

DIST_MODES = ("gather", "ring")


def _ranks(ranks) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def invalid_on(ranks) -> ValueError:
    """The error every other rank raises when ``ranks`` raised their own reason."""
    return ValueError(f"the inputs of {_ranks(ranks)} of the process group are invalid (that rank raised "
                      "the reason); every rank stops")


_NONE, _BOOL, _INT, _FLOAT, _STR, _TENSOR, _GRADS, _OTHER = range(8)
_HEADER = ("failed", "rows", "cols", "dense_cols")      # per-rank facts, not compared
# the kernel-parameter keywords of ik.Affinity (temperature, sigma, dof, exponent), from the table
_AFFINITY_PARAMS = tuple(dict.fromkeys(name for name in KERNEL_PARAM.values() if name))


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _encode(value) -> tuple:
    """(kind, payload) of one option value, equal on two ranks exactly when the values are."""
    if value is None:
        return _NONE, 0
    if isinstance(value, bool):
        return _BOOL, int(value)
    if isinstance(value, torch.Tensor):        # a tensor parameter: its kind, not its values
        return _TENSOR, value.dim()
    if isinstance(value, int):
        return _INT, max(-(1 << 62), min(1 << 62, value))
    if isinstance(value, float):
        value = 0.0 if value == 0 else (math.nan if math.isnan(value) else value)
        return _FLOAT, struct.unpack("<q", struct.pack("<d", value))[0]
    if isinstance(value, (str, torch.dtype)):
        return _STR, _crc(str(value))
    return _OTHER, _crc(type(value).__name__)


def _number(value):
    """Loss options compare as numbers: 1 and 1.0 are the same temperature."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _known_strings(local_values) -> dict:
    """crc -> string for every string an option may hold (choices named in validation, dtypes,
    backends) and this rank's own values, so a message can name other ranks' values."""
    words = {"given", "None", "auto", *DIST_MODES, *ALL_BACKENDS, *(t.__name__ for t in TARGET_TYPES)}
    for value in vars(validation).values():
        if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            words.update(value)
    words.update(str(getattr(torch, n)) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))
    words.update(str(v) for v in local_values if isinstance(v, (str, torch.dtype)))
    return {_crc(w): w for w in words}


def _describe(kind: int, payload: int, strings: dict) -> str:
    if kind == _NONE:
        return "None"
    if kind in (_BOOL, _INT):
        return str(bool(payload) if kind == _BOOL else payload)
    if kind == _FLOAT:
        return repr(struct.unpack("<d", struct.pack("<q", payload))[0])
    if kind == _STR:
        return repr(strings[payload]) if payload in strings else "another value"
    if kind == _TENSOR:
        return {0: "a 0-d tensor", 1: "a per-row tensor"}.get(payload, f"a {payload}-d tensor")
    if kind == _GRADS:
        return " + ".join(n for k, n in enumerate(_GRAD_NAMES) if payload >> k & 1) or "none"
    return "an object of another type"


def _loss_options(kwargs) -> dict:
    defaults = LOSS_OPTIONS
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    return {**defaults, **kwargs}


_GRAD_NAMES = ("x", "y", "the kernel parameter", "target.z", "target.z_cols", "the target's kernel parameter",
               "target.p", "target.weights")


def _grad_mask(x, y, target, param) -> int:
    """Which inputs require grad (each one's gradient runs collectives in backward)."""
    if not torch.is_grad_enabled():
        return 0
    parts = adapter_for(target).grad_tensors(target)
    tensors = (x, y, param, *(parts.get(k) for k in ("z", "z_cols", "t_param", "p", "weights")))
    return sum(1 << k for k, t in enumerate(tensors) if isinstance(t, torch.Tensor) and t.requires_grad)


def _agreed_fields(x, y, target, dist_mode, exclude_self, reduction, weight, backend_name, ring_block_rows,
                   options) -> list:
    """(name, value, parent) of everything that must be the same on every rank, in a fixed
    number of slots. A field whose meaning depends on an earlier one (its parent: the kernel's
    parameter on the kernel) is not reported when the parent differs already."""
    kernel = options.get("kernel")
    param_name = KERNEL_PARAM.get(kernel) if isinstance(kernel, str) else None
    kernel_params = set(v for v in KERNEL_PARAM.values() if v)
    fields = [
        ("dist_mode", dist_mode, None),
        ("the feature dimension d of x", x.shape[1], None),
        ("the dtype of x", x.dtype, None),
        ("the device type of x", x.device.type, None),
        ("target type", type(target).__name__, None),
        ("y (given or None)", "None" if y is None else "given", None),
        ("exclude_self", exclude_self, None),
        ("reduction", reduction, None),
        ("weight (given or None)", "None" if weight is None else "given", None),
        ("ring_block_rows", ring_block_rows, "dist_mode"),
        ("backend", backend_name, "dist_mode"),     # ring mode's collectives depend on it
        ("kernel", kernel, None),
        (param_name or "the kernel parameter", _number(options[param_name]) if param_name else None, "kernel"),
    ]
    # every other loss option (alpha, beta, divergence, normalization, ...); a kernel parameter
    # the kernel does not use may differ
    fields += [(name, _number(options[name]), None) for name in sorted(options)
               if name != "kernel" and name not in kernel_params]
    # an Affinity target: its kernel, that kernel's parameter, the features that are gathered,
    # and any other option of ik.Affinity (e.g. symmetrize); None for other target types
    affinity = isinstance(target, Affinity)
    t_kernel = target.kernel if affinity else None
    t_param = KERNEL_PARAM.get(t_kernel) if isinstance(t_kernel, str) else None
    z_cols = (target.z if target.z_cols is None else target.z_cols) if affinity else None
    fields += [
        ("target.kernel", t_kernel, "target type"),
        (f"target.{t_param}" if t_param else "the target's kernel parameter",
         _number(getattr(target, t_param)) if t_param else None, "target.kernel"),
        ("target.z feature dimension", target.z.shape[1] if affinity else None, "target type"),
        ("target.z dtype", target.z.dtype if affinity else None, "target type"),
        ("target.z_cols dtype", z_cols.dtype if affinity else None, "target type"),
    ]
    extra = [f.name for f in dataclasses.fields(Affinity)
             if f.name not in ("z", "z_cols", "kernel") and f.name not in _AFFINITY_PARAMS]
    fields += [(f"target.{name}", _number(getattr(target, name)) if affinity else None, "target type")
               for name in extra]
    return fields


def _local_checks(x, y, target, dist_mode, exclude_self, ring_block_rows, backend, kwargs):
    """What this rank can check alone, before anything travels. Returns (exclude_self resolved,
    the loss options with defaults, the resolved backend in ring mode or None); ValueError /
    TypeError when invalid."""
    if dist_mode not in DIST_MODES:
        raise ValueError(f"dist_mode must be one of {', '.join(DIST_MODES)}; got {dist_mode!r}")
    _check_inputs(x, y, target, dist_mode, ring_block_rows)
    options = _loss_options(kwargs)
    if exclude_self is None:
        exclude_self = y is None
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool or None, got {type(exclude_self).__name__}")
    n_cols = (x if y is None else y).shape[0]
    if exclude_self and n_cols != x.shape[0]:
        raise ValueError("exclude_self=True needs this rank's columns to be its rows")
    adapter_for(target).check_shard(target, x, y, n_cols)
    if getattr(target, "symmetrize", False) is not False:
        # the global problem is square when every rank's columns are its rows
        check_symmetrize(target, x.shape[0], n_cols)
        if any(isinstance(t, torch.Tensor) and t.requires_grad
               for t in adapter_for(target).grad_tensors(target).values()):
            raise ValueError("symmetrize=True: the gradient of the target's own tensors (z, parameters, "
                             "weights) is computed by the single-process reference only; detach them")
    backend_name = None
    if dist_mode == "ring":
        backend_name = resolve_backend(backend, x.device)
    return exclude_self, options, backend_name


def agree(group, device, x, y, target, dist_mode, exclude_self, reduction, weight, backend,
           ring_block_rows, kwargs):
    """The local checks and one all-gather of every rank's verdict, shard sizes and option codes;
    raises the same ValueError on every rank (or this rank's own error where it arose) when any
    rank is invalid, an option differs, a shard is empty or a Dense p has the wrong width.
    Returns (exclude_self, loss options, the column count of every rank)."""
    error, fields, header = None, None, [0, 0, 0, -1]
    try:
        exclude_self, options, backend_name = _local_checks(x, y, target, dist_mode, exclude_self,
                                                            ring_block_rows, backend, kwargs)
        param = options.get(KERNEL_PARAM.get(options["kernel"]) or "", None) \
            if isinstance(options["kernel"], str) else None
        fields = _agreed_fields(x, y, target, dist_mode, exclude_self, reduction, weight, backend_name,
                                ring_block_rows, options)
        fields.append(("which inputs require grad", _Grads(_grad_mask(x, y, target, param)), None))
        dense_cols = adapter_for(target).global_width(target)
        header = [0, x.shape[0], (x if y is None else y).shape[0], dense_cols]
    except Exception as exc:  # noqa: BLE001 - raised below, after every rank has heard of it
        error = exc
    n_fields = _field_count()
    codes = [(_GRADS, v.mask) if isinstance(v, _Grads) else _encode(v) for _, v, _ in fields] if fields else []
    if error is None and len(codes) != n_fields:     # a slot layout out of step with _field_count
        error = RuntimeError(f"icon_kernels: {len(codes)} agreement fields, expected {n_fields}")
    if error is not None:
        codes = [(0, 0)] * n_fields        # the same length on every rank, whatever happened here
    mine = torch.tensor([1 if error is not None else 0] + header[1:] + [c for kp in codes for c in kp],
                        dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu()
    failed = [r for r in range(table.shape[0]) if table[r, 0] != 0]
    if error is not None:
        raise error
    if failed:
        raise invalid_on(failed)
    _check_agreement(table, fields)
    _check_shapes(table, target)
    return exclude_self, options, [int(c) for c in table[:, 2]]


class _Grads:
    """A bit mask of the inputs that require grad (decoded by name in messages)."""

    def __init__(self, mask: int):
        self.mask = mask


def _field_count() -> int:
    """The number of agreed fields: the same on every rank (it depends on the code only)."""
    kernel_params = set(v for v in KERNEL_PARAM.values() if v)
    options = [n for n in LOSS_OPTIONS if n != "kernel" and n not in kernel_params]
    extra = [f.name for f in dataclasses.fields(Affinity)
             if f.name not in ("z", "z_cols", "kernel") and f.name not in _AFFINITY_PARAMS]
    return 13 + len(options) + 5 + len(extra) + 1


def _check_agreement(table: torch.Tensor, fields) -> None:
    codes = table[:, len(_HEADER):]
    if bool((codes == codes[0]).all()):
        return
    strings = _known_strings([v for _, v, _ in fields])
    differ, differing = [], set()
    for k, (name, _, parent) in enumerate(fields):
        kind, payload = table[:, len(_HEADER) + 2 * k], table[:, len(_HEADER) + 2 * k + 1]
        if bool((kind == kind[0]).all()) and bool((payload == payload[0]).all()):
            continue
        differing.add(name)
        if parent in differing:
            continue
        groups: dict = {}
        for r in range(table.shape[0]):
            groups.setdefault((int(kind[r]), int(payload[r])), []).append(r)
        values = "; ".join(f"{_describe(kd, pl, strings)} on {_ranks(rs)}" for (kd, pl), rs in groups.items())
        differ.append(f"{name} differs across ranks ({values})")
    if differ:
        raise ValueError(", and ".join(differ) + ". Every loss option must be the same on every rank; nothing "
                         "was computed")


def _check_shapes(table: torch.Tensor, target) -> None:
    """Per-rank facts that every rank can judge from the table: no empty shard, and a Dense p
    with one column per global column."""
    rows, cols, dense_cols = table[:, 1], table[:, 2], table[:, 3]
    empty = [r for r in range(table.shape[0]) if rows[r] == 0 or cols[r] == 0]
    if empty:
        raise ValueError(f"x: a rank's shard is empty ({_ranks(empty)}); every rank needs at least one row "
                         "(and column)")
    if adapter_for(target).global_width(target) >= 0:
        m = int(cols.sum())
        wrong = [r for r in range(table.shape[0]) if dense_cols[r] != m]
        if wrong:
            widths = ", ".join(f"{int(dense_cols[r])} on rank {r}" for r in wrong)
            raise ValueError(f"target.p must have one column per global column ({m}, the columns of all ranks "
                             f"in rank order); it has {widths}")


def _check_inputs(x, y, target, dist_mode, ring_block_rows) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a 2-D tensor of this rank's rows")
    adapter_for(target)                     # TypeError for anything but the four target types
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() != 2):
        raise ValueError("y must be None or a 2-D tensor of this rank's columns")
    if y is not None and (y.shape[1] != x.shape[1] or y.dtype != x.dtype or y.device != x.device):
        raise ValueError(f"y must have the feature dimension, dtype and device of x: y is {tuple(y.shape)} "
                         f"{y.dtype} on {y.device}, x is {tuple(x.shape)} {x.dtype} on {x.device}")
    if ring_block_rows is None:
        return
    if dist_mode != "ring":
        raise ValueError("ring_block_rows applies to dist_mode='ring' only")
    if isinstance(ring_block_rows, bool) or not isinstance(ring_block_rows, int) or ring_block_rows < 1:
        raise ValueError(f"ring_block_rows must be a positive int or None; got {ring_block_rows!r}")
