"""Benchmark: multi-temperature sampler vs plain one-temperature sampling in a decoding step.

    python bench/sampler.py --out bench/results/sampler.md          # GPU, 1.5B shape
    python bench/sampler.py --tiny --out /tmp/sampler_tiny.md       # CPU smoke test

Model: Qwen2.5-1.5B's shape (28 layers, hidden 1536, GQA 12/2 heads, vocab 151936, tied
head) with random bf16 weights, batch 64, a transformers StaticCache, the decode forward
compiled with torch.compile(mode="reduce-overhead") on CUDA (the fast HF decode path).
Each decoding step is forward + sampling of the next token, the token fed back.

Sampling variants:
  plain         HF generate's way: softmax(logits.float() / T), torch.multinomial
  multi         MultiTemperatureSampler (window mode, p = 0.2, window 100000), eager
  multi-graph   the same sampler through mtrl.sampling.CUDAGraphSampler: captured once in
                a CUDA graph, replayed each step (capture fails on any host
                synchronisation, so a successful capture and replay shows it has none)
Plus the sampling step alone on fixed logits, eager and CUDA-graph replayed.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import git_commit  # noqa: E402  (bench/ is the script folder)
from shapes import QWEN25_15B, TINY  # noqa: E402

from mtrl.sampling import (  # noqa: E402
    CUDAGraphSampler,
    MultiTemperatureConfig,
    MultiTemperatureSampler,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/sampler.md")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU check)")
    p.add_argument("--batch", type=int, default=None, help="default 64 (8 with --tiny)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 512 (16 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per timed run")
    p.add_argument("--reps", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--window-size", type=int, default=100_000)
    p.add_argument("--no-compile", action="store_true", help="eager decode forward")
    p.add_argument("--commit", default=None, help="git commit to report (default: git HEAD)")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, n: int) -> float:
        """Milliseconds per call of fn over n calls (no sync between calls)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n


def interleaved(timer, variants: dict, n: int, reps: int) -> dict[str, float]:
    """Median ms/call per variant, runs interleaved so drift hits every variant alike."""
    times = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(timer(fn, n))
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- samplers
def plain_sampler(temperature: float, generator=None):
    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample


def multi_sampler(window_size: int):
    cfg = MultiTemperatureConfig(
        mode="multi",
        threshold_mode="window",
        reasoning_fraction=0.2,
        window_size=window_size,
        high_temperature=1.2,
        low_temperature=0.8,
    )
    return MultiTemperatureSampler(cfg)


class GraphSampler:
    """A sampling function captured once in a CUDA graph; each call copies logits in, replays."""

    def __init__(self, fn, example_logits: torch.Tensor):
        self.static_in = example_logits.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up allocations and lazy state outside the capture
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(logits)
        self.graph.replay()
        return self.static_out


def tokens_of(out):
    return out.tokens if hasattr(out, "tokens") else out


# --------------------------------------------------------------------------- model
def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


