"""The ComfyUI nodes (V3 schema). They only wire inputs to nodes/presets, edit, detect, patch,
plan_record and plan_view; messages that reach the UI go through nodes/messages."""
from __future__ import annotations

import inspect
import logging

from comfy_api.latest import ComfyExtension, io, ui

from ..psa_kernels.config import (ATTN_IMPLS, BLOCK_SIZES_M, BLOCK_SIZES_N, ESTIMATE_METHODS, MASK_MODES,
                                  MAX_HEAVY_KEYS, PRESET_TYPES, REARRANGE_METHODS, TAIL_CORRECTIONS, TILE_N_SIZES,
                                  ConfigError, PSAConfig)
from . import edit, plan_view, routes
from .detect import ModelSignature, detect_section
from .messages import bilingual
from .patch import apply_psa
from .plan_record import PlanRecorder
from .presets import DEFAULT_PRESET, PresetStore, PSAPreset

log = logging.getLogger("psa")

PSAConfigIO = io.Custom("PSA_CONFIG")
STORE = PresetStore()
AUTO = "auto"
INCOMING = "incoming"
CATEGORY = "PSA"


# Inputs fold away under "advanced" where this ComfyUI's V3 API has the flag (newer than 0.3.64).
ADVANCED = {"advanced": True} if "advanced" in inspect.signature(io.WidgetInput.__init__).parameters else {}

# The Loader's presets per section. ComfyUI's V3 API gained DynamicCombo after 0.3.64 (PR #10832,
# Nov 2025; public API since PR #11345, Dec 2025): a combo whose every option carries inputs of its
# own. The prompt holds them flat with dotted keys ("model_section": "Wan2.1_14b",
# "model_section.preset": "psa_fast"); the executor validates the chosen option's inputs and calls
# execute(model_section={"model_section": "Wan2.1_14b", "preset": "psa_fast"}). A prompt value that
# is no option drops the input (execute gets nothing for it). Without DynamicCombo the Loader keeps
# two flat combos, and web/psa.js narrows the preset list to the chosen section.
DYNAMIC_COMBO = getattr(io, "DynamicCombo", None)
# Prompts written with the flat combos ("model_section" + "preset") must still run where the Loader
# uses DynamicCombo: so the option's preset is optional, and a flat "preset" input stays, hidden on
# the canvas (ComfyUI's own Save Video keeps its old "codec" input the same way).
HIDDEN = {"extra_dict": {"hidden": True}} if "extra_dict" in inspect.signature(io.Combo.Input.__init__).parameters else {}


def _problems_note() -> str:
    problems = routes.problem_texts(STORE.library())
    if not problems:
        return ""
    return ("\n\nWARNING: some presets could not be loaded (details in the ComfyUI log):\n- "
            + "\n- ".join(map(str, problems)))


def _keep_combo(name: str, options, tooltip: str, advanced: bool = False, optional: bool = False) -> io.Combo.Input:
    return io.Combo.Input(name, options=[edit.KEEP, *map(str, options)], default=edit.KEEP, optional=optional,
                          tooltip=tooltip + " 'keep' leaves the incoming value.", **(ADVANCED if advanced else {}))


