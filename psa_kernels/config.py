"""Preset and model-section configuration: dataclasses, YAML loading, validation.

The schema is the one of ``configs/attention_config.yaml`` (see configs/README.md).
Every validation error is a :class:`ConfigError` whose message names the field,
the bad value and what is allowed, so the ComfyUI nodes can show it verbatim.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# Pyramid levels: 1 = full resolution, 2/4/8 = keys and values mean-pooled by p, 0 = skipped.
LEVELS = (1, 2, 4, 8, 0)
POOLED_LEVELS = (2, 4, 8)
MASK_MODES = ("thresholdbound", "topk")
ATTN_IMPLS = ("new_mask_type", "old_mask_type")
REARRANGE_METHODS = ("Gilbert", "Tiled")
ESTIMATE_METHODS = ("sampled", "block_mean")
PRESET_TYPES = ("psa", "dense")
BLOCK_SIZES_M = (16, 32, 64, 128)
BLOCK_SIZES_N = (16, 32, 64, 128)
TILE_N_SIZES = (16, 32, 64, 128)
_RATIO_TOL = 1e-6


class ConfigError(ValueError):
    """A preset or attention_config.yaml value that cannot be used."""


def _fail(where: str, msg: str) -> None:
    raise ConfigError(f"{where}: {msg}" if where else msg)


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    _fail(where, f"got {value!r}; allowed: true or false")


def _as_int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        _fail(where, f"got {value!r}; allowed: an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        _fail(where, f"got {value}; allowed: an integer >= {minimum}")
    return value


def _as_float(value: Any, where: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, f"got {value!r}; allowed: a number in [{lo}, {hi}]")
    if not lo <= value <= hi:
        _fail(where, f"got {value}; allowed: a number in [{lo}, {hi}]")
    return float(value)


def _choice(value: Any, where: str, allowed: tuple, case_insensitive: bool = False) -> Any:
    if case_insensitive and isinstance(value, str):
        for a in allowed:
            if a.lower() == value.lower():
                return a
    if value in allowed:
        return value
    _fail(where, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _mapping(value: Any, where: str) -> Mapping:
    if not isinstance(value, Mapping):
        _fail(where, f"got {value!r}; allowed: a mapping")
    return value


def _no_unknown_keys(d: Mapping, known: tuple, where: str) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        _fail(f"{where}.{unknown[0]}" if where else str(unknown[0]),
              f"unknown field; allowed: {', '.join(known)}")


@dataclass(frozen=True)
class BlockSize:
    """Query block ``m`` and key block ``n`` in tokens; ``tile_n`` is kept for compatibility
    with the research code's YAML files: our pyramid kernel chooses its own key tile."""
    m: int = 128
    n: int = 64
    tile_n: int = 32


@dataclass(frozen=True)
class SimThresholds:
    """Minimum mean cosine similarity of keys for a block to be pooled by 2, 4 and 8."""
    x2: float = 0.7
    x4: float = 0.65
    x8: float = 0.6

    def for_level(self, p: int) -> float:
        return {2: self.x2, 4: self.x4, 8: self.x8}[p]


DEFAULT_MASK_RATIOS = {1: (0.0, 0.4), 2: (0.4, 0.5), 4: (0.5, 0.6), 8: (0.6, 0.8), 0: (0.8, 1.0)}

_PRESET_FIELDS = ("type", "description", "use_rearrange", "use_sim_mask", "block_size",
                  "mask_ratios", "mask_mode", "attn_impl", "tile_size", "warmup_steps",
                  "rearrange_method", "verbose", "sim_thresholds", "use_pooled_tail",
                  "estimate_method")


