"""Property-based tests (Hypothesis) over configs, YAML text and bytes, editor input and
save/reload. Every test runs a fixed, bounded set of examples (``derandomize``: the seed comes
from the test's name), so CI is deterministic and fast."""
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pack_import import pack_module

config = pack_module("psa_kernels.config")
yaml_file = pack_module("psa_kernels.yaml_file")
presets = pack_module("nodes.presets")
edit = pack_module("nodes.edit")
ConfigError, PSAConfig = config.ConfigError, config.PSAConfig
SHIPPED = presets.SHIPPED_FILE
SECTION = "Wan2.1_1.3b"


def bounded(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------- strategies
@st.composite
def mask_ratios(draw):
    levels = [lvl for lvl in config.LEVELS if draw(st.booleans())] or [1]
    cuts = sorted(draw(st.lists(st.floats(0.0, 1.0), min_size=len(levels) - 1, max_size=len(levels) - 1)))
    edges = [0.0, *cuts, 1.0]
    return {lvl: [edges[i], edges[i + 1]] for i, lvl in enumerate(levels)}


@st.composite
def block_sizes(draw):
    n = draw(st.sampled_from(config.BLOCK_SIZES_N))
    return {"m": draw(st.sampled_from(config.BLOCK_SIZES_M)), "n": n,
            "tile_n": draw(st.sampled_from([t for t in config.TILE_N_SIZES if t <= n]))}


FIELD_VALUES = {
    "type": st.sampled_from(["psa", "dense", "PSA", "Dense"]),
    "description": st.text(max_size=60),
    "use_rearrange": st.booleans(), "use_sim_mask": st.booleans(), "verbose": st.booleans(),
    "use_pooled_tail": st.booleans(),
    "block_size": block_sizes(),
    "mask_ratios": mask_ratios(),
    "mask_mode": st.sampled_from(["topk", "thresholdbound", "TopK"]),
    "attn_impl": st.sampled_from(config.ATTN_IMPLS),
    "tile_size": st.lists(st.integers(1, config.MAX_TILE), min_size=3, max_size=3),
    "warmup_steps": st.integers(0, config.MAX_WARMUP_STEPS),
    "rearrange_method": st.sampled_from(["Gilbert", "Tiled", "tiled"]),
    "sim_thresholds": st.fixed_dictionaries({}, optional={k: st.floats(-1.0, 1.0) for k in ("x2", "x4", "x8")}),
}
valid_presets = st.fixed_dictionaries({}, optional=FIELD_VALUES)
full_presets = st.fixed_dictionaries({**FIELD_VALUES, "type": st.just("psa")})

# Whatever a YAML file can hold (file_values), and what Python code can pass besides, such as
# integers Python cannot even print (any_values).
file_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10 ** 60, 10 ** 60),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=8))


def _nested(scalars):
    keys = st.one_of(st.text(max_size=6), st.integers(-9, 9))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


file_values = _nested(file_scalars)
any_values = _nested(st.one_of(file_scalars, st.builds(lambda: 10 ** 5000)))

# Paths inside a full preset where one value is replaced.
MUTATION_PATHS = ([(k,) for k in FIELD_VALUES] + [("block_size", k) for k in ("m", "n", "tile_n")]
                  + [("sim_thresholds", k) for k in ("x2", "x4", "x8")] + [("tile_size", i) for i in range(3)]
                  + [("mask_ratios",), ("unknown_field",), ("block_size", "k")])


def _set(d: dict, path: tuple, value):
    d = json.loads(json.dumps(d))  # a deep copy with plain containers
    d["mask_ratios"] = {int(k): v for k, v in d["mask_ratios"].items()}
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


# ---------------------------------------------------------------------- configs
@bounded(300)
@given(valid_presets)
def test_valid_presets_round_trip_through_dict_yaml_and_json(raw):
    cfg = PSAConfig.from_dict(raw)
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(PSAConfig.from_dict(cfg.to_dict())) == hash(cfg)
    text = presets.dump_yaml({"p": cfg.to_dict()})
    again = PSAConfig.from_dict(yaml_file.parse_yaml_text(text).data["p"])
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert PSAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace() == cfg


@bounded(400)
@given(full_presets, st.sampled_from(MUTATION_PATHS), any_values)
def test_one_mutated_field_is_accepted_or_refused_naming_that_field(raw, path, value):
    changed = _set(raw, path, value)
    try:
        cfg = PSAConfig.from_dict(changed, "S.attention_configs.p")
    except ConfigError as e:
        assert e.field.startswith(f"S.attention_configs.p.{path[0]}"), (path, str(e))
        assert e.reason.startswith(("got ", "unknown", "range", "level", "no levels", "the last range")), str(e)
        assert len(str(e)) < 400
        return
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)


