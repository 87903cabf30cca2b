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
    _, summary_zh = plan_view.picture(_model(rec), "auto", 1, "中文")   # the line follows the node's language
    assert summary_zh.startswith("层级图所示的块：0, 1；每步的平均密度：1.000, 0.")
    assert summary_zh.split("：")[-1] == summary.split(": ")[-1]
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


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text().strip()]


def _missing_glyphs(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _figure(language):
    lv = np.array([[1, 2, 4, 8, 0, 0]] * 6)
    density = np.array([[1.0, 1.0], [0.4, np.nan], [0.3, 0.2]])
    return plan_plot.plan_figure([plan_plot.LevelMap(lv, "panel", pooled_tail=True, block_n=64)], density,
                                 title="title", language=language)


def test_chinese_picture_text_in_a_cjk_font_without_missing_glyphs():
    if plan_plot.cjk_font() is None:
        pytest.skip("no font with Chinese glyphs installed (e.g. apt-get install fonts-noto-cjk): the Chinese "
                    "picture is not drawn here")
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zh, en = _figure("zh"), _figure("en")
        # the check is a real one: Chinese text in matplotlib's default font does warn
        plain = Figure()
        FigureCanvasAgg(plain)
        plain.suptitle("密度")
        plain.canvas.draw()
    assert len(_missing_glyphs(caught)) == 2, [str(w.message) for w in caught]  # 密 and 度, from `plain` only
    zh_texts, en_texts = _texts(zh), _texts(en)
    for word in ("key 块", "query 块", "采样步", "transformer 块", "每一步每个块的密度（1 = 全注意力）",
                 "每个（query 块, key 块）对的层级，括号内为所占比例"):
        assert word in zh_texts, (word, zh_texts)
    assert {"1 全分辨率 (17%)", "2 池化 (17%)", "尾部（池化） (33%)", "panel\n密度 0.318"} <= set(zh_texts)
    assert {"key block", "sampling step", "1 full (17%)", "tail (pooled) (33%)", "panel\ndensity 0.318"} <= set(en_texts)
    assert not set(en_texts) & {"key 块", "采样步", "密度"} and "key block" not in zh_texts
    from matplotlib.text import Text
    label = next(t for t in zh.findobj(Text) if t.get_text() == "key 块")
    assert label.get_fontfamily()[0] == plan_plot.cjk_font()
    # the two pictures differ in their pixels, not only in their text objects
    rgb = [np.asarray(f.canvas.buffer_rgba())[..., :3] for f in (zh, en)]
    assert rgb[0].shape == rgb[1].shape and np.abs(rgb[0].astype(int) - rgb[1]).sum() > 0


def test_chinese_picture_falls_back_to_english_without_a_cjk_font(monkeypatch, caplog):
    monkeypatch.setattr(plan_plot, "cjk_font", lambda: None)
    monkeypatch.setattr(plan_plot, "_warned", set())
    with caplog.at_level("WARNING", logger="psa"):
        texts = [_texts(_figure("zh")) for _ in range(2)]
    assert texts[0] == texts[1] == _texts(_figure("en"))
    assert "key block" in texts[0] and not any("块" in t for t in texts[0])
    lines = [r.getMessage() for r in caplog.records if "no font with Chinese glyphs" in r.getMessage()]
    assert len(lines) == 1 and "drawn in English" in lines[0] and "fonts-noto-cjk" in lines[0]
    # the node: the same picture as the English one, pixel for pixel
    rec = plan_record.PlanRecorder()
    _run(rec)
    zh_image, _ = plan_view.picture(_model(rec), "auto", 0, "中文")
    en_image, _ = plan_view.picture(_model(rec), "auto", 0, "English")
    assert torch.equal(zh_image, en_image)


def test_plan_view_language_input(monkeypatch):
    rec = plan_record.PlanRecorder()
    _run(rec)
    with pytest.raises(config.ConfigError, match="language: got 'fr'; allowed: English, 中文"):
        plan_view.picture(_model(rec), "auto", 0, "fr")
    drawn = {}
    monkeypatch.setattr(plan_plot, "render_plan",
                        lambda panels, density, title, language: drawn.update(
                            panels=[p.title for p in panels], title=title, language=language) or np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr(plan_plot, "cjk_font", lambda: "Some CJK Font")
    plan_view.picture(_model(rec), "auto", 1, "中文")
    assert drawn == {"panels": ["块 0，注意力头 1，第 3 步", "块 1，注意力头 1，第 3 步"],
                     "title": "上一次采样的 PSA 计划：token 网格 2x8x8，3 步", "language": "zh"}
    plan_view.picture(_model(rec), "auto", 1, "English")
    assert drawn["panels"][0] == "block 0, head 1, step 3" and drawn["language"] == "en"
    assert drawn["title"] == "PSA plan of the last sampler run: token grid 2x8x8, 3 steps"


@pytest.mark.parametrize("language", ["en", "zh"])
def test_cpu_demo_prints_gpu_figures_not_cpu_timings(tmp_path, capsys, language):
    picture = tmp_path / "plan.png"
    demo.main(["--picture", str(picture), "--grid", "2", "8", "16", "--heads", "2", "--head-dim", "32",
               "--language", language])
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
