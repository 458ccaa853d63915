"""The blockwise pure-PyTorch backend: row chunks x all columns, never an N x M matrix.

Forward: per chunk of rows, the logits tile, the row LSE, the target tile and the row loss;
only O(N) row statistics are kept. Backward: the tiles are recomputed from the saved statistics
(FlashAttention-2 style) and chained to the inputs. Chunks hold about ``CHUNK_ELEMENTS`` tile
entries each (override with ICON_KERNELS_TORCH_CHUNK_ELEMENTS); a handful of such tiles is the
whole working memory. It runs on any device and accumulates in fp32 (fp64 for fp64 inputs).

The functions take the flat arguments of the op schema in ``ops.py``.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from ..families import DIVERGENCES, F_DIVERGENCE_CODES, divergence_by_code
from . import f_divergences, tile_math

CHUNK_ELEMENTS = int(os.environ.get("ICON_KERNELS_TORCH_CHUNK_ELEMENTS", 1 << 20))

# rows of the saved statistics tensor (4 x N)
LSE, R_STAT, LSE_P, H_STAT = range(4)


# An f-divergence chunk keeps about twice as many tile-sized temporaries alive as a kl chunk (p~,
# q~, their logs, the ratios and three per-pair terms), so its chunks are half as large: the peak
# memory stays that of kl's (DESIGN.md: O(N d), never more tiles than a handful).
F_DIVERGENCE_CHUNK_SHARE = 2


def row_chunks(n_rows: int, n_cols: int, f_divergence: bool = False):
    """(r0, r1) row ranges whose rows x n_cols tiles hold about CHUNK_ELEMENTS entries (half as
    many for an f-divergence)."""
    budget = CHUNK_ELEMENTS // F_DIVERGENCE_CHUNK_SHARE if f_divergence else CHUNK_ELEMENTS
    return tile_math.row_ranges(n_rows, n_cols, budget)


class Tile(NamedTuple):
    """The target side of one chunk: p (zero off the valid set) and, for Affinity, its logits."""

    p: torch.Tensor
    has_p: torch.Tensor
    t: Optional[torch.Tensor] = None
    t_aux: Optional[torch.Tensor] = None
    lse_p: Optional[torch.Tensor] = None
    count: Optional[torch.Tensor] = None      # Labels: K_i, the number of positives


class Problem(NamedTuple):
    """The op's flat arguments, cast to the accumulation dtype."""

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
    divergence: int             # the op code of families.DIVERGENCES

    @property
    def kl(self) -> bool:
        """Forward KL: the cross term plus the entropy of p~ (cross_entropy drops the entropy)."""
        return self.divergence == DIVERGENCES["kl"].code

    @property
    def f_divergence(self) -> bool:
        """One of the f-divergences of DESIGN.md §1.1 beyond kl, evaluated per pair."""
        return self.divergence in F_DIVERGENCE_CODES

    @property
    def m_valid(self) -> int:
        return self.y.shape[0] - int(self.exclude_self)

    @property
    def m_mix(self) -> int:
        """M' as the denominator of the uniform mixtures; 1 when a row has no valid column (such
        rows are left out, and this keeps their unused values finite)."""
        return max(self.m_valid, 1)


def cast_args(args) -> Problem:
    problem = Problem(*args)
    divergence_by_code(problem.divergence)      # an unknown code raises, never computes another
    acc = tile_math.accumulation_dtype(problem.x.dtype)
    to_acc = lambda t: None if t is None else t.to(acc)
    return problem._replace(x=to_acc(problem.x), y=to_acc(problem.y), param=to_acc(problem.param),
                            z=to_acc(problem.z), z_cols=to_acc(problem.z_cols),
                            t_param=to_acc(problem.t_param), dense_p=to_acc(problem.dense_p),
                            nbr_weight=to_acc(problem.nbr_weight))


def off_self(tile: torch.Tensor, r0: int, exclude_self: bool, fill) -> torch.Tensor:
    """Sets the self pairs (i, i) of rows r0.. to ``fill`` in place."""
    if exclude_self:
        tile.diagonal(r0).fill_(fill)
    return tile


