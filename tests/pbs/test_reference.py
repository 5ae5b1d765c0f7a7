"""PBS-Attn algorithm pieces in plain PyTorch: config, permutation, selection, reference."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pbs import PBSConfig, reference_attention
from pbs.permute import segment_permutation
from pbs.plan import make_plan
from pbs.select import mean_pool, select_blocks_torch


def test_defaults_follow_the_paper():
    cfg = PBSConfig()
    assert (cfg.block_size, cfg.segment_size, cfg.threshold) == (128, 256, 0.9)
    assert cfg.force_sink and cfg.permute and cfg.backend in ("triton", "flex")


@pytest.mark.parametrize(
    "bad",
    [
        dict(block_size=48),
        dict(segment_size=96, block_size=64),
        dict(threshold=0.0),
        dict(threshold=1.5),
        dict(backend="cuda"),
        dict(min_seq_len=-1),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="pbs\\."):
        PBSConfig(**bad)


def test_segment_permutation_sorts_full_segments_and_keeps_the_tail():
    torch.manual_seed(0)
    imp = torch.rand(2, 3, 70)
    perm = segment_permutation(imp, 32).long()
    assert perm.dtype == torch.long and perm.shape == imp.shape
    for s in range(0, 64, 32):
        seg = perm[..., s : s + 32]
        assert ((seg >= s) & (seg < s + 32)).all()
        vals = imp.gather(-1, seg)
        assert (vals[..., :-1] >= vals[..., 1:]).all()
    assert torch.equal(perm[..., 64:], torch.arange(64, 70).expand(2, 3, 6))
    assert torch.equal(perm.sort(-1).values, torch.arange(70).expand(2, 3, 70))


def test_mean_pool_handles_a_partial_last_block():
    x = torch.randn(1, 2, 37, 8)
    p = mean_pool(x, 16)
    assert p.shape == (1, 2, 3, 8)
    torch.testing.assert_close(p[:, :, 2], x[:, :, 32:].mean(2))


def test_selection_is_the_smallest_set_reaching_the_threshold():
    torch.manual_seed(1)
    B, HQ, nqb, nkb, bps = 2, 4, 12, 12, 2
    logits = torch.randn(B, HQ, nqb, nkb) * 3
    sink = torch.full((B, 2), -1, dtype=torch.int32)
    counts, idx = select_blocks_torch(logits, sink, 0.8, bps, 2)
    for b in range(B):
        for h in range(HQ):
            for qb in range(nqb):
                n_cand = (qb // bps) * bps
                c = int(counts[b, h, qb])
                if n_cand == 0:
                    assert c == 0
                    continue
                p = torch.softmax(logits[b, h, qb, :n_cand] * math.log(2), 0)  # log2 units
                kept = idx[b, h, qb, :c].long()
                assert (kept < n_cand).all() and (kept[1:] > kept[:-1]).all()
                assert p[kept].sum() >= 0.8 - 1e-6
                # minimal: dropping the weakest kept block falls below the threshold
                assert p[kept].sum() - p[kept].min() < 0.8
                dropped = [i for i in range(n_cand) if i not in kept]
                if dropped:
                    assert p[kept].min() >= p[dropped].max()


def test_threshold_one_keeps_every_candidate_and_sink_is_forced():
    logits = torch.randn(1, 2, 8, 8)
    sink = torch.tensor([[1]], dtype=torch.int32)
    counts, _ = select_blocks_torch(logits, sink, 1.0, 2, 2)
    assert torch.equal(counts[0, 0], torch.tensor([0, 0, 2, 2, 4, 4, 6, 6], dtype=torch.int32))
    counts, idx = select_blocks_torch(logits, sink, 0.01, 2, 2)
    for qb in range(2, 8):
        assert 1 in idx[0, 0, qb, : counts[0, 0, qb]].tolist()


@pytest.mark.parametrize("n,hq,hkv", [(37, 2, 1), (100, 4, 2), (129, 2, 2)])
def test_reference_at_threshold_one_is_dense_causal(n, hq, hkv):
    torch.manual_seed(n)
    q = torch.randn(2, hq, n, 32, dtype=torch.float64)
    k = torch.randn(2, hkv, n, 32, dtype=torch.float64)
    v = torch.randn(2, hkv, n, 32, dtype=torch.float64)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=1.0, min_seq_len=0)
    ref = reference_attention(q, k, v, config=cfg)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ref, sdpa)


def test_reference_sparse_masks_the_dropped_blocks():
    torch.manual_seed(3)
    q = torch.randn(1, 2, 96, 16)
    k = torch.randn(1, 2, 96, 16)
    v = torch.randn(1, 2, 96, 16)
    cfg = PBSConfig(block_size=16, segment_size=32, threshold=0.3, min_seq_len=0)
    plan = make_plan(q, k, v, cfg)
    assert int(plan.counts.sum()) < sum((qb // 2) * 2 for qb in range(6)) * 2
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = reference_attention(q, k, v, config=cfg)
    # first segment is exact, later ones are not
    torch.testing.assert_close(ref[:, :, :32], dense[:, :, :32])
    assert (ref[:, :, 32:] - dense[:, :, 32:]).abs().max() > 1e-3


def test_short_sequences_take_the_dense_path():
    q = torch.randn(1, 2, 40, 16)
    k = torch.randn(1, 1, 40, 16)
    cfg = dataclasses.replace(PBSConfig(), min_seq_len=64, threshold=0.1)
    out = reference_attention(q, k, k, config=cfg)
    sdpa = F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa)
