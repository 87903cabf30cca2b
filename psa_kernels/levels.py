"""Stages 3 and 4: pyramid level of every (query block, key block) pair.

Levels: 1 = full resolution, 2/4/8 = keys and values mean-pooled by p, 0 = skipped.
All functions are plain torch and run on the device of their inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from .triton_compat import tl, triton

from .config import POOLED_LEVELS, PSAConfig

# thresholdbound: level 1 always keeps at least this share of each row's key blocks.
MIN_FULL_SHARE = 0.06
# Rows of more key blocks than this (rounded up to a power of two) are ranked by torch's
# segmented sort before the level kernel (H100 probe, benchmarks/NOTES.md).
PRESORT_ABOVE = 1024
# topk rows whose rank table changes level at most this many times are ranked by bisection
# instead of a sort (one or two cuts beat the sort at both Wan shapes, four lose at 720p;
# benchmarks/NOTES.md change 21) ...
SELECT_CUTS = 2
# ... and rows with more, whose last change comes within this share of the row, find the other
# changes among the blocks before it (faster than the sort at both shapes, most for short
# rows; benchmarks/NOTES.md change 24).
COMPACT_SHARE = 0.5
# rank="sample": the set packed for the cuts is the blocks at or above a pivot read off a
# sorted sample of this many keys, sized for a quarter more blocks than the last cut keeps.
# The default for rows of at least SAMPLE_ROWS key blocks (rounded up to a power of two): it
# pays at 720p, while at 480p the bisections over the set cost more than they save
# (benchmarks/NOTES.md change 28).
PIVOT_SAMPLE = 256
SAMPLE_ROWS = 2048
# Warps of _topk_set_kernel: one (the set in a kernel of its own with one warp beat 2-8 warps;
# benchmarks/NOTES.md change 28); the first kernel of "sample" gets one warp per 512 slots of
# the row.
SET_WARPS = 1
RANKINGS = ("sort", "bisect", "compact", "sample")


def _ranked_levels_topk(nkb: int, cfg: PSAConfig, device) -> torch.Tensor:
    """Level of the key block at each rank (0 = most important): fixed shares of the list."""
    by_rank = torch.zeros(nkb, dtype=torch.int8, device=device)
    for lvl, lo, hi in cfg.level_ranges():
        start, stop = int(math.floor(lo * nkb + 0.5)), int(math.floor(hi * nkb + 0.5))
        by_rank[start:stop] = lvl
    return by_rank


def _ranked_levels_threshold(sorted_scores: torch.Tensor, cfg: PSAConfig) -> torch.Tensor:
    """Level at each rank from the attention mass ranked before it (the cumulative share)."""
    total = sorted_scores.sum(-1, keepdim=True).clamp_min(1e-30)
    before = (sorted_scores.cumsum(-1) - sorted_scores) / total
    by_rank = torch.zeros_like(sorted_scores, dtype=torch.int8)
    for lvl, lo, hi in cfg.level_ranges():
        inside = (before >= lo) & ((before < hi) | (hi >= 1.0))
        by_rank = torch.where(inside & (by_rank == 0), torch.full_like(by_rank, lvl), by_rank)
    nkb = sorted_scores.shape[-1]
    keep = max(1, math.ceil(MIN_FULL_SHARE * nkb))
    by_rank[..., :keep] = 1
    return by_rank


def assign_levels(scores: torch.Tensor, cfg: PSAConfig,
                  text_q_blocks: torch.Tensor | None = None,
                  text_k_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Levels [B, H, nqb, nkb] (int8) from block scores [B, H, nqb, nkb].

    ``text_q_blocks`` / ``text_k_blocks``: bool [nqb] / [nkb], blocks holding text tokens;
    those pairs are always level 1. Every row keeps at least one non-skipped block, unless
    the preset keeps skipped blocks as a pooled tail (then no row is empty anyway).
    """
    nkb = scores.shape[-1]
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    if cfg.mask_mode == "topk":
        by_rank = _ranked_levels_topk(nkb, cfg, scores.device).expand_as(order)
    else:
        by_rank = _ranked_levels_threshold(sorted_scores, cfg)
    # No row may be empty: the best block of a row with nothing kept becomes level 1.
    empty = ((by_rank != 0).sum(-1, keepdim=True) == 0) & (not cfg.use_pooled_tail)
    by_rank = by_rank.clone()
    by_rank[..., :1] = torch.where(empty, torch.ones_like(by_rank[..., :1]), by_rank[..., :1])
    levels = torch.empty_like(by_rank).scatter_(-1, order, by_rank)
    _text_full(levels, text_q_blocks, text_k_blocks)
    return levels


