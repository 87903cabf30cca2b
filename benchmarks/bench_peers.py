"""PSA against ComfyUI's built-in sparse attention (Sol-Attn, ``comfy_kitchen.sol_attn``) and cuDNN.

    python3 benchmarks/bench_peers.py                          # 480p and 720p, every regime
    python3 benchmarks/bench_peers.py --quick --shapes 480p    # fewer settings
    python3 benchmarks/bench_peers.py --dry-run                # CPU, tiny shape, torch stand-in for Sol

One run, one GPU, the same inputs for every method: q, k, v of a video shape (480p: grid
21 x 30 x 52, 12 heads; 720p: 21 x 45 x 80, 40 heads; head dim 128, bf16, batch 1) in
several attention regimes, each calibrated by the share of attention mass that the top 10%
of 64-token key blocks hold (psa_kernels.synthetic.block_mass_share, printed per regime).
The sparse methods get what an attention override gets in ComfyUI, q/k/v as
[B, L, heads*128] in the model's (row-major video) token order, and return that layout; their
time is the whole call (routing included):

- cuDNN SDPA, dense, on contiguous [B, H, L, D] copies made beforehand: the speed-up
  reference (as in bench_attention.py);
- Sol-Attn, called as the core node "Model Sparse Attention" calls it (no reordering, sinks
  off), at tau x extra_tokens and topk_ratio x extra_tokens;
- PSA, psa_attention with the grid (it arranges the tokens itself), at the presets of
  ``psa_presets()``: the shipped Wan presets and topk / thresholdbound sweeps, each also with
  ``use_pooled_tail: true`` (reported n/a while the library does not honour it).

Error: relative L2 of the output against a float32 dense reference. Sol comes from the
comfy-kitchen wheel unpacked (without backends/hip) into ``.kitchen/`` at the repository root
(or KITCHEN_PATH); it is never part of the repository. ``--dry-run`` replaces it by
``sol_standin``, a torch implementation written from Sol-Attn's documented behaviour, for
checking this script on a CPU: its rows are labelled as the stand-in and are not Sol.

Writes to --out (default $OUT or out/): peers.json, peers.md and one PNG per regime (both
shapes as two panels): 7 files at most.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from psa_kernels import PSAConfig, load_attention_config, psa_attention  # noqa: E402
from psa_kernels.estimate import block_lengths, block_means_reference  # noqa: E402
from psa_kernels.synthetic import (block_mass_share, calibrate_logit_scale,  # noqa: E402
                                   video_attention_qkv)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sol_kitchen import load_sol, sol_backend  # noqa: E402


# name -> (grid (T, H, W) of latent tokens, heads); head dim 128 (Wan, and Sol-Attn's only one)
SHAPES = {"480p": ((21, 30, 52), 12), "720p": ((21, 45, 80), 40), "tiny": ((3, 16, 24), 4)}
HEAD_DIM = 128
MIXED_HEADS = ("spatial", "temporal", "local", "sink", "spatial", "uniform")


@dataclass(frozen=True)
class Regime:
    """Inputs of one kind: head types, and the block-mass share the temperature is set to."""
    head_types: tuple
    target: dict            # shape name -> share of the top 10% of key blocks ("*": any other)
    per_head: bool          # every head at the target, or their mean (heads keep their differences)
    note: str

    def target_for(self, shape: str) -> float:
        return self.target.get(shape, self.target["*"])


REGIMES = {
    "concentrated": Regime(("local",), {"*": 0.90}, True, "local heads, top 10% of key blocks hold ~90%"),
    "medium": Regime(("local",), {"*": 0.65}, True, "local heads, ~65%"),
    "diffuse": Regime(("local",), {"*": 0.45, "720p": 0.35}, True,
                      "local heads, ~45% (480p) / ~35% (720p)"),
    "very_diffuse": Regime(("local",), {"*": 0.29}, True, "local heads, ~29%"),
    "mixed": Regime(MIXED_HEADS, {"*": 0.60}, False,
                    "video-DiT head types (spatial, temporal, local, sink, uniform), mean ~60%"),
}


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SolSetting:
    tau: float = 1.3
    topk_ratio: float = 0.0        # > 0: top-k routing, tau ignored
    extra_tokens: int = 256        # the node's widget; comfy_kitchen's token_aug

    @property
    def name(self) -> str:
        mode = f"topk {self.topk_ratio:g}" if self.topk_ratio else f"tau {self.tau:g}"
        return f"{mode} extra {self.extra_tokens}"

    @property
    def is_default(self) -> bool:   # the core node's defaults (method sol-attn)
        return not self.topk_ratio and self.tau == 1.3 and self.extra_tokens == 256


def sol_settings(quick: bool = False) -> list[SolSetting]:
    taus = (1.0, 1.3, 2.0, 3.0) if quick else (0.5, 1.0, 1.3, 2.0, 3.0)
    ratios = () if quick else (0.05, 0.1, 0.2)
    return ([SolSetting(tau=t, extra_tokens=e) for t in taus for e in (0, 256)]
            + [SolSetting(topk_ratio=r, extra_tokens=e) for r in ratios for e in (0, 256)])


# psa_topk's shares of levels 1, 2, 4, 8 (block n 32), scaled together: density 0.10 per unit
TOPK_SHARES = (0.05, 0.05, 0.05, 0.10)
TOPK_DENSITIES = (0.06, 0.10, 0.15, 0.20, 0.25, 0.35)
TOPK_DENSITIES_QUICK = (0.10, 0.20)
# thresholdbound (block n 64): level 1 up to mass share a, then levels 2, 4 and 8 in steps of
# (1 - a) / 5 (8 gets two), the last fifth skipped
TB_LEVEL1 = (0.55, 0.7, 0.9)
TB_LEVEL1_QUICK = (0.55, 0.9)
QUICK_SHIPPED = ("Wan2.1_1.3b/psa_topk", "Wan2.1_14b/psa_balanced")
# tail-only sweeps (block n 64; without the tail these densities lose most of the attention):
# level 1 alone up to share a; and psa_quality's pyramid (levels 1, 2, 4, 8 ending at 0.06,
# 0.1, 0.16, 0.3) scaled by s; each routed both ways
TAIL_L1 = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)
TAIL_PYRAMID_SCALE = (0.5, 0.75, 1.5)
# the same level-1 sweep at key blocks of 128: half the tail rows of n 64 (a cheaper tail loop,
# a coarser tail and route; NOTES.md change 44)
TAIL128_L1 = (0.0025, 0.005, 0.0075, 0.01, 0.02, 0.04)
ESTIMATES = ("sampled", "block_mean")
# heavy keys per head (heavy_keys): each tail preset (sweeps and shipped) also with these
HEAVY_COUNTS = (64, 128, 256)
TAIL, NO_TAIL = "+tail", "-notail"
SPREAD, NO_SPREAD = "_var", "-novar"  # the tail with / without tail_correction: variance (NOTES.md change 41)


def _ranges(cuts: list[float]) -> dict:
    """mask_ratios from the ends of levels 1, 2, 4, 8 (cumulative); level 0 gets the rest."""
    ratios, lo = {}, 0.0
    for lvl, hi in zip((1, 2, 4, 8), cuts):
        ratios[lvl] = [lo, round(hi, 4)]
        lo = ratios[lvl][1]
    ratios[0] = [lo, 1.0]
    return ratios


def topk_preset(density: float) -> dict:
    unit = sum(s / p for s, p in zip(TOPK_SHARES, (1, 2, 4, 8)))
    cuts = list(torch.tensor(TOPK_SHARES).cumsum(0).mul(density / unit).tolist())
    return {"block_size": {"m": 128, "n": 32, "tile_n": 32}, "mask_ratios": _ranges(cuts),
            "mask_mode": "topk", "attn_impl": "new_mask_type"}


def thresholdbound_preset(level1: float) -> dict:
    d = (1.0 - level1) / 5
    return {"block_size": {"m": 128, "n": 64, "tile_n": 32},
            "mask_ratios": _ranges([level1, level1 + d, level1 + 2 * d, level1 + 4 * d]),
            "mask_mode": "thresholdbound", "attn_impl": "new_mask_type"}


def shipped_presets(path: Path = REPO / "configs" / "attention_config.yaml") -> dict:
    """The shipped sparse presets of the Wan sections (YAML form), one name per distinct preset."""
    found, seen = {}, set()
    for section, mc in load_attention_config(path).items():
        if not section.startswith("Wan"):
            continue
        for name, cfg in mc.attention_configs.items():
            if cfg.is_dense:
                continue
            d = {k: v for k, v in cfg.to_dict().items() if k not in ("description", "warmup_steps", "verbose")}
            key = json.dumps(d, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                found[f"{section}/{name}"] = d
    return found


def psa_presets(quick: bool = False) -> dict:
    """name -> preset (YAML form), each without and then with ``use_pooled_tail: true``: NAME and
    NAME+tail, or NAME-notail and NAME for a shipped preset that has the tail already."""
    base = shipped_presets()
    if quick:
        base = {n: base[n] for n in QUICK_SHIPPED}
    for d in (TOPK_DENSITIES_QUICK if quick else TOPK_DENSITIES):
        base[f"topk_d{d:.2f}"] = topk_preset(d)
    for a in (TB_LEVEL1_QUICK if quick else TB_LEVEL1):
        base[f"thresholdbound_l1_{a:.2f}"] = thresholdbound_preset(a)
    out = {}
    for name, preset in base.items():
        plain, tail = {**preset, "use_pooled_tail": False}, {**preset, "use_pooled_tail": True}
        if preset.get("use_pooled_tail"):
            out[name + NO_TAIL], out[name] = plain, tail
        else:
            out[name], out[name + TAIL] = plain, tail
    if not quick:
        for est in ESTIMATES:
            for a in TAIL_L1:
                out[f"tail64_l1_{a:g}_{est}"] = {**_n64(_ranges([a, a, a, a])), "estimate_method": est}
            for sc in TAIL_PYRAMID_SCALE:
                cuts = [round(c * sc, 4) for c in (0.06, 0.1, 0.16, 0.3)]
                out[f"tail64_pyr_x{sc:g}_{est}"] = {**_n64(_ranges(cuts)), "estimate_method": est}
            for a in TAIL128_L1:
                out[f"tail128_l1_{a:g}_{est}"] = {**_n64(_ranges([a, a, a, a])), "estimate_method": est,
                                                  "block_size": {"m": 128, "n": 128, "tile_n": 32}}
        for name, preset in list(out.items()):  # the heavy-key variants come last
            if not preset.get("use_pooled_tail") or preset.get("heavy_keys"):
                continue
            for count in HEAVY_COUNTS:
                out[f"{name}_h{count}"] = {**preset, "heavy_keys": count}
        for name, preset in list(out.items()):  # then every tail preset with the spread correction
            if not preset.get("use_pooled_tail"):  # switched on, or off where the preset has it
                continue
            if preset.get("tail_correction", "none") == "none":
                out[f"{name}{SPREAD}"] = {**preset, "tail_correction": "variance"}
            else:
                out[f"{name}{NO_SPREAD}"] = {**preset, "tail_correction": "none"}
    return out


def _n64(ratios: dict) -> dict:
    return {"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_ratios": ratios, "mask_mode": "topk",
            "attn_impl": "new_mask_type", "use_pooled_tail": True}


def tail_twins(earlier: dict | None, preset: dict) -> bool:
    """Whether ``preset`` is ``earlier`` with the pooled tail switched on, and nothing else changed."""
    if earlier is None or earlier.get("use_pooled_tail") or not preset.get("use_pooled_tail"):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k != "use_pooled_tail"}  # noqa: E731
    return strip(earlier) == strip(preset)


# ------------------------------------------------------------------------------ the methods
# Each takes q, k, v as ComfyUI's Wan self-attention hands them to an override, [B, L, H*D]
# contiguous, and returns [B, L, H*D].

def psa_call(q, k, v, heads: int, cfg: PSAConfig, grid, return_stats: bool = False):
    """What Apply PSA's override does for a video self-attention call."""
    B, L, HD = q.shape
    qh, kh, vh = (t.view(B, L, heads, HD // heads).transpose(1, 2) for t in (q, k, v))
    res = psa_attention(qh, kh, vh, cfg, grid, return_stats=return_stats)
    out, stats = res if return_stats else (res, None)
    out = out.transpose(1, 2).reshape(B, L, HD)
    return (out, stats) if return_stats else out


def sol_call(sol_attn, q, k, v, heads: int, s: SolSetting):
    """What the core node's override does for a call it sends to Sol-Attn (generic models: no
    sinks, the tokens in the model's order, BTHD views of the [B, L, H*D] inputs)."""
    B, L, HD = q.shape
    qs, ks, vs = (t.view(B, L, heads, HD // heads) for t in (q, k, v))
    out = sol_attn(qs, ks, vs, tau=s.tau, scale=None, sink_blocks=[0, 0], sink_q=[0, 0],
                   topk_ratio=s.topk_ratio, token_aug=s.extra_tokens)
    return out.reshape(B, L, HD)


# ------------------------------------------------------------------------------ Sol-Attn's maths in torch
SOL_BLOCK = 64


def _block_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] float -> block means [B, H, n, D] over 64-token blocks, and the lengths [n]."""
    T = x.shape[2]
    return block_means_reference(x, SOL_BLOCK), block_lengths(T, SOL_BLOCK, x.device)


def sol_routing(q: torch.Tensor, k: torch.Tensor, tau: float, topk_ratio: float = 0.0, scale=None):
    """Sol-Attn's block routing as documented, in float32 (the kernel routes on int8 proxies).

    q, k: [B, T, H, D]. Returns (exact [B, H, n, n] bool, proxy scores [B, H, n, n] in natural
    log units, centred block-mean keys [B, H, n, D], key mean [B, H, 1, D], lengths [n]).
    A query block's proxy score for a key block is its mean query (centroid) against the
    block's mean key, keys centred by their mean over blocks. Routed exactly: proxy above tau
    standard deviations of the proxy row (tau mode), or the round(topk_ratio * n) best blocks,
    ties kept (top-k mode); the diagonal block and its two neighbours always.
    """
    B, T, H, D = q.shape
    n = -(-T // SOL_BLOCK)
    scale = D ** -0.5 if scale is None else scale
    cen, lengths = _block_means(q.float().transpose(1, 2))
    km, _ = _block_means(k.float().transpose(1, 2))
    kmean = km.mean(2, keepdim=True)
    kc = km - kmean
    proxy = cen @ kc.transpose(-1, -2) * scale
    if topk_ratio:
        kk = max(0, min(n - 1, max(1, round(topk_ratio * n))))
        exact = (proxy >= proxy.topk(kk, dim=-1).values[..., -1:]) if kk else torch.zeros_like(proxy, dtype=torch.bool)
    else:
        sigma = scale * ((cen ** 2) * kc.pow(2).mean(2, keepdim=True)).sum(-1).sqrt()   # [B, H, n]
        exact = proxy > tau * sigma.unsqueeze(-1)
    idx = torch.arange(n, device=q.device)
    exact = exact | ((idx.view(-1, 1) - idx.view(1, -1)).abs() <= 1)
    return exact, proxy, kc, kmean, lengths


def sol_routed_share(q, k, s: SolSetting) -> float:
    """Share of (query block, key block) pairs Sol-Attn routes exactly (torch replica of the
    routing; not counting the extra tokens, nor the pooled terms)."""
    exact = sol_routing(q, k, s.tau, s.topk_ratio)[0]
    return float(exact.float().mean())


def sol_standin(q, k, v, tau: float = 1.0, scale=None, sink_blocks=None, sink_q=None,
                topk_ratio: float = 0.0, token_aug: int = 0):
    """A torch stand-in for ``comfy_kitchen.sol_attn`` (NOT Sol-Attn: for dry runs on a CPU).

    Written from Sol-Attn's documented behaviour, at the sizes of a test (it holds T x T
    scores). [B, T, H, D] in and out; sinks must be off. Each 64-token query block attends
    the key blocks of :func:`sol_routing` exactly; every other key block adds one pooled term:
    its mean value, weighted by its length, with the query block's proxy score as the logit
    (one softmax over both). With ``token_aug`` > 0, up to that many tokens of the other
    blocks, those the query block's centroid scores highest, are attended exactly and the rest
    of the tail counts each token at its centroid score; the kernel's histogram-bin selection
    of those tokens is not modelled.
    """
    if (sink_blocks and sink_blocks[1] > sink_blocks[0]) or (sink_q and sink_q[1] > sink_q[0]):
        raise ValueError("sol_standin: sink_blocks/sink_q are not modelled; allowed: [0, 0]")
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    exact, proxy, kc, kmean, lengths = sol_routing(q, k, tau, topk_ratio, scale)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))         # [B, H, T, D]
    kcen = kf - kmean                                                    # the same centring as the proxy
    qblk = torch.arange(T, device=q.device) // SOL_BLOCK
    ex_tok = exact[:, :, qblk][..., qblk]                                # [B, H, T(query), T(key)]
    s_tok = (qf @ kcen.transpose(-1, -2)) * scale
    neg = float("-inf")
    if token_aug:
        cen, _ = _block_means(qf)
        c_tok = ((cen @ kcen.transpose(-1, -2)) * scale)[:, :, qblk]     # centroid score of each key
        rest = c_tok.masked_fill(ex_tok, neg)
        kk = min(token_aug, T)
        extra = torch.zeros_like(ex_tok)
        extra.scatter_(-1, rest.topk(kk, dim=-1).indices, True)
        extra &= ~ex_tok
        keep = ex_tok | extra
        logits = torch.cat([s_tok.masked_fill(~keep, neg), c_tok.masked_fill(keep, neg)], dim=-1)
        values = torch.cat([vf, vf], dim=2)
    else:
        vm, _ = _block_means(vf)
        tail = (proxy + lengths.log())[:, :, qblk].masked_fill(exact[:, :, qblk], neg)   # [B, H, T, n]
        logits = torch.cat([s_tok.masked_fill(~ex_tok, neg), tail], dim=-1)
        values = torch.cat([vf, vm], dim=2)
    out = torch.softmax(logits, dim=-1) @ values
    return out.transpose(1, 2).to(v.dtype).contiguous()


# ------------------------------------------------------------------------------ reference, error, time
def dense_reference(q, k, v, heads: int, rows: int = 8192) -> torch.Tensor:
    """float32 dense attention [B, H, L, D] of [B, L, H*D] inputs, a head and ``rows`` queries at a time."""
    B, L, HD = q.shape
    D = HD // heads
    ref = torch.empty(B, heads, L, D, device=q.device, dtype=torch.float32)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for b in range(B):
            for h in range(heads):
                kh = k[b, :, h * D:(h + 1) * D].float()
                vh = v[b, :, h * D:(h + 1) * D].float()
                for r0 in range(0, L, rows):
                    qh = q[b, r0:r0 + rows, h * D:(h + 1) * D].float()
                    ref[b, h, r0:r0 + rows] = torch.softmax(qh @ kh.T * D ** -0.5, dim=-1) @ vh
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return ref


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (synthetic.relative_l2), a head at a time.
    out [B, L, H*D] in any float dtype, ref [B, H, L, D]."""
    B, H, L, D = ref.shape
    o = out.view(B, L, H, D)
    num = den = 0.0
    for h in range(H):
        r = ref[:, h].double()
        num += float((o[:, :, h].double() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num / den)


@dataclass
class Timer:
    """Median time of a call in ms: triton.testing.do_bench on CUDA (at least ``samples``
    timed calls and ``rep_ms`` of them), wall clock over ``samples`` calls on a CPU."""
    device: torch.device
    rep_ms: float = 100.0
    samples: int = 5

    def __call__(self, fn) -> float:
        if self.device.type != "cuda":
            ts = []
            for _ in range(self.samples):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            return sorted(ts)[len(ts) // 2]
        import triton.testing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        first = start.elapsed_time(end)
        return triton.testing.do_bench(fn, warmup=max(10.0, first), rep=max(self.rep_ms, self.samples * first),
                                       return_mode="median")


# ------------------------------------------------------------------------------ fronts
def pareto_front(points: list) -> list[bool]:
    """Which (speed-up, error) points no other point beats: at least as fast and as accurate,
    and strictly one of them. None entries (failed runs) are never on the front."""
    ok = [p is not None and p[0] is not None and p[1] is not None for p in points]
    on = []
    for i, p in enumerate(points):
        if not ok[i]:
            on.append(False)
            continue
        beaten = any(ok[j] and j != i and points[j][0] >= p[0] and points[j][1] <= p[1]
                     and (points[j][0] > p[0] or points[j][1] < p[1]) for j in range(len(points)))
        on.append(not beaten)
    return on


def error_at_speed(front: list, speedup: float):
    """Error on a front [(speed-up, error)] at ``speedup``, linear between its two neighbours.
    Slower than the whole front: the slowest front point's error (it is faster, so this bounds
    the error at equal speed from above). Faster than the whole front: None."""
    pts = sorted(front)
    if not pts or speedup > pts[-1][0]:
        return None
    if speedup <= pts[0][0]:
        return pts[0][1]
    for (s0, e0), (s1, e1) in zip(pts, pts[1:]):
        if s0 <= speedup <= s1:
            return e0 if s1 == s0 else e0 + (e1 - e0) * (speedup - s0) / (s1 - s0)
    return None


def best_at_no_higher_error(rows: list[dict], error: float):
    """The fastest of ``rows`` (each with speedup and error) at an error no higher than ``error``."""
    fit = [r for r in rows if r.get("speedup") is not None and r["error"] <= error]
    return max(fit, key=lambda r: r["speedup"], default=None)


# ------------------------------------------------------------------------------ one (shape, regime)
def make_inputs(shape: str, regime: Regime, device, dtype, seed: int = 1, rows: int = 256):
    """q, k, v as [B, L, H*D] (contiguous, the layout ComfyUI hands an override) and their statistics."""
    grid, heads = SHAPES[shape]
    t0 = time.time()
    q, k, v = video_attention_qkv(grid, heads=heads, head_dim=HEAD_DIM, head_types=regime.head_types,
                                  dtype=dtype, device=device, seed=seed)
    target = regime.target_for(shape)
    s = calibrate_logit_scale(q, k, target, per_head=regime.per_head, rows=rows)
    scale = s.to(device).view(1, -1, 1, 1) if regime.per_head else s
    q = (q.float() * scale).to(dtype)
    share = block_mass_share(q, k, rows=rows)
    stats = {"target_top10_share": target, "top10_share": float(share.mean()),
             "top10_share_per_head": [round(float(x), 4) for x in share],
             "logit_scale": [round(float(x), 4) for x in s] if regime.per_head else round(s, 4),
             "head_types": [regime.head_types[h % len(regime.head_types)] for h in range(heads)],
             "seconds": round(time.time() - t0, 2)}
    blhd = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1).contiguous() for t in (q, k, v)]
    return (*blhd, stats)


def time_dense(q, k, v, heads: int, ref, timer, device, log) -> dict:
    """Dense SDPA, the speed-up reference: cuDNN on contiguous [B, H, L, D] copies made
    beforehand (as in bench_attention.py), and its error from the same call."""
    qh, kh, vh = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2).contiguous() for t in (q, k, v))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(qh, kh, vh)
                dense_ms = timer(lambda: F.scaled_dot_product_attention(qh, kh, vh))
            dense_name = "cuDNN SDPA"
        except RuntimeError as e:  # no cuDNN attention in this build: say so in every row's reference
            log(f"   cuDNN SDPA refused ({str(e)[:120]}); the reference is the flash backend")
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qh, kh, vh)
                dense_ms = timer(lambda: F.scaled_dot_product_attention(qh, kh, vh))
            dense_name = "flash SDPA (cuDNN refused)"
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh)
        dense_ms = timer(lambda: F.scaled_dot_product_attention(qh, kh, vh))
        dense_name = "SDPA (CPU dry run)"
    out = out.transpose(1, 2).reshape(q.shape)
    row = {"method": dense_name, "ms": dense_ms, "error": relative_error(out, ref)}
    log(f"   {dense_name}: {dense_ms:.3f} ms, error {row['error']:.4f}")
    return row


