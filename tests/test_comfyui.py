"""The pack in real ComfyUI ($COMFYUI_PATH): loaded by ComfyUI's custom-node loader, prompts run
by its executor on a tiny random-weight Wan model that ComfyUI's own detection and loader read.
Without COMFYUI_PATH every test here is skipped, with a warning saying so."""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from comfy_harness import (PACK_FOLDER, ComfyServer, comfyui_path_or_skip, execution_error, make_tiny_wan,
                           new_base)

MODEL_A, MODEL_B = "tiny_wan_a.safetensors", "tiny_wan_b.safetensors"
STEPS = 3
NODE_IDS = ("PSALoader", "PSAPresetEditor", "ApplyPSA")
EDITOR_KEEP = {
    "type": "keep", "description": "", "level_1": "keep", "level_2": "keep", "level_4": "keep",
    "level_8": "keep", "level_0": "keep", "mask_mode": "keep", "attn_impl": "keep", "block_m": "keep",
    "block_n": "keep", "tile_n": "keep", "use_rearrange": "keep", "rearrange_method": "keep",
    "tile_size": "keep", "use_sim_mask": "keep", "sim_thresholds": "keep", "warmup_steps": -1,
    "verbose": "keep", "save_section": "incoming", "save_name": "", "overwrite": False,
}


@pytest.fixture(scope="module")
def comfy() -> Path:
    return comfyui_path_or_skip()


@pytest.fixture(scope="module")
def server(comfy, tmp_path_factory):
    base = new_base(tmp_path_factory.mktemp("comfy"), comfy)
    make_tiny_wan(comfy, base / "models" / "diffusion_models" / MODEL_A, seed=1)
    make_tiny_wan(comfy, base / "models" / "diffusion_models" / MODEL_B, seed=2)
    # For the TorchCompileModel test: dynamo reports recompiles in the log, and inductor writes
    # its generated code to a cache of this server's own, so a compile there happened here.
    srv = ComfyServer(comfy, base, env={"TORCH_LOGS": "recompiles",
                                        "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor")})
    yield srv
    srv.stop()


