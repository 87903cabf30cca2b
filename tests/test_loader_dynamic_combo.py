"""PSA Loader on the newest ComfyUI, whose V3 API has DynamicCombo (the 0.3.64 snapshot that
test_comfyui.py runs has not): presets offered per section, prompts in the nested form and in the
flat form written on 0.3.64 (the example workflows' values among them), and clear errors for a
section/preset pair that does not go together. Runs the pack's nodes module against the test
double in comfy_newest_io.py."""
import importlib
import json
import sys
import types

import pytest

import comfy_newest_io as newest
from pack_import import PACKAGE, REPO, pack_module

presets = pack_module("nodes.presets")
ConfigError = pack_module("psa_kernels.config").ConfigError
LIB = presets.PresetStore(user=None, user_from_env=False).library()
SECTIONS = LIB.section_names()


def load_nodes(monkeypatch, tmp_path, with_dynamic_combo=True):
    """The pack's nodes module imported against the double's comfy_api.latest (and forgotten after
    the test); user presets from an empty temporary file."""
    monkeypatch.setenv("PSA_USER_PRESETS", str(tmp_path / "none.yaml"))
    comfy_api = types.ModuleType("comfy_api")
    comfy_api.latest = newest.latest_module(with_dynamic_combo)
    monkeypatch.setitem(sys.modules, "comfy_api", comfy_api)
    monkeypatch.setitem(sys.modules, "comfy_api.latest", comfy_api.latest)
    name = f"{PACKAGE}.nodes.nodes"
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)  # other tests import it afresh
    return module


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    return load_nodes(monkeypatch, tmp_path)


def loader_inputs(nodes) -> dict:
    schema = nodes.PSALoader.define_schema()
    schema.validate()
    return newest.input_dict(schema.inputs)


def run(nodes, linked=None, **prompt_inputs):
    return newest.run(nodes.PSALoader, prompt_inputs, linked)[0]


def test_section_is_a_dynamic_combo_whose_options_carry_their_presets(nodes):
    inputs = loader_inputs(nodes)
    kind, spec = inputs["required"]["model_section"]
    assert kind == newest.DYNAMIC_COMBO
    options = {o["key"]: o["inputs"]["optional"]["preset"] for o in spec["options"]}
    assert [o["key"] for o in spec["options"]] == ["auto", *SECTIONS]  # the first option is the default
    for section in SECTIONS:
        kind, preset = options[section]
        assert kind == "COMBO" and preset["default"] == "default"
        assert preset["options"] == ["default", *LIB.sections[section].attention_configs]
    assert "psa_topk" in options["Wan2.1_1.3b"][1]["options"]
    assert "psa_topk" not in options["Wan2.1_14b"][1]["options"]
    # auto lists every section's presets and says that the detected section must have it
    assert options["auto"][1]["options"] == ["default", *LIB.preset_names()]
    assert "every section's presets" in options["auto"][1]["tooltip"]
    assert "auto" in options["auto"][1]["tooltip"] and "detects" in options["auto"][1]["tooltip"]
    # the flat preset of older prompts stays, hidden on the canvas; the model socket stays
    kind, flat = inputs["optional"]["preset"]
    assert kind == "COMBO" and flat.get("hidden") is True and flat["options"] == ["default", *LIB.preset_names()]
    assert inputs["optional"]["model"][0] == "MODEL"


def test_without_dynamic_combo_the_loader_keeps_two_flat_combos(monkeypatch, tmp_path):
    nodes = load_nodes(monkeypatch, tmp_path, with_dynamic_combo=False)
    inputs = loader_inputs(nodes)
    assert inputs["required"]["model_section"][0] == "COMBO"
    assert inputs["required"]["model_section"][1]["options"] == ["auto", *SECTIONS]
    assert inputs["required"]["preset"][1]["options"] == ["default", *LIB.preset_names()]
    assert run(nodes, model_section="Wan2.1_1.3b", preset="psa_topk").name == "psa_topk"


@pytest.mark.parametrize("section, preset, name", [
    ("Wan2.1_14b", "psa_fast", "psa_fast"),
    ("Wan2.1_1.3b", "psa_topk", "psa_topk"),
    ("CogVideo_5b", "default", "psa_balanced"),
    ("Wan2.2_5B", "baseline", "baseline"),
])
def test_nested_values_execute(nodes, section, preset, name):
    out = run(nodes, **{"model_section": section, "model_section.preset": preset, "preset": "default"})
    assert (out.section, out.name) == (section, name)
    assert out.config == LIB.sections[section].attention_configs[name]