def _normalised(w: torch.Tensor):
    total = tile_math.row_sum(w).to(w.dtype)[:, None]
    empty = total == 0        # a NaN total keeps its row, so NaN inputs give a NaN loss
    return w / torch.where(empty, 1.0, total), ~empty[:, 0]


def target_tile(problem: Problem, r0: int, r1: int, lse_p: Optional[torch.Tensor] = None) -> Tile:
    """p for rows r0:r1. For Affinity, ``lse_p`` (saved in forward) is reused when given."""
    m, acc = problem.y.shape[0], problem.x.dtype
    side, t_aux = tile_math.target_side(problem.target, problem, problem.col_labels, problem.z_cols,
                                        r0, r1, 0, m, acc)
    if problem.target != "affinity":     # p: the target's weights renormalised over valid columns
        raw = off_self(side, r0, problem.exclude_self, 0.0)
        return Tile(*_normalised(raw), count=raw.sum(1) if problem.target == "labels" else None)
    # affinity: p = softmax over valid j of t
    t = side
    t_masked = off_self(t.clone(), r0, problem.exclude_self, float("-inf"))
    if lse_p is None:
        lse_p = tile_math.row_lse(t_masked)
    p = torch.exp(t_masked - tile_math.finite_shift(lse_p)[:, None])   # rows without columns: 0
    p = p / _row_total(p)      # sum_j p = 1 up to rounding per entry, not per row (the fp32 LSE^p's)
    has_p = torch.full((r1 - r0,), problem.m_valid > 0, dtype=torch.bool, device=t.device)
    return Tile(p, has_p, t, t_aux, lse_p)


def _row_total(t: torch.Tensor) -> torch.Tensor:
    """Row sums of a tile of probabilities (float64 sums, rounded once), 1 where a row has none, as
    an R x 1 divisor that renormalises the rows: exp(s - LSE) with an fp32 LSE sums to 1 only up
    to the LSE's rounding, an error shared by the whole row, which the gradients carry times the
    row's mean of y - x_i (DESIGN.md §5, large M)."""
    total = tile_math.row_sum(t)
    return torch.where(total > 0, total, 1.0).to(t.dtype)[:, None]


def _mixed_target(problem: Problem, tile: Tile, r0: int) -> torch.Tensor:
    """p~ = (1 - alpha) p + alpha / M' on the valid set, 0 on self pairs."""
    if problem.alpha == 0:
        return tile.p
    return off_self((1 - problem.alpha) * tile.p + problem.alpha / problem.m_mix, r0,
                    problem.exclude_self, 0.0)


def _mixed_q(problem: Problem, q: torch.Tensor) -> torch.Tensor:
    """q~ = (1 - beta) q + beta / M' (beta > 0)."""
    return (1 - problem.beta) * q + problem.beta / problem.m_mix


def _log_mixed_q(problem: Problem, log_q: torch.Tensor) -> torch.Tensor:
    return log_q if problem.beta == 0 else torch.log(_mixed_q(problem, log_q.exp()))


def learned_tile(problem: Problem, r0: int, r1: int):
    """(s with self pairs at -inf, aux) for rows r0:r1; the chain rule needs only aux."""
    s, aux = tile_math.logits(problem.kernel, problem.x[r0:r1], problem.y,
                              tile_math.rows_of(problem.param, r0, r1))
    return off_self(s, r0, problem.exclude_self, float("-inf")), aux


def _dloss_dp_mix(problem: Problem, p_mix: torch.Tensor, log_q_mix: torch.Tensor) -> torch.Tensor:
    """h_ij = dL_i/dp~_ij up to a row constant: log p~ - log q~ (KL) or -log q~ (cross-entropy)."""
    return torch.log(p_mix) - log_q_mix if problem.kl else -log_q_mix


def _entropy(problem: Problem, tile: Tile, p_mix: torch.Tensor) -> torch.Tensor:
    """sum_j p~ log p~ per row; closed form for Labels."""
    if tile.count is None:
        return tile_math.row_sum(tile_math.where_positive(p_mix, p_mix * torch.log(p_mix)))
    return tile_math.labels_entropy(tile.count, problem.alpha, problem.m_valid)


