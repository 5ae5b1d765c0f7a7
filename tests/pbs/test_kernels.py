"""Our Triton kernels against the plain PyTorch reference (CPU: Triton's interpreter, fp16 and
fp32, since the interpreter mishandles bf16; GPU: the same tests in bf16 run in test_gpu.py)."""

import random

import pytest
import torch
import torch.nn.functional as F

from pbs import PBSConfig, kernels, pbs_attention, reference_attention
from pbs.permute import key_importance_torch, permute_kv
from pbs.reference import attend_plan
from pbs.select import select_blocks_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not kernels.interpreting(), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
# fp32: the interpreter's dot is exact; on a GPU tl.dot runs fp32 as TF32 (~1e-3 relative).
TOL = {torch.float32: 2e-4 if DEV == "cpu" else 3e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_case(seed: int):
    """An awkward configuration: lengths off the block grid, GQA 1/2/4/8, batch 1-2."""
    r = random.Random(seed)
    block = r.choice([16, 32])
    seg = block * r.choice([1, 2, 4])
    n = r.randint(block + 1, 4 * block) + r.choice([0, 1, 3, 7])
    if n % block == 0:
        n += 5
    G = [1, 2, 4, 8][seed % 4]
    hkv = 1 if G == 8 else r.choice([1, 2])
    d = 64 if seed % 3 else 128
    dtype = torch.float16 if seed % 2 else torch.float32
    cfg = PBSConfig(
        block_size=block,
        segment_size=seg,
        threshold=r.choice([0.3, 0.6, 0.9, 0.95, 1.0]),
        min_seq_len=0,
        force_sink=r.random() < 0.8,
        permute=r.random() < 0.85,
        scale=None if r.random() < 0.8 else 0.05,
    )
    return dict(b=r.randint(1, 2), hq=hkv * G, hkv=hkv, n=n, d=d, dtype=dtype, cfg=cfg)


def make_qkv(b, hq, hkv, n, d, dtype, seed=0, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g).to(device, dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(device, dtype)
    return q, k, v


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("seed", range(50))
def test_triton_matches_reference_on_random_configs(seed, api_plans):
    c = random_case(seed)
    q, k, v = make_qkv(c["b"], c["hq"], c["hkv"], c["n"], c["d"], c["dtype"], seed)
    cfg = c["cfg"]
    api_out, stats = pbs_attention(q, k, v, config=cfg, return_stats=True)
    # The plan is built once, by the entry point: make_plan of these very inputs and config.
    ((inputs, used_cfg, plan),) = api_plans
    assert used_cfg == cfg and all(a is b for a, b in zip(inputs, (q, k, v), strict=True))
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
        cfg.block_size, cfg.segment_size, plan.scale, out=out,
    )  # fmt: skip
    assert not out.isnan().any()
    assert rel_err(out, attend_plan(q, k, v, plan)) < TOL[c["dtype"]], c
    assert api_out.dtype == q.dtype and api_out.shape == q.shape
    assert torch.equal(api_out, out)  # the entry point runs its plan through the same kernel
    assert stats["path"] == "sparse" and stats["backend"] == "triton"
    assert 0 < stats["density"] <= 1
    if cfg.threshold == 1.0:
        assert stats["density"] == 1.0


@pytest.mark.parametrize("n,hq,hkv,d", [(77, 4, 1, 64), (150, 2, 2, 128), (33, 8, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_threshold_one_equals_sdpa(n, hq, hkv, d, dtype):
    q, k, v = make_qkv(2, hq, hkv, n, d, dtype, n)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=1.0, min_seq_len=0)
    out = pbs_attention(q, k, v, config=cfg)
    sdpa = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    assert rel_err(out, sdpa) < TOL[dtype]


def test_no_nan_on_extreme_inputs_and_tiny_lengths(api_plans):
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.5, min_seq_len=0)
    for i, n in enumerate((1, 2, 15, 16, 17, 65)):
        q, k, v = make_qkv(1, 2, 1, n, 64, torch.float16, n)
        out = pbs_attention(q * 40, k * 40, v, config=cfg)
        assert not out.isnan().any() and not out.isinf().any()
        assert len(api_plans) == i + 1  # this call's plan: the reference attends over it
        inputs, _, plan = api_plans[-1]
        assert rel_err(out, attend_plan(*inputs, plan)) < 1e-2


def test_non_contiguous_inputs_as_transformers_passes_them():
    # transformers hands (B, L, H, D) projections transposed to (B, H, L, D)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 70, 4, 64, generator=g).to(DEV, torch.float16).transpose(1, 2)
    k = torch.randn(2, 70, 2, 64, generator=g).to(DEV, torch.float16).transpose(1, 2)
    v = torch.randn(2, 70, 2, 64, generator=g).to(DEV, torch.float16).transpose(1, 2)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.7, min_seq_len=0)
    out = pbs_attention(q, k, v, config=cfg)
    ref = reference_attention(q.contiguous(), k.contiguous(), v.contiguous(), config=cfg)
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("n,hq,hkv,rows", [(70, 4, 2, 16), (130, 2, 1, 32), (40, 8, 8, 16)])
def test_importance_kernel_matches_torch(n, hq, hkv, rows):
    q, k, _ = make_qkv(2, hq, hkv, n, 64, torch.float32, n)
    imp = kernels.key_importance(q, k, rows, 0.125)
    ref = key_importance_torch(q, k, rows, 0.125)
    torch.testing.assert_close(imp, ref, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(imp.sum(-1), torch.ones_like(imp[..., 0]))


def test_permute_kernel_matches_gather():
    q, k, v = make_qkv(2, 2, 2, 90, 64, torch.float16, 1)
    perm = torch.stack([torch.randperm(90) for _ in range(4)]).view(2, 2, 90).int().to(DEV)
    kp, vp = permute_kv(k, v, perm)
    idx = perm.long()[..., None].expand(-1, -1, -1, 64)
    assert torch.equal(kp, k.gather(2, idx)) and torch.equal(vp, v.gather(2, idx))


@pytest.mark.parametrize("thr", [0.2, 0.9, 1.0])
def test_selection_kernel_matches_torch(thr):
    g = torch.Generator().manual_seed(int(thr * 10))
    logits = (torch.randn(2, 4, 7, 7, generator=g) * 4).to(DEV)  # the last segment partial
    sink = torch.tensor([[2, -1], [0, 1]], dtype=torch.int32, device=DEV)
    c1, i1 = kernels.select_blocks(logits, sink, thr, 2, 2)
    c2, i2 = select_blocks_torch(logits, sink, thr, 2, 2)
    assert torch.equal(c1, c2)
    valid = torch.arange(7, device=DEV) < c1[..., None]
    assert torch.equal(i1[valid], i2[valid])
