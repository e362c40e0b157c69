"""Host (CPU) time per patched Linear / Conv1D call: what `targets="all"` adds to each layer.

Under `patch(model, targets="all")` every Linear and HF Conv1D runs `linear_with_sq_norms`, whose
backward also forms the per-example weight gradients and their norms. In eager training the
autograd engine launches that backward one op at a time, and where its host time exceeds the GPU
time queued ahead of it, the GPU waits (issue 11: the all-layer validation shape lost a third of
its throughput). This script measures host microseconds per forward+backward of one layer, called
as the model calls it (a module of a tiny HF model after two training forwards, so that its call
routing has settled), against the same module unpatched:

- GPT-2's `mlp.c_fc` (HF Conv1D, K → 4K, bias) and Llama's `mlp.up_proj` (nn.Linear, no bias);
- each by the simultaneous method (T ≥ the crossover: long sequences) unless `--seq` is short.

Modes, as `bench_norm_host.py`: CUDA (default; the GPU is kept busy with `torch.cuda._sleep`, so
launches only queue and the timer sees host work alone) and `--stub-launch` (CPU proxy: the Triton
path on CPU tensors with no-op kernel launches; the other ops run for real on the CPU, so the
proxy also counts their small-shape CPU arithmetic).

    PYTHONPATH=. python benchmarks/bench_linear_host.py                  # CUDA
    PYTHONPATH=. python benchmarks/bench_linear_host.py --stub-launch    # CPU proxy
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_norm_host import _host_us_per_call, install_stub_launch  # noqa: E402


def _patched_layer(kind: str, width: int, dtype: torch.dtype, device: torch.device, batch: int, seq: int):
    """(model, patched layer, model hook, unpatched copy of the layer): one MLP input projection of a
    tiny HF model patched with targets="all", after two training forwards (routing settled)."""
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
            num_hidden_layers=1, hidden_size=width, intermediate_size=4 * width,
            num_attention_heads=max(1, width // 64), vocab_size=128, max_position_embeddings=max(64, seq),
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    model = model.to(device, dtype)
    layer = model.transformer.h[0].mlp.c_fc if kind == "gpt2" else model.model.layers[0].mlp.up_proj
    unpatched = copy.deepcopy(layer)
    hf_gns.patch(model, targets="all")
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    for _ in range(2):
        model(ids).logits.float().sum().backward()
    hf_gns.zero_stats(model)
    model.zero_grad(set_to_none=True)
    return model, layer, model.__dict__[HOOK_ATTRIBUTE][0], unpatched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default 16 (CUDA), 2 (--stub-launch)")
    parser.add_argument("--seq", type=int, default=None, help="default 512 (CUDA), 32 (--stub-launch)")
    parser.add_argument("--width", type=int, default=None, help="default 768 (CUDA), 64 (--stub-launch)")
    parser.add_argument("--calls", type=int, default=None, help="calls per timed loop (40 CUDA, 100 stub)")
    parser.add_argument("--repeats", type=int, default=None, help="timed loops per row (5 CUDA, 15 stub)")
    parser.add_argument("--stub-launch", action="store_true", help="CPU proxy: no-op kernel launches")
    parser.add_argument("--profile", type=int, default=25, help="cProfile rows printed (0: no profile)")
    args = parser.parse_args()
    stub = args.stub_launch
    batch = args.batch or (2 if stub else 16)
    seq = args.seq or (32 if stub else 512)
    width = args.width or (64 if stub else 768)
    calls = args.calls or (100 if stub else 40)
    repeats = args.repeats or (15 if stub else 5)
    if stub:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # no intra-op thread pool: its wake-ups are noise at this size
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_linear_host.py: error: needs a CUDA GPU (or --stub-launch)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    layers = [(kind, *_patched_layer(kind, width, dtype, device, batch, seq)) for kind in ("gpt2", "llama")]
    if stub:  # after patching: patching probes the real ops
        install_stub_launch()
    x = torch.randn(batch, seq, width, device=device, dtype=dtype, requires_grad=True)
    rows = []
    for kind, model, layer, hook, unpatched in layers:
        dy = torch.randn_like(unpatched(x))

        def unpatched_fwdbwd(unpatched=unpatched, dy=dy):
            torch.autograd.backward(unpatched(x), dy)

        def patched_fwdbwd(layer=layer, hook=hook, dy=dy):
            hook.forward_index += 1  # what the model's pre-hook does once per forward
            torch.autograd.backward(layer(x), dy)

        def clear(model=model):
            import hf_gns

            hf_gns.zero_stats(model)

        rows.append((f"unpatched {kind} {type(layer).__name__} fwd+bwd", unpatched_fwdbwd, None))
        rows.append((f"patched {kind} {type(layer).__name__} fwd+bwd", patched_fwdbwd, clear))
    for _, step, between in rows:  # warm-up: compile kernels, fill caches
        for _ in range(3):
            step()
        if between is not None:
            between()
    methods = ", ".join(
        f"{kind}: {layer.__dict__['_hf_gns_state'].last_method}" for kind, _, layer, *_ in layers
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        where = torch.cuda.get_device_name()
    else:
        where = "CPU, kernel launches stubbed (--stub-launch)"
    print(f"host µs per call; x {tuple(x.shape)} {str(dtype).removeprefix('torch.')} on {where}; {methods}")
    measured = _host_us_per_call(rows, calls, device, repeats)
    print(f"  {'':<40s} {'median':>8s} {'min':>8s}  (µs, {repeats} interleaved loops of {calls} calls)")
    for name, (median, best) in measured.items():
        print(f"  {name:<40s} {median:8.1f} {best:8.1f}")
    print("patched vs unpatched, by median (by min):")
    names = list(measured)
    for unpatched_name, patched_name in zip(names[::2], names[1::2]):
        (ours_median, ours_min), (theirs_median, theirs_min) = (
            measured[patched_name],
            measured[unpatched_name],
        )
        print(
            f"  {patched_name:<40s} {ours_median / theirs_median:5.2f}x ({ours_min / theirs_min:.2f}x), "
            f"+{ours_median - theirs_median:.1f} µs (+{ours_min - theirs_min:.1f})"
        )

    if not args.profile:
        return
    _, step, between = rows[1]  # the patched GPT-2 Conv1D
    profiler = cProfile.Profile()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)
    profiler.enable()
    for _ in range(calls):
        step()
    profiler.disable()
    between()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
    print(f"\ncProfile of {calls} patched gpt2 Conv1D fwd+bwd calls (own time):")
    print(out.getvalue())


if __name__ == "__main__":
    main()
