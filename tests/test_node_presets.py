"""Preset store: shipped file, user file merged over it, saving, and broken files (no ComfyUI)."""
import pytest
import yaml

from pack_import import pack_module

presets = pack_module("nodes.presets")
config = pack_module("psa_kernels.config")
ConfigError, PSAConfig = config.ConfigError, config.PSAConfig
SHIPPED = presets.SHIPPED_FILE


def store(tmp_path, user_text=None, shipped=SHIPPED):
    user = tmp_path / "user" / "attention_presets.yaml"
    if user_text is not None:
        user.parent.mkdir(parents=True, exist_ok=True)
        user.write_text(user_text)
    return presets.PresetStore(shipped=shipped, user=user), user


def test_shipped_file_has_every_section_with_a_dense_baseline(tmp_path):
    lib, _ = store(tmp_path)
    lib = lib.library()
    assert lib.problems == []
    for name in ("Wan2.1_14b", "Wan2.1_1.3b", "Wan2.2_A14B", "Wan2.2_5B", "CogVideo1.5_5b", "CogVideo_5b",
                 "Wan2.1_14b_I2V", "Wan2.2_A14B_I2V", "Wan2.1_Fun", "Wan2.1_VACE"):
        section = lib.sections[name]
        assert section.attention_configs["baseline"].is_dense
        assert section.default_attention in section.attention_configs
        assert all(not p.verbose for p in section.attention_configs.values())
    wan14 = lib.resolve("Wan2.1_14b", "default")
    assert wan14.name == "psa_quality" and wan14.config.use_pooled_tail
    assert wan14.config.estimate_method == "block_mean"
    balanced = lib.resolve("Wan2.1_14b", "psa_balanced").config  # the seed's preset keeps its meaning
    assert balanced.mask_ratios[8] == (0.6, 0.8) and not balanced.use_pooled_tail
    assert balanced.estimate_method == "sampled"
    assert wan14.config.warmup_steps == 15 and wan14.config.attn_impl == "new_mask_type"
    assert lib.sections["Wan2.2_5B"].video_scale.width_divisor == 32
    assert lib.resolve("CogVideo_5b", "psa_4steps").config.warmup_steps == 0
    assert lib.sections["CogVideo1.5_5b"].text_length == 226


def test_wan_sections_ship_psa_fidelity_as_psa_quality_on_wider_shares(tmp_path):
    # what configs/README.md says of it: psa_quality's pyramid with every cut x 1.5, the tail,
    # 128 heavy keys, and each section's psa_quality routing
    lib = store(tmp_path)[0].library()
    wan = [name for name in lib.sections if name.startswith("Wan")]
    assert len(wan) == 8
    for name in wan:
        quality = lib.resolve(name, "psa_quality").config
        fidelity = lib.resolve(name, "psa_fidelity").config
        for lvl, (lo, hi) in quality.mask_ratios.items():
            want_lo, want_hi = (round(1.5 * lo, 4), round(min(1.0, 1.5 * hi), 4) if lvl else 1.0)
            assert fidelity.mask_ratios[lvl] == pytest.approx((want_lo, want_hi)), (name, lvl)
        assert fidelity.use_pooled_tail and fidelity.heavy_keys == 128 and fidelity.uses_pooled_levels
        assert fidelity.estimate_method == quality.estimate_method, name
        assert fidelity.block_size == quality.block_size and fidelity.mask_mode == quality.mask_mode == "topk"


def test_tail_presets_correct_the_tail_for_key_spread_and_the_seed_presets_do_not(tmp_path):
    # configs/README.md: every preset with the pooled tail uses tail_correction: variance
    # (benchmarks/NOTES.md change 41); the research code's presets keep their meaning
    lib = store(tmp_path)[0].library()
    tails = 0
    for section in lib.sections.values():
        for name, cfg in section.attention_configs.items():
            if cfg.is_dense:
                continue
            if cfg.use_pooled_tail:
                tails += 1
                assert cfg.tail_correction == "variance", name
            else:
                assert cfg.tail_correction == "none", name
            if name in ("psa_balanced", "psa_topk"):
                assert not cfg.use_pooled_tail, name
    # psa_quality, psa_fast, psa_turbo, psa_precise, psa_fidelity in each of the eight Wan sections
    assert tails == 40


