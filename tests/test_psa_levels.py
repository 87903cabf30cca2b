"""Level assignment (topk and thresholdbound), the similarity guard, density, and the block
estimate: each checked against the rule it implements, written out independently here."""
import math

import pytest
import torch

from psa_kernels import estimate, levels as levels_mod
from psa_kernels.config import PSAConfig, SimThresholds
from psa_kernels.layout import arrange
from psa_kernels.levels import (LevelsLaunch, apply_similarity_guard, assign_levels, assign_levels_triton,
                                 density, key_similarity)
from psa_kernels.synthetic import structured_qkv

LEVEL_CLASS = {1: 0, 2: 1, 4: 2, 8: 3, 0: 4}  # finest to coarsest, skipped last

TOPK_RATIOS = [
    {1: [0.0, 0.1], 2: [0.1, 0.15], 4: [0.15, 0.15], 8: [0.15, 0.35], 0: [0.35, 1.0]},  # seed topk
    {1: [0.0, 0.05], 2: [0.05, 0.1], 4: [0.1, 0.15], 8: [0.15, 0.25], 0: [0.25, 1.0]},  # Wan topk
    {1: [0.0, 0.3], 8: [0.3, 0.6], 0: [0.6, 1.0]},                                      # levels absent
    {1: [0.0, 0.5], 2: [0.5, 1.0]},                                                     # nothing skipped
    {1: [0.0, 0.25], 2: [0.25, 0.25], 4: [0.25, 0.25], 8: [0.25, 0.25], 0: [0.25, 1.0]},
]
THRESHOLD_RATIOS = [
    {1: [0.0, 0.4], 2: [0.4, 0.5], 4: [0.5, 0.6], 8: [0.6, 0.8], 0: [0.8, 1.0]},   # seed thresholdbound
    {1: [0.0, 0.5], 2: [0.5, 0.7], 4: [0.7, 0.9], 0: [0.9, 1.0]},                  # seed custom
    {1: [0.0, 0.5], 2: [0.5, 0.6], 4: [0.6, 0.7], 8: [0.7, 0.8], 0: [0.8, 1.0]},   # Wan balanced
    {1: [0.0, 0.15], 2: [0.15, 0.15], 4: [0.15, 0.15], 8: [0.15, 0.6], 0: [0.6, 1.0]},
    {1: [0.0, 0.0], 2: [0.0, 0.7], 0: [0.7, 1.0]},                                  # level 1 only by the minimum
    {1: [0.0, 0.3], 4: [0.3, 1.0]},
]


def _cfg(ratios, mode, **kw) -> PSAConfig:
    return PSAConfig.from_dict({"mask_ratios": ratios, "mask_mode": mode, **kw})


