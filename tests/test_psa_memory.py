"""PSA's extra memory on a 24 GB consumer GPU: Wan 2.1 14B with fp8 weights at 720p x 81 frames
(40 heads, 75,600 tokens, head dim 128, bf16 activations) on an RTX 4090.

The rule for passes (psa_kernels.api._passes) reads the free memory from torch's allocator and
the driver; here both are given the numbers such a card has at the first self-attention call,
and the test checks that the heads PSA works through at once fit in what is free: all of them in
one pass with level 1 copied where that fits (the fastest way), else with level 1 read in place
(a smaller pyramid), in one pass or in groups.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from psa_kernels import api, attention, estimate, load_attention_config

GiB = 1 << 30
CARD = 24 * GiB                  # RTX 4090
CONTEXT = GiB // 2               # CUDA context and cuBLAS workspace: outside torch's allocator
WEIGHTS = 14_300_000_000         # Wan 2.1 14B, fp8 (e4m3) weights, all on the GPU
HEADS, TOKENS, HEAD_DIM, WIDTH = 40, 75_600, 128, 5120
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "attention_config.yaml"


class CudaLike:
    """The attributes of q that _passes reads."""
    is_cuda, device = True, "cuda:0"

    def __init__(self, batch: int):
        self.shape = (batch, HEADS, TOKENS, HEAD_DIM)

    def element_size(self) -> int:
        return 2  # bf16


def card(monkeypatch, batch: int, cache_slack: int = 256 << 20) -> int:
    """Make torch.cuda report the 4090's memory at a self-attention call; the bytes free."""
    # live at the call: the block's input and its normalised copy, q, k and v
    activations = 5 * batch * TOKENS * WIDTH * 2
    allocated = WEIGHTS + activations
    reserved = allocated + cache_slack
    driver_free = CARD - CONTEXT - reserved
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device: {
        "reserved_bytes": {"all": {"current": reserved}}, "allocated_bytes": {"all": {"current": allocated}}})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (driver_free, CARD))
    return cache_slack + driver_free


def per_head(cfg, batch: int, in_place: bool = False) -> int:
    m, n = cfg.block_size.m, cfg.block_size.n
    return max(attention.attention_bytes_per_head(batch, TOKENS, HEAD_DIM, 2, m, n, cfg.attn_impl == "new_mask_type",
                                                **api.pyramid_layout(cfg, in_place=in_place)),
               estimate.scratch_bytes_per_head(batch, TOKENS, m, n))


SECTION = load_attention_config(CONFIG)["Wan2.1_14b"]


@pytest.mark.parametrize("preset", sorted(name for name, c in SECTION.attention_configs.items() if not c.is_dense))
def test_wan14b_fp8_720p_on_a_24gb_card(monkeypatch, preset):
    cfg = SECTION.attention_configs[preset]
    # the pyramid without its copy of level 1 is the smaller (the estimate's scratch may set both)
    assert per_head(cfg, 1, in_place=True) <= per_head(cfg, 1)
    # cond and uncond one at a time: PSA's buffers for all 40 heads fit beside the model, one pass
    free = card(monkeypatch, batch=1)
    assert HEADS * per_head(cfg, 1) < 0.9 * free
    # (level 1 copied, but for presets that read a sparse level 1 in place by choice)
    by_choice = api.reads_level1_in_place(cfg)
    assert api._passes(CudaLike(1), cfg) == (HEADS, by_choice)
    # cond and uncond batched (twice the activations and twice the buffers a head): level 1
    # copied if all heads fit so, else read in place, and as many heads at a time as fit in 90%
    # of what is free, so the call never runs out of memory
    free = card(monkeypatch, batch=2)
    group, in_place = api._passes(CudaLike(2), cfg)
    if HEADS * per_head(cfg, 2) <= 0.9 * free:
        assert (group, in_place) == (HEADS, by_choice)
    size = per_head(cfg, 2, in_place=in_place)
    assert 1 <= group <= HEADS
    assert group * size <= 0.9 * free and (group == HEADS or 0.9 * free < (group + 1) * size)
    # peak with PSA's buffers: within the card
    assert WEIGHTS + 5 * 2 * TOKENS * WIDTH * 2 + CONTEXT + group * size < CARD


def test_24gb_card_batched_reads_level1_in_place_for_the_pooled_presets(monkeypatch):
    # the pyramid presets' copy of level 1 does not fit beside a batch of two: read in place
    cfg = SECTION.attention_configs["psa_quality"]
    free = card(monkeypatch, batch=2)
    assert HEADS * per_head(cfg, 2) > 0.9 * free
    group, in_place = api._passes(CudaLike(2), cfg)
    assert in_place and group * per_head(cfg, 2, in_place=True) <= 0.9 * free


def test_an_80gb_card_takes_every_head_at_once(monkeypatch):
    cfg = SECTION.attention_configs[SECTION.default_attention]
    monkeypatch.setattr(torch.cuda, "memory_stats_as_nested_dict", lambda device: {
        "reserved_bytes": {"all": {"current": 20 * GiB}}, "allocated_bytes": {"all": {"current": 20 * GiB}}})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (58 * GiB, 80 * GiB))
    assert api._passes(CudaLike(2), cfg) == (HEADS, False)
