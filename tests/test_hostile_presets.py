"""The preset store against hostile files: loading never raises and records every problem with
its file, line and field, the rest still loads; saving refuses where it would lose what the
user has, and keeps what it can (symlinks, permissions, the shipped file)."""
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from pack_import import REPO, pack_module

presets = pack_module("nodes.presets")
config = pack_module("psa_kernels.config")
yaml_file = pack_module("psa_kernels.yaml_file")
ConfigError, PSAConfig = config.ConfigError, config.PSAConfig
SHIPPED = presets.SHIPPED_FILE
SECTION = "Wan2.1_1.3b"
GOOD = "    good: {type: psa, mask_mode: topk, warmup_steps: 2}\n"


def user_file(tmp_path, body) -> Path:
    path = tmp_path / "user" / "attention_presets.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    return path


def load(path):
    return presets.PresetStore(shipped=SHIPPED, user=path).library()


@pytest.fixture(scope="module")
def shipped_sections():
    return {k: v.attention_configs for k, v in load(None).sections.items()}


def _shipped_kept(lib, shipped_sections):
    for name, shipped in shipped_sections.items():
        for pname, preset in shipped.items():
            assert pname in lib.sections[name].attention_configs, (name, pname)


# (id, user file text, field of the recorded problem, line, words of the message);
# every file also holds a good preset, which must still load.
BAD_VALUES = [
    ("warmup .inf", f"{SECTION}:\n  attention_configs:\n    x: {{warmup_steps: .inf}}\n{GOOD}",
     f"{SECTION}.attention_configs.x.warmup_steps", 3, ["inf", "[0, 10000]"]),
    ("5000-digit integer", f"{SECTION}:\n  attention_configs:\n    x:\n      warmup_steps: {'9' * 5000}\n{GOOD}",
     f"{SECTION}.attention_configs.x.warmup_steps", 4, ["999", "an integer"]),
    ("huge hex integer", f"{SECTION}:\n  attention_configs:\n    x: {{warmup_steps: 0x{'f' * 20000}}}\n{GOOD}",
     f"{SECTION}.attention_configs.x.warmup_steps", 3, ["0xfff", "an integer"]),
    ("default_attention a list", f"{SECTION}:\n  default_attention: [a]\n  attention_configs:\n{GOOD}",
     f"{SECTION}.default_attention", 2, ["['a']", "psa_topk"]),
    ("text_length .nan", f"{SECTION}:\n  text_length: .nan\n  attention_configs:\n{GOOD}",
     f"{SECTION}.text_length", 2, ["nan", "[0, 65536]"]),
    ("tile_size 1e30", f"{SECTION}:\n  attention_configs:\n    x: {{tile_size: [1.0e+30, 8, 8]}}\n{GOOD}",
     f"{SECTION}.attention_configs.x.tile_size[0]", 3, ["1e+30", "[1, 1024]"]),
    ("impossible date as a number", f"{SECTION}:\n  attention_configs:\n    x: {{warmup_steps: 2020-13-45}}\n{GOOD}",
     f"{SECTION}.attention_configs.x.warmup_steps", 3, ["2020-13-45"]),
    ("level key inf", f"{SECTION}:\n  attention_configs:\n    x:\n      mask_ratios: {{.inf: [0.0, 1.0]}}\n{GOOD}",
     f"{SECTION}.attention_configs.x.mask_ratios.inf", 4, ["unknown level"]),
    ("section not a mapping", f"{SECTION}: [1, 2]\nNewModel:\n  attention_configs:\n{GOOD}",
     SECTION, 1, ["[1, 2]", "a mapping"]),
    ("attention_configs a string", f"{SECTION}:\n  attention_configs: fast\nNewModel:\n  attention_configs:\n{GOOD}",
     f"{SECTION}.attention_configs", 2, ["'fast'", "a mapping of preset names"]),
    ("no valid preset",
     f"NewModel:\n  attention_configs:\n    x: {{mask_mode: fast}}\n{SECTION}:\n  attention_configs:\n{GOOD}",
     "NewModel.attention_configs.x.mask_mode", 3, ["'fast'", "thresholdbound"]),
]


