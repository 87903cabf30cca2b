"""Import the repository root as a package, the way ComfyUI imports a custom-node folder, so the
pack's relative imports (``from ..psa_kernels import ...``) resolve without ComfyUI."""
import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_psa"


def pack_module(name: str):
    """``pack_module("nodes.presets")`` is the pack's nodes/presets.py."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACKAGE}.{name}")
