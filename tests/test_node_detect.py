"""PSA Loader 'auto': checkpoint shapes ComfyUI detects -> attention_config.yaml section."""
import pytest

from pack_import import pack_module

detect = pack_module("nodes.detect")
presets = pack_module("nodes.presets")
ConfigError = pack_module("psa_kernels.config").ConfigError
SECTIONS = presets.PresetStore(user=None, user_from_env=False).library().sections
Sig = detect.ModelSignature


@pytest.mark.parametrize("sig, section", [
    (Sig("wan2.1", "t2v", 1536, 16, 16), "Wan2.1_1.3b"),
    (Sig("wan2.1", "t2v", 5120, 16, 16), "Wan2.1_14b"),
    (Sig("wan2.1", "t2v", 3072, 48, 48), "Wan2.2_5B"),
    (Sig("wan2.1", "i2v", 5120, 36, 16), "Wan2.1_14b_I2V"),
    (Sig("wan2.1", "t2v", 5120, 36, 16), "Wan2.2_A14B_I2V"),
    (Sig("wan2.1", "i2v", 1536, 36, 16), "Wan2.1_Fun"),
    (Sig("wan2.1", "i2v", 5120, 48, 16), "Wan2.1_Fun"),
    (Sig("wan2.1", "vace", 1536, 16, 16), "Wan2.1_VACE"),
    (Sig("wan2.1", "camera", 1536, 32, 16), "Wan2.1_1.3b"),
])
def test_wan_checkpoints_map_to_sections(sig, section):
    assert detect.detect_section(sig, SECTIONS)[0] == section


def test_missing_variant_section_falls_back_to_base():
    sections = {k: v for k, v in SECTIONS.items() if k != "Wan2.1_VACE"}
    assert detect.detect_section(Sig("wan2.1", "vace", 5120, 16, 16), sections)[0] == "Wan2.1_14b"


@pytest.mark.parametrize("sig, match", [
    (Sig("flux", None, 3072, 64, 64), "auto does not know this model"),
    (Sig("wan2.1", "t2v", 256, 16, 16), "auto does not know a Wan model of hidden size 256"),
])
def test_unknown_models_ask_for_a_section(sig, match):
    with pytest.raises(ConfigError, match=match):
        detect.detect_section(sig, SECTIONS)
