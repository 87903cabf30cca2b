"""The pooled tail (``use_pooled_tail``): level-0 key blocks stay in the softmax as one
mean key/value each. Torch reference and Triton kernel (interpreter on CPU) against the
definition written out by hand, and the public API against dense attention over block means."""
import math

import pytest
import torch

from psa_kernels import PSAConfig, psa_attention, psa_plan
from psa_kernels import attention, pyramid, schedule
from psa_kernels.synthetic import relative_l2, structured_qkv
from test_psa_attention import HAND_LEVELS, KERNEL_TOL, _close, _kernel, _pyramid_by_hand, _random_levels


def _kernel_tail(q, pyr, levels, m, packed, fold=True):
    out = torch.full_like(q, float("nan"))
    sched = schedule.build_schedule(levels, pyr, packed=packed, fold=fold)
    attention.attention_triton(q, pyr, sched, m, out=out)
    assert not torch.isnan(out).any(), "kernel left rows unwritten"
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_tail_hand_built_level_map(packed, device):
    L, m, n, D = 37, 16, 16, 16  # the last key block has 5 real keys: its mean has bias ln 5
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=41, device=device)
    levels = HAND_LEVELS.to(device)
    expected = _pyramid_by_hand(q, k, v, levels, m, n, tail=True)
    without = _pyramid_by_hand(q, k, v, levels, m, n, tail=False)
    assert relative_l2(expected, without) > 1e-3  # the tail changes rows with skipped blocks
    pyr = pyramid.build_pyramid(k, v, n, L, tail=True)
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)
    _close(_kernel_tail(q, pyr, levels, m, packed), expected, **KERNEL_TOL)
    pyr_t, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True)
    _close(_kernel_tail(q, pyr_t, levels, m, packed), expected, **KERNEL_TOL)


@pytest.mark.parametrize("L,m,n,D", [(330, 64, 32, 32), (600, 64, 64, 16), (1100, 64, 128, 16)])
def test_tail_random_level_maps(L, m, n, D, device):
    # more key blocks than one tail tile holds at n = 16 .. 32 is covered by the API test below
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=L + 7, device=device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=L + 1).to(device)
    pyr = pyramid.build_pyramid(k, v, n, L, tail=True)
    ref = attention.attention_reference(q, pyr, levels, m)
    expected = _pyramid_by_hand(q, k, v, levels, m, n, tail=True)
    _close(ref, expected, atol=1e-5, rtol=1e-5)
    pyr_t, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True)
    _close(pyr_t.k[:, :, pyr_t.base[0]:].double(),
           pyr.k[:, :, pyr.base[0]:].double(), atol=1e-5, rtol=1e-5)
    _close(_kernel_tail(q, pyr_t, levels, m, True), expected, **KERNEL_TOL)
    # the same schedule without the tail gives the old result: the tail only adds
    no_tail, _ = pyramid.build_pyramid_triton(k, v, n, L)
    _close(_kernel(q, no_tail, levels, m, True), _pyramid_by_hand(q, k, v, levels, m, n), **KERNEL_TOL)


def _block_mean_attention(q, k, v, n):
    """Every query attends to the mean key/value of every key block of n tokens, weighted by
    the block's real keys (logit bias ln count): dense attention over block means."""
    B, H, L, D = q.shape
    nkb = -(-L // n)
    pad = nkb * n - L
    cnt = torch.full((nkb,), float(n), dtype=torch.float64)
    cnt[-1] = n - pad
    def means(x):
        x = torch.nn.functional.pad(x.double(), (0, 0, 0, pad))
        return x.reshape(B, H, nkb, n, D).sum(3) / cnt[:, None]
    logits = q.double() @ means(k).transpose(-1, -2) / math.sqrt(D) + cnt.log()
    return logits.softmax(-1) @ means(v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_block_skipped_equals_attention_over_block_means(backend, device):
    grid, n = (2, 5, 7), 16  # 70 video tokens, the last key block partial
    cfg = PSAConfig.from_dict({"block_size": {"m": 16, "n": n, "tile_n": 16}, "mask_mode": "topk",
                               "mask_ratios": {0: [0.0, 1.0]}, "use_pooled_tail": True})
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=3, device=device)
    plan = psa_plan(q, k, cfg, grid, backend="torch")
    assert int((plan.levels != 0).sum()) == 0, "a preset of level 0 only must skip every block"
    out, st = psa_attention(q, k, v, cfg, grid, backend=backend, return_stats=True)
    # block means in the arranged order: the layout permutes tokens before the blocks are cut
    from psa_kernels.layout import arrange, restore
    expected = restore(_block_mean_attention(*(arrange(x, plan.perm).cpu() for x in (q, k, v)), n),
                       plan.inv.cpu() if plan.inv is not None else None)
    _close(out, expected, **(KERNEL_TOL if backend == "triton" else dict(atol=1e-5, rtol=1e-5)))
    assert st.density == pytest.approx(1.0 / n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tail_lowers_error_on_broad_attention_and_costs_one_nth(backend, device):
    grid = (3, 6, 8)
    ratios = {1: [0.0, 0.15], 2: [0.15, 0.25], 0: [0.25, 1.0]}
    d = {"block_size": {"m": 16, "n": 16, "tile_n": 16}, "mask_mode": "topk", "mask_ratios": ratios}
    drop, keep = PSAConfig.from_dict(d), PSAConfig.from_dict({**d, "use_pooled_tail": True})
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=9, sharpness=(1.0, 2.0), device=device)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out_drop, st_drop = psa_attention(q, k, v, drop, grid, backend=backend, return_stats=True)
    out_keep, st_keep = psa_attention(q, k, v, keep, grid, backend=backend, return_stats=True)
    assert relative_l2(out_keep, dense) < 0.7 * relative_l2(out_drop, dense)
    skipped = st_keep.level_counts[0] / sum(st_keep.level_counts.values())
    assert st_keep.density == pytest.approx(st_drop.density + skipped / 16, rel=1e-5)


def test_tail_in_head_passes_matches_one_pass(device):
    passes_match_one_pass({}, device)


def passes_match_one_pass(extra: dict, device):
    """A tail preset (plus ``extra`` fields) run one head per pass gives the one-pass output."""
    if device.type != "cuda":
        pytest.skip("heads in passes only differ from one pass on the Triton path (CUDA)")
    grid = (3, 16, 16)
    cfg = PSAConfig.from_dict({"block_size": {"m": 64, "n": 64, "tile_n": 32}, "mask_mode": "topk",
                               "mask_ratios": {1: [0.0, 0.1], 4: [0.1, 0.3], 0: [0.3, 1.0]},
                               "use_pooled_tail": True, **extra})
    q, k, v = structured_qkv(grid, heads=4, head_dim=64, dtype=torch.bfloat16, device=device, seed=2)
    one = psa_attention(q, k, v, cfg, grid)
    passes = psa_attention(q, k, v, cfg, grid, heads_per_pass=1)
    _close(passes, one, atol=1e-2, rtol=1e-2)
