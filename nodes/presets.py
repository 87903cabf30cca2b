"""Preset store: the shipped configs/attention_config.yaml with the user presets file merged over it.

The shipped file is the seed's way to add presets (edit it, restart ComfyUI). Presets saved
from the graph go to a separate user file outside the pack folder, so that updating the pack
never overwrites them and a broken user file never hides a shipped preset. Both files use the
same schema; a user section may hold only the presets (and model-level fields) it changes.

Loading never raises: whatever a file holds, each problem becomes a :class:`PresetProblem`
(file, line, field, message) in ``PresetLibrary.problems`` and everything else still loads, so
the nodes always register. Saving is serialised by a lock file beside the user file and
re-reads the file under the lock, so concurrent saves of different names all survive.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import yaml

from ..psa_kernels.config import ConfigError, ModelConfig, PSAConfig, VideoScale, show
from ..psa_kernels.yaml_file import YamlDocument, parse_yaml_text, read_yaml_document

log = logging.getLogger("psa")

SHIPPED_FILE = Path(__file__).resolve().parent.parent / "configs" / "attention_config.yaml"
USER_FILE_ENV = "PSA_USER_PRESETS"
DEFAULT_PRESET = "default"  # the Loader's choice meaning "the section's default_attention"
LOCK_TIMEOUT_S = 30.0
_NAME_RE = re.compile(r"[^\W_][\w.+-]{0,127}")  # letters of any script, digits, _ . + -


@dataclass(frozen=True)
class PresetProblem:
    """One problem found while loading a presets file; everything else in the file still loaded.

    ``file``: the presets file ("" when no file is to blame); ``line``: 1-based line in it, None
    when unknown; ``field``: dotted path of the value (``"Wan2.1_14b.attention_configs.fast
    .block_size.m"``), "" when the whole file is at fault; ``message``: what was found and what is
    allowed. ``str()`` gives the one-line form the log and the Loader's description show."""
    file: str
    line: int | None
    field: str
    message: str

    @classmethod
    def from_error(cls, error: ConfigError) -> "PresetProblem":
        return cls(str(error.file or ""), error.line, error.field, error.reason)

    def __str__(self) -> str:
        return str(ConfigError(self.message, self.field, self.file or None, self.line))


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
        return f"# section: {self.section or '-'}\n{dump_yaml({self.name: self.config.to_dict()})}"


@dataclass
class PresetLibrary:
    """All usable presets after merging, and every problem met while reading the files."""
    sections: dict[str, ModelConfig] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)  # (section, preset) -> file
    problems: list[PresetProblem] = field(default_factory=list)

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
            raise ConfigError(f"unknown section {show(section)}; allowed: "
                              f"{', '.join(self.sections) or '(none loaded)'}{self._problem_note()}", "model_section")
        mc = self.sections[section]
        name = mc.default_attention if preset == DEFAULT_PRESET else preset
        if name not in mc.attention_configs:
            raise ConfigError(f"{show(preset)} is not a preset of section {section!r}; allowed: "
                              f"{DEFAULT_PRESET}, {', '.join(mc.attention_configs)}{self._problem_note()}", "preset")
        return PSAPreset(section=section, name=name, config=mc.attention_configs[name],
                         text_length=mc.text_length, video_scale=mc.video_scale)

    def _problem_note(self) -> str:
        if not self.problems:
            return ""
        return " (some presets could not be loaded: " + "; ".join(map(str, self.problems)) + ")"


def user_presets_path() -> Path | None:
    """Where graph-saved presets live: $PSA_USER_PRESETS (``~`` expanded), else ComfyUI's user directory."""
    env = os.environ.get(USER_FILE_ENV)
    if env:
        return Path(os.path.expanduser(env))
    try:
        import folder_paths  # ComfyUI's module; absent when the pack is used outside ComfyUI
        return Path(folder_paths.get_user_directory()) / "default" / "psa" / "attention_presets.yaml"
    except Exception:  # noqa: BLE001 - no ComfyUI, or one without a user directory: nothing to merge
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