def test_nested_values_reach_execute_as_a_dict(nodes, monkeypatch):
    seen = {}
    original = nodes.loader_choice

    def spy(model_section, preset):
        seen.update(model_section=model_section, preset=preset)
        return original(model_section, preset)

    monkeypatch.setattr(nodes, "loader_choice", spy)
    run(nodes, **{"model_section": "Wan2.1_14b", "model_section.preset": "psa_fast"})
    assert seen == {"model_section": {"model_section": "Wan2.1_14b", "preset": "psa_fast"}, "preset": None}


def test_flat_prompt_written_on_0_3_64_executes(nodes):
    out = run(nodes, model_section="Wan2.1_1.3b", preset="psa_balanced")
    assert (out.section, out.name) == ("Wan2.1_1.3b", "psa_balanced")


def workflow_loaders():
    for path in sorted((REPO / "workflows").glob("*.json")):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "PSALoader":
                yield pytest.param(*node["widgets_values"], id=f"{path.stem}-{node['id']}")


class WanModel:
    """The MODEL socket value as far as 'auto' reads it (ComfyUI's detected unet_config)."""

    def __init__(self, dim, in_dim, out_dim):
        config = types.SimpleNamespace(unet_config={"image_model": "wan2.1", "model_type": "t2v", "dim": dim,
                                                    "in_dim": in_dim, "out_dim": out_dim})
        self.model = types.SimpleNamespace(model_config=config)


@pytest.mark.parametrize("section, preset", list(workflow_loaders()))
def test_example_workflow_values_execute_in_both_forms(nodes, section, preset):
    linked = {"model": WanModel(3072, 48, 48)} if section == "auto" else None  # the 5B workflow's model
    flat = run(nodes, linked, model_section=section, preset=preset)
    nested = run(nodes, linked, **{"model_section": section, "model_section.preset": preset})
    assert (flat.section, flat.name, flat.config) == (nested.section, nested.name, nested.config)
    assert flat.section == (section if section != "auto" else "Wan2.2_5B")


def test_a_preset_the_section_lacks_is_refused_naming_the_field_and_the_allowed_values(nodes):
    with pytest.raises(newest.PromptError) as refused:  # the nested form: ComfyUI's validation refuses it
        run(nodes, **{"model_section": "Wan2.1_14b", "model_section.preset": "psa_topk"})
    (error,) = refused.value.errors
    assert error["type"] == "value_not_in_list"
    assert error["details"].startswith("model_section.preset: 'psa_topk' not in ['default', 'baseline'")
    # the flat form passes validation (psa_topk is some section's preset): the node names the allowed ones
    with pytest.raises(ConfigError, match=r"preset: 'psa_topk' is not a preset of section 'Wan2.1_14b'; "
                                          r"allowed: default, baseline, psa_balanced, psa_quality, psa_fast, psa_turbo, psa_precise, "
                                          r"psa_fidelity"):
        run(nodes, model_section="Wan2.1_14b", preset="psa_topk")


def test_auto_with_a_preset_the_detected_section_lacks_says_what_auto_found(nodes):
    wan14 = WanModel(5120, 16, 16)
    with pytest.raises(ConfigError, match=r"preset: 'psa_topk' is not a preset of section 'Wan2.1_14b'; allowed: "
                                          r"default, .*\(model_section: auto detected Wan2.1_14b: hidden size 5120"):
        run(nodes, {"model": wan14}, **{"model_section": "auto", "model_section.preset": "psa_topk"})
    assert run(nodes, {"model": WanModel(1536, 16, 16)},
               **{"model_section": "auto", "model_section.preset": "psa_topk"}).section == "Wan2.1_1.3b"


def test_a_section_that_is_no_option_is_refused_naming_the_sections(nodes):
    # the newest executor drops a DynamicCombo value that is no option: execute gets no section
    with pytest.raises(ConfigError, match=r"model_section: unknown section; allowed: auto, Wan2.1_14b, "):
        run(nodes, model_section="Wan9_99b", preset="default")


def test_auto_without_a_model_asks_for_it(nodes):
    with pytest.raises(ConfigError, match="model_section: 'auto' needs the model input connected"):
        run(nodes, **{"model_section": "auto", "model_section.preset": "default"})
