"""The benchmark of record: plain `transformers.Trainer` vs `hf_gns.GNSTrainer`, one process per variant.

Both trainers get identical `TrainingArguments`: bf16, `optim="adamw_torch_fused"`,
`max_grad_norm=1.0`, logging every 10 steps, no saving, no evaluation, `report_to="none"`,
a fixed seed, synthetic random tokens (labels = inputs). Models are built from configs
(random weights, same seed for every variant):

    gpt2       GPT-2 124M (GPT2Config defaults: 12 x 768, vocab 50257, tied), B=16, T=1024
    llama124   Llama-style 123.6M: hidden 768, 12 layers, 12 heads (no GQA), intermediate
               2048, vocab 50257, tied embeddings, SDPA, B=8, T=2048
    llama850   Llama-style 0.85B: hidden 2048, 16 layers, GQA 16/4 heads, intermediate 5632,
               vocab 32000, untied, SDPA, B=4, T=2048

Variants (`--variants`): `trainer`, `gns-norms` (`gns_track="norms"`), `gns-all`
(`gns_track="all"`), each also with a `-compile` suffix (`torch_compile=True`), and
`trainer-liger`, `gns-norms-liger` (`use_liger_kernel=True`; skipped with a note when
liger_kernel is not importable). Not run by default: `trainer-liger-norm` (the plain Trainer with
only Llama's RMSNorm swapped for Liger's, against `trainer`: the single-kernel norm the eager
Llama-124M target was set from), `trainer-free-norm` (a bound: the plain Trainer with every norm
layer's forward returning its input, against `trainer`: what a norm of zero cost would give),
`gns-norms-aten-compile`,
`gns-norms-hybrid-compile`, `gns-norms-wide-compile`, `gns-norms-both-compile`,
`gns-norms-unfused-compile`, `gns-norms-residual-compile`, `gns-norms-bwdsums-compile`,
`gns-norms-fused-compile` and `gns-norms-static-compile`, the compiled norm path's experiments
(`COMPILED_NORM_EXPERIMENTS`).
Every variant runs in a fresh subprocess (no compile caches, allocator state or clocks shared
in-process). Inductor's on-disk cache is shared, though: a compiled variant's later processes
reuse its first compilation, autotuning choices included, so the rounds of one invocation (and
the calls on one machine) are not independent samples of them: in the H200 profiles of
2026-12-03 one pointwise kernel of the compiled Llama-124M forward (its SiLU·mul) took 70 µs in
the GNSTrainer process of one lease and 49 µs in the other processes profiled.
`--fresh-compile-cache` gives each process an empty cache directory of its own. A
`TrainerCallback` records one CUDA event at the end of every optimizer step (no host sync: read
once after training); a step's time is the gap between consecutive events, i.e. wall time of
the loop including data loading, host work and the Trainer's own syncs. Reported: median step time over the
`--steps` steps after `--warmup` steps, tokens/s, the ratio to the same model's plain
Trainer of the same kind (eager / compiled / Liger) in the same invocation, peak memory
(`torch.cuda.max_memory_allocated` over the whole run), and each process's wall time
(compile time is the cost), a fixed host probe after training and each thread's CPU ms a step
over the measured steps (`_thread_cpu.py`: main thread, others by name). Targets (issue 11): see
`TARGETS`.

    PYTHONPATH=. python benchmarks/bench_trainer.py                               # everything
    PYTHONPATH=. python benchmarks/bench_trainer.py --models gpt2,llama124 --json a.json
    PYTHONPATH=. python benchmarks/bench_trainer.py --models llama850 --json b.json
    PYTHONPATH=. python benchmarks/bench_trainer.py --from-json a.json,b.json     # one table of both
    PYTHONPATH=. python benchmarks/bench_trainer.py --rounds 3 --models llama124 --variants trainer,gns-norms
    PYTHONPATH=. python benchmarks/bench_trainer.py --check-graph-breaks --models gpt2
    PYTHONPATH=. python benchmarks/bench_trainer.py --profile --models llama124 --variants trainer,gns-all
    python benchmarks/bench_trainer.py --tiny --models gpt2 --variants trainer,gns-norms   # CPU smoke

`--check-graph-breaks` runs the compiled variants with `TORCH_LOGS=graph_breaks,recompiles`
and prints every graph break / recompile whose log record names a file under hf_gns/
(and how many there were in all). `--rounds N` runs every variant N times, interleaved
(A B A B), each ratio within its round, and judges the targets on the median ratio: the
compiled Llama-124M ratio moved from 0.907x to 0.981x between device calls, so one pair is
not enough. `--profile` runs torch.profiler over a few steps after
warm-up and prints the top ops by device time and by host time (the Trainer-loop step,
issue 11 part 4); `--trace DIR` also writes each variant's Chrome trace there (gzipped), to
find where the device idles and what the host was doing then. `--host-timeline` prints each
variant's host ms per phase of the measured steps and its garbage collections
(`_host_timeline.py`): on the H200, compiled Llama-124M, the phase that launches forward and
backward took 17.9 ms in the Trainer and 33.3 ms in GNSTrainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _host_timeline import HostTimeline, format_timeline  # noqa: E402
from _thread_cpu import cpu_per_step, format_cpu, main_thread_id, thread_cpu_ms  # noqa: E402

VARIANTS = (
    "trainer",
    "gns-norms",
    "gns-all",
    "trainer-compile",
    "gns-norms-compile",
    "gns-all-compile",
    "trainer-liger",
    "gns-norms-liger",
)
DEFAULT_VARIANTS = VARIANTS
# The plain Trainer with only Liger's RMSNorm swapped in (Llama models; `trainer` is its baseline):
# the single-kernel norm the eager Llama-124M target was set from (1.13x on an H100, raw step).
LIGER_NORM_ONLY = "trainer-liger-norm"
# A bound, not a model anyone trains: the plain Trainer with every norm layer's forward returning
# its input (no kernel, no host work beyond the module call), against `trainer`: the ratio that a
# norm costing nothing at all, on the host and on the device, would give in this loop.
FREE_NORM = "trainer-free-norm"
VARIANTS += (LIGER_NORM_ONLY, FREE_NORM)
# Experiments on the compiled norm path (issue 11's compiled gap), not run by default: the same
# GNSTrainer with an environment switch of `hf_gns/kernels/norm_op.py`, set in its process only.
# `aten`: compiled graphs trace the norm op's PyTorch body (Inductor fuses it with the residual add
# and dtype casts around the norm, as it does its own norms); `hybrid`: only the forward's body,
# with the Triton backward; `wide`: the Triton kernels without `norm_graph_pass.py` (fp32 y and dy
# with the autocast casts around them launched apart, as before that pass: all its switches off);
# `both`: that pass also on the single-Linear backward inputs (the default since 2026-12-03);
# `fwdcasts`: the default before that (forward outputs narrowed, backward inputs widened apart, the
# fusions on); `unfused`: the pass's output casts only (the default before its residual add and
# backward sums, measured as gns-norms-compile until 2026-12-02); `residual` / `bwdsums`: only the
# residual add before each norm / only the q/k/v (gate/up) gradient sum and the residual gradient
# add in the norm's backward kernel; `fused`: both (as gns-norms-compile until 2026-12-03). The
# last four keep the forward-only casts they were measured with.
_FORWARD_CASTS = {"HF_GNS_COMPILED_NARROW_CASTS": "forward"}
_UNFUSED = {**_FORWARD_CASTS, "HF_GNS_COMPILED_RESIDUAL_ADD": "0", "HF_GNS_COMPILED_BACKWARD_SUMS": "0"}
COMPILED_NORM_EXPERIMENTS = {
    "gns-norms-aten-compile": {"HF_GNS_COMPILED_TRITON": "0"},
    "gns-norms-hybrid-compile": {"HF_GNS_COMPILED_FORWARD": "inductor"},
    "gns-norms-wide-compile": {**_UNFUSED, "HF_GNS_COMPILED_NARROW_CASTS": "0"},
    "gns-norms-both-compile": {"HF_GNS_COMPILED_NARROW_CASTS": "both"},
    "gns-norms-fwdcasts-compile": _FORWARD_CASTS,
    "gns-norms-unfused-compile": _UNFUSED,
    "gns-norms-residual-compile": {**_UNFUSED, "HF_GNS_COMPILED_RESIDUAL_ADD": "1"},
    "gns-norms-bwdsums-compile": {**_UNFUSED, "HF_GNS_COMPILED_BACKWARD_SUMS": "1"},
    "gns-norms-fused-compile": {
        **_FORWARD_CASTS,
        "HF_GNS_COMPILED_RESIDUAL_ADD": "1",
        "HF_GNS_COMPILED_BACKWARD_SUMS": "1",
    },
    # Inductor's static launcher for user-defined Triton kernels (off by default in torch 2.11-2.13):
    # on the H200 the compiled Llama-124M forward launched its 25 norm kernels through Triton's own
    # launcher (launch metadata and driver call each time), its other 129 kernels statically
    "gns-norms-static-compile": {"TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS": "1"},
}
VARIANTS += tuple(COMPILED_NORM_EXPERIMENTS)


@dataclass(frozen=True)
class ModelSpec:
    title: str
    batch: int
    seq: int
    norms_eager_target: float  # GNSTrainer (norms) / Trainer, eager


MODELS = {
    "gpt2": ModelSpec("GPT-2 124M", 16, 1024, 1.00),
    "llama124": ModelSpec("Llama-style 124M", 8, 2048, 1.12),
    "llama850": ModelSpec("Llama-style 0.85B", 4, 2048, 1.08),
}
TINY_BATCH, TINY_SEQ = 2, 32

COMPILED_NORMS_TARGET = 0.99
ALL_LAYERS_TARGET = 0.85
LIGER_NORMS_TARGET = 0.99  # issue 12: GNSTrainer + Liger vs Trainer + Liger
MEMORY_SLACK = 1.02  # peak memory ≤ Trainer's + 2%


def model_config(key: str, tiny: bool):
    from transformers import GPT2Config, LlamaConfig

    if key == "gpt2":
        if tiny:
            return GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
        return GPT2Config()  # 124M: 12 layers, 768 wide, vocab 50257, n_positions 1024
    if tiny:
        size = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
        size.update(num_key_value_heads=2 if key == "llama850" else 4, vocab_size=512)
    elif key == "llama124":
        size = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12)
        size.update(num_key_value_heads=12, vocab_size=50257)
    else:  # llama850: 0.853B parameters
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16)
        size.update(num_key_value_heads=4, vocab_size=32000)
    return LlamaConfig(**size, max_position_embeddings=2048, tie_word_embeddings=key == "llama124")


def baseline_of(variant: str) -> str:
    """The plain-Trainer variant a variant is compared with: same compile / Liger setting."""
    if variant in (LIGER_NORM_ONLY, FREE_NORM):
        return "trainer"
    for suffix in ("-compile", "-liger"):
        if variant.endswith(suffix):
            return "trainer" + suffix
    return "trainer"


# ------------------------------------------------------------------------------ child


def parse_cpus(text: str) -> set[int]:
    """CPU ids from "2-9" or "0,2,4-7" (what `taskset -c` takes)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"--cpus takes ids and ranges like 2-9 or 0,2,4-7, got {text!r}")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def host_probe_us(device, repeats: int = 7, calls: int = 500) -> float:
    """Host microseconds for one small allocation and one small kernel launch, median of `repeats`
    loops, in this process after its training: the same fixed work in every variant's process.
    It reads the host's speed together with the process's state after training (its allocator,
    heap): on the H200 it ranged 8.7-14.5 µs between processes pinned to the same cores, slower in
    the GNSTrainer processes of compiled GPT-2 and faster in those of eager Llama-124M (2026-12-03),
    so it tells processes apart but is no clean measure of the core. The device keeps up with these
    tiny launches: no sync inside the loop."""
    import torch

    x = torch.zeros(64, device=device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            torch.empty(64, device=device)
            x.add_(1.0)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def make_norms_free(model) -> int:
    """Bind every norm layer's forward (`torch.nn.LayerNorm` and the classes named `*RMSNorm` or
    `*LayerNorm`) to the identity; returns how many. The `trainer-free-norm` bound."""
    import types

    def identity(self, hidden_states, *args, **kwargs):
        return hidden_states

    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("RMSNorm", "LayerNorm")):
            module.forward = types.MethodType(identity, module)
            count += 1
    return count


