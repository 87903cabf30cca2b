"""benchmarks/bench_peers.py and the Sol-Attn override of bench_wan_forward.py on a CPU.

The benchmark itself runs on the GPU machine; here its parts run at tiny sizes: the regime
inputs and their block-mass statistic, the torch stand-in for Sol-Attn (against
comfy_kitchen's own eager reference when the unpacked wheel is found in .kitchen/ or
KITCHEN_PATH), the fronts and the interpolation, the presets, and a whole dry run.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from psa_kernels import PSAConfig
from psa_kernels.synthetic import (HEAD_TYPES, block_mass_share, calibrate_logit_scale, relative_l2, structured_qkv,
                                   video_attention_qkv)

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bp = _load("bench_peers")


def _to_blhd(*ts):
    return [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1).contiguous() for t in ts]


# ---------------------------------------------------------------------- synthetic inputs
def test_structured_qkv_unchanged_signature_and_order():
    q, k, v = structured_qkv((2, 4, 4), heads=2, head_dim=16, seed=3)
    q2, _, _ = structured_qkv((2, 4, 4), heads=2, head_dim=16, seed=3)
    assert q.shape == (1, 2, 32, 16) and torch.equal(q, q2)


def test_video_attention_qkv_shapes_seed_and_bad_head_type():
    a = video_attention_qkv((2, 4, 6), heads=5, head_dim=32, head_types=bp.MIXED_HEADS, seed=4)
    b = video_attention_qkv((2, 4, 6), heads=5, head_dim=32, head_types=bp.MIXED_HEADS, seed=4)
    c = video_attention_qkv((2, 4, 6), heads=5, head_dim=32, head_types=bp.MIXED_HEADS, seed=5)
    assert all(x.shape == (1, 5, 48, 32) and x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match=r"head_types: got 'radial'; allowed: local, spatial"):
        video_attention_qkv((2, 4, 6), head_types=("radial",))


def _attention_rows(q, k, h, rows):
    return torch.softmax(q[0, h, rows] @ k[0, h].T / math.sqrt(q.shape[-1]), dim=-1)


def test_head_types_attend_where_their_names_say():
    T, Hh, W = 6, 8, 8
    q, k, _ = video_attention_qkv((T, Hh, W), heads=5, head_dim=128, head_types=HEAD_TYPES, seed=2)
    pos = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij"), -1).reshape(-1, 3)
    rows = torch.arange(0, T * Hh * W, 37)
    same_frame = (pos[rows, None, 0] == pos[None, :, 0]).float()
    same_place = ((pos[rows, None, 1:] == pos[None, :, 1:]).all(-1)).float()
    kinds = dict(zip(HEAD_TYPES, range(5)))
    p = {kind: _attention_rows(q, k, h, rows) for kind, h in kinds.items()}
    mass = lambda kind, where: float((p[kind] * where).sum(-1).mean())  # noqa: E731
    # a frame is 1/6 of the keys and a spatial position 1/64: each kind far above its share
    assert mass("spatial", same_frame) > 0.6 > mass("temporal", same_frame)
    assert mass("temporal", same_place) > 0.4 > mass("spatial", same_place)
    share = block_mass_share(q, k, rows=64, block=16)
    assert share[kinds["uniform"]] < 0.3 < share[kinds["local"]]
    # sink heads: the tokens every query attends are the same for all queries
    top = p["sink"].topk(3, dim=-1).indices
    assert (top[:, :1] == top[:1, :1]).float().mean() > 0.8


def test_block_mass_share_uniform_and_one_hot():
    L, D = 640, 16
    k = torch.randn(1, 2, L, D)
    assert torch.allclose(block_mass_share(torch.zeros(1, 2, L, D), k, rows=32), torch.full((2,), 0.1), atol=1e-6)
    # every query matches its own key far better than the rest: all of the mass in one block
    k = F.normalize(torch.randn(1, 2, L, 64), dim=-1)
    q = 400.0 * k
    assert torch.all(block_mass_share(q, k, rows=32) > 0.99)


@pytest.mark.parametrize("per_head", [False, True])
def test_calibrate_logit_scale_hits_the_target(per_head):
    q, k, _ = video_attention_qkv((3, 8, 16), heads=3, head_dim=64, head_types=("local", "uniform", "spatial"), seed=1)
    s = calibrate_logit_scale(q, k, 0.45, per_head=per_head, rows=64)
    scale = s.view(1, -1, 1, 1) if per_head else s
    share = block_mass_share(q * scale, k, rows=64)
    if per_head:
        assert torch.allclose(share, torch.full((3,), 0.45), atol=2e-3)
    else:
        assert abs(float(share.mean()) - 0.45) < 2e-3 and float(share.max() - share.min()) > 0.05
    # sharper attention, larger share
    assert float(block_mass_share(q * scale * 2, k, rows=64).mean()) > 0.5
    with pytest.raises(ValueError, match="target: got 1.2"):
        calibrate_logit_scale(q, k, 1.2)


def test_make_inputs_reports_its_statistic():
    regime = bp.REGIMES["diffuse"]
    q, k, v, stats = bp.make_inputs("tiny", regime, torch.device("cpu"), torch.float32, rows=64)
    (T, Hh, W), heads = bp.SHAPES["tiny"]
    assert q.shape == (1, T * Hh * W, heads * bp.HEAD_DIM) and q.is_contiguous()
    assert stats["target_top10_share"] == regime.target_for("tiny") == 0.45
    assert abs(stats["top10_share"] - 0.45) < 5e-3 and len(stats["top10_share_per_head"]) == heads
    assert bp.REGIMES["diffuse"].target_for("720p") == 0.35


# ---------------------------------------------------------------------- reference and error
def test_dense_reference_in_chunks_and_relative_error():
    q, k, v = video_attention_qkv((2, 4, 8), heads=3, head_dim=32, seed=6)
    qb, kb, vb = _to_blhd(q, k, v)
    ref = bp.dense_reference(qb, kb, vb, heads=3, rows=7)
    assert torch.allclose(ref, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    out = (ref + 0.01 * torch.randn_like(ref)).to(torch.bfloat16)
    out_blhd = _to_blhd(out)[0]
    assert bp.relative_error(out_blhd, ref) == pytest.approx(relative_l2(out, ref), rel=1e-9)


# ---------------------------------------------------------------------- Sol-Attn's maths
def _sol_inputs(seed=3):
    q, k, v = video_attention_qkv((4, 12, 25), heads=2, head_dim=128, head_types=("local", "sink"), seed=seed)
    return q, k, v, *(t.transpose(1, 2).contiguous() for t in (q, k, v))


def test_sol_standin_routing_everything_is_dense_attention():
    q, k, v, qs, ks, vs = _sol_inputs()
    out = bp.sol_standin(qs, ks, vs, tau=-1e9)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), atol=2e-5)
    exact = bp.sol_routing(qs, ks, tau=-1e9)[0]
    assert bool(exact.all())


def test_sol_routing_modes():
    _, _, _, qs, ks, _ = _sol_inputs()
    n = -(-qs.shape[1] // bp.SOL_BLOCK)
    routed = {tau: bp.sol_routed_share(qs, ks, bp.SolSetting(tau=tau)) for tau in (0.5, 1.3, 3.0)}
    assert routed[0.5] > routed[1.3] > routed[3.0] >= (3 * n - 2) / n ** 2 - 1e-6   # the diagonal band always
    exact = bp.sol_routing(qs, ks, 0.0, topk_ratio=0.2)[0]
    band = 3 * n - 2
    kept_beyond_band = exact.sum(-1).float().mean() - band / n
    assert 0 < kept_beyond_band <= round(0.2 * n)


def test_sol_standin_tail_and_extra_tokens_bring_it_closer_to_dense():
    q, k, v, qs, ks, vs = _sol_inputs()
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    err = lambda o: float((o - ref).norm() / ref.norm())  # noqa: E731
    base, extra = bp.sol_standin(qs, ks, vs, tau=2.0), bp.sol_standin(qs, ks, vs, tau=2.0, token_aug=256)
    assert 0 < err(extra) < err(base)
    with pytest.raises(ValueError, match="sink_blocks/sink_q"):
        bp.sol_standin(qs, ks, vs, sink_blocks=[0, 2])


def _kitchen_or_skip():
    sys.path.insert(0, str(BENCH))
    from sol_kitchen import KITCHEN, add_kitchen_to_path
    if not add_kitchen_to_path():
        reason = f"no unpacked comfy-kitchen wheel in {KITCHEN} (KITCHEN_PATH): Sol's eager reference NOT compared"
        warnings.warn(reason, UserWarning, stacklevel=2)
        pytest.skip(reason)
    import comfy_kitchen
    return comfy_kitchen


@pytest.mark.parametrize("kw", [{"tau": 1.3}, {"tau": 0.5}, {"tau": 3.0}, {"topk_ratio": 0.1}, {"topk_ratio": 0.2}])
def test_sol_standin_matches_comfy_kitchen_eager_reference(kw):
    ck = _kitchen_or_skip()
    q, k, v, qs, ks, vs = _sol_inputs(seed=8)
    # on a CPU the registry serves comfy_kitchen's eager (float32) reference of sol_attn
    theirs = ck.sol_attn(qs, ks, vs, **kw)
    assert torch.allclose(bp.sol_standin(qs, ks, vs, **kw), theirs, atol=1e-5)
    # and the benchmark's call, on [B, L, H*D] inputs, is that call
    qb, kb, vb = _to_blhd(q, k, v)
    s = bp.SolSetting(tau=kw.get("tau", 1.3), topk_ratio=kw.get("topk_ratio", 0.0), extra_tokens=0)
    assert torch.allclose(bp.sol_call(ck.sol_attn, qb, kb, vb, 2, s), theirs.reshape(qb.shape), atol=1e-6)


def test_load_sol_without_a_compiled_kernel_says_why():
    fn, why = _load("sol_kitchen").load_sol(torch.device("cpu"))
    assert fn is None and ("no compiled kernel for cpu" in why or "not importable" in why)


def test_probe_sol_says_once_when_the_kernel_cannot_run():
    fn, label = bp.probe_sol((bp.sol_standin, "stand-in"), torch.device("cpu"), torch.float32)
    assert fn is bp.sol_standin and "relative L2" in label and float(label.rsplit(" ", 1)[1].rstrip(")")) < 1e-5

    def no_driver(*args, **kwargs):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
    fn, label = bp.probe_sol((no_driver, "comfy_kitchen 0.2.40"), torch.device("cpu"), torch.float32)
    assert fn is None and "probe call failed: RuntimeError: CUDA driver version is insufficient" in label


# ---------------------------------------------------------------------- fronts
def test_pareto_front():
    pts = [(2.0, 0.10), (3.0, 0.10), (3.0, 0.20), (1.0, 0.05), (4.0, 0.30), None, (2.5, 0.30), (1.0, 0.05)]
    assert bp.pareto_front(pts) == [False, True, False, True, True, False, False, True]


def test_error_at_speed():
    front = [(4.0, 0.3), (2.0, 0.1), (3.0, 0.2)]
    assert bp.error_at_speed(front, 2.5) == pytest.approx(0.15)
    assert bp.error_at_speed(front, 3.0) == pytest.approx(0.2)
    assert bp.error_at_speed(front, 1.0) == pytest.approx(0.1)   # slower than the front: its slowest point
    assert bp.error_at_speed(front, 4.5) is None
    assert bp.error_at_speed([], 1.0) is None


def test_summary_targets():
    rows = [{"method": "Sol-Attn", "setting": "tau 1.3 extra 256", "speedup": 4.0, "error": 0.10, "sol_default": True},
            {"method": "Sol-Attn", "setting": "tau 3 extra 0", "speedup": 6.0, "error": 0.30},
            {"method": "PSA", "setting": "a", "speedup": 3.0, "error": 0.05},
            {"method": "PSA", "setting": "b", "speedup": 5.5, "error": 0.09},
            {"method": "PSA", "setting": "c", "speedup": 7.0, "error": 0.40},
            {"method": "PSA", "setting": "d+tail", "speedup": None, "error": None, "na": "NotImplementedError"}]
    case = {"rows": rows}
    bp.summarize(case)
    by_sol = {c["sol"]: c for c in case["vs_sol"]}
    assert by_sol["tau 1.3 extra 256"]["psa"] == "b" and by_sol["tau 1.3 extra 256"]["ratio"] == pytest.approx(5.5 / 4)
    assert by_sol["tau 3 extra 0"]["psa"] == "b" and by_sol["tau 3 extra 0"]["ratio"] == pytest.approx(5.5 / 6)
    # at 4.0x our front (3.0, 0.05) - (5.5, 0.09) reads 0.066
    assert case["at_sol_default"]["psa_error_at_equal_speed"] == pytest.approx(0.05 + 0.04 * 1.0 / 2.5)
    assert case["at_sol_default"]["ratio"] == pytest.approx(0.66)
    assert case["psa_error_at_5x"] == pytest.approx(0.05 + 0.04 * 2.0 / 2.5)
    assert [r["front_psa"] for r in rows if r["method"] == "PSA"] == [True, True, True, False]
    # Sol's tau 3 (6.0x at 0.30) stays on the joint front: only a slower or less accurate PSA beats it
    assert [r["front_joint"] for r in rows] == [False, True, True, True, True, False]
    # the printed summary counts the settings at the target, per case and in all
    case.update(shape="480p", regime="mixed", inputs={"top10_share": 0.6})
    lines = []
    bp.print_summary({"cases": [case, case]}, lines.append)
    assert sum("at >= 1.3: 1/2" in line for line in lines) == 2
    assert lines[-1] == "Sol settings at >= 1.3x in this run: 2 of 4"
    assert sum("(< 1.3)" in line for line in lines) == 2


# ---------------------------------------------------------------------- settings
def test_sol_settings_cover_the_knobs():
    full = bp.sol_settings()
    assert len(full) == 16 and sum(s.is_default for s in full) == 1
    assert {s.tau for s in full if not s.topk_ratio} == {0.5, 1.0, 1.3, 2.0, 3.0}
    assert {s.topk_ratio for s in full if s.topk_ratio} == {0.05, 0.1, 0.2}
    assert {s.extra_tokens for s in full} == {0, 256}
    assert len(set(s.name for s in full)) == 16


def test_psa_presets_parse_pair_with_their_tail_twins_and_hit_their_densities():
    presets = bp.psa_presets()
    names = list(presets)
    assert "Wan2.1_1.3b/psa_topk" in names and "Wan2.1_14b/psa_balanced" in names
    assert not any(n.startswith("CogVideo") for n in names)
    # last of all: every tail preset with the spread correction switched (on, or off for the
    # shipped presets that have it)
    spread = [n for n in names if n.endswith((bp.SPREAD, bp.NO_SPREAD))]
    assert spread and names[-len(spread):] == spread
    for n in spread:
        base, value = (n[:-len(bp.SPREAD)], "variance") if n.endswith(bp.SPREAD) else (n[:-len(bp.NO_SPREAD)], "none")
        assert presets[n] == {**presets[base], "tail_correction": value} and presets[base] != presets[n]
    assert len(spread) == sum(bool(p.get("use_pooled_tail")) for n, p in presets.items() if n not in spread)
    assert any(n.endswith(bp.NO_SPREAD) for n in spread) and any(n.endswith(bp.SPREAD) for n in spread)
    names = names[:-len(spread)]
    heavy = [n for n in names if n.endswith(tuple(f"_h{c}" for c in bp.HEAVY_COUNTS))]  # last of all
    assert heavy and names[-len(heavy):] == heavy
    for n in heavy:
        base, count = n.rsplit("_h", 1)
        assert presets[base]["use_pooled_tail"] and presets[n] == {**presets[base], "heavy_keys": int(count)}
    assert len(heavy) == len(bp.HEAVY_COUNTS) * sum(bool(p.get("use_pooled_tail")) and not p.get("heavy_keys")
                                                    for n, p in presets.items() if n in names and n not in heavy)
    names = names[:-len(heavy)]
    tail_only = [n for n in names if n.startswith(("tail64_", "tail128_"))]  # the tail-only sweeps come next
    assert names[-len(tail_only):] == tail_only
    assert len(tail_only) == 2 * (len(bp.TAIL_L1) + len(bp.TAIL_PYRAMID_SCALE) + len(bp.TAIL128_L1))
    for n in tail_only:
        cfg = PSAConfig.from_dict(presets[n], n)
        assert cfg.use_pooled_tail and n.endswith(cfg.estimate_method)
        assert cfg.block_size.n == int(n.split("_")[0][len("tail"):])
        if "_l1_" in n:  # level 1 alone, on the share the name gives
            assert cfg.level_ranges()[0][1:] == (0.0, float(n.split("_")[2]))
    names = names[:-len(tail_only)]
    for plain, tail in zip(names[::2], names[1::2]):
        assert tail == plain + bp.TAIL or plain == tail + bp.NO_TAIL
        assert bp.tail_twins(presets[plain], presets[tail]) and not bp.tail_twins(presets[tail], presets[plain])
        a, b = PSAConfig.from_dict(presets[plain], plain), PSAConfig.from_dict(presets[tail], tail)
        assert not a.use_pooled_tail and b.use_pooled_tail and a.replace(use_pooled_tail=True) == b
    assert not bp.tail_twins(presets["topk_d0.10"], presets["topk_d0.20+tail"])
    for d in bp.TOPK_DENSITIES:
        cfg = PSAConfig.from_dict(presets[f"topk_d{d:.2f}"])
        density = sum((hi - lo) / lvl for lvl, lo, hi in cfg.level_ranges() if lvl)
        assert density == pytest.approx(d, abs=1e-3)
    quick = bp.psa_presets(quick=True)
    assert set(quick) < set(presets) and len(quick) == 12


def test_a_shipped_preset_with_the_tail_keeps_its_name(monkeypatch):
    shipped = {"Wan9/psa_tail": {**bp.topk_preset(0.1), "use_pooled_tail": True}}
    monkeypatch.setattr(bp, "shipped_presets", lambda: dict(shipped))
    presets = bp.psa_presets()
    assert list(presets)[:2] == ["Wan9/psa_tail-notail", "Wan9/psa_tail"]
    assert presets["Wan9/psa_tail"] == shipped["Wan9/psa_tail"]
    assert presets["Wan9/psa_tail-notail"]["use_pooled_tail"] is False


def test_parse_args_and_preset_selection(tmp_path):
    a = bp.parse_args([])
    assert a.shapes == ["480p", "720p"] and a.regimes == list(bp.REGIMES) and not a.dry_run
    assert bp.parse_args(["--dry-run"]).shapes == ["tiny"]
    a = bp.parse_args(["--shapes", "720p", "--regimes", "mixed", "diffuse", "--quick", "--psa", "topk_d0.10*"])
    assert a.shapes == ["720p"] and a.regimes == ["mixed", "diffuse"]
    assert list(bp.select_presets(a)) == ["topk_d0.10", "topk_d0.10+tail"]
    extra = tmp_path / "extra.yaml"
    extra.write_text("mine:\n  mask_mode: topk\n  mask_ratios: {1: [0.0, 0.2], 0: [0.2, 1.0]}\n")
    a = bp.parse_args(["--presets-yaml", str(extra), "--psa", "mine"])
    assert bp.select_presets(a) == {"mine": {"mask_mode": "topk", "mask_ratios": {1: [0.0, 0.2], 0: [0.2, 1.0]}}}
    with pytest.raises(SystemExit):
        bp.parse_args(["--shapes", "1080p"])


def test_gpu_run_refuses_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="no CUDA device"):
        bp.main(["--out", str(tmp_path)])


# ---------------------------------------------------------------------- a whole dry run
def test_dry_run_writes_tables_and_plot(tmp_path):
    result = bp.main(["--dry-run", "--quick", "--regimes", "mixed", "--psa", "topk_d0.10*", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json", "peers.md", "peers_mixed.png"]
    data = json.loads((tmp_path / "peers.json").read_text())
    assert data["dry_run"] and "NOT Sol-Attn" in data["sol"]
    (case,) = data["cases"]
    sol = [r for r in case["rows"] if r["method"] == "sol-standin"]
    psa = [r for r in case["rows"] if r["method"] == "PSA"]
    assert len(sol) == 8 and all(0 < r["error"] < 1 and r["ms"] > 0 for r in sol)
    assert [r["setting"] for r in psa] == ["topk_d0.10", "topk_d0.10+tail"]
    assert psa[0]["error"] > 0 and psa[0]["density"] == pytest.approx(0.1, abs=0.02)
    # the tail row: a number once the library honours use_pooled_tail, n/a while it does not
    assert psa[1].get("na", "").startswith("NotImplementedError: use_pooled_tail not honoured") or psa[1]["error"] > 0
    assert len(case["vs_sol"]) == 8 and "at_sol_default" in case
    assert abs(case["inputs"]["top10_share"] - 0.6) < 5e-3
    md = (tmp_path / "peers.md").read_text()
    assert "DRY RUN" in md and "| sol-standin | tau 1.3 extra 256 |" in md
    assert result["cases"][0]["regime"] == "mixed"
    # the first preset that ran is timed again after the last (the drift check)
    drift = case["drift"]
    assert drift["setting"] == "topk_d0.10" and drift["first_ms"] == psa[0]["ms"] and drift["again_ms"] > 0
    assert drift["ratio"] == pytest.approx(drift["again_ms"] / drift["first_ms"])
    assert f"Timing drift: topk_d0.10 took {drift['first_ms']:.3f} ms first" in md


def test_drift_lines_flag_a_run_whose_speed_moved():
    steady = {"drift": {"setting": "p", "first_ms": 1.0, "again_ms": 1.05, "ratio": 1.05}}
    moved = {"drift": {"setting": "p", "first_ms": 1.0, "again_ms": 1.4, "ratio": 1.4}}
    assert bp.drift_lines({}) == []
    assert "moved" not in bp.drift_lines(steady)[0] and "(x1.05)" in bp.drift_lines(steady)[0]
    assert "the host or GPU speed moved during this case" in bp.drift_lines(moved)[0]


# ---------------------------------------------------------------------- bench_wan_forward's Sol override
SOL_OVERRIDE_SCRIPT = r"""
import importlib.util, json, sys, torch
sys.argv = ["sol_override_check", "--cpu"]
import comfy.options; comfy.options.enable_args_parsing()
import comfy.ops
from comfy.ldm.wan.model import WanModel
bench = sys.argv_real[0]
def load(name):
    spec = importlib.util.spec_from_file_location(name, f"{bench}/{name}.py")
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
    return mod
