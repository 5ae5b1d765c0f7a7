"""The Hopper (sm90) attention kernels, the forward and the backward, are built for sm_90
here, without a GPU, with the installed Triton: Gluon is young and its API moves between
releases, so a break shows up on CI, not first on a user's H100. (Their results are checked
against the reference in test_gpu.py and test_backward.py.)

The build runs in a child process: Gluon does not compile under TRITON_INTERPRET=1, which the
CPU test session sets before pbs is imported.
"""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_SHARED = 232448  # Hopper's shared memory per thread block (227 KB)


def build(dtype: torch.dtype, head_dim: int, block: int, store_lse: bool):
    """Compile the kernel for sm_90; returns Triton's compiled kernel (PTX and metadata).
    ``store_lse``: the variant that also writes the log-sum-exp (forwards with gradients)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from pbs.kernels import attention_sm90

    rows = torch.empty(4 * block, head_dim, dtype=dtype)
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16

    def desc(block_rows):
        layout = gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], gl_dtype)
        return TensorDescriptor.from_tensor(rows, [block_rows, head_dim], layout)

    kv = desc(block)
    ints = torch.empty(4, dtype=torch.int32)
    args = dict(q_desc=desc(attention_sm90.ROWS.value), k_desc=kv, v_desc=kv, kp_desc=kv,
                vp_desc=kv, O=rows, LSE=torch.empty(4), COUNTS=ints, IDX=ints, sob=1, soh=1,
                son=1, N=1, NP=1, n_qb=1, n_kb=1, qk_scale=0.1)  # fmt: skip
    const = dict(HQ=4, G=2, HEAD_DIM=head_dim, BLOCK=block, SEG=2 * block,
                 STAGES=attention_sm90.STAGES, CONSUMER_REGS=attention_sm90.CONSUMER_REGS,
                 STORE_LSE=store_lse)  # fmt: skip
    return compile_gluon(attention_sm90._block_sparse_attn_fwd_sm90, args, const)


def compile_gluon(fn, args: dict, const: dict):
    """Compile Gluon kernel ``fn`` for sm_90 with runtime ``args`` and constexprs ``const``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature = {
        name: "constexpr" if name in const
        else "fp32" if isinstance(args[name], float)
        else "i32" if isinstance(args[name], int)
        else mangle_type(args[name])
        for name in fn.arg_names
    }  # fmt: skip
    constexprs = {(fn.arg_names.index(name),): value for name, value in const.items()}
    return triton.compile(
        GluonASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4},
    )


def wgmma_waits_added(ptx: str) -> list[str]:
    """ptxas's notes (``-v``) on waits it added to the wgmma pipelines of ``ptx`` (sm_90a)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(90).path, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    # e.g. "(C7512) ... wgmma.mma_async instructions are serialized due to insufficient
    # register resources", "(C7517) wgmma.wait_group is injected ..." (the wording varies
    # between ptxas versions: "warpgroup.wait" in the one of Triton 3.6)
    return [
        line.strip()
        for line in log.splitlines()
        if ("wgmma" in line or "warpgroup" in line) and ("serialized" in line or "injected" in line)
    ]


def run_build(*argv) -> subprocess.CompletedProcess:
    """Build in a child process without TRITON_INTERPRET; fails the test on a build error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, __file__, *map(str, argv)], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    "dtype,head_dim,block,store_lse",
    [("bfloat16", 128, 128, 0), ("float16", 64, 128, 0), ("bfloat16", 128, 128, 1)],
)
def test_sm90_kernel_builds_for_hopper(dtype, head_dim, block, store_lse):
    done = run_build("forward", dtype, head_dim, block, store_lse)
    wgmma, tma, shared, fp32_store, _, serialised = done.stdout.split()[-6:]
    assert wgmma == "True" and tma == "True"  # wgmma fed by TMA loads
    assert fp32_store == str(bool(store_lse))  # the fp32 log-sum-exp is written when asked for
    assert 0 < int(shared) <= MAX_SHARED
    assert serialised == "False", done.stdout.splitlines()[-2]  # see the backward's test


