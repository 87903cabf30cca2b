"""Preset and model-section configuration: dataclasses, YAML loading, validation.

The schema is the one of ``configs/attention_config.yaml`` (see configs/README.md).
Every validation error is a :class:`ConfigError` whose ``field`` names the value and whose
message says the bad value and what is allowed, so the ComfyUI nodes can show it verbatim.
Every way of making a config validates: ``from_dict``, direct construction and ``replace()``.
Configs are frozen and hashable.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .yaml_file import read_yaml_document

# Pyramid levels: 1 = full resolution, 2/4/8 = keys and values mean-pooled by p, 0 = skipped.
LEVELS = (1, 2, 4, 8, 0)
POOLED_LEVELS = (2, 4, 8)
MASK_MODES = ("thresholdbound", "topk")
ATTN_IMPLS = ("new_mask_type", "old_mask_type")
REARRANGE_METHODS = ("Gilbert", "Tiled")
ESTIMATE_METHODS = ("sampled", "block_mean")
TAIL_CORRECTIONS = ("none", "variance")
PRESET_TYPES = ("psa", "dense")
BLOCK_SIZES_M = (16, 32, 64, 128)
BLOCK_SIZES_N = (16, 32, 64, 128)
TILE_N_SIZES = (16, 32, 64, 128)
# Bounds past which a value can only be a mistake, and where the layout's int64 index arithmetic
# or the sampler's step counter would misbehave: a tile as large as the grid is already one tile.
MAX_WARMUP_STEPS = 10_000
MAX_TILE = 1024
MAX_HEAVY_KEYS = 1024
MAX_VIDEO_DIVISOR = 1024
MAX_TEXT_LENGTH = 65_536
_RATIO_TOL = 1e-6

__all__ = ["ConfigError", "BlockSize", "SimThresholds", "PSAConfig", "VideoScale", "ModelConfig", "FrozenDict",
           "parse_attention_config", "read_yaml", "load_attention_config"]


class _ShortRepr(reprlib.Repr):
    """Bounded repr for error messages: a hostile value never makes a huge message."""

    def __init__(self):
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlevel = 3

    def repr_int(self, x, level):
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_SHORT = _ShortRepr()


def show(value: Any) -> str:
    """``repr(value)`` cut to a readable length."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still named
        return f"<a {type(value).__name__}>"
    return text if len(text) <= 160 else text[:150] + "...(cut)"


def _fail(where: str, msg: str) -> None:
    raise ConfigError(msg, where)


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    _fail(where, f"got {show(value)}; allowed: true or false")


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"an integer in [{lo}, {hi}]"
    return f"an integer >= {lo}" if lo is not None else "an integer"


def _as_int(value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (integral floats such as ``128.0`` too) within [lo, hi]."""
    number = None
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
    if number is None or (lo is not None and number < lo) or (hi is not None and number > hi):
        _fail(where, f"got {show(value)}; allowed: {_int_range(lo, hi)}")
    return number


def _as_size(value: Any, where: str, allowed: tuple, note: str = "") -> int:
    number = None
    try:
        number = _as_int(value, where)
    except ConfigError:
        pass
    if number not in allowed:
        kind = "" if number is not None else "one of the integers "
        _fail(where, f"got {show(value)}; allowed{note}: {kind}{', '.join(map(str, allowed))}")
    return number


def _as_float(value: Any, where: str, lo: float, hi: float) -> float:
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, ValueError):
            pass
    if number is None or not math.isfinite(number) or not lo <= number <= hi:
        _fail(where, f"got {show(value)}; allowed: a number in [{lo}, {hi}]")
    return number


def _choice(value: Any, where: str, allowed: tuple) -> str:
    """One of ``allowed``, matched regardless of case (YAML files spell them either way)."""
    if isinstance(value, str):
        for a in allowed:
            if a.lower() == value.lower():
                return a
    _fail(where, f"got {show(value)}; allowed: {', '.join(map(str, allowed))}")


def _mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(where, f"got {show(value)}; allowed: a mapping")
    return value


def _text(value: Any) -> str:
    """``str(value)``, or its short repr where Python cannot print it."""
    try:
        return value if isinstance(value, str) else str(value)
    except Exception:  # noqa: BLE001
        return show(value)


def _key(key: Any) -> str:
    """A mapping key as it appears in a field path (cut when absurdly long)."""
    text = _text(key)
    return text if len(text) <= 80 else text[:77] + "..."


def _no_unknown_keys(d: Mapping, known: tuple, where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        _fail(f"{where}.{_key(unknown[0])}" if where else _key(unknown[0]),
              f"unknown field; allowed: {', '.join(known)}")


class FrozenDict(dict):
    """A dict that cannot change after validation, so configs holding one stay valid and hashable."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a validated config cannot be changed in place; use PSAConfig.replace()")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __hash__(self):
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return type(self), (dict(self),)


