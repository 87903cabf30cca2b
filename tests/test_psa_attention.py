"""Pyramid attention: the torch reference and the Triton kernels (under the interpreter on CPU)
against attention written out here by hand, and the public API end to end."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from psa_kernels import ConfigError, PSAConfig, psa_attention, psa_plan
from psa_kernels import levels as levels_mod
from psa_kernels import attention, pyramid, schedule
from psa_kernels.layout import arrange
from psa_kernels.synthetic import relative_l2, structured_qkv

ALL_FULL = {1: [0.0, 1.0]}
TOPK = {1: [0.0, 0.25], 2: [0.25, 0.45], 4: [0.45, 0.6], 8: [0.6, 0.8], 0: [0.8, 1.0]}
THRESHOLD = {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.85], 8: [0.85, 0.95], 0: [0.95, 1.0]}

# On a GPU tl.dot rounds fp32 inputs to tf32; the interpreter computes in fp32.
ON_CUDA = torch.cuda.is_available()
KERNEL_TOL = dict(atol=2e-2, rtol=2e-2) if ON_CUDA else dict(atol=1e-5, rtol=1e-5)
KERNEL_REL_L2 = 1e-2 if ON_CUDA else 1e-4
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(ratios=None, mode="thresholdbound", m=16, n=16, **kw) -> PSAConfig:
    d = {"block_size": {"m": m, "n": n, "tile_n": min(n, 32)}, "mask_mode": mode, **kw}
    if ratios is not None:
        d["mask_ratios"] = ratios
    return PSAConfig.from_dict(d)


def _pyramid_by_hand(q, k, v, levels, m, n, tail=False) -> torch.Tensor:
    """Expected pyramid attention in float64 on the CPU, from the definition.

    For a query in block i and key block j at level p: p = 1 gives the block's real keys
    with logit q.k/sqrt(D); p > 1 gives, for each group of p consecutive keys of the block,
    the mean of the group's real keys and values with logit q.k/sqrt(D) + ln(real keys in
    the group); p = 0 gives nothing, or with ``tail`` the group of all the block's real keys.
    Softmax over the union.
    """
    def groups(b, h, p, block):
        if p == 0 and not tail:
            return []
        p = p or n
        return [block[g:g + p] for g in range(0, len(block), p)]
    return attention_over_groups(q, k, v, levels, m, n, groups)


def attention_over_groups(q, k, v, levels, m, n, groups) -> torch.Tensor:
    """Float64 attention in which a query of block i sees, for every key block j, the groups
    ``groups(b, h, p, block)`` of key positions (p: the pair's level, block: j's real positions),
    each as the mean of its keys and values with logit q.k/sqrt(D) + ln(group size)."""
    B, H, L, D = q.shape
    nqb, nkb = levels.shape[-2:]
    out = torch.empty(B, H, L, D, dtype=torch.float64)
    qd, kd, vd = q.cpu().double(), k.cpu().double(), v.cpu().double()
    levels = levels.cpu()
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                keys, vals, bias = [], [], []
                for j in range(nkb):
                    block = [t for t in range(j * n, (j + 1) * n) if t < L]
                    for idx in groups(b, h, int(levels[b, h, i, j]), block):
                        keys.append(kd[b, h, idx].mean(0))
                        vals.append(vd[b, h, idx].mean(0))
                        bias.append(math.log(len(idx)))
                rows = slice(i * m, min(L, (i + 1) * m))
                logits = qd[b, h, rows] @ torch.stack(keys).T / math.sqrt(D) + torch.tensor(bias, dtype=torch.float64)
                out[b, h, rows] = logits.softmax(-1) @ torch.stack(vals)
    return out


def _random_levels(B, H, nqb, nkb, seed) -> torch.Tensor:
    """Random level map, no row empty; in (0, 0) rows 0..3 are all of one level, so that
    the packed schedule needs several tiles of one level."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor([1, 2, 4, 8, 0], dtype=torch.int8)
    lv = choice[torch.randint(0, 5, (B, H, nqb, nkb), generator=g)]
    for r, p in enumerate((1, 2, 4, 8)[:nqb]):
        lv[0, 0, r] = p
    empty = (lv != 0).sum(-1) == 0
    lv[..., 0] = torch.where(empty, torch.full_like(lv[..., 0], 2), lv[..., 0])
    return lv


def _kernel(q, pyr, levels, m, packed, tile_n=None, fold=True, launch=None):
    out = torch.full_like(q, float("nan"))
    sched = schedule.build_schedule(levels, pyr, packed=packed, tile_n=tile_n, fold=fold)
    res = attention.attention_triton(q, pyr, sched, m, out=out, launch=launch)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "kernel left rows unwritten"
    return out


def _close(got, expected, **tol):
    torch.testing.assert_close(got.cpu().double(), expected.cpu().double(), **tol)


