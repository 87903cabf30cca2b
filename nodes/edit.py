"""The PSA Preset Editor's rule: every widget either keeps the incoming value or replaces it.

Convention, the same for every field so a user learns it once: combo widgets start with
``keep``, text widgets hold ``keep``, the integer warm-up holds -1, and the description is
kept while left empty. Anything else replaces the incoming value, and the result is validated
as a whole, so an error names the preset field and the values allowed there.
"""
from __future__ import annotations

from ..psa_kernels.config import (ATTN_IMPLS, BLOCK_SIZES_M, BLOCK_SIZES_N, LEVELS, MASK_MODES,
                                  PRESET_TYPES, REARRANGE_METHODS, TILE_N_SIZES, ConfigError, PSAConfig)

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
}
BOOL_FIELDS = ("use_rearrange", "use_sim_mask", "verbose")
BLOCK_FIELDS = {"block_m": ("m", BLOCK_SIZES_M), "block_n": ("n", BLOCK_SIZES_N),
                "tile_n": ("tile_n", TILE_N_SIZES)}
LEVEL_WIDGETS = {lvl: f"level_{lvl}" for lvl in LEVELS}


def _numbers(text: str, count: int, widget: str, what: str, cast=float) -> list:
    parts = [p for p in text.replace("[", " ").replace("]", " ").replace(",", " ").split() if p]
    try:
        if len(parts) != count:
            raise ValueError
        return [cast(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{widget}: got {text!r}; allowed: {KEEP}, or {what}") from None


def _level_range(text: str, lvl: int, incoming: dict) -> tuple | None:
    widget = LEVEL_WIDGETS[lvl]
    text = text.strip()
    if text == KEEP:
        return incoming.get(lvl)
    if text.lower() in (LEVEL_OFF, ""):
        return None
    lo, hi = _numbers(text, 2, widget, f"{LEVEL_OFF}, or a range 'lo, hi' with 0 <= lo <= hi <= 1")
    return (lo, hi)


def edit_preset(base: PSAConfig, **widgets) -> PSAConfig:
    """``base`` with every widget that is not at its keep value applied.

    Widgets left out count as keep, so callers may pass only what they change.
    """
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
    if any(str(widgets.get(w, KEEP)).strip() != KEEP for w in LEVEL_WIDGETS.values()):
        ratios = {}
        for lvl in LEVELS:
            rng = _level_range(str(widgets.get(LEVEL_WIDGETS[lvl], KEEP)), lvl, base.mask_ratios)
            if rng is not None:
                ratios[lvl] = list(rng)
        put("mask_ratios", ratios)
    text = str(widgets.get("tile_size", KEEP)).strip()
    if text != KEEP:
        put("tile_size", _numbers(text, 3, "tile_size", "three integers 'depth, height, width'", int))
    text = str(widgets.get("sim_thresholds", KEEP)).strip()
    if text != KEEP:
        x2, x4, x8 = _numbers(text, 3, "sim_thresholds", "three numbers 'x2, x4, x8' in [-1, 1]")
        put("sim_thresholds", {"x2": x2, "x4": x4, "x8": x8})
    warmup = widgets.get("warmup_steps", KEEP_INT)
    if warmup != KEEP_INT:
        put("warmup_steps", warmup)
    description = widgets.get("description", "")
    if description:
        put("description", description)
    if not changed:
        return base
    if d["type"] == "dense":
        # A dense preset keeps only what it was given, as in the YAML file.
        d = {k: v for k, v in d.items() if k in base.given | changed | {"type", "description"}}
    return PSAConfig.from_dict(d)