@triton.jit
def _level_of(x, lv_now, lvl, lo, hi, CLOSED_AT_ONE: tl.constexpr):
    """Give level ``lvl`` where x is in [lo, hi) and no level is set yet; with CLOSED_AT_ONE a
    range reaching 1.0 also takes x == 1 (cumulative shares)."""
    inside = (x >= lo) & (x < hi)
    if CLOSED_AT_ONE:
        inside = inside | ((x >= lo) & (hi >= 1.0))
    return tl.where(inside & (lv_now == 0), lvl, lv_now)


@triton.jit
def _flip_negatives(bits):
    """Reverse the magnitude bits of negative int32s: maps float32 bits to integers in float
    order, and back (it is its own inverse)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _ordered_key32(x):
    """float32 -> int32 in the same order (negatives below positives, -0.0 equal to +0.0)."""
    return _flip_negatives((x + 0.0).to(tl.int32, bitcast=True))


@triton.jit
def _assign_levels_kernel(Scores, Order, Out, nkb, keep, fill_empty, r1lo, r1hi, r2lo, r2hi, r4lo, r4hi, r8lo, r8hi,
                          THRESHOLD: tl.constexpr, NKB: tl.constexpr, PRESORTED: tl.constexpr):
    # One program: one (batch, head, query block) row. The row is ranked by one sort of
    # int64 keys (score bits high, reversed block index low: ties keep the lower index first,
    # as a stable descending torch.sort does), then levels go by rank and are scattered back.
    # With PRESORTED the row comes ranked already (Scores sorted, Order their block indices).
    row = tl.program_id(0)
    idx = tl.arange(0, NKB)
    valid = idx < nkb
    sc = tl.load(Scores + row * nkb + idx, mask=valid, other=0.0)
    if PRESORTED:
        ranked = sc
        order = tl.load(Order + row * nkb + idx, mask=valid, other=0).to(tl.int32)
    else:
        ordered = _ordered_key32(sc).to(tl.int64)
        key = tl.where(valid, (ordered << 32) | (NKB - 1 - idx).to(tl.int64), -9223372036854775808)
        key = tl.sort(key, descending=True)
        order = NKB - 1 - (key & 0xFFFFFFFF).to(tl.int32)
        ranked = _flip_negatives((key >> 32).to(tl.int32)).to(tl.float32, bitcast=True)
    rank = idx
    lv = tl.zeros([NKB], tl.int32)
    if THRESHOLD:
        ranked = tl.where(rank < nkb, ranked, 0.0)
        total = tl.maximum(tl.sum(ranked, 0), 1e-30)
        x = (tl.cumsum(ranked, 0) - ranked) / total
    else:
        x = rank.to(tl.float32)  # topk: the ranges are rank bounds, given as ranks
    lv = _level_of(x, lv, 1, r1lo, r1hi, THRESHOLD)
    lv = _level_of(x, lv, 2, r2lo, r2hi, THRESHOLD)
    lv = _level_of(x, lv, 4, r4lo, r4hi, THRESHOLD)
    lv = _level_of(x, lv, 8, r8lo, r8hi, THRESHOLD)
    lv = tl.where(rank < keep, 1, lv)
    # no row may be empty (unless a pooled tail keeps it): the best block of a row with
    # nothing kept becomes level 1
    nonzero = tl.sum(((lv != 0) & (rank < nkb)).to(tl.int32), 0)
    lv = tl.where((rank == 0) & (nonzero == 0) & (fill_empty != 0), 1, lv)
    tl.store(Out + row * nkb + order, lv.to(tl.int8), mask=rank < nkb)


@triton.jit
def _ranks_before(key, valid, cut):
    """Which valid keys rank before ``cut`` (>= 1) in a stable descending order: a bisection
    (32 counting passes) finds the cut-th largest key; keys above it rank before the cut, and
    of the keys equal to it those at the lowest positions do."""
    lo = -2147483648 + tl.zeros([], tl.int64)  # invariant: at least `cut` keys >= lo
    hi = 2147483647 + tl.zeros([], tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        ok = tl.sum((valid & (key >= mid.to(tl.int32))).to(tl.int32), 0) >= cut
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    kth = lo.to(tl.int32)
    above = valid & (key > kth)
    tie = (valid & (key == kth)).to(tl.int32)
    room = cut - tl.sum(above.to(tl.int32), 0)  # ranks before the cut left to the ties
    return above | ((tie == 1) & (tl.cumsum(tie, 0) - tie < room))


@triton.jit
def _sampled_pivot_set(Scores, row, nkb, key, valid, last, CAND: tl.constexpr, SAMPLE: tl.constexpr):
    """The blocks whose key is at least a pivot taken from a sorted sample of SAMPLE keys
    spread over the row, aimed at between ``last`` and CAND blocks, and how many there are;
    a pivot that misses that range gives an empty set."""
    j = tl.arange(0, SAMPLE)
    sk = tl.sort(_ordered_key32(tl.load(Scores + row * nkb + (j * nkb) // SAMPLE)), descending=True)
    aim = tl.minimum(((last + CAND) // 2 * SAMPLE) // nkb, SAMPLE - 1)
    pivot = tl.max(tl.where(j == aim, sk, -2147483648), 0)
    above = valid & (key >= pivot)
    count = tl.sum(above.to(tl.int32), 0)
    hit = (count >= last) & (count <= CAND)
    return above & hit, tl.where(hit, count, 0)


@triton.jit
def _topk_levels_kernel(Scores, Cuts, Table, Out, Scratch, Nset, nkb, NCUT: tl.constexpr, NKB: tl.constexpr,
                        CAND: tl.constexpr, SAMPLE: tl.constexpr, SPLIT: tl.constexpr):
    # One program: one (batch, head, query block) row, without sorting it. A topk level
    # depends only on the block's rank, and the rank table changes level at NCUT ranks
    # (Cuts, ascending). A block's level is Table[number of cuts it does not rank before].
    # CAND == 0: every cut is found over the whole row. Otherwise a set of at most CAND
    # blocks that holds every block ranked before the last cut is packed (in index order)
    # into this row's Scratch, and the cuts are found among those only; the rest take the
    # last level. The set: with SAMPLE, the blocks at or above a pivot from a sample of the
    # row (one counting pass) when that holds between last and CAND blocks; otherwise, or
    # without SAMPLE, exactly the blocks ranked before the last cut (a bisection). With SPLIT
    # the set's size goes to Nset and _topk_set_kernel finds the cuts.
    row = tl.program_id(0)
    idx = tl.arange(0, NKB)
    valid = idx < nkb
    key = _ordered_key32(tl.load(Scores + row * nkb + idx, mask=valid, other=0.0))
    if CAND == 0:
        interval = tl.zeros([NKB], tl.int32)
        for j in tl.static_range(NCUT):
            interval += (~_ranks_before(key, valid, tl.load(Cuts + j).to(tl.int32))).to(tl.int32)
        lv = tl.load(Table + interval, mask=valid, other=0)
        tl.store(Out + row * nkb + idx, lv.to(tl.int8), mask=valid)
    else:
        last = tl.load(Cuts + NCUT - 1).to(tl.int32)
        if SAMPLE > 0:
            kept, nset = _sampled_pivot_set(Scores, row, nkb, key, valid, last, CAND, SAMPLE)
            if nset == 0:  # the pivot missed: the exact set
                kept = _ranks_before(key, valid, last)
                nset = last
        else:
            kept = _ranks_before(key, valid, last)
            nset = last
        rest = tl.zeros([NKB], tl.int8) + tl.load(Table + NCUT).to(tl.int8)
        tl.store(Out + row * nkb + idx, rest, mask=valid & ~kept)
        scratch = Scratch + row.to(tl.int64) * CAND
        slot = tl.cumsum(kept.to(tl.int32), 0) - 1  # keeps the index order, so ties still resolve by index
        tl.store(scratch + slot, (key.to(tl.int64) << 32) | idx.to(tl.int64), mask=kept)
        if SPLIT:  # the set's levels in a kernel of its own (_topk_set_kernel)
            tl.store(Nset + row, nset)
        else:
            tl.debug_barrier()  # the packed row, written by every thread, is read by every thread
            _levels_of_set(Scratch, row, nset, last, Cuts, Table, Out, nkb, NCUT, CAND, SAMPLE)


@triton.jit
def _levels_of_set(Scratch, row, nset, last, Cuts, Table, Out, nkb, NCUT: tl.constexpr, CAND: tl.constexpr,
                   SAMPLE: tl.constexpr):
    """Levels of the nset blocks packed in a row's Scratch ((key << 32) | block index, in
    index order), which hold every block ranked before the last cut."""
    c = tl.arange(0, CAND)
    cvalid = c < nset
    packed = tl.load(Scratch + row.to(tl.int64) * CAND + c, mask=cvalid, other=0)
    ckey = (packed >> 32).to(tl.int32)
    cidx = (packed & 0xFFFFFFFF).to(tl.int32)
    interval = tl.zeros([CAND], tl.int32)
    for j in tl.static_range(NCUT - 1):
        interval += (~_ranks_before(ckey, cvalid, tl.load(Cuts + j).to(tl.int32))).to(tl.int32)
    if SAMPLE > 0:  # a pivot set may hold blocks ranked after the last cut
        interval += (~_ranks_before(ckey, cvalid, last)).to(tl.int32)
    lv = tl.load(Table + interval, mask=cvalid, other=0)
    tl.store(Out + row * nkb + cidx, lv.to(tl.int8), mask=cvalid)


@triton.jit
def _topk_set_kernel(Scratch, Nset, Cuts, Table, Out, nkb, NCUT: tl.constexpr, CAND: tl.constexpr,
                     SAMPLE: tl.constexpr):
    # One program: the packed set of one row, after _topk_levels_kernel with SPLIT. Apart
    # from the whole row's registers, many more rows share a multiprocessor (benchmarks/NOTES.md
    # change 28).
    row = tl.program_id(0)
    _levels_of_set(Scratch, row, tl.load(Nset + row), tl.load(Cuts + NCUT - 1).to(tl.int32), Cuts, Table, Out,
                   nkb, NCUT, CAND, SAMPLE)


_TOPK_TABLES: dict = {}


def _topk_table(nkb: int, cfg: PSAConfig, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ranks where the topk level changes, level of each interval between them) as int64
    device tensors, and the last such rank (0 if none), cached: the rank table of
    :func:`assign_levels` with its empty-row rule."""
    key = (nkb, tuple(cfg.level_ranges()), cfg.use_pooled_tail, str(device))
    hit = _TOPK_TABLES.get(key)
    if hit is None:
        by_rank = _ranked_levels_topk(nkb, cfg, "cpu")
        if not bool((by_rank != 0).any()) and not cfg.use_pooled_tail:
            by_rank[0] = 1  # no row may be empty
        change = (by_rank[1:] != by_rank[:-1]).nonzero().flatten() + 1
        table = torch.cat([by_rank[:1], by_rank[change]]).long()
        last = int(change[-1]) if change.numel() else 0
        hit = _TOPK_TABLES[key] = (change.long().to(device), table.to(device), last)
    return hit