@dataclass(frozen=True)
class BlockSize:
    """Query block ``m`` and key block ``n`` in tokens; ``tile_n`` is kept for compatibility
    with the research code's YAML files: our pyramid kernel chooses its own key tile."""
    m: int = 128
    n: int = 64
    tile_n: int = 32

    def __post_init__(self):
        m = _as_size(self.m, "block_size.m", BLOCK_SIZES_M)
        n = _as_size(self.n, "block_size.n", BLOCK_SIZES_N)
        tile_n = _as_size(self.tile_n, "block_size.tile_n", tuple(t for t in TILE_N_SIZES if t <= n),
                          f" with n={n}")
        for name, value in (("m", m), ("n", n), ("tile_n", tile_n)):
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class SimThresholds:
    """Minimum mean cosine similarity of keys for a block to be pooled by 2, 4 and 8."""
    x2: float = 0.7
    x4: float = 0.65
    x8: float = 0.6

    def __post_init__(self):
        for name in ("x2", "x4", "x8"):
            object.__setattr__(self, name, _as_float(getattr(self, name), f"sim_thresholds.{name}", -1.0, 1.0))

    def for_level(self, p: int) -> float:
        return {2: self.x2, 4: self.x4, 8: self.x8}[p]


DEFAULT_MASK_RATIOS = {1: (0.0, 0.4), 2: (0.4, 0.5), 4: (0.5, 0.6), 8: (0.6, 0.8), 0: (0.8, 1.0)}

_PRESET_FIELDS = ("type", "description", "use_rearrange", "use_sim_mask", "block_size",
                  "mask_ratios", "mask_mode", "attn_impl", "tile_size", "warmup_steps",
                  "rearrange_method", "verbose", "sim_thresholds", "use_pooled_tail",
                  "estimate_method", "heavy_keys", "tail_correction")


