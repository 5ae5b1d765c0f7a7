"""Gradients of the triton backend (our backward kernels) against autograd through the reference.

CPU: Triton's interpreter, fp32 and fp16 (it mishandles bf16); bf16 runs on a GPU only.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from pbs import PBSConfig, kernels, pbs_attention, reference_attention
from pbs.kernels import work_items
from pbs.plan import make_plan
from pbs.reference import attend_plan, visible_mask
from pbs.select import key_block_lists_torch, select_blocks

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not kernels.interpreting(), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
# Relative L2 error of a gradient. fp32 on the interpreter is exact up to summation order; a
# GPU runs fp32 dots as TF32.
TOL = {torch.float32: 1e-4 if DEV == "cpu" else 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def random_case(seed: int, block_choices=(16,)):
    """Awkward shapes: lengths off the block grid, GQA 1/2/4, batch 1-2, sparse and dense."""
    r = random.Random(seed)
    block = r.choice(block_choices)
    seg = block * r.choice([1, 2, 4])
    n = r.randint(2 * seg, 2 * seg + 3 * block) + r.choice([1, 3, 7])
    G = [1, 2, 4][seed % 3]
    hkv = r.choice([1, 2])
    cfg = PBSConfig(
        block_size=block,
        segment_size=seg,
        threshold=r.choice([0.3, 0.6, 0.9, 1.0]),
        min_seq_len=0,
        force_sink=r.random() < 0.8,
        permute=r.random() < 0.85,
        scale=None if r.random() < 0.8 else 0.05,
    )
    return dict(b=r.randint(1, 2), hq=hkv * G, hkv=hkv, n=n, d=r.choice([32, 64]), cfg=cfg)


def make_inputs(b, hq, hkv, n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (
        torch.randn(b, h, n, d, generator=g).to(DEV, dtype) for h in (hq, hkv, hkv, hq)
    )  # fmt: skip
    return q, k, v, do


def grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of fn(q, k, v) for output gradient do."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Every configuration in fp32 (the tight tolerance); fp16, whose casts do not depend on the
# configuration, on every other one (all three group sizes among them).
@pytest.mark.parametrize(
    "seed,dtype",
    [pytest.param(s, torch.float32, id=f"fp32-{s}") for s in range(12)]
    + [pytest.param(s, torch.float16, id=f"fp16-{s}") for s in range(0, 12, 2)],
)
def test_gradients_match_reference(seed, dtype, api_plans):
    c = random_case(seed)
    cfg = c.pop("cfg")
    q, k, v, do = make_inputs(**c, dtype=dtype, seed=seed)
    got = grads(lambda *x: pbs_attention(*x, config=cfg), q, k, v, do)
    # The reference (reference_attention's computation: a dense masked softmax in fp32) over
    # the plan that the entry point built from the same inputs, instead of building it again.
    ((inputs, used_cfg, plan),) = api_plans
    assert used_cfg == cfg and all(
        torch.equal(a, b) for a, b in zip(inputs, (q, k, v), strict=True)
    )
    ref = grads(lambda *x: attend_plan(*x, plan), q, k, v, do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert not a.isnan().any(), name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b), c, cfg)


@pytest.mark.parametrize("seed,region", [(1, 1), (2, 2), (4, 1), (5, 3)])
def test_gradients_match_reference_with_many_regions(seed, region, monkeypatch):
    """Work items of 1-3 query blocks: every key block split over several items, their dk, dv
    added up (the default region holds all query blocks of these short sequences)."""
    monkeypatch.setattr(kernels, "REGION", region)
    c = random_case(seed)
    cfg = c.pop("cfg")
    c["n"] *= 2
    q, k, v, do = make_inputs(**c, dtype=torch.float32, seed=seed)
    got = grads(lambda *x: pbs_attention(*x, config=cfg), q, k, v, do)
    ref = grads(lambda *x: reference_attention(*x, config=cfg), q, k, v, do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        assert rel_err(a, b) < TOL[torch.float32], (name, rel_err(a, b), c, cfg)


@pytest.mark.parametrize("n,hq,hkv", [(45, 4, 1), (70, 2, 2), (100, 4, 2)])
def test_threshold_one_gives_sdpa_gradients(n, hq, hkv):
    q, k, v, do = make_inputs(2, hq, hkv, n, 32, torch.float32, n)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=1.0, min_seq_len=0)
    got = grads(lambda *x: pbs_attention(*x, config=cfg), q, k, v, do)
    sdpa = grads(
        lambda *x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True), q, k, v, do
    )
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, sdpa, strict=True):
        assert rel_err(a, b) < TOL[torch.float32], name


def test_gradients_through_transposed_inputs_as_transformers_passes_them(api_plans):
    """(B, L, H, D) projections seen as (B, H, L, D), and a non-contiguous output gradient."""
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (
        torch.randn(2, 60, h, 32, generator=g).to(DEV).transpose(1, 2) for h in (4, 2, 2, 4)
    )  # fmt: skip
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.7, min_seq_len=0)
    got = grads(lambda *x: pbs_attention(*x, config=cfg), q, k, v, do)
    ((_, used_cfg, plan),) = api_plans  # the entry point's plan, of these transposed inputs
    assert used_cfg == cfg
    ref = grads(lambda *x: attend_plan(*x, plan), q, k, v, do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        assert rel_err(a, b) < TOL[torch.float32], name


def test_forward_writes_the_log_sum_exp():
    q, k, v, _ = make_inputs(2, 4, 2, 83, 32, torch.float32, 3)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.6, min_seq_len=0)
    plan = make_plan(q, k, v, cfg)
    lse = torch.full(q.shape[:3], float("nan"), device=DEV)
    kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
        cfg.block_size, cfg.segment_size, plan.scale, kernel="generic", lse=lse,
    )  # fmt: skip
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * plan.scale
    s = s.masked_fill(~visible_mask(plan, q.shape[1]), float("-inf"))
    ref = s.logsumexp(-1) / torch.log(torch.tensor(2.0))  # log2 units
    torch.testing.assert_close(lse, ref, atol=1e-4, rtol=1e-5)


def test_key_block_lists_transpose_the_selection():
    g = torch.Generator().manual_seed(0)
    B, HQ, HKV, n_qb = 2, 4, 2, 9
    counts = torch.randint(0, n_qb + 1, (B, HQ, n_qb), generator=g, dtype=torch.int32)
    idx = torch.stack([torch.randperm(n_qb, generator=g) for _ in range(B * HQ * n_qb)])
    idx = idx.view(B, HQ, n_qb, n_qb).int()
    tcounts, tidx = kernels.key_block_lists(counts.to(DEV), idx.to(DEV), HKV)
    G = HQ // HKV
    for b in range(B):
        for hkv in range(HKV):
            for kb in range(n_qb):
                want = [
                    g_ * n_qb + qb
                    for g_ in range(G)
                    for qb in range(n_qb)
                    if kb in idx[b, hkv * G + g_, qb, : counts[b, hkv * G + g_, qb]].tolist()
                ]
                got = tidx[b, hkv, kb, : tcounts[b, hkv, kb]].tolist()
                assert got == want, (b, hkv, kb)


@pytest.mark.parametrize("seed", range(4))
def test_key_block_lists_match_torch_twin(seed):
    """Real selections (sorted lists, empty rows, full rows) of awkward sizes: the kernels'
    transposed lists equal the PyTorch twin's in every valid entry."""
    r = random.Random(seed)
    B, HKV, G = r.randint(1, 2), r.randint(1, 3), [1, 2, 4, 8][seed]
    n_qb = r.randint(3, 70)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, HKV * G, n_qb, n_qb, generator=g).to(DEV)
    sink = torch.randint(-1, n_qb, (B, HKV), generator=g, dtype=torch.int32).to(DEV)
    counts, idx = select_blocks(logits, sink, r.choice([0.3, 0.9, 1.0]), 2, G)
    tcounts, tidx = kernels.key_block_lists(counts, idx, HKV)
    want_counts, want_idx = key_block_lists_torch(counts, idx, HKV)
    assert torch.equal(tcounts, want_counts)
    valid = torch.arange(G * n_qb, device=DEV) < tcounts[..., None]
    assert torch.equal(tidx[valid], want_idx[valid])


