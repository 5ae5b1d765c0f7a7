"""Both backends in bf16 on a GPU against the reference, at the real tile sizes."""

import random

import pytest
import torch
import torch.nn.functional as F

from pbs import PBSConfig, pbs_attention, reference_attention

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


@pytest.mark.parametrize("seed,backend", CASES)
def test_bf16_backends_match_reference(seed, backend):
    b, hq, hkv, n, d, cfg = case(seed)
    cfg = PBSConfig(**{**cfg.__dict__, "backend": backend})
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
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
