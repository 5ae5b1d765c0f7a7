"""Skinny GEMM (x @ W^T + bias + residual) against its PyTorch reference.

CPU: the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before this import), in fp32 and fp16 (the interpreter mishandles bf16), on
awkward shapes: K not a multiple of BLOCK_K, N not a multiple of BLOCK_N, M below one tile or
across two, SPLIT_K > 1 (also more splits than K tiles), swap_ab. GPU (marked ``gpu``): bf16 at
Qwen2.5-1.5B's decode shapes with the default configs, and capture in a CUDA graph.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mtrl.rollout.skinny_gemm import (
    H100_SMS,
    SkinnyConfig,
    default_config,
    skinny_linear,
    skinny_linear_reference,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
# Max |out - ref| / (1 + |ref|) on outputs of size ~1: the reference rounds the same fp32 values
# (the dot product summed in another order), so half types differ by at most about one ulp.
# On a GPU fp32 dots are IEEE (no TF32) too.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(m, n, k, dtype, bias=False, residual=False, seed=0, device=DEV):
    """x (m, k) ~ N(0, 1); W (n, k) ~ N(0, 1/k) (outputs ~ N(0, 1)); bias, residual ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(m, n, generator=g) if residual else None
    return [None if t is None else t.to(device, dtype) for t in (x, w, b, r)]


def check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    assert torch.isfinite(out).all()
    err = ((out.float() - ref.float()).abs() / (1 + ref.float().abs())).max().item()
    assert err <= TOL[dtype], err


