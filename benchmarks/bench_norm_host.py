"""Host (CPU) time per norm call on the GPU: where eager GNSTrainer's norm layers spend Python.

In the eager Trainer loop the backward is launched by the autograd engine one op at a time;
when an op's host time exceeds the GPU time of the ops queued before it, the GPU waits.
The H200 profile of issue 11 showed hf_gns's fused norm at ~5x a PyTorch op's host time per
call. This script measures host microseconds per call with the GPU kept busy
(`torch.cuda._sleep`), so launches only queue and the timer sees host work alone:

- `F.layer_norm` / `F.rms_norm` forward and forward+backward (the baseline);
- `hf_gns.kernels.fused_norm` with a sink, forward and forward+backward;
- a patched HF norm module (GPT-2's LayerNorm, Llama's RMSNorm) called as the model calls it;
and prints a cProfile of the fused forward+backward loop (top functions by own time).

    PYTHONPATH=. python benchmarks/bench_norm_host.py            # CUDA only
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F

from hf_gns.kernels import fused_norm, new_sq_norm_sink


def _host_us_per_call(step, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of host µs per `step()` while the GPU sleeps (launches only queue)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU busy at ~2 GHz: the queue never drains
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _patched_module(kind: str, width: int, dtype: torch.dtype, device: str = "cuda"):
    """One HF norm layer inside a model, patched by hf_gns (the module the Trainer calls)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    import hf_gns

    if kind == "gpt2":
        heads = max(1, width // 64)
        config = GPT2Config(
            n_layer=1,
            n_embd=width,
            n_head=heads,
            vocab_size=128,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            num_hidden_layers=1, hidden_size=width, intermediate_size=2 * width,
            num_attention_heads=max(1, width // 64), vocab_size=128, max_position_embeddings=64,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    model = model.to(device, dtype)
    hf_gns.patch(model)
    norm = model.transformer.ln_f if kind == "gpt2" else model.model.norm
    return model, norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--calls", type=int, default=60, help="calls per timed loop")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm_host.py: error: needs a CUDA GPU")
    dtype = torch.bfloat16
    shape = (args.batch, args.seq, args.width)
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.ones(args.width, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.zeros(args.width, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(shape, device="cuda", dtype=dtype)

    def torch_ln_fwd():
        return F.layer_norm(x, (args.width,), w, b, 1e-5)

    def torch_ln_fwdbwd():
        torch.autograd.backward(F.layer_norm(x, (args.width,), w, b, 1e-5), dy)

    def torch_rms_fwdbwd():
        torch.autograd.backward(F.rms_norm(x, (args.width,), w, 1e-6), dy)

    def hf_ln_fwd():
        return fused_norm(x, w, b, 1e-5, sq_norm_sink=new_sq_norm_sink(x))

    def hf_ln_fwdbwd():
        torch.autograd.backward(fused_norm(x, w, b, 1e-5, sq_norm_sink=new_sq_norm_sink(x)), dy)

    def hf_rms_fwdbwd():
        torch.autograd.backward(fused_norm(x, w, None, 1e-6, rms=True, sq_norm_sink=new_sq_norm_sink(x)), dy)

    rows = [
        ("F.layer_norm fwd", torch_ln_fwd),
        ("F.layer_norm fwd+bwd", torch_ln_fwdbwd),
        ("F.rms_norm fwd+bwd", torch_rms_fwdbwd),
        ("hf_gns fused_norm LN fwd (sink)", hf_ln_fwd),
        ("hf_gns fused_norm LN fwd+bwd (sink)", hf_ln_fwdbwd),
        ("hf_gns fused_norm RMS fwd+bwd (sink)", hf_rms_fwdbwd),
    ]
    for kind in ("gpt2", "llama"):
        try:
            model, norm = _patched_module(kind, args.width, dtype)
        except Exception as error:  # noqa: BLE001 - a benchmark row, not the product
            print(f"patched {kind} norm: not measured ({type(error).__name__}: {error})")
            continue

        def patched_fwdbwd(model=model, norm=norm):
            torch.autograd.backward(norm(x), dy)

        rows.append((f"patched {kind} norm module fwd+bwd", patched_fwdbwd))
    for _, step in rows:  # warm-up: compile kernels, fill caches
        for _ in range(3):
            step()
    torch.cuda.synchronize()
    print(f"host µs per call, GPU kept busy; x {tuple(shape)} bf16 on {torch.cuda.get_device_name()}")
    for name, step in rows:
        print(f"  {name:<42s} {_host_us_per_call(step, args.calls):8.1f} µs")

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    profiler.enable()
    for _ in range(args.calls):
        hf_ln_fwdbwd()
    profiler.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    print(f"\ncProfile of {args.calls} hf_gns LN fwd+bwd calls (own time):")
    print(out.getvalue())


if __name__ == "__main__":
    main()
