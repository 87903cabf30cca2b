"""Preset store: the shipped configs/attention_config.yaml with the user presets file merged over it.

The shipped file is the seed's way to add presets (edit it, restart ComfyUI). Presets saved
from the graph go to a separate user file outside the pack folder, so that updating the pack
never overwrites them and a broken user file never hides a shipped preset. Both files use the
same schema; a user section may hold only the presets (and model-level fields) it changes.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..psa_kernels.config import ConfigError, ModelConfig, PSAConfig, VideoScale, read_yaml

log = logging.getLogger("psa")

SHIPPED_FILE = Path(__file__).resolve().parent.parent / "configs" / "attention_config.yaml"
USER_FILE_ENV = "PSA_USER_PRESETS"
DEFAULT_PRESET = "default"  # the Loader's choice meaning "the section's default_attention"
_NAME_RE = re.compile(r"^[^\W_][\w.+-]*$")  # letters of any script, digits, _ . + -


@dataclass(frozen=True)
class PSAPreset:
    """What travels on a PSA_CONFIG link: the preset and where it came from."""
    section: str             # model section it belongs to ("" when built from scratch)
    name: str
    config: PSAConfig
    text_length: int = 0     # text tokens sharing the attention sequence (0 for Wan)
    video_scale: VideoScale = VideoScale()

    def __str__(self) -> str:
        # What ComfyUI's "Preview Any" node shows: the preset as it would read in the YAML file.
        body = yaml.safe_dump({self.name: self.config.to_dict()}, sort_keys=False, allow_unicode=True)
        return f"# section: {self.section or '-'}\n{body}"


@dataclass
class PresetLibrary:
    """All usable presets after merging, and every problem met while reading the files."""
    sections: dict[str, ModelConfig] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, preset) -> file
    problems: list[str] = field(default_factory=list)

    def section_names(self) -> list[str]:
        return list(self.sections)

    def preset_names(self) -> list[str]:
        """Every preset name of every section, first appearance first (a combo lists them all)."""
        names: dict[str, None] = {}
        for section in self.sections.values():
            names.update(dict.fromkeys(section.attention_configs))
        return list(names)

    def resolve(self, section: str, preset: str) -> PSAPreset:
        """The preset ``preset`` of ``section``; ``"default"`` picks the section's default_attention."""
        if section not in self.sections:
            raise ConfigError(f"model_section: unknown section {section!r}; allowed: "
                              f"{', '.join(self.sections) or '(none loaded)'}{self._problem_note()}")
        mc = self.sections[section]
        name = mc.default_attention if preset == DEFAULT_PRESET else preset
        if name not in mc.attention_configs:
            raise ConfigError(f"preset: {preset!r} is not a preset of section {section!r}; allowed: "
                              f"{DEFAULT_PRESET}, {', '.join(mc.attention_configs)}{self._problem_note()}")
        return PSAPreset(section=section, name=name, config=mc.attention_configs[name],
                         text_length=mc.text_length, video_scale=mc.video_scale)

    def _problem_note(self) -> str:
        if not self.problems:
            return ""
        return " (some presets could not be loaded: " + "; ".join(self.problems) + ")"


def user_presets_path() -> Path | None:
    """Where graph-saved presets live: $PSA_USER_PRESETS, else ComfyUI's user directory."""
    env = os.environ.get(USER_FILE_ENV)
    if env:
        return Path(env)
    try:
        import folder_paths  # ComfyUI's module; absent when the pack is used outside ComfyUI
    except ImportError:
        return None
    return Path(folder_paths.get_user_directory()) / "default" / "psa" / "attention_presets.yaml"


def _read_yaml(path: Path) -> Any:
    """Parsed YAML of ``path`` (None when missing or empty); ConfigError naming the line otherwise."""
    data = read_yaml(path, missing_ok=True)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must map model section names to sections; "
                          f"got {type(data).__name__}")
    return data


