"""Apply PSA to a ComfyUI model through its ModelPatcher: no global state, no monkeypatching.

Two things go into a clone of the patcher, so the original model and every other clone keep
ComfyUI's own attention:

- a DIFFUSION_MODEL wrapper that, once per forward, reads the video token grid from the latent
  and the model's patch size and the sampling step from the sigmas, and passes them to the
  attention calls of that forward in a copy of ``transformer_options``;
- an ``optimized_attention_override`` that sends video self-attention to ``psa_attention`` and
  every other call (cross-attention, masks, unsupported shapes, dense schedule slots) to the
  attention function ComfyUI would have called.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..psa_kernels import kernel_head_dim, psa_attention
from .presets import PSAPreset

log = logging.getLogger("psa")

CTX_KEY = "psa_forward"   # transformer_options key of the per-forward context
WRAPPER_KEY = "psa"       # key of our DIFFUSION_MODEL wrapper in the patcher
OVERRIDE_KEY = "optimized_attention_override"
_ATTN_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_WAN_ARGS = ("x", "timestep", "context", "clip_fea", "time_dim_concat")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------------- pure helpers
def token_grid(latent_shape, patch_size, extra_frames: int = 0) -> tuple[int, int, int]:
    """(T, H, W) token grid of a [..., T, H, W] latent; the model pads each side to its patch."""
    T, H, W = (int(s) for s in latent_shape[-3:])
    pt, ph, pw = (int(p) for p in patch_size)
    return (-(-T // pt) + extra_frames, -(-H // ph), -(-W // pw))


def step_index(sample_sigmas, sigma) -> tuple[int, int] | None:
    """(step, number of steps) of the sampler run, or None when the sigmas are not known.

    Step j covers noise levels in (sigmas[j+1], sigmas[j]]: multi-stage samplers evaluate the
    model between schedule points, and those calls belong to the step they refine. The step
    counts from the start of this sampler run (KSamplerAdvanced's start_at_step is step 0).
    """
    if sample_sigmas is None or sigma is None:
        return None
    s = torch.as_tensor(sample_sigmas).detach().flatten().float().cpu()
    if s.numel() < 2:
        return None
    cur = float(torch.as_tensor(sigma).detach().float().max())
    n = s.numel() - 1
    step = int((s[:-1] >= cur * (1 - 1e-5)).sum()) - 1
    return min(max(step, 0), n - 1), n


def schedule_reason(block: int, step: tuple[int, int] | None, warmup_steps: int,
                    dense_first_blocks: int, dense_last_steps: int) -> str | None:
    """Why this self-attention call runs dense by schedule, or None when PSA runs."""
    if block < dense_first_blocks:
        return "first blocks"
    if step is None:
        return None
    i, n = step
    if i < warmup_steps:
        return "warm-up"
    if dense_last_steps and i >= n - dense_last_steps:
        return "last steps"
    return None


def unsupported_reason(q: torch.Tensor, mask, head_dim: int) -> str | None:
    """Why PSA cannot take this call (the model's attention then runs it), or None."""
    if mask is not None:
        return "an attention mask"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype}"
    if q.is_cuda and not kernel_head_dim(head_dim):
        # The GPU kernels take power-of-two head dims; anything else would run PSA's slow
        # torch reference, which is no faster than the model's own attention.
        return f"head dim {head_dim} on the GPU"
    return None


@dataclass
class ForwardContext:
    """What one model forward tells its attention calls."""
    grid: tuple[int, int, int]
    step: tuple[int, int] | None
    off_reason: str | None = None     # PSA is off for the whole forward, and why
    calls: int = 0                    # video self-attention calls so far = block index
    densities: list = field(default_factory=list)  # (block, density or dense reason), for verbose

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


def _arg(args, kwargs, names, name):
    i = names.index(name)
    return args[i] if len(args) > i else kwargs.get(name)


# ---------------------------------------------------------------------- the patch
class PSAModelPatch:
    """The override and the forward wrapper of one Apply PSA node."""

    def __init__(self, preset: PSAPreset, dense_first_blocks: int = 0, dense_last_steps: int = 0, inner=None,
                 recorder=None):
        self.preset = preset
        self.recorder = recorder  # a plan_record.PlanRecorder when Apply PSA records for PSA Plan View
        self.dense_first_blocks = dense_first_blocks
        self.dense_last_steps = dense_last_steps
        self.inner = inner        # an override that was there before ours: our fallback goes through it
        self._logged: set[str] = set()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the patch is immutable apart from its
        # log-once memory, which clones of one Apply PSA node should share.
        return self

    def _once(self, key: str, msg: str, *fmt) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info("[PSA] " + msg, *fmt)

    def _fallback(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    # -------------------------------------------------------------- per forward
    # Under torch.compile (ComfyUI's TorchCompileModel) this wrapper is traced as part of the
    # model's forward. The executor call stays traceable, so the model is still compiled; the
    # context (step from the sigmas on the host, log-once memory, the density log) is built and
    # read outside the graph, where tracing would only break the graph and add guards.
    def forward_wrapper(self, executor, *args, **kwargs):
        args, kwargs, ctx = self._enter(executor.class_obj, args, kwargs)
        out = executor(*args, **kwargs)
        if ctx is not None and self.preset.config.verbose:
            self._log_forward(ctx)
        return out

    @torch.compiler.disable
    def _enter(self, model, args, kwargs):
        """The forward's arguments with the context added to its transformer_options, and the
        context; the arguments as they were and None when PSA is off for this forward."""
        if isinstance(kwargs.get("transformer_options"), dict):
            to = kwargs["transformer_options"]
        elif args and isinstance(args[-1], dict):
            to = args[-1]
        else:
            self._once("no-to", "model forward without transformer_options: PSA is off for this model")
            return args, kwargs, None
        if to.get(OVERRIDE_KEY) is not self:
            self._once("replaced", "another attention override replaced PSA's on this model: PSA is off")
            return args, kwargs, None
        ctx = self._context(model, args, kwargs, to)
        to = {**to, CTX_KEY: ctx}
        if "transformer_options" in kwargs:
            kwargs = {**kwargs, "transformer_options": to}
        else:
            args = args[:-1] + (to,)
        return args, kwargs, ctx

    def _context(self, model, args, kwargs, to) -> ForwardContext:
        x = _arg(args, kwargs, _WAN_ARGS, "x")
        patch_size = getattr(model, "patch_size", None)
        step = step_index(to.get("sample_sigmas"), to.get("sigmas"))
        if step is None:
            self._once("no-step", "no sampling sigmas in this forward: warm-up and dense_last_steps are off")
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or patch_size is None or len(patch_size) != 3:
            return ForwardContext((0, 0, 0), step, off_reason="the model is not a video transformer PSA knows")
        # Wan puts whole extra latent frames into the sequence: a time-concatenated condition
        # after the video, a reference image (ref_conv) in front.
        extra = 0
        concat = _arg(args, kwargs, _WAN_ARGS, "time_dim_concat")
        if isinstance(concat, torch.Tensor):
            extra += -(-concat.shape[2] // int(patch_size[0]))
        if getattr(model, "ref_conv", None) is not None and kwargs.get("reference_latent") is not None:
            extra += 1
        ctx = ForwardContext(token_grid(x.shape, patch_size, extra), step)
        # Cross-attention is told apart by its key length; if a text or image-feature length
        # equals the video token count, the two cannot be told apart, so stay with the model's.
        cross_lens = {t.shape[-2] for t in (_arg(args, kwargs, _WAN_ARGS, "context"),
                                            _arg(args, kwargs, _WAN_ARGS, "clip_fea"))
                      if isinstance(t, torch.Tensor) and t.ndim >= 2}
        if ctx.tokens in cross_lens:
            ctx.off_reason = (f"the video token count {ctx.tokens} equals a text/image token count, so "
                              "self- and cross-attention cannot be told apart")
        return ctx

    @torch.compiler.disable
    def _log_forward(self, ctx: ForwardContext) -> None:
        step = f"step {ctx.step[0] + 1}/{ctx.step[1]}" if ctx.step else "step ?"
        if ctx.off_reason:
            log.info("[PSA] %s: off (%s)", step, ctx.off_reason)
            return
        numeric = [d for _, d in ctx.densities if isinstance(d, float)]
        mean = f"{sum(numeric) / len(numeric):.3f}" if numeric else "-"
        blocks = " ".join(f"{b}:{d:.3f}" if isinstance(d, float) else f"{b}:{d}" for b, d in ctx.densities)
        log.info("[PSA] %s grid %s: mean density %s; per block %s", step, "x".join(map(str, ctx.grid)),
                 mean, blocks)

    # -------------------------------------------------------------- per attention call
    # Kept out of torch.compile graphs as a whole, like psa_attention: the routing counts the
    # blocks and logs in the per-forward context, and dynamo guards on that state (the block
    # counter, the length of the density list, the step) would recompile this function for
    # every block until its recompile limit. The model's own attention, for the calls that
    # fall back, then runs uncompiled too: a single attention op, little for a compiler to fuse.
    @torch.compiler.disable
    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        ctx: ForwardContext | None = to.get(CTX_KEY)
        if ctx is None:
            return self._fallback(func, args, kwargs)
        a = dict(zip(_ATTN_ARGS, args))
        a.update({n: kwargs[n] for n in _ATTN_ARGS if n in kwargs})
        q, k, v, heads = a["q"], a["k"], a["v"], a["heads"]
        skip_reshape = bool(a.get("skip_reshape"))
        seq = 2 if skip_reshape else 1
        if q.shape[seq] != ctx.tokens or k.shape[seq] != ctx.tokens:
            self._once("other", "attention calls other than video self-attention (cross-attention, "
                       "other lengths) run the model's own attention")
            return self._fallback(func, args, kwargs)
        block = ctx.calls
        ctx.calls += 1
        if ctx.off_reason:
            self._once("off:" + ctx.off_reason, "PSA off, model's attention used: %s", ctx.off_reason)
            return self._fallback(func, args, kwargs)
        cfg = self.preset.config
        reason = schedule_reason(block, ctx.step, cfg.warmup_steps, self.dense_first_blocks, self.dense_last_steps)
        if reason is None and cfg.is_dense:
            reason = "dense preset"
        if reason is None:
            head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
            reason = unsupported_reason(q, a.get("mask"), head_dim)
            if reason is not None:
                self._once("unsupported:" + reason, "PSA cannot take %s; the model's attention runs it", reason)
        if reason is not None:
            ctx.densities.append((block, reason))
            if self.recorder is not None:
                self.recorder.dense(ctx.step, block, reason)
            return self._fallback(func, args, kwargs)
        return self._psa(q, k, v, heads, skip_reshape, bool(a.get("skip_output_reshape")), ctx, block)

    def _psa(self, q, k, v, heads, skip_reshape, skip_output_reshape, ctx, block):
        if not skip_reshape:
            B, L, HD = q.shape
            q, k, v = (t.view(B, L, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
        self._once(f"grid{ctx.grid}", "PSA on a %s token grid with preset %s/%s", "x".join(map(str, ctx.grid)),
                   self.preset.section or "-", self.preset.name)
        cfg = self.preset.config
        if self.recorder is not None:
            out, plan = self.recorder.attention(q, k, v, cfg, ctx.grid, ctx.step, block)
            if cfg.verbose:
                ctx.densities.append((block, plan.stats().density))
        elif cfg.verbose:
            out, stats = psa_attention(q, k, v, cfg, grid=ctx.grid, return_stats=True)
            ctx.densities.append((block, float(stats.density)))
        else:
            out = psa_attention(q, k, v, cfg, grid=ctx.grid)
        if skip_output_reshape:
            return out
        B, H, L, D = out.shape
        return out.transpose(1, 2).reshape(B, L, H * D)


def apply_psa(model, preset: PSAPreset, dense_first_blocks: int = 0, dense_last_steps: int = 0, recorder=None):
    """A patched clone of a ComfyUI ModelPatcher; ``model`` itself is left as it was."""
    import comfy.patcher_extension as pe  # ComfyUI's; imported here so the helpers above need none

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    inner = to.get(OVERRIDE_KEY)
    if isinstance(inner, PSAModelPatch):  # a second Apply PSA replaces the first
        inner = inner.inner
    patch = PSAModelPatch(preset, dense_first_blocks, dense_last_steps, inner, recorder)
    to[OVERRIDE_KEY] = patch
    m.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, patch.forward_wrapper)
    return m