def run_case(shape: str, regime_name: str, args, sol, presets: dict, timer: Timer, device, dtype, log) -> dict:
    grid, heads = SHAPES[shape]
    regime = REGIMES[regime_name]
    q, k, v, stats = make_inputs(shape, regime, device, dtype, rows=args.mass_rows)
    log(f"\n== {shape} {regime_name}: {regime.note}; top-10% block share {stats['top10_share']:.3f} "
        f"(target {stats['target_top10_share']}), inputs {stats['seconds']} s")
    t0 = time.time()
    ref = dense_reference(q, k, v, heads)
    sync(device)
    log(f"   float32 reference {time.time() - t0:.1f} s")
    case = {"shape": shape, "grid": list(grid), "heads": heads, "regime": regime_name, "inputs": stats, "rows": []}

    case["dense"] = time_dense(q, k, v, heads, ref, timer, device, log)
    dense_ms = case["dense"]["ms"]

    def add(method: str, setting: str, fn, extra: dict, twin=None):
        """Run one setting: its error (first call, with its statistics), then its time. ``twin``:
        (output, level-0 pairs) of the same preset without the pooled tail. Returns the output."""
        row = {"method": method, "setting": setting, **extra}
        out = None
        try:
            res = fn(True)
            out, st = res if isinstance(res, tuple) else (res, None)
            if st is not None:
                row["density"], row["level0_pairs"] = st.density, st.level_counts.get(0, 0)
            if twin is not None and twin[1] and torch.equal(out, twin[0]):
                raise NotImplementedError("use_pooled_tail not honoured by this build (the output equals "
                                          "that of the preset without it)")
            row["error"] = relative_error(out, ref)
            row["ms"] = timer(lambda: fn(False))
            row["speedup"] = dense_ms / row["ms"]
        except Exception as e:  # noqa: BLE001 - one failing setting must not end the run
            row.update(error=None, ms=None, speedup=None, na=f"{type(e).__name__}: {str(e)[:160]}")
            out = None
        case["rows"].append(row)
        log("   " + format_row(row))
        sync(device)
        return out, row.get("level0_pairs", 0)

    # Sol-Attn
    sol_fn, sol_label = sol
    case["sol"] = sol_label
    if sol_fn is not None:
        for s in args.sol:
            def call(first, s=s):
                return sol_call(sol_fn, q, k, v, heads, s)
            routed = sol_routed_share(q.view(q.shape[0], q.shape[1], heads, -1), k.view(k.shape[0], k.shape[1], heads, -1), s)
            add(args.sol_label, s.name, call, {"tau": s.tau, "topk_ratio": s.topk_ratio,
                                                "extra_tokens": s.extra_tokens, "routed_share": routed,
                                                "sol_default": s.is_default})
    # PSA; a preset with the tail right after its twin without it is checked against the twin's output
    last = (None, None)   # (preset, (output, level-0 pairs)) of the last preset run
    first_psa = None      # (name, call) of the first preset that ran, timed again at the end
    for name, preset in presets.items():
        try:
            cfg = PSAConfig.from_dict(preset, name)
        except Exception as e:  # noqa: BLE001 - an invalid preset is reported, not fatal
            last = (None, None)
            case["rows"].append({"method": "PSA", "setting": name, "error": None, "ms": None, "speedup": None,
                                 "na": f"{type(e).__name__}: {e}"})
            log("   " + format_row(case["rows"][-1]))
            continue

        def call(first, cfg=cfg):
            return psa_call(q, k, v, heads, cfg, grid, return_stats=first)
        twin = last[1] if tail_twins(last[0], preset) else None
        res = add("PSA", name, call, {"use_pooled_tail": cfg.use_pooled_tail}, twin=twin)
        last = (preset, res if res[0] is not None else None)
        if res[0] is not None and first_psa is None:
            first_psa = (name, call)
    if first_psa is not None:
        case["drift"] = timing_drift(case, *first_psa, timer, log)
        sync(device)
    summarize(case)
    return case