@dataclass(frozen=True)
class PSAConfig:
    """One attention preset (one entry under ``attention_configs``)."""
    type: str = "psa"
    description: str = ""
    use_rearrange: bool = True
    use_sim_mask: bool = False
    block_size: BlockSize = BlockSize()
    mask_ratios: dict = field(default_factory=lambda: dict(DEFAULT_MASK_RATIOS))
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
    # Fields present in the dict this preset was read from; a dense preset writes back only these.
    given: frozenset = field(default=frozenset(_PRESET_FIELDS), compare=False, repr=False)

    def __post_init__(self):
        # Re-validate so that dataclasses.replace() and direct construction are checked too.
        self._validate_self()

    @property
    def is_dense(self) -> bool:
        return self.type == "dense"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> "PSAConfig":
        """Read a preset in the YAML form of configs/attention_config.yaml.

        ``where`` prefixes error messages (e.g. ``"Wan2.1_1.3b.attention_configs.my_preset"``).
        """
        p = (lambda f: f"{where}.{f}" if where else f)
        d = _mapping(d, where or "preset")
        _no_unknown_keys(d, _PRESET_FIELDS, where)
        kw: dict[str, Any] = {}
        if "type" in d:
            kw["type"] = _choice(d["type"], p("type"), PRESET_TYPES, case_insensitive=True)
        if "description" in d:
            desc = d["description"]
            kw["description"] = "" if desc is None else str(desc)
        for name in ("use_rearrange", "use_sim_mask", "verbose", "use_pooled_tail"):
            if name in d:
                kw[name] = _as_bool(d[name], p(name))
        if "block_size" in d:
            bs = _mapping(d["block_size"], p("block_size"))
            _no_unknown_keys(bs, ("m", "n", "tile_n"), p("block_size"))
            default = BlockSize()
            m = _as_int(bs.get("m", default.m), p("block_size.m"))
            n = _as_int(bs.get("n", default.n), p("block_size.n"))
            tile_n = _as_int(bs.get("tile_n", min(default.tile_n, n)), p("block_size.tile_n"))
            kw["block_size"] = BlockSize(m=m, n=n, tile_n=tile_n)
        if "mask_ratios" in d:
            kw["mask_ratios"] = _parse_mask_ratios(d["mask_ratios"], p("mask_ratios"))
        if "mask_mode" in d:
            kw["mask_mode"] = _choice(d["mask_mode"], p("mask_mode"), MASK_MODES, case_insensitive=True)
        if "attn_impl" in d:
            kw["attn_impl"] = _choice(d["attn_impl"], p("attn_impl"), ATTN_IMPLS, case_insensitive=True)
        if "tile_size" in d:
            ts = d["tile_size"]
            if not isinstance(ts, (list, tuple)) or len(ts) != 3:
                _fail(p("tile_size"), f"got {ts!r}; allowed: a list of 3 positive integers [depth, height, width]")
            kw["tile_size"] = tuple(_as_int(x, p(f"tile_size[{i}]"), 1) for i, x in enumerate(ts))
        if "warmup_steps" in d:
            kw["warmup_steps"] = _as_int(d["warmup_steps"], p("warmup_steps"), 0)
        if "estimate_method" in d:
            kw["estimate_method"] = _choice(d["estimate_method"], p("estimate_method"), ESTIMATE_METHODS,
                                            case_insensitive=True)
        if "rearrange_method" in d:
            kw["rearrange_method"] = _choice(d["rearrange_method"], p("rearrange_method"),
                                             REARRANGE_METHODS, case_insensitive=True)
        if "sim_thresholds" in d:
            st = _mapping(d["sim_thresholds"], p("sim_thresholds"))
            _no_unknown_keys(st, ("x2", "x4", "x8"), p("sim_thresholds"))
            default = SimThresholds()
            kw["sim_thresholds"] = SimThresholds(**{
                k: _as_float(st.get(k, getattr(default, k)), p(f"sim_thresholds.{k}"), -1.0, 1.0)
                for k in ("x2", "x4", "x8")})
        kw["given"] = frozenset(k for k in d if k in _PRESET_FIELDS)
        try:
            return cls(**kw)
        except ConfigError as e:
            # __post_init__ messages name the field without the prefix; add it.
            raise ConfigError(f"{where}.{e}" if where else str(e)) from None

    def _validate_self(self) -> None:
        bs = self.block_size
        _choice(self.type, "type", PRESET_TYPES)
        if bs.m not in BLOCK_SIZES_M:
            _fail("block_size.m", f"got {bs.m}; allowed: {', '.join(map(str, BLOCK_SIZES_M))}")
        if bs.n not in BLOCK_SIZES_N:
            _fail("block_size.n", f"got {bs.n}; allowed: {', '.join(map(str, BLOCK_SIZES_N))}")
        if bs.tile_n not in TILE_N_SIZES or bs.tile_n > bs.n:
            allowed = [t for t in TILE_N_SIZES if t <= bs.n]
            _fail("block_size.tile_n", f"got {bs.tile_n}; allowed with n={bs.n}: {', '.join(map(str, allowed))}")
        _parse_mask_ratios(self.mask_ratios, "mask_ratios")
        _choice(self.mask_mode, "mask_mode", MASK_MODES)
        _choice(self.attn_impl, "attn_impl", ATTN_IMPLS)
        _choice(self.rearrange_method, "rearrange_method", REARRANGE_METHODS)
        _choice(self.estimate_method, "estimate_method", ESTIMATE_METHODS)
        if len(self.tile_size) != 3 or any(int(t) < 1 for t in self.tile_size):
            _fail("tile_size", f"got {list(self.tile_size)!r}; allowed: 3 positive integers [depth, height, width]")
        if self.warmup_steps < 0:
            _fail("warmup_steps", f"got {self.warmup_steps}; allowed: an integer >= 0")

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
        }
        if self.is_dense:
            keep = set(self.given) | {"type"}
            return {k: v for k, v in full.items() if k in keep}
        return full

    def replace(self, **changes) -> "PSAConfig":
        """A copy with some fields changed (validated); changed fields count as given."""
        given = self.given | frozenset(changes)
        return dataclasses.replace(self, given=given, **changes)

    def level_ranges(self) -> list[tuple[int, float, float]]:
        """``(level, lo, hi)`` in level order 1, 2, 4, 8, 0, absent levels left out."""
        return [(lvl, *self.mask_ratios[lvl]) for lvl in LEVELS if lvl in self.mask_ratios]