def _child(args) -> None:
    """Train one variant of one model and write its measurements to `args.child_json`."""
    if args.cpus:  # before torch starts its threads: they inherit the affinity
        os.sched_setaffinity(0, parse_cpus(args.cpus))
    import torch

    result = {"model": args.model, "variant": args.variant}
    if "liger" in args.variant:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as error:
            result["skipped"] = f"liger_kernel not importable ({error})"
            _write(args.child_json, result)
            return

    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    import hf_gns

    cuda = torch.cuda.is_available() and not args.tiny
    spec = MODELS[args.model]
    batch, seq = (TINY_BATCH, TINY_SEQ) if args.tiny else (spec.batch, spec.seq)
    total_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(model_config(args.model, args.tiny), attn_implementation="sdpa")
    if args.variant == LIGER_NORM_ONLY:
        if model.config.model_type != "llama":
            kind = model.config.model_type
            result["skipped"] = f"{LIGER_NORM_ONLY} swaps Llama's RMSNorm only, not {kind}'s"
            _write(args.child_json, result)
            return
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        only_norms = dict(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, swiglu=False)
        apply_liger_kernel_to_llama(rms_norm=True, model=model, **only_norms)
    if args.variant == FREE_NORM:
        result["free_norms"] = make_norms_free(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (total_steps * batch, seq), generator=generator)  # (N, T)
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    gns = args.variant.startswith("gns")
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trainer_"),
        per_device_train_batch_size=batch,
        max_steps=total_steps,
        learning_rate=1e-4,
        bf16=cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not cuda,
        torch_compile=args.variant.endswith("-compile"),
        use_liger_kernel=args.variant.endswith("-liger"),
    )
    if gns:
        arguments = hf_gns.GNSTrainingArguments(
            **common, gns_track="all" if "-all" in args.variant else "norms"
        )
        trainer_class = hf_gns.GNSTrainer
    else:
        arguments = TrainingArguments(**common)
        trainer_class = Trainer

    class StepTimer(TrainerCallback):
        """One CUDA event (or host clock on CPU) at the end of each optimizer step; no sync."""

        def __init__(self):
            self.marks = []
            self.profiler = None
            self.threads_before = self.threads_after = None  # `thread_cpu_ms` over the measured steps

        def _mark(self):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append(event)
            else:
                self.marks.append(time.perf_counter())

        def on_train_begin(self, *_, **__):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, _args, state, *_, **__):
            if timeline is not None:
                timeline.mark("begin")
                if state.global_step == args.warmup:  # the measured steps' garbage collections
                    timeline.start_gc_recording()
                elif state.global_step == args.warmup + args.steps:
                    timeline.stop_gc_recording()

        def on_pre_optimizer_step(self, *_, **__):
            if timeline is not None:
                timeline.mark("pre_optimizer")

        def on_optimizer_step(self, *_, **__):
            if timeline is not None:
                timeline.mark("optimizer")

        def on_step_end(self, _args, state, *_, **__):
            if timeline is not None:
                timeline.mark("end")
            self._mark()
            if state.global_step == args.warmup:  # the measured steps are warmup+1 .. warmup+steps
                self.threads_before = thread_cpu_ms()
            elif state.global_step == args.warmup + args.steps:
                self.threads_after = thread_cpu_ms()
            if args.profile and state.global_step == args.warmup + args.steps:
                from torch.profiler import ProfilerActivity, profile

                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()
            if self.profiler is not None and state.global_step == total_steps:
                if cuda:
                    torch.cuda.synchronize()  # sync: the profiled steps' kernels finish inside the trace
                self.profiler.__exit__(None, None, None)
                if args.trace:
                    export_trace(
                        self.profiler, os.path.join(args.trace, f"trace_{args.model}_{args.variant}.json")
                    )

        def step_ms(self) -> list[float]:
            if cuda:
                torch.cuda.synchronize()  # sync: once, after training, to read the events
                return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
            return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]

    timeline = HostTimeline() if args.host_timeline else None
    main_tid = main_thread_id()  # the Trainer's loop runs on this thread
    timer = StepTimer()
    trainer = trainer_class(model=model, args=arguments, train_dataset=dataset, callbacks=[timer])
    if timeline is not None:
        timeline.wrap(trainer)
    trainer.train()
    # marks[k] ends step k+1: gaps[k] is step k+2; measured steps are warmup+1 .. warmup+steps
    gaps = timer.step_ms()
    measured = (
        gaps[args.warmup - 1 : args.warmup - 1 + args.steps] if args.warmup >= 1 else gaps[: args.steps]
    )
    step_ms = statistics.median(measured)
    result.update(
        title=spec.title,
        batch=batch,
        seq=seq,
        params=sum(p.numel() for p in model.parameters()),
        step_ms=step_ms,
        step_ms_all=measured,
        tokens_per_s=batch * seq / (step_ms / 1e3),
        peak_memory_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        host_probe_us=host_probe_us(torch.device("cuda" if cuda else "cpu")),
        cpus=len(os.sched_getaffinity(0)),
    )
    if timer.threads_before and timer.threads_after:
        result["thread_cpu"] = cpu_per_step(timer.threads_before, timer.threads_after, args.steps, main_tid)
    if timeline is not None:
        timeline.stop_gc_recording()
        # steps[k] is optimizer step k+1: the measured steps are warmup+1 .. warmup+steps
        result["host_phases_ms"] = timeline.phase_ms(args.warmup, args.steps)
        result["host_gc"] = timeline.gc_summary(args.steps)
        print(format_timeline(f"{args.model} {args.variant}", result["host_phases_ms"], result["host_gc"]))
    if gns:
        value = trainer.current_gns()  # sync, after timing
        result["gns"] = None if value is None or math.isnan(value) else value
        result["tracked_params"] = len(getattr(trainer, "_gns_tracked_names", []))
    if args.check_graph_breaks:
        from torch._dynamo.utils import counters

        result["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
        result["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
    if timer.profiler is not None:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        averages = timer.profiler.key_averages()
        print(f"\n=== profile: {args.model} {args.variant}, {args.profile_steps} steps, by device time ===")
        print(averages.table(sort_by=sort, row_limit=args.profile_rows))
        if cuda:
            print(f"=== profile: {args.model} {args.variant}, by host time ===")
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
            # GPU busy time against the wall time of the same steps: well under 100% means the
            # step is host-bound (launch overhead, Python, syncs), not kernel-bound
            kernel_ms = (
                sum(
                    e.time_range.elapsed_us() for e in timer.profiler.events() if e.device_type.name == "CUDA"
                )
                / 1e3
                / args.profile_steps
            )
            profiled = gaps[args.warmup + args.steps - 1 :][: args.profile_steps]
            wall_ms = statistics.median(profiled) if profiled else float("nan")
            print(
                f"=== {args.model} {args.variant}: GPU kernel time {kernel_ms:.1f} ms a step, step wall time "
                f"{wall_ms:.1f} ms (profiler on): GPU busy {100 * kernel_ms / wall_ms:.0f}% ==="
            )
    _write(args.child_json, result)


def export_trace(profiler, path: str) -> str:
    """Write the profiler's Chrome trace to `path` + ".gz" (a compiled step's trace is tens of MB
    of JSON, a few MB gzipped); returns the written path."""
    import gzip
    import shutil

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    profiler.export_chrome_trace(path)
    with open(path, "rb") as raw, gzip.open(path + ".gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    os.unlink(path)
    return path + ".gz"


def _write(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


# ----------------------------------------------------------------------------- parent

# a TORCH_LOGS line: "V1202 05:43:45.311000 4202 torch/_dynamo/x.py:5127] [1/0] [__graph_breaks] text";
# torch 2.11 prefixes every line of a multi-line message, older versions only the first
_LOG_RECORD = re.compile(r"^(?:\[rank\d+\]:)?[VIWEDC]\d{4} \S+ \d+ \S+\] (?:\[[^\]]*\] ?)*(.*)$")
_FILE_FRAME = re.compile(r'File "([^"]+)", line \d+')
_OURS = re.compile(r"hf_gns[/\\]")


def _log_records(stderr: str) -> list[list[str]]:
    """TORCH_LOGS output as records (lists of message lines, prefixes stripped): a record starts at
    an unindented message line; indented lines (stack frames, explanations) and unprefixed lines
    continue it."""
    records: list[list[str]] = []
    for line in stderr.splitlines():
        match = _LOG_RECORD.match(line)
        if match is None:
            if records:
                records[-1].append(line)
            continue
        text = match.group(1)
        if records and text[:1].isspace():
            records[-1].append(text)
        else:
            records.append([text])
    return records


def hf_gns_log_records(stderr: str) -> tuple[int, list[str]]:
    """(number of graph-break/recompile records, those caused in hf_gns) in TORCH_LOGS output.

    A graph break is hf_gns's when its location is a file under hf_gns/: the "user code at" file
    or the innermost frame of its stack (the stack also lists the callers, e.g. GNSTrainer's
    `training_step` above a break inside the model's forward: those do not count). A recompile is
    hf_gns's when its record names hf_gns/ anywhere (the function, or a guard on hf_gns state).
    """
    relevant, ours = [], []
    for record in _log_records(stderr):
        text = "\n".join(record)
        if "ecompil" in record[0]:
            relevant.append(text)
            if _OURS.search(text):
                ours.append(text)
        elif "raph break" in text:
            relevant.append(text)
            located = re.search(r"user code at (\S+)", text)
            frames = _FILE_FRAME.findall(text)
            where = located.group(1) if located else (frames[-1] if frames else "")
            if _OURS.search(where):
                ours.append(text)
    return len(relevant), ours


def run_variant(model: str, variant: str, args) -> dict:
    """One subprocess per variant; returns its result dict (with wall time, or an error)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--variant", variant]
    command += ["--child-json", out, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--seed", str(args.seed), "--profile-steps", str(args.profile_steps)]
    command += ["--profile-rows", str(args.profile_rows)]
    command += ["--tiny"] * args.tiny + ["--profile"] * args.profile
    command += ["--cpus", args.cpus] if args.cpus else []
    command += ["--check-graph-breaks"] * args.check_graph_breaks
    command += ["--host-timeline"] * args.host_timeline + (["--trace", args.trace] if args.trace else [])
    env = dict(os.environ, **COMPILED_NORM_EXPERIMENTS.get(variant, {}))
    if args.check_graph_breaks:
        env["TORCH_LOGS"] = "graph_breaks,recompiles"
    cache_dir = tempfile.mkdtemp(prefix="bench_trainer_inductor_") if args.fresh_compile_cache else None
    if cache_dir:  # Inductor's FX graph and autotuning caches, and Triton's binaries beneath them
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as error:
        returncode, stdout, stderr = None, error.stdout or "", error.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    wall_s = time.perf_counter() - start
    if cache_dir:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if (args.profile or args.host_timeline) and stdout:
        print(stdout.rstrip())
    result = {"model": model, "variant": variant}
    if returncode == 0 and os.path.getsize(out) > 0:
        with open(out) as f:
            result = json.load(f)
    else:
        why = "timed out" if returncode is None else f"exit {returncode}"
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        result["error"] = f"{why} after {wall_s:.0f} s"
        print(f"  {model} {variant}: FAILED ({why}); stderr tail:\n{tail}", flush=True)
    os.unlink(out)
    result["wall_s"] = wall_s
    if args.check_graph_breaks:
        total, ours = hf_gns_log_records(stderr)
        result["log_records"], result["hf_gns_log_records"] = total, ours
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def add_ratios(results: list[dict]) -> None:
    """Each result's ratio to its baseline variant of the same model in the same run and round
    (`--from-json` tags each file's results with its own `run`, `--rounds` each pass with its
    `round`: ratios never mix invocations, and a round's variants ran back to back)."""
    by_key = {(r.get("run"), r.get("round", 0), r["model"], r["variant"]): r for r in results}
    for r in results:
        base = by_key.get((r.get("run"), r.get("round", 0), r["model"], baseline_of(r["variant"])))
        ok = base is not None and "tokens_per_s" in base and "tokens_per_s" in r
        r["baseline"] = baseline_of(r["variant"])
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
        mem_ok = ok and r.get("peak_memory_bytes") and base.get("peak_memory_bytes")
        r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] if mem_ok else None


def across_rounds(results: list[dict]) -> list[dict]:
    """One result per (run, model, variant): with several `--rounds`, the median of the rounds'
    ratios (each an in-round ratio) and the largest memory ratio, with `round_ratios` kept; a single
    round passes through unchanged. Needs `add_ratios` first."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("run"), r["model"], r["variant"]), []).append(r)
    merged = []
    for group in groups.values():
        if len(group) == 1:
            merged.append(group[0])
            continue
        ratios = [r["ratio"] for r in group if r.get("ratio") is not None]
        memory = [r["memory_ratio"] for r in group if r.get("memory_ratio") is not None]
        merged.append(
            dict(
                group[0],
                ratio=statistics.median(ratios) if ratios else None,
                memory_ratio=max(memory) if memory else None,
                round_ratios=ratios,
            )
        )
    return merged


def results_table(results: list[dict]) -> str:
    from _timing import format_table

    headers = ["model", "B x T", "variant", "step ms", "tok/s", "vs baseline", "baseline"]
    headers += ["peak GiB", "mem ratio", "wall s", "gns"]
    rows = []
    for r in results:
        note = r.get("skipped") or r.get("error")
        if note:
            rows.append(
                [r["model"], "", r["variant"], note, "", "", "", "", "", _fmt(r.get("wall_s"), ".0f"), ""]
            )
            continue
        peak = r.get("peak_memory_bytes")
        rows.append(
            [
                r["title"],
                f"{r['batch']} x {r['seq']}",
                r["variant"],
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                _fmt(r["ratio"], ".3f") + ("x" if r["ratio"] is not None else ""),
                r["baseline"] if r["variant"] != r["baseline"] else "",
                _fmt(None if peak is None else peak / 2**30, ".2f"),
                _fmt(r["memory_ratio"], ".3f"),
                f"{r['wall_s']:.0f}",
                _fmt(r.get("gns"), ".4g") if r["variant"].startswith("gns") else "",
            ]
        )
    return format_table(headers, rows)


def target_lines(results: list[dict]) -> list[str]:
    """Every issue-11 (and issue-12 Liger) target measurable from these results, PASS or MISS."""
    lines = []
    for r in results:
        variant, spec = r["variant"], MODELS[r["model"]]
        if not variant.startswith("gns"):
            continue
        if variant == "gns-norms":
            goal, what = spec.norms_eager_target, "GNS norms eager vs Trainer"
        elif variant == "gns-norms-compile":
            goal, what = COMPILED_NORMS_TARGET, "GNS norms compiled vs compiled Trainer"
        elif variant in COMPILED_NORM_EXPERIMENTS:
            path = variant.split("-")[2]
            goal, what = COMPILED_NORMS_TARGET, f"GNS norms compiled ({path} experiment) vs compiled Trainer"
        elif variant.startswith("gns-all"):
            kind = "compiled" if variant.endswith("-compile") else "eager"
            goal, what = ALL_LAYERS_TARGET, f"gns_track='all' {kind} vs Trainer"
        else:
            goal, what = LIGER_NORMS_TARGET, "GNS norms + Liger vs Trainer + Liger"
        label = f"{spec.title}: {what}"
        if r.get("ratio") is None:
            why = r.get("skipped") or r.get("error") or f"no {baseline_of(variant)} result in this run"
            lines.append(f"  {label} >= {goal:.2f}x: not measured ({why})")
            continue
        lines.append(
            f"  {label} >= {goal:.2f}x: {r['ratio']:.3f}x {'PASS' if r['ratio'] >= goal else 'MISS'}"
        )
        if r.get("memory_ratio") is not None:
            status = "PASS" if r["memory_ratio"] <= MEMORY_SLACK else "MISS"
            lines.append(
                f"  {label[: label.index(':')]}: {variant} peak memory <= {r['baseline']} + 2%: "
                f"{(r['memory_ratio'] - 1) * 100:+.1f}% {status}"
            )
    return lines


def report(results: list[dict], header: str) -> None:
    add_ratios(results)
    print()
    print(header)
    print(results_table(results))
    merged = across_rounds(results)
    spread = [r for r in merged if len(r.get("round_ratios", ())) > 1 and r["variant"] != r["baseline"]]
    if spread:
        print("\nAcross rounds (each ratio within its round; the targets below use the median):")
        for r in spread:
            ratios = ", ".join(f"{x:.3f}" for x in r["round_ratios"])
            print(f"  {r['title']} {r['variant']}: {ratios} -> median {r['ratio']:.3f}x")
    lines = target_lines(merged)
    if lines:
        print("\nTargets (issue 11; Liger: issue 12):")
        print("\n".join(lines))


def _write_results(args, env: dict, results: list[dict]) -> None:
    with open(args.json, "w") as f:
        json.dump(
            {"environment": env, "steps": args.steps, "warmup": args.warmup, "results": results}, f, indent=1
        )


def parse_args(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument(
        "--models", default="gpt2,llama124,llama850", help=f"comma-separated: {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=8, help="unmeasured steps first (compile happens here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of every variant, interleaved: ratios within each round, targets on their median",
    )
    parser.add_argument("--json", help="write every variant's result to this JSON file")
    parser.add_argument(
        "--from-json", help="comma-separated JSON files of earlier runs: print their table only"
    )
    parser.add_argument(
        "--timeout", type=float, default=420, help="seconds before a variant's process is killed"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU in fp32 (smoke test)")
    parser.add_argument(
        "--check-graph-breaks",
        action="store_true",
        help="run the compiled GNS variants under TORCH_LOGS=graph_breaks,recompiles; print hf_gns records",
    )
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler summary of steps after warm-up"
    )
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument(
        "--trace",
        default="",
        help="with --profile: each variant's Chrome trace, gzipped, into this folder",
    )
    parser.add_argument(
        "--host-timeline",
        action="store_true",
        help="print each variant's host ms per phase of a step and its GC runs (_host_timeline.py)",
    )
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument(
        "--fresh-compile-cache",
        action="store_true",
        help="an empty TORCHINDUCTOR_CACHE_DIR for every process: each round compiles (and autotunes) anew",
    )
    parser.add_argument(
        "--cpus",
        default="",
        help="pin every variant's process to these CPUs (e.g. 2-9): all variants on the same cores",
    )
    # internal: one variant in this process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.models) - set(MODELS):
        parser.error(
            f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {', '.join(MODELS)}"
        )
    if set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(args.variants) - set(VARIANTS))}; choose from {VARIANTS}")
    if args.trace and not args.profile:
        parser.error("--trace writes the profiled steps' traces: add --profile")
    if args.cpus:
        try:
            cpus = parse_cpus(args.cpus)
        except ValueError as error:
            parser.error(str(error))
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            parser.error(f"--cpus {args.cpus}: this process may run on {sorted(allowed)} only")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be at least 1")
    if args.check_graph_breaks:
        # compiled variants only; a compiled plain Trainer among them is timed alongside (its log
        # records are counted too), so one invocation gives the ratio and the graph-break check
        args.variants = [v for v in args.variants if v.endswith("-compile")] or ["gns-norms-compile"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        _child(args)
        return
    if args.from_json:
        results = []
        for run, path in enumerate(args.from_json.split(",")):
            with open(path) as f:
                results += [dict(r, run=run) for r in json.load(f)["results"]]
        report(results, f"from {args.from_json}")
        return

    from _timing import environment_info, format_environment, require_device

    env = environment_info(require_device("cpu" if args.tiny else "cuda"))
    print(format_environment(env))
    settings = {
        k: v for k, v in os.environ.items() if k.startswith("HF_GNS_") or k.startswith("TORCHINDUCTOR_")
    }
    if settings:
        env["settings"] = settings
        print("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    print(
        f"HF Trainer loop, {'fp32 (tiny, CPU)' if args.tiny else 'bf16, adamw_torch_fused'}, "
        "max_grad_norm 1.0, "
        f"random tokens; per variant its own process, {args.warmup} warm-up + median of {args.steps} steps",
        flush=True,
    )
    results = []
    for round_index in range(args.rounds):  # rounds interleave: A B A B, not A A B B
        for model in args.models:
            for variant in args.variants:
                result = dict(run_variant(model, variant, args), round=round_index)
                status = result.get("skipped") or result.get("error") or f"{result['step_ms']:.1f} ms/step"
                if "host_probe_us" in result:
                    status += f", host probe {result['host_probe_us']:.1f} µs"
                if "thread_cpu" in result:
                    status += f", {format_cpu(result['thread_cpu'])}"
                where = f"round {round_index + 1}/{args.rounds}, " if args.rounds > 1 else ""
                print(
                    f"  {model:9s} {variant:18s} {status}  ({where}process wall {result['wall_s']:.0f} s)",
                    flush=True,
                )
                results.append(result)
                if args.json:  # after every variant: a run cut short keeps what it measured
                    _write_results(args, env, results)
    if args.check_graph_breaks:
        print()
        for r in results:
            ours = r.get("hf_gns_log_records", [])
            print(
                f"{r['model']} {r['variant']}: {r.get('log_records', 0)} graph-break/recompile records, "
                f"{len(ours)} naming hf_gns; dynamo counters: graph breaks {r.get('dynamo_graph_breaks')}, "
                f"unique graphs {r.get('dynamo_unique_graphs')}"
            )
            for record in ours:
                print("  " + record.replace("\n", "\n  "))
    report(results, "GNSTrainer vs Trainer (ratio: tokens/s over the baseline variant, same model, same run)")


if __name__ == "__main__":
    main()