# ---------------------------------------------------------------------- loading
def _problem(lib: PresetLibrary, error: BaseException, doc: YamlDocument | None = None, file: Path | None = None,
             where: str = "") -> None:
    """Record ``error`` with its file and line; an unexpected exception type is recorded too."""
    if not isinstance(error, ConfigError):
        try:
            detail = str(error)
        except Exception:  # noqa: BLE001
            detail = ""
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        error = ConfigError(f"could not be read ({type(error).__name__}{': ' + detail if detail else ''})", where)
    if doc is not None:
        error = doc.locate(error)
    elif file is not None:
        error = error.located(file=str(file))
    lib.problems.append(PresetProblem.from_error(error))


def _read(lib: PresetLibrary, path: Path) -> YamlDocument | None:
    try:
        doc = read_yaml_document(path)
    except Exception as e:  # noqa: BLE001 - a file that cannot be used is a recorded problem, never a crash
        _problem(lib, e, file=path)
        return None
    if doc is None:
        return None
    for problem in doc.lossy:
        _problem(lib, problem)
    if doc.data is not None and not isinstance(doc.data, dict):
        _problem(lib, ConfigError(f"got {show(doc.data)}; allowed: a mapping of model section names to "
                                  "sections"), doc)
        return None
    return doc


def _collect(lib: PresetLibrary, docs: list[YamlDocument]) -> dict[str, dict]:
    """Candidates per section, in file order (the user file's come last and win when valid):
    ``{section: {"docs": [...], "presets": {name: [(doc, raw)]}, "fields": {key: [(doc, raw)]}}}``."""
    raw: dict[str, dict] = {}
    for doc in docs:
        for sname, section in (doc.data or {}).items():
            sname = str(sname)
            try:
                if not isinstance(section, dict):
                    raise ConfigError(f"got {show(section)}; allowed: a mapping", sname)
                merged = raw.setdefault(sname, {"docs": [], "presets": {}, "fields": {}})
                merged["docs"].append(doc)
                for key, value in section.items():
                    if key != "attention_configs":
                        merged["fields"].setdefault(str(key), []).append((doc, value))
                    elif not isinstance(value, dict):
                        raise ConfigError(f"got {show(value)}; allowed: a mapping of preset names to presets",
                                          f"{sname}.attention_configs")
                    else:
                        for pname, preset in value.items():
                            merged["presets"].setdefault(str(pname), []).append((doc, preset))
            except Exception as e:  # noqa: BLE001
                _problem(lib, e, doc, where=sname)
    return raw


def _build_section(lib: PresetLibrary, sname: str, merged: dict) -> None:
    presets = {}
    for pname, candidates in merged["presets"].items():
        for doc, preset in reversed(candidates):
            where = f"{sname}.attention_configs.{pname}"
            try:
                PSAConfig.from_dict(preset, where)
            except Exception as e:  # noqa: BLE001
                _problem(lib, e, doc, where=where)
                continue
            presets[pname] = preset
            lib.origin[(sname, pname)] = doc.source
            break
    fields = {k: list(v) for k, v in merged["fields"].items()}
    while True:
        try:
            lib.sections[sname] = ModelConfig.from_dict(
                sname, {**{k: v[-1][1] for k, v in fields.items()}, "attention_configs": presets})
            return
        except Exception as e:  # noqa: BLE001
            err_field = getattr(e, "field", "")
            bad = next((k for k in fields if err_field == f"{sname}.{k}" or err_field.startswith(f"{sname}.{k}.")),
                       None)
            if bad is None:  # not one field's fault (e.g. no valid preset): the section is left out
                _problem(lib, e, merged["docs"][-1], where=sname)
                return
            _problem(lib, e, fields[bad][-1][0], where=f"{sname}.{bad}")
            fields[bad].pop()
            if not fields[bad]:
                del fields[bad]


def load_library(shipped: Path, user: Path | None) -> PresetLibrary:
    """Merge ``user`` over ``shipped``, keeping every preset that is valid on its own.

    A bad preset or section field in the user file falls back to the shipped one of the same
    name; a bad one with nothing under it is dropped alone; a file that cannot be parsed drops
    only that file. Every drop is recorded in ``problems``; nothing here raises.
    """
    lib = PresetLibrary()
    files = [shipped] + ([user] if user is not None and not _same_file(user, shipped) else [])
    _merge(lib, [doc for doc in (_read(lib, Path(p)) for p in files) if doc is not None])
    return lib