# A short call (480p) takes about what the host needs to launch it, and the host's speed can
# move during a run (benchmarks/RESULTS.md, 2026-12-03 06:46 UTC); the first PSA preset of each
# case is timed again after the last, and a ratio outside this band is flagged.
DRIFT_BAND = (0.9, 1.1)


def drifted(drift: dict) -> bool:
    """Whether a drift check's ratio lies outside :data:`DRIFT_BAND`."""
    return not DRIFT_BAND[0] <= drift["ratio"] <= DRIFT_BAND[1]


def timing_drift(case: dict, name: str, call, timer: "Timer", log) -> dict:
    """The first PSA preset of a case timed again at its end: {setting, first_ms, again_ms, ratio}."""
    first = next(r["ms"] for r in case["rows"] if r["method"] == "PSA" and r["setting"] == name)
    again = timer(lambda: call(False))
    drift = {"setting": name, "first_ms": first, "again_ms": again, "ratio": again / first}
    flag = "  (timing drifted: compare within this case with care)" if drifted(drift) else ""
    log(f"   drift check: {name} {first:.3f} ms first, {again:.3f} ms at the end (x{drift['ratio']:.2f}){flag}")
    return drift


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def format_row(r: dict) -> str:
    if r.get("na"):
        return f"{r['method']:10s} {r['setting']:34s} n/a: {r['na']}"
    dens = r.get("density")
    routed = r.get("routed_share")
    d = f"density {dens:.3f}" if dens is not None else (f"routed {routed:.3f}" if routed is not None else "")
    return (f"{r['method']:10s} {r['setting']:34s} {r['ms']:9.3f} ms {r['speedup']:6.2f}x "
            f"error {r['error']:.4f} {d}")


