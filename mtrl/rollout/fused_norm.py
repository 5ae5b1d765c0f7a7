"""Fused elementwise kernels of a decoder layer: residual add + RMSNorm, and SiLU(gate) * up.

    normed, residual = add_rms_norm(x, residual, weight, eps)   # residual + x, then RMSNorm
    normed = rms_norm(x, weight, eps)                            # the same kernel, no add
    act = silu_mul(gate, up)                  # SiLU(gate) * up; gate/up may be strided views
    act = silu_and_mul(gate_up)               # the same on a [..., 2 * I] gate|up output
    with FusedNorms(model): ...               # decoder layers use them (the engine's decode)

Each kernel wrapper has a plain PyTorch reference beside it (``*_ref``), the oracle of its
tests. Shapes: any leading dims, last dim N (hidden size, or intermediate size I) of any value
up to 65536, last dim contiguous; rows may be strided (the gate/up views of one GEMM output).

Numerics are transformers' (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``LlamaMLP``), rounding for
rounding where the order of operations allows:
- the residual sum is rounded to ``promote(x, residual)``, the norm's input dtype;
- variance in fp32 (a tree sum, so not bit-equal to torch's reduction order), x * rsqrt(var +
  eps) cast back to the input dtype *before* the weight multiply, whose result has dtype
  ``promote(weight, input)``;
- SiLU(gate) is rounded to gate's dtype before the product with up (``act_fn(gate) * up``).

Why: a decode step at batch 64 moves ~200 KB per elementwise op, so each op costs its launch
(or, inside a CUDA graph, its ~2-3 us of kernel latency), not its bytes. transformers runs
RMSNorm as ~7 kernels, plus a separate residual add and SiLU and multiply; here a decoder
layer's elementwise work is three kernels: add+norm after attention, SiLU-mul, and add+norm
after the MLP that already produces the *next* layer's (or the final) normed input.

The kernels are ``torch.library.triton_op`` custom ops (namespace ``mtrl``), so that
``torch.compile`` sees one opaque op each instead of tracing into the launch. Triton runs them
on CUDA devices, or on the CPU under ``TRITON_INTERPRET=1`` (the tests); see ``mtrl.triton_device``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn
from torch.library import triton_op, wrap_triton

from mtrl.triton_device import triton_runs_on

MAX_N = 65536  # one row per program, held in registers
SILU_BLOCK = 1024  # columns per SiLU-mul program
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _num_warps(block: int) -> int:
    # One row per program: enough warps that each thread holds a few elements of the row.
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, n) with a unit stride along n; a view where the strides allow one."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


def _check(name: str, t: torch.Tensor, n: int) -> None:
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: dtype must be one of {DTYPES}, got {t.dtype}")
    if t.shape[-1] != n:
        raise ValueError(f"{name}: last dim must be {n}, got shape {tuple(t.shape)}")


# ----------------------------------------------------------------------------- RMSNorm
@triton.jit
def _add_rms_norm_kernel(
    X, R, W, RES_OUT, OUT,
    sx, sr, sres, sout, N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One row: h = x (+ r, rounded to RES_OUT's dtype), out = w * (h * rsqrt(mean(h^2) + eps)).

    Grid: (rows,). X, R, RES_OUT, OUT are (rows, N) with row strides sx, sr, sres, sout and
    unit column stride; W is (N,). Statistics in fp32; the normalised row is rounded to h's
    dtype before the weight multiply; the product (exact in fp32 for 16-bit operands) is
    rounded once to OUT's dtype.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    h = tl.load(X + row * sx + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * sr + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * sres + cols, h, mask=ok)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / N
    y = (hf * (1.0 / tl.sqrt(var + eps))).to(h.dtype)
    w = tl.load(W + cols, mask=ok, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(OUT + row * sout + cols, out.to(OUT.dtype.element_ty), mask=ok)


@triton_op("mtrl::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    x2 = _rows(x, n)
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is None:
        r2, res2 = x2, x2  # unused (HAS_RESIDUAL is off)
        res = x.new_empty(0)
    else:
        r2 = _rows(residual, n)
        res = torch.empty(x.shape, dtype=h_dtype, device=x.device)
        res2 = res.view(-1, n)
    block = triton.next_power_of_2(n)
    wrap_triton(_add_rms_norm_kernel)[(x2.shape[0],)](
        x2, r2, weight, res2, out2,
        x2.stride(0), r2.stride(0), res2.stride(0), out2.stride(0), n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
    )  # fmt: skip
    return out, res


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(residual + x) * weight, residual + x)`` in one pass over the rows.

    x, residual: (..., N), the same shape, fp16/bf16/fp32; weight: (N,). The sum has dtype
    ``promote(x, residual)``; the normed output ``promote(weight, that)``. See the module
    docstring for the rounding; ``add_rms_norm_ref`` is the reference.
    """
    n = x.shape[-1]
    if residual.shape != x.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} != x {tuple(x.shape)}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight)):
        _check(name, t, n)
    if n > MAX_N:
        raise ValueError(f"x: last dim must be <= {MAX_N}, got {n}")
    return _add_rms_norm_op(x, residual, weight.contiguous(), float(eps))


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a Llama/Qwen2 decoder layer computes: ``h = residual + x; return norm(h), h``."""
    h = residual + x
    return rms_norm_ref(h, weight, eps), h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm(x) * weight`` (``LlamaRMSNorm``'s numerics); x (..., N), weight (N,)."""
    n = x.shape[-1]
    for name, t in (("x", x), ("weight", weight)):
        _check(name, t, n)
    if n > MAX_N:
        raise ValueError(f"x: last dim must be <= {MAX_N}, got {n}")
    return _add_rms_norm_op(x, None, weight.contiguous(), float(eps))[0]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``LlamaRMSNorm.forward``, line for line."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


