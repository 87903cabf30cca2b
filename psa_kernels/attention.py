"""Stage 7: pyramid attention over a schedule (:mod:`.schedule`) of a pyramid (:mod:`.pyramid`).

The Triton kernel reads, per query block, its regular tiles level by level (each level's loop
with its segment length and bias known at compile time), its masked tiles, the tail means of
the blocks its level map skips and the heavy keys of those blocks, in one online softmax.
:func:`attention_reference` computes the same in torch, straight from the level map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .pyramid import LEVEL_ORDER, LOG2E, Pyramid, pyramid_rows
from .schedule import (_BLOCKS, _MASKED, _RECORD, _REGULAR, _SEG, _SUB, COUNT_FIELDS, TILE_WIDTH, Schedule,
                       _schedule_shape)
from .triton_compat import tl, triton


def _reference_rows(pyr: Pyramid, b: int, h: int, nkb: int):
    """The rows one (batch, head) of a pyramid offers, in float32: keys, values, bias (natural
    log), the level each row serves (0: tail and heavy keys) and its key block."""
    n, dev = pyr.n, pyr.k.device
    ks, vs, bs, lvs, kbs = [], [], [], [], []
    for p in LEVEL_ORDER + (0,):
        if p not in pyr.base or (p == 8 and 2 not in pyr.base):  # a lone level 8 only feeds the tail
            continue
        rows = nkb if p == 0 else nkb * n // p
        if p == 1 and pyr.source is not None:  # level 1 in place: the caller's rows, arranged
            k1, v1 = (x[b, h].float() for x in pyr.source)
            idx = pyr.perm.long() if pyr.perm is not None else torch.arange(pyr.length, device=dev)
            pad = rows - pyr.length
            ks.append(torch.nn.functional.pad(k1[idx], (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v1[idx], (0, 0, 0, pad)))
            bs.append(torch.where(torch.arange(rows, device=dev) < pyr.length, 0.0, float("-inf")))
        else:
            at = pyr.base[p]
            ks.append(pyr.k[b, h, at:at + rows].float())
            vs.append(pyr.v[b, h, at:at + rows].float())
            bs.append(pyr.tail_bias_of(b, h) if p == 0 else pyr.bias[at:at + rows])
        lvs.append(torch.full((rows,), p, device=dev))
        kbs.append(torch.arange(rows, device=dev) // (1 if p == 0 else n // p))
    if pyr.has_heavy:  # heavy keys carry level 0 too, each with its own block
        blk = pyr.heavy_block[b, h].long()
        ks.append(pyr.heavy_k[b, h].float())
        vs.append(pyr.heavy_v[b, h].float())
        bs.append(torch.where(blk >= 0, 0.0, float("-inf")))
        lvs.append(torch.zeros_like(blk))
        kbs.append(blk.clamp_min(0))
    return torch.cat(ks), torch.cat(vs), torch.cat(bs), torch.cat(lvs), torch.cat(kbs)


def attention_reference(q: torch.Tensor, pyr: Pyramid, levels: torch.Tensor, m: int,
                        q_chunk: int = 1024, tail_spread: torch.Tensor | None = None) -> torch.Tensor:
    """Pyramid attention in torch (float32 math), straight from the level map.

    q: [B, H, L, D] arranged; levels: [B, H, nqb, nkb]. Each query attends to every
    pyramid row whose (query block, key block) pair has that row's level; with a tail, also
    to the mean of every block at level 0, and with heavy keys to each heavy key whose block
    is at level 0. Any pyramid, that of :func:`build_pyramid` or :func:`build_pyramid_triton`
    (level 1 read in place included). ``tail_spread`` [B, H, nqb, nkb] (natural log) is added
    to the logit of each tail row of a skipped pair (:mod:`tail_spread`).
    """
    B, H, L, D = q.shape
    nkb = levels.shape[-1]
    if tail_spread is not None and not pyr.has_tail:
        raise ValueError("tail_spread needs a pyramid with a tail")
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kf, vf, bias, lvl_of_row, kblock_of_row = _reference_rows(pyr, b, h, nkb)
            tail_rows = lvl_of_row == 0  # the tail's rows, then heavy keys (level 0 too) at the end
            if pyr.has_heavy:
                tail_rows[-pyr.heavy_block.shape[-1]:] = False
            for s in range(0, L, q_chunk):
                qc = q[b, h, s:s + q_chunk].float()
                qblk = torch.arange(s, s + qc.shape[0], device=q.device) // m
                lv = levels[b, h][qblk][:, kblock_of_row]  # [rows_q, pyramid and heavy rows]
                logits = qc @ kf.T * scale + bias
                if tail_spread is not None:
                    logits[:, tail_rows] += tail_spread[b, h][qblk][:, kblock_of_row[tail_rows]].float()
                logits = logits.masked_fill(lv != lvl_of_row, float("-inf"))
                out[b, h, s:s + q_chunk] = (logits.softmax(-1) @ vf).to(q.dtype)
    return out


def attention_bytes_per_head(B: int, L: int, D: int, element_size: int, m: int, n: int, packed: bool,
                             tail: bool = False, level1: bool = True, pooled: bool = True) -> int:
    """Device memory the pyramid and the tile schedule of one head take (B batch entries)."""
    nkb, nqb = -(-L // n), -(-L // m)
    _, _, _, max_segs, max_masked = _schedule_shape(nkb, n, packed, TILE_WIDTH, LEVEL_ORDER if pooled else (1,))
    rows = pyramid_rows(nkb, n, tail, level1, pooled)
    biases = nqb * (-(-nkb // TILE_WIDTH) * TILE_WIDTH if tail else 0) * 4  # the schedule's tail bias, at most
    return B * (2 * rows * D * element_size + nqb * (max_segs + 2 * max_masked + len(COUNT_FIELDS)) * 4 + biases)


@triton.jit
def _regular_tile(kbase, vbase, seg_row, seg_first, t, r, skl, svl, dd, Perm, SEG_LEN: tl.constexpr,
                  TILE_N: tl.constexpr, PER_TILE: tl.constexpr, GATHER: tl.constexpr):
    """Keys and values of the t-th regular tile of a level: TILE_N real pyramid rows in
    segments of SEG_LEN rows whose first rows are seg_row[seg_first + ...]. seg_first comes
    from the schedule record, so the address of every row depends on one load only (no
    tile-list loads in the loop). With GATHER the rows are arranged rows of level 1 read in
    place: row r of the caller's keys is Perm[r]."""
    if SEG_LEN >= TILE_N:  # a contiguous, aligned run of rows of one key block
        SPLIT: tl.constexpr = SEG_LEN // TILE_N
        start = tl.load(seg_row + seg_first + t // SPLIT) + (t % SPLIT) * TILE_N
        prow = tl.multiple_of(start, TILE_N) + r
    else:  # PER_TILE segments; an empty slot (-1, only in a folded last tile) reads real rows
        prow = tl.maximum(tl.load(seg_row + seg_first + t * PER_TILE + r // SEG_LEN), 0) + r % SEG_LEN
    if GATHER:
        prow = tl.load(Perm + prow)
    k = tl.load(kbase + prow[:, None] * skl + dd[None, :])
    v = tl.load(vbase + prow[:, None] * svl + dd[None, :])
    return k, v


@triton.jit
def _pyramid_rows(kbase, vbase, Bias, prow, valid, skl, svl, dd):
    """Keys, values and bias (log2 units) of pyramid rows prow (-inf where not valid)."""
    k = tl.load(kbase + prow[:, None] * skl + dd[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(vbase + prow[:, None] * svl + dd[None, :], mask=valid[:, None], other=0.0)
    bias = tl.load(Bias + prow, mask=valid, other=float("-inf")) * 1.4426950408889634
    return k, v, bias


@triton.jit
def _in_place_rows(k1base, v1base, prow, valid, s1l, dd, Perm, L, HAS_PERM: tl.constexpr):
    """Keys, values and bias of arranged level-1 rows prow read in place from the caller's
    keys (row Perm[prow]); rows past L are padding (-inf, as are rows not valid)."""
    real = valid & (prow < L)
    src = prow
    if HAS_PERM:
        src = tl.load(Perm + prow, mask=real, other=0)
    k = tl.load(k1base + src[:, None] * s1l + dd[None, :], mask=real[:, None], other=0.0)
    v = tl.load(v1base + src[:, None] * s1l + dd[None, :], mask=real[:, None], other=0.0)
    return k, v, tl.where(real, 0.0, float("-inf"))


@triton.jit
def _masked_tile(kbase, vbase, Bias, seg_row, first, code, r, skl, svl, dd, k1base, v1base, s1l, Perm, L,
                 N: tl.constexpr, TILE_N: tl.constexpr, PACKED: tl.constexpr, SRC_L1: tl.constexpr,
                 HAS_PERM: tl.constexpr):
    """Keys, values and per-row bias (log2 units) of a masked tile (segments of N/level rows,
    empty slots -1; ``code`` holds the level and which sub-tile of a wider block this is).
    With SRC_L1 a level-1 tile reads the caller's keys in place (arranged rows past L are
    padding)."""
    seg_len = N // (code & 15)
    slot = r // seg_len
    in_tile = (r < TILE_N) if PACKED else (slot < 1)
    seg = tl.load(seg_row + first + slot, mask=in_tile, other=-1)
    valid = seg >= 0
    prow = tl.where(valid, seg + ((code >> _SUB) * TILE_N + r) % seg_len, 0)
    if SRC_L1:
        if (code & 15) == 1:
            k, v, bias = _in_place_rows(k1base, v1base, prow, valid, s1l, dd, Perm, L, HAS_PERM)
        else:
            k, v, bias = _pyramid_rows(kbase, vbase, Bias, prow, valid, skl, svl, dd)
    else:
        k, v, bias = _pyramid_rows(kbase, vbase, Bias, prow, valid, skl, svl, dd)
    return k, v, bias


@triton.jit
def _masked_step(q, kbase, vbase, Bias, code_at, first_at, seg_row, r, skl, svl, dd, k1base, v1base, s1l, Perm, L,
                 scale, m_i, l_i, acc, N: tl.constexpr, TILE_N: tl.constexpr, PACKED: tl.constexpr,
                 SRC_L1: tl.constexpr, HAS_PERM: tl.constexpr):
    """One masked tile: its keys and values, the per-row bias, the softmax step."""
    k, v, bias = _masked_tile(kbase, vbase, Bias, seg_row, tl.load(first_at), tl.load(code_at), r, skl, svl, dd,
                              k1base, v1base, s1l, Perm, L, N, TILE_N, PACKED, SRC_L1, HAS_PERM)
    # logits formed once: a vector bias would otherwise be added twice per score
    s = tl.dot(q, tl.trans(k)) * scale + bias[None, :]
    return _attend_tile(s, v, 1.0, 0.0, m_i, l_i, acc)


@triton.jit
def _attend_tile(s, v, scale, bias, m_i, l_i, acc):
    """Online-softmax step over a tile of scores s; the logits in log2 units are
    s * scale + bias (scalar scale and bias: one fused multiply-add per score)."""
    m_new = tl.maximum(m_i, tl.max(s * scale + bias, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * scale + (bias - m_new[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_logits(x, v, m_i, l_i, acc):
    """Online-softmax step over a tile of logits x (log2 units, -inf for masked columns); a
    tile may be wholly masked while nothing came before it (a tail tile of a row with no
    skipped block among its columns)."""
    m_new = tl.maximum(m_i, tl.max(x, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(x - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _tail_step(q, kbase, vbase, tb_row, tail_base, nkb, t, r, skl, svl, dd, scale, m_i, l_i, acc,
               TILE_N: tl.constexpr):
    """TILE_N block means of the tail; ``tb_row``: this row's bias per block (log2 of its real
    keys where the row skips the block, -inf elsewhere: :func:`_column_bias_kernel`)."""
    kb = t * TILE_N + r
    inside = kb < nkb
    prow = tail_base + kb
    k = tl.load(kbase + prow[:, None] * skl + dd[None, :], mask=inside[:, None], other=0.0)
    v = tl.load(vbase + prow[:, None] * svl + dd[None, :], mask=inside[:, None], other=0.0)
    colb = tl.load(tb_row + kb).to(tl.float32)
    s = tl.dot(q, tl.trans(k))
    return _attend_logits(s * scale + colb[None, :], v, m_i, l_i, acc)


@triton.jit
def _heavy_step(q, hk, hv, hb_row, t, r, shl, dd, scale, m_i, l_i, acc, TILE_N: tl.constexpr):
    """TILE_N heavy keys; ``hb_row``: this row's bias per heavy key (0 where its block is skipped
    by this row, -inf elsewhere and for padding rows)."""
    hrow = t * TILE_N + r
    k = tl.load(hk + hrow[:, None] * shl + dd[None, :])
    v = tl.load(hv + hrow[:, None] * shl + dd[None, :])
    colb = tl.load(hb_row + hrow).to(tl.float32)
    s = tl.dot(q, tl.trans(k))
    return _attend_logits(s * scale + colb[None, :], v, m_i, l_i, acc)


@triton.jit
def _regular_step(q, kbase, vbase, seg_row, seg_first, t, cols, r, skl, svl, dd, Perm, scale, m_i, l_i, acc,
                  SEG_LEN: tl.constexpr, TILE_N: tl.constexpr, PER_TILE: tl.constexpr, BIAS: tl.constexpr,
                  FOLD: tl.constexpr, GATHER: tl.constexpr):
    k, v = _regular_tile(kbase, vbase, seg_row, seg_first, t, r, skl, svl, dd, Perm, SEG_LEN, TILE_N, PER_TILE,
                         GATHER)
    s = tl.dot(q, tl.trans(k))
    if FOLD and PER_TILE > 1:  # a level's last tile may end in empty slots: mask past its real columns
        colb = tl.where(r < cols - t * TILE_N, BIAS, float("-inf"))
        return _attend_logits(s * scale + colb[None, :], v, m_i, l_i, acc)
    else:
        return _attend_tile(s, v, scale, BIAS, m_i, l_i, acc)


@triton.jit
def _regular_loop(q, kbase, vbase, seg_row, seg_first, ntiles, blocks, r, skl, svl, dd, Perm, scale, m_i, l_i, acc,
                  P: tl.constexpr, N: tl.constexpr, TILE_N: tl.constexpr, PACKED: tl.constexpr,
                  LOOP_STAGES: tl.constexpr, FOLD: tl.constexpr, GATHER: tl.constexpr = False):
    """The regular tiles of level P: every column stands for P real keys (bias log2 P), up
    to the level's ``blocks`` key blocks (the last tile of a folded packed level may end in
    empty slots). GATHER: level 1 read in place through Perm (:func:`_regular_tile`)."""
    SEG_LEN: tl.constexpr = N // P
    PER_TILE: tl.constexpr = TILE_N // SEG_LEN if PACKED else 1
    BIAS: tl.constexpr = 0.0 if P == 1 else (1.0 if P == 2 else (2.0 if P == 4 else 3.0))
    cols = blocks * SEG_LEN
    if LOOP_STAGES > 0:  # the loop's own pipelining also prefetches the segment starts
        for t in tl.range(0, ntiles, num_stages=LOOP_STAGES):
            m_i, l_i, acc = _regular_step(q, kbase, vbase, seg_row, seg_first, t, cols, r, skl, svl, dd, Perm, scale,
                                          m_i, l_i, acc, SEG_LEN, TILE_N, PER_TILE, BIAS, FOLD, GATHER)
    else:
        for t in range(0, ntiles):
            m_i, l_i, acc = _regular_step(q, kbase, vbase, seg_row, seg_first, t, cols, r, skl, svl, dd, Perm, scale,
                                          m_i, l_i, acc, SEG_LEN, TILE_N, PER_TILE, BIAS, FOLD, GATHER)
    return m_i, l_i, acc


@triton.jit
def _pyramid_attn_kernel(Q, KP, VP, Bias, Out, TileLevel, TileSeg, Counts, Segs, Perm,
                         TailBias, HK, HV, HBias, K1, V1,
                         L, sm_scale_log2, tail_base, nkb, heavy_rows,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                         s_tl, s_seg, s_tb, s_hkb, s_hkh, s_hkl, s1b, s1h, s1l,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         N: tl.constexpr, TILE_N: tl.constexpr, PACKED: tl.constexpr,
                         HAS_PERM: tl.constexpr, LOOP_STAGES: tl.constexpr, FOLD: tl.constexpr,
                         TAIL: tl.constexpr, HEAVY: tl.constexpr, SRC_L1: tl.constexpr):
    # Branch-free loops, so that loads pipeline: the regular tiles of each level in a loop of
    # their own (segment length and bias known at compile time), then the masked tiles
    # (empty slots or the partial last block: masked loads and the per-row ln(count) bias).
    # With SRC_L1 level 1 is read in place from the caller's keys and values K1, V1 (strides
    # s1*, shared), in the arranged order through Perm.
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = bh * tl.num_programs(0) + qb  # (b, h, qb) row of the schedule

    rm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    qmask = rm < L
    src = rm
    if HAS_PERM:  # queries are read from, and outputs written to, the caller's order
        src = tl.load(Perm + rm, mask=qmask, other=0)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + src[:, None] * sql + dd[None, :], mask=qmask[:, None], other=0.0)
    kbase = KP + b * skb + h * skh
    vbase = VP + b * svb + h * svh
    if SRC_L1:
        k1base = K1 + b * s1b + h * s1h
        v1base = V1 + b * s1b + h * s1h
        k1l = s1l
        v1l = s1l
    else:
        k1base = kbase
        v1base = vbase
        k1l = skl
        v1l = svl
    seg_row = Segs + row * s_seg
    tiles = row * s_tl
    r = tl.arange(0, TILE_N)
    rec = Counts + row * _RECORD

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    scale = sm_scale_log2
    # level by level: (first segment, regular tiles, key blocks) from the row's record
    m_i, l_i, acc = _regular_loop(q, k1base, v1base, seg_row, 0, tl.load(rec + _REGULAR), tl.load(rec + _BLOCKS),
                                  r, k1l, v1l, dd, Perm, scale, m_i, l_i, acc, 1, N, TILE_N, PACKED, LOOP_STAGES,
                                  FOLD, SRC_L1 and HAS_PERM)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + _SEG), tl.load(rec + _REGULAR + 1),
                                  tl.load(rec + _BLOCKS + 1), r, skl, svl, dd, Perm, scale, m_i, l_i, acc,
                                  2, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + _SEG + 1), tl.load(rec + _REGULAR + 2),
                                  tl.load(rec + _BLOCKS + 2), r, skl, svl, dd, Perm, scale, m_i, l_i, acc,
                                  4, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + _SEG + 2), tl.load(rec + _REGULAR + 3),
                                  tl.load(rec + _BLOCKS + 3), r, skl, svl, dd, Perm, scale, m_i, l_i, acc,
                                  8, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    # masked tiles: empty slots or the partial last block, masked loads and the per-row
    # ln(count) bias (pipelined by the kernel-wide num_stages; the loop's own pipelining moved
    # the time by -3% to +7% by preset, benchmarks/NOTES.md change 18)
    for t in range(s_tl - tl.load(rec + _MASKED), s_tl):
        m_i, l_i, acc = _masked_step(q, kbase, vbase, Bias, TileLevel + tiles + t, TileSeg + tiles + t, seg_row,
                                     r, skl, svl, dd, k1base, v1base, k1l, Perm, L, scale, m_i, l_i, acc,
                                     N, TILE_N, PACKED, SRC_L1, HAS_PERM)
    if TAIL:  # the means of the skipped blocks, their biases from the schedule
        tb_row = TailBias + row * s_tb
        # two stages: three would add this loop's buffers to the program's shared memory and
        # leave room for one program per multiprocessor instead of two (NOTES.md, change 30)
        for t in tl.range(0, tl.cdiv(nkb, TILE_N), num_stages=2):
            m_i, l_i, acc = _tail_step(q, kbase, vbase, tb_row, tail_base, nkb, t, r, skl, svl, dd,
                                       scale, m_i, l_i, acc, TILE_N)
    if HEAVY:  # the heavy keys of the skipped blocks, one by one
        hk = HK + b * s_hkb + h * s_hkh
        hv = HV + b * s_hkb + h * s_hkh
        hb_row = HBias + row * heavy_rows
        for t in tl.range(0, heavy_rows // TILE_N, num_stages=2):
            m_i, l_i, acc = _heavy_step(q, hk, hv, hb_row, t, r, s_hkl, dd, scale, m_i, l_i, acc, TILE_N)
    acc = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + src[:, None] * sol + dd[None, :], acc.to(Out.dtype.element_ty),
             mask=qmask[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    """How the attention kernel is launched: warps, pipeline stages of the loops that the
    kernel-wide setting drives (the masked loop), a register cap per thread (None: the
    compiler's choice), and the stages of the per-level loops' own pipelining (0: the
    kernel-wide setting), which also prefetches each tile's segment starts."""
    num_warps: int
    num_stages: int
    maxnreg: int | None = None
    loop_stages: int = 0


def kernel_launch_config(m: int, tile_n: int, packed: bool = True, head_dim: int = 128,
                         major: int = 9, in_place: bool = False) -> LaunchConfig:
    """The fastest launch of the H100 sweeps (benchmarks/NOTES.md, change 18). For 128-row
    query blocks on 64-row tiles: 8 warps, 2 stages and at most 128 registers a thread, so
    that two programs share a multiprocessor (one's softmax runs under the other's matrix
    products); the per-level loops pipelined 3 deep. The register cap only where the shared
    memory holds two programs (Hopper, compute capability ``major`` >= 9; elsewhere it would
    only add spills) and the accumulator fits under it (head dim <= 128). Wider tiles: 8
    warps and 3 stages (2 where one key block per tile leaves most tiles masked). Smaller
    query blocks: 4 warps, 2 stages. Level 1 read ``in_place`` (gathered rows): the loops
    pipelined 2 deep (H200 probe, NOTES.md change 40)."""
    if m >= 128 and tile_n <= 64:
        return LaunchConfig(8, 2, 128 if head_dim <= 128 and major >= 9 else None, 2 if in_place else 3)
    if m >= 128:
        return LaunchConfig(8, 3 if packed else 2)
    return LaunchConfig(4, 2)


def attention_triton(q: torch.Tensor, pyr: Pyramid, sched: Schedule, m: int,
                     out: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                     launch: LaunchConfig | None = None) -> torch.Tensor:
    """The pyramid attention kernel over a schedule; same function as attention_reference.

    With ``perm``, q and the output are in the caller's order (arranged = x[..., perm, :]).
    A pyramid with a tail or heavy keys needs a schedule built from it (:func:`build_schedule`
    then holds, per row, which tail rows and heavy keys count).
    ``launch``: :func:`kernel_launch_config`'s unless given (benchmarks sweep others)."""
    B, H, L, D = q.shape
    nqb = sched.counts.shape[2]
    if out is None:
        out = torch.empty_like(q)
    major = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 9
    cfg = launch or kernel_launch_config(m, sched.tile_n, sched.packed, D, major, pyr.source is not None)
    sm_scale_log2 = LOG2E / math.sqrt(D)
    tail, heavy = pyr.has_tail, pyr.has_heavy
    nkb = -(-L // pyr.n)
    if (tail and (sched.tail_bias is None or sched.tail_bias.shape[-1] < nkb)) or (
            heavy and (sched.heavy_bias is None or sched.heavy_bias.shape[-1] != pyr.heavy_block.shape[-1])):
        raise ValueError("a pyramid with a tail or heavy keys needs a schedule built from it "
                         "(build_schedule(levels, pyr, ...))")
    if (tail or heavy) and sched.tile_n != TILE_WIDTH:
        raise ValueError(f"the tail and the heavy keys are read in tiles of {TILE_WIDTH} rows; got a schedule "
                         f"of {sched.tile_n}")
    tb = sched.tail_bias if tail else sched.counts
    hk, hv, hbias = (pyr.heavy_k, pyr.heavy_v, sched.heavy_bias) if heavy else (pyr.k, pyr.v, sched.counts)
    if heavy and (hk.stride() != hv.stride() or hk.stride(-1) != 1):
        raise ValueError("heavy keys and values must share one layout with unit stride along the head dim")
    in_place = pyr.source is not None
    k1, v1 = pyr.source if in_place else (pyr.k, pyr.v)
    if in_place and (k1.stride() != v1.stride() or k1.stride(-1) != 1):
        raise ValueError("keys and values read in place must share one layout with unit stride along the head dim")
    if in_place and pyr.perm is not perm:
        raise ValueError("a pyramid reading level 1 in place needs the perm it was built with")
    _pyramid_attn_kernel[(nqb, B * H)](
        q, pyr.k, pyr.v, pyr.bias, out, sched.tile_level, sched.tile_seg, sched.counts,
        sched.segs, perm if perm is not None else sched.counts, tb, hk, hv, hbias, k1, v1, L, sm_scale_log2,
        pyr.base.get(0, 0), nkb if tail else 0, hk.shape[2] if heavy else 0,
        q.stride(0), q.stride(1), q.stride(2), pyr.k.stride(0), pyr.k.stride(1), pyr.k.stride(2),
        pyr.v.stride(0), pyr.v.stride(1), pyr.v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        sched.tile_level.stride(2), sched.segs.stride(2), tb.shape[-1] if tail else 0,
        hk.stride(0), hk.stride(1), hk.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
        H=H, D=D, BLOCK_M=m, N=pyr.n, TILE_N=sched.tile_n, PACKED=sched.packed, HAS_PERM=perm is not None,
        FOLD=sched.folded, TAIL=tail, HEAVY=heavy, SRC_L1=in_place,
        LOOP_STAGES=cfg.loop_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out