wf, bp = load("bench_wan_forward"), load("bench_peers")
torch.manual_seed(0)
m = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=16, dim=256, ffn_dim=512, freq_dim=256, text_dim=4096,
             out_dim=16, num_heads=2, num_layers=2, operations=comfy.ops.disable_weight_init)
with torch.no_grad():
    for p in m.parameters():
        p.normal_(0, 1.0 / max(1, p.shape[-1]) ** 0.5) if p.dim() > 1 else p.normal_(0, 0.02)
x, t, ctx = torch.randn(1, 16, 4, 32, 32), torch.full((1,), 500.0), torch.randn(1, 16, 4096)
def run(override=None):
    with torch.no_grad():
        return m(x, t, ctx, transformer_options={} if override is None else {"optimized_attention_override": override})
def exact(q, k, v, *, tau, scale, sink_blocks, sink_q, topk_ratio, token_aug):  # sol_attn's keywords, no others
    assert q.shape[-1] == 128 and q.dim() == 4 and sink_blocks == [0, 0] and sink_q == [0, 0]
    return torch.nn.functional.scaled_dot_product_attention(*(a.transpose(1, 2) for a in (q, k, v))).transpose(1, 2)
dense = run()
err = lambda o: float((o - dense).norm() / dense.norm())
res = {}
half = lambda q, k, v, **kw: 0.5 * exact(q, k, v, **kw)
for name, ov in {"exact": wf.SolOverride(exact, lambda d: True, 1.3, min_tokens=0),
                 "half": wf.SolOverride(half, lambda d: True, 1.3, min_tokens=0),
                 "standin": wf.SolOverride(bp.sol_standin, lambda d: True, 3.0, extra_tokens=0, min_tokens=0),
                 "short": wf.SolOverride(exact, lambda d: True, 1.3),
                 "unavailable": wf.SolOverride(exact, lambda d: False, 1.3, min_tokens=0)}.items():
    res[name] = {"err": err(run(ov)), "calls": ov.calls}
