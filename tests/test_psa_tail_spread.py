"""The tail's spread correction (``tail_correction: variance``, psa_kernels/tail_spread.py): each
skipped key block's tail logit gains s^2 / 2 * mean_I(q^2) . var_J(k). The block statistics
against float64 sums by hand; the Triton kernel (interpreter on CPU) and the torch reference
against the attention written out by hand with that bias; the public API: no change where
blocks have no spread, lower error against dense on diffuse inputs, one pass = head passes."""
import math

import pytest
import torch

from psa_kernels import PSAConfig, psa_attention, psa_plan
from psa_kernels import attention, pyramid, schedule
from psa_kernels.errors import ConfigError
from psa_kernels.estimate import block_means_reference, block_means_triton, estimate_block_mean, scores_from_means
from psa_kernels.heavy import HeavyKeys
from psa_kernels.layout import arrange, sequence_permutation
from psa_kernels.synthetic import calibrate_logit_scale, relative_l2, structured_qkv, video_attention_qkv
from psa_kernels.tail_spread import block_moments, key_block_variance, spread_from_moments, tail_spread_bias
from test_psa_attention import KERNEL_TOL, _close, _random_levels


def _variance_by_hand(k, n, heavy_sets=None):
    """[B, H, nkb, D] float64 population variance of each block's real keys, heavy ones left out."""
    B, H, L, D = k.shape
    nkb = -(-L // n)
    out = torch.zeros(B, H, nkb, D, dtype=torch.float64)
    kd = k.cpu().double()
    for b in range(B):
        for h in range(H):
            heavy = set(heavy_sets[b][h]) if heavy_sets else set()
            for j in range(nkb):
                rows = [t for t in range(j * n, min(L, (j + 1) * n)) if t not in heavy]
                if rows:
                    x = kd[b, h, rows]
                    out[b, h, j] = (x * x).mean(0) - x.mean(0) ** 2
    return out


def _spread_by_hand(q, k, m, n, heavy_sets=None):
    B, H, L, D = q.shape
    nqb = -(-L // m)
    qd = q.cpu().double()
    q2 = torch.stack([(qd[:, :, i * m:(i + 1) * m] ** 2).mean(2) for i in range(nqb)], 2)
    return q2 @ _variance_by_hand(k, n, heavy_sets).transpose(-1, -2) * (0.5 / D)


def _attention_by_hand(q, k, v, levels, m, n, spread, heavy_sets=None):
    """Float64 from the definition: level 1 the block's real keys; level 0 each heavy key on its
    own and the mean of the block's other real keys with bias ln(count) + spread[i, j]."""
    B, H, L, D = q.shape
    nqb, nkb = levels.shape[-2:]
    qd, kd, vd = q.cpu().double(), k.cpu().double(), v.cpu().double()
    out = torch.empty(B, H, L, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            heavy = set(heavy_sets[b][h]) if heavy_sets else set()
            for i in range(nqb):
                keys, vals, bias = [], [], []
                for j in range(nkb):
                    block = list(range(j * n, min(L, (j + 1) * n)))
                    if int(levels[b, h, i, j]) == 1:
                        groups = [([t], 0.0) for t in block]
                    else:
                        rest = [t for t in block if t not in heavy]
                        groups = [([t], 0.0) for t in block if t in heavy]
                        if rest:
                            groups.append((rest, float(spread[b, h, i, j])))
                    for idx, extra in groups:
                        keys.append(kd[b, h, idx].mean(0))
                        vals.append(vd[b, h, idx].mean(0))
                        bias.append(math.log(len(idx)) + extra)
                rows = slice(i * m, min(L, (i + 1) * m))
                logits = qd[b, h, rows] @ torch.stack(keys).T / math.sqrt(D) + torch.tensor(bias, dtype=torch.float64)
                out[b, h, rows] = logits.softmax(-1) @ torch.stack(vals)
    return out


def _level1_or_0(seed, B, H, nqb, nkb, device):
    lv = _random_levels(B, H, nqb, nkb, seed)
    lv = torch.where(lv == 0, lv, torch.ones_like(lv))
    assert int((lv == 0).sum()) > 0 and int((lv == 1).sum()) > 0
    return lv.to(device)


# ----------------------------------------------------------------------------- block statistics

@pytest.mark.parametrize("block,L", [(16, 70), (32, 64)])
def test_block_means_of_squares(block, L, device):
    x = structured_qkv((1, 1, L), heads=2, head_dim=16, seed=L, device=device)[1]
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3)).to(device)
    want = block_means_reference(arrange(x, perm), block, square=True)
    xa = arrange(x, perm).cpu().double()
    nb = -(-L // block)
    by_hand = torch.stack([(xa[:, :, j * block:(j + 1) * block] ** 2).mean(2) for j in range(nb)], 2)
    _close(want, by_hand, atol=1e-5, rtol=1e-5)
    mean, mean_sq = block_means_triton(x, block, perm.to(torch.int32), second="squares")
    _close(mean, block_means_reference(arrange(x, perm), block), atol=1e-5, rtol=1e-5)
    _close(mean_sq, want, atol=1e-5, rtol=1e-5)
    _close(block_means_triton(x, block, perm, second="squares", squares_scale=0.25)[1], 0.25 * want,
           atol=1e-6, rtol=1e-5)
    mean_v, var = block_means_triton(x, block, perm, second="variance")
    _close(mean_v, mean, atol=1e-6, rtol=1e-5)
    _close(var, (mean_sq - mean * mean).clamp_min(0.0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("with_heavy", [False, True])
def test_key_block_variance_and_spread_by_hand(with_heavy, device):
    L, m, n, D = 45, 16, 8, 16  # the last key block has 5 real keys
    q, k, _ = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=7, device=device)
    heavy = heavy_sets = None
    if with_heavy:
        # block 1 loses two keys, the partial last block one, head (1, 1) a whole block
        sets = [[[9, 12, 41], [0, 3, 44]], [[8, 9, 10], [16, 17, 18, 19, 20, 21, 22, 23][:3]]]
        index = torch.tensor(sets, device=device)
        heavy, heavy_sets = HeavyKeys(index, (index // n).to(torch.int32)), sets
    want_var = _variance_by_hand(k, n, heavy_sets)
    for use_triton in (False, True):
        _close(key_block_variance(k, n, heavy=heavy, use_triton=use_triton), want_var, atol=1e-5, rtol=1e-4)
        _close(tail_spread_bias(q, k, m, n, heavy=heavy, use_triton=use_triton),
               _spread_by_hand(q, k, m, n, heavy_sets), atol=1e-5, rtol=1e-4)


def _heavy_in_caller_order(L, n, inv, count, seed, B=1, H=2):
    """Random heavy keys: positions in the caller's order, blocks in the arranged order; the
    same keys with arranged positions for the torch reference."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.stack([torch.randperm(L, generator=g)[:count] for _ in range(H)])
                         for _ in range(B)]).to(inv.device)
    arranged = inv.long()[index]
    block = (arranged // n).to(torch.int32)
    return HeavyKeys(index, block), HeavyKeys(arranged, block)


@pytest.mark.parametrize("count", [0, 5, 40])
def test_block_moments_through_the_arranged_order(count, device):
    # one pass over q and one over k, read through the arranged order, give the block means of
    # the estimate and the spread's moments; heavy keys (given in the caller's order) leave the
    # key variances only. count 40: several heavy keys share blocks, one chunk scan of 32 is not enough.
    grid, m, n, D = (3, 6, 10), 32, 16, 16
    L = 3 * 6 * 10 + 7  # a partial last block
    q, k, _ = structured_qkv((1, 1, L), heads=2, head_dim=D, batch=2, seed=count + 3, device=device)
    perm, inv = sequence_permutation(grid, 7, False, "Tiled", (1, 2, 5), True, q.device)
    heavy = arranged_heavy = None
    if count:
        heavy, arranged_heavy = _heavy_in_caller_order(L, n, inv, count, seed=count, B=2)
    qa, ka = arrange(q, perm), arrange(k, perm)
    mom = block_moments(q, k, m, n, perm, heavy)
    _close(mom.q_mean, block_means_reference(qa, m), atol=1e-5, rtol=1e-5)
    _close(mom.q_sq, block_means_reference(qa, m, square=True) * (0.5 / D), atol=1e-6, rtol=1e-5)
    _close(mom.k_mean, block_means_reference(ka, n), atol=1e-5, rtol=1e-5)  # every key, heavy ones too
    want_var = key_block_variance(ka, n, heavy=arranged_heavy, use_triton=False)
    _close(mom.k_var, want_var, atol=1e-5, rtol=1e-4)
    _close(key_block_variance(k, n, perm, heavy), want_var, atol=1e-5, rtol=1e-4)
    _close(spread_from_moments(mom), tail_spread_bias(qa, ka, m, n, heavy=arranged_heavy, use_triton=False),
           atol=1e-5, rtol=1e-4)
    _close(scores_from_means(mom.q_mean, mom.k_mean, L, n), estimate_block_mean(q, k, m, n, perm),
           atol=1e-6, rtol=1e-5)
    if count:  # the variances do move: the heavy keys are not a no-op
        assert float((mom.k_var - key_block_variance(ka, n, use_triton=False)).abs().max()) > 1e-3


def test_heavy_keys_leave_only_the_variances(device):
    k = structured_qkv((1, 1, 64), heads=1, head_dim=16, seed=2, device=device)[1]
    heavy = HeavyKeys(torch.tensor([[[3]]], device=device), torch.tensor([[[0]]], device=device, dtype=torch.int32))
    for second in ("", "squares"):
        with pytest.raises(ValueError, match="second='variance'"):
            block_means_triton(k, 16, second=second, heavy=heavy)


@pytest.mark.parametrize("estimate_method", ["block_mean", "sampled"])
def test_plan_routes_the_same_with_the_correction(estimate_method, device):
    # the block-mean estimate takes its means from the correction's pass: the scores and the
    # level map must not change with tail_correction, and the spread must be the reference's
    grid = (2, 8, 16)
    q, k, _ = structured_qkv(grid, heads=3, head_dim=16, seed=9, device=device)
    kw = {"heavy_keys": 6, "estimate_method": estimate_method}
    with_spread = psa_plan(q, k, _cfg("variance", **kw), grid, backend="triton")
    without = psa_plan(q, k, _cfg("none", **kw), grid, backend="triton")
    _close(with_spread.scores, without.scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(with_spread.levels, without.levels)
    assert without.tail_spread is None
    ref = psa_plan(q, k, _cfg("variance", **kw), grid, backend="torch")
    _close(with_spread.tail_spread, ref.tail_spread, atol=1e-5, rtol=1e-4)


def test_a_block_of_only_heavy_keys_has_no_spread(device):
    L, n = 32, 8
    k = structured_qkv((1, 1, L), heads=1, head_dim=16, seed=2, device=device)[1]
    index = torch.arange(8, 16, device=device).view(1, 1, 8)  # every key of block 1
    var = key_block_variance(k, n, heavy=HeavyKeys(index, (index // n).to(torch.int32)), use_triton=False)
    assert torch.all(var[0, 0, 1] == 0) and torch.all(var[0, 0, 0] > 0)


# ----------------------------------------------------------------------------- kernel and reference

@pytest.mark.parametrize("n,m,L", [(16, 32, 101), (32, 64, 330), (16, 16, 64)])
@pytest.mark.parametrize("with_heavy", [False, True])
def test_kernel_and_reference_by_hand(n, m, L, with_heavy, device):
    D = 16
    q, k, v = structured_qkv((1, 1, L), heads=2, head_dim=D, seed=L + n, device=device)
    nqb, nkb = -(-L // m), -(-L // n)
    levels = _level1_or_0(n + m, 1, 2, nqb, nkb, device)
    heavy = heavy_sets = None
    if with_heavy:
        g = torch.Generator().manual_seed(L)
        index = torch.stack([torch.randperm(L, generator=g)[:5] for _ in range(2)])[None].to(device)
        heavy, heavy_sets = HeavyKeys(index, (index // n).to(torch.int32)), index.cpu().tolist()
    spread = tail_spread_bias(q, k, m, n, heavy=heavy, use_triton=False)
    assert float(spread.max()) > 1e-3, "the inputs must have some spread to correct"
    expected = _attention_by_hand(q, k, v, levels, m, n, spread.cpu().double(), heavy_sets)
    ref_pyr = pyramid.build_pyramid(k, v, n, L, tail=True, heavy=heavy)
    _close(attention.attention_reference(q, ref_pyr, levels, m, tail_spread=spread), expected, atol=1e-5, rtol=1e-5)
    for level1 in (True, False):  # level 1 copied and read in place
        pyr, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True, heavy=heavy, level1=level1, pooled=False)
        out = torch.full_like(q, float("nan"))
        sched = schedule.build_schedule(levels, pyr, packed=True, tail_spread=spread)
        attention.attention_triton(q, pyr, sched, m, out=out)
        assert not torch.isnan(out).any(), "kernel left rows unwritten"
        _close(out, expected, **KERNEL_TOL)


def test_spread_needs_a_tail_and_its_shape(device):
    L, m, n = 64, 16, 16
    q, k, v = structured_qkv((1, 1, L), heads=1, head_dim=16, seed=1, device=device)
    levels = torch.ones(1, 1, L // m, L // n, dtype=torch.int8, device=device)
    levels[..., 0, -1] = 0
    spread = torch.zeros(1, 1, L // m, L // n, device=device)
    no_tail, _ = pyramid.build_pyramid_triton(k, v, n, L)
    with pytest.raises(ValueError, match="tail_spread"):
        schedule.build_schedule(levels, no_tail, packed=True, tail_spread=spread)
    tail, _ = pyramid.build_pyramid_triton(k, v, n, L, tail=True)
    with pytest.raises(ValueError, match=r"tail_spread: got \(1, 1, 4, 3\)"):
        schedule.build_schedule(levels, tail, packed=True, tail_spread=spread[..., :3])
    with pytest.raises(ValueError, match="tail_spread needs a pyramid with a tail"):
        attention.attention_reference(q, pyramid.build_pyramid(k, v, n, L), levels, m, tail_spread=spread)


# ----------------------------------------------------------------------------- the preset field

def _cfg(correction, **kw) -> PSAConfig:
    return PSAConfig.from_dict({"block_size": {"m": 32, "n": 32, "tile_n": 32}, "mask_mode": "topk",
                                "mask_ratios": {1: [0.0, 0.2], 0: [0.2, 1.0]}, "use_pooled_tail": True,
                                "tail_correction": correction, **kw})


def test_field_is_validated_and_round_trips():
    cfg = _cfg("variance")
    assert cfg.tail_correction == "variance" and PSAConfig.from_dict(cfg.to_dict()) == cfg
    assert PSAConfig().tail_correction == "none"
    assert _cfg("Variance").tail_correction == "variance"  # choices match regardless of case
    for bad in ("var", "second_order", 1, None):
        with pytest.raises(ConfigError, match=r"tail_correction.*allowed: none, variance"):
            _cfg(bad)


def test_no_spread_no_change(device):
    # keys equal within every key block: the correction is zero and the outputs agree
    grid = (2, 8, 8)
    q, k, v = structured_qkv(grid, heads=2, head_dim=16, seed=4, device=device)
    plan = psa_plan(q, k, _cfg("variance"), grid, backend="torch")
    ka = arrange(k, plan.perm)
    means = ka.view(1, 2, -1, 32, 16).mean(3, keepdim=True).expand(1, 2, -1, 32, 16).reshape(ka.shape)
    k_flat = means.index_select(2, plan.inv)
    for backend in ("torch", "triton"):
        plan = psa_plan(q, k_flat, _cfg("variance"), grid, backend=backend)
        assert float(plan.tail_spread.abs().max()) < 1e-5  # float32 rounding of E[k^2] - E[k]^2
        _close(psa_attention(q, k_flat, v, _cfg("variance"), grid, backend=backend),
               psa_attention(q, k_flat, v, _cfg("none"), grid, backend=backend), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heavy_keys", [0, 16])
def test_correction_lowers_the_error_on_diffuse_inputs(heavy_keys, device):
    grid = (4, 16, 16)
    q, k, v = video_attention_qkv(grid, heads=2, head_dim=32, seed=5, device=device)
    s = calibrate_logit_scale(q, k, 0.45, per_head=True)
    q = q * s.to(device).view(1, -1, 1, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    err = {c: relative_l2(psa_attention(q, k, v, _cfg(c, heavy_keys=heavy_keys), grid, backend="torch"), dense)
           for c in ("none", "variance")}
    assert err["variance"] < 0.8 * err["none"], err


def test_passes_of_heads_match_one_pass(device):
    grid = (2, 8, 16)
    q, k, v = structured_qkv(grid, heads=3, head_dim=16, seed=8, device=device)
    cfg = _cfg("variance", heavy_keys=4)
    one = psa_attention(q, k, v, cfg, grid, backend="triton")
    _close(psa_attention(q, k, v, cfg, grid, backend="triton", heads_per_pass=1), one, atol=1e-5, rtol=1e-5)
    _close(one, psa_attention(q, k, v, cfg, grid, backend="torch"), **KERNEL_TOL)
