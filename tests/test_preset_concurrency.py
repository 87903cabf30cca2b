"""Concurrent saves into one user presets file: processes and threads saving different names at
the same time all survive, and every call's answer is true."""
import subprocess
import sys
import threading

import yaml

from pack_import import REPO, pack_module

presets = pack_module("nodes.presets")
PSAConfig = pack_module("psa_kernels.config").PSAConfig
SECTION = "Wan2.1_1.3b"
PROCESSES, ROUNDS = 6, 4

# Each process imports the pack, waits at a shared start line (a file appearing), then saves
# its ROUNDS presets as fast as it can, printing every answer.
SAVER = r"""
import os, sys, time, types
sys.path.insert(0, sys.argv[1])
from pack_import import PACKAGE, REPO, pack_module
# The store needs only psa_kernels' config modules: a bare package entry keeps the package's
# __init__ (torch and the kernels) from loading, so the processes start in a moment.
kernels = types.ModuleType(PACKAGE + ".psa_kernels")
kernels.__path__ = [str(REPO / "psa_kernels")]
sys.modules[kernels.__name__] = kernels
presets = pack_module("nodes.presets")
config = pack_module("psa_kernels.config")
user, go, who, rounds = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
store = presets.PresetStore(user=user)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for r in range(rounds):
    print(store.save("Wan2.1_1.3b", f"p{who}_{r}", config.PSAConfig(warmup_steps=r + 1), overwrite=False), flush=True)
"""


def _saved(path) -> dict:
    return yaml.safe_load(path.read_text())[SECTION]["attention_configs"]


def test_processes_saving_different_names_all_survive(tmp_path):
    user = tmp_path / "user" / "attention_presets.yaml"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, str(REPO / "tests"), str(user), str(go), str(i),
                               str(ROUNDS)], stdout=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        answers = [p.communicate(timeout=300)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert all(p.returncode == 0 for p in procs)
    assert answers == [["saved"] * ROUNDS] * PROCESSES
    saved = _saved(user)
    expected = {f"p{i}_{r}" for i in range(PROCESSES) for r in range(ROUNDS)}
    assert set(saved) == expected
    assert all(saved[f"p{i}_{r}"]["warmup_steps"] == r + 1 for i in range(PROCESSES) for r in range(ROUNDS))
    assert not [p for p in user.parent.iterdir() if p.name.endswith(".tmp")]


def test_threads_saving_different_names_all_survive(tmp_path):
    user = tmp_path / "attention_presets.yaml"
    threads, rounds = 8, 5
    start = threading.Barrier(threads)
    answers, errors = [], []

    def work(i):
        store = presets.PresetStore(user=user)  # one store per thread, as separate nodes would be
        start.wait()
        for r in range(rounds):
            try:
                answers.append(store.save(SECTION, f"t{i}_{r}", PSAConfig(warmup_steps=r), overwrite=False))
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(e)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert errors == []
    assert answers == ["saved"] * (threads * rounds)
    assert set(_saved(user)) == {f"t{i}_{r}" for i in range(threads) for r in range(rounds)}


def test_one_shared_store_across_threads_then_same_name_answers_unchanged_or_exists(tmp_path):
    user = tmp_path / "attention_presets.yaml"
    store = presets.PresetStore(user=user)
    results = []

    def work(warmup):
        try:
            results.append(store.save(SECTION, "same", PSAConfig(warmup_steps=warmup), overwrite=False))
        except presets.ConfigError as e:
            results.append(str(e))

    pool = [threading.Thread(target=work, args=(i % 2,)) for i in range(6)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    # exactly one save wrote; the same preset again is unchanged, the other one already exists
    assert results.count("saved") == 1
    written = _saved(user)["same"]["warmup_steps"]
    for r in results:
        assert r in ("saved", "unchanged") or "already exists" in r
    assert results.count("unchanged") == 2 and sum("already exists" in r for r in results) == 3
    assert store.library().resolve(SECTION, "same").config.warmup_steps == written
