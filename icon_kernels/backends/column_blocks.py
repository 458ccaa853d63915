"""The loss over a stream of column blocks: partial row statistics and their one shared merge.

Ring mode (``entry.py``) sees the global columns one block at a time, so nothing per row
may be normalised inside a block. Every function here takes this rank's rows (``RowSide``) and one
block of global columns (``Block``) and returns *partial* row statistics; ``merge`` is the one
place where partials of different blocks combine, and ``finish_*`` turns the merged statistics
into row normalisers and row losses:

* pass 1, ``normaliser_partials``: LSE_i of the logits, the target mass (Labels K_i, Neighbors /
  Dense row sums) or LSE^p_i (Affinity);
* pass 2, ``loss_partials``: with the global normalisers, sum_j p~ log q~, sum_j p~ log p~
  (except Labels, whose entropy ``finish_rows`` takes in closed form from K_i),
  R_i = sum_j p~ q / q~ (beta > 0) and H_i = sum_j p h (Affinity; Dense / Neighbors when their
  weights require grad, with h of ``target_weight_grads``). For an f-divergence (DESIGN.md §1.1;
  ``_f_pairs``, the per-pair terms of ``backends.f_divergences``) instead: sum_j q~ f(p~ / q~),
  sum_j q g and sum_j q (Gamma_i is their ratio), and for Affinity sum_j p f' and sum_j p
  (Phi_i), in float64 (``tile_math.row_sum``), so the centred gradients below lose nothing to a
  rounded centre;
* backward, ``gradient_block``: dL/dx of the rows, dL/dy of the block (sent back to its owner),
  the per-row parameter gradient, the same for Affinity target features, and the gradient of
  Dense p / Neighbors weights (local rows, so it stays on this rank):
  dL/dw_ij = g_i (1 - alpha) (h_ij - H_i) / W_i on valid columns, W_i the row's weight sum
  (h = f'(p~ / q~) for an f-divergence). An f-divergence's blocks take
  dL/ds = g (1 - beta) (q g - q Gamma_i) and dL/dt = g (1 - alpha) (p f' - p Phi_i) with the
  global row statistics of pass 2.

Tiles are rows-chunk x block, never rows x all columns. The math is the blockwise backend's
(DESIGN.md §1) with global column indices: a self pair is (row_offset + i, block.offset + j).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..families import DIVERGENCES, F_DIVERGENCE_CODES, learned_kernel
from . import blockwise, f_divergences, target_weight_grads, tile_math

# how each partial statistic combines across blocks
_LOG_SUMS = ("lse", "lse_p")                       # log-sum-exp: logaddexp
_SUMS = ("mass", "cross", "entropy", "r", "h", "pos_s", "sum_s", "p_mass", "sym_mass",   # plain sums
         "f_loss", "gamma", "q_total", "phi", "p_total")


def merge(total: Optional[Dict[str, torch.Tensor]], part: Dict[str, torch.Tensor]):
    """The statistics of two disjoint column sets combined (``total`` None: the first block)."""
    if total is None:
        return dict(part)
    out = dict(total)
    for key, value in part.items():
        if key in _LOG_SUMS:
            out[key] = torch.logaddexp(out[key], value)
        elif key in _SUMS:
            out[key] = out[key] + value
        else:
            raise KeyError(f"no merge rule for statistic {key!r}")
    return out


def tile_budget(n_rows: int, block_rows: int, d: int, device: torch.device) -> int:
    """Elements of one rows-chunk x block tile, so that a rank's working set stays
    O((N_local + block) * d) as the world grows: on the CPU a sixteenth of the rank's resident
    features ((N_local + block) * d), within [2^14, 2^22], so the handful of tiles alive at once
    (about eight) hold about half as much as the features; on a GPU a quarter, within
    [2^20, 2^22] (fewer, larger launches). ICON_KERNELS_RING_TILE_ELEMENTS overrides both."""
    fixed = os.environ.get("ICON_KERNELS_RING_TILE_ELEMENTS")
    if fixed:
        return int(fixed)
    if device.type == "cpu":
        return min(1 << 22, max(1 << 14, (n_rows + block_rows) * d // 16))
    return min(1 << 22, max(1 << 20, (n_rows + block_rows) * d // 4))


@dataclass
class Block:
    """Global columns [offset, offset + rows) and their target columns (what travels the ring)."""

    y: torch.Tensor
    offset: int
    col_labels: Optional[torch.Tensor] = None
    z_cols: Optional[torch.Tensor] = None
    # a symmetrised Affinity target (a square problem: the columns are rows of some rank): the
    # columns' LSE^p and, for a per-row target parameter, their parameter (p_{i|j} in the tile)
    lse_p: Optional[torch.Tensor] = None
    t_param: Optional[torch.Tensor] = None


@dataclass
class RowSide:
    """This rank's rows and the loss options (op-level kernels: cosine arrives as dot)."""

    x: torch.Tensor
    param: torch.Tensor
    kernel: str
    target: str                         # labels | neighbors | affinity | dense
    row_offset: int                     # global index of row 0 (for exclude_self)
    m_total: int                        # global number of columns
    exclude_self: bool
    alpha: float
    beta: float
    kl: bool
    divergence: str = "kl"              # families.DIVERGENCES name; kl says whether it is "kl"
    row_labels: Optional[torch.Tensor] = None
    nbr_index: Optional[torch.Tensor] = None     # global column indices, -1 pads
    nbr_weight: Optional[torch.Tensor] = None
    dense_p: Optional[torch.Tensor] = None        # rows x global columns
    z: Optional[torch.Tensor] = None
    t_param: Optional[torch.Tensor] = None
    t_kernel: str = "dot"
    tile_elements: int = 1 << 20
    fused: bool = False                 # blocks through the fused CPU label kernel (label_blocks.py)
    weight_grad: bool = False           # Dense p / Neighbors weights require grad
    target_grad: bool = False           # Affinity z, z_cols or parameter require grad (pass 2 sums H_i / Phi_i)
    joint: bool = False                 # normalization="joint" (DESIGN.md §1.2): one distribution over all pairs
    symmetrize: bool = False            # Affinity: p_ij from (p_{j|i} + p_{i|j}) / 2 (the Neighbors
                                        # target comes symmetrised already, as nbr_csr)
    pairs: int = 0                      # joint: the number of valid pairs of every rank (the mixtures' 1 / size)
    nbr_csr: Optional[tuple] = None     # Neighbors as (row_ptr, global column, weight) rows; see symmetric_neighbors

    @property
    def m_valid(self) -> int:
        return self.m_total - int(self.exclude_self)

    @property
    def code(self) -> int:
        """The divergence's op code (families.DIVERGENCES)."""
        return DIVERGENCES[self.divergence].code

    @property
    def f_divergence(self) -> bool:
        """One of the f-divergences of DESIGN.md §1.1 beyond kl, evaluated per pair."""
        return self.code in F_DIVERGENCE_CODES

    @property
    def m_mix(self) -> int:
        """The denominator of the uniform mixtures: M' (every valid pair under joint
        normalisation); 1 when there is none (N = 1 with y = None on one rank): such rows are
        left out, this keeps them finite."""
        return max(self.pairs if self.joint else self.m_valid, 1)


