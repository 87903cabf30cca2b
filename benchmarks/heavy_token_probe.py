"""Error-only probe (torch, CPU is enough): would exact attention to a few heavy keys per head
fix PSA's error on mixed video-DiT heads? Prints one table.

    python3 benchmarks/heavy_token_probe.py                    # grid 8 x 16 x 24, 6 heads, ~1 min on a CPU

For each head type of ``psa_kernels.synthetic.video_attention_qkv`` (and all mixed), inputs
calibrated to a top-10% block-mass share, the output error against dense attention of:

- ``tail``: level 1 on a share of the key blocks (PSA's own routing, topk), every other block as
  its mean key/value (the pooled tail, bias ln count);
- ``tail + heavy K``: the same, plus the K keys of the head with the largest mean logit over
  all queries attended exactly by every query, and taken out of their blocks' means.

This is the scheme of benchmarks/NOTES.md, "What is left"; the kernel does not exist yet.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import PSAConfig, psa_plan  # noqa: E402
from psa_kernels.layout import arrange  # noqa: E402
from psa_kernels.synthetic import calibrate_logit_scale, relative_l2, video_attention_qkv  # noqa: E402


def tail_attention(q, k, v, levels, m, n, heavy: int):
    """Level-1 blocks exact, other blocks as means, plus ``heavy`` exact keys per head (arranged
    q, k, v [1, H, L, D]; levels [1, H, nqb, nkb] with 1 or 0), [H, L, D] in float64."""
    _, H, L, D = q.shape
    nkb = -(-L // n)
    out = torch.empty(H, L, D, dtype=torch.float64)
    for h in range(H):
        qh, kh, vh = q[0, h].double(), k[0, h].double(), v[0, h].double()
        is_heavy = torch.zeros(L, dtype=torch.bool)
        if heavy:
            is_heavy[(qh.mean(0) @ kh.T).topk(heavy).indices] = True
        blk = torch.arange(L) // n
        keep = (~is_heavy).double()
        cnt = torch.zeros(nkb, dtype=torch.float64).index_add_(0, blk, keep)
        ksum = torch.zeros(nkb, D, dtype=torch.float64).index_add_(0, blk, kh * keep[:, None])
        vsum = torch.zeros(nkb, D, dtype=torch.float64).index_add_(0, blk, vh * keep[:, None])
        kmean, vmean = ksum / cnt.clamp_min(1)[:, None], vsum / cnt.clamp_min(1)[:, None]
        bias = torch.where(cnt > 0, cnt.clamp_min(1).log(), torch.full_like(cnt, -math.inf))
        for i in range(-(-L // m)):
            rows = slice(i * m, min(L, (i + 1) * m))
            full = levels[0, h, i].cpu() == 1                      # [nkb]
            exact = full[blk] | is_heavy                           # keys attended one by one
            pooled = ~full                                         # blocks attended as means
            s_exact = qh[rows] @ kh[exact].T / math.sqrt(D)
            s_pool = qh[rows] @ kmean[pooled].T / math.sqrt(D) + bias[pooled]
            p = torch.cat([s_exact, s_pool], 1).softmax(-1)
            out[h, rows] = p @ torch.cat([vh[exact], vmean[pooled]])  # a heavy key in a full block counts once
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 16, 24))
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--share", type=float, default=0.6, help="top-10%% block-mass share of the inputs")
    ap.add_argument("--level1", type=float, nargs="*", default=[0.05, 0.1])
    ap.add_argument("--heavy", type=int, nargs="*", default=[0, 32, 128])
    args = ap.parse_args()
    grid, m, n = tuple(args.grid), 64, 64
    kinds = {"local": ("local",), "spatial": ("spatial",), "temporal": ("temporal",), "sink": ("sink",),
             "uniform": ("uniform",), "mixed": ("spatial", "temporal", "local", "sink", "spatial", "uniform")}
    print(f"grid {grid}, {args.heads} heads, head dim 128, blocks {m}/{n}, top-10% share {args.share}")
    print(f"{'heads':9s} {'level 1':>7s} " + " ".join(f"{'heavy ' + str(h):>9s}" for h in args.heavy))
    for name, types in kinds.items():
        q, k, v = video_attention_qkv(grid, heads=args.heads, head_dim=128, head_types=types, seed=3)
        s = calibrate_logit_scale(q, k, args.share, per_head=name != "mixed")
        q = q * (s[None, :, None, None] if isinstance(s, torch.Tensor) else s)
        dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        for a in args.level1:
            cfg = PSAConfig.from_dict({"block_size": {"m": m, "n": n, "tile_n": 32}, "mask_mode": "topk",
                                       "mask_ratios": {1: [0.0, a], 0: [a, 1.0]}, "use_pooled_tail": True})
            plan = psa_plan(q, k, cfg, grid, backend="torch")
            qa, ka, va = (arrange(x, plan.perm) for x in (q, k, v))
            ref = arrange(dense, plan.perm)
            errs = [relative_l2(tail_attention(qa, ka, va, plan.levels, m, n, h), ref[0]) for h in args.heavy]
            print(f"{name:9s} {a:7.2f} " + " ".join(f"{e:9.4f}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
