"""Apply PSA to a ComfyUI model through its ModelPatcher: no global state, no monkeypatching.

Three things go into a clone of the patcher, so the original model and every other clone keep
ComfyUI's own attention:

- a DIFFUSION_MODEL wrapper that, once per forward, reads the video token grid from the latent
  and the model's patch size and the sampling step from the sigmas, and passes them to the
  attention calls of that forward in a copy of ``transformer_options``;
- an ``optimized_attention_override`` (:class:`PSAOverride`) that sends video self-attention to
  ``psa_attention`` and every call it declines (cross-attention, masks, unsupported shapes or
  devices, dense schedule slots) to what would have run without it: the override that was on
  the model before Apply PSA, else the layer's preferred attention, else ComfyUI's default;
- an ON_PREPARE_STATE callback that puts the override back on top at every sampling step when a
  node applied after Apply PSA ("Model Attention Backend", another patch) replaced it. The
  replacing override is kept underneath and runs the calls PSA declines. An override that
  already calls PSA for the calls it declines ("Model Sparse Attention" applied after Apply
  PSA) is left on top. The forward wrapper does the same for ComfyUI versions whose callback
  is not given the sampling run's options.

ComfyUI versions differ in how the override is called (see COMFYUI.md): newer ones hand q, k, v
over as ``AttentionTensorContainer`` objects, to an override's ``container_function`` if it has
one, and set ``grid_sizes`` and ``block_index`` in ``transformer_options``; 0.3.64 passes plain
tensors. Both are taken here.
"""
from __future__ import annotations

import functools
import logging
import math
import types
from dataclasses import dataclass, field

import torch

from ..psa_kernels import kernel_head_dim, psa_attention
from ..psa_kernels.triton_compat import HAVE_TRITON, missing_reason
from .presets import PSAPreset

log = logging.getLogger("psa")

CTX_KEY = "psa_forward"   # transformer_options key of the per-forward context
WRAPPER_KEY = "psa"       # key of our DIFFUSION_MODEL wrapper and ON_PREPARE_STATE callback
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


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, head_dim: int,
                       scale=None, enable_gqa: bool = False) -> str | None:
    """Why PSA cannot take this self-attention call (what would run without PSA then runs it),
    or None."""
    if mask is not None:
        return "an attention mask"
    if enable_gqa or k.shape != q.shape or v.shape != q.shape:
        return "keys or values shaped unlike the queries (grouped-query attention)"
    if scale is not None and not math.isclose(float(scale), head_dim ** -0.5, rel_tol=1e-6):
        return f"a softmax scale of {float(scale):.4g} instead of 1/sqrt(head dim)"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype}"
    shared = _shared_memory(q.device) if q.is_cuda and head_dim > 128 else None
    return device_reason(q.device.type, head_dim, HAVE_TRITON, shared)


WIDE_HEAD_SHARED = 150 * 1024  # shared memory per block the kernel needs above head dim 128


@functools.lru_cache(maxsize=None)
def _shared_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def device_reason(device_type: str, head_dim: int, have_triton: bool, shared_memory: int | None = None) -> str | None:
    """Why PSA does not run on this device, or None.

    PSA runs where it is faster than dense attention, on NVIDIA GPUs through its Triton
    kernels, and on the CPU through its torch reference (what the CPU tests and the demo use).
    On a GPU without Triton, or on any other device, the torch reference would be slower than
    the model's own attention, so the call goes there instead.
    """
    if device_type == "cpu":
        return None
    if device_type != "cuda":
        return f"the {device_type} device (PSA's kernels run on NVIDIA GPUs)"
    if not have_triton:
        return missing_reason() or "Triton is not installed"
    if not kernel_head_dim(head_dim):
        return f"head dim {head_dim} on the GPU (the kernels take powers of two, 16 to 256)"
    if head_dim > 128 and shared_memory is not None and shared_memory < WIDE_HEAD_SHARED:
        # consumer GPUs (sm_86, sm_89, sm_120: 99 KB a block); Wan's head dim is 128
        return (f"head dim {head_dim} on a GPU with {shared_memory // 1024} KB of shared memory per block "
                f"(the kernel needs {WIDE_HEAD_SHARED // 1024} KB above head dim 128)")
    return None


