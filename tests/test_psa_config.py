"""Presets and attention_config.yaml: every YAML example of the seed document loads and
round-trips, and every bad value is rejected with a message that names the field path and
what is allowed."""
import copy
import dataclasses
import json
import pickle
import re
from pathlib import Path

import pytest
import yaml

from psa_kernels.config import (BlockSize, ConfigError, ModelConfig, PSAConfig, SimThresholds, VideoScale,
                                load_attention_config, parse_attention_config)

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_DOC = REPO_ROOT.parent / "shared" / "seed" / "000_28b42615df06f955.txt"
WHERE = "CogVideo_5b.attention_configs.my_custom_preset"


def _seed_yaml_blocks() -> list:
    if not SEED_DOC.is_file():
        pytest.skip(f"SEED DOCUMENT NOT FOUND at {SEED_DOC}: the seed YAML examples cannot be checked")
    text = SEED_DOC.read_text(encoding="utf-8")
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]


@pytest.fixture(scope="module")
def seed_blocks():
    blocks = _seed_yaml_blocks()
    # The document has four YAML examples: the section layout, the thresholdbound and the
    # topk mask_ratios, and the my_custom_preset walk-through.
    assert len(blocks) == 4, f"expected 4 YAML blocks in the seed document, found {len(blocks)}"
    return blocks


@pytest.fixture(scope="module")
def custom_raw(seed_blocks):
    return seed_blocks[3]["CogVideo_5b"]["attention_configs"]["my_custom_preset"]


def _seed_presets(blocks) -> dict:
    """Every preset the seed document shows, with the two bare mask_ratios examples
    embedded in the full my_custom_preset."""
    section = blocks[0]["ModelName"]["attention_configs"]["preset_name"]
    custom = blocks[3]["CogVideo_5b"]["attention_configs"]["my_custom_preset"]
    thresh = {**copy.deepcopy(custom), "mask_ratios": blocks[1]["mask_ratios"], "mask_mode": "thresholdbound"}
    topk = {**copy.deepcopy(custom), "mask_ratios": blocks[2]["mask_ratios"], "mask_mode": "topk"}
    return {"ModelName.preset_name": section, "CogVideo_5b.my_custom_preset": custom,
            "thresholdbound_mask_ratios": thresh, "topk_mask_ratios": topk}


PRESET_NAMES = ["ModelName.preset_name", "CogVideo_5b.my_custom_preset",
                "thresholdbound_mask_ratios", "topk_mask_ratios"]


# ----------------------------------------------------------------------------- seed examples

