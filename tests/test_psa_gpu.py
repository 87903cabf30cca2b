"""The Triton kernels on a GPU at the Wan 2.1 1.3B shape (B=1, 12 heads, grid (21, 30, 52),
D=128, bf16), for the seed document's and the shipped presets: Triton against the torch
reference on the same plan. Run with ``pytest -s`` to see the figures."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from psa_kernels import PSAConfig, attention, estimate, psa_attention, psa_plan, pyramid, schedule
from psa_kernels.layout import arrange
from psa_kernels.synthetic import relative_l2, structured_qkv

pytestmark = pytest.mark.requires_cuda

GRID = (21, 30, 52)
HEADS, HEAD_DIM = 12, 128

PRESETS = {
    "Wan2.1_1.3b/psa_balanced": {
        "type": "psa", "use_rearrange": True, "use_sim_mask": True,
        "block_size": {"m": 128, "n": 128, "tile_n": 32},
        "mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.6], 4: [0.6, 0.7], 8: [0.7, 0.8], 0: [0.8, 1.0]},
        "mask_mode": "thresholdbound", "attn_impl": "old_mask_type"},
    "Wan2.1_1.3b/psa_topk": {
        "type": "psa", "use_rearrange": True, "use_sim_mask": False,
        "block_size": {"m": 128, "n": 32, "tile_n": 32},
        "mask_ratios": {1: [0.0, 0.05], 2: [0.05, 0.1], 4: [0.1, 0.15], 8: [0.15, 0.25], 0: [0.25, 1.0]},
        "mask_mode": "topk", "attn_impl": "new_mask_type"},
    "Wan2.1_14b/psa_balanced": {
        "type": "psa", "use_rearrange": True, "use_sim_mask": False,
        "block_size": {"m": 128, "n": 128, "tile_n": 32},
        "mask_ratios": {1: [0.0, 0.4], 2: [0.4, 0.5], 4: [0.5, 0.6], 8: [0.6, 0.8], 0: [0.8, 1.0]},
        "mask_mode": "thresholdbound", "attn_impl": "new_mask_type"},
    "seed/my_custom_preset+sim": {
        "type": "psa", "use_rearrange": True, "use_sim_mask": True,
        "block_size": {"m": 128, "n": 64, "tile_n": 32},
        "mask_ratios": {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]},
        "mask_mode": "thresholdbound", "attn_impl": "new_mask_type", "tile_size": [2, 8, 8],
        "rearrange_method": "Gilbert", "sim_thresholds": {"x2": 0.7, "x4": 0.65, "x8": 0.6}},
}


@pytest.fixture(scope="module")
def wan_qkv():
    return structured_qkv(GRID, heads=HEADS, head_dim=HEAD_DIM, batch=1, dtype=torch.bfloat16,
                          device="cuda", seed=0)


@pytest.fixture(scope="module")
def dense_out(wan_qkv):
    q, k, v = wan_qkv
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_triton_matches_reference(name, wan_qkv, dense_out):
    q, k, v = wan_qkv
    cfg = PSAConfig.from_dict(PRESETS[name], name)
    m, n = cfg.block_size.m, cfg.block_size.n
    plan = psa_plan(q, k, cfg, GRID, backend="triton", v=v)
    assert plan.backend == "triton"
    out_t, stats = psa_attention(q, k, v, cfg, GRID, plan=plan, return_stats=True)
    out_r = psa_attention(q, k, v, cfg, GRID, plan=dataclasses.replace(plan, backend="torch"))
    assert out_t.dtype == torch.bfloat16 and out_t.shape == q.shape
    assert torch.isfinite(out_t).all()
    err = relative_l2(out_t, out_r)

    # the kernel alone, into a poisoned output buffer
    qa, ka, va = (arrange(x, plan.perm) for x in (q, k, v))
    pyr, _ = pyramid.build_pyramid_triton(ka, va, n, q.shape[2])
    sched = schedule.build_schedule(plan.levels, pyr, packed=cfg.attn_impl == "new_mask_type")
    poisoned = torch.full_like(qa, float("nan"))
    attention.attention_triton(qa, pyr, sched, m, out=poisoned)
    nan_rows = int(torch.isnan(poisoned).any(-1).sum())
    ref_arranged = attention.attention_reference(qa, pyramid.build_pyramid(ka, va, n, q.shape[2]), plan.levels, m)
    err_kernel = relative_l2(poisoned, ref_arranged) if nan_rows == 0 else float("nan")
    err_dense = relative_l2(out_t, dense_out)
    print(f"\n{name}: density {stats.density:.4f}  levels {stats.level_counts}  "
          f"triton vs torch rel L2 {err:.2e}  kernel alone {err_kernel:.2e}  vs dense SDPA {err_dense:.3f}")
    assert 0.0 < stats.density < 1.0
    assert nan_rows == 0, f"{nan_rows} output rows left unwritten (NaN)"
    assert err < 1e-2, f"triton vs torch rel L2 {err:.3g}"
    assert err_kernel < 1e-2, f"kernel vs reference rel L2 {err_kernel:.3g}"


@pytest.mark.parametrize("m,n", sorted({(p["block_size"]["m"], p["block_size"]["n"]) for p in PRESETS.values()}))
def test_estimate_triton_matches_reference(m, n, wan_qkv):
    q, k, _ = wan_qkv
    cfg = PSAConfig.from_dict({"block_size": {"m": m, "n": n, "tile_n": 32}})
    plan = psa_plan(q, k, cfg, GRID, backend="torch")
    qa, ka = arrange(q, plan.perm), arrange(k, plan.perm)
    ref = estimate.estimate_reference(qa, ka, m, n)
    got = estimate.estimate_triton(qa, ka, m, n)
    diff = float((got - ref).abs().max())
    rows = float((got.sum(-1) - 1).abs().max())
    print(f"\nestimate m={m} n={n}: max abs diff {diff:.2e}, max |row sum - 1| {rows:.2e}")
    assert torch.isfinite(got).all()
    assert diff < 1e-3
    assert rows < 1e-3


@pytest.mark.parametrize("n,impl", [(64, "new_mask_type"), (128, "old_mask_type")])
def test_all_full_resolution_equals_sdpa(n, impl, wan_qkv, dense_out):
    q, k, v = wan_qkv
    cfg = PSAConfig.from_dict({"block_size": {"m": 128, "n": n, "tile_n": 32}, "mask_ratios": {1: [0.0, 1.0]},
                               "mask_mode": "thresholdbound", "attn_impl": impl, "use_sim_mask": True})
    out, stats = psa_attention(q, k, v, cfg, GRID, backend="triton", return_stats=True)
    err = relative_l2(out, dense_out)
    print(f"\nall level 1 (n={n}, {impl}): density {stats.density:.4f}, rel L2 vs SDPA {err:.2e}")
    assert stats.density == 1.0
    assert torch.isfinite(out).all()
    assert err < 1e-2


def test_heads_in_passes_match_one_pass(wan_qkv):
    q, k, v = wan_qkv
    cfg = PSAConfig.from_dict(PRESETS["seed/my_custom_preset+sim"])
    whole = psa_attention(q, k, v, cfg, GRID)
    for group in (1, 5):
        assert torch.equal(psa_attention(q, k, v, cfg, GRID, heads_per_pass=group), whole), group


def test_repeated_calls_hold_no_memory(wan_qkv):
    # Everything a call allocates is released when it returns: the permutation cache is filled
    # by the first call, after which memory in use returns to the same level after every call.
    q, k, v = wan_qkv
    cfg = PSAConfig.from_dict(PRESETS["Wan2.1_1.3b/psa_topk"])
    out = psa_attention(q, k, v, cfg, GRID)
    del out
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        out = psa_attention(q, k, v, cfg, GRID)
        del out
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
