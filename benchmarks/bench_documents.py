"""Norm backward with per-document examples (padding-free batches) vs the dense per-row path.

For B·T = 8·2048 rows of width D (bf16), times the Triton backward (dx, dγ, dβ and the
per-example |dγ|², |dβ|²) of a LayerNorm with bias:
    dense      the input as (8, 2048, D): 8 examples along dim 0 (the tuned path, the baseline)
    E docs     the input as (1, 16384, D) with `example_offsets` marking E documents:
               E = 8 (the same 2048-row examples), 64 and 1024 of random lengths
and prints the GPU kernel time (CUDA-graph replays) and the ratio to dense. A check against
the fp64 reference runs first for every case, so a wrong kernel cannot print a good number.

    python benchmarks/bench_documents.py
    python benchmarks/bench_documents.py --widths 768 4096 --dtype float32
"""

from __future__ import annotations

import argparse

import torch
from _timing import (
    environment_info,
    fmt,
    fmt_ratio,
    format_environment,
    format_table,
    kernel_median_ms,
    ratio,
    require_device,
)

from hf_gns.kernels.norm_launch import norm_backward_triton, norm_forward_triton
from hf_gns.kernels.norm_reference import norm_backward_reference, norm_forward_reference

ROWS, BATCH = 16384, 8  # B·T and B of the dense case


def random_offsets(n_rows: int, n_documents: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n_rows - 1, generator=gen)[: n_documents - 1].add(1).sort().values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([n_rows])]).to(device)


def check(x, weight, bias, dy, offsets) -> None:
    """Per-document squared norms within 1e-2 relative of the fp64 reference (bf16 inputs)."""
    _, mean, rstd = norm_forward_triton(x, weight, bias, 1e-5, False, 0.0, False, None)
    got = norm_backward_triton(dy, x, weight, mean, rstd, True, False, 0.0, False, example_offsets=offsets)[3]
    x64, w64, b64, dy64 = (t.double() for t in (x, weight, bias, dy))
    _, mean64, rstd64 = norm_forward_reference(x64, w64, b64, 1e-5, False)
    exact = norm_backward_reference(dy64, x64, w64, mean64, rstd64, True, False, example_offsets=offsets)[3]
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 2048, 4096, 8192])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rows", type=int, default=ROWS, help="B·T (8 rows of T in the dense case)")
    parser.add_argument(
        "--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1, no timings"
    )
    args = parser.parse_args()
    device = require_device(args.device)
    dtype = getattr(torch, args.dtype)
    print(format_environment(environment_info(device)))
    rows = []
    for width in args.widths:
        gen = torch.Generator(device=device).manual_seed(0)
        n_rows = args.rows
        x = torch.randn(n_rows, width, generator=gen, device=device).to(dtype)
        dy = torch.randn(n_rows, width, generator=gen, device=device).to(dtype)
        weight = (1 + 0.1 * torch.randn(width, generator=gen, device=device)).to(dtype)
        bias = (0.1 * torch.randn(width, generator=gen, device=device)).to(dtype)
        _, mean, rstd = norm_forward_triton(x, weight, bias, 1e-5, False, 0.0, False, None)
        cases = {
            "dense (8 rows)": None,
            "8 docs": torch.arange(0, n_rows + 1, n_rows // BATCH, device=device),
        }
        for n_documents in (64, 1024):
            offsets = random_offsets(n_rows, min(n_documents, n_rows // 2), n_documents, device)
            cases[f"{offsets.numel() - 1} docs"] = offsets
        baseline = None
        for name, offsets in cases.items():
            shape = (BATCH, n_rows // BATCH, width) if offsets is None else (1, n_rows, width)
            xs, dys = x.view(shape), dy.view(shape)
            ms_mean, ms_rstd = mean.view(shape[:-1]), rstd.view(shape[:-1])
            if offsets is not None:
                check(xs, weight, bias, dys, offsets)

            def step(xs=xs, dys=dys, m=ms_mean, r=ms_rstd, offsets=offsets, weight=weight, bias=bias):
                extra = {} if offsets is None else {"example_offsets": offsets}
                return norm_backward_triton(dys, xs, weight, m, r, True, False, 0.0, False, **extra)

            ms, method = kernel_median_ms(
                [step], device, reset=lambda i: None, warmup=10, repeats=args.repeats
            )
            baseline = ms if offsets is None else baseline
            rows.append([f"D={width}", name, fmt(ms, ".3f", " ms"), fmt_ratio(ratio(ms, baseline)), method])
    headers = ["width", "examples", "backward (GPU)", "vs dense", "timer"]
    print(format_table(headers, rows, left=2))


if __name__ == "__main__":
    main()
