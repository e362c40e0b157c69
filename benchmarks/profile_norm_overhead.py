"""Where one eager forward+backward of the fused norm spends its time (GPU).

Prints, per width, the host time to issue one fwd+bwd, the wall time, the CUDA time of
each kernel (torch.profiler), and the top host functions (cProfile) for one width.
A diagnostic for `bench_norms.py` results: eager time far above kernel time is host
overhead (Python, launches), not the kernels.

    python benchmarks/profile_norm_overhead.py --widths 768,4096
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hf_gns.kernels import fused_norm, new_sq_norm_sink


def make_step(width: int, rms: bool, fused: bool):
    x = torch.randn(8, 2048, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = None if rms else torch.randn(width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        if fused:
            y = fused_norm(x, weight, bias, 1e-5, rms=rms, sq_norm_sink=new_sq_norm_sink(x))
        elif rms:
            y = F.rms_norm(x, (width,), weight, 1e-5)
        else:
            y = F.layer_norm(x, (width,), weight, bias, 1e-5)
        y.backward(dy)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="768,4096")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    for width in [int(w) for w in args.widths.split(",")]:
        for rms in (False, True):
            for fused in (False, True):
                step = make_step(width, rms, fused)
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    step()
                issued = (time.perf_counter() - start) / args.iters * 1e3
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / args.iters * 1e3
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                name = ("hf_gns" if fused else "torch") + (" RMS" if rms else " LN")
                print(f"D={width} {name}: host issue {issued:.3f} ms/iter, wall {wall:.3f} ms/iter")
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                for e in sorted(events, key=lambda e: -e.device_time_total)[:6]:
                    print(
                        f"    {e.key[:70]:70s} {e.device_time_total / 10 / 1e3:.4f} ms/iter x{e.count // 10}"
                    )
    step = make_step(int(args.widths.split(",")[-1]), False, True)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.iters):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
