"""Compile every Triton kernel of psa_kernels ahead of time for the NVIDIA GPUs PSA supports,
no GPU needed: A100 (sm_80), RTX 30xx / A-series (sm_86), RTX 40xx / L40 (sm_89), H100 / H200
(sm_90) and RTX 50xx (sm_120).

Run by tests/test_psa_compile.py in a process of its own: the kernels must be decorated
without TRITON_INTERPRET, which the rest of the CPU tests set. Prints one line per variant and
GPU; ``python compile_kernels.py 86 89`` compiles for those only.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psa_kernels import attention, estimate, levels, pyramid, schedule  # noqa: E402
from psa_kernels import heavy as heavy_mod  # noqa: E402
from psa_kernels.attention import kernel_launch_config  # noqa: E402

# compute capability -> the most shared memory one program may use there (the CUDA programming
# guide's "maximum shared memory per thread block", opt-in); Triton refuses a launch over it
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}
ARCHS = tuple(SHARED_LIMIT)
# Apply PSA leaves head dims over 128 to the model's attention on GPUs with less shared memory
# per block than this (nodes/patch.py WIDE_HEAD_SHARED): the attention kernel's tiles need more
WIDE_HEAD_SHARED = 150 * 1024


def compile_for(arch: int, kernel, pointers: dict, floats: tuple, constexprs: dict,
                num_warps: int = 4, num_stages: int = 2, maxnreg: int | None = None):
    """Compile ``kernel`` for compute capability ``arch`` (90 = sm_90): ``pointers`` maps pointer arguments to element types,
    ``floats`` names fp32 scalars, every other non-constexpr argument is an int32.

    As the launcher does for torch tensors and for integers that are multiples of 16, the
    pointers and the row strides (arguments named s*l, s*h, s*b) are marked 16-divisible:
    without that the compiler cannot vectorise or software-pipeline the loads."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in floats else "i32"
            if len(name) == 3 and name[0] == "s" and name[2] in "lhb":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def variants(arch: int = 90):
    """(name, kernel, pointers, floats, constexprs, launch options) of every variant the library
    launches on a GPU of compute capability ``arch``."""
    for m, n in ((128, 32), (128, 128)):
        sq, sk = estimate.sample_counts(m, n)
        splits = 2 if n == 32 else 1
        yield (f"estimate m{m} n{n} splits{splits}", estimate._estimate_kernel,
               {"Q": "bf16", "K": "bf16", "Part": "fp32", "MaxAt": "fp32", "MaxEnd": "fp32", "Norm": "fp32",
                "QWeight": "fp32", "Perm": "i32"}, ("sm_scale_log2",),
               dict(H=12, D=128, M=m, N=n, SQ=sq, SK=sk, QBLOCKS=128 // sq, KBLOCKS=128 // sk, SPLITS=splits,
                    HAS_PERM=True),
               {"num_warps": 8})
        yield (f"estimate reduce m{m} n{n} splits{splits}", estimate._estimate_reduce_kernel,
               {"Part": "fp32", "MaxAt": "fp32", "MaxEnd": "fp32", "Norm": "fp32", "QWeight": "fp32", "Out": "fp32"},
               (), dict(H=12, SQ=sq, KBLOCKS=128 // sk, CHUNK=estimate.REDUCE_CHUNK, SPLITS=splits), {"num_warps": 4})
    # means (routing), means of squares (queries) and both (keys: the tail spread correction,
    # with heavy keys left out of the variances)
    for block, second, heavy in ((64, 0, False), (128, 0, False), (128, 1, False), (64, 1, False),
                                 (64, 2, False), (64, 2, True), (128, 2, True)):
        yield (f"block means {block} second={second} heavy={heavy}", estimate._block_mean_kernel,
               {"X": "bf16", "Out": "fp32", "Out2": "fp32", "Perm": "i32", "HIdx": "i64" if heavy else "fp32",
                "HBlk": "i32" if heavy else "fp32"}, ("scale2",),
               dict(H=12, D=128, BLOCK=block, CH=32, HAS_PERM=True, SECOND=second, HEAVY=heavy, HC=32),
               {"num_warps": 4})
    bounds = ("r1lo", "r1hi", "r2lo", "r2hi", "r4lo", "r4hi", "r8lo", "r8hi")
    for threshold, nkb, presorted in ((True, 512, False), (False, 4096, True)):
        yield (f"levels threshold={threshold} nkb={nkb}", levels._assign_levels_kernel,
               {"Scores": "fp32", "Order": "i64", "Out": "i8"}, bounds,
               dict(THRESHOLD=threshold, NKB=nkb, PRESORTED=presorted), {})
    for nkb, ncut, cand, sample, warps in ((1024, 1, 0, 0, 1), (1024, 4, 256, 0, 1), (4096, 4, 1024, 0, 4),
                                           (4096, 4, 1024, levels.PIVOT_SAMPLE, 8)):
        yield (f"topk levels nkb={nkb} cuts={ncut} cand={cand} sample={sample}", levels._topk_levels_kernel,
               {"Scores": "fp32", "Cuts": "i64", "Table": "i64", "Out": "i8", "Scratch": "i64", "Nset": "i32"}, (),
               dict(NCUT=ncut, NKB=nkb, CAND=cand, SAMPLE=sample, SPLIT=bool(sample)), {"num_warps": warps})
    yield ("topk set levels cuts=4 cand=1024", levels._topk_set_kernel,
           {"Scratch": "i64", "Nset": "i32", "Cuts": "i64", "Table": "i64", "Out": "i8"}, (),
           dict(NCUT=4, CAND=1024, SAMPLE=levels.PIVOT_SAMPLE), {"num_warps": levels.SET_WARPS})
    # (similarity, pyramid, level 1 copied, pooled levels, level 8)
    for with_sim, with_pyramid, level1, pooled, level8 in ((False, True, True, True, True),
                                                           (True, True, True, True, True),
                                                           (True, False, False, False, False),
                                                           (False, True, False, True, True),
                                                           (False, True, False, False, True)):
        yield (f"pyramid build sim={with_sim} pyramid={with_pyramid} level1={level1} pooled={pooled}",
               pyramid._pyramid_build_kernel,
               {"K": "bf16", "V": "bf16", "KP": "bf16", "VP": "bf16", "Bias": "fp32",
                "SimSum": "fp32", "SimCnt": "fp32", "Perm": "i32"}, (),
               dict(H=12, D=128, CH=pyramid.BUILD_LAUNCH.chunk, WITH_SIM=with_sim, WITH_PYRAMID=with_pyramid,
                    HAS_PERM=True, LEVEL1=level1, POOLED=pooled, LEVEL8=level8),
               {"num_warps": pyramid.BUILD_LAUNCH.num_warps})
    for heavy_keys in (False, True):
        yield (f"tail rows heavy={heavy_keys}", pyramid._tail_rows_kernel,
               {"KP": "bf16", "VP": "bf16", "Bias": "fp32", "HK": "bf16", "HV": "bf16", "HB": "i32",
                "TailBias": "fp32"}, (),
               dict(H=12, D=128, G=8, HEAVY=heavy_keys, HC=32), {"num_warps": 2})
    yield ("heavy rows", pyramid._heavy_rows_kernel,
           {"K": "bf16", "V": "bf16", "Index": "i64", "Block": "i32", "HK": "bf16", "HV": "bf16", "HB": "i32"}, (),
           dict(H=12, D=128, CH=pyramid.HEAVY_ROWS), {"num_warps": 4})
    for tail, heavy_keys, spread in ((True, False, False), (True, True, False), (False, True, False),
                                     (True, True, True)):
        yield (f"column biases tail={tail} heavy={heavy_keys} spread={spread}", schedule._column_bias_kernel,
               {"Levels": "i8", "TailLn": "fp32", "HBlock": "i32", "TailOut": "fp16", "HeavyOut": "fp16",
                "Spread": "fp32"}, (),
               dict(TAIL=tail, HEAVY=heavy_keys, CH=schedule.TILE_WIDTH, POOLED=not tail or not heavy_keys,
                    SPREAD=spread),
               {"num_warps": 1})
    yield ("mean-query logits", heavy_mod._mean_query_logit_kernel, {"K": "bf16", "Qbar": "fp32", "Out": "fp32"}, (),
           dict(H=12, D=128, CH=heavy_mod.LOGIT_ROWS), {"num_warps": 4})
    # packed levels; level-1 blocks split over two tiles; a level-1 pyramid's schedule
    for n, nkb, pooled in ((32, 1024, True), (128, 256, True), (64, 2048, False)):
        pt = {p: schedule.level_split(n, p, 64, True)[0] for p in (1, 2, 4, 8)}
        sp = {p: schedule.level_split(n, p, 64, True)[1] for p in (1, 2, 4, 8)}
        yield (f"schedule n{n} pooled={pooled}", schedule._schedule_kernel,
               {"Levels": "i8", "Segs": "i32", "TileLevel": "i32", "TileSeg": "i32", "Counts": "i32"}, (),
               dict(N=n, NKB=nkb, **{f"PT{p}": pt[p] for p in pt}, **{f"SP{p}": sp[p] for p in sp},
                    AM1=False, AM2=False, AM4=False, AM8=False, FOLD=True, TCH=schedule.SCHEDULE_CHUNK,
                    POOLED=pooled),
               {})
    # level 1 read in place (what the API launches, through an int32 arranged order) and copied
    # (the torch-built pyramids; an int64 order, what the API passes for tensors past 2**31 elements)
    for m, n, packed, d, fold, tail, heavy, in_place in (
            (128, 128, True, 128, True, False, False, True), (128, 64, True, 128, True, False, False, True),
            (128, 32, True, 128, True, False, False, True), (128, 32, True, 128, False, False, False, False),
            (128, 128, False, 128, True, False, False, True), (64, 64, True, 64, True, False, False, True),
            (128, 64, True, 256, True, False, False, True), (128, 64, True, 128, True, True, False, True),
            (128, 128, True, 128, True, True, False, True), (128, 32, True, 128, True, True, False, True),
            (128, 64, True, 128, True, True, True, True), (128, 32, True, 128, True, False, True, True),
            (128, 64, True, 128, True, False, False, False), (128, 64, True, 128, True, True, True, False)):
        tile_n = schedule.TILE_WIDTH
        launch = kernel_launch_config(m, tile_n, packed, d, major=arch // 10, in_place=in_place)
        options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
        if launch.maxnreg:
            options["maxnreg"] = launch.maxnreg
        yield (f"attention m{m} n{n} packed={packed} d{d} fold={fold} tail={tail} heavy={heavy} in_place={in_place}",
               attention._pyramid_attn_kernel,
               {"Q": "bf16", "KP": "bf16", "VP": "bf16", "Bias": "fp32", "Out": "bf16", "TileLevel": "i32",
                "TileSeg": "i32", "Counts": "i32", "Segs": "i32", "Perm": "i32" if in_place else "i64",
                "TailBias": "fp16", "HK": "bf16", "HV": "bf16", "HBias": "fp16", "K1": "bf16", "V1": "bf16"},
               ("sm_scale_log2",),
               dict(H=12, D=d, BLOCK_M=m, N=n, TILE_N=tile_n, PACKED=packed, HAS_PERM=True,
                    LOOP_STAGES=launch.loop_stages, FOLD=fold, TAIL=tail, HEAVY=heavy, SRC_L1=in_place),
               options)


def compile_one(arch: int, index: int) -> str:
    """One line of the report: 'ok ...' or 'FAILED ...'."""
    name, kernel, pointers, floats, constexprs, options = list(variants(arch))[index]
    label = f"sm_{arch} {name}"
    try:
        compiled = compile_for(arch, kernel, pointers, floats, constexprs, **options)
    except Exception as e:  # report every variant, then fail
        return f"FAILED {label}: {type(e).__name__}: {str(e)[:400]}"
    ptx, shared = compiled.asm["ptx"], compiled.metadata.shared
    # tensor cores: Hopper's warpgroup instructions on sm_90, mma.sync on the others
    mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "none")
    if shared > SHARED_LIMIT[arch]:
        if constexprs.get("D", 0) > 128 and SHARED_LIMIT[arch] < WIDE_HEAD_SHARED:
            return f"declined {label}: shared {shared} over sm_{arch}'s {SHARED_LIMIT[arch]}, as Apply PSA expects"
        return f"FAILED {label}: {shared} bytes of shared memory, over sm_{arch}'s {SHARED_LIMIT[arch]}"
    return f"ok {label}: cubin {len(compiled.asm['cubin'])} bytes, shared {shared}, mma {mma}"


def main(archs=ARCHS) -> int:
    jobs = [(arch, i) for arch in archs for i in range(len(list(variants(arch))))]
    # ptxas and the Triton passes run on one core each: one worker per core
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=get_context("spawn")) as pool:
        lines = list(pool.map(compile_one, *zip(*jobs)))
    for line in lines:
        print(line, flush=True)
    return 1 if any(line.startswith("FAILED") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main(tuple(int(a) for a in sys.argv[1:]) or ARCHS))
