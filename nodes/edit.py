"""The PSA Preset Editor's rule: every widget either keeps the incoming value or replaces it.

Convention, the same for every field so a user learns it once: combo widgets start with
``keep``, text widgets hold ``keep``, the integer widgets hold -1, and the description is
kept while left empty. Anything else replaces the incoming value, and the result is validated
as a whole; an error names the widget the user sees and the values allowed there.

Level ranges must join end to end from 0 to 1. A changed range keeps its two ends, and the
ranges left on keep move their shared ends as little as possible to join it, so a user changes
one range without retyping the others (a kept range may shrink to nothing).
"""
from __future__ import annotations

import re

from ..psa_kernels.config import (ATTN_IMPLS, BLOCK_SIZES_M, BLOCK_SIZES_N, ESTIMATE_METHODS, LEVELS, MASK_MODES,
                                  PRESET_TYPES, REARRANGE_METHODS, TAIL_CORRECTIONS, TILE_N_SIZES, ConfigError,
                                  PSAConfig)

KEEP = "keep"
KEEP_INT = -1
LEVEL_OFF = "off"
BOOL_CHOICES = (KEEP, "true", "false")

# Widget name -> (preset field, combo options without "keep").
COMBO_FIELDS = {
    "type": ("type", PRESET_TYPES),
    "mask_mode": ("mask_mode", MASK_MODES),
    "attn_impl": ("attn_impl", ATTN_IMPLS),
    "rearrange_method": ("rearrange_method", REARRANGE_METHODS),
    "estimate_method": ("estimate_method", ESTIMATE_METHODS),
    "tail_correction": ("tail_correction", TAIL_CORRECTIONS),
}
BOOL_FIELDS = ("use_rearrange", "use_sim_mask", "verbose", "use_pooled_tail")
BLOCK_FIELDS = {"block_m": ("m", BLOCK_SIZES_M), "block_n": ("n", BLOCK_SIZES_N),
                "tile_n": ("tile_n", TILE_N_SIZES)}
LEVEL_WIDGETS = {lvl: f"level_{lvl}" for lvl in LEVELS}
_TOL = 1e-9

# Preset field (as config validation names it) -> the editor widget that sets it.
_FIELD_WIDGETS = [(re.compile(rf"mask_ratios\.{lvl}\b(\[\d\])?"), f"level_{lvl}") for lvl in LEVELS] + [
    (re.compile(r"mask_ratios\b"), "level_0"),  # "the last range ends at ...": level 0 takes the rest
    (re.compile(r"block_size\.m\b"), "block_m"), (re.compile(r"block_size\.n\b"), "block_n"),
    (re.compile(r"block_size\.tile_n\b"), "tile_n"), (re.compile(r"tile_size(\[\d\])?"), "tile_size"),
    (re.compile(r"sim_thresholds(\.x\d)?"), "sim_thresholds"),
]


def widget_error(e: ConfigError) -> ConfigError:
    """The error with its leading preset field replaced by the editor widget the user sees."""
    text = str(e)
    field, sep, rest = text.partition(": ")
    if sep:
        for pattern, widget in _FIELD_WIDGETS:
            if pattern.fullmatch(field):
                return ConfigError(f"{widget}: {rest}")
    return e