@pytest.mark.parametrize("name", PRESET_NAMES)
def test_seed_preset_reads_its_values(seed_blocks, name):
    raw = _seed_presets(seed_blocks)[name]
    cfg = PSAConfig.from_dict(raw, name)
    assert cfg.type == raw["type"]
    assert cfg.description == raw["description"]
    assert cfg.is_dense is False
    if "mask_ratios" in raw:
        assert cfg.mask_ratios == {int(k): tuple(v) for k, v in raw["mask_ratios"].items()}
        assert cfg.mask_mode == raw["mask_mode"]
        assert (cfg.block_size.m, cfg.block_size.n, cfg.block_size.tile_n) == (
            raw["block_size"]["m"], raw["block_size"]["n"], raw["block_size"]["tile_n"])
        assert cfg.tile_size == tuple(raw["tile_size"])
        assert cfg.warmup_steps == raw["warmup_steps"]
        assert cfg.use_rearrange is raw["use_rearrange"] and cfg.use_sim_mask is raw["use_sim_mask"]
        assert cfg.rearrange_method == raw["rearrange_method"]
        assert cfg.attn_impl == raw["attn_impl"]
        assert (cfg.sim_thresholds.x2, cfg.sim_thresholds.x4, cfg.sim_thresholds.x8) == (
            raw["sim_thresholds"]["x2"], raw["sim_thresholds"]["x4"], raw["sim_thresholds"]["x8"])
    # level ranges come back in level order 1, 2, 4, 8, 0 and join end to end from 0 to 1
    ranges = cfg.level_ranges()
    order = [lvl for lvl, _, _ in ranges]
    assert order == [lvl for lvl in (1, 2, 4, 8, 0) if lvl in cfg.mask_ratios]
    assert ranges[0][1] == 0.0 and ranges[-1][2] == 1.0
    assert all(a[2] == b[1] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_seed_preset_round_trips(seed_blocks, name):
    raw = _seed_presets(seed_blocks)[name]
    cfg = PSAConfig.from_dict(raw, name)
    d = cfg.to_dict()
    assert PSAConfig.from_dict(d) == cfg
    # every field the document gave comes back unchanged
    assert {k: d[k] for k in raw} == raw
    # through YAML text and through JSON (where level keys become strings)
    assert PSAConfig.from_dict(yaml.safe_load(yaml.safe_dump(d, allow_unicode=True))) == cfg
    from_json = json.loads(json.dumps(d))
    assert all(isinstance(k, str) for k in from_json["mask_ratios"])
    assert PSAConfig.from_dict(from_json) == cfg


def test_seed_topk_example_keeps_its_empty_range(seed_blocks):
    cfg = PSAConfig.from_dict(_seed_presets(seed_blocks)["topk_mask_ratios"])
    lo, hi = cfg.mask_ratios[4]
    assert lo == hi == 0.15


def test_seed_model_sections(seed_blocks):
    layout = parse_attention_config(seed_blocks[0])
    sec = layout["ModelName"]
    raw = seed_blocks[0]["ModelName"]
    assert sec.default_attention == raw["default_attention"]
    assert sec.text_length == raw["text_length"]
    assert (sec.video_scale.width_divisor, sec.video_scale.height_divisor, sec.video_scale.depth_divisor) == (
        raw["video_scale"]["width_divisor"], raw["video_scale"]["height_divisor"],
        raw["video_scale"]["depth_divisor"])
    assert sec.preset() is sec.attention_configs["preset_name"]
    assert parse_attention_config(yaml.safe_load(yaml.safe_dump(
        {"ModelName": sec.to_dict()}, allow_unicode=True)))["ModelName"] == sec

    # The walk-through adds a preset to a section that names no default: its first preset is used.
    cog = parse_attention_config(seed_blocks[3])["CogVideo_5b"]
    assert cog.default_attention == "my_custom_preset"
    assert cog.text_length == 0
    assert cog.preset("my_custom_preset").warmup_steps == 10


def test_load_attention_config_with_two_sections(tmp_path, seed_blocks):
    custom = seed_blocks[3]["CogVideo_5b"]["attention_configs"]["my_custom_preset"]
    doc = {
        "Wan2.1_1.3b": {
            "default_attention": "psa_topk",
            "video_scale": {"width_divisor": 16, "height_divisor": 16, "depth_divisor": 4},
            "text_length": 0,
            "attention_configs": {
                "dense": {"type": "dense", "description": "full attention"},
                "psa_topk": {"type": "psa", "block_size": {"m": 128, "n": 32, "tile_n": 32},
                             "mask_mode": "topk", "attn_impl": "new_mask_type",
                             "mask_ratios": {1: [0.0, 0.05], 2: [0.05, 0.1], 4: [0.1, 0.15],
                                             8: [0.15, 0.25], 0: [0.25, 1.0]}},
            },
        },
        "CogVideo_5b": {"default_attention": "my_custom_preset", "text_length": 226,
                        "attention_configs": {"my_custom_preset": custom}},
    }
    path = tmp_path / "attention_config.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    sections = load_attention_config(path)
    assert list(sections) == ["Wan2.1_1.3b", "CogVideo_5b"]
    wan = sections["Wan2.1_1.3b"]
    assert isinstance(wan, ModelConfig)
    assert wan.preset().mask_mode == "topk" and wan.preset().block_size == BlockSize(128, 32, 32)
    assert wan.preset("dense").is_dense
    assert sections["CogVideo_5b"].text_length == 226
    assert sections["CogVideo_5b"].preset().to_dict() == PSAConfig.from_dict(custom).to_dict()


def test_empty_file_has_no_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n", encoding="utf-8")
    assert load_attention_config(path) == {}


# ----------------------------------------------------------------------------- dense presets

def test_dense_preset_round_trips_to_its_own_keys():
    raw = {"type": "dense", "description": "Full attention baseline"}
    cfg = PSAConfig.from_dict(raw)
    assert cfg.is_dense
    assert cfg.to_dict() == raw


def test_dense_preset_without_description_round_trips_to_its_own_keys():
    raw = {"type": "dense"}
    cfg = PSAConfig.from_dict(raw)
    assert cfg.is_dense
    assert cfg.to_dict() == raw


def test_dense_preset_with_psa_fields_is_accepted():
    raw = {"type": "dense", "description": "dense, kept the psa fields", "use_sim_mask": True,
           "block_size": {"m": 64, "n": 32, "tile_n": 16}, "mask_mode": "topk",
           "mask_ratios": {1: [0.0, 0.2], 0: [0.2, 1.0]}, "warmup_steps": 3}
    cfg = PSAConfig.from_dict(raw)
    assert cfg.is_dense
    assert cfg.block_size == BlockSize(64, 32, 16)
    assert cfg.to_dict() == raw
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- accepted forms

def test_string_level_keys_are_accepted():
    cfg = PSAConfig.from_dict({"mask_ratios": {"1": [0.0, 0.3], "2": [0.3, 0.6], "0": [0.6, 1.0]}})
    assert cfg.mask_ratios == {1: (0.0, 0.3), 2: (0.3, 0.6), 0: (0.6, 1.0)}


def test_mask_ratio_key_order_does_not_matter():
    a = PSAConfig.from_dict({"mask_ratios": {0: [0.8, 1.0], 2: [0.5, 0.8], 1: [0.0, 0.5]}})
    b = PSAConfig.from_dict({"mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.8], 0: [0.8, 1.0]}})
    assert a == b
    assert [lvl for lvl, _, _ in a.level_ranges()] == [1, 2, 0]


def test_use_sim_mask_with_either_attn_impl_is_accepted():
    for impl in ("old_mask_type", "new_mask_type"):
        cfg = PSAConfig.from_dict({"use_sim_mask": True, "attn_impl": impl})
        assert cfg.use_sim_mask and cfg.attn_impl == impl


def test_choices_are_case_insensitive():
    cfg = PSAConfig.from_dict({"type": "PSA", "mask_mode": "TopK", "rearrange_method": "gilbert",
                               "attn_impl": "Old_Mask_Type"})
    assert (cfg.type, cfg.mask_mode, cfg.rearrange_method, cfg.attn_impl) == (
        "psa", "topk", "Gilbert", "old_mask_type")


@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_every_allowed_block_size(n):
    for m in (16, 32, 64, 128):
        cfg = PSAConfig.from_dict({"block_size": {"m": m, "n": n}})
        assert (cfg.block_size.m, cfg.block_size.n) == (m, n)
        assert cfg.block_size.tile_n <= n


# ----------------------------------------------------------------------------- errors

_RATIOS = {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]}

# (description, change to my_custom_preset, field path after WHERE, substrings of the message)
BAD_PRESETS = [
    ("mask_mode", {"mask_mode": "top_k"}, ".mask_mode", ["'top_k'", "thresholdbound", "topk"]),
    ("rearrange_method", {"rearrange_method": "Hilbert"}, ".rearrange_method", ["'Hilbert'", "Gilbert", "Tiled"]),
    ("attn_impl", {"attn_impl": "fast"}, ".attn_impl", ["'fast'", "new_mask_type", "old_mask_type"]),
    ("type", {"type": "sparse"}, ".type", ["'sparse'", "psa", "dense"]),
    ("ratio below 0", {"mask_ratios": {1: [-0.1, 0.5], 2: [0.5, 1.0]}}, ".mask_ratios.1[0]",
     ["-0.1", "[0.0, 1.0]"]),
    ("ratio above 1", {"mask_ratios": {1: [0.0, 0.5], 0: [0.5, 1.5]}}, ".mask_ratios.0[1]",
     ["1.5", "[0.0, 1.0]"]),
    ("ratio not a number", {"mask_ratios": {1: [0.0, "half"], 0: [0.5, 1.0]}}, ".mask_ratios.1[1]",
     ["'half'", "[0.0, 1.0]"]),
    ("range not a pair", {"mask_ratios": {1: [0.0, 0.5, 0.7], 0: [0.7, 1.0]}}, ".mask_ratios.1",
     ["[lo, hi]"]),
    ("reversed range", {"mask_ratios": {1: [0.0, 0.5], 2: [0.7, 0.5], 0: [0.5, 1.0]}}, ".mask_ratios.2",
     ["reversed", "lo <= hi"]),
    ("gap", {"mask_ratios": {1: [0.0, 0.5], 2: [0.6, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]}},
     ".mask_ratios.2", ["out of order", "start at 0.5"]),
    ("overlap", {"mask_ratios": {1: [0.0, 0.5], 2: [0.4, 0.7], 0: [0.7, 1.0]}},
     ".mask_ratios.2", ["out of order", "start at 0.5"]),
    ("out of level order", {"mask_ratios": {1: [0.0, 0.5], 2: [0.7, 0.9], 4: [0.5, 0.7], 0: [0.9, 1.0]}},
     ".mask_ratios.2", ["out of order", "1, 2, 4, 8, 0"]),
    ("not reaching 1.0", {"mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.8]}}, ".mask_ratios",
     ["0.8", "1.0"]),
    ("no levels", {"mask_ratios": {}}, ".mask_ratios", ["1, 2, 4, 8, 0"]),
    ("unknown level 3", {"mask_ratios": {1: [0.0, 0.5], 3: [0.5, 1.0]}}, ".mask_ratios.3",
     ["3", "1, 2, 4, 8, 0"]),
    ("unknown level '16'", {"mask_ratios": {1: [0.0, 0.5], "16": [0.5, 1.0]}}, ".mask_ratios.16",
     ["1, 2, 4, 8, 0"]),
    ("level given twice", {"mask_ratios": {1: [0.0, 0.5], "1": [0.5, 1.0]}}, ".mask_ratios.1",
     ["twice"]),
    ("block m 100", {"block_size": {"m": 100, "n": 64, "tile_n": 32}}, ".block_size.m",
     ["100", "16, 32, 64, 128"]),
    ("block n 256", {"block_size": {"m": 128, "n": 256, "tile_n": 32}}, ".block_size.n",
     ["256", "16, 32, 64, 128"]),
    ("block n not integer", {"block_size": {"m": 128, "n": 64.5, "tile_n": 32}}, ".block_size.n",
     ["64.5", "integer"]),
    ("tile_n > n", {"block_size": {"m": 128, "n": 32, "tile_n": 64}}, ".block_size.tile_n",
     ["64", "n=32", "16, 32"]),
    ("tile_n not allowed", {"block_size": {"m": 128, "n": 64, "tile_n": 48}}, ".block_size.tile_n",
     ["48", "16, 32, 64"]),
    ("unknown block field", {"block_size": {"m": 128, "n": 64, "k": 32}}, ".block_size.k",
     ["unknown field", "m, n, tile_n"]),
    ("negative warmup", {"warmup_steps": -1}, ".warmup_steps", ["-1", "[0, 10000]"]),
    ("fractional warmup", {"warmup_steps": 2.5}, ".warmup_steps", ["2.5", "integer"]),
    ("tile_size of 2", {"tile_size": [2, 8]}, ".tile_size", ["[2, 8]", "3 positive integers"]),
    ("tile_size string", {"tile_size": "2x8x8"}, ".tile_size", ["'2x8x8'", "3 positive integers"]),
    ("tile_size zero", {"tile_size": [2, 0, 8]}, ".tile_size[1]", ["0", "[1, 1024]"]),
    ("sim threshold too high", {"sim_thresholds": {"x2": 0.7, "x4": 1.5, "x8": 0.6}},
     ".sim_thresholds.x4", ["1.5", "[-1.0, 1.0]"]),
    ("sim threshold not a number", {"sim_thresholds": {"x2": "high", "x4": 0.65, "x8": 0.6}},
     ".sim_thresholds.x2", ["'high'", "[-1.0, 1.0]"]),
    ("unknown sim field", {"sim_thresholds": {"x2": 0.7, "x16": 0.5}}, ".sim_thresholds.x16",
     ["unknown field", "x2, x4, x8"]),
    ("bool as string", {"use_rearrange": "yes"}, ".use_rearrange", ["'yes'", "true or false"]),
    ("unknown field", {"use_sparse": True}, ".use_sparse", ["unknown field", "use_sim_mask", "mask_ratios"]),
]


@pytest.mark.parametrize("change,path,parts", [b[1:] for b in BAD_PRESETS], ids=[b[0] for b in BAD_PRESETS])
def test_bad_preset_is_rejected_naming_field_and_allowed_values(custom_raw, change, path, parts):
    raw = {**copy.deepcopy(custom_raw), **change}
    with pytest.raises(ConfigError) as e:
        PSAConfig.from_dict(raw, WHERE)
    msg = str(e.value)
    assert msg.startswith(WHERE + path + ":"), msg
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    # without a location prefix the message starts at the field itself
    with pytest.raises(ConfigError) as e2:
        PSAConfig.from_dict(raw)
    assert str(e2.value).startswith(path[1:] + ":"), str(e2.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        PSAConfig.from_dict({"mask_mode": "nope"})


def test_preset_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match=r"^W\.attention_configs\.p: got \[1, 2\]; allowed: a mapping"):
        PSAConfig.from_dict([1, 2], "W.attention_configs.p")


def test_direct_construction_and_replace_are_validated():
    with pytest.raises(ConfigError, match=r"block_size\.m: got 100; allowed: 16, 32, 64, 128"):
        PSAConfig(block_size=BlockSize(m=100, n=64, tile_n=32))
    with pytest.raises(ConfigError, match=r"mask_mode: got 'fast'; allowed: thresholdbound, topk"):
        PSAConfig().replace(mask_mode="fast")
    with pytest.raises(ConfigError, match=r"mask_ratios"):
        PSAConfig(mask_ratios={1: (0.0, 0.5)})
    ok = PSAConfig().replace(mask_mode="topk", block_size=BlockSize(64, 32, 16))
    assert ok.mask_mode == "topk" and ok.block_size.n == 32


def _section(presets: dict, **extra) -> dict:
    return {"W": {"attention_configs": presets, **extra}}


def test_unknown_default_attention():
    doc = _section({"fast": {"mask_mode": "topk"}, "dense": {"type": "dense"}}, default_attention="turbo")
    with pytest.raises(ConfigError) as e:
        parse_attention_config(doc)
    msg = str(e.value)
    assert msg.startswith("W.default_attention:"), msg
    assert "'turbo'" in msg and "fast" in msg and "dense" in msg


def test_model_section_errors():
    with pytest.raises(ConfigError, match=r"^W\.speed: unknown field; allowed: default_attention, "
                                          r"video_scale, text_length, attention_configs"):
        parse_attention_config(_section({"a": {}}, speed=2))
    with pytest.raises(ConfigError, match=r"^W\.attention_configs: no presets"):
        parse_attention_config(_section({}))
    with pytest.raises(ConfigError, match=r"^W\.text_length: got -3; allowed: an integer in \[0, 65536\]"):
        parse_attention_config(_section({"a": {}}, text_length=-3))
    with pytest.raises(ConfigError, match=r"^W\.video_scale\.depth_divisor: got 0; allowed: an integer in \[1, 1024\]"):
        parse_attention_config(_section({"a": {}}, video_scale={"depth_divisor": 0}))
    with pytest.raises(ConfigError, match=r"^W\.attention_configs\.a\.mask_mode: got 'x'; allowed: "):
        parse_attention_config(_section({"a": {"mask_mode": "x"}}))


def test_unknown_preset_name():
    sec = parse_attention_config(_section({"alpha": {}, "beta": {"type": "dense"}}))["W"]
    with pytest.raises(ConfigError) as e:
        sec.preset("gamma")
    msg = str(e.value)
    assert msg.startswith("W.attention_configs:"), msg
    assert "'gamma'" in msg and "alpha" in msg and "beta" in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    lines = ["Wan2.1_1.3b:",
             "  default_attention: a",
             "  attention_configs:",
             "    a:",
             "      mask_mode: topk: oops",
             "      use_sim_mask: true"]
    path = tmp_path / "broken.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    msg = str(e.value)
    assert str(path) in msg and "malformed YAML" in msg
    assert "line 5" in msg, msg


def test_bad_value_in_file_names_file_and_field(tmp_path):
    path = tmp_path / "attention_config.yaml"
    path.write_text("Wan:\n  attention_configs:\n    a:\n      block_size: {m: 128, n: 256}\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    assert "Wan.attention_configs.a.block_size.n: got 256; allowed: 16, 32, 64, 128" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="cannot read") as e:
        load_attention_config(path)
    assert str(path) in str(e.value)


def test_sim_thresholds_for_level():
    st = SimThresholds(x2=0.5, x4=0.4, x8=0.3)
    assert [st.for_level(p) for p in (2, 4, 8)] == [0.5, 0.4, 0.3]


# ----------------------------------------------------------------------------- every construction path

# (field, a bad value, the field the error must name, words of the message)
BAD_FIELD_VALUES = [
    ("type", "sparse", "type", ["'sparse'", "psa, dense"]),
    ("description", 5, "description", ["5", "text"]),
    ("use_rearrange", "no", "use_rearrange", ["'no'", "true or false"]),
    ("use_sim_mask", 1, "use_sim_mask", ["1", "true or false"]),
    ("verbose", None, "verbose", ["None", "true or false"]),
    ("use_pooled_tail", "yes", "use_pooled_tail", ["'yes'", "true or false"]),
    ("block_size", {"m": 64}, "block_size", ["BlockSize"]),
    ("mask_ratios", {1: (0.0, 0.5)}, "mask_ratios", ["1.0"]),
    ("mask_ratios", {1: (0.0, float("nan")), 0: (0.5, 1.0)}, "mask_ratios.1[1]", ["nan", "[0.0, 1.0]"]),
    ("mask_mode", "fast", "mask_mode", ["'fast'", "thresholdbound, topk"]),
    ("attn_impl", 3, "attn_impl", ["3", "new_mask_type"]),
    ("tile_size", (2, 8), "tile_size", ["(2, 8)", "3 positive integers"]),
    ("tile_size", (10 ** 30, 8, 8), "tile_size[0]", ["[1, 1024]"]),
    ("tile_size", (2.5, 8, 8), "tile_size[0]", ["2.5", "[1, 1024]"]),
    ("warmup_steps", float("inf"), "warmup_steps", ["inf", "[0, 10000]"]),
    ("warmup_steps", 10 ** 5000, "warmup_steps", ["digits", "[0, 10000]"]),
    ("warmup_steps", 10_001, "warmup_steps", ["10001", "[0, 10000]"]),
    ("rearrange_method", ["Gilbert"], "rearrange_method", ["['Gilbert']", "Gilbert, Tiled"]),
    ("sim_thresholds", (0.5, 0.5, 0.5), "sim_thresholds", ["SimThresholds"]),
]


@pytest.mark.parametrize("name,value,field,words", BAD_FIELD_VALUES, ids=[f"{b[0]}={b[2]}" for b in BAD_FIELD_VALUES])
def test_replace_and_direct_construction_validate_every_field(name, value, field, words):
    for make in (lambda: PSAConfig().replace(**{name: value}), lambda: PSAConfig(**{name: value})):
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.field == field, str(e.value)
        assert str(e.value).startswith(f"{field}: got ") or field == "mask_ratios", str(e.value)
        for word in words:
            assert word in e.value.reason, (word, str(e.value))
        assert len(str(e.value)) < 300


def test_replace_names_an_unknown_field():
    with pytest.raises(ConfigError) as e:
        PSAConfig().replace(use_sparse=True)
    assert e.value.field == "use_sparse" and "unknown field" in e.value.reason


def test_nested_types_validate_on_construction():
    for make, field in [(lambda: BlockSize(m=100), "block_size.m"),
                        (lambda: BlockSize(n=32, tile_n=64), "block_size.tile_n"),
                        (lambda: SimThresholds(x4=2.0), "sim_thresholds.x4"),
                        (lambda: VideoScale(depth_divisor=0), "video_scale.depth_divisor")]:
        with pytest.raises(ConfigError) as e:
            make()
        assert e.value.field == field


def test_model_config_validates_on_construction():
    preset = PSAConfig()
    with pytest.raises(ConfigError) as e:
        ModelConfig(name="W", default_attention=["a"], attention_configs={"a": preset})
    assert e.value.field == "W.default_attention" and "['a']" in e.value.reason
    with pytest.raises(ConfigError) as e:
        ModelConfig(name="W", default_attention="a", attention_configs={"a": {"type": "psa"}})
    assert e.value.field == "W.attention_configs.a"
    with pytest.raises(ConfigError) as e:
        ModelConfig(name="W", default_attention="a", attention_configs={"a": preset}, text_length=-1)
    assert e.value.field == "W.text_length"


def test_configs_are_hashable_frozen_and_equal_to_their_copies():
    a = PSAConfig.from_dict({"mask_mode": "topk", "mask_ratios": {1: [0.0, 0.3], 0: [0.3, 1.0]}})
    b = PSAConfig(mask_mode="TopK", mask_ratios={0: [0.3, 1.0], 1: [0.0, 0.3]}, tile_size=[2, 8, 8])
    assert a == b and hash(a) == hash(b) and len({a, b, PSAConfig()}) == 2
    assert a.mask_ratios == {1: (0.0, 0.3), 0: (0.3, 1.0)} and a.tile_size == (2, 8, 8)
    with pytest.raises(TypeError, match="cannot be changed in place"):
        a.mask_ratios[1] = (0.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.warmup_steps = 3
    assert copy.deepcopy(a) == a and pickle.loads(pickle.dumps(a)) == a
    section = parse_attention_config({"W": {"attention_configs": {"a": a.to_dict()}}})["W"]
    assert hash(section) == hash(copy.deepcopy(section))
    assert json.loads(json.dumps({"mask_ratios": a.mask_ratios})) == {"mask_ratios": {"1": [0.0, 0.3], "0": [0.3, 1.0]}}


def test_config_error_carries_field_file_and_line(tmp_path):
    path = tmp_path / "attention_config.yaml"
    path.write_text("W:\n  text_length: 3\n  attention_configs:\n    a:\n      mask_mode: topk\n"
                    "      tile_size: [2, 0, 8]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    err = e.value
    assert (err.file, err.line, err.field) == (str(path), 6, "W.attention_configs.a.tile_size[1]")
    assert err.reason == "got 0; allowed: an integer in [1, 1024]"
    assert str(err) == f"{path} (line 6): W.attention_configs.a.tile_size[1]: {err.reason}"
    again = pickle.loads(pickle.dumps(err))
    assert (again.file, again.line, again.field, str(again)) == (err.file, err.line, err.field, str(err))


def test_section_level_errors_carry_file_and_line(tmp_path):
    path = tmp_path / "attention_config.yaml"
    path.write_text("W:\n  attention_configs:\n    a: {}\nV: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 4, "V")
    path.write_text("W:\n  speed: 2\n  attention_configs:\n    a: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    assert (e.value.line, e.value.field) == (2, "W.speed")
    path.write_text("W:\n  default_attention: b\n  attention_configs: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_attention_config(path)
    assert (e.value.line, e.value.field) == (3, "W.attention_configs")
