"""Video-shaped attention problems with real structure, for tests, benchmarks and the demo.

Queries and keys carry random Fourier features of their space-time position, so that
q.k approximates a Gaussian kernel of the distance between the two tokens: attention is
local in space-time with a long tail. Each head gets its own reach and sharpness (some
heads nearly local, some broad), plus per-token noise; values are smooth in space-time
plus noise. Never all zeros, never i.i.d. noise alone.

:func:`video_attention_qkv` makes the same kind of inputs on the device (seconds at 720p x 40
heads) with the head types of video DiTs (spatial, temporal, sink, near-uniform heads besides
local ones); :func:`block_mass_share` measures how concentrated attention is, and
:func:`calibrate_logit_scale` sets the attention temperature that gives a chosen share.
"""
from __future__ import annotations

import math

import torch


def structured_qkv(grid, heads: int = 2, head_dim: int = 64, batch: int = 1, text_len: int = 0,
                   text_first: bool = False, dtype=torch.float32, device="cpu", seed: int = 0,
                   sharpness: tuple[float, float] = (8.0, 14.0), noise: float = 0.2):
    """q, k, v of shape [batch, heads, T*H*W + text_len, head_dim] in row-major video order."""
    T, Hh, W = (int(g) for g in grid)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij"),
                      dim=-1).reshape(-1, 3).float()
    V, D = pos.shape[0], head_dim
    qs, ks, vs = [], [], []
    for h in range(heads):
        reach = (1.0, 2.0, 3.0, 6.0)[h % 4]  # tokens; heads alternate between local and broad
        # time is coarser than space in latent video: one latent frame ~ 2 spatial tokens
        omega = torch.randn(D, 3, generator=gen) / reach * torch.tensor([2.0, 1.0, 1.0])
        phase = torch.rand(D, generator=gen) * 2 * math.pi
        feat = math.sqrt(2.0 / D) * torch.cos(pos @ omega.T + phase)  # [V, D], feat.feat ~ kernel
        a = sharpness[0] + (sharpness[1] - sharpness[0]) * (h / max(1, heads - 1))
        amp = math.sqrt(a * math.sqrt(D))  # logits of neighbours reach about ``a``
        noise_q = torch.randn(batch, V, D, generator=gen) * noise / math.sqrt(D) * amp
        noise_k = torch.randn(batch, V, D, generator=gen) * noise / math.sqrt(D) * amp
        qs.append(amp * feat + noise_q)
        ks.append(amp * feat + noise_k)
        smooth = torch.cos(pos @ (torch.randn(D, 3, generator=gen) * 0.3).T + phase)
        vs.append(smooth + 0.3 * torch.randn(batch, V, D, generator=gen))
    q, k, v = (torch.stack(x, dim=1) for x in (qs, ks, vs))  # [batch, heads, V, D]
    if text_len:
        txt = [torch.randn(batch, heads, text_len, D, generator=gen) * s for s in (2.0, 2.0, 1.0)]
        cat = (lambda a, b: torch.cat([b, a], dim=2)) if text_first else (lambda a, b: torch.cat([a, b], dim=2))
        q, k, v = (cat(x, t) for x, t in zip((q, k, v), txt))
    return tuple(x.to(device=device, dtype=dtype).contiguous() for x in (q, k, v))


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# Head types of video DiTs, generated on the device, and a calibrated attention temperature.

HEAD_TYPES = ("local", "spatial", "temporal", "sink", "uniform")
MASS_BLOCK = 64     # key block of the mass statistic: Sol-Attn's block, in the sequence as given
MASS_TOP = 0.10     # the share of key blocks whose mass the statistic reports


def _head_reach(kind: str, h: int) -> tuple[float, float, float]:
    """Reach of one head's space-time kernel in (frames, rows, columns) of latent tokens."""
    r = (1.0, 2.0, 3.0, 6.0)[h % 4]
    if kind == "spatial":      # within its own frame: a neighbouring frame is already far
        return 0.3, 1.5 * r, 1.5 * r
    if kind == "temporal":     # the same position in every frame
        return 12.0, 0.3, 0.3
    if kind == "sink":         # a weak local part under the sinks
        return 1.5, 3.0, 3.0
    return r / 2.0, r, r       # local and uniform: time coarser than space, as in structured_qkv


