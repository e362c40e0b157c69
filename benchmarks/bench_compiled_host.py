"""Host time to enqueue one compiled forward and one compiled backward: unpatched vs hf_gns-patched.

The compiled GNSTrainer step on the H200 (issue 11) spends only ~2 ms more GPU kernel time than
the compiled Trainer's (Llama-124M: 55.6 vs 53.6 ms a step) but runs 3-6 ms slower, with the GPU
busy 76% of the step against 90%: the gap is host time. In the profile the forward graph's own
Python (`## Call CompiledFxGraph`) took 19 ms a step against 7 ms. This benchmark isolates that:
the model compiled as `torch.compile(model)` (as the Trainer does), bf16 autocast, fp32
parameters, and for each step the host time of `compiled(**inputs)` and of `loss.backward()`
(no sync in between: the GPU runs behind, so these are the times to launch the graphs), then a
sync for the GPU time of the whole step. One process, `torch._dynamo.reset()` between variants.

Variants: `unpatched`, `norms` (`hf_gns.patch(model)`), `all` (`targets="all"`). With
`--wrappers DIR` the generated wrapper modules (the Python `call()` that launches every kernel
of a graph) are copied to DIR, to read what a patched graph runs per call. With `--cprofile N`
the forward launches of the measured steps (`prepare_sinks` and the compiled call) run under
cProfile, which prints the N functions with the most own time: on the H200 (2026-12-03) it showed
the 25 norm kernels of the patched Llama-124M forward launched through Triton's own launcher and
the graph's other kernels through Inductor's static one.

    PYTHONPATH=. python benchmarks/bench_compiled_host.py --model llama124
    PYTHONPATH=. python benchmarks/bench_compiled_host.py --model gpt2 --variants unpatched,norms
    PYTHONPATH=. python benchmarks/bench_compiled_host.py --cprofile 45   # + the launches' top functions
    PYTHONPATH=. python benchmarks/bench_compiled_host.py --tiny          # CPU smoke (fp32, no autocast)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("unpatched", "norms", "all")


def run_variant(variant: str, args, device) -> dict:
    """Per-step host ms of the compiled forward and backward, and the step's wall ms (synced)."""
    import torch
    from bench_trainer import MODELS, TINY_BATCH, TINY_SEQ, model_config
    from transformers import AutoModelForCausalLM

    import hf_gns
    from hf_gns.patching import prepare_sinks

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = model_config(args.model, args.tiny)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).train()
    if variant != "unpatched":
        hf_gns.patch(model, targets="all" if variant == "all" else "norms")
    batch, seq = (TINY_BATCH, TINY_SEQ) if args.tiny else (MODELS[args.model].batch, MODELS[args.model].seq)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inputs = {"input_ids": ids, "labels": ids}
    compiled = torch.compile(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    forward_ms, prepare_ms, backward_ms, step_ms = [], [], [], []
    profiler = cProfile.Profile() if args.cprofile else None
    for step in range(args.warmup + args.steps):
        sync()
        profiling = profiler is not None and step >= args.warmup
        if profiling:
            profiler.enable()
        start = time.perf_counter()
        if variant != "unpatched":
            prepare_sinks(compiled, inputs)  # as GNSTrainer.training_step does
        prepared = time.perf_counter()
        with autocast:
            loss = compiled(**inputs).loss
        launched = time.perf_counter()
        if profiling:
            profiler.disable()
        loss.backward()
        done = time.perf_counter()
        sync()
        end = time.perf_counter()
        if variant != "unpatched":
            hf_gns.zero_stats(model)
        model.zero_grad(set_to_none=True)
        if step >= args.warmup:
            forward_ms.append(1e3 * (launched - start))
            prepare_ms.append(1e3 * (prepared - start))
            backward_ms.append(1e3 * (done - launched))
            step_ms.append(1e3 * (end - start))
    median = statistics.median
    if profiler is not None:  # the forward launches' Python, by own time (cProfile slows it down)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.cprofile)
        print(f"=== cProfile of {variant}'s forward launches, {args.steps} steps ===\n{text.getvalue()}")
    return {
        "forward": median(forward_ms),
        "prepare": median(prepare_ms),
        "backward": median(backward_ms),
        "step": median(step_ms),
    }


# What a wrapper's `call()` does per call, by its generated lines: launches of generated or user
# Triton kernels (`name.run(`), of C++ kernels on CPU (`cpp_fused_...(`), extern (aten) kernels,
# and buffer allocations.
_CENSUS = {
    "kernels": re.compile(r"^\s+(?:\w+\.run|cpp_fused_\w+)\(", re.M),
    "extern": re.compile(r"^\s+(?:buf\w+ = )?extern_kernels\.\w+\(", re.M),
    "allocations": re.compile(r"empty_strided_\w+\("),
}


def wrapper_census(text: str) -> dict[str, int]:
    """Counts of kernel launches, extern kernel calls and allocations in a generated wrapper module."""
    return {what: len(pattern.findall(text)) for what, pattern in _CENSUS.items()}


def copy_wrappers(cache_dir: str, destination: str, variant: str) -> list[tuple[str, dict]]:
    """Copy Inductor's generated wrapper modules (those defining `call(args)`) under `destination`;
    returns each copy's name and census."""
    os.makedirs(destination, exist_ok=True)
    copied = []
    for root, _, files in os.walk(cache_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.endswith(".py"):
                continue
            with open(path, errors="replace") as f:
                text = f.read()
            if "def call(" in text:
                target = f"{variant}_{len(copied)}_{name}"
                shutil.copy(path, os.path.join(destination, target))
                copied.append((target, wrapper_census(text)))
    return copied


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama124", choices=("gpt2", "llama124", "llama850"))
    parser.add_argument("--variants", default="unpatched,norms")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, fp32 (smoke test)")
    parser.add_argument("--wrappers", default="", help="copy the generated wrapper modules to this folder")
    parser.add_argument(
        "--cprofile", type=int, default=0, metavar="N",
        help="also print the N functions with the most own time in the measured forward launches (cProfile)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

    import torch
    from _timing import environment_info, format_environment, require_device

    device = require_device("cpu" if args.tiny else "cuda")
    print(format_environment(environment_info(device)))
    rows, failed = {}, []
    for variant in variants:
        # a fresh Inductor cache per variant: its wrappers are then the ones this variant compiled
        cache = tempfile.mkdtemp(prefix=f"hf_gns_inductor_{variant}_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            rows[variant] = run_variant(variant, args, device)
            row = rows[variant]  # printed now too: a later variant may not finish in time
            print(
                f"  {variant}: forward {row['forward']:.2f} ms (prepare_sinks {row['prepare']:.2f}), "
                f"backward {row['backward']:.2f} ms, "
                f"step {row['step']:.2f} ms (synced)",
                flush=True,
            )
        except Exception as error:  # one failing variant still leaves the others' rows
            print(f"  {variant}: FAILED ({type(error).__name__}: {error})", flush=True)
            failed.append(variant)
            continue
        if args.wrappers:
            copied = copy_wrappers(cache, args.wrappers, variant)
            print(f"  {variant}: {len(copied)} wrapper modules copied to {args.wrappers}")
            for name, census in copied:
                print(f"    {name[:40]}  " + ", ".join(f"{n} {what}" for what, n in census.items()))
        torch._dynamo.reset()
        shutil.rmtree(cache, ignore_errors=True)  # ~3 MB a variant, left in /tmp before
    base = rows.get("unpatched")
    how = f"median of {args.steps} steps after {args.warmup}"
    print(f"\n{args.model}: host ms to launch the compiled graphs ({how})")
    print("(forward: prepare_sinks, as GNSTrainer calls it, then the compiled model's call)")
    header = f"{'variant':<10} {'forward':>9} {'backward':>9} {'step (synced)':>14}"
    print(f"{header} {'fwd vs base':>12} {'bwd vs base':>12}")
    for variant, row in rows.items():
        extra = ["", ""]
        if base is not None and variant != "unpatched":
            extra = [f"{row[k] - base[k]:+12.2f}" for k in ("forward", "backward")]
        print(
            f"{variant:<10} {row['forward']:9.2f} {row['backward']:9.2f} {row['step']:14.2f} "
            f"{extra[0]:>12} {extra[1]:>12}"
        )
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
