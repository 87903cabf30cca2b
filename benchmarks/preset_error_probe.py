"""Error-only comparison of presets (torch reference, a CPU is enough): which candidates are worth
timing on the GPU. Prints one table: rows = input kinds, columns = presets, cells = relative L2
of the output against dense attention, and each preset's density.

    python3 benchmarks/preset_error_probe.py                   # grid 8 x 16 x 24, 6 heads, a few minutes

Inputs: ``psa_kernels.synthetic.video_attention_qkv`` per head type and mixed (the head types of
video DiTs), calibrated to a top-10% block-mass share (each head, or their mean for mixed).
Presets: ``SECTION/NAME`` from configs/attention_config.yaml, or a candidate of CANDIDATES, with
the heavy-key count scaled to the sequence (``--heavy-per-token``, default the shipped 128 keys
over 480p's 32,760 tokens) so that a small grid keeps the shipped share of heavy keys.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from psa_kernels import PSAConfig, load_attention_config, psa_attention  # noqa: E402
from psa_kernels.synthetic import calibrate_logit_scale, relative_l2, video_attention_qkv  # noqa: E402

KINDS = {"local": ("local",), "spatial": ("spatial",), "temporal": ("temporal",), "sink": ("sink",),
         "uniform": ("uniform",), "mixed": ("spatial", "temporal", "local", "sink", "spatial", "uniform")}
_N64 = {"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_mode": "topk", "attn_impl": "new_mask_type",
        "use_pooled_tail": True, "heavy_keys": 128}
# quality candidates without pooled levels: level 1 on a share a, the rest the tail, heavy keys
CANDIDATES = {f"l1_{a:g}+tail+heavy": {**_N64, "mask_ratios": {1: [0.0, a], 0: [a, 1.0]}} for a in (0.05, 0.08, 0.12)}


def preset(name: str, sections: dict) -> PSAConfig:
    if name in CANDIDATES:
        return PSAConfig.from_dict(CANDIDATES[name], name)
    section, _, short = name.partition("/")
    if section not in sections or short not in sections[section].attention_configs:
        raise SystemExit(f"--presets: {name!r} is neither SECTION/NAME of attention_config.yaml nor one of "
                         f"{', '.join(CANDIDATES)}")
    return sections[section].attention_configs[short]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 16, 24))
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--share", type=float, default=0.6, help="top-10%% block-mass share of the inputs")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--presets", nargs="+", default=["Wan2.1_1.3b/psa_quality", "Wan2.1_1.3b/psa_fast",
                                                      *CANDIDATES])
    ap.add_argument("--heavy-per-token", type=float, default=128 / 32760)
    args = ap.parse_args(argv)
    grid = tuple(args.grid)
    L = grid[0] * grid[1] * grid[2]
    sections = load_attention_config(REPO / "configs" / "attention_config.yaml")
    cfgs = {}
    for name in args.presets:
        cfg = preset(name, sections)
        if cfg.heavy_keys:
            cfg = cfg.replace(heavy_keys=max(1, round(args.heavy_per_token * L)))
        cfgs[name] = cfg
    heavy = {c.heavy_keys for c in cfgs.values() if c.heavy_keys}
    print(f"grid {grid} ({L} tokens), {args.heads} heads, head dim 128, top-10% share {args.share}, heavy keys "
          f"{sorted(heavy) or 'none'} (scaled); error (density)")
    width = max(22, *(len(n) for n in cfgs))
    print(f"{'inputs':9s} " + " ".join(f"{n:>{width}s}" for n in cfgs))
    for kind in args.kinds:
        q, k, v = video_attention_qkv(grid, heads=args.heads, head_dim=128, head_types=KINDS[kind], seed=3)
        s = calibrate_logit_scale(q, k, args.share, per_head=kind != "mixed")
        q = q * (s[None, :, None, None] if isinstance(s, torch.Tensor) else s)
        dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        cells = []
        for cfg in cfgs.values():
            out, st = psa_attention(q, k, v, cfg, grid, backend="torch", return_stats=True)
            cells.append(f"{relative_l2(out, dense):.4f} ({st.density:.3f})")
        print(f"{kind:9s} " + " ".join(f"{c:>{width}s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