print("RESULT" + json.dumps(res))
"""


def test_sol_override_in_comfyui_wan_forward():
    from comfy_harness import comfyui_path_or_skip
    comfy = comfyui_path_or_skip()
    code = "import sys; sys.argv_real = sys.argv[1:]\n" + SOL_OVERRIDE_SCRIPT
    proc = subprocess.run([sys.executable, "-c", code, str(BENCH)], cwd=comfy, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "KITCHEN_PATH": str(REPO / "no-kitchen-here")})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(line[len("RESULT"):])
    # two layers: self-attention (1024 tokens) to Sol, cross-attention (16 text tokens) dense
    assert res["exact"]["calls"] == {"sol": 2, "dense": 2} and res["exact"]["err"] < 1e-4
    # its output is what the layer uses (exact: the same forward; halved: another one)
    assert res["half"]["calls"] == {"sol": 2, "dense": 2} and res["half"]["err"] > 1e-3
    # random weights attend almost uniformly, which Sol's pooled tail represents well
    assert res["standin"]["calls"] == {"sol": 2, "dense": 2} and 1e-6 < res["standin"]["err"] < 0.1
    # under the node's min_tokens (12288), or without a kernel for the device: ComfyUI's attention
    for name in ("short", "unavailable"):
        assert res[name]["calls"] == {"sol": 0, "dense": 4} and res[name]["err"] == 0.0


def test_bench_wan_forward_help_lists_the_sol_options():
    out = subprocess.run([sys.executable, str(BENCH / "bench_wan_forward.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--sol-tau" in out.stdout and "--sol-extra-tokens" in out.stdout


def test_result_from_logs_rebuilds_cases_and_takes_each_from_the_first_log_that_has_it_whole():
    shipped = bp.psa_presets()
    name = next(n for n, p in shipped.items() if p.get("use_pooled_tail"))
    rows = [{"method": "Sol-Attn", "setting": "tau 1.3 extra 256", "ms": 4.0, "speedup": 2.5, "error": 0.05,
             "routed_share": 0.1},
            {"method": "Sol-Attn", "setting": "topk 0.05 extra 0", "ms": 2.0, "speedup": 5.0, "error": 0.08,
             "routed_share": 0.05},
            {"method": "PSA", "setting": name, "ms": 2.5, "speedup": 4.0, "error": 0.04, "density": 0.1}]
    whole = "\n".join(["== 480p mixed: heads; top-10% block share 0.600 (target 0.6), inputs 0.1 s",
                       "   cuDNN SDPA: 10.000 ms, error 0.0017", *("   " + bp.format_row(r) for r in rows),
                       f"   drift check: {name} 2.500 ms first, 3.000 ms at the end (x1.20)  (timing drifted)"])
    cut = "\n".join(["== 480p mixed: heads; top-10% block share 0.610 (target 0.6), inputs 0.1 s",
                     "   cuDNN SDPA: 11.000 ms, error 0.0017", "   " + bp.format_row(rows[0])])
    result = bp.result_from_logs([cut, whole], shipped)   # the cut case has no PSA row: the whole one wins
    (case,) = result["cases"]
    assert case["dense"]["ms"] == 10.0 and case["inputs"]["top10_share"] == 0.6
    sol_default, sol_topk, psa = case["rows"]
    assert sol_default["sol_default"] and sol_default["tau"] == 1.3 and sol_default["extra_tokens"] == 256
    assert sol_topk["topk_ratio"] == 0.05 and not sol_topk["sol_default"] and sol_topk["routed_share"] == 0.05
    assert psa["use_pooled_tail"] and psa["density"] == 0.1
    assert case["drift"] == {"setting": name, "first_ms": 2.5, "again_ms": 3.0, "ratio": pytest.approx(1.2)}
    by_sol = {c["sol"]: c for c in case["vs_sol"]}
    assert by_sol["tau 1.3 extra 256"]["psa"] == name and by_sol["tau 1.3 extra 256"]["ratio"] == pytest.approx(1.6)
    assert by_sol["topk 0.05 extra 0"]["ratio"] == pytest.approx(0.8)
    assert "## 480p mixed" in bp.markdown({**result, "device": "GPU", "when": "now", "torch": "t", "sol": "s",
                                          "dry_run": False})
