"""The tail's spread correction: how much more mass a skipped key block holds than its mean key.

The pooled tail (``use_pooled_tail``) stands for a skipped block of n keys by its mean key k̄
with bias ln(n): a query's mass there is taken as ``n exp(s q.k̄)``. The true mass is
``sum_t exp(s q.k_t)``, which is larger (exp is convex), and by more the more the block's keys
spread along the query. To second order, per dimension, with the block's key variances var_J
and the query block's mean of squared queries Q2_I (s = 1 / sqrt(D)):

    ln(sum_t exp(s q.k_t)) ~ ln(n) + s q.k̄ + s^2 / 2 * Q2_I . var_J

``tail_spread_bias`` gives the last term for every (query block, key block) pair. It is one
number per pair, so the kernel reads it through the schedule's tail bias at no cost
(``tail_correction: variance``; benchmarks/NOTES.md change 41). Heavy keys, attended on their
own, leave their blocks' variances as they leave their means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .estimate import block_lengths_cached, block_means_reference, block_means_triton
from .heavy import HeavyKeys, gather_rows


def key_block_variance(k: torch.Tensor, n: int, perm: torch.Tensor | None = None,
                       heavy: HeavyKeys | None = None, use_triton: bool = True) -> torch.Tensor:
    """[B, H, nkb, D] float32: per key block and dimension the variance (over the block's real
    keys, heavy keys left out) of the arranged keys. ``use_triton``: k in the caller's order
    read through ``perm``, one pass (``heavy.index`` in that order); otherwise k arranged
    (``perm`` None, ``heavy.index`` in the arranged order)."""
    B, H, L, D = k.shape
    if use_triton:
        return block_means_triton(k, n, perm, second="variance", heavy=heavy)[1]
    if perm is not None:
        raise ValueError("the torch block variances take arranged keys (perm None)")
    mean, mean_sq = block_means_reference(k, n), block_means_reference(k, n, square=True)
    if heavy is None:
        return (mean_sq - mean * mean).clamp_min_(0.0)
    counts = block_lengths_cached(L, n, k.device).expand(B, H, -1)
    blk = heavy.block.long()
    hk = gather_rows(k, heavy.index).float()
    at = blk.unsqueeze(-1).expand_as(hk)
    sums = (mean * counts.unsqueeze(-1)).scatter_add(2, at, -hk)
    sums_sq = (mean_sq * counts.unsqueeze(-1)).scatter_add(2, at, -hk * hk)
    left = counts.scatter_add(2, blk, -torch.ones_like(blk, dtype=counts.dtype)).unsqueeze(-1)
    mean = sums / left.clamp_min(1.0)
    var = (sums_sq / left.clamp_min(1.0) - mean * mean).clamp_min_(0.0)
    return var.masked_fill_(left < 0.5, 0.0)  # a block of heavy keys only has no tail row


@dataclass
class BlockMoments:
    """What one Triton pass over q and one over k give (all [B, H, blocks, D] float32): the
    block means the block-mean estimate routes with, and the moments the spread needs."""
    q_mean: torch.Tensor   # per query block of m
    q_sq: torch.Tensor     # per query block, the mean of the squared queries times s^2 / 2
    k_mean: torch.Tensor   # per key block of n, every key
    k_var: torch.Tensor    # per key block, the variance over its keys that are not heavy


def query_moments(q: torch.Tensor, m: int, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The q half of :class:`BlockMoments` (``q_mean``, ``q_sq``), one pass over q in the
    caller's order (read through ``perm``)."""
    return block_means_triton(q, m, perm, second="squares", squares_scale=0.5 / q.shape[-1])


def block_moments(q: torch.Tensor, k: torch.Tensor, m: int, n: int, perm: torch.Tensor | None = None,
                  heavy: HeavyKeys | None = None,
                  query: tuple[torch.Tensor, torch.Tensor] | None = None) -> BlockMoments:
    """:class:`BlockMoments` of q and k in the caller's order (read through ``perm``);
    ``query``: :func:`query_moments` of q taken already (q is not read again)."""
    q_mean, q_sq = query if query is not None else query_moments(q, m, perm)
    k_mean, k_var = block_means_triton(k, n, perm, second="variance", heavy=heavy)
    return BlockMoments(q_mean, q_sq, k_mean, k_var)


def spread_from_moments(mom: BlockMoments) -> torch.Tensor:
    """[B, H, nqb, nkb] float32: :func:`tail_spread_bias` from the moments."""
    return torch.matmul(mom.q_sq, mom.k_var.transpose(-1, -2))


def tail_spread_bias(q: torch.Tensor, k: torch.Tensor, m: int, n: int, perm: torch.Tensor | None = None,
                     heavy: HeavyKeys | None = None, use_triton: bool = True) -> torch.Tensor:
    """[B, H, nqb, nkb] float32 (natural log): s^2 / 2 * Q2_I . var_J for every pair of a query
    block of m and a key block of n (module docstring). ``use_triton``: q, k in the caller's
    order read through ``perm``; otherwise both arranged (``perm`` None)."""
    if use_triton:
        return spread_from_moments(block_moments(q, k, m, n, perm, heavy))
    if perm is not None:
        raise ValueError("the torch tail spread takes arranged q and k (perm None)")
    q2 = block_means_reference(q, m, square=True).mul_(0.5 / q.shape[-1])
    return torch.matmul(q2, key_block_variance(k, n, heavy=heavy, use_triton=False).transpose(-1, -2))
