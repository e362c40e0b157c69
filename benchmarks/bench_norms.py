"""Forward+backward of LayerNorm / RMSNorm: PyTorch vs hf_gns's fused op with per-example norms.

For each shape (B, T, D) and a 4-D q/k-norm shape (B, T, H, Dh), times y = norm(x);
y.backward(dy) for
    (a) F.layer_norm / F.rms_norm                         (the baseline of every ratio)
    (b) HF's eager LlamaRMSNorm                           (RMSNorm only; for LayerNorm,
                                                           nn.LayerNorm is (a))
    (c) (a) plus per-example |dγ_b|², |dβ_b|² in separate torch ops (a hook on y)
    (d) hf_gns `fused_norm` with a sink for the per-example norms
and reports the median eager time, the GPU kernel time (CUDA-graph replays, or
torch.profiler where capture fails), both as a ratio to (a) and as a fraction of the
copy-bandwidth roofline measured in the same run. A correctness check against an fp64
oracle runs first, so a wrong kernel cannot print a good number.

    python benchmarks/bench_norms.py                      # H100 table of issue 2
    python benchmarks/bench_norms.py --widths 4096 --json norms.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _timing import (
    KERNEL_TIMERS,
    copy_bandwidth,
    environment_info,
    fmt,
    fmt_percent,
    fmt_ratio,
    format_environment,
    format_table,
    kernel_median_ms,
    median_ms,
    ratio,
    require_device,
    roofline_ms,
    write_csv,
    write_json,
)

from hf_gns.kernels import fused_norm, new_sq_norm_sink

EPS = {"layernorm": 1e-5, "rmsnorm": 1e-6}
KIND_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
# Bytes a fwd+bwd must move, in units of numel × element size: forward reads x and
# writes y; backward reads x and dy and writes dx. Weights, bias and the per-row
# mean/rstd are ignored (O(D) and O(rows)).
MIN_PASSES = 5
# Issue 2's targets, at these widths.
TARGET_WIDTHS = (768, 2048, 4096, 8192)
TARGET_ROOFLINE = 0.80


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: a norm kind and an input shape (B, ..., D)."""

    kind: str  # "layernorm" or "rmsnorm"
    shape: tuple[int, ...]
    label: str

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def has_bias(self) -> bool:
        return self.kind == "layernorm"


@dataclass
class NormInputs:
    """A leaf x requiring grad, parameters γ (, β) and a fixed upstream gradient dy."""

    x: torch.Tensor  # (B, ..., D)
    weight: torch.nn.Parameter  # (D,)
    bias: torch.nn.Parameter | None  # (D,)
    dy: torch.Tensor  # like x

    def clear_grads(self) -> None:
        for leaf in (self.x, self.weight, self.bias):
            if leaf is not None:
                leaf.grad = None


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> NormInputs:
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    width = case.width
    weight = torch.nn.Parameter((1 + 0.1 * randn(width)).to(dtype))
    bias = torch.nn.Parameter((0.1 * randn(width)).to(dtype)) if case.has_bias else None
    x = (0.5 + 2 * randn(*case.shape)).to(dtype).requires_grad_()  # off-centre, so LayerNorm ≠ RMSNorm
    return NormInputs(x, weight, bias, randn(*case.shape).to(dtype))


# ---------------------------------------------------------------- implementations


def torch_norm(case: Case, x, weight, bias, eps):
    """(a): the PyTorch op. Falls back to torch ops where F.rms_norm is missing."""
    if case.kind == "layernorm":
        return F.layer_norm(x, (case.width,), weight, bias, eps)
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (case.width,), weight, eps)
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.to(y.dtype)).to(x.dtype)


def per_example_sq_norms_torch(case: Case, x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, 2): |dγ_b|², |dβ_b|² with dγ_b = Σ_r dy_r ⊙ x̂_r, dβ_b = Σ_r dy_r; x̂ recomputed.

    Written the obvious way with torch ops in fp32 (fp64 for fp64 inputs); also the
    oracle of the correctness check, run in fp64.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n_examples, width = x.shape[0], x.shape[-1]
    x3 = x.reshape(n_examples, -1, width).to(compute)  # (B, R, D)
    dy3 = dy.reshape(n_examples, -1, width).to(compute)  # (B, R, D)
    xhat = torch_norm(case, x3, None, None, eps)  # (B, R, D)
    sq_norms = torch.zeros(n_examples, 2, dtype=compute, device=x.device)
    sq_norms[:, 0] = (dy3 * xhat).sum(1).square().sum(-1)
    if case.has_bias:
        sq_norms[:, 1] = dy3.sum(1).square().sum(-1)
    return sq_norms


