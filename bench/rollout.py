"""Benchmark: RolloutEngine (static cache + CUDA-graph decode + fused multi-temperature sampler)
against transformers ``generate``, and each against the memory-read floor of a decode step.

    python bench/rollout.py --budget-s 420 --out bench/results/rollout.md   # GPU, 1.5B shape
    python bench/rollout.py --tiny --out /tmp/rollout_tiny.md       # CPU plumbing check, seconds

On an H100 the default cases and rows take about 6 minutes (main about 4, most of it the
256x2048 case); past --budget-s the later groups write "skipped" rows instead of running.

Model: Qwen2.5-1.5B's shape (28 layers, hidden 1536, GQA 12/2 heads, head dim 128, vocab
151936, tied head) with random bf16 weights, sdpa attention. Prompts: random tokens, fixed
length (128), no padding. No early EOS: the engine gets no EOS id (the finished-row bookkeeping
still runs, against a sentinel id), HF generate gets one with min_new_tokens equal to its run
length (so the EOS logit is masked), so every row runs the full length.

The model's q/k/v and gate/up weights are made adjacent once (``fuse_projections``, as the
trainer does), so every engine variant runs one GEMM per group unless it says otherwise.

Cases (``--cases``, BATCHxNEW): default 64x256, 64x2048 and 256x2048, the shapes issue 21
states its targets for. The first case is where the cheaper comparisons run.

Row groups (``--rows``, comma list, default all; they run in this order and the table is
rewritten after each, and after each case of main, so a run cut short keeps what it measured):
  main       the trainer's default engine (compile_decode=True on CUDA: the decode forward and
             the sampler's tensor work through torch.compile inside the captured graph), with
             the multi-temperature sampler (window mode, p = 0.2, window 100000) and with
             mode=single (one temperature), every case; at the first case also (unless
             --no-comparisons) the multi-temperature engine with fused norms
             (fused_norms=True: add+RMSNorm and SiLU-mul kernels while decoding; off by
             default in the trainer) and with the sampler's torch path (fused=False; the
             default on CUDA is its fused Triton kernels, mtrl.sampling.fused). The engines
             are warmed by one call of the same shape (compile + capture, excluded) and then
             timed interleaved, the median of --reps calls each. Wall time includes prefill.
             These rows give issue 21's ratios and the multi- over single-temperature
             overhead. With --profile (CUDA), the first case's notes add each engine's kernels
             and kernel time a step from a torch.profiler trace of one more generate;
             --kernels FILE also writes the first engine's kernels by name and time a step.
  plain      the engine without torch.compile (CUDA graphs only), multi-temperature; first case
  eager      the same step function without CUDA graphs; a short run (--hf-tokens new tokens)
             at the first case's batch
  hf         generate(do_sample=True): hf-dynamic with the default dynamic cache (TRL's stock
             path; TRL sets disable_compile=True) and hf-static with
             cache_implementation="static" and its compiled decode step (compile excluded:
             warm-up call); each timed over a short run of --hf-tokens new tokens, at the
             cases with at most --hf-max-new new tokens. Longer cases get a "not run" row:
             generate over 2,048 tokens takes minutes at these batches, and a short run's
             ms/step would hide its attention cost, which grows with the length.
  ablations  main's multi-temperature engine with one change each, first case, CUDA only:
             separate projections (fused_projections=False: one GEMM per q/k/v/gate/up
             projection), SDPA decode attention (split_kv_attention=False: cuDNN instead of our
             split-KV kernel), eager sampler (sampler.compile(False)), max-autotune
             (max_autotune=True: inductor tunes the GEMMs; minutes of compilation), eager
             prefill (compile_prefill=False); --ablations picks some

An engine whose first call made dynamo hit its recompile limit (functions past it run
uncompiled from then on) gets "RECOMPILE LIMIT HIT" and their names in its row's note.

Floor: see ``step_floor_ms``. Each row reports it for its own batch, prompt length and the
number of new tokens it timed: weights only, and weights plus the KV cache that the steps read.
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import copy_bandwidth, git_commit, header  # noqa: E402  (bench/ is the script folder)
from shapes import QWEN25_15B, TINY  # noqa: E402  (bench/ is the script folder)

from mtrl.rollout import RolloutConfig, RolloutEngine, fuse_projections  # noqa: E402
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler  # noqa: E402

ROW_GROUPS = ("main", "plain", "eager", "hf", "ablations")
WATCH = ("mtrl", "bench/rollout.py")  # what a dirty tree is checked for in the reported commit
# ablation row label -> (compiled sampler, engine options): main's engine with one change
ABLATIONS = {
    "separate projections": (True, {"fused_projections": False}),
    "SDPA decode attention": (True, {"split_kv_attention": False}),
    "eager sampler": (False, {}),
    "max-autotune": (True, {"max_autotune": True}),
    "eager prefill": (True, {"compile_prefill": False}),
}


# ----------------------------------------------------------------------------- the floor
@dataclass(frozen=True)
class KVShape:
    """What one cached position costs to read: K and V of every layer and KV head."""

    layers: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int  # element size of the cache dtype (the model's dtype)

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> KVShape:
        """From a transformers decoder config; head_dim defaults to hidden / attention heads."""
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        return cls(
            layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            bytes_per_value=torch.empty((), dtype=dtype).element_size(),
        )

    @property
    def bytes_per_position(self) -> int:
        """Bytes of one row's K and V at one position, all layers: 2 x L x KVH x D x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


