"""Video-shaped attention problems with real structure, for tests, benchmarks and the demo.

Queries and keys carry random Fourier features of their space-time position, so that
q.k approximates a Gaussian kernel of the distance between the two tokens: attention is
local in space-time with a long tail. Each head gets its own reach and sharpness (some
heads nearly local, some broad), plus per-token noise; values are smooth in space-time
plus noise. Never all zeros, never i.i.d. noise alone.
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
