"""Real ComfyUI for the tests: a ComfyUI server process started from $COMFYUI_PATH.

The server runs in its own process with a temporary base directory (models, custom_nodes,
user, output), so nothing of ComfyUI is imported into the pytest process and the other tests
are untouched. The pack is copied into custom_nodes under a folder name of its own, and
ComfyUI's own loader, model detection, executor and HTTP API do the rest.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER = "ComfyUI-PSA-under-test"  # any name works: ComfyUI imports the folder as a package
PACK_PARTS = ("__init__.py", "nodes", "psa_kernels", "configs", "locales", "workflows", "web", "pyproject.toml")
FIXTURE_NODES = Path(__file__).resolve().parent / "comfy_fixture_nodes.py"


def comfyui_path_or_skip() -> Path:
    """$COMFYUI_PATH, or skip the calling test loudly (a warning in the summary, and the reason)."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        reason = "COMFYUI_PATH is not set: the real-ComfyUI tests did NOT run (set it to a ComfyUI checkout)"
    elif not (Path(raw) / "main.py").is_file():
        reason = f"COMFYUI_PATH={raw} has no main.py: the real-ComfyUI tests did NOT run"
    else:
        return Path(raw).resolve()
    warnings.warn(reason, UserWarning, stacklevel=2)
    pytest.skip(reason)


def copy_pack(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in PACK_PARTS:
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / part)
    return dest


TINY_WAN_SCRIPT = r"""
import sys, torch
sys.argv = ["make_tiny_wan", "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
import comfy.ops
from comfy.ldm.wan.model import WanModel
from safetensors.torch import save_file
out, seed, dim, layers = sys.argv_real[0], int(sys.argv_real[1]), int(sys.argv_real[2]), int(sys.argv_real[3])
torch.manual_seed(seed)
# num_heads = dim // 128: ComfyUI's detection derives the head count from that ratio.
m = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=dim, ffn_dim=2 * dim, freq_dim=256,
             text_dim=4096, out_dim=16, num_heads=dim // 128, num_layers=layers,
             operations=comfy.ops.disable_weight_init)
sd = {}
for name, p in m.state_dict().items():
    if "norm" in name and name.endswith("weight"):
        sd[name] = torch.ones_like(p)
    elif name.endswith("modulation"):
        sd[name] = torch.randn(p.shape) * 0.1
    else:
        sd[name] = torch.randn(p.shape) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.02)
save_file({k: v.contiguous() for k, v in sd.items()}, out)
"""


def make_tiny_wan(comfy: Path, out: Path, seed: int, dim: int = 256, layers: int = 2) -> None:
    """A random-weight Wan 2.1 T2V checkpoint built by ComfyUI's own WanModel class."""
    code = "import sys; sys.argv_real = sys.argv[1:]\n" + TINY_WAN_SCRIPT
    subprocess.run([sys.executable, "-c", code, str(out), str(seed), str(dim), str(layers)],
                   cwd=comfy, check=True, capture_output=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """One ComfyUI server process over a base directory; prompts go through its HTTP API."""

    def __init__(self, comfy: Path, base: Path, env: dict | None = None):
        self.comfy, self.base = comfy, base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-api-nodes", "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:",
               "--cache-none"]  # every prompt recomputes: outputs compared across prompts are fresh
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not start in time:\n{self.log_tail()}")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": prompt, "client_id": "psa-tests"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 240) -> dict:
        """Queue a prompt and wait for its history entry (status, outputs, messages)."""
        code, resp = self.post_prompt(prompt)
        if code != 200:
            return {"rejected": resp}
        pid = resp["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt, or None when it succeeded."""
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data['exception_type']}: {data['exception_message']}"
    return None


def new_base(tmp: Path, comfy: Path) -> Path:
    """A ComfyUI base directory holding the pack and the test's fixture node."""
    base = tmp / f"comfy-base-{uuid.uuid4().hex[:8]}"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    copy_pack(base / "custom_nodes" / PACK_FOLDER)
    shutil.copy2(FIXTURE_NODES, base / "custom_nodes" / FIXTURE_NODES.name)
    return base