# ----------------------------------------------------------------------------- hand-built map

HAND_LEVELS = torch.tensor([
    [[[1, 2, 4], [8, 1, 0], [0, 4, 8]],     # every level mixed
     [[2, 2, 2], [4, 4, 4], [8, 8, 8]]],    # rows without any full-resolution block
    [[[0, 0, 1], [1, 0, 0], [0, 8, 0]],     # one block per row
     [[8, 4, 2], [1, 1, 1], [2, 0, 4]]],
], dtype=torch.int8)


@pytest.mark.parametrize("packed", [True, False])
def test_hand_built_level_map(packed, device):
    L, m, n, D = 37, 16, 16, 16  # the last key block has 5 real keys: partial pooled groups
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=31, device=device)
    levels = HAND_LEVELS.to(device)
    expected = _pyramid_by_hand(q, k, v, levels, m, n)
    pyr = pyramid.build_pyramid(k, v, n, L)
    ref = attention.attention_reference(q, pyr, levels, m)
    assert ref.dtype == q.dtype
    _close(ref, expected, atol=1e-5, rtol=1e-5)
    _close(_kernel(q, pyr, levels, m, packed), expected, **KERNEL_TOL)
    pyr_t, _ = pyramid.build_pyramid_triton(k, v, n, L)
    _close(_kernel(q, pyr_t, levels, m, packed), expected, **KERNEL_TOL)
    # a launch other than the default's (as benchmarks sweep them): the same function
    _close(_kernel(q, pyr_t, levels, m, packed, launch=attention.LaunchConfig(4, 3)), expected, **KERNEL_TOL)


def test_pooled_level_differs_from_full_resolution():
    # The level map matters: pooling the same blocks changes the output (a sanity check that
    # the comparisons in this file can tell levels apart).
    L, m, n = 37, 16, 16
    q, k, v = structured_qkv((1, 1, L), heads=1, head_dim=16, seed=5)
    pyr = pyramid.build_pyramid(k, v, n, L)
    full = attention.attention_reference(q, pyr, torch.ones(1, 1, 3, 3, dtype=torch.int8), m)
    pooled = attention.attention_reference(q, pyr, torch.full((1, 1, 3, 3), 4, dtype=torch.int8), m)
    assert relative_l2(pooled, full) > 1e-3


@pytest.mark.parametrize("L,m,n,D", [(150, 32, 16, 16), (330, 64, 32, 32), (600, 64, 64, 16),
                                     (1100, 64, 128, 16), (70, 16, 16, 64)])
@pytest.mark.parametrize("packed,fold", [(True, True), (True, False), (False, True)])
def test_random_level_maps(L, m, n, D, packed, fold, device):
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=1, seed=L + n, device=device)
    nqb, nkb = -(-L // m), -(-L // n)
    levels = _random_levels(1, 2, nqb, nkb, seed=L).to(device)
    expected = _pyramid_by_hand(q, k, v, levels, m, n)
    pyr = pyramid.build_pyramid(k, v, n, L)
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)
    _close(_kernel(q, pyr, levels, m, packed, fold=fold), expected, **KERNEL_TOL)


@pytest.mark.parametrize("n,tile_n", [(16, 16), (16, 64), (32, 32), (32, 256), (64, 64), (64, 32), (128, 64)])
def test_kernel_with_other_tile_widths(n, tile_n, device):
    L, m = 5 * n + 3, 32
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=32, seed=n + tile_n, device=device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=tile_n).to(device)
    expected = _pyramid_by_hand(q, k, v, levels, m, n)
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L)
    for packed in (True, False):
        _close(_kernel(q, pyr, levels, m, packed, tile_n=tile_n), expected, **KERNEL_TOL)


def test_level_split_and_launch_config():
    # 64-row tiles: level-1 blocks of 128 rows span two tiles, narrower segments share one
    assert schedule.level_split(128, 1, 64, True) == (1, 2)
    assert schedule.level_split(128, 2, 64, True) == (1, 1)
    assert schedule.level_split(128, 8, 64, True) == (4, 1)
    assert schedule.level_split(32, 1, 64, True) == (2, 1)
    assert schedule.level_split(32, 8, 64, False) == (1, 1)  # unpacked: one block a tile
    # 128-row query blocks on 64-row tiles: two programs a multiprocessor (8 warps, 128
    # registers) for head dims up to 128; no cap where the accumulator alone needs more
    cfg = attention.kernel_launch_config(128, 64, True, 128)
    assert (cfg.num_warps, cfg.num_stages, cfg.maxnreg, cfg.loop_stages) == (8, 2, 128, 3)
    # level 1 gathered in place: the same launch with the loops pipelined 2 deep
    gathered = attention.kernel_launch_config(128, 64, True, 128, in_place=True)
    assert (gathered.num_warps, gathered.num_stages, gathered.maxnreg, gathered.loop_stages) == (8, 2, 128, 2)
    assert attention.kernel_launch_config(128, 64, True, 256).maxnreg is None
    assert attention.kernel_launch_config(128, 64, True, 128, major=8).maxnreg is None  # one program an SM
    assert attention.kernel_launch_config(64, 64, True, 64).num_warps == 4
    assert attention.kernel_launch_config(128, 128, False).num_stages == 2


