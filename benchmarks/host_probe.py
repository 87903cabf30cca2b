"""Host time of one psa_attention call: what the CPU spends enqueuing it, op by op.

    python3 benchmarks/host_probe.py            # GPU, 480p x 12 heads
    python3 benchmarks/host_probe.py --cprofile # and the Python functions by their own time

At 480p a sparse call's kernels take less GPU time than the host needs to launch them, so the
call's time is the host's. For each preset: the host time of a call (enqueue only, no sync,
median of 50), the GPU time of the call (do_bench), and the torch.profiler CPU-side ops of one
call (launches and torch ops with their count per call), the most expensive first.
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import triton.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from psa_kernels import PSAConfig, load_attention_config, psa_attention  # noqa: E402
from bench_peers import REGIMES, SHAPES, make_inputs  # noqa: E402


def l1(a: float, heavy: int, est: str = "block_mean") -> PSAConfig:
    return PSAConfig.from_dict({"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_mode": "topk",
                                "attn_impl": "new_mask_type", "use_pooled_tail": True, "heavy_keys": heavy,
                                "estimate_method": est, "mask_ratios": {1: [0.0, a], 0: [a, 1.0]}}, "probe")


def main():
    dev = torch.device("cuda")
    grid, heads = SHAPES["480p"]
    q, k, v, _ = make_inputs("480p", REGIMES["medium"], dev, torch.bfloat16)
    B, L, _ = q.shape
    qh, kh, vh = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
    sections = load_attention_config(REPO / "configs" / "attention_config.yaml")
    presets = {"l1 0.005 +tail": l1(0.005, 0), "l1 0.005 +tail +h128": l1(0.005, 128),
               "1.3b psa_fast": sections["Wan2.1_1.3b"].attention_configs["psa_fast"],
               "14b psa_fast": sections["Wan2.1_14b"].attention_configs["psa_fast"]}
    for name, cfg in presets.items():
        def call():
            return psa_attention(qh, kh, vh, cfg, grid)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        host = []
        for _ in range(50):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu = triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        kernels = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA) / 10
        print(f"\n{name}: host {sorted(host)[25]:.3f} ms a call, do_bench {gpu:.3f} ms, "
              f"{kernels:.0f} GPU kernels a call")
        rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        rows.sort(key=lambda e: -e.self_cpu_time_total)
        for e in rows[:22]:
            print(f"   {e.key[:60]:60s} {e.count / 10:5.1f}/call  self {e.self_cpu_time_total / 10 / 1e3:.3f} ms")
        if "--cprofile" in sys.argv:  # Python functions by their own time, 50 calls
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(50):
                call()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
