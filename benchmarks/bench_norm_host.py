"""Host (CPU) time per norm call: where eager GNSTrainer's norm layers spend Python.

In the eager Trainer loop the backward is launched by the autograd engine one op at a time;
when an op's host time exceeds the GPU time of the ops queued before it, the GPU waits.
The H200 profile of issue 11 showed hf_gns's fused norm at ~3x a PyTorch op's host time per
call. This script measures host microseconds per call:

- `F.layer_norm` / `F.rms_norm` forward and forward+backward (the baseline);
- `hf_gns.kernels.fused_norm` with a sink, forward and forward+backward, and with a collector
  (the eager route of patched norms: no sink leaf);
- a patched HF norm module (GPT-2's LayerNorm, Llama's RMSNorm) called as the model calls it
  (after two model forwards, so that its call routing has settled as in training), and the same
  module unpatched (what the plain Trainer runs: LlamaRMSNorm is ~8 aten ops each way);
and prints a cProfile of the fused forward+backward loop (top functions by own time).

Two modes:
- CUDA (default): the GPU is kept busy (`torch.cuda._sleep`), so launches only queue and the
  timer sees host work alone.
- `--stub-launch` (CPU, a proxy for machines without a GPU): hf_gns runs its Triton path on
  CPU tensors with only the final compiled-kernel launch replaced by a no-op (the first launch
  of each plan, which compiles, returns a stub); everything else is real: the autograd
  Function, allocations, argument checks, plan lookups, sinks, the patched module forward.
  The baselines are `F.layer_norm`/`F.rms_norm` on CPU tensors of the same (small) shape.
  The proxy leaves out the C launch of three kernels per fwd+bwd (~5-10 µs each on a GPU
  host), the CUDA caching allocator's cost over the CPU one, and the autograd engine's hand-
  over to its CUDA device thread (which the baselines pay too).

    PYTHONPATH=. python benchmarks/bench_norm_host.py                  # CUDA
    PYTHONPATH=. python benchmarks/bench_norm_host.py --stub-launch    # CPU proxy
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from hf_gns.kernels import fused_norm, new_sq_norm_sink


class _StubCompiled:
    """What the stub "compiler" returns: a compiled kernel whose launch does nothing."""

    function, packed_metadata = None, None

    def run(self, *args):
        pass

    def launch_metadata(self, *args):
        return None


def install_stub_launch() -> None:
    """Make the Triton launchers run on CPU tensors with a no-op launch (see the module docstring)."""
    from hf_gns.kernels import norm_op, norm_triton

    norm_op.set_backend("triton")
    norm_triton.DIRECT_LAUNCH_DEVICES.add("cpu")
    norm_triton._compile = lambda kernel, grid, args, constexprs, num_warps: _StubCompiled()
    if not hasattr(torch._C, "_cuda_getCurrentRawStream"):  # a CPU-only torch
        torch._C._cuda_getCurrentRawStream = lambda device: 0
        torch._C._cuda_getDevice = lambda: 0


def _host_us_per_call(rows, calls: int, device: torch.device, repeats: int) -> dict[str, tuple[float, float]]:
    """Host µs per call of each row's `step()`: (median, min) over `repeats` loops of `calls` calls,
    the rows interleaved (so a load change on a shared machine hits them alike); on CUDA while the
    GPU sleeps (launches only queue). On CPU (`--stub-launch`) the clock is this thread's CPU time:
    the autograd engine runs a CPU backward on the calling thread, and time spent preempted by
    other processes on a shared machine does not count."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(repeats):
        for name, step, between in rows:
            if between is not None:
                between()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU busy at ~2 GHz: the queue never drains
            start = clock()
            for _ in range(calls):
                step()
            times[name].append((clock() - start) / calls * 1e6)
            if device.type == "cuda":
                torch.cuda.synchronize()
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def measure_rows(rows, calls: int, device: torch.device, repeats: int, describe: str, width: int) -> dict:
    """Warm every row up (compile kernels, fill caches), print a header (`describe`, then the device)
    and each row's host µs per call (median, min); returns `_host_us_per_call`'s result."""
    for _, step, between in rows:
        for _ in range(3):
            step()
        if between is not None:
            between()
    if device.type == "cuda":
        torch.cuda.synchronize()
        where = torch.cuda.get_device_name()
    else:
        where = "CPU, kernel launches stubbed (--stub-launch)"
    print(describe.format(where=where))
    measured = _host_us_per_call(rows, calls, device, repeats)
    print(f"  {'':<{width}s} {'median':>8s} {'min':>8s}  (µs, {repeats} interleaved loops of {calls} calls)")
    for name, (median, best) in measured.items():
        print(f"  {name:<{width}s} {median:8.1f} {best:8.1f}")
    return measured


