"""Apply PSA's per-forward context and attention routing, driven directly (no ComfyUI)."""
import torch

from pack_import import pack_module

patch = pack_module("nodes.patch")
presets = pack_module("nodes.presets")
psa_attention = pack_module("psa_kernels").psa_attention
PSAConfig = pack_module("psa_kernels.config").PSAConfig

CFG = PSAConfig.from_dict({"type": "psa", "block_size": {"m": 32, "n": 32, "tile_n": 32}, "warmup_steps": 1,
                           "mask_ratios": {1: [0.0, 0.3], 2: [0.3, 0.5], 8: [0.5, 0.7], 0: [0.7, 1.0]}})
GRID = (2, 8, 8)
SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def test_token_grid_pads_to_the_patch_and_adds_extra_frames():
    assert patch.token_grid((1, 16, 21, 60, 104), (1, 2, 2)) == (21, 30, 52)
    assert patch.token_grid((1, 16, 3, 31, 33), (1, 2, 2), extra_frames=1) == (4, 16, 17)


def test_step_index_counts_within_the_sampler_run():
    assert patch.step_index(SIGMAS, torch.tensor([1.0, 1.0])) == (0, 4)
    assert patch.step_index(SIGMAS, torch.tensor([0.5])) == (2, 4)
    assert patch.step_index(SIGMAS, torch.tensor([0.6])) == (1, 4)   # a second-stage call of step 1
    assert patch.step_index(SIGMAS, torch.tensor([0.01])) == (3, 4)
    assert patch.step_index(None, torch.tensor([0.5])) is None


def test_schedule_reason():
    r = patch.schedule_reason
    assert r(0, (5, 10), warmup_steps=2, dense_first_blocks=1, dense_last_steps=0) == "first blocks"
    assert r(3, (1, 10), warmup_steps=2, dense_first_blocks=1, dense_last_steps=0) == "warm-up"
    assert r(3, (8, 10), warmup_steps=2, dense_first_blocks=1, dense_last_steps=2) == "last steps"
    assert r(3, (7, 10), warmup_steps=2, dense_first_blocks=1, dense_last_steps=2) is None
    assert r(3, None, warmup_steps=2, dense_first_blocks=1, dense_last_steps=2) is None


class Model:
    patch_size = (1, 2, 2)
    ref_conv = None


class Executor:
    """Stands where ComfyUI's WrapperExecutor calls the model: records what attention saw."""
    class_obj = Model()

    def __init__(self, attn_calls):
        self.attn_calls = attn_calls

    def __call__(self, x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kw):
        return [self_attn(transformer_options) for self_attn in self.attn_calls]


def qkv(L, B=2, H=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H * D, generator=g) for _ in range(3)]


def model_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
    return ("model", q.shape)


def make_patch(cfg=CFG, **kw):
    p = patch.PSAModelPatch(presets.PSAPreset("s", "p", cfg), **kw)
    to = p.install({"sample_sigmas": SIGMAS})
    return p, to


def forward(p, to, sigma, calls, context_len=16, latent_t=2):
    x = torch.zeros(2, 16, latent_t, 16, 16)
    return p.forward_wrapper(Executor(calls), x, torch.zeros(2), torch.zeros(2, context_len, 64), None, None,
                             {**to, "sigmas": torch.tensor([sigma, sigma])})


def attend(o, q, k, v, func=model_attention, **kw):
    """An attention call as ComfyUI makes it inside a forward: through the override in ``o``."""
    return o[patch.OVERRIDE_KEY](func, q, k, v, heads=2, transformer_options=o, **kw)


def test_self_attention_goes_to_psa_cross_attention_to_the_model():
    p, to = make_patch()
    q, k, v = qkv(128)
    ctx_q, ctx_k, _ = qkv(16)
    out = forward(p, to, 0.5, [
        lambda o: attend(o, q, k, v),
        lambda o: attend(o, q, ctx_k, ctx_k),
    ])
    want = psa_attention(*(t.view(2, 128, 2, 32).transpose(1, 2) for t in (q, k, v)), CFG, grid=GRID)
    assert torch.equal(out[0], want.transpose(1, 2).reshape(2, 128, 64))
    assert out[1][0] == "model"


