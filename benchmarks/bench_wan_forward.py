"""A ComfyUI WanModel forward (random weights) through the Apply PSA patch against the dense forward.

    COMFYUI_PATH=/path/to/ComfyUI python3 benchmarks/bench_wan_forward.py            # Wan 2.1 1.3B, 480p x 81
    COMFYUI_PATH=... python3 benchmarks/bench_wan_forward.py --arch 14b --latent 21 90 160   # 14B, 720p x 81
    COMFYUI_PATH=... python3 benchmarks/bench_wan_forward.py --presets psa_topk --sol-tau 1.3 2.0

Builds ComfyUI's own WanModel, runs one forward with ComfyUI's attention (dense) and one per
preset through the same override and diffusion-model wrapper that Apply PSA installs, at a
step past warm-up. With ``--sol-tau``, also one forward per tau through an override that
calls Sol-Attn (``comfy_kitchen.sol_attn``, from ``.kitchen/``: see sol_kitchen.py) the way
ComfyUI's core node "Model Sparse Attention" does for a generic model. Prints relative error
of the output against the dense forward and times (medians); writes JSON to --out.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sol_kitchen import add_kitchen_to_path, load_sol  # noqa: E402

SOL_HEAD_DIM = 128       # the only head dim of Sol-Attn's kernels
SOL_MIN_TOKENS = 12288   # the core node's min_tokens default: shorter sequences stay dense
ARCH = {  # WanModel arguments of the released checkpoints
    "1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


class SolOverride:
    """An attention override that sends calls to Sol-Attn as the core node "Model Sparse
    Attention" does for a generic model (sol-attn method, no sinks): masked calls, calls under
    min_tokens, cross-attention and calls the kernel cannot take run ``func``, the attention
    ComfyUI would have run; q/k/v go in as [B, T, heads, 128] views in the model's token order.
    The start/end window of the node is not modelled: the benchmark's forward is at a step
    inside its default window (start_percent 0.2). Counts the calls of each kind."""

    def __init__(self, sol_attn, is_available, tau: float, topk_ratio: float = 0.0, extra_tokens: int = 256,
                 min_tokens: int = SOL_MIN_TOKENS):
        """``sol_attn`` and ``is_available(device)``: comfy_kitchen's sol_attn and sol_attn_is_available."""
        self.sol_attn, self.is_available = sol_attn, is_available
        self.tau, self.topk_ratio, self.extra_tokens = tau, topk_ratio, extra_tokens
        self.min_tokens = min_tokens
        self.calls = {"sol": 0, "dense": 0}

    # Left out of a compiled graph as the PSA override is: traced, its call counter and checks
    # become guards that a compiled forward can recompile on (benchmarks/NOTES.md, change 46).
    @torch.compiler.disable
    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        def dense():
            self.calls["dense"] += 1
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)

        if mask is not None:
            return dense()
        tokens = q.shape[2] if skip_reshape else q.shape[1]
        if tokens < self.min_tokens:
            return dense()
        if skip_reshape:                                     # [B, H, T, D]
            b, _, _, dim_head = q.shape
            qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
        else:                                                # [B, T, H*D]
            b, _, dim_head = q.shape
            dim_head //= heads
            qs, ks, vs = (t.view(b, -1, heads, dim_head) for t in (q, k, v))
        if (not self.is_available(q.device) or dim_head != SOL_HEAD_DIM or q.shape != k.shape or q.shape != v.shape
                or q.dtype not in (torch.bfloat16, torch.float16, torch.float32)
                or k.dtype != q.dtype or v.dtype != q.dtype):
            return dense()
        if q.dtype == torch.float32:  # as the node: the kernel quantizes anyway, bf16 keeps the range
            qs, ks, vs = (t.to(torch.bfloat16) for t in (qs, ks, vs))
        out = self.sol_attn(qs, ks, vs, tau=self.tau, scale=kwargs.get("scale"), sink_blocks=[0, 0],
                            sink_q=[0, 0], topk_ratio=self.topk_ratio, token_aug=self.extra_tokens).to(q.dtype)
        self.calls["sol"] += 1
        if skip_output_reshape:
            return out.transpose(1, 2)
        return out.reshape(b, -1, heads * dim_head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=ARCH, default="1.3b")
    ap.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent frames, height, width")
    ap.add_argument("--section", default="Wan2.1_1.3b")
    ap.add_argument("--presets", nargs="*", default=None,
                    help="NAME of the section, or SECTION/NAME from another; default: every preset of the section")
    ap.add_argument("--sol-tau", type=float, nargs="*", default=[],
                    help="also a forward through Sol-Attn at each of these tau (the node's default: 1.3)")
    ap.add_argument("--sol-topk", type=float, nargs="*", default=[],
                    help="also a forward through Sol-Attn's top-k routing (the node's sla method) at these ratios")
    ap.add_argument("--sol-extra-tokens", type=int, default=256, help="the node's extra_tokens (default 256)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="run the model under torch.compile (inductor)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "bench_wan_forward.json"))
    args = ap.parse_args()

    add_kitchen_to_path()  # before ComfyUI: its newest attention module imports comfy_kitchen
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
        to["optimized_attention_override"] = patch_mod.PSAOverride(patch)
        to["wrappers"] = {pe.WrappersMP.DIFFUSION_MODEL: {"psa": [patch.forward_wrapper]}}
        out, secs = timed(to)
        err = float((out.double() - dense.double()).norm() / dense.double().norm())
        rows.append({"preset": name, "seconds": secs, "speedup": dense_s / secs, "rel_err": err})
        print(json.dumps(rows[-1]), flush=True)
    sol_settings = [(tau, 0.0) for tau in args.sol_tau] + [(1.3, r) for r in args.sol_topk]
    sol_note = None
    if sol_settings:
        sol_attn, sol_note = load_sol(torch.device(dev))
        print(f"Sol: {sol_note}", flush=True)
        if sol_attn is not None:
            import comfy_kitchen
        for tau, ratio in sol_settings if sol_attn is not None else []:
            override = SolOverride(sol_attn, comfy_kitchen.sol_attn_is_available, tau, ratio, args.sol_extra_tokens)
            to = dict(base_to)
            to["optimized_attention_override"] = override
            out, secs = timed(to)
            err = float((out.double() - dense.double()).norm() / dense.double().norm())
            name = f"Sol {'topk ' + format(ratio, 'g') if ratio else 'tau ' + format(tau, 'g')} extra {args.sol_extra_tokens}"
            per_forward = {k: n // (args.reps + 1) for k, n in override.calls.items()}
            rows.append({"preset": name, "seconds": secs, "speedup": dense_s / secs, "rel_err": err,
                         "attention_calls_per_forward": per_forward})
            print(json.dumps(rows[-1]), flush=True)
            if not per_forward["sol"] and not args.compile:  # compiled graphs may not replay the count
                print(f"warning: {name}: no call went to Sol-Attn", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"arch": args.arch, "compiled": args.compile, "latent": [T, Hh, W], "dense_s": dense_s,
                                          "sol": sol_note, "rows": rows}, indent=1))
    width = max([14] + [len(r["preset"]) for r in rows])
    print(f"\n{'preset':{width}s} {'s/forward':>9s} {'speedup':>7s} {'rel err':>8s}")
    print(f"{'dense':{width}s} {dense_s:9.3f} {1.0:7.2f} {0.0:8.4f}")
    for r in rows:
        calls = r.get("attention_calls_per_forward")
        print(f"{r['preset']:{width}s} {r['seconds']:9.3f} {r['speedup']:7.2f} {r['rel_err']:8.4f}"
              + (f"  (calls a forward: {calls['sol']} Sol, {calls['dense']} dense)" if calls else ""))


if __name__ == "__main__":
    main()
