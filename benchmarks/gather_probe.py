"""The attention kernel reading level 1 in place: index width and launch variants against the copy.

    python3 benchmarks/gather_probe.py            # GPU: 480p x 12 heads and 720p x 40 heads

Level 1 read in place (NOTES.md change 38) costs the kernel 10-17% over a pyramid that copies
it. This probe times the kernel alone (do_bench median) on the same plan for: the copy; in
place through the int64 arranged order (what psa_attention passes); in place through an int32
copy of it (half the index registers and address arithmetic in 32 bits); and each in place
variant without the register cap or with a shallower loop pipeline. Outputs are compared
with the copy's (they compute the same sums in the same order: expect 0).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from psa_kernels import api, attention, load_attention_config, psa_plan, pyramid, schedule  # noqa: E402
from psa_kernels.synthetic import relative_l2  # noqa: E402
from in_place_probe import medium_heads  # noqa: E402

PRESETS = {"480p": ("Wan2.1_1.3b", ("psa_fast", "psa_precise")),
           "720p": ("Wan2.1_14b", ("psa_fast", "psa_precise"))}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main():
    dev = torch.device("cuda")
    sections = load_attention_config(REPO / "configs" / "attention_config.yaml")
    for shape in ("480p", "720p"):
        grid, heads, L, (qh, kh, vh) = medium_heads(shape, dev)
        section, names = PRESETS[shape]
        print(f"\n{shape} x {heads} heads (L = {L}), {section}: kernel ms (median), output diff against the copy")
        for name in names:
            cfg = sections[section].attention_configs[name]
            m, n = cfg.block_size.m, cfg.block_size.n
            plan = psa_plan(qh, kh, cfg, grid, v=vh)
            packed = cfg.attn_impl == "new_mask_type"
            results = []
            copy_opts = api.pyramid_layout(cfg, kh, vh)
            pyr_c, _ = pyramid.build_pyramid_triton(kh, vh, n, L, perm=plan.perm, heavy=plan.heavy, **copy_opts)
            sched = schedule.build_schedule(plan.levels, pyr_c, packed=packed)
            ref = attention.attention_triton(qh, pyr_c, sched, m, perm=plan.perm)
            def copy_call(pyr_c=pyr_c, sched=sched, perm=plan.perm):
                return attention.attention_triton(qh, pyr_c, sched, m, perm=perm)
            results.append(("copy", bench(copy_call), 0.0))
            place_opts = api.pyramid_layout(cfg, kh, vh, True)
            assert plan.perm is not None, "the Wan presets arrange the sequence"
            for width, perm in (("int64", plan.perm), ("int32", plan.perm.to(torch.int32))):
                pyr_p, _ = pyramid.build_pyramid_triton(kh, vh, n, L, perm=perm, heavy=plan.heavy, **place_opts)
                sched_p = schedule.build_schedule(plan.levels, pyr_p, packed=packed)
                for label, kw in (("", {}), (", no reg cap", {"maxnreg": 0}), (", loop 2", {"loop_stages": 2})):
                    def call(pyr_p=pyr_p, sched_p=sched_p, perm=perm, kw=kw):
                        return attention.attention_triton(qh, pyr_p, sched_p, m, perm=perm, **kw)
                    out = call()
                    results.append((f"in place {width}{label}", bench(call), relative_l2(out, ref)))
            base = results[0][1]
            for label, ms, diff in results:
                print(f"  {name:12s} {label:26s} {ms:8.3f} ms {ms / base:6.3f}x  diff {diff:.1e}", flush=True)
            del plan, pyr_c, sched, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
