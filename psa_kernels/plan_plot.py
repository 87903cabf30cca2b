"""Pictures of an attention plan: level maps and attention density, drawn with matplotlib.

A level map shows, for one head of one attention call, which pyramid level every (query block,
key block) pair got: 1 = full resolution, 2/4/8 = keys and values pooled by that factor, and
level 0 either "skip" (dropped) or "tail" (kept as one pooled key/value per block, under
``use_pooled_tail``). The density plots show the density of every transformer block at every
sampling step. Used by the CPU demo and by ComfyUI's PSA Plan View node.

The picture's text is in English or Chinese (``language``). Chinese needs a font with CJK
glyphs (Noto Sans CJK, WenQuanYi, Microsoft YaHei, SimHei, PingFang, ...); without one the
picture is drawn in English, with one log line saying why, rather than with empty boxes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger("psa")

# Level -> (text key, colour): full resolution darkest, coarser lighter, level 0 pale.
_LEVEL_STYLE = {1: ("level_1", "#08306b"), 2: ("level_2", "#2171b5"), 4: ("level_4", "#6baed6"),
                8: ("level_8", "#c6dbef")}
_TAIL_STYLE = ("tail", "#fdd0a2")
_SKIP_STYLE = ("skip", "#ffffff")
LEVEL_ORDER = (1, 2, 4, 8, 0)

LANGUAGES = ("en", "zh")
# Every text of the picture, by language; the *_title, panel, note and summary entries are the
# callers' (PSA Plan View, the demo), kept here so that one table holds all of it.
TEXTS = {
    "en": {
        "level_1": "1 full", "level_2": "2 pooled", "level_4": "4 pooled", "level_8": "8 pooled",
        "tail": "tail (pooled)", "skip": "skip",
        "legend": "level of each (query block, key block) pair, share of pairs in brackets",
        "map_density": "density {density:.3f}",
        "key_block": "key block", "query_block": "query block",
        "density_map": "density of every block at every step (1 = dense)",
        "transformer_block": "transformer block", "sampling_step": "sampling step",
        "mean_density": "mean density over blocks, per step", "density": "density",
        "panel_block": "block {block}, head {head}, step {step}",
        "panel_every": ", every {q}th/{k}th block",
        "panel_head": "head {head}",
        "run_title": "PSA plan of the last sampler run: token grid {grid}, {steps} steps",
        "all_dense": " (every self-attention call ran dense: {reasons})",
        "demo_title": "{preset}: grid {grid}, mean density of all heads {density:.3f}",
        "summary": "level maps of blocks: {blocks}; mean density per step: {densities}", "none": "none",
    },
    "zh": {
        "level_1": "1 全分辨率", "level_2": "2 池化", "level_4": "4 池化", "level_8": "8 池化",
        "tail": "尾部（池化）", "skip": "跳过",
        "legend": "每个（query 块, key 块）对的层级，括号内为所占比例",
        "map_density": "密度 {density:.3f}",
        "key_block": "key 块", "query_block": "query 块",
        "density_map": "每一步每个块的密度（1 = 全注意力）",
        "transformer_block": "transformer 块", "sampling_step": "采样步",
        "mean_density": "各块的平均密度（每步）", "density": "密度",
        "panel_block": "块 {block}，注意力头 {head}，第 {step} 步",
        "panel_every": "，每 {q}/{k} 个块取一个",
        "panel_head": "注意力头 {head}",
        "run_title": "上一次采样的 PSA 计划：token 网格 {grid}，{steps} 步",
        "all_dense": "（所有自注意力调用均为全注意力：{reasons}）",
        "demo_title": "{preset}：网格 {grid}，所有注意力头的平均密度 {density:.3f}",
        "summary": "层级图所示的块：{blocks}；每步的平均密度：{densities}", "none": "无",
    },
}

# Font families with CJK glyphs, most wanted first: Linux packages, then Windows and macOS fonts.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans SC",
                "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "STHeiti",
                "Arial Unicode MS", "Droid Sans Fallback")
# Their file names: matplotlib lists only the fonts present when it built its font cache, so a
# font installed later is looked for among the system's font files and added.
_CJK_FILES = re.compile(r"notosanscjk|notoserifcjk|notosanssc|sourcehansans|wqy|msyh|simhei|pingfang|"
                        r"hiragino|stheiti|arialuni|droidsansfallback", re.IGNORECASE)
_CJK_PROBE = "层级密度块跳过采样步"  # glyphs the Chinese picture cannot do without
_warned: set[str] = set()


def plan_text(language: str, key: str, **fields) -> str:
    """One text of the picture in ``language`` ('en' or 'zh'), its fields filled in."""
    return TEXTS[language][key].format(**fields)


def _has_glyphs(path: str, text: str) -> bool:
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(path)
    except (OSError, RuntimeError, ValueError):  # unreadable or unsupported font file
        return False
    return all(font.get_char_index(ord(c)) for c in text)


def _known_cjk_family() -> str | None:
    from matplotlib import font_manager

    files = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    return next((fam for fam in CJK_FAMILIES if fam in files and _has_glyphs(files[fam], _CJK_PROBE)), None)


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The family of an installed font that has the Chinese picture's glyphs, or None."""
    from matplotlib import font_manager

    family = _known_cjk_family()
    if family is None:
        for path in font_manager.findSystemFonts():
            if _CJK_FILES.search(Path(path).name):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        family = _known_cjk_family()
    return family


