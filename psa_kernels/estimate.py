"""Stage 2: block importance, estimated from a strided sample of queries and keys.

For query block i and key block j the score is the share of attention mass that the
sampled queries of block i put on the sampled keys of block j (softmax over all sampled
keys of the row, summed per key block, averaged over the block's sampled queries), so
each row of scores sums to 1. Sampling every ``m/SAMPLE_Q``-th query and every 4th key
keeps the cost near 1/32 of a dense QK^T.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from .triton_compat import tl, triton

SAMPLE_Q = 16  # sampled queries per query block (all of them when m <= 16)
KEY_STRIDE = 4  # one sampled key in every 4


def sample_counts(m: int, n: int) -> tuple[int, int]:
    """(sampled queries per query block, sampled keys per key block)."""
    return min(SAMPLE_Q, m), n // KEY_STRIDE


def _sample_rows(L: int, block: int, samples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the samples of every block (centred strides) and whether each is a real token."""
    nblocks = -(-L // block)
    stride = block // samples
    first = torch.arange(samples, device=device)[None, :] == 0
    idx = (torch.arange(nblocks, device=device)[:, None] * block
           + torch.arange(samples, device=device)[None, :] * stride + stride // 2)
    # The first sample of a partial tail block moves onto its last real token, so every
    # block that holds a real token has at least one real sample.
    return idx.clamp_max(L - 1), (idx < L) | first


def estimate_reference(q: torch.Tensor, k: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Block scores [B, H, nqb, nkb] in float32 (torch; the oracle and the CPU path).

    q, k: [B, H, L, D] in the arranged order.
    """
    B, H, L, D = q.shape
    sq, sk = sample_counts(m, n)
    qi, qvalid = _sample_rows(L, m, sq, q.device)
    ki, kvalid = _sample_rows(L, n, sk, q.device)
    nqb, nkb = qi.shape[0], ki.shape[0]
    qs = q[:, :, qi.reshape(-1)].float()  # [B, H, nqb*sq, D]
    ks = k[:, :, ki.reshape(-1)].float()  # [B, H, nkb*sk, D]
    s = (qs @ ks.transpose(-1, -2)) * (1.0 / math.sqrt(D))
    s = s.masked_fill(~kvalid.reshape(1, 1, 1, -1), float("-inf"))
    p = s.softmax(dim=-1).reshape(B, H, nqb, sq, nkb, sk).sum(dim=-1)  # [B, H, nqb, sq, nkb]
    w = qvalid.float()  # average over real sampled queries only
    return (p * w[None, None, :, :, None]).sum(dim=3) / w.sum(dim=1)[None, None, :, None]


@triton.jit
def _sample_positions(blk0, i, L, nblocks, Perm, BLOCK: tl.constexpr, SAMPLES: tl.constexpr,
                      HAS_PERM: tl.constexpr):
    """Rows of samples i (SAMPLES a block, from block blk0 on) by :func:`_sample_rows`' rule,
    where the caller has them, and which are real."""
    stride: tl.constexpr = BLOCK // SAMPLES
    blk = blk0 + i // SAMPLES
    row = blk * BLOCK + (i % SAMPLES) * stride + stride // 2
    valid = ((row < L) | (i % SAMPLES == 0)) & (blk < nblocks)
    row = tl.minimum(row, L - 1)
    if HAS_PERM:  # rows are positions in the arranged order; read them where the caller has them
        row = tl.load(Perm + row)
    return row, valid


@triton.jit
def _sampled_keys(kbase, Perm, t, kk, dd, L, nkb, skl,
                  N: tl.constexpr, SK: tl.constexpr, KBLOCKS: tl.constexpr, HAS_PERM: tl.constexpr):
    """Sampled keys of key blocks t*KBLOCKS ... as a [D, KBLOCKS*SK] tile, and which are real."""
    krow, kvalid = _sample_positions(t * KBLOCKS, kk, L, nkb, Perm, N, SK, HAS_PERM)
    kt = tl.load(kbase + krow[None, :] * skl + dd[:, None], mask=kvalid[None, :], other=0.0)
    return kt, kvalid


@triton.jit
def _estimate_kernel(Q, K, Part, MaxAt, MaxEnd, Norm, QWeight, Perm, L, nqb, nkb, ntiles, split_tiles, sampled,
                     sm_scale_log2, sqb, sqh, sql, skb, skh, skl,
                     H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                     SQ: tl.constexpr, SK: tl.constexpr, QBLOCKS: tl.constexpr, KBLOCKS: tl.constexpr,
                     SPLITS: tl.constexpr, HAS_PERM: tl.constexpr):
    # One program: QBLOCKS query blocks of one (batch, head), so the sampled queries fill a
    # tensor-core tile, against one of SPLITS equal runs of the key tiles (more programs than
    # multiprocessors x waves, so that the last wave is not half empty). One pass over the
    # sampled keys with an online softmax: each tile's per (sampled query, key block) sums are
    # written relative to the running maximum of that moment (MaxAt), and each run's final
    # maximum and normaliser (MaxEnd, Norm); _estimate_reduce_kernel brings them together.
    # One product and one exponential per sampled score.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    ROWS: tl.constexpr = QBLOCKS * SQ
    TILE: tl.constexpr = KBLOCKS * SK

    i = tl.arange(0, ROWS)
    qrow, qvalid = _sample_positions(pid * QBLOCKS, i, L, nqb, Perm, M, SQ, HAS_PERM)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + qrow[:, None] * sql + dd[None, :], mask=qvalid[:, None], other=0.0)
    kbase = K + b * skb + h * skh
    # scratch rows of this program's sampled queries: [sampled, ntiles * KBLOCKS] partial sums and
    # [sampled, ntiles] maxima per (batch, head)
    rows = (bh * sampled + pid * ROWS + i).to(tl.int64)
    part = Part + rows[:, None] * (ntiles * KBLOCKS)
    max_at = MaxAt + rows * ntiles

    kk = tl.arange(0, TILE)
    jk = tl.arange(0, KBLOCKS)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    for t in range(split * split_tiles, tl.minimum(split * split_tiles + split_tiles, ntiles)):
        kt, kvalid = _sampled_keys(kbase, Perm, t, kk, dd, L, nkb, skl, N, SK, KBLOCKS, HAS_PERM)
        s = tl.where(kvalid[None, :], tl.dot(q, kt) * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every tile holds a real key: finite
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)
        m_i = m_new
        tl.store(part + (t * KBLOCKS + jk)[None, :], tl.sum(tl.reshape(p, [ROWS, KBLOCKS, SK]), 2))
        tl.store(max_at + t, m_new)
    # an empty run (more runs than tiles) leaves -inf and 0, which the reduction weighs as nothing
    tl.store(MaxEnd + rows * SPLITS + split, m_i)
    tl.store(Norm + rows * SPLITS + split, l_i)
    if split == 0:  # each sampled query counts 1 / (real samples of its query block)
        nreal = tl.sum(tl.reshape(qvalid.to(tl.float32), [QBLOCKS, SQ]), 1)
        w = tl.reshape(tl.where(tl.reshape(qvalid, [QBLOCKS, SQ]), 1.0, 0.0) / tl.maximum(nreal, 1.0)[:, None], [ROWS])
        tl.store(QWeight + rows, w)


@triton.jit
def _estimate_reduce_kernel(Part, MaxAt, MaxEnd, Norm, QWeight, Out, nkb, ntiles, sampled, sob, soh, soq,
                            H: tl.constexpr, SQ: tl.constexpr, KBLOCKS: tl.constexpr, CHUNK: tl.constexpr,
                            SPLITS: tl.constexpr):
    # One program: one query block, CHUNK key blocks at a time. Each key block's score is the
    # weighted sum over the block's sampled queries of their partial sums, each brought to
    # the query's final maximum and divided by its normaliser (both gathered over the runs of
    # key tiles). The factor is one per (sampled query, key tile): the partial sums are read
    # as [queries, tiles, key blocks of a tile] (benchmarks/NOTES.md change 27).
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    TILES: tl.constexpr = CHUNK // KBLOCKS
    rows = (bh * sampled + qb * SQ + tl.arange(0, SQ)).to(tl.int64)
    sp = tl.arange(0, SPLITS)
    ends = tl.load(MaxEnd + rows[:, None] * SPLITS + sp[None, :])
    end = tl.max(ends, 1)
    norm = tl.sum(tl.load(Norm + rows[:, None] * SPLITS + sp[None, :]) * tl.exp2(ends - end[:, None]), 1)
    w = tl.load(QWeight + rows) / norm
    part = Part + rows[:, None] * (ntiles * KBLOCKS)
    max_at = MaxAt + rows[:, None] * ntiles
    out = Out + (bh // H) * sob + (bh % H) * soh + qb * soq
    for c in range(0, tl.cdiv(nkb, CHUNK)):
        kb = c * CHUNK + tl.arange(0, CHUNK)
        inside = kb < nkb
        x = tl.load(part + kb[None, :], mask=inside[None, :], other=0.0)
        t = c * TILES + tl.arange(0, TILES)
        at = tl.load(max_at + t[None, :], mask=(t < ntiles)[None, :], other=0.0)
        f = tl.exp2(at - end[:, None]) * w[:, None]  # [SQ, TILES]
        score = tl.sum(tl.reshape(x, [SQ, TILES, KBLOCKS]) * f[:, :, None], 0)
        tl.store(out + kb, tl.reshape(score, [CHUNK]), mask=inside)


REDUCE_CHUNK = 256  # key blocks per step of the reduction (benchmarks/NOTES.md change 27)


def _launch_shape(L: int, m: int, n: int, rows: int, tile: int) -> tuple[int, int, int, int, int]:
    """(query blocks per program, key blocks per tile, programs per head, key tiles, scratch
    rows per head) of the estimate kernel."""
    sq, sk = sample_counts(m, n)
    qblocks = max(1, rows // sq)  # sampled queries of several blocks fill one tensor-core tile
    kblocks = max(1, tile // sk)
    programs = triton.cdiv(-(-L // m), qblocks)
    return qblocks, kblocks, programs, triton.cdiv(-(-L // n), kblocks), programs * qblocks * sq


MAX_SPLITS = 4
SPLIT_MIN_PROGRAMS = 8  # runs of key tiles until programs >= this many per multiprocessor


def key_splits(programs: int, multiprocessors: int, ntiles: int) -> int:
    """Runs of key tiles per program row (1, 2 or 4): enough programs for the last wave of a
    small launch not to leave most multiprocessors idle, each run at least 8 tiles long."""
    splits = 1
    while (splits < MAX_SPLITS and programs * splits < SPLIT_MIN_PROGRAMS * multiprocessors
           and ntiles >= 16 * splits):
        splits *= 2
    return splits


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class EstimateLaunch:
    """How :func:`estimate_triton` launches its kernels: sampled query rows a program
    (``rows``) and sampled key rows a tile (``tile``), warps and pipeline stages of the main
    kernel (None: 8 warps, the compiler's stages), and runs of key tiles a program row
    (``splits``: 1, 2 or 4; None: :func:`key_splits`). The defaults are the fastest of
    benchmarks/stage_probe.py (benchmarks/NOTES.md); benchmarks pass others in."""
    rows: int = 128
    tile: int = 128
    num_warps: int | None = None
    num_stages: int | None = None
    splits: int | None = None

    def __post_init__(self):
        if self.splits is not None and self.splits not in (1, 2, 4):
            raise ValueError(f"splits {self.splits}; allowed: 1, 2, 4")


ESTIMATE_LAUNCH = EstimateLaunch()


def scratch_bytes_per_head(B: int, L: int, m: int, n: int, launch: EstimateLaunch = ESTIMATE_LAUNCH) -> int:
    """Device memory :func:`estimate_triton` holds while it runs, per head (B batch entries;
    at most: with the most runs of key tiles unless ``launch`` fixes them)."""
    _, kblocks, _, ntiles, sampled = _launch_shape(L, m, n, launch.rows, launch.tile)
    return B * sampled * (ntiles * kblocks + ntiles + 2 * (launch.splits or MAX_SPLITS) + 1) * 4


def estimate_triton(q: torch.Tensor, k: torch.Tensor, m: int, n: int,
                    perm: torch.Tensor | None = None, heads_per_pass: int | None = None,
                    launch: EstimateLaunch = ESTIMATE_LAUNCH) -> torch.Tensor:
    """Same function as :func:`estimate_reference`, as Triton kernels. With ``perm`` the
    inputs are in the caller's order and are read as ``x[..., perm, :]`` without a copy.

    The one pass keeps, for every sampled query, its sums per key block until the query's
    softmax normaliser is known: :func:`scratch_bytes_per_head` per head, freed on return;
    ``heads_per_pass`` bounds how many heads hold it at one time."""
    rows, tile, num_warps, num_stages, splits = (launch.rows, launch.tile, launch.num_warps, launch.num_stages,
                                                 launch.splits)
    B, H, L, D = q.shape
    sq, sk = sample_counts(m, n)
    nqb, nkb = -(-L // m), -(-L // n)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    out = torch.empty((B, H, nqb, nkb), device=q.device, dtype=torch.float32)
    qblocks, kblocks, programs, ntiles, sampled = _launch_shape(L, m, n, rows, tile)
    group = min(H, heads_per_pass or H)
    if splits is None:
        splits = key_splits(programs * B * group, _multiprocessors(q.device), ntiles)
    split_tiles = -(-ntiles // splits)
    part = torch.empty((B * group, sampled, ntiles * kblocks), device=q.device, dtype=torch.float32)
    max_at = torch.empty((B * group, sampled, ntiles), device=q.device, dtype=torch.float32)
    max_end = torch.empty((B * group, sampled, splits), device=q.device, dtype=torch.float32)
    norm = torch.empty_like(max_end)
    qweight = torch.empty((B * group, sampled), device=q.device, dtype=torch.float32)
    sm_scale_log2 = (1.0 / math.sqrt(D)) * 1.4426950408889634
    chunk = max(kblocks, min(REDUCE_CHUNK, triton.next_power_of_2(nkb)))  # whole key tiles a step
    for h0 in range(0, H, group):
        qh, kh, oh = q[:, h0:h0 + group], k[:, h0:h0 + group], out[:, h0:h0 + group]
        g = qh.shape[1]
        _estimate_kernel[(programs, B * g, splits)](
            qh, kh, part, max_at, max_end, norm, qweight, perm if perm is not None else out, L, nqb, nkb, ntiles,
            split_tiles, sampled, sm_scale_log2,
            qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
            H=g, D=D, M=m, N=n, SQ=sq, SK=sk, QBLOCKS=qblocks, KBLOCKS=kblocks, SPLITS=splits,
            HAS_PERM=perm is not None, num_warps=num_warps or 8, **({"num_stages": num_stages} if num_stages else {}))
        _estimate_reduce_kernel[(nqb, B * g)](
            part, max_at, max_end, norm, qweight, oh, nkb, ntiles, sampled, oh.stride(0), oh.stride(1), oh.stride(2),
            H=g, SQ=sq, KBLOCKS=kblocks, CHUNK=chunk, SPLITS=splits, num_warps=4)
    return out


@triton.jit
def _block_mean_kernel(X, Out, Out2, Perm, HIdx, HBlk, heavy_count, L, scale2, sxb, sxh, sxl, sob, soh, sol,
                       H: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CH: tl.constexpr,
                       HAS_PERM: tl.constexpr, SECOND: tl.constexpr, HEAVY: tl.constexpr, HC: tl.constexpr):
    # One program: the mean of one block of BLOCK arranged rows of one (batch, head), in
    # float32, summed CH rows at a time; padding rows count for nothing. SECOND 1: also the
    # mean of the squares times scale2, into Out2 (same strides); 2: also the variance (clamped
    # at 0), into Out2.
    # HEAVY (with SECOND 2): the variance leaves out the block's heavy keys (HIdx [B*H, count]
    # rows of X in its own order, HBlk their blocks), found by scanning the head's list; the
    # mean in Out still covers every row. A block of heavy keys only gets variance 0.
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    dd = tl.arange(0, D)
    acc = tl.zeros([CH, D], tl.float32)  # summed over rows once at the end, not every chunk
    acc2 = tl.zeros([CH, D], tl.float32)
    for c in range(0, BLOCK, CH):
        r = blk * BLOCK + c + tl.arange(0, CH)
        valid = r < L
        src = r
        if HAS_PERM:
            src = tl.load(Perm + r, mask=valid, other=0)
        x = tl.load(X + b * sxb + h * sxh + src[:, None] * sxl + dd[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32)
        acc += x
        if SECOND > 0:
            acc2 += x * x
    cnt = tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
    s1 = tl.sum(acc, 0)
    s2 = tl.sum(acc2, 0)
    mean = s1 / cnt
    tl.store(Out + b * sob + h * soh + blk * sol + dd, mean)
    if SECOND == 1:
        tl.store(Out2 + b * sob + h * soh + blk * sol + dd, s2 / cnt * scale2)
    if SECOND == 2:
        if HEAVY:
            hr = tl.arange(0, HC)
            for c0 in range(0, heavy_count, HC):
                at = c0 + hr
                mine = tl.load(HBlk + bh * heavy_count + at, mask=at < heavy_count, other=-1) == blk
                found = tl.sum(mine.to(tl.float32), 0)
                if found > 0:  # most blocks hold no heavy key: no row is read for them
                    src = tl.load(HIdx + bh * heavy_count + at, mask=mine, other=0)
                    xh = tl.load(X + b * sxb + h * sxh + src[:, None] * sxl + dd[None, :], mask=mine[:, None],
                                 other=0.0).to(tl.float32)
                    s1 -= tl.sum(xh, 0)
                    s2 -= tl.sum(xh * xh, 0)
                    cnt -= found
            left = tl.maximum(cnt, 1.0)
            var = tl.maximum(s2 / left - (s1 / left) * (s1 / left), 0.0)
            tl.store(Out2 + b * sob + h * soh + blk * sol + dd, tl.where(cnt > 0.5, var, 0.0))
        else:
            tl.store(Out2 + b * sob + h * soh + blk * sol + dd, tl.maximum(s2 / cnt - mean * mean, 0.0))


def block_lengths(L: int, block: int, device=None) -> torch.Tensor:
    """[nblocks] float32: real tokens of each block of ``block`` tokens (the last may be partial)."""
    nb = -(-L // block)
    lengths = torch.full((nb,), float(block), device=device)
    lengths[-1] = L - (nb - 1) * block
    return lengths


@functools.lru_cache(maxsize=64)
def block_lengths_cached(L: int, block: int, device: torch.device) -> torch.Tensor:
    """:func:`block_lengths`, made once per (L, block, device) (see :func:`block_log_lengths`)."""
    return block_lengths(L, block, device)


@functools.lru_cache(maxsize=64)
def block_shares_cached(L: int, block: int, device: torch.device) -> torch.Tensor:
    """Each block's share of the L tokens, made once per (L, block, device)."""
    return block_lengths(L, block, device) / L


@functools.lru_cache(maxsize=64)
def block_log_lengths(L: int, block: int, device: torch.device) -> torch.Tensor:
    """ln :func:`block_lengths`, made once per (L, block, device): writing the partial block's
    length into a device tensor is a copy from the host that waits for the device."""
    return block_lengths(L, block, device).log()


def block_means_reference(x: torch.Tensor, block: int, square: bool = False) -> torch.Tensor:
    """[B, H, nblocks, D] float32 means of ``block`` consecutive rows of x [B, H, L, D] (arranged);
    a partial last block is the mean of its real rows. ``square``: means of the rows' squares."""
    B, H, L, D = x.shape
    nb = -(-L // block)
    xa = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - L))
    if square:
        xa = xa * xa
    return xa.view(B, H, nb, block, D).sum(3) / block_lengths(L, block, x.device)[:, None]


SECONDS = {"": 0, "squares": 1, "variance": 2}


def block_means_triton(x: torch.Tensor, block: int, perm: torch.Tensor | None = None,
                       second: str = "", heavy=None, squares_scale: float = 1.0):
    """:func:`block_means_reference` in one Triton pass; with ``perm`` x is in the caller's order
    and is read as ``x[..., perm, :]`` without a copy. ``second`` "squares" / "variance": the
    means and, from the same pass, the means of the squares (times ``squares_scale``) / the
    variances (a pair). ``heavy`` (a
    :class:`~.heavy.HeavyKeys`, with "variance" only): the variances leave the heavy keys out;
    the means still cover every row."""
    B, H, L, D = x.shape
    nb = -(-L // block)
    if heavy is not None and second != "variance":
        raise ValueError("block_means_triton: heavy keys are left out of the variances only (second='variance')")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((B, H, nb, D), device=x.device, dtype=torch.float32)
    out2 = torch.empty_like(out) if second else out
    if heavy is not None:
        h_index, h_block, h_count = heavy.index.contiguous(), heavy.block.contiguous(), heavy.index.shape[-1]
    else:
        h_index = h_block = out
        h_count = 0
    _block_mean_kernel[(nb, B * H)](
        x, out, out2, perm if perm is not None else out, h_index, h_block, h_count, L, float(squares_scale),
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2), H=H, D=D, BLOCK=block, CH=min(block, 32),
        HAS_PERM=perm is not None, SECOND=SECONDS[second], HEAVY=heavy is not None, HC=32,
        num_warps=4)
    return (out, out2) if second else out


def scores_from_means(qm: torch.Tensor, km: torch.Tensor, L: int, n: int) -> torch.Tensor:
    """Block scores [B, H, nqb, nkb] from the block means of q (blocks of m) and k (blocks of n):
    the softmax over key blocks of mean(q_i) . mean(k_j) / sqrt(D) + ln(real keys of j)."""
    B, H, nqb, D = qm.shape
    nkb = km.shape[2]
    # the scale and the length bias in the product's call (one op instead of three), then the softmax
    s = torch.baddbmm(block_log_lengths(L, n, qm.device), qm.reshape(B * H, nqb, D),
                      km.reshape(B * H, nkb, D).transpose(1, 2), alpha=1.0 / math.sqrt(D))
    return s.view(B, H, nqb, nkb).softmax(-1)


def estimate_block_mean(q: torch.Tensor, k: torch.Tensor, m: int, n: int,
                        perm: torch.Tensor | None = None, triton_means: bool = True) -> torch.Tensor:
    """Block scores [B, H, nqb, nkb] from block means: the softmax over key blocks of
    mean(q_i) . mean(k_j) / sqrt(D) + ln(real keys of j). One pass over q and k and one small
    product per head instead of a sampled QK^T. With ``triton_means`` the means are taken by
    :func:`block_means_triton` (q, k in the caller's order, read through ``perm``); otherwise
    in torch, from q and k already arranged (``perm`` must be None)."""
    B, H, L, D = q.shape
    if triton_means:
        qm, km = block_means_triton(q, m, perm), block_means_triton(k, n, perm)
    else:
        if perm is not None:
            raise ValueError("the torch block means take arranged q and k (perm None)")
        qm, km = block_means_reference(q, m), block_means_reference(k, n)
    return scores_from_means(qm, km, L, n)