class FTile(NamedTuple):
    """The f-divergence quantities of a chunk (f_divergences.py): the per-pair terms and the
    factors that turn q~ g into q g and p~ f' into p f'."""
    terms: f_divergences.PairTerms
    valid: torch.Tensor
    q: torch.Tensor             # q, unmixed, 0 off the valid set
    q_ratio: torch.Tensor       # q / q~
    p_ratio: torch.Tensor       # p / p~ (1 where alpha = 0)


def _f_tile(problem: Problem, tile: Tile, log_q: torch.Tensor, r0: int) -> FTile:
    """The per-pair f-divergence terms of a chunk, from log p~ and log q~ (DESIGN.md §1.1): an
    Affinity target with alpha = 0 takes the exact log-softmax of t, finite where p underflows."""
    inf = float("-inf")
    valid = off_self(torch.ones_like(log_q, dtype=torch.bool), r0, problem.exclude_self, False)
    p_mix = _mixed_target(problem, tile, r0)
    if problem.target == "affinity" and problem.alpha == 0:
        t_masked = off_self(tile.t.clone(), r0, problem.exclude_self, inf)
        log_p_mix = torch.where(valid, torch.log_softmax(t_masked, dim=1), inf)
        p_ratio = valid.to(p_mix.dtype)
    else:
        positive = p_mix != 0        # NaN counts, so a NaN target gives a NaN loss
        log_p_mix = torch.where(positive, torch.log(torch.where(positive, p_mix, 1.0)), inf)
        p_ratio = torch.where(positive, tile.p / torch.where(positive, p_mix, 1.0), 0.0)
    q = torch.where(valid, torch.exp(log_q), 0.0)
    if problem.beta == 0:
        q_mix, log_q_mix, q_ratio = q, torch.where(valid, log_q, inf), valid.to(q.dtype)
    else:
        q_mix = torch.where(valid, _mixed_q(problem, q), 0.0)
        log_q_mix = torch.where(valid, torch.log(torch.where(valid, q_mix, 1.0)), inf)
        q_ratio = torch.where(valid, q / torch.where(valid, q_mix, 1.0), 0.0)
    terms = f_divergences.pair_terms(problem.divergence, p_mix, q_mix, log_p_mix, log_q_mix)
    return FTile(terms, valid, q, q_ratio, p_ratio)


def _f_forward_chunk(problem: Problem, r0: int, r1: int):
    """_forward_chunk for an f-divergence: L_i = sum_j q~ f(p~ / q~), with Gamma_i in the R row
    and, for Affinity, Phi_i in the H row of the statistics (the torch backward recomputes both
    from its own tile, in float64)."""
    s_masked, _ = learned_tile(problem, r0, r1)
    lse = tile_math.row_lse(s_masked)
    log_q = s_masked - lse[:, None]
    del s_masked
    tile = target_tile(problem, r0, r1)
    f = _f_tile(problem, tile, log_q, r0)
    row = tile_math.row_sum(torch.where(f.valid, f.terms.term, 0.0))
    gamma = tile_math.row_sum(tile_math.where_positive(f.q_ratio, f.q_ratio * f.terms.q_g))
    phi = None
    if problem.target == "affinity":
        phi = tile_math.row_sum(tile_math.where_positive(f.p_ratio, f.p_ratio * f.terms.p_fprime))
    included = tile.has_p & (problem.m_valid > 0)
    return torch.where(included, row, 0.0), included, (lse, gamma, tile.lse_p, phi)


