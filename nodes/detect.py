"""PSA Loader's ``auto``: which attention_config.yaml section fits a loaded ComfyUI model."""
from __future__ import annotations

from dataclasses import dataclass

from ..psa_kernels.config import ConfigError

# Hidden sizes of the Wan 2.1 checkpoints (Wan 2.2 A14B reuses the 14B architecture).
_WAN_DIMS = {1536: "Wan2.1_1.3b", 5120: "Wan2.1_14b"}


@dataclass(frozen=True)
class ModelSignature:
    """The facts ComfyUI's model detection found in the checkpoint (its ``unet_config``)."""
    image_model: str | None
    model_type: str | None
    dim: int | None
    in_dim: int | None
    out_dim: int | None

    @classmethod
    def of(cls, model) -> "ModelSignature":
        """From a ComfyUI ModelPatcher (the MODEL socket value)."""
        unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
        return cls(unet_config.get("image_model"), unet_config.get("model_type"), unet_config.get("dim"),
                   unet_config.get("in_dim"), unet_config.get("out_dim"))


def detect_section(sig: ModelSignature, sections) -> tuple[str, str]:
    """(section name, why) for a model; the variant section when present, else its base section.

    Wan 2.2 A14B text-to-video has the very same shapes as Wan 2.1 14B, so it is reported as
    Wan2.1_14b with a hint to pick Wan2.2_A14B by hand.
    """
    if sig.image_model != "wan2.1":  # ComfyUI's detection calls every Wan checkpoint "wan2.1"
        raise ConfigError(f"model_section: auto does not know this model ({sig.image_model or 'unknown'}); "
                          f"pick a section by hand: {', '.join(sections)}")
    if sig.out_dim == 48:
        base, variant, why = "Wan2.2_5B", None, "48 latent channels: Wan 2.2 TI2V 5B"
    elif sig.dim in _WAN_DIMS:
        base = _WAN_DIMS[sig.dim]
        why = f"hidden size {sig.dim}: {base}"
        variant = None
        if sig.model_type == "vace":
            variant, why = "Wan2.1_VACE", why + ", VACE blocks"
        elif sig.in_dim == 48 or (sig.in_dim == 36 and sig.dim == 1536):
            variant, why = "Wan2.1_Fun", why + f", {sig.in_dim} input channels: Fun InP / Control"
        elif sig.in_dim == 36 and sig.model_type == "i2v":
            variant, why = "Wan2.1_14b_I2V", why + ", image input with CLIP features: I2V / FLF2V"
        elif sig.in_dim == 36:
            variant, why = "Wan2.2_A14B_I2V", why + ", image input without CLIP features: Wan 2.2 A14B I2V"
        elif base == "Wan2.1_14b":
            why += " (Wan 2.2 A14B has the same shapes: pick Wan2.2_A14B by hand for it)"
    else:
        raise ConfigError(f"model_section: auto does not know a Wan model of hidden size {sig.dim}; "
                          f"pick a section by hand: {', '.join(sections)}")
    for name in (variant, base):
        if name is not None and name in sections:
            return name, why
    raise ConfigError(f"model_section: auto detected {base} ({why}) but no such section is loaded; "
                      f"pick one of: {', '.join(sections)}")
