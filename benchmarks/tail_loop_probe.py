"""Why a tail tile costs more than a level-1 tile: the tail loop alone, in variants.

    python3 benchmarks/tail_loop_probe.py            # GPU, 720p x 40 heads

One program per (query block, head) runs only a loop over the tail rows (one mean key per key
block) and stores its output; the variants differ in what a step does besides the product and
the softmax: the level-map read and the per-column bias, masked loads past the last block, the
pipeline depth. Same launch as the attention kernel (8 warps, 128 registers a thread).
Timing probes only: the outputs are not compared.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _probe(Q, KT, VT, Lv, TB, Bits, Bias16, Out, nkb, scale,
           D: tl.constexpr, M: tl.constexpr, TN: tl.constexpr, MASKED: tl.constexpr, LEVELS: tl.constexpr,
           STAGES: tl.constexpr, LOGITS: tl.constexpr):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    nqb = tl.num_programs(0)
    rm = qb * M + tl.arange(0, M)
    dd = tl.arange(0, D)
    r = tl.arange(0, TN)
    L = nqb * M
    q = tl.load(Q + h * L * D + rm[:, None] * D + dd[None, :])
    kbase = KT + h * (nkb + TN) * D
    vbase = VT + h * (nkb + TN) * D
    lv_row = Lv + (h * nqb + qb) * nkb
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for t in tl.range(0, tl.cdiv(nkb, TN), num_stages=STAGES):
        kb = t * TN + r
        inside = kb < nkb
        if MASKED:
            k = tl.load(kbase + kb[:, None] * D + dd[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(vbase + kb[:, None] * D + dd[None, :], mask=inside[:, None], other=0.0)
        else:
            k = tl.load(kbase + kb[:, None] * D + dd[None, :])
            v = tl.load(vbase + kb[:, None] * D + dd[None, :])
        s = tl.dot(q, tl.trans(k))
        if LEVELS == 1:
            skipped = tl.load(lv_row + kb, mask=inside, other=1) == 0
            colb = tl.where(skipped, tl.load(TB + kb, mask=inside, other=0.0) * 1.4426950408889634, float("-inf"))
        elif LEVELS == 2:  # the bias vector only
            colb = tl.where(inside, tl.load(TB + kb, mask=inside, other=0.0) * 1.4426950408889634, float("-inf"))
        elif LEVELS == 3:  # the level map only
            skipped = tl.load(lv_row + kb, mask=inside, other=1) == 0
            colb = tl.where(skipped, 6.0, float("-inf"))
        elif LEVELS == 4:  # a bit set per row: one scalar load a tile
            word = tl.load(Bits + (h * nqb + qb) * tl.cdiv(nkb, TN) + t)
            colb = tl.where(((word >> r.to(tl.int64)) & 1) != 0, 6.0, float("-inf"))
        elif LEVELS == 5:  # bit set and the bias vector
            word = tl.load(Bits + (h * nqb + qb) * tl.cdiv(nkb, TN) + t)
            colb = tl.where(((word >> r.to(tl.int64)) & 1) != 0,
                            tl.load(TB + kb, mask=inside, other=0.0) * 1.4426950408889634, float("-inf"))
        elif LEVELS == 6:  # a count per column and row (uint8, 0 = not in the tail), bias log2 count
            code = tl.load(lv_row + kb, mask=inside, other=0)
            colb = tl.where(code > 0, tl.log2(code.to(tl.float32)), float("-inf"))
        elif LEVELS == 7:  # a bias per column and row (fp16, -inf = not in the tail)
            colb = tl.load(Bias16 + (h * nqb + qb) * nkb + kb, mask=inside, other=float("-inf")).to(tl.float32)
        elif LEVELS == 8:  # count per column and row, log2 only off the common count
            code = tl.load(lv_row + kb, mask=inside, other=0)
            colb = tl.where(code == 64, 6.0, tl.where(code > 0, tl.log2(code.to(tl.float32)), float("-inf")))
        else:
            colb = tl.where(inside, 6.0, float("-inf"))
        x = s * scale + colb[None, :]
        if LOGITS:
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(x - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(x, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + h * L * D + rm[:, None] * D + dd[None, :], acc.to(Out.dtype.element_ty))


def main():
    H, L, D, M, TN = 40, 75648, 128, 128, 64
    nkb = -(-75600 // 64)
    nqb = L // M
    dev = "cuda"
    q = torch.randn(H, L, D, device=dev, dtype=torch.bfloat16)
    kt = torch.randn(H, nkb + TN, D, device=dev, dtype=torch.bfloat16)
    vt = torch.randn_like(kt)
    lv = torch.where(torch.rand(H, nqb, nkb, device=dev) < 0.03, 0, 64).to(torch.uint8)
    tb = torch.full((nkb,), 4.1, device=dev)
    out = torch.empty_like(q)
    b16 = torch.where(torch.rand(H, nqb, nkb, device=dev) < 0.97, 6.0, float("-inf")).half()
    bits = torch.randint(-2**62, 2**62, (H, nqb, -(-nkb // TN)), device=dev, dtype=torch.int64)
    print(f"tail loop alone, {H} heads x {nqb} query blocks x {-(-nkb // TN)} tiles")
    print(f"{'variant':44s} {'ms':>7s} {'tiles/us':>8s}")
    variants = [("plain (no mask, no level map)", dict(MASKED=False, LEVELS=0, STAGES=2, LOGITS=False)),
                ("plain, 3 stages", dict(MASKED=False, LEVELS=0, STAGES=3, LOGITS=False)),
                ("masked loads", dict(MASKED=True, LEVELS=0, STAGES=2, LOGITS=False)),
                ("level map + bias", dict(MASKED=False, LEVELS=1, STAGES=2, LOGITS=False)),
                ("bias vector only", dict(MASKED=False, LEVELS=2, STAGES=2, LOGITS=False)),
                ("level map only", dict(MASKED=False, LEVELS=3, STAGES=2, LOGITS=False)),
                ("bit set (scalar a tile)", dict(MASKED=False, LEVELS=4, STAGES=2, LOGITS=False)),
                ("bit set + bias vector", dict(MASKED=False, LEVELS=5, STAGES=2, LOGITS=False)),
                ("count per row (uint8) + log2", dict(MASKED=True, LEVELS=6, STAGES=2, LOGITS=True)),
                ("bias per row (fp16)", dict(MASKED=True, LEVELS=7, STAGES=2, LOGITS=True)),
                ("count per row, log2 off the common count", dict(MASKED=True, LEVELS=8, STAGES=2, LOGITS=True)),
                ("bit set, masked, -inf-safe", dict(MASKED=True, LEVELS=4, STAGES=2, LOGITS=True)),
                ("as shipped (masked, level map, -inf-safe)", dict(MASKED=True, LEVELS=1, STAGES=2, LOGITS=True))]
    for name, kw in variants:
        for nr in (128,):
            extra = {"maxnreg": nr} if nr else {}
            fn = lambda: _probe[(nqb, H)](q, kt, vt, lv, tb, bits, b16, out, nkb, 0.127, D=D, M=M, TN=TN,  # noqa: E731
                                         num_warps=8, num_stages=2, **kw, **extra)
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                tiles = H * nqb * -(-nkb // TN)
                print(f"{name + (' (cap 128)' if nr else ''):44s} {ms:7.3f} {tiles / ms / 1e3:8.1f}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name:44s} failed: {type(e).__name__}: {str(e)[:100]}")


if __name__ == "__main__":
    main()
