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


# An f-divergence chunk keeps about twice as many tile-sized temporaries alive as a kl chunk (the
# general path, _f_tile: p~, q~, their logs, the ratios and three per-pair terms; the dense path:
# p, q, their logs and the two sides' centred values), so its chunks are half as large: the peak
# memory stays that of kl's (DESIGN.md: O(N d), never more tiles than a handful). The Labels path
# needs fewer, but its chunks are no faster larger (one thread, N = 8192).
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
    normalization: str          # "conditional" here: joint normalisation runs on column_stream.py
    symmetrize: bool            # False here: a symmetrised target too

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
    if problem.normalization != "conditional" or problem.symmetrize:
        raise ValueError("the torch backend's op computes conditional normalisation without symmetrize "
                         "(joint normalisation and symmetrised targets run on its column stream), got "
                         f"normalization={problem.normalization!r}, symmetrize={problem.symmetrize}")
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


def _f_name(problem: Problem) -> str:
    return divergence_by_code(problem.divergence).name


def _f_path(problem: Problem) -> Optional[str]:
    """The tile path of an f-divergence's chunks: "labels" (p~ = 0 off the positives, which are
    visited as a list), "dense" (Affinity: p and q as tiles, log p finite) or None (the general
    one, _f_tile: mixtures, Neighbors and Dense weights). The fast ones need alpha = beta = 0, and
    hand a chunk whose result is not finite to the general one (its +inf and NaN rules)."""
    if problem.alpha != 0 or problem.beta != 0:
        return None
    name = _f_name(problem)
    if problem.target == "labels" and name in f_divergences.ZERO_P:
        return "labels"
    if problem.target == "affinity" and name in f_divergences.DENSE_FORWARD_NEEDS:
        return "dense"
    return None


def _wide(t: torch.Tensor) -> torch.dtype:
    """The dtype of tile_math.row_sum's sums (float64; MPS: the tile's)."""
    return t.dtype if t.device.type == "mps" else torch.float64


def _shifted(s: torch.Tensor):
    """(s - m, m) for a masked logits tile s, overwritten with s - m, and its row max m (0 where
    that is infinite), as in tile_math.row_lse."""
    row_max = s.amax(1)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
    return s.sub_(row_max[:, None]), row_max


def _lse_of(row_max: torch.Tensor, exp_sum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tile_math.row_lse from its parts: m + log sum_j e^(s - m), rounded once; +inf becomes NaN."""
    lse = (row_max.to(exp_sum.dtype) + torch.log(exp_sum)).to(dtype)
    return torch.where(lse == float("inf"), float("nan"), lse)


def _label_pairs(problem: Problem, r0: int, r1: int):
    """(rows, cols, count) of a Labels target's rows r0:r1: the positive pairs (row within the
    chunk, column), row by row, self pairs dropped when excluded, and K_i per row; from the sorted
    column labels, O(M log M + positives), never an R x M tile."""
    labels, col_labels = problem.row_labels[r0:r1].long(), problem.col_labels.long()
    sorted_labels, order = torch.sort(col_labels, stable=True)
    lo = torch.searchsorted(sorted_labels, labels)
    count = torch.searchsorted(sorted_labels, labels, right=True) - lo
    rows = torch.repeat_interleave(torch.arange(r1 - r0, device=labels.device), count)
    first = torch.cumsum(count, 0) - count
    cols = order[torch.arange(rows.numel(), device=labels.device) - first[rows] + lo[rows]]
    if problem.exclude_self:
        keep = cols != rows + r0
        rows, cols = rows[keep], cols[keep]
        count = torch.bincount(rows, minlength=r1 - r0)
    return rows, cols, count


def _label_pair_terms(problem: Problem, rows, count, q_pos, log_q_pos) -> f_divergences.PairTerms:
    """pair_terms at the positives, p~ = 1 / K_i there (alpha = 0), in q_pos's dtype."""
    k = count[rows].to(q_pos.dtype)
    return f_divergences.pair_terms(problem.divergence, 1 / k, q_pos, -torch.log(k), log_q_pos)


def _label_f_forward(problem: Problem, r0: int, r1: int):
    """A Labels chunk with alpha = beta = 0: L_i = ZERO_P * (q mass off the positives) + the
    terms at the positives. The mass off the positives is summed directly (the positives are
    zeroed in the tile of exponentials first), never as 1 - sum_pos q, which cancels."""
    name = _f_name(problem)
    s, _ = learned_tile(problem, r0, r1)
    rows, cols, count = _label_pairs(problem, r0, r1)
    shifted, row_max = _shifted(s)
    wide = _wide(s)
    shifted_pos = shifted[rows, cols].to(wide)
    e = shifted.exp_()
    e_pos = e[rows, cols].to(wide)
    e[rows, cols] = 0.0
    off_mass = tile_math.row_sum(e)
    total = off_mass.index_add(0, rows, e_pos)
    lse = _lse_of(row_max, total, s.dtype)
    terms = _label_pair_terms(problem, rows, count, e_pos / total[rows], shifted_pos - torch.log(total)[rows])
    row = (f_divergences.ZERO_P[name] * off_mass / total).index_add_(0, rows, terms.term)
    included = (count > 0) & (problem.m_valid > 0)
    return torch.where(included, row, 0.0), included, (lse, None, None, None)


