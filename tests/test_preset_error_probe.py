"""benchmarks/preset_error_probe.py on a tiny grid: a row per input kind, a cell per preset, and
the heavy-key count scaled to the sequence."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _probe():
    spec = importlib.util.spec_from_file_location("preset_error_probe", BENCH / "preset_error_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_grid_prints_one_row_per_kind_and_scales_heavy_keys(capsys):
    probe = _probe()
    probe.main(["--grid", "2", "8", "8", "--heads", "2", "--kinds", "mixed", "local",
                "--presets", "Wan2.1_1.3b/psa_fast", "l1_0.12+tail+heavy", "--heavy-per-token", "0.05"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "heavy keys [6]" in lines[0]          # 0.05 x 128 tokens
    assert lines[1].split()[1:] == ["Wan2.1_1.3b/psa_fast", "l1_0.12+tail+heavy"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"mixed", "local"}
    for cells in rows.values():
        errors = [float(c) for c in cells[0::2]]
        assert len(errors) == 2 and all(0.0 <= e < 1.5 for e in errors)


def test_unknown_preset_is_refused_with_the_allowed_names():
    with pytest.raises(SystemExit, match="l1_0.08"):
        _probe().main(["--presets", "Wan9/nothing"])
