"""Without Triton (Windows without triton-windows, macOS, CPU-only installs) the library and the
ComfyUI-facing modules import, the torch path and Apply PSA's routing work, the GPU path says what
to install. Runs in a process of its own where ``import triton`` fails; the real-ComfyUI version
of this (the nodes loaded and a prompt run by ComfyUI) is in test_comfyui.py."""
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import sys
sys.modules["triton"] = None          # what an environment without Triton looks like to importers
sys.path.insert(0, sys.argv[1])
import torch
from pack_import import pack_module

compat = pack_module("psa_kernels.triton_compat")
kernels = pack_module("psa_kernels")
patch = pack_module("nodes.patch")
presets = pack_module("nodes.presets")
attention = pack_module("psa_kernels.attention")
assert not compat.HAVE_TRITON
print("reason:", compat.missing_reason())

cfg = kernels.PSAConfig.from_dict({"type": "psa", "block_size": {"m": 32, "n": 32, "tile_n": 32}, "warmup_steps": 0,
                                   "mask_ratios": {1: [0.0, 0.4], 2: [0.4, 0.6], 0: [0.6, 1.0]}})
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 2, 128, 32, generator=g) for _ in range(3))
out = kernels.psa_attention(q, k, v, cfg, grid=(2, 8, 8))
dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
print("torch path:", tuple(out.shape), float((out - dense).norm() / dense.norm()) > 1e-4)

# Apply PSA's routing, as ComfyUI drives it: PSA on the CPU, the model's attention on a GPU
p = patch.PSAModelPatch(presets.PSAPreset("s", "p", cfg))
print("gpu:", patch.device_reason("cuda", 32, compat.HAVE_TRITON))
print("cpu:", patch.device_reason("cpu", 32, compat.HAVE_TRITON))

class Model:
    patch_size = (1, 2, 2)
    ref_conv = None

class Executor:
    class_obj = Model()
    def __call__(self, x, timestep, context, clip_fea, time_dim_concat, to):
        qs, ks, vs = (t.transpose(1, 2).reshape(2, 128, 64) for t in (q, k, v))
        return to[patch.OVERRIDE_KEY](lambda *a, **kw: "model", qs, ks, vs, heads=2, transformer_options=to)

to = p.install({"sample_sigmas": torch.tensor([1.0, 0.5, 0.0]), "sigmas": torch.tensor([0.5, 0.5])})
res = p.forward_wrapper(Executor(), torch.zeros(2, 16, 2, 16, 16), torch.zeros(2), torch.zeros(2, 16, 64), None, None, to)
print("apply psa:", torch.equal(res, out.transpose(1, 2).reshape(2, 128, 64)))
try:
    attention._pyramid_attn_kernel[(1,)]()
except compat.TritonUnavailable as e:
    print("launch:", e)
"""


def test_without_triton_the_pack_imports_and_routes():
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(TESTS)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    assert lines["reason"].startswith("Triton is not installed; install it in ComfyUI's Python environment")
    assert "'pip install triton-windows' on Windows" in lines["reason"]
    assert lines["torch path"] == "(2, 2, 128, 32) True"
    assert lines["gpu"].startswith("Triton is not installed") and lines["cpu"] == "None"
    assert lines["apply psa"] == "True"
    assert lines["launch"].startswith("_pyramid_attn_kernel needs Triton: Triton is not installed")