@bounded(400)
@given(st.sampled_from(sorted(FIELD_VALUES)), any_values)
def test_replace_accepts_or_refuses_naming_the_field(name, value):
    try:
        cfg = PSAConfig().replace(**{name: value})
    except ConfigError as e:
        assert e.field == name or e.field.startswith(f"{name}.") or e.field.startswith(f"{name}["), (name, str(e))
        return
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------- files
def _check_library(lib, user: Path, shipped_presets: dict):
    for section, names in shipped_presets.items():
        assert names <= set(lib.sections[section].attention_configs), section
    for problem in lib.problems:
        assert problem.file == str(user), str(problem)
        assert problem.line is None or problem.line >= 1
        assert isinstance(problem.message, str) and len(str(problem)) < 2000


SHIPPED_PRESETS = {k: set(v.attention_configs) for k, v in presets.load_library(SHIPPED, None).sections.items()}
# Text that looks like a presets file, with values of any kind, and text of no kind at all.
yaml_like = st.builds(lambda d: yaml.safe_dump(d, allow_unicode=True), st.dictionaries(
    st.sampled_from([SECTION, "Wan2.2_5B", "New"]),
    st.fixed_dictionaries({}, optional={"default_attention": file_values, "text_length": file_values,
                                        "video_scale": file_values,
                                        "attention_configs": st.dictionaries(st.text(max_size=8),
                                                                             st.one_of(valid_presets, file_values),
                                                                             max_size=3)}),
    max_size=3))
long_numbers = st.builds(lambda n, digit: f"{SECTION}:\n  attention_configs:\n    x: {{warmup_steps: {digit * n}}}\n",
                         st.integers(1, 6000), st.sampled_from("19"))
yaml_texts = st.one_of(yaml_like, st.text(max_size=300), long_numbers,
                       st.builds(lambda a, b: a + b, yaml_like, st.text(alphabet="[]{}:&*!|>-#'\"\n \t,", max_size=40)))


@bounded(200)
@given(yaml_texts)
def test_any_user_text_loads_without_raising_and_keeps_the_shipped_presets(text):
    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp) / "presets.yaml"
        user.write_text(text, encoding="utf-8", errors="surrogatepass")
        _check_library(presets.PresetStore(shipped=SHIPPED, user=user).library(), user, SHIPPED_PRESETS)


@bounded(150)
@given(st.one_of(st.binary(max_size=400), st.builds(lambda t, enc: t.encode(enc, errors="replace"), yaml_like,
                                                     st.sampled_from(["latin-1", "utf-16", "utf-16-le", "utf-32",
                                                                      "utf-8-sig", "cp1252"]))))
def test_any_user_bytes_load_without_raising_and_keep_the_shipped_presets(raw):
    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp) / "presets.yaml"
        user.write_bytes(raw)
        _check_library(presets.PresetStore(shipped=SHIPPED, user=user).library(), user, SHIPPED_PRESETS)


# ---------------------------------------------------------------------- editor and saving
WIDGET_TEXT = st.one_of(st.just(edit.KEEP), st.text(max_size=20),
                        st.builds(lambda a, b: f"{a}, {b}", st.floats(allow_nan=True), st.floats(allow_nan=True)))
widgets = st.fixed_dictionaries({}, optional={
    **{w: st.one_of(st.sampled_from([edit.KEEP, *opts]), st.text(max_size=8))
       for w, (_, opts) in edit.COMBO_FIELDS.items()},
    **{b: st.one_of(st.sampled_from(edit.BOOL_CHOICES), st.text(max_size=5)) for b in edit.BOOL_FIELDS},
    **{w: st.one_of(st.sampled_from([edit.KEEP, *map(str, opts)]), st.text(max_size=5))
       for w, (_, opts) in edit.BLOCK_FIELDS.items()},
    **{w: WIDGET_TEXT for w in edit.LEVEL_WIDGETS.values()},
    "tile_size": WIDGET_TEXT, "sim_thresholds": WIDGET_TEXT,
    "warmup_steps": st.integers(-1, 10 ** 6), "description": st.text(max_size=30),
})


@bounded(500)
@given(valid_presets, widgets)
def test_editor_input_gives_a_valid_preset_or_its_own_error(raw, ws):
    base = PSAConfig.from_dict(raw)
    try:
        out = edit.edit_preset(base, **ws)
    except ConfigError as e:
        assert str(e)
        return
    assert PSAConfig.from_dict(out.to_dict()) == out


@bounded(60)
@given(valid_presets, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,20}", fullmatch=True))
def test_saved_preset_reloads_equal_and_saving_it_again_is_unchanged(raw, name):
    assume(name != presets.DEFAULT_PRESET)
    cfg = PSAConfig.from_dict(raw)
    with tempfile.TemporaryDirectory() as tmp:
        user = Path(tmp) / "presets.yaml"
        store = presets.PresetStore(shipped=SHIPPED, user=user)
        existing = store.library().sections[SECTION].attention_configs.get(name)
        status = store.save(SECTION, name, cfg, overwrite=True)
        assert status == ("unchanged" if existing == cfg else "overwritten" if existing else "saved")
        reloaded = presets.PresetStore(shipped=SHIPPED, user=user).library()
        assert reloaded.problems == []
        assert reloaded.resolve(SECTION, name).config == cfg
        assert store.save(SECTION, name, cfg, overwrite=False) == "unchanged"
