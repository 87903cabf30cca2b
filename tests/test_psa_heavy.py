"""Heavy keys (``heavy_keys``): per head a few keys that every query block skipping their block
attends exactly, taken out of that block's tail mean. Torch reference and Triton kernel
(interpreter on CPU) against the definition written out by hand; the public API against dense
attention where nothing is skipped, and on sink heads, where the heavy keys are the point."""
import dataclasses

import pytest
import torch

from psa_kernels import PSAConfig, psa_attention, psa_plan
from psa_kernels import attention, pyramid, schedule
from psa_kernels.errors import ConfigError
from psa_kernels.estimate import block_lengths, block_means_reference
from psa_kernels.heavy import (HeavyKeys, heavy_per_row, mean_query_from_blocks, mean_query_logits,
                                select_heavy_keys)
from psa_kernels.synthetic import relative_l2, structured_qkv, video_attention_qkv
from test_psa_tail import passes_match_one_pass
from test_psa_attention import HAND_LEVELS, KERNEL_TOL, _close, _random_levels, attention_over_groups


def _by_hand(q, k, v, levels, m, n, heavy_sets, tail=True) -> torch.Tensor:
    """Expected output in float64 from the definition: key block j at level p > 0 gives its
    groups of p consecutive real keys (mean key and value, logit bias ln of the group's keys);
    at level 0 each of its heavy keys on its own and, with ``tail``, the mean of its other real
    keys (bias ln of their number) when there are any. heavy_sets[b][h]: arranged positions."""
    def groups(b, h, p, block):
        if p:
            return [block[g:g + p] for g in range(0, len(block), p)]
        heavy = set(heavy_sets[b][h])
        rest = [t for t in block if t not in heavy]
        return [[t] for t in block if t in heavy] + ([rest] if tail and rest else [])
    return attention_over_groups(q, k, v, levels, m, n, groups)


def _heavy(index: torch.Tensor, n: int) -> HeavyKeys:
    """Heavy keys at given positions (identity order: positions are arranged positions)."""
    return HeavyKeys(index, (index // n).to(torch.int32))


def _kernel(q, pyr, levels, m, packed):
    out = torch.full_like(q, float("nan"))
    sched = schedule.build_schedule(levels, pyr, packed=packed, tile_n=schedule.TILE_WIDTH)
    attention.attention_triton(q, pyr, sched, m, out=out)
    assert not torch.isnan(out).any(), "kernel left rows unwritten"
    return out


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_hand_built_level_map(tail, packed, device):
    L, m, n, D = 37, 16, 16, 16   # the last key block has 5 real keys
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=43, device=device)
    levels = HAND_LEVELS.to(device)
    # per (b, h): heavy keys in skipped and in routed blocks, one in the partial last block, and
    # in (1, 1) the whole partial block (its tail mean has no keys left)
    index = torch.tensor([[[3, 20, 33, 36, 9], [0, 17, 34, 35, 36]],
                          [[5, 6, 7, 8, 40 - 9], [32, 33, 34, 35, 36]]], device=device)
    heavy = _heavy(index, n)
    sets = index.cpu().tolist()
    expected = _by_hand(q, k, v, levels, m, n, sets, tail)
    plain = _by_hand(q, k, v, levels, m, n, [[[]] * 2] * 2, tail)
    assert relative_l2(expected, plain) > 1e-3  # the heavy keys change rows that skip their blocks
    pyr = pyramid.build_pyramid(k, v, n, L, tail=tail, heavy=heavy)
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)
    _close(_kernel(q, pyr, levels, m, packed), expected, **KERNEL_TOL)
    pyr_t, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=tail, heavy=heavy)
    _close(_kernel(q, pyr_t, levels, m, packed), expected, **KERNEL_TOL)


@pytest.mark.parametrize("L,m,n,D,count", [(330, 64, 32, 32, 70), (600, 64, 64, 16, 9), (1100, 64, 128, 16, 130)])
def test_random_level_maps(L, m, n, D, count, device):
    # more heavy keys than one 64-row tile holds (70, 130) and fewer (9)
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=L + 9, device=device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=L + 3).to(device)
    g = torch.Generator().manual_seed(L)
    index = torch.stack([torch.randperm(L, generator=g)[:count] for _ in range(2)])[None].to(device)
    heavy = _heavy(index, n)
    expected = _by_hand(q, k, v, levels, m, n, index.cpu().tolist())
    pyr = pyramid.build_pyramid(k, v, n, L, tail=True, heavy=heavy)
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)
    pyr_t, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, heavy=heavy)
    _close(pyr_t.tail_bias.double(), pyr.tail_bias.double(), atol=1e-6, rtol=1e-6)
    _close(_kernel(q, pyr_t, levels, m, True), expected, **KERNEL_TOL)