def video_attention_qkv(grid, heads: int = 2, head_dim: int = 64, head_types=("local",), batch: int = 1,
                        dtype=torch.float32, device="cpu", seed: int = 0,
                        sharpness: tuple[float, float] = (8.0, 14.0), noise: float = 0.2,
                        logit_scale: float = 1.0, sink_share: float = 0.005):
    """q, k, v of shape [batch, heads, T*H*W, head_dim] in row-major video order, made on ``device``.

    Head h is of kind ``head_types[h % len(head_types)]``:

    - ``local``: attention local in space-time (reach 1-6 tokens), as in :func:`structured_qkv`;
    - ``spatial``: local in space inside the query's own frame;
    - ``temporal``: the query's own spatial position in every frame;
    - ``sink``: a few fixed tokens (``sink_share`` of the sequence, scattered) that every query
      attends, over a weak local part;
    - ``uniform``: nearly uniform attention (a faint local bump).

    Like :func:`structured_qkv`, queries and keys carry random Fourier features of position
    (q.k approximates a Gaussian kernel of the distance), logits of neighbours reach about
    ``sharpness`` (spread over the heads), with per-token noise; values are smooth in
    space-time plus noise. ``logit_scale`` multiplies every query (the attention temperature:
    :func:`calibrate_logit_scale` picks it). Random numbers come from a generator on ``device``,
    so the same seed gives the same tensors on one kind of device, not across kinds.
    """
    for kind in head_types:
        if kind not in HEAD_TYPES:
            raise ValueError(f"head_types: got {kind!r}; allowed: {', '.join(HEAD_TYPES)}")
    T, Hh, W = (int(g) for g in grid)
    D, V = head_dim, T * Hh * W
    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(device=device, dtype=torch.float32)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, **f32)

    pos = torch.stack(torch.meshgrid(*(torch.arange(g, **f32) for g in (T, Hh, W)), indexing="ij"),
                      dim=-1).reshape(-1, 3)
    n_sink = max(1, round(sink_share * V))
    sinks = torch.randperm(V, generator=gen, device=device)[:n_sink]
    q = torch.empty(batch, heads, V, D, device=device, dtype=dtype)
    k, v = torch.empty_like(q), torch.empty_like(q)
    for h in range(heads):
        kind = head_types[h % len(head_types)]
        reach = torch.tensor(_head_reach(kind, h), **f32)
        omega = randn(D, 3) / reach
        phase = torch.rand(D, generator=gen, **f32) * 2 * math.pi
        feat = math.sqrt(2.0 / D) * torch.cos(pos @ omega.T + phase)  # [V, D], feat.feat ~ kernel
        a = sharpness[0] + (sharpness[1] - sharpness[0]) * (h / max(1, heads - 1))
        amp = math.sqrt(a * math.sqrt(D))  # logits of neighbours reach about ``a``
        qa = {"sink": 0.5 * amp, "uniform": 0.15 * amp}.get(kind, amp)
        qh = qa * feat + randn(batch, V, D) * noise / math.sqrt(D) * amp
        kh = amp * feat + randn(batch, V, D) * noise / math.sqrt(D) * amp
        if kind == "sink":
            # one shared direction: every query's logit on a sink token is about 1.5 a
            u = randn(D)
            u = u / u.norm()
            qh = qh + amp * u
            kh[:, sinks] += 1.5 * amp * u
        q[:, h] = (logit_scale * qh).to(dtype)
        k[:, h] = kh.to(dtype)
        smooth = torch.cos(pos @ (randn(D, 3) * 0.3).T + phase)
        v[:, h] = (smooth + 0.3 * randn(batch, V, D)).to(dtype)
    return q, k, v


def _sample_rows(length: int, rows: int, device) -> torch.Tensor:
    """``rows`` query positions spread evenly over the sequence (all of them when it is short)."""
    if rows >= length:
        return torch.arange(length, device=device)
    return torch.linspace(0, length - 1, rows, device=device).round().long()