def _softmax_tiles(tiles: dict, key: str, s: torch.Tensor, needs):
    """Puts q (key "q", or p: "p") = softmax of the masked logits tile s and/or its log into
    ``tiles`` as ``needs`` asks, overwriting s; returns (the row max m, the float64 row sums of
    e^(s - m)), the parts of the row's LSE (_lse_of). q is e^(s - m) divided by its own sum, and
    log q = (s - m) - log sum_j e^(s - m) rounds as log_softmax does: s - LSE would carry the
    rounding of an fp32 LSE (half an ulp of |LSE|, the same for the whole row) into every log q."""
    shifted, row_max = _shifted(s)
    log_key = "log_" + key
    e = torch.exp(shifted) if log_key in needs else shifted.exp_()
    total = tile_math.row_sum(e)
    if key in needs:
        tiles[key] = e.div_(total.to(e.dtype)[:, None])
    if log_key in needs:
        tiles[log_key] = shifted.sub_(torch.log(total).to(shifted.dtype)[:, None])
    return row_max, total


def _self_clearer(problem: Problem, r0: int):
    return lambda tile, fill=0.0: off_self(tile, r0, problem.exclude_self, fill)


def _finite_on(rows: torch.Tensor, included: torch.Tensor) -> bool:
    """Whether the row values are finite on every included row (else the general path decides)."""
    return bool((torch.isfinite(rows) | ~included).all())


def _dense_f_forward(problem: Problem, r0: int, r1: int):
    """An Affinity chunk with alpha = beta = 0 (f_divergences.dense_terms); None where a row is
    not finite. p and q are the exponentials of the LSE passes, normalised by their float64 sums."""
    name = _f_name(problem)
    needs = f_divergences.DENSE_FORWARD_NEEDS[name]
    tiles = {}
    s, _ = learned_tile(problem, r0, r1)
    lse = _lse_of(*_softmax_tiles(tiles, "q", s, needs), s.dtype)
    t, _ = tile_math.target_side(problem.target, problem, problem.col_labels, problem.z_cols, r0, r1, 0,
                                 problem.y.shape[0], s.dtype)
    t = off_self(t, r0, problem.exclude_self, float("-inf"))
    lse_p = _lse_of(*_softmax_tiles(tiles, "p", t, needs), s.dtype)
    row = tile_math.row_sum(f_divergences.dense_terms(name, tiles, _self_clearer(problem, r0)))
    included = torch.full_like(row, problem.m_valid > 0, dtype=torch.bool)
    if not _finite_on(row, included):
        return None
    return torch.where(included, row, 0.0), included, (lse, None, lse_p, None)


def _f_forward_chunk(problem: Problem, r0: int, r1: int):
    """_forward_chunk for an f-divergence: L_i = sum_j q~ f(p~ / q~). The statistics are LSE_i
    and, for Affinity, LSE^p_i: the backward recomputes Gamma_i and Phi_i from its own tile."""
    path = _f_path(problem)
    if path == "labels":
        return _label_f_forward(problem, r0, r1)
    if path == "dense":
        result = _dense_f_forward(problem, r0, r1)
        if result is not None:
            return result
    s_masked, _ = learned_tile(problem, r0, r1)
    lse = tile_math.row_lse(s_masked)
    log_q = s_masked - lse[:, None]
    del s_masked
    tile = target_tile(problem, r0, r1)
    f = _f_tile(problem, tile, log_q, r0)
    row = tile_math.row_sum(torch.where(f.valid, f.terms.term, 0.0))
    included = tile.has_p & (problem.m_valid > 0)
    return torch.where(included, row, 0.0), included, (lse, None, tile.lse_p, None)


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


def _backward_tiles(problem: Problem, r0: int, r1: int, stats: torch.Tensor):
    """(aux, q, log q, target tile) of rows r0:r1 for a backward: the logits recomputed from the
    saved LSE, q renormalised by its own float64 row sums (_row_total), p from the saved LSE^p."""
    s_masked, aux = learned_tile(problem, r0, r1)
    log_q = s_masked - stats[LSE, r0:r1, None]
    del s_masked
    q = torch.exp(log_q)
    q_total = _row_total(q)
    q = q / q_total
    log_q = log_q - torch.log(q_total)
    tile = target_tile(problem, r0, r1, stats[LSE_P, r0:r1] if problem.target == "affinity" else None)
    return aux, q, log_q, tile


