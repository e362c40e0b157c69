"""Sweep the tile configurations of the Triton norm kernels on the GPU at hand (~2 minutes).

Times the forward kernel and, separately, the backward pair (row kernel + partial
reduction) as GPU time (CUDA-graph replays, so host overhead stays out), for a few tiles
per width: forward (BLOCK_M, num_warps), backward (BLOCK_M, num_warps, waves of programs),
each against the copy-bandwidth roofline measured in the same run (forward moves 2 tensors
of x's size, backward 3: x and dy read, dx written; the bandwidth is `_timing.copy_bandwidth`'s,
as in bench_norms.py). Each timing cycles through >= `--rotate-mb` MB of distinct inputs, so
no call reads its input from L2. Issue 11's target is the fwd+bwd pair
at >= 80% of the roofline for D >= 2048, still bitwise deterministic (the tiles change
neither the reduction order across chunks' partials nor the use of atomics).

It ends with the winners as the two dicts `FORWARD_TILES` / `BACKWARD_TILES` of
`hf_gns/kernels/norm_triton.py` (keyed by BLOCK_D), ready to paste, and the fwd+bwd
roofline fraction of the current rules against the winners.

    PYTHONPATH=. python benchmarks/tune_norm_kernels.py                      # LayerNorm, D 768..8192
    PYTHONPATH=. python benchmarks/tune_norm_kernels.py --rms --widths 2048,4096
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import copy_bandwidth  # noqa: E402

from hf_gns.kernels import norm_launch, norm_triton  # noqa: E402


def graph_ms(calls, replays: int = 20) -> float:
    """GPU time (ms) of one call, from CUDA-graph replays of `calls` run back to back.

    Each call works on its own buffers, and there are enough of them that none is still in
    L2 when its turn comes (the H200's L2 holds 50-60 MB: one (8, 2048, 2048) bf16 input
    replayed alone would be timed from cache). Outputs are kept alive during capture so
    that no two calls write the same memory.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    kept = []
    with torch.cuda.graph(graph):
        for call in calls:
            kept.append(call())
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()  # sync: read this replay's time
        times.append(start.elapsed_time(end))
    del kept, graph
    return statistics.median(times) / len(calls)


def _set_tiles(block_d: int, forward=None, backward=None) -> None:
    """Install one tile for BLOCK_D (None removes it: the rules apply) and drop the cached configs."""
    for table, tile in ((norm_triton.FORWARD_TILES, forward), (norm_triton.BACKWARD_TILES, backward)):
        table.pop(block_d, None)
        if tile is not None:
            table[block_d] = tile
    norm_triton.forward_config.cache_clear()
    norm_triton.backward_config.cache_clear()
    norm_launch.clear_plans()  # plans hold the tiles they were built with


def forward_tiles(block_d: int):
    for block_m in (1, 2, 4, 8, 16):
        if not 2048 <= block_m * block_d <= 16384 and not (block_m == 1 and block_d > 16384):
            continue
        for num_warps in (4, 8, 16):
            if block_m * block_d // (32 * num_warps) >= 4:  # at least 4 elements a thread
                yield block_m, num_warps


def backward_tiles(block_d: int):
    for block_m in (1, 2, 4, 8):
        if not 2048 <= block_m * block_d <= 8192 and not (block_m == 1 and block_d > 8192):
            continue  # two fp32 accumulators of this tile live in registers
        for num_warps in (4, 8, 16):
            if block_m * block_d // (32 * num_warps) >= 4:
                for waves in (1, 2, 4):
                    yield block_m, num_warps, waves