# Each `prepare_*(case, inputs, eps)` returns a step: forward + y.backward(dy), returning
# (y, per-example sq norms (B, 2) or None). Steps build nothing but what one training
# forward/backward would, so their time is the cost of the op.


def prepare_torch(case: Case, inp: NormInputs, eps: float):
    def step():
        y = torch_norm(case, inp.x, inp.weight, inp.bias, eps)
        y.backward(inp.dy)
        return y, None

    return step


def prepare_hf_llama(case: Case, inp: NormInputs, eps: float):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(case.width, eps=eps)
    module.weight = inp.weight

    def step():
        y = module(inp.x)
        y.backward(inp.dy)
        return y, None

    return step


def prepare_torch_separate_norms(case: Case, inp: NormInputs, eps: float):
    def step():
        y = torch_norm(case, inp.x, inp.weight, inp.bias, eps)
        found = []
        x = inp.x.detach()
        y.register_hook(lambda dy: found.append(per_example_sq_norms_torch(case, x, dy, eps)))
        y.backward(inp.dy)
        return y, found[0]

    return step


def prepare_hf_gns(case: Case, inp: NormInputs, eps: float):
    rms = case.kind == "rmsnorm"

    def step():
        sink = new_sq_norm_sink(inp.x)  # (B, 2)
        y = fused_norm(inp.x, inp.weight, inp.bias, eps, rms=rms, sq_norm_sink=sink)
        y.backward(inp.dy)
        return y, sink.grad

    return step


@dataclass(frozen=True)
class Impl:
    key: str
    names: dict[str, str]  # per norm kind
    prepare: Callable


def implementations() -> list[Impl]:
    impls = [
        Impl(
            "a",
            {"layernorm": "F.layer_norm", "rmsnorm": "F.rms_norm" if hasattr(F, "rms_norm") else "torch ops"},
            prepare_torch,
        )
    ]
    try:
        import transformers.models.llama.modeling_llama  # noqa: F401

        impls.append(Impl("b", {"rmsnorm": "HF LlamaRMSNorm"}, prepare_hf_llama))
    except ImportError:
        print("transformers is not installed: skipping (b) HF LlamaRMSNorm")
    impls.append(Impl("c", {k: "torch + per-ex norms" for k in EPS}, prepare_torch_separate_norms))
    impls.append(Impl("d", {k: "hf_gns fused_norm" for k in EPS}, prepare_hf_gns))
    return impls


def impls_for(case: Case, impls: list[Impl]) -> list[Impl]:
    return [impl for impl in impls if case.kind in impl.names]


# --------------------------------------------------------------------- correctness


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (absolute where ref is all zeros)."""
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def outputs_of(case: Case, prepare: Callable, inp: NormInputs, eps: float) -> dict[str, torch.Tensor]:
    inp.clear_grads()
    y, sq_norms = prepare(case, inp, eps)()
    out = {"y": y.detach(), "dx": inp.x.grad, "dγ": inp.weight.grad}
    if case.has_bias:
        out["dβ"] = inp.bias.grad
    if sq_norms is not None:
        out["|dγ_b|²"] = sq_norms[:, 0]
        if case.has_bias:
            out["|dβ_b|²"] = sq_norms[:, 1]
    inp.clear_grads()
    return out


def check_case(case: Case, impls: list[Impl], dtype: torch.dtype, device: torch.device) -> bool:
    """Every impl against an fp64 oracle: its error may be at most 2× the PyTorch
    baseline's ((a) for y and grads, (c) for the per-example norms) plus an atol."""
    eps = EPS[case.kind]
    inp = make_inputs(case, dtype, device, seed=1234)
    as_fp64 = [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in vars(inp).values()
    ]
    oracle_inp = NormInputs(*as_fp64)
    oracle = outputs_of(case, prepare_torch_separate_norms, oracle_inp, eps)
    errors = {impl.key: {} for impl in impls}
    for impl in impls:
        for name, out in outputs_of(case, impl.prepare, inp, eps).items():
            errors[impl.key][name] = max_rel_err(out, oracle[name])
    atol = {"|dγ_b|²": 1e-3, "|dβ_b|²": 1e-3}
    ok, worst = True, []
    for impl in impls:
        for name, err in errors[impl.key].items():
            base = errors["c" if name.startswith("|") else "a"][name]
            bound = 2 * base + atol.get(name, max(torch.finfo(dtype).eps, 1e-5))
            if not err <= bound:  # catches nan
                ok = False
                print(f"  FAIL {case.kind} {case.label} ({impl.key}) {name}: rel err {err:.2e} > {bound:.2e}")
    for name, err in errors["d"].items():
        worst.append(f"{name} {err:.1e}")
    status = "ok" if ok else "FAILED"
    print(f"check {KIND_NAMES[case.kind]:9s} {case.label:14s} {status}  hf_gns vs fp64: {', '.join(worst)}")
    return ok


