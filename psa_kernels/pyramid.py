"""Stage 5: pyramid attention over a level map.

Keys and values are kept at four resolutions in one buffer (the *pyramid*): level 1
(the arranged keys, padded to whole key blocks), then the keys mean-pooled by 2, 4 and 8.
A pooled key stands for the c real keys it averages, so it gets the logit bias ln c;
padding rows get -inf. The kernel walks, for each query block, a list of *tiles*: a tile
is ``TILE_N`` pyramid rows made of equal *segments*, one segment being one key block at
one level (n/p rows). Packing p pooled blocks (or several small level-1 blocks) into one
tile keeps every tile as wide as a full one, so pooled levels cost no more per unit of
density than full resolution (``attn_impl: new_mask_type``). ``old_mask_type`` puts one
key block in each tile, the research code's schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LEVEL_ORDER = (1, 2, 4, 8)
LOG2E = 1.4426950408889634


@dataclass
class Pyramid:
    """Keys and values of all levels in one buffer, rows ``[L1 | L1/2 | L1/4 | L1/8]``."""
    k: torch.Tensor        # [B, H, rows, D]
    v: torch.Tensor        # [B, H, rows, D]
    bias: torch.Tensor     # [rows] float32: ln(real keys per row), -inf for padding
    base: dict             # level -> first row of that level
    n: int                 # key block size


def build_pyramid(k: torch.Tensor, v: torch.Tensor, n: int, L: int) -> Pyramid:
    """Pool k and v ([B, H, L, D], arranged) by 2, 4 and 8 inside each key block of n tokens."""
    B, H, _, D = k.shape
    nkb = -(-L // n)
    rows1 = nkb * n
    counts1 = (torch.arange(rows1, device=k.device) < L).float()
    ks, vs, biases, base = [], [], [], {}
    start = 0
    for p in LEVEL_ORDER:
        base[p] = start
        cnt = counts1.reshape(rows1 // p, p).sum(-1)
        if p == 1:
            kp = torch.nn.functional.pad(k, (0, 0, 0, rows1 - L))
            vp = torch.nn.functional.pad(v, (0, 0, 0, rows1 - L))
        else:
            # Sum in float32 and divide by the number of real keys, so a pooled key of a
            # partial tail group is the mean of its real keys only.
            div = cnt.clamp_min(1.0)[None, None, :, None]
            kp = (ks[0].float().reshape(B, H, rows1 // p, p, D).sum(3) / div).to(k.dtype)
            vp = (vs[0].float().reshape(B, H, rows1 // p, p, D).sum(3) / div).to(v.dtype)
        ks.append(kp)
        vs.append(vp)
        biases.append(torch.where(cnt > 0, cnt.log(), torch.full_like(cnt, float("-inf"))))
        start += rows1 // p
    return Pyramid(torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(biases), base, n)


def attention_reference(q: torch.Tensor, pyr: Pyramid, levels: torch.Tensor, m: int,
                        q_chunk: int = 1024) -> torch.Tensor:
    """Pyramid attention in torch (float32 math), straight from the level map.

    q: [B, H, L, D] arranged; levels: [B, H, nqb, nkb]. Each query attends to every
    pyramid row whose (query block, key block) pair has that row's level.
    """
    B, H, L, D = q.shape
    n = pyr.n
    nkb = levels.shape[-1]
    row_level = torch.cat([torch.full((nkb * n // p,), p, device=q.device) for p in LEVEL_ORDER])
    row_kblock = torch.cat([torch.arange(nkb * n // p, device=q.device) // (n // p) for p in LEVEL_ORDER])
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kf, vf = pyr.k[b, h].float(), pyr.v[b, h].float()
            for s in range(0, L, q_chunk):
                qc = q[b, h, s:s + q_chunk].float()
                qblk = torch.arange(s, s + qc.shape[0], device=q.device) // m
                lv = levels[b, h][qblk][:, row_kblock]  # [rows_q, pyramid rows]
                logits = qc @ kf.T * scale + pyr.bias
                logits = logits.masked_fill(lv != row_level, float("-inf"))
                out[b, h, s:s + q_chunk] = (logits.softmax(-1) @ vf).to(q.dtype)
    return out


# ------------------------------------------------------------------------- schedule
@dataclass
class Schedule:
    """Per (batch, head, query block): tiles to visit and the segments that fill them."""
    tile_level: torch.Tensor   # [B, H, nqb, max_tiles] int32: level of each tile
    tile_seg: torch.Tensor     # [B, H, nqb, max_tiles] int32: first segment of each tile
    num_tiles: torch.Tensor    # [B, H, nqb] int32
    segs: torch.Tensor         # [B, H, nqb, max_segs] int32: first pyramid row, -1 = empty slot
    tile_n: int                # pyramid rows per tile
    packed: bool               # several segments per tile (new_mask_type)


def tile_width(n: int) -> int:
    """Pyramid rows per kernel tile: at least 64 so every tile feeds the tensor cores well."""
    return max(n, 64)


def build_schedule(levels: torch.Tensor, pyr: Pyramid, packed: bool) -> Schedule:
    """Turn a level map into tile lists, level by level (1, 2, 4, 8), key blocks ascending."""
    B, H, nqb, nkb = levels.shape
    n = pyr.n
    tn = tile_width(n)
    dev = levels.device
    R = B * H * nqb
    lv = levels.reshape(R, nkb)
    kb = torch.arange(nkb, device=dev, dtype=torch.int32)
    per_tile = {p: (tn * p // n if packed else 1) for p in LEVEL_ORDER}
    counts = {p: (lv == p).sum(-1, dtype=torch.int32) for p in LEVEL_ORDER}
    ntiles = {p: (counts[p] + per_tile[p] - 1) // per_tile[p] for p in LEVEL_ORDER}
    seg_start, tile_start = {}, {}
    seg_acc = torch.zeros(R, dtype=torch.int32, device=dev)
    tile_acc = torch.zeros(R, dtype=torch.int32, device=dev)
    for p in LEVEL_ORDER:
        seg_start[p], tile_start[p] = seg_acc, tile_acc
        seg_acc = seg_acc + ntiles[p] * per_tile[p]
        tile_acc = tile_acc + ntiles[p]
    max_segs = max(int(seg_acc.max()) if R else 0, 1)
    max_tiles = max(int(tile_acc.max()) if R else 0, 1)
    # One spare column takes the writes of unused slots and is cut off afterwards.
    segs = torch.full((R, max_segs + 1), -1, dtype=torch.int32, device=dev)
    tile_level = torch.zeros((R, max_tiles + 1), dtype=torch.int32, device=dev)
    tile_seg = torch.zeros((R, max_tiles + 1), dtype=torch.int32, device=dev)
    for p in LEVEL_ORDER:
        mask = lv == p
        pos = mask.cumsum(-1, dtype=torch.int32) - 1
        col = torch.where(mask, seg_start[p][:, None] + pos, torch.full_like(pos, max_segs))
        segs.scatter_(1, col.long(), (pyr.base[p] + kb * (n // p)).expand(R, nkb).contiguous())
        t = torch.arange(int(ntiles[p].max()) if R else 0, device=dev, dtype=torch.int32)
        if t.numel():
            valid = t[None, :] < ntiles[p][:, None]
            tcol = torch.where(valid, tile_start[p][:, None] + t[None, :], torch.full_like(valid, max_tiles, dtype=torch.int32))
            tile_level.scatter_(1, tcol.long(), torch.full_like(tcol, p))
            tile_seg.scatter_(1, tcol.long(), seg_start[p][:, None] + t[None, :] * per_tile[p])
    shape = (B, H, nqb)
    return Schedule(tile_level[:, :max_tiles].reshape(*shape, max_tiles).contiguous(),
                    tile_seg[:, :max_tiles].reshape(*shape, max_tiles).contiguous(),
                    tile_acc.reshape(shape).contiguous(),
                    segs[:, :max_segs].reshape(*shape, max_segs).contiguous(), tn, packed)


# ------------------------------------------------------------------------- kernel
@triton.jit
def _pyramid_attn_kernel(Q, KP, VP, Bias, Out, TileLevel, TileSeg, NumTiles, Segs,
                         L, sm_scale_log2,
                         sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                         s_tl, s_seg,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         N: tl.constexpr, TILE_N: tl.constexpr, PACKED: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row = bh * tl.num_programs(0) + qb  # (b, h, qb) row of the schedule

    rm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sql + dd[None, :], mask=(rm < L)[:, None], other=0.0)
    kbase = KP + b * skb + h * skh
    vbase = VP + b * svb + h * svh
    seg_row = Segs + row * s_seg
    r = tl.arange(0, TILE_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    ntiles = tl.load(NumTiles + row)
    for t in range(0, ntiles):
        lvl = tl.load(TileLevel + row * s_tl + t)
        first = tl.load(TileSeg + row * s_tl + t)
        seg_len = N // lvl
        slot = r // seg_len
        if PACKED:
            in_tile = r < TILE_N
        else:
            in_tile = slot < 1
        seg = tl.load(seg_row + first + slot, mask=in_tile, other=-1)
        valid = seg >= 0
        prow = tl.where(valid, seg + r % seg_len, 0)
        k = tl.load(kbase + prow[:, None] * skl + dd[None, :], mask=valid[:, None], other=0.0)
        bias = tl.load(Bias + prow, mask=valid, other=float("-inf"))
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2 + (bias * 1.4426950408889634)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + prow[:, None] * svl + dd[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + rm[:, None] * sol + dd[None, :], acc.to(Out.dtype.element_ty),
             mask=(rm < L)[:, None])


def attention_triton(q: torch.Tensor, pyr: Pyramid, sched: Schedule, m: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The pyramid attention kernel over a schedule; same function as attention_reference."""
    B, H, L, D = q.shape
    nqb = sched.num_tiles.shape[-1]
    if out is None:
        out = torch.empty_like(q)
    sm_scale_log2 = LOG2E / math.sqrt(D)
    _pyramid_attn_kernel[(nqb, B * H)](
        q, pyr.k, pyr.v, pyr.bias, out, sched.tile_level, sched.tile_seg, sched.num_tiles, sched.segs,
        L, sm_scale_log2,
        q.stride(0), q.stride(1), q.stride(2), pyr.k.stride(0), pyr.k.stride(1), pyr.k.stride(2),
        pyr.v.stride(0), pyr.v.stride(1), pyr.v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        sched.tile_level.stride(2), sched.segs.stride(2),
        H=H, D=D, BLOCK_M=m, N=pyr.n, TILE_N=sched.tile_n, PACKED=sched.packed,
        num_warps=8 if m >= 128 else 4, num_stages=2)
    return out