def step_floor_ms(
    weight_bytes: int,
    kv: KVShape,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    bandwidth: float,
) -> tuple[float, float]:
    """Read floor of one generated-token step, in ms, averaged over ``new_tokens`` steps.

    Returns ``(weights_only_ms, weights_plus_kv_ms)``.

    - ``weight_bytes``: bytes of all parameters, read once per step (the LM head included; a
      tied head is the embedding table, counted once).
    - Step t (t = 0 .. new_tokens - 1) also reads the K and V of the ``prompt_len + t``
      positions before its token for each of ``batch`` rows:
      ``kv.bytes_per_position * (prompt_len + t) * batch`` bytes. Summed over the steps,
      sum_t (P + t) = n * P + n * (n - 1) / 2 positions per row.
    - ``bandwidth``: bytes/s, the device's measured copy bandwidth (read + write counted,
      ``report.copy_bandwidth``).

    The engine's split-KV kernel reads the keys up to the step's position in whole tiles
    (SDPA: in buckets of 256 positions), so it reads somewhat more than this floor counts;
    the floor is what an ideal step must read.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens: must be >= 1, got {new_tokens}")
    positions = new_tokens * prompt_len + new_tokens * (new_tokens - 1) / 2
    kv_bytes_per_step = kv.bytes_per_position * positions * batch / new_tokens
    weights_ms = weight_bytes / bandwidth * 1e3
    return weights_ms, (weight_bytes + kv_bytes_per_step) / bandwidth * 1e3


# ----------------------------------------------------------------------------- setup
def parse_cases(s: str) -> list[tuple[int, int]]:
    """'64x256,256x2048' -> [(64, 256), (256, 2048)]: (batch, new tokens)."""
    out = []
    for item in s.split(","):
        if item:
            batch, new = item.lower().split("x")
            out.append((int(batch), int(new)))
    if not out:
        raise ValueError(f"--cases: no BATCHxNEW item in {s!r}")
    return out


def parse_rows(s: str) -> list[str]:
    rows = [r for r in s.split(",") if r]
    unknown = sorted(set(rows) - set(ROW_GROUPS))
    if unknown or not rows:
        raise ValueError(f"--rows: choose from {','.join(ROW_GROUPS)}, got {s!r}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/rollout.md")
    p.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized cases")
    p.add_argument(
        "--cases",
        default=None,
        help="comma list of BATCHxNEW, default 64x256,64x2048,256x2048 (tiny: 4x16,4x32,8x32)",
    )
    p.add_argument("--rows", default=",".join(ROW_GROUPS), help="row groups, comma list")
    p.add_argument("--prompt-len", type=int, default=None, help="default 128 (8 with --tiny)")
    p.add_argument("--hf-tokens", type=int, default=None, help="HF/eager timed tokens, default 64")
    p.add_argument(
        "--hf-max-new", type=int, default=None, help="hf rows at cases up to this, default 256"
    )
    p.add_argument(
        "--budget-s", type=float, default=1e9, help="skip later sections past this many seconds"
    )
    p.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help=f"comma list of the ablation rows to run, from {','.join(ABLATIONS)}",
    )
    p.add_argument("--reps", type=int, default=2, help="main: interleaved timed calls each")
    p.add_argument(
        "--comparisons",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="main, first case: also the fused-norms and torch-sampler engines",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="main, first case: kernels and kernel time a step from a torch.profiler trace of "
        "one more generate per engine (CUDA)",
    )
    p.add_argument(
        "--kernels",
        default=None,
        help="with --profile (CUDA): write the first profiled engine's kernels by time a step "
        "to this markdown file",
    )
    p.add_argument("--commit", default=None, help="git commit to report (default: git HEAD)")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    args = p.parse_args(argv)
    args.cases = parse_cases(
        args.cases or ("4x16,4x32,8x32" if args.tiny else "64x256,64x2048,256x2048")
    )
    args.rows = parse_rows(args.rows)
    args.ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = sorted(set(args.ablations) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"--ablations: unknown {unknown}, choose from {','.join(ABLATIONS)}")
    args.prompt_len = args.prompt_len or (8 if args.tiny else 128)
    args.hf_tokens = args.hf_tokens or (8 if args.tiny else 64)
    args.hf_max_new = args.hf_max_new or (16 if args.tiny else 256)
    return args


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


class RecompileLimitHits(logging.Handler):
    """Names of the functions for which dynamo warned "hit config.recompile_limit": from then
    on they run uncompiled, so a row timed after that is not the engine it names."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.functions: list[str] = []
        logging.getLogger("torch._dynamo.convert_frame").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "recompile_limit" in message:
            name = re.search(r"function: '([^']+)'", message)
            self.functions.append(name.group(1) if name else message.splitlines()[0])


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