def _merge(lib: PresetLibrary, docs: list[YamlDocument]) -> None:
    for sname, merged in _collect(lib, docs).items():
        try:
            _build_section(lib, sname, merged)
        except Exception as e:  # noqa: BLE001 - one section's surprise never costs the others
            _problem(lib, e, merged["docs"][-1], where=sname)


def _stamp(path: Path | None) -> tuple:
    try:
        st = path.stat() if path is not None else None
    except (OSError, ValueError):
        st = None
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino) if st else (str(path), None, None, None)


# ---------------------------------------------------------------------- saving
class _PresetDumper(yaml.SafeDumper):
    """Writes text with line separators, control or format characters double-quoted and
    escaped: other styles fold U+0085, U+2028 and U+2029 into line breaks that read back as
    spaces, so the preset would change on the way through the file."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = None if value.isprintable() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_PresetDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML text of ``data`` that reads back equal (see :class:`_PresetDumper`)."""
    return yaml.dump(data, Dumper=_PresetDumper, sort_keys=False, allow_unicode=True)


def _cannot_save(reason: str) -> ConfigError:
    return ConfigError(f"cannot save: {reason}")


def _save_target(path: Path, shipped: Path) -> Path:
    """The file a save writes: ``path``, or the file a symlink there points to (the link is kept)."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.exists():
            raise _cannot_save(f"{path} is a symlink to {target}, which does not exist; allowed: a link to an "
                              "existing file, or a plain file path. Nothing was written.")
        path = target
    if _same_file(path, shipped):
        raise _cannot_save(f"{path} is the shipped presets file, which updates of the pack replace; allowed: a "
                          f"user presets file of your own ({USER_FILE_ENV}). Nothing was written.")
    return path


def _existing_stat(path: Path) -> os.stat_result | None:
    """The user file's stat, or None when there is none yet; refuses a file a save would lose."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise _cannot_save(f"{path} is not a regular file (a directory, FIFO or device); allowed: a YAML file. "
                          "Nothing was written.")
    if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
        raise _cannot_save(f"{path} is read-only; allowed: a writable file (make it writable, or set "
                          f"{USER_FILE_ENV} to another file). Nothing was written.")
    if st.st_nlink > 1:
        raise _cannot_save(f"{path} has {st.st_nlink} hard links, which replacing it would split; allowed: a file "
                          "with one name (or a symlink). Nothing was written.")
    return st


def _temp_re(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{12}}\.tmp")


