"""A ComfyUI WanModel forward (random weights) through the Apply PSA patch against the dense forward.

    COMFYUI_PATH=/path/to/ComfyUI python3 benchmarks/bench_wan_forward.py            # Wan 2.1 1.3B, 480p x 81
    COMFYUI_PATH=... python3 benchmarks/bench_wan_forward.py --arch 14b --latent 21 90 160   # 14B, 720p x 81

Builds ComfyUI's own WanModel, runs one forward with ComfyUI's attention (dense) and one per
preset through the same override and diffusion-model wrapper that Apply PSA installs, at a
step past warm-up. Prints relative error of the output against the dense forward and times
(medians); writes JSON to --out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARCH = {  # WanModel arguments of the released checkpoints
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=ARCH, default="1.3b")
    ap.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent frames, height, width")
    ap.add_argument("--section", default="Wan2.1_1.3b")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="NAME of the section, or SECTION/NAME from another; default: every preset of the section")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="run the model under torch.compile (inductor)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "bench_wan_forward.json"))
    args = ap.parse_args()

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sys.path.insert(0, str(REPO.parent))
    import comfy.ops
    import comfy.patcher_extension as pe
    from comfy.ldm.wan.model import WanModel
    # the pack is imported as a package, the way ComfyUI imports it
    patch_mod = importlib.import_module(f"{REPO.name}.nodes.patch")
    presets_mod = importlib.import_module(f"{REPO.name}.nodes.presets")
    kernels = importlib.import_module(f"{REPO.name}.psa_kernels")

    dev, dtype = "cuda", torch.bfloat16
    torch.manual_seed(0)
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256,
                     text_dim=4096, out_dim=16, device=dev, dtype=dtype,
                     operations=comfy.ops.disable_weight_init, **ARCH[args.arch])
    with torch.no_grad():
        for p in model.parameters():  # random weights, scaled so activations stay in range
            p.normal_(0, 1.0 / max(1, p.shape[-1]) ** 0.5) if p.dim() > 1 else p.normal_(0, 0.02)
    model.eval()
    T, Hh, W = args.latent
    x = torch.randn(1, 16, T, Hh, W, device=dev, dtype=dtype)
    context = torch.randn(1, 512, 4096, device=dev, dtype=dtype)
    sample_sigmas = torch.linspace(1.0, 0.0, 51)
    step = 40  # past every shipped preset's warm-up
    t = torch.full((1,), float(sample_sigmas[step]) * 1000, device=dev)

    sections = kernels.load_attention_config(REPO / "configs" / "attention_config.yaml")
    section = sections[args.section]
    names = args.presets or list(section.attention_configs)

    run = torch.compile(model) if args.compile else model

    def forward(to):
        with torch.no_grad():
            return run(x, t, context, transformer_options=to)

    def timed(to):
        out = forward(to)
        torch.cuda.synchronize()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            forward(to)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return out, sorted(ts)[len(ts) // 2]

    base_to = {"sample_sigmas": sample_sigmas, "sigmas": sample_sigmas[step:step + 1]}
    dense, dense_s = timed(dict(base_to))
    print(f"{torch.cuda.get_device_name()}  Wan {args.arch}{' compiled' if args.compile else ''} latent {T}x{Hh}x{W} "
          f"(tokens {T * Hh * W // 4})  dense forward {dense_s:.3f} s", flush=True)
    rows = []
    for name in names:
        where, _, short = name.rpartition("/")
        preset = presets_mod.PSAPreset(where or args.section, short,
                                       sections[where or args.section].attention_configs[short])
        patch = patch_mod.PSAModelPatch(preset)
        to = dict(base_to)
        to["optimized_attention_override"] = patch
        to["wrappers"] = {pe.WrappersMP.DIFFUSION_MODEL: {"psa": [patch.forward_wrapper]}}
        out, secs = timed(to)
        err = float((out.double() - dense.double()).norm() / dense.double().norm())
        rows.append({"preset": name, "seconds": secs, "speedup": dense_s / secs, "rel_err": err})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"arch": args.arch, "compiled": args.compile, "latent": [T, Hh, W], "dense_s": dense_s,
                                          "rows": rows}, indent=1))
    print(f"\n{'preset':14s} {'s/forward':>9s} {'speedup':>7s} {'rel err':>8s}")
    print(f"{'dense':14s} {dense_s:9.3f} {1.0:7.2f} {0.0:8.4f}")
    for r in rows:
        print(f"{r['preset']:14s} {r['seconds']:9.3f} {r['speedup']:7.2f} {r['rel_err']:8.4f}")


if __name__ == "__main__":
    main()
