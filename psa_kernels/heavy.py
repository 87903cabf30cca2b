"""Heavy keys (``heavy_keys``): a few keys per head that every query attends exactly.

Some heads of video DiTs put much of their attention on a handful of single tokens scattered
over the sequence ("sink" tokens). Block routing misses them: a sampled estimate reads every
4th key, a block mean dilutes one token n-fold, and the pooled tail gives the token 1/n of its
weight. Per (batch, head) the ``count`` keys with the largest logit against the head's mean
query are taken out of the block structure where their block is skipped: a query block whose
level map puts a heavy key's block at level 0 attends that key exactly, and that block's tail
mean is taken over its other keys. Where the block is routed (level 1, 2, 4 or 8) the key stays
where it is, so every key counts once. Selection reads q and k once (one mean, one product);
given the per-block means of q from another pass (:func:`mean_query_from_blocks`), k alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .triton_compat import tl, triton

LOGIT_ROWS = 64  # keys per program of the mean-query logit kernel


@dataclass
class HeavyKeys:
    """Per (batch, head) the chosen keys: where they are and which key block holds them."""
    index: torch.Tensor   # [B, H, K] int64, positions in the order q and k were given
    block: torch.Tensor   # [B, H, K] int32, key block (arranged order) of each key

    def heads(self, sl: slice) -> "HeavyKeys":
        return HeavyKeys(self.index[:, sl], self.block[:, sl])


@triton.jit
def _mean_query_logit_kernel(K, Qbar, Out, L, skb, skh, skl, H: tl.constexpr, D: tl.constexpr, CH: tl.constexpr):
    # One program: CH keys of one (batch, head), each dotted with the head's mean query.
    c = tl.program_id(0)
    bh = tl.program_id(1)
    r = c * CH + tl.arange(0, CH)
    valid = r < L
    dd = tl.arange(0, D)
    k = tl.load(K + (bh // H) * skb + (bh % H) * skh + r[:, None] * skl + dd[None, :], mask=valid[:, None], other=0.0)
    qbar = tl.load(Qbar + bh * D + dd)
    tl.store(Out + bh * L + r, tl.sum(k.to(tl.float32) * qbar[None, :], 1), mask=valid)


def mean_query_from_blocks(q_mean: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """[B, H, D] float32: the mean query of each head from its block means ``q_mean``
    [B, H, nqb, D] and each block's share of the tokens ``shares`` [nqb] (one product)."""
    return torch.matmul(shares, q_mean)


def mean_query_logits(q: torch.Tensor, k: torch.Tensor, use_triton: bool = False,
                      qbar: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, L] float32: every key's logit against its head's mean query (q, k [B, H, L, D], any
    strides with unit stride along D on the Triton path; ``qbar`` [B, H, D] float32: that mean
    query, known already, and q is not read). Neither path copies q or k: the mean is a strided
    reduction, and the Triton kernel reads k once where torch's batched product would first
    copy a k that is a view of [B, L, H*D] (benchmarks/NOTES.md, change 32)."""
    B, H, L, D = k.shape
    if qbar is None:
        qbar = q.mean(dim=2, dtype=torch.float32)                          # [B, H, D]
    if not use_triton:
        return torch.matmul(k.float(), qbar.unsqueeze(-1)).squeeze(-1)
    out = torch.empty((B, H, L), device=k.device, dtype=torch.float32)
    _mean_query_logit_kernel[(triton.cdiv(L, LOGIT_ROWS), B * H)](
        k, qbar.contiguous(), out, L, k.stride(0), k.stride(1), k.stride(2), H=H, D=D, CH=LOGIT_ROWS, num_warps=4)
    return out


def select_heavy_keys(q: torch.Tensor, k: torch.Tensor, count: int, n: int,
                      inv: torch.Tensor | None = None, video_len: int | None = None,
                      use_triton: bool = False, qbar: torch.Tensor | None = None) -> HeavyKeys:
    """The ``count`` keys of each head with the largest ``mean(q) . k`` ([B, H, L, D] in the
    caller's order; ``inv[i]`` is the arranged position of token i, None for the identity).
    Only video tokens are candidates (``video_len`` of them, first in the arranged order): text
    blocks are always attended in full. ``qbar``: the mean query, known already (q unread)."""
    B, H, L, D = k.shape
    count = min(int(count), L)
    logit = mean_query_logits(q, k, use_triton, qbar)
    pos = inv if inv is not None else torch.arange(L, device=k.device)
    if video_len is not None and video_len < L:
        logit = logit.masked_fill(pos >= video_len, float("-inf"))
        count = min(count, video_len)
    index = logit.topk(count, dim=-1, sorted=False).indices
    return HeavyKeys(index, (pos[index] // n).to(torch.int32))


def gather_rows(x: torch.Tensor, index: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """x[b, h, index[b, h]] as [B, H, rows, D] (rows >= K; the rows past K are zero)."""
    B, H, _, D = x.shape
    K = index.shape[-1]
    out = x.new_zeros((B, H, rows or K, D))
    out[:, :, :K] = torch.gather(x, 2, index.unsqueeze(-1).expand(B, H, K, D))
    return out


def padded_blocks(heavy: HeavyKeys, rows: int) -> torch.Tensor:
    """[B, H, rows] int32 key blocks, -1 past the K chosen keys (rows the kernel masks)."""
    B, H, K = heavy.block.shape
    out = torch.full((B, H, rows), -1, dtype=torch.int32, device=heavy.block.device)
    out[:, :, :K] = heavy.block
    return out


def tail_without_heavy(sums_k: torch.Tensor, sums_v: torch.Tensor, counts: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, heavy: HeavyKeys):
    """Block means over the keys that are not heavy. ``sums_k``/``sums_v`` [B, H, nkb, D] float32
    sums over every real key of each block, ``counts`` [nkb] its real keys; k, v in the order
    ``heavy.index`` refers to. Returns the means [B, H, nkb, D] float32 and the bias
    [B, H, nkb] float32 (ln of the keys left; -inf for a block whose keys are all heavy)."""
    B, H, nkb, D = sums_k.shape
    blk = heavy.block.long()
    hk, hv = gather_rows(k, heavy.index).float(), gather_rows(v, heavy.index).float()
    sk = sums_k.scatter_add(2, blk.unsqueeze(-1).expand_as(hk), -hk)
    sv = sums_v.scatter_add(2, blk.unsqueeze(-1).expand_as(hv), -hv)
    left = counts.expand(B, H, nkb).scatter_add(2, blk, -torch.ones_like(blk, dtype=counts.dtype))
    div = left.clamp_min(1.0).unsqueeze(-1)
    bias = torch.where(left > 0.5, left.clamp_min(1.0).log(), torch.full_like(left, -math.inf))
    return sk / div, sv / div, bias


def heavy_per_row(levels: torch.Tensor, heavy: HeavyKeys) -> torch.Tensor:
    """[B, H, nqb]: heavy keys each query block attends exactly (those in its level-0 blocks)."""
    B, H, nqb, nkb = levels.shape
    blk = heavy.block.long().unsqueeze(2).expand(B, H, nqb, heavy.block.shape[-1])
    return (levels.gather(-1, blk) == 0).sum(-1)
