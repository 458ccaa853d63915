"""The public C++ ops (torch.ops.icon_kernels.*) check every size they index with (DESIGN.md §2,
"Ops are public"): a wrong size, a missing optional tensor the target needs, or a neighbour index
out of range is a RuntimeError whose message starts with the argument's name, never an
out-of-bounds access or a null dereference.

The ops are called directly, past the Python validation. The CPU ops run here; the CUDA ops share
the same check helper (csrc/op_checks.h), and their tests skip without a GPU.
"""
import pytest
import torch

import icon_kernels as ik

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="C++ extension not built")

N, M, D, DZ, K = 5, 7, 3, 4, 3

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and "cuda" in ik.available_backends() else [])


def _valid(target, device="cpu"):
    """Flat forward arguments (ops.py schema) of a small valid problem with ``target``."""
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    args = dict(x=t(N, D), y=t(M, D), param=torch.tensor(0.5, dtype=torch.float64), kernel="gaussian",
                target=target, row_labels=None, col_labels=None, nbr_index=None, nbr_weight=None, z=None,
                z_cols=None, t_param=None, t_kernel="dot", dense_p=None, alpha=0.1, beta=0.2,
                exclude_self=False, divergence=0, normalization="conditional", symmetrize=False)
    if target == "labels":
        args.update(row_labels=torch.randint(0, 3, (N,), generator=g), col_labels=torch.randint(0, 3, (M,), generator=g))
    elif target == "neighbors":
        args.update(nbr_index=torch.randint(-1, M, (N, K), generator=g), nbr_weight=torch.rand(N, K, generator=g, dtype=torch.float64))
    elif target == "affinity":
        args.update(z=t(N, DZ), z_cols=t(M, DZ), t_param=torch.tensor(1.3, dtype=torch.float64), t_kernel="gaussian")
    else:
        args.update(dense_p=torch.rand(N, M, generator=g, dtype=torch.float64))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# (name, target, argument changed, its bad value as a function of the valid arguments)
FORWARD_CASES = [
    ("x-1d", "labels", "x", lambda a: a["x"][:, 0]),
    ("y-1d", "labels", "y", lambda a: a["y"][:, 0]),
    ("y-wrong-d", "labels", "y", lambda a: a["y"][:, :2]),
    ("param-numel", "labels", "param", lambda a: torch.full((2,), 0.5, dtype=a["x"].dtype, device=a["x"].device)),
    ("param-numel-n+1", "dense", "param", lambda a: torch.full((N + 1,), 0.5, dtype=a["x"].dtype, device=a["x"].device)),
    ("row-labels-missing", "labels", "row_labels", lambda a: None),
    ("row-labels-short", "labels", "row_labels", lambda a: a["row_labels"][:-1]),
    ("col-labels-missing", "labels", "col_labels", lambda a: None),
    ("col-labels-short", "labels", "col_labels", lambda a: a["col_labels"][:-2]),
    ("col-labels-2d", "labels", "col_labels", lambda a: a["col_labels"][:, None]),
    ("nbr-index-missing", "neighbors", "nbr_index", lambda a: None),
    ("nbr-index-1d", "neighbors", "nbr_index", lambda a: a["nbr_index"][:, 0]),
    ("nbr-index-few-rows", "neighbors", "nbr_index", lambda a: a["nbr_index"][:-1]),
    ("nbr-index-too-large", "neighbors", "nbr_index", lambda a: a["nbr_index"].index_fill(1, torch.tensor([1], device=a["x"].device), M)),
    ("nbr-index-below-minus-one", "neighbors", "nbr_index", lambda a: a["nbr_index"].index_fill(1, torch.tensor([0], device=a["x"].device), -2)),
    ("nbr-weight-shape", "neighbors", "nbr_weight", lambda a: a["nbr_weight"][:, :-1]),
    ("z-missing", "affinity", "z", lambda a: None),
    ("z-few-rows", "affinity", "z", lambda a: a["z"][:-1]),
    ("z-1d", "affinity", "z", lambda a: a["z"][:, 0]),
    ("z-cols-missing", "affinity", "z_cols", lambda a: None),
    ("z-cols-few-rows", "affinity", "z_cols", lambda a: a["z_cols"][:-1]),
    ("z-cols-wrong-dz", "affinity", "z_cols", lambda a: a["z_cols"][:, :-1]),
    ("t-param-missing", "affinity", "t_param", lambda a: None),
    ("t-param-numel", "affinity", "t_param", lambda a: torch.ones(3, dtype=a["x"].dtype, device=a["x"].device)),
    ("dense-missing", "dense", "dense_p", lambda a: None),
    ("dense-few-cols", "dense", "dense_p", lambda a: a["dense_p"][:, :-1]),
    ("dense-few-rows", "dense", "dense_p", lambda a: a["dense_p"][:-1]),
    ("normalization-unknown", "labels", "normalization", lambda a: "global"),
    # the columns of a symmetrised target are its rows: an Affinity target on a square problem
    ("symmetrize-labels", "labels", "symmetrize", lambda a: True),
    ("symmetrize-rectangular", "affinity", "symmetrize", lambda a: True),
]


