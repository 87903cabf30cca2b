"""Shared test setup for the PSA library tests.

Without CUDA the Triton kernels run under Triton's interpreter. ``triton.jit`` reads
TRITON_INTERPRET when a kernel is decorated, i.e. when psa_kernels is first imported, so
it is set here, before any test module imports the library. This file stays free of
ComfyUI: ComfyUI tests bring their own fixtures.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEVICE = torch.device("cuda" if CUDA else "cpu")
CUDA_SKIP_REASON = "CUDA not available: GPU tests run on the device machine"

# Decorator / pytestmark for tests that need a GPU; `@pytest.mark.requires_cuda` does the same.
requires_cuda = pytest.mark.skipif(not CUDA, reason=CUDA_SKIP_REASON)


def pytest_configure(config):
    config.addinivalue_line("markers", f"requires_cuda: skipped unless CUDA is available ({CUDA_SKIP_REASON})")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device tests run their tensors on: CUDA when present, else the CPU."""
    return DEVICE
