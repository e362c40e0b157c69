"""GNSTrainer's extra HOST time per optimizer step, on CPU: what the Trainer loop pays for hf_gns.

On a GPU the eager Trainer step syncs once per micro-batch (HF's `logging_nan_inf_filter`
reads the loss), so host work done after the sync (the GNS read, the guard, clipping,
the optimizer's launches, the next forward's first launches) is exposed as wall time.
This script counts that host work on a CPU, where it can be measured in isolation: a
model so small that its arithmetic is negligible, one intra-op thread, and per-step
CPU time of the training thread (`time.thread_time`, which other processes on a busy
machine disturb much less than wall time).

Variants, each trained in this process on the same model and data (same seed):

    trainer          plain `transformers.Trainer`, unpatched model
    trainer-patched  plain `Trainer` on a `hf_gns.patch`ed model (`zero_stats` at each step end):
                     the patched layers' own cost (the fused op's CPU reference, sinks, hooks)
    gns-norms        `hf_gns.GNSTrainer`, `gns_track="norms"`
    gns-all          `hf_gns.GNSTrainer`, `gns_track="all"`

"GNSTrainer extra" = gns-norms − trainer-patched: the trainer-side cost (the per-step read,
the guard, the batch-control mixin, `training_step`), which runs the same on any device.
gns − trainer also contains the patched ops' CPU reference arithmetic, which a GPU replaces
by the Triton kernels (see bench_trainer.py for those).

    python benchmarks/bench_trainer_host.py                            # GPT-2 config, 12 layers: 25 norms
    python benchmarks/bench_trainer_host.py --profile gns-norms        # + cProfile of the hf_gns functions
    python benchmarks/bench_trainer_host.py --breakdown --rounds 1     # + GNSTrainer's own entry points timed
    python benchmarks/bench_trainer_host.py --model llama --variants trainer,trainer-patched,gns-norms
    python benchmarks/bench_trainer_host.py --compile --model llama   # torch_compile=True (Inductor on CPU)

With `--compile` the CPU graphs run the norms' PyTorch reference (Inductor's C++ kernels), not
the Triton kernels: what it shows is the host work around the graphs (guards, frames, sinks, the
per-step read), not the compiled launches of a GPU step. Thread-time differences under ~0.5 ms
are within this benchmark's noise on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

VARIANTS = ("trainer", "trainer-patched", "gns-norms", "gns-all")


def model_config(name: str, layers: int):
    from transformers import GPT2Config, LlamaConfig

    if name == "gpt2":  # 2 LayerNorms per block + ln_f: 2·layers + 1 norms
        return GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


_TIMERS: dict[str, list] = {}  # name -> [thread ns, calls], filled while _TIMING[0] is set
_TIMING = [False]


def _timed(name: str, function):
    """`function` wrapped to add its thread CPU time to `_TIMERS[name]` after warm-up."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not _TIMING[0]:
            return function(*args, **kwargs)
        start = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            entry = _TIMERS.setdefault(name, [0, 0])
            entry[0] += time.thread_time_ns() - start
            entry[1] += 1

    return wrapper


def install_timers() -> None:
    """Time GNSTrainer's own entry points and the Trainer methods they extend, so that each
    override's extra cost is (its time − the parent's time); and the per-forward / per-backward
    hooks. Everything GNSTrainer adds to a step runs under one of these."""
    import transformers

    from hf_gns.patching import model_hook, sinks
    from hf_gns.trainer import batching, measurement

    pairs = [
        (measurement.GNSMixin, "training_step"),
        (transformers.Trainer, "training_step"),
        (measurement.GNSMixin, "_clip_grad_norm"),
        (transformers.Trainer, "_clip_grad_norm"),
        (measurement.GNSMixin, "_get_grad_norm"),
        (transformers.Trainer, "_get_grad_norm"),
        (measurement.GNSMixin, "log"),
        (transformers.Trainer, "log"),
        (batching.BatchSizeControlMixin, "get_batch_samples"),
        (transformers.Trainer, "get_batch_samples"),
        (batching.BatchSizeControlMixin, "floating_point_ops"),
        (transformers.Trainer, "floating_point_ops"),
        (batching.BatchSizeControlMixin, "_track_num_input_tokens"),
        (transformers.Trainer, "_track_num_input_tokens"),
        (measurement.GNSMixin, "_read_gns_statistics"),
        (measurement.GNSMixin, "_gns_check_statistics"),
        (measurement.GNSMixin, "_gns_local_statistics"),
        (measurement.GNSMixin, "_gns_update_estimators"),
        (model_hook.ModelForwardHook, "__call__"),
        (sinks.SquaredNormSinks, "_collect"),
    ]
    for owner, name in pairs:
        setattr(owner, name, _timed(f"{owner.__name__}.{name}", getattr(owner, name)))


