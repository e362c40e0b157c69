"""Cost of the per-step statistics read: per-parameter ops vs the fused read, by op count and time.

The read a trainer does once per optimizer step for P tracked parameters:
- Σ_i |c_i|² per parameter: before, `per_example_sq_norms` (a `cat` per parameter) then one
  `sum` each and a `stack`; fused, `hf_gns.patching.example_sq_norm_sums` (one `cat`, one
  `index_add_`, one gather, index tensors cached);
- |G_B|² per parameter: before, one `vector_norm` + `square` per gradient and a `stack`; fused,
  `hf_gns.distributed.grad_sq_norm_shares` (`torch._foreach_norm`, then `stack` and `square`).

The model is a stack of P/2 LayerNorms (weight and bias: P tracked parameters, default 150,
as a 12-layer model under `targets="all"`), two micro-batches per step. Ops are aten calls
counted by a TorchDispatchMode: on a GPU each is at least one kernel launch plus its host
dispatch (~5-10 µs), which is what the fused read saves. Times are host medians on this
machine (CPU tensors, so they include the arithmetic, which is negligible at these sizes).

    python benchmarks/bench_step_read.py              # CPU
    python benchmarks/bench_step_read.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hf_gns
from hf_gns import distributed
from hf_gns.patching import example_sq_norm_sums


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def per_parameter_read(model, names, params):
    norms = hf_gns.per_example_sq_norms(model)
    example_sums = torch.stack([norms[n].sum() for n in names])
    grad_sq = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32).square() for p in params])
    return example_sums, grad_sq


def fused_read(model, names, params):
    example_sums = example_sq_norm_sums(model, names)
    grad_sq = distributed.grad_sq_norm_shares([p.grad for p in params], sharded=False)
    return example_sums, grad_sq


def measure(read, model, names, params, device, repeats: int) -> tuple[int, float]:
    counter = _CountOps()
    with counter:
        read(model, names, params)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        read(model, names, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return counter.count, 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=int, default=150)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = nn.Sequential(*[nn.LayerNorm(args.width) for _ in range(args.params // 2)]).to(device)
    hf_gns.patch(model)
    for _ in range(2):  # two micro-batches
        model(torch.randn(args.batch, 4, args.width, device=device)).square().mean().backward()
    names = hf_gns.patching.tracked_parameter_names(model)
    params = [dict(model.named_parameters())[n] for n in names]
    before = per_parameter_read(model, names, params)
    after = fused_read(model, names, params)
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=0)

    print(f"{len(names)} tracked parameters, 2 micro-batches of {args.batch}, device {device}")
    print(f"{'read':<16} {'aten ops':>9} {'µs (median)':>12}")
    results = {}
    for title, read in (("per-parameter", per_parameter_read), ("fused", fused_read)):
        results[title] = measure(read, model, names, params, device, args.repeats)
        print(f"{title:<16} {results[title][0]:>9d} {results[title][1]:>12.0f}")
    ops_ratio = results["per-parameter"][0] / results["fused"][0]
    time_ratio = results["per-parameter"][1] / results["fused"][1]
    print(f"fused: {ops_ratio:.0f}× fewer ops, {time_ratio:.1f}× faster")


if __name__ == "__main__":
    main()
