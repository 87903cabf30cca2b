"""PSA Preset Editor rule: widgets left on keep keep the incoming value (no ComfyUI)."""
import pytest

import comfy_newest_io as newest
from pack_import import pack_module
from test_loader_dynamic_combo import load_nodes

edit = pack_module("nodes.edit")
config = pack_module("psa_kernels.config")
ConfigError, PSAConfig = config.ConfigError, config.PSAConfig

BASE = PSAConfig.from_dict({
    "type": "psa", "description": "base", "block_size": {"m": 128, "n": 32, "tile_n": 32},
    "mask_ratios": {1: [0.0, 0.05], 2: [0.05, 0.1], 4: [0.1, 0.15], 8: [0.15, 0.25], 0: [0.25, 1.0]},
    "mask_mode": "topk", "warmup_steps": 15, "use_sim_mask": False,
    "sim_thresholds": {"x2": 0.7, "x4": 0.65, "x8": 0.65}})


def test_all_keep_returns_the_incoming_preset():
    keep = {w: edit.KEEP for w in [*edit.COMBO_FIELDS, *edit.BOOL_FIELDS, *edit.BLOCK_FIELDS,
                                   *edit.LEVEL_WIDGETS.values(), "tile_size", "sim_thresholds"]}
    assert edit.edit_preset(BASE, **keep, warmup_steps=edit.KEEP_INT, description="") is BASE


def test_changed_fields_replace_untouched_fields_stay():
    out = edit.edit_preset(BASE, warmup_steps=0, use_sim_mask="true", block_n="64", sim_thresholds="0.8, 0.7, 0.6",
                           tile_size="[1, 4, 4]", rearrange_method="Tiled", description="mine")
    assert (out.warmup_steps, out.use_sim_mask, out.block_size.n) == (0, True, 64)
    assert out.sim_thresholds.x2 == 0.8 and out.tile_size == (1, 4, 4) and out.rearrange_method == "Tiled"
    assert out.description == "mine"
    assert out.mask_ratios == BASE.mask_ratios and out.mask_mode == "topk" and out.block_size.m == 128


def test_level_ranges_keep_replace_and_off():
    out = edit.edit_preset(BASE, level_1="0, 0.2", level_2="0.2, 0.3", level_4="off", level_8="0.3, 0.5",
                           level_0="0.5, 1")
    assert out.mask_ratios == {1: (0.0, 0.2), 2: (0.2, 0.3), 8: (0.3, 0.5), 0: (0.5, 1.0)}


def test_one_changed_range_moves_its_kept_neighbours():
    notes = []
    out = edit.edit_preset(BASE, notes=notes, level_2="0.05, 0.12")
    assert out.mask_ratios == {1: (0.0, 0.05), 2: (0.05, 0.12), 4: (0.12, 0.15), 8: (0.15, 0.25), 0: (0.25, 1.0)}
    assert notes == ["level_4: 0.1, 0.15 -> 0.12, 0.15"]
    # a wide change swallows the kept ranges it overruns (they become empty) and stops at the next one
    out = edit.edit_preset(BASE, level_1="0, 0.2")
    assert out.mask_ratios == {1: (0.0, 0.2), 2: (0.2, 0.2), 4: (0.2, 0.2), 8: (0.2, 0.25), 0: (0.25, 1.0)}
    # a level turned off gives its share to the next kept level
    out = edit.edit_preset(BASE, level_4="off")
    assert out.mask_ratios == {1: (0.0, 0.05), 2: (0.05, 0.1), 8: (0.1, 0.25), 0: (0.25, 1.0)}
    # the skip level shrinks to make room at the end
    out = edit.edit_preset(BASE, level_8="0.15, 0.4")
    assert out.mask_ratios[0] == (0.4, 1.0) and out.mask_ratios[4] == (0.1, 0.15)


@pytest.mark.parametrize("widgets, match", [
    ({"level_1": "0, 0.2", "level_2": "0.3, 0.4"}, r"level_2: got '0.3, 0.4'; allowed: a range that joins level_1"),
    ({"level_1": "0.1, 0.2"}, r"level_1: got '0.1, 0.2'; allowed: a range that must start at 0"),
    ({"level_0": "0.5, 0.9"}, r"level_0: got '0.5, 0.9'; allowed: a range that must end at 1"),
    ({"level_1": "0, 0.5", "level_8": "0.3, 0.6"}, r"level_8: got '0.3, 0.6'; allowed: ranges in level order"),
    ({"level_2": "0.3, 0.2"}, r"level_2: got '0.3, 0.2'; allowed: keep, off, or a range"),
])
def test_level_conflicts_name_the_widget(widgets, match):
    with pytest.raises(ConfigError, match=match):
        edit.edit_preset(BASE, **widgets)