def test_skip_reshape_layout_is_kept():
    p, to = make_patch()
    q, k, v = (t.view(2, 128, 2, 32).transpose(1, 2) for t in qkv(128))
    out = forward(p, to, 0.5, [lambda o: attend(o, q, k, v, skip_reshape=True, skip_output_reshape=True)])
    assert torch.equal(out[0], psa_attention(q, k, v, CFG, grid=GRID))


def test_schedule_dense_preset_masks_and_ambiguous_lengths_use_the_model():
    q, k, v = qkv(128)

    def call(o):
        return attend(o, q, k, v)
    p, to = make_patch()
    assert forward(p, to, 1.0, [call])[0][0] == "model"                     # warm-up step
    p, to = make_patch(dense_first_blocks=1)
    first, second = forward(p, to, 0.5, [call, call])
    assert first[0] == "model" and isinstance(second, torch.Tensor)         # block index counted
    p, to = make_patch(dense_last_steps=2)
    assert forward(p, to, 0.25, [call])[0][0] == "model"
    p, to = make_patch(cfg=PSAConfig.from_dict({"type": "dense"}))
    assert forward(p, to, 0.5, [call])[0][0] == "model"
    p, to = make_patch()
    assert forward(p, to, 0.5, [lambda o: attend(o, q, k, v, mask=torch.zeros(128, 128))])[0][0] == "model"
    p, to = make_patch()
    assert forward(p, to, 0.5, [lambda o: attend(o, q, k, v, scale=0.5)])[0][0] == "model"  # not 1/sqrt(32)
    p, to = make_patch()
    assert forward(p, to, 0.5, [lambda o: attend(o, q, k[..., :32], v[..., :32])])[0][0] == "model"  # GQA
    p, to = make_patch()
    assert forward(p, to, 0.5, [call], context_len=128)[0][0] == "model"  # text length == video tokens


def test_block_index_from_comfyui_is_used_when_set():
    # Newer ComfyUI sets transformer_options["block_index"]; it decides dense_first_blocks
    # even where PSA sees fewer self-attention calls than blocks (a block patched elsewhere).
    q, k, v = qkv(128)
    p, to = make_patch(dense_first_blocks=3)
    first, second = forward(p, to, 0.5, [lambda o: attend({**o, "block_index": 2}, q, k, v),
                                         lambda o: attend({**o, "block_index": 3}, q, k, v)])
    assert first[0] == "model" and isinstance(second, torch.Tensor)


def test_outside_a_patched_forward_the_override_is_transparent():
    p, _ = make_patch()
    q, k, v = qkv(128)
    assert patch.PSAOverride(p)(model_attention, q, k, v, heads=2, transformer_options={})[0] == "model"


def test_verbose_logs_density_per_step_and_block(caplog):
    p, to = make_patch(cfg=CFG.replace(verbose=True), dense_first_blocks=1)
    q, k, v = qkv(128)
    with caplog.at_level("INFO", logger="psa"):
        forward(p, to, 0.5, [lambda o: attend(o, q, k, v)] * 2)
    line = next(r.getMessage() for r in caplog.records if "mean density" in r.getMessage())
    assert line.startswith("[PSA] step 3/4 grid 2x8x8: mean density 0.") and "per block 0:first blocks 1:0." in line
    ran = [r.getMessage() for r in caplog.records if ": ran " in r.getMessage()]
    assert ran == ["[PSA] first blocks: ran test_node_patch.model_attention",
                   "[PSA] video self-attention on a 2x8x8 token grid: ran PSA, preset s/p"], ran


def test_device_reason_needs_triton_on_the_gpu_only():
    assert patch.device_reason("cpu", 128, have_triton=False) is None       # the torch reference
    assert patch.device_reason("cuda", 128, have_triton=True) is None
    assert "triton" in patch.device_reason("cuda", 128, have_triton=False).lower()
    assert "head dim 96" in patch.device_reason("cuda", 96, have_triton=True)
    assert "mps" in patch.device_reason("mps", 128, have_triton=True)
    # head dim 256: too wide for the kernel's tiles in 99 KB of shared memory (RTX 30xx-50xx)
    assert patch.device_reason("cuda", 256, have_triton=True, shared_memory=232448) is None      # H100
    assert "99 KB" in patch.device_reason("cuda", 256, have_triton=True, shared_memory=101376)   # RTX 4090
    assert patch.device_reason("cuda", 128, have_triton=True, shared_memory=101376) is None