def summarize(case: dict) -> None:
    """Fronts, and the targets of issue 11: at every Sol setting our fastest at no higher error
    (ratio >= 1.3), at Sol's default our error at equal speed over Sol's (<= 0.75), our error
    at 5x over dense."""
    rows = case["rows"]
    for fam, pick in (("sol", lambda r: r["method"] != "PSA"), ("psa", lambda r: r["method"] == "PSA"), ("joint", None)):
        sel = [r for r in rows if pick is None or pick(r)]
        flags = pareto_front([(r["speedup"], r["error"]) if r.get("speedup") is not None else None for r in sel])
        for r, f in zip(sel, flags):
            r[f"front_{fam}"] = f
    ours = [r for r in rows if r["method"] == "PSA" and r.get("speedup") is not None]
    front = [(r["speedup"], r["error"]) for r in ours if r.get("front_psa")]
    comp = []
    for r in rows:
        if r["method"] == "PSA" or r.get("speedup") is None:
            continue
        best = best_at_no_higher_error(ours, r["error"])
        comp.append({"sol": r["setting"], "sol_speedup": r["speedup"], "sol_error": r["error"],
                     "psa": best["setting"] if best else None,
                     "psa_speedup": best["speedup"] if best else None,
                     "psa_error": best["error"] if best else None,
                     "ratio": best["speedup"] / r["speedup"] if best else 0.0})
    case["vs_sol"] = comp
    default = next((r for r in rows if r.get("sol_default") and r.get("speedup") is not None), None)
    if default is not None:
        e = error_at_speed(front, default["speedup"])
        case["at_sol_default"] = {"sol_speedup": default["speedup"], "sol_error": default["error"],
                                  "psa_error_at_equal_speed": e,
                                  "ratio": None if e is None or not default["error"] else e / default["error"]}
    case["psa_error_at_5x"] = error_at_speed(front, 5.0)


