"""Where does the pyramid kernel's time go? Times variants of its inner loop on one schedule.

    python3 benchmarks/kernel_probe.py

Variants differ only in how a tile's keys and values are fetched and whether the bias is
read; the schedule (tile count and order) is the real one of a topk preset at the Wan 2.1
1.3B shape. Contiguous/TMA variants read the wrong rows for packed tiles: they are
timing probes, not kernels to use.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import PSAConfig, psa_plan, schedule  # noqa: E402
from psa_kernels.layout import arrange  # noqa: E402
from psa_kernels.synthetic import structured_qkv  # noqa: E402


@triton.jit
def _probe(Q, KP, VP, Bias, Out, TileLevel, TileSeg, NumTiles, Segs, k_desc, v_desc,
           L, rows_total, sm_scale_log2, sqh, skh, s_tl, s_seg,
           D: tl.constexpr, BLOCK_M: tl.constexpr, N: tl.constexpr, TILE_N: tl.constexpr,
           MODE: tl.constexpr, USE_BIAS: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh * tl.num_programs(0) + qb
    rm = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    q = tl.load(Q + bh * sqh + rm[:, None] * D + dd[None, :], mask=(rm < L)[:, None], other=0.0)
    kbase = KP + bh * skh
    vbase = VP + bh * skh
    seg_row = Segs + row * s_seg
    r = tl.arange(0, TILE_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    ntiles = tl.load(NumTiles + row)
    for t in range(0, ntiles):
        lvl = tl.load(TileLevel + row * s_tl + t)
        first = tl.load(TileSeg + row * s_tl + t)
        if MODE == 0:  # the real gather
            seg_len = N // lvl
            slot = r // seg_len
            seg = tl.load(seg_row + first + slot)
            valid = seg >= 0
            prow = tl.where(valid, seg + r % seg_len, 0)
            k = tl.load(kbase + prow[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(vbase + prow[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0)
        elif MODE == 1:  # one contiguous run of TILE_N rows
            row0 = tl.minimum(tl.load(seg_row + first), rows_total - TILE_N)
            row0 = tl.multiple_of(row0, 16)
            prow = row0 + r
            k = tl.load(kbase + prow[:, None] * D + dd[None, :])
            v = tl.load(vbase + prow[:, None] * D + dd[None, :])
        else:  # TMA
            row0 = tl.minimum(tl.load(seg_row + first), rows_total - TILE_N)
            prow = row0 + r
            k = k_desc.load([bh * rows_total + row0, 0])
            v = v_desc.load([bh * rows_total + row0, 0])
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        if USE_BIAS:
            s += (tl.load(Bias + prow) * 1.4426950408889634)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + bh * sqh + rm[:, None] * D + dd[None, :], acc.to(Out.dtype.element_ty), mask=(rm < L)[:, None])


def main():
    grid = (21, 30, 52)
    q, k, v = structured_qkv(grid, heads=12, head_dim=128, dtype=torch.bfloat16, device="cuda", seed=1)
    B, H, L, D = q.shape
    rows = []
    for name, preset in {
        "topk_n64": {"block_size": {"m": 128, "n": 64, "tile_n": 32}, "mask_mode": "topk",
                     "mask_ratios": {1: [0, .06], 2: [.06, .1], 4: [.1, .16], 8: [.16, .3], 0: [.3, 1]}},
        "topk_n128": {"block_size": {"m": 128, "n": 128, "tile_n": 32}, "mask_mode": "topk",
                      "mask_ratios": {1: [0, .06], 2: [.06, .1], 4: [.1, .16], 8: [.16, .3], 0: [.3, 1]}},
        "full_n128": {"block_size": {"m": 128, "n": 128, "tile_n": 32}, "mask_ratios": {1: [0, 1]}},
    }.items():
        cfg = PSAConfig.from_dict(preset)
        m, n = cfg.block_size.m, cfg.block_size.n
        plan = psa_plan(q, k, cfg, grid, backend="triton", v=v)
        qa = arrange(q, plan.perm).contiguous()
        pyr = plan.pyramid
        rows_total = pyr.k.shape[2]
        for tn in (128, 64):
            if tn < n:
                continue
            sc = schedule.build_schedule(plan.levels, pyr, True, tile_n=tn)
            flops = float(sc.num_tiles.sum()) * 4 * m * tn * D
            k2 = pyr.k.reshape(B * H * rows_total, D)
            v2 = pyr.v.reshape(B * H * rows_total, D)
            kd = TensorDescriptor.from_tensor(k2, [tn, D])
            vd = TensorDescriptor.from_tensor(v2, [tn, D])
            out = torch.empty_like(qa)
            for mode in (0, 1, 2):
                for bias in (True, False):
                    for nw, ns in ((4, 2), (8, 2), (4, 3), (8, 3)):
                        def fn():
                            _probe[(triton.cdiv(L, m), B * H)](
                                qa, pyr.k, pyr.v, pyr.bias, out, sc.tile_level, sc.tile_seg, sc.num_tiles, sc.segs,
                                kd, vd, L, rows_total, 1.4426950408889634 / D ** 0.5, qa.stride(1), pyr.k.stride(1),
                                sc.tile_level.stride(2), sc.segs.stride(2),
                                D=D, BLOCK_M=m, N=n, TILE_N=tn, MODE=mode, USE_BIAS=bias, num_warps=nw, num_stages=ns)
                        try:
                            ms = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
                            rows.append((name, tn, mode, bias, nw, ns, ms, flops / ms / 1e9))
                        except Exception as e:
                            print(name, tn, mode, bias, nw, ns, "failed", str(e)[:200], flush=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        dms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                      warmup=10, rep=40, return_mode="median")
    print(f"\ncuDNN dense {dms:.3f} ms = {4 * B * H * L * L * D / dms / 1e9:.0f} TFLOP/s")
    print("preset     tile mode bias warps stages     ms  TFLOP/s   (mode 0 gather, 1 contiguous, 2 TMA)")
    for r in rows:
        print(f"{r[0]:10s} {r[1]:4d} {r[2]:4d} {int(r[3]):4d} {r[4]:5d} {r[5]:6d} {r[6]:6.3f} {r[7]:8.0f}")


if __name__ == "__main__":
    main()