@dataclass(frozen=True)
class PSAConfig:
    """One attention preset (one entry under ``attention_configs``)."""
    type: str = "psa"
    description: str = ""
    use_rearrange: bool = True
    use_sim_mask: bool = False
    block_size: BlockSize = BlockSize()
    mask_ratios: Mapping = field(default_factory=lambda: FrozenDict(DEFAULT_MASK_RATIOS))
    mask_mode: str = "thresholdbound"
    attn_impl: str = "new_mask_type"
    tile_size: tuple = (2, 8, 8)
    warmup_steps: int = 0
    rearrange_method: str = "Gilbert"
    verbose: bool = False
    sim_thresholds: SimThresholds = SimThresholds()
    # Level-0 key blocks stay in the softmax as one mean-pooled key/value each (bias ln of the
    # block's real keys) instead of being dropped.
    use_pooled_tail: bool = False
    # How block importance is estimated: from a strided sample of queries and keys, or from
    # block means (cheaper at long sequences).
    estimate_method: str = "sampled"
    # Keys per head that every query block skipping their block attends exactly (0: none);
    # they leave their blocks' tail means (psa_kernels/heavy.py).
    heavy_keys: int = 0
    # With the pooled tail: "variance" adds to each skipped block's bias the second-order mass
    # its keys' spread adds to the mean key's (psa_kernels/tail_spread.py); "none" leaves ln(n).
    tail_correction: str = "none"
    # Fields present in the dict this preset was read from; a dense preset writes back only these.
    given: frozenset = field(default=frozenset(_PRESET_FIELDS), compare=False, repr=False)

    def __post_init__(self):
        # Every construction path lands here (from_dict, PSAConfig(...), replace()): validate and
        # normalise each field, naming it, so no path makes a config the kernels cannot run.
        for name, value in self._validated().items():
            object.__setattr__(self, name, value)

    def _validated(self) -> dict:
        out = {"type": _choice(self.type, "type", PRESET_TYPES)}
        if not isinstance(self.description, str):
            _fail("description", f"got {show(self.description)}; allowed: text")
        for name in ("use_rearrange", "use_sim_mask", "verbose", "use_pooled_tail"):
            out[name] = _as_bool(getattr(self, name), name)
        if not isinstance(self.block_size, BlockSize):
            _fail("block_size", f"got {show(self.block_size)}; allowed: a BlockSize(m, n, tile_n)")
        out["mask_ratios"] = _parse_mask_ratios(self.mask_ratios, "mask_ratios")
        out["mask_mode"] = _choice(self.mask_mode, "mask_mode", MASK_MODES)
        out["attn_impl"] = _choice(self.attn_impl, "attn_impl", ATTN_IMPLS)
        ts = self.tile_size
        if not isinstance(ts, (list, tuple)) or len(ts) != 3:
            _fail("tile_size", f"got {show(ts)}; allowed: a list of 3 positive integers [depth, height, width], "
                               f"each at most {MAX_TILE}")
        out["tile_size"] = tuple(_as_int(x, f"tile_size[{i}]", 1, MAX_TILE) for i, x in enumerate(ts))
        out["warmup_steps"] = _as_int(self.warmup_steps, "warmup_steps", 0, MAX_WARMUP_STEPS)
        out["rearrange_method"] = _choice(self.rearrange_method, "rearrange_method", REARRANGE_METHODS)
        out["estimate_method"] = _choice(self.estimate_method, "estimate_method", ESTIMATE_METHODS)
        out["heavy_keys"] = _as_int(self.heavy_keys, "heavy_keys", 0, MAX_HEAVY_KEYS)
        out["tail_correction"] = _choice(self.tail_correction, "tail_correction", TAIL_CORRECTIONS)
        if not isinstance(self.sim_thresholds, SimThresholds):
            _fail("sim_thresholds", f"got {show(self.sim_thresholds)}; allowed: a SimThresholds(x2, x4, x8)")
        given = self.given
        if not isinstance(given, (set, frozenset)) or not given <= set(_PRESET_FIELDS):
            _fail("given", f"got {show(given)}; allowed: a set of preset field names")
        out["given"] = frozenset(given)
        return out

    @property
    def is_dense(self) -> bool:
        return self.type == "dense"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "PSAConfig":
        """Read a preset in the YAML form of configs/attention_config.yaml.

        ``where`` prefixes the error's field (e.g. ``"Wan2.1_1.3b.attention_configs.my_preset"``).
        """
        d = _mapping(d, where or "preset")
        try:
            return cls._from_mapping(d)
        except ConfigError as e:
            raise e.located(prefix=where) from None

    @classmethod
    def _from_mapping(cls, d: Mapping) -> "PSAConfig":
        _no_unknown_keys(d, _PRESET_FIELDS, "")
        kw: dict[str, Any] = {k: d[k] for k in ("type", "use_rearrange", "use_sim_mask", "verbose",
                                                 "use_pooled_tail", "mask_ratios", "mask_mode", "attn_impl",
                                                 "tile_size", "warmup_steps", "rearrange_method", "estimate_method",
                                                 "heavy_keys", "tail_correction") if k in d}
        if "description" in d:
            desc = d["description"]
            kw["description"] = "" if desc is None else _text(desc)
        if "block_size" in d:
            bs = _mapping(d["block_size"], "block_size")
            _no_unknown_keys(bs, ("m", "n", "tile_n"), "block_size")
            default = BlockSize()
            n = bs.get("n", default.n)
            default_tile = min(default.tile_n, n) if isinstance(n, int) and not isinstance(n, bool) else default.tile_n
            kw["block_size"] = BlockSize(m=bs.get("m", default.m), n=n, tile_n=bs.get("tile_n", default_tile))
        if "sim_thresholds" in d:
            st = _mapping(d["sim_thresholds"], "sim_thresholds")
            _no_unknown_keys(st, ("x2", "x4", "x8"), "sim_thresholds")
            kw["sim_thresholds"] = SimThresholds(**{k: st[k] for k in ("x2", "x4", "x8") if k in st})
        kw["given"] = frozenset(k for k in d if k in _PRESET_FIELDS)
        return cls(**kw)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """The YAML form; ``PSAConfig.from_dict(c.to_dict()) == c``."""
        full = {
            "type": self.type,
            "description": self.description,
            "use_rearrange": self.use_rearrange,
            "use_sim_mask": self.use_sim_mask,
            "block_size": dataclasses.asdict(self.block_size),
            "mask_ratios": {lvl: [float(lo), float(hi)] for lvl, (lo, hi) in self.mask_ratios.items()},
            "mask_mode": self.mask_mode,
            "attn_impl": self.attn_impl,
            "tile_size": list(self.tile_size),
            "warmup_steps": self.warmup_steps,
            "rearrange_method": self.rearrange_method,
            "verbose": self.verbose,
            "sim_thresholds": dataclasses.asdict(self.sim_thresholds),
            "use_pooled_tail": self.use_pooled_tail,
            "estimate_method": self.estimate_method,
            "heavy_keys": self.heavy_keys,
            "tail_correction": self.tail_correction,
        }
        if self.is_dense:
            keep = set(self.given) | {"type"}
            return {k: v for k, v in full.items() if k in keep}
        return full

    def replace(self, **changes) -> "PSAConfig":
        """A copy with some fields changed (validated like any other); changed fields count as given."""
        unknown = [k for k in changes if k not in _PRESET_FIELDS]
        if unknown:
            _fail(_key(unknown[0]), f"unknown field; allowed: {', '.join(_PRESET_FIELDS)}")
        return dataclasses.replace(self, given=self.given | frozenset(changes), **changes)

    def level_ranges(self) -> list[tuple[int, float, float]]:
        """``(level, lo, hi)`` in level order 1, 2, 4, 8, 0, absent levels left out."""
        return [(lvl, *self.mask_ratios[lvl]) for lvl in LEVELS if lvl in self.mask_ratios]

    @property
    def level1_block_share(self) -> float | None:
        """Under mask_mode topk, the largest share of a row's key blocks that level 1 takes (text
        blocks, always attended, aside); None under thresholdbound, whose ranges are shares of
        the attention mass, not of the blocks."""
        if self.mask_mode != "topk":
            return None
        lo, hi = self.mask_ratios.get(1, (0.0, 0.0))
        return hi - lo

    @property
    def uses_pooled_levels(self) -> bool:
        """Whether a level map of this preset can hold level 2, 4 or 8 (the similarity guard
        only ever makes a pooled level finer, and keeps levels 1 and 0 as they are)."""
        return any(lvl in (2, 4, 8) and hi > lo for lvl, lo, hi in self.level_ranges())