# ------------------------------------------------------------------------------ reports
def markdown(result: dict) -> str:
    lines = [f"# PSA against Sol-Attn and cuDNN ({result['device']})", "",
             f"{result['when']}; torch {result['torch']}; Sol: {result['sol']}. Speed-up: against "
             f"{'cuDNN SDPA' if not result['dry_run'] else 'SDPA'} in the same run; error: relative L2 "
             "against a float32 dense reference; density: PSA's (stats), for Sol the share of block "
             "pairs it routes exactly (torch replica of its routing, without the extra tokens). "
             "Fronts: s = Sol's, p = ours, * = joint.", ""]
    if result["dry_run"]:
        lines += ["**DRY RUN on a CPU: the Sol rows come from `sol_standin`, a torch stand-in written "
                  "from Sol-Attn's documented behaviour, NOT Sol-Attn. No number here is a result.**", ""]
    for case in result["cases"]:
        st = case["inputs"]
        lines += [f"## {case['shape']} {case['regime']} (grid {' x '.join(map(str, case['grid']))}, "
                  f"{case['heads']} heads): top-10% block share {st['top10_share']:.3f} "
                  f"(target {st['target_top10_share']})", "",
                  f"{case['dense']['method']}: {case['dense']['ms']:.3f} ms, error {case['dense']['error']:.4f}", "",
                  *drift_lines(case),
                  "| method | setting | speed-up | error | density | ms | front |", "|---|---|---|---|---|---|---|"]
        for r in sorted(case["rows"], key=lambda r: (r["method"], -(r.get("speedup") or 0))):
            if r.get("na"):
                lines.append(f"| {r['method']} | {r['setting']} (n/a: {r['na'][:100]}) | | | | | |")
                continue
            dens = r["density"] if r.get("density") is not None else r.get("routed_share")
            mark = ("s" if r.get("front_sol") else "") + ("p" if r.get("front_psa") else "") + \
                   ("*" if r.get("front_joint") else "")
            lines.append(f"| {r['method']} | {r['setting']} | {r['speedup']:.2f}x | {r['error']:.4f} | "
                         f"{'' if dens is None else f'{dens:.3f}'} | {r['ms']:.3f} | {mark} |")
        lines += ["", "Ours at every Sol setting (fastest PSA preset at no higher error; target ratio >= 1.3):", "",
                  "| Sol setting | Sol | PSA preset | PSA | ratio |", "|---|---|---|---|---|"]
        for c in case["vs_sol"]:
            psa = f"{c['psa_speedup']:.2f}x at {c['psa_error']:.4f}" if c["psa"] else "none at no higher error"
            lines.append(f"| {c['sol']} | {c['sol_speedup']:.2f}x at {c['sol_error']:.4f} | {c['psa'] or ''} | "
                         f"{psa} | {c['ratio']:.2f} |")
        d = case.get("at_sol_default")
        if d:
            e = d["psa_error_at_equal_speed"]
            lines += ["", f"At Sol's default (tau 1.3, extra 256: {d['sol_speedup']:.2f}x at {d['sol_error']:.4f}): "
                      + (f"our error at equal speed {e:.4f}, ratio {d['ratio']:.2f} (target <= 0.75)"
                         if d["ratio"] is not None else
                         f"our error at equal speed {e:.4f}" if e is not None else
                         "faster than our whole front (no error at equal speed)")]
        e5 = case.get("psa_error_at_5x")
        lines += ["", f"Our error at 5x over dense: {'faster than our front' if e5 is None else f'{e5:.4f}'}", ""]
    return "\n".join(lines) + "\n"