def _forward_chunk(problem: Problem, r0: int, r1: int):
    """Row losses and statistics of rows r0:r1 (a function, so its tiles die on return)."""
    if problem.f_divergence:
        return _f_forward_chunk(problem, r0, r1)
    s_masked, _ = learned_tile(problem, r0, r1)
    lse = tile_math.row_lse(s_masked)
    log_q = s_masked - lse[:, None]
    del s_masked
    tile = target_tile(problem, r0, r1)
    p_mix = _mixed_target(problem, tile, r0)
    r_stat = None
    if problem.beta == 0:
        log_q_mix = log_q
    else:
        q = torch.exp(log_q)
        q_mix = _mixed_q(problem, q)
        log_q_mix = torch.log(q_mix)
        r_stat = tile_math.row_sum(tile_math.where_positive(p_mix, p_mix * q / q_mix))
        del q, q_mix
    row = -tile_math.row_sum(tile_math.where_positive(p_mix, p_mix * log_q_mix))   # float64, rounded once
    if problem.kl:
        row = row + _entropy(problem, tile, p_mix)
    h_stat = None
    if problem.target == "affinity":
        h = _dloss_dp_mix(problem, p_mix, log_q_mix)
        h_stat = tile_math.row_sum(tile_math.where_positive(tile.p, tile.p * h))
    included = tile.has_p & (problem.m_valid > 0)
    return torch.where(included, row, 0.0), included, (lse, r_stat, tile.lse_p, h_stat)


def forward(*args):
    problem = cast_args(args)
    n = problem.x.shape[0]
    loss = torch.zeros(n, dtype=problem.x.dtype, device=problem.x.device)
    valid = torch.zeros(n, dtype=torch.bool, device=problem.x.device)
    stats = torch.zeros(4, n, dtype=problem.x.dtype, device=problem.x.device)
    for r0, r1 in row_chunks(n, problem.y.shape[0], problem.f_divergence):
        loss[r0:r1], valid[r0:r1], row_stats = _forward_chunk(problem, r0, r1)
        for k, value in enumerate(row_stats):
            if value is not None:
                stats[k, r0:r1] = value
    return loss, valid, stats


def _accumulate_param(d_param: torch.Tensor, rows: torch.Tensor, r0: int, r1: int) -> None:
    if d_param.dim() == 1:
        d_param[r0:r1] += rows
    else:
        d_param += rows.sum()


def _backward_chunk(problem: Problem, r0: int, r1: int, g: torch.Tensor, valid: torch.Tensor,
                    stats: torch.Tensor, target_grad: bool, param_grad: bool):
    """Gradient pieces of rows r0:r1: (learned-side chain, target-side chain or None)."""
    s_masked, aux = learned_tile(problem, r0, r1)
    log_q = s_masked - stats[LSE, r0:r1, None]
    del s_masked
    q = torch.exp(log_q)
    q_total = _row_total(q)
    q = q / q_total
    log_q = log_q - torch.log(q_total)
    tile = target_tile(problem, r0, r1, stats[LSE_P, r0:r1] if problem.target == "affinity" else None)
    p_mix = _mixed_target(problem, tile, r0)
    g_rows = g[r0:r1, None]
    f = _f_tile(problem, tile, log_q, r0) if problem.f_divergence else None
    if f is not None:            # (1 - beta) q (g - Gamma), Gamma = sum_j q g from this tile
        q_g = tile_math.where_positive(f.q_ratio, f.q_ratio * f.terms.q_g)
        grad_s = g_rows * (1 - problem.beta) * _minus_row_mean(q_g, q, tile_math.row_sum(q))
    elif problem.beta == 0:
        grad_s = g_rows * (q - p_mix)
    else:
        grad_s = (g_rows * (1 - problem.beta) * q
                  * (stats[R_STAT, r0:r1, None] - p_mix / _mixed_q(problem, q)))
    grad_s = torch.where(valid[r0:r1, None], grad_s, 0.0)   # rows left out (even M' = 0)
    learned = tile_math.chain(problem.kernel, grad_s, problem.x[r0:r1], problem.y, aux,
                              tile_math.rows_of(problem.param, r0, r1),
                              tile_math.finite_shift(stats[LSE, r0:r1]),
                              weights=torch.where(valid[r0:r1, None], q, 0.0),   # rows left out: 0, not NaN
                              with_param=param_grad)
    del grad_s, aux, q
    if not target_grad:
        return learned, None
    if f is not None:            # (1 - alpha) p (f' - Phi), Phi = sum_j p f' from this tile
        p_fprime = torch.where(f.valid, f.p_ratio * f.terms.p_fprime, 0.0)
        grad_t = g_rows * (1 - problem.alpha) * _minus_row_mean(p_fprime, tile.p, tile_math.row_sum(tile.p))
        return learned, _target_chain(problem, grad_t, tile, stats, r0, r1)
    h = _dloss_dp_mix(problem, p_mix, _log_mixed_q(problem, log_q))
    # H = sum_j p h again, in float64 from this very tile (not the saved fp32 H), subtracted as two
    # fp32 parts: h - H cancels to the spread of h and dL/dz is a p-weighted covariance, so H's
    # rounding would come back times the p-mean of z_cols - z_i (DESIGN.md §5, large M).
    h_mean = tile_math.row_sum(tile_math.where_positive(tile.p, tile.p * h)) / tile_math.row_sum(tile.p)
    h_hi = h_mean.to(h.dtype)
    h_lo = (h_mean - h_hi).to(h.dtype)
    h_dev = (h - h_hi[:, None]) - h_lo[:, None]
    grad_t = tile_math.where_positive(tile.p, g_rows * (1 - problem.alpha) * tile.p * h_dev)
    return learned, _target_chain(problem, grad_t, tile, stats, r0, r1)


