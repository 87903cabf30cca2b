"""Fidelity against dense attention, ours and the upstream research code, on the same structured inputs.

    python3 benchmarks/bench_fidelity.py                     # Wan 2.1 1.3B 480p x 81 frames, bf16, CUDA
    python3 benchmarks/bench_fidelity.py --device cpu --grid 3 8 8 --heads 2   # ours only, torch path

The upstream rows need a copy of the package src/psa_triton of the public repository ziplab/Pyramid-Sparse-Attention
in .upstream/psa_triton (git-ignored; --upstream DIR elsewhere); it is imported at run time, never
copied here. Upstream does no token layout in PSAAttention, so it gets q, k, v already in our layout
and is compared with the dense output in that layout. It samples tokens at random for its estimate:
each call is seeded and its error is the mean over --repeats calls.

Prints a table last; writes the full numbers as JSON to --out (default out/bench_fidelity.json).
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
from psa_kernels import PSAConfig, load_attention_config, psa_attention  # noqa: E402
from psa_kernels import levels as levels_mod  # noqa: E402
from psa_kernels.layout import arrange, sequence_permutation  # noqa: E402
from psa_kernels.synthetic import relative_l2, structured_qkv  # noqa: E402

SHIPPED = ("Wan2.1_1.3b/psa_balanced", "Wan2.1_1.3b/psa_topk", "Wan2.1_14b/psa_balanced")
# The shipped 1.3B preset pairs the similarity guard with new_mask_type, which the research code
# rejects; with old_mask_type (as in the research file; our result is the same) it gets an upstream row.
OLD_VARIANT = "Wan2.1_1.3b/psa_balanced@old_mask_type"
SEED_CUSTOM = {  # the seed document's my_custom_preset, as written there
    "use_rearrange": True, "use_sim_mask": False, "block_size": {"m": 128, "n": 64, "tile_n": 32},
    "mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]},
    "mask_mode": "thresholdbound", "attn_impl": "new_mask_type", "tile_size": [2, 8, 8], "warmup_steps": 10,
    "rearrange_method": "Gilbert", "sim_thresholds": {"x2": 0.7, "x4": 0.65, "x8": 0.6}}
# Pyramid shares of levels 1, 2, 4, 8 (those of bench_attention's topk_n64_pyr), scaled together;
# density = share1 + share2/2 + share4/4 + share8/8 = 0.1125 per unit.
PYRAMID_SHARES = (0.06, 0.04, 0.06, 0.14)
SWEEP_DENSITIES = (0.06, 0.10, 0.15, 0.20)


def topk_n64(shares: dict) -> PSAConfig:
    """A topk preset (m 128, n 64) from level -> share; level 0 gets the rest."""
    ratios, end = {}, 0.0
    for lvl, share in shares.items():
        ratios[lvl] = [end, round(end + share, 4)]
        end = ratios[lvl][1]
    ratios[0] = [end, 1.0]
    return PSAConfig.from_dict({"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_ratios": ratios,
                                "mask_mode": "topk", "attn_impl": "new_mask_type"})


def all_presets() -> dict[str, PSAConfig]:
    sections = load_attention_config(REPO / "configs" / "attention_config.yaml")
    found = {f"{s}/{n}": c for s, mc in sections.items() for n, c in mc.attention_configs.items()}
    found[OLD_VARIANT] = found[OLD_VARIANT.split("@")[0]].replace(attn_impl="old_mask_type")
    found["seed/my_custom_preset"] = PSAConfig.from_dict(SEED_CUSTOM)
    unit = sum(s / p for s, p in zip(PYRAMID_SHARES, (1, 2, 4, 8)))
    for d in SWEEP_DENSITIES:
        found[f"sweep/pyramid_{d:.2f}"] = topk_n64({p: s * d / unit for p, s in zip((1, 2, 4, 8), PYRAMID_SHARES)})
        found[f"sweep/binary_{d:.2f}"] = topk_n64({1: d})
    return found


DEFAULT = list(SHIPPED) + [OLD_VARIANT, "seed/my_custom_preset"] + [
    f"sweep/{kind}_{d:.2f}" for d in SWEEP_DENSITIES for kind in ("pyramid", "binary")]


def bench(fn, reps=30):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def import_upstream(folder: Path, device: torch.device):
    """(PSAAttention, PSAConfig) of the research package, or (None, why not)."""
    if device.type != "cuda":
        return None, "device is not CUDA (the research kernels are Triton on CUDA only)"
    if not (folder / "psa_triton" / "__init__.py").is_file():
        return None, (f"no {folder / 'psa_triton' / '__init__.py'}: copy src/psa_triton of "
                      "ziplab/Pyramid-Sparse-Attention there")
    sys.path.insert(0, str(folder))
    try:
        from psa_triton import PSAAttention, PSAConfig as UpstreamConfig
    except Exception as e:  # a missing dependency (einops, numpy) or an incompatible version
        return None, f"import psa_triton from {folder} failed: {type(e).__name__}: {e}"
    return (PSAAttention, UpstreamConfig), None


def upstream_ratios(cfg: PSAConfig) -> dict:
    """Every level 1, 2, 4, 8, 0 in this order, absent ones as empty ranges.

    The research new_mask_type kernel takes the i-th segment of a mask row as level 2**i whatever
    level it was built for, so a preset without level 8 (the seed's) would have its skipped blocks
    read as level 8; empty ranges keep the segments where that kernel expects them."""
    ratios, end = {}, 0.0
    for lvl in (1, 2, 4, 8, 0):
        ratios[lvl] = tuple(cfg.mask_ratios.get(lvl, (end, end)))
        end = ratios[lvl][1]
    return ratios


def upstream_density(mask: torch.Tensor, ucfg) -> tuple[float, float]:
    """Density of the mask the research kernel is handed, and of the keys that kernel reads for it."""
    if ucfg.attn_impl == "old_mask_type":  # [B, H, nqb, nkb], the level of each block pair
        d = float(levels_mod.density(mask).mean())
        return d, d
    # [B, H, nqb, nkb + 5]: key block indices of levels 1, 2, 4, 8, 0 in turn, each segment ended by
    # -1; the kernel stops after the fourth -1, so the fifth segment (level 0) is never read. It reads
    # pooled blocks narrower than tile_n two to a tile of tile_n keys and fills the rest of the tile
    # with pooled keys at fixed positions the mask did not select: such a block costs tile_n / 2 keys.
    sep = mask == -1
    seg = (sep.cumsum(-1) - sep.int()).clamp(max=4)
    share = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0], device=mask.device)[seg]
    read = share.clamp(min=ucfg.tile_n / (2 * ucfg.block_n))
    live, nkb = ~sep & (seg < 4), mask.shape[-1] - 5
    return tuple(float((torch.where(live, w, 0.0).sum(-1) / nkb).mean()) for w in (share, read))


def run_upstream(upstream, cfg: PSAConfig, q, k, v, ref, grid, repeats: int, timed: bool) -> dict:
    if cfg.is_dense:
        return {"skipped": "dense preset"}
    PSAAttention, UpstreamConfig = upstream
    bs, st = cfg.block_size, cfg.sim_thresholds
    try:  # its PSAConfig.__post_init__ and kernel factories reject some combinations
        # rearrange_method stays None: PSAAttention ignores it, the inputs come arranged
        ucfg = UpstreamConfig(
            block_m=bs.m, block_n=bs.n, tile_n=bs.tile_n, mask_ratios=upstream_ratios(cfg),
            mask_mode=cfg.mask_mode, use_sim_mask=cfg.use_sim_mask, sim_2x_threshold=st.x2,
            sim_4x_threshold=st.x4, sim_8x_threshold=st.x8, attn_impl=cfg.attn_impl)
        psa = PSAAttention(ucfg)
    except Exception as e:
        return {"skipped": f"rejected by upstream: {str(e).splitlines()[0]}"}
    perm, _ = sequence_permutation(grid, 0, False, cfg.rearrange_method, tuple(cfg.tile_size),
                                   cfg.use_rearrange, q.device)
    qa, ka, va, ref_a = (arrange(x, perm) for x in (q, k, v, ref))
    kernel, seen = psa.sparse_attention_fn, {}

    def kernel_keeping_mask(q_, k_, v_, mask, scale):  # the mask is built inside forward; keep it
        seen["mask"] = mask
        return kernel(q_, k_, v_, mask, scale)

    try:
        errs, dens, read = [], [], []
        psa.sparse_attention_fn = kernel_keeping_mask
        for seed in range(repeats):
            torch.manual_seed(seed)
            errs.append(relative_l2(psa(qa, ka, va), ref_a))
            d, r = upstream_density(seen.pop("mask"), ucfg)
            dens.append(d)
            read.append(r)
        psa.sparse_attention_fn = kernel
        ms = bench(lambda: psa(qa, ka, va)) if timed else None
    except Exception as e:
        return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"err": sum(errs) / repeats, "errs": errs, "density": sum(dens) / repeats, "densities": dens,
            "density_read": sum(read) / repeats, "ms": ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52))
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", nargs="*", default=DEFAULT,
                    help="names from the default list, or SECTION/NAME of configs/attention_config.yaml")
    ap.add_argument("--repeats", type=int, default=3, help="seeded upstream calls averaged per preset")
    ap.add_argument("--upstream", type=Path, default=REPO / ".upstream", help="folder holding psa_triton/")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "bench_fidelity.json"))
    args = ap.parse_args()
    presets = all_presets()
    unknown = [n for n in args.presets if n not in presets]
    if unknown:
        sys.exit(f"unknown preset(s) {', '.join(unknown)}; allowed: {', '.join(presets)}")
    dev = torch.device(args.device)
    timed = dev.type == "cuda"  # CPU times would say nothing about the kernels
    grid = tuple(args.grid)
    t0 = time.time()
    q, k, v = structured_qkv(grid, heads=args.heads, head_dim=128, dtype=torch.bfloat16, device=dev, seed=1)
    B, H, L, D = q.shape
    name = torch.cuda.get_device_name(dev) if timed else str(dev)
    print(f"device {name}  torch {torch.__version__}  shape B={B} H={H} L={L} D={D}  "
          f"inputs {time.time() - t0:.1f}s", flush=True)
    ref = F.scaled_dot_product_attention(q, k, v)
    dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v)) if timed else None
    upstream, why_not = import_upstream(args.upstream.resolve(), dev)
    if why_not:
        print(f"\n!!! UPSTREAM ROWS NOT RUN: {why_not}\n", flush=True)

    rows = []
    for pname in args.presets:
        cfg = presets[pname]
        out, st = psa_attention(q, k, v, cfg, grid, return_stats=True)
        r = {"preset": pname, "mode": cfg.mask_mode, "attn_impl": cfg.attn_impl,
             "block_size": [cfg.block_size.m, cfg.block_size.n], "mask_ratios": cfg.mask_ratios,
             "density": st.density, "levels": st.level_counts, "err": relative_l2(out, ref),
             "ms": bench(lambda: psa_attention(q, k, v, cfg, grid)) if timed else None}
        del out
        r["upstream"] = (run_upstream(upstream, cfg, q, k, v, ref, grid, args.repeats, timed) if upstream
                         else {"skipped": why_not})
        rows.append(r)
        print(json.dumps(r, default=str), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": name, "shape": [B, H, L, D], "grid": grid, "dense_ms": dense_ms,
                                          "repeats": args.repeats, "upstream_not_run": why_not, "rows": rows},
                                         indent=1, default=str))

    def cell(x, width, digits=3):
        return f"{'-' if x is None else format(x, f'.{digits}f'):>{width}s}"

    by_name = {r["preset"]: r for r in rows}
    sweep = [d for d in SWEEP_DENSITIES if f"sweep/pyramid_{d:.2f}" in by_name and f"sweep/binary_{d:.2f}" in by_name]
    if sweep:
        print("\npyramid against binary keep/skip at equal density (topk, m 128, n 64):")
        print(f"{'target':>6s} {'dens pyr':>8s} {'err pyr':>7s} {'dens bin':>8s} {'err bin':>7s}"
              f" {'up err pyr':>10s} {'up err bin':>10s}")
        for d in sweep:
            p, b = by_name[f"sweep/pyramid_{d:.2f}"], by_name[f"sweep/binary_{d:.2f}"]
            print(" ".join([cell(d, 6, 2), cell(p["density"], 8), cell(p["err"], 7), cell(b["density"], 8),
                            cell(b["err"], 7), cell(p["upstream"].get("err"), 10), cell(b["upstream"].get("err"), 10)]))
    print(f"\n{name}  B={B} H={H} L={L} D={D} bf16; dense SDPA {cell(dense_ms, 0, 2)} ms")
    print(f"upstream: err = mean of {args.repeats} seeded calls; dens = of its mask; read = of the keys its kernel "
          "reads (more than its mask where pooled blocks narrower than tile_n go two to a tile)")
    if why_not:
        print(f"!!! UPSTREAM ROWS NOT RUN: {why_not}")
    for r in rows:
        if "skipped" in r["upstream"] and not why_not:
            print(f"upstream skipped {r['preset']}: {r['upstream']['skipped']}")
    print(f"{'preset':40s} {'dens':>5s} {'err':>6s} {'dens up':>7s} {'read up':>7s} {'err up':>6s} {'ms':>6s} "
          f"{'ms up':>6s} {'up/ours':>7s}")
    for r in rows:
        u = r["upstream"]
        ratio = u["ms"] / r["ms"] if u.get("ms") and r["ms"] else None
        print(" ".join([f"{r['preset']:40s}", cell(r["density"], 5), cell(r["err"], 6), cell(u.get("density"), 7),
                        cell(u.get("density_read"), 7), cell(u.get("err"), 6), cell(r["ms"], 6, 2),
                        cell(u.get("ms"), 6, 2), cell(ratio, 7, 2)]))


if __name__ == "__main__":
    main()