def _call_forward(device, args):
    return getattr(torch.ops.icon_kernels, f"{device}_forward")(*args.values())


def _call_backward(device, args, grad_rows=None, valid=None, stats=None, need_target_grad=True):
    ok = dict(args)
    _, inc, st = _call_forward(device, ok) if None in (valid, stats) else (None, None, None)
    grad_rows = torch.linspace(0.5, 1.5, N, dtype=torch.float64, device=device) if grad_rows is None else grad_rows
    return getattr(torch.ops.icon_kernels, f"{device}_backward")(
        grad_rows, *args.values(), inc if valid is None else valid, st if stats is None else stats, need_target_grad,
        True, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", ["labels", "neighbors", "affinity", "dense"])
def test_valid_arguments_pass(device, target):
    args = _valid(target, device)
    loss, included, stats = _call_forward(device, args)
    assert loss.shape == (N,) and stats.shape == (4, N)
    grads = _call_backward(device, args)
    assert grads[0].shape == (N, D) and grads[1].shape == (M, D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,target,arg,bad", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_and_backward_name_the_wrong_argument(device, name, target, arg, bad):
    ok = _valid(target, device)
    _, valid, stats = _call_forward(device, ok)
    args = dict(ok)
    args[arg] = bad(ok)
    with pytest.raises(RuntimeError, match=rf"^{arg} "):
        _call_forward(device, args)
    with pytest.raises(RuntimeError, match=rf"^{arg} "):
        _call_backward(device, args, valid=valid, stats=stats)


@pytest.mark.parametrize("device", DEVICES)
def test_exclude_self_needs_a_column_per_row(device):
    """Row i's self pair is column i: with fewer columns than rows the CPU rows wrote past the tile."""
    args = _valid("labels", device)
    args.update(y=args["y"][:N - 1], col_labels=args["col_labels"][:N - 1], exclude_self=True)
    with pytest.raises(RuntimeError, match=r"^exclude_self "):
        _call_forward(device, args)
    args.update(exclude_self=False)
    _call_forward(device, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arg,make", [
    ("grad_rows", lambda v, s: torch.ones(N - 1, dtype=torch.float64, device=v.device)),
    ("valid", lambda v, s: v[:-1]),
    ("valid", lambda v, s: v.double()),
    ("stats", lambda v, s: s[:3]),
    ("stats", lambda v, s: s[:, :-1]),
], ids=["grad-rows-short", "valid-short", "valid-not-bool", "stats-three-rows", "stats-short"])
def test_backward_checks_its_own_inputs(device, arg, make):
    args = _valid("affinity", device)
    _, valid, stats = _call_forward(device, args)
    bad = make(valid, stats)
    kw = {"grad_rows": None, "valid": valid, "stats": stats}
    kw[arg] = bad
    with pytest.raises(RuntimeError, match=rf"^{arg} "):
        _call_backward(device, args, **kw)


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in ik.available_backends(), reason="needs a GPU")
def test_cuda_ops_want_every_tensor_on_the_device_of_x():
    args = _valid("labels", "cuda")
    args["col_labels"] = args["col_labels"].cpu()
    with pytest.raises(RuntimeError, match=r"^col_labels "):
        _call_forward("cuda", args)


