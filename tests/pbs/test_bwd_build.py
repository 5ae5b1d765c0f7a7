"""The backward kernels (and the forward's log-sum-exp variant) compile for real GPUs (sm_80,
sm_90) here, without one: Triton's interpreter, which runs them in the CPU tests, accepts code
the compiler rejects. (Their results are checked on a GPU in test_backward.py.)

The build runs in a child process, without TRITON_INTERPRET (set for this test session).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(name: str, arch: int):
    """Compile kernel ``name`` for bf16, 32/8 heads, head dim 128, block 128, segment 256."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pbs.kernels import attention, attention_bwd

    shape = dict(HQ=32, G=4, HEAD_DIM=128, BLOCK=128, SEG=256)
    fn, const = {
        "dq": (attention_bwd._attn_bwd_dq, dict(shape, BLOCK_M=128, BLOCK_N=32)),
        "dkdv": (attention_bwd._attn_bwd_dkdv, dict(shape, BLOCK_M=32, BLOCK_N=128)),
        "delta": (attention_bwd._attn_bwd_delta, dict(HQ=32, HEAD_DIM=128, BLOCK_M=128)),
        "fwd_lse": (
            attention._block_sparse_attn_fwd,
            dict(shape, STORE_LSE=True, BLOCK_M=128, BLOCK_N=64),
        ),
    }[name]
    ints = {"COUNTS", "IDX", "PERM", "TIDX", "ITEMS"}
    signature = {
        arg: "constexpr" if arg in const
        else "*fp32" if arg in ("LSE", "DELTA", "DK", "DV")
        else "*i32" if arg in ints
        else "fp32" if arg in ("qk_scale", "sm_scale")
        else "i32" if arg in ("N", "N_BUCKET") or arg[0].islower()
        else "*bf16"
        for arg in fn.arg_names
    }  # fmt: skip
    constexprs = {(fn.arg_names.index(arg),): value for arg, value in const.items()}
    return triton.compile(
        ASTSource(fn, signature, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": 8, "num_stages": 2},
    )


@pytest.mark.parametrize("arch", [80, 90])
def test_backward_kernels_build_for_gpus(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, __file__, str(arch)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name, shared in zip(
        ["dq", "dkdv", "delta", "fwd_lse"], done.stdout.split()[-4:], strict=True
    ):
        assert 0 <= int(shared) <= 160 * 1024, name  # fits an A100's shared memory


if __name__ == "__main__":
    for kernel in ("dq", "dkdv", "delta", "fwd_lse"):
        print(build(kernel, int(sys.argv[1])).metadata.shared)
