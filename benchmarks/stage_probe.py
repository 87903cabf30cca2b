"""Launch variants of the estimate, level-assignment and pyramid-build kernels at Wan shapes.

    python3 benchmarks/stage_probe.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import PSAConfig, estimate, levels, pyramid  # noqa: E402
from psa_kernels.layout import sequence_permutation  # noqa: E402
from psa_kernels.synthetic import structured_qkv  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main():
    print("grid        m   n  stage     variant               ms")
    for grid in ((21, 30, 52), (21, 45, 80)):
        q, k, v = structured_qkv(grid, heads=12, head_dim=128, dtype=torch.bfloat16, device="cuda", seed=1)
        perm, _ = sequence_permutation(grid, device="cuda")
        for m, n in ((128, 32), (128, 64), (128, 128)):
            for rows in (128, 256):
                for tile in (64, 128):
                    for nw in (4, 8):
                        try:
                            launch = estimate.EstimateLaunch(rows=rows, tile=tile, num_warps=nw)
                            ms = bench(lambda: estimate.estimate_triton(q, k, m, n, perm, launch=launch))
                        except Exception as e:  # out of resources for this variant
                            print(f"estimate rows{rows} tile{tile} w{nw}: {str(e)[:80]}")
                            continue
                        print(f"{str(grid):11s} {m:3d} {n:3d}  estimate  rows{rows} tile{tile} w{nw}  {ms:7.3f}", flush=True)
            for sim in (False, True):
                for chunk in (16, 32, 64):
                    for nw in (1, 2, 4, 8):
                        if chunk > n:
                            continue
                        launch = pyramid.BuildLaunch(chunk=chunk, num_warps=nw)
                        ms = bench(lambda: pyramid.build_pyramid_triton(k, v, n, q.shape[2], sim, perm,
                                                                        launch=launch))
                        print(f"{str(grid):11s} {m:3d} {n:3d}  pyramid   sim{int(sim)} ch{chunk} w{nw}    {ms:7.3f}", flush=True)
            scores = estimate.estimate_triton(q, k, m, n, perm)
            for mode in ("topk", "thresholdbound"):
                cfg = PSAConfig.from_dict({"block_size": {"m": m, "n": n, "tile_n": 16}, "mask_mode": mode})
                for nw in (4, 8, 16):
                    launch = levels.LevelsLaunch(num_warps=nw, presort_above=1 << 30)
                    ms = bench(lambda: levels.assign_levels_triton(scores, cfg, launch=launch))
                    print(f"{str(grid):11s} {m:3d} {n:3d}  levels    {mode[:9]:9s} w{nw:<2d}      {ms:7.3f}", flush=True)
                # rows ranked by torch's segmented sort first (levels.PRESORT_ABOVE decides by row length)
                ms = bench(lambda: levels.assign_levels_triton(scores, cfg, launch=levels.LevelsLaunch(presort_above=0)))
                print(f"{str(grid):11s} {m:3d} {n:3d}  levels    {mode[:9]:9s} torch-sort {ms:7.3f}", flush=True)


if __name__ == "__main__":
    main()