@pytest.mark.parametrize("seed", range(3))
def test_work_items_split_every_key_block_by_region_exactly(seed):
    """The backward's work items: each valid list entry in exactly one item, the item of
    its query block's region and head; one item per key block walks the own segment; items
    ordered by (batch and KV head, region, key block)."""
    r = random.Random(seed)
    B, HKV, G = r.randint(1, 2), r.randint(1, 2), [1, 2, 4][seed]
    n_qb, block, seg, region = r.randint(5, 40), 16, 16 * r.choice([1, 2, 4]), r.choice([2, 3, 8])
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, HKV * G, n_qb, n_qb, generator=g).to(DEV)
    sink = torch.randint(-1, n_qb, (B, HKV), generator=g, dtype=torch.int32).to(DEV)
    counts, idx = select_blocks(logits, sink, r.choice([0.3, 0.9, 1.0]), seg // block, G)
    tcounts, tidx = kernels.key_block_lists(counts, idx, HKV)
    items = work_items(tcounts, tidx, n_qb, block, seg, region).cpu()
    tcounts, tidx = tcounts.flatten().tolist(), tidx.view(len(tcounts.flatten()), -1).cpu()
    n_kb = n_qb
    seen, own, keys = set(), [], []
    for row, is_own, *bounds in items.tolist():
        lo, hi = bounds[:G], bounds[G:]
        c = {((int(tidx[row, e]) % n_qb) // region) for h in range(G) for e in range(lo[h], hi[h])}
        if is_own:
            c.add((row % n_kb) * block // seg * seg // block // region)
            own.append(row)
        assert len(c) == 1, (row, c)
        keys.append((row // n_kb, c.pop(), row % n_kb))
        for h in range(G):
            for e in range(lo[h], hi[h]):
                assert int(tidx[row, e]) // n_qb == h
                assert (row, e) not in seen
                seen.add((row, e))
    assert seen == {(row, e) for row, n in enumerate(tcounts) for e in range(n)}
    assert sorted(own) == list(range(len(tcounts)))
    assert keys == sorted(keys)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "seed,region", [(s, kernels.REGION) for s in range(16)] + [(1, 1), (2, 2), (5, 1)]
)
def test_bf16_gradients_match_reference_on_gpu(seed, region, monkeypatch):
    """Real tile sizes (blocks 64 and 128), bf16; the last cases split every key block over
    work items of 1-2 query blocks (at the default, these lengths make one region)."""
    monkeypatch.setattr(kernels, "REGION", region)
    c = random_case(seed, block_choices=(64, 128))
    cfg = c.pop("cfg")
    c["d"] = [64, 128][seed % 2]
    c["n"] = c["n"] * 3 + 11  # several segments at the larger blocks
    q, k, v, do = make_inputs(**c, dtype=torch.bfloat16, seed=seed)
    got = grads(lambda *x: pbs_attention(*x, config=cfg), q, k, v, do)
    ref = grads(lambda *x: reference_attention(*x, config=cfg), q, k, v, do)
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
        assert not a.isnan().any(), name
        assert rel_err(a, b) < TOL[torch.bfloat16], (name, rel_err(a, b), c, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sm90_forward_writes_the_same_log_sum_exp_as_the_generic_kernel():
    """On Hopper, forwards with gradients run the sm90 kernel: its LSE feeds our backward."""
    q, k, v, _ = make_inputs(2, 8, 2, 1500, 128, torch.bfloat16, 11)
    if kernels.attention_kernel(q, 128) != "sm90":
        pytest.skip("the sm90 kernel needs a Hopper GPU")
    cfg = PBSConfig(threshold=0.7, min_seq_len=0)
    plan = make_plan(q, k, v, cfg)
    lists = (q, k, v, plan.kp, plan.vp, plan.counts, plan.indices, 128, cfg.segment_size)
    lse = {}
    for kernel in ("sm90", "generic"):
        lse[kernel] = torch.full(q.shape[:3], float("nan"), device=DEV)
        kernels.block_sparse_attention(*lists, plan.scale, kernel=kernel, lse=lse[kernel])
    torch.testing.assert_close(lse["sm90"], lse["generic"], atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "b,hq,hkv,n,d,dtype,threshold,nan_padded_kv",
    [
        (2, 8, 2, 1500, 128, torch.bfloat16, 0.7, False),  # batch, GQA 4, partial last block
        (1, 4, 4, 777, 64, torch.float16, 0.5, False),  # head dim 64, fp16
        (1, 6, 1, 2049, 128, torch.bfloat16, 0.9, True),  # GQA 6, one token past the grid
        (3, 4, 2, 300, 128, torch.bfloat16, 1.0, True),  # every causal block kept
    ],
)
def test_sm90_backward_matches_the_generic_kernels(
    b, hq, hkv, n, d, dtype, threshold, nan_padded_kv
):
    """The Gluon backward (dq, dk, dv in one kernel) against the portable kernels on the same
    plan and forward; with nan_padded_kv the permuted K/V sit in longer NaN-filled buffers
    (rows past N are read by the last key block's tile and must reach no gradient, dq
    included: its product sums over every key of the block)."""
    q, k, v, do = make_inputs(b, hq, hkv, n, d, dtype, seed=n)
    if kernels.attention_kernel(q, 128) != "sm90":
        pytest.skip("the sm90 kernels need a Hopper GPU")
    cfg = PBSConfig(threshold=threshold, min_seq_len=0)
    kv_out = None
    if nan_padded_kv:
        buf = torch.full((2, b, hkv, n + 300, d), float("nan"), device=DEV, dtype=dtype)
        kv_out = (buf[0], buf[1])
    plan = make_plan(q, k, v, cfg, kv_out=kv_out)
    blocks = (128, cfg.segment_size, plan.scale)
    lse = torch.empty(q.shape[:3], device=DEV)
    out = kernels.block_sparse_attention(
        q, k, v, plan.kp, plan.vp, plan.counts, plan.indices, *blocks, lse=lse
    )  # fmt: skip
    got, want = (
        kernels.block_sparse_attention_backward(
            do, q, k, v, out, lse, plan.kp, plan.vp, plan.perm, plan.counts, plan.indices,
            *blocks, kernel=kernel,
        )
        for kernel in ("sm90", "generic")
    )  # fmt: skip
    for name, a, w in zip(["dq", "dk", "dv"], got, want, strict=True):
        assert not a.isnan().any(), name
        assert rel_err(a, w) < 2e-3, (name, rel_err(a, w))