# -------------------------------------------------------------------------- timing


def bench_case(case, impls, args, device, bandwidth) -> list[dict]:
    """Eager and kernel time of every impl on `case`, rotating over `args.input_sets` inputs."""
    eps = EPS[case.kind]
    numel = math.prod(case.shape)
    elem = torch.finfo(args.torch_dtype).bits // 8
    ideal_ms = roofline_ms(MIN_PASSES * numel * elem, bandwidth)
    records = []
    for impl in impls:
        inputs = [make_inputs(case, args.torch_dtype, device, seed=s) for s in range(args.input_sets)]
        steps = [impl.prepare(case, inp, eps) for inp in inputs]

        def reset(k: int, inputs=inputs) -> None:
            inputs[k % len(inputs)].clear_grads()

        eager = median_ms(
            lambda i, steps=steps: steps[i % len(steps)](),
            device,
            warmup=args.warmup,
            repeats=args.repeats,
            untimed=reset,
        )
        kernel, via = kernel_median_ms(
            steps, device, reset=reset, warmup=args.warmup, repeats=args.repeats, method=args.kernel_timer
        )
        records.append(
            {
                "kind": case.kind,
                "shape": "x".join(map(str, case.shape)),
                "label": case.label,
                "impl": impl.key,
                "impl_name": impl.names[case.kind],
                "eager_ms": eager,
                "kernel_ms": kernel,
                "kernel_timer": via,
                "roofline_ms": ideal_ms,
            }
        )
        del inputs, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = next(r for r in records if r["impl"] == "a")
    for r in records:
        r["eager_ratio"] = ratio(r["eager_ms"], baseline["eager_ms"])
        r["kernel_ratio"] = ratio(r["kernel_ms"], baseline["kernel_ms"])
        r["eager_roofline_frac"] = ratio(ideal_ms, r["eager_ms"])
        r["kernel_roofline_frac"] = ratio(ideal_ms, r["kernel_ms"])
    return records


def results_table(records: list[dict]) -> str:
    headers = ["norm", "shape", "impl", "eager ms", "vs (a)", "roofline"]
    headers += ["kernel ms", "vs (a)", "roofline", "via"]
    rows = [
        [
            KIND_NAMES[r["kind"]],
            r["label"],
            f"({r['impl']}) {r['impl_name']}",
            fmt(r["eager_ms"], ".3f"),
            fmt_ratio(r["eager_ratio"]),
            fmt_percent(r["eager_roofline_frac"]),
            fmt(r["kernel_ms"], ".3f"),
            fmt_ratio(r["kernel_ratio"]),
            fmt_percent(r["kernel_roofline_frac"]),
            r["kernel_timer"],
        ]
        for r in records
    ]
    return format_table(headers, rows, left=3)


