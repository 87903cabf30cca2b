"""Apply PSA against the attention hook of the newest ComfyUI, through the test double in
comfy_newest.py (that version cannot run here; the 0.3.64 snapshot runs in test_comfyui.py):
containers, the layer's preferred attention, "Model Attention Backend" and "Model Sparse
Attention" applied before or after Apply PSA, re-installation at every step."""
import sys
import types

import pytest
import torch

import comfy_newest as newest
from pack_import import pack_module

patch = pack_module("nodes.patch")
presets = pack_module("nodes.presets")
PSAConfig = pack_module("psa_kernels.config").PSAConfig

CFG = PSAConfig.from_dict({"type": "psa", "block_size": {"m": 32, "n": 32, "tile_n": 32}, "warmup_steps": 1,
                           "mask_ratios": {1: [0.0, 0.3], 2: [0.3, 0.5], 8: [0.5, 0.7], 0: [0.7, 1.0]}})
X = torch.randn(1, 16, 2, 16, 16, generator=torch.Generator().manual_seed(1))    # a 2x8x8 token grid
TEXT = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def comfy_modules(monkeypatch):
    """apply_psa imports comfy.patcher_extension: the double's, for these tests only."""
    comfy = types.ModuleType("comfy")
    comfy.patcher_extension = newest.patcher_extension
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.patcher_extension", newest.patcher_extension)
    newest.CALLS.clear()


def apply_psa(model, cfg=CFG):
    return patch.apply_psa(model, presets.PSAPreset("Wan2.1_1.3b", "test", cfg))


def base(preferred=None):
    wan = newest.TinyWan()
    if preferred is not None:  # a checkpoint that chose its attention per layer
        for block in wan.blocks:
            block.self_attn.comfy_attention.function = preferred
            block.cross_attn.comfy_attention.function = preferred
    return newest.ModelPatcher(wan)


def run(model, steps=3):
    newest.CALLS.clear()
    outs, options = newest.sample(model, X, TEXT, steps)
    return outs, options, dict(newest.CALLS)


def chain(override) -> list[str]:
    """The overrides a call passes through, outermost first."""
    names = []
    while override is not None and len(names) < 50:
        if isinstance(override, patch.PSAOverride):
            names.append("psa")
            override = override.inner
        else:
            names.append(override.__name__)
            cells = dict(zip(override.__code__.co_freevars, (c.cell_contents for c in override.__closure__ or ())))
            override = cells.get("previous")
    return names


def test_psa_takes_self_attention_after_warm_up_and_comfyui_default_the_rest():
    model = base()
    ref, _, ref_calls = run(model)
    outs, options, calls = run(apply_psa(model))
    assert torch.equal(outs[0], ref[0])                     # warm-up step: the model's attention
    assert all(not torch.equal(o, r) for o, r in zip(outs[1:], ref[1:]))
    # 2 blocks x (self + cross) per step; after warm-up the 2 self-attention calls per step are PSA's
    assert ref_calls == {"attention_pytorch": 12} and calls == {"attention_pytorch": 12 - 2 * 2}
    assert chain(options["transformer_options"][patch.OVERRIDE_KEY]) == ["psa"]


def test_declined_calls_run_the_layers_preferred_attention():
    # Without an override ComfyUI runs the attention the checkpoint chose per layer; once any
    # override is set it no longer does, so PSA runs it for every call it declines.
    model = base(preferred=newest.attention_kitchen)
    ref, _, ref_calls = run(model)
    assert ref_calls == {"attention_kitchen_containers": 12}
    dense, _, calls = run(apply_psa(model, PSAConfig.from_dict({"type": "dense"})))
    assert all(torch.equal(o, r) for o, r in zip(dense, ref))  # bit-identical to the unpatched model
    assert calls == {"attention_kitchen": 12}
    sparse, _, calls = run(apply_psa(model))
    assert torch.equal(sparse[0], ref[0]) and calls == {"attention_kitchen": 12 - 4}


def test_backend_node_before_or_after_apply_psa_gives_the_same_model(caplog):
    model = base()
    backend_only = model.clone()
    backend_only.set_model_optimized_attention(newest.attention_kitchen)
    before = apply_psa(backend_only)                         # Model Attention Backend -> Apply PSA
    after = apply_psa(model).clone()                         # Apply PSA -> Model Attention Backend
    after.set_model_optimized_attention(newest.attention_kitchen)
    assert chain(after.model_options["transformer_options"][patch.OVERRIDE_KEY]) == ["optimized_attention_override"]
    kitchen, _, _ = run(backend_only)
    with caplog.at_level("INFO", logger="psa"):
        first, _, calls_before = run(before)
    assert "ran PSA" in caplog.text and "replaced PSA's" not in caplog.text  # nothing came after PSA
    caplog.clear()
    with caplog.at_level("INFO", logger="psa"):
        second, options, calls_after = run(after)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(second[0], kitchen[0]) and not torch.equal(second[1], kitchen[1])
    # the backend takes containers, so PSA does too: declined calls hand them on unopened
    assert calls_before == calls_after == {"attention_kitchen_containers": 12 - 4}
    assert chain(options["transformer_options"][patch.OVERRIDE_KEY]) == ["psa", "optimized_attention_override"]
    log = caplog.text
    assert "an attention override set after Apply PSA" in log and "PSA is put back in front" in log
    assert "cross-attention and other lengths: ran comfy_newest.ModelPatcher.set_model_optimized_attention." \
           "optimized_attention_override -> attention_kitchen" in log
    assert "ran PSA" in log


@pytest.mark.parametrize("psa_first", [True, False])
def test_sparse_attention_node_and_psa_both_run_and_the_chain_stays_put(psa_first, caplog):
    # Model Sparse Attention (here: block 0's self-attention) re-installs itself every step, as
    # PSA does; neither may drop the other, nor may the chain grow step after step.
    model = base()
    if psa_first:
        m, sparse = newest.apply_sparse(apply_psa(model), blocks={0})
    else:
        sparse_model, sparse = newest.apply_sparse(model, blocks={0})
        m = apply_psa(sparse_model)
    with caplog.at_level("INFO", logger="psa"):
        _, options, calls = run(m, steps=6)
    overrides = chain(options["transformer_options"][patch.OVERRIDE_KEY])
    assert len(overrides) <= 3 and "psa" in overrides and "override" in overrides, overrides
    assert sparse.ran == 6                                    # block 0, every step
    assert "video self-attention on a 2x8x8 token grid: ran PSA" in caplog.text  # block 1 after warm-up
    assert calls["attention_pytorch"] == 6 * 2 + 1            # cross-attention, and block 1's warm-up step


def test_forward_wrapper_puts_psa_back_where_prepare_state_gets_no_options():
    # ComfyUI 0.3.64 calls ON_PREPARE_STATE callbacks without the run's options; a node applied
    # after Apply PSA that replaced the override must not switch PSA off there either.
    model = apply_psa(base()).clone()
    model.set_model_optimized_attention(newest.attention_pytorch)
    model.prepare_state = lambda timestep, model_options: None
    outs, options, calls = run(model)
    assert chain(options["transformer_options"][patch.OVERRIDE_KEY]) == ["optimized_attention_override"]
    assert calls == {"attention_pytorch": 12 - 4}
