"""Pyramid Sparse Attention: torch reference and Triton kernels. Never imports ComfyUI."""
from .api import PSAPlan, PSAStats, kernel_head_dim, psa_attention, psa_plan
from .config import (BlockSize, ConfigError, ModelConfig, PSAConfig, SimThresholds, VideoScale,
                     load_attention_config, parse_attention_config)

__all__ = ["BlockSize", "ConfigError", "ModelConfig", "PSAConfig", "PSAPlan", "PSAStats",
           "SimThresholds", "VideoScale", "kernel_head_dim", "load_attention_config",
           "parse_attention_config", "psa_attention", "psa_plan"]