def print_host_profile(step, calls: int, device: torch.device, rows: int, label: str, after=None) -> None:
    """cProfile of `calls` calls of `step()` (on CUDA while the GPU sleeps), top `rows` by own time;
    `after()` (e.g. clearing the statistics) runs once the profile is off."""
    profiler = cProfile.Profile()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    if after is not None:
        after()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(rows)
    print(f"\ncProfile of {calls} {label} calls (own time):")
    print(out.getvalue())


def host_bench_setup(
    description: str, script: str, *, seq: tuple[int, int], calls: tuple[int, int], profile: int
):
    """The host benchmarks' shared command line and device: `(args, device, dtype)`, with every size
    resolved to its default, (CUDA, --stub-launch) pairs for `seq` and `calls`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=None, help="default 16 (CUDA), 2 (--stub-launch)")
    parser.add_argument(
        "--seq", type=int, default=None, help=f"default {seq[0]} (CUDA), {seq[1]} (--stub-launch)"
    )
    parser.add_argument("--width", type=int, default=None, help="default 768 (CUDA), 64 (--stub-launch)")
    parser.add_argument(
        "--calls", type=int, default=None, help=f"calls per timed loop ({calls[0]} CUDA, {calls[1]} stub)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed loops per row (5 CUDA, 15 stub)")
    parser.add_argument("--stub-launch", action="store_true", help="CPU proxy: no-op kernel launches")
    parser.add_argument("--profile", type=int, default=profile, help="cProfile rows printed (0: no profile)")
    args = parser.parse_args()
    stub = int(args.stub_launch)  # index of the --stub-launch default in each pair
    args.batch = args.batch or (16, 2)[stub]
    args.seq = args.seq or seq[stub]
    args.width = args.width or (768, 64)[stub]
    args.calls = args.calls or calls[stub]
    args.repeats = args.repeats or (5, 15)[stub]
    if stub:
        torch.set_num_threads(1)  # no intra-op thread pool: its wake-ups are noise at this size
        return args, torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise SystemExit(f"{script}: error: needs a CUDA GPU (or --stub-launch)")
    return args, torch.device("cuda"), torch.bfloat16


def patched_tiny_model(
    kind: str, width: int, dtype, device, batch: int, seq: int, *, targets: str, intermediate: int, layer_of
):
    """`(model, layer, hook, unpatched)`: a one-layer GPT-2 (`kind="gpt2"`) or Llama built from a
    config, its module `layer_of(model)` and an unpatched copy of it taken first, the model patched by
    hf_gns with `targets` after two training forwards of (batch, seq) tokens (its call routing settles
    on the single-call path), gradients and statistics zeroed, and its model hook."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    import hf_gns
    from hf_gns.patching.model_hook import HOOK_ATTRIBUTE

    if kind == "gpt2":
        config = GPT2Config(
            n_layer=1, n_embd=width, n_head=max(1, width // 64), vocab_size=128, n_positions=max(64, seq),
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            num_hidden_layers=1, hidden_size=width, intermediate_size=intermediate,
            num_attention_heads=max(1, width // 64), vocab_size=128, max_position_embeddings=max(64, seq),
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    model = model.to(device, dtype)
    layer = layer_of(model)
    unpatched = copy.deepcopy(layer)
    hf_gns.patch(model, targets=targets)
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    for _ in range(2):
        model(ids).logits.float().sum().backward()
    hf_gns.zero_stats(model)
    model.zero_grad(set_to_none=True)
    return model, layer, model.__dict__[HOOK_ATTRIBUTE][0], unpatched


def _final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def main() -> None:
    args, device, dtype = host_bench_setup(
        __doc__.splitlines()[0], "bench_norm_host.py", seq=(1024, 16), calls=(60, 200), profile=30
    )
    stub, batch, seq, width, calls = args.stub_launch, args.batch, args.seq, args.width, args.calls
    shape = (batch, seq, width)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(width, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(width, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device=device, dtype=dtype)
    patched = []
    for kind in ("gpt2", "llama"):  # patched (and routed) before the stub: patching probes the real op
        try:
            patched.append(
                (kind, *patched_tiny_model(
                    kind, width, dtype, device, batch, min(seq, 8), targets="norms", intermediate=2 * width,
                    layer_of=_final_norm,
                ))
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a benchmark row, not the product
            print(f"patched {kind} norm: not measured ({type(error).__name__}: {error})")
    if stub:
        install_stub_launch()

    def torch_ln_fwd():
        return F.layer_norm(x, (width,), w, b, 1e-5)

    def torch_ln_fwdbwd():
        torch.autograd.backward(F.layer_norm(x, (width,), w, b, 1e-5), dy)

    def torch_rms_fwdbwd():
        torch.autograd.backward(F.rms_norm(x, (width,), w, 1e-6), dy)

    def hf_ln_fwd():
        return fused_norm(x, w, b, 1e-5, sq_norm_sink=new_sq_norm_sink(x))

    def hf_ln_fwdbwd():
        torch.autograd.backward(fused_norm(x, w, b, 1e-5, sq_norm_sink=new_sq_norm_sink(x)), dy)

    def hf_rms_fwdbwd():
        torch.autograd.backward(fused_norm(x, w, None, 1e-6, rms=True, sq_norm_sink=new_sq_norm_sink(x)), dy)

    collected = []  # the eager route of patched norms: backward hands the norms to a collector

    def hf_ln_fwdbwd_collector():
        torch.autograd.backward(fused_norm(x, w, b, 1e-5, sq_norm_collector=collected.append), dy)

    def hf_rms_fwdbwd_collector():
        y = fused_norm(x, w, None, 1e-6, rms=True, sq_norm_collector=collected.append)
        torch.autograd.backward(y, dy)

    rows = [
        ("F.layer_norm fwd", torch_ln_fwd, None),
        ("F.layer_norm fwd+bwd", torch_ln_fwdbwd, None),
        ("F.rms_norm fwd+bwd", torch_rms_fwdbwd, None),
        ("hf_gns fused_norm LN fwd (sink)", hf_ln_fwd, None),
        ("hf_gns fused_norm LN fwd+bwd (sink)", hf_ln_fwdbwd, None),
        ("hf_gns fused_norm RMS fwd+bwd (sink)", hf_rms_fwdbwd, None),
        ("hf_gns fused_norm LN fwd+bwd (collector)", hf_ln_fwdbwd_collector, collected.clear),
        ("hf_gns fused_norm RMS fwd+bwd (collector)", hf_rms_fwdbwd_collector, collected.clear),
    ]
    for kind, model, norm, hook, unpatched in patched:

        def unpatched_fwdbwd(unpatched=unpatched):
            torch.autograd.backward(unpatched(x), dy)

        rows.append((f"unpatched {kind} norm module fwd+bwd", unpatched_fwdbwd, None))

        def patched_fwdbwd(norm=norm, hook=hook):
            hook.forward_index += 1  # what the model's pre-hook does once per forward
            torch.autograd.backward(norm(x), dy)

        def clear(model=model):
            import hf_gns

            hf_gns.zero_stats(model)

        rows.append((f"patched {kind} norm module fwd+bwd", patched_fwdbwd, clear))
    describe = f"host µs per call; x {tuple(shape)} {str(dtype).removeprefix('torch.')} on {{where}}"
    measured = measure_rows(rows, calls, device, args.repeats, describe, width=42)
    ratios = (
        ("hf_gns fused_norm LN fwd+bwd (sink)", "F.layer_norm fwd+bwd"),
        ("hf_gns fused_norm RMS fwd+bwd (sink)", "F.rms_norm fwd+bwd"),
        ("hf_gns fused_norm LN fwd+bwd (collector)", "F.layer_norm fwd+bwd"),
        ("hf_gns fused_norm RMS fwd+bwd (collector)", "F.rms_norm fwd+bwd"),
        ("patched gpt2 norm module fwd+bwd", "F.layer_norm fwd+bwd"),
        ("patched llama norm module fwd+bwd", "F.rms_norm fwd+bwd"),
        ("patched gpt2 norm module fwd+bwd", "unpatched gpt2 norm module fwd+bwd"),
        ("patched llama norm module fwd+bwd", "unpatched llama norm module fwd+bwd"),
    )
    print("ratios, by median (by min); target <= 1.3x of PyTorch's op:")
    for ours, theirs in ratios:
        if ours in measured:
            by_median = measured[ours][0] / measured[theirs][0]
            by_min = measured[ours][1] / measured[theirs][1]
            print(f"  {ours:<42s} {by_median:6.2f}x ({by_min:.2f}x) {theirs}")

    if not args.profile:
        return
    print_host_profile(hf_ln_fwdbwd, calls, device, args.profile, "hf_gns LN fwd+bwd")


if __name__ == "__main__":
    main()
