"""PSA on a built-in video-shaped attention problem, against dense attention.

    python3 -m psa_kernels.demo                                   # default preset, shape for this machine
    python3 -m psa_kernels.demo --preset Wan2.1_1.3b/psa_fast --grid 21 30 52
    python3 -m psa_kernels.demo --language zh                     # the picture's text in Chinese

On a GPU the problem has the Wan 2.1 1.3B 480p x 81-frame shape (12 heads, 21 x 30 x 52
tokens, head dim 128, bf16) and runs the Triton kernels; on a CPU a small one runs the
torch reference, whose timings say nothing about PSA's speed (the GPU figures of
benchmarks/RESULTS.md are printed instead). Prints density and error against dense attention,
and writes a picture of the level maps of the first heads (rows: query blocks, columns: key
blocks) with a legend of the levels.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import load_attention_config, psa_attention, psa_plan
from .plan_plot import plan_text
from .synthetic import relative_l2, structured_qkv

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "attention_config.yaml"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
DEFAULT_PRESET = "Wan2.1_1.3b/psa_quality"  # the Wan default: every pyramid level and the tail show up
PANELS = 3  # heads drawn side by side


def _timed(fn, reps: int) -> tuple[object, float]:
    """Result of fn and its median wall time in ms (device-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, sorted(times)[len(times) // 2]


def write_plan_picture(levels: torch.Tensor, path: Path, pooled_tail: bool, title: str, block_n: int = 0,
                       language: str = "en") -> None:
    """PNG of the level maps of the first heads of a [H, nqb, nkb] plan, with legend and axes;
    ``title`` is a function of the language the picture is drawn in (English without a CJK font)."""
    from .plan_plot import LevelMap, picture_language, plan_text, render_plan, save_png

    language = picture_language(language)
    panels = [LevelMap(levels[h].cpu().numpy(), plan_text(language, "panel_head", head=h), pooled_tail, block_n)
              for h in range(min(PANELS, levels.shape[0]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(render_plan(panels, title=title(language), language=language), path)


def gpu_results(path: Path = RESULTS) -> list[str]:
    """The 480p attention table of benchmarks/RESULTS.md (heading and rows), or a pointer to it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("### 480p x 81"))
    except (OSError, StopIteration):
        return [f"  (see {path.name} in benchmarks/ for the GPU figures)"]
    out = [lines[start].lstrip("# ")]
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 4 and cells[0] not in ("preset", "") and not cells[0].startswith("-"):
            out.append(f"  {cells[0]:16s} density {cells[1]:6s} {cells[3]:>6s} ms  {cells[4]} faster than cuDNN")
    return out


def main(argv=None) -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="SECTION/NAME from configs/attention_config.yaml")
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52) if gpu else (6, 16, 24),
                    help="token grid T H W")
    ap.add_argument("--heads", type=int, default=12 if gpu else 2)
    ap.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    ap.add_argument("--picture", default="out/level_map.png", help="where to write the level-map picture")
    ap.add_argument("--language", choices=("en", "zh"), default="en",
                    help="language of the picture's text (zh needs a font with Chinese glyphs)")
    args = ap.parse_args(argv)

    section_name, _, preset_name = args.preset.partition("/")
    sections = load_attention_config(CONFIG)
    if section_name not in sections:
        raise SystemExit(f"unknown section {section_name!r}; allowed: {', '.join(sections)}")
    cfg = sections[section_name].preset(preset_name or None)
    if cfg.is_dense:
        raise SystemExit(f"{args.preset} is a dense preset; pick a psa one to see sparse attention")
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    grid = tuple(args.grid)
    q, k, v = structured_qkv(grid, heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=device)
    reps = 20 if gpu else 1

    dense, dense_ms = _timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    (out, stats), psa_ms = _timed(lambda: psa_attention(q, k, v, cfg, grid, return_stats=True), reps)
    plan = psa_plan(q, k, cfg, grid, v=v)
    picture = Path(args.picture)
    write_plan_picture(plan.levels[0], picture, cfg.use_pooled_tail,
                       lambda lang: plan_text(lang, "demo_title", preset=args.preset, grid="x".join(map(str, grid)),
                                              density=stats.density),
                       block_n=cfg.block_size.n, language=args.language)

    B, H, L, D = q.shape
    where = torch.cuda.get_device_name() if gpu else "CPU (torch reference)"
    print(f"PSA demo on {where}: preset {args.preset}, grid {'x'.join(map(str, grid))} = {L} tokens, "
          f"{H} heads, head dim {D}, {str(dtype).replace('torch.', '')}")
    if gpu:
        print(f"  dense attention (SDPA)  {dense_ms:8.2f} ms")
        print(f"  PSA ({plan.backend:6s})          {psa_ms:8.2f} ms   speed-up {dense_ms / psa_ms:.2f}x")
    else:
        print("  Timings: not shown. On a CPU PSA runs its torch reference, written to be checked, not to be")
        print("  fast; its time says nothing about the GPU kernels. Measured on one GPU (benchmarks/RESULTS.md):")
        for line in gpu_results():
            print("  " + line)
    print(f"  density {stats.density:.3f} (sparsity {1 - stats.density:.3f}); block pairs per level "
          + ", ".join(f"{lvl}: {n}" for lvl, n in stats.level_counts.items()))
    print(f"  relative L2 error against dense attention: {relative_l2(out, dense):.4f}")
    shown = min(PANELS, H)
    print("  density per head: " + ", ".join(f"{d:.3f}" for d in stats.density_per_head.tolist()))
    print(f"  level maps of heads 0-{shown - 1} written to {picture}")


if __name__ == "__main__":
    main()