def _cfg(ratios, heavy_keys, n=16, m=16, tail=True) -> PSAConfig:
    return PSAConfig.from_dict({"block_size": {"m": m, "n": n, "tile_n": min(n, 32)}, "mask_mode": "topk",
                                "mask_ratios": ratios, "use_pooled_tail": tail, "heavy_keys": heavy_keys})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nothing_skipped_is_dense_attention(backend, device):
    # every block at level 1: heavy keys sit in routed blocks only, so each key counts once
    grid = (2, 5, 7)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=5, device=device)
    out = psa_attention(q, k, v, _cfg({1: [0.0, 1.0]}, heavy_keys=12), grid, backend=backend)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    _close(out, dense, **(KERNEL_TOL if backend == "triton" else dict(atol=1e-5, rtol=1e-5)))


@pytest.mark.parametrize("backend,correction", [("torch", "none"), ("triton", "none"), ("triton", "variance")])
def test_selection_picks_the_keys_the_mean_query_likes_most(backend, correction, device):
    # 100 tokens: the last query block of 16 is partial, so a mean query taken from the
    # spread pass's block means (Triton with the correction) must weigh blocks by length
    grid, n = (2, 5, 10), 16
    q, k, _ = structured_qkv(grid, heads=3, head_dim=16, seed=7, device=device)
    cfg = dataclasses.replace(_cfg({1: [0.0, 0.2], 0: [0.2, 1.0]}, heavy_keys=5, n=n), tail_correction=correction)
    plan = psa_plan(q, k, cfg, grid, backend=backend)
    logit = (k.double() @ q.double().mean(2, keepdim=True).transpose(-1, -2)).squeeze(-1)   # [B, H, L]
    expected = logit.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(plan.heavy.index.sort(-1).values, expected)
    arranged_pos = plan.inv[plan.heavy.index] if plan.inv is not None else plan.heavy.index
    assert torch.equal(plan.heavy.block.long(), arranged_pos // n)


def test_mean_query_logits_kernel_matches_torch_on_a_model_layout(device):
    # q and k as an attention override gets them: views of [B, L, H*D], heads not contiguous
    B, L, H, D = 2, 150, 3, 32
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, L, H * D, generator=g).to(device).view(B, L, H, D).transpose(1, 2)
    k = torch.randn(B, L, H * D, generator=g).to(device).view(B, L, H, D).transpose(1, 2)
    expected = torch.einsum("bhld,bhd->bhl", k.double(), q.double().mean(2))
    _close(mean_query_logits(q, k, use_triton=False), expected, atol=1e-4, rtol=1e-4)
    _close(mean_query_logits(q, k, use_triton=True), expected, atol=1e-4, rtol=1e-4)
    kb = k.to(torch.bfloat16)
    _close(mean_query_logits(q, kb, use_triton=True), mean_query_logits(q, kb.float(), use_triton=False),
           atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("L,m", [(150, 32), (128, 32), (7, 16)])
def test_mean_query_from_block_means_is_the_mean_query(L, m, device):
    q = torch.randn(2, 3, L, 16, generator=torch.Generator().manual_seed(L)).to(device) + 0.5
    got = mean_query_from_blocks(block_means_reference(q, m), block_lengths(L, m, q.device) / L)
    _close(got, q.double().mean(2), atol=1e-5, rtol=1e-5)
    k = torch.randn_like(q)
    _close(mean_query_logits(None, k, qbar=got), mean_query_logits(q, k), atol=1e-4, rtol=1e-4)


def test_text_tokens_are_never_heavy(device):
    grid, text = (2, 4, 4), 9
    q, k, _ = structured_qkv(grid, heads=2, head_dim=16, text_len=text, seed=2, device=device)
    k = k.clone()
    k[:, :, -text:] *= 50.0   # text keys far ahead of every video key
    heavy = select_heavy_keys(q, k, 6, 16, None, video_len=32)
    assert bool((heavy.index < 32).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_heavy_keys_fix_sink_heads_and_are_counted_in_density(backend, device):
    grid = (4, 8, 12)   # 384 tokens; the sink head puts much of its mass on 2 scattered tokens
    q, k, v = video_attention_qkv(grid, heads=2, head_dim=32, head_types=("sink",), seed=4, device=device,
                                  logit_scale=2.0)
    ratios = {1: [0.0, 0.1], 0: [0.1, 1.0]}
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out0, st0 = psa_attention(q, k, v, _cfg(ratios, 0, n=32, m=32), grid, backend=backend, return_stats=True)
    out8, st8 = psa_attention(q, k, v, _cfg(ratios, 8, n=32, m=32), grid, backend=backend, return_stats=True)
    assert relative_l2(out8, dense) < 0.5 * relative_l2(out0, dense)
    plan = psa_plan(q, k, _cfg(ratios, 8, n=32, m=32), grid, backend="torch")
    per_row = heavy_per_row(plan.levels, plan.heavy).double()   # heavy keys attended per query block
    nkb = plan.levels.shape[-1]
    assert 0 < float(per_row.mean()) <= 8
    assert st8.density == pytest.approx(st0.density + float(per_row.mean()) / (32 * nkb), rel=1e-5)


@pytest.mark.parametrize("value", [-1, 1025, 2.5, True, "many"])
def test_bad_heavy_keys_name_the_field(value):
    with pytest.raises(ConfigError) as err:
        PSAConfig.from_dict({"heavy_keys": value})
    assert "heavy_keys" in str(err.value) and "1024" in str(err.value)


def test_heavy_keys_round_trip():
    cfg = _cfg({1: [0.0, 0.2], 0: [0.2, 1.0]}, heavy_keys=256)
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["heavy_keys"] == 256
    assert PSAConfig().heavy_keys == 0


def test_heavy_in_head_passes_matches_one_pass(device):
    passes_match_one_pass({"heavy_keys": 100}, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_schedule_column_biases_follow_the_level_map(dtype, device):
    # the schedule's per-row biases, which the kernel reads instead of the level map: log2 of a
    # tail row's real keys where the row skips its block (-inf elsewhere and past the last
    # block), 0 for a heavy key whose block the row skips (-inf elsewhere and for padding)
    L, m, n, D, count = 1100, 64, 32, 16, 70
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=17, device=device)
    k, v = k.to(dtype), v.to(dtype)
    nqb, nkb = -(-L // m), -(-L // n)
    levels = _random_levels(2, 2, nqb, nkb, seed=5).to(device)
    g = torch.Generator().manual_seed(3)
    index = torch.stack([torch.stack([torch.randperm(L, generator=g)[:count] for _ in range(2)])
                         for _ in range(2)]).to(device)
    heavy = _heavy(index, n)
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, heavy=heavy)
    sched = schedule.build_schedule(levels, pyr, packed=True, tile_n=schedule.TILE_WIDTH)
    ninf = float("-inf")
    lv = levels.cpu().long()
    # real keys per (batch, head, key block) left for the tail: block length minus heavy keys
    counts = torch.full((2, 2, nkb), float(n))
    counts[..., -1] = L - (nkb - 1) * n
    for b in range(2):
        for h in range(2):
            for j in index[b, h].cpu().tolist():
                counts[b, h, j // n] -= 1
    want_tail = torch.full((2, 2, nqb, -(-nkb // 64) * 64), ninf, dtype=torch.float64)
    in_tail = (lv == 0) & (counts[:, :, None, :] > 0)
    want_tail[..., :nkb] = torch.where(in_tail, counts.log2().double()[:, :, None, :], ninf)
    tol = dict(atol=0, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=2 ** -10)
    torch.testing.assert_close(sched.tail_bias.cpu().double(), want_tail, **tol)
    blk = pyr.heavy_block.cpu().long()                                   # [B, H, rows], -1 padding
    at = torch.gather(lv, 3, blk.clamp_min(0)[:, :, None, :].expand(-1, -1, nqb, -1))
    want_heavy = torch.where((blk[:, :, None, :] >= 0) & (at == 0), 0.0, ninf).double()
    torch.testing.assert_close(sched.heavy_bias.cpu().double(), want_heavy, atol=0, rtol=0)
    # a schedule without the tail cannot drive a pyramid with one
    bare = schedule.build_schedule(levels, pyramid.build_pyramid_triton(k, v, n, L)[0], packed=True,
                                  tile_n=schedule.TILE_WIDTH)
    with pytest.raises(ValueError, match="schedule built from it"):
        attention.attention_triton(q.to(dtype), pyr, bare, m)
