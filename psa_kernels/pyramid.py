"""Stage 5: pyramid attention over a level map.

Keys and values are kept at four resolutions in one buffer (the *pyramid*): level 1
(the arranged keys, padded to whole key blocks), then the keys mean-pooled by 2, 4 and 8.
A pooled key stands for the c real keys it averages, so it gets the logit bias ln c;
padding rows get -inf. The kernel walks, for each query block, a list of *tiles*: a tile
is ``TILE_N`` pyramid rows made of equal *segments*, one segment being one key block at
one level (n/p rows); a block wider than a tile spans several tiles. Packing p pooled
blocks (or several small level-1 blocks) into one tile keeps every tile as wide as a full
one, so pooled levels cost about as much per unit of density as full resolution
(``attn_impl: new_mask_type``). ``old_mask_type`` puts one key block in each tile, the
research code's schedule.

With a pooled *tail* (``use_pooled_tail``) the pyramid also holds every key block's mean key
and value (one row per block, bias ln of its real keys, ``base[0]``); each query block then
attends, besides its tiles, to the means of exactly the blocks its level map skips, so the
softmax still covers the whole sequence.

With *heavy keys* (``heavy_keys``, :mod:`.heavy`) a few keys per head sit beside the pyramid,
each with its key block: a query block attends those whose block it skips, exactly, and the
tail means of those blocks leave them out (the tail bias is then per batch and head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from .estimate import block_lengths, block_means_reference
from .heavy import HeavyKeys, gather_rows, padded_blocks, tail_without_heavy
from .triton_compat import tl, triton

LEVEL_ORDER = (1, 2, 4, 8)
LOG2E = 1.4426950408889634
# Pyramid build: rows per program and warps, the fastest of benchmarks/stage_probe.py on an
# H100 (one warp on 16 rows: 0.21 ms at the Wan 1.3B shape, against 0.75 ms with 4 warps on 32).
BUILD_CHUNK = 16
BUILD_WARPS = 1


@dataclass
class Pyramid:
    """Keys and values of all levels in one buffer, rows ``[L1 | L1/2 | L1/4 | L1/8 | tail]``
    (``base``: the first row of each; level 1 may be read in place instead, see ``source``)."""
    k: torch.Tensor        # [B, H, rows, D]
    v: torch.Tensor        # [B, H, rows, D]
    bias: torch.Tensor     # [rows] float32: ln(real keys per row), -inf for padding
    base: dict             # level -> first row of that level; 0 -> the tail's block means
    n: int                 # key block size
    length: int            # real keys (L); rows past it are padding
    tail_bias: torch.Tensor | None = None   # [B, H, nkb] float32 when heavy keys leave the tail
    heavy_k: torch.Tensor | None = None     # [B, H, rows, D] heavy keys (rows: a multiple of 64)
    heavy_v: torch.Tensor | None = None
    heavy_block: torch.Tensor | None = None  # [B, H, rows] int32 key block, -1 for padding
    # level 1 read in place (build_pyramid_triton(level1=False)): the caller's k and v and the
    # arranged order (arranged row r is their row perm[r]; None: the identity). The buffer then
    # starts with level 2 (or, with no pooled level, level 8 for the tail), and level 1's rows
    # are numbered as the arranged sequence.
    source: tuple | None = None
    perm: torch.Tensor | None = None

    @property
    def has_tail(self) -> bool:
        return 0 in self.base

    @property
    def has_heavy(self) -> bool:
        return self.heavy_k is not None

    @property
    def levels_held(self) -> tuple:
        """The levels a level map over this pyramid may use (besides 0)."""
        return (1, 2, 4, 8) if 2 in self.base else (1,)

    def tail_bias_of(self, b: int, h: int) -> torch.Tensor:
        """[nkb] the tail rows' bias for one (batch, head)."""
        nkb = -(-self.length // self.n)
        if self.tail_bias is not None:
            return self.tail_bias[b, h]
        return self.bias[self.base[0]:self.base[0] + nkb]


HEAVY_ROWS = 64  # heavy keys are stored and read in tiles of this many rows


def _with_heavy(pyr: "Pyramid", k: torch.Tensor, v: torch.Tensor, heavy: HeavyKeys | None) -> "Pyramid":
    """Attach the heavy keys (``heavy.index`` in the order of k and v) to a pyramid."""
    if heavy is None:
        return pyr
    rows = max(HEAVY_ROWS, -(-heavy.index.shape[-1] // HEAVY_ROWS) * HEAVY_ROWS)
    pyr.heavy_k, pyr.heavy_v = gather_rows(k, heavy.index, rows), gather_rows(v, heavy.index, rows)
    pyr.heavy_block = padded_blocks(heavy, rows)
    return pyr


@triton.jit
def _heavy_rows_kernel(K, V, Index, Block, HK, HV, HB, count, rows, skb, skh, skl, svb, svh, svl, s_ib, s_ih,
                       H: tl.constexpr, D: tl.constexpr, CH: tl.constexpr):
    # One program: CH heavy rows of one (batch, head): the chosen keys and values gathered from
    # the caller's k and v, their key blocks; rows past ``count`` are zero with block -1.
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    r = c * CH + tl.arange(0, CH)
    real = r < count
    dd = tl.arange(0, D)
    idx = tl.load(Index + b * s_ib + h * s_ih + r, mask=real, other=0)
    blk = tl.load(Block + b * s_ib + h * s_ih + r, mask=real, other=-1)
    kx = tl.load(K + b * skb + h * skh + idx[:, None] * skl + dd[None, :], mask=real[:, None], other=0.0)
    vx = tl.load(V + b * svb + h * svh + idx[:, None] * svl + dd[None, :], mask=real[:, None], other=0.0)
    out = bh * rows + r
    tl.store(HK + out[:, None] * D + dd[None, :], kx)
    tl.store(HV + out[:, None] * D + dd[None, :], vx)
    tl.store(HB + out, blk)


def _with_heavy_triton(pyr: "Pyramid", k: torch.Tensor, v: torch.Tensor, heavy: HeavyKeys | None) -> "Pyramid":
    """:func:`_with_heavy` in one Triton pass (k, v with unit stride along the head dim)."""
    if heavy is None:
        return pyr
    B, H, _, D = k.shape
    K = heavy.index.shape[-1]
    rows = max(HEAVY_ROWS, -(-K // HEAVY_ROWS) * HEAVY_ROWS)
    index, block = heavy.index.contiguous(), heavy.block.contiguous()
    pyr.heavy_k = torch.empty((B, H, rows, D), device=k.device, dtype=k.dtype)
    pyr.heavy_v = torch.empty((B, H, rows, D), device=v.device, dtype=v.dtype)
    pyr.heavy_block = torch.empty((B, H, rows), device=k.device, dtype=torch.int32)
    _heavy_rows_kernel[(rows // HEAVY_ROWS, B * H)](
        k, v, index, block, pyr.heavy_k, pyr.heavy_v, pyr.heavy_block, K, rows,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), H * K, K,
        H=H, D=D, CH=HEAVY_ROWS, num_warps=4)
    return pyr


def build_pyramid(k: torch.Tensor, v: torch.Tensor, n: int, L: int, tail: bool = False,
                  heavy: HeavyKeys | None = None) -> Pyramid:
    """Pool k and v ([B, H, L, D], arranged) by 2, 4 and 8 inside each key block of n tokens;
    with ``tail`` also by n (each block's mean over its real keys). With ``heavy`` (its index in
    the arranged order) the heavy keys ride along and the tail means leave them out."""
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
    tail_bias = None
    if tail:
        base[0] = start
        km, vm, lengths = block_means_reference(k, n), block_means_reference(v, n), block_lengths(L, n, k.device)
        if heavy is not None:
            km, vm, tail_bias = tail_without_heavy(km * lengths[:, None], vm * lengths[:, None], lengths, k, v, heavy)
        ks.append(km.to(k.dtype))
        vs.append(vm.to(v.dtype))
        biases.append(lengths.log())
    pyr = Pyramid(torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(biases), base, n, L, tail_bias)
    return _with_heavy(pyr, k, v, heavy)


@triton.jit
def _group_mean(x, valid, P: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """Mean over groups of P consecutive rows of x [N, D] (real rows only) and the counts."""
    xs = tl.sum(tl.reshape(x, [N // P, P, D]), 1)
    cnt = tl.sum(tl.reshape(valid.to(tl.float32), [N // P, P]), 1)
    return xs / tl.maximum(cnt, 1.0)[:, None], cnt


@triton.jit
def _group_end_cosine(xn, valid, P: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """Sum and count, over the full groups of P rows, of the cosine of each group's first and
    last row (xn row-normalised)."""
    x3 = tl.reshape(xn, [N // P, P, D])
    j = tl.arange(0, P)
    first = tl.sum(x3 * (j == 0).to(tl.float32)[None, :, None], 1)
    last = tl.sum(x3 * (j == P - 1).to(tl.float32)[None, :, None], 1)
    full = tl.sum(tl.reshape(valid.to(tl.float32), [N // P, P]), 1) == P
    cos = tl.where(full, tl.sum(first * last, 1), 0.0)
    return tl.sum(cos, 0), tl.sum(full.to(tl.float32), 0)


@triton.jit
def _pyramid_build_kernel(K, V, KP, VP, Bias, SimSum, SimCnt, Perm, L, base2, base4, base8,
                          skb, skh, skl, svb, svh, svl, spb, sph, spl, sim_bh,
                          H: tl.constexpr, D: tl.constexpr, CH: tl.constexpr, WITH_SIM: tl.constexpr,
                          WITH_PYRAMID: tl.constexpr, HAS_PERM: tl.constexpr, LEVEL1: tl.constexpr,
                          POOLED: tl.constexpr, LEVEL8: tl.constexpr):
    # One program: one chunk of CH rows (a key block or a piece of one) of one (batch, head).
    # Pooling groups (at most 8 rows) never cross a chunk, so chunks are independent.
    # Without WITH_PYRAMID it only measures the key similarity (nothing but k is read). It
    # writes level 1 with LEVEL1, levels 2 and 4 with POOLED, level 8 with LEVEL8 (at the
    # given first rows).
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    r = c * CH + tl.arange(0, CH)
    valid = r < L
    src = r
    if HAS_PERM:  # gather the arranged order straight from the caller's
        src = tl.load(Perm + r, mask=valid, other=0)
    dd = tl.arange(0, D)
    k = tl.load(K + b * skb + h * skh + src[:, None] * skl + dd[None, :], mask=valid[:, None], other=0.0)
    kf = k.to(tl.float32)
    if WITH_PYRAMID:
        v = tl.load(V + b * svb + h * svh + src[:, None] * svl + dd[None, :], mask=valid[:, None], other=0.0)
        kp = KP + b * spb + h * sph
        vp = VP + b * spb + h * sph
        if LEVEL1:
            tl.store(kp + r[:, None] * spl + dd[None, :], k)
            tl.store(vp + r[:, None] * spl + dd[None, :], v)
            if bh == 0:
                tl.store(Bias + r, tl.where(valid, 0.0, float("-inf")))
        vf = v.to(tl.float32)
        if POOLED:
            _store_pooled(kf, vf, valid, kp, vp, Bias, bh == 0, base2, c, spl, 2, CH, D)
            _store_pooled(kf, vf, valid, kp, vp, Bias, bh == 0, base4, c, spl, 4, CH, D)
        if LEVEL8:
            _store_pooled(kf, vf, valid, kp, vp, Bias, bh == 0, base8, c, spl, 8, CH, D)
    if WITH_SIM:
        kn = kf / tl.maximum(tl.sqrt(tl.sum(kf * kf, 1)), 1e-12)[:, None]
        at = bh * sim_bh + c * 3
        s2, n2 = _group_end_cosine(kn, valid, 2, CH, D)
        s4, n4 = _group_end_cosine(kn, valid, 4, CH, D)
        s8, n8 = _group_end_cosine(kn, valid, 8, CH, D)
        tl.store(SimSum + at + 0, s2)
        tl.store(SimSum + at + 1, s4)
        tl.store(SimSum + at + 2, s8)
        tl.store(SimCnt + at + 0, n2)
        tl.store(SimCnt + at + 1, n4)
        tl.store(SimCnt + at + 2, n8)


@triton.jit
def _store_pooled(kf, vf, valid, kp, vp, Bias, write_bias, base, c, spl,
                  P: tl.constexpr, CH: tl.constexpr, D: tl.constexpr):
    """Write chunk c pooled by P at rows base + c*CH/P (and, once, their ln-count bias)."""
    km, cnt = _group_mean(kf, valid, P, CH, D)
    vm, _ = _group_mean(vf, valid, P, CH, D)
    rp = base + c * (CH // P) + tl.arange(0, CH // P)
    dd = tl.arange(0, D)
    tl.store(kp + rp[:, None] * spl + dd[None, :], km.to(kp.dtype.element_ty))
    tl.store(vp + rp[:, None] * spl + dd[None, :], vm.to(vp.dtype.element_ty))
    if write_bias:
        tl.store(Bias + rp, tl.where(cnt > 0, tl.log(tl.maximum(cnt, 1.0)), float("-inf")))


def build_pyramid_triton(k: torch.Tensor, v: torch.Tensor | None, n: int, L: int,
                         with_similarity: bool = False, perm: torch.Tensor | None = None,
                         chunk: int = BUILD_CHUNK, num_warps: int = BUILD_WARPS, tail: bool = False,
                         heavy: HeavyKeys | None = None, level1: bool = True,
                         pooled: bool = True) -> tuple[Pyramid | None, torch.Tensor | None]:
    """Same pyramid as :func:`build_pyramid` in one pass over k and v; with ``with_similarity``
    also the key similarity of :func:`levels.key_similarity` ([B, H, nkb, 3]). With ``perm``,
    k and v are in the caller's order and are arranged on the way. With ``v`` None only the
    similarity is measured and no pyramid is allocated. With ``tail`` the block means follow.
    ``heavy``: heavy keys (index in the caller's order, the order of k and v).

    Without ``level1`` the buffer holds no copy of k and v: the attention kernel reads level 1
    from them in place (through ``perm``), which saves writing and keeping 2 x L rows. Without
    ``pooled`` levels 2, 4 and 8 are left out too (a level map of levels 1 and 0 only; level 8
    is still written, for the tail's means, when there is a tail)."""
    B, H, _, D = k.shape
    nkb = -(-L // n)
    rows1 = nkb * n
    level8 = pooled or tail
    base = {1: 0}
    rows = rows1 if level1 else 0
    if pooled:
        base[2], base[4] = rows, rows + rows1 // 2
        rows += rows1 // 2 + rows1 // 4
    if level8:
        base[8] = rows
        rows += rows1 // 8
    if tail:
        base[0] = rows
        rows += nkb  # one row per key block
    chunk = min(n, chunk)  # rows per program: small enough to keep the pooled tiles in registers
    nchunks = rows1 // chunk
    with_pyramid = v is not None
    if with_pyramid:
        # one row at least, so that a pyramid of level 1 read in place still has a buffer
        kp = torch.empty((B, H, max(rows, 1), D), device=k.device, dtype=k.dtype)
        vp = torch.empty((B, H, max(rows, 1), D), device=v.device, dtype=v.dtype)
        bias = torch.empty(max(rows, 1), device=k.device, dtype=torch.float32)
    else:
        v = kp = vp = bias = k
    if with_similarity:
        sim_sum = torch.empty((B, H, nchunks, 3), device=k.device, dtype=torch.float32)
        sim_cnt = torch.empty_like(sim_sum)
    else:
        sim_sum = sim_cnt = bias
    if with_similarity or (with_pyramid and rows > 0):
        _pyramid_build_kernel[(nchunks, B * H)](
            k, v, kp, vp, bias, sim_sum, sim_cnt, perm if perm is not None else bias, L,
            base.get(2, 0), base.get(4, 0), base.get(8, 0),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            kp.stride(0), kp.stride(1), kp.stride(2), nchunks * 3,
            H=H, D=D, CH=chunk, WITH_SIM=with_similarity, WITH_PYRAMID=with_pyramid, HAS_PERM=perm is not None,
            LEVEL1=level1, POOLED=pooled, LEVEL8=level8, num_warps=num_warps)
    sim = None
    if with_similarity:
        per_block = n // chunk
        sim = (sim_sum.view(B, H, nkb, per_block, 3).sum(3)
               / sim_cnt.view(B, H, nkb, per_block, 3).sum(3).clamp_min(1.0))
    if not with_pyramid:
        return None, sim
    pyr = Pyramid(kp, vp, bias, base, n, L)
    if not level1:
        pyr.source, pyr.perm = (k, v), perm
    pyr = _with_heavy_triton(pyr, k, v, heavy)
    if tail:
        _fill_tail(pyr, nkb)
    return pyr, sim


@triton.jit
def _tail_rows_kernel(KP, VP, Bias, HK, HV, HB, heavy_rows, TailBias, base8, base0, spb, sph, spl,
                      H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, HEAVY: tl.constexpr,
                      HC: tl.constexpr):
    # One program: the tail row of one key block of one (batch, head), the count-weighted mean of
    # the block's G pooled-by-8 rows (1/8 of its keys and values read again, in one pass), and
    # its bias ln(real keys) (shared by all heads). With HEAVY the heavy keys of the block (found
    # by scanning the head's heavy rows) are taken out first and the bias is stored per head.
    j = tl.program_id(0)
    bh = tl.program_id(1)
    nkb = tl.num_programs(0)
    g = tl.arange(0, G)
    dd = tl.arange(0, D)
    rows = base8 + j * G + g
    cnt8 = tl.exp(tl.load(Bias + rows))  # real keys per pooled row; padding rows (-inf) give 0
    kp = KP + (bh // H) * spb + (bh % H) * sph
    vp = VP + (bh // H) * spb + (bh % H) * sph
    ksum = tl.sum(tl.load(kp + rows[:, None] * spl + dd[None, :]).to(tl.float32) * cnt8[:, None], 0)
    vsum = tl.sum(tl.load(vp + rows[:, None] * spl + dd[None, :]).to(tl.float32) * cnt8[:, None], 0)
    cnt = tl.sum(cnt8, 0)
    tl.store(Bias + base0 + j, tl.log(cnt), mask=bh == 0)
    if HEAVY:
        hr = tl.arange(0, HC)
        for c0 in range(0, heavy_rows, HC):
            at = bh * heavy_rows + c0 + hr
            mine = tl.load(HB + at) == j
            found = tl.sum(mine.to(tl.float32), 0)
            if found > 0:  # most blocks hold no heavy key: their rows are never read
                ksum -= tl.sum(tl.load(HK + at[:, None] * D + dd[None, :], mask=mine[:, None], other=0.0)
                               .to(tl.float32), 0)
                vsum -= tl.sum(tl.load(HV + at[:, None] * D + dd[None, :], mask=mine[:, None], other=0.0)
                               .to(tl.float32), 0)
                cnt -= found
        tl.store(TailBias + bh * nkb + j, tl.where(cnt > 0.5, tl.log(tl.maximum(cnt, 1.0)), float("-inf")))
    inv = 1.0 / tl.maximum(cnt, 1.0)
    tl.store(kp + (base0 + j) * spl + dd, (ksum * inv).to(KP.dtype.element_ty))
    tl.store(vp + (base0 + j) * spl + dd, (vsum * inv).to(VP.dtype.element_ty))


def _fill_tail(pyr: Pyramid, nkb: int) -> None:
    """Fill the tail rows (``pyr.base[0]``) and their bias from the level-8 rows with
    :func:`_tail_rows_kernel`. With heavy keys (contiguous [B, H, rows, D], as
    :func:`_with_heavy_triton` makes them) the tail bias becomes per (batch, head)."""
    kp, vp, bias, n = pyr.k, pyr.v, pyr.bias, pyr.n
    B, H, _, D = kp.shape
    if pyr.has_heavy:
        hk, hv, hb = pyr.heavy_k, pyr.heavy_v, pyr.heavy_block
        pyr.tail_bias = torch.empty((B, H, nkb), device=kp.device, dtype=torch.float32)
        heavy_rows = hb.shape[-1]
    else:
        hk, hv, hb, heavy_rows = kp, vp, bias, 0
    _tail_rows_kernel[(nkb, B * H)](kp, vp, bias, hk, hv, hb, heavy_rows,
                                    pyr.tail_bias if pyr.has_heavy else bias, pyr.base[8], pyr.base[0],
                                    kp.stride(0), kp.stride(1), kp.stride(2), H=H, D=D, G=n // 8,
                                    HEAVY=pyr.has_heavy, HC=32, num_warps=1 if D <= 64 else 2)


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
                        q_chunk: int = 1024) -> torch.Tensor:
    """Pyramid attention in torch (float32 math), straight from the level map.

    q: [B, H, L, D] arranged; levels: [B, H, nqb, nkb]. Each query attends to every
    pyramid row whose (query block, key block) pair has that row's level; with a tail, also
    to the mean of every block at level 0, and with heavy keys to each heavy key whose block
    is at level 0. Any pyramid, that of :func:`build_pyramid` or :func:`build_pyramid_triton`
    (level 1 read in place included).
    """
    B, H, L, D = q.shape
    nkb = levels.shape[-1]
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kf, vf, bias, lvl_of_row, kblock_of_row = _reference_rows(pyr, b, h, nkb)
            for s in range(0, L, q_chunk):
                qc = q[b, h, s:s + q_chunk].float()
                qblk = torch.arange(s, s + qc.shape[0], device=q.device) // m
                lv = levels[b, h][qblk][:, kblock_of_row]  # [rows_q, pyramid and heavy rows]
                logits = qc @ kf.T * scale + bias
                logits = logits.masked_fill(lv != lvl_of_row, float("-inf"))
                out[b, h, s:s + q_chunk] = (logits.softmax(-1) @ vf).to(q.dtype)
    return out


# ------------------------------------------------------------------------- schedule
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


SCHEDULE_CHUNK = 64  # tiles of a level written per step of the schedule kernel
TILE_WIDTH = 64  # pyramid rows per kernel tile (benchmarks/NOTES.md, change 18)
SUB_SHIFT = 4    # a tile's level code: level | (sub-tile of its key block << SUB_SHIFT)
_SUB = tl.constexpr(SUB_SHIFT)


def tile_width(n: int) -> int:
    """Pyramid rows per kernel tile. A key block wider than the tile spans several tiles
    (contiguous runs of rows); narrower ones are packed several to a tile."""
    return TILE_WIDTH


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
    tl.store(rec + 0, r1)
    tl.store(rec + 1, r2)
    tl.store(rec + 2, r4)
    tl.store(rec + 3, r8)
    tl.store(rec + 4, m1 + m2 + m4 + m8)
    tl.store(rec + 5, s2)
    tl.store(rec + 6, s4)
    tl.store(rec + 7, s8)
    tl.store(rec + 8, c1)
    tl.store(rec + 9, c2)
    tl.store(rec + 10, c4)
    tl.store(rec + 11, c8)


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


def pyramid_rows(nkb: int, n: int, tail: bool = False, level1: bool = True, pooled: bool = True) -> int:
    """Rows of a pyramid buffer (:func:`build_pyramid_triton`'s arguments)."""
    rows1 = nkb * n
    return ((rows1 if level1 else 0) + (rows1 * 3 // 4 if pooled else 0) + (rows1 // 8 if pooled or tail else 0)
            + (nkb if tail else 0))


def attention_bytes_per_head(B: int, L: int, D: int, element_size: int, m: int, n: int, packed: bool,
                             tail: bool = False, level1: bool = True, pooled: bool = True) -> int:
    """Device memory the pyramid and the tile schedule of one head take (B batch entries)."""
    nkb, nqb = -(-L // n), -(-L // m)
    _, _, _, max_segs, max_masked = _schedule_shape(nkb, n, packed, tile_width(n), LEVEL_ORDER if pooled else (1,))
    rows = pyramid_rows(nkb, n, tail, level1, pooled)
    biases = nqb * (-(-nkb // TILE_WIDTH) * TILE_WIDTH if tail else 0) * 4  # the schedule's tail bias, at most
    return B * (2 * rows * D * element_size + nqb * (max_segs + 2 * max_masked + len(COUNT_FIELDS)) * 4 + biases)


def build_schedule(levels: torch.Tensor, pyr: Pyramid, packed: bool, tile_n: int | None = None,
                   num_warps: int | None = None, fold: bool = True) -> Schedule:
    """Turn a level map into segment lists (key blocks ascending within a level, levels 1, 2, 4,
    8 in turn), the per-row record of regular tiles (found from the record alone) and the list
    of masked tiles. With ``fold`` a packed level's partly filled last tile stays in its
    regular loop, which masks the empty columns (benchmarks/NOTES.md change 26); otherwise it
    is a masked tile.

    One Triton program per row; buffers are sized for the worst case of any level map, so
    nothing is read back to the host. One warp a row up to 512 key blocks, else four (H100
    probe, benchmarks/NOTES.md change 25)."""
    B, H, nqb, nkb = levels.shape
    if nkb >= 1 << 16:
        raise ValueError(f"{nkb} key blocks in a row; allowed: fewer than {1 << 16} (a larger block_size.n)")
    n = pyr.n
    tn = tile_n or tile_width(n)
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
    tail_bias, heavy_bias = _column_biases(lv, pyr, (B, H, nqb, nkb))
    return Schedule(tile_level, tile_seg, counts, segs, tn, packed, fold, tail_bias, heavy_bias)


@triton.jit
def _skips(lv, POOLED: tl.constexpr):
    """Whether pairs of level lv are skipped (level 0; without POOLED every level but 1)."""
    if POOLED:
        return lv == 0
    else:
        return lv != 1


@triton.jit
def _column_bias_kernel(Levels, TailLn, HBlock, TailOut, HeavyOut, nkb, nqb, s_lv, s_tln, s_hb, tail_cols,
                        heavy_rows, TAIL: tl.constexpr, HEAVY: tl.constexpr, CH: tl.constexpr,
                        POOLED: tl.constexpr):
    # One program: one (batch, head, query block) row of the level map. The attention kernel then
    # reads one bias vector per tail or heavy tile instead of the level map and the counts
    # (two loads and a gather a tile: benchmarks/NOTES.md, change 35). Without POOLED a pooled
    # pair is skipped, as the schedule kernel has it.
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


def _column_biases(lv: torch.Tensor, pyr: Pyramid, shape) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
        lv, tln, hb, tail if tail is not None else lv, heavy if heavy is not None else lv, nkb, nqb, lv.stride(0),
        s_tln, heavy_rows, tail_cols, heavy_rows, TAIL=pyr.has_tail, HEAVY=pyr.has_heavy, CH=TILE_WIDTH,
        POOLED=len(pyr.levels_held) > 1, num_warps=1)
    return tail, heavy


# ------------------------------------------------------------------------- kernel
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
    m_i, l_i, acc = _regular_loop(q, k1base, v1base, seg_row, 0, tl.load(rec + 0), tl.load(rec + 8), r, k1l, v1l,
                                  dd, Perm, scale, m_i, l_i, acc, 1, N, TILE_N, PACKED, LOOP_STAGES, FOLD,
                                  SRC_L1 and HAS_PERM)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + 5), tl.load(rec + 1), tl.load(rec + 9), r,
                                  skl, svl, dd, Perm, scale, m_i, l_i, acc, 2, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + 6), tl.load(rec + 2), tl.load(rec + 10),
                                  r, skl, svl, dd, Perm, scale, m_i, l_i, acc, 4, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    m_i, l_i, acc = _regular_loop(q, kbase, vbase, seg_row, tl.load(rec + 7), tl.load(rec + 3), tl.load(rec + 11),
                                  r, skl, svl, dd, Perm, scale, m_i, l_i, acc, 8, N, TILE_N, PACKED, LOOP_STAGES, FOLD)
    # masked tiles: empty slots or the partial last block, masked loads and the per-row
    # ln(count) bias (pipelined by the kernel-wide num_stages; the loop's own pipelining moved
    # the time by -3% to +7% by preset, benchmarks/NOTES.md change 18)
    for t in range(s_tl - tl.load(rec + 4), s_tl):
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
                         major: int = 9) -> LaunchConfig:
    """The fastest launch of the H100 sweeps (benchmarks/NOTES.md, change 18). For 128-row
    query blocks on 64-row tiles: 8 warps, 2 stages and at most 128 registers a thread, so
    that two programs share a multiprocessor (one's softmax runs under the other's matrix
    products); the per-level loops pipelined 3 deep. The register cap only where the shared
    memory holds two programs (Hopper, compute capability ``major`` >= 9; elsewhere it would
    only add spills) and the accumulator fits under it (head dim <= 128). Wider tiles: 8
    warps and 3 stages (2 where one key block per tile leaves most tiles masked). Smaller
    query blocks: 4 warps, 2 stages."""
    if m >= 128 and tile_n <= 64:
        return LaunchConfig(8, 2, 128 if head_dim <= 128 and major >= 9 else None, 3)
    if m >= 128:
        return LaunchConfig(8, 3 if packed else 2)
    return LaunchConfig(4, 2)


def _register_cap(cfg: LaunchConfig, num_warps: int | None, maxnreg: int | None) -> int | None:
    if maxnreg is not None:
        return maxnreg or None
    return cfg.maxnreg if num_warps in (None, cfg.num_warps) else None


def attention_triton(q: torch.Tensor, pyr: Pyramid, sched: Schedule, m: int,
                     out: torch.Tensor | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, perm: torch.Tensor | None = None,
                     loop_stages: int | None = None, maxnreg: int | None = None) -> torch.Tensor:
    """The pyramid attention kernel over a schedule; same function as attention_reference.

    With ``perm``, q and the output are in the caller's order (arranged = x[..., perm, :]).
    A pyramid with a tail or heavy keys needs a schedule built from it (:func:`build_schedule`
    then holds, per row, which tail rows and heavy keys count).
    The launch is :func:`kernel_launch_config`'s unless the other arguments override it
    (``maxnreg`` 0: no register cap; the cap applies to the default warps only)."""
    B, H, L, D = q.shape
    nqb = sched.counts.shape[2]
    if out is None:
        out = torch.empty_like(q)
    major = torch.cuda.get_device_capability(q.device)[0] if q.is_cuda else 9
    cfg = kernel_launch_config(m, sched.tile_n, sched.packed, D, major)
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
        LOOP_STAGES=cfg.loop_stages if loop_stages is None else loop_stages,
        num_warps=num_warps or cfg.num_warps, num_stages=num_stages or cfg.num_stages,
        **({"maxnreg": mr} if (mr := _register_cap(cfg, num_warps, maxnreg)) else {}))
    return out
