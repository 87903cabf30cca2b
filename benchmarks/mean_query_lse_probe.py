"""Would the exact log-sum-exp of each query block's mean query over a key block's keys help
routing or the tail? Error only, torch, CPU (about 10 minutes).

    python3 benchmarks/mean_query_lse_probe.py [--grid 8 24 40] [--heads 6]

For each key block J and query block I, with q̄_I the block's mean query and s = 1 / sqrt(D):
LSE_IJ = ln sum_{t in J} exp(s q̄_I . k_t), the block's exact mass for the mean query (heavy keys
left out). Two uses, each against the shipped code on bench_peers.py's regimes (mixed, diffuse,
concentrated) at a small grid, relative L2 error of the output against dense attention:

- **routing**: block scores softmax_J(LSE_IJ) in place of the block-mean estimate's
  softmax_J(s q̄_I . k̄_J + ln n_J) (the preset with ``estimate_method: block_mean``, and as
  shipped);
- **tail**: the tail bias of a skipped pair LSE_IJ - s q̄_I . k̄_J - ln n_J (the mass the mean key
  misses for the mean query), alone and with the variance term of the queries' own spread,
  s^2 / 2 * (mean_I(q^2) - q̄_I^2) . var_J(k), against ``tail_correction`` none and variance.

benchmarks/NOTES.md change 45 has the result.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402
from psa_kernels import PSAConfig, api, estimate, psa_attention  # noqa: E402
from psa_kernels.synthetic import relative_l2  # noqa: E402
from psa_kernels.tail_spread import key_block_variance  # noqa: E402

PRESETS = ("Wan2.1_14b/psa_turbo", "Wan2.1_14b/psa_fast", "Wan2.1_14b/psa_quality", "Wan2.1_1.3b/psa_fast",
           "Wan2.1_14b/psa_precise")


def mean_query_logits(q, k, m, keep=None):
    """[B, H, nqb, L] s q̄_I . k_t, -inf at the keys ``keep`` [B, H, L] leaves out."""
    qm = estimate.block_means_reference(q, m)
    lg = torch.matmul(qm, k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return lg if keep is None else lg.masked_fill(keep[:, :, None, :] == 0, float("-inf"))


def per_block(x, n, fill):
    """[..., L] -> [..., nkb, n], the last block padded with ``fill``."""
    L = x.shape[-1]
    nkb = -(-L // n)
    return torch.nn.functional.pad(x, (0, nkb * n - L), value=fill).unflatten(-1, (nkb, n))


def lse_scores(q, k, m, n, perm=None, triton_means=False):
    """Block scores from the mean query's exact block masses (arranged q, k: the torch path)."""
    return torch.logsumexp(per_block(mean_query_logits(q, k, m), n, float("-inf")), -1).softmax(-1)


def lse_tail_bias(q, k, m, n, perm=None, heavy=None, use_triton=False, with_query_spread=False):
    """The tail bias LSE_IJ - s q̄_I . k̄_J - ln n_J (heavy keys left out), [+ the queries' spread]."""
    B, H, L, D = q.shape
    keep = torch.ones(B, H, L, dtype=q.dtype, device=q.device)
    if heavy is not None:
        keep.scatter_(2, heavy.index.long(), 0.0)
    lse = torch.logsumexp(per_block(mean_query_logits(q, k, m, keep), n, float("-inf")), -1)
    cnt = per_block(keep, n, 0.0).sum(-1)                                        # [B, H, nkb]
    ksum = per_block((k.float() * keep[..., None]).transpose(-1, -2), n, 0.0).sum(-1).transpose(-1, -2)
    kbar = ksum / cnt.clamp_min(1.0)[..., None]
    qm = estimate.block_means_reference(q, m)
    approx = torch.matmul(qm, kbar.transpose(-1, -2)) / math.sqrt(D) + cnt.clamp_min(1.0).log()[:, :, None, :]
    bias = (lse - approx).masked_fill(cnt[:, :, None, :] < 0.5, 0.0)
    if with_query_spread:
        q_var = estimate.block_means_reference(q, m, square=True) - qm * qm
        bias = bias + 0.5 / D * torch.matmul(q_var, key_block_variance(k, n, heavy=heavy, use_triton=False)
                                             .transpose(-1, -2))
    return bias


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=[8, 24, 40])
    ap.add_argument("--heads", type=int, default=6)
    args = ap.parse_args()
    grid = tuple(args.grid)
    bench_peers.SHAPES["probe"] = (grid, args.heads)
    presets = bench_peers.psa_presets()
    block_mean, spread = estimate.estimate_block_mean, api.tail_spread_bias
    print("regime       preset                   routing: as shipped / block means / mean-query LSE"
          "   |   tail: none / variance / LSE / LSE + query spread")
    for regime in ("mixed", "diffuse", "concentrated"):
        q, k, v, _ = bench_peers.make_inputs("probe", bench_peers.REGIMES[regime], "cpu", torch.float32)
        B, L, _ = q.shape
        qh, kh, vh = (t.view(B, L, args.heads, -1).transpose(1, 2).contiguous() for t in (q, k, v))
        dense = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

        def err(cfg):
            return relative_l2(psa_attention(qh, kh, vh, cfg, grid, backend="torch"), dense)
        for name in PRESETS:
            cfg = PSAConfig.from_dict(presets[name], name)
            bm = cfg.replace(estimate_method="block_mean")
            route = [err(cfg), err(bm)]
            try:
                estimate.estimate_block_mean = lse_scores
                route.append(err(bm))
            finally:
                estimate.estimate_block_mean = block_mean
            tail = [err(cfg.replace(tail_correction="none")), err(cfg.replace(tail_correction="variance"))]
            for qs in (False, True):
                try:
                    api.tail_spread_bias = (lambda *a, qs=qs, **kw: lse_tail_bias(*a, with_query_spread=qs, **kw))
                    tail.append(err(cfg.replace(tail_correction="variance")))
                finally:
                    api.tail_spread_bias = spread
            print(f"{regime:12s} {name:24s} " + " / ".join(f"{e:.4f}" for e in route) + "   |   "
                  + " / ".join(f"{e:.4f}" for e in tail), flush=True)


if __name__ == "__main__":
    main()
