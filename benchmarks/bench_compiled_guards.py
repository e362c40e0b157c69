"""Dynamo's guard check on a compiled model's forward frame, unpatched against hf_gns-patched.

Every call of a `torch.compile(model)` first checks the guards of the cached graph: each patched
norm adds its state's attributes, its sink tensor and its bound forward (about 88 lines of
`TORCH_LOGS=guards` output a norm before `c28e597`: 1221 against 1663 lines for a 2-layer tiny
Llama; 1530 since, the compiled forward reading no shared spec or model hook). This
times the check without a profiler: the model compiled as the Trainer does, a few training
steps, then after each further real step (forward, backward, hf_gns's `zero_stats` and
`prepare_sinks`: what changes the guarded objects, and what leaves the caches cold, between two
calls) one call of the frame's guard manager on the frame's locals as the next call binds them.

Only the top-level frame is timed: for a model compiled whole (Llama: one graph) that holds every
norm's guards; for a model with graph breaks (GPT-2: 4 breaks, 3 graphs) the norms are guarded in
the frames after the breaks, which this does not time (GPT-2's top frame reads the same with and
without hf_gns).

    PYTHONPATH=. python benchmarks/bench_compiled_guards.py                       # tiny 12-layer Llama, CPU
    PYTHONPATH=. python benchmarks/bench_compiled_guards.py --model gpt2 --layers 12
    PYTHONPATH=. python benchmarks/bench_compiled_guards.py --layers 2     # 1221 against 1663 log lines
    PYTHONPATH=. python benchmarks/bench_compiled_guards.py --targets all  # every layer patched

The table also gives the lines of `TORCH_LOGS=guards` output each compilation printed (all frames).

CPU machine of the project (2026-12-03, torch 2.13, tiny Llama, median of 30 steps, one process
per line): 12 layers (25 norms) 913 and 568 µs unpatched, 1350 and 1357 µs patched; 8 layers 811
against 1303 µs; 4 layers 532 against 515 µs. Not linear in the norms: the first check after a
step runs with cold caches (~0.4 µs a guard node; the same check repeated at once takes a quarter
of that), so past some size every node misses. On the H200 the compiled Llama-124M step's
`TorchDynamo Cache Lookup` took 0.81 against 0.26 ms (profiler on, 2026-12-03): a part of that
model's compiled gap, and fewer guard nodes per patched norm the way to close it. Since `c28e597`
(`compiled_norm_forward`), three runs each: 3081 lines unpatched, 4763 before and 4230 after; the
check +490 to +955 µs over unpatched before, +547 to +561 µs after. `--targets all` (every layer
patched) printed 8781 lines; a short compiled path for Linears like the norms' (no model-hook
identity guard per layer: 7933 lines) timed the same in four interleaved runs each (2265-2516
against 2292-2566 µs): past some size the check's cost follows its cold caches more than the
Python guards among its nodes, so that change was not kept.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time


def tiny_model(arch: str, layers: int):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
    else:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True,
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def forward_frame_locals(model, inputs: dict) -> tuple[object, dict]:
    """The code object Dynamo caches the model's forward under, and the frame locals its guards
    read at a call `model(**inputs)`: the class forward's parameters bound as that call binds them
    (transformers wraps `forward` in decorators taking `*args, **kwargs`) and its closure cells."""
    import inspect

    forward = type(model).forward
    code = forward.__code__
    bound = inspect.signature(forward, follow_wrapped=False).bind(model, **inputs)
    bound.apply_defaults()
    frame = dict(bound.arguments)
    frame.update(zip(code.co_freevars, (cell.cell_contents for cell in forward.__closure__ or ())))
    return code, frame


class _LineCounter(logging.Handler):
    """Counts the lines of the records it sees (Dynamo's guard printout: a line per guard or accessor)."""

    def __init__(self):
        super().__init__()
        self.lines = 0

    def emit(self, record):
        self.lines += record.getMessage().count("\n") + 1


def guard_check_us(targets: str | None, arch: str, layers: int, warmup: int, steps: int) -> tuple[float, int]:
    """Median µs of one guard check of the compiled forward frame after each real training step, and
    the lines of `TORCH_LOGS=guards` output the compilation printed (every frame's guards); `targets`:
    `patch`'s (None: unpatched)."""
    import torch

    import hf_gns
    from hf_gns.patching import prepare_sinks

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model(arch, layers)
    patched = targets is not None
    if patched:
        hf_gns.patch(model, targets=targets)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    inputs = {"input_ids": ids, "labels": ids}
    compiled = torch.compile(model)
    counter = _LineCounter()
    guard_log = logging.getLogger("torch._dynamo.guards.__guards")  # Dynamo's guards artifact log
    torch._logging.set_logs(guards=True)
    guard_log.addHandler(counter)

    def step():
        if patched:
            prepare_sinks(compiled, inputs)  # as GNSTrainer.training_step does
        compiled(**inputs).loss.backward()
        if patched:
            hf_gns.zero_stats(model)
        model.zero_grad(set_to_none=True)

    try:
        for _ in range(warmup):
            step()
    finally:
        guard_log.removeHandler(counter)
        torch._logging.set_logs()
    code, frame = forward_frame_locals(model, inputs)
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(code)
    if len(entries) != 1:
        raise RuntimeError(f"expected one compiled graph for {code.co_name}, found {len(entries)}")
    guards = entries[0].guard_manager
    times = []
    for _ in range(steps):
        step()
        if patched:
            prepare_sinks(compiled, inputs)
        start = time.perf_counter()
        passed = guards.check(frame)
        times.append(time.perf_counter() - start)
        if not passed:
            print(guards.check_verbose(frame))
            raise RuntimeError("the guards fail on the rebuilt frame locals: not the check a call makes")
    return 1e6 * statistics.median(times), counter.lines


def main(argv=None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", default="llama", choices=("llama", "gpt2"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--targets", default="norms", choices=("norms", "all"), help="what `patch` tracks")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    rows = {}
    for variant in ("unpatched", args.targets):
        targets = None if variant == "unpatched" else variant
        rows[variant] = guard_check_us(targets, args.model, args.layers, args.warmup, args.steps)
        print(f"  {variant}: {rows[variant][0]:.1f} µs, {rows[variant][1]} guard log lines", flush=True)
    what = f"{args.model}, {args.layers} layers"
    print(f"\n{what}: guard check of the compiled forward frame, median of {args.steps} steps")
    print(f"{'variant':10s} {'µs':>7s} {'vs unpatched':>13s} {'guard log lines':>16s}")
    for variant, (us, lines) in rows.items():
        print(f"{variant:10s} {us:7.1f} {us - rows['unpatched'][0]:+13.1f} {lines:16d}")


if __name__ == "__main__":
    main()