def print_breakdown(steps: int) -> float:
    """Per-step µs of each timed function, and GNSTrainer's extra host time; returns it in ms."""

    def us(name: str) -> float:
        return _TIMERS.get(name, [0, 0])[0] / 1e3 / steps

    print(
        f"\n=== GNSTrainer host time per optimizer step, by entry point (µs, thread CPU time, {steps} steps)"
    )
    extra = 0.0
    for method in ("training_step", "_clip_grad_norm", "_get_grad_norm", "log"):
        own = us(f"GNSMixin.{method}") - us(f"Trainer.{method}")
        extra += own
        print(f"  GNSMixin.{method:<24} {own:8.1f}   (incl. the Trainer's: {us(f'GNSMixin.{method}'):.1f})")
    for method in ("get_batch_samples", "floating_point_ops", "_track_num_input_tokens"):
        own = us(f"BatchSizeControlMixin.{method}") - us(f"Trainer.{method}")
        extra += own
        print(f"  BatchSizeControlMixin.{method:<13} {own:8.1f}   (batch control off)")
    for name in ("ModelForwardHook.__call__", "SquaredNormSinks._collect"):
        extra += us(name)
        calls = _TIMERS.get(name, [0, 0])[1] / steps
        print(f"  {name:<37} {us(name):8.1f}   ({calls:.0f} calls a step)")
    read = us("GNSMixin._read_gns_statistics")
    parts = ("_gns_check_statistics", "_gns_local_statistics", "_gns_update_estimators")
    details = ", ".join(f"{name.removeprefix('_gns_')} {us(f'GNSMixin.{name}'):.1f}" for name in parts)
    print(f"  of which the per-step read (_read_gns_statistics): {read:.1f} ({details})")
    print(f"GNSTrainer extra host time per optimizer step: {extra / 1e3:.3f} ms (the patched ops aside)")
    return extra / 1e3