def _target_chain(problem: Problem, grad_t: torch.Tensor, tile: Tile, stats: torch.Tensor, r0: int, r1: int):
    """dL/dt of rows r0:r1 chained to (dz rows, dz_cols, dt_param per row)."""
    return tile_math.chain(problem.t_kernel, grad_t, problem.z[r0:r1], problem.z_cols, tile.t_aux,
                           tile_math.rows_of(problem.t_param, r0, r1),
                           tile_math.finite_shift(stats[LSE_P, r0:r1]), weights=tile.p)


def _minus_row_mean(values: torch.Tensor, weights: torch.Tensor, weight_total: torch.Tensor) -> torch.Tensor:
    """values - weights * c_i with c_i = sum_j values / sum_j weights (float64 row sums), c taken
    off as two parts in the tile's dtype: the difference cancels to the spread of the values, so
    c's own rounding would come back times the weighted mean of the features (DESIGN.md §5)."""
    centre = tile_math.row_sum(values) / torch.where(weight_total > 0, weight_total, 1.0)
    hi = centre.to(values.dtype)
    lo = (centre - hi).to(values.dtype)
    return (values - weights * hi[:, None]) - weights * lo[:, None]


def backward(grad_rows, *rest):
    """Gradients (dx, dy, dparam, dz, dz_cols, dt_param); target grads are empty unless requested."""
    *args, valid, stats, need_target_grad, need_param_grad = rest
    inputs = Problem(*args)               # the op's arguments by name, in their own dtypes
    problem = cast_args(args)
    g = torch.where(valid, grad_rows.to(problem.x.dtype), 0.0)
    target_grad = need_target_grad and problem.target == "affinity"
    # (rows, columns, parameter) accumulators of the learned side, then of the target side
    sides = [(torch.zeros_like(problem.x), torch.zeros_like(problem.y), torch.zeros_like(problem.param))]
    if target_grad:
        sides.append((torch.zeros_like(problem.z), torch.zeros_like(problem.z_cols),
                      torch.zeros_like(problem.t_param)))
    for r0, r1 in row_chunks(problem.x.shape[0], problem.y.shape[0], problem.f_divergence):
        pieces = _backward_chunk(problem, r0, r1, g, valid, stats, target_grad, need_param_grad)
        for (d_rows, d_cols, d_param), piece in zip(sides, pieces):
            d_rows[r0:r1] = piece[0]
            d_cols += piece[1]
            _accumulate_param(d_param, piece[2], r0, r1)
    # back to the dtypes of the op's inputs: x, y, param and, for targets, z, z_cols, t_param
    originals = (inputs.x, inputs.y, inputs.param, inputs.z, inputs.z_cols, inputs.t_param)
    accumulated = [grad for side in sides for grad in side]
    grads = [grad.to(original.dtype) for grad, original in zip(accumulated, originals)]
    grads += [inputs.x.new_empty(0) for _ in range(6 - len(grads))]
    return tuple(grads)
