"""One PSA attention call against dense SDPA at a video shape: correctness, then time per stage.

    python3 benchmarks/bench_attention.py                 # Wan 2.1 1.3B 480p x 81 frames, bf16
    python3 benchmarks/bench_attention.py --grid 21 45 80 # 720p

Prints a table last; writes the full numbers as JSON to --out (default out/bench_attention.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import PSAConfig, psa_attention, psa_plan  # noqa: E402
from psa_kernels import attention, estimate, levels as levels_mod, pyramid, schedule  # noqa: E402
from psa_kernels.layout import arrange, sequence_permutation  # noqa: E402
from psa_kernels.synthetic import relative_l2, structured_qkv  # noqa: E402

PRESETS = {
    "wan13_balanced": {"use_sim_mask": True, "block_size": {"m": 128, "n": 128, "tile_n": 32},
                       "mask_ratios": {1: [0, .5], 2: [.5, .6], 4: [.6, .7], 8: [.7, .8], 0: [.8, 1]},
                       "mask_mode": "thresholdbound", "attn_impl": "old_mask_type"},
    "wan13_topk": {"block_size": {"m": 128, "n": 32, "tile_n": 32},
                   "mask_ratios": {1: [0, .05], 2: [.05, .1], 4: [.1, .15], 8: [.15, .25], 0: [.25, 1]},
                   "mask_mode": "topk", "attn_impl": "new_mask_type"},
    "wan14_balanced": {"block_size": {"m": 128, "n": 128, "tile_n": 32},
                       "mask_ratios": {1: [0, .4], 2: [.4, .5], 4: [.5, .6], 8: [.6, .8], 0: [.8, 1]},
                       "mask_mode": "thresholdbound", "attn_impl": "new_mask_type"},
    "topk_n64_l1only": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                        "mask_ratios": {1: [0, .12], 0: [.12, 1]}, "mask_mode": "topk"},
    "topk_n64_pyr": {"block_size": {"m": 128, "n": 64, "tile_n": 32},
                     "mask_ratios": {1: [0, .06], 2: [.06, .1], 4: [.1, .16], 8: [.16, .3], 0: [.3, 1]},
                     "mask_mode": "topk"},
}


def bench(fn, reps=30):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def peak_bytes(fn) -> int:
    """Device memory a call allocates at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--check", action="store_true", help="also compare Triton with the torch reference")
    ap.add_argument("--sweep", action="store_true", help="also time kernel tile / warp / stage variants")
    ap.add_argument("--passes", type=int, nargs="*", default=[],
                    help="also time whole calls with these heads_per_pass values (first preset)")
    ap.add_argument("--sample-q", type=int, default=estimate.SAMPLE_Q,
                    help="sampled queries per query block of the estimate (library default %(default)s)")
    ap.add_argument("--key-stride", type=int, default=estimate.KEY_STRIDE,
                    help="one sampled key in this many for the estimate (library default %(default)s)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "bench_attention.json"))
    args = ap.parse_args()
    estimate.SAMPLE_Q, estimate.KEY_STRIDE = args.sample_q, args.key_stride
    dev = "cuda"
    grid = tuple(args.grid)
    t0 = time.time()
    q, k, v = structured_qkv(grid, heads=args.heads, head_dim=args.dim, dtype=torch.bfloat16, device=dev, seed=1)
    B, H, L, D = q.shape
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  shape B={B} H={H} L={L} D={D}  "
          f"estimate samples {args.sample_q} q/block, 1 key in {args.key_stride}  "
          f"inputs {time.time() - t0:.1f}s", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    times = {}
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = sdpa(q, k, v)
        times["dense_cudnn"] = bench(lambda: sdpa(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        times["dense_flash"] = bench(lambda: sdpa(q, k, v))
    dense_flops = 4 * B * H * L * L * D
    qkv_bytes = 3 * q.numel() * q.element_size()
    peak_dense = peak_bytes(lambda: sdpa(q, k, v))
    print(f"dense cudnn {times['dense_cudnn']:.3f} ms ({dense_flops / times['dense_cudnn'] / 1e9:.0f} TFLOP/s)"
          f"  flash {times['dense_flash']:.3f} ms", flush=True)

    rows = []
    for name in args.presets:
        cfg = PSAConfig.from_dict(PRESETS[name])
        m, n = cfg.block_size.m, cfg.block_size.n
        plan = psa_plan(q, k, cfg, grid, backend="triton", v=v)
        out, st = psa_attention(q, k, v, cfg, grid, plan=plan, return_stats=True)
        r = {"preset": name, "density": st.density, "levels": st.level_counts,
             "err_vs_dense": relative_l2(out, ref)}
        if args.check:
            ref_out = psa_attention(q, k, v, cfg, grid, plan=dataclasses.replace(plan, backend="torch"))
            r["err_triton_vs_ref"] = relative_l2(out, ref_out)
            r["est_maxdiff"] = float((estimate.estimate_triton(q, k, m, n, plan.perm)
                                      - estimate.estimate_reference(arrange(q, plan.perm), arrange(k, plan.perm), m, n)).abs().max())
        # stages, as psa_attention runs them on the Triton path (the layout is read through perm)
        perm, _ = sequence_permutation(grid, 0, False, cfg.rearrange_method, tuple(cfg.tile_size),
                                       cfg.use_rearrange, q.device)
        scores = estimate.estimate_triton(q, k, m, n, perm)
        pyr, sim = pyramid.build_pyramid_triton(k, v, n, L, cfg.use_sim_mask, perm)
        sched = schedule.build_schedule(plan.levels, pyr, packed=cfg.attn_impl == "new_mask_type")
        o = torch.empty_like(q)
        t = {
            "total": bench(lambda: psa_attention(q, k, v, cfg, grid)),
            "estimate": bench(lambda: estimate.estimate_triton(q, k, m, n, perm)),
            "levels": bench(lambda: levels_mod.assign_levels_triton(scores, cfg)),
            "sim_guard": bench(lambda: levels_mod.apply_similarity_guard(plan.levels, sim, cfg))
            if cfg.use_sim_mask else 0.0,
            "pyramid": bench(lambda: pyramid.build_pyramid_triton(k, v, n, L, cfg.use_sim_mask, perm)),
            "schedule": bench(lambda: schedule.build_schedule(plan.levels, pyr, cfg.attn_impl == "new_mask_type")),
            "kernel": bench(lambda: attention.attention_triton(q, pyr, sched, m, out=o, perm=perm)),
        }
        work_flops = float(sched.num_tiles.sum()) * 4 * m * sched.tile_n * D
        r["tiles"] = int(sched.num_tiles.sum())
        r.update({"ms": t, "speedup_vs_cudnn": times["dense_cudnn"] / t["total"],
                  "kernel_tflops": work_flops / t["kernel"] / 1e9,
                  "kernel_vs_cudnn_throughput": (work_flops / t["kernel"]) / (dense_flops / times["dense_cudnn"]),
                  "work_density": work_flops / dense_flops})
        if args.sweep:
            sweep = {}
            for tn in (64, 128):  # key blocks wider than the tile span several tiles
                sc = schedule.build_schedule(plan.levels, pyr, cfg.attn_impl == "new_mask_type", tile_n=tn)
                wf = float(sc.num_tiles.sum()) * 4 * m * tn * D
                for nw in (4, 8):
                    for ns in (2, 3, 4):
                        key = f"tile{tn}_w{nw}_s{ns}"
                        # the default's loop pipelining, no register cap (it is sized for the default's warps)
                        launch = dataclasses.replace(attention.kernel_launch_config(m, tn, sc.packed, D),
                                                     num_warps=nw, num_stages=ns, maxnreg=None)
                        try:
                            ms = bench(lambda: attention.attention_triton(q, pyr, sc, m, out=o, perm=perm,
                                                                        launch=launch))
                            sweep[key] = (round(ms, 3), round(wf / ms / 1e9))
                        except Exception as e:  # resources exceeded for this config
                            sweep[key] = str(e)[:60]
            r["sweep"] = sweep
        del pyr, sched, o, scores, sim
        peak = peak_bytes(lambda: psa_attention(q, k, v, cfg, grid))
        r["extra_memory_vs_dense_over_qkv"] = (peak - peak_dense) / qkv_bytes
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.sweep:
            best = sorted((v, k) for k, v in r["sweep"].items() if isinstance(v, tuple))[:4]
            print(f"  fastest kernel variants for {name}: " + "; ".join(f"{k} {v[0]} ms {v[1]} TF" for v, k in best))
    passes = {}
    if args.passes:
        cfg = PSAConfig.from_dict(PRESETS[args.presets[0]])
        for g in args.passes:
            ms = bench(lambda: psa_attention(q, k, v, cfg, grid, heads_per_pass=g))
            extra = (peak_bytes(lambda: psa_attention(q, k, v, cfg, grid, heads_per_pass=g)) - peak_dense) / qkv_bytes
            passes[g] = {"ms": ms, "extra_memory_vs_dense_over_qkv": extra}
            print(f"heads_per_pass {g:3d}: {ms:7.3f} ms, memory beyond dense {extra:+.2f} x (q+k+v)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shape": [B, H, L, D], "grid": grid, "dense_ms": times, "rows": rows,
                                          "heads_per_pass": passes}, indent=1))
    print(f"\n{torch.cuda.get_device_name()}  B={B} H={H} L={L} D={D} bf16; dense cuDNN {times['dense_cudnn']:.2f} ms,"
          f" flash {times['dense_flash']:.2f} ms")
    print("memory: PSA peak minus dense SDPA peak, as a share of q+k+v: "
          + ", ".join(f"{r['preset']} {r['extra_memory_vs_dense_over_qkv']:+.2f}" for r in rows))
    hdr = f"{'preset':18s} {'dens':>5s} {'err':>6s} {'total':>6s} {'x':>5s} {'est':>5s} {'lev':>5s} {'sim':>5s} {'pyr':>5s} {'sch':>5s} {'kern':>6s} {'kTF':>5s} {'k/cud':>5s}"
    print(hdr)
    for r in rows:
        t = r["ms"]
        print(f"{r['preset']:18s} {r['density']:5.3f} {r['err_vs_dense']:6.3f} {t['total']:6.2f} {r['speedup_vs_cudnn']:5.2f} "
              f"{t['estimate']:5.2f} {t['levels']:5.2f} {t['sim_guard']:5.2f} {t['pyramid']:5.2f} "
              f"{t['schedule']:5.2f} {t['kernel']:6.2f} {r['kernel_tflops']:5.0f} {r['kernel_vs_cudnn_throughput']:5.2f}"
              + (f"  chk {r['err_triton_vs_ref']:.1e}" if "err_triton_vs_ref" in r else ""))


if __name__ == "__main__":
    main()
