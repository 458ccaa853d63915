"""Ring mode's fused CPU label blocks (icon_kernels::cpu_label_block_stats / _backward, used by
label_blocks.py): opcheck on both ops, and the loss and gradients of a problem computed block by
block through them (partial statistics merged by column_blocks.merge) against the single-process
reference on the whole batch, in one process (the distributed tests run them across ranks)."""
import pytest
import torch

import icon_kernels as ik
from icon_kernels.backends import column_blocks as cb
from icon_kernels.backends import label_blocks

pytestmark = pytest.mark.skipif("cpu" not in ik.available_backends(), reason="C++ extension not built")

N_GLOBAL, D = 37, 5
ROWS = slice(9, 23)                     # this "rank's" rows, as global indices
BLOCKS = [(0, 4), (4, 15), (15, 16), (16, 37)]   # global column blocks [lo, hi)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _problem(dtype, kernel, gen):
    x = torch.randn(N_GLOBAL, D, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 4, (N_GLOBAL,), generator=gen)
    labels[ROWS.start] = 99                              # a row without positives
    return x, labels


def _row_side(x, labels, kernel, param, alpha, kl):
    rows = x[ROWS]
    return cb.RowSide(x=rows, param=torch.tensor(param, dtype=x.dtype), kernel=kernel, target="labels",
                      row_offset=ROWS.start, m_total=N_GLOBAL, exclude_self=True, alpha=alpha, beta=0.0, kl=kl,
                      row_labels=labels[ROWS], tile_elements=16, fused=True)


def _blocks(x, labels):
    return [cb.Block(x[lo:hi], lo, labels[lo:hi]) for lo, hi in BLOCKS]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel,param", [("dot", 0.3), ("gaussian", 1.4)])
@pytest.mark.parametrize("alpha,kl", [(0.0, True), (0.2, True), (0.1, False)])
def test_blockwise_loss_and_gradients_match_reference(dtype, kernel, param, alpha, kl):
    gen = torch.Generator().manual_seed(3)
    x, labels = _problem(dtype, kernel, gen)
    rs = _row_side(x, labels, kernel, param, alpha, kl)
    stats = None
    for block in _blocks(x, labels):
        stats = cb.merge(stats, label_blocks.partials(rs, block))
    rows, included = label_blocks.finish_rows(rs, stats)
    g = torch.rand(rows.shape, generator=gen, dtype=torch.float64).to(dtype) + 0.5   # upstream != 1
    g = torch.where(included, g, 0.0)
    row_grads = [torch.zeros_like(rs.x), torch.zeros(rs.x.shape[0], dtype=dtype)]
    dy = torch.zeros_like(x)
    for block, (lo, hi) in zip(_blocks(x, labels), BLOCKS):
        label_blocks.gradient_block(rs, block, stats, g, row_grads, [dy[lo:hi]])

    xr = x.double().clone().requires_grad_()
    temperature = torch.tensor(param, dtype=torch.float64, requires_grad=True)
    scale = dict(temperature=temperature) if kernel == "dot" else dict(sigma=temperature)
    want = ik.icon_loss(xr, target=ik.Labels(labels), kernel=kernel, alpha=alpha, reduction="none",
                        divergence="kl" if kl else "cross_entropy", backend="reference", **scale)[ROWS]
    assert not included[0] and bool(included[1:].all())       # row 0 has no positive
    assert _rel(rows.double(), want.detach()) < TOL[dtype]
    dx_want, dparam_want = torch.autograd.grad((want * g.double()).sum(), (xr, temperature))
    got = dy.double()
    got[ROWS] += row_grads[0].double()
    assert _rel(got, dx_want) < TOL[dtype]
    assert abs(row_grads[1].double().sum() - dparam_want).item() < TOL[dtype] * max(1.0, abs(dparam_want.item()))


def test_stats_of_a_block_match_the_torch_tile_math():
    gen = torch.Generator().manual_seed(5)
    x, labels = _problem(torch.float64, "dot", gen)
    rs = _row_side(x, labels, "dot", 0.5, 0.0, True)
    for block in _blocks(x, labels):
        fused = label_blocks.partials(rs, block)
        plain = cb.normaliser_partials(rs, block)
        assert torch.allclose(fused["lse"], plain["lse"], rtol=1e-12, atol=0)
        assert torch.equal(fused["mass"], plain["mass"])


def _op_args(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, generator=gen, dtype=dtype)
    y = torch.randn(5, 4, generator=gen, dtype=dtype)
    rows, cols = torch.randint(0, 3, (6,), generator=gen), torch.randint(0, 3, (5,), generator=gen)
    return x, y, torch.tensor(0.7, dtype=dtype), rows, cols


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_opcheck_label_block_stats(dtype, kernel):
    x, y, param, rows, cols = _op_args(dtype)
    torch.library.opcheck(torch.ops.icon_kernels.cpu_label_block_stats.default,
                          (x, y, param, kernel, rows, cols, True, 2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["dot", "gaussian"])
def test_opcheck_label_block_backward(dtype, kernel):
    x, y, param, rows, cols = _op_args(dtype)
    lse = torch.randn(6, dtype=dtype)
    count = torch.tensor([1, 2, 0, 1, 3, 1], dtype=dtype)
    g = torch.rand(6, dtype=dtype)
    dx, dy, dparam = torch.zeros_like(x), torch.zeros_like(y), torch.zeros(6, dtype=dtype)
    torch.library.opcheck(torch.ops.icon_kernels.cpu_label_block_backward.default,
                          (g, x, y, param, kernel, rows, cols, 0.1, True, -1, 9, lse, count, 8, dx, dy, dparam))