def _backward_chunk(problem: Problem, r0: int, r1: int, g: torch.Tensor, valid: torch.Tensor,
                    stats: torch.Tensor, target_grad: bool, param_grad: bool):
    """Gradient pieces of rows r0:r1: (learned-side chain, target-side chain or None)."""
    if problem.f_divergence:
        return _f_backward_chunk(problem, r0, r1, g, valid, stats, target_grad, param_grad)
    aux, q, log_q, tile = _backward_tiles(problem, r0, r1, stats)
    p_mix = _mixed_target(problem, tile, r0)
    g_rows = g[r0:r1, None]
    if problem.beta == 0:
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


def _minus_row_mean(values: torch.Tensor, weights: torch.Tensor, weight_total: torch.Tensor,
                    scale: Optional[torch.Tensor] = None):
    """values - weights * c_i with c_i = sum_j values / sum_j weights (float64 row sums), c taken
    off as two parts in the tile's dtype: the difference cancels to the spread of the values, so
    c's own rounding would come back times the weighted mean of the features (DESIGN.md §5).
    In place on ``values``, times the per-row ``scale`` (R) when given; returns (tile, c)."""
    centre = tile_math.row_sum(values) / torch.where(weight_total > 0, weight_total, 1.0)
    hi = centre.to(values.dtype)
    lo = (centre - hi).to(values.dtype)
    values.addcmul_(weights, hi.neg()[:, None]).addcmul_(weights, lo.neg()[:, None])
    if scale is not None:
        values.mul_(scale[:, None])
    return values, centre


def _f_backward_chunk(problem: Problem, r0: int, r1: int, g: torch.Tensor, valid: torch.Tensor,
                      stats: torch.Tensor, target_grad: bool, param_grad: bool):
    """_backward_chunk for an f-divergence: dL/ds = g (1 - beta) q (g - Gamma) and, for Affinity,
    dL/dt = g (1 - alpha) p (f' - Phi), with Gamma = sum_j q g and Phi = sum_j p f' from this very
    tile (float64 row sums), by the chunk's tile path (_f_path); the general one takes the chunks
    a fast one hands back (None)."""
    path = _f_path(problem)
    pieces = None
    if path == "labels":
        pieces = _label_f_backward(problem, r0, r1, g, valid, stats, param_grad)
    elif path == "dense":
        pieces = _dense_f_backward(problem, r0, r1, g, valid, stats, target_grad, param_grad)
    if pieces is None:
        pieces = _general_f_backward(problem, r0, r1, g, valid, stats, target_grad, param_grad)
    return pieces


def _rows_left_out(grad: torch.Tensor, valid_rows: torch.Tensor) -> torch.Tensor:
    """0 on the rows left out (even M' = 0, where the tile may hold NaN); one pass only if any."""
    return grad if bool(valid_rows.all()) else torch.where(valid_rows[:, None], grad, 0.0)


def _learned_chain(problem: Problem, grad_s, aux, q, valid_rows, stats, r0: int, r1: int, param_grad: bool):
    """dL/ds of rows r0:r1 chained to (dx rows, dy, dparam per row); q (the weights that centre
    the parameter's sum) only when its gradient is wanted."""
    weights = torch.where(valid_rows[:, None], q, 0.0) if param_grad else None   # rows left out: 0, not NaN
    return tile_math.chain(problem.kernel, grad_s, problem.x[r0:r1], problem.y, aux,
                           tile_math.rows_of(problem.param, r0, r1), tile_math.finite_shift(stats[LSE, r0:r1]),
                           weights=weights, with_param=param_grad)


def _label_f_backward(problem: Problem, r0: int, r1: int, g, valid, stats, param_grad: bool):
    """A Labels chunk with alpha = beta = 0: q g = ZERO_P q + (q g - ZERO_P q) at the positives, so
    q g - q Gamma = [the positives' excess] - q kappa, kappa = sum_pos excess (sum_j q = 1): the
    ZERO_P q parts cancel exactly and are never formed. Over the tile: a max, an exp, a row sum
    and one scaling (dL/ds = -g kappa q off the positives), the positives' excess added after."""
    name = _f_name(problem)
    s, aux = learned_tile(problem, r0, r1)
    rows, cols, count = _label_pairs(problem, r0, r1)
    shifted, _ = _shifted(s)
    wide = _wide(s)
    shifted_pos = shifted[rows, cols].to(wide)
    q = shifted.exp_()
    total = tile_math.row_sum(q)          # q = e^(s - m) / total: the very q used, normalised
    q_pos = q[rows, cols].to(wide) / total[rows]
    terms = _label_pair_terms(problem, rows, count, q_pos, shifted_pos - torch.log(total)[rows])
    excess = terms.q_g - f_divergences.ZERO_P[name] * q_pos
    kappa = torch.zeros_like(total).index_add_(0, rows, excess)
    valid_rows = valid[r0:r1]
    if not _finite_on(kappa / total, valid_rows):
        return None
    g_rows = g[r0:r1].to(wide)
    factor = torch.where(valid_rows, -g_rows * kappa / total, 0.0).to(q.dtype)[:, None]
    grad_s = q * factor if param_grad else q.mul_(factor)
    grad_s.index_put_((rows, cols), (g_rows[rows] * excess).to(q.dtype), accumulate=True)
    grad_s = _rows_left_out(grad_s, valid_rows)
    if param_grad:
        q.div_(total.to(q.dtype)[:, None])
    return _learned_chain(problem, grad_s, aux, q, valid_rows, stats, r0, r1, param_grad), None