@dataclass
class ForwardContext:
    """What one model forward tells its attention calls."""
    grid: tuple[int, int, int]
    step: tuple[int, int] | None
    off_reason: str | None = None     # PSA is off for the whole forward, and why
    calls: int = 0                    # video self-attention calls so far: the block index when
                                      # ComfyUI does not set transformer_options["block_index"]
    densities: list = field(default_factory=list)  # (block, density or dense reason), for verbose
    preferred: dict = field(default_factory=dict)  # (block, "self_attn"/"cross_attn") -> the layer's
                                                   # preferred attention (ComfyAttention.function)

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


def _arg(args, kwargs, names, name):
    i = names.index(name)
    return args[i] if len(args) > i else kwargs.get(name)


def _preferred_attention(model) -> dict:
    """The attention functions a checkpoint chose per layer (newer ComfyUI: each Wan attention
    module holds a ``comfy_attention`` whose ``function`` is set from the weights' metadata).
    ComfyUI drops them once an override is set, so PSA runs them itself for the calls it
    declines, as ComfyUI would have without an override."""
    found = {}
    for i, block in enumerate(getattr(model, "blocks", None) or ()):
        for kind in ("self_attn", "cross_attn"):
            fn = getattr(getattr(getattr(block, kind, None), "comfy_attention", None), "function", None)
            if fn is not None:
                found[(i, kind)] = fn
    return found


def calls_psa(override, patch: "PSAModelPatch", depth: int = 6) -> bool:
    """Whether ``override`` is one of ``patch``'s overrides or runs one for the calls it passes
    on. ComfyUI's own overrides keep the override they pass calls on to in a closure (Model
    Sparse Attention's ``previous``), so closures are looked through, a few levels deep."""
    seen = set()

    def walk(obj, depth):
        if isinstance(obj, PSAOverride):
            return obj.patch is patch or walk(obj.inner, depth)
        if depth == 0 or not callable(obj) or id(obj) in seen:
            return False
        seen.add(id(obj))
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                inner = cell.cell_contents
            except ValueError:  # a cell not filled yet
                continue
            if walk(inner, depth - 1):
                return True
        return False

    return walk(override, depth)


def describe(fn) -> str:
    """A readable name of an attention function or override, for the log."""
    if fn is None:
        return "none"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    name = name.replace(".<locals>", "")
    module = getattr(fn, "__module__", "") or ""
    text = f"{module}.{name}" if module and not module.startswith("comfy.ldm") else name
    # set_model_optimized_attention (Model Attention Backend) holds the chosen backend in a closure
    inner = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()
             if isinstance(getattr(c, "cell_contents", None), types.FunctionType)]
    return f"{text} -> {inner[0].__name__}" if len(inner) == 1 else text