RATIO_TARGET = 1.3  # ours / Sol's speed-up at no higher error (issue 11)


def print_summary(result: dict, log) -> None:
    log(f"\n==== summary: ours / Sol speed at no higher error (target >= {RATIO_TARGET}); at Sol's default our "
        "error at equal speed / Sol's (target <= 0.75)")
    met = total = 0
    for case in result["cases"]:
        ratios = [c["ratio"] for c in case["vs_sol"]]
        hits = sum(r >= RATIO_TARGET for r in ratios)
        met, total = met + hits, total + len(ratios)
        d = case.get("at_sol_default") or {}
        e5 = case.get("psa_error_at_5x")
        worst = min(case["vs_sol"], key=lambda c: c["ratio"], default=None)
        log(f"{case['shape']:5s} {case['regime']:13s} share {case['inputs']['top10_share']:.3f}  "
            f"at >= {RATIO_TARGET}: {hits}/{len(ratios)}  "
            f"ratio min {min(ratios, default=float('nan')):.2f} max {max(ratios, default=float('nan')):.2f}"
            + (f" (worst: Sol {worst['sol']} {worst['sol_speedup']:.2f}x at {worst['sol_error']:.4f})" if worst else "")
            + (f"  error ratio at Sol's default {d['ratio']:.2f}" if d.get("ratio") is not None
               else "  error ratio at Sol's default n/a")
            + f"  err@5x {'n/a' if e5 is None else f'{e5:.4f}'}")
        for c in case["vs_sol"]:
            psa = f"{c['psa']} {c['psa_speedup']:.2f}x at {c['psa_error']:.4f}" if c["psa"] else "none"
            log(f"      Sol {c['sol']:22s} {c['sol_speedup']:6.2f}x at {c['sol_error']:.4f}  ->  {psa}  "
                f"ratio {c['ratio']:.2f}{'' if c['ratio'] >= RATIO_TARGET else f'  (< {RATIO_TARGET})'}")
    log(f"Sol settings at >= {RATIO_TARGET}x in this run: {met} of {total}")