def _random_scores(shape, seed: int, skew: float = 3.0) -> torch.Tensor:
    """Positive block scores, each row summing to 1, with a few dominant blocks."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(shape, generator=g, dtype=torch.float64) ** skew + 1e-4
    return (s / s.sum(-1, keepdim=True)).float()


def _rows(levels: torch.Tensor, scores: torch.Tensor):
    return zip(levels.reshape(-1, levels.shape[-1]).tolist(), scores.reshape(-1, scores.shape[-1]).tolist())


def _assert_monotone(lv_row, s_row):
    """A block with a higher score never gets a coarser level class than a lower-scored one."""
    ranked = sorted(range(len(s_row)), key=lambda j: -s_row[j])
    classes = [LEVEL_CLASS[lv_row[j]] for j in ranked]
    assert classes == sorted(classes), (lv_row, s_row)


@pytest.fixture(params=["torch", "triton"])
def assign(request, device):
    """Level assignment under test: the torch function, or the Triton kernel on ``device``.
    The kernel runs fewer rows (the interpreter sorts slowly); results come back on the CPU."""
    if request.param == "torch":
        return assign_levels

    def run(scores, cfg, text_q=None, text_k=None):
        mv = (lambda t: None if t is None else t.to(device))
        return assign_levels_triton(scores.to(device), cfg, mv(text_q), mv(text_k)).cpu()
    run.rows = (1, 1, 3)
    return run


def _rows_shape(assign, full):
    return getattr(assign, "rows", full)


# ----------------------------------------------------------------------------- topk

@pytest.mark.parametrize("ratios", TOPK_RATIOS)
@pytest.mark.parametrize("nkb", [1, 3, 7, 10, 20, 33, 64, 100])
def test_topk_gives_fixed_shares_of_the_ranking(assign, ratios, nkb):
    scores = _random_scores((*_rows_shape(assign, (2, 3, 4)), nkb), seed=nkb)
    levels = assign(scores, _cfg(ratios, "topk"))
    assert levels.shape == scores.shape and levels.dtype == torch.int8
    expected = {lvl: 0 for lvl in (1, 2, 4, 8, 0)}
    for lvl, (lo, hi) in ratios.items():
        expected[lvl] = math.floor(hi * nkb + 0.5) - math.floor(lo * nkb + 0.5)
    assert sum(expected.values()) == nkb
    if expected[1] + expected[2] + expected[4] + expected[8] == 0:
        # nothing would be kept: the best block of the row becomes level 1
        expected[1], expected[0] = 1, expected[0] - 1
    for lv_row, s_row in _rows(levels, scores):
        got = {lvl: lv_row.count(lvl) for lvl in (1, 2, 4, 8, 0)}
        assert got == expected, (ratios, nkb, lv_row)
        _assert_monotone(lv_row, s_row)


def test_topk_row_never_empty(assign):
    scores = _random_scores((1, 2, 5, 10), seed=3)
    levels = assign(scores, _cfg({1: [0.0, 0.01], 0: [0.01, 1.0]}, "topk"))
    assert ((levels != 0).sum(-1) == 1).all()
    best = scores.argmax(-1, keepdim=True)
    assert (levels.gather(-1, best) == 1).all()


# ----------------------------------------------------------------------------- thresholdbound

def _expected_threshold_row(s_row, ratios, tol=1e-5):
    """Level of each block by the mass ranked before it; None where that mass sits on a bound."""
    nkb = len(s_row)
    total = sum(s_row)
    ranked = sorted(range(nkb), key=lambda j: -s_row[j])
    keep = max(1, math.ceil(0.06 * nkb))
    bounds = sorted({b for lo_hi in ratios.values() for b in lo_hi})
    out = [None] * nkb
    before = 0.0
    for r, j in enumerate(ranked):
        share = before / total
        if r < keep:
            out[j] = 1
        elif all(abs(share - b) > tol for b in bounds):
            for lvl in (1, 2, 4, 8, 0):
                if lvl in ratios:
                    lo, hi = ratios[lvl]
                    if lo <= share and (share < hi or hi >= 1.0):
                        out[j] = lvl
                        break
        before += s_row[j]
    return out


@pytest.mark.parametrize("ratios", THRESHOLD_RATIOS)
@pytest.mark.parametrize("nkb", [1, 2, 5, 16, 17, 40, 100])
def test_thresholdbound_follows_cumulative_mass(assign, ratios, nkb):
    scores = _random_scores((*_rows_shape(assign, (2, 2, 3)), nkb), seed=100 + nkb)
    levels = assign(scores, _cfg(ratios, "thresholdbound"))
    keep = max(1, math.ceil(0.06 * nkb))
    hi1 = ratios[1][1]
    for lv_row, s_row in _rows(levels, scores):
        exp = _expected_threshold_row(s_row, ratios)
        for j, (got, want) in enumerate(zip(lv_row, exp)):
            if want is not None:
                assert got == want, (j, lv_row, exp)
        _assert_monotone(lv_row, s_row)
        # levels absent from mask_ratios, and empty ranges past the minimum, get no blocks
        for lvl in (2, 4, 8, 0):
            if lvl not in ratios or ratios[lvl][0] == ratios[lvl][1]:
                assert lvl not in lv_row, (lvl, lv_row)
        # level 1 covers at least its upper bound of the mass, and at least ~6% of the blocks
        full = [j for j in range(nkb) if lv_row[j] == 1]
        assert len(full) >= keep
        assert sum(s_row[j] for j in full) >= hi1 * sum(s_row) - 1e-5
        assert any(lv != 0 for lv in lv_row)


def test_thresholdbound_ranges_are_half_open(assign):
    # Shares that are exact in binary: a block whose preceding mass equals a range's upper
    # bound belongs to the next range, so level 1 is the shortest prefix reaching its bound.
    ratios = {1: [0.0, 0.5], 2: [0.5, 0.75], 0: [0.75, 1.0]}
    scores = torch.tensor([0.125, 0.5, 0.125, 0.25]).reshape(1, 1, 1, 4)
    levels = assign(scores, _cfg(ratios, "thresholdbound"))
    assert levels.flatten().tolist() == [0, 1, 0, 2]
    # a range reaching 1.0 is closed there
    scores = torch.tensor([0.25, 0.25, 0.25, 0.25]).reshape(1, 1, 1, 4)
    levels = assign(scores, _cfg({1: [0.0, 0.25], 4: [0.25, 1.0]}, "thresholdbound"))
    assert levels.flatten().tolist() == [1, 4, 4, 4]


def test_thresholdbound_minimum_share_when_mass_is_concentrated(assign):
    # One block holds nearly all the mass; level 1 still keeps ceil(6%) of the blocks.
    nkb = 50
    scores = torch.full((1, 1, 2, nkb), 1e-6)
    scores[..., 7] = 1.0
    levels = assign(scores, _cfg({1: [0.0, 0.5], 0: [0.5, 1.0]}, "thresholdbound"))
    for row in levels.reshape(-1, nkb):
        assert int((row == 1).sum()) == math.ceil(0.06 * nkb)
        assert row[7] == 1


@pytest.mark.parametrize("mode", ["topk", "thresholdbound"])
def test_text_blocks_are_full_resolution(assign, mode):
    ratios = TOPK_RATIOS[1] if mode == "topk" else THRESHOLD_RATIOS[0]
    cfg = _cfg(ratios, mode)
    scores = _random_scores((2, 2, 6, 9), seed=7)
    text_q = torch.tensor([False, False, False, False, True, True])
    text_k = torch.tensor([False] * 7 + [True, True])
    plain = assign(scores, cfg)
    levels = assign(scores, cfg, text_q, text_k)
    assert (levels[..., text_q, :] == 1).all()
    assert (levels[..., text_k] == 1).all()
    rest = (~text_q)[:, None] & (~text_k)[None, :]
    assert torch.equal(levels[..., rest], plain[..., rest])
    # no text: passing all-False masks changes nothing
    none_q, none_k = torch.zeros(6, dtype=torch.bool), torch.zeros(9, dtype=torch.bool)
    assert torch.equal(assign(scores, cfg, none_q, none_k), plain)


@pytest.mark.parametrize("mode", ["topk", "thresholdbound"])
def test_tied_scores_resolve_alike_in_torch_and_triton(mode, device):
    # Small integer scores: many ties, and cumulative sums that are exact in any order.
    g = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 4, (1, 2, 3, 23), generator=g).float()
    scores[0, 0, 0] = 1.0  # a row where every block ties
    ratios = TOPK_RATIOS[0] if mode == "topk" else THRESHOLD_RATIOS[0]
    cfg = _cfg(ratios, mode)
    want = assign_levels(scores, cfg)
    assert torch.equal(assign_levels_triton(scores.to(device), cfg).cpu(), want)
    # equal scores keep their index order: the lower index gets the finer level
    row = want[0, 0, 0].tolist()
    assert [LEVEL_CLASS[p] for p in row] == sorted(LEVEL_CLASS[p] for p in row)


# ----------------------------------------------------------------------------- similarity guard

def _similarity_by_hand(k: torch.Tensor, n: int, L: int) -> torch.Tensor:
    """[B, H, nkb, 3]: per key block, mean cosine of the first and last key of each whole
    group of p keys (p = 2, 4, 8); groups reaching past L are left out; 0 without a group."""
    B, H, _, _ = k.shape
    nkb = -(-L // n)
    out = torch.zeros(B, H, nkb, 3, dtype=torch.float64)
    kd = k.double()
    for b in range(B):
        for h in range(H):
            for j in range(nkb):
                for i, p in enumerate((2, 4, 8)):
                    cos = []
                    for g in range(n // p):
                        first, last = j * n + g * p, j * n + g * p + p - 1
                        if last < L:
                            cos.append(torch.nn.functional.cosine_similarity(kd[b, h, first], kd[b, h, last], dim=0))
                    out[b, h, j, i] = sum(cos) / len(cos) if cos else 0.0
    return out


def _keys_with_constant_block(n: int, L: int, D: int, seed: int) -> torch.Tensor:
    """Random keys except key block 1, which repeats one vector (cosine 1 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, L, D, generator=g)
    k[:, :, n:2 * n] = torch.randn(1, 2, 1, D, generator=g)
    return k