class _UIErrors:
    """Runs a node's work with its ConfigErrors in English and Chinese (what the error dialog shows)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, ConfigError):
            raise ConfigError(bilingual(self.prefix + str(exc))) from None
        return False


class PSALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        lib = STORE.library()
        section_tip = "Model section of attention_config.yaml. 'auto' detects the Wan family from the connected model."
        preset_tip = ("Preset of that section. 'default' is the section's default_attention; 'baseline' is dense "
                      "attention.")
        auto_tip = ("With 'auto' every section's presets are listed: the preset must exist in the section auto "
                    "detects (else the run names that section's presets).")
        model = io.Model.Input("model", optional=True,
                               tooltip="Only for model_section 'auto': the model whose family picks the section.")
        every_preset = [DEFAULT_PRESET, *lib.preset_names()]
        if DYNAMIC_COMBO is None:
            inputs = [
                io.Combo.Input("model_section", options=[AUTO, *lib.section_names()], default=AUTO,
                               tooltip=section_tip),
                io.Combo.Input("preset", options=every_preset, default=DEFAULT_PRESET,
                               tooltip="Preset of that section (the list shows the chosen section's presets; "
                                       "with 'auto' it shows every section's, and the preset must exist in the "
                                       "section auto detects). 'default' is the section's default_attention; "
                                       "'baseline' is dense attention."),
                model,
            ]
        else:
            def preset(names, tip):
                return io.Combo.Input("preset", options=names, default=DEFAULT_PRESET, optional=True, tooltip=tip)
            options = [DYNAMIC_COMBO.Option(AUTO, [preset(every_preset, preset_tip + " " + auto_tip)])]
            options += [DYNAMIC_COMBO.Option(name, [preset([DEFAULT_PRESET, *section.attention_configs], preset_tip)])
                        for name, section in lib.sections.items()]
            inputs = [
                DYNAMIC_COMBO.Input("model_section", options=options, tooltip=section_tip),  # first option: auto
                model,
                io.Combo.Input("preset", options=every_preset, default=DEFAULT_PRESET, optional=True, **HIDDEN,
                               tooltip="The preset of prompts written before the Loader listed presets per "
                                       "section; the section's own preset wins."),
            ]
        return io.Schema(
            node_id="PSALoader",
            display_name="PSA Loader",
            category=CATEGORY,
            description="Picks a Pyramid Sparse Attention preset from configs/attention_config.yaml "
                        "and the user presets file." + _problems_note(),
            inputs=inputs,
            outputs=[PSAConfigIO.Output(display_name="psa_config",
                                        tooltip="The preset, for PSA Preset Editor or Apply PSA.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return STORE.stamp()  # re-run when a presets file changes on disk

    @classmethod
    def execute(cls, model_section: dict | str | None = None, preset: str | None = None,
                model=None) -> io.NodeOutput:
        lib = STORE.library()
        with _UIErrors():
            section, preset = loader_choice(model_section, preset)
            if section is None:  # where DynamicCombo drops a value that is no option
                raise ConfigError("model_section: unknown section; allowed: " + ", ".join([AUTO, *lib.section_names()]))
            if section != AUTO:
                out = lib.resolve(section, preset)
            elif model is None:
                raise ConfigError("model_section: 'auto' needs the model input connected; or pick a section: "
                                  + ", ".join(lib.section_names()))
            else:
                section, why = detect_section(ModelSignature.of(model), lib.sections)
                log.info("[PSA] Loader auto: section %s (%s)", section, why)
                try:
                    out = lib.resolve(section, preset)
                except ConfigError as e:  # 'auto' lists every section's presets: say which section it found
                    raise ConfigError(f"{e.reason} (model_section: auto detected {section}: {why})", e.field) from None
        return io.NodeOutput(out, ui=ui.PreviewText(str(out)))


def loader_choice(model_section: dict | str | None, preset: str | None) -> tuple[str | None, str]:
    """(section, preset) from the Loader's inputs: DynamicCombo's nested form
    ``{"model_section": s, "preset": p}`` or the flat strings (ComfyUI 0.3.64, and prompts written
    there). The section's own preset wins over the flat one; neither means 'default'."""
    if isinstance(model_section, dict):
        return model_section.get("model_section"), model_section.get("preset") or preset or DEFAULT_PRESET
    return model_section, preset or DEFAULT_PRESET


