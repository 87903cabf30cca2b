"""Stage 6: the tile schedule of a level map over a pyramid (:mod:`.pyramid`).

The attention kernel walks, for each query block, a list of *tiles*: a tile is ``TILE_N``
pyramid rows made of equal *segments*, one segment being one key block at one level (n/p
rows); a block wider than a tile spans several tiles. Packing p pooled blocks (or several
small level-1 blocks) into one tile keeps every tile as wide as a full one, so pooled levels
cost about as much per unit of density as full resolution (``attn_impl: new_mask_type``).
``old_mask_type`` puts one key block in each tile, the research code's schedule. Per row the
schedule holds the segment list, a record of counts from which the kernel finds every regular
tile, the list of masked tiles, and the tail and heavy-key biases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .pyramid import LEVEL_ORDER, Pyramid
from .triton_compat import tl, triton


@dataclass
class Schedule:
    """Per (batch, head, query block): tiles to visit and the segments that fill them."""
    # the masked tiles, from the back: [B, H, nqb, most masked tiles of a row] int32
    tile_level: torch.Tensor   # level | sub-tile << SUB_SHIFT
    tile_seg: torch.Tensor     # first segment of each masked tile
    counts: torch.Tensor       # [B, H, nqb, 8] int32: see COUNT_FIELDS
    segs: torch.Tensor         # [B, H, nqb, max_segs] int32: first pyramid row, -1 = empty slot
    tile_n: int                # pyramid rows per tile
    packed: bool               # several segments per tile (new_mask_type)
    folded: bool = True        # a packed level's partly filled last tile is a regular one
    # per row, the logit bias (log2 units; float16 under 16-bit keys) of each tail row: log2 of
    # its real keys where the row skips the key block, -inf where it does not and past the last block
    tail_bias: torch.Tensor | None = None    # [B, H, nqb, whole tiles of key blocks]
    heavy_bias: torch.Tensor | None = None   # [B, H, nqb, heavy rows]: 0 where the key counts, else -inf

    @property
    def num_tiles(self) -> torch.Tensor:
        """[B, H, nqb] tiles per row."""
        return self.counts[..., :5].sum(-1)


# Per schedule row: regular tiles of levels 1, 2, 4, 8, masked tiles (listed in the row's
# tile list, from its back), the first segment of levels 2, 4, 8 (level 1 starts at 0) and
# the key blocks of each level. The kernel finds the segments of the t-th regular tile of
# level p at seg_p + t * per_tile(p) (regular tiles are not listed); a packed
# level's last regular tile may be partly filled (folded schedules), its real columns being
# blocks_p * n/p - t * tile_n.
COUNT_FIELDS = ("regular1", "regular2", "regular4", "regular8", "masked", "seg2", "seg4", "seg8",
                "blocks1", "blocks2", "blocks4", "blocks8")
_RECORD = tl.constexpr(len(COUNT_FIELDS))  # the record's length, as the kernels see it
# the record's fields as the kernels address them: a level's field is the level-1 one + 0, 1, 2, 3
# for levels 1, 2, 4, 8 (seg: + 0, 1, 2 for levels 2, 4, 8)
_REGULAR = tl.constexpr(COUNT_FIELDS.index("regular1"))
_MASKED = tl.constexpr(COUNT_FIELDS.index("masked"))
_SEG = tl.constexpr(COUNT_FIELDS.index("seg2"))
_BLOCKS = tl.constexpr(COUNT_FIELDS.index("blocks1"))


SCHEDULE_CHUNK = 64  # tiles of a level written per step of the schedule kernel
# Pyramid rows per kernel tile (benchmarks/NOTES.md, change 18). A key block wider than the
# tile spans several tiles (contiguous runs of rows); narrower ones are packed several to a tile.
TILE_WIDTH = 64
SUB_SHIFT = 4    # a tile's level code: level | (sub-tile of its key block << SUB_SHIFT)
_SUB = tl.constexpr(SUB_SHIFT)


def level_split(n: int, p: int, tile_n: int, packed: bool) -> tuple[int, int]:
    """(segments per tile, tiles per segment) of level p: a segment is one key block at that
    level (n/p pyramid rows)."""
    seg_len = n // p
    if seg_len >= tile_n:
        return 1, seg_len // tile_n
    return (tile_n // seg_len if packed else 1), 1


@triton.jit
def _schedule_tiles(Segs, TileLevel, TileSeg, cnt, seg_at, flag_at, holds_tail, last_tile,
                    P: tl.constexpr, PER_TILE: tl.constexpr, SPLIT: tl.constexpr, ALWAYS_MASKED: tl.constexpr,
                    FOLD: tl.constexpr, TCH: tl.constexpr):
    """The tiles of level P, whose ``cnt`` key blocks fill the segment list from ``seg_at``,
    PER_TILE segments a tile (or, when a block is wider than a tile, SPLIT tiles a segment).

    A tile whose columns are whole groups of P real keys is *regular*: the kernel finds it from
    the row's record alone (the t-th regular tile of level P starts at segment seg_P + t /
    SPLIT * PER_TILE), so it is counted, not listed; with FOLD that includes the level's last
    tile when its only flaw is empty slots at its end (the kernel masks those columns from the
    level's block count). The others (the last tile of the level when it holds the partial last
    key block, or, without FOLD, has empty slots; every tile when ALWAYS_MASKED) are *masked*
    and go to the tile list, filled from ``last_tile`` down. Empty slots of the last tile get -1.
    Returns (segment slots, regular tiles, masked tiles)."""
    groups = (cnt + PER_TILE - 1) // PER_TILE  # tiles, counting each block's sub-tiles once
    pad = tl.arange(0, PER_TILE)
    tl.store(Segs + seg_at + cnt + pad, -1, mask=pad < groups * PER_TILE - cnt)
    # the tail block comes last in its level: its sub-tiles are the level's last tiles
    if FOLD:
        last_masked = holds_tail & (groups > 0)
    else:
        last_masked = ((cnt % PER_TILE != 0) | holds_tail) & (groups > 0)
    ntiles = groups * SPLIT
    nmasked = ntiles if ALWAYS_MASKED else last_masked.to(tl.int32) * SPLIT
    nregular = ntiles - nmasked
    for t0 in range(nregular, ntiles, TCH):  # the row's masked tiles only
        t = t0 + tl.arange(0, TCH)
        slot = last_tile - (flag_at + t - nregular)
        tl.store(TileLevel + slot, P | ((t % SPLIT) << _SUB), mask=t < ntiles)
        tl.store(TileSeg + slot, seg_at + (t // SPLIT) * PER_TILE, mask=t < ntiles)
    return groups * PER_TILE, nregular, nmasked


@triton.jit
def _pick(lv, a1, a2, a4, a8):
    """Per key block, the value of its level (a1 for level 1, ...)."""
    return tl.where(lv == 1, a1, tl.where(lv == 2, a2, tl.where(lv == 4, a4, a8)))


@triton.jit
def _schedule_kernel(Levels, Segs, TileLevel, TileSeg, Counts, nkb, tail_block, s_lv, s_seg, s_tile,
                     B2, B4, B8, N: tl.constexpr, NKB: tl.constexpr,
                     PT1: tl.constexpr, PT2: tl.constexpr, PT4: tl.constexpr, PT8: tl.constexpr,
                     SP1: tl.constexpr, SP2: tl.constexpr, SP4: tl.constexpr, SP8: tl.constexpr,
                     AM1: tl.constexpr, AM2: tl.constexpr, AM4: tl.constexpr, AM8: tl.constexpr,
                     FOLD: tl.constexpr, TCH: tl.constexpr, POOLED: tl.constexpr):
    # One program: one (batch, head, query block) row. Segment positions inside the row are
    # relative (TileSeg holds row-relative offsets), so rows never look at each other.
    # One scan ranks every block within its level: the four levels' indicators are packed
    # into 16-bit fields of one int64 (a row has fewer than 2**16 key blocks). Without POOLED
    # (a pyramid of level 1 only, its schedule sized for that) a pooled pair counts as skipped,
    # so that no level map writes past the buffers.
    row = tl.program_id(0)
    kb = tl.arange(0, NKB)
    inside = kb < nkb
    lv = tl.load(Levels + row * s_lv + kb, mask=inside, other=0).to(tl.int32)
    if not POOLED:
        lv = tl.where(lv == 1, 1, 0)
    shift = _pick(lv, 0, 16, 32, 48).to(tl.int64)
    ind = tl.where((lv != 0) & inside, tl.full([NKB], 1, tl.int64) << shift, 0)
    rank = tl.cumsum(ind, 0)
    total = tl.sum(ind, 0)
    c1 = (total & 0xFFFF).to(tl.int32)
    c2 = ((total >> 16) & 0xFFFF).to(tl.int32)
    c4 = ((total >> 32) & 0xFFFF).to(tl.int32)
    c8 = ((total >> 48) & 0xFFFF).to(tl.int32)
    s2 = (c1 + PT1 - 1) // PT1 * PT1  # each level's segments start at a whole tile
    s4 = s2 + (c2 + PT2 - 1) // PT2 * PT2
    s8 = s4 + (c4 + PT4 - 1) // PT4 * PT4
    pos = ((rank >> shift) & 0xFFFF).to(tl.int32) - 1
    seg_at = _pick(lv, 0, s2, s4, s8)
    first_row = _pick(lv, kb * N, B2 + kb * (N // 2), B4 + kb * (N // 4), B8 + kb * (N // 8))
    segs = Segs + row * s_seg
    tl.store(segs + seg_at + pos, first_row, mask=(lv != 0) & inside)
    tail_lv = tl.load(Levels + row * s_lv + tl.maximum(tail_block, 0)).to(tl.int32)
    tail_lv = tl.where(tail_block >= 0, tail_lv, 0)
    if not POOLED:
        tail_lv = tl.where(tail_lv == 1, 1, 0)
    tlev = TileLevel + row * s_tile
    tseg = TileSeg + row * s_tile
    last = s_tile - 1
    _, r1, m1 = _schedule_tiles(segs, tlev, tseg, c1, 0, 0, tail_lv == 1, last, 1, PT1, SP1, AM1, FOLD, TCH)
    _, r2, m2 = _schedule_tiles(segs, tlev, tseg, c2, s2, m1, tail_lv == 2, last, 2, PT2, SP2, AM2, FOLD, TCH)
    _, r4, m4 = _schedule_tiles(segs, tlev, tseg, c4, s4, m1 + m2, tail_lv == 4, last, 4, PT4, SP4, AM4, FOLD, TCH)
    _, r8, m8 = _schedule_tiles(segs, tlev, tseg, c8, s8, m1 + m2 + m4, tail_lv == 8, last,
                                8, PT8, SP8, AM8, FOLD, TCH)
    rec = Counts + row * _RECORD
    tl.store(rec + _REGULAR, r1)
    tl.store(rec + _REGULAR + 1, r2)
    tl.store(rec + _REGULAR + 2, r4)
    tl.store(rec + _REGULAR + 3, r8)
    tl.store(rec + _MASKED, m1 + m2 + m4 + m8)
    tl.store(rec + _SEG, s2)
    tl.store(rec + _SEG + 1, s4)
    tl.store(rec + _SEG + 2, s8)
    tl.store(rec + _BLOCKS, c1)
    tl.store(rec + _BLOCKS + 1, c2)
    tl.store(rec + _BLOCKS + 2, c4)
    tl.store(rec + _BLOCKS + 3, c8)


def _schedule_shape(nkb: int, n: int, packed: bool, tn: int, held: tuple = LEVEL_ORDER):
    """Segments per tile, tiles per segment and whether every tile is masked, per level; and the
    worst-case segment slots and masked tiles of one schedule row whose levels are among
    ``held``. Masked tiles: a level's last tiles (those of one key block) unless all are."""
    shapes = {p: level_split(n, p, tn, packed) for p in LEVEL_ORDER}
    per_tile = {p: shapes[p][0] for p in LEVEL_ORDER}
    split = {p: shapes[p][1] for p in LEVEL_ORDER}
    groups = {p: -(-nkb // per_tile[p]) for p in LEVEL_ORDER}
    # without packing, a tile of a level whose block is narrower than the tile has empty rows
    always_masked = {p: per_tile[p] * (n // p) < tn for p in LEVEL_ORDER}
    masked = {p: groups[p] * split[p] if always_masked[p] else split[p] for p in LEVEL_ORDER}
    return (per_tile, split, always_masked, sum(groups[p] * per_tile[p] for p in held),
            sum(masked[p] for p in held))


def build_schedule(levels: torch.Tensor, pyr: Pyramid, packed: bool, tile_n: int | None = None,
                   num_warps: int | None = None, fold: bool = True,
                   tail_spread: torch.Tensor | None = None) -> Schedule:
    """Turn a level map into segment lists (key blocks ascending within a level, levels 1, 2, 4,
    8 in turn), the per-row record of regular tiles (found from the record alone) and the list
    of masked tiles. With ``fold`` a packed level's partly filled last tile stays in its
    regular loop, which masks the empty columns (benchmarks/NOTES.md change 26); otherwise it
    is a masked tile.

    One Triton program per row; buffers are sized for the worst case of any level map, so
    nothing is read back to the host. One warp a row up to 512 key blocks, else four (H100
    probe, benchmarks/NOTES.md change 25). ``tail_spread`` ([B, H, nqb, nkb], natural log):
    added to each skipped pair's tail bias (:mod:`tail_spread`)."""
    B, H, nqb, nkb = levels.shape
    if nkb >= 1 << 16:
        raise ValueError(f"{nkb} key blocks in a row; allowed: fewer than {1 << 16} (a larger block_size.n)")
    n = pyr.n
    tn = tile_n or TILE_WIDTH
    # sized for the levels the pyramid holds: a level-1 pyramid's schedule is a quarter of the size
    per_tile, split, always_masked, max_segs, max_masked = _schedule_shape(nkb, n, packed, tn, pyr.levels_held)
    dev = levels.device
    lv = levels.reshape(B * H * nqb, nkb)
    if lv.stride(-1) != 1:
        lv = lv.contiguous()
    segs = torch.empty((B, H, nqb, max_segs), dtype=torch.int32, device=dev)
    tile_level = torch.empty((B, H, nqb, max_masked), dtype=torch.int32, device=dev)
    tile_seg = torch.empty((B, H, nqb, max_masked), dtype=torch.int32, device=dev)
    counts = torch.empty((B, H, nqb, len(COUNT_FIELDS)), dtype=torch.int32, device=dev)
    tail_block = nkb - 1 if nkb * n > pyr.length else -1  # the last key block has padding rows
    p2 = triton.next_power_of_2
    _schedule_kernel[(B * H * nqb,)](
        lv, segs, tile_level, tile_seg, counts, nkb, tail_block, lv.stride(0), max_segs, max_masked,
        pyr.base.get(2, 0), pyr.base.get(4, 0), pyr.base.get(8, 0), N=n, NKB=p2(nkb),
        PT1=per_tile[1], PT2=per_tile[2], PT4=per_tile[4], PT8=per_tile[8],
        SP1=split[1], SP2=split[2], SP4=split[4], SP8=split[8],
        AM1=always_masked[1], AM2=always_masked[2], AM4=always_masked[4], AM8=always_masked[8],
        FOLD=fold, TCH=SCHEDULE_CHUNK, POOLED=len(pyr.levels_held) > 1,
        num_warps=num_warps or (1 if nkb <= 512 else 4))
    if tail_spread is not None:
        if not pyr.has_tail or tuple(tail_spread.shape) != (B, H, nqb, nkb):
            raise ValueError(f"tail_spread: got {tuple(tail_spread.shape)}; allowed: [B, H, nqb, nkb] = "
                             f"{[B, H, nqb, nkb]}, with a pyramid that has a tail")
        tail_spread = tail_spread.float().reshape(B * H * nqb, nkb).contiguous()
    tail_bias, heavy_bias = _column_biases(lv, pyr, (B, H, nqb, nkb), tail_spread)
    return Schedule(tile_level, tile_seg, counts, segs, tn, packed, fold, tail_bias, heavy_bias)


@triton.jit
def _skips(lv, POOLED: tl.constexpr):
    """Whether pairs of level lv are skipped (level 0; without POOLED every level but 1)."""
    if POOLED:
        return lv == 0
    else:
        return lv != 1


@triton.jit
def _column_bias_kernel(Levels, TailLn, HBlock, TailOut, HeavyOut, Spread, nkb, nqb, s_lv, s_tln, s_hb,
                        tail_cols, heavy_rows, TAIL: tl.constexpr, HEAVY: tl.constexpr, CH: tl.constexpr,
                        POOLED: tl.constexpr, SPREAD: tl.constexpr):
    # One program: one (batch, head, query block) row of the level map. The attention kernel then
    # reads one bias vector per tail or heavy tile instead of the level map and the counts
    # (two loads and a gather a tile: benchmarks/NOTES.md, change 35). Without POOLED a pooled
    # pair is skipped, as the schedule kernel has it. SPREAD: each skipped pair's tail bias plus
    # its spread correction (row-major [rows, nkb], natural log).
    row = tl.program_id(0)
    bh = row // nqb
    lv_row = Levels + row * s_lv
    c = tl.arange(0, CH)
    if TAIL:
        for c0 in range(0, tail_cols, CH):
            kb = c0 + c
            inside = kb < nkb
            skipped = _skips(tl.load(lv_row + kb, mask=inside, other=1), POOLED) & inside
            ln = tl.load(TailLn + bh * s_tln + kb, mask=skipped, other=0.0)
            if SPREAD:
                ln += tl.load(Spread + row * nkb + kb, mask=skipped, other=0.0)
            tl.store(TailOut + row * tail_cols + kb, tl.where(skipped, ln * 1.4426950408889634, float("-inf"))
                     .to(TailOut.dtype.element_ty))
    if HEAVY:
        for c0 in range(0, heavy_rows, CH):
            i = c0 + c
            blk = tl.load(HBlock + bh * s_hb + i)
            real = blk >= 0
            skipped = _skips(tl.load(lv_row + tl.maximum(blk, 0), mask=real, other=1), POOLED) & real
            tl.store(HeavyOut + row * heavy_rows + i,
                     tl.where(skipped, 0.0, float("-inf")).to(HeavyOut.dtype.element_ty))


def _column_biases(lv: torch.Tensor, pyr: Pyramid, shape,
                   spread: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The schedule's per-row tail and heavy-key biases (see :class:`Schedule`) for the level map
    ``lv`` ([B*H*nqb, nkb], unit stride along key blocks)."""
    B, H, nqb, nkb = shape
    if not (pyr.has_tail or pyr.has_heavy):
        return None, None
    dev = lv.device
    tail_cols = -(-nkb // TILE_WIDTH) * TILE_WIDTH if pyr.has_tail else 0
    heavy_rows = pyr.heavy_block.shape[-1] if pyr.has_heavy else 0
    # float16 under 16-bit keys (its rounding of log2 count, 2**-11, is below theirs), else float32
    dt = torch.float32 if pyr.k.dtype == torch.float32 else torch.float16
    tail = torch.empty((B, H, nqb, tail_cols), device=dev, dtype=dt) if pyr.has_tail else None
    heavy = torch.empty((B, H, nqb, heavy_rows), device=dev, dtype=dt) if pyr.has_heavy else None
    if pyr.has_tail and pyr.tail_bias is not None:  # per (batch, head): heavy keys left some blocks
        tln, s_tln = pyr.tail_bias.reshape(B * H, nkb).contiguous(), nkb
    elif pyr.has_tail:  # one ln count per key block for all heads
        tln, s_tln = pyr.bias[pyr.base[0]:pyr.base[0] + nkb], 0
    else:
        tln, s_tln = lv, 0
    hb = pyr.heavy_block.reshape(B * H, heavy_rows).contiguous() if pyr.has_heavy else lv
    _column_bias_kernel[(B * H * nqb,)](
        lv, tln, hb, tail if tail is not None else lv, heavy if heavy is not None else lv,
        spread if spread is not None else lv, nkb, nqb, lv.stride(0), s_tln, heavy_rows, tail_cols, heavy_rows,
        TAIL=pyr.has_tail, HEAVY=pyr.has_heavy, CH=TILE_WIDTH, POOLED=len(pyr.levels_held) > 1,
        SPREAD=spread is not None, num_warps=1)
    return tail, heavy
