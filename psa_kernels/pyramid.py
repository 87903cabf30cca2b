"""Stage 5: the key/value pyramid the attention reads.

Keys and values are kept at four resolutions in one buffer (the *pyramid*): level 1
(the arranged keys, padded to whole key blocks), then the keys mean-pooled by 2, 4 and 8.
A pooled key stands for the c real keys it averages, so it gets the logit bias ln c;
padding rows get -inf. Presets without pooled levels leave levels 2 and 4 out (level 8 then
only feeds the tail), and level 1 may be read in place from the caller's k and v instead of
copied (:func:`build_pyramid_triton`). :mod:`.schedule` turns a level map into the tiles of
this buffer that each query block reads; :mod:`.attention` runs them.

With a pooled *tail* (``use_pooled_tail``) the pyramid also holds every key block's mean key
and value (one row per block, bias ln of its real keys, ``base[0]``); each query block then
attends, besides its tiles, to the means of exactly the blocks its level map skips, so the
softmax still covers the whole sequence.

With *heavy keys* (``heavy_keys``, :mod:`.heavy`) a few keys per head sit beside the pyramid,
each with its key block: a query block attends those whose block it skips, exactly, and the
tail means of those blocks leave them out (the tail bias is then per batch and head).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from .estimate import block_lengths, block_means_reference
from .heavy import HeavyKeys, gather_rows, padded_blocks, tail_without_heavy
from .triton_compat import tl, triton

LEVEL_ORDER = (1, 2, 4, 8)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class BuildLaunch:
    """How :func:`build_pyramid_triton` launches: rows a program (``chunk``, at most n) and
    warps. The defaults are the fastest of benchmarks/stage_probe.py (one warp on 16 rows beat
    four warps on 32 by a wide margin; benchmarks/NOTES.md); benchmarks pass others in."""
    chunk: int = 16
    num_warps: int = 1


BUILD_LAUNCH = BuildLaunch()


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
                         tail: bool = False, heavy: HeavyKeys | None = None, level1: bool = True,
                         pooled: bool = True, launch: BuildLaunch = BUILD_LAUNCH,
                         ) -> tuple[Pyramid | None, torch.Tensor | None]:
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
    # rows per program: small enough to keep the pooled tiles in registers
    chunk, num_warps = min(n, launch.chunk), launch.num_warps
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


def pyramid_rows(nkb: int, n: int, tail: bool = False, level1: bool = True, pooled: bool = True) -> int:
    """Rows of a pyramid buffer (:func:`build_pyramid_triton`'s arguments)."""
    rows1 = nkb * n
    return ((rows1 if level1 else 0) + (rows1 * 3 // 4 if pooled else 0) + (rows1 // 8 if pooled or tail else 0)
            + (nkb if tail else 0))
