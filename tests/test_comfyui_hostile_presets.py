"""Hostile user presets files in real ComfyUI ($COMFYUI_PATH): ComfyUI starts, the three PSA
nodes are there, the shipped presets stay, the Loader's description names each problem with
its file and line, and what is valid in the file still loads. Without COMFYUI_PATH these are
skipped, with a warning saying so."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from comfy_harness import ComfyServer, comfyui_path_or_skip, execution_error, new_base

NODE_IDS = ("PSALoader", "PSAPresetEditor", "ApplyPSA")
SECTION = "Wan2.1_1.3b"
SHIPPED_PRESETS = {"baseline", "psa_balanced", "psa_topk", "psa_4steps"}
GOOD = "    still_good: {type: psa, mask_mode: topk, warmup_steps: 2}\n"

BAD_VALUES = (f"{SECTION}:\n"
              "  default_attention: [a]\n"
              "  attention_configs:\n"
              "    inf_warmup: {warmup_steps: .inf}\n"
              f"    long_number: {{warmup_steps: {'9' * 5000}}}\n"
              f"{GOOD}")


def _bomb() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    lines.append(f"{SECTION}:\n  attention_configs:\n    x: {{description: *i}}")
    return "\n".join(lines) + "\n"


# (id, bytes of the user file, words the Loader's description must show, a preset that still loads)
HOSTILE_FILES = [
    ("latin-1", f"{SECTION}:\n  attention_configs:\n    caf\u00e9: {{warmup_steps: 1}}\n".encode("latin-1"),
     ["(line 3)", "not UTF-8 text"], "caf\ufffd"),
    ("utf-16", f"{SECTION}:\n  attention_configs:\n{GOOD}".encode("utf-16"), [], "still_good"),
    ("20000 brackets", (f"{SECTION}: " + "[" * 20000 + "]" * 20000 + "\n").encode(), ["(line 1)", "nest"], None),
    ("alias bomb", _bomb().encode(), ["values once its aliases are expanded"], None),
    ("over 1 MiB", b"#" * (2 << 20), ["bytes; allowed: at most"], None),
]


@pytest.fixture(scope="module")
def comfy() -> Path:
    return comfyui_path_or_skip()


def user_file(base: Path) -> Path:
    return base / "user" / "default" / "psa" / "attention_presets.yaml"


def loader_info(server: ComfyServer) -> dict:
    info = server.get("/object_info")
    assert all(node in info for node in NODE_IDS), "a PSA node is missing:\n" + server.log_tail()
    return info["PSALoader"]


def wait_for(server: ComfyServer, check, timeout: float = 20.0):
    """The Loader's definition once ``check`` holds (the store re-reads a file whose stamp changed)."""
    deadline = time.time() + timeout
    while True:
        info = loader_info(server)
        if check(info) or time.time() > deadline:
            return info
        time.sleep(0.2)


def test_bad_values_at_start_then_every_hostile_file_while_running(comfy, tmp_path):
    base = new_base(tmp_path, comfy)
    path = user_file(base)
    path.parent.mkdir(parents=True)
    path.write_text(BAD_VALUES, encoding="utf-8")
    server = ComfyServer(comfy, base)
    try:
        loader = loader_info(server)
        options = set(loader["input"]["required"]["preset"][1]["options"])
        assert SHIPPED_PRESETS | {"still_good"} <= options
        assert not {"inf_warmup", "long_number"} & options
        description = loader["description"]
        for field, line in ((f"{SECTION}.default_attention", 2), (f"{SECTION}.attention_configs.inf_warmup"
                                                                   ".warmup_steps", 4),
                            (f"{SECTION}.attention_configs.long_number.warmup_steps", 5)):
            assert f"{path} (line {line}): {field}: got " in description, (field, description)
        assert len(description) < 4000  # the 5000-digit number is cut in the message
        # what is valid in the hostile file runs through ComfyUI's executor
        prompt = {"1": {"class_type": "PSALoader", "inputs": {"model_section": SECTION, "preset": "still_good"}},
                  "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        entry = server.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        preview = next(o["text"][0] for o in entry["outputs"].values() if "text" in o)
        assert "still_good:" in preview and "warmup_steps: 2" in preview and "mask_mode: topk" in preview

        for name, raw, words, still in HOSTILE_FILES:
            path.write_bytes(raw)
            loader = wait_for(server, lambda info: all(w in info["description"] for w in words)
                              and (still is None or still in info["input"]["required"]["preset"][1]["options"]))
            options = set(loader["input"]["required"]["preset"][1]["options"])
            assert SHIPPED_PRESETS <= options, name
            for word in words:
                assert word in loader["description"], (name, word, loader["description"])
            if still is not None:
                assert still in options, (name, options)
        assert server.proc.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize("name,raw,words", [(c[0], c[1], c[2]) for c in HOSTILE_FILES if c[0] in
                                           ("alias bomb", "20000 brackets")], ids=["alias bomb", "20000 brackets"])
def test_comfyui_starts_with_a_hostile_user_file(comfy, tmp_path, name, raw, words):
    base = new_base(tmp_path, comfy)
    path = user_file(base)
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    server = ComfyServer(comfy, base)
    try:
        loader = loader_info(server)
        assert SHIPPED_PRESETS <= set(loader["input"]["required"]["preset"][1]["options"])
        assert "WARNING" in loader["description"]
        for word in words:
            assert word in loader["description"] and word in server.log_text(), word
        assert path.read_bytes() == raw
    finally:
        server.stop()
