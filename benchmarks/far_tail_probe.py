"""How far can the pooled tail be coarsened per query block? Error only, torch, CPU.

    python3 benchmarks/far_tail_probe.py [--grid 8 32 52] [--heads 4] [--shares 0.005 0.02 0.05]

The tail (NOTES.md change 30) gives every query one pooled key per skipped key block (its
mean key with bias ln(n)): at 720p that is about 1,200 keys a query, most of the kernel's
tiles at level 1 on 0.5-2%. Sol-Attn's tail costs nothing in its kernel because its logit is
per query block (the block's mean query against each block mean). This probe measures, on the
regimes of bench_peers.py (level 1 on a share of the key blocks, block-mean routing, 64-token
key blocks, 128-row query blocks, Gilbert order), the relative L2 error against dense of:

- ``per-query``: the shipped tail;
- ``per-block``: Sol's tail, the logit of each skipped block the query block's (zeroth order);
- ``near R + far G``: the R skipped blocks of highest block score keep per-query pooled keys;
  the rest are merged per query block into G keys, each the score-weighted mean of a rank
  group's block means, with bias ln(Z) - q_mean . k_merged so that a query's logit against it
  is first-order exact in its distance from the block's mean query (Z: the group's pooled mass
  for the mean query); values the same weighted means.

Tail keys a query then reads: R + G instead of every skipped block. And the per-query tail with
a corrected bias (the mass a block's keys hold beyond n exp(s q.k̄), NOTES.md change 41):

- ``+ mean q`` (``/4``: from every 4th key): the exact log-sum-exp of the query block's mean
  query over the block's keys, less its logit against the mean key;
- ``+ var``: s^2 / 2 * sum_d q_d^2 var_d(k) per query (second order); ``block q2``: with q^2
  averaged over the query block (what ``tail_correction: variance`` computes); ``iso``: |q|^2
  times the block's mean variance.
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
from psa_kernels.layout import arrange, sequence_permutation  # noqa: E402
from psa_kernels.synthetic import block_mass_share, calibrate_logit_scale, video_attention_qkv  # noqa: E402
from bench_peers import HEAD_DIM, REGIMES  # noqa: E402

M, N = 128, 64


def tail_outputs(q, k, v, share: float, variants) -> dict:
    """Per variant ([name, near, groups] or the two named tails): the output [H, L, D] of level 1
    on ``share`` of the key blocks (block-mean routing, the diagonal block always) + that tail."""
    H, L, D = q.shape
    scale = 1.0 / math.sqrt(D)
    nqb, nkb = L // M, L // N
    qm = q.view(H, nqb, M, D).mean(2)
    km, vm = k.view(H, nkb, N, D).mean(2), v.view(H, nkb, N, D).mean(2)
    block_logit = torch.einsum("hid,hjd->hij", qm, km) * scale  # [H, nqb, nkb]
    keep = max(1, round(share * nkb))
    routed = torch.zeros(H, nqb, nkb, dtype=torch.bool)
    routed.scatter_(-1, block_logit.topk(keep, dim=-1).indices, True)
    diag = (torch.arange(nqb) * M + M // 2) // N
    routed[:, torch.arange(nqb), diag] = True
    outs = {name: torch.empty_like(q) for name, _, _ in variants}
    lnn = math.log(N)
    kvar = k.view(H, nkb, N, D).var(2, unbiased=False)                  # [H, nkb, D]
    for h in range(H):
        for i in range(nqb):
            qi = q[h, i * M:(i + 1) * M]                              # [M, D]
            cols = routed[h, i].nonzero().flatten()
            kx = k[h].view(nkb, N, D)[cols].reshape(-1, D)
            vx = v[h].view(nkb, N, D)[cols].reshape(-1, D)
            exact = qi @ kx.T * scale                                 # [M, keys]
            skipped = (~routed[h, i]).nonzero().flatten()
            order = skipped[block_logit[h, i, skipped].argsort(descending=True)]
            for name, near, groups in variants:
                logits, values = [exact], [vx]
                if name.startswith("per-query +"):
                    # the tail's keys for every skipped block, with a bias that corrects the
                    # mean key's mass: for the query block's mean query (exact or from every
                    # 4th key), or to second order per query with the block's key variances
                    logit = qi @ km[h, order].T * scale
                    if name == "per-query + var":
                        logit = logit + lnn + 0.5 * scale ** 2 * (qi * qi) @ kvar[h, order].T
                    elif name == "per-query + var, block q2":  # one term per block pair
                        logit = logit + lnn + 0.5 * scale ** 2 * ((qi * qi).mean(0) @ kvar[h, order].T)[None]
                    elif name == "per-query + var, iso":  # |q|^2 times the block's mean variance
                        logit = logit + lnn + 0.5 * scale ** 2 * (qi * qi).sum(1, keepdim=True) * kvar[h, order].mean(1)[None]
                    else:
                        step = 4 if name.endswith("/4") else 1
                        full = (qm[h, i] @ k[h].T * scale).view(nkb, N)[order][:, ::step]
                        lse = torch.logsumexp(full, 1) + math.log(step)
                        logit = logit + (lse - block_logit[h, i, order])
                    logits.append(logit)
                    values.append(vm[h, order])
                elif name == "per-block":
                    logits.append((block_logit[h, i, order] + lnn).expand(M, -1))
                    values.append(vm[h, order])
                else:
                    r = order.numel() if name == "per-query" else min(near, order.numel())
                    logits.append(qi @ km[h, order[:r]].T * scale + lnn)
                    values.append(vm[h, order[:r]])
                    far = order[r:]
                    if far.numel():
                        for part in far.tensor_split(min(groups, far.numel())):
                            w = torch.softmax(block_logit[h, i, part], 0)          # Z's shares
                            logz = torch.logsumexp(block_logit[h, i, part], 0) + lnn
                            kg, vg = w @ km[h, part], w @ vm[h, part]
                            bias = logz - (qm[h, i] @ kg) * scale
                            logits.append((qi @ kg * scale + bias)[:, None])
                            values.append(vg[None])
                p = torch.softmax(torch.cat(logits, 1), 1)
                outs[name][h, i * M:(i + 1) * M] = p @ torch.cat(values, 0)
    return outs


def dense(q, k, v):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for h in range(q.shape[0]):
        for s in range(0, q.shape[1], 1024):
            out[h, s:s + 1024] = torch.softmax(q[h, s:s + 1024] @ k[h].T * scale, -1) @ v[h]
    return out


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, nargs=3, default=(8, 32, 52))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--shares", type=float, nargs="+", default=(0.005, 0.02, 0.05))
    ap.add_argument("--near", type=int, nargs="+", default=(0, 0, 16, 32, 63), help="R of each near + far variant")
    ap.add_argument("--groups", type=int, nargs="+", default=(1, 4, 1, 1, 1), help="G of each near + far variant")
    ap.add_argument("--regimes", nargs="+", default=["concentrated", "medium", "diffuse", "mixed"])
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    grid = tuple(args.grid)
    L = grid[0] * grid[1] * grid[2]
    assert L % M == 0, "the probe takes whole query blocks"
    perm, _ = sequence_permutation(grid)
    variants = [("per-query", 0, 0), ("per-query + mean q", 0, 0), ("per-query + mean q/4", 0, 0),
                ("per-query + var", 0, 0), ("per-query + var, block q2", 0, 0), ("per-query + var, iso", 0, 0),
                ("per-block", 0, 0)] + [
        (f"near {r} + far {g}", r, g) for r, g in zip(args.near, args.groups)]
    print(f"grid {grid}, L = {L}, {args.heads} heads, key blocks {L // N}; rel. L2 against dense")
    print(f"{'regime':13s} {'share':>6s} " + " ".join(f"{n:>15s}" for n, _, _ in variants))
    for regime in args.regimes:
        rg = REGIMES[regime]
        q, k, v = video_attention_qkv(grid, heads=args.heads, head_dim=HEAD_DIM, head_types=rg.head_types, seed=3)
        target = rg.target_for("720p")
        s = calibrate_logit_scale(q, k, target, per_head=rg.per_head)
        q = q.float() * (s.view(1, -1, 1, 1) if rg.per_head else s)
        share = float(block_mass_share(q, k).mean())
        q, k, v = (arrange(t.float(), perm)[0] for t in (q, k, v))
        ref = dense(q, k, v)
        for a in args.shares:
            outs = tail_outputs(q, k, v, a, variants)
            print(f"{regime:8s} {share:4.2f} {a:6.3f} " + " ".join(f"{rel(outs[n], ref):15.4f}"
                                                             for n, _, _ in variants), flush=True)


if __name__ == "__main__":
    main()
