"""Token layouts: the Gilbert curve and tiles are permutations with locality, and the cached
sequence permutations arrange and restore q/k/v exactly, with text tokens after the video."""
import itertools
import random
import time

import pytest
import torch

from psa_kernels import layout
from psa_kernels.layout import (arrange, gilbert_order, restore, sequence_permutation,
                                tiled_order)

NAMED_SIZES = [(1, 1, 1), (1, 1, 9), (1, 1, 64), (2, 2, 2), (4, 4, 4), (8, 8, 8), (3, 5, 7),
               (13, 45, 80), (21, 30, 52), (1, 17, 31), (5, 1, 9), (7, 1, 1), (2, 3, 1)]


def _random_sizes(count: int, high: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    return [tuple(rng.randint(1, high) for _ in range(3)) for _ in range(count)]


def _coords(order: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(t, h, w) of each row-major index, as an [N, 3] tensor."""
    return torch.stack([order // (H * W), order // W % H, order % W], dim=1)


def _steps(T: int, H: int, W: int) -> torch.Tensor:
    """Absolute per-axis coordinate change between consecutive cells of the curve, [N-1, 3]."""
    cells = _coords(gilbert_order(T, H, W), H, W)
    return (cells[1:] - cells[:-1]).abs()


def _is_permutation(order: torch.Tensor, n: int) -> bool:
    return order.dtype == torch.int64 and torch.equal(torch.sort(order).values, torch.arange(n))


# ----------------------------------------------------------------------------- Gilbert curve

@pytest.mark.parametrize("size", NAMED_SIZES + _random_sizes(40, 40, seed=0))
def test_gilbert_order_is_a_permutation(size):
    T, H, W = size
    order = gilbert_order(T, H, W)
    assert order.device.type == "cpu"
    assert _is_permutation(order, T * H * W)


def test_gilbert_order_every_small_grid_is_a_permutation_with_bounded_steps():
    # Every grid up to 9 per side: each step is a unit step or a diagonal across one face of a
    # unit cube (Chebyshev distance 1, Manhattan distance at most 2), never a jump.
    for T, H, W in itertools.product(range(1, 10), repeat=3):
        assert _is_permutation(gilbert_order(T, H, W), T * H * W), (T, H, W)
        if T * H * W > 1:
            steps = _steps(T, H, W)
            assert steps.max() <= 1 and steps.sum(dim=1).max() <= 2, (T, H, W)


@pytest.mark.parametrize("size", NAMED_SIZES + _random_sizes(30, 60, seed=1))
def test_gilbert_steps_are_grid_neighbours(size):
    T, H, W = size
    if T * H * W == 1:
        return
    steps = _steps(T, H, W)
    manhattan = steps.sum(dim=1)
    assert steps.max() <= 1 and manhattan.max() <= 2
    assert (manhattan >= 1).all()  # no cell is repeated
    if T * H * W >= 200:  # tiny grids have few steps, so one forced diagonal weighs a lot
        assert (manhattan == 1).float().mean() >= 0.95


@pytest.mark.parametrize("size, min_unit_steps", [((21, 30, 52), 0.995),  # measured 0.9973
                                                  ((13, 45, 80), 0.985),  # measured 0.9906
                                                  ((1, 60, 104), 1.0), ((8, 8, 8), 1.0)])
def test_gilbert_video_grids_are_almost_all_unit_steps(size, min_unit_steps):
    assert (_steps(*size).sum(dim=1) == 1).float().mean() >= min_unit_steps


def _chunk_spread(order: torch.Tensor, H: int, W: int, chunk: int = 128) -> tuple[float, float]:
    """Mean bounding-box volume and mean RMS distance to the centroid over full chunks."""
    cells = _coords(order, H, W).float()
    full = cells.shape[0] // chunk * chunk
    chunks = cells[:full].view(-1, chunk, 3)
    volume = (chunks.amax(dim=1) - chunks.amin(dim=1) + 1).prod(dim=1).mean().item()
    centred = chunks - chunks.mean(dim=1, keepdim=True)
    rms = centred.square().sum(dim=2).mean(dim=1).sqrt().mean().item()
    return volume, rms


def test_gilbert_chunks_are_compact_in_space_time():
    T, H, W = 21, 30, 52
    row_volume, row_rms = _chunk_spread(torch.arange(T * H * W), H, W)
    curve_volume, curve_rms = _chunk_spread(gilbert_order(T, H, W), H, W)
    # Measured: bounding box 395 vs 216 cells (1.83x), RMS spread 15.2 vs 2.9 (5.2x).
    assert row_volume / curve_volume >= 1.5
    assert row_rms / curve_rms >= 4.0
    assert curve_volume < 2.5 * 128


def test_gilbert_order_is_cached():
    assert gilbert_order(3, 5, 7) is gilbert_order(3, 5, 7)


def test_gilbert_order_is_fast_for_wan_480p():
    start = time.perf_counter()
    gilbert_order(21, 31, 53)  # a grid no other test builds, so the cache cannot help
    assert time.perf_counter() - start < 0.5


# ----------------------------------------------------------------------------- tiled layout

@pytest.mark.parametrize("size, tile", [((21, 30, 52), (2, 8, 8)), ((4, 16, 16), (2, 8, 8)),
                                        ((3, 5, 7), (2, 2, 3)), ((5, 9, 11), (1, 4, 4)),
                                        ((2, 3, 4), (4, 8, 8)), ((6, 6, 6), (1, 1, 1))])
def test_tiled_order_groups_tiles(size, tile):
    T, H, W = size
    dt, dh, dw = tile
    order = tiled_order(T, H, W, tile)
    assert _is_permutation(order, T * H * W)
    tile_of = _coords(order, H, W) // torch.tensor(tile)
    tiles_t, tiles_h, tiles_w = -(-T // dt), -(-H // dh), -(-W // dw)
    tile_id = (tile_of[:, 0] * tiles_h + tile_of[:, 1]) * tiles_w + tile_of[:, 2]
    # Tiles come in row-major order, so each one is a single contiguous run ...
    assert (tile_id[1:] >= tile_id[:-1]).all()
    ids, counts = torch.unique_consecutive(tile_id, return_counts=True)
    assert ids.numel() == tiles_t * tiles_h * tiles_w
    # ... with its cells row-major inside ...
    same_tile = tile_id[1:] == tile_id[:-1]
    assert (order[1:][same_tile] > order[:-1][same_tile]).all()
    # ... and a full tile's run holds the whole tile; edge tiles hold what is left.
    full = (((ids // (tiles_h * tiles_w) + 1) * dt <= T)
            & ((ids // tiles_w % tiles_h + 1) * dh <= H)
            & ((ids % tiles_w + 1) * dw <= W))
    assert (counts[full] == dt * dh * dw).all()
    assert (counts[~full] < dt * dh * dw).all()


# ----------------------------------------------------------------------------- sequence permutation

CASES = [dict(text_len=text_len, text_first=text_first, rearrange=rearrange, method=method)
         for text_len in (0, 11) for text_first in (False, True) for rearrange in (True, False)
         for method in ("Gilbert", "Tiled")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_arrange_then_restore_is_exact(case):
    grid, text_len = (3, 5, 7), case["text_len"]
    video_len = 3 * 5 * 7
    x = torch.randn(2, 3, video_len + text_len, 8, generator=torch.Generator().manual_seed(0))
    perm, inv = sequence_permutation(grid, tile_size=(2, 2, 4), **case)
    identity = not case["rearrange"] and not (case["text_first"] and text_len)
    if identity:
        assert perm is None and inv is None
        assert arrange(x, perm) is x and restore(x, inv) is x
        return
    assert perm.dtype == inv.dtype == torch.int64
    narrow = sequence_permutation(grid, tile_size=(2, 2, 4), index_dtype=torch.int32, **case)
    assert narrow[0].dtype == narrow[1].dtype == torch.int32
    assert torch.equal(narrow[0].long(), perm) and torch.equal(narrow[1].long(), inv)
    assert torch.equal(perm[inv], torch.arange(perm.numel()))
    assert torch.equal(inv[perm], torch.arange(perm.numel()))
    arranged = arrange(x, perm)
    assert torch.equal(restore(arranged, inv), x)
    # The text tokens close the arranged sequence, in their original relative order.
    text_start = 0 if case["text_first"] else video_len
    assert torch.equal(arranged[..., video_len:, :], x[..., text_start:text_start + text_len, :])
    # The video tokens come in the layout's order (row-major when not rearranged).
    video_start = text_len if case["text_first"] else 0
    video = x[..., video_start:video_start + video_len, :]
    if not case["rearrange"]:
        expected = torch.arange(video_len)
    elif case["method"] == "Gilbert":
        expected = gilbert_order(*grid)
    else:
        expected = tiled_order(*grid, (2, 2, 4))
    assert torch.equal(arranged[..., :video_len, :], video[..., expected, :])


def test_identity_returns_none():
    assert sequence_permutation((2, 4, 4), rearrange=False) == (None, None)
    assert sequence_permutation((2, 4, 4), text_len=7, rearrange=False) == (None, None)
    assert sequence_permutation((2, 4, 4), text_first=True, rearrange=False) == (None, None)
    assert sequence_permutation((2, 4, 4), text_len=7, text_first=True,
                                rearrange=False)[0] is not None


def test_sequence_permutation_is_cached():
    first = sequence_permutation((4, 6, 10), text_len=5, method="Tiled", tile_size=(2, 4, 4))
    second = sequence_permutation((4, 6, 10), text_len=5, method="Tiled", tile_size=(2, 4, 4))
    assert first[0] is second[0] and first[1] is second[1]
    # Lists are accepted too, and give the same permutation.
    listed = sequence_permutation([4, 6, 10], text_len=5, method="Tiled", tile_size=[2, 4, 4])
    assert torch.equal(listed[0], first[0])
    on_device = sequence_permutation((4, 6, 10), text_len=5, method="Tiled", tile_size=(2, 4, 4),
                                     device=torch.device("cpu"))
    assert torch.equal(on_device[1], first[1])


def test_sequence_permutation_cache_is_bounded():
    for text_len in range(1, 200):
        sequence_permutation((2, 3, 4), text_len=text_len)
    assert len(layout._device_cache) <= layout._DEVICE_CACHE_SIZE


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("method", ["gilbert", "Hilbert", "", None])
def test_unknown_method_is_rejected(method):
    with pytest.raises(ValueError, match="allowed: Gilbert, Tiled"):
        sequence_permutation((2, 4, 4), method=method)


@pytest.mark.parametrize("grid", [(0, 4, 4), (2, -1, 4), (2, 4, 0), (2, 4), (2, 4, 4.5),
                                  (True, 4, 4)])
def test_bad_grid_is_rejected(grid):
    with pytest.raises(ValueError, match="grid"):
        sequence_permutation(grid)
    if len(grid) == 3:
        with pytest.raises(ValueError, match="grid"):
            gilbert_order(*grid)
        with pytest.raises(ValueError, match="grid"):
            tiled_order(*grid, (2, 8, 8))


@pytest.mark.parametrize("tile", [(0, 8, 8), (2, 8), (2, -8, 8)])
def test_bad_tile_size_is_rejected(tile):
    with pytest.raises(ValueError, match="tile_size"):
        tiled_order(4, 8, 8, tile)
    with pytest.raises(ValueError, match="tile_size"):
        sequence_permutation((4, 8, 8), method="Tiled", tile_size=tile)


def test_negative_text_len_is_rejected():
    with pytest.raises(ValueError, match="text_len"):
        sequence_permutation((2, 4, 4), text_len=-1)


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32, torch.uint8])
def test_bad_index_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match="index_dtype.*allowed: torch.int64, torch.int32"):
        sequence_permutation((2, 4, 4), index_dtype=dtype)