@pytest.mark.parametrize("widgets, match", [
    ({"level_2": "0.1"}, r"level_2: got '0.1'; allowed: keep, or off, or a range"),
    ({"tile_size": "2, 8"}, r"tile_size: got '2, 8'; allowed: keep, or three integers"),
    ({"sim_thresholds": "a, b, c"}, r"sim_thresholds: got 'a, b, c'"),
    ({"block_n": "16", "tile_n": "32"}, r"^tile_n: got 32; allowed with n=16: 16"),
    ({"mask_mode": "fast"}, r"mask_mode: got 'fast'; allowed: thresholdbound, topk"),
    ({"use_rearrange": "yes"}, r"use_rearrange: got 'yes'; allowed: keep, true, false"),
    ({"block_m": "48"}, r"^block_m: got 48; allowed: 16, 32, 64, 128"),
    ({"tile_size": "0, 8, 8"}, r"^tile_size: got 0; allowed: an integer in \[1, 1024\]"),
])
def test_bad_widget_values_name_the_field(widgets, match):
    with pytest.raises(ConfigError, match=match):
        edit.edit_preset(BASE, **widgets)


def test_pooled_tail_widget():
    assert edit.edit_preset(BASE, use_pooled_tail="true").use_pooled_tail is True
    assert edit.edit_preset(BASE, use_pooled_tail="keep") is BASE
    assert edit.edit_preset(BASE, estimate_method="block_mean").estimate_method == "block_mean"
    assert edit.edit_preset(BASE, estimate_method="keep") is BASE
    assert edit.edit_preset(BASE, heavy_keys=256).heavy_keys == 256
    assert edit.edit_preset(BASE, heavy_keys=-1) is BASE
    with pytest.raises(ConfigError, match="heavy_keys"):
        edit.edit_preset(BASE, heavy_keys=5000)
    assert edit.edit_preset(BASE, tail_correction="variance").tail_correction == "variance"
    assert edit.edit_preset(BASE, tail_correction="keep") is BASE
    assert edit.edit_preset(BASE, use_pooled_tail="true", tail_correction="variance").to_dict()["tail_correction"] \
        == "variance"
    assert BASE.tail_correction == "none"


def test_tail_correction_widget_offers_keep_and_the_allowed_values():
    assert edit.COMBO_FIELDS["tail_correction"] == ("tail_correction", config.TAIL_CORRECTIONS)
    assert config.TAIL_CORRECTIONS == ("none", "variance")


def test_tail_correction_widget_in_the_node_schema(monkeypatch, tmp_path):
    """The Preset Editor's input: an optional advanced combo, last (workflows hold widget values by
    position, so older workflows keep theirs), offering keep and the allowed values."""
    nodes = load_nodes(monkeypatch, tmp_path)
    schema = nodes.PSAPresetEditor.define_schema()
    schema.validate()
    assert [i.id for i in schema.inputs][-4:] == ["use_pooled_tail", "estimate_method", "heavy_keys",
                                                  "tail_correction"]
    kind, spec = newest.input_dict(schema.inputs)["optional"]["tail_correction"]
    assert kind == "COMBO" and spec["options"] == ["keep", "none", "variance"] and spec["default"] == "keep"
    assert "use_pooled_tail" in spec["tooltip"] and spec.get("advanced") is True
    assert "tail_correction" not in newest.input_dict(schema.inputs)["required"]


@pytest.mark.parametrize("value", ["on", "Variance2", ""])
def test_bad_tail_correction_names_the_field_and_the_allowed_values(value):
    with pytest.raises(ConfigError, match=rf"^tail_correction: got '{value}'; allowed: none, variance$"):
        edit.edit_preset(BASE, tail_correction=value)


def test_dense_presets_stay_minimal_and_switch_to_psa_fully():
    dense = PSAConfig.from_dict({"type": "dense", "description": "full"})
    assert edit.edit_preset(dense, verbose="true").to_dict() == {"type": "dense", "description": "full",
                                                                 "verbose": True}
    psa = edit.edit_preset(dense, type="psa")
    assert not psa.is_dense and psa.to_dict()["mask_ratios"] == PSAConfig().to_dict()["mask_ratios"]
