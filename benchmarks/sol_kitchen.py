"""ComfyUI's own sparse attention kernel, Sol-Attn (``comfy_kitchen.sol_attn``), for the benchmarks.

comfy-kitchen is ComfyUI's kernel library (on PyPI); it is never part of this repository. The
benchmarks look for its wheel unpacked, without ``backends/hip``, in ``.kitchen/`` at the
repository root (git-ignored), or in the folder named by KITCHEN_PATH, and put it on sys.path
before anything imports ComfyUI (whose newest attention module imports comfy_kitchen).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KITCHEN = Path(os.environ.get("KITCHEN_PATH", REPO / ".kitchen"))


def add_kitchen_to_path() -> bool:
    """Put the unpacked wheel first on sys.path when it is there; whether it is."""
    if not KITCHEN.is_dir():
        return False
    if str(KITCHEN) not in sys.path:
        sys.path.insert(0, str(KITCHEN))
    return True


def load_sol(device: torch.device):
    """(comfy_kitchen.sol_attn, description) when its compiled kernel runs on ``device``, else
    (None, why not). Only the compiled kernel counts: comfy_kitchen's eager reference holds
    T x T scores and is no peer to time."""
    add_kitchen_to_path()
    try:
        import comfy_kitchen as ck
    except Exception as e:  # noqa: BLE001 - any import failure means no Sol rows, said once
        return None, f"comfy_kitchen not importable ({type(e).__name__}: {e}); looked in {KITCHEN}"
    if not ck.sol_attn_is_available(device):
        why = getattr(getattr(ck, "_cuda_backend", None), "_EXT_ERROR", None)
        return None, f"comfy_kitchen.sol_attn has no compiled kernel for {device}" + (f" ({why})" if why else "")
    return ck.sol_attn, f"comfy_kitchen {kitchen_version()} from {Path(ck.__file__).parent}"


def kitchen_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("comfy-kitchen")
    except metadata.PackageNotFoundError:
        return "?"


def sol_backend(q: torch.Tensor) -> str:
    """The comfy_kitchen backend (module) that serves sol_attn for [B, T, H, 128] tensors like ``q``."""
    from comfy_kitchen.registry import registry
    kw = {"q": q, "k": q, "v": q, "tau": 1.0, "scale": None, "sink_blocks": [0, 0], "sink_q": [0, 0],
          "key_bias": None, "topk_ratio": 0.0, "tail": True, "block_len": None, "coarse_gate": None,
          "token_aug": 0}
    return getattr(registry.get_implementation("sol_attn", kwargs=kw), "__module__", "?")
