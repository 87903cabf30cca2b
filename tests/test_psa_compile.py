"""The Triton kernels compile for every NVIDIA GPU generation PSA supports, without a GPU.

The interpreter that runs the kernels in the other CPU tests accepts programs the compiler
rejects (a constexpr assigned twice, for one), so every kernel variant the library launches
is also compiled ahead of time to a cubin by Triton's own ptxas, for A100 (sm_80), RTX 30xx
(sm_86), RTX 40xx (sm_89), H100/H200 (sm_90) and RTX 50xx (sm_120), with the launch options the
library picks for that generation, and its shared memory checked against the GPU's limit (over
it, Triton refuses the launch). Runs in a process of its own: the kernels must be decorated
without TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pack_import import pack_module

SCRIPT = Path(__file__).with_name("compile_kernels.py")
VARIANTS = 48  # per GPU


def test_every_kernel_variant_compiles_for_every_supported_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1500)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    lines = run.stdout.splitlines()
    for arch in (80, 86, 89, 90, 120):
        mine = [line for line in lines if f" sm_{arch} " in line]
        assert len(mine) == VARIANTS and all(line.startswith(("ok ", "declined ")) for line in mine), report
        attention = [line for line in mine if " attention " in line and line.startswith("ok ")]
        # tensor cores: Hopper's warpgroup instructions on sm_90, mma.sync elsewhere
        assert attention and all(line.endswith("mma wgmma" if arch == 90 else "mma mma") for line in attention), report
        # head dim 256 fits only where there is room for its tiles; elsewhere Apply PSA leaves it alone
        declined = [line for line in mine if line.startswith("declined ")]
        assert declined == ([] if arch in (80, 90) else [l for l in mine if " d256 " in l]), report


def test_wide_head_rule_is_the_one_apply_psa_uses():
    sys.path.insert(0, str(SCRIPT.parent))
    import compile_kernels
    assert compile_kernels.WIDE_HEAD_SHARED == pack_module("nodes.patch").WIDE_HEAD_SHARED