def _dense_f_backward(problem: Problem, r0: int, r1: int, g, valid, stats, target_grad: bool, param_grad: bool):
    """An Affinity chunk with alpha = beta = 0 (f_divergences.dense_centred_values); None where a
    row's centre is not finite. q and p are divided by their own float64 sums, as in _row_total."""
    name = _f_name(problem)
    needs = set(f_divergences.DENSE_BACKWARD_NEEDS[name]) | ({"p"} if target_grad else set())
    tiles = {}
    s, aux = learned_tile(problem, r0, r1)
    _softmax_tiles(tiles, "q", s, needs | {"q"})
    q = tiles["q"]
    t, t_aux = tile_math.target_side(problem.target, problem, problem.col_labels, problem.z_cols, r0, r1, 0,
                                     problem.y.shape[0], s.dtype)
    _softmax_tiles(tiles, "p", off_self(t, r0, problem.exclude_self, float("-inf")), needs)
    x, a, y, b = f_divergences.dense_centred_values(name, tiles, _self_clearer(problem, r0), target_grad)
    valid_rows, g_rows = valid[r0:r1], g[r0:r1]
    grad_s, centre = _minus_row_mean(x, q, tile_math.row_sum(q), g_rows * (a * (1 - problem.beta)))
    grad_t = None
    if target_grad:
        p = tiles["p"]
        grad_t, centre_t = _minus_row_mean(y, p, tile_math.row_sum(p), g_rows * (b * (1 - problem.alpha)))
        centre = centre + centre_t
    if not _finite_on(centre, valid_rows):
        return None
    learned = _learned_chain(problem, _rows_left_out(grad_s, valid_rows), aux, q, valid_rows, stats, r0, r1,
                             param_grad)
    if not target_grad:
        return learned, None
    # a row left out (M' = 0) has p = 0 / 0 in its tile: 0 in its gradient and its chain weights
    p = _rows_left_out(tiles["p"], valid_rows)
    return learned, _target_chain(problem, _rows_left_out(grad_t, valid_rows), Tile(p, valid_rows, t_aux=t_aux),
                                  stats, r0, r1)


def _general_f_backward(problem: Problem, r0: int, r1: int, g, valid, stats, target_grad: bool, param_grad: bool):
    """Any f-divergence chunk (mixtures, every target) by _f_tile's masked per-pair terms."""
    aux, q, log_q, tile = _backward_tiles(problem, r0, r1, stats)
    g_rows, valid_rows = g[r0:r1], valid[r0:r1]
    f = _f_tile(problem, tile, log_q, r0)
    q_g = tile_math.where_positive(f.q_ratio, f.q_ratio * f.terms.q_g)   # (1 - beta) q (g - Gamma)
    grad_s, _ = _minus_row_mean(q_g, q, tile_math.row_sum(q), g_rows * (1 - problem.beta))
    grad_s = torch.where(valid_rows[:, None], grad_s, 0.0)   # rows left out (even M' = 0)
    learned = _learned_chain(problem, grad_s, aux, q, valid_rows, stats, r0, r1, param_grad)
    del grad_s, aux, q
    if not target_grad:
        return learned, None
    p_fprime = torch.where(f.valid, f.p_ratio * f.terms.p_fprime, 0.0)   # (1 - alpha) p (f' - Phi)
    grad_t, _ = _minus_row_mean(p_fprime, tile.p, tile_math.row_sum(tile.p), g_rows * (1 - problem.alpha))
    return learned, _target_chain(problem, grad_t, tile, stats, r0, r1)


def backward(grad_rows, *rest):
    """Gradients (dx, dy, dparam, dz, dz_cols, dt_param); target grads are empty unless requested."""
    *args, valid, stats, need_target_grad, need_param_grad, _y_is_x = rest
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
