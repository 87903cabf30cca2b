"""What the pooled tail and the heavy keys cost inside a call, stage by stage.

    python3 benchmarks/tail_cost_probe.py            # GPU: 480p x 12 heads and 720p x 40 heads

Level 1 on a share of the key blocks (topk, n = 64, block-mean routing), with and without the
tail and 128 heavy keys, on the medium regime of bench_peers.py. Each stage is timed alone
(do_bench median): the pyramid build (with tail rows), the tile schedule, the attention kernel
on that schedule, and the whole psa_attention call; with the kernel's tiles per query block
(level-1 tiles and tail tiles), and its rate in tiles per microsecond.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from psa_kernels import PSAConfig, attention, psa_attention, psa_plan, pyramid, schedule  # noqa: E402
from bench_peers import REGIMES, SHAPES, make_inputs  # noqa: E402


def cfg(a: float, tail: bool, heavy: int) -> PSAConfig:
    return PSAConfig.from_dict({"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_mode": "topk",
                                "attn_impl": "new_mask_type", "use_pooled_tail": tail, "heavy_keys": heavy,
                                "estimate_method": "block_mean", "mask_ratios": {1: [0.0, a], 0: [a, 1.0]}}, "probe")


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    dev = torch.device("cuda")
    for shape in ("480p", "720p"):
        grid, heads = SHAPES[shape]
        q, k, v, _ = make_inputs(shape, REGIMES["medium"], dev, torch.bfloat16)
        B, L, _ = q.shape
        qh, kh, vh = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
        print(f"\n{shape} x {heads} heads (L = {L})")
        print(f"{'preset':24s} {'call':>7s} {'build':>7s} {'sched':>7s} {'kernel':>7s} {'l1 tiles':>8s} "
              f"{'tail t.':>7s} {'tiles/us':>8s}")
        for a in (0.005, 0.02, 0.05):
            for tail, heavy in ((False, 0), (True, 0), (True, 128)):
                c = cfg(a, tail, heavy)
                plan = psa_plan(qh, kh, c, grid, v=vh)
                pyr = plan.pyramid
                sched = schedule.build_schedule(plan.levels, pyr, packed=True)
                nkb = plan.levels.shape[-1]
                l1 = float(sched.num_tiles.float().mean())
                tail_t = -(-nkb // 64) if tail else 0
                heavy_t = 2 if heavy else 0
                t_call = bench(lambda: psa_attention(qh, kh, vh, c, grid))
                t_build = bench(lambda: pyramid.build_pyramid_triton(kh, vh, 64, L, perm=plan.perm, tail=tail,
                                                                     heavy=plan.heavy))
                t_sched = bench(lambda: schedule.build_schedule(plan.levels, pyr, packed=True))
                t_kern = bench(lambda: attention.attention_triton(qh, pyr, sched, 128, perm=plan.perm))
                rows = B * heads * plan.levels.shape[2]
                rate = rows * (l1 + tail_t + heavy_t) / (t_kern * 1e3)
                name = f"l1 {a:g}" + (" +tail" if tail else "") + (f" +h{heavy}" if heavy else "")
                print(f"{name:24s} {t_call:7.3f} {t_build:7.3f} {t_sched:7.3f} {t_kern:7.3f} {l1:8.1f} "
                      f"{tail_t:7d} {rate:8.1f}", flush=True)


if __name__ == "__main__":
    main()