def multi_sampler(fused: bool | None = None):
    """The trainer's default sampler; ``fused=False``: its torch path (mtrl.sampling.fused)."""
    return MultiTemperatureSampler(
        MultiTemperatureConfig(
            mode="multi",
            threshold_mode="window",
            reasoning_fraction=0.2,
            window_size=100_000,
            high_temperature=1.2,
            low_temperature=0.8,
        ),
        fused=fused,
    )


def single_sampler():
    return MultiTemperatureSampler(MultiTemperatureConfig(mode="single", temperature=1.0))


def prompts(batch, length, vocab, device, no_eos):
    g = torch.Generator().manual_seed(batch * 7919 + length)
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    ids[ids == no_eos] = 10
    return ids.to(device), torch.ones(batch, length, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- the run
class Bench:
    """The model, the floor's inputs and the rows measured so far; one method per row group."""

    def __init__(self, args):
        self.args = args
        self.kernel_table_written = False
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.shape = TINY if args.tiny else QWEN25_15B
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.clock = Clock(self.device)
        self.limit_hits = RecompileLimitHits()
        torch.manual_seed(0)
        self.model = build_model(self.shape, self.dtype, self.device)
        self.fused_groups = fuse_projections(self.model)  # as the trainer does before training
        self.vocab = self.shape["vocab_size"]
        # No early EOS: the engine gets no EOS id (its finished-row bookkeeping still runs,
        # against a sentinel); HF gets this id with min_new_tokens = its run length, so it is
        # never drawn.
        self.no_eos = self.vocab - 1
        # model.parameters() yields a tied head once: the table the LM head reads every step.
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.kv = KVShape.of(self.model.config, self.dtype)
        self.bw = copy_bandwidth(self.device, (1 << 30) if self.cuda else (1 << 26))
        self.rows: list[dict] = []
        self.overhead: dict[tuple[int, int], float] = {}  # (batch, new) -> multi / single - 1
        self.t_start = time.perf_counter()
        print(
            f"params {self.param_bytes / 1e9:.3f} GB, KV {self.kv.bytes_per_position} B per "
            f"position and row, copy bw {self.bw / 1e12:.2f} TB/s"
        )

    # -------------------------------------------------------------- rows
    def row(self, method, batch, n_new, ms_step, note=""):
        """Record a measured row: ``n_new`` steps timed at ``ms_step`` ms each."""
        w_ms, kv_ms = step_floor_ms(
            self.param_bytes, self.kv, batch, self.args.prompt_len, n_new, self.bw
        )
        self.rows.append(
            dict(
                method=method,
                batch=batch,
                new=n_new,
                ms=ms_step,
                floor_w=w_ms,
                floor_kv=kv_ms,
                note=note,
            )
        )
        print(
            f"{method:40s} B={batch:4d} new={n_new:5d} {ms_step:8.3f} ms/step "
            f"({ms_step / kv_ms:.2f}x W+KV floor) {batch / ms_step * 1e3:10.0f} tok/s"
        )

    def unmeasured(self, method, batch, n_new, note):
        """A row for a variant that was skipped or failed (no times)."""
        nan = float("nan")
        self.rows.append(
            dict(
                method=method, batch=batch, new=n_new, ms=nan, floor_w=nan, floor_kv=nan, note=note
            )
        )
        print(f"{method} B={batch} new={n_new}: {note}")

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def inputs(self, batch):
        return prompts(batch, self.args.prompt_len, self.vocab, self.device, self.no_eos)

    def engine(self, sampler, n_new, **options):
        """A RolloutEngine with the trainer's default options (the rollout section's defaults on
        this device), ``options`` changed."""
        options = {**RolloutConfig().engine_options(self.device), **options}
        return RolloutEngine(self.model, sampler, None, 0, n_new, **options)

    def engine_name(self, suffix=""):
        return ("engine+compile" if self.cuda else "engine") + suffix

    def timed_generate(self, eng, ids, mask, n_new) -> float:
        """Seconds of one ``generate``; checks that every row ran all ``n_new`` tokens."""
        out = None

        def run():
            nonlocal out
            out = eng.generate(ids, mask)

        t = self.clock(run)
        assert out.completion_ids.shape == (ids.shape[0], n_new) and bool(out.mask.all()), (
            "rows stopped early"
        )
        return t

    def first_call(self, name, eng, ids, mask, n_new) -> tuple[float, str]:
        """Seconds of an engine's first ``generate`` (compile + capture on CUDA), and a note
        naming the functions that hit dynamo's recompile limit during it ("" when none).
        Printed at once: a run killed from outside still shows how far its compilations got."""
        seen = len(self.limit_hits.functions)
        t = self.timed_generate(eng, ids, mask, n_new)
        elapsed = time.perf_counter() - self.t_start
        where = f"{name} B={ids.shape[0]} new={n_new}"
        print(f"{where}: first call {t:.1f} s ({elapsed:.0f} s into the run)", flush=True)
        hits = self.limit_hits.functions[seen:]
        return t, f"; RECOMPILE LIMIT HIT, uncompiled: {', '.join(hits)}" if hits else ""

    def kernel_profile(self, eng, ids, mask, n_new) -> str:
        """Kernels and kernel time a step in a torch.profiler trace of one more ``generate``
        (prefill included, divided by ``n_new``): a decode step replays a CUDA graph whose time
        between kernels is launch latency, so fewer kernels is time saved even at equal bytes."""
        if not self.cuda:
            return "profile: CUDA only"
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            self.timed_generate(eng, ids, mask, n_new)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        us = sum(e.device_time for e in kernels)
        if self.args.kernels and not self.kernel_table_written:
            self.write_kernel_table(kernels, n_new)
        return (
            f"profile: {len(kernels) / n_new:.0f} kernels, {us / n_new / 1e3:.3f} ms of kernel "
            "time a step"
        )

    def write_kernel_table(self, kernels, n_new: int) -> None:
        """--kernels: the first profiled engine's kernels by name, time a step (prefill
        included, divided by ``n_new``), most expensive first."""
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.device_time)
        total = sum(map(sum, by_name.values()))
        lines = [
            f"Kernels of one generate, batch x new = {self.args.cases[0]}, per decode step "
            f"({self.card()}, commit {git_commit(self.args.commit, WATCH)})",
            "",
            "| us/step | share | calls/step | kernel |",
            "| ---: | ---: | ---: | --- |",
        ]
        for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
            lines.append(
                f"| {sum(ts) / n_new:.2f} | {sum(ts) / total:.1%} | {len(ts) / n_new:.2f} "
                f"| `{name[:120]}` |"
            )
        Path(self.args.kernels).write_text("\n".join(lines) + "\n")
        self.kernel_table_written = True

    def free(self):
        if self.cuda:
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- groups
    def main_rows(self):
        """Trainer-default engine, multi- and single-temperature, every case, interleaved."""
        for batch, n_new in self.args.cases:
            if self.over_budget():
                self.unmeasured(self.engine_name(), batch, n_new, "skipped (--budget-s)")
                continue
            ids, mask = self.inputs(batch)
            multi, single = self.engine_name(), self.engine_name(", single temperature")
            engines = {
                multi: self.engine(multi_sampler(), n_new),
                single: self.engine(single_sampler(), n_new),
            }
            if self.args.comparisons and (batch, n_new) == self.args.cases[0]:
                engines[self.engine_name(", fused norms")] = self.engine(
                    multi_sampler(), n_new, fused_norms=True
                )
                engines[self.engine_name(", torch sampler")] = self.engine(
                    multi_sampler(False), n_new
                )
            first = {k: self.first_call(k, e, ids, mask, n_new) for k, e in engines.items()}
            times = {k: [] for k in engines}
            for _ in range(self.args.reps):
                for k, e in engines.items():
                    times[k].append(self.timed_generate(e, ids, mask, n_new))
            ms = {k: statistics.median(v) / n_new * 1e3 for k, v in times.items()}
            profiled = {}
            if self.args.profile and (batch, n_new) == self.args.cases[0]:
                profiled = {k: self.kernel_profile(e, ids, mask, n_new) for k, e in engines.items()}
            for k, e in engines.items():
                graphs = e._slot is not None and bool(e._slot.graphs)
                first_s, limit_hits = first[k]
                note = (
                    f"median of {self.args.reps} interleaved; graphs={graphs}; "
                    f"first call ({'compile + capture' if self.cuda else 'warm-up'}) "
                    f"{first_s:.1f} s{limit_hits}"
                )
                if e.fused_norms:
                    note += f"; {e._norms.summary.removeprefix('rollout engine: ')}"
                if k in profiled:
                    note += f"; {profiled[k]}"
                sampler_path = "fused" if e.sampler.uses_fused(self.device) else "torch"
                note += f"; sampler: {sampler_path}"
                self.row(k, batch, n_new, ms[k], note)
                e.release()
            self.overhead[(batch, n_new)] = ms[multi] / ms[single] - 1
            del engines
            self.free()
            self.write_table()  # a run cut short keeps the cases it finished

    def plain_rows(self):
        batch, n_new = self.args.cases[0]
        ids, mask = self.inputs(batch)
        eng = self.engine(multi_sampler(), n_new, compile_decode=False, compile_prefill=False)
        first = self.timed_generate(eng, ids, mask, n_new)
        t = self.timed_generate(eng, ids, mask, n_new)
        note = f"no torch.compile; graphs={eng._slot is not None and bool(eng._slot.graphs)}; first call (capture) {first:.1f} s"
        self.row("engine (no compile)", batch, n_new, t / n_new * 1e3, note)
        eng.release()
        self.free()

    def eager_rows(self):
        batch, n_new = self.args.cases[0]
        n = min(self.args.hf_tokens, n_new)
        ids, mask = self.inputs(batch)
        eng = self.engine(
            multi_sampler(), n, compile_decode=False, compile_prefill=False, use_cuda_graph=False
        )
        eng.generate(ids, mask)
        t = self.timed_generate(eng, ids, mask, n)
        self.row("engine-eager", batch, n, t / n * 1e3, "no CUDA graph, no torch.compile")
        eng.release()

    def hf_rows(self):
        from transformers import GenerationConfig

        n = self.args.hf_tokens
        for static in (False, True):
            name = "hf-static" if static else "hf-dynamic"
            for batch, n_new in self.args.cases:
                if n_new > self.args.hf_max_new:
                    self.unmeasured(
                        name,
                        batch,
                        n_new,
                        f"not run ({n_new} new tokens > --hf-max-new {self.args.hf_max_new}): "
                        "generate at this length takes minutes, and a short run's ms/step "
                        "would hide its attention cost, which grows with the length",
                    )
                    continue
                if self.over_budget():
                    self.unmeasured(name, batch, n, "skipped (--budget-s)")
                    continue
                gc = GenerationConfig(
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    eos_token_id=self.no_eos,
                    pad_token_id=0,
                    disable_compile=not (static and self.cuda),
                )
                if static and self.cuda:
                    gc.cache_implementation = "static"
                ids, mask = self.inputs(batch)

                def run(gc=gc, ids=ids, mask=mask):
                    with torch.no_grad():
                        self.model.generate(
                            input_ids=ids, attention_mask=mask, generation_config=gc
                        )

                first = self.clock(run)
                t = statistics.median(self.clock(run) for _ in range(2))
                note = (
                    f"short run of {n} new tokens (case {batch}x{n_new}); first call {first:.1f} s"
                )
                if static and not self.cuda:
                    note += "; no static cache / compile off CUDA"
                self.row(name, batch, n, t / n * 1e3, note)
                self.free()

    def ablation_rows(self):
        batch, n_new = self.args.cases[0]
        for label, (fused_sampler, options) in ABLATIONS.items():
            if label not in self.args.ablations:
                continue
            name = f"engine+compile, {label}"
            if not self.cuda:
                self.unmeasured(name, batch, n_new, "skipped: needs CUDA (torch.compile + graphs)")
                continue
            if self.over_budget():
                self.unmeasured(name, batch, n_new, "skipped (--budget-s)")
                continue
            ids, mask = self.inputs(batch)
            eng = self.engine(multi_sampler(), n_new, **options)
            eng.sampler.compile(fused_sampler)
            try:
                first, hits = self.first_call(name, eng, ids, mask, n_new)
                t = statistics.median(self.timed_generate(eng, ids, mask, n_new) for _ in range(2))
            except Exception as e:  # noqa: BLE001 - report, keep the rest of the table
                self.unmeasured(name, batch, n_new, f"failed: {type(e).__name__}: {e}")
                continue
            finally:
                eng.release()
            note = f"first call (compile + capture) {first:.1f} s{hits}"
            self.row(name, batch, n_new, t / n_new * 1e3, note)
            self.free()

    # -------------------------------------------------------------- table
    def card(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        cpu = platform.processor() or platform.machine()
        return f"CPU ({cpu}, {torch.get_num_threads()} threads)"

    def write_table(self):
        import transformers

        args = self.args
        commit = git_commit(args.commit, WATCH)
        card = self.card()
        overhead = (
            "; ".join(f"{b}x{n}: {v * 100:+.1f}%" for (b, n), v in self.overhead.items())
            or "not measured"
        )
        lines = header("Rollout engine benchmark", card, commit) + [
            f"- torch {torch.__version__}, transformers {transformers.__version__}",
            f"- model: {'tiny' if args.tiny else 'Qwen2.5-1.5B shape'}, random weights, "
            f"{self.param_bytes / 1e9:.3f} GB of parameters ({self.dtype}); prompt length "
            f"{args.prompt_len}, no padding, no early EOS",
            f"- KV cache: {self.kv.layers} layers x {self.kv.kv_heads} KV heads x head dim "
            f"{self.kv.head_dim} x {self.kv.bytes_per_value} B x 2 (K, V) = "
            f"{self.kv.bytes_per_position:,} B per position and row",
            f"- projection groups with adjacent weights (`fuse_projections`): {self.fused_groups}",
            f"- copy bandwidth {self.bw / 1e12:.2f} TB/s (read + write counted)",
            f"- multi-temperature over single-temperature (main rows, BATCHxNEW): {overhead}",
            "",
            "ms/step = wall time of one generate / new tokens (engine: the whole generate, "
            "prefill included; hf and eager: a short run, its own new-token count). "
            "Floors, in ms per step: W = parameter bytes (LM head included) / copy bandwidth; "
            "W+KV adds the K and V of the P + t positions step t reads, for every row, averaged "
            "over the row's new tokens (`step_floor_ms`). x W, x W+KV = ms/step / that floor. "
            "tokens/s = batch / (ms/step).",
            "",
            "| method | batch | new tokens | ms/step | floor W | floor W+KV | x W floor "
            "| x W+KV floor | tokens/s | notes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.rows:
            if r["ms"] != r["ms"]:  # NaN: skipped or failed, the note says why
                cells = ["-"] * 6
            else:
                cells = [
                    f"{r['ms']:.2f}",
                    f"{r['floor_w']:.4g}",
                    f"{r['floor_kv']:.4g}",
                    f"{r['ms'] / r['floor_w']:.2f}",
                    f"{r['ms'] / r['floor_kv']:.2f}",
                    f"{r['batch'] / r['ms'] * 1e3:,.0f}",
                ]
            lines.append(
                f"| {r['method']} | {r['batch']} | {r['new']} | {' | '.join(cells)} | {r['note']} |"
            )
        text = "\n".join(lines) + "\n"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        return text


def main(argv=None) -> str:
    """Run the chosen row groups; returns the table (also written to --out after each group)."""
    args = parse_args(argv)
    bench = Bench(args)
    groups = {
        "main": bench.main_rows,
        "plain": bench.plain_rows,
        "eager": bench.eager_rows,
        "hf": bench.hf_rows,
        "ablations": bench.ablation_rows,
    }
    for name in ROW_GROUPS:
        if name not in args.rows:
            continue
        if name != "main" and bench.over_budget():
            batch, n_new = args.cases[0]
            bench.unmeasured(name, batch, n_new, f"skipped: past --budget-s {args.budget_s}")
        else:
            groups[name]()
        text = bench.write_table()
    print(text)
    return text


if __name__ == "__main__":
    main()