class Decoder:
    """Prefill once, then decode one token per call through a StaticCache.

    Handles both forward signatures seen in transformers 5.x (``cache=`` without
    ``cache_position`` in newer releases, ``past_key_values=`` + ``cache_position`` before).
    """

    def __init__(self, model, batch: int, prompt_len: int, max_len: int, compile_: bool):
        from transformers import StaticCache

        self.model = model
        device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pass_cache_position = "cache_position" in params
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        except TypeError:
            self.cache = StaticCache(
                config=model.config,
                max_batch_size=batch,
                max_cache_len=max_len,
                device=device,
                dtype=next(model.parameters()).dtype,
            )
        self.max_len = max_len
        self.pos = prompt_len
        self.position_ids = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
        self.cache_position = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        kwargs = {self.cache_kw: self.cache, "use_cache": True}
        kwargs["position_ids"] = torch.arange(prompt_len, device=device)[None].expand(batch, -1)
        if self.pass_cache_position:
            kwargs["cache_position"] = torch.arange(prompt_len, device=device)
        with torch.no_grad():
            out = model(input_ids=prompt, logits_to_keep=1, **kwargs)
        self.first_logits = out.logits[:, -1]
        self.forward = model.forward
        self.compiled = False
        if compile_:
            self.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
            self.compiled = True

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.max_len:
            raise RuntimeError("static cache full: raise max_len")
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "position_ids": self.position_ids}
        if self.pass_cache_position:
            kwargs["cache_position"] = self.cache_position
        out = self.forward(input_ids=tokens[:, None], logits_to_keep=1, **kwargs)
        logits = out.logits[:, -1]
        self.position_ids.add_(1)
        self.cache_position.add_(1)
        self.pos += 1
        return logits


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shape = TINY if args.tiny else QWEN25_15B
    batch = args.batch or (8 if args.tiny else 64)
    prompt_len = args.prompt_len or (16 if args.tiny else 512)
    steps = args.steps or (10 if args.tiny else 50)
    reps = args.reps
    dtype = torch.bfloat16 if cuda else torch.float32
    compile_ = cuda and not args.no_compile
    torch.manual_seed(0)
    timer = Timer(device)
    notes = []

    # ---- sampler alone on fixed logits
    vocab = shape["vocab_size"]
    logits = (torch.randn(batch, vocab, device=device) * 3).to(dtype).float()
    plain = plain_sampler(1.0)
    multi = multi_sampler(args.window_size)
    alone = {"plain": lambda: plain(logits), "multi": lambda: multi(logits)}
    if cuda:
        graph_plain = GraphSampler(plain, logits)
        graph_multi_sampler = multi_sampler(args.window_size)
        graph_multi = CUDAGraphSampler(graph_multi_sampler)
        alone["plain-graph"] = lambda: graph_plain(logits)
        alone["multi-graph"] = lambda: graph_multi(logits).tokens
        # the captured sampler keeps its state on the device: the window fills across replays
        graph_multi(logits)  # first call captures
        count_before = int(graph_multi_sampler.window.count)
        for _ in range(4):
            graph_multi(logits)
        grew = int(graph_multi_sampler.window.count) - count_before
        notes.append(
            f"CUDA-graph capture of the multi-temperature sampler succeeded (no host sync in "
            f"the step); 4 replays added {grew} entropies to the on-device window "
            f"(expected {min(4 * batch, args.window_size - count_before)})."
        )
    for fn in alone.values():  # warm up
        fn()
    n_alone = 20 if args.tiny else 200
    alone_ms = interleaved(timer, alone, n_alone, reps)

    # ---- decode step: forward + sampling
    model = build_model(shape, device, dtype)
    warm = 3 if args.tiny else 10
    variants_names = ["plain", "multi"] + (["multi-graph"] if cuda else [])
    total_steps = warm * len(variants_names) + steps * reps * len(variants_names) + 8
    max_len = prompt_len + total_steps
    try:
        decoder = Decoder(model, batch, prompt_len, max_len, compile_)
    except Exception as err:  # pragma: no cover - depends on the installed transformers
        raise SystemExit(f"could not set up the static-cache decoder: {err!r}") from err
    first = decoder.first_logits.float()
    decode_samplers = {"plain": plain_sampler(1.0), "multi": multi_sampler(args.window_size)}
    if cuda:
        decode_samplers["multi-graph"] = CUDAGraphSampler(multi_sampler(args.window_size))
    state = {"tokens": tokens_of(decode_samplers["plain"](first))}

    def make_step(sample):
        def run():
            logits = decoder.step(state["tokens"])
            state["tokens"] = tokens_of(sample(logits))

        return run

    decode = {k: make_step(v) for k, v in decode_samplers.items()}
    t0 = time.perf_counter()
    try:
        for fn in decode.values():
            for _ in range(warm):
                fn()
    except Exception as err:  # pragma: no cover
        if not decoder.compiled:
            raise
        notes.append(f"torch.compile of the decode step failed ({type(err).__name__}); eager.")
        decoder.forward = model.forward
        decoder.compiled = False
        for fn in decode.values():
            for _ in range(warm):
                fn()
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    decode_ms = interleaved(timer, decode, steps, reps)

    # ---- report
    gpu = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or 'cpu'})"
    import transformers

    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:]) if argv is None else str(argv)
    commit = git_commit(args.commit, watch=("mtrl/sampling", "bench/sampler.py"))
    base = decode_ms["plain"]
    lines = [
        "# Multi-temperature sampler overhead",
        "",
        "| | |",
        "|---|---|",
        f"| device | {gpu} |",
        f"| date | {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')} |",
        f"| git commit | {commit} |",
        f"| command | `{cmd}` |",
        f"| torch / transformers | {torch.__version__} / {transformers.__version__} |",
        f"| model | {'tiny' if args.tiny else 'Qwen2.5-1.5B shape'}: {shape['num_hidden_layers']}"
        f" layers, hidden {shape['hidden_size']}, vocab {vocab}, random {str(dtype)[6:]} |",
        f"| decode | batch {batch}, StaticCache max_cache_len {max_len}, prompt {prompt_len}, "
        f"forward {'torch.compile reduce-overhead' if decoder.compiled else 'eager'} "
        f"(warm-up incl. compile {warm_s:.0f} s) |",
        "| sampler | window mode, p 0.2, window "
        f"{args.window_size}, T 1.2 / 0.8, no top-k/top-p/min-p; plain: T 1.0 |",
        f"| timing | median of {reps} interleaved runs; decode {steps} steps/run, "
        f"sampler alone {n_alone} calls/run; {'CUDA events' if cuda else 'perf_counter'} |",
        "",
        "## Decoding step (forward + sampling)",
        "",
        "| sampling | ms/step | overhead vs plain |",
        "|---|---:|---:|",
    ]
    for name, ms in decode_ms.items():
        over = "—" if name == "plain" else f"{(ms / base - 1) * 100:+.2f}%"
        lines.append(f"| {name} | {ms:.3f} | {over} |")
    lines += [
        "",
        "## Sampling step alone (fixed logits)",
        "",
        "| sampling | ms/call | vs plain (same mode) |",
        "|---|---:|---:|",
    ]
    for name, ms in alone_ms.items():
        ref = alone_ms["plain-graph" if name.endswith("graph") else "plain"]
        rel = "—" if name.startswith("plain") else f"{ms / ref:.2f}x"
        lines.append(f"| {name} | {ms:.3f} | {rel} |")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
