"""PSA on a built-in video-shaped attention problem, against dense attention.

    python3 -m psa_kernels.demo                                   # default preset, shape for this machine
    python3 -m psa_kernels.demo --preset Wan2.1_1.3b/psa_topk --grid 21 30 52

On a GPU the problem has the Wan 2.1 1.3B 480p x 81-frame shape (12 heads, 21 x 30 x 52
tokens, head dim 128, bf16) and runs the Triton kernels; on a CPU a small one runs the
torch reference. Prints time, density and error against dense attention, and writes a
picture of the level map of the first head (rows: query blocks, columns: key blocks).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import load_attention_config, psa_attention, psa_plan
from .synthetic import relative_l2, structured_qkv

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "attention_config.yaml"
DEFAULT_PRESET = "Wan2.1_1.3b/psa_balanced"
# level -> colour of the picture: full resolution dark, coarser lighter, skipped white
COLOURS = {1: (20, 40, 120), 2: (40, 120, 200), 4: (110, 190, 230), 8: (190, 230, 245), 0: (255, 255, 255)}


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


def write_level_map(levels: torch.Tensor, path: Path) -> None:
    """PNG of a [nqb, nkb] level map, each block pair a 4 x 4 (or smaller) square."""
    from PIL import Image

    lv = levels.to(torch.int64).cpu()
    rgb = torch.zeros(*lv.shape, 3, dtype=torch.uint8)
    for level, colour in COLOURS.items():
        rgb[lv == level] = torch.tensor(colour, dtype=torch.uint8)
    scale = max(1, min(4, 1024 // max(lv.shape)))
    img = Image.frombytes("RGB", (lv.shape[1], lv.shape[0]), bytes(rgb.flatten().tolist()))
    img = img.resize((lv.shape[1] * scale, lv.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None) -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="SECTION/NAME from configs/attention_config.yaml")
    ap.add_argument("--grid", type=int, nargs=3, default=(21, 30, 52) if gpu else (6, 16, 24),
                    help="token grid T H W")
    ap.add_argument("--heads", type=int, default=12 if gpu else 2)
    ap.add_argument("--head-dim", type=int, default=128 if gpu else 64)
    ap.add_argument("--picture", default="out/level_map.png", help="where to write the level-map picture")
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
    reps = 20 if gpu else 3

    dense, dense_ms = _timed(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    (out, stats), psa_ms = _timed(lambda: psa_attention(q, k, v, cfg, grid, return_stats=True), reps)
    plan = psa_plan(q, k, cfg, grid, v=v)
    picture = Path(args.picture)
    write_level_map(plan.levels[0, 0], picture)

    B, H, L, D = q.shape
    where = torch.cuda.get_device_name() if gpu else "CPU (torch reference)"
    print(f"PSA demo on {where}: preset {args.preset}, grid {'x'.join(map(str, grid))} = {L} tokens, "
          f"{H} heads, head dim {D}, {str(dtype).replace('torch.', '')}")
    print(f"  dense attention (SDPA)  {dense_ms:8.2f} ms")
    print(f"  PSA ({plan.backend:6s})          {psa_ms:8.2f} ms   speed-up {dense_ms / psa_ms:.2f}x")
    print(f"  density {stats.density:.3f} (sparsity {1 - stats.density:.3f}); block pairs per level "
          + ", ".join(f"{lvl}: {n}" for lvl, n in stats.level_counts.items()))
    print(f"  relative L2 error against dense attention: {relative_l2(out, dense):.4f}")
    print(f"  level map of head 0 written to {picture}")


if __name__ == "__main__":
    main()