@dataclass(frozen=True)
class LevelsLaunch:
    """How :func:`assign_levels_triton` launches: warps of the level kernel (None: by row
    length, the fastest of benchmarks/stage_probe.py) and the row length above which rows are
    ranked by torch's segmented sort first (None: :data:`PRESORT_ABOVE`). Benchmarks pass
    others in."""
    num_warps: int | None = None
    presort_above: int | None = None


LEVELS_LAUNCH = LevelsLaunch()


def assign_levels_triton(scores: torch.Tensor, cfg: PSAConfig,
                         text_q_blocks: torch.Tensor | None = None,
                         text_k_blocks: torch.Tensor | None = None,
                         rank: str | None = None, launch: LevelsLaunch = LEVELS_LAUNCH) -> torch.Tensor:
    """Same levels as :func:`assign_levels`, one Triton program per row.

    ``rank``, how topk rows are ranked (:data:`RANKINGS`; thresholdbound rows are always
    sorted): "bisect" finds each rank where the level changes by a bisection over the row,
    "compact" finds the last one so and the others among the blocks kept, "sample" finds them
    all among the blocks at or above a pivot read off a sample of the row (falling back to
    "compact" for rows where the pivot misses), "sort" sorts the row. By default "sample" for
    rows of at least :data:`SAMPLE_ROWS` blocks, else "bisect" for at most
    :data:`SELECT_CUTS` such ranks; then "compact" when the last keeps at most
    :data:`COMPACT_SHARE` of the row, else "sort"; with "sample" the packed set's cuts run in a
    second kernel. Cumulative sums are taken in another order than
    torch's, so a thresholdbound block whose preceding mass lies within rounding of a range
    boundary may land on the other side."""
    if rank is not None and rank not in RANKINGS:
        raise ValueError(f"rank {rank!r}; allowed: {', '.join(RANKINGS)}")
    num_warps, presort_above = launch.num_warps, launch.presort_above
    nkb = scores.shape[-1]
    scores = scores.contiguous()
    out = torch.empty(scores.shape, dtype=torch.int8, device=scores.device)
    threshold = cfg.mask_mode == "thresholdbound"
    if not threshold:
        cuts, table, last = _topk_table(nkb, cfg, scores.device)
        ncut = cuts.numel()
        nkb_pow2 = triton.next_power_of_2(nkb)
        if rank is None and ncut and nkb_pow2 >= SAMPLE_ROWS and last <= COMPACT_SHARE * nkb:
            rank = "sample"
        if rank is None:
            rank = ("bisect" if ncut <= SELECT_CUTS else
                    "compact" if last <= COMPACT_SHARE * nkb else "sort")
        if rank != "sort":
            cand = 0
            if ncut and rank == "compact":
                cand = triton.next_power_of_2(last)
            elif ncut and rank == "sample":
                cand = triton.next_power_of_2(last + last // 4 + 1)
            rows = scores.numel() // nkb
            scratch = torch.empty(rows * cand if cand else 1, dtype=torch.int64, device=scores.device)
            sample = PIVOT_SAMPLE if cand and rank == "sample" else 0
            split = bool(sample)
            nset = torch.empty(rows if split else 1, dtype=torch.int32, device=scores.device)
            _topk_levels_kernel[(rows,)](
                scores, cuts, table, out, scratch, nset, nkb, NCUT=ncut, NKB=nkb_pow2, CAND=cand,
                SAMPLE=sample, SPLIT=split,
                num_warps=num_warps or (max(1, nkb_pow2 // 512) if sample else 1 if nkb_pow2 <= 2048 else 2))
            if split:
                _topk_set_kernel[(rows,)](scratch, nset, cuts, table, out, nkb, NCUT=ncut, CAND=cand, SAMPLE=sample,
                                          num_warps=SET_WARPS)
            _text_full(out, text_q_blocks, text_k_blocks)
            return out
    bounds = []
    for lvl in (1, 2, 4, 8):
        if lvl not in cfg.mask_ratios:
            bounds += [2.0 * nkb + 2.0] * 2  # an absent level matches nothing
            continue
        lo, hi = cfg.mask_ratios[lvl]
        if not threshold:  # topk: rank r gets the level when floor(lo*N+0.5) <= r < floor(hi*N+0.5)
            lo, hi = float(math.floor(lo * nkb + 0.5)), float(math.floor(hi * nkb + 0.5))
        bounds += [lo, hi]
    keep = max(1, math.ceil(MIN_FULL_SHARE * nkb)) if threshold else 0
    nkb_pow2 = triton.next_power_of_2(nkb)
    # One program sorting thousands of keys is slower than torch's segmented sort followed by
    # the kernel (benchmarks/NOTES.md): long rows are ranked by torch, the kernel does the rest.
    presorted = nkb_pow2 > (PRESORT_ABOVE if presort_above is None else presort_above)
    order = scores
    if presorted:
        scores, order = scores.sort(dim=-1, descending=True, stable=True)
    _assign_levels_kernel[(scores.numel() // nkb,)](
        scores, order, out, nkb, keep, int(not cfg.use_pooled_tail), *bounds, THRESHOLD=threshold, NKB=nkb_pow2,
        PRESORTED=presorted, num_warps=num_warps or _level_warps(nkb_pow2))
    _text_full(out, text_q_blocks, text_k_blocks)
    return out


def _level_warps(nkb_pow2: int) -> int:
    """Warps of the level kernel, the fastest of benchmarks/stage_probe.py."""
    return 16 if 512 < nkb_pow2 <= 2048 else 4


def _text_full(levels: torch.Tensor, text_q_blocks, text_k_blocks) -> None:
    """Pairs with a text query block or a text key block are level 1 (in place)."""
    if text_k_blocks is not None and bool(text_k_blocks.any()):
        levels[..., text_k_blocks] = 1
    if text_q_blocks is not None and bool(text_q_blocks.any()):
        levels[..., text_q_blocks, :] = 1


def key_similarity(k: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """Mean cosine similarity of keys p-1 apart inside each pooling group, per key block.

    k: [B, H, L, D] (arranged). Returns [B, H, nkb, 3] for p = 2, 4, 8. A group of p keys
    is pooled into one; its first and last key are p-1 apart, so their similarity bounds
    how much the group's keys differ. Groups reaching past L are left out.
    """
    B, H, _, D = k.shape
    nkb = -(-L // n)
    rows = nkb * n
    kn = torch.nn.functional.normalize(k.float(), dim=-1)
    if rows > L:
        kn = torch.nn.functional.pad(kn, (0, 0, 0, rows - L))
    out = []
    for p in POOLED_LEVELS:
        cos = (kn[:, :, 0::p] * kn[:, :, p - 1::p]).sum(-1)  # [B, H, rows/p]
        valid = (torch.arange(rows // p, device=k.device) * p + p - 1) < L
        cos = (cos * valid).reshape(B, H, nkb, n // p)
        cnt = valid.reshape(nkb, n // p).sum(-1).clamp_min(1)
        out.append(cos.sum(-1) / cnt)
    return torch.stack(out, dim=-1)


def apply_similarity_guard(levels: torch.Tensor, sim: torch.Tensor, cfg: PSAConfig) -> torch.Tensor:
    """Move each pooled pair to the coarsest level p' <= p whose key similarity passes.

    levels [B, H, nqb, nkb], sim [B, H, nkb, 3]. Level 1 and skipped pairs are unchanged,
    so the guard only ever makes a level finer.
    """
    thresholds = torch.tensor([cfg.sim_thresholds.for_level(p) for p in POOLED_LEVELS],
                              device=sim.device)
    passes = sim >= thresholds  # [B, H, nkb, 3]
    # allowed[p] for the key block: finest-first chain 1 -> 2 -> 4 -> 8
    capped = torch.ones_like(passes[..., 0], dtype=torch.int8)
    best = {1: capped}
    for i, p in enumerate(POOLED_LEVELS):
        best[p] = torch.where(passes[..., i], torch.full_like(capped, p), best[POOLED_LEVELS[i - 1] if i else 1])
    out = levels.clone()
    for p in POOLED_LEVELS:
        out = torch.where(levels == p, best[p][:, :, None, :].to(levels.dtype), out)
    return out


def density(levels: torch.Tensor, tail_n: int = 0) -> torch.Tensor:
    """Density per (batch, head): sum over pairs of 1/p for p > 0, over the number of pairs;
    with a pooled tail of key blocks of ``tail_n`` tokens, level-0 pairs count 1/tail_n."""
    lv = levels.float()
    skipped = 1.0 / tail_n if tail_n else 0.0
    inv = torch.where(lv > 0, 1.0 / lv.clamp_min(1.0), torch.full_like(lv, skipped))
    return inv.mean(dim=(-1, -2))
