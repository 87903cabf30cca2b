"""PSA Plan View's work: find the recording of a patched model and draw it as a ComfyUI IMAGE."""
from __future__ import annotations

import numpy as np
import torch

from ..psa_kernels.config import ConfigError
from .patch import OVERRIDE_KEY, PSAModelPatch, PSAOverride
from .plan_record import PlanRecorder, PlanSnapshot

AUTO_BLOCKS = "auto"
MAX_PANELS = 4
ENGLISH = "English"
# the node's language choices -> plan_plot's language codes; the values are what workflows store
LANGUAGES = {ENGLISH: "en", "中文": "zh"}


def recorder_of(model) -> PlanRecorder:
    """The recorder Apply PSA gave this model; ConfigError saying what to connect or switch on."""
    to = getattr(model, "model_options", {}).get("transformer_options", {})
    override = to.get(OVERRIDE_KEY)
    patch = override.patch if isinstance(override, PSAOverride) else override
    if not isinstance(patch, PSAModelPatch):
        raise ConfigError("model: not a model patched by Apply PSA; connect Apply PSA's MODEL output")
    if patch.recorder is None:
        raise ConfigError("model: no plan recorded; turn on record_plan on that Apply PSA node and run the "
                          "sampler again")
    return patch.recorder


def choose_blocks(text: str, snap: PlanSnapshot) -> list[int]:
    """Blocks to draw: 'auto' = first, middle and last block with a level map, or the listed ones."""
    recorded = sorted(snap.maps)
    if text.strip().lower() in (AUTO_BLOCKS, ""):
        picks = [recorded[0], recorded[len(recorded) // 2], recorded[-1]] if recorded else []
        return list(dict.fromkeys(picks))
    try:
        picks = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        picks = None
    if not picks or len(picks) > MAX_PANELS or any(p not in snap.maps for p in picks):
        raise ConfigError(f"blocks: got {text!r}; allowed: 'auto', or up to {MAX_PANELS} of the recorded "
                          f"blocks {_span(recorded)} like '0, 15, 29'")
    return list(dict.fromkeys(picks))


def _span(blocks: list[int]) -> str:
    if not blocks:
        return "(none)"
    return f"{blocks[0]}-{blocks[-1]}" if blocks == list(range(blocks[0], blocks[-1] + 1)) else ", ".join(map(str, blocks))


def picture(model, blocks: str, head: int, language: str = ENGLISH) -> tuple[torch.Tensor, str]:
    """ComfyUI IMAGE [1, height, width, 3] of the plan recorded for ``model``, with its text in
    ``language`` (one of LANGUAGES), and a line saying what it shows."""
    if language not in LANGUAGES:
        raise ConfigError(f"language: got {language!r}; allowed: {', '.join(LANGUAGES)}")
    snap = recorder_of(model).snapshot()
    if snap is None:
        raise ConfigError("samples: no plan recorded; connect the sampler's output to samples so that this "
                          "node runs after sampling")
    try:
        import matplotlib  # noqa: F401  (plan_plot draws with it)
    except ImportError:
        raise ConfigError("matplotlib is not installed; install it into ComfyUI's Python "
                          "(pip install matplotlib)") from None
    from ..psa_kernels.plan_plot import LevelMap, picture_language, plan_text, render_plan

    lang = picture_language(LANGUAGES[language])  # English when no font can draw Chinese
    panels = []
    if snap.maps:
        for b in choose_blocks(blocks, snap):
            m = snap.maps[b]
            if head >= m.levels.shape[0]:
                raise ConfigError(f"head: got {head}; allowed: 0 to {m.levels.shape[0] - 1}")
            caption = plan_text(lang, "panel_block", block=b, head=head, step=m.step + 1)
            if m.stride != (1, 1):
                caption += plan_text(lang, "panel_every", q=m.stride[0], k=m.stride[1])
            panels.append(LevelMap(m.levels[head].numpy(), caption, snap.pooled_tail, snap.tail_n))
    grid = "x".join(map(str, snap.grid)) if snap.grid else "?"
    title = plan_text(lang, "run_title", grid=grid, steps=snap.steps)
    if not panels:
        title += plan_text(lang, "all_dense", reasons=", ".join(sorted(set(snap.dense_reasons.values()))))
    rgb = render_plan(panels, snap.density, title=title, language=lang)
    with np.errstate(all="ignore"):
        per_step = np.nanmean(snap.density, axis=1)
    # the line under the picture: in the language asked for (the browser draws any script)
    asked = LANGUAGES[language]
    drawn = ", ".join(str(b) for b in (choose_blocks(blocks, snap) if snap.maps else []))
    summary = plan_text(asked, "summary", blocks=drawn or plan_text(asked, "none"),
                        densities=", ".join(f"{d:.3f}" for d in per_step))
    return torch.from_numpy(np.ascontiguousarray(rgb)).float().div(255.0).unsqueeze(0), summary