def _sampled_logits(q, k, rows: int) -> list[torch.Tensor]:
    """Per head ([B*rows, L] float32): logits q.k / sqrt(D) of the sampled query rows."""
    B, H, L, D = q.shape
    idx = _sample_rows(L, rows, q.device)
    out = []
    for h in range(H):
        qs = q[:, h, idx].float()                       # [B, rows, D]
        out.append((qs @ k[:, h].float().transpose(-1, -2)).reshape(-1, L) / math.sqrt(D))
    return out


def _top_block_share(logits: torch.Tensor, scale: float, block: int, top: float) -> torch.Tensor:
    """[rows] share of each row's softmax(scale * logits) mass in its top ``top`` key blocks."""
    rows, L = logits.shape
    nb = -(-L // block)
    p = torch.softmax(scale * logits, dim=-1)
    p = torch.nn.functional.pad(p, (0, nb * block - L))
    mass = p.view(rows, nb, block).sum(-1)
    kk = max(1, round(top * nb))
    return mass.topk(kk, dim=-1).values.sum(-1)


def block_mass_share(q: torch.Tensor, k: torch.Tensor, rows: int = 256, block: int = MASS_BLOCK,
                     top: float = MASS_TOP) -> torch.Tensor:
    """[H] share of attention mass held by the top ``top`` of key blocks, per head.

    Key blocks are ``block`` consecutive keys of the sequence as given (row-major video order
    for these inputs: what ComfyUI's own sparse attention cuts); the mass is each sampled query
    row's softmax(q.k / sqrt(D)), ``rows`` rows spread evenly over the sequence, averaged over
    the rows and the batch. About 0.9: concentrated attention; near ``top``: uniform.
    """
    return torch.stack([_top_block_share(lg, 1.0, block, top).mean() for lg in _sampled_logits(q, k, rows)]).cpu()


def calibrate_logit_scale(q: torch.Tensor, k: torch.Tensor, target: float, per_head: bool = False,
                          rows: int = 256, block: int = MASS_BLOCK, top: float = MASS_TOP,
                          lo: float = 1e-3, hi: float = 1e3, steps: int = 30):
    """The factor s on the queries that brings :func:`block_mass_share` to ``target``.

    ``per_head``: a tensor [H] of factors, each head's share at ``target``; otherwise one float
    for all heads, their mean share at ``target`` (the heads keep their differences).
    Bisection on log s (the share grows with s: from about ``top`` for uniform attention to
    1); the logits of the sampled rows are computed once. A target outside what [lo, hi]
    reaches gives the nearer end.
    """
    if not top < target < 1.0:
        raise ValueError(f"target: got {target}; allowed: between {top} and 1")
    logits = _sampled_logits(q, k, rows)
    H = len(logits)

    def shares(s: torch.Tensor) -> torch.Tensor:  # [H] at factors s [H]
        return torch.stack([_top_block_share(lg, float(sh), block, top).mean().cpu()
                            for lg, sh in zip(logits, s)])

    def reached(s: torch.Tensor) -> torch.Tensor:  # [H] bool: share at s >= target
        sh = shares(s)
        return sh >= target if per_head else (sh.mean() >= target).expand(H)

    a = torch.full((H,), math.log(lo), dtype=torch.float64)
    b = torch.full((H,), math.log(hi), dtype=torch.float64)
    for _ in range(steps):
        mid = 0.5 * (a + b)
        up = reached(mid.exp())
        a, b = torch.where(up, a, mid), torch.where(up, mid, b)
    s = (0.5 * (a + b)).exp()
    # ends that the target lies beyond
    s = torch.where(reached(torch.full((H,), lo, dtype=torch.float64)), torch.tensor(lo, dtype=torch.float64), s)
    s = torch.where(~reached(torch.full((H,), hi, dtype=torch.float64)), torch.tensor(hi, dtype=torch.float64), s)
    return s.float() if per_head else float(s[0])
