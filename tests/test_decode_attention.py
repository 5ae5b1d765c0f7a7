"""Split-KV decode attention against the plain PyTorch reference.

CPU: the Triton kernels run through Triton's interpreter, in fp32 and fp16 (the interpreter
mishandles bf16), on small awkward shapes (key counts off the tile grid, cache slices, masked
splits). GPU (marked ``gpu``): bf16 at the engine's shapes, and capture in a CUDA graph.
"""

import os

import pytest
import torch
import torch.nn.functional as F

# TRITON_INTERPRET=1 on a machine without CUDA is set by tests/conftest.py, before this import.
from mtrl.arrivals import _COUNTERS
from mtrl.rollout.decode_attention import (
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    split_plan,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    DEV == "cpu" and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
# Max abs error on outputs of size ~1. fp32: the interpreter's dot is exact (GPU: TF32).
# Half types: P is rounded to the K/V dtype before P @ V.
TOL = {torch.float32: 1e-5 if DEV == "cpu" else 3e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_inputs(b, kvh, r, d, n, cache_len, dtype, mask_kind, seed=0, device=DEV):
    """q (B, KVH, R, D); k, v = cache[:, :, :n] of a longer cache (non-contiguous slices);
    mask (B, n) additive fp32, 0 or -inf, at least one 0 per row.

    mask_kind: "none"; "left" (left padding: row 0 none, row 1 all but the last 16 keys, others
    random); "random" (each key dropped with probability 1/2); "left+random".
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kvh, r, d, generator=g).to(device, dtype)
    k_cache = torch.randn(b, kvh, cache_len, d, generator=g).to(device, dtype)
    v_cache = torch.randn(b, kvh, cache_len, d, generator=g).to(device, dtype)
    keep = torch.ones(b, n, dtype=torch.bool)
    if "left" in mask_kind:
        pads = torch.randint(0, n, (b,), generator=g)
        pads[0] = 0
        if b > 1:
            pads[1] = n - 16
        keep &= torch.arange(n)[None, :] >= pads[:, None]
    if "random" in mask_kind:
        keep &= torch.rand(b, n, generator=g) < 0.5
    keep[torch.arange(b), torch.randint(0, n, (b,), generator=g)] |= ~keep.any(1)
    mask = torch.zeros(b, n).masked_fill_(~keep, float("-inf")).to(device)
    return q, k_cache[:, :, :n], v_cache[:, :, :n], mask


def check(out, q, k, v, mask, scale=None):
    ref = decode_attention_reference(q, k, v, mask, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[q.dtype], f"max abs error {err:.2e}"


# (B, KVH, R, D, n, cache_len, dtype, mask_kind, num_splits, block_n)
CASES = [
    (1, 1, 1, 64, 16, 32, torch.float32, "none", 1, 16),
    (3, 2, 5, 64, 80, 96, torch.float32, "left", 5, 16),
    (3, 1, 6, 128, 80, 112, torch.float16, "random", 2, 16),
    (1, 2, 8, 128, 272, 288, torch.float16, "left+random", 5, 64),
    (3, 2, 16, 64, 272, 320, torch.float32, "left", 2, 64),
    (3, 2, 6, 128, 272, 288, torch.float16, "left", 5, 64),
    (1, 2, 5, 64, 80, 96, torch.float16, "left+random", None, 16),
    (3, 1, 1, 128, 16, 48, torch.float16, "random", 5, 16),
    (1, 1, 16, 128, 80, 128, torch.float32, "random", 1, 64),
    (3, 2, 8, 64, 272, 288, torch.float32, "left+random", None, 64),
]


@needs_triton
@pytest.mark.parametrize(
    "b,kvh,r,d,n,cache_len,dtype,mask_kind,num_splits,block_n",
    CASES,
    ids=[
        f"B{c[0]}-KVH{c[1]}-R{c[2]}-D{c[3]}-n{c[4]}-{str(c[6])[6:]}-{c[7]}-s{c[8]}" for c in CASES
    ],
)
def test_matches_reference(b, kvh, r, d, n, cache_len, dtype, mask_kind, num_splits, block_n):
    q, k, v, mask = make_inputs(b, kvh, r, d, n, cache_len, dtype, mask_kind, seed=n + r)
    assert k.untyped_storage().nbytes() > k.numel() * k.element_size()  # a slice of the cache
    out = decode_attention(q, k, v, mask, None, num_splits, block_n=block_n)
    check(out, q, k, v, mask)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 5])
def test_fully_masked_splits(num_splits):
    """Left padding of 250 of 272 keys: with 64-key chunks splits 0-2 see only -inf (max -inf,
    sum 0); with 2 splits (192-key chunks) split 0 does. No NaN, same result."""
    # fp16: exact products in the GPU's dot (fp32 runs as TF32, too coarse at scale 0.3)
    q, k, v, _ = make_inputs(2, 1, 6, 64, 272, 288, torch.float16, "none", seed=1)
    mask = torch.zeros(2, 1, 1, 272, device=DEV, dtype=torch.float16)  # 4-d, half mask
    mask[..., :250] = float("-inf")
    out = decode_attention(q, k, v, mask, 0.3, num_splits, block_n=64)
    check(out, q, k, v, mask, 0.3)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fully_masked_row_is_zero(num_splits):
    """Outside the contract (every row keeps a key), but documented: 0, not NaN."""
    q, k, v, mask = make_inputs(2, 1, 5, 64, 80, 96, torch.float32, "none", seed=5)
    mask[1] = float("-inf")
    out = decode_attention(q, k, v, mask, None, num_splits, block_n=16)
    assert (out[1] == 0).all()
    ref = decode_attention_reference(q, k, v, mask)
    assert (out[0] - ref[0]).abs().max().item() < TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("last", [0, 37, 150, 271])
@pytest.mark.parametrize("num_splits", [1, 3, 4])
def test_last_key_skips_the_keys_after_it(last, num_splits):
    """Keys after ``last_key`` (the empty end of the cache) are not read: they hold NaN here,
    which a read would carry into the output through the q.k product. The result equals the
    reference over the keys up to it, with the live keys cut unevenly over the splits or
    fewer live tiles than splits."""
    n = 272
    q, k, v, mask = make_inputs(3, 2, 6, 64, n, 288, torch.float16, "none", seed=last)
    mask[:, last + 1 :] = float("-inf")
    k[:, :, last + 1 :] = float("nan")
    v[:, :, last + 1 :] = float("nan")
    last_key = torch.tensor(last, device=DEV)
    out = decode_attention(q, k, v, mask, None, num_splits, last_key=last_key, block_n=16)
    assert torch.isfinite(out).all()
    cut = slice(0, last + 1)
    check(out, q, k[:, :, cut], v[:, :, cut], mask[:, cut])


APPEND_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@needs_triton
@pytest.mark.parametrize("dtype", APPEND_DTYPES)
@pytest.mark.parametrize("last, num_splits", [(0, 1), (37, 3), (150, 4), (271, 3), (200, 1)])
def test_append_writes_the_step_key_and_attends_to_it(last, num_splits, dtype):
    """``new_k``/``new_v`` land at ``last_key`` in the cache and nowhere else, and the output
    equals the reference over the cache with them written. The stale entry at ``last_key``
    holds NaN: a split that read it instead of the step's key would carry NaN into the
    output. The step's key and value come in strided (a transposed (B, 1, KVH, D) tensor)."""
    b, kvh, d, n = 3, 2, 64, 272
    q, k, v, mask = make_inputs(b, kvh, 6, d, n, 288, dtype, "left", seed=last)
    mask[:, last + 1 :] = float("-inf")
    mask[:, last] = 0.0  # the step's own key is visible to every row
    k[:, :, last:] = float("nan")
    v[:, :, last:] = float("nan")
    g = torch.Generator().manual_seed(last + 1)
    new_k, new_v = (
        torch.randn(b, 1, kvh, d, generator=g).to(DEV, dtype).transpose(1, 2) for _ in range(2)
    )
    want_k, want_v = k.clone(), v.clone()
    want_k[:, :, last] = new_k[:, :, 0]
    want_v[:, :, last] = new_v[:, :, 0]
    last_key = torch.tensor(last, device=DEV)
    out = decode_attention(
        q, k, v, mask, None, num_splits, last_key=last_key, new_k=new_k, new_v=new_v, block_n=16
    )
    torch.testing.assert_close(k, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v, want_v, rtol=0, atol=0, equal_nan=True)
    cut = slice(0, last + 1)
    check(out, q, k[:, :, cut], v[:, :, cut], mask[:, cut])


@needs_triton
def test_append_needs_last_key_and_both_tensors():
    q, k, v, mask = make_inputs(1, 1, 2, 64, 16, 32, torch.float32, "none")
    new = torch.zeros(1, 1, 1, 64, device=DEV)
    with pytest.raises(ValueError, match="need last_key"):
        decode_attention(q, k, v, mask, new_k=new, new_v=new)
    with pytest.raises(ValueError, match="go together"):
        decode_attention(q, k, v, mask, last_key=torch.tensor(3, device=DEV), new_k=new)
    with pytest.raises(ValueError, match=r"new_v must be \(1, 1, 1, 64\)"):
        decode_attention(
            q,
            k,
            v,
            mask,
            last_key=torch.tensor(3, device=DEV),
            new_k=new,
            new_v=torch.zeros(1, 1, 2, 64, device=DEV),
        )


@needs_triton
def test_last_key_must_be_one_integer():
    q, k, v, mask = make_inputs(1, 1, 2, 64, 16, 32, torch.float32, "none")
    with pytest.raises(ValueError, match="last_key must be a one-element integer tensor"):
        decode_attention(q, k, v, mask, last_key=torch.tensor([3.0], device=DEV))


@needs_triton
def test_strided_layouts():
    """Cache stored (B, L, KVH, D) and viewed as (B, KVH, L, D); q from a transpose; mask wider
    than n (its first n columns count)."""
    b, kvh, r, d, n, cache_len = 2, 2, 6, 64, 80, 100
    g = torch.Generator().manual_seed(2)
    k = torch.randn(b, cache_len, kvh, d, generator=g).to(DEV).transpose(1, 2)[:, :, :n]
    v = torch.randn(b, cache_len, kvh, d, generator=g).to(DEV).transpose(1, 2)[:, :, :n]
    q = torch.randn(b, r, kvh, d, generator=g).to(DEV).transpose(1, 2)
    mask = torch.zeros(b, 1, 1, cache_len, device=DEV)
    mask[0, ..., :30] = float("-inf")
    mask[..., n:] = float("-inf")  # beyond n: must be ignored, not read as keys
    out = decode_attention(q, k, v, mask, None, 3, block_n=16)
    check(out, q, k, v, mask)


@needs_triton
def test_operator_registration():
    """``torch.ops.mtrl.decode_attention``'s schema, fake (meta) implementation and
    dispatch pass torch.library's checks, and a compiled caller traces it in one graph."""
    q, k, v, mask = make_inputs(2, 2, 3, 16, 40, 48, torch.float32, "left")
    last_key = torch.tensor(30, device=DEV)
    mask[:, 31:] = float("-inf")
    args = (q, k, v, mask, last_key, None, 2, 16, 4, 1)
    torch.library.opcheck(torch.ops.mtrl.decode_attention.default, args)
    new_k, new_v = torch.randn(2, 2, 2, 1, 16, device=DEV)
    args = (q, k.clone(), v.clone(), mask, last_key, new_k, new_v, None, 2, 16, 4, 1)
    torch.library.opcheck(torch.ops.mtrl.decode_attention_append.default, args)

    def attend(q, k, v, mask, last_key, new_k, new_v):
        out = decode_attention(q, k, v, mask, num_splits=2, block_n=16, last_key=last_key)
        appended = decode_attention(
            q, k, v, mask, num_splits=2, block_n=16, last_key=last_key, new_k=new_k, new_v=new_v
        )
        return out * 2, appended

    compiled = torch.compile(attend, backend="eager", fullgraph=True)  # a break would raise
    k_before, v_before = k.clone(), v.clone()
    out, appended = compiled(q, k, v, mask, last_key, new_k, new_v)
    check(out / 2, q, k_before, v_before, mask)
    assert torch.equal(k[:, :, 30], new_k[:, :, 0]) and torch.equal(v[:, :, 30], new_v[:, :, 0])
    check(appended, q, k, v, mask)


def test_split_plan():
    for n in (16, 80, 256, 272, 4096):
        for block_n in (16, 64):
            for want in (1, 2, 3, 5, 8, 1000):
                splits, chunk = split_plan(n, want, block_n)
                assert chunk % block_n == 0 and 1 <= splits <= want
                assert (splits - 1) * chunk < n <= splits * chunk  # covers n, none empty
    assert default_num_splits(8, 272, torch.device("cpu"), 64) == 4
    assert default_num_splits(8, 80, torch.device("cpu"), 64) == 2


def test_default_splits_on_an_h100(monkeypatch):
    """132 SMs, 2 programs per SM, at least 512 keys a split: the engine's cases (batch 64 or
    256 x 2 KV heads; the whole cache of 512 or 2,304 positions)."""
    monkeypatch.setattr("mtrl.rollout.decode_attention._sm_count", lambda index: 132)
    h100 = torch.device("cuda", 0)
    assert default_num_splits(128, 512, h100) == 1
    assert default_num_splits(128, 1024, h100) == 2
    assert default_num_splits(128, 2304, h100) == 3  # capped by programs per SM
    assert default_num_splits(512, 2304, h100) == 1
    assert default_num_splits(4, 300, h100, block_n=16) == 1


@needs_triton
def test_split_counters_are_left_zero():
    """Each split counts itself in and the last to arrive merges and resets the count: after
    launches with different splits over the same (batch, KV head) pairs the counters are all
    zero and a repeat gives the same bits."""
    q, k, v, mask = make_inputs(3, 2, 6, 64, 272, 288, torch.float16, "left", seed=9)
    outs = [decode_attention(q, k, v, mask, None, s, block_n=16) for s in (3, 5, 3)]
    assert not _COUNTERS[q.device].any()
    assert torch.equal(outs[0], outs[2])
    check(outs[1], q, k, v, mask)


def test_reference_matches_sdpa():
    q, k, v, mask = make_inputs(3, 2, 6, 64, 80, 96, torch.float32, "left+random", device="cpu")
    ref = decode_attention_reference(q, k, v, mask, 0.2)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None], scale=0.2)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [8, 96, 512])
