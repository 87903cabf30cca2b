"""A test double of the attention hook of the newest ComfyUI (0.38 and later), for the API version
the real-ComfyUI tests cannot run (they run the 0.3.64 snapshot in ../shared/comfyui).

Written from that version's code (comfy/ldm/modules/attention.py ``wrap_attn``,
comfy/model_patcher.py ``set_model_optimized_attention`` and ``prepare_state``,
comfy_extras/nodes_sparse_attention.py, comfy/ldm/wan/model.py), in our words; what it
keeps of that contract:

- attention call sites wrap q, k, v in single-owner ``AttentionTensorContainer`` objects and pass
  ``preferred_attention`` (the layer's ``ComfyAttention``, whose ``function`` a checkpoint may set);
- ``wrap_attn`` takes ``preferred_attention`` out of the arguments first; with an override in
  ``transformer_options`` it calls the override's ``container_function`` with the containers when
  the override has one, else unwraps the tensors and calls ``override(func, q, k, v, ...)`` with
  ``_inside_attn_wrapper`` set; only without an override does the layer's function run;
- ``set_model_optimized_attention`` ("Model Attention Backend") replaces the override with a
  closure over the backend and copies the backend's ``container_function``;
- "Model Sparse Attention" chains the previous override in a closure and re-installs itself from
  an ON_PREPARE_STATE callback, which is given the sampling run's model_options;
- Wan sets ``grid_sizes`` and ``block_index`` in ``transformer_options`` during its forward.
"""
from __future__ import annotations

import copy
import math
import types

import torch
import torch.nn.functional as F

OVERRIDE_KEY = "optimized_attention_override"
DIFFUSION_MODEL = "diffusion_model"     # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
ON_PREPARE_STATE = "on_prepare_state"   # comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE

patcher_extension = types.ModuleType("comfy.patcher_extension")
patcher_extension.WrappersMP = types.SimpleNamespace(DIFFUSION_MODEL=DIFFUSION_MODEL)
patcher_extension.CallbacksMP = types.SimpleNamespace(ON_PREPARE_STATE=ON_PREPARE_STATE)


class AttentionTensorContainer:
    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return self.tensor

    def take(self):
        tensor = self.peek()
        self.tensor = None
        return tensor


def wrap_attn(func):
    def wrapper(*args, **kwargs):
        preferred = kwargs.pop("preferred_attention", None)
        containers = args[:3] if args and isinstance(args[0], AttentionTensorContainer) else None
        outermost = "_inside_attn_wrapper" not in kwargs
        try:
            if outermost:
                kwargs["_inside_attn_wrapper"] = True
                to = kwargs.get("transformer_options")
                if to is not None and OVERRIDE_KEY in to:
                    override = to[OVERRIDE_KEY]
                    if containers is not None:
                        if hasattr(override, "container_function"):
                            return override.container_function(*args, **kwargs)
                        args = tuple(c.take() for c in containers) + args[3:]
                    return override(func, *args, **kwargs)
                if preferred is not None and preferred.function is not None:
                    return preferred.function(*args, **kwargs)
            if containers is not None:
                if wrapper.container_function is not None:
                    return wrapper.container_function(*args, **kwargs)
                args = tuple(c.take() for c in containers) + args[3:]
            return func(*args, **kwargs)
        finally:
            if outermost:
                del kwargs["_inside_attn_wrapper"]
    wrapper.container_function = None
    wrapper.__name__ = func.__name__
    return wrapper


