"""Example workflows (ComfyUI UI format): they parse, their links hold together, they name only
node types that exist, and their PSA widgets hold valid presets."""
import json
import os
import re
from pathlib import Path

import pytest

from pack_import import pack_module

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
PSA_NODES = {"PSALoader", "PSAPresetEditor", "ApplyPSA"}
# Core node types the workflows use; checked against ComfyUI's source when COMFYUI_PATH is set.
CORE_NODES = {"CLIPLoader", "CLIPTextEncode", "UNETLoader", "VAELoader", "ModelSamplingSD3", "KSampler",
              "KSamplerAdvanced", "EmptyHunyuanLatentVideo", "Wan22ImageToVideoLatent", "LoadImage",
              "VAEDecode", "CreateVideo", "SaveVideo"}
EDITOR_WIDGETS = ("type", "description", "level_1", "level_2", "level_4", "level_8", "level_0", "mask_mode",
                  "attn_impl", "block_m", "block_n", "tile_n", "use_rearrange", "rearrange_method", "tile_size",
                  "use_sim_mask", "sim_thresholds", "warmup_steps", "verbose", "save_section", "save_name",
                  "overwrite")


def comfyui_node_types() -> set[str] | None:
    """Node ids ComfyUI defines (nodes.py and comfy_extras), read from its source, or None."""
    root = os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "nodes.py").is_file():
        return None
    text = "\n".join(p.read_text(errors="replace") for p in [Path(root) / "nodes.py",
                                                             *(Path(root) / "comfy_extras").glob("*.py")])
    return set(re.findall(r'node_id\s*=\s*"([^"]+)"', text)) | set(re.findall(r'^\s*"([A-Za-z0-9_]+)"\s*:\s*[A-Za-z_]',
                                                                             text, re.M))


def test_the_three_example_workflows_exist():
    assert {p.name for p in WORKFLOWS} == {"wan2.1_t2v_1.3B_psa.json", "wan2.2_a14b_t2v_psa.json",
                                           "wan2.2_ti2v_5B_psa.json"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_well_formed_and_uses_known_nodes(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, type_ in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == type_
    known = comfyui_node_types()
    core = {n["type"] for n in nodes.values()} - PSA_NODES
    assert core <= (known if known is not None else CORE_NODES), core - (known or CORE_NODES)
    assert {"PSALoader", "ApplyPSA"} <= {n["type"] for n in nodes.values()}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_psa_widgets_hold_valid_presets(path):
    lib = pack_module("nodes.presets").PresetStore(user=None, user_from_env=False).library()
    edit = pack_module("nodes.edit")
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    loaded = {}
    for n in nodes.values():
        if n["type"] == "PSALoader":
            section, preset = n["widgets_values"]
            if section == "auto":  # needs the model input to pick the section
                assert n["inputs"][0]["link"] is not None
                assert preset == "default" or preset in lib.preset_names()
            else:
                loaded[n["id"]] = lib.resolve(section, preset).config
        elif n["type"] == "ApplyPSA":
            assert len(n["widgets_values"]) == 2 and all(isinstance(v, int) and v >= 0 for v in n["widgets_values"])
    for n in nodes.values():
        if n["type"] == "PSAPresetEditor":
            widgets = dict(zip(EDITOR_WIDGETS, n["widgets_values"], strict=True))
            source = links[n["inputs"][0]["link"]][1]
            for key in ("save_section", "save_name", "overwrite"):
                widgets.pop(key)
            assert edit.edit_preset(loaded[source], **widgets)