# (M, N, K, bias, residual, config): every case has a ragged N or K tile, or both.
CASES = [
    (1, 48, 40, True, False, SkinnyConfig(16, 16, 32, 1)),  # K: one full + one partial tile
    (3, 200, 1000, True, True, SkinnyConfig(16, 64, 64, 4)),  # N 200 = 3 x 64 + 8
    (64, 48, 1536, False, True, SkinnyConfig(64, 32, 128, 3, swap_ab=True)),
    (100, 200, 40, True, True, SkinnyConfig(64, 128, 16, 2)),  # M over 2 tiles, 3 K tiles
    (64, 2048, 40, False, False, SkinnyConfig(64, 128, 64, 16)),  # split clamped to 1 K tile
    (3, 200, 1536, False, False, SkinnyConfig(16, 16, 256, 2, num_warps=8, num_stages=2)),
    (100, 48, 1000, True, False, SkinnyConfig(32, 16, 128, 5, swap_ab=True)),  # uneven splits
]
IDS = [f"M{c[0]}-N{c[1]}-K{c[2]}-{c[5].label.replace(' ', '')}" for c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,bias,residual,config", CASES, ids=IDS)
def test_matches_reference(m, n, k, bias, residual, config, dtype):
    x, w, b, r = make(m, n, k, dtype, bias, residual)
    out = skinny_linear(x, w, b, r, config)
    check(out, skinny_linear_reference(x, w, b, r), dtype)


# The full grid of awkward sizes in fp16. Each case gets its own config, cycling the K tile,
# the split (most split K) and swap_ab; tiles wide enough that the interpreter runs few programs.
GRID = [(m, n, k) for m in (1, 3, 64, 100) for n in (48, 200, 2048) for k in (40, 1536, 1000)]


def grid_config(i, m, n, k):
    wide = n > 256  # the interpreter's cost grows with M tiles x N tiles x K tiles
    return SkinnyConfig(
        block_m=16 if m <= 16 else 64,
        block_n=128 if wide else (16, 32, 64)[i % 3],
        block_k=256 if wide and k > 256 else (16, 32, 64, 128)[i % 4],
        split_k=(2, 1, 3, 4, 8)[i % 5],
        swap_ab=i % 2 == 1,
    )


@pytest.mark.parametrize("i", range(len(GRID)), ids=[f"M{m}-N{n}-K{k}" for m, n, k in GRID])
def test_shape_grid_fp16(i):
    m, n, k = GRID[i]
    x, w, b, r = make(m, n, k, torch.float16, bias=i % 2 == 0, residual=i % 3 != 1, seed=10 + i)
    out = skinny_linear(x, w, b, r, grid_config(i, m, n, k))
    check(out, skinny_linear_reference(x, w, b, r), torch.float16)


@pytest.mark.parametrize(
    "m,n,k,dtype",
    [
        (1, 2048, 1536, torch.float16),
        (64, 200, 1000, torch.float16),
        (100, 2048, 1000, torch.float16),  # the large one: fp16 only (fp32 dots are slow here)
        (3, 48, 40, torch.float32),
        (64, 200, 1536, torch.float32),
    ],
)
def test_default_config_matches_reference(m, n, k, dtype):
    x, w, b, r = make(m, n, k, dtype, bias=True, residual=True, seed=1)
    check(skinny_linear(x, w, b, r), skinny_linear_reference(x, w, b, r), dtype)


def test_split_k_is_deterministic_and_close_to_one_split():
    """Two-pass split-K: the same bits on every call; within rounding of the unsplit result."""
    x, w, b, r = make(64, 200, 1000, torch.float32, bias=True, residual=True, seed=2)
    split = SkinnyConfig(64, 64, 64, 8)
    first = skinny_linear(x, w, b, r, split)
    assert torch.equal(first, skinny_linear(x, w, b, r, split))
    one = skinny_linear(x, w, b, r, SkinnyConfig(64, 64, 64, 1))
    torch.testing.assert_close(first, one, atol=1e-5, rtol=1e-5)


def test_equals_residual_plus_f_linear():
    """The epilogue's roundings are those of ``residual + F.linear(x, w, b)``."""
    x, w, b, r = make(3, 200, 1000, torch.float16, bias=True, residual=True, seed=3)
    expected = (r.float() + F.linear(x.float(), w.float(), b.float()).to(x.dtype).float()).to(
        x.dtype
    )
    torch.testing.assert_close(skinny_linear_reference(x, w, b, r), expected, atol=0, rtol=0)
    check(skinny_linear(x, w, b, r, SkinnyConfig(16, 64, 64, 2)), expected, torch.float16)


def test_strided_views_and_leading_dims():
    """W a column block of a wider buffer (row stride > K, read in place); x and residual with
    leading dims and padded rows; the output keeps x's leading dims."""
    g = torch.Generator().manual_seed(4)
    k, n = 40, 48
    buf = torch.randn(n, k + 24, generator=g).to(DEV)
    w = buf[:, 8 : 8 + k]
    assert w.stride() == (k + 24, 1)
    x = torch.randn(2, 3, k + 5, generator=g).to(DEV)[..., :k]
    r = torch.randn(2, 3, n + 3, generator=g).to(DEV)[..., :n]
    b = torch.randn(n, generator=g).to(DEV)
    out = skinny_linear(x, w, b, r, SkinnyConfig(16, 32, 16, 2))
    assert out.shape == (2, 3, n) and out.is_contiguous()
    check(out, skinny_linear_reference(x, w, b, r), torch.float32)


def test_empty_rows():
    x, w, _, _ = make(1, 48, 40, torch.float32)
    assert skinny_linear(x[:0], w).shape == (0, 48)


def test_rejects_bad_inputs():
    x, w, b, r = make(3, 48, 40, torch.float32, bias=True, residual=True)
    with pytest.raises(ValueError, match="unit stride along K"):
        skinny_linear(x, w.t().contiguous().t())  # a (N, K) view with K strided
    with pytest.raises(ValueError, match="x must be"):
        skinny_linear(x[:, :32], w)
    with pytest.raises(TypeError, match="dtype"):
        skinny_linear(x.half(), w)
    with pytest.raises(TypeError, match="residual dtype"):
        skinny_linear(x, w, b, r.half())
    with pytest.raises(ValueError, match="residual must be"):
        skinny_linear(x, w, b, r[:2])
    with pytest.raises(ValueError, match="bias must be"):
        skinny_linear(x, w, b[:40])
    with pytest.raises(ValueError, match="block_n"):
        SkinnyConfig(block_n=24)
    with pytest.raises(ValueError, match="split_k"):
        SkinnyConfig(split_k=0)


# Qwen2.5-1.5B's decode projections: (N, K).
QWEN = {"qkv": (2048, 1536), "o_proj": (1536, 1536), "down": (1536, 8960)}
QWEN |= {"gate_up": (17920, 1536), "lm_head": (151936, 1536)}


def test_default_config_fills_an_h100():
    """At M = 64 and 256 every projection gets >= 2 programs per SM, whole K tiles per split
    (at least 2), a pipeline that fits shared memory, shared by all of an SM's programs when
    they fit in one wave (<= 4 per SM); the documented choices at M = 64."""
    for m in (64, 256):
        for n, k in QWEN.values():
            c = default_config(m, n, k)
            programs = -(-m // c.block_m) * -(-n // c.block_n) * c.split_k
            assert programs >= 2 * H100_SMS, (m, n, k, c)
            assert c.split_k == 1 or -(-k // c.block_k) >= 2 * c.split_k, (m, n, k, c)
            smem = c.num_stages * (c.block_m + c.block_n) * c.block_k * 2
            per_sm = -(-programs // H100_SMS)
            assert smem <= 160 * 1024 and (per_sm > 4 or per_sm * (smem + 1024) <= 228 * 1024)
    labels = {name: default_config(64, n, k).label for name, (n, k) in QWEN.items()}
    assert labels == {
        "qkv": "m64 n64 k64 s9 w4 p4",
        "o_proj": "m64 n64 k64 s11 w4 p4",
        "down": "m64 n64 k128 s11 w4 p3",
        "gate_up": "m64 n64 k64 s1 w4 p4",
        "lm_head": "m64 n128 k128 s1 w4 p3",
    }
    assert default_config(1, 48, 40).block_m == 16  # small M: the smallest tile


# ----------------------------------------------------------------------------- sm_90 build
def build_sm90(config, dtype="bf16", split=True, even_k=True, bias=True, residual=True, m=None):
    """Compile _linear_tiles_kernel for sm_90 without a GPU; ints specialised as the launcher's
    would be for K and strides that are multiples of 16 (M = 1 as a constexpr, as at runtime)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mtrl.rollout.skinny_gemm import _linear_tiles_kernel as fn

    const = dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN_K=even_k, SPLIT=split, SWAP_AB=config.swap_ab, IEEE=dtype == "fp32",
        HAS_BIAS=bias, HAS_RESIDUAL=residual,
    )  # fmt: skip
    if m is not None:
        const["M"] = m
    ptrs = {"X", "W", "BIAS", "RES", "Y", "PART"}
    signature = {
        a: "constexpr" if a in const else "*fp32" if a == "PART" else f"*{dtype}" if a in ptrs
        else "i32"
        for a in fn.arg_names
    }  # fmt: skip
    div16 = ptrs | {"N", "K", "sxm", "swn", "srm", "sym"}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    return triton.compile(
        ASTSource(fn, signature, {(fn.arg_names.index(a),): v for a, v in const.items()}, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )


def build_sum_sm90(m=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mtrl.rollout.skinny_gemm import SUM_TILE
    from mtrl.rollout.skinny_gemm import _sum_k_splits_kernel as fn

    sum_m, sum_n = SUM_TILE["cuda"]
    const = dict(BLOCK_M=sum_m, BLOCK_N=sum_n, HAS_BIAS=True, HAS_RESIDUAL=True)
    if m is not None:
        const["M"] = m
    signature = {
        a: "constexpr" if a in const else "*fp32" if a == "PART"
        else "*bf16" if a in ("BIAS", "RES", "Y") else "i32"
        for a in fn.arg_names
    }  # fmt: skip
    return triton.compile(
        ASTSource(fn, signature, {(fn.arg_names.index(a),): v for a, v in const.items()}),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )


def test_kernels_build_for_sm90():
    """The kernels compile for an H100 here, without one (the interpreter accepts code the
    compiler rejects), and the K loop is software-pipelined: shared memory holds at least
    num_stages - 1 buffers of the x and W tiles (within 227 KiB). In a child process: the CPU
    session sets TRITON_INTERPRET=1."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n")
    built = [line.split() for line in lines if line.startswith("built ")]
    assert len(built) == len(SM90_BUILDS) + 2, done.stdout
    for (_, shared), (config, options) in zip(built, SM90_BUILDS, strict=False):
        elem = 4 if options.get("dtype") == "fp32" else 2
        tile = (config.block_m + config.block_n) * config.block_k * elem
        assert (config.num_stages - 1) * tile <= int(shared) <= 232448, (config, shared)


# (config, build options): the default configs of q/k/v (split K), gate/up (residual) and the LM
# head; swap_ab with a ragged K; fp32 (IEEE dots) with M = 1.
SM90_BUILDS = [
    (default_config(64, 2048, 1536), dict(residual=False)),
    (default_config(64, 17920, 1536), dict(split=False, bias=False)),
    (default_config(64, 151936, 1536), dict(split=False, bias=False, residual=False)),
    (SkinnyConfig(16, 32, 64, 1, swap_ab=True), dict(split=False, even_k=False)),
    (SkinnyConfig(16, 64, 64, 2), dict(dtype="fp32", even_k=False, m=1)),
]


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 256])
@pytest.mark.parametrize("name", list(QWEN))
def test_bf16_decode_shapes_on_gpu(name, m):
    n, k = QWEN[name]
    x, w, b, r = make(m, n, k, torch.bfloat16, bias=name == "qkv", residual=name == "o_proj")
    check(skinny_linear(x, w, b, r), skinny_linear_reference(x, w, b, r), torch.bfloat16)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    """Captured with split-K (workspace from the graph's pool), replayed on new inputs."""
    x, w, b, r = make(64, 2048, 1536, torch.bfloat16, bias=True, residual=True, seed=5)
    config = default_config(
        64, 2048, 1536, torch.cuda.get_device_properties(0).multi_processor_count
    )
    assert config.split_k > 1
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        skinny_linear(x, w, b, r, config)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w, b, r, config)
    for seed in (6, 7):
        x2, _, _, r2 = make(64, 2048, 1536, torch.bfloat16, residual=True, seed=seed)
        x.copy_(x2)
        r.copy_(r2)
        graph.replay()
        torch.cuda.synchronize()
        check(out, skinny_linear_reference(x, w, b, r), torch.bfloat16)


if __name__ == "__main__":  # test_kernels_build_for_sm90's child process
    for config, options in SM90_BUILDS:
        print("built", build_sm90(config, **options).metadata.shared)
    for m in (None, 1):
        print("built", build_sum_sm90(m).metadata.shared)
