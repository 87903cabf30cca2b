"""Level 1 read in place (``build_pyramid_triton(level1=False)``): the pyramid buffer holds no
copy of k and v, the attention kernel reads full-resolution key blocks from the caller's
tensors through the arranged order; presets without pooled levels leave those out too.
Kernel (interpreter on CPU) against the definition written out by hand, against the same
kernel over a pyramid that copies level 1, and against the torch reference of the same
pyramid; the buffer's size; the public API's choice of layout."""
import pytest
import torch

from psa_kernels import PSAConfig, api, attention, psa_attention, pyramid, schedule
from psa_kernels.heavy import HeavyKeys
from psa_kernels.layout import arrange
from psa_kernels.synthetic import relative_l2, structured_qkv
from test_psa_attention import HAND_LEVELS, KERNEL_TOL, _close, _pyramid_by_hand, _random_levels
from test_psa_heavy import _by_hand


def _run(q, pyr, levels, m, perm=None, packed=True):
    out = torch.full_like(q, float("nan"))
    sched = schedule.build_schedule(levels, pyr, packed=packed)
    attention.attention_triton(q, pyr, sched, m, out=out, perm=perm)
    assert not torch.isnan(out).any(), "kernel left rows unwritten"
    return out


def _level1_only(levels: torch.Tensor) -> torch.Tensor:
    """The level map with every pooled pair at full resolution: levels 1 and 0 only (no row
    left without keys)."""
    return torch.where(levels == 0, levels, torch.ones_like(levels))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("tail", [False, True])
def test_hand_built_level_map(tail, packed, device):
    L, m, n, D = 37, 16, 16, 16  # the last key block has 5 real keys: a masked level-1 tile
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=51, device=device)
    levels = HAND_LEVELS.to(device)
    expected = _pyramid_by_hand(q, k, v, levels, m, n, tail=tail)
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=tail, level1=False)
    assert pyr.source is not None and pyr.base[2] == 0, "the buffer starts with level 2"
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)
    _close(_run(q, pyr, levels, m, packed=packed), expected, **KERNEL_TOL)
    lean, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=tail, level1=False, pooled=False)
    assert lean.levels_held == (1,)
    one = _level1_only(levels)
    _close(_run(q, lean, one, m, packed=packed), _pyramid_by_hand(q, k, v, one, m, n, tail=tail), **KERNEL_TOL)


@pytest.mark.parametrize("n,m,L,D", [(16, 32, 101, 32), (32, 64, 330, 32), (64, 64, 200, 16), (128, 16, 300, 16)])
@pytest.mark.parametrize("pooled", [True, False])
def test_random_level_maps_through_perm(n, m, L, D, pooled, device):
    # q, k, v in the caller's order; the arranged order through perm
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=L + n, device=device)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(L)).to(device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=n + m).to(device)
    if not pooled:
        levels = _level1_only(levels)
    assert int((levels == 1).sum()) > 0 and int((levels == 0).sum()) > 0
    qa, ka, va = arrange(q, perm), arrange(k, perm), arrange(v, perm)
    for tail in (False, True):
        arranged = _pyramid_by_hand(qa, ka, va, levels, m, n, tail=tail)
        expected = torch.empty_like(arranged)
        expected[:, :, perm.cpu()] = arranged
        copy, _ = pyramid.build_pyramid_triton(k, v, n, L, perm=perm, tail=tail)
        pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, perm=perm, tail=tail, level1=False, pooled=pooled)
        got = _run(q, pyr, levels, m, perm)
        _close(got, expected, **KERNEL_TOL)
        # the same arithmetic as over the copy: only where the rows are read from changes
        _close(got, _run(q, copy, levels, m, perm), atol=1e-6, rtol=1e-6)
        ref = attention.attention_reference(qa, pyr, levels, m)
        _close(ref, arranged, atol=1e-5, rtol=1e-5)
        # the API's int32 arranged order (NOTES.md change 40): the same rows, bit for bit
        narrow = perm.to(torch.int32)
        pyr32, _ = pyramid.build_pyramid_triton(k, v, n, L, perm=narrow, tail=tail, level1=False, pooled=pooled)
        assert torch.equal(_run(q, pyr32, levels, m, narrow), got)


