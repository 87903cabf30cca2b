"""Routing and tail probe: for a few presets, the error and the time of a whole call with the
sampled estimate (the library's) and with block-mean proxies, with and without the pooled tail,
on concentrated and diffuse inputs. Prints one table.

    python3 benchmarks/route_probe.py --grid 21 30 52 --heads 12
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import PSAConfig, psa_attention, psa_plan  # noqa: E402
from psa_kernels import estimate, levels as levels_mod  # noqa: E402
from psa_kernels.layout import sequence_permutation  # noqa: E402
from psa_kernels.synthetic import relative_l2, structured_qkv  # noqa: E402

PRESETS = {
    "topk_n64_d10": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                     "mask_ratios": {1: [0, .06], 2: [.06, .1], 4: [.1, .16], 8: [.16, .3], 0: [.3, 1]},
                     "mask_mode": "topk"},
    "topk_n64_l1_10": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                       "mask_ratios": {1: [0, .1], 0: [.1, 1]}, "mask_mode": "topk"},
    "topk_n64_l1_05": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                       "mask_ratios": {1: [0, .05], 0: [.05, 1]}, "mask_mode": "topk"},
    "thr_n64": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                "mask_ratios": {1: [0, .6], 2: [.6, .75], 4: [.75, .85], 8: [.85, .92], 0: [.92, 1]},
                "mask_mode": "thresholdbound"},
    "topk_n128_d10": {"block_size": {"m": 128, "n": 128, "tile_n": 32},
                      "mask_ratios": {1: [0, .06], 2: [.06, .1], 4: [.1, .16], 8: [.16, .3], 0: [.3, 1]},
                      "mask_mode": "topk"},
}


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def top10_mass(q, k, n=64, rows=256):
    """Share of attention mass on the top 10% of 64-token key blocks (raster order), sampled queries."""
    B, H, L, D = q.shape
    idx = torch.linspace(0, L - 1, rows, device=q.device).long()
    s = (q[:, :, idx].float() @ k.float().transpose(-1, -2)) / D ** 0.5
    p = s.softmax(-1)
    nkb = L // n
    pb = p[..., :nkb * n].reshape(B, H, rows, nkb, n).sum(-1)
    top = pb.sort(-1, descending=True).values[..., :max(1, nkb // 10)].sum(-1)
    return float(top.mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--sharpness", type=float, nargs="*", default=[8.0, 14.0, 2.0, 4.0],
                    help="pairs (lo hi) of input regimes")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    args = ap.parse_args()
    grid = tuple(args.grid)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for lo, hi in zip(args.sharpness[::2], args.sharpness[1::2]):
        q, k, v = structured_qkv(grid, heads=args.heads, head_dim=128, dtype=torch.bfloat16, device="cuda",
                                 seed=1, sharpness=(lo, hi))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = sdpa(q, k, v)
            dense_ms = bench(lambda: sdpa(q, k, v))
        mass = top10_mass(q, k)
        print(f"regime sharpness ({lo}, {hi}): top-10% mass {mass:.2f}, cuDNN {dense_ms:.2f} ms", flush=True)
        for name in args.presets:
            for tail in (False, True):
                for method in ("sampled", "block_mean"):
                    cfg = PSAConfig.from_dict({**PRESETS[name], "use_pooled_tail": tail, "estimate_method": method})
                    m, n = cfg.block_size.m, cfg.block_size.n
                    perm, _ = sequence_permutation(grid, 0, False, cfg.rearrange_method, tuple(cfg.tile_size),
                                                   cfg.use_rearrange, q.device)
                    plan = psa_plan(q, k, cfg, grid, backend="triton")
                    out, st = psa_attention(q, k, v, cfg, grid, plan=plan, return_stats=True)
                    t_total = bench(lambda: psa_attention(q, k, v, cfg, grid))
                    t_est = bench(lambda: (estimate.estimate_triton(q, k, m, n, perm) if method == "sampled"
                                           else estimate.estimate_block_mean(q, k, m, n, perm)))
                    t_lev = bench(lambda: levels_mod.assign_levels_triton(plan.scores, cfg))
                    r = dict(regime=f"{lo:g}-{hi:g}", mass=mass, preset=name, tail=tail, method=method,
                             density=st.density, err=relative_l2(out, ref), x=dense_ms / t_total, total=t_total,
                             est=t_est, lev=t_lev, dense=dense_ms)
                    rows.append(r)
                    print(r, flush=True)
        del q, k, v, ref
    print(f"\n{torch.cuda.get_device_name()} grid {grid} heads {args.heads} D 128 bf16; error vs cuDNN output")
    print(f"{'regime':8s} {'mass':>4s} {'preset':16s} {'tail':>5s} {'route':>10s} {'dens':>5s} {'err':>6s} {'x':>5s} "
          f"{'total':>6s} {'est':>5s} {'lev':>5s}")
    for r in rows:
        print(f"{r['regime']:8s} {r['mass']:4.2f} {r['preset']:16s} {str(r['tail']):>5s} {r['method']:>10s} "
              f"{r['density']:5.3f} {r['err']:6.3f} {r['x']:5.2f} {r['total']:6.2f} {r['est']:5.2f} {r['lev']:5.2f}")


if __name__ == "__main__":
    main()
