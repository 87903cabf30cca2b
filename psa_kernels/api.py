"""Public entry points: :func:`psa_attention` and the inspectable :func:`psa_plan`."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attention, estimate, levels as levels_mod, pyramid, schedule
from .tail_spread import block_moments, query_moments, spread_from_moments, tail_spread_bias
from .heavy import HeavyKeys, heavy_per_row, mean_query_from_blocks, select_heavy_keys
from .config import PSAConfig
from .layout import arrange, as_index, restore, sequence_permutation

BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class PSAStats:
    """What one call did. Density = sum over block pairs of 1/p (p > 0) / number of pairs; with
    a pooled tail a level-0 pair counts 1/n (one pooled key for its n keys), and a heavy key
    attended on its own 1/n of a pair."""
    density: float                    # mean over batch, heads and query blocks
    density_per_head: torch.Tensor    # [H], mean over batch
    level_counts: dict                # level -> number of (query block, key block) pairs


@dataclass
class PSAPlan:
    """Everything decided before the attention itself; inspectable for tests and debugging."""
    perm: torch.Tensor | None         # arranged = x[..., perm, :] (None: identity)
    inv: torch.Tensor | None
    scores: torch.Tensor              # [B, H, nqb, nkb] estimated block importance
    levels: torch.Tensor              # [B, H, nqb, nkb] int8 final levels
    video_len: int                    # video tokens, first in the arranged order
    backend: str
    pyramid: pyramid.Pyramid | None = None  # built while planning on the Triton path
    tail_n: int = 0                   # key block size when level-0 blocks form a pooled tail
    heavy: HeavyKeys | None = None    # heavy keys per head (``heavy_keys``)
    key_block: int = 0                # key block size n
    tail_spread: torch.Tensor | None = None  # [B, H, nqb, nkb] tail bias correction (tail_correction)

    def density(self) -> torch.Tensor:
        """[B, H] density (PSAStats' definition), on the plan's device: no host synchronisation."""
        dens = levels_mod.density(self.levels, self.tail_n)
        if self.heavy is not None and self.key_block:
            per_row = heavy_per_row(self.levels, self.heavy).float().mean(-1)
            dens = dens + per_row / (self.key_block * self.levels.shape[-1])
        return dens

    def stats(self) -> PSAStats:
        return _stats(self.levels, self.density())

    def heads(self, sl: slice) -> "PSAPlan":
        """This plan for a slice of the heads (the pyramid is left out)."""
        return dataclasses.replace(self, levels=self.levels[:, sl], scores=self.scores[:, sl], pyramid=None,
                                   heavy=self.heavy.heads(sl) if self.heavy is not None else None,
                                   tail_spread=self.tail_spread[:, sl] if self.tail_spread is not None else None)


def _stats(levels: torch.Tensor, dens: torch.Tensor) -> PSAStats:
    counts = torch.bincount(levels.flatten().long(), minlength=9)
    return PSAStats(density=float(dens.mean()), density_per_head=dens.mean(0).cpu(),
                    level_counts={lvl: int(counts[lvl]) for lvl in (1, 2, 4, 8, 0)})


_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q, k, v, cfg, grid, text_len) -> tuple[int, int, int]:
    if not isinstance(cfg, PSAConfig):
        raise ValueError(f"cfg: got {type(cfg).__name__}; allowed: a PSAConfig (from_dict reads the YAML form)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: got {type(x).__name__}; allowed: a torch.Tensor [B, H, L, D]")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, H, L, D] of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _INPUT_DTYPES:
        raise ValueError(f"q, k, v dtype: got {q.dtype}, {k.dtype}, {v.dtype}; allowed: one floating dtype "
                         f"for all three, of {', '.join(str(d).replace('torch.', '') for d in _INPUT_DTYPES)}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v device: got {q.device}, {k.device}, {v.device}; allowed: one device for all three")
    if q.shape[-1] < 1:
        raise ValueError(f"head dim (D of [B, H, L, D]): got {q.shape[-1]}; allowed: at least 1")
    try:
        dims = tuple(grid)
    except TypeError:
        dims = ()
    if len(dims) != 3:
        raise ValueError(f"grid: got {grid!r}; allowed: (T, H, W), 3 positive integers")
    T, Hh, W = (as_index(g, f"grid[{i}]", 1) for i, g in enumerate(dims))
    text_len = as_index(text_len, "text_len (with T*H*W + text_len = L)", 0)
    if q.shape[2] != T * Hh * W + text_len:
        raise ValueError(f"sequence length {q.shape[2]} != T*H*W + text_len = {T}*{Hh}*{W} + {text_len}")
    return T, Hh, W


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but need unit stride along the head dimension."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _offsets_fit_int32(*tensors: torch.Tensor | None) -> bool:
    """Whether every element offset of these tensors fits in 32 bits, so the kernels may
    address rows through an int32 arranged order (one index register a row, 32-bit address
    arithmetic: NOTES.md change 40)."""
    return all(sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride())) < 2 ** 31
               for x in tensors if x is not None)


def pyramid_layout(cfg: PSAConfig, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                   in_place: bool = False) -> dict:
    """What the Triton pyramid of a preset holds (:func:`pyramid.build_pyramid_triton`'s
    ``tail``, ``level1`` and ``pooled``): the tail when the preset has one, the pooled levels
    only when its level map can use them, and a copy of level 1 in the arranged order unless
    ``in_place`` (the kernel then reads k and v where they are: a smaller pyramid, a slower
    kernel, benchmarks/NOTES.md change 38) and k and v share one layout (without k and v:
    as if they do)."""
    same = k is None or v is None or k.stride() == v.stride()
    return {"tail": cfg.use_pooled_tail, "level1": not (in_place and same), "pooled": cfg.uses_pooled_levels}


def kernel_head_dim(head_dim: int) -> bool:
    """Whether the Triton kernels take this head dimension (a power of two, 16 to 256)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _triton_interpreted() -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (the CPU tests use it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _pick_backend(q: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: got {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        ok = q.is_cuda and q.dtype in _TRITON_DTYPES and kernel_head_dim(q.shape[-1])
        return "triton" if ok else "torch"
    if backend == "triton":
        why = None
        if not q.is_cuda and not _triton_interpreted():
            why = f"tensors on {q.device}: the Triton kernels run on CUDA devices (or under TRITON_INTERPRET=1)"
        elif q.dtype not in _TRITON_DTYPES:
            why = f"dtype {q.dtype}: the Triton kernels take float16, bfloat16 and float32"
        elif not kernel_head_dim(q.shape[-1]):
            why = f"head dim {q.shape[-1]}: the Triton kernels take powers of two from 16 to 256"
        if why:
            raise ValueError(f"backend: got 'triton' for {why}; allowed here: auto, torch")
    return backend


def psa_plan(q: torch.Tensor, k: torch.Tensor, cfg: PSAConfig, grid, text_len: int = 0,
             text_first: bool = False, backend: str = "auto", v: torch.Tensor | None = None,
             heads_per_pass: int | None = None, in_place: bool = False) -> PSAPlan:
    """Layout, block estimate, level assignment and similarity guard, without the attention.

    Given ``v`` too, the Triton path keeps the key/value pyramid it builds for the guard, so
    psa_attention(..., plan=plan) does not build it again (``in_place``: a pyramid that reads
    level 1 from k and v, see :func:`pyramid_layout`). ``heads_per_pass`` bounds the heads
    whose estimate scratch exists at one time (default: all)."""
    keep_pyramid = v is not None
    _check_inputs(q, k, k if v is None else v, cfg, grid, text_len)
    backend = _pick_backend(q, backend)
    m, n = cfg.block_size.m, cfg.block_size.n
    L = q.shape[2]
    video_len = L - text_len
    index = torch.int32 if backend == "triton" and _offsets_fit_int32(q, k, v) else torch.int64
    perm, inv = sequence_permutation(tuple(int(g) for g in grid), text_len, text_first,
                                     cfg.rearrange_method, tuple(cfg.tile_size), cfg.use_rearrange, q.device,
                                     index)
    nqb, nkb = -(-L // m), -(-L // n)
    text_q = torch.arange(nqb, device=q.device) * m + m > video_len if text_len else None
    text_k = torch.arange(nkb, device=q.device) * n + n > video_len if text_len else None
    pyr = sim = heavy = spread = None
    with_spread = cfg.use_pooled_tail and cfg.tail_correction == "variance"
    if backend == "triton":
        # The kernels read the arranged order through perm, so nothing is copied; the pyramid
        # pass reads every key block anyway and measures key similarity on the way.
        q, k = _unit_stride(q), _unit_stride(k)
        # With the spread correction one pass over q and one over k give both the spread's
        # moments and the block means the block-mean estimate routes with; the heavy keys,
        # which the k pass needs, take their mean query from the q pass's block means.
        qmom = query_moments(q, m, perm) if with_spread else None
        if cfg.heavy_keys:
            qbar = (mean_query_from_blocks(qmom[0], estimate.block_shares_cached(L, m, q.device))
                    if qmom is not None else None)
            heavy = select_heavy_keys(q, k, cfg.heavy_keys, n, inv, video_len, use_triton=True, qbar=qbar)
        mom = block_moments(q, k, m, n, perm, heavy, query=qmom) if with_spread else None
        if cfg.estimate_method == "block_mean":
            scores = (estimate.scores_from_means(mom.q_mean, mom.k_mean, L, n) if mom is not None
                      else estimate.estimate_block_mean(q, k, m, n, perm))
        else:
            scores = estimate.estimate_triton(q, k, m, n, perm, heads_per_pass=heads_per_pass)
        lv = levels_mod.assign_levels_triton(scores, cfg, text_q, text_k)
        if with_spread:
            spread = spread_from_moments(mom)
            del mom
        if keep_pyramid or cfg.use_sim_mask:
            v = _unit_stride(v) if keep_pyramid else None
            pyr, sim = pyramid.build_pyramid_triton(k, v, n, L, cfg.use_sim_mask, perm,
                                                    heavy=heavy if keep_pyramid else None,
                                                    **pyramid_layout(cfg, k, v if keep_pyramid else k, in_place))
    else:
        if cfg.heavy_keys:
            heavy = select_heavy_keys(q, k, cfg.heavy_keys, n, inv, video_len)
        qa, ka = arrange(q, perm), arrange(k, perm)
        scores = (estimate.estimate_block_mean(qa, ka, m, n, triton_means=False) if cfg.estimate_method == "block_mean"
                  else estimate.estimate_reference(qa, ka, m, n))
        lv = levels_mod.assign_levels(scores, cfg, text_q, text_k)
        if with_spread:
            spread = tail_spread_bias(qa, ka, m, n, heavy=_arranged(heavy, inv), use_triton=False)
        if cfg.use_sim_mask:
            sim = levels_mod.key_similarity(ka, n, L)
    if cfg.use_sim_mask:
        lv = levels_mod.apply_similarity_guard(lv, sim, cfg)
    return PSAPlan(perm, inv, scores, lv, video_len, backend, pyr, n if cfg.use_pooled_tail else 0, heavy, n,
                   spread)


def _arranged(heavy: HeavyKeys | None, inv: torch.Tensor | None) -> HeavyKeys | None:
    """Heavy keys with their positions in the arranged order (the torch path's)."""
    if heavy is None or inv is None:
        return heavy
    return HeavyKeys(inv.long()[heavy.index], heavy.block)


# torch.compile (ComfyUI's TorchCompileModel included) leaves the call out of its graph: the
# schedule sizes depend on the data and the caches are plain Python, so tracing it would
# only add guards and recompiles; the Triton kernels run as they are.
@torch.compiler.disable
def psa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: PSAConfig, grid,
                  text_len: int = 0, text_first: bool = False, return_stats: bool = False,
                  backend: str = "auto", plan: PSAPlan | None = None, heads_per_pass: int | None = None):
    """Pyramid Sparse Attention.

    q, k, v: [B, H, L, D] with L = T*H*W + text_len; the text tokens sit before the video
    tokens when ``text_first`` and after them otherwise, and always get full attention.
    Returns the output in the caller's token order, same dtype and shape, and with
    ``return_stats`` also a :class:`PSAStats`. ``type: dense`` presets compute exact
    attention. ``backend``: "auto" (Triton on CUDA, torch elsewhere), "torch", "triton".
    ``plan`` reuses a :func:`psa_plan` result for these inputs. ``heads_per_pass``: the
    Triton path builds the key/value pyramid and the tile schedule, most of the memory a
    call adds, for this many heads at a time (and the estimate's scratch); by default all
    heads at once when the free device memory holds them, else as many as it holds.
    """
    _check_inputs(q, k, v, cfg, grid, text_len)
    if cfg.is_dense:
        out = F.scaled_dot_product_attention(q, k, v)
        if not return_stats:
            return out
        B, H, L = q.shape[:3]
        pairs = B * H * math.ceil(L / cfg.block_size.m) * math.ceil(L / cfg.block_size.n)
        return out, PSAStats(1.0, torch.ones(H), {1: pairs, 2: 0, 4: 0, 8: 0, 0: 0})
    H = q.shape[1]
    if heads_per_pass:  # the caller saves memory: level 1 read in place as well
        group = min(H, heads_per_pass)
        in_place = group < H
    else:
        group, in_place = _passes(q, cfg)
    if plan is None:
        plan = psa_plan(q, k, cfg, grid, text_len, text_first, backend, v=v if group == H else None,
                        heads_per_pass=group, in_place=in_place)
    if plan.backend != "triton" or group == H or plan.pyramid is not None:
        out = _attend(q, k, v, cfg, plan, in_place=in_place)
    else:
        # The estimate and the levels ran for all heads at once (they hold little memory);
        # the pyramid and the schedule, most of what a call adds, live for one group at a time.
        out = torch.empty_like(q)
        for h0 in range(0, H, group):
            heads = slice(h0, h0 + group)
            part = plan.heads(heads)
            _attend(q[:, heads], k[:, heads], v[:, heads], cfg, part, out[:, heads], in_place)
    return (out, plan.stats()) if return_stats else out


def heads_that_fit(heads: int, bytes_per_head: int, free_bytes: int) -> int:
    """All heads when their pyramids and schedules fit in 90% of the free memory, else as many
    as fit (at least one)."""
    return max(1, min(heads, int(0.9 * free_bytes) // max(1, bytes_per_head)))


def bytes_per_head(q: torch.Tensor, cfg: PSAConfig, in_place: bool) -> int:
    """Device memory a call adds per head on the Triton path (the pyramid and the schedule, or
    the estimate's scratch, which is freed before they are made)."""
    B, H, L, D = q.shape
    m, n = cfg.block_size.m, cfg.block_size.n
    return max(attention.attention_bytes_per_head(B, L, D, q.element_size(), m, n, cfg.attn_impl == "new_mask_type",
                                                **pyramid_layout(cfg, in_place=in_place)),
               estimate.scratch_bytes_per_head(B, L, m, n))


# Presets whose level 1 takes at most this share of a row's key blocks (mask_mode topk) read
# it in place even where memory would hold a copy: the copy reads and writes all of k and v,
# more than the in-place kernel loses on so few level-1 tiles (benchmarks/NOTES.md change 43).
IN_PLACE_LEVEL1_SHARE = 0.02


def reads_level1_in_place(cfg: PSAConfig) -> bool:
    """Whether a preset's level 1 is read in place by choice (:data:`IN_PLACE_LEVEL1_SHARE`)."""
    share = cfg.level1_block_share
    return share is not None and share <= IN_PLACE_LEVEL1_SHARE


def _passes(q: torch.Tensor, cfg: PSAConfig) -> tuple[int, bool]:
    """(heads per pass, level 1 read in place) when the caller names no heads per pass: all
    heads at once with level 1 copied (fastest, but for presets with a sparse level 1:
    :func:`reads_level1_in_place`) when the free device memory holds that; else level 1 read
    in place (a smaller pyramid, a slower kernel), all heads at once if they fit, else as many
    as fit, so that PSA never runs out of memory where one pass would not fit."""
    H = q.shape[1]
    if not q.is_cuda:
        return H, False
    copy, in_place = bytes_per_head(q, cfg, False), bytes_per_head(q, cfg, True)
    # the nested statistics: torch.cuda.memory_reserved() and memory_allocated() flatten all
    # of them first, a host cost on every call (benchmarks/NOTES.md, change 20)
    stats = torch.cuda.memory_stats_as_nested_dict(q.device)
    free = stats["reserved_bytes"]["all"]["current"] - stats["allocated_bytes"]["all"]["current"]
    by_choice = reads_level1_in_place(cfg)
    if by_choice:
        copy = in_place
    if heads_that_fit(H, copy, free) < H:
        # the allocator's cache (which holds the last call's buffers) is short: add what the
        # driver has free besides
        free += torch.cuda.mem_get_info(q.device)[0]
    if heads_that_fit(H, copy, free) == H:
        return H, by_choice
    return heads_that_fit(H, in_place, free), True


def _attend(q, k, v, cfg: PSAConfig, plan: PSAPlan, out: torch.Tensor | None = None,
            in_place: bool = False) -> torch.Tensor:
    """The pyramid attention of a plan, in the caller's token order (``in_place``: see
    :func:`pyramid_layout`)."""
    m, n = cfg.block_size.m, cfg.block_size.n
    L = q.shape[2]
    if plan.backend == "triton":
        pyr = plan.pyramid
        if pyr is None:
            k, v = _unit_stride(k), _unit_stride(v)
            pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, perm=plan.perm, heavy=plan.heavy,
                                                  **pyramid_layout(cfg, k, v, in_place))
        sched = schedule.build_schedule(plan.levels, pyr, packed=cfg.attn_impl == "new_mask_type",
                                        tail_spread=plan.tail_spread)
        return attention.attention_triton(_unit_stride(q), pyr, sched, m, out=out, perm=plan.perm)
    # the reference pyramid is built in the arranged order
    pyr = pyramid.build_pyramid(arrange(k, plan.perm), arrange(v, plan.perm), n, L, tail=cfg.use_pooled_tail,
                                heavy=_arranged(plan.heavy, plan.inv))
    return restore(attention.attention_reference(arrange(q, plan.perm), pyr, plan.levels, m,
                                                 tail_spread=plan.tail_spread), plan.inv)