# ---------------------------------------------------------------------- the patch
class PSAModelPatch:
    """One Apply PSA node: its preset and schedule, the forward wrapper, the per-step installer,
    and the log-once memory shared by all its overrides."""

    def __init__(self, preset: PSAPreset, dense_first_blocks: int = 0, dense_last_steps: int = 0, recorder=None):
        self.preset = preset
        self.recorder = recorder  # a plan_record.PlanRecorder when Apply PSA records for PSA Plan View
        self.dense_first_blocks = dense_first_blocks
        self.dense_last_steps = dense_last_steps
        self._logged: set = set()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the patch is immutable apart from its
        # log-once memory, which clones of one Apply PSA node should share.
        return self

    def once(self, key, msg: str, *fmt) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info("[PSA] " + msg, *fmt)

    # -------------------------------------------------------------- installing the override
    def install(self, to: dict) -> dict:
        """``to`` with this patch's override on top of whatever override is there, unless that
        one already passes calls on to PSA. Changes ``to`` in place and returns it."""
        current = to.get(OVERRIDE_KEY)
        if calls_psa(current, self):
            return to
        to[OVERRIDE_KEY] = PSAOverride(self, current)
        if current is not None:
            self.once(("kept", describe(current)),
                      "an attention override set after Apply PSA (%s) replaced PSA's; PSA is put back in "
                      "front and passes the calls it declines to that override", describe(current))
        return to

    def on_prepare_state(self, patcher, timestep=None, model_options=None, *args, **kwargs) -> None:
        """ON_PREPARE_STATE callback, run before every sampling step. Newer ComfyUI passes the
        sampling run's model_options, whose transformer_options every forward of the step
        starts from; 0.3.64 passes none, and the forward wrapper re-installs instead."""
        if isinstance(model_options, dict):
            self.install(model_options.setdefault("transformer_options", {}))

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
        """The forward's arguments with the context (and, where it was replaced, the override)
        added to a copy of its transformer_options, and the context; the arguments as they were
        and None when PSA cannot see this forward's options."""
        if isinstance(kwargs.get("transformer_options"), dict):
            to = kwargs["transformer_options"]
        elif args and isinstance(args[-1], dict):
            to = args[-1]
        else:
            self.once("no-to", "model forward without transformer_options: PSA is off for this model")
            return args, kwargs, None
        ctx = self._context(model, args, kwargs, to)
        to = self.install({**to, CTX_KEY: ctx})
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
            self.once("no-step", "no sampling sigmas in this forward: warm-up and dense_last_steps are off")
        preferred = _preferred_attention(model)
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or patch_size is None or len(patch_size) != 3:
            return ForwardContext((0, 0, 0), step, off_reason="the model is not a video transformer PSA knows",
                                  preferred=preferred)
        # Wan puts whole extra latent frames into the sequence: a time-concatenated condition
        # after the video, a reference image (ref_conv) in front.
        extra = 0
        concat = _arg(args, kwargs, _WAN_ARGS, "time_dim_concat")
        if isinstance(concat, torch.Tensor):
            extra += -(-concat.shape[2] // int(patch_size[0]))
        if getattr(model, "ref_conv", None) is not None and kwargs.get("reference_latent") is not None:
            extra += 1
        ctx = ForwardContext(token_grid(x.shape, patch_size, extra), step, preferred=preferred)
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
    def decline_reason(self, ctx: ForwardContext | None, to: dict, a: dict, extra: dict) -> tuple[str | None, int]:
        """(why this call does not run PSA, or None; the block index) for the parsed call ``a``."""
        if ctx is None:
            return "attention outside a forward PSA saw", -1
        q, k, heads = a["q"], a["k"], a["heads"]
        skip_reshape = bool(a.get("skip_reshape"))
        seq = 2 if skip_reshape else 1
        block = to.get("block_index")
        if q.shape[seq] != ctx.tokens or k.shape[seq] != ctx.tokens:
            return "cross-attention and other lengths", block if isinstance(block, int) else -1
        if not isinstance(block, int):
            block = ctx.calls
        ctx.calls += 1
        if ctx.off_reason:
            return ctx.off_reason, block
        cfg = self.preset.config
        reason = schedule_reason(block, ctx.step, cfg.warmup_steps, self.dense_first_blocks, self.dense_last_steps)
        if reason is None and cfg.is_dense:
            reason = "dense preset"
        if reason is None:
            head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
            reason = unsupported_reason(q, k, a["v"], a.get("mask"), head_dim, extra.get("scale"),
                                        bool(extra.get("enable_gqa")))
        if reason is not None:
            ctx.densities.append((block, reason))
            if self.recorder is not None:
                self.recorder.dense(ctx.step, block, reason)
        return reason, block

    def run_psa(self, q, k, v, heads, skip_reshape, skip_output_reshape, ctx: ForwardContext, block: int):
        """PSA for one video self-attention call, in the layout the model asked for."""
        if not skip_reshape:
            B, L, HD = q.shape
            q, k, v = (t.view(B, L, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
        self.once(("ran-psa", ctx.grid), "video self-attention on a %s token grid: ran PSA, preset %s/%s",
                  "x".join(map(str, ctx.grid)), self.preset.section or "-", self.preset.name)
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


class PSAOverride:
    """The ``optimized_attention_override`` of one PSA patch over the override it found (``inner``).

    ComfyUI calls it as ``override(func, q, k, v, heads, ...)`` with ``func`` the attention it
    would have run. When ``inner`` takes ``AttentionTensorContainer`` inputs (its
    ``container_function``), so does this override: declined calls pass the containers on
    untouched, and PSA takes the tensors out of them.
    """

    def __init__(self, patch: PSAModelPatch, inner=None):
        self.patch = patch
        self.inner = inner
        if getattr(inner, "container_function", None) is not None:
            self.container_function = self._call_with_containers

    def __deepcopy__(self, memo):
        return self  # see PSAModelPatch.__deepcopy__

    # Kept out of torch.compile graphs as a whole, like psa_attention: the routing counts the
    # blocks and logs in the per-forward context, and dynamo guards on that state (the block
    # counter, the length of the density list, the step) would recompile this function for
    # every block until its recompile limit. The attention that runs for the calls PSA
    # declines then runs uncompiled too: a single attention op, little for a compiler to fuse.
    @torch.compiler.disable
    def __call__(self, func, *args, **kwargs):
        a, extra, to, ctx = self._parse(args, kwargs)
        reason, block = self.patch.decline_reason(ctx, to, a, extra)
        if reason is None:
            return self.patch.run_psa(a["q"], a["k"], a["v"], a["heads"], bool(a.get("skip_reshape")),
                                      bool(a.get("skip_output_reshape")), ctx, block)
        if self.inner is not None:
            return self._ran(reason, self.inner, self.inner(func, *args, **kwargs))
        # ComfyUI takes preferred_attention out before calling an override; should one hand it
        # over, it is the layer's choice, as below
        layer = getattr(kwargs.pop("preferred_attention", None), "function", None)
        if layer is None and ctx is not None and block >= 0:
            kind = "self_attn" if a["q"].shape == a["k"].shape else "cross_attn"
            layer = ctx.preferred.get((block, kind))
        if layer is not None:
            # already inside ComfyUI's attention wrapper: the layer's function runs directly
            return self._ran(reason, layer, layer(*args, **{**kwargs, "_inside_attn_wrapper": True}))
        return self._ran(reason, func, func(*args, **kwargs))

    @torch.compiler.disable
    def _call_with_containers(self, *args, **kwargs):
        tensors = tuple(c.peek() for c in args[:3])
        kwargs.pop("preferred_attention", None)
        a, extra, to, ctx = self._parse(tensors + args[3:], kwargs)
        reason, block = self.patch.decline_reason(ctx, to, a, extra)
        if reason is not None:
            return self._ran(reason, self.inner, self.inner.container_function(*args, **kwargs))
        q, k, v = (c.take() for c in args[:3])
        return self.patch.run_psa(q, k, v, a["heads"], bool(a.get("skip_reshape")),
                                  bool(a.get("skip_output_reshape")), ctx, block)

    @staticmethod
    def _parse(args, kwargs):
        a = dict(zip(_ATTN_ARGS, args))
        a.update({n: kwargs[n] for n in _ATTN_ARGS if n in kwargs})
        extra = {n: kwargs[n] for n in ("scale", "enable_gqa") if n in kwargs}
        to = kwargs.get("transformer_options") or {}
        return a, extra, to, to.get(CTX_KEY)

    def _ran(self, reason: str, fn, out):
        self.patch.once(("ran", reason, id(fn)), "%s: ran %s", reason, describe(fn))
        return out


def apply_psa(model, preset: PSAPreset, dense_first_blocks: int = 0, dense_last_steps: int = 0, recorder=None):
    """A patched clone of a ComfyUI ModelPatcher; ``model`` itself is left as it was."""
    import comfy.patcher_extension as pe  # ComfyUI's; imported here so the helpers above need none

    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})
    inner = to.get(OVERRIDE_KEY)
    while isinstance(inner, PSAOverride):  # a second Apply PSA replaces the first
        inner = inner.inner
    patch = PSAModelPatch(preset, dense_first_blocks, dense_last_steps, recorder)
    to[OVERRIDE_KEY] = PSAOverride(patch, inner)  # an override set before Apply PSA runs what PSA declines
    m.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, patch.forward_wrapper)
    m.remove_callbacks_with_key(pe.CallbacksMP.ON_PREPARE_STATE, WRAPPER_KEY)
    m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, WRAPPER_KEY, patch.on_prepare_state)
    return m