def plot(result: dict, out_dir: Path) -> list[Path]:
    """One PNG per regime, a panel per shape: speed-up (x) against error (y, log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    regimes = list(dict.fromkeys(c["regime"] for c in result["cases"]))
    for regime in regimes:
        cases = [c for c in result["cases"] if c["regime"] == regime]
        fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 5), squeeze=False)
        for ax, case in zip(axes[0], cases):
            ok = [r for r in case["rows"] if r.get("speedup") is not None]
            groups = (
                ("Sol tau, extra 0", lambda r: r["method"] != "PSA" and not r["topk_ratio"] and not r["extra_tokens"], "o", "none", "tab:red"),
                ("Sol tau, extra 256", lambda r: r["method"] != "PSA" and not r["topk_ratio"] and r["extra_tokens"], "o", "tab:red", "tab:red"),
                ("Sol top-k", lambda r: r["method"] != "PSA" and r["topk_ratio"], "s", "none", "tab:orange"),
                ("PSA", lambda r: r["method"] == "PSA" and not r.get("use_pooled_tail"), "^", "tab:blue", "tab:blue"),
                ("PSA + pooled tail", lambda r: r["method"] == "PSA" and r.get("use_pooled_tail"), "v", "tab:green", "tab:green"),
            )
            for label, pick, marker, face, edge in groups:
                pts = [r for r in ok if pick(r)]
                if pts:
                    ax.scatter([r["speedup"] for r in pts], [r["error"] for r in pts], marker=marker,
                               facecolors=face, edgecolors=edge, label=label, s=36)
            for fam, color, label in (("sol", "tab:red", "Sol front"), ("psa", "tab:blue", "PSA front")):
                fr = sorted((r["speedup"], r["error"]) for r in ok if r.get(f"front_{fam}"))
                if fr:
                    ax.plot(*zip(*fr), color=color, lw=1.2, marker="x", ms=4, label=label)
            d = next((r for r in ok if r.get("sol_default")), None)
            if d:
                ax.annotate("Sol default", (d["speedup"], d["error"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
            ax.axvline(1.0, color="gray", lw=0.6)
            ax.set_yscale("log")
            ax.set_xlabel(f"speed-up over {case['dense']['method']}")
            ax.set_ylabel("relative L2 error vs float32 dense")
            ax.set_title(f"{case['shape']} x {case['heads']} heads, {regime}: top-10% share "
                         f"{case['inputs']['top10_share']:.2f}" + (" (DRY RUN, Sol = stand-in)" if result["dry_run"] else ""),
                         fontsize=9)
            ax.grid(True, which="both", lw=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"peers_{regime}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ main
def probe_sol(sol: tuple, device, dtype) -> tuple:
    """One small Sol-Attn call against dense attention, so that a kernel that loads but cannot
    run here (its wheel's CUDA runtime needs a driver of CUDA 13.0 or later) is said once."""
    fn, label = sol
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2 * SOL_BLOCK, 2, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    try:
        out = fn(q, k, v, tau=1.3)   # two blocks, each the other's neighbour, both exact: dense up to int8
        sync(device)
    except Exception as e:  # noqa: BLE001 - any failure means no Sol rows, said once
        return None, f"{label}, but a probe call failed: {type(e).__name__}: {str(e)[:200]}"
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    err = float((out.float() - ref).norm() / ref.norm())
    return fn, f"{label} (probe, every block routed, against dense: relative L2 {err:.1e})"


_CASE_RE = re.compile(r"^== (\S+) (\S+): .*top-10% block share ([\d.]+) \(target ([\d.]+)\)")
_DRIFT_RE = re.compile(r"^   drift check: (.+) ([\d.]+) ms first, ([\d.]+) ms at the end")
_DENSE_RE = re.compile(r"^   (cuDNN SDPA|flash SDPA|SDPA[^:]*): ([\d.]+) ms, error ([\d.]+)")
_ROW_RE = re.compile(r"^   (PSA|Sol-Attn|sol-standin)\s+(.+?)\s+([\d.]+) ms\s+([\d.]+)x error ([\d.]+)"
                     r"(?: (density|routed) ([\d.]+))?\s*$")
_SOL_RE = re.compile(r"^(?:tau ([\d.]+)|topk ([\d.]+)) extra (\d+)$")


def drift_lines(case: dict) -> list[str]:
    """The case's drift check for its markdown section (none for runs without it)."""
    d = case.get("drift")
    if not d:
        return []
    moved = ": **the host or GPU speed moved during this case**" if drifted(d) else ""
    return [f"Timing drift: {d['setting']} took {d['first_ms']:.3f} ms first and {d['again_ms']:.3f} ms "
            f"after the last preset (x{d['ratio']:.2f}){moved}.",
            ""]


def result_from_logs(texts: list[str], presets: dict) -> dict:
    """Rebuild the result of runs cut short from their printed logs (rows as ``format_row`` prints
    them). A (shape, regime) case comes from the first log that has it complete (a PSA row at
    least); ``presets`` (name -> YAML form) gives each PSA row its tail flag."""
    cases = {}
    for text in texts:
        found, case = [], None
        for line in text.splitlines():
            if m := _CASE_RE.match(line):
                shape, regime = m.group(1), m.group(2)
                grid, heads = SHAPES[shape]
                case = {"shape": shape, "grid": list(grid), "heads": heads, "regime": regime, "rows": [],
                        "inputs": {"top10_share": float(m.group(3)), "target_top10_share": float(m.group(4))}}
                found.append(case)
            elif case is not None and (m := _DRIFT_RE.match(line)):
                first, again = float(m.group(2)), float(m.group(3))
                case["drift"] = {"setting": m.group(1), "first_ms": first, "again_ms": again, "ratio": again / first}
            elif case is not None and (m := _DENSE_RE.match(line)):
                case["dense"] = {"method": m.group(1), "ms": float(m.group(2)), "error": float(m.group(3))}
            elif case is not None and (m := _ROW_RE.match(line)):
                method, setting = m.group(1), m.group(2)
                row = {"method": method, "setting": setting, "ms": float(m.group(3)), "speedup": float(m.group(4)),
                       "error": float(m.group(5))}
                if method == "PSA":
                    row["density"] = float(m.group(7)) if m.group(6) == "density" else None
                    row["use_pooled_tail"] = bool(presets.get(setting, {}).get("use_pooled_tail"))
                else:
                    sm = _SOL_RE.match(setting)
                    tau, ratio, extra = (float(sm.group(1) or 1.3), float(sm.group(2) or 0.0), int(sm.group(3))) \
                        if sm else (1.3, 0.0, 0)
                    row.update(tau=tau, topk_ratio=ratio, extra_tokens=extra,
                               routed_share=float(m.group(7)) if m.group(6) == "routed" else None,
                               sol_default=SolSetting(tau, ratio, extra).is_default)
                case["rows"].append(row)
        for c in found:
            key = (c["shape"], c["regime"])
            if key not in cases and "dense" in c and any(r["method"] == "PSA" for r in c["rows"]):
                cases[key] = c
    for c in cases.values():
        summarize(c)
    return {"cases": list(cases.values())}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                    help="default: 480p 720p (tiny with --dry-run)")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--quick", action="store_true", help="fewer Sol settings and PSA presets, shorter timing")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shape, Sol replaced by the torch stand-in (not Sol): checks the script only")
    ap.add_argument("--psa", nargs="+", default=None, metavar="PATTERN",
                    help="PSA presets to run, by name or glob (default: all of psa_presets())")
    ap.add_argument("--presets-yaml", type=Path, default=None,
                    help="YAML mapping name -> preset (attention_config.yaml form) added to the PSA presets")
    ap.add_argument("--no-sol", action="store_true", help="PSA and cuDNN only")
    ap.add_argument("--mass-rows", type=int, default=256, help="query rows sampled for the block-mass share")
    ap.add_argument("--rep-ms", type=float, default=None, help="timing window per call (default: by shape)")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None, metavar="LOG",
                    help="no run: rebuild the tables and plots from the logs of runs cut short (a case from "
                         "the first log that has it whole); --when names the runs")
    ap.add_argument("--device", default="", help="with --from-log: the GPU (default: the first log's first line)")
    ap.add_argument("--when", default="", help="with --from-log: when the runs were made")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    args = ap.parse_args(argv)
    if args.shapes is None:
        args.shapes = ["tiny"] if args.dry_run else ["480p", "720p"]
    return args


