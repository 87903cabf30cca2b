"""What PSA decided during a sampler run, kept for the PSA Plan View node.

Apply PSA with ``record_plan`` gives its patch a :class:`PlanRecorder`. Every video
self-attention call then reports to it: the density of each transformer block at each sampling
step (1 for calls run dense), and the level map of each block at the latest PSA step. Nothing
is copied to the host during sampling (that would stall the GPU every call): densities stay
device scalars and maps stay device tensors until the Plan View reads them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..psa_kernels import psa_attention, psa_plan

MAX_MAP_SIDE = 256  # level maps are kept with at most this many query and key blocks (every k-th)


@dataclass
class RecordedMap:
    step: int
    levels: torch.Tensor      # [H, rows, cols] int8, batch 0 (the conditional half of a CFG batch)
    stride: tuple[int, int]   # (query, key) block stride of the subsampling; (1, 1) = every block


@dataclass
class PlanSnapshot:
    """The recording on the host, for drawing."""
    density: np.ndarray               # [steps, blocks], NaN where a block did not run
    steps: int
    maps: dict[int, RecordedMap]      # block -> its map at its latest PSA step
    pooled_tail: bool
    grid: tuple[int, int, int] | None
    tail_n: int = 0                   # key block size when level 0 is a pooled tail (it counts 1/tail_n)
    dense_reasons: dict[int, str] = field(default_factory=dict)  # block -> why it ran dense (last seen)


class PlanRecorder:
    """Densities and level maps of the latest sampler run of one patched model."""

    def __init__(self, pooled_tail: bool = False):
        self.pooled_tail = pooled_tail
        self.tail_n = 0  # from the plans it records
        self._reset()

    def _reset(self) -> None:
        self._density: dict[tuple[int, int], torch.Tensor | float] = {}
        self._maps: dict[int, RecordedMap] = {}
        self._reasons: dict[int, str] = {}
        self._steps = 0
        self._last_step = -1
        self._forwards = -1
        self.grid = None

    def _step(self, step: tuple[int, int] | None, block: int) -> int:
        """Step index of this call; a step index lower than the last one starts a new run."""
        if step is None:  # no sigmas: count forwards instead
            if block == 0:
                self._forwards += 1
            i, n = max(self._forwards, 0), max(self._forwards, 0) + 1
        else:
            i, n = step
        if i < self._last_step:
            self._reset()
            if step is None:
                self._forwards = 0
        self._last_step = i
        self._steps = max(self._steps, n, i + 1)
        return i

    def dense(self, step, block: int, reason: str) -> None:
        i = self._step(step, block)
        self._density[(i, block)] = 1.0
        self._reasons[block] = reason

    def attention(self, q, k, v, cfg, grid, step, block: int):
        """PSA for one call, recording its plan; (output, plan)."""
        i = self._step(step, block)
        plan = psa_plan(q, k, cfg, grid)
        out = psa_attention(q, k, v, cfg, grid, plan=plan)
        lv = plan.levels[0]
        self.tail_n = plan.tail_n
        # as the verbose log counts it (heavy keys too), left on the device until the snapshot
        self._density[(i, block)] = plan.density()[0].mean()
        sq, sk = (max(1, math.ceil(s / MAX_MAP_SIDE)) for s in lv.shape[-2:])
        self._maps[block] = RecordedMap(i, lv[:, ::sq, ::sk].clone(), (sq, sk))
        self.grid = tuple(grid)
        return out, plan

    def snapshot(self) -> PlanSnapshot | None:
        """The recording on the host, or None when nothing was recorded."""
        if not self._density:
            return None
        blocks = 1 + max(b for _, b in self._density)
        table = np.full((self._steps, blocks), np.nan)
        for (i, b), d in self._density.items():
            table[i, b] = float(d)
        maps = {b: RecordedMap(m.step, m.levels.cpu(), m.stride) for b, m in self._maps.items()}
        return PlanSnapshot(table, self._steps, maps, self.pooled_tail, self.grid, dict(self._reasons), self.tail_n)