def _remove_stale_temps(target: Path) -> None:
    """Temp files of saves that were killed mid-write (under the lock no other save has one)."""
    pattern = _temp_re(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if pattern.fullmatch(name):
            try:
                os.unlink(target.parent / name)
            except OSError:
                pass


def _atomic_write(target: Path, text: str, st: os.stat_result | None) -> None:
    """Replace ``target`` in one step so that a crash never leaves half a presets file; the
    file keeps its permissions (and owner where allowed); a new one gets the umask's."""
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            if hasattr(os, "chown"):
                try:
                    os.chown(tmp, st.st_uid, st.st_gid)
                except OSError:
                    pass
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class PresetStore:
    """Cached :func:`load_library`, re-read whenever either file changes on disk.

    For the UI: :meth:`library` never raises, and ``library().problems`` lists every
    :class:`PresetProblem` found while loading."""

    def __init__(self, shipped: Path = SHIPPED_FILE, user: Path | None = None, user_from_env: bool = True):
        self.shipped = Path(shipped)
        self._user = Path(os.path.expanduser(user)) if user is not None else None
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
            try:
                lib = load_library(self.shipped, self.user)
            except Exception as e:  # noqa: BLE001 - the nodes must register whatever happens
                lib = PresetLibrary()
                _problem(lib, e)
            for problem in lib.problems:
                log.error("[PSA] preset file problem, the rest still loads: %s", problem)
            self._cache = (stamp, lib)
        return self._cache[1]

    def problems(self) -> list[PresetProblem]:
        """Every problem found while loading the presets files (empty when all is well)."""
        return list(self.library().problems)

    def save(self, section: str, name: str, config: PSAConfig, overwrite: bool) -> str:
        """Write ``config`` as preset ``name`` of ``section`` into the user file.

        Returns "saved", "overwritten" or "unchanged" (the same preset is already there, so a
        workflow that saves on every run does not need overwrite). Never touches the shipped
        file; refuses, writing nothing, where a save would lose what the user has there.
        """
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == DEFAULT_PRESET:
            raise ConfigError(f"got {show(name)}; allowed: up to 128 letters (any script), digits and _ . + - "
                              f"(starting with a letter or digit), not {DEFAULT_PRESET!r}", "save_name")
        if not isinstance(config, PSAConfig):
            raise ConfigError(f"got {type(config).__name__}; allowed: a PSAConfig", "psa_config")
        path = self.user
        if path is None:
            raise _cannot_save(f"no user presets location; set {USER_FILE_ENV} to a file path")
        target = _save_target(path, self.shipped)
        lock_path = target.parent / f".{target.name}.lock"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with filelock.FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S):
                return self._save_locked(target, section, name, config, overwrite)
        except filelock.Timeout:
            raise _cannot_save(f"another save has held {lock_path} for {LOCK_TIMEOUT_S:.0f} s; "
                               "nothing was written") from None
        except OSError as e:
            raise _cannot_save(f"{target}: {e.strerror or e}; nothing was written") from None
        finally:
            self._cache = None

    def _save_locked(self, target: Path, section: str, name: str, config: PSAConfig, overwrite: bool) -> str:
        _remove_stale_temps(target)
        st = _existing_stat(target)
        try:
            doc = read_yaml_document(target)
        except ConfigError as e:
            raise _cannot_save(f"{e}. Fix or move that file; nothing was written.") from None
        if doc is not None and doc.lossy:
            raise _cannot_save(f"{doc.lossy[0]}. Saving would rewrite those bytes: save the file as UTF-8; "
                               "nothing was written.")
        data = doc.data if doc is not None and doc.data is not None else {}
        if not isinstance(data, dict):
            raise _cannot_save(f"{target}: the top level is not a mapping of sections. Fix it; nothing was written.")
        # The merged presets as they are now on disk, read under the lock: a save that finished
        # a moment ago by another process or thread counts.
        lib = PresetLibrary()
        shipped = _read(lib, self.shipped)
        _merge(lib, [d for d in (shipped, doc) if d is not None and isinstance(d.data, dict)])
        if section not in lib.sections:
            raise ConfigError(f"unknown section {show(section)}; allowed: {', '.join(lib.sections)}", "save_section")
        existing = lib.sections[section].attention_configs.get(name)
        status = "saved"
        if existing is not None:
            if existing == config:
                return "unchanged"
            if not overwrite:
                raise ConfigError(
                    f"preset {name!r} already exists in section {section!r} "
                    f"({lib.origin.get((section, name), 'presets file')}); turn on overwrite to replace "
                    "it, or choose another name. Nothing was written.", "save_name")
            status = "overwritten"
        section_raw = data.get(section)
        if section_raw is None:
            section_raw = data[section] = {}
        if not isinstance(section_raw, dict):
            raise _cannot_save(f"{target}: {section} is not a mapping. Fix it; nothing was written.")
        presets = section_raw.get("attention_configs")
        if presets is None:
            presets = section_raw["attention_configs"] = {}
        if not isinstance(presets, dict):
            raise _cannot_save(f"{target}: {section}.attention_configs is not a mapping. Fix it; nothing was "
                              "written.")
        presets[name] = config.to_dict()
        # The dumper writes a value the same way wherever it sits, so the preset alone tells
        # whether it reads back as it is.
        written = parse_yaml_text(dump_yaml({name: presets[name]}), str(target)).data[name]
        if PSAConfig.from_dict(written).to_dict() != config.to_dict():
            raise _cannot_save(f"preset {name!r} would not read back as it is; nothing was written")
        _atomic_write(target, dump_yaml(data), st)
        return status
