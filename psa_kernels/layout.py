"""Token layouts: put tokens that are close in space-time close in the sequence.

Video tokens arrive row-major over the token grid ``(T, H, W)``: token ``t*H*W + h*W + w``.
Block-sparse attention scores contiguous blocks of the sequence, so a block should hold a
compact piece of space-time rather than a sliver of one row. Two layouts are offered:

* ``"Gilbert"``: the order of a 3D generalized Hilbert curve, which works for any side
  lengths (odd, prime, non powers of two).
* ``"Tiled"``: 3D tiles of ``tile_size`` in row-major order, tokens row-major inside a tile.

:func:`sequence_permutation` turns a layout into a gather over the whole sequence (video plus
any text tokens, text moved after the video) and caches it, since it depends only on the grid.
"""
from __future__ import annotations

import functools
import operator

import torch

from .config import REARRANGE_METHODS

Vec = tuple[int, int, int]
Box = tuple[Vec, Vec, Vec, Vec]  # origin, then major, second and third axis vectors

_DEVICE_CACHE_SIZE = 64


# ----------------------------------------------------------------------------- Gilbert curve
# A box is an origin cell plus three axis-aligned vectors; its curve starts at the origin and
# ends on the far cell of the major axis (origin + major - unit(major)). Splitting a box into
# sub-boxes that honour the same contract, each starting next to where the previous one ended,
# keeps the whole curve continuous.

def _add(*vs: Vec) -> Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _neg(v: Vec) -> Vec:
    return (-v[0], -v[1], -v[2])


def _sub(u: Vec, v: Vec) -> Vec:
    return (u[0] - v[0], u[1] - v[1], u[2] - v[2])


def _length(v: Vec) -> int:
    return abs(v[0]) + abs(v[1]) + abs(v[2])  # axis-aligned, so this is the side length