# ----------------------------------------------------------------------------- pyramid and schedule

def test_build_pyramid_pools_real_keys_only():
    L, n = 21, 16  # second key block: 5 real keys
    q, k, v = structured_qkv((1, 1, L), heads=1, head_dim=16, seed=2)
    pyr = pyramid.build_pyramid(k, v, n, L)
    for p in (1, 2, 4, 8):
        for g in range(32 // p):
            idx = [t for t in range(g * p, (g + 1) * p) if t < L]
            row = pyr.base[p] + g
            if idx:
                torch.testing.assert_close(pyr.k[0, 0, row], k[0, 0, idx].mean(0), atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(pyr.v[0, 0, row], v[0, 0, idx].mean(0), atol=1e-6, rtol=1e-6)
                assert abs(float(pyr.bias[row]) - math.log(len(idx))) < 1e-6
            else:
                assert float(pyr.bias[row]) == float("-inf")


@pytest.mark.parametrize("n,L,D", [(16, 16 * 4 + 5, 16), (32, 32 * 3 + 7, 64), (64, 64 * 2 + 33, 32),
                                   (128, 128 * 2 + 5, 16), (128, 100, 32)])
def test_build_pyramid_triton_matches_torch(n, L, D, device):
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=n + L, device=device)
    ref = pyramid.build_pyramid(k, v, n, L)
    got, sim = pyramid.build_pyramid_triton(k, v, n, L, with_similarity=True)
    assert got.n == n and got.base == ref.base
    assert got.k.shape == ref.k.shape and got.v.shape == ref.v.shape
    assert torch.equal(torch.isinf(got.bias), torch.isinf(ref.bias))
    real = torch.isfinite(ref.bias)
    torch.testing.assert_close(got.bias[real], ref.bias[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(got.k[:, :, real], ref.k[:, :, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.v[:, :, real], ref.v[:, :, real], atol=1e-5, rtol=1e-5)
    # padding rows are never attended to, but must be finite (0 * NaN would poison the sum)
    assert torch.isfinite(got.k).all() and torch.isfinite(got.v).all()
    torch.testing.assert_close(sim, levels_mod.key_similarity(k, n, L), atol=1e-5, rtol=0)
    none_pyr, none_sim = pyramid.build_pyramid_triton(k, v, n, L)
    assert none_sim is None and torch.equal(none_pyr.k, got.k)
    # similarity alone: the same numbers, and no pyramid
    no_pyr, sim_only = pyramid.build_pyramid_triton(k, None, n, L, with_similarity=True)
    assert no_pyr is None and torch.equal(sim_only, sim)


@pytest.mark.parametrize("n,m,L", [(16, 32, 101), (64, 64, 200), (128, 16, 300)])
def test_kernels_read_the_caller_order_through_perm(n, m, L, device):
    # perm: arranged = x[..., perm, :]; pyramid, similarity and attention read q, k, v in the
    # caller's order through it and write the output back in the caller's order.
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=32, seed=L, device=device)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(n)).to(device)
    qa, ka, va = arrange(q, perm), arrange(k, perm), arrange(v, perm)
    ref_pyr = pyramid.build_pyramid(ka, va, n, L)
    pyr, sim = pyramid.build_pyramid_triton(k, v, n, L, with_similarity=True, perm=perm)
    real = torch.isfinite(ref_pyr.bias)
    torch.testing.assert_close(pyr.k[:, :, real], ref_pyr.k[:, :, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pyr.v[:, :, real], ref_pyr.v[:, :, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sim, levels_mod.key_similarity(ka, n, L), atol=1e-5, rtol=0)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=m).to(device)
    arranged = _pyramid_by_hand(qa, ka, va, levels, m, n)
    expected = torch.empty_like(arranged)
    expected[:, :, perm.cpu()] = arranged
    for packed in (True, False):
        out = torch.full_like(q, float("nan"))
        sched = schedule.build_schedule(levels, pyr, packed=packed)
        attention.attention_triton(q, pyr, sched, m, out=out, perm=perm)
        assert not torch.isnan(out).any(), "kernel left rows unwritten"
        _close(out, expected, **KERNEL_TOL)


def _decode_schedule(sched, pyr, nkb, L):
    """(level, key block) visited per schedule row, read the way the kernel reads the schedule.

    Regular tiles are not listed: the kernel finds the t-th regular tile of level p from the
    row's record alone (its first segment at seg_p + t / split * slots, its sub-tile t % split).
    Masked tiles fill the back of the row's tile list. A regular tile holds only real pyramid
    rows of whole groups: never the partial last key block, which goes to the masked tiles (the
    kernel applies the per-row bias there). Empty slots: in a folded schedule only at the end of
    a packed level's last regular tile, as many as the kernel masks from the record's block
    count; otherwise only in masked tiles."""
    n, tn = pyr.n, sched.tile_n
    tile_level, tile_seg, counts, segs = (
        x.cpu() for x in (sched.tile_level, sched.tile_seg, sched.counts, sched.segs))
    tail = nkb - 1 if L % n else None
    B, H, nqb, max_masked = tile_level.shape
    out = {}
    for b in range(B):
        for h in range(H):
            for i in range(nqb):
                rec = dict(zip(schedule.COUNT_FIELDS, (int(c) for c in counts[b, h, i])))
                per_level = [rec[f"regular{p}"] for p in (1, 2, 4, 8)]
                nmasked = rec["masked"]
                assert nmasked <= max_masked
                # regular tiles, level by level, from the record; then the listed masked ones
                tiles_of = [(p, t % schedule.level_split(n, p, tn, sched.packed)[1],
                             (rec[f"seg{p}"] if p > 1 else 0)
                             + t // schedule.level_split(n, p, tn, sched.packed)[1]
                             * schedule.level_split(n, p, tn, sched.packed)[0], t)
                            for p, c in zip((1, 2, 4, 8), per_level) for t in range(c)]
                tiles_of += [(int(tile_level[b, h, i, t]) & 15, int(tile_level[b, h, i, t]) >> schedule.SUB_SHIFT,
                              int(tile_seg[b, h, i, t]), None) for t in range(max_masked - nmasked, max_masked)]
                seen, tiles = [], []
                for p, sub, first, regular_index in tiles_of:
                    regular = regular_index is not None
                    assert p in (1, 2, 4, 8), p
                    seg_len = n // p
                    slots, split = schedule.level_split(n, p, tn, sched.packed)
                    assert sub < split, (p, sub, split)
                    empty = slots * seg_len < tn
                    blocks = []
                    for s_ in range(slots):
                        seg = int(segs[b, h, i, first + s_])
                        if seg < 0:
                            empty = True
                            continue
                        off = seg - pyr.base[p]
                        assert 0 <= off < nkb * seg_len and off % seg_len == 0, (p, seg)
                        blocks.append(off // seg_len)
                    if regular:
                        t = regular_index
                        assert tail not in blocks, f"regular tile {t} of level {p}, row {(b, h, i)} holds the partial last block"
                        # the kernel's real columns of this tile: blocks_p * seg_len - t * tile_n
                        cols = rec[f"blocks{p}"] * seg_len - t * tn
                        assert cols > 0, (b, h, i, p, t)
                        filled = min(cols, tn) // seg_len if split == 1 else 1
                        real = [int(segs[b, h, i, first + s_]) >= 0 for s_ in range(slots)]
                        assert real == [s_ < filled for s_ in range(slots)], (b, h, i, p, t, real, cols)
                        if empty:
                            assert sched.folded and sched.packed and slots > 1, \
                                f"regular tile {t} of level {p}, row {(b, h, i)} has empty columns"
                            assert t == per_level[(1, 2, 4, 8).index(p)] - 1, (b, h, i, p, t)
                    seen += [(p, j, sub) for j in blocks]
                    tiles.append(p)
                out[b, h, i] = seen, tiles
    return out


@pytest.mark.parametrize("n,tile_n", [(16, None), (32, None), (64, None), (128, None), (128, 32), (64, 16)])
@pytest.mark.parametrize("packed,fold", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("partial_tail", [True, False])
def test_schedule_visits_every_selected_block_once(n, tile_n, packed, fold, partial_tail, device):
    nkb, nqb = 37, 5
    L = nkb * n - (n // 2 if partial_tail else 0)
    k = torch.zeros(1, 2, L, 16, device=device)
    pyr = pyramid.build_pyramid(k, k, n, L)
    levels = _random_levels(1, 2, nqb, nkb, seed=n)
    levels[0, 1, 4] = 0
    levels[0, 1, 4, 36] = 8  # a row with one block, the last
    sched = schedule.build_schedule(levels.to(device), pyr, packed=packed, tile_n=tile_n, fold=fold)
    tile_n = sched.tile_n
    assert sched.packed is packed and sched.folded is fold
    for (b, h, i), (seen, tiles) in _decode_schedule(sched, pyr, nkb, L).items():
        # every selected block once, each of its sub-tiles once when it is wider than a tile
        want = sorted((int(p), j, sub) for j, p in enumerate(levels[b, h, i].tolist()) if p != 0
                      for sub in range(schedule.level_split(n, int(p), tile_n, packed)[1]))
        assert sorted(seen) == want, (b, h, i)
        assert len(seen) == len(set(seen))
        counts = sched.counts[b, h, i].tolist()
        for p in (1, 2, 4, 8):
            cnt = int((levels[b, h, i] == p).sum())
            assert counts[schedule.COUNT_FIELDS.index(f"blocks{p}")] == cnt, (b, h, i, p)
            # packing fills tiles: at most one partly filled tile per level and row
            per_tile, split = schedule.level_split(n, p, tile_n, packed)
            assert tiles.count(p) == -(-cnt // per_tile) * split, (p, cnt, tiles)


# ----------------------------------------------------------------------------- dense equivalence

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["topk", "thresholdbound"])
@pytest.mark.parametrize("text_len,text_first", [(0, False), (7, False), (7, True)])
def test_all_full_resolution_equals_dense(backend, mode, text_len, text_first, device):
    grid = (3, 5, 7)
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, batch=2, text_len=text_len,
                             text_first=text_first, seed=text_len + len(mode), device=device)
    cfg = _cfg(ALL_FULL, mode, m=32, n=16, use_sim_mask=True)
    out = psa_attention(q, k, v, cfg, grid, text_len=text_len, text_first=text_first, backend=backend)
    # the dense result in the caller's order, computed without any layout
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    tol = KERNEL_REL_L2 if backend == "triton" and ON_CUDA else 1e-5
    assert relative_l2(out, ref) < tol
    assert float((out.double() - ref).abs().max()) < (KERNEL_TOL["atol"] if backend == "triton" else 1e-5)


def test_all_full_resolution_float64_equals_dense():
    grid = (2, 3, 5)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, text_len=3, text_first=True,
                             dtype=torch.float64, seed=9)
    out = psa_attention(q, k, v, _cfg(ALL_FULL, "topk"), grid, text_len=3, text_first=True, backend="torch")
    assert out.dtype == torch.float64
    ref = F.scaled_dot_product_attention(q, k, v)
    assert float((out - ref).abs().max()) < 1e-5


def test_dense_preset_returns_sdpa_exactly(device):
    grid = (3, 5, 7)
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, batch=2, text_len=7, seed=4, device=device)
    cfg = PSAConfig.from_dict({"type": "dense", "description": "full attention", "mask_mode": "topk"})
    out, stats = psa_attention(q, k, v, cfg, grid, text_len=7, return_stats=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert stats.density == 1.0


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("n,packed", [(16, True), (32, True), (64, False)])
def test_memory_per_head_is_what_the_pyramid_and_schedule_take(n, packed, device):
    B, H, L, D, m = 2, 1, 301, 32, 32
    k = torch.randn(B, H, L, D, device=device)
    pyr, _ = pyramid.build_pyramid_triton(k, k, n, L)
    levels = _random_levels(B, H, -(-L // m), -(-L // n), seed=n).to(device)
    sched = schedule.build_schedule(levels, pyr, packed=packed)
    taken = sum(t.numel() * t.element_size() for t in (pyr.k, pyr.v, sched.segs, sched.tile_level,
                                                       sched.tile_seg, sched.counts))
    assert attention.attention_bytes_per_head(B, L, D, k.element_size(), m, n, packed) == taken


def test_heads_per_pass_follow_free_memory():
    from psa_kernels.api import heads_that_fit
    assert heads_that_fit(12, 100, 10_000) == 12  # room for all: one pass
    assert heads_that_fit(12, 100, 500) == 4      # 90% of 500 holds 4 heads
    assert heads_that_fit(12, 100, 50) == 1       # never fewer than one


class CudaLike:
    """The attributes of q that api._passes reads: 480p x 12 heads, bf16, on a GPU."""
    shape, is_cuda, device = (1, 12, 32760, 128), True, "cuda:0"

    def element_size(self):
        return 2


def test_default_heads_per_pass_reads_the_allocator_then_the_driver(monkeypatch):
    """psa_attention's default: the allocator's cached free bytes first; the driver's free
    memory is asked for only when the cache cannot hold all heads with level 1 copied. Short of
    that, level 1 is read in place, all heads at once if they fit, else as many as fit."""
    from psa_kernels import api

    cfg = _cfg({1: [0, .1], 0: [.1, 1]}, "topk", m=128, n=64, use_pooled_tail=True)
    copy, in_place = api.bytes_per_head(CudaLike(), cfg, False), api.bytes_per_head(CudaLike(), cfg, True)
    assert in_place < copy / 2
    cached, driver, driver_free = [12 * copy * 2], [0], [0]

    def stats(device):
        return {"reserved_bytes": {"all": {"current": cached[0] + 1000}},
                "allocated_bytes": {"all": {"current": 1000}}}

    def mem_get_info(device):
        driver[0] += 1
        return driver_free[0], 80 << 30

    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", stats)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert api._passes(CudaLike(), cfg) == (12, False) and driver[0] == 0
    cached[0], driver_free[0] = 2 * copy, 9 * copy  # 11 heads' worth with the driver's, 90% of it holds 9
    assert api._passes(CudaLike(), cfg) == (12, True) and driver[0] == 1
    cached[0], driver_free[0] = 2 * in_place, 3 * in_place  # 5 in-place heads' worth: 90% holds 4
    assert api._passes(CudaLike(), cfg) == (4, True) and driver[0] == 2


def test_a_sparse_level1_is_read_in_place_when_memory_holds_a_copy(monkeypatch):
    """Presets routing level 1 to at most IN_PLACE_LEVEL1_SHARE of the key blocks (topk) read it
    in place even with memory to spare; denser ones and thresholdbound ones copy it."""
    from psa_kernels import api

    plenty = 1 << 40
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device: {
        "reserved_bytes": {"all": {"current": plenty}}, "allocated_bytes": {"all": {"current": 0}}})
    at = api.IN_PLACE_LEVEL1_SHARE
    for share, mode, in_place in ((at, "topk", True), (at / 4, "topk", True), (at + 0.01, "topk", False),
                                  (at / 4, "thresholdbound", False)):
        cfg = _cfg({1: [0, share], 0: [share, 1]}, mode, m=128, n=128, use_pooled_tail=True)
        assert (cfg.level1_block_share is None) == (mode == "thresholdbound")
        assert api.reads_level1_in_place(cfg) == in_place
        assert api._passes(CudaLike(), cfg) == (12, in_place), (share, mode)


@pytest.mark.parametrize("use_sim_mask", [False, True])
@pytest.mark.parametrize("heads_per_pass", [1, 2])
def test_heads_in_passes_give_the_same_output(use_sim_mask, heads_per_pass, device):
    # passes only change which heads' pyramid and schedule exist at one time, never the result
    if not ON_CUDA and not INTERPRETER:
        pytest.skip("the Triton path needs CUDA or the interpreter")
    grid = (3, 5, 7)
    q, k, v = structured_qkv(grid, heads=3, head_dim=32, batch=2, text_len=5, seed=heads_per_pass, device=device)
    cfg = _cfg(TOPK, "topk", m=32, n=16, use_sim_mask=use_sim_mask, sim_thresholds={"x2": 0.9, "x4": 0.8, "x8": 0.7})
    whole, st_whole = psa_attention(q, k, v, cfg, grid, 5, backend="triton", return_stats=True)
    out, st = psa_attention(q, k, v, cfg, grid, 5, backend="triton", return_stats=True, heads_per_pass=heads_per_pass)
    assert not torch.isnan(out).any()
    assert torch.equal(out, whole)
    assert st.level_counts == st_whole.level_counts and {2, 4, 8} & {p for p, c in st.level_counts.items() if c}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("text_first", [False, True])
def test_psa_attention_matches_hand_computation(backend, text_first, device):
    grid, text_len, m, n = (3, 5, 7), 7, 32, 16
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, batch=2, text_len=text_len,
                             text_first=text_first, seed=21 + text_first, device=device)
    cfg = _cfg(TOPK, "topk", m=m, n=n)
    plan = psa_plan(q, k, cfg, grid, text_len, text_first, backend=backend, v=v)
    L, video_len = q.shape[2], q.shape[2] - text_len
    assert plan.video_len == video_len
    perm = plan.perm.cpu()
    assert sorted(perm.tolist()) == list(range(L))
    text_pos = list(range(text_len)) if text_first else list(range(video_len, L))
    assert perm[video_len:].tolist() == text_pos  # text tokens after the video, in order
    assert {2, 4, 8} & set(plan.levels.unique().tolist()), "the case must exercise pooled levels"

    out = psa_attention(q, k, v, cfg, grid, text_len, text_first, backend=backend)
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    arranged = _pyramid_by_hand(qc[:, :, perm], kc[:, :, perm], vc[:, :, perm], plan.levels, m, n)
    expected = torch.empty_like(arranged)
    expected[:, :, perm] = arranged  # back to the caller's order
    _close(out, expected, **(KERNEL_TOL if backend == "triton" else dict(atol=1e-5, rtol=1e-5)))
    # text queries attend to everything at full resolution: their rows are dense attention
    dense = F.scaled_dot_product_attention(qc.double(), kc.double(), vc.double())
    _close(out[:, :, text_pos], dense[:, :, text_pos],
           **(KERNEL_TOL if backend == "triton" else dict(atol=1e-5, rtol=1e-5)))
    # and the sparse rows are not
    assert relative_l2(out.cpu(), dense) > 1e-3


API_CASES = [  # seed, grid, text_len, text_first, D, mode, use_sim_mask, attn_impl, (m, n)
    (0, (2, 3, 5), 0, False, 64, "topk", False, "new_mask_type", (16, 16)),
    (1, (3, 5, 7), 0, False, 64, "thresholdbound", False, "new_mask_type", (16, 16)),
    (2, (3, 5, 7), 7, False, 64, "topk", True, "old_mask_type", (16, 16)),
    (3, (3, 5, 7), 7, True, 128, "thresholdbound", True, "new_mask_type", (16, 16)),
    (4, (3, 5, 7), 0, False, 128, "topk", False, "old_mask_type", (32, 16)),
    (5, (3, 5, 7), 7, True, 64, "thresholdbound", False, "old_mask_type", (32, 16)),
    (6, (3, 5, 7), 7, False, 128, "topk", True, "new_mask_type", (32, 16)),
    (7, (2, 3, 5), 7, True, 64, "thresholdbound", True, "new_mask_type", (32, 16)),
    (8, (3, 5, 7), 0, False, 64, "topk", True, "new_mask_type", (64, 32)),
    (9, (3, 5, 7), 7, True, 128, "thresholdbound", False, "new_mask_type", (64, 32)),
    (10, (3, 5, 7), 7, False, 64, "thresholdbound", True, "old_mask_type", (64, 32)),
    (11, (2, 3, 5), 0, False, 128, "topk", False, "old_mask_type", (64, 32)),
    # a key block fills a kernel tile (n >= 64): level-1 tiles take the contiguous path
    (12, (3, 8, 11), 5, False, 64, "topk", True, "new_mask_type", (64, 64)),
    (13, (4, 8, 12), 0, False, 64, "thresholdbound", False, "old_mask_type", (128, 128)),
]


def _api_case(seed, grid, text_len, text_first, D, mode, sim, impl, mn, device):
    q, k, v = structured_qkv(grid, heads=2, head_dim=D, batch=2, text_len=text_len,
                             text_first=text_first, seed=seed, device=device)
    cfg = _cfg(TOPK if mode == "topk" else THRESHOLD, mode, m=mn[0], n=mn[1],
               use_sim_mask=sim, attn_impl=impl)
    return q, k, v, cfg


@pytest.mark.parametrize("seed,grid,text_len,text_first,D,mode,sim,impl,mn", API_CASES)
def test_triton_backend_matches_torch_backend(seed, grid, text_len, text_first, D, mode, sim, impl, mn, device):
    q, k, v, cfg = _api_case(seed, grid, text_len, text_first, D, mode, sim, impl, mn, device)
    out_t, st_t = psa_attention(q, k, v, cfg, grid, text_len, text_first, return_stats=True, backend="triton")
    out_r, st_r = psa_attention(q, k, v, cfg, grid, text_len, text_first, return_stats=True, backend="torch")
    assert out_t.shape == q.shape and out_t.dtype == q.dtype
    assert torch.isfinite(out_t).all()
    assert st_t.level_counts == st_r.level_counts
    err = relative_l2(out_t, out_r)
    assert err < KERNEL_REL_L2, f"rel L2 {err:.2e}"


def test_api_cases_exercise_every_level(device):
    # Across the API cases every pyramid level is used, so the comparison above covers them.
    seen = set()
    for case in API_CASES:
        q, k, v, cfg = _api_case(*case, device)
        grid, text_len, text_first = case[1], case[2], case[3]
        seen |= set(psa_plan(q, k, cfg, grid, text_len, text_first, backend="torch").levels.unique().tolist())
    assert seen == {0, 1, 2, 4, 8}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_plan_reuse_gives_the_same_output(backend, device):
    grid, text_len = (3, 5, 7), 7
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, batch=2, text_len=text_len, seed=23, device=device)
    cfg = _cfg(TOPK, "topk", m=32, n=16, use_sim_mask=True)
    direct = psa_attention(q, k, v, cfg, grid, text_len, backend=backend)
    with_v = psa_plan(q, k, cfg, grid, text_len, backend=backend, v=v)
    torch.testing.assert_close(psa_attention(q, k, v, cfg, grid, text_len, backend=backend, plan=with_v),
                               direct, atol=0, rtol=0)
    # v is optional for psa_plan; the plan must still serve psa_attention(q, k, v)
    without_v = psa_plan(q, k, cfg, grid, text_len, backend=backend)
    assert torch.equal(without_v.levels, with_v.levels)
    reused = psa_attention(q, k, v, cfg, grid, text_len, backend=backend, plan=without_v)
    err = relative_l2(reused, direct)
    assert err < 1e-6, f"plan made without v: rel L2 {err:.3g} against the direct call"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(backend, dtype, device):
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETER:
        pytest.skip("TRITON INTERPRETER CANNOT RUN bfloat16 tl.dot (it multiplies the raw bit patterns, "
                    "triton-lang/triton#11584): bf16 Triton kernels are checked by test_psa_gpu.py on CUDA")
    grid, text_len = (3, 5, 7), 7
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, text_len=text_len, seed=13, device=device)
    cfg = _cfg(THRESHOLD, "thresholdbound", m=32, n=16)
    ref = psa_attention(q, k, v, cfg, grid, text_len, backend="torch")
    out = psa_attention(q.to(dtype), k.to(dtype), v.to(dtype), cfg, grid, text_len, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert relative_l2(out, ref) < 3e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_report_density_of_the_plan(backend, device):
    grid, text_len = (3, 5, 7), 7
    q, k, v = structured_qkv(grid, heads=2, head_dim=32, batch=2, text_len=text_len, seed=17, device=device)
    cfg = _cfg(TOPK, "topk", m=32, n=16)
    out, stats = psa_attention(q, k, v, cfg, grid, text_len, return_stats=True, backend=backend)
    plan = psa_plan(q, k, cfg, grid, text_len, backend=backend, v=v)
    lv = plan.levels
    B, H, nqb, nkb = lv.shape
    assert (nqb, nkb) == (-(-q.shape[2] // 32), -(-q.shape[2] // 16))
    assert 0.0 < stats.density <= 1.0
    assert stats.density < 1.0  # this preset skips and pools blocks
    assert abs(stats.density - float(levels_mod.density(lv).mean())) < 1e-6
    # density by its definition, from the level map
    flat = lv.flatten().tolist()
    assert abs(stats.density - sum(1.0 / p for p in flat if p > 0) / len(flat)) < 1e-5
    assert stats.density_per_head.shape == (H,)
    assert stats.level_counts == {p: flat.count(p) for p in (1, 2, 4, 8, 0)}
    assert sum(stats.level_counts.values()) == B * H * nqb * nkb
    # reusing the plan gives the same output
    assert torch.equal(psa_attention(q, k, v, cfg, grid, text_len, backend=backend, plan=plan), out)


def test_bad_inputs_raise_value_error():
    grid = (2, 3, 5)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, text_len=3, seed=1)
    cfg = _cfg(TOPK, "topk")
    with pytest.raises(ValueError, match="one shape"):
        psa_attention(q, k[:, :, :-1], v, cfg, grid, text_len=3)
    with pytest.raises(ValueError, match=r"\[B, H, L, D\]"):
        psa_attention(q[0], k[0], v[0], cfg, grid, text_len=3)
    with pytest.raises(ValueError, match=r"T\*H\*W"):
        psa_attention(q, k, v, cfg, grid, text_len=0)
    with pytest.raises(ValueError, match=r"T\*H\*W"):
        psa_attention(q, k, v, cfg, (2, 3, 6), text_len=3)
    with pytest.raises(ValueError, match=r"T\*H\*W"):
        psa_attention(q, k, v, cfg, grid, text_len=-1)
    with pytest.raises(ValueError, match="grid"):
        psa_attention(q, k, v, cfg, (2, 3), text_len=3)
    with pytest.raises(ValueError, match="grid"):
        psa_attention(q, k, v, cfg, (0, 3, 5), text_len=3)
    with pytest.raises(ValueError, match="backend"):
        psa_attention(q, k, v, cfg, grid, text_len=3, backend="cuda")
    with pytest.raises(ValueError, match=r"T\*H\*W"):
        psa_plan(q, k, cfg, (3, 3, 5), text_len=3)
    # a dense preset checks the shapes too
    with pytest.raises(ValueError, match=r"T\*H\*W"):
        psa_attention(q, k, v, PSAConfig.from_dict({"type": "dense"}), (2, 3, 6), text_len=3)
    assert issubclass(ConfigError, ValueError)


def test_psa_attention_under_torch_compile_matches_eager():
    # A compiled model calls PSA inside its forward: the call stays out of the graph and
    # gives the eager result.
    grid = (2, 3, 5)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=9)
    cfg = _cfg(TOPK, "topk", m=16, n=16)
    proj = torch.nn.Linear(16, 16)

    def block(x):
        return proj(psa_attention(x, k, v, cfg, grid, backend="torch")) + x

    compiled = torch.compile(block, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(q), block(q))


def test_schedule_refuses_rows_past_its_counters():
    # the schedule ranks blocks in 16-bit fields: a row of 2**16 key blocks is refused by name
    levels = torch.ones(1, 1, 1, 1 << 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="key blocks in a row; allowed: fewer than 65536"):
        schedule.build_schedule(levels, None, packed=True)