@pytest.mark.parametrize("pooled", [True, False])
def test_heavy_keys_and_tail(pooled, device):
    L, m, n, D, count = 600, 64, 64, 16, 70  # more heavy keys than one 64-row tile
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=17, device=device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=5).to(device)
    if not pooled:
        levels = _level1_only(levels)
    g = torch.Generator().manual_seed(L)
    index = torch.stack([torch.randperm(L, generator=g)[:count] for _ in range(2)])[None].to(device)
    heavy = HeavyKeys(index, (index // n).to(torch.int32))
    expected = _by_hand(q, k, v, levels, m, n, index.cpu().tolist())
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, heavy=heavy, level1=False, pooled=pooled)
    _close(_run(q, pyr, levels, m), expected, **KERNEL_TOL)
    _close(attention.attention_reference(q, pyr, levels, m), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tail,pooled", [(False, True), (True, True), (True, False), (False, False)])
def test_buffer_holds_only_what_the_kernel_reads(tail, pooled, device):
    L, n, D = 200, 32, 16
    k, v = structured_qkv((1, 1, L), heads=3, head_dim=D, seed=2, device=device)[1:]
    full, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=tail)
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=tail, level1=False, pooled=pooled)
    nkb = -(-L // n)
    rows = pyramid.pyramid_rows(nkb, n, tail, level1=False, pooled=pooled)
    assert rows == nkb * n * (6 * pooled + (tail or pooled)) // 8 + tail * nkb  # 2 and 4; 8; the tail
    assert pyr.k.shape[2] == max(rows, 1) and pyr.v.shape == pyr.k.shape
    # what it holds is row for row what the full pyramid holds there
    for p in (2, 4, 8, 0):
        if p in pyr.base:
            size = nkb if p == 0 else nkb * n // p
            a, b = pyr.base[p], full.base[p]
            assert torch.equal(pyr.k[:, :, a:a + size], full.k[:, :, b:b + size])
            assert torch.equal(pyr.v[:, :, a:a + size], full.v[:, :, b:b + size])
            assert torch.equal(pyr.bias[a:a + size], full.bias[b:b + size])
    assert (2 in pyr.base) == pooled and (0 in pyr.base) == tail
    per_head = attention.attention_bytes_per_head(1, L, D, k.element_size(), 64, n, True, tail, False, pooled)
    assert per_head < attention.attention_bytes_per_head(1, L, D, k.element_size(), 64, n, True, tail)


def test_perm_must_be_the_pyramids(device):
    L, n = 100, 16
    q, k, v = structured_qkv((1, 1, L), heads=1, head_dim=16, seed=4, device=device)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(1)).to(device)
    pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, perm=perm, level1=False)
    levels = _random_levels(1, 1, -(-L // 16), -(-L // n), seed=3).to(device)
    sched = schedule.build_schedule(levels, pyr, packed=True)
    with pytest.raises(ValueError, match="perm it was built with"):
        attention.attention_triton(q, pyr, sched, 16, perm=perm.clone())
    with pytest.raises(ValueError, match="perm it was built with"):
        attention.attention_triton(q, pyr, sched, 16)


def _cfg(ratios, **kw) -> PSAConfig:
    return PSAConfig.from_dict({"block_size": {"m": 16, "n": 16, "tile_n": 16}, "mask_mode": "topk",
                                "mask_ratios": ratios, **kw})


def test_layout_follows_the_preset_and_the_strides(device):
    level1 = _cfg({1: [0.0, 0.2], 0: [0.2, 1.0]}, use_pooled_tail=True)
    pooled = _cfg({1: [0.0, 0.1], 2: [0.1, 0.2], 0: [0.2, 1.0]})
    assert not level1.uses_pooled_levels and pooled.uses_pooled_levels
    k = torch.zeros(1, 2, 40, 16, device=device)
    assert api.pyramid_layout(level1, k, torch.zeros_like(k)) == {"tail": True, "level1": True, "pooled": False}
    assert api.pyramid_layout(level1, k, torch.zeros_like(k), in_place=True) == {
        "tail": True, "level1": False, "pooled": False}
    assert api.pyramid_layout(pooled, k, torch.zeros_like(k), True) == {"tail": False, "level1": False, "pooled": True}
    # keys and values of different layouts (values heads-major, keys tokens-major): level 1 copied
    v = torch.zeros(1, 40, 2, 16, device=device).transpose(1, 2)
    assert api.pyramid_layout(level1, k, v, in_place=True)["level1"] is True


def test_api_index_width(device):
    # the kernels get an int32 arranged order when every element offset fits in 32 bits,
    # the torch path and larger tensors keep int64; both orders hold the same positions
    grid = (2, 4, 6)
    cfg = _cfg({1: [0.0, 0.25], 0: [0.25, 1.0]}, use_pooled_tail=True)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=5, device=device)
    wide = api.psa_plan(q, k, cfg, grid, backend="torch")
    narrow = api.psa_plan(q, k, cfg, grid, backend="triton", v=v)
    assert wide.perm.dtype == wide.inv.dtype == torch.int64
    assert narrow.perm.dtype == narrow.inv.dtype == torch.int32
    assert torch.equal(narrow.perm.long(), wide.perm) and torch.equal(narrow.inv.long(), wide.inv)
    assert api._offsets_fit_int32(q, k, v, None)
    big = torch.empty(1, 40, 2 ** 16, 2 ** 10, device="meta")  # offsets up to 2**32 - 1
    assert not api._offsets_fit_int32(q, big)
    assert not api._offsets_fit_int32(big[:, :, :2 ** 10])  # a slice along L keeps the head stride
    assert api._offsets_fit_int32(big[:, :2])


@pytest.mark.parametrize("ratios,tail", [({1: [0.0, 0.25], 0: [0.25, 1.0]}, True),
                                        ({1: [0.0, 0.2], 2: [0.2, 0.4], 8: [0.4, 0.7], 0: [0.7, 1.0]}, True),
                                        ({1: [0.0, 0.3], 0: [0.3, 1.0]}, False)])
def test_api_keys_and_values_of_different_layouts(ratios, tail, device):
    # v with other strides than k: the in-place read (taken with heads in passes) needs one
    # layout, so the pyramid copies level 1 there; every way gives the reference
    grid = (2, 4, 6)
    cfg = _cfg(ratios, use_pooled_tail=tail)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=9, device=device)
    ref = psa_attention(q, k, v, cfg, grid, backend="torch")
    v_other = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert v_other.stride() != k.stride() and torch.equal(v_other, v)
    for vv in (v, v_other):
        for heads_per_pass in (None, 1):
            got = psa_attention(q, k, vv, cfg, grid, backend="triton", heads_per_pass=heads_per_pass)
            _close(got, ref, **KERNEL_TOL)
    assert relative_l2(ref, torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 1e-3


def test_level1_pyramid_schedule_is_smaller_and_drops_pooled_pairs(device):
    # a level-1 pyramid's schedule is sized for level 1 alone; a level map that still holds
    # pooled pairs (not one a preset without pooled levels makes) has them skipped, not
    # written past the schedule's buffers
    L, m, n, D = 330, 64, 32, 16
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=23, device=device)
    levels = _random_levels(1, 2, -(-L // m), -(-L // n), seed=8).to(device)
    assert int(((levels == 2) | (levels == 4) | (levels == 8)).sum()) > 0
    full, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, level1=False)
    lean, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, level1=False, pooled=False)
    big = schedule.build_schedule(levels, full, packed=True)
    small = schedule.build_schedule(levels, lean, packed=True)
    assert small.segs.shape[-1] * 2 <= big.segs.shape[-1] and small.tile_level.shape[-1] * 2 <= big.tile_level.shape[-1]
    skipped = torch.where(levels == 1, levels, torch.zeros_like(levels))
    _close(_run(q, lean, levels, m), _pyramid_by_hand(q, k, v, skipped, m, n, tail=True), **KERNEL_TOL)
