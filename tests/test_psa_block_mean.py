"""Routing from block means (``estimate_method: block_mean``): the Triton block means against
torch, the scores against the definition, and the whole call against dense attention."""
import math

import pytest
import torch

from psa_kernels import PSAConfig, psa_attention, psa_plan
from psa_kernels import estimate
from psa_kernels.layout import arrange, sequence_permutation
from psa_kernels.synthetic import relative_l2, structured_qkv


@pytest.mark.parametrize("L,block", [(70, 16), (300, 64), (128, 128)])
def test_block_means_triton_matches_torch_through_perm(L, block, device):
    g = torch.Generator().manual_seed(L)
    x = torch.randn(2, 3, L, 32, generator=g).to(device)
    perm = torch.randperm(L, generator=g).to(device)
    out = estimate.block_means_triton(x, block, perm)
    ref = estimate.block_means_reference(x[:, :, perm], block)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # by hand: the last block's mean is over its real rows only
    last = (L - 1) // block * block
    torch.testing.assert_close(ref[:, :, -1], x[:, :, perm][:, :, last:].float().mean(2), atol=1e-5, rtol=1e-5)


def test_block_mean_scores_by_definition(device):
    L, m, n, D = 100, 32, 16, 16
    q, k, _ = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=4, device=device)
    s = estimate.estimate_block_mean(q, k, m, n, triton_means=False)
    nqb, nkb = -(-L // m), -(-L // n)
    assert s.shape == (1, 2, nqb, nkb)
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 2, nqb, device=device))
    qb, kb = 1, 6  # an inside pair, and the partial last key block (4 keys)
    qm, km = q[0, 0, qb * m:(qb + 1) * m].double().mean(0), k[0, 0, kb * n:].double().mean(0)
    logits = torch.stack([q[0, 0, qb * m:(qb + 1) * m].double().mean(0) @ k[0, 0, j * n:(j + 1) * n].double().mean(0)
                          / math.sqrt(D) + math.log(min(n, L - j * n)) for j in range(nkb)])
    expected = logits.softmax(0)
    assert float(s[0, 0, qb, kb]) == pytest.approx(float(expected[kb]), rel=1e-4)
    assert float(qm @ km / math.sqrt(D) + math.log(4)) == pytest.approx(float(logits[kb]), rel=1e-9)
    via_triton = estimate.estimate_block_mean(q, k, m, n, perm=None)
    torch.testing.assert_close(via_triton, s, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_block_mean_routing_end_to_end(backend, device):
    grid = (3, 8, 8)
    base = {"block_size": {"m": 16, "n": 16, "tile_n": 16}, "mask_mode": "topk",
            "mask_ratios": {1: [0.0, 0.2], 4: [0.2, 0.4], 0: [0.4, 1.0]}, "use_pooled_tail": True}
    cfg = PSAConfig.from_dict({**base, "estimate_method": "block_mean"})
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, seed=6, device=device)
    plan = psa_plan(q, k, cfg, grid, backend=backend)
    perm, _ = sequence_permutation(grid, 0, False, cfg.rearrange_method, tuple(cfg.tile_size), True, q.device)
    expected = estimate.estimate_block_mean(arrange(q, perm), arrange(k, perm), 16, 16, triton_means=False)
    torch.testing.assert_close(plan.scores, expected, atol=1e-5, rtol=1e-4)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = psa_attention(q, k, v, cfg, grid, backend=backend)
    sampled = psa_attention(q, k, v, PSAConfig.from_dict(base), grid, backend=backend)
    # routing from means picks blocks about as well as sampling on local attention
    assert relative_l2(out, dense) < 1.5 * relative_l2(sampled, dense) + 1e-3