def picture_language(language: str) -> str:
    """The language the picture is drawn in: ``language``, or English when it is Chinese and no
    CJK font is installed (said once in the log)."""
    if language not in LANGUAGES:
        raise ValueError(f"language: got {language!r}; allowed: {', '.join(LANGUAGES)}")
    if language == "zh" and cjk_font() is None:
        if "no-cjk-font" not in _warned:
            _warned.add("no-cjk-font")
            log.warning("[PSA] plan picture drawn in English: no font with Chinese glyphs found (looked for %s); "
                        "install one, e.g. fonts-noto-cjk on Debian/Ubuntu", ", ".join(CJK_FAMILIES[:3]) + ", ...")
        return "en"
    return language


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


def _draw_level_map(ax, panel: LevelMap, text) -> None:
    from matplotlib.colors import BoundaryNorm, ListedColormap

    lv = np.asarray(panel.levels)
    codes = np.full(lv.shape, 4, dtype=np.int8)  # level 0 -> code 4
    for code, lvl in enumerate((1, 2, 4, 8)):
        codes[lv == lvl] = code
    colours = [c for _, c in _styles(panel.pooled_tail)]
    ax.imshow(codes, cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(-0.5, 5.5), 5),
              interpolation="nearest", aspect="auto")
    tail_n = panel.block_n if panel.pooled_tail else 0
    ax.set_title(f"{panel.title}\n{text('map_density', density=map_density(lv, tail_n))}", fontsize=10)
    ax.set_xlabel(text("key_block"))
    ax.set_ylabel(text("query_block"))
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for side in ax.spines.values():
        side.set_edgecolor("#444444")


def _level_legend(fig, panels: list[LevelMap], text) -> None:
    from matplotlib.patches import Patch

    tail = any(p.pooled_tail for p in panels)
    skip = any(not p.pooled_tail for p in panels)
    shares = level_shares(np.concatenate([np.asarray(p.levels).ravel() for p in panels]))
    handles = [Patch(facecolor=_LEVEL_STYLE[lvl][1], edgecolor="#444444",
                     label=f"{text(_LEVEL_STYLE[lvl][0])} ({shares[lvl]:.0%})") for lvl in (1, 2, 4, 8)]
    for on, style in ((tail, _TAIL_STYLE), (skip, _SKIP_STYLE)):
        if on:
            handles.append(Patch(facecolor=style[1], edgecolor="#444444", label=f"{text(style[0])} ({shares[0]:.0%})"))
    top = 1 - 0.3 / fig.get_figheight()  # below the title line
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top), ncol=len(handles),
               frameon=False, fontsize=10, title=text("legend"))


