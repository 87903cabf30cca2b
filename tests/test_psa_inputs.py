"""psa_attention and psa_plan check their inputs and say what is wrong, naming the argument."""
import numpy as np
import pytest
import torch

from psa_kernels import PSAConfig, psa_attention, psa_plan

GRID, TEXT = (2, 3, 4), 3
CFG = PSAConfig.from_dict({"block_size": {"m": 16, "n": 16}, "mask_mode": "topk",
                           "mask_ratios": {1: [0.0, 0.5], 0: [0.5, 1.0]}})


def qkv(dtype=torch.float32, head_dim=16, length=2 * 3 * 4 + TEXT):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, length, head_dim, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("grid,match", [
    ((2.9, 3, 4), r"grid\[0\]: got 2\.9; allowed: an integer >= 1"),
    ((2, 3.0, 4), r"grid\[1\]: got 3\.0; allowed: an integer >= 1"),
    ((2, 3, True), r"grid\[2\]: got True"),
    ((2, 3, -4), r"grid\[2\]: got -4"),
    ((2, 3), r"grid: got \(2, 3\); allowed: \(T, H, W\), 3 positive integers"),
    (12, r"grid: got 12"),
    ((2, 3, "4"), r"grid\[2\]: got '4'"),
])
def test_grid_must_be_three_positive_integers(grid, match):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=match):
        psa_attention(q, k, v, CFG, grid, TEXT)
    with pytest.raises(ValueError, match=match):
        psa_plan(q, k, CFG, grid, TEXT)


def test_integer_types_of_every_kind_are_accepted_for_the_grid():
    q, k, v = qkv()
    ref = psa_attention(q, k, v, CFG, GRID, TEXT, backend="torch")
    for grid in [(np.int64(2), np.int32(3), 4), torch.tensor([2, 3, 4]), torch.Size([2, 3, 4]), [2, 3, 4]]:
        assert torch.equal(psa_attention(q, k, v, CFG, grid, np.int16(TEXT), backend="torch"), ref)


def test_text_len_is_an_integer_that_completes_the_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"text_len .*: got 3\.0; allowed: an integer >= 0"):
        psa_attention(q, k, v, CFG, GRID, 3.0)
    with pytest.raises(ValueError, match=r"sequence length 27 != T\*H\*W \+ text_len = 2\*3\*4 \+ 2"):
        psa_attention(q, k, v, CFG, GRID, 2)


@pytest.mark.parametrize("dtypes", [(torch.int32,) * 3, (torch.complex64,) * 3, (torch.float32, torch.float16,
                                                                                torch.float32),
                                    (torch.float16, torch.float16, torch.bfloat16), (torch.bool,) * 3])
def test_dtypes_must_be_one_floating_dtype(dtypes):
    q, k, v = (x.to(d) if d.is_floating_point or d.is_complex else (x * 10).to(d) for x, d in zip(qkv(), dtypes))
    with pytest.raises(ValueError, match=r"q, k, v dtype: got .*; allowed: one floating dtype for all three, of "
                                         r"float16, bfloat16, float32, float64"):
        psa_attention(q, k, v, CFG, GRID, TEXT)


def test_head_dim_zero_is_refused():
    q, k, v = qkv(head_dim=0)
    with pytest.raises(ValueError, match=r"head dim \(D of \[B, H, L, D\]\): got 0; allowed: at least 1"):
        psa_attention(q, k, v, CFG, GRID, TEXT)


def test_non_tensors_and_configs_are_named():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^k: got list; allowed: a torch.Tensor"):
        psa_attention(q, k.tolist(), v, CFG, GRID, TEXT)
    with pytest.raises(ValueError, match=r"^cfg: got dict; allowed: a PSAConfig"):
        psa_attention(q, k, v, CFG.to_dict(), GRID, TEXT)


def test_triton_backend_on_cpu_tensors_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend: got 'triton' for tensors on cpu: the Triton kernels run on "
                                         r"CUDA devices .*; allowed here: auto, torch"):
        psa_attention(q, k, v, CFG, GRID, TEXT, backend="triton")
    # "auto" picks what runs on the tensors' device
    assert psa_attention(q, k, v, CFG, GRID, TEXT, backend="auto").shape == q.shape


def test_triton_backend_refuses_what_its_kernels_do_not_take(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"backend: got 'triton' for dtype torch.float64"):
        psa_attention(q, k, v, CFG, GRID, TEXT, backend="triton")
    q, k, v = qkv(head_dim=24)
    with pytest.raises(ValueError, match=r"backend: got 'triton' for head dim 24: .*powers of two"):
        psa_attention(q, k, v, CFG, GRID, TEXT, backend="triton")
    assert psa_attention(q, k, v, CFG, GRID, TEXT, backend="torch").shape == q.shape