# ----------------------------------------------------------------------------- SiLU-mul
@triton.jit
def _silu_mul_kernel(G, U, OUT, sg, su, sout, N, BLOCK: tl.constexpr):
    """out = (silu(g) rounded to G's dtype) * u, rounded to OUT's dtype.

    Grid: (rows, cdiv(N, BLOCK)). G, U, OUT are (rows, N) with row strides sg, su, sout and
    unit column stride: G and U may be the two halves of one (rows, 2N) GEMM output.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * sg + cols, mask=ok, other=0.0)
    u = tl.load(U + row * su + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    out = act.to(tl.float32) * u.to(tl.float32)
    tl.store(OUT + row * sout + cols, out.to(OUT.dtype.element_ty), mask=ok)


@triton_op("mtrl::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    n = gate.shape[-1]
    g2, u2 = _rows(gate, n), _rows(up, n)
    out = torch.empty(
        gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device
    )
    out2 = out.view(-1, n)
    block = min(triton.next_power_of_2(n), SILU_BLOCK)
    grid = (g2.shape[0], triton.cdiv(n, block))
    wrap_triton(_silu_mul_kernel)[grid](
        g2, u2, out2, g2.stride(0), u2.stride(0), out2.stride(0), n, BLOCK=block
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``SiLU(gate) * up`` in one kernel; gate, up (..., I) of one shape, fp16/bf16/fp32.

    Rows may be strided (``gate_up.split(I, -1)`` views are read in place, no copy). Output
    (..., I) contiguous, dtype ``promote(gate, up)``; ``silu_mul_ref`` is the reference.
    """
    if up.shape != gate.shape:
        raise ValueError(f"up: shape {tuple(up.shape)} != gate {tuple(gate.shape)}")
    n = gate.shape[-1]
    for name, t in (("gate", gate), ("up", up)):
        _check(name, t, n)
    return _silu_mul_op(gate, up)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``LlamaMLP``'s ``act_fn(gate_proj(x)) * up_proj(x)`` with act_fn SiLU."""
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul`` on a fused projection output (..., 2 * I): gate columns first, then up
    (``mtrl.rollout.fused``'s gate/up layout). Returns (..., I)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: last dim must be even, got shape {tuple(gate_up.shape)}")
    gate, up = gate_up.chunk(2, dim=-1)
    return silu_mul(gate, up)


# ----------------------------------------------------------------------------- model
# Classes whose forward is, line for line, LlamaDecoderLayer's / LlamaRMSNorm's / LlamaMLP's
# (tests/test_fused_norm_engine.py compares the sources, so a transformers upgrade that changes
# one of them fails a test instead of silently computing something else).
DECODER_LAYERS = (
    "LlamaDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "MistralDecoderLayer",
)
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def _is(module: nn.Module | None, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _silu_mlp(mlp: nn.Module) -> bool:
    act = getattr(mlp, "act_fn", None)
    return _is(mlp, MLPS) and type(act).__name__ in ("SiLUActivation", "SiLU")


class _Chain:
    """The normed input a layer computed for the next norm, valid for one tensor and one norm.

    Like ``mtrl.rollout.fused``'s groups: the producer stores (hidden state, norm, normed);
    the consumer takes it only for the very tensor and norm it was made for, else computes its
    own norm, so whatever runs between two layers the result is right.
    """

    def __init__(self):
        self.input = self.norm = self.normed = None

    def put(self, hidden: torch.Tensor, norm: nn.Module, normed: torch.Tensor) -> None:
        self.input, self.norm, self.normed = hidden, norm, normed

    def clear(self) -> None:
        self.input = self.norm = self.normed = None

    def take(self, hidden: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        normed = self.normed if self.input is hidden and self.norm is norm else None
        self.clear()
        if normed is None:
            normed = rms_norm(hidden, norm.weight, norm.variance_epsilon)
        return normed


def _layer_forward(
    chain: _Chain, layer: nn.Module, next_norm: nn.Module, hidden_states: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``LlamaDecoderLayer.forward`` with fused norms; the model calls it with keywords."""
    normed = chain.take(hidden_states, layer.input_layernorm)
    attn, _ = layer.self_attn(hidden_states=normed, **kwargs)
    post = layer.post_attention_layernorm
    normed, residual = add_rms_norm(attn, hidden_states, post.weight, post.variance_epsilon)
    mlp_out = layer.mlp(normed)
    normed, out = add_rms_norm(mlp_out, residual, next_norm.weight, next_norm.variance_epsilon)
    chain.put(out, next_norm, normed)
    return out


def _norm_forward(chain: _Chain, norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return chain.take(hidden_states, norm)


def _mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # gate_proj then up_proj on the same input: mtrl.rollout.fused routes them to one GEMM and
    # hands back strided views of its output, which silu_mul reads in place.
    return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))


def _decoder(model: nn.Module) -> nn.Module | None:
    """The module holding the decoder stack (``layers``) and the final ``norm``."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "norm"):
            return module
    return None


class FusedNorms:
    """A Llama/Qwen2-style model's decoder layers routed to the fused kernels, while installed.

    ``norms = FusedNorms(model)``; ``with norms: ...`` runs the model with instance ``forward``
    overrides on each decoder layer, its MLP (SiLU only) and the final norm, removed on exit.
    A layer's forward computes attention, then add+RMSNorm, the MLP with SiLU-mul, then
    add+RMSNorm with the next layer's (or the final) norm weight, handing that normed tensor
    to the next consumer. Weights are read from the modules at every call (training updates,
    LoRA on the projections unmerged). ``len(norms)`` is the number of fused layers: 0 when the
    model doesn't match (``norms.reason`` says why) or ``FusedNorms()`` (no model).
    ``norms.summary`` is the one line to log.
    """

    def __init__(self, model: nn.Module | None = None):
        self.installs: list[tuple[nn.Module, functools.partial]] = []
        self.chain = _Chain()
        self.layers = self.mlps = 0
        self.reason = "no model" if model is None else self._plan(model)

    def _plan(self, model: nn.Module) -> str | None:
        decoder = _decoder(model)
        if decoder is None:
            return "no decoder stack (a module with `layers` and `norm`)"
        layers = list(decoder.layers)
        odd = [type(m).__name__ for m in layers if not _is(m, DECODER_LAYERS)]
        if not layers or odd:
            return f"decoder layers {sorted(set(odd)) or 'none'} are not Llama/Qwen2-style"
        norms = [decoder.norm] + [
            n for m in layers for n in (m.input_layernorm, m.post_attention_layernorm)
        ]
        odd = sorted({type(n).__name__ for n in norms if not _is(n, RMS_NORMS)})
        if odd:
            return f"norms {odd} are not Llama-style RMSNorm"
        weight = decoder.norm.weight
        if not triton_runs_on(weight.device):
            return f"Triton does not run on {weight.device.type}"
        dtypes = sorted({str(n.weight.dtype) for n in norms if n.weight.dtype not in DTYPES})
        if dtypes:
            return f"norm weights in {dtypes}"
        nexts = [m.input_layernorm for m in layers[1:]] + [decoder.norm]
        for layer, nxt in zip(layers, nexts, strict=True):
            fwd = functools.partial(_layer_forward, self.chain, layer, nxt)
            self.installs.append((layer, fwd))
            if _silu_mlp(layer.mlp):
                self.installs.append((layer.mlp, functools.partial(_mlp_forward, layer.mlp)))
        final = functools.partial(_norm_forward, self.chain, decoder.norm)
        self.installs.append((decoder.norm, final))
        self.layers = len(layers)
        self.mlps = sum(1 for m in layers if _silu_mlp(m.mlp))
        return None

    def __len__(self) -> int:
        return self.layers

    @property
    def summary(self) -> str:
        if self.reason is not None:
            return f"rollout engine: plain decoder layers (fused norms off: {self.reason})"
        return (
            f"rollout engine: {self.layers} decoder layers decode with fused add+RMSNorm, "
            f"{self.mlps} with fused SiLU-mul"
        )

    def __enter__(self) -> FusedNorms:
        for module, forward in self.installs:
            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        self.chain.clear()
        for module, _ in self.installs:
            module.__dict__.pop("forward", None)
