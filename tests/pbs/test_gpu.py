"""Both backends and both attention kernels in bf16 on a GPU against the reference, at the real
tile sizes."""

import random

import pytest
import torch
import torch.nn.functional as F

from pbs import PBSConfig, kernels, pbs_attention, reference_attention
from pbs.plan import make_plan
from pbs.reference import attend_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def case(seed):
    r = random.Random(1000 + seed)
    block = r.choice([64, 128])
    seg = block * r.choice([1, 2, 4])
    G = [1, 2, 4, 8][seed % 4]
    hkv = r.choice([1, 2])
    n = r.randint(2 * seg, 2048) | 1
    cfg = PBSConfig(
        block_size=block,
        segment_size=seg,
        threshold=r.choice([0.5, 0.8, 0.9, 1.0]),
        min_seq_len=0,
        permute=r.random() < 0.85,
    )
    return r.randint(1, 3), hkv * G, hkv, n, [64, 128][seed % 2], cfg


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = [(s, "triton") for s in range(50)] + [(s, "flex") for s in range(12)]


def qkv(b, hq, hkv, n, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv)
    ]


def needs_sm90(kernel):
    q = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    if kernel == "sm90" and kernels.attention_kernel(q, 128) != "sm90":
        pytest.skip("the sm90 kernel needs a Hopper GPU")


@pytest.mark.parametrize("seed,backend", CASES)
def test_bf16_backends_match_reference(seed, backend):
    b, hq, hkv, n, d, cfg = case(seed)
    cfg = PBSConfig(**{**cfg.__dict__, "backend": backend})
    q, k, v = qkv(b, hq, hkv, n, d, seed)
    out = pbs_attention(q, k, v, config=cfg)
    ref = reference_attention(q, k, v, config=cfg)
    assert not out.isnan().any()
    assert rel(out, ref) < 2e-2
    if cfg.threshold == 1.0:
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert rel(out, sdpa) < 2e-2


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_bf16_long_threshold_one_equals_sdpa(backend):
    cfg = PBSConfig(threshold=1.0, min_seq_len=0, backend=backend)
    q = torch.randn(1, 32, 8192 + 77, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 8192 + 77, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = pbs_attention(q, k, v, config=cfg)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel(out, sdpa) < 1e-2


@pytest.mark.parametrize("kernel", ["sm90", "generic"])
@pytest.mark.parametrize("seed", range(50))
def test_bf16_kernels_match_reference(seed, kernel):
    """Each attention kernel on the same plan: the sm90 kernel is what "auto" runs on Hopper."""
    needs_sm90(kernel)
    b, hq, hkv, n, d, cfg = case(seed)
    if kernel == "sm90":  # it takes the default block of 128 only
        seg = 128 * (cfg.segment_size // cfg.block_size)
        cfg = PBSConfig(**{**cfg.__dict__, "block_size": 128, "segment_size": seg})
    q, k, v = qkv(b, hq, hkv, n, d, seed)
    plan = make_plan(q, k, v, cfg)
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
        cfg.block_size, cfg.segment_size, plan.scale, out=out, kernel=kernel,
    )  # fmt: skip
    assert not out.isnan().any()
    assert rel(out, attend_plan(q, k, v, plan)) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_kernel_reads_strided_inputs_and_longer_kv_buffers(dtype):
    """transformers' transposed projections, a strided output and permuted K/V inside longer
    buffers (as the flex backend lays them out) give the same result as contiguous inputs."""
    needs_sm90("sm90")
    cfg = PBSConfig(threshold=0.7, min_seq_len=0)
    b, hq, hkv, n, d = 2, 8, 2, 1000, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (
        torch.randn(b, n, h, d, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
        for h in (hq, hkv, hkv)
    )
    padded = 2 * 1024
    buf = torch.full((2, b, hkv, padded, d), float("nan"), device="cuda", dtype=dtype)
    plan = make_plan(q, k, v, cfg, kv_out=(buf[0], buf[1]))
    out = torch.empty(b, n, hq, d, device="cuda", dtype=dtype).transpose(1, 2)
    kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
        cfg.block_size, cfg.segment_size, plan.scale, out=out, kernel="sm90",
    )  # fmt: skip
    ref = attend_plan(q.contiguous(), k.contiguous(), v.contiguous(), plan)
    assert rel(out, ref) < 2e-2


def test_sm90_kernel_reads_slices_of_longer_buffers():
    """Q, K, V as the rows [s, e) of longer (B, H, L, D) buffers (pbs.hf slices a padded
    batch row so) give the same result as contiguous copies (the kernel once read them with
    the buffers' head spacing)."""
    needs_sm90("sm90")
    cfg = PBSConfig(threshold=0.7, min_seq_len=0)
    b, hq, hkv, length, d = 1, 8, 2, 1500, 128
    g = torch.Generator(device="cuda").manual_seed(4)
    q, k, v = (
        torch.randn(b, h, length, d, device="cuda", dtype=torch.bfloat16, generator=g)[:, :, 37:1037]
        for h in (hq, hkv, hkv)
    )  # fmt: skip
    plan = make_plan(q, k, v, cfg)
    out = kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
        cfg.block_size, cfg.segment_size, plan.scale, kernel="sm90",
    )  # fmt: skip
    ref = attend_plan(q.contiguous(), k.contiguous(), v.contiguous(), plan)
    assert rel(out, ref) < 2e-2


def test_auto_picks_sm90_on_hopper_and_reports_it():
    q, k, v = qkv(1, 4, 2, 700, 128, 0)
    _, stats = pbs_attention(q, k, v, PBSConfig(min_seq_len=0), return_stats=True)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert stats["kernel"] == ("sm90" if hopper else "generic")
    with pytest.raises(ValueError, match="kernel='sm90' needs"):
        kernels.attention_kernel(q.float(), 128, "sm90")