class PSAPresetEditor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        lib = STORE.library()
        level = ("Range [lo, hi] of the ranked key blocks (topk: shares of blocks; thresholdbound: "
                 "cumulative attention mass) that get level {}. Type 'lo, hi', 'off' to give the level "
                 "nothing, or 'keep'. Ranges join end to end from 0 to 1 in level order 1, 2, 4, 8, 0; "
                 "ranges left on 'keep' move to join the ones you change.")
        return io.Schema(
            node_id="PSAPresetEditor",
            display_name="PSA Preset Editor",
            category=CATEGORY,
            description="Changes fields of a PSA preset; every widget left on 'keep' (-1 for warm-up, "
                        "empty description) keeps the incoming value, shown in the node's preview. Can save the "
                        "result as a named preset.",
            inputs=[
                PSAConfigIO.Input("psa_config", optional=True,
                                  tooltip="Preset to edit; without it, the library defaults are edited."),
                _keep_combo("type", PRESET_TYPES, "psa: sparse attention; dense: the model's own attention."),
                io.String.Input("description", default="", tooltip="Description of the preset; empty keeps it."),
                io.String.Input("level_1", default=edit.KEEP, tooltip=level.format("1 (full resolution)")),
                io.String.Input("level_2", default=edit.KEEP, tooltip=level.format("2 (keys pooled by 2)")),
                io.String.Input("level_4", default=edit.KEEP, tooltip=level.format("4 (keys pooled by 4)")),
                io.String.Input("level_8", default=edit.KEEP, tooltip=level.format("8 (keys pooled by 8)")),
                io.String.Input("level_0", default=edit.KEEP, tooltip=level.format("0 (skipped)")),
                _keep_combo("mask_mode", MASK_MODES, "thresholdbound: ranges bound the cumulative attention "
                            "mass; topk: ranges are fixed shares of the key blocks."),
                _keep_combo("attn_impl", ATTN_IMPLS, "new_mask_type packs p pooled key blocks into one "
                            "kernel tile; old_mask_type runs one key block per tile.", advanced=True),
                _keep_combo("block_m", BLOCK_SIZES_M, "Query block size in tokens.", advanced=True),
                _keep_combo("block_n", BLOCK_SIZES_N, "Key/value block size in tokens.", advanced=True),
                _keep_combo("tile_n", TILE_N_SIZES, "Accepted for compatibility with research YAML files "
                            "(at most block_n); our kernels choose their own key tile.", advanced=True),
                _keep_combo("use_rearrange", edit.BOOL_CHOICES[1:], "Reorder video tokens so that tokens "
                            "close in space-time are close in the sequence.", advanced=True),
                _keep_combo("rearrange_method", REARRANGE_METHODS, "Gilbert: 3D Hilbert curve; Tiled: "
                            "tiles of tile_size.", advanced=True),
                io.String.Input("tile_size", default=edit.KEEP, **ADVANCED,
                                tooltip="Tile of the Tiled rearrangement, 'depth, height, width' in tokens, or 'keep'."),
                _keep_combo("use_sim_mask", edit.BOOL_CHOICES[1:], "Similarity guard: pool a key block "
                            "only if its keys are similar enough at that scale.", advanced=True),
                io.String.Input("sim_thresholds", default=edit.KEEP, **ADVANCED,
                                tooltip="Similarity guard thresholds 'x2, x4, x8' (mean cosine similarity "
                                        "needed to pool by 2, 4, 8), or 'keep'."),
                io.Int.Input("warmup_steps", default=edit.KEEP_INT, min=edit.KEEP_INT, max=10000,
                             tooltip="Sampling steps that run dense attention first; -1 keeps the incoming value."),
                _keep_combo("verbose", edit.BOOL_CHOICES[1:], "Log the attention density per step and block.",
                            advanced=True),
                io.Combo.Input("save_section", options=[INCOMING, *lib.section_names()], default=INCOMING,
                               tooltip="Model section to save the preset under; 'incoming' uses the "
                                       "incoming preset's section."),
                io.String.Input("save_name", default="",
                                tooltip="Save the result under this name in the user presets file (kept "
                                        "when the pack updates); empty does not save."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Allow saving over an existing preset of that name."),
                # New inputs go last (workflows store widget values by position) and are optional (API
                # prompts written before them leave them out).
                _keep_combo("use_pooled_tail", edit.BOOL_CHOICES[1:], "true: key blocks of level 0 stay in the "
                            "softmax as one mean-pooled key/value each (the 'tail'); false: they are skipped.",
                            advanced=True, optional=True),
                _keep_combo("estimate_method", ESTIMATE_METHODS, "How block importance is estimated: "
                            "sampled queries and keys, or block means (cheaper at long sequences such as "
                            "720p).", advanced=True, optional=True),
                io.Int.Input("heavy_keys", default=edit.KEEP_INT, min=edit.KEEP_INT, max=MAX_HEAVY_KEYS, optional=True,
                             **ADVANCED, tooltip="Keys per head (the ones the average query weighs most, such as "
                                                 "sink tokens) attended exactly wherever their block is skipped; "
                                                 "0: none; -1 keeps the incoming value."),
                _keep_combo("tail_correction", TAIL_CORRECTIONS, "Only with use_pooled_tail: variance adds to "
                            "each skipped key block's tail bias the mass its keys' spread adds to the mean key "
                            "(no kernel cost, a little routing work, one float32 per block pair and head); none keeps "
                            "the bias ln(n).",
                            advanced=True, optional=True),
            ],
            outputs=[PSAConfigIO.Output(display_name="psa_config", tooltip="The edited preset.")],
        )

    @classmethod
    def execute(cls, save_section: str, save_name: str, overwrite: bool, psa_config: PSAPreset | None = None,
                **widgets) -> io.NodeOutput:
        incoming = psa_config or PSAPreset(section="", name="defaults", config=PSAConfig())
        notes: list[str] = []
        with _UIErrors("PSA Preset Editor: "):
            config = edit.edit_preset(incoming.config, notes=notes, **widgets)
            out = PSAPreset(incoming.section, incoming.name, config, incoming.text_length, incoming.video_scale)
            if save_name.strip():
                section = incoming.section if save_section == INCOMING else save_section
                if not section:
                    raise ConfigError("save_section: 'incoming' has no section (no preset connected); pick one")
                status = STORE.save(section, save_name.strip(), config, overwrite)
                log.info("[PSA] preset %s/%s %s in %s", section, save_name.strip(), status, STORE.user)
                notes.append(f"save_name: {status} in {STORE.user}")
                mc = STORE.library().sections[section]
                out = PSAPreset(section, save_name.strip(), config, mc.text_length, mc.video_scale)
        for note in notes:
            log.info("[PSA] Preset Editor: %s", note)
        text = "\n".join([f"# incoming\n{incoming}", f"# result\n{out}", *(f"# {n}" for n in notes)])
        return io.NodeOutput(out, ui=ui.PreviewText(text))


class ApplyPSA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyPSA",
            display_name="Apply PSA",
            category=CATEGORY,
            description="Returns a copy of the model whose video self-attention runs Pyramid Sparse "
                        "Attention; the input model is left unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="Video diffusion model (Wan 2.1 / 2.2)."),
                PSAConfigIO.Input("psa_config", tooltip="Preset from PSA Loader or PSA Preset Editor."),
                io.Int.Input("dense_first_blocks", default=0, min=0, max=1000,
                             tooltip="Run the first N transformer blocks (self-attention calls of a "
                                     "forward, in order) with the model's own dense attention."),
                io.Int.Input("dense_last_steps", default=0, min=0, max=10000,
                             tooltip="Run the last N sampling steps with dense attention."),
                io.Boolean.Input("record_plan", default=False, optional=True,  # optional: older prompts lack it
                                 tooltip="Keep what PSA decides during the run (density of every block at every "
                                         "step, level maps of the latest step) for a PSA Plan View node. Costs a "
                                         "little time and memory; leave off when not looking."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def execute(cls, model, psa_config: PSAPreset, dense_first_blocks: int, dense_last_steps: int,
                record_plan: bool = False) -> io.NodeOutput:
        if not isinstance(psa_config, PSAPreset):
            raise ConfigError(bilingual(f"psa_config: got {type(psa_config).__name__}; connect a PSA Loader or "
                                        "PSA Preset Editor"))
        recorder = PlanRecorder(psa_config.config.use_pooled_tail) if record_plan else None
        return io.NodeOutput(apply_psa(model, psa_config, dense_first_blocks, dense_last_steps, recorder))


class PSAPlanView(io.ComfyNode):
    """The picture of what PSA did in the last sampler run of a model from Apply PSA.

    A separate node, not an output of Apply PSA: Apply PSA's MODEL is made before sampling, and
    the plan exists only after it. This node takes the sampler's output as well, so that
    ComfyUI runs it after the sampler; it reads the recording the patched model kept.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSAPlanView",
            display_name="PSA Plan View",
            category=CATEGORY,
            description="Shows what Pyramid Sparse Attention did in the last sampler run: the level map of "
                        "chosen transformer blocks (which key blocks each query block saw, at which "
                        "resolution) and the density of every block at every step. Needs record_plan on "
                        "in Apply PSA.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Apply PSA (with record_plan on)."),
                io.Latent.Input("samples", tooltip="The sampler's output: connecting it makes this node run "
                                                   "after sampling. Its values are not used."),
                io.String.Input("blocks", default=plan_view.AUTO_BLOCKS,
                                tooltip="Transformer blocks whose level maps are drawn: 'auto' (first, middle "
                                        "and last block that ran PSA) or numbers like '0, 15, 29' (at most 4)."),
                io.Int.Input("head", default=0, min=0, max=1023, tooltip="Attention head of the level maps."),
                io.Combo.Input("language", options=list(plan_view.LANGUAGES), default=plan_view.ENGLISH,
                               optional=True,  # optional: older prompts lack it
                               tooltip="Language of the picture's text. A new node takes the interface's "
                                       "language; Chinese needs a font with Chinese glyphs (Noto Sans CJK, "
                                       "Microsoft YaHei, PingFang, ...), else the picture stays English."),
            ],
            outputs=[io.Image.Output(display_name="plan", tooltip="The picture, also previewed on the node.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # the recording changes with every sampler run: never reuse an old picture

    @classmethod
    def execute(cls, model, samples, blocks: str, head: int, language: str = plan_view.ENGLISH) -> io.NodeOutput:
        with _UIErrors("PSA Plan View: "):
            image, summary = plan_view.picture(model, blocks, head, language)
        log.info("[PSA] Plan View: %s", summary)
        return io.NodeOutput(image, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": (summary,)})


class PSAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        routes.register(STORE)
        return [PSALoader, PSAPresetEditor, ApplyPSA, PSAPlanView]