def _level(key: Any) -> int | None:
    if isinstance(key, bool) or (isinstance(key, float) and not key.is_integer()):
        return None
    try:
        lvl = int(key)
    except (TypeError, ValueError, OverflowError):
        return None
    return lvl if lvl in LEVELS else None


def _parse_mask_ratios(value: Any, where: str) -> FrozenDict:
    """Levels -> (lo, hi); the ranges must join end to end from 0 to 1 in level order 1, 2, 4, 8, 0."""
    value = _mapping(value, where)
    out: dict[int, tuple[float, float]] = {}
    for key, rng in value.items():
        lvl = _level(key)
        if lvl is None:
            _fail(f"{where}.{_key(key)}", f"unknown level {show(key)}; allowed levels: 1, 2, 4, 8, 0")
        if lvl in out:
            _fail(f"{where}.{_key(key)}", f"level {lvl} is given twice")
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            _fail(f"{where}.{lvl}", f"got {show(rng)}; allowed: a range [lo, hi] with 0 <= lo <= hi <= 1")
        lo = _as_float(rng[0], f"{where}.{lvl}[0]", 0.0, 1.0)
        hi = _as_float(rng[1], f"{where}.{lvl}[1]", 0.0, 1.0)
        if lo > hi:
            _fail(f"{where}.{lvl}", f"range [{lo}, {hi}] is reversed; allowed: [lo, hi] with lo <= hi")
        out[lvl] = (lo, hi)
    if not out:
        _fail(where, "no levels given; allowed levels: 1, 2, 4, 8, 0, with ranges covering [0, 1]")
    expected = 0.0
    for lvl in (lv for lv in LEVELS if lv in out):
        lo, hi = out[lvl]
        if abs(lo - expected) > _RATIO_TOL:
            _fail(f"{where}.{lvl}",
                  f"range [{lo}, {hi}] is out of order: it must start at {expected}, where the previous "
                  "level ends (ranges join end to end from 0.0 to 1.0 in level order 1, 2, 4, 8, 0)")
        expected = hi
    if abs(expected - 1.0) > _RATIO_TOL:
        _fail(where, f"the last range ends at {expected}; the ranges must reach 1.0 "
                     "(give level 0 the rest to skip it)")
    return FrozenDict((lvl, out[lvl]) for lvl in LEVELS if lvl in out)


# ---------------------------------------------------------------------- model sections
@dataclass(frozen=True)
class VideoScale:
    """Divisors from pixel size to token grid (VAE stride x patch size)."""
    width_divisor: int = 16
    height_divisor: int = 16
    depth_divisor: int = 4

    def __post_init__(self):
        for name in ("width_divisor", "height_divisor", "depth_divisor"):
            object.__setattr__(self, name, _as_int(getattr(self, name), f"video_scale.{name}", 1, MAX_VIDEO_DIVISOR))