def _numbers(text: str, count: int, widget: str, what: str, cast=float) -> list:
    parts = [p for p in text.replace("[", " ").replace("]", " ").replace(",", " ").split() if p]
    try:
        if len(parts) != count:
            raise ValueError
        return [cast(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{widget}: got {text!r}; allowed: {KEEP}, or {what}") from None


def _level_edit(text: str, lvl: int) -> tuple | None:
    """The range typed into a level widget; None for off."""
    widget = LEVEL_WIDGETS[lvl]
    text = text.strip()
    if text.lower() in (LEVEL_OFF, ""):
        return None
    lo, hi = _numbers(text, 2, widget, f"{LEVEL_OFF}, or a range 'lo, hi' with 0 <= lo <= hi <= 1")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"{widget}: got {text!r}; allowed: {KEEP}, {LEVEL_OFF}, or a range 'lo, hi' "
                          "with 0 <= lo <= hi <= 1")
    return (lo, hi)


def _fmt(rng) -> str:
    return f"{rng[0]:g}, {rng[1]:g}"


def join_levels(incoming: dict, edits: dict) -> tuple[dict, list[str]]:
    """Level ranges after ``edits`` (level -> (lo, hi), or None for off), and a note for every
    kept range that moved.

    The ranges in level order cut [0, 1] at a list of points. A changed range fixes the points at
    its two ends; every other point keeps its incoming place, clamped between the fixed points on
    either side. Two changed ranges that disagree on a shared point are an error naming the widget.
    """
    chain = [lvl for lvl in LEVELS if (edits.get(lvl) is not None) or (lvl not in edits and lvl in incoming)]
    if not chain:
        raise ConfigError(f"{LEVEL_WIDGETS[0]}: got {LEVEL_OFF} for every level; allowed: at least one "
                          "level with a range (give level 0 '0, 1' to skip everything)")
    fixed: dict[int, tuple[float, int | None]] = {}  # point -> (value, level whose edit fixed it)
    for i, lvl in enumerate(chain):
        if lvl not in edits:
            continue
        for point, value in ((i, edits[lvl][0]), (i + 1, edits[lvl][1])):
            other = fixed.get(point, (value, None))
            if abs(other[0] - value) > _TOL:
                raise ConfigError(f"{LEVEL_WIDGETS[lvl]}: got {_fmt(edits[lvl])!r}; allowed: a range that joins "
                                  f"{LEVEL_WIDGETS[other[1]]} ({_fmt(edits[other[1]])}): change one of the two, "
                                  f"or set the other back to {KEEP}")
            fixed[point] = (value, lvl)
    last = len(chain)
    for point, end, lvl, where in ((0, 0.0, chain[0], "start at 0, as the first level"),
                                   (last, 1.0, chain[-1], "end at 1, as the last level")):
        if point in fixed and abs(fixed[point][0] - end) > _TOL:
            raise ConfigError(f"{LEVEL_WIDGETS[lvl]}: got {_fmt(edits[lvl])!r}; allowed: a range that must {where} "
                              "with a range")
        fixed.setdefault(point, (end, None))
    points = sorted(fixed)
    for a, b in zip(points, points[1:]):
        if fixed[a][0] > fixed[b][0] + _TOL:
            lvl = fixed[b][1] if fixed[b][1] is not None else fixed[a][1]
            raise ConfigError(f"{LEVEL_WIDGETS[lvl]}: got {_fmt(edits[lvl])!r}; allowed: ranges in level order "
                              f"1, 2, 4, 8, 0 that do not overlap ({LEVEL_WIDGETS[fixed[a][1]]} ends at "
                              f"{fixed[a][0]:g}, after {LEVEL_WIDGETS[fixed[b][1]]} starts at {fixed[b][0]:g})")
    cuts = []
    for point in range(last + 1):
        if point in fixed:
            cuts.append(fixed[point][0])
            continue
        left = max(fixed[p][0] for p in points if p < point)
        right = min(fixed[p][0] for p in points if p > point)
        cuts.append(min(max(incoming[chain[point - 1]][1], left), right))
    out = {lvl: (cuts[i], cuts[i + 1]) for i, lvl in enumerate(chain)}
    notes = [f"{LEVEL_WIDGETS[lvl]}: {_fmt(incoming[lvl])} -> {_fmt(out[lvl])}"
             for lvl in chain if lvl not in edits and tuple(incoming[lvl]) != out[lvl]]
    return out, notes


def edit_preset(base: PSAConfig, notes: list | None = None, **widgets) -> PSAConfig:
    """``base`` with every widget that is not at its keep value applied.

    Widgets left out count as keep, so callers may pass only what they change. Kept level
    ranges that moved to join a changed one are described in ``notes`` when given.
    Errors name the widget.
    """
    try:
        return _edit(base, notes if notes is not None else [], widgets)
    except ConfigError as e:
        raise widget_error(e) from None


def _edit(base: PSAConfig, notes: list, widgets: dict) -> PSAConfig:
    d = base.to_dict() if not base.is_dense else PSAConfig(type="psa").to_dict() | base.to_dict()
    changed = set()

    def put(key, value):
        d[key] = value
        changed.add(key)

    for widget, (key, _) in COMBO_FIELDS.items():
        if widgets.get(widget, KEEP) != KEEP:
            put(key, widgets[widget])
    for key in BOOL_FIELDS:
        value = widgets.get(key, KEEP)
        if value != KEEP:
            if value not in BOOL_CHOICES:
                raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(BOOL_CHOICES)}")
            put(key, value == "true")
    block = dict(d["block_size"])
    for widget, (key, _) in BLOCK_FIELDS.items():
        value = widgets.get(widget, KEEP)
        if value != KEEP:
            block[key] = _numbers(str(value), 1, widget, "one of the allowed sizes", int)[0]
            changed.add("block_size")
    d["block_size"] = block
    edits = {lvl: _level_edit(str(widgets[w]), lvl) for lvl, w in LEVEL_WIDGETS.items()
             if str(widgets.get(w, KEEP)).strip() != KEEP}
    if edits:
        incoming = dict(base.mask_ratios) if not base.is_dense else dict(PSAConfig().mask_ratios)
        ratios, moved = join_levels(incoming, edits)
        notes.extend(moved)
        put("mask_ratios", {lvl: list(r) for lvl, r in ratios.items()})
    text = str(widgets.get("tile_size", KEEP)).strip()
    if text != KEEP:
        put("tile_size", _numbers(text, 3, "tile_size", "three integers 'depth, height, width'", int))
    text = str(widgets.get("sim_thresholds", KEEP)).strip()
    if text != KEEP:
        x2, x4, x8 = _numbers(text, 3, "sim_thresholds", "three numbers 'x2, x4, x8' in [-1, 1]")
        put("sim_thresholds", {"x2": x2, "x4": x4, "x8": x8})
    for key in ("warmup_steps", "heavy_keys"):
        value = widgets.get(key, KEEP_INT)
        if value != KEEP_INT:
            put(key, value)
    description = widgets.get("description", "")
    if description:
        put("description", description)
    if not changed:
        return base
    if d["type"] == "dense":
        # A dense preset keeps only what it was given, as in the YAML file.
        d = {k: v for k, v in d.items() if k in base.given | changed | {"type", "description"}}
    return PSAConfig.from_dict(d)
