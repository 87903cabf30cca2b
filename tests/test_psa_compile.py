"""The Triton kernels compile for Hopper (sm_90) without a GPU.

The interpreter that runs the kernels in the other CPU tests accepts programs the compiler
rejects (a constexpr assigned twice, for one), so every kernel variant the library launches
is also compiled ahead of time to a cubin for sm_90 by Triton's own ptxas, in a process of
its own (the kernels must be decorated without TRITON_INTERPRET).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("compile_kernels.py")


def test_every_kernel_variant_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    lines = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == 28, report
    # the attention kernel runs on Hopper's warpgroup tensor-core instructions
    assert all("wgmma True" in line for line in lines if line.startswith("ok attention")), report