def _draw_density(ax_map, ax_line, density: np.ndarray, step_labels, block_labels, text) -> None:
    d = np.asarray(density, dtype=np.float64)
    masked = np.ma.masked_invalid(d)
    im = ax_map.imshow(masked, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto",
                       origin="upper")
    ax_map.set_title(text("density_map"), fontsize=10)
    ax_map.set_xlabel(text("transformer_block"))
    ax_map.set_ylabel(text("sampling_step"))
    _ticks(ax_map.set_xticks, ax_map.set_xticklabels, block_labels)
    _ticks(ax_map.set_yticks, ax_map.set_yticklabels, step_labels)
    ax_map.figure.colorbar(im, ax=ax_map, fraction=0.046, pad=0.02)
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.isfinite(d), d, np.nan), axis=1) if d.size else d
    x = np.arange(len(mean))
    ax_line.plot(x, mean, marker="o", color="#2171b5")
    ax_line.set_ylim(0, 1.05)
    ax_line.set_title(text("mean_density"), fontsize=10)
    ax_line.set_xlabel(text("sampling_step"))
    ax_line.set_ylabel(text("density"))
    _ticks(ax_line.set_xticks, ax_line.set_xticklabels, step_labels)
    ax_line.grid(True, alpha=0.3)


def _ticks(set_ticks, set_labels, labels) -> None:
    labels = list(labels)
    every = max(1, -(-len(labels) // 16))  # at most 16 tick labels
    idx = list(range(0, len(labels), every))
    set_ticks(idx)
    set_labels([str(labels[i]) for i in idx])


def plan_figure(panels: list[LevelMap], density: np.ndarray | None = None, step_labels=None,
                block_labels=None, title: str = "", dpi: int = 100, language: str = "en"):
    """The picture as a drawn matplotlib Figure (see :func:`render_plan`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.text import Text

    language = picture_language(language)

    def text(key: str, **fields) -> str:
        return plan_text(language, key, **fields)

    if not panels and density is None:
        raise ValueError("nothing to draw: give level maps or a density table")
    cols = max(len(panels), 2 if density is not None else 1)
    rows = (1 if panels else 0) + (1 if density is not None else 0)
    height = 4.4 * rows + 1.2  # inches; the margins below are in inches too, so one row keeps its axis labels
    fig = Figure(figsize=(4.6 * cols, height), dpi=dpi)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, cols, top=1 - 1.35 / height, bottom=0.65 / height, hspace=0.45, wspace=0.35)
    if panels:
        for i, panel in enumerate(panels):
            _draw_level_map(fig.add_subplot(grid[0, i]), panel, text)
        _level_legend(fig, panels, text)
    if density is not None:
        r = rows - 1
        half = cols // 2
        d = np.asarray(density)
        steps = step_labels if step_labels is not None else range(1, d.shape[0] + 1)
        blocks = block_labels if block_labels is not None else range(d.shape[1])
        _draw_density(fig.add_subplot(grid[r, :half]), fig.add_subplot(grid[r, half:]), d, steps, blocks, text)
    if title:
        fig.suptitle(title, y=0.995, fontsize=11, va="top")
    if language == "zh":
        # the font goes on each text rather than into matplotlib's global rcParams; the tick
        # labels drawn later are numbers, which every font has
        for t in fig.findobj(Text):
            t.set_fontfamily([cjk_font(), "DejaVu Sans"])
    fig.canvas.draw()
    return fig


def render_plan(panels: list[LevelMap], density: np.ndarray | None = None, step_labels=None,
                block_labels=None, title: str = "", dpi: int = 100, language: str = "en") -> np.ndarray:
    """The picture as an RGB uint8 array [height, width, 3].

    ``panels``: level maps drawn side by side (at most 4 are readable). ``density``: [steps,
    blocks] with NaN where a block did not run, drawn as a heat map and a per-step mean line.
    ``language``: 'en' or 'zh' for the picture's own text (Chinese falls back to English without
    a CJK font: :func:`picture_language`); panel titles and ``title`` are drawn as given.
    """
    fig = plan_figure(panels, density, step_labels, block_labels, title, dpi, language)
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(rgb: np.ndarray, path) -> None:
    """Write an RGB array from :func:`render_plan` as a PNG file."""
    from matplotlib.image import imsave

    imsave(path, rgb)