FOURTEEN_B = ("Wan2.1_14b", "Wan2.2_A14B", "Wan2.1_14b_I2V", "Wan2.2_A14B_I2V", "Wan2.1_VACE")
SMALL = ("Wan2.1_1.3b", "Wan2.2_5B", "Wan2.1_Fun")


def test_wan_sections_ship_psa_turbo_as_a_psa_fast_on_blocks_of_128(tmp_path):
    # configs/README.md: psa_turbo is psa_fast on key blocks of 128 with level 1 on 1% of them (14B
    # sections) or 2% (the 480p-sized 1.3B, 5B and Fun sections), read in place, routed from block
    # means (benchmarks/NOTES.md changes 43, 44 and 49)
    from psa_kernels import api
    lib = store(tmp_path)[0].library()
    have = sorted(name for name, s in lib.sections.items() if "psa_turbo" in s.attention_configs)
    assert have == sorted(FOURTEEN_B + SMALL)
    for name in FOURTEEN_B + SMALL:
        fast = lib.resolve(name, "psa_fast").config
        turbo = lib.resolve(name, "psa_turbo").config
        share = 0.01 if name in FOURTEEN_B else 0.02
        assert turbo.block_size.n == 128 and turbo.level1_block_share == pytest.approx(share)
        assert turbo.estimate_method == "block_mean" and turbo.heavy_keys == 128
        assert turbo.replace(block_size=fast.block_size, mask_ratios=fast.mask_ratios,
                             estimate_method=fast.estimate_method,
                             description=fast.description) == fast.replace(description=fast.description)
        assert api.reads_level1_in_place(turbo) and not api.reads_level1_in_place(fast)
        assert lib.sections[name].default_attention != "psa_turbo"


def test_resolve_errors_name_the_allowed_values(tmp_path):
    lib = store(tmp_path)[0].library()
    with pytest.raises(ConfigError, match=r"preset: 'psa_topk' is not a preset of section 'Wan2.1_14b'; "
                                          r"allowed: default, baseline, psa_balanced"):
        lib.resolve("Wan2.1_14b", "psa_topk")
    with pytest.raises(ConfigError, match="model_section: unknown section 'Nope'"):
        lib.resolve("Nope", "default")


def test_user_file_merges_over_shipped(tmp_path):
    user_text = """
Wan2.1_1.3b:
  default_attention: mine
  attention_configs:
    mine: {type: psa, warmup_steps: 3}
    psa_topk: {type: psa, mask_mode: topk, warmup_steps: 1}
NewModel:
  attention_configs:
    only: {type: dense}
"""
    lib = store(tmp_path, user_text)[0].library()
    assert lib.problems == []
    section = lib.sections["Wan2.1_1.3b"]
    assert section.default_attention == "mine"
    assert section.attention_configs["psa_topk"].warmup_steps == 1       # user wins
    assert section.attention_configs["psa_balanced"].use_sim_mask          # shipped kept
    assert section.video_scale.width_divisor == 16                        # shipped field kept
    assert lib.resolve("NewModel", "default").config.is_dense
    assert "mine" in lib.preset_names() and "only" in lib.preset_names()


def test_malformed_user_yaml_keeps_every_shipped_preset(tmp_path):
    lib = store(tmp_path, "Wan2.1_1.3b:\n  attention_configs:\n    x: {type: psa\n")[0].library()
    shipped = store(tmp_path / "clean")[0].library()
    assert {k: v.attention_configs for k, v in lib.sections.items()} == \
           {k: v.attention_configs for k, v in shipped.sections.items()}
    assert len(lib.problems) == 1
    problem = lib.problems[0]
    assert problem.file == str(tmp_path / "user" / "attention_presets.yaml") and problem.line == 4
    assert "malformed YAML" in problem.message and "line 4" in str(problem)