def evaluate_targets(records: list[dict], cases: list[Case]) -> list[dict]:
    """Issue 2's targets on the (B, T, D) cases: (d) eager ≤ 1.0× (a) at every D, and
    (d) kernel time ≥ 80% of the copy roofline at D ≥ 2048."""
    targets = []
    for case in cases:
        if len(case.shape) != 3 or case.width not in TARGET_WIDTHS:
            continue
        ours = next(r for r in records if (r["kind"], r["label"], r["impl"]) == (case.kind, case.label, "d"))
        name = f"{KIND_NAMES[case.kind]} {case.label}"
        value = ours["eager_ratio"]
        targets.append(
            {"target": f"{name}: (d) eager <= 1.00x (a)", "value": fmt_ratio(value), "pass": value <= 1.0}
        )
        frac = ours["kernel_roofline_frac"]
        if case.width >= 2048 and frac is not None:
            targets.append(
                {
                    "target": f"{name}: (d) kernel >= {TARGET_ROOFLINE:.0%} of roofline",
                    "value": fmt_percent(frac),
                    "pass": frac >= TARGET_ROOFLINE,
                }
            )
    return targets


# ---------------------------------------------------------------------------- main


def build_cases(args) -> list[Case]:
    cases = [
        Case(kind, (args.batch, args.seq, width), f"D={width}")
        for kind in ("layernorm", "rmsnorm")
        for width in args.widths
    ]
    if args.qk_heads > 0:
        shape = (args.batch, args.seq, args.qk_heads, args.qk_head_dim)
        cases.append(Case("rmsnorm", shape, f"q/k H={args.qk_heads} Dh={args.qk_head_dim}"))
    return cases


def parse_args(argv=None):
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--widths", default="768,2048,4096,8192", help="D of the (B, T, D) cases")
    parser.add_argument("--qk-heads", type=int, default=32, help="H of the 4-D q/k RMSNorm case (0: skip it)")
    parser.add_argument("--qk-head-dim", type=int, default=128, help="Dh of the 4-D q/k RMSNorm case")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls before each measurement")
    parser.add_argument("--input-sets", type=int, default=2, help="input sets to rotate over")
    parser.add_argument("--kernel-timer", default="auto", choices=KERNEL_TIMERS)
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-measuring copy")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--json", help="write rows, targets and environment to this JSON file")
    # Smoke path for machines without a GPU: tiny shapes, the torch fallback of hf_gns.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",") if w]
    if args.tiny:
        args.batch, args.seq, args.widths = 2, 16, [8, 40]
        args.qk_heads, args.qk_head_dim = 2, 16
        args.repeats, args.warmup, args.copy_gib = 5, 1, 1 / 64
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = require_device(args.device)
    torch.manual_seed(0)
    env = environment_info(device)
    print(format_environment(env))
    if not hasattr(F, "rms_norm"):
        print("F.rms_norm is missing in this torch: (a) for RMSNorm is plain torch ops")
    impls = implementations()
    cases = build_cases(args)

    # Correctness first: no timing for an op that computes the wrong thing.
    checks = [check_case(case, impls_for(case, impls), args.torch_dtype, device) for case in cases]
    if not all(checks):
        raise SystemExit("correctness check failed: not timing")

    bandwidth = copy_bandwidth(device, int(args.copy_gib * 2**30))
    print(f"copy bandwidth (read + write, {args.copy_gib:g} GiB copy, median): {bandwidth / 1e12:.3f} TB/s")
    print(
        f"{args.dtype}, fwd+bwd, median of {args.repeats} calls after {args.warmup}, "
        f"rotating {args.input_sets} input sets; roofline: {MIN_PASSES} x numel x elem bytes / copy bandwidth"
    )

    records = []
    for case in cases:
        records += bench_case(case, impls_for(case, impls), args, device, bandwidth)
    print()
    print(results_table(records))
    timers = sorted({r["kernel_timer"] for r in records})
    print(
        f"kernel ms via {', '.join(timers)} (graph: median CUDA-graph replay; profiler: mean summed kernels)"
    )

    targets = evaluate_targets(records, cases)
    if targets:
        print("\ntargets (issue 2):")
        print(
            format_table(
                ["target", "value", "status"],
                [[t["target"], t["value"], "PASS" if t["pass"] else "MISS"] for t in targets],
            )
        )
    if args.csv:
        write_csv(args.csv, records)
    if args.json:
        payload = {
            "environment": env,
            "dtype": args.dtype,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "rows": records,
            "targets": targets,
        }
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