def _unit(v: Vec) -> Vec:
    n = _length(v)
    return (v[0] // n, v[1] // n, v[2] // n)


def _half(v: Vec) -> Vec:
    """The first half of an axis, made even when the axis is longer than 2.

    Colour the cells like a 3D chessboard: a path through every cell of a box ends on the
    colour its cell count dictates. With an even major axis the far corner always has that
    colour; with an odd one it does not when another side is even, and the sub-curve then
    needs a diagonal step. Rounding by length, not by signed coordinate, makes the split the
    same whichever way the axis points, so the curve of a box depends only on its sides.
    """
    n = _length(v)
    half = n // 2
    if half % 2 and n > 2:
        half += 1
    u = _unit(v)
    return (u[0] * half, u[1] * half, u[2] * half)


def _children(a: Vec, b: Vec, c: Vec) -> list[Box]:
    """Sub-boxes of the box at the origin with axes (a, b, c), in curve order."""
    o = (0, 0, 0)
    w, h, d = _length(a), _length(b), _length(c)
    a2 = _half(a)
    if 2 * w > 3 * h and 2 * w > 3 * d:
        # A long slab: halving the major axis keeps both halves well shaped.
        return [(o, a2, b, c), (a2, _sub(a, a2), b, c)]
    a_back = _sub(a, _unit(a))  # offset of the last cell along a
    if 3 * h > 4 * d:
        # Third axis too short to halve: go up b on the near half, across, back down.
        b2 = _half(b)
        return [(o, b2, c, a2),
                (b2, a, _sub(b, b2), c),
                (_add(a_back, _sub(b2, _unit(b))), _neg(b2), c, _neg(_sub(a, a2)))]
    if 3 * d > 4 * h:
        c2 = _half(c)
        return [(o, c2, a2, b),
                (c2, a, b, _sub(c, c2)),
                (_add(a_back, _sub(c2, _unit(c))), _neg(c2), _neg(_sub(a, a2)), b)]
    # All three sides comparable: five sub-boxes, the generalized form of the eight octants.
    b2, c2 = _half(b), _half(c)
    c_back = _sub(c, _unit(c))
    return [(o, b2, c2, a2),
            (b2, c, a2, _sub(b, b2)),
            (_add(_sub(b2, _unit(b)), c_back), a, _neg(b2), _neg(_sub(c, c2))),
            (_add(a_back, b2, c_back), _neg(c), _neg(_sub(a, a2)), _sub(b, b2)),
            (_add(a_back, _sub(b2, _unit(b))), _neg(b2), c2, _neg(_sub(a, a2)))]


def _box_curve(w: int, h: int, d: int, memo: dict[Vec, torch.Tensor]) -> torch.Tensor:
    """Cells of a w x h x d box in curve order, as [w*h*d, 3] coordinates along its own axes.

    The curve of a box depends only on its sides, and a grid has few distinct sub-box sides
    (a handful per level), so memoising them turns the recursion into a few hundred tensor
    copies; its depth grows with log(side), far below Python's recursion limit.
    """
    if (w, h, d) in memo:
        return memo[(w, h, d)]
    if h == 1 and d == 1:
        cells = torch.zeros(w, 3, dtype=torch.int64)
        cells[:, 0] = torch.arange(w)
    elif w == 1 and d == 1:
        cells = torch.zeros(h, 3, dtype=torch.int64)
        cells[:, 1] = torch.arange(h)
    elif w == 1 and h == 1:
        cells = torch.zeros(d, 3, dtype=torch.int64)
        cells[:, 2] = torch.arange(d)
    else:
        parts = []
        for origin, a, b, c in _children((w, 0, 0), (0, h, 0), (0, 0, d)):
            local = _box_curve(_length(a), _length(b), _length(c), memo)
            frame = torch.tensor([_unit(a), _unit(b), _unit(c)], dtype=torch.int64)
            # The frame is a signed permutation, so this matmul only relabels and flips axes.
            parts.append(torch.tensor(origin, dtype=torch.int64) + local @ frame)
        cells = torch.cat(parts)
    memo[(w, h, d)] = cells
    return cells


def gilbert_order(T: int, H: int, W: int) -> torch.Tensor:
    """Row-major indices of the (T, H, W) grid cells in the order a 3D Gilbert curve visits them.

    Returns an int64 CPU tensor of length T*H*W, shared between calls: do not modify it.
    Consecutive cells are grid neighbours except for rare diagonal steps across one face of a
    unit cube (two coordinates change by one), which odd sides force.
    """
    return _gilbert_order(*_grid(T, H, W))


@functools.lru_cache(maxsize=16)
def _gilbert_order(T: int, H: int, W: int) -> torch.Tensor:
    sides = {"w": W, "h": H, "t": T}
    # The curve runs along its major axis, so give that role to the longest side.
    axes = sorted(sides, key=lambda k: -sides[k])
    cells = _box_curve(sides[axes[0]], sides[axes[1]], sides[axes[2]], {})
    coord = {axis: cells[:, i] for i, axis in enumerate(axes)}
    return (coord["t"] * H + coord["h"]) * W + coord["w"]


# ----------------------------------------------------------------------------- tiled layout

def tiled_order(T: int, H: int, W: int, tile_size: tuple[int, int, int]) -> torch.Tensor:
    """Row-major indices of the grid cells grouped by 3D tiles of ``tile_size`` (depth, height,
    width): tiles in row-major order, cells row-major inside a tile, edge tiles partial.

    Returns an int64 CPU tensor of length T*H*W, shared between calls: do not modify it.
    """
    return _tiled_order(*_grid(T, H, W), _positive_triple(tile_size, "tile_size"))


@functools.lru_cache(maxsize=16)
def _tiled_order(T: int, H: int, W: int, tile_size: tuple[int, int, int]) -> torch.Tensor:
    dt, dh, dw = tile_size
    t = torch.arange(T).view(T, 1, 1)
    h = torch.arange(H).view(1, H, 1)
    w = torch.arange(W).view(1, 1, W)
    tiles_h, tiles_w = -(-H // dh), -(-W // dw)
    tile = ((t // dt) * tiles_h + h // dh) * tiles_w + w // dw
    # Row-major order restricted to one tile is that tile's row-major order, so a stable sort
    # of the row-major cells by tile id is exactly the tiled layout.
    return torch.sort(tile.flatten(), stable=True).indices


# ----------------------------------------------------------------------------- full sequence

def as_index(value, name: str, minimum: int) -> int:
    """An integer argument (Python, NumPy or 0-d tensor integers); floats and bools are refused,
    not truncated (True as a size is always a mistake)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name}: got {value!r}; allowed: an integer >= {minimum}")
    return number


def _positive_triple(values: tuple[int, int, int], name: str) -> tuple[int, int, int]:
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise ValueError(f"{name}: got {values!r}; allowed: 3 positive integers")
    return tuple(as_index(v, f"{name}[{i}]", 1) for i, v in enumerate(values))


def _grid(T: int, H: int, W: int) -> tuple[int, int, int]:
    return _positive_triple((T, H, W), "grid (T, H, W)")


def _video_order(grid: tuple[int, int, int], method: str,
                 tile_size: tuple[int, int, int]) -> torch.Tensor:
    if method == "Gilbert":
        return _gilbert_order(*grid)
    return _tiled_order(*grid, tile_size)


@functools.lru_cache(maxsize=32)
def _cpu_permutation(grid: tuple[int, int, int], text_len: int, text_first: bool, method: str,
                     tile_size: tuple[int, int, int],
                     rearrange: bool) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    video_len = grid[0] * grid[1] * grid[2]
    video_start, text_start = (text_len, 0) if text_first else (0, video_len)
    if not rearrange and video_start == 0:
        return None, None
    video = _video_order(grid, method, tile_size) if rearrange else torch.arange(video_len)
    perm = torch.cat([video + video_start, torch.arange(text_len) + text_start])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


_device_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor] | tuple[None, None]] = {}


def sequence_permutation(grid: tuple[int, int, int], text_len: int = 0, text_first: bool = False,
                         method: str = "Gilbert", tile_size: tuple[int, int, int] = (2, 8, 8),
                         rearrange: bool = True, device: torch.device | str = "cpu",
                         index_dtype: torch.dtype = torch.int64,
                         ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Gather indices ``(perm, inv)`` over a sequence of T*H*W video and ``text_len`` text tokens.

    ``x[..., perm, :]`` holds the video tokens in ``method`` order (row-major when
    ``rearrange`` is False) followed by the text tokens in their original order; the caller's
    sequence has the text before the video when ``text_first``, after it otherwise.
    ``arranged[..., inv, :]`` restores the caller's order. Returns ``(None, None)`` when the
    permutation is the identity, so callers can skip the gather. Both are ``index_dtype``
    (int64, or int32: the kernels then address rows in 32 bits, benchmarks/NOTES.md change 40)
    on ``device`` and cached per argument set: the tensors are shared, do not modify them.
    """
    if index_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index_dtype: got {index_dtype}; allowed: torch.int64, torch.int32")
    key = (grid, text_len, text_first, method, tile_size, rearrange, device, index_dtype)
    try:
        return _device_cache[key]
    except (KeyError, TypeError):  # TypeError: an unhashable grid such as a list
        pass
    if method not in REARRANGE_METHODS:
        allowed = ", ".join(REARRANGE_METHODS)
        raise ValueError(f"rearrange_method: got {method!r}; allowed: {allowed}")
    perm, inv = _cpu_permutation(_positive_triple(grid, "grid (T, H, W)"),
                                 as_index(text_len, "text_len", 0), bool(text_first), method,
                                 _positive_triple(tile_size, "tile_size"), bool(rearrange))
    if perm is not None:
        perm, inv = perm.to(device, index_dtype), inv.to(device, index_dtype)
    try:
        if len(_device_cache) >= _DEVICE_CACHE_SIZE:
            del _device_cache[next(iter(_device_cache))]  # oldest entry first
        _device_cache[key] = (perm, inv)
    except TypeError:  # unhashable arguments are served, just not cached under that key
        pass
    return perm, inv


def arrange(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Gather the sequence dimension (-2) of ``x`` [..., L, D] into the arranged order."""
    return x if perm is None else x.index_select(-2, perm)


def restore(y: torch.Tensor, inv: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`arrange`: gather dimension -2 of ``y`` back into the caller's order."""
    return y if inv is None else y.index_select(-2, inv)
