"""Sweep the tile configurations of the Triton norm kernels on the GPU at hand (~1-1.5 minutes).

Times the forward kernel and, separately, the backward pair (row kernel + partial
reduction) as GPU time (CUDA-graph replays, so host overhead stays out), for a few tiles
per width: forward (BLOCK_M, num_warps), backward (BLOCK_M, num_warps, waves of programs)
and the backward kernel's compile-time variants (`norm_triton.BackwardOptions`: one
reduction for LayerNorm's two row sums, register prefetch of the next tile, loop pipelining
through `tl.range(num_stages)`, evict-first hints), each against the copy-bandwidth roofline
measured in the same run (forward moves 2 tensors of x's size, backward 3: x and dy read, dx
written; the bandwidth is `_timing.copy_bandwidth`'s, as in bench_norms.py). Each timing
cycles through >= `--rotate-mb` MB of distinct inputs, so no call reads its input from L2.
Issue 11's target is the fwd+bwd pair at >= 80% of the roofline for D >= 2048, still
bitwise deterministic (neither tiles nor variants change the reduction order across chunks'
partials or use atomics; each backward config is also run twice and checked bit for bit,
and against the rules' outputs to bf16 tolerance: a failing config is flagged and never wins).

The backward sweep has three steps per width (the variants x tiles product is too slow):
the tiles that won on the H200 with the default variant; every variant at the best of those
tiles; the best variant at every tile (`--all-variants`: the whole product instead).

It ends with the winners as the two dicts `FORWARD_TILES` / `BACKWARD_TILES` of
`hf_gns/kernels/norm_triton.py` (keyed by BLOCK_D), ready to paste, and the fwd+bwd
roofline fraction of the current rules against the winners.

    PYTHONPATH=. python benchmarks/tune_norm_kernels.py                      # LayerNorm, D 768..8192
    PYTHONPATH=. python benchmarks/tune_norm_kernels.py --rms --widths 2048,4096,8192
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


# (BLOCK_M, num_warps, waves): the backward tiles that came within ~3% of the best on the H200
# (B=8, T=2048, bf16; logs of issue 11), plus two for D <= 1024
BACKWARD_CANDIDATES = [
    (1, 4, 2),
    (1, 4, 4),
    (1, 8, 2),
    (1, 8, 4),
    (1, 16, 2),
    (1, 16, 4),
    (2, 4, 2),
    (2, 8, 2),
]
NARROW_CANDIDATES = [(2, 4, 4), (4, 4, 2)]


def backward_tiles(block_d: int):
    for block_m, num_warps, waves in BACKWARD_CANDIDATES + (NARROW_CANDIDATES if block_d <= 1024 else []):
        if block_m * block_d > 8192 and block_m > 1:
            continue  # two fp32 accumulators of this tile live in registers
        if block_m * block_d // (32 * num_warps) >= 4:  # at least 4 elements a thread
            yield block_m, num_warps, waves


def backward_variants(rms: bool):
    """Every `BackwardOptions` to try (the default first); one_reduction only matters for LayerNorm."""
    Options = norm_triton.BackwardOptions
    loads = [dict(), dict(prefetch=True), dict(loop_stages=2), dict(loop_stages=3), dict(loop_stages=4)]
    for one_reduction in (False,) if rms else (False, True):
        for load in loads:
            for evict_first in (False, True):
                yield Options(one_reduction=one_reduction, evict_first=evict_first, **load)


def describe(options) -> str:
    """A short name of a `BackwardOptions`: 'default', or e.g. 'one_reduction+stages3+evict'."""
    parts = [
        "one_reduction" * options.one_reduction, "prefetch" * options.prefetch,
        f"stages{options.loop_stages}" * (options.loop_stages > 0), "evict" * options.evict_first,
    ]  # fmt: skip
    return "+".join(p for p in parts if p) or "default"


def _same_outputs(a, b, exact: bool) -> bool:
    for u, v in zip(a, b, strict=True):
        if u is None or v is None:
            if u is not v:
                return False
        elif exact and not torch.equal(u, v):
            return False
        elif not exact and not torch.allclose(u.float(), v.float(), rtol=2e-2, atol=2e-2):
            return False
    return True


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
    rule_out = backwards[0]()
    fwd_results = []
    for tile in forward_tiles(block_d):
        _set_tiles(block_d, forward=tile)
        fwd_results.append((graph_ms(forwards()), tile))

    bwd_results = {}  # (BLOCK_M, num_warps, waves, options): ms (inf: outputs wrong or not deterministic)
    failed = []

    def time_backward(tile, options):
        key = (*tile, options)
        if key in bwd_results:
            return
        _set_tiles(block_d, backward=key)
        try:
            first, second = backwards[0](), backwards[0]()
            if not _same_outputs(first, second, exact=True):
                raise AssertionError("two runs gave different bits")
            if not _same_outputs(first, rule_out, exact=False):
                raise AssertionError("outputs off the rules' beyond bf16 tolerance")
            bwd_results[key] = graph_ms(backwards)
        except Exception as error:  # e.g. out of shared memory at many loop stages: skip the config
            bwd_results[key] = float("inf")
            failed.append((key, f"{type(error).__name__}: {str(error)[:120]}"))

    def best_of(keys):
        return min(keys, key=lambda k: bwd_results[k])

    rules = norm_triton.backward_config(width, args.batch, args.seq, sets[0][0].device)
    tiles = list(backward_tiles(block_d)) or [(rules[0], rules[2], 2)]  # narrow D: the rules' tile
    variants = list(backward_variants(args.rms))
    if args.all_variants:
        for tile in tiles:
            for options in variants:
                time_backward(tile, options)
    else:
        for tile in tiles:  # 1. the tiles, default variant
            time_backward(tile, variants[0])
        best_tile = best_of(bwd_results)[:3]
        for options in variants:  # 2. every variant at the best tile
            time_backward(best_tile, options)
        best_options = best_of(bwd_results)[3]
        for tile in tiles:  # 3. the best variant at every tile
            time_backward(tile, best_options)
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
    for ms, tile in sorted(fwd_results)[:3]:
        print(f"  fwd {str(tile):14s} {ms:.4f} ms  {100 * roof_fwd / ms:5.1f}% of roofline")
    ranked = sorted((k for k in bwd_results if bwd_results[k] < float("inf")), key=lambda k: bwd_results[k])
    default_ranked = [k for k in ranked if k[3] == variants[0]]
    print(f"  bwd: {len(bwd_results)} configs; best with the default variant {default_ranked[0][:3]} "
          f"{100 * roof_bwd / bwd_results[default_ranked[0]]:.1f}%; top {args.top}:")  # fmt: skip
    for key in ranked[: args.top]:
        ms = bwd_results[key]
        print(f"  bwd {str(key[:3]):11s} {describe(key[3]):28s} {ms:.4f} ms  {100 * roof_bwd / ms:5.1f}%")
    by_variant = {}  # each variant's best time, to read what each option is worth
    for key in ranked:
        by_variant.setdefault(key[3], key)
    print("  bwd best per variant: " + ", ".join(
        f"{describe(o)} {100 * roof_bwd / bwd_results[k]:.1f}%" for o, k in by_variant.items()
    ))  # fmt: skip
    for key, reason in failed:
        print(f"  bwd {str(key[:3])} {describe(key[3])} FAILED, excluded: {reason}")
    if not fwd_results:  # narrow D: no tile in the grid, keep the rules'
        block_m, _, num_warps = norm_triton.forward_config(width)
        fwd_results = [(rule_fwd, (block_m, num_warps))]
    best_fwd, best_bwd = min(fwd_results), ranked[0]
    total = best_fwd[0] + bwd_results[best_bwd]
    print(f"  best fwd+bwd {total:.4f} ms: {100 * (roof_fwd + roof_bwd) / total:.1f}% of the roofline")
    return {block_d: best_fwd[1]}, {block_d: best_bwd[:3] if best_bwd[3] == variants[0] else best_bwd}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="768,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rms", action="store_true", help="RMSNorm instead of LayerNorm")
    parser.add_argument("--rotate-mb", type=int, default=512, help="MB of inputs cycled through (beats L2)")
    parser.add_argument(
        "--all-variants", action="store_true", help="every backward variant at every tile (slow)"
    )
    parser.add_argument("--top", type=int, default=6, help="backward configs listed per width")
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
    print(f"BACKWARD_TILES: dict[int, tuple] = {backward}  # (BLOCK_M, num_warps, waves[, BackwardOptions])")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
