"""Stage 2: block importance, estimated from a strided sample of queries and keys.

For query block i and key block j the score is the share of attention mass that the
sampled queries of block i put on the sampled keys of block j (softmax over all sampled
keys of the row, summed per key block, averaged over the block's sampled queries), so
each row of scores sums to 1. Sampling every ``m/SAMPLE_Q``-th query and every 4th key
keeps the cost near 1/32 of a dense QK^T.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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
def _sampled_keys(kbase, Perm, t, kk, dd, L, nkb, skl,
                  N: tl.constexpr, SK: tl.constexpr, KBLOCKS: tl.constexpr, HAS_PERM: tl.constexpr):
    """Sampled keys of key blocks t*KBLOCKS ... as a [D, KBLOCKS*SK] tile, and which are real."""
    k_stride: tl.constexpr = N // SK
    kblk = t * KBLOCKS + kk // SK
    krow = kblk * N + (kk % SK) * k_stride + k_stride // 2
    kvalid = ((krow < L) | (kk % SK == 0)) & (kblk < nkb)
    krow = tl.minimum(krow, L - 1)
    if HAS_PERM:  # rows are positions in the arranged order; read them where the caller has them
        krow = tl.load(Perm + krow)
    kt = tl.load(kbase + krow[None, :] * skl + dd[:, None], mask=kvalid[None, :], other=0.0)
    return kt, kvalid


@triton.jit
def _estimate_kernel(Q, K, Out, Perm, L, nqb, nkb, sm_scale_log2,
                     sqb, sqh, sql, skb, skh, skl, sob, soh, soq,
                     H: tl.constexpr, D: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                     SQ: tl.constexpr, SK: tl.constexpr, QBLOCKS: tl.constexpr, KBLOCKS: tl.constexpr,
                     HAS_PERM: tl.constexpr):
    # One program: QBLOCKS query blocks of one (batch, head), so the sampled queries fill a
    # tensor-core tile. Two passes over the sampled keys: the first finds each sampled
    # query's softmax max and normaliser, the second sums the probabilities per key block.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ROWS: tl.constexpr = QBLOCKS * SQ
    TILE: tl.constexpr = KBLOCKS * SK
    q_stride: tl.constexpr = M // SQ

    i = tl.arange(0, ROWS)
    qblk = pid * QBLOCKS + i // SQ
    qrow = qblk * M + (i % SQ) * q_stride + q_stride // 2
    qvalid = ((qrow < L) | (i % SQ == 0)) & (qblk < nqb)
    qrow = tl.minimum(qrow, L - 1)
    if HAS_PERM:  # rows are positions in the arranged order; read them where the caller has them
        qrow = tl.load(Perm + qrow)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + qrow[:, None] * sql + dd[None, :], mask=qvalid[:, None], other=0.0)
    kbase = K + b * skb + h * skh

    kk = tl.arange(0, TILE)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    ntiles = tl.cdiv(nkb, KBLOCKS)
    for t in range(0, ntiles):
        kt, kvalid = _sampled_keys(kbase, Perm, t, kk, dd, L, nkb, skl, N, SK, KBLOCKS, HAS_PERM)
        s = tl.where(kvalid[None, :], tl.dot(q, kt) * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new

    # weight of each sampled query: 1 / (its normaliser * real samples of its query block)
    nreal = tl.sum(tl.reshape(qvalid.to(tl.float32), [QBLOCKS, SQ]), 1)
    w = tl.where(qvalid, 1.0 / l_i, 0.0)
    w = tl.reshape(tl.reshape(w, [QBLOCKS, SQ]) / tl.maximum(nreal, 1.0)[:, None], [ROWS])
    jq = pid * QBLOCKS + tl.arange(0, QBLOCKS)
    jk = tl.arange(0, KBLOCKS)
    for t in range(0, ntiles):
        kt, kvalid = _sampled_keys(kbase, Perm, t, kk, dd, L, nkb, skl, N, SK, KBLOCKS, HAS_PERM)
        s = tl.dot(q, kt) * sm_scale_log2
        p = tl.where(kvalid[None, :], tl.exp2(s - m_i[:, None]) * w[:, None], 0.0)
        per_q = tl.sum(tl.reshape(p, [QBLOCKS, SQ, TILE]), 1)             # [QBLOCKS, TILE]
        blk = tl.sum(tl.reshape(per_q, [QBLOCKS, KBLOCKS, SK]), 2)        # [QBLOCKS, KBLOCKS]
        kb = t * KBLOCKS + jk
        tl.store(Out + b * sob + h * soh + jq[:, None] * soq + kb[None, :], blk,
                 mask=(jq < nqb)[:, None] & (kb < nkb)[None, :])


def estimate_triton(q: torch.Tensor, k: torch.Tensor, m: int, n: int,
                    perm: torch.Tensor | None = None, rows: int = 128, tile: int = 64,
                    num_warps: int | None = None) -> torch.Tensor:
    """Same function as :func:`estimate_reference`, as a Triton kernel. With ``perm`` the
    inputs are in the caller's order and are read as ``x[..., perm, :]`` without a copy.
    The launch defaults are the fastest of benchmarks/stage_probe.py on an H100."""
    B, H, L, D = q.shape
    sq, sk = sample_counts(m, n)
    nqb, nkb = -(-L // m), -(-L // n)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    out = torch.empty((B, H, nqb, nkb), device=q.device, dtype=torch.float32)
    qblocks = max(1, rows // sq)  # sampled queries of several blocks fill one tensor-core tile
    kblocks = max(1, tile // sk)
    sm_scale_log2 = (1.0 / math.sqrt(D)) * 1.4426950408889634
    _estimate_kernel[(triton.cdiv(nqb, qblocks), B * H)](
        q, k, out, perm if perm is not None else out, L, nqb, nkb, sm_scale_log2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H=H, D=D, M=m, N=n, SQ=sq, SK=sk, QBLOCKS=qblocks, KBLOCKS=kblocks,
        HAS_PERM=perm is not None, num_warps=num_warps or (8 if n <= 32 else 4))
    return out