def load_library(shipped: Path, user: Path | None) -> PresetLibrary:
    """Merge ``user`` over ``shipped``, keeping every preset that is valid on its own.

    A bad preset or section field in the user file falls back to the shipped one of the same
    name; a bad one with nothing under it is dropped alone; a file that is not YAML at all
    drops only that file. Every drop is recorded in ``problems``.
    """
    lib = PresetLibrary()
    # section -> {"presets": {name: [(file, raw), ...]}, "fields": {key: [(file, raw), ...]}},
    # candidates in file order: the user file's come last and win when valid.
    raw: dict[str, dict[str, dict[str, list]]] = {}
    for path in (shipped, user):
        if path is None:
            continue
        try:
            data = _read_yaml(path)
        except ConfigError as e:
            lib.problems.append(str(e))
            continue
        for sname, section in (data or {}).items():
            sname = str(sname)
            if not isinstance(section, dict):
                lib.problems.append(f"{path}: {sname}: got {section!r}; allowed: a mapping")
                continue
            merged = raw.setdefault(sname, {"presets": {}, "fields": {}})
            for key, value in section.items():
                if key != "attention_configs":
                    merged["fields"].setdefault(key, []).append((path, value))
                elif not isinstance(value, dict):
                    lib.problems.append(f"{path}: {sname}.attention_configs: got {value!r}; "
                                        "allowed: a mapping of preset names to presets")
                else:
                    for pname, preset in value.items():
                        merged["presets"].setdefault(str(pname), []).append((path, preset))
    for sname, merged in raw.items():
        presets = {}
        for pname, candidates in merged["presets"].items():
            for path, preset in reversed(candidates):
                try:
                    PSAConfig.from_dict(preset, f"{sname}.attention_configs.{pname}")
                except ConfigError as e:
                    lib.problems.append(f"{path}: {e}")
                    continue
                presets[pname] = preset
                lib.origin[(sname, pname)] = str(path)
                break
        fields = {k: list(v) for k, v in merged["fields"].items()}
        while True:
            try:
                lib.sections[sname] = ModelConfig.from_dict(
                    sname, {**{k: v[-1][1] for k, v in fields.items()}, "attention_configs": presets})
                break
            except ConfigError as e:
                bad = next((k for k in fields if str(e).startswith(f"{sname}.{k}")), None)
                if bad is None:  # not a field's fault (e.g. no valid preset): skip the section
                    lib.problems.append(str(e))
                    break
                lib.problems.append(f"{fields[bad][-1][0]}: {e}")
                fields[bad].pop()
                if not fields[bad]:
                    del fields[bad]
    return lib


def _stamp(path: Path | None) -> tuple:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        st = None
    return (str(path), st.st_mtime_ns, st.st_size) if st else (str(path), None, None)


class PresetStore:
    """Cached :func:`load_library`, re-read whenever either file changes on disk."""

    def __init__(self, shipped: Path = SHIPPED_FILE, user: Path | None = None, user_from_env: bool = True):
        self.shipped = shipped
        self._user = user
        self._user_from_env = user_from_env and user is None
        self._cache: tuple[tuple, PresetLibrary] | None = None

    @property
    def user(self) -> Path | None:
        return user_presets_path() if self._user_from_env else self._user

    def stamp(self) -> tuple:
        """Changes whenever the presets on disk change (the Loader's cache key)."""
        return _stamp(self.shipped) + _stamp(self.user)

    def library(self) -> PresetLibrary:
        stamp = self.stamp()
        if self._cache is None or self._cache[0] != stamp:
            lib = load_library(self.shipped, self.user)
            for problem in lib.problems:
                log.error("[PSA] preset file problem, the rest still loads: %s", problem)
            self._cache = (stamp, lib)
        return self._cache[1]

    def save(self, section: str, name: str, config: PSAConfig, overwrite: bool) -> str:
        """Write ``config`` as preset ``name`` of ``section`` into the user file.

        Returns "saved", "overwritten" or "unchanged" (the same preset is already there, so a
        workflow that saves on every run does not need overwrite). Never touches the shipped file.
        """
        lib = self.library()
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == DEFAULT_PRESET:
            raise ConfigError(f"save_name: got {name!r}; allowed: letters (any script), digits and _ . + - "
                              f"(starting with a letter or digit), not {DEFAULT_PRESET!r}")
        if section not in lib.sections:
            raise ConfigError(f"save_section: unknown section {section!r}; allowed: {', '.join(lib.sections)}")
        existing = lib.sections[section].attention_configs.get(name)
        status = "saved"
        if existing is not None:
            if existing == config:
                return "unchanged"
            if not overwrite:
                raise ConfigError(
                    f"save_name: preset {name!r} already exists in section {section!r} "
                    f"({lib.origin.get((section, name), 'presets file')}); turn on overwrite to replace "
                    "it, or choose another name. Nothing was written.")
            status = "overwritten"
        path = self.user
        if path is None:
            raise ConfigError(f"cannot save: no user presets location; set {USER_FILE_ENV} to a file path")
        try:
            data = _read_yaml(path) or {}
        except ConfigError as e:
            raise ConfigError(f"cannot save: {e}. Fix or move that file; nothing was written.") from None
        section_raw = data.setdefault(section, {})
        if not isinstance(section_raw, dict):
            raise ConfigError(f"cannot save: {path}: {section} is not a mapping. Fix it; nothing was written.")
        presets = section_raw.get("attention_configs")
        if not isinstance(presets, dict):
            presets = section_raw["attention_configs"] = {}
        presets[name] = config.to_dict()
        _atomic_write(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return status


def _atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` in one step so that a crash never leaves half a presets file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
