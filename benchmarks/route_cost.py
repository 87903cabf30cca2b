"""What routing costs against dense attention, stage by stage, at the Wan shapes.

    python3 benchmarks/route_cost.py                       # 480p x 12 heads and 720p x 40 heads, GPU
    TRITON_INTERPRET=1 python3 benchmarks/route_cost.py --dry-run   # CPU, tiny shape: checks the script only

Inputs: the mixed video-DiT heads of bench_peers.py (q, k, v as [B, L, heads*128] bf16, the layout
an attention override gets, viewed as [B, H, L, D]), one run. Each stage is timed alone with
triton.testing.do_bench (median): the two block estimates, the topk levels of the shipped
presets, the heavy-key selection, the pyramid build with its tail (and heavy keys), and the
whole psa_attention call of each shipped preset of the Wan2.1_14b section, against cuDNN SDPA on
contiguous [B, H, L, D] copies. "routing" = estimate + levels (+ heavy selection where the
preset has heavy keys). Prints one table per shape and writes route_cost.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from psa_kernels import load_attention_config, psa_attention  # noqa: E402
from psa_kernels import estimate, levels, pyramid  # noqa: E402
from psa_kernels.heavy import select_heavy_keys  # noqa: E402
from psa_kernels.layout import sequence_permutation  # noqa: E402

from bench_peers import REGIMES, SHAPES, make_inputs  # noqa: E402


DRY = {"on": False}


def bench(fn, rep_ms: float) -> float:
    if DRY["on"]:  # one call, timed on the host: the figures mean nothing
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=max(10.0, rep_ms / 4), rep=rep_ms, return_mode="median"))


def stages(shape: str, presets: dict, rep_ms: float, device: str = "cuda", dtype=torch.bfloat16) -> dict:
    grid, heads = SHAPES[shape]
    q3, k3, v3, stats = make_inputs(shape, REGIMES["mixed"], device, dtype)
    B, L, HD = q3.shape
    q, k, v = (t.view(B, L, heads, HD // heads).transpose(1, 2) for t in (q3, k3, v3))
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    perm, inv = sequence_permutation(grid, device=device)
    out = {"shape": shape, "heads": heads, "L": L, "top10_share": stats["top10_share"]}
    out["dense_ms"] = dense = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc), rep_ms)
    rows = []
    for name, cfg in presets.items():
        m, n = cfg.block_size.m, cfg.block_size.n
        est = {"sampled": lambda: estimate.estimate_triton(q, k, m, n, perm),
               "block_mean": lambda: estimate.estimate_block_mean(q, k, m, n, perm)}[cfg.estimate_method]
        scores = est()
        r = {"preset": name, "estimate_method": cfg.estimate_method, "heavy_keys": cfg.heavy_keys}
        r["estimate_ms"] = bench(est, rep_ms)
        r["levels_ms"] = bench(lambda: levels.assign_levels_triton(scores, cfg), rep_ms)
        r["heavy_ms"] = (bench(lambda: select_heavy_keys(q, k, cfg.heavy_keys, n, inv, L, use_triton=True), rep_ms)
                         if cfg.heavy_keys else 0.0)
        heavy = select_heavy_keys(q, k, cfg.heavy_keys, n, inv, L, use_triton=True) if cfg.heavy_keys else None
        r["pyramid_ms"] = bench(lambda: pyramid.build_pyramid_triton(k, v, n, L, perm=perm, tail=cfg.use_pooled_tail,
                                                                     heavy=heavy), rep_ms)
        r["call_ms"] = bench(lambda: psa_attention(q, k, v, cfg, grid), rep_ms)
        r["routing_ms"] = r["estimate_ms"] + r["levels_ms"] + r["heavy_ms"]
        r["routing_of_dense"] = r["routing_ms"] / dense
        r["speedup"] = dense / r["call_ms"]
        rows.append(r)
    out["rows"] = rows
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["480p", "720p"], choices=list(SHAPES))
    ap.add_argument("--section", default="Wan2.1_14b")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU under TRITON_INTERPRET=1, tiny shape, one untimed call per stage: checks the script")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args(argv)
    DRY["on"] = args.dry_run
    if args.dry_run:
        args.shapes = ["tiny"]
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script times GPU stages (--dry-run checks it on a CPU)")
    section = load_attention_config(REPO / "configs" / "attention_config.yaml")[args.section]
    presets = {name: cfg for name, cfg in section.attention_configs.items() if not cfg.is_dense}
    result = {"device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "section": args.section, "cases": []}
    for shape in args.shapes:
        case = (stages(shape, presets, 0.0, "cpu", torch.float32) if args.dry_run
                else stages(shape, presets, rep_ms=200.0 if shape == "720p" else 100.0))
        result["cases"].append(case)
        print(f"\n{result['device']}  {shape} x {case['heads']} heads (L = {case['L']}, mixed heads, top-10% share "
              f"{case['top10_share']:.2f}): cuDNN dense {case['dense_ms']:.2f} ms")
        print(f"{'preset':14s} {'estimate':>9s} {'ms':>6s} {'levels':>6s} {'heavy':>6s} {'routing':>8s} "
              f"{'of dense':>8s} {'pyramid':>7s} {'call':>7s} {'speed-up':>8s}")
        for r in case["rows"]:
            print(f"{r['preset']:14s} {r['estimate_method']:>9s} {r['estimate_ms']:6.2f} {r['levels_ms']:6.2f} "
                  f"{r['heavy_ms']:6.2f} {r['routing_ms']:8.2f} {r['routing_of_dense']:8.1%} {r['pyramid_ms']:7.2f} "
                  f"{r['call_ms']:7.2f} {r['speedup']:7.2f}x", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "route_cost.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