def _sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
          **kwargs):
    if not skip_reshape:
        B, L, HD = q.shape
        q, k, v = (t.view(B, -1, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


CALLS: dict[str, int] = {}  # attention function name -> calls, for the tests to read


def _counted(name, fn):
    def run(*args, **kwargs):
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn(*args, **kwargs)
    run.__name__ = name
    return run


attention_pytorch = wrap_attn(_counted("attention_pytorch", _sdpa))
optimized_attention = attention_pytorch


def _low_precision(q, k, v, heads, **kwargs):
    """Stands for comfy kitchen int8 attention: a result that differs from SDPA's."""
    return _sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads, **kwargs).to(q.dtype)


attention_kitchen = wrap_attn(_counted("attention_kitchen", _low_precision))
attention_kitchen.container_function = _counted(
    "attention_kitchen_containers",
    lambda q, k, v, *args, **kwargs: _low_precision(q.take(), k.take(), v.take(), *args, **kwargs))


class ComfyAttention:
    def __init__(self, function=None):
        self.function = function


# ---------------------------------------------------------------------- model patcher
def copy_nested_dicts(d: dict) -> dict:
    return {k: copy_nested_dicts(v) if isinstance(v, dict) else (v.copy() if isinstance(v, list) else v)
            for k, v in d.items()}


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.callbacks: dict = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        return n

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def set_model_optimized_attention(self, optimized_attention):
        def optimized_attention_override(_, *args, **kwargs):
            return optimized_attention(*args, **kwargs)
        if getattr(optimized_attention, "container_function", None) is not None:
            optimized_attention_override.container_function = optimized_attention.container_function
        self.model_options["transformer_options"][OVERRIDE_KEY] = optimized_attention_override

    def prepare_state(self, timestep, model_options):
        for fns in self.callbacks.get(ON_PREPARE_STATE, {}).values():
            for fn in fns:
                fn(self, timestep, model_options)


# ---------------------------------------------------------------------- Model Sparse Attention
class SparsePatch:
    """Takes the self-attention of the blocks in ``blocks`` (standing for its own kernel with a
    result of its own), declines the rest to the previous override or ``func``."""

    def __init__(self, blocks):
        self.blocks = set(blocks)
        self.installed = set()
        self.ran = 0


def make_sparse_override(patch: SparsePatch, previous):
    def override(func, q, k, v, heads, mask=None, **kwargs):
        to = kwargs.get("transformer_options") or {}
        if q.shape == k.shape and to.get("block_index") in patch.blocks:
            patch.ran += 1
            return _sdpa(q, k, v, heads, **kwargs) * 0.5
        args = (q, k, v, heads)
        kw = dict(mask=mask, **kwargs)
        return func(*args, **kw) if previous is None else previous(func, *args, **kw)
    return override


def install_sparse(patch: SparsePatch, to: dict) -> None:
    current = to.get(OVERRIDE_KEY)
    if current in patch.installed:
        return
    override = make_sparse_override(patch, current)
    patch.installed.add(override)
    to[OVERRIDE_KEY] = override


def apply_sparse(model: ModelPatcher, blocks) -> tuple[ModelPatcher, SparsePatch]:
    patch = SparsePatch(blocks)
    m = model.clone()
    install_sparse(patch, m.model_options["transformer_options"])
    m.add_callback_with_key(ON_PREPARE_STATE, "block_sparse_attention",
                            lambda p, t, model_options: install_sparse(patch, model_options["transformer_options"]))
    return m, patch


# ---------------------------------------------------------------------- a Wan-shaped model
class Executor:
    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers, idx

    def __call__(self, *args, **kwargs):
        if self.idx < len(self.wrappers):
            return self.wrappers[self.idx](Executor(self.original, self.class_obj, self.wrappers, self.idx + 1),
                                           *args, **kwargs)
        return self.original(*args, **kwargs)


class Attention:
    def __init__(self, dim, g):
        self.comfy_attention = ComfyAttention()
        self.q, self.k, self.v = (torch.randn(dim, dim, generator=g) / math.sqrt(dim) for _ in range(3))


class Block:
    def __init__(self, dim, g):
        self.self_attn, self.cross_attn = Attention(dim, g), Attention(dim, g)


class TinyWan:
    """Wan's attention calls over a patch-embedded latent: per block, self-attention over the
    video tokens, then cross-attention to the text, each through the wrapped attention with
    containers and the layer's preferred attention."""
    patch_size = (1, 2, 2)
    ref_conv = None

    def __init__(self, dim=64, heads=2, blocks=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.dim, self.heads = dim, heads
        self.embed = torch.randn(16 * 4, dim, generator=g) / 8
        self.blocks = [Block(dim, g) for _ in range(blocks)]

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}):
        wrappers = [w for ws in transformer_options.get("wrappers", {}).get(DIFFUSION_MODEL, {}).values() for w in ws]
        return Executor(self._forward, self, wrappers)(x, timestep, context, clip_fea, time_dim_concat,
                                                      transformer_options)

    def _forward(self, x, timestep, context, clip_fea, time_dim_concat, transformer_options):
        B, C, T, H, W = x.shape
        grid = (T, H // 2, W // 2)
        patches = x.view(B, C, T, H // 2, 2, W // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, math.prod(grid), -1)
        h = patches @ self.embed
        transformer_options["grid_sizes"] = grid
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            a = block.self_attn
            h = h + optimized_attention(AttentionTensorContainer(h @ a.q), AttentionTensorContainer(h @ a.k),
                                        AttentionTensorContainer(h @ a.v), heads=self.heads,
                                        preferred_attention=a.comfy_attention, transformer_options=transformer_options)
            c = block.cross_attn
            h = h + optimized_attention(AttentionTensorContainer(h @ c.q), AttentionTensorContainer(context @ c.k),
                                        AttentionTensorContainer(context @ c.v), heads=self.heads,
                                        preferred_attention=c.comfy_attention, transformer_options=transformer_options)
        return h


def sample(patcher: ModelPatcher, x, context, steps=3) -> tuple[list[torch.Tensor], dict]:
    """A sampler run as ComfyUI makes it: one copy of the model options for the run, given to
    ON_PREPARE_STATE before each step; each forward starts from a fresh merge of them."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    run_options = copy_nested_dicts(patcher.model_options)
    run_options["transformer_options"]["sample_sigmas"] = sigmas
    outs = []
    for i in range(steps):
        sigma = sigmas[i:i + 1]
        patcher.prepare_state(sigma, run_options)
        to = copy_nested_dicts(run_options["transformer_options"])
        to["sigmas"] = sigma
        to["wrappers"] = patcher.wrappers
        outs.append(patcher.model.forward(x, sigma, context, transformer_options=to))
    return outs, run_options