def sweep_width(width: int, args, bandwidth: float) -> tuple[dict, dict]:
    shape = (args.batch, args.seq, width)
    set_bytes = 2 * args.batch * args.seq * width * 2  # x and dy, bf16
    n_sets = max(2, -(-args.rotate_mb * 2**20 // set_bytes))  # >= rotate_mb of inputs in rotation
    weight = torch.randn(width, device="cuda", dtype=torch.bfloat16)
    bias = None if args.rms else torch.randn_like(weight)
    sets = [
        (
            torch.randn(shape, device="cuda", dtype=torch.bfloat16),
            torch.randn(shape, device="cuda", dtype=torch.bfloat16),
        )
        for _ in range(n_sets)
    ]  # (x, dy) pairs
    block_d = triton.next_power_of_2(width)

    def forwards():
        return [
            functools.partial(
                norm_launch.norm_forward_triton, x, weight, bias, 1e-5, args.rms, 0.0, False, x.dtype
            )
            for x, _ in sets
        ]

    _set_tiles(block_d)
    stats = [
        norm_launch.norm_forward_triton(x, weight, bias, 1e-5, args.rms, 0.0, False, x.dtype)[1:]
        for x, _ in sets
    ]
    backwards = [
        functools.partial(
            norm_launch.norm_backward_triton,
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
        for (x, dy), (mean, rstd) in zip(sets, stats, strict=True)
    ]

    rule_fwd, rule_bwd = graph_ms(forwards()), graph_ms(backwards)
    fwd_results = []
    for tile in forward_tiles(block_d):
        _set_tiles(block_d, forward=tile)
        fwd_results.append((graph_ms(forwards()), tile))
    bwd_results = []
    for tile in backward_tiles(block_d):
        _set_tiles(block_d, backward=tile)
        bwd_results.append((graph_ms(backwards), tile))
    _set_tiles(block_d)

    x = sets[0][0]
    tensor_bytes = x.numel() * x.element_size()
    roof_fwd, roof_bwd = 2 * tensor_bytes / bandwidth / 1e6, 3 * tensor_bytes / bandwidth / 1e6
    kind = "RMSNorm" if args.rms else "LayerNorm"
    print(
        f"\nD={width} {kind}, B={args.batch} T={args.seq} bf16: "
        f"roofline fwd {roof_fwd:.4f} ms, bwd {roof_bwd:.4f} ms"
    )
    rule_share = 100 * (roof_fwd + roof_bwd) / (rule_fwd + rule_bwd)
    print(f"  rules:   fwd {rule_fwd:.4f} ms ({100 * roof_fwd / rule_fwd:.1f}%), bwd {rule_bwd:.4f} ms "
          f"({100 * roof_bwd / rule_bwd:.1f}%), fwd+bwd {rule_share:.1f}% of the roofline")  # fmt: skip
    for label, results, roof in (("fwd", fwd_results, roof_fwd), ("bwd", bwd_results, roof_bwd)):
        for ms, tile in sorted(results)[:3]:
            print(f"  {label} {str(tile):14s} {ms:.4f} ms  {100 * roof / ms:5.1f}% of roofline")
    best_fwd, best_bwd = min(fwd_results), min(bwd_results)
    total = best_fwd[0] + best_bwd[0]
    print(f"  best fwd+bwd {total:.4f} ms: {100 * (roof_fwd + roof_bwd) / total:.1f}% of the roofline")
    return {block_d: best_fwd[1]}, {block_d: best_bwd[1]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="768,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rms", action="store_true", help="RMSNorm instead of LayerNorm")
    parser.add_argument("--rotate-mb", type=int, default=512, help="MB of inputs cycled through (beats L2)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this sweep needs a CUDA GPU")
    start = time.perf_counter()
    bandwidth = copy_bandwidth(torch.device("cuda"), 1 << 30) / 1e9  # GB/s, as bench_norms.py measures it
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth:.0f} GB/s  triton {triton.__version__}")
    saved = dict(norm_triton.FORWARD_TILES), dict(norm_triton.BACKWARD_TILES)
    forward, backward = {}, {}
    try:
        for width in [int(w) for w in args.widths.split(",")]:
            fwd, bwd = sweep_width(width, args, bandwidth)
            forward.update(fwd)
            backward.update(bwd)
            print(f"  ({time.perf_counter() - start:.0f} s so far)", flush=True)
    finally:
        norm_triton.FORWARD_TILES.clear()
        norm_triton.FORWARD_TILES.update(saved[0])
        norm_triton.BACKWARD_TILES.clear()
        norm_triton.BACKWARD_TILES.update(saved[1])
    print("\n# paste into hf_gns/kernels/norm_triton.py (tuned on " + torch.cuda.get_device_name() + ")")
    print(f"FORWARD_TILES: dict[int, tuple[int, int]] = {forward}  # BLOCK_D: (BLOCK_M, num_warps)")
    print(f"BACKWARD_TILES: dict[int, tuple[int, int, int]] = {backward}  # (BLOCK_M, num_warps, waves)")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