# ---------------------------------------------------------------------- prompt building
class Graph:
    """An API-format prompt built node by node."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> list:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    def common(self, cfg: float = 5.0):
        """Conditioning and an empty 256x256x9 latent: a 3x16x16 = 768-token video grid."""
        pos = self.add("PSATestTextEmbeds", seed=11, tokens=16)
        neg = self.add("PSATestTextEmbeds", seed=12, tokens=16)
        latent = self.add("EmptyHunyuanLatentVideo", width=256, height=256, length=9, batch_size=1)
        return pos, neg, latent, cfg

    def psa(self, model, section="Wan2.1_1.3b", preset="psa_balanced", dense_first_blocks=0,
            dense_last_steps=0, **edits) -> list:
        cfg = self.add("PSALoader", model_section=section, preset=preset)
        if edits:
            cfg = self.add("PSAPresetEditor", psa_config=cfg, **{**EDITOR_KEEP, **edits})
        return self.add("ApplyPSA", model=model, psa_config=cfg, dense_first_blocks=dense_first_blocks,
                        dense_last_steps=dense_last_steps)

    def sample(self, model, common, name: str, latent=None) -> None:
        pos, neg, empty, cfg = common
        out = self.add("KSampler", model=model, seed=7, steps=STEPS, cfg=cfg, sampler_name="euler",
                       scheduler="simple", positive=pos, negative=neg, latent_image=latent or empty,
                       denoise=1.0)
        self.save(out, name)

    def save(self, latent, name: str) -> None:
        self.add("SaveLatent", samples=latent, filename_prefix=f"psa_tests/{name}_{uuid.uuid4().hex[:6]}")


def run_ok(server: ComfyServer, graph: Graph) -> dict[str, torch.Tensor]:
    """Run the prompt; the saved latents by name."""
    entry = server.run(graph.nodes)
    assert "rejected" not in entry, entry
    assert execution_error(entry) is None, execution_error(entry) + "\n" + server.log_tail()
    latents = {}
    for out in entry["outputs"].values():
        for f in out.get("latents", []):
            name = f["filename"].split("_")[0]
            latents[name] = load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]
    return latents


def run_error(server: ComfyServer, graph: Graph) -> str:
    entry = server.run(graph.nodes)
    if "rejected" in entry:
        return json.dumps(entry["rejected"])
    err = execution_error(entry)
    assert err is not None, "the prompt was expected to fail"
    return err


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def user_file(server: ComfyServer) -> Path:
    return server.base / "user" / "default" / "psa" / "attention_presets.yaml"


# ---------------------------------------------------------------------- tests
def test_nodes_listed_with_inputs_and_locales(server):
    info = server.get("/object_info")
    names = {"PSALoader": "PSA Loader", "PSAPresetEditor": "PSA Preset Editor", "ApplyPSA": "Apply PSA"}
    for node_id, display in names.items():
        node = info[node_id]
        assert node["display_name"] == display and node["category"] == "PSA"
        assert node["python_module"] == f"custom_nodes.{PACK_FOLDER}"
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert inputs and all(spec[1].get("tooltip") for spec in inputs.values()), node_id
    loader = info["PSALoader"]["input"]
    assert loader["required"]["model_section"][1]["options"][0] == "auto"
    assert {"Wan2.1_14b", "Wan2.1_1.3b", "Wan2.2_A14B", "Wan2.2_5B", "CogVideo1.5_5b",
            "CogVideo_5b"} <= set(loader["required"]["model_section"][1]["options"])
    assert {"default", "baseline", "psa_balanced", "psa_topk"} <= set(loader["required"]["preset"][1]["options"])
    assert loader["optional"]["model"][0] == "MODEL"
    assert info["PSALoader"]["output"] == ["PSA_CONFIG"]
    assert info["PSAPresetEditor"]["input"]["optional"]["psa_config"][0] == "PSA_CONFIG"
    assert info["ApplyPSA"]["output"] == ["MODEL"]
    editor_inputs = set(info["PSAPresetEditor"]["input"]["required"])
    assert editor_inputs == set(EDITOR_KEEP)
    i18n = server.get("/i18n")
    for lang in ("en", "zh"):
        defs = i18n[lang]["nodeDefs"]
        for node_id in NODE_IDS:
            node = info[node_id]
            inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
            assert set(defs[node_id]["inputs"]) == set(inputs), (lang, node_id)
            assert all(v.get("tooltip") for v in defs[node_id]["inputs"].values()), (lang, node_id)
    assert i18n["en"]["nodeDefs"]["ApplyPSA"]["display_name"] == "Apply PSA"


def test_baseline_bit_identical_psa_close_unpatched_unaffected(server):
    g = Graph()
    common = g.common(cfg=5.0)  # cfg > 1: cond and uncond go through the model as a batch of 2
    model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    g.sample(model, common, "ref")
    g.sample(g.psa(model, preset="baseline"), common, "baseline")
    psa_model = g.psa(model, preset="psa_topk", warmup_steps=0)
    pos, neg, empty, cfg = common
    psa_out = g.add("KSampler", model=psa_model, seed=7, steps=STEPS, cfg=cfg, sampler_name="euler",
                    scheduler="simple", positive=pos, negative=neg, latent_image=empty, denoise=1.0)
    g.save(psa_out, "psa")
    # The unpatched model once more, after the patched one has run: its input is the PSA result
    # times 0 plus the empty latent, i.e. exactly the empty latent, but it must wait for PSA.
    zero = g.add("LatentMultiply", samples=psa_out, multiplier=0.0)
    after = g.add("LatentAdd", samples1=zero, samples2=empty)
    g.sample(model, common, "after", latent=after)
    out = run_ok(server, g)
    assert torch.equal(out["baseline"], out["ref"])
    assert torch.equal(out["after"], out["ref"])
    diff = rel_diff(out["psa"], out["ref"])
    assert 1e-4 < diff < 0.5, diff


def test_schedule_controls_and_verbose_density_log(server):
    g = Graph()
    common = g.common()
    model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    g.sample(model, common, "ref")
    g.sample(g.psa(model, preset="psa_topk", warmup_steps=STEPS), common, "warmup")
    g.sample(g.psa(model, preset="psa_topk", warmup_steps=0, dense_last_steps=STEPS), common, "last")
    g.sample(g.psa(model, preset="psa_topk", warmup_steps=0, dense_first_blocks=2), common, "blocks")
    g.sample(g.psa(model, preset="psa_topk", warmup_steps=0, dense_first_blocks=1, verbose="true"),
             common, "firstdense")
    g.sample(g.psa(model, preset="psa_topk", warmup_steps=0), common, "psa")
    out = run_ok(server, g)
    for name in ("warmup", "last", "blocks"):  # every self-attention call scheduled dense
        assert torch.equal(out[name], out["ref"]), name
    assert not torch.equal(out["firstdense"], out["ref"])
    assert not torch.equal(out["firstdense"], out["psa"])
    log = server.log_text()
    assert f"[PSA] step 1/{STEPS} grid 3x16x16: mean density" in log
    assert "per block 0:first blocks 1:0." in log


def test_wan22_pair_of_models_with_ksampler_advanced(server):
    g = Graph()
    pos, neg, empty, cfg = g.common()
    high = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    low = g.add("UNETLoader", unet_name=MODEL_B, weight_dtype="default")

    def pair(high_model, low_model, name):
        first = g.add("KSamplerAdvanced", model=high_model, add_noise="enable", noise_seed=5, steps=4, cfg=cfg,
                      sampler_name="euler", scheduler="simple", positive=pos, negative=neg, latent_image=empty,
                      start_at_step=0, end_at_step=2, return_with_leftover_noise="enable")
        second = g.add("KSamplerAdvanced", model=low_model, add_noise="disable", noise_seed=0, steps=4, cfg=cfg,
                       sampler_name="euler", scheduler="simple", positive=pos, negative=neg, latent_image=first,
                       start_at_step=2, end_at_step=10000, return_with_leftover_noise="disable")
        g.save(second, name)

    pair(high, low, "ref")
    pair(g.psa(high, section="Wan2.2_A14B", preset="baseline"),
         g.psa(low, section="Wan2.2_A14B", preset="baseline"), "baseline")
    pair(g.psa(high, section="Wan2.2_A14B", preset="psa_balanced", warmup_steps=0, block_m="64"),
         g.psa(low, section="Wan2.2_A14B", preset="psa_balanced", warmup_steps=0, block_m="64"), "psa")
    out = run_ok(server, g)
    assert torch.equal(out["baseline"], out["ref"])
    diff = rel_diff(out["psa"], out["ref"])
    assert 1e-4 < diff < 0.5, diff


def test_attention_backend_node_before_or_after_apply_psa(server):
    """A node that replaces the attention override after Apply PSA (newer ComfyUI's "Model
    Attention Backend"; a test node here) neither switches PSA off nor is dropped: PSA is put
    back in front each step and passes the calls it declines to it, so both orders agree."""
    g = Graph()
    common = g.common()
    model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    backend = g.add("PSATestAttentionBackend", model=model)
    g.sample(backend, common, "backend")
    g.sample(g.add("PSATestAttentionBackend", model=g.psa(model, preset="psa_topk", warmup_steps=0)), common, "after")
    g.sample(g.psa(backend, preset="psa_topk", warmup_steps=0), common, "before")
    start = len(server.log_text())
    out = run_ok(server, g)
    log = server.log_text()[start:]
    assert torch.equal(out["after"], out["before"])
    assert rel_diff(out["after"], out["backend"]) > 1e-3
    assert "PSA is put back in front" in log and "ran PSA" in log
    assert "[PSATestAttentionBackend] ran attention_pytorch" in log
    assert "cross-attention and other lengths: ran " in log and "PSATestAttentionBackend.patch." \
                                                                 "optimized_attention_override -> attention_pytorch" in log


NO_TRITON = """import sys
sys.modules["triton"] = None  # import triton fails; importlib.util.find_spec("triton") is None
print("[psa-test] Triton made unimportable in this process", flush=True)
"""


def test_pack_loads_and_runs_without_triton(comfy, tmp_path):
    """Windows without triton-windows, macOS, CPU-only installs: ComfyUI loads the nodes and Apply
    PSA runs (here PSA's torch path on the CPU; on a GPU it would leave attention to ComfyUI)."""
    base = new_base(tmp_path, comfy)
    make_tiny_wan(comfy, base / "models" / "diffusion_models" / MODEL_A, seed=1)
    site = tmp_path / "no_triton"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TRITON)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    srv = ComfyServer(comfy, base, env={"PYTHONPATH": pythonpath})
    try:
        assert set(NODE_IDS) <= set(srv.get("/object_info"))
        g = Graph()
        common = g.common()
        model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
        g.sample(model, common, "ref")
        g.sample(g.psa(model, preset="psa_topk", warmup_steps=0), common, "psa")
        out = run_ok(srv, g)
        assert rel_diff(out["psa"], out["ref"]) > 1e-3
        log = srv.log_text()
        assert "[psa-test] Triton made unimportable" in log and "ran PSA" in log
        assert "Traceback" not in log and "IMPORT FAILED" not in log
    finally:
        srv.stop()


def test_torch_compile_model_runs_psa(server):
    """ComfyUI's TorchCompileModel (inductor) over Apply PSA: PSA runs inside the compiled model,
    the result is the uncompiled one, and PSA's per-call bookkeeping never makes dynamo recompile."""
    def prompt(compiled: bool) -> Graph:
        g = Graph()
        common = g.common()
        model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
        # warm-up 1 of 3 steps: one dense step, then PSA, so the schedule changes under compile
        psa = g.psa(model, preset="psa_balanced", warmup_steps=1, verbose="true")
        if compiled:
            g.sample(g.add("TorchCompileModel", model=psa, backend="inductor"), common, "compiled")
        else:
            g.sample(model, common, "ref")
            g.sample(psa, common, "eager")
        return g

    out = run_ok(server, prompt(compiled=False))
    start = len(server.log_text())
    compiled = run_ok(server, prompt(compiled=True))["compiled"]
    log = server.log_text()[start:]
    assert any(p.suffix == ".cpp" for p in (server.base / "inductor").rglob("*")), "inductor compiled nothing"
    density = dict(re.findall(rf"\[PSA\] step (\d+)/{STEPS} grid 3x16x16: mean density (\S+);", log))
    assert density.get("1") == "-", log  # the warm-up step: the model's own attention
    assert all(0 < float(density[str(s)]) < 1 for s in range(2, STEPS + 1)), density  # sparse: PSA ran
    recompiled = [line for line in log.splitlines() if "Recompiling function" in line and PACK_FOLDER in line]
    assert not recompiled, "\n".join(recompiled)
    # fp32 on the CPU: inductor fuses and reorders the model's reductions, which moves the result
    # by ~1e-6 relative over 3 steps; 1e-4 leaves room for that and stays far below the change
    # PSA itself makes, so a compiled model that had lost PSA would fail.
    assert rel_diff(out["eager"], out["ref"]) > 1e-3
    diff = rel_diff(compiled, out["eager"])
    assert diff < 1e-4, diff


def test_auto_section_needs_a_known_model(server):
    g = Graph()
    common = g.common()
    model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    cfg = g.add("PSALoader", model_section="auto", preset="default", model=model)
    g.sample(g.add("ApplyPSA", model=model, psa_config=cfg, dense_first_blocks=0, dense_last_steps=0), common, "x")
    err = run_error(server, g)
    assert "auto does not know a Wan model of hidden size 256" in err and "Wan2.1_1.3b" in err


def test_bad_inputs_fail_the_prompt_clearly(server):
    shipped = server.base / "custom_nodes" / PACK_FOLDER / "configs" / "attention_config.yaml"
    shipped_before = shipped.read_bytes()

    def prompt(**kw):
        g = Graph()
        common = g.common()
        model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
        g.sample(g.psa(model, **kw), common, "x")
        return g

    err = run_error(server, prompt(preset="no_such_preset"))
    assert "no_such_preset" in err and "preset" in err
    err = run_error(server, prompt(section="Wan2.1_14b", preset="psa_topk"))
    assert "'psa_topk' is not a preset of section 'Wan2.1_14b'" in err and "psa_balanced" in err
    # one changed range moves its kept neighbours; two changed ranges that do not join name the widget
    err = run_error(server, prompt(level_1="0, 0.2", level_2="0.3, 0.4"))
    assert "level_2: got '0.3, 0.4'; allowed: a range that joins level_1" in err and "层级 2（level_2）" in err
    err = run_error(server, prompt(level_1="half"))
    assert "level_1" in err and "lo, hi" in err
    err = run_error(server, prompt(save_name="psa_balanced", warmup_steps=3))
    assert "already exists" in err and "overwrite" in err
    assert not user_file(server).exists()
    assert shipped.read_bytes() == shipped_before


def test_saved_preset_is_listed_and_loads(server):
    def save(**kw):
        g = Graph()
        cfg = g.add("PSALoader", model_section="Wan2.1_1.3b", preset="psa_topk")
        edited = g.add("PSAPresetEditor", psa_config=cfg, **{**EDITOR_KEEP, "save_name": "my_fast", **kw})
        g.add("PreviewAny", source=edited)  # shows the preset as YAML; no sampling needed to save
        return g

    entry = server.run(save(warmup_steps=0).nodes)
    assert execution_error(entry) is None, execution_error(entry)
    preview = next(o["text"][0] for o in entry["outputs"].values() if "text" in o)
    assert preview.startswith("# section: Wan2.1_1.3b") and "my_fast:" in preview and "warmup_steps: 0" in preview
    saved = yaml.safe_load(user_file(server).read_text())
    assert saved["Wan2.1_1.3b"]["attention_configs"]["my_fast"]["warmup_steps"] == 0
    assert saved["Wan2.1_1.3b"]["attention_configs"]["my_fast"]["mask_mode"] == "topk"
    options = server.get("/object_info/PSALoader")["PSALoader"]["input"]["required"]["preset"][1]["options"]
    assert "my_fast" in options  # listed on the next refresh of the node definitions
    assert execution_error(server.run(save(warmup_steps=0).nodes)) is None  # same preset again: no-op
    before = user_file(server).read_bytes()
    err = execution_error(server.run(save(warmup_steps=5).nodes))
    assert err and "already exists" in err
    assert user_file(server).read_bytes() == before
    assert execution_error(server.run(save(warmup_steps=5, overwrite=True).nodes)) is None
    assert yaml.safe_load(user_file(server).read_text())["Wan2.1_1.3b"]["attention_configs"]["my_fast"][
        "warmup_steps"] == 5
    g = Graph()
    common = g.common()
    model = g.add("UNETLoader", unet_name=MODEL_A, weight_dtype="default")
    g.sample(g.psa(model, preset="my_fast"), common, "mine")
    run_ok(server, g)


def test_yaml_preset_added_by_hand_and_malformed_user_file(comfy, tmp_path):
    """The seed's way (a preset under the section in attention_config.yaml) after a restart, and
    a broken user presets file: ComfyUI starts, the shipped presets stay, the UI and log say why."""
    base = new_base(tmp_path, comfy)
    shipped = base / "custom_nodes" / PACK_FOLDER / "configs" / "attention_config.yaml"
    data = yaml.safe_load(shipped.read_text())
    data["Wan2.1_1.3b"]["attention_configs"]["my_custom_preset"] = {
        "type": "psa", "description": "added by hand", "use_rearrange": True, "use_sim_mask": False,
        "block_size": {"m": 128, "n": 64, "tile_n": 32},
        "mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]},
        "mask_mode": "thresholdbound", "attn_impl": "new_mask_type", "tile_size": [2, 8, 8],
        "warmup_steps": 10, "rearrange_method": "Gilbert", "verbose": False,
        "sim_thresholds": {"x2": 0.7, "x4": 0.65, "x8": 0.6}}
    shipped.write_text(yaml.safe_dump(data, sort_keys=False))
    broken = base / "user" / "default" / "psa" / "attention_presets.yaml"
    broken.parent.mkdir(parents=True)
    broken.write_text("Wan2.1_1.3b:\n  attention_configs:\n    mine: {type: psa\n")
    broken_bytes = broken.read_bytes()
    srv = ComfyServer(comfy, base)
    try:
        loader = srv.get("/object_info/PSALoader")["PSALoader"]
        options = loader["input"]["required"]["preset"][1]["options"]
        assert {"my_custom_preset", "baseline", "psa_balanced", "psa_topk", "psa_4steps"} <= set(options)
        assert "WARNING" in loader["description"] and "malformed YAML" in loader["description"]
        assert "malformed YAML" in srv.log_text() and "line 4" in srv.log_text()
        g = Graph()
        cfg = g.add("PSALoader", model_section="Wan2.1_1.3b", preset="my_custom_preset")
        g.add("PreviewAny", source=g.add("PSAPresetEditor", psa_config=cfg, **{**EDITOR_KEEP, "save_name": "another"}))
        err = execution_error(srv.run(g.nodes))
        assert err and "cannot save" in err and "malformed YAML" in err and "nothing was written" in err
        assert broken.read_bytes() == broken_bytes
    finally:
        srv.stop()