_MODEL_FIELDS = ("default_attention", "video_scale", "text_length", "attention_configs")


@dataclass(frozen=True)
class ModelConfig:
    """One model section of attention_config.yaml; errors name the field under the section."""
    name: str
    default_attention: str
    video_scale: VideoScale = VideoScale()
    text_length: int = 0
    attention_configs: Mapping = field(default_factory=FrozenDict)  # name -> PSAConfig

    def __post_init__(self):
        name = self.name
        if not isinstance(name, str) or not name:
            _fail("name", f"got {show(name)}; allowed: a non-empty section name")
        presets = _mapping(self.attention_configs, f"{name}.attention_configs")
        for key, preset in presets.items():
            if not isinstance(key, str) or not isinstance(preset, PSAConfig):
                _fail(f"{name}.attention_configs.{_key(key)}",
                      f"got {show(preset)}; allowed: a PSAConfig under a text name")
        if not presets:
            _fail(f"{name}.attention_configs", "no presets; add at least one preset")
        default = self.default_attention
        if not isinstance(default, str) or default not in presets:
            _fail(f"{name}.default_attention",
                  f"got {show(default)}; allowed: one of this section's presets: {', '.join(presets)}")
        if not isinstance(self.video_scale, VideoScale):
            _fail(f"{name}.video_scale", f"got {show(self.video_scale)}; allowed: a VideoScale")
        object.__setattr__(self, "text_length",
                           _as_int(self.text_length, f"{name}.text_length", 0, MAX_TEXT_LENGTH))
        object.__setattr__(self, "attention_configs", FrozenDict(presets))

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "ModelConfig":
        d = _mapping(d, name)
        _no_unknown_keys(d, _MODEL_FIELDS, name)
        presets_raw = _mapping(d.get("attention_configs") or {}, f"{name}.attention_configs")
        presets = {_text(k): PSAConfig.from_dict(v, f"{name}.attention_configs.{_key(k)}")
                   for k, v in presets_raw.items()}
        if not presets:
            _fail(f"{name}.attention_configs", "no presets; add at least one preset")
        vs_raw = _mapping(d.get("video_scale") or {}, f"{name}.video_scale")
        _no_unknown_keys(vs_raw, ("width_divisor", "height_divisor", "depth_divisor"), f"{name}.video_scale")
        try:
            vs = VideoScale(**vs_raw)
        except ConfigError as e:
            raise e.located(prefix=name) from None
        return cls(name=name, default_attention=d.get("default_attention", next(iter(presets))), video_scale=vs,
                   text_length=d.get("text_length", 0), attention_configs=presets)

    def to_dict(self) -> dict:
        return {
            "default_attention": self.default_attention,
            "video_scale": dataclasses.asdict(self.video_scale),
            "text_length": self.text_length,
            "attention_configs": {k: v.to_dict() for k, v in self.attention_configs.items()},
        }

    def preset(self, name: str | None = None) -> PSAConfig:
        name = name or self.default_attention
        if not isinstance(name, str) or name not in self.attention_configs:
            _fail(f"{self.name}.attention_configs",
                  f"unknown preset {show(name)}; allowed: {', '.join(self.attention_configs)}")
        return self.attention_configs[name]


def parse_attention_config(data: Any, source: str = "attention_config.yaml") -> dict[str, ModelConfig]:
    """Model sections from an already-parsed YAML document."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"got {show(data)}; allowed: a mapping of model section names to sections", file=source)
    return {_text(name): ModelConfig.from_dict(_text(name), section) for name, section in data.items()}


def read_yaml(path: str | Path, missing_ok: bool = False) -> Any:
    """Parsed YAML of a file (None when empty, or missing with ``missing_ok``), read within the
    bounds of :mod:`psa_kernels.yaml_file`. Raises ConfigError naming the file and the line."""
    doc = read_yaml_document(path)
    if doc is None:
        if missing_ok:
            return None
        raise ConfigError("cannot read: no such file", file=str(path))
    if doc.lossy:
        raise doc.lossy[0]
    return doc.data


def load_attention_config(path: str | Path) -> dict[str, ModelConfig]:
    """Load a whole attention_config.yaml into ``{section name: ModelConfig}``.

    Raises ConfigError naming the file, the line and the field.
    """
    doc = read_yaml_document(path)
    if doc is None:
        raise ConfigError("cannot read: no such file", file=str(path))
    if doc.lossy:
        raise doc.lossy[0]
    try:
        return parse_attention_config(doc.data, str(path))
    except ConfigError as e:
        raise doc.locate(e) from None