def run_variant(variant: str, args, profile: bool) -> dict:
    """Train one variant; returns per-step thread-CPU and wall ms of the measured steps."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    import hf_gns

    if args.compile:  # one process runs every variant: earlier models' cache entries would be looked up too
        torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config(args.model, args.layers), attn_implementation="sdpa"
    )
    total = args.warmup + args.steps
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (total * args.batch, args.seq), generator=generator)
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_host_"),
        per_device_train_batch_size=args.batch,
        max_steps=total,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=True,
        torch_compile=args.compile,
    )
    profiler = cProfile.Profile() if profile else None

    class StepClock(TrainerCallback):
        def __init__(self):
            self.thread, self.wall = [], []

        def on_step_end(self, _args, state, control, **kwargs):
            self.thread.append(time.thread_time())
            self.wall.append(time.perf_counter())
            if state.global_step == args.warmup:
                _TIMING[0] = True
                if profiler is not None:
                    profiler.enable()
            if state.global_step == total:
                _TIMING[0] = False
                if profiler is not None:
                    profiler.disable()

    class ZeroStats(TrainerCallback):  # what GNSTrainer does once per step, for the patched baseline
        def on_step_end(self, _args, state, control, **kwargs):
            hf_gns.zero_stats(model)

    clock = StepClock()
    callbacks = [clock]
    if variant.startswith("gns"):
        train_args = hf_gns.GNSTrainingArguments(
            **common, gns_track="all" if variant == "gns-all" else "norms"
        )
        trainer = hf_gns.GNSTrainer(model=model, args=train_args, train_dataset=dataset, callbacks=callbacks)
    else:
        if variant == "trainer-patched":
            hf_gns.patch(model)
            callbacks.append(ZeroStats())
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=callbacks
        )
    trainer.remove_callback(PrinterCallback)  # the logs would be printed every 10 steps
    trainer.train()
    n_norms = sum(1 for m in model.modules() if "Norm" in type(m).__name__)
    thread = [1e3 * (b - a) for a, b in zip(clock.thread[args.warmup - 1 :], clock.thread[args.warmup :])]
    wall = [1e3 * (b - a) for a, b in zip(clock.wall[args.warmup - 1 :], clock.wall[args.warmup :])]
    return {"thread_ms": thread, "wall_ms": wall, "profiler": profiler, "norms": n_norms}


def print_profile(variant: str, profiler: cProfile.Profile, steps: int, rows: int) -> None:
    """Functions of hf_gns (and the Trainer methods it overrides) by cumulative time per step."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    entries = []
    for (filename, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        if "hf_gns" in filename or name in ("get_batch_samples", "floating_point_ops", "training_step"):
            short = (
                filename[filename.find("hf_gns") :] if "hf_gns" in filename else os.path.basename(filename)
            )
            entries.append((cumtime, tottime, calls, f"{short}:{line}({name})"))
    entries.sort(reverse=True)
    print(f"\n=== cProfile {variant}: per optimizer step (cProfile's own overhead inflates these) ===")
    print(f"{'cum ms/step':>12} {'self ms/step':>13} {'calls/step':>11}  function")
    for cum, tot, calls, where in entries[:rows]:
        print(f"{1e3 * cum / steps:12.3f} {1e3 * tot / steps:13.3f} {calls / steps:11.1f}  {where}")


def _low(values: list[float]) -> float:
    """The 25th percentile: a step's own cost, above the interference a busy machine adds."""
    return sorted(values)[len(values) // 4]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gpt2", choices=("gpt2", "llama"))
    parser.add_argument(
        "--layers", type=int, default=12, help="transformer blocks (GPT-2: 2·layers + 1 norms)"
    )
    parser.add_argument("--variants", default="trainer,trainer-patched,gns-norms")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60, help="measured steps per run (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every variant, interleaved (min of medians)"
    )
    parser.add_argument(
        "--profile", default="", help="comma-separated variants to cProfile (one extra run each)"
    )
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument(
        "--compile", action="store_true", help="torch_compile=True for every variant (compiled graphs on CPU)"
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time GNSTrainer's entry points in a gns-norms run: its extra host ms per step, by part",
    )
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    import torch
    import transformers

    torch.set_num_threads(1)  # host work of one thread; the model's arithmetic is negligible
    transformers.logging.set_verbosity_error()
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in variants:
            result = run_variant(variant, args, profile=False)
            thread, wall = _low(result["thread_ms"]), _low(result["wall_ms"])
            previous = best.get(variant)
            if previous is None or thread < previous["thread"]:
                best[variant] = {"thread": thread, "wall": wall, "norms": result["norms"]}
    if variants:  # (--variants '' with --breakdown: only the breakdown)
        versions = f"python {sys.version.split()[0]}  torch {torch.__version__}"
        versions += f"  transformers {transformers.__version__}"
        shape = f"{args.model} {args.layers} layers ({best[variants[0]]['norms']} norms)"
        shape += f", B={args.batch} T={args.seq}"
        how = f"25th percentile of {args.steps} steps after {args.warmup}, best of {args.rounds} rounds"
        print(f"{versions}; {shape}, 1 thread; {how}")
        print(
            f"{'variant':<16} {'CPU ms/step':>12} {'wall ms/step':>13} {'vs trainer':>11} {'vs patched':>11}"
        )
        for variant in variants:
            row = best[variant]
            cells = []
            for base in ("trainer", "trainer-patched"):
                ok = (
                    base in best
                    and variant != base
                    and not (base == "trainer-patched" and variant == "trainer")
                )
                cells.append(f"{row['thread'] - best[base]['thread']:+11.3f}" if ok else f"{'':>11}")
            print(f"{variant:<16} {row['thread']:12.3f} {row['wall']:13.3f} {cells[0]} {cells[1]}")
        if "trainer-patched" in best:
            for variant in ("gns-norms", "gns-all"):
                if variant in best:
                    extra = best[variant]["thread"] - best["trainer-patched"]["thread"]
                    what = f"GNSTrainer extra host time per optimizer step ({variant} - trainer-patched)"
                    print(f"{what}: {extra:.3f} ms")
    if args.breakdown:
        install_timers()
        run_variant("gns-norms", args, profile=False)
        print_breakdown(args.steps)
    for variant in [v for v in args.profile.split(",") if v]:
        result = run_variant(variant, args, profile=True)
        print_profile(variant, result["profiler"], args.steps, args.profile_rows)


if __name__ == "__main__":
    main()
