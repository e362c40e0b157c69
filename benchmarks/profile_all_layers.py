"""Where the time of a `targets="all"` training step goes, and what each linear method costs.

1. Per layer: forward + backward of one GPT-2 linear shape under bf16 autocast (fp32
   weight), plain `F.linear` vs `linear_with_sq_norms` by the simultaneous and the ghost
   method, median of CUDA-event times: checks the cost model's choice on this GPU.
2. Whole step: GPT-2 124M, bf16 autocast, fp32 weights; torch.profiler CUDA kernel totals,
   unpatched vs `targets="all"`.

    python benchmarks/profile_all_layers.py [--linear-method ghost] [--rows 25] [--seqs 64,256,1024]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile


def build(targets: str | None, method: str):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(), attn_implementation="sdpa").cuda().train()
    if targets:
        import hf_gns

        hf_gns.patch(model, targets=targets, linear_method=method)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def step(model, optimizer, input_ids, patched: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    if patched:
        import hf_gns

        hf_gns.per_example_sq_norms(model)
        hf_gns.zero_stats(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


GPT2_LINEARS = {
    "c_attn": (768, 2304),
    "attn.c_proj": (768, 768),
    "c_fc": (768, 3072),
    "mlp.c_proj": (3072, 768),
}
GPT2_LINEARS["lm_head"] = (768, 50257)


def _linear_step_ms(method: str, batch: int, seq: int, in_features: int, out_features: int) -> float:
    """Median ms of one fwd+bwd of a linear layer (bf16 autocast, fp32 weight) by `method`."""
    import statistics

    import torch.nn.functional as F

    from hf_gns.kernels import new_sq_norm_sink
    from hf_gns.kernels.linear_op import linear_with_sq_norms

    x = torch.randn(batch, seq, in_features, device="cuda", requires_grad=True)
    weight = torch.randn(out_features, in_features, device="cuda", requires_grad=True)
    upstream = torch.randn(batch, seq, out_features, device="cuda", dtype=torch.bfloat16)
    sink = new_sq_norm_sink(batch, "cuda")

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if method == "plain":
                out = F.linear(x, weight)
            else:
                out = linear_with_sq_norms(x, weight, None, sink, batch, method=method)
        out.backward(upstream)
        x.grad = weight.grad = sink.grad = None

    for _ in range(3):
        run()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(10)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bench_linears(batch: int, seqs: list[int]) -> None:
    from hf_gns.kernels.linear_cost import choose_linear_method

    print(
        f"per layer, fwd+bwd, bf16 autocast, B={batch}: median ms plain / simultaneous / ghost; model's pick"
    )
    for seq in seqs:
        for name, (k, n) in GPT2_LINEARS.items():
            plain, simultaneous, ghost = (
                _linear_step_ms(method, batch, seq, k, n) for method in ("plain", "simultaneous", "ghost")
            )
            print(
                f"  T={seq:5d} {name:12s} {k:5d}->{n:<6d} {plain:8.3f} {simultaneous:8.3f} {ghost:8.3f}  "
                f"extra: simultaneous {simultaneous - plain:+.3f}, ghost {ghost - plain:+.3f}; "
                f"pick {choose_linear_method(batch, seq, k, n)}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--linear-method", default="auto")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--seqs", default="64,256,1024", help="sequence lengths of the per-layer table")
    parser.add_argument("--skip-layers", action="store_true", help="only the whole-step profile")
    args = parser.parse_args()
    if not args.skip_layers:
        bench_linears(args.batch, [int(s) for s in args.seqs.split(",") if s])
    input_ids = torch.randint(0, 50257, (args.batch, args.seq), device="cuda")
    for targets in (None, "all"):
        model, optimizer = build(targets, args.linear_method)
        for _ in range(3):
            step(model, optimizer, input_ids, targets is not None)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(model, optimizer, input_ids, targets is not None)
            torch.cuda.synchronize()
        total = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"\n=== {targets or 'unpatched'}: {total:.1f} ms of kernels per step, peak {peak:.1f} GiB")
        print(
            prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70
            )
        )
        del model, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