def _parse_mask_ratios(value: Any, where: str) -> dict:
    """Levels -> (lo, hi); the ranges must join end to end from 0 to 1 in level order 1, 2, 4, 8, 0."""
    value = _mapping(value, where)
    out: dict[int, tuple[float, float]] = {}
    for key, rng in value.items():
        try:
            lvl = int(key)
        except (TypeError, ValueError):
            lvl = None
        if lvl not in LEVELS or isinstance(key, bool) or (isinstance(key, float) and key != lvl):
            _fail(f"{where}.{key}", f"unknown level {key!r}; allowed levels: 1, 2, 4, 8, 0")
        if lvl in out:
            _fail(f"{where}.{key}", f"level {lvl} is given twice")
        if not isinstance(rng, (list, tuple)) or len(rng) != 2:
            _fail(f"{where}.{lvl}", f"got {rng!r}; allowed: a range [lo, hi] with 0 <= lo <= hi <= 1")
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
    return {lvl: out[lvl] for lvl in LEVELS if lvl in out}


# ---------------------------------------------------------------------- model sections
@dataclass(frozen=True)
class VideoScale:
    """Divisors from pixel size to token grid (VAE stride x patch size)."""
    width_divisor: int = 16
    height_divisor: int = 16
    depth_divisor: int = 4


_MODEL_FIELDS = ("default_attention", "video_scale", "text_length", "attention_configs")


@dataclass(frozen=True)
class ModelConfig:
    """One model section of attention_config.yaml."""
    name: str
    default_attention: str
    video_scale: VideoScale = VideoScale()
    text_length: int = 0
    attention_configs: dict = field(default_factory=dict)  # name -> PSAConfig

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "ModelConfig":
        d = _mapping(d, name)
        _no_unknown_keys(d, _MODEL_FIELDS, name)
        presets_raw = _mapping(d.get("attention_configs") or {}, f"{name}.attention_configs")
        presets = {str(k): PSAConfig.from_dict(v, f"{name}.attention_configs.{k}")
                   for k, v in presets_raw.items()}
        if not presets:
            _fail(f"{name}.attention_configs", "no presets; add at least one preset")
        default = d.get("default_attention", next(iter(presets)))
        if default not in presets:
            _fail(f"{name}.default_attention",
                  f"got {default!r}; allowed: one of this section's presets: {', '.join(presets)}")
        vs_raw = _mapping(d.get("video_scale") or {}, f"{name}.video_scale")
        _no_unknown_keys(vs_raw, ("width_divisor", "height_divisor", "depth_divisor"), f"{name}.video_scale")
        vs_default = VideoScale()
        vs = VideoScale(**{k: _as_int(vs_raw.get(k, getattr(vs_default, k)), f"{name}.video_scale.{k}", 1)
                           for k in ("width_divisor", "height_divisor", "depth_divisor")})
        text_length = _as_int(d.get("text_length", 0), f"{name}.text_length", 0)
        return cls(name=name, default_attention=default, video_scale=vs,
                   text_length=text_length, attention_configs=presets)

    def to_dict(self) -> dict:
        return {
            "default_attention": self.default_attention,
            "video_scale": dataclasses.asdict(self.video_scale),
            "text_length": self.text_length,
            "attention_configs": {k: v.to_dict() for k, v in self.attention_configs.items()},
        }

    def preset(self, name: str | None = None) -> PSAConfig:
        name = name or self.default_attention
        if name not in self.attention_configs:
            _fail(f"{self.name}.attention_configs",
                  f"unknown preset {name!r}; allowed: {', '.join(self.attention_configs)}")
        return self.attention_configs[name]


def parse_attention_config(data: Any, source: str = "attention_config.yaml") -> dict[str, ModelConfig]:
    """Model sections from an already-parsed YAML document."""
    if data is None:
        return {}
    data = _mapping(data, source)
    return {str(name): ModelConfig.from_dict(str(name), section) for name, section in data.items()}


def read_yaml(path: str | Path, missing_ok: bool = False) -> Any:
    """Parsed YAML of a file (None when empty, or missing with ``missing_ok``).

    Raises ConfigError naming the file, and the line for YAML syntax errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"{path}: cannot read: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}{at}: malformed YAML: {problem}") from None


def load_attention_config(path: str | Path) -> dict[str, ModelConfig]:
    """Load a whole attention_config.yaml into ``{section name: ModelConfig}``.

    Raises ConfigError naming the file (and line, for YAML syntax errors) or the field.
    """
    data = read_yaml(path)
    try:
        return parse_attention_config(data, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
