"""Benchmark: RolloutEngine (static cache + CUDA-graph decode + fused multi-temperature sampler)
against transformers ``generate``.

    python bench/rollout.py --out bench/results/rollout.md          # GPU, Qwen2.5-1.5B shape
    python bench/rollout.py --tiny --out /tmp/rollout_tiny.md       # CPU smoke check

Model: Qwen2.5-1.5B's shape (28 layers, hidden 1536, GQA 12/2 heads, vocab 151936, tied head)
with random bf16 weights, sdpa attention. Prompts: random tokens, fixed length (128), no
padding. No early EOS: the engine gets no EOS id (the finished-row bookkeeping still runs, against
a sentinel id), HF generate gets one with min_new_tokens equal to its run length (so the EOS
logit is masked), so every row runs the full length.

The model's q/k/v and gate/up weights are made adjacent once (``fuse_projections``, as the
trainer does), so every engine variant runs one GEMM per group unless it says otherwise.

Variants:
  engine          RolloutEngine, multi-temperature sampler (window mode, p = 0.2, window
                  100000), CUDA graphs; timed over the full new-token count, after one warm-up
                  call of the same shape that captures the graphs. Wall time includes prefill.
  engine-single   the same with mode=single (one temperature): the sampler's cost
  engine-eager    the same step function without CUDA graphs (short run, per-step time)
  engine+compile  RolloutEngine(compile_decode=True): the decode forward and the sampler's
                  tensor work through torch.compile (inductor kernels, no inductor CUDA graphs)
                  inside the captured graph; first new-token count only; compile time
                  excluded (warm-up call)
  engine+compile, single temperature   the same with mode=single: the multi-temperature
                  sampler's cost in the trainer's default (compiled) engine
  engine+compile, separate projections   the same with fused_projections=False: one GEMM
                  per q/k/v/gate/up projection instead of one per group
  engine+compile, SDPA decode attention   the same with split_kv_attention=False: SDPA
                  (cuDNN) for the decode steps' attention instead of our split-KV kernel
  engine+compile, eager sampler   the same with sampler.compile(False): what compiling the
                  sampler saves
  hf-dynamic      generate(do_sample=True) with the default dynamic cache (TRL's stock path,
                  TRL sets disable_compile=True); timed over --hf-tokens new tokens
  hf-static       generate with cache_implementation="static" and its compiled decode step
                  (disable_compile=False); compile excluded (warm-up call); --hf-tokens
  floor           weight bytes / measured device copy bandwidth (read + write counted):
                  one read of the weights per step

HF variants time a short run (--hf-tokens, default 64) and report its ms/step; tokens/s for
longer completions are extrapolated from that ms/step (optimistic for HF: its attention cost
grows with length).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import copy_bandwidth, git_commit, header  # noqa: E402  (bench/ is the script folder)
from shapes import QWEN25_15B, TINY  # noqa: E402  (bench/ is the script folder)

from mtrl.rollout import RolloutEngine, fuse_projections  # noqa: E402
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/rollout.md")
    p.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized runs")
    p.add_argument("--batches", default=None, help="comma list, default 64,256 (4 with --tiny)")
    p.add_argument("--new-tokens", default=None, help="comma list, default 256,1024 (16 tiny)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 (8 with --tiny)")
    p.add_argument("--hf-tokens", type=int, default=None, help="HF timed tokens, default 64")
    p.add_argument("--hf-static-batches", default=None, help="default: same as --batches")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--compile-batches", default=None, help="engine+compile batches (default: --batches)"
    )
    p.add_argument("--skip-compile", action="store_true", help="no engine+compile variant")
    p.add_argument(
        "--budget-s", type=float, default=1e9, help="skip later sections past this many seconds"
    )
    p.add_argument("--reps", type=int, default=3, help="multi vs single: interleaved runs")
    p.add_argument("--commit", default=None, help="git commit to report (default: git HEAD)")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    return p.parse_args(argv)


def ints(s):
    return [int(x) for x in s.split(",") if x]


class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Wall seconds of fn() with the device drained before and after."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def build_model(shape, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, attn_implementation="sdpa")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def multi_sampler():
    return MultiTemperatureSampler(
        MultiTemperatureConfig(
            mode="multi",
            threshold_mode="window",
            reasoning_fraction=0.2,
            window_size=100_000,
            high_temperature=1.2,
            low_temperature=0.8,
        )
    )


def single_sampler():
    return MultiTemperatureSampler(MultiTemperatureConfig(mode="single", temperature=1.0))


def prompts(batch, length, vocab, device, no_eos):
    g = torch.Generator().manual_seed(batch * 7919 + length)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    ids[ids == no_eos] = 10
    return ids.to(device), torch.ones(batch, length, dtype=torch.long, device=device)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny
    shape = TINY if tiny else QWEN25_15B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = ints(args.batches or ("4" if tiny else "64,256"))
    new_tokens = ints(args.new_tokens or ("16" if tiny else "256,1024"))
    prompt_len = args.prompt_len or (8 if tiny else 128)
    hf_tokens = args.hf_tokens or (8 if tiny else 64)
    hf_static_batches = ints(args.hf_static_batches) if args.hf_static_batches else batches
    clock = Clock(device)
    torch.manual_seed(0)

    model = build_model(shape, dtype, device)
    fused_groups = fuse_projections(model)  # as the trainer does before training
    vocab = shape["vocab_size"]
    # No early EOS: the engine gets no EOS id (its finished-row bookkeeping still runs, against
    # a sentinel); HF gets this id with min_new_tokens = its run length, so it is never drawn.
    no_eos = vocab - 1
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    floor_ms = param_bytes / bw * 1e3
    rows: list[dict] = []
    log = print
    t_start = time.perf_counter()
    state = {"overhead": float("nan")}

    def unmeasured(method, batch, n_new, note):
        """A table row for a variant that was skipped or failed (no times)."""
        nan = float("nan")
        rows.append(
            dict(
                method=method,
                batch=batch,
                new=n_new,
                timed=0,
                ms=nan,
                tps=nan,
                floor=nan,
                note=note,
            )
        )

    def over_budget(section):
        if time.perf_counter() - t_start > args.budget_s:
            log(f"skipped {section}: past --budget-s {args.budget_s}")
            unmeasured(section, 0, 0, "skipped (time budget)")
            return True
        return False

    def flush():
        write_table(
            args,
            device,
            rows,
            param_bytes,
            bw,
            floor_ms,
            state["overhead"],
            prompt_len,
            fused_groups,
        )

    def row(method, batch, n_new, timed, ms_step, note=""):
        tps = batch / (ms_step / 1e3)
        rows.append(
            dict(
                method=method,
                batch=batch,
                new=n_new,
                timed=timed,
                ms=ms_step,
                tps=tps,
                floor=ms_step / floor_ms,
                note=note,
            )
        )
        log(
            f"{method:14s} B={batch:4d} new={n_new:5d} timed={timed:5d} {ms_step:8.3f} ms/step {tps:10.0f} tok/s"
        )

    log(f"params {param_bytes / 1e9:.3f} GB, copy bw {bw / 1e12:.2f} TB/s, floor {floor_ms:.3f} ms")
    capture_s = {}
    for batch in batches:
        ids, mask = prompts(batch, prompt_len, vocab, device, no_eos)
        for n_new in new_tokens:
            eng = RolloutEngine(model, multi_sampler(), None, 0, n_new, check_every=16)
            capture_s[(batch, n_new)] = clock(lambda e=eng, i=ids, m=mask: e.generate(i, m))
            out = None

            def run(e=eng, i=ids, m=mask):
                nonlocal out
                out = e.generate(i, m)

            t = clock(run)
            assert out.completion_ids.shape == (batch, n_new) and bool(out.mask.all()), (
                "rows stopped early"
            )
            note = f"graphs={out.used_cuda_graph}; first call (capture) {capture_s[(batch, n_new)]:.1f} s"
            row("engine", batch, n_new, n_new, t / n_new * 1e3, note)
            eng.release()
            del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # multi- vs single-temperature sampling in the engine, interleaved
    b0, n0 = batches[0], new_tokens[0]
    ids, mask = prompts(b0, prompt_len, vocab, device, no_eos)
    engines = {
        "engine-multi": RolloutEngine(model, multi_sampler(), None, 0, n0),
        "engine-single": RolloutEngine(model, single_sampler(), None, 0, n0),
    }
    for e in engines.values():
        e.generate(ids, mask)
    times = {k: [] for k in engines}
    for _ in range(args.reps):
        for k, e in engines.items():
            times[k].append(clock(lambda e=e: e.generate(ids, mask)))
    ms = {k: statistics.median(v) / n0 * 1e3 for k, v in times.items()}
    for k in engines:
        row(k, b0, n0, n0, ms[k], f"median of {args.reps} interleaved")
        engines[k].release()
    state["overhead"] = ms["engine-multi"] / ms["engine-single"] - 1
    del engines

    # eager engine (same step function, no graphs): short run
    n_eager = min(hf_tokens, new_tokens[0])
    eager = RolloutEngine(model, multi_sampler(), None, 0, n_eager, use_cuda_graph=False)
    eager.generate(ids, mask)
    t = clock(lambda: eager.generate(ids, mask))
    row("engine-eager", b0, n_eager, n_eager, t / n_eager * 1e3, "no CUDA graph")
    eager.release()

    if not args.skip_hf and not over_budget("hf"):
        from transformers import GenerationConfig

        def hf_config(static: bool):
            gc = GenerationConfig(
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=hf_tokens,
                min_new_tokens=hf_tokens,
                eos_token_id=no_eos,
                pad_token_id=0,
                disable_compile=not static,
            )
            if static:
                gc.cache_implementation = "static"
            return gc

        for static in (False, True):
            name = "hf-static" if static else "hf-dynamic"
            for batch in hf_static_batches if static else batches:
                ids, mask = prompts(batch, prompt_len, vocab, device, no_eos)
                gc = hf_config(static and device.type == "cuda")
                with torch.no_grad():
                    first = clock(
                        lambda gc=gc, ids=ids, mask=mask: model.generate(
                            input_ids=ids, attention_mask=mask, generation_config=gc
                        )
                    )
                    t = statistics.median(
                        clock(
                            lambda gc=gc, ids=ids, mask=mask: model.generate(
                                input_ids=ids, attention_mask=mask, generation_config=gc
                            )
                        )
                        for _ in range(2)
                    )
                ms_step = t / hf_tokens * 1e3
                note = f"first call {first:.1f} s"
                if static and device.type != "cuda":
                    note += " (no compile on CPU)"
                for n_new in new_tokens:
                    row(name, batch, n_new, hf_tokens, ms_step, note + "; extrapolated")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    for batch in batches:
        row("floor", batch, 0, 0, floor_ms, "weight bytes / copy bandwidth")

    compile_batches = ints(args.compile_batches) if args.compile_batches else batches
    if not args.skip_compile and device.type == "cuda":
        n_c = new_tokens[0]
        for batch in compile_batches:
            for name, make_sampler, fused_sampler, options in (
                ("engine+compile", multi_sampler, True, {}),
                ("engine+compile, single temperature", single_sampler, True, {}),
                (
                    "engine+compile, separate projections",
                    multi_sampler,
                    True,
                    {"fused_projections": False},
                ),
                (
                    "engine+compile, SDPA decode attention",
                    multi_sampler,
                    True,
                    {"split_kv_attention": False},
                ),
                ("engine+compile, eager sampler", multi_sampler, False, {}),
            ):
                if over_budget(name):
                    break
                ids, mask = prompts(batch, prompt_len, vocab, device, no_eos)
                eng = RolloutEngine(
                    model, make_sampler(), None, 0, n_c, compile_decode=True, **options
                )
                eng.sampler.compile(fused_sampler)
                try:
                    first = clock(lambda e=eng, i=ids, m=mask: e.generate(i, m))
                    t = statistics.median(
                        clock(lambda e=eng, i=ids, m=mask: e.generate(i, m)) for _ in range(2)
                    )
                except Exception as e:  # noqa: BLE001 - report, keep the rest of the table
                    log(f"{name} failed: {type(e).__name__}: {e}")
                    unmeasured(name, batch, n_c, f"failed: {type(e).__name__}")
                    continue
                note = f"graphs={eng._slot is not None and bool(eng._slot.graphs)}; first call (compile + capture) {first:.1f} s"
                row(name, batch, n_c, n_c, t / n_c * 1e3, note)
                eng.release()
    flush()


def write_table(args, device, rows, param_bytes, bw, floor_ms, overhead, prompt_len, fused_groups):
    commit = git_commit(args.commit)
    import transformers

    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = header("Rollout engine benchmark", card, commit) + [
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model: {'tiny' if args.tiny else 'Qwen2.5-1.5B shape'}, random weights, "
        f"{param_bytes / 1e9:.3f} GB of parameters; prompt length {prompt_len}, no padding, "
        "no early EOS",
        f"- projection groups with adjacent weights (`fuse_projections`): {fused_groups}",
        f"- weight-read floor: {floor_ms:.3f} ms/step (copy bandwidth {bw / 1e12:.2f} TB/s, "
        "read + write)",
        f"- multi-temperature over single-temperature in the engine: {overhead * 100:+.1f}%",
        "",
        "ms/step = wall time / new tokens (engine: the whole generate, prefill included; HF: "
        "a short run of `timed` new tokens, extrapolated to the `new` column). "
        "tokens/s = batch / (ms/step).",
        "",
        "| method | batch | new tokens | timed tokens | ms/step | tokens/s | x floor | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['new'] or '-'} | {r['timed'] or '-'} | "
            f"{r['ms']:.2f} | {r['tps']:,.0f} | {r['floor']:.2f} | {r['note']} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
