"""How many bits the compiled norms' narrow store changes (`hf_gns/kernels/norm_graph_pass.py`).

The pass makes the norm forward kernel write its output in bf16 instead of fp32 followed by a cast.
The rounding is the cast's, but Triton lays the row reduction out for the narrower store, so rstd
(and through it y) can differ in the last fp32 bit. This prints, per shape, whether rstd and mean
are bitwise equal, how many bf16 outputs differ from the cast of the fp32 kernel's, and the same
for the backward fed the bf16 gradient itself instead of its fp32 widening.

    PYTHONPATH=. python benchmarks/norm_narrow_store.py            # needs a CUDA GPU

H200 (2026-12-02, the same comparisons run as an ad-hoc script before this file; this file itself
has not run on a GPU yet): rstd differed at every shape; 22 of 12.6M bf16 outputs of an 8×2048×768
RMSNorm were one bf16 ulp apart, 146 for LayerNorm; the backward was bitwise equal at the two large
shapes and within 8e-8 (relative) at 2×8×96.
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = ((2, 8, 96), (8, 2048, 768), (4, 2048, 2048))


def compare(shape: tuple[int, ...], rms: bool) -> dict:
    from hf_gns.kernels import norm_triton_op as op

    width = shape[-1]
    x = torch.randn(shape, device="cuda")
    weight = torch.randn(width, device="cuda")
    bias = None if rms else torch.randn(width, device="cuda")
    args = (x, weight, bias, 1e-5, rms, 0.0, True)
    wide, mean, rstd = op.norm_forward_traceable(*args, torch.float32)
    narrow, narrow_mean, narrow_rstd = op.norm_forward_traceable(*args, torch.bfloat16)
    cast = wide.to(torch.bfloat16)
    dy = torch.randn_like(x).to(torch.bfloat16)
    config = (x, weight, mean, rstd, not rms, rms, 0.0, True, True)
    backward_equal = all(
        torch.equal(a, b)
        for a, b in zip(
            op.norm_backward_traceable(dy.float(), *config), op.norm_backward_traceable(dy, *config)
        )
    )
    return {
        "rstd equal": torch.equal(rstd, narrow_rstd),
        "mean equal": torch.equal(mean, narrow_mean),
        "bf16 outputs differing": int((narrow != cast).sum()),
        "outputs": narrow.numel(),
        "max |diff|": (narrow.float() - cast.float()).abs().max().item(),
        "backward equal": backward_equal,
    }


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_narrow_store.py: needs a CUDA GPU (the CPU interpreter truncates fp32 -> bf16)")
        return 2
    torch.manual_seed(0)
    row = "{:>16} {:>9} {:>7} {:>7} {:>22} {:>11} {:>6}"
    print(row.format("shape", "norm", "rstd =", "mean =", "bf16 y differing", "max |diff|", "bwd ="))
    for shape in SHAPES:
        for rms in (True, False):
            r = compare(shape, rms)
            differing = f"{r['bf16 outputs differing']} / {r['outputs']}"
            print(
                row.format(
                    "x".join(map(str, shape)), "RMSNorm" if rms else "LayerNorm", str(r["rstd equal"]),
                    str(r["mean equal"]), differing, f"{r['max |diff|']:.3g}", str(r["backward equal"]),
                )
            )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