@pytest.mark.parametrize("n,L", [(16, 16 * 4 + 5), (32, 32 * 3 + 7), (64, 64 * 3 + 1), (128, 128 * 2 + 61)])
def test_key_similarity_matches_definition(n, L):
    q, k, _ = structured_qkv((1, 1, L - 3), heads=2, head_dim=32, text_len=3, seed=n)
    got = key_similarity(k, n, L)
    assert got.shape == (1, 2, -(-L // n), 3)
    torch.testing.assert_close(got.double(), _similarity_by_hand(k, n, L), atol=1e-5, rtol=0)
    const = _keys_with_constant_block(n, L, 32, seed=n)
    sim = key_similarity(const, n, L)
    torch.testing.assert_close(sim[:, :, 1], torch.ones(1, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(sim.double(), _similarity_by_hand(const, n, L), atol=1e-5, rtol=0)


def _random_levels(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor([1, 2, 4, 8, 0], dtype=torch.int8)
    return choice[torch.randint(0, 5, shape, generator=g)]


@pytest.mark.parametrize("n,L", [(16, 16 * 5 + 3), (32, 32 * 4 + 9), (64, 64 * 3 + 17), (128, 128 * 2 + 5)])
def test_similarity_guard_keeps_similar_blocks_and_refines_the_rest(n, L):
    k = _keys_with_constant_block(n, L, 64, seed=L)
    nkb = -(-L // n)
    levels = _random_levels((1, 2, 3, nkb), seed=n)
    levels[..., 1] = torch.tensor([2, 4, 8], dtype=torch.int8)[None, None, :]  # constant block pooled
    levels[..., 0] = torch.tensor([8, 4, 2], dtype=torch.int8)[None, None, :]  # random block pooled
    cfg = PSAConfig.from_dict({"use_sim_mask": True})
    sim = key_similarity(k, n, L)
    out = apply_similarity_guard(levels, sim, cfg)
    assert out.dtype == levels.dtype and out.shape == levels.shape
    # the constant block keeps its pooled levels; random keys are far below the thresholds
    assert torch.equal(out[..., 1], levels[..., 1])
    assert (out[..., 0] == 1).all()
    # only ever finer: pooled levels move down, 1 and 0 stay
    fixed = (levels == 1) | (levels == 0)
    assert torch.equal(out[fixed], levels[fixed])
    pooled = ~fixed
    assert (out[pooled] <= levels[pooled]).all() and (out[pooled] >= 1).all()


def test_similarity_guard_picks_coarsest_passing_level():
    # hand-made similarities for 4 key blocks: which of p = 2, 4, 8 pass x2=0.7, x4=0.65, x8=0.6
    sim = torch.tensor([[0.9, 0.9, 0.9],    # all pass
                        [0.9, 0.9, 0.1],    # 8 fails -> 4
                        [0.9, 0.1, 0.1],    # 4 and 8 fail -> 2
                        [0.1, 0.9, 0.1]])[None, None]  # 2 fails, 4 passes
    cfg = PSAConfig.from_dict({"use_sim_mask": True})
    levels = torch.tensor([[8, 8, 8, 8], [4, 4, 4, 4], [2, 2, 2, 2], [1, 0, 1, 0]], dtype=torch.int8)[None, None]
    out = apply_similarity_guard(levels, sim, cfg)[0, 0].tolist()
    # coarsest level p' <= p whose own similarity passes (level 1 always passes)
    assert out == [[8, 4, 2, 4], [4, 4, 2, 4], [2, 2, 2, 1], [1, 0, 1, 0]]


@pytest.mark.parametrize("n", [16, 32, 64, 128])
def test_similarity_guard_threshold_extremes(n):
    L = 3 * n + n // 2 + 1
    q, k, _ = structured_qkv((1, 1, L), heads=2, head_dim=32, seed=n)
    nkb = -(-L // n)
    levels = _random_levels((1, 2, 4, nkb), seed=n + 1)
    sim = key_similarity(k, n, L)
    lax = PSAConfig.from_dict({"use_sim_mask": True, "sim_thresholds": {"x2": -1.0, "x4": -1.0, "x8": -1.0}})
    assert torch.equal(apply_similarity_guard(levels, sim, lax), levels)
    # 1.0, the largest threshold a config allows: only identical keys reach it, these never do
    strict = PSAConfig(use_sim_mask=True, sim_thresholds=SimThresholds(1.0, 1.0, 1.0))
    out = apply_similarity_guard(levels, sim, strict)
    assert torch.equal(out, torch.where(levels == 0, levels, torch.ones_like(levels)))


# ----------------------------------------------------------------------------- density

def test_density_of_a_hand_built_map():
    rows = [[[1, 2, 0, 8], [4, 4, 1, 0], [0, 0, 0, 2]],
            [[1, 1, 1, 1], [8, 8, 8, 8], [0, 2, 4, 1]]]
    levels = torch.tensor(rows, dtype=torch.int8).reshape(1, 2, 3, 4)
    got = density(levels)
    assert got.shape == (1, 2)
    for h, head in enumerate(rows):
        flat = [p for row in head for p in row]
        want = sum(1.0 / p for p in flat if p > 0) / len(flat)
        assert abs(float(got[0, h]) - want) < 1e-6
    assert abs(float(density(torch.ones(2, 3, 4, 5, dtype=torch.int8)).min()) - 1.0) < 1e-7
    assert float(density(torch.zeros(1, 1, 2, 2, dtype=torch.int8)).max()) == 0.0


def test_density_random_maps():
    levels = _random_levels((2, 3, 5, 7), seed=11)
    got = density(levels)
    for b in range(2):
        for h in range(3):
            flat = levels[b, h].flatten().tolist()
            want = sum(1.0 / p for p in flat if p > 0) / len(flat)
            assert abs(float(got[b, h]) - want) < 1e-6


# ----------------------------------------------------------------------------- block estimate

def _sample_positions(L: int, block: int, samples: int) -> list[list[int]]:
    """Centred strided samples of every block; a partial tail block whose first sample falls
    past the end samples its last real token instead."""
    stride = block // samples
    out = []
    for b in range(-(-L // block)):
        pos = []
        for i in range(samples):
            idx = b * block + i * stride + stride // 2
            if idx < L:
                pos.append(idx)
            elif i == 0:
                pos.append(L - 1)
        out.append(pos)
    return out


def _estimate_by_hand(q, k, m, n) -> torch.Tensor:
    B, H, L, D = q.shape
    sq, sk = estimate.sample_counts(m, n)
    qpos, kpos = _sample_positions(L, m, sq), _sample_positions(L, n, sk)
    kflat = [i for blk in kpos for i in blk]
    kblock = torch.tensor([j for j, blk in enumerate(kpos) for _ in blk])
    out = torch.zeros(B, H, len(qpos), len(kpos), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            ks = k[b, h, kflat].double()
            for i, blk in enumerate(qpos):
                acc = torch.zeros(len(kpos), dtype=torch.float64)
                for t in blk:
                    p = torch.softmax(q[b, h, t].double() @ ks.T / math.sqrt(D), dim=0)
                    acc += torch.zeros(len(kpos), dtype=torch.float64).index_add_(0, kblock, p)
                out[b, h, i] = acc / len(blk)
    return out


def test_sample_counts_fit_their_blocks():
    for m in (16, 32, 64, 128):
        for n in (16, 32, 64, 128):
            sq, sk = estimate.sample_counts(m, n)
            assert 1 <= sq <= m and m % sq == 0
            assert 1 <= sk <= n and n % sk == 0


@pytest.mark.parametrize("L,m,n", [(53, 16, 16), (45, 32, 16), (129, 64, 32), (97, 16, 64), (130, 128, 64)])
def test_estimate_reference_matches_definition(L, m, n):
    q, k, _ = structured_qkv((1, 1, L), heads=2, head_dim=16, seed=L)
    got = estimate.estimate_reference(q, k, m, n)
    assert got.dtype == torch.float32 and got.shape == (1, 2, -(-L // m), -(-L // n))
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.double(), _estimate_by_hand(q, k, m, n), atol=1e-5, rtol=0)


ESTIMATE_CASES = [  # (grid, text_len, m, n, D, seed)
    ((3, 5, 7), 0, 16, 16, 32, 0),
    ((3, 5, 7), 4, 16, 16, 64, 1),
    ((3, 5, 7), 0, 32, 16, 64, 2),
    ((2, 3, 11), 3, 32, 16, 32, 3),
    ((3, 7, 9), 0, 64, 32, 32, 4),
    ((4, 4, 8), 1, 64, 32, 64, 5),    # L = 129: partial tail blocks of one token
    ((3, 7, 13), 0, 128, 64, 32, 6),
    ((3, 7, 13), 2, 128, 64, 64, 7),
]


@pytest.mark.parametrize("grid,text_len,m,n,D,seed", ESTIMATE_CASES)
def test_estimate_triton_matches_reference(grid, text_len, m, n, D, seed, device):
    q, k, _ = structured_qkv(grid, heads=2, head_dim=D, batch=2, text_len=text_len, seed=seed, device=device)
    ref = estimate.estimate_reference(q, k, m, n)
    got = estimate.estimate_triton(q, k, m, n)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # On a GPU tl.dot rounds fp32 inputs to tf32; the interpreter computes in fp32.
    atol = 1e-3 if got.is_cuda else 1e-5
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    # inputs in the caller's order, read through a permutation without a copy
    perm = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(seed)).to(device)
    ref_perm = estimate.estimate_reference(arrange(q, perm), arrange(k, perm), m, n)
    torch.testing.assert_close(estimate.estimate_triton(q, k, m, n, perm), ref_perm, atol=atol, rtol=0)
    # heads one at a time (a scratch of one head): the very same scores
    assert torch.equal(estimate.estimate_triton(q, k, m, n, heads_per_pass=1), got)
    # the key tiles in 1, 2 or 4 runs per program row (runs without tiles included at these
    # lengths): the same scores up to the order of the rescaling
    for splits in (1, 2, 4):
        got_s = estimate.estimate_triton(q, k, m, n, launch=estimate.EstimateLaunch(splits=splits))
        torch.testing.assert_close(got_s, ref, atol=atol, rtol=0)
    B, H, L = q.shape[:3]
    if got.is_cuda:  # what the scratch takes, as scratch_bytes_per_head says
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        estimate.estimate_triton(q, k, m, n)
        extra = torch.cuda.max_memory_allocated() - base - got.numel() * 4
        assert 0 < extra <= H * estimate.scratch_bytes_per_head(B, L, m, n) + 4096


def test_key_splits_fill_small_launches_only():
    # Wan 480p x 81: 32 programs x 12 heads on 132 multiprocessors; 720p: 74 x 12; 8 a multiprocessor
    assert estimate.key_splits(384, 132, 256) == 4
    assert estimate.key_splits(888, 132, 591) == 2
    assert estimate.key_splits(1056, 132, 591) == 1
    assert estimate.key_splits(10, 132, 1000) == estimate.MAX_SPLITS
    assert estimate.key_splits(10, 132, 20) == 2  # runs of at least 8 tiles
    assert estimate.key_splits(10, 132, 12) == 1
    with pytest.raises(ValueError, match="splits 3; allowed: 1, 2, 4"):
        estimate.EstimateLaunch(splits=3)


# ----------------------------------------------------------------------------- long rows

@pytest.mark.parametrize("mode", ["topk", "thresholdbound"])
@pytest.mark.parametrize("ratios", [
    {1: [0, .05], 2: [.05, .1], 4: [.1, .15], 8: [.15, .25], 0: [.25, 1]},
    {2: [0, .5], 8: [.5, 1]},
])
@pytest.mark.parametrize("nkb,presort_above", [(2100, None), (700, 0), (700, 1 << 20)])
def test_triton_levels_of_long_rows_match_torch(mode, ratios, nkb, presort_above, device):
    # Rows over the presort bound are ranked by torch, the kernel assigns the levels; below it
    # the kernel sorts them itself. Either way, the torch reference's levels.
    gen = torch.Generator().manual_seed(nkb)
    scores = torch.rand(1, 2, 2, nkb, generator=gen) ** 4
    scores[0, 0, 0, : nkb // 3] = 0.0  # ties at zero: the lower block index ranks first
    scores /= scores.sum(-1, keepdim=True)
    cfg = PSAConfig.from_dict({"mask_mode": mode, "mask_ratios": ratios})
    text_k = torch.zeros(nkb, dtype=torch.bool)
    text_k[-1] = True
    want = assign_levels(scores, cfg, text_k_blocks=text_k)
    got = assign_levels_triton(scores.to(device), cfg, text_k_blocks=text_k.to(device),
                               launch=LevelsLaunch(presort_above=presort_above)).cpu()
    assert got.dtype == torch.int8
    assert torch.equal(got, want)
    if mode == "topk":  # a sampled pivot: hits on smooth rows, falls back on the row of ties
        got = assign_levels_triton(scores.to(device), cfg, text_k_blocks=text_k.to(device), rank="sample")
        assert torch.equal(got.cpu(), want)


# ----------------------------------------------------------------------------- topk by selection

@pytest.mark.parametrize("ratios", TOPK_RATIOS + [{1: [0.0, 1.0]}, {0: [0.0, 1.0]}, {2: [0.0, 0.02], 0: [0.02, 1.0]}])
@pytest.mark.parametrize("nkb", [1, 7, 64, 300])
def test_topk_levels_by_selection_match_the_sorted_ranking(ratios, nkb, device):
    # The topk kernel finds each level boundary's rank by bisection instead of sorting (over
    # the whole row, or among a packed set of blocks: those before the last boundary, or
    # those at or above a pivot from a sample of the row). On
    # rows with many ties, ties at zero, negative and -0.0 scores, every ranking must give the
    # torch reference's levels (stable descending order: the lower block index ranks first).
    gen = torch.Generator().manual_seed(nkb)
    scores = torch.randint(-3, 5, (1, 2, 3, nkb), generator=gen).float() / 4
    scores[0, 0, 0] = 0.5                                # every block ties
    scores[0, 0, 1] = torch.rand(nkb, generator=gen)     # no ties
    scores[0, 1, 0, ::2] = -0.0                          # -0.0 ties with +0.0
    scores[0, 1, 1] = -torch.rand(nkb, generator=gen)    # all negative
    cfg = _cfg(ratios, "topk")
    want = assign_levels(scores, cfg)
    for rank in ("bisect", "compact", "sample", "sort", None):
        got = assign_levels_triton(scores.to(device), cfg, rank=rank).cpu()
        assert got.dtype == torch.int8
        assert torch.equal(got, want), rank
    assert (want != 0).any(dim=-1).all()  # no row is left empty


def test_topk_rank_table_changes_where_the_ranges_do():
    cfg = _cfg(TOPK_RATIOS[1], "topk")
    cuts, table, _ = levels_mod._topk_table(1024, cfg, "cpu")
    # psa_topk over 1024 blocks: ranks [0, 51) level 1, [51, 102) 2, [102, 154) 4, [154, 256) 8
    assert cuts.tolist() == [51, 102, 154, 256]
    assert table.tolist() == [1, 2, 4, 8, 0]
    cuts, table, _ = levels_mod._topk_table(10, _cfg({0: [0.0, 1.0]}, "topk"), "cpu")
    assert cuts.tolist() == [1] and table.tolist() == [1, 0]  # the best block keeps level 1
    with pytest.raises(ValueError, match="rank 'quick'; allowed: sort, bisect, compact, sample"):
        assign_levels_triton(torch.rand(1, 1, 2, 10), cfg, rank="quick")
