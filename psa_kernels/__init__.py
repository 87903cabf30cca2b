"""Pyramid Sparse Attention: torch reference and Triton kernels. Never imports ComfyUI."""
from .config import (BlockSize, ConfigError, ModelConfig, PSAConfig, SimThresholds, VideoScale,
                     load_attention_config, parse_attention_config)

__all__ = ["BlockSize", "ConfigError", "ModelConfig", "PSAConfig", "SimThresholds", "VideoScale",
           "load_attention_config", "parse_attention_config"]

try:  # the attention entry points land stage by stage
    from .api import PSAPlan, PSAStats, psa_attention, psa_plan  # noqa: F401
    __all__ += ["PSAPlan", "PSAStats", "psa_attention", "psa_plan"]
except ImportError:
    pass
