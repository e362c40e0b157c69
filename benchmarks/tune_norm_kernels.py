"""Sweep the tile configurations of the Triton norm kernels on the GPU at hand.

Times the forward kernel and the backward pair (row kernel + partial reduction) as
GPU time (CUDA-graph replays, so host overhead stays out), for a few (BLOCK_M,
num_warps, programs-per-SM) choices per width, each as a fraction of the copy-bandwidth
roofline measured in the same run. The winners are what `forward_config` and
`backward_config` in `hf_gns/kernels/norm_triton.py` encode.

    python benchmarks/tune_norm_kernels.py --widths 768,2048,4096,8192 [--rms]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
import triton

from hf_gns.kernels import norm_triton


def graph_ms(fn, replays: int = 50) -> float:
    """Median GPU time of `fn` from CUDA-graph replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(n_bytes: int = 1 << 31) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n_bytes / graph_ms(lambda: dst.copy_(src)) / 1e6


def fixed_forward_config(width, block_m, num_warps):
    return block_m, triton.next_power_of_2(width), num_warps


def fixed_backward_config(width, n_examples, rows, device, block_m, num_warps, waves):
    n_chunks = max(
        1,
        min(
            triton.cdiv(rows, block_m),
            triton.cdiv(waves * norm_triton._target_programs(device) // 2, n_examples),
        ),
    )
    per_chunk = triton.cdiv(triton.cdiv(rows, n_chunks), block_m) * block_m
    return block_m, triton.next_power_of_2(width), num_warps, per_chunk, triton.cdiv(rows, per_chunk)


def sweep_width(width, args, bandwidth):
    x = torch.randn(args.batch, args.seq, width, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    weight = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    bias = None if args.rms else torch.randn_like(weight)
    forward = functools.partial(
        norm_triton.norm_forward_triton, x, weight, bias, 1e-5, args.rms, 0.0, False, x.dtype
    )
    block_d = triton.next_power_of_2(width)
    results = []
    for block_m in (1, 2, 4, 8, 16):
        if block_m * block_d > 16384 or (block_m > 1 and block_m * block_d < 1024):
            continue
        for num_warps in (4, 8, 16):
            if block_m * block_d // (32 * num_warps) < 2:
                continue
            norm_triton.forward_config = functools.partial(
                fixed_forward_config, block_m=block_m, num_warps=num_warps
            )
            fwd_ms = graph_ms(forward)
            _, mean, rstd = forward()
            backward = functools.partial(
                norm_triton.norm_backward_triton,
                dy,
                x,
                weight,
                mean,
                rstd,
                bias is not None,
                args.rms,
                0.0,
                False,
            )
            for waves in (1, 2, 4):
                norm_triton.backward_config = functools.partial(
                    fixed_backward_config, block_m=block_m, num_warps=num_warps, waves=waves
                )
                results.append((block_m, num_warps, waves, fwd_ms, graph_ms(backward)))
    tensor_bytes = x.numel() * x.element_size()
    roof_fwd, roof_bwd = 2 * tensor_bytes / bandwidth / 1e6, 3 * tensor_bytes / bandwidth / 1e6
    print(
        f"\nD={width} ({'RMS' if args.rms else 'LN'}): roofline fwd {roof_fwd:.4f} ms, bwd {roof_bwd:.4f} ms"
    )
    print(f"{'BLOCK_M':>7} {'warps':>5} {'waves':>5} {'fwd ms':>8} {'fwd %':>6} {'bwd ms':>8} {'bwd %':>6}")
    for block_m, num_warps, waves, fwd_ms, bwd_ms in sorted(results, key=lambda r: r[3] + r[4])[:6]:
        print(
            f"{block_m:>7} {num_warps:>5} {waves:>5} {fwd_ms:8.4f} {100 * roof_fwd / fwd_ms:5.1f}% "
            f"{bwd_ms:8.4f} {100 * roof_bwd / bwd_ms:5.1f}%"
        )
    best_fwd, best_bwd = min(results, key=lambda r: r[3]), min(results, key=lambda r: r[4])
    print(f"best fwd: BLOCK_M={best_fwd[0]} warps={best_fwd[1]} {best_fwd[3]:.4f} ms")
    print(f"best bwd: BLOCK_M={best_bwd[0]} warps={best_bwd[1]} waves={best_bwd[2]} {best_bwd[4]:.4f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="768,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rms", action="store_true", help="RMSNorm instead of LayerNorm")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this sweep needs a CUDA GPU")
    bandwidth = copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth:.0f} GB/s  triton {triton.__version__}")
    original = norm_triton.forward_config, norm_triton.backward_config
    try:
        for width in [int(w) for w in args.widths.split(",")]:
            sweep_width(width, args, bandwidth)
    finally:
        norm_triton.forward_config, norm_triton.backward_config = original


if __name__ == "__main__":
    main()
