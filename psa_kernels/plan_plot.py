"""Pictures of an attention plan: level maps and attention density, drawn with matplotlib.

A level map shows, for one head of one attention call, which pyramid level every (query block,
key block) pair got: 1 = full resolution, 2/4/8 = keys and values pooled by that factor, and
level 0 either "skip" (dropped) or "tail" (kept as one pooled key/value per block, under
``use_pooled_tail``). The density plots show the density of every transformer block at every
sampling step. Used by the CPU demo and by ComfyUI's PSA Plan View node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Level -> (legend label, colour): full resolution darkest, coarser lighter, level 0 pale.
_LEVEL_STYLE = {1: ("1 full", "#08306b"), 2: ("2 pooled", "#2171b5"), 4: ("4 pooled", "#6baed6"),
                8: ("8 pooled", "#c6dbef")}
_TAIL_STYLE = ("tail (pooled)", "#fdd0a2")
_SKIP_STYLE = ("skip", "#ffffff")
LEVEL_ORDER = (1, 2, 4, 8, 0)


@dataclass
class LevelMap:
    """One panel: a [query blocks, key blocks] level map and what it shows."""
    levels: np.ndarray        # int levels 1/2/4/8/0
    title: str
    pooled_tail: bool = False
    block_n: int = 0          # key block size: with the tail a level-0 pair counts 1/block_n


def map_density(levels: np.ndarray, tail_n: int = 0) -> float:
    """Density of a level map: mean over block pairs of 1/p for level p > 0; level 0 counts 0,
    or 1/tail_n with a pooled tail of key blocks of tail_n tokens (as PSAStats counts it)."""
    lv = np.asarray(levels, dtype=np.float64)
    skipped = 1.0 / tail_n if tail_n else 0.0
    return float(np.where(lv > 0, 1.0 / np.maximum(lv, 1.0), skipped).mean()) if lv.size else 0.0


def level_shares(levels: np.ndarray) -> dict[int, float]:
    """Share of block pairs at each level."""
    lv = np.asarray(levels)
    return {lvl: float((lv == lvl).mean()) if lv.size else 0.0 for lvl in LEVEL_ORDER}


def _styles(pooled_tail: bool) -> list[tuple[str, str]]:
    return [_LEVEL_STYLE[lvl] for lvl in (1, 2, 4, 8)] + [_TAIL_STYLE if pooled_tail else _SKIP_STYLE]


def _draw_level_map(ax, panel: LevelMap) -> None:
    from matplotlib.colors import BoundaryNorm, ListedColormap

    lv = np.asarray(panel.levels)
    codes = np.full(lv.shape, 4, dtype=np.int8)  # level 0 -> code 4
    for code, lvl in enumerate((1, 2, 4, 8)):
        codes[lv == lvl] = code
    colours = [c for _, c in _styles(panel.pooled_tail)]
    ax.imshow(codes, cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(-0.5, 5.5), 5),
              interpolation="nearest", aspect="auto")
    tail_n = panel.block_n if panel.pooled_tail else 0
    ax.set_title(f"{panel.title}\ndensity {map_density(lv, tail_n):.3f}", fontsize=10)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for side in ax.spines.values():
        side.set_edgecolor("#444444")


def _level_legend(fig, panels: list[LevelMap]) -> None:
    from matplotlib.patches import Patch

    tail = any(p.pooled_tail for p in panels)
    skip = any(not p.pooled_tail for p in panels)
    shares = level_shares(np.concatenate([np.asarray(p.levels).ravel() for p in panels]))
    handles = [Patch(facecolor=_LEVEL_STYLE[lvl][1], edgecolor="#444444",
                     label=f"{_LEVEL_STYLE[lvl][0]} ({shares[lvl]:.0%})") for lvl in (1, 2, 4, 8)]
    for on, style in ((tail, _TAIL_STYLE), (skip, _SKIP_STYLE)):
        if on:
            handles.append(Patch(facecolor=style[1], edgecolor="#444444", label=f"{style[0]} ({shares[0]:.0%})"))
    top = 1 - 0.3 / fig.get_figheight()  # below the title line
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top), ncol=len(handles),
               frameon=False, fontsize=10,
               title="level of each (query block, key block) pair, share of pairs in brackets")


def _draw_density(ax_map, ax_line, density: np.ndarray, step_labels, block_labels) -> None:
    d = np.asarray(density, dtype=np.float64)
    masked = np.ma.masked_invalid(d)
    im = ax_map.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto",
                       origin="upper")
    ax_map.set_title("density of every block at every step (1 = dense)", fontsize=10)
    ax_map.set_xlabel("transformer block")
    ax_map.set_ylabel("sampling step")
    _ticks(ax_map.set_xticks, ax_map.set_xticklabels, block_labels)
    _ticks(ax_map.set_yticks, ax_map.set_yticklabels, step_labels)
    ax_map.figure.colorbar(im, ax=ax_map, fraction=0.046, pad=0.02)
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.isfinite(d), d, np.nan), axis=1) if d.size else d
    x = np.arange(len(mean))
    ax_line.plot(x, mean, marker="o", color="#2171b5")
    ax_line.set_ylim(0, 1.05)
    ax_line.set_title("mean density over blocks, per step", fontsize=10)
    ax_line.set_xlabel("sampling step")
    ax_line.set_ylabel("density")
    _ticks(ax_line.set_xticks, ax_line.set_xticklabels, step_labels)
    ax_line.grid(True, alpha=0.3)


def _ticks(set_ticks, set_labels, labels) -> None:
    labels = list(labels)
    every = max(1, -(-len(labels) // 16))  # at most 16 tick labels
    idx = list(range(0, len(labels), every))
    set_ticks(idx)
    set_labels([str(labels[i]) for i in idx])


def render_plan(panels: list[LevelMap], density: np.ndarray | None = None, step_labels=None,
                block_labels=None, title: str = "", dpi: int = 100) -> np.ndarray:
    """The picture as an RGB uint8 array [height, width, 3].

    ``panels``: level maps drawn side by side (at most 4 are readable). ``density``: [steps,
    blocks] with NaN where a block did not run, drawn as a heat map and a per-step mean line.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not panels and density is None:
        raise ValueError("nothing to draw: give level maps or a density table")
    cols = max(len(panels), 2 if density is not None else 1)
    rows = (1 if panels else 0) + (1 if density is not None else 0)
    fig = Figure(figsize=(4.6 * cols, 4.4 * rows + 1.2), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, cols, top=1 - 1.35 / (4.4 * rows + 1.2), bottom=0.08, hspace=0.45, wspace=0.35)
    if panels:
        for i, panel in enumerate(panels):
            _draw_level_map(fig.add_subplot(grid[0, i]), panel)
        _level_legend(fig, panels)
    if density is not None:
        r = rows - 1
        half = cols // 2
        d = np.asarray(density)
        steps = step_labels if step_labels is not None else range(1, d.shape[0] + 1)
        blocks = block_labels if block_labels is not None else range(d.shape[1])
        _draw_density(fig.add_subplot(grid[r, :half]), fig.add_subplot(grid[r, half:]), d, steps, blocks)
    if title:
        fig.suptitle(title, y=0.995, fontsize=11, va="top")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(rgb: np.ndarray, path) -> None:
    """Write an RGB array from :func:`render_plan` as a PNG file."""
    from matplotlib.image import imsave

    imsave(path, rgb)