def select_presets(args) -> dict:
    presets = psa_presets(args.quick)
    if args.presets_yaml:
        from psa_kernels.config import read_yaml
        extra = read_yaml(args.presets_yaml) or {}
        if not isinstance(extra, dict):
            raise SystemExit(f"--presets-yaml: got {type(extra).__name__}; allowed: a mapping name -> preset")
        presets.update({str(n): dict(p) for n, p in extra.items()})
    if args.psa:
        presets = {n: p for n, p in presets.items() if any(fnmatch.fnmatchcase(n, pat) for pat in args.psa)}
    return presets


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_log:
        texts = [p.read_text() for p in args.from_log]
        result = result_from_logs(texts, psa_presets())
        head = re.match(r"^(.+?); torch (\S+); Sol: (.*)$", texts[0].splitlines()[0] if texts[0] else "")
        result.update(device=args.device or (head.group(1) if head else "unknown GPU"),
                      torch=head.group(2) if head else "unknown", sol=head.group(3) if head else "unknown",
                      when=args.when or "see the logs", dry_run=False, from_logs=[str(p) for p in args.from_log])
        args.out.mkdir(parents=True, exist_ok=True)
        print_summary(result, print)
        (args.out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
        (args.out / "peers.md").write_text(markdown(result))
        plot(result, args.out)
        return result
    t_start = time.time()
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or --dry-run to check the script on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    args.sol = [] if args.no_sol else sol_settings(args.quick)
    if args.dry_run:
        sol = (None if args.no_sol else sol_standin,
               "DRY RUN: sol_standin, a torch stand-in for comfy_kitchen.sol_attn (NOT Sol-Attn)")
        args.sol_label = "sol-standin"
    else:
        sol = (None, "not run (--no-sol)") if args.no_sol else load_sol(device)
        args.sol_label = "Sol-Attn"
    presets = select_presets(args)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str):
        print(msg, flush=True)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    log(f"{name}; torch {torch.__version__}; Sol: {sol[1]}")
    result_backend = None
    if sol[0] is not None and device.type == "cuda":
        try:
            result_backend = sol_backend(torch.empty(1, SOL_BLOCK, 1, HEAD_DIM, device=device, dtype=dtype))
        except Exception as e:  # noqa: BLE001 - informational only
            result_backend = f"unknown ({type(e).__name__}: {e})"
        log(f"sol_attn backend for these tensors: {result_backend}")
        sol = probe_sol(sol, device, dtype)
    log(f"{len(args.sol)} Sol settings, {len(presets)} PSA presets, shapes {args.shapes}, regimes {args.regimes}")
    result = {"device": name, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "sol": sol[1], "sol_backend": result_backend, "dry_run": args.dry_run, "quick": args.quick, "psa_presets": presets, "cases": []}
    for shape in args.shapes:
        rep = args.rep_ms or {"720p": 150.0}.get(shape, 100.0)
        # a dry run's times mean nothing: one call each
        timer = Timer(device, rep_ms=rep, samples=1 if args.dry_run else 3 if args.quick else 5)
        for regime in args.regimes:
            result["cases"].append(run_case(shape, regime, args, sol, presets, timer, device, dtype, log))
            log(f"   [{time.time() - t_start:.0f} s so far]")
    result["seconds"] = round(time.time() - t_start, 1)
    print_summary(result, log)
    (args.out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "peers.md").write_text(markdown(result))
    pngs = plot(result, args.out)
    log(f"\nwrote {args.out / 'peers.json'}, {args.out / 'peers.md'}, {', '.join(p.name for p in pngs)} "
        f"in {result['seconds']} s")
    return result


if __name__ == "__main__":
    main()
