"""Level 1 read in place against a pyramid that copies it: time and memory of a call.

    python3 benchmarks/in_place_probe.py             # GPU: 480p x 12 heads and 720p x 40 heads
    python3 benchmarks/in_place_probe.py --shapes 720p --regime diffuse --layouts copy "in place" \
        --presets 'tail128_l1_0.01_block_mean_h128_var' 'Wan2.1_14b/psa_fast'   # bench_peers.py's presets

For the shipped Wan presets, on the medium regime of bench_peers.py, three layouts of the Triton
pyramid: ``all`` (level 1 copied into the pyramid buffer, every pooled level written: the
layout before NOTES.md change 38), ``copy`` (level 1 copied, pooled levels only for presets
whose level map can use them: psa_attention's choice when memory is ample) and ``in place``
(level 1 read from k and v through the arranged order: its choice when memory is short). Per
preset and layout: the whole call, the pyramid build and the attention kernel
(do_bench medians), the call's peak memory beyond a dense SDPA call over the size of q+k+v, and
how far the two layouts' outputs are apart (relative L2; they compute the same sums).
With --presets, presets of bench_peers.py's list (shipped ones as section/name) instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from psa_kernels import (PSAConfig, api, attention, load_attention_config, psa_attention, psa_plan,  # noqa: E402
                         pyramid, schedule)
from psa_kernels.synthetic import relative_l2  # noqa: E402
from bench_peers import REGIMES, SHAPES, make_inputs, psa_presets  # noqa: E402

PRESETS = {"480p": ("Wan2.1_1.3b", ("psa_fast", "psa_precise", "psa_quality", "psa_balanced")),
           "720p": ("Wan2.1_14b", ("psa_fast", "psa_precise", "psa_quality", "psa_balanced"))}
LAYOUT = api.pyramid_layout


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median")


def peak_bytes(fn) -> int:
    """Device memory a call allocates at its peak, beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def layouts():
    """(name, pyramid_layout replacement) of the three layouts."""
    def every_level(cfg, k=None, v=None, in_place=False):
        return {**LAYOUT(cfg, k, v), "pooled": True}

    def copy(cfg, k=None, v=None, in_place=False):
        return LAYOUT(cfg, k, v)

    def in_place(cfg, k=None, v=None, in_place=False):
        return LAYOUT(cfg, k, v, True)
    return (("all", every_level), ("copy", copy), ("in place", in_place))


def medium_heads(shape: str, dev, regime: str = "medium"):
    """The medium regime's (or ``regime``'s) q, k, v of a shape as [B, H, L, D] views of the
    [B, L, H*D] inputs."""
    grid, heads = SHAPES[shape]
    q, k, v, _ = make_inputs(shape, REGIMES[regime], dev, torch.bfloat16)
    B, L, _ = q.shape
    return grid, heads, L, tuple(t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))


def presets_for(shape: str, names: list[str] | None) -> list[tuple[str, PSAConfig]]:
    """(name, config): the shape's shipped presets, or the named ones of bench_peers.py."""
    if names:
        known = psa_presets()
        missing = [n for n in names if n not in known]
        if missing:
            raise SystemExit(f"--presets: unknown {', '.join(missing)}; see bench_peers.psa_presets()")
        return [(n, PSAConfig.from_dict(known[n], n)) for n in names]
    sections = load_attention_config(REPO / "configs" / "attention_config.yaml")
    section, names = PRESETS[shape]
    return [(n, sections[section].attention_configs[n]) for n in names]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["480p", "720p"], choices=sorted(PRESETS))
    ap.add_argument("--regime", default="medium", choices=sorted(REGIMES))
    ap.add_argument("--presets", nargs="+", help="presets of bench_peers.py by name (default: shipped)")
    ap.add_argument("--layouts", nargs="+", default=[n for n, _ in layouts()], choices=[n for n, _ in layouts()])
    args = ap.parse_args()
    dev = torch.device("cuda")
    for shape in args.shapes:
        grid, heads, L, (qh, kh, vh) = medium_heads(shape, dev, args.regime)
        qkv_bytes = 3 * qh.numel() * qh.element_size()
        qc, kc, vc = (t.contiguous() for t in (qh, kh, vh))
        dense_ms = bench(lambda: F.scaled_dot_product_attention(qc, kc, vc))
        dense_peak = peak_bytes(lambda: F.scaled_dot_product_attention(qh, kh, vh))
        del qc, kc, vc
        print(f"\n{shape} x {heads} heads (L = {L}), {args.regime} inputs; dense cuDNN {dense_ms:.3f} ms")
        print(f"{'preset':14s} {'layout':9s} {'call ms':>8s} {'vs dense':>8s} {'build':>7s} {'kernel':>7s} "
              f"{'mem/qkv':>8s} {'rows':>9s} {'out diff':>9s}")
        for name, cfg in presets_for(shape, args.presets):
            outs = {}
            for label, layout in (lo for lo in layouts() if lo[0] in args.layouts):
                api.pyramid_layout = layout
                try:
                    plan = psa_plan(qh, kh, cfg, grid, v=vh)
                    pyr = plan.pyramid
                    sched = schedule.build_schedule(plan.levels, pyr, packed=cfg.attn_impl == "new_mask_type")
                    opts = layout(cfg, kh, vh)
                    t_build = bench(lambda: pyramid.build_pyramid_triton(kh, vh, cfg.block_size.n, L, perm=plan.perm,
                                                                         heavy=plan.heavy, **opts))
                    t_kern = bench(lambda: attention.attention_triton(qh, pyr, sched, cfg.block_size.m, perm=plan.perm))
                    t_call = bench(lambda: psa_attention(qh, kh, vh, cfg, grid))
                    outs[label] = psa_attention(qh, kh, vh, cfg, grid)
                    del plan, pyr, sched
                    torch.cuda.empty_cache()
                    mem = (peak_bytes(lambda: psa_attention(qh, kh, vh, cfg, grid)) - dense_peak) / qkv_bytes
                    rows = pyramid.pyramid_rows(-(-L // cfg.block_size.n), cfg.block_size.n, cfg.use_pooled_tail,
                                                opts["level1"], opts["pooled"])
                finally:
                    api.pyramid_layout = LAYOUT
                first = outs[next(iter(outs))]
                diff = relative_l2(outs[label], first)
                print(f"{name:14s} {label:9s} {t_call:8.3f} {dense_ms / t_call:7.2f}x {t_build:7.3f} {t_kern:7.3f} "
                      f"{mem:+8.2f} {rows:9d} {diff:9.2e}", flush=True)


if __name__ == "__main__":
    main()