def test_bad_user_preset_or_field_falls_back_to_shipped(tmp_path):
    user_text = """
Wan2.1_14b:
  video_scale: {width_divisor: 0}
  attention_configs:
    psa_balanced: {type: psa, mask_ratios: {1: [0.0, 0.5], 0: [0.6, 1.0]}}
    broken: {type: psa, block_size: {m: 100}}
"""
    lib = store(tmp_path, user_text)[0].library()
    section = lib.sections["Wan2.1_14b"]
    assert section.attention_configs["psa_balanced"].mask_ratios[1] == (0.0, 0.4)
    assert "broken" not in section.attention_configs
    assert section.video_scale.width_divisor == 16
    user = str(tmp_path / "user" / "attention_presets.yaml")
    found = {(p.file, p.line, p.field) for p in lib.problems}
    assert found == {(user, 5, "Wan2.1_14b.attention_configs.psa_balanced.mask_ratios.0"),
                     (user, 6, "Wan2.1_14b.attention_configs.broken.block_size.m"),
                     (user, 3, "Wan2.1_14b.video_scale.width_divisor")}
    assert all(p.message.startswith("got ") or "out of order" in p.message for p in lib.problems)


def test_save_new_unchanged_taken_and_overwrite(tmp_path):
    st, user = store(tmp_path)
    fast = PSAConfig(warmup_steps=2)
    assert st.save("Wan2.1_1.3b", "fast", fast, overwrite=False) == "saved"
    assert st.library().resolve("Wan2.1_1.3b", "fast").config == fast
    assert st.save("Wan2.1_1.3b", "fast", fast, overwrite=False) == "unchanged"
    before = user.read_bytes()
    with pytest.raises(ConfigError, match="'fast' already exists in section 'Wan2.1_1.3b'.*overwrite"):
        st.save("Wan2.1_1.3b", "fast", fast.replace(warmup_steps=3), overwrite=False)
    with pytest.raises(ConfigError, match="already exists"):
        st.save("Wan2.1_1.3b", "psa_topk", fast, overwrite=False)   # shipped names are taken too
    assert user.read_bytes() == before
    assert st.save("Wan2.1_1.3b", "psa_topk", fast, overwrite=True) == "overwritten"
    assert st.library().resolve("Wan2.1_1.3b", "psa_topk").config == fast
    assert yaml.safe_load(SHIPPED.read_text())["Wan2.1_1.3b"]["attention_configs"]["psa_topk"]["warmup_steps"] == 15


@pytest.mark.parametrize("name", ["", "default", "has space", "../x", "-lead"])
def test_save_rejects_bad_names(tmp_path, name):
    with pytest.raises(ConfigError, match="save_name"):
        store(tmp_path)[0].save("Wan2.1_1.3b", name, PSAConfig(), overwrite=False)


def test_save_refuses_to_touch_a_malformed_user_file(tmp_path):
    st, user = store(tmp_path, "a: [\n")
    with pytest.raises(ConfigError, match="cannot save: .*malformed YAML.*nothing was written"):
        st.save("Wan2.1_1.3b", "x", PSAConfig(), overwrite=False)
    assert user.read_text() == "a: [\n"


def test_user_file_location_from_env(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere.yaml"
    monkeypatch.setenv(presets.USER_FILE_ENV, str(target))
    st = presets.PresetStore()
    assert st.user == target
    st.save("Wan2.2_5B", "mine", PSAConfig(), overwrite=False)
    assert "mine" in yaml.safe_load(target.read_text())["Wan2.2_5B"]["attention_configs"]


def test_preset_prints_as_yaml(tmp_path):
    p = store(tmp_path)[0].library().resolve("Wan2.1_1.3b", "psa_topk")
    text = str(p)
    assert text.startswith("# section: Wan2.1_1.3b")
    assert PSAConfig.from_dict(yaml.safe_load(text)["psa_topk"]) == p.config
