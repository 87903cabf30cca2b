"""The plan picture: recorder, PSA Plan View's drawing, the CPU demo, bilingual messages (no ComfyUI)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pack_import import pack_module

config = pack_module("psa_kernels.config")
plan_plot = pack_module("psa_kernels.plan_plot")
plan_record = pack_module("nodes.plan_record")
plan_view = pack_module("nodes.plan_view")
patch = pack_module("nodes.patch")
messages = pack_module("nodes.messages")
demo = pack_module("psa_kernels.demo")
synthetic = pack_module("psa_kernels.synthetic")
presets = pack_module("nodes.presets")

GRID = (2, 8, 8)  # 128 tokens: 4 query blocks of 32, 8 key blocks of 16
CFG = config.PSAConfig.from_dict({"block_size": {"m": 32, "n": 16, "tile_n": 16}, "mask_mode": "topk",
                                  "mask_ratios": {1: [0, 0.25], 2: [0.25, 0.5], 4: [0.5, 0.625],
                                                  8: [0.625, 0.75], 0: [0.75, 1]}})


def _model(recorder):
    # as Apply PSA leaves it: the patch's override in the model's transformer options
    p = patch.PSAModelPatch(presets.PSAPreset("Wan2.1_1.3b", "t", CFG), recorder=recorder)
    return SimpleNamespace(model_options={"transformer_options": {patch.OVERRIDE_KEY: patch.PSAOverride(p)}})


def _run(recorder, steps=3, blocks=2, dense_steps=1):
    q, k, v = synthetic.structured_qkv(GRID, heads=2, head_dim=32, dtype=torch.float32, device="cpu")
    for step in range(steps):
        for block in range(blocks):
            if step < dense_steps:
                recorder.dense((step, steps), block, "warm-up")
            else:
                out, plan = recorder.attention(q, k, v, CFG, GRID, (step, steps), block)
                assert out.shape == q.shape
    return q, k


def test_recorder_keeps_densities_per_step_and_block_and_the_latest_maps():
    rec = plan_record.PlanRecorder()
    q, k = _run(rec)
    snap = rec.snapshot()
    assert snap.density.shape == (3, 2)
    assert np.all(snap.density[0] == 1.0)  # warm-up ran dense
    api = pack_module("psa_kernels.api")
    expected = float(pack_module("psa_kernels.levels").density(api.psa_plan(q, k, CFG, GRID).levels[0]).mean())
    assert snap.density[2, 1] == pytest.approx(expected)
    assert set(snap.maps) == {0, 1} and snap.maps[1].step == 2
    assert snap.maps[1].levels.shape == (2, 4, 8) and snap.maps[1].stride == (1, 1)
    # a new sampler run (step index back to 0) starts a new recording
    rec.dense((0, 3), 0, "warm-up")
    assert rec.snapshot().density.shape == (3, 1) and not rec.snapshot().maps


def test_plan_view_draws_an_image_and_says_what_is_missing():
    rec = plan_record.PlanRecorder()
    with pytest.raises(config.ConfigError, match="samples: no plan recorded"):
        plan_view.picture(_model(rec), "auto", 0)
    with pytest.raises(config.ConfigError, match="turn on record_plan"):
        plan_view.picture(_model(None), "auto", 0)
    with pytest.raises(config.ConfigError, match="not a model patched by Apply PSA"):
        plan_view.picture(SimpleNamespace(model_options={}), "auto", 0)
    _run(rec)
    image, summary = plan_view.picture(_model(rec), "auto", 1)
    assert summary.startswith("level maps of blocks: 0, 1; mean density per step: 1.000, 0.")
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 300 and image.shape[2] > 600
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    with pytest.raises(config.ConfigError, match=r"blocks: got '7'; allowed: 'auto', or up to 4 of the recorded blocks 0-1"):
        plan_view.picture(_model(rec), "7", 0)
    with pytest.raises(config.ConfigError, match="head: got 5; allowed: 0 to 1"):
        plan_view.picture(_model(rec), "0", 5)


def test_level_map_colours_follow_levels_and_tail_legend():
    lv = np.array([[1, 2, 4, 8, 0, 0]] * 6)
    assert plan_plot.map_density(lv) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 6)
    # with the tail a level-0 pair holds one pooled key for its block of 64: 1/64 (as PSAStats counts)
    assert plan_plot.map_density(lv, 64) == pytest.approx((1 + 0.5 + 0.25 + 0.125 + 2 / 64) / 6)
    skip = plan_plot.render_plan([plan_plot.LevelMap(lv, "skip", pooled_tail=False)])
    tail = plan_plot.render_plan([plan_plot.LevelMap(lv, "tail", pooled_tail=True)])
    assert skip.dtype == np.uint8 and skip.shape[-1] == 3
    # level 0 is white when skipped and coloured when kept as the pooled tail
    white = np.all(skip == 255, axis=-1).mean()
    assert white > np.all(tail == 255, axis=-1).mean()


def test_cpu_demo_prints_gpu_figures_not_cpu_timings(tmp_path, capsys):
    picture = tmp_path / "plan.png"
    demo.main(["--picture", str(picture), "--grid", "2", "8", "16", "--heads", "2", "--head-dim", "32"])
    out = capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("on a GPU the demo times the kernels")
    assert "speed-up" not in out and "Timings: not shown" in out
    assert "faster than cuDNN" in out and "wan13_topk" in out
    from PIL import Image
    with Image.open(picture) as img:
        assert img.size[0] > 600 and img.size[1] > 300


def test_messages_are_bilingual_with_widget_labels():
    text = messages.bilingual("level_2: got '0.3, 0.4'; allowed: a range that joins level_1 (0, 0.2)")
    en, cn = text.split("\n")
    assert en.startswith("level_2: got")
    assert cn.startswith("层级 2（level_2）：收到 '0.3, 0.4'；允许：") and "层级 1（level_1）" in cn


def test_unicode_preset_names_save(tmp_path):
    store = presets.PresetStore(user=tmp_path / "user.yaml")
    assert store.save("Wan2.1_1.3b", "稀疏_快速", CFG, overwrite=False) == "saved"
    assert "稀疏_快速" in store.library().sections["Wan2.1_1.3b"].attention_configs
    with pytest.raises(config.ConfigError, match="save_name: got 'a b'"):
        store.save("Wan2.1_1.3b", "a b", CFG, overwrite=False)