def build_backward(dtype: torch.dtype, head_dim: int):
    """Compile the backward kernel (dq, dk, dv) for sm_90, block 128: Triton's compiled kernel."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from pbs.kernels import attention_bwd_sm90 as bwd

    rows = torch.empty(512, head_dim, dtype=dtype)
    gl_dtype = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([bwd.ROWS.value, head_dim], gl_dtype)
    desc = TensorDescriptor.from_tensor(rows, [bwd.ROWS.value, head_dim], layout)
    dq_block = [bwd.ROWS.value, head_dim // 2]
    dq_layout = gl.NVMMASharedLayout.get_default_for(dq_block, gl.float32)
    dq_desc = TensorDescriptor.from_tensor(torch.empty(512, head_dim), dq_block, dq_layout)
    ints = torch.empty(4, dtype=torch.int32)
    stat_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    stat = TensorDescriptor.from_tensor(torch.empty(4 * 128), [bwd.ROWS.value], stat_layout)
    args = dict(q_desc=desc, do_desc=desc, kp_desc=desc, vp_desc=desc, dq_desc=dq_desc,
                lse_desc=stat, delta_desc=stat, PERM=ints, TIDX=ints, ITEMS=ints,
                DK=rows, DV=rows, spb=1, sph=1, spn=1, sgb=1, sgh=1, sgn=1, N=1, NP=1, NPAD=1,
                n_qb=1, n_kb=1, qk_scale=0.1, sm_scale=0.1)  # fmt: skip
    const = dict(HQ=4, G=2, HEAD_DIM=head_dim, BLOCK=128, SEG=256, STAGES=bwd.STAGES,
                 CONSUMER_REGS=bwd.CONSUMER_REGS)  # fmt: skip
    return compile_gluon(bwd._attn_bwd_sm90, args, const)


@pytest.mark.parametrize("dtype,head_dim", [("bfloat16", 128), ("float16", 64)])
def test_sm90_backward_kernel_builds_for_hopper(dtype, head_dim):
    done = run_build("backward", dtype, head_dim)
    wgmma, tma, shared, _, reduce, serialised = done.stdout.split()[-6:]
    assert wgmma == "True" and tma == "True"
    assert reduce == "True"  # dq is added into its fp32 buffer by TMA reduce-add
    assert 0 < int(shared) <= MAX_SHARED
    # ptxas waits on a wgmma where it cannot prove its registers free (C7517: one wait
    # injected) or serialises every wgmma (C7512: too few registers; C7514: a partial wait on
    # results carried round a loop): the tile's overlap of S^T, dP^T and the exponentials is
    # gone, and only ptxas's log says so.
    assert serialised == "False", done.stdout.splitlines()[-2]


@pytest.mark.parametrize("longer", [False, True])
def test_tma_row_views_keep_each_heads_rows(longer):
    """The launchers hand TMA (B*H*R, D) row views and find head h's rows at h*R. Q, K, V are
    read with R = N: a slice of a longer buffer (a padded batch row of pbs.hf, a cache) is
    copied, not read with the buffer's spacing. ``longer`` (kp, vp, whose spacing the kernels
    take) keeps a view of a longer buffer in place where the spaced rows fit its storage."""
    from pbs.kernels.attention_sm90 import _rows

    buf = torch.randn(2, 3, 40, 16)
    cases = [buf[:, :, 5:29], buf[:, :, :24], buf[:, :, :24].transpose(1, 2).contiguous()
             .transpose(1, 2), buf]  # fmt: skip
    for t in cases:
        B, H, L, D = t.shape
        view = _rows(t, longer=longer)
        spacing = view.shape[0] // (B * H)
        in_place = view.data_ptr() == t.data_ptr()
        assert spacing == L or (longer and in_place and spacing == t.stride(1) // D)
        heads = view.view(B * H, spacing, D)[:, :L]
        assert torch.equal(heads.reshape(B, H, L, D), t)
    assert _rows(buf[:, :, :24], longer=True).data_ptr() == buf.data_ptr()  # no copy


if __name__ == "__main__":
    dtype = getattr(torch, sys.argv[2])
    if sys.argv[1] == "backward":
        kernel = build_backward(dtype, int(sys.argv[3]))
    else:
        kernel = build(dtype, int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5])))
    ptx = kernel.asm["ptx"]
    notes = wgmma_waits_added(ptx)
    print(" | ".join(notes) or "ptxas: no wgmma waits added")
    print("wgmma.mma_async" in ptx, "cp.async.bulk.tensor" in ptx, kernel.metadata.shared,
          "st.global.b32" in ptx, "cp.reduce.async.bulk.tensor" in ptx, bool(notes))  # fmt: skip
