"""Stages 3 and 4: pyramid level of every (query block, key block) pair.

Levels: 1 = full resolution, 2/4/8 = keys and values mean-pooled by p, 0 = skipped.
All functions are plain torch and run on the device of their inputs.
"""
from __future__ import annotations

import math

import torch

from .config import POOLED_LEVELS, PSAConfig

# thresholdbound: level 1 always keeps at least this share of each row's key blocks.
MIN_FULL_SHARE = 0.06


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
    those pairs are always level 1. Every row keeps at least one non-skipped block.
    """
    nkb = scores.shape[-1]
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    if cfg.mask_mode == "topk":
        by_rank = _ranked_levels_topk(nkb, cfg, scores.device).expand_as(order)
    else:
        by_rank = _ranked_levels_threshold(sorted_scores, cfg)
    # No row may be empty: the best block of a row with nothing kept becomes level 1.
    empty = (by_rank != 0).sum(-1, keepdim=True) == 0
    by_rank = by_rank.clone()
    by_rank[..., :1] = torch.where(empty, torch.ones_like(by_rank[..., :1]), by_rank[..., :1])
    levels = torch.empty_like(by_rank).scatter_(-1, order, by_rank)
    if text_k_blocks is not None and bool(text_k_blocks.any()):
        levels[..., text_k_blocks] = 1
    if text_q_blocks is not None and bool(text_q_blocks.any()):
        levels[..., text_q_blocks, :] = 1
    return levels


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


def density(levels: torch.Tensor) -> torch.Tensor:
    """Density per (batch, head): sum over pairs of 1/p for p > 0, over the number of pairs."""
    lv = levels.float()
    inv = torch.where(lv > 0, 1.0 / lv.clamp_min(1.0), torch.zeros_like(lv))
    return inv.mean(dim=(-1, -2))