def test_rejects_bad_head_dim(d):
    q = torch.zeros(1, 1, 2, d)
    k = torch.zeros(1, 1, 16, d)
    with pytest.raises(ValueError, match="head dim"):
        decode_attention(q, k, k, torch.zeros(1, 16))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize(
    "b,n,num_splits",
    [(64, 256, None), (3, 272, 5), (16, 1024, None), (64, 4096, 1), (5, 4096, 64)],
)
def test_gpu_bf16(b, n, num_splits):
    q, k, v, mask = make_inputs(b, 2, 6, 128, n, n + 64, torch.bfloat16, "left+random", seed=n)
    mask = mask.to(torch.bfloat16)[:, None, None, :]  # the engine's (B, 1, 1, n) mask
    out = decode_attention(q, k, v, mask, None, num_splits)
    check(out, q, k, v, mask)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    """Captured once; after the inputs change in place, a replay gives the new result."""
    q, k, v, mask = make_inputs(8, 2, 6, 128, 256, 512, torch.bfloat16, "left", seed=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, mask, None)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, mask, None)
    graph.replay()
    torch.cuda.synchronize()
    check(out, q, k, v, mask)

    q2, k2, v2, mask2 = make_inputs(8, 2, 6, 128, 256, 512, torch.bfloat16, "random", seed=4)
    for dst, src in ((q, q2), (k, k2), (v, v2), (mask, mask2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    check(out, q, k, v, mask)
    torch.testing.assert_close(out, decode_attention(q, k, v, mask, None), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_cuda_graph_follows_last_key():
    """One graph captured over the whole cache serves every decode step: the step's last key
    is read on the device at each replay, and the keys before it are spread over the splits."""
    q, k, v, mask = make_inputs(8, 2, 6, 128, 1024, 1024, torch.bfloat16, "none", seed=5)
    full_mask = mask.clone()
    last_key = torch.tensor(0, device=DEV)
    decode_attention(q, k, v, mask, None, last_key=last_key)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, mask, None, last_key=last_key)
    for last in (0, 100, 511, 1023):
        last_key.fill_(last)
        mask.copy_(full_mask)
        mask[:, last + 1 :] = float("-inf")
        graph.replay()
        torch.cuda.synchronize()
        cut = slice(0, last + 1)
        check(out, q, k[:, :, cut], v[:, :, cut], mask[:, cut])


@pytest.mark.gpu
def test_gpu_first_call_inside_capture_is_refused():
    """The split counters are made by a call outside capture (a buffer made inside one would
    hold garbage until the graph replays): a first multi-split call in a capture says so."""
    q, k, v, mask = make_inputs(8, 2, 6, 128, 1024, 1024, torch.bfloat16, "none", seed=6)
    _COUNTERS.pop(q.device, None)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="make one call of this size before capturing"):
        with torch.cuda.graph(graph):
            decode_attention(q, k, v, mask, None, 4)
    out = decode_attention(q, k, v, mask, None, 4)  # outside capture: fine
    check(out, q, k, v, mask)