def _row_chunks(rows: RowSide, block: Block):
    """(r0, r1) ranges of this rank's rows whose rows x block tiles hold about tile_elements
    entries (half as many for an f-divergence, whose tiles keep about twice as many temporaries
    alive: p~, q~, their logs, the ratios and three per-pair terms)."""
    share = 2 if rows.f_divergence else 1
    return tile_math.row_ranges(rows.x.shape[0], block.y.shape[0], max(1, rows.tile_elements // share))


def _off_self(tile, rows: RowSide, block: Block, r0: int, fill):
    """Self pairs of rows r0.. (global row row_offset + r0 + i, column block.offset + j) to fill."""
    return blockwise.off_self(tile, rows.row_offset + r0 - block.offset, rows.exclude_self, fill)


def _learned(rows: RowSide, block: Block, r0: int, r1: int):
    s, aux = tile_math.logits(rows.kernel, rows.x[r0:r1], block.y, tile_math.rows_of(rows.param, r0, r1))
    return _off_self(s, rows, block, r0, float("-inf")), aux


def _csr_tile(rows: RowSide, block: Block, r0: int, r1: int) -> torch.Tensor:
    """The weights of rows r0:r1 of a Neighbors target in rows (row_ptr, column, weight), over
    the block's columns (entries of other blocks drop)."""
    row_ptr, col, weight = rows.nbr_csr
    lo, hi = int(row_ptr[r0]), int(row_ptr[r1])
    counts = row_ptr[r0 + 1:r1 + 1] - row_ptr[r0:r1]
    local_row = torch.repeat_interleave(torch.arange(r1 - r0, device=col.device), counts)
    local_col = col[lo:hi] - block.offset
    inside = (local_col >= 0) & (local_col < block.y.shape[0])
    raw = torch.zeros(r1 - r0, block.y.shape[0], dtype=rows.x.dtype, device=rows.x.device)
    raw.index_put_((local_row[inside], local_col[inside]), weight[lo:hi][inside].to(raw.dtype), accumulate=True)
    return raw


def _target_raw(rows: RowSide, block: Block, r0: int, r1: int):
    """Unnormalised p of the tile (Labels / Neighbors / Dense), or (t masked, t_aux) for Affinity."""
    if rows.nbr_csr is not None:
        return _off_self(_csr_tile(rows, block, r0, r1), rows, block, r0, 0.0), None
    raw, t_aux = tile_math.target_side(rows.target, rows, block.col_labels, block.z_cols, r0, r1,
                                       block.offset, block.y.shape[0], rows.x.dtype)
    return _off_self(raw, rows, block, r0, float("-inf") if rows.target == "affinity" else 0.0), t_aux


def normaliser_partials(rows: RowSide, block: Block) -> Dict[str, torch.Tensor]:
    """Pass 1 on one block: LSE of the logits and the target's mass (or LSE^p)."""
    n = rows.x.shape[0]
    wide = rows.x.dtype if rows.x.device.type == "mps" else torch.float64     # row_sum's dtype
    # joint normalisation keeps the row LSEs unrounded for log Z (joint_normalisers)
    out = {"lse": rows.x.new_empty(n, dtype=wide if rows.joint else rows.x.dtype),
           ("lse_p" if rows.target == "affinity" else "mass"): rows.x.new_empty(n)}
    for r0, r1 in _row_chunks(rows, block):
        s, _ = _learned(rows, block, r0, r1)
        out["lse"][r0:r1] = tile_math.row_lse(s, wide=rows.joint)   # +inf logit: NaN, as log_softmax
        del s
        raw, _ = _target_raw(rows, block, r0, r1)
        if rows.target == "affinity":
            out["lse_p"][r0:r1] = tile_math.row_lse(raw)
        else:
            out["mass"][r0:r1] = raw.sum(1)
    return out

def symmetric_mass_partials(rows: RowSide, block: Block, stats) -> Dict[str, torch.Tensor]:
    """Pass 1b of a symmetrised Affinity target under conditional normalisation, once every
    LSE^p is known (the block carries its columns'): sum_j (p_{j|i} + p_{i|j}) / 2 over the
    block, the row mass that renormalises row i."""
    out = {"sym_mass": rows.x.new_empty(rows.x.shape[0])}
    for r0, r1 in _row_chunks(rows, block):
        raw, t_aux = _target_raw(rows, block, r0, r1)
        out["sym_mass"][r0:r1] = torch.exp(_affinity_log_p(rows, block, raw, t_aux, stats, r0, r1)).sum(1)
    return out


def row_normalisers(rows: RowSide, stats: Dict[str, torch.Tensor]):
    """(mass with empty rows set to 1, which rows have a target) from the merged pass-1 stats;
    a symmetrised Affinity target's row mass becomes stats["log_p_scale"]."""
    if rows.target == "affinity":
        has_p = torch.full_like(stats["lse"], rows.m_valid > 0, dtype=torch.bool)
        if "sym_mass" in stats:
            sym_mass = stats.pop("sym_mass")
            stats["log_p_scale"] = torch.log(torch.where(sym_mass > 0, sym_mass, 1.0))
        return None, has_p
    mass = stats["mass"]
    empty = mass == 0                   # a NaN mass keeps its row, so NaN inputs give a NaN loss
    return torch.where(empty, 1.0, mass), ~empty


def joint_normalisers(rows: RowSide, stats, mass, reduce):
    """Normalisation="joint" (DESIGN.md §1.2) from the merged pass-1 statistics of this rank's
    rows: every row's LSE becomes log Z = logsumexp over all rows of every rank, the target's
    mass the total over all pairs (Affinity: its rows p(j|i), or the symmetrised ones, each of
    mass 1, are divided by the number of rows, through stats["log_p_scale"]), and rows.pairs
    the number of valid pairs. ``reduce(t, op)`` sums ("sum") or maximises ("max") a tensor
    over the ranks. Returns (mass, included): a row is included when it has a valid column and
    some pair of the problem has p (else the loss is 0 with zero gradients, as the oracle's)."""
    lse = stats["lse"]                  # unrounded (float64): normaliser_partials
    inf = float("-inf")
    n_rows = reduce(lse.new_tensor(float(lse.shape[0])), "sum")
    top = reduce(lse.max() if lse.numel() else lse.new_tensor(inf), "max")
    shift = torch.where(torch.isfinite(top), top, 0.0)
    log_z = shift + torch.log(reduce(torch.exp(lse - shift).sum(), "sum"))
    rows.pairs = int(n_rows) * rows.m_valid
    # log Z in two parts of the tiles' dtype, both subtracted from s (_Tile): one rounded log Z
    # would put its |log Z| ulps into every q alike, sum q = 1 + O(1e-6) in fp32, which the
    # gradient carries times the mean of the features (as an fp32 row LSE would; DESIGN.md §5)
    hi = log_z.to(rows.x.dtype)
    lo = torch.where(torch.isfinite(log_z), log_z - hi.to(log_z.dtype), 0.0).to(rows.x.dtype)
    stats["lse"] = hi.expand(lse.shape).clone()
    stats["lse_lo"] = lo.expand(lse.shape).clone()
    has_cols = torch.full_like(lse, rows.m_valid > 0, dtype=torch.bool)
    if rows.target == "affinity":
        stats["log_p_scale"] = torch.log(n_rows).expand_as(lse).clone()
        return None, has_cols
    total = reduce(stats["mass"].sum(), "sum")
    some = total != 0                   # a NaN total keeps the rows, so NaN inputs give a NaN loss
    return torch.where(some, total, 1.0).expand_as(lse).clone(), has_cols & some


def _shift(rows: RowSide, lse: torch.Tensor) -> torch.Tensor:
    """A row normaliser (LSE, LSE^p or log Z) as its tile's shift. Without valid columns (the
    row is left out) LSE = -inf and the shift is 0, so the row's q and p are 0, not NaN, and its
    gradients zero; with valid columns, LSE = -inf means every logit is -inf (an overflowed
    distance, log_dot's log 0), where log_softmax gives NaN, and so does the shift."""
    if rows.m_valid == 0:
        return tile_math.finite_shift(lse)
    return torch.where(lse == float("-inf"), float("nan"), lse)


def _columns_conditional_log_p(rows: RowSide, block: Block, t_aux: torch.Tensor, r0: int) -> torch.Tensor:
    """log p_{i|j} over a tile of an Affinity target (a square problem): t_ji - LSE^p_j, where
    t_ji is the target kernel on the same pair (a.b or the squared distance is symmetric) with
    column j's parameter."""
    prm = rows.t_param if block.t_param is None else block.t_param[None, :]
    t_ji = learned_kernel(rows.t_kernel).logit(t_aux, prm)
    return _off_self(t_ji - _shift(rows, block.lse_p)[None, :], rows, block, r0, float("-inf"))


def _affinity_log_p(rows: RowSide, block: Block, raw: torch.Tensor, t_aux, stats, r0: int, r1: int):
    """log p of an Affinity tile: log p_{j|i} = t_ij - LSE^p_i, or with symmetrize
    log((p_{j|i} + p_{i|j}) / 2), less the row's "log_p_scale" when the statistics hold one (the
    log of what the rows are divided by: the symmetrised row mass, or the number of rows under
    joint normalisation)."""
    log_p = raw - _shift(rows, stats["lse_p"][r0:r1])[:, None]
    if rows.symmetrize:
        log_p = torch.logaddexp(log_p, _columns_conditional_log_p(rows, block, t_aux, r0)) - math.log(2)
    if "log_p_scale" in stats:
        log_p -= stats["log_p_scale"][r0:r1, None]
    return log_p


class _Tile:
    """p, p~, log q and log q~ (and q, q~ when beta > 0) of one rows-chunk x block tile under
    the global normalisers; for Affinity also the exact log p."""

    def __init__(self, rows: RowSide, block: Block, r0: int, r1: int, stats, mass):
        self.log_q, self.aux = _learned(rows, block, r0, r1)
        self.log_q -= _shift(rows, stats["lse"][r0:r1])[:, None]     # s - LSE, in place
        if "lse_lo" in stats:           # joint: log Z's low part (joint_normalisers)
            self.log_q -= stats["lse_lo"][r0:r1, None]
        raw, self.t_aux = _target_raw(rows, block, r0, r1)
        self.log_p = None
        if rows.target == "affinity":
            self.log_p = _affinity_log_p(rows, block, raw, self.t_aux, stats, r0, r1)
            self.p = torch.exp(self.log_p)
        else:
            self.p = raw / mass[r0:r1, None]
        self.p_mix = self.p
        if rows.alpha > 0:
            self.p_mix = _off_self((1 - rows.alpha) * self.p + rows.alpha / rows.m_mix, rows, block, r0, 0.0)
        self.log_q_mix = self.log_q
        if rows.beta > 0:
            self.q = torch.exp(self.log_q)
            self.q_mix = (1 - rows.beta) * self.q + rows.beta / rows.m_mix
            self.log_q_mix = torch.log(self.q_mix)

    def dloss_dp_mix(self, rows: RowSide):
        """h_ij = dL_i/dp~_ij up to a row constant: log p~ - log q~ (KL) or -log q~ (cross-entropy)."""
        return torch.log(self.p_mix) - self.log_q_mix if rows.kl else -self.log_q_mix

    def dloss_dp_mix_of_weights(self, rows: RowSide):
        """h_ij = dL_i/dp~_ij of a Dense / Neighbors target (the single-process rule of
        target_weight_grads)."""
        return target_weight_grads.h(self.p_mix, self.log_q_mix, rows.code)


def _f_pairs(rows: RowSide, block: Block, tile: _Tile, stats, r0: int, r1: int) -> blockwise.FTile:
    """The f-divergence quantities of a tile (blockwise._f_tile with global normalisers): the
    per-pair terms from p~, q~ and their logs, masked off the valid set. An Affinity target with
    alpha = 0 takes the exact log p = t - LSE^p (global LSE^p), finite where p underflows."""
    inf = float("-inf")
    valid = _off_self(torch.ones_like(tile.log_q, dtype=torch.bool), rows, block, r0, False)
    if rows.target == "affinity" and rows.alpha == 0:
        log_p_mix = torch.where(valid, tile.log_p, inf)
        p_ratio = valid.to(tile.p.dtype)
    else:
        positive = tile.p_mix != 0        # NaN counts, so a NaN target gives a NaN loss
        safe = torch.where(positive, tile.p_mix, 1.0)
        log_p_mix = torch.where(positive, torch.log(safe), inf)
        p_ratio = torch.where(positive, tile.p / safe, 0.0)
    q = torch.where(valid, torch.exp(tile.log_q), 0.0)
    if rows.beta == 0:
        q_mix, log_q_mix, q_ratio = q, torch.where(valid, tile.log_q, inf), valid.to(q.dtype)
    else:
        q_mix = torch.where(valid, tile.q_mix, 0.0)
        log_q_mix = torch.where(valid, tile.log_q_mix, inf)
        q_ratio = torch.where(valid, tile.q / torch.where(valid, tile.q_mix, 1.0), 0.0)
    terms = f_divergences.pair_terms(rows.code, tile.p_mix, q_mix, log_p_mix, log_q_mix)
    return blockwise.FTile(terms, valid, q, q_ratio, p_ratio)


def _q_g(f: blockwise.FTile) -> torch.Tensor:
    """q g per pair (q / q~ times q~ g; 0 where q is)."""
    return tile_math.where_positive(f.q_ratio, f.q_ratio * f.terms.q_g)


def _p_fprime(f: blockwise.FTile) -> torch.Tensor:
    """p f' per pair on the valid set (p / p~ times p~ f')."""
    return torch.where(f.valid, f.p_ratio * f.terms.p_fprime, 0.0)


def _f_loss_partials(rows: RowSide, block: Block, stats, mass) -> Dict[str, torch.Tensor]:
    """Pass 2 of an f-divergence on one block: sum_j q~ f, sum_j q g and sum_j q (Gamma_i), and
    for Affinity sum_j p f' and sum_j p (Phi_i); H_i = sum_j p h for weight gradients."""
    keys = ["f_loss", "gamma", "q_total"] + (["phi", "p_total"] if rows.target_grad else []) \
        + (["h"] if rows.weight_grad else [])
    n, sums = rows.x.shape[0], tile_math.row_sum
    wide = rows.x.dtype if rows.x.device.type == "mps" else torch.float64     # row_sum's dtype
    out = {k: rows.x.new_empty(n, dtype=rows.x.dtype if k == "h" else wide) for k in keys}
    for r0, r1 in _row_chunks(rows, block):
        tile = _Tile(rows, block, r0, r1, stats, mass)
        f = _f_pairs(rows, block, tile, stats, r0, r1)
        out["f_loss"][r0:r1] = sums(torch.where(f.valid, f.terms.term, 0.0))
        out["gamma"][r0:r1] = sums(_q_g(f))
        out["q_total"][r0:r1] = sums(f.q)
        if "phi" in out:
            out["phi"][r0:r1] = sums(_p_fprime(f))
            out["p_total"][r0:r1] = sums(tile.p)
        if rows.weight_grad:
            out["h"][r0:r1] = tile_math.where_positive(tile.p, tile.p * tile.dloss_dp_mix_of_weights(rows)).sum(1)
        del tile, f
    return out


def loss_partials(rows: RowSide, block: Block, stats, mass) -> Dict[str, torch.Tensor]:
    """Pass 2 on one block: the row sums that make the loss, R_i and H_i."""
    if rows.f_divergence:
        return _f_loss_partials(rows, block, stats, mass)
    # under joint normalisation Labels has no closed-form entropy, the backward's centre needs
    # each row's mass of p~ (beta = 0), and an Affinity row's H_i its mass of p (joint_statistics)
    keys = ["cross"] + (["entropy"] if rows.kl and (rows.target != "labels" or rows.joint) else []) \
        + (["r"] if rows.beta > 0 else []) + (["h"] if rows.target_grad or rows.weight_grad else []) \
        + (["p_mass"] if rows.joint and rows.beta == 0 else []) \
        + (["p_total"] if rows.joint and rows.target_grad else [])
    out = {k: rows.x.new_empty(rows.x.shape[0]) for k in keys}
    for r0, r1 in _row_chunks(rows, block):
        tile = _Tile(rows, block, r0, r1, stats, mass)
        positive = tile_math.where_positive
        out["cross"][r0:r1] = positive(tile.p_mix, tile.p_mix * tile.log_q_mix).sum(1)
        if "entropy" in out:            # Affinity with alpha = 0: its exact log p, no log pass
            log_p_mix = tile.log_p if tile.log_p is not None and rows.alpha == 0 else torch.log(tile.p_mix)
            out["entropy"][r0:r1] = positive(tile.p_mix, tile.p_mix * log_p_mix).sum(1)
        if rows.beta > 0:
            out["r"][r0:r1] = positive(tile.p_mix, tile.p_mix * tile.q / tile.q_mix).sum(1)
        if "p_mass" in out:
            out["p_mass"][r0:r1] = tile.p_mix.sum(1)
        if "p_total" in out:
            out["p_total"][r0:r1] = tile.p.sum(1)
        if rows.target_grad:
            out["h"][r0:r1] = positive(tile.p, tile.p * tile.dloss_dp_mix(rows)).sum(1)
        elif rows.weight_grad:
            out["h"][r0:r1] = positive(tile.p, tile.p * tile.dloss_dp_mix_of_weights(rows)).sum(1)
        del tile
    return out


def finish_rows(rows: RowSide, stats, mass, has_p):
    """(L_i, 0 for rows left out; included) from the merged pass-2 statistics (Labels: the
    entropy in closed form from the positive count K = mass). Under joint normalisation, each
    row's contribution to the one divergence."""
    included = has_p & (rows.m_valid > 0)
    if rows.f_divergence:
        row = stats["f_loss"].to(rows.x.dtype)
    else:
        row = -stats["cross"]
        if rows.kl:
            row = row + (stats["entropy"] if "entropy" in stats
                         else tile_math.labels_entropy(mass, rows.alpha, rows.m_mix))
    row = torch.where(included, row, 0.0)
    if rows.joint:
        if rows.target_grad and not rows.f_divergence:     # H_i: the p-weighted mean of h over row i
            stats["h"] = stats["h"] / torch.where(stats["p_total"] > 0, stats["p_total"], 1.0)
        # no pair with p leaves every row out, but NaN in the logits still gives NaN, as in the
        # oracle (log Z is NaN then; -inf when there is no valid pair, which gives 0)
        log_z = stats["lse"]
        row = row + 0.0 * torch.where(log_z == float("-inf"), 0.0, log_z).to(row.dtype)
        row = tile_math.with_inf_rows_nan(row, rows.x, rows.z)
    return row, included


def joint_centres(rows: RowSide, stats, g: torch.Tensor, reduce) -> Dict[str, torch.Tensor]:
    """The backward's global centres under joint normalisation, for upstream gradients g per
    row (0 for rows left out): dL/ds_ij = g_i a_ij - q_ij C with C = sum_k g_k c_k over every
    row of every rank (c_k the row's mass of p~ for kl and cross-entropy with beta = 0, R_k
    with beta > 0, sum_j q g for an f-divergence, over the total mass of q), since s_ij moves
    every q through Z; and dL/dw_ij = (1 - alpha) (g_i h_ij - sum_k g_k H_k) / W for Dense /
    Neighbors weights (W their total)."""
    wide = torch.float64 if rows.x.device.type != "mps" else rows.x.dtype
    g = g.to(wide)
    if rows.f_divergence:          # no valid pair at all (N = 1, y omitted): 0, not 0 / 0
        q_total = reduce(stats["q_total"].sum(), "sum")
        learned = reduce((g * stats["gamma"]).sum(), "sum") / torch.where(q_total > 0, q_total, 1.0)
    else:
        learned = reduce((g * stats["r" if rows.beta > 0 else "p_mass"].to(wide)).sum(), "sum")
    out = {"learned": learned}
    if rows.weight_grad:
        out["weights"] = reduce((g * stats["h"].to(wide)).sum(), "sum")
    return out


def _joint_grad_s(rows: RowSide, tile: _Tile, f, g_rows, centre: torch.Tensor) -> torch.Tensor:
    """dL/ds of a tile under joint normalisation: g_i a_ij - q_ij C (joint_centres)."""
    if f is not None:
        return _minus(_q_g(f) * g_rows, f.q, centre.expand(g_rows.shape[0])).mul_(1 - rows.beta)
    if rows.beta == 0:
        return torch.exp(tile.log_q).mul_(centre.to(tile.log_q.dtype)).sub_(tile.p_mix * g_rows)
    return ((centre.to(tile.q.dtype) - g_rows * tile.p_mix / tile.q_mix).mul_(tile.q).mul_(1 - rows.beta))


def gradient_block(rows: RowSide, block: Block, stats, mass, g, row_grads, block_grads,
                   weight_grads=None, centres=None) -> None:
    """Backward on one block, added in place: ``row_grads`` = [dx, dparam per row] (+ [dz,
    dt_param per row] for Affinity target gradients), ``block_grads`` = [dy] (+ [dz_cols]),
    ``weight_grads`` = dL/dp (rows x global columns) or dL/dweights (rows x k) when given.

    ``g`` is the upstream gradient per row, already 0 for rows left out; under joint
    normalisation ``centres`` holds joint_centres. The parameter chain uses the row's global LSE
    as its shift: it is the same in every block, so the shifts cancel once the blocks are summed
    (each full row of dL/ds sums to zero). Under joint normalisation only the sum over all rows
    does, so the shift is log Z for a scalar parameter and none for a per-row one.
    """
    need_target = len(row_grads) > 2
    per_row_param = rows.joint and rows.param.dim() == 1
    for r0, r1 in _row_chunks(rows, block):
        tile = _Tile(rows, block, r0, r1, stats, mass)
        g_rows = g[r0:r1, None]
        f = _f_pairs(rows, block, tile, stats, r0, r1) if rows.f_divergence else None
        if rows.joint:                 # g_i a_ij - q_ij C; rows left out have q = p = 0
            grad_s = _joint_grad_s(rows, tile, f, g_rows, centres["learned"])
        elif f is not None:            # (1 - beta) (q g - q Gamma_i), Gamma_i of every block
            gamma = _centre(stats["gamma"], stats["q_total"], r0, r1)
            grad_s = _minus(_q_g(f), f.q, gamma).mul_(g_rows * (1 - rows.beta))
        elif rows.beta == 0:
            grad_s = torch.exp(tile.log_q).sub_(tile.p_mix).mul_(g_rows)
        else:
            grad_s = ((stats["r"][r0:r1, None] - tile.p_mix / tile.q_mix)
                      .mul_(tile.q).mul_(g_rows * (1 - rows.beta)))
        if not rows.joint:
            grad_s.masked_fill_(g_rows == 0, 0.0)             # rows left out (even M' = 0)
        shift = torch.zeros_like(g_rows[:, 0]) if per_row_param else tile_math.finite_shift(stats["lse"][r0:r1])
        pieces = [tile_math.chain(rows.kernel, grad_s, rows.x[r0:r1], block.y, tile.aux,
                                  tile_math.rows_of(rows.param, r0, r1), shift, out_b=block_grads[0])]
        del grad_s
        if weight_grads is not None:
            _weight_grad_block(rows, block, tile, stats, mass, g_rows, r0, r1, weight_grads,
                               None if centres is None else centres.get("weights"))
        if need_target:
            if f is not None:          # (1 - alpha) (p f' - p Phi_i), Phi_i of every block
                phi = _centre(stats["phi"], stats["p_total"], r0, r1)
                grad_t = _minus(_p_fprime(f), tile.p, phi).mul_(g_rows * (1 - rows.alpha))
                grad_t.masked_fill_(g_rows == 0, 0.0)
            else:
                h_dev = tile.dloss_dp_mix(rows) - stats["h"][r0:r1, None]
                grad_t = tile_math.where_positive(tile.p, g_rows * (1 - rows.alpha) * tile.p * h_dev)
            pieces.append(tile_math.chain(rows.t_kernel, grad_t, rows.z[r0:r1], block.z_cols, tile.t_aux,
                                          tile_math.rows_of(rows.t_param, r0, r1),
                                          tile_math.finite_shift(stats["lse_p"][r0:r1]),
                                          out_b=block_grads[1]))
        del tile, f
        for side, (d_a, _, d_p) in enumerate(pieces):      # the block's share went into out_b
            row_grads[2 * side][r0:r1] += d_a
            row_grads[2 * side + 1][r0:r1] += d_p


def _centre(total: torch.Tensor, weight_total: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of total / weight_total (Gamma_i or Phi_i; 0 for a row without weight), in the
    statistics' float64."""
    w = weight_total[r0:r1]
    return total[r0:r1] / torch.where(w > 0, w, 1.0)


def _minus(values: torch.Tensor, weights: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """values - weights * centre_i, the centre taken off as two parts in the tile's dtype
    (blockwise._minus_row_mean with a global centre): the difference cancels to the spread of the
    values, so the centre's own rounding would come back times the weighted mean of the features."""
    hi = centre.to(values.dtype)
    lo = (centre - hi).to(values.dtype)
    return (values - weights * hi[:, None]) - weights * lo[:, None]


def _weight_grad_block(rows: RowSide, block: Block, tile: _Tile, stats, mass, g_rows, r0: int, r1: int,
                       weight_grads, joint_centre=None) -> None:
    """Adds dL/dw of rows r0:r1 over the block's columns: Dense p's block of columns, or the
    Neighbors entries whose index falls in the block (repeats share their column's value).
    Under joint normalisation ``joint_centre`` is sum_k g_k H_k (joint_centres)."""
    h = tile.dloss_dp_mix_of_weights(rows)
    if joint_centre is None:
        grad = g_rows * (1 - rows.alpha) * (h - stats["h"][r0:r1, None]) / mass[r0:r1, None]
        grad = torch.where(g_rows != 0, grad, 0.0)
    else:
        grad = (1 - rows.alpha) * (g_rows * h - joint_centre.to(h.dtype)) / mass[r0:r1, None]
    grad = _off_self(grad, rows, block, r0, 0.0)     # valid columns only
    block_cols = block.y.shape[0]
    if rows.target == "dense":
        weight_grads[r0:r1, block.offset:block.offset + block_cols] += grad
        return
    idx = rows.nbr_index[r0:r1] - block.offset
    inside = (rows.nbr_index[r0:r1] >= 0) & (idx >= 0) & (idx < block_cols)
    weight_grads[r0:r1] += torch.where(inside, grad.gather(1, torch.where(inside, idx, 0)), 0.0)
