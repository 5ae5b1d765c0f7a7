"""Fused add+RMSNorm and SiLU-mul kernels against their PyTorch references (and transformers'
modules) on awkward shapes: CPU through Triton's interpreter in fp32/fp16, bf16 on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from mtrl.rollout.fused_norm import (
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
    silu_and_mul,
    silu_mul,
    silu_mul_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The result is rounded to the dtype; the fp32 variance's summation order differs from torch's.
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
GPU_BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)
DTYPES = [torch.float32, torch.float16, GPU_BF16]
# (leading dims, hidden): decode's (batch, 1), other leading dims, sizes that aren't powers of 2
SHAPES = [((1, 1), 576), ((37, 1), 960), ((5, 3), 1000), ((2, 1), 1536), ((7,), 3584)]


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def weight(n, dtype, seed=9):
    return (1 + 0.5 * randn(n, dtype=torch.float32, seed=seed)).to(dtype)


# --------------------------------------------------------------------------- add + RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n", SHAPES)
def test_add_rms_norm_matches_reference(lead, n, dtype):
    x = randn(*lead, n, dtype=dtype, seed=1)
    res = randn(*lead, n, dtype=dtype, seed=2, scale=4.0)
    w = weight(n, dtype)
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_res = add_rms_norm_ref(x, res, w, 1e-6)
    assert normed.shape == new_res.shape == x.shape
    assert normed.dtype == new_res.dtype == dtype
    # The sum is one rounding of an exact fp32 sum, as torch's add: bit-equal.
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(normed, ref_normed, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n", SHAPES)
def test_rms_norm_matches_transformers_modules(lead, n, dtype):
    x = randn(*lead, n, dtype=dtype, seed=3, scale=3.0)
    for cls, eps in ((LlamaRMSNorm, 1e-6), (Qwen2RMSNorm, 1e-5)):
        module = cls(n, eps=eps).to(device=DEVICE, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(weight(n, dtype))
            expected = module(x)
        torch.testing.assert_close(rms_norm_ref(x, module.weight, eps), expected, rtol=0, atol=0)
        torch.testing.assert_close(rms_norm(x, module.weight, eps), expected, **TOL[dtype])


def test_add_rms_norm_residual_is_exact_in_fp32():
    """fp32: the new residual is exactly residual + x, also for values of very different size."""
    x = randn(37, 1, 960, dtype=torch.float32, seed=4) * 1e-3
    res = randn(37, 1, 960, dtype=torch.float32, seed=5) * 1e3
    _, new_res = add_rms_norm(x, res, weight(960, torch.float32), 1e-6)
    assert torch.equal(new_res, res + x)


def test_mixed_dtypes_promote_like_torch():
    """fp16 activations with an fp32 residual and fp32 weight (autocast): fp32 results."""
    x = randn(4, 1, 576, dtype=torch.float16, seed=6)
    res = randn(4, 1, 576, dtype=torch.float32, seed=7)
    w = weight(576, torch.float32)
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_res = add_rms_norm_ref(x, res, w, 1e-6)
    assert normed.dtype == new_res.dtype == torch.float32
    assert torch.equal(new_res, ref_res)
    torch.testing.assert_close(normed, ref_normed, **TOL[torch.float32])
    # fp16 input, fp32 weight: normalised in fp16 precision, multiplied in fp32
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eps_is_used(dtype):
    """Rows of small magnitude: eps changes the result, and each eps matches its reference;
    an all-zero row gives zeros, not NaN."""
    x = randn(6, 1, 1000, dtype=dtype, seed=8, scale=1e-2)
    x[0] = 0
    w = weight(1000, dtype)
    outs = []
    for eps in (1e-6, 1e-3):
        out = rms_norm(x, w, eps)
        torch.testing.assert_close(out, rms_norm_ref(x, w, eps), **TOL[dtype])
        assert torch.isfinite(out).all() and (out[0] == 0).all()
        outs.append(out)
    assert (outs[0][1:] - outs[1][1:]).abs().max() > 0.1


def test_strided_rows_are_read_in_place():
    """Rows of a wider buffer (a row stride > hidden) give the same result as a copy."""
    buf = randn(9, 2 * 576, dtype=torch.float32, seed=10)
    x, res = buf[:, :576], buf[:, 576:]
    w = weight(576, torch.float32)
    normed, new_res = add_rms_norm(x, res, w, 1e-6)
    ref = add_rms_norm(x.contiguous(), res.contiguous(), w, 1e-6)
    assert torch.equal(normed, ref[0]) and torch.equal(new_res, ref[1])


def test_bad_arguments():
    x = randn(2, 64, dtype=torch.float32, seed=11)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x[:, :32], weight(64, torch.float32), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, weight(32, torch.float32), 1e-6)
    with pytest.raises(TypeError, match="x: dtype"):
        rms_norm(x.double(), weight(64, torch.float32), 1e-6)
    with pytest.raises(ValueError, match="up"):
        silu_mul(x, x[:1])


# --------------------------------------------------------------------------- SiLU-mul
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n", SHAPES + [((3, 1), 8960)])
def test_silu_mul_on_fused_gate_up_layout(lead, n, dtype):
    """The gate|up output of one GEMM (mtrl.rollout.fused's layout), read through its views."""
    gate_up = randn(*lead, 2 * n, dtype=dtype, seed=12, scale=3.0)
    gate, up = gate_up.split([n, n], dim=-1)  # what the fused GEMM hands gate_proj / up_proj
    assert gate.numel() == n or not gate.is_contiguous()  # one row is contiguous anyway
    ref = silu_mul_ref(gate, up)
    assert torch.equal(ref, F.silu(gate) * up)
    for out in (silu_mul(gate, up), silu_and_mul(gate_up)):
        assert out.shape == (*lead, n) and out.dtype == dtype
        torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_separate_tensors_and_large_values(dtype):
    """Separate gate/up (unfused projections); large |gate| saturates without inf/NaN."""
    gate = randn(37, 1, 1536, dtype=dtype, seed=13, scale=3.0)
    gate[0, 0, :8] = torch.tensor([-60.0, -20.0, -1.0, 0.0, 1.0, 20.0, 60.0, -0.5], dtype=dtype)
    up = randn(37, 1, 1536, dtype=dtype, seed=14)
    out = silu_mul(gate, up)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, silu_mul_ref(gate, up), **TOL[dtype])


def test_silu_and_mul_needs_an_even_width():
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(randn(2, 7, dtype=torch.float32, seed=15))
