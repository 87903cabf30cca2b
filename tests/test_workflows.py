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
PSA_NODES = {"PSALoader", "PSAPresetEditor", "ApplyPSA", "PSAPlanView"}
FRONTEND_NODES = {"Note", "MarkdownNote"}  # canvas-only nodes of ComfyUI's frontend, never sent to the server
# Loader node -> (widget index of the file name, folder under ComfyUI/models)
MODEL_LOADERS = {"CLIPLoader": (0, "text_encoders"), "UNETLoader": (0, "diffusion_models"), "VAELoader": (0, "vae")}
# Core node types the workflows use; checked against ComfyUI's source when COMFYUI_PATH is set.
CORE_NODES = {"CLIPLoader", "CLIPTextEncode", "UNETLoader", "VAELoader", "ModelSamplingSD3", "KSampler",
              "KSamplerAdvanced", "EmptyHunyuanLatentVideo", "Wan22ImageToVideoLatent", "LoadImage",
              "VAEDecode", "CreateVideo", "SaveVideo"}
EDITOR_WIDGETS = ("type", "description", "level_1", "level_2", "level_4", "level_8", "level_0", "mask_mode",
                  "attn_impl", "block_m", "block_n", "tile_n", "use_rearrange", "rearrange_method", "tile_size",
                  "use_sim_mask", "sim_thresholds", "warmup_steps", "verbose", "save_section", "save_name",
                  "overwrite", "use_pooled_tail", "estimate_method", "heavy_keys")
# the last three came later (optional inputs): workflows saved before them hold fewer values


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
    core = {n["type"] for n in nodes.values()} - PSA_NODES - FRONTEND_NODES
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
            first_blocks, last_steps, *record = n["widgets_values"]
            assert all(isinstance(v, int) and v >= 0 for v in (first_blocks, last_steps))
            assert record in ([], [True], [False])
    for n in nodes.values():
        if n["type"] == "PSAPresetEditor":
            assert len(EDITOR_WIDGETS) - 4 <= len(n["widgets_values"]) <= len(EDITOR_WIDGETS)
            widgets = dict(zip(EDITOR_WIDGETS, n["widgets_values"]))
            source = links[n["inputs"][0]["link"]][1]
            for key in ("save_section", "save_name", "overwrite"):
                widgets.pop(key)
            assert edit.edit_preset(loaded[source], **widgets)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_note_on_the_canvas_names_every_model_file_and_its_folder(path):
    wf = json.loads(path.read_text())
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] in FRONTEND_NODES]
    assert len(notes) == 1 and "PSA" in notes[0] and "中文" in notes[0]
    assert "psa_note" not in wf.get("extra", {})  # the canvas never showed it
    for n in wf["nodes"]:
        if n["type"] in MODEL_LOADERS:
            index, folder = MODEL_LOADERS[n["type"]]
            assert f"{folder}/{n['widgets_values'][index]}" in notes[0], (n["type"], n["widgets_values"])


def test_plan_view_in_the_first_workflow_follows_the_sampler():
    wf = json.loads((REPO / "workflows" / "wan2.1_t2v_1.3B_psa.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {link[0]: link for link in wf["links"]}
    view = next(n for n in wf["nodes"] if n["type"] == "PSAPlanView")
    model_src, samples_src = (nodes[links[i["link"]][1]] for i in view["inputs"])
    assert model_src["type"] == "ApplyPSA" and model_src["widgets_values"][2] is True
    assert samples_src["type"] == "KSampler"