@pytest.mark.parametrize("text,field,line,words", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_a_problem_with_file_line_and_field(tmp_path, shipped_sections, text, field, line, words):
    path = user_file(tmp_path, text)
    lib = load(path)
    problems = [p for p in lib.problems if p.field == field]
    assert problems, [str(p) for p in lib.problems]
    problem = problems[0]
    assert (problem.file, problem.line) == (str(path), line), str(problem)
    for word in words:
        assert word in problem.message, (word, str(problem))
    assert str(problem).startswith(f"{path} (line {line}): {field}: ")
    good = [s.attention_configs["good"] for s in lib.sections.values() if "good" in s.attention_configs]
    assert good and good[0].warmup_steps == 2 and good[0].mask_mode == "topk"
    _shipped_kept(lib, shipped_sections)


def _whole_file_cases():
    bomb = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        bomb.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb.append(f"{SECTION}:\n  attention_configs:\n    x: {{description: *i, warmup_steps: *i}}")
    bomb_text = "\n".join(bomb) + "\n"
    assert len(bomb_text.encode()) < 600
    return [
        # refused where the expansion first passes the bound, whichever anchor that is
        ("alias bomb", bomb_text.encode(), range(1, 11), ["values once its aliases are expanded"]),
        ("alias loop", f"{SECTION}: &s\n  attention_configs:\n    x: {{description: *s}}\n".encode(), 1,
         ["loop"]),
        ("20000 nested brackets", (f"{SECTION}: " + "[" * 20000 + "]" * 20000 + "\n").encode(), 1,
         ["nest"]),
        ("malformed", f"{SECTION}:\n  attention_configs:\n    x: {{type: psa\n".encode(), 4, ["malformed YAML"]),
        ("NUL byte", f"{SECTION}:\n  attention_configs:\n    x: {{description: a\0b}}\n".encode(), 3,
         ["U+0000", "not allowed"]),
        ("top level a list", b"- 1\n- 2\n", None, ["a mapping of model section names"]),
        ("two documents", f"{SECTION}: {{}}\n---\n{SECTION}: {{}}\n".encode(), 2, ["malformed YAML"]),
        ("python tag", b"x: !!python/object/apply:os.system ['echo hi']\n", 1, ["malformed YAML"]),
        ("over the size limit", b"# " + b"x" * yaml_file.MAX_FILE_BYTES + b"\n", None, ["bytes; allowed: at most"]),
    ]


WHOLE_FILE = _whole_file_cases()


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_loader(request, monkeypatch):
    """Both parsers: libyaml's where PyYAML has it, and the pure-Python one of installs without it."""
    if request.param == "pure-python":
        monkeypatch.setattr(yaml_file, "_LOADER", yaml_file._BoundedLoader)
    elif yaml_file._LOADER is yaml_file._BoundedLoader:
        pytest.skip("this PyYAML has no libyaml 0.2.5 or later: only the pure-Python parser runs here")
    return request.param


@pytest.mark.parametrize("raw,line,words", [c[1:] for c in WHOLE_FILE], ids=[c[0] for c in WHOLE_FILE])
def test_unusable_file_is_one_problem_and_the_shipped_presets_stay(tmp_path, shipped_sections, yaml_loader, raw,
                                                                   line, words):
    path = user_file(tmp_path, raw)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        lib = load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 20
    assert peak < 200 << 20, peak  # the alias bomb is refused before anything expands it
    assert len(lib.problems) == 1, [str(p) for p in lib.problems]
    problem = lib.problems[0]
    lines = line if isinstance(line, range) else [line]
    assert problem.file == str(path) and problem.line in lines, str(problem)
    for word in words:
        assert word in problem.message, (word, str(problem))
    _shipped_kept(lib, shipped_sections)
    with pytest.raises(ConfigError) as e:
        config.load_attention_config(path)
    assert e.value.file == str(path) and e.value.line in lines


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_unicode_encodings_yaml_allows_load(tmp_path, encoding):
    text = f"{SECTION}:\n  attention_configs:\n    café: {{description: 'crème brûlée 视频', warmup_steps: 3}}\n"
    lib = load(user_file(tmp_path, text.encode(encoding)))
    assert lib.problems == []
    preset = lib.sections[SECTION].attention_configs["café"]
    assert preset.description == "crème brûlée 视频" and preset.warmup_steps == 3


def test_latin1_file_loads_what_it_can_and_is_never_rewritten(tmp_path):
    raw = f"{SECTION}:\n  attention_configs:\n    mine: {{description: café, warmup_steps: 4}}\n".encode("latin-1")
    path = user_file(tmp_path, raw)
    store = presets.PresetStore(shipped=SHIPPED, user=path)
    lib = store.library()
    assert [(p.file, p.line, p.field) for p in lib.problems] == [(str(path), 3, "")]
    assert "UTF-8" in lib.problems[0].message and "0xe9" in lib.problems[0].message
    assert lib.sections[SECTION].attention_configs["mine"].warmup_steps == 4
    with pytest.raises(ConfigError, match="cannot save: .*UTF-8.*nothing was written"):
        store.save(SECTION, "other", PSAConfig(), overwrite=False)
    assert path.read_bytes() == raw


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_at_the_user_path_neither_blocks_nor_is_replaced(tmp_path):
    path = tmp_path / "presets.fifo"
    os.mkfifo(path)
    store = presets.PresetStore(shipped=SHIPPED, user=path)
    lib = store.library()  # opening a FIFO for reading would block until a writer came
    assert [(p.file, p.message) for p in lib.problems] == [(str(path), "not a regular file; allowed: a YAML file")]
    assert SECTION in lib.sections
    with pytest.raises(ConfigError, match="not a regular file"):
        store.save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert path.is_fifo()


def test_directory_at_the_user_path(tmp_path):
    path = tmp_path / "presets.yaml"
    path.mkdir()
    store = presets.PresetStore(shipped=SHIPPED, user=path)
    assert [p.file for p in store.library().problems] == [str(path)]
    with pytest.raises(ConfigError, match="not a regular file"):
        store.save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert path.is_dir()


def test_missing_shipped_file_is_a_problem_not_a_crash(tmp_path):
    lib = presets.PresetStore(shipped=tmp_path / "gone.yaml", user=None).library()
    assert lib.sections == {}
    with pytest.raises(ConfigError, match="model_section: unknown section"):
        lib.resolve(SECTION, "default")


def test_loader_never_raises_even_on_an_internal_error(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(presets, "_collect", boom)
    lib = presets.PresetStore(shipped=SHIPPED, user=None).library()
    assert len(lib.problems) == 1 and "RuntimeError: unexpected" in lib.problems[0].message


# ---------------------------------------------------------------------- saving
def store_at(path):
    return presets.PresetStore(shipped=SHIPPED, user=path)


def test_save_through_a_symlink_keeps_the_link_and_writes_its_target(tmp_path):
    target = user_file(tmp_path, f"{SECTION}:\n  attention_configs:\n{GOOD}")
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    assert store_at(link).save(SECTION, "mine", PSAConfig(warmup_steps=5), overwrite=False) == "saved"
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    saved = yaml.safe_load(target.read_text())[SECTION]["attention_configs"]
    assert saved["mine"]["warmup_steps"] == 5 and saved["good"]["warmup_steps"] == 2


def test_save_refuses_a_dangling_symlink(tmp_path):
    link = tmp_path / "link.yaml"
    link.symlink_to(tmp_path / "nowhere" / "x.yaml")
    with pytest.raises(ConfigError, match="cannot save: .*symlink to .*does not exist.*Nothing was written"):
        store_at(link).save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_save_keeps_the_file_mode(tmp_path):
    path = user_file(tmp_path, f"{SECTION}:\n  attention_configs:\n{GOOD}")
    path.chmod(0o640)
    store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(os.name == "nt", reason="POSIX umask")
def test_new_user_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "presets.yaml"
        store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_refuses_a_read_only_file(tmp_path):
    path = user_file(tmp_path, f"{SECTION}:\n  attention_configs:\n{GOOD}")
    before = path.read_bytes()
    path.chmod(0o444)
    try:
        with pytest.raises(ConfigError, match="cannot save: .*read-only.*Nothing was written"):
            store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
        assert path.read_bytes() == before
    finally:
        path.chmod(0o644)


@pytest.mark.skipif(not hasattr(os, "link"), reason="no hard links")
def test_save_refuses_to_split_hard_links(tmp_path):
    path = user_file(tmp_path, f"{SECTION}:\n  attention_configs:\n{GOOD}")
    os.link(path, tmp_path / "other-name.yaml")
    with pytest.raises(ConfigError, match="hard links"):
        store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert os.stat(path).st_nlink == 2


def test_user_file_env_pointing_at_the_shipped_file(tmp_path, monkeypatch):
    shipped = tmp_path / "attention_config.yaml"
    shipped.write_bytes(SHIPPED.read_bytes())
    monkeypatch.setenv(presets.USER_FILE_ENV, str(shipped))
    store = presets.PresetStore(shipped=shipped)
    lib = store.library()
    assert lib.problems == [] and SECTION in lib.sections
    with pytest.raises(ConfigError, match="cannot save: .*is the shipped presets file"):
        store.save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert shipped.read_bytes() == SHIPPED.read_bytes()


def test_user_file_env_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    monkeypatch.setenv(presets.USER_FILE_ENV, "~/psa/presets.yaml")
    store = presets.PresetStore(shipped=SHIPPED)
    assert store.user == tmp_path / "psa" / "presets.yaml"
    store.save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert (tmp_path / "psa" / "presets.yaml").is_file() and not Path("~").exists()


KILL_MID_WRITE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from pack_import import pack_module
presets = pack_module("nodes.presets")
config = pack_module("psa_kernels.config")
os.replace = lambda *a: os._exit(9)   # killed after the temp file is written, before it replaces the file
presets.PresetStore(user=sys.argv[2]).save("Wan2.1_1.3b", "killed", config.PSAConfig(), overwrite=False)
"""


def test_save_killed_mid_write_leaves_the_file_and_the_next_save_cleans_up(tmp_path):
    path = user_file(tmp_path, f"{SECTION}:\n  attention_configs:\n{GOOD}")
    before = path.read_bytes()
    run = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(REPO / "tests"), str(path)], timeout=120)
    assert run.returncode == 9
    leftovers = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and path.read_bytes() == before
    (path.parent / ".attention_presets.yaml.bak").write_text("a user's own backup")
    store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == [".attention_presets.yaml.bak", ".attention_presets.yaml.lock", "attention_presets.yaml"], names
    assert set(yaml.safe_load(path.read_text())[SECTION]["attention_configs"]) == {"good", "mine"}


@pytest.mark.parametrize("description", ["line\x85next", "a\u2028b\u2029c", "tab\there", " padded ", "two\n\nlines",
                                         "bom\ufeffin", "quote ' and \" both", "- looks: [like, yaml]", "#hash",
                                         "null", "1.5", "emoji 🎞", "\r\n", "\x7f\x1b[0m"])
def test_saved_preset_reads_back_equal(tmp_path, description):
    path = tmp_path / "presets.yaml"
    cfg = PSAConfig(description=description, warmup_steps=1)
    store = store_at(path)
    assert store.save(SECTION, "mine", cfg, overwrite=False) == "saved"
    assert store.library().resolve(SECTION, "mine").config == cfg
    assert store.save(SECTION, "mine", cfg, overwrite=False) == "unchanged"


def test_save_keeps_the_users_other_entries_even_invalid_ones(tmp_path):
    text = (f"{SECTION}:\n  attention_configs:\n    broken: {{mask_mode: fast}}\n{GOOD}"
            "Custom:\n  text_length: 7\n  attention_configs:\n    only: {type: dense}\n")
    path = user_file(tmp_path, text)
    store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    data = yaml.safe_load(path.read_text())
    assert data[SECTION]["attention_configs"]["broken"] == {"mask_mode": "fast"}
    assert data["Custom"] == {"text_length": 7, "attention_configs": {"only": {"type": "dense"}}}


def test_save_refuses_a_section_whose_presets_are_not_a_mapping(tmp_path):
    path = user_file(tmp_path, f"{SECTION}:\n  attention_configs: [a, b]\n")
    with pytest.raises(ConfigError, match="attention_configs is not a mapping.*nothing was written"):
        store_at(path).save(SECTION, "mine", PSAConfig(), overwrite=False)
    assert path.read_text() == f"{SECTION}:\n  attention_configs: [a, b]\n"


@pytest.mark.parametrize("name", ["x\n", "a" * 129, "_x", "a/b", "é\u200b", 5, None])
def test_save_name_is_checked_whole(tmp_path, name):
    with pytest.raises(ConfigError, match="save_name"):
        store_at(tmp_path / "p.yaml").save(SECTION, name, PSAConfig(), overwrite=False)
    assert not (tmp_path / "p.yaml").exists()
