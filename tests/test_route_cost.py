"""benchmarks/route_cost.py on a CPU (dry run): every shipped sparse preset of the section gets
every stage, and routing is the sum of its parts."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dry_run_times_every_stage_of_every_shipped_preset(tmp_path, device):
    if device.type == "cuda":
        pytest.skip("the dry run is the CPU check; the GPU runs the real thing")
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("route_cost", BENCH / "route_cost.py")
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    rc.main(["--dry-run", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "route_cost.json").read_text())
    (case,) = result["cases"]
    assert case["shape"] == "tiny" and case["dense_ms"] > 0
    names = [r["preset"] for r in case["rows"]]
    assert {"psa_quality", "psa_fast", "psa_balanced"} <= set(names)
    for r in case["rows"]:
        assert r["routing_ms"] == pytest.approx(r["estimate_ms"] + r["levels_ms"] + r["heavy_ms"])
        assert (r["heavy_ms"] > 0) == (r["heavy_keys"] > 0)
        assert r["call_ms"] > 0 and r["pyramid_ms"] > 0