# ---- ring mode's label block ops (csrc/cpu_label_blocks.cpp) ----

def _block_args():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)
    return dict(x=x, y=y, param=torch.tensor(0.7), kernel="dot", row_labels=torch.randint(0, 3, (N,), generator=g),
                col_labels=torch.randint(0, 3, (M,), generator=g), exclude_self=True, diagonal=2,
                tile_elements=8)


def _block_backward_args():
    a = _block_args()
    st = torch.ops.icon_kernels.cpu_label_block_stats(*a.values())
    return dict(grad_rows=torch.rand(N), x=a["x"], y=a["y"], param=a["param"], kernel="dot",
                row_labels=a["row_labels"], col_labels=a["col_labels"], alpha=0.1, exclude_self=True,
                diagonal=2, m_valid=M + 3, lse=st[0], count=st[1], tile_elements=8,
                dx=torch.zeros(N, D), dy=torch.zeros(M, D), dparam=torch.zeros(N))


SHARED_BLOCK_CASES = [
    ("x-1d", "x", lambda a: a["x"][:, 0]),
    ("y-wrong-d", "y", lambda a: a["y"][:, :-1]),
    ("param-numel", "param", lambda a: torch.full((2,), 0.7)),
    ("row-labels-short", "row_labels", lambda a: a["row_labels"][:-1]),
    ("col-labels-short", "col_labels", lambda a: a["col_labels"][:2]),   # ASan: heap-buffer-overflow before
    ("col-labels-long", "col_labels", lambda a: torch.zeros(M + 1, dtype=torch.long)),
    ("tile-elements", "tile_elements", lambda a: 0),
]
BACKWARD_BLOCK_CASES = SHARED_BLOCK_CASES + [
    ("grad-rows-short", "grad_rows", lambda a: a["grad_rows"][:-1]),
    ("lse-short", "lse", lambda a: a["lse"][:-1]),
    ("count-short", "count", lambda a: a["count"][:-1]),
    ("dx-shape", "dx", lambda a: torch.zeros(N - 1, D)),
    ("dy-shape", "dy", lambda a: torch.zeros(M, D + 1)),
    ("dparam-shape", "dparam", lambda a: torch.zeros(1)),
    ("dx-dtype", "dx", lambda a: torch.zeros(N, D, dtype=torch.float64)),
    ("m-valid-negative", "m_valid", lambda a: -1),
    ("m-valid-below-block", "m_valid", lambda a: M - 2),
]


@pytest.mark.parametrize("name,arg,bad", SHARED_BLOCK_CASES, ids=[c[0] for c in SHARED_BLOCK_CASES])
def test_label_block_stats_name_the_wrong_argument(name, arg, bad):
    args = _block_args()
    args[arg] = bad(args)
    with pytest.raises(RuntimeError, match=rf"^{arg} "):
        torch.ops.icon_kernels.cpu_label_block_stats(*args.values())


@pytest.mark.parametrize("name,arg,bad", BACKWARD_BLOCK_CASES, ids=[c[0] for c in BACKWARD_BLOCK_CASES])
def test_label_block_backward_name_the_wrong_argument(name, arg, bad):
    args = _block_backward_args()
    args[arg] = bad(args)
    with pytest.raises(RuntimeError, match=rf"^{arg} "):
        torch.ops.icon_kernels.cpu_label_block_backward(*args.values())


def test_label_block_ops_accept_valid_arguments():
    args = _block_backward_args()
    torch.ops.icon_kernels.cpu_label_block_backward(*args.values())
    assert torch.isfinite(args["dx"]).all() and args["dx"].abs().sum() > 0
