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

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_norm_host import (  # noqa: E402
    host_bench_setup,
    install_stub_launch,
    measure_rows,
    patched_tiny_model,
    print_host_profile,
)


def _mlp_input_projection(model):
    """GPT-2's `c_fc` (Conv1D) or Llama's `up_proj` (Linear) of the first block."""
    return (
        model.transformer.h[0].mlp.c_fc
        if hasattr(model, "transformer")
        else model.model.layers[0].mlp.up_proj
    )


def main() -> None:
    args, device, dtype = host_bench_setup(
        __doc__.splitlines()[0], "bench_linear_host.py", seq=(512, 32), calls=(40, 100), profile=25
    )
    stub, batch, seq, width, calls, repeats = (
        args.stub_launch,
        args.batch,
        args.seq,
        args.width,
        args.calls,
        args.repeats,
    )
    layers = [
        (kind, *patched_tiny_model(
            kind, width, dtype, device, batch, seq, targets="all", intermediate=4 * width,
            layer_of=_mlp_input_projection,
        ))
        for kind in ("gpt2", "llama")
    ]  # fmt: skip
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
    describe = f"host µs per call; x {tuple(x.shape)} {str(dtype).removeprefix('torch.')} on {{where}}"
    measured = measure_rows(rows, calls, device, repeats, describe, width=40)
    methods = ", ".join(  # read after the warm-up: the first calls choose each layer's method
        f"{kind}: {layer.__dict__['_hf_gns_state'].last_method}" for kind, _, layer, *_ in layers
    )
    print(f"  methods: {methods}")
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
    print_host_profile(step, calls, device, args.profile, "patched gpt2 Conv1D fwd+bwd", after=between)


if __name__ == "__main__":
    main()
