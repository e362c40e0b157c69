"""Is the calibrated norm-layer GNS the all-layer GNS? And what does calibration cost?

    python benchmarks/validate_calibration.py --out outputs/validate_calibration   # GPU, ~2-3 min
    python benchmarks/validate_calibration.py --tiny --out /tmp/validate_calibration  # CPU smoke

Issue 14's target: the calibrated norm GNS within 10% of the all-layer GNS (measured
every step) after the first 10% of tokens, at ≤ 3% throughput cost against norms-only
tracking. Three parts:

1. Accuracy, offline on one reference run. A run with `gns_track="all"` (every layer
   measured every step, constant batch, the model, corpus and budget of
   `batch_schedule.py`) records every step's statistics in synchronized-gradient units
   (`GNSTrainer.last_step_statistics`: Σ_i |c_i|² and |G_B|² per group). From them the
   script computes exactly what GNSTrainer computes with `gns_calibrate_every=N`: the
   norm layers' GNSEstimator every step, `GNSCalibration(N)` fed on steps 0, N, 2N, ...
   with the groups (all, norms), and the calibrated GNS; against the reference all-layer
   GNS (the same estimator over every layer, every step), for several N at once. Each
   step after the first 10% of tokens counts; the target asks every one within 10%.
   (Switching the linear reductions off between calibration steps does not change the
   training numerics, so the offline replay is the online computation on this run.)
2. The trainer path, online: a second run (same seed) with `gns_track="norms"` and
   calibration at the trainer's default interval logs `gns_calibrated`; it is compared at
   the evaluation points with the reference run's all-layer GNS (different runs: they
   agree statistically, not bitwise).
3. Throughput, in isolation (one process at a time), on the GPT-2 124M shape (8192-token
   vocab, block 512, batch 16): norms only, norms + calibration every N (default), every
   layer every step; tokens/s over the steps after a warmup.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # hf_gns from this checkout

from _lm_runs import SHAPES, RunSpec, launch, n_parameters  # noqa: E402
from _python_corpus import fitted_budget, prepare_token_data  # noqa: E402

from hf_gns.gns import GNSCalibration, GNSEstimator  # noqa: E402
from hf_gns.trainer.arguments import DEFAULT_CALIBRATE_EVERY  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run")
    parser.add_argument("--every", type=int, nargs="+", default=[1, 5, 10, 25, 50], help="intervals replayed")
    parser.add_argument("--batch", type=int, default=64, help="constant global batch of the accuracy runs")
    parser.add_argument("--tokens-per-param", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=None, help="the budget (default: tokens-per-param)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="gns_ema_decay (per example)")
    parser.add_argument("--throughput-shape", default=None, help="model shape of part 3 (default gpt2-124m)")
    parser.add_argument("--throughput-steps", type=int, default=100)
    parser.add_argument(
        "--data-dir", default=None, help="token data folder (e.g. batch_schedule.py's OUT/data)"
    )
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole command")
    parser.add_argument(
        "--throughput-only", action="store_true", help="part 3 only (its data prepares in seconds)"
    )
    parser.add_argument(
        "--accuracy-only",
        action="store_true",
        help="parts 1 and 2 only, with the whole --time-limit: they may share the GPU with other "
        "work, the throughput runs (part 3) may not; run them with --throughput-only on a quiet GPU",
    )
    parser.add_argument(
        "--replay-from",
        default=None,
        help="no runs: part 1 only, replayed from an all-layer run's result.json (OUT/all/result.json)",
    )
    return parser.parse_args(argv)


def replay(steps: list[dict], every: int, decay: float, budget: int, dense: bool = True) -> dict:
    """Replay calibration every `every` steps on recorded statistics as GNSTrainer schedules it (the
    dense start of one EMA window first, unless `dense` is False); errors after 10% of `budget`."""
    reference = GNSEstimator(["all"], decay)
    norms = GNSEstimator(["norms"], decay)
    calibration = GNSCalibration(every, decay, dense_examples=None if dense else 0)
    errors, ratios, trace = [], [], []
    for index, step in enumerate(steps):
        batch = step["batch_size"]
        calibration.observe_batch(batch)
        small = [batch * step["example_sq_norm_sum"][g] for g in ("total", "type/norm")]
        big = [step["batch_sq_norm"][g] for g in ("total", "type/norm")]
        reference.update([small[0]], [big[0]], big_batch=batch)
        norms.update([small[1]], [big[1]], big_batch=batch)
        if calibration.is_calibration_step(index):
            calibration.update(small, big, big_batch=batch, step=index)
        truth = reference.gns_tensor()[0].item()
        calibrated = calibration.calibrate(norms.gns_tensor()[0]).item()
        trace.append((step["tokens"], truth, calibrated))
        if step["tokens"] >= 0.1 * budget:
            errors.append(abs(calibrated / truth - 1) if truth > 0 else math.inf)
            ratios.append(norms.gns_tensor()[0].item() / truth)
    finite = [e if math.isfinite(e) else math.inf for e in errors]
    return {
        "every": every,
        "dense_steps": calibration.dense_steps if dense else 0,
        "calibration_steps": calibration.steps,
        "steps_scored": len(errors),
        "median": statistics.median(finite) if finite else math.nan,
        "p90": sorted(finite)[int(0.9 * (len(finite) - 1))] if finite else math.nan,
        "max": max(finite) if finite else math.nan,
        "within_10pct": sum(e <= 0.10 for e in finite) / max(1, len(finite)),
        "norms_over_all": [ratios[0], ratios[len(ratios) // 2], ratios[-1]] if ratios else [],
        "reference_final_gns": reference.gns_tensor()[0].item(),
        "trace": trace,
    }


def throughput_specs(
    options, data_dir: Path, out: Path, shape: str, device: str, bf16: bool, deadline: float
):
    block = SHAPES[shape][3]
    batch = 16 if shape != "tiny" else 8
    warmup = 10
    steps = warmup + options.throughput_steps
    variants = [
        ("norms only", "norms", 0),
        (f"calibrated (every {DEFAULT_CALIBRATE_EVERY})", "norms", DEFAULT_CALIBRATE_EVERY),
        ("all layers", "all", 0),
    ]
    specs = []
    for label, track, every in variants:
        name = "throughput-" + label.split()[0]
        specs.append(
            RunSpec(
                name=name, out_dir=str(out / name), data_dir=str(data_dir), shape=shape, policy="constant",
                seed=0, batch_size=batch, micro_batch=batch, max_tokens=steps * batch * block,
                learning_rate=options.lr, lr_reference_batch=batch, gns_track=track,
                calibrate_every=every, n_evals=1, eval_blocks=4, device=device, bf16=bf16, deadline=deadline,
                timing_from_step=warmup,
                # the steady state: the dense start (all layers) is costed from the "all layers" row
                extra_args={"gns_ema_decay": options.ema_decay, "gns_calibrate_dense_examples": 0},
            )
        )  # fmt: skip
    return [label for label, _, _ in variants], specs


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.accuracy_only and options.throughput_only:
        raise SystemExit(
            "--accuracy-only and --throughput-only exclude each other: pass one, or neither for all parts"
        )
    if options.replay_from:
        return replay_only(options)
    if options.tiny:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: threads only contend
        try:
            return run(options)
        finally:
            torch.set_num_threads(threads)
    return run(options)


def accuracy_lines(ref_result: dict, replays: list[dict]) -> list[str]:
    logged = ref_result["final_gns"].get("gns")
    complete = ref_result.get("complete", True)
    lines = [
        f"reference run: {len(ref_result['steps'])} steps, {ref_result['tokens'] / 1e6:.2f}M tokens"
        f"{'' if complete else ' (INCOMPLETE: deadline)'}; all-layer GNS at the end "
        f"{replays[0]['reference_final_gns']:.4g} replayed vs {logged:.4g} logged by the trainer",
        "",
        "| every N | dense start (steps) | calibration steps | steps scored | median err | p90 err | max err "
        "| within 10% | norms/all at 10% / 55% / 100% | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in replays:
        ratios = " / ".join(f"{x:.3f}" for x in r["norms_over_all"])
        lines.append(
            f"| {r['every']} | {r['dense_steps'] or 'none'} | {r['calibration_steps']} | {r['steps_scored']} "
            f"| {100 * r['median']:.1f}% | {100 * r['p90']:.1f}% | {100 * r['max']:.1f}% "
            f"| {100 * r['within_10pct']:.0f}% | {ratios} | {'PASS' if r['max'] <= 0.10 else 'MISS'} |"
        )
    return lines


def replays_of(steps: list[dict], everies: list[int], decay: float, budget: int) -> list[dict]:
    """The trainer's schedule (dense start, then every N) for each N, then sparse-only for comparison."""
    dense = [replay(steps, every, decay, budget, dense=True) for every in everies]
    return dense + [replay(steps, every, decay, budget, dense=False) for every in everies if every > 1]


def plot_replays(replays: list[dict], every: int, path: Path) -> bool:
    """Calibrated GNS (every N, with and without the dense start) and the all-layer GNS vs tokens."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    chosen = [r for r in replays if r["every"] == every]
    if not chosen:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    tokens = [t / 1e6 for t, _, _ in chosen[0]["trace"]]
    truth = [value for _, value, _ in chosen[0]["trace"]]
    ax.plot(tokens, truth, color="black", label="all layers, every step")
    for r in chosen:
        label = f"norms × r, calibrating every {every}" + (
            f" after a dense start ({r['dense_steps']} steps)" if r["dense_steps"] else " from step 0"
        )
        ax.plot(tokens, [c for _, _, c in r["trace"]], label=label, alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("GNS (examples)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def online_lines(online_result: dict, ref_result: dict) -> list[str]:
    lines = [
        f"online (trainer, calibrating every {DEFAULT_CALIBRATE_EVERY}) vs the reference's all-layer GNS:",
        "| tokens (M) | gns_calibrated | all-layer gns (reference) | rel. diff | gns (norms) "
        "| norm group of the reference | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mine, ref in zip(online_result["evals"][1:], ref_result["evals"][1:]):
        cal, truth = mine.get("gns_calibrated"), ref.get("gns")
        diff = f"{100 * (cal / truth - 1):+.1f}%" if cal and truth else "—"
        lines.append(
            f"| {mine['tokens'] / 1e6:.2f} | {_g(cal)} | {_g(truth)} | {diff} | {_g(mine.get('gns'))} "
            f"| {_g(ref.get('gns_norm_group'))} | {_g(mine.get('gns_calibration_ratio'))} |"
        )
    return lines


def throughput_lines(
    labels: list[str], timings: list[dict], shape: str, examples: int, ema_decay: float
) -> list[str]:
    block = SHAPES[shape][3]
    lines = [
        f"throughput, GPT-2 {shape} shape, batch {timings[0]['spec']['batch_size']} × {block}:",
        "| tracking | tokens/s | vs norms only |",
        "| --- | --- | --- |",
    ]
    rates = []
    for label, result in zip(labels, timings):
        timing = result.get("timing") or {}
        if result.get("failed") or not timing.get("seconds"):
            rates.append(math.nan)
            lines.append(f"| {label} | FAILED | |")
            continue
        rates.append(timing["steps"] * result["spec"]["batch_size"] * block / timing["seconds"])
        lines.append(f"| {label} | {rates[-1]:,.0f} | {rates[-1] / rates[0]:.3f}x |")
    if len(rates) == 3 and all(math.isfinite(r) for r in rates):
        cost = 1 - rates[1] / rates[0]
        all_cost = 1 - rates[2] / rates[0]
        # over a run of `examples`: the dense start (one EMA window) at the all-layer cost, then steady
        dense = min(1.0, round(1 / (1 - ema_decay)) / examples)
        run_cost = dense * all_cost + (1 - dense) * cost
        verdict = "PASS" if run_cost <= 0.03 else "MISS"
        lines.append(
            f"{verdict}  calibration costs {100 * cost:.1f}% of norms-only throughput after its dense start; "
            f"over a run of {examples:,} examples (the validation budget), with the dense start "
            f"({100 * dense:.0f}% of it) at the all-layer cost ({100 * all_cost:.1f}%): "
            f"{100 * run_cost:.1f}% (target ≤ 3%)"
        )
    return lines


def run(options: argparse.Namespace) -> dict:
    import torch

    start = time.time()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if options.tiny:
        import sysconfig

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        shape, vocab, device, bf16, budget = "tiny", 512, "cpu", False, 24_000
        roots, max_chars, jobs = [str(stdlib / "json"), str(stdlib / "email")], 600_000, 0
        throughput_shape = options.throughput_shape or "tiny"
        batch = min(options.batch, 16)
    else:
        if not torch.cuda.is_available():
            sys.exit("validate_calibration.py needs a CUDA GPU; use --tiny for the CPU smoke run")
        shape, vocab, device, bf16 = "small", 8192, "cuda", True
        budget = int(options.tokens_per_param * n_parameters(shape, vocab))
        roots, max_chars, jobs = None, None, 2
        throughput_shape = options.throughput_shape or "gpt2-124m"
        batch = options.batch
    if options.max_tokens:
        budget = options.max_tokens
    data_dir = Path(options.data_dir) if options.data_dir else out / "data"
    eval_tokens = 128 * max(SHAPES[shape][3], SHAPES[throughput_shape][3])
    # --throughput-only: only the throughput runs' tokens (seconds to prepare, not minutes)
    throughput_tokens = (10 + options.throughput_steps) * 16 * SHAPES[throughput_shape][3]
    meta = prepare_token_data(
        data_dir, train_tokens=int((throughput_tokens if options.throughput_only else budget) * 1.02) + 4096,
        eval_tokens=eval_tokens, vocab_size=vocab, roots=roots, max_chars=max_chars, allow_fewer=True,
    )  # fmt: skip
    if options.throughput_only:
        pass
    elif fitted_budget(meta, budget) < budget:
        fitted = fitted_budget(meta, budget)
        print(f"WARNING: the corpus is short: budget cut from {budget:,} to {fitted:,} tokens (no repeats)")
        budget = fitted
    # alone, the accuracy runs leave 40% of the time to the throughput runs
    accuracy_deadline = start + (
        options.time_limit - 15 if options.accuracy_only else 0.6 * options.time_limit
    )
    common = dict(
        data_dir=str(data_dir), shape=shape, policy="constant", seed=0, batch_size=batch,
        micro_batch=min(batch, 64), max_tokens=budget, learning_rate=options.lr, lr_reference_batch=batch,
        n_evals=16, eval_blocks=32, device=device, bf16=bf16, deadline=accuracy_deadline,
        extra_args={"gns_ema_decay": options.ema_decay},
    )  # fmt: skip
    reference = RunSpec(
        name="all-layers", out_dir=str(out / "all"), gns_track="all", record_steps=True, **common
    )
    online = RunSpec(  # its per-step statistics too: the norm layers' as tracked on off-steps
        name="calibrated", out_dir=str(out / "calibrated"), calibrate_every=DEFAULT_CALIBRATE_EVERY,
        record_steps=True, **common,
    )  # fmt: skip
    lines, replays = [], []
    if options.throughput_only:
        ref_result = online_result = {"failed": True, "log_tail": "not run (--throughput-only)", "spec": {}}
    else:
        print(f"accuracy runs: GPT-2 {shape}, batch {batch}, {budget / 1e6:.2f}M tokens; {meta['corpus']}")
        t0 = time.time()
        ref_result, online_result = launch([reference, online], jobs)
        print(f"  done in {time.time() - t0:.0f}s")
    for result in (ref_result, online_result):
        if result.get("failed") and not options.throughput_only:
            lines.append(f"FAILED {result['spec']['name']}:\n{result['log_tail']}")
    if not ref_result.get("failed"):
        replays = replays_of(ref_result["steps"], options.every, options.ema_decay, budget)
        lines += accuracy_lines(ref_result, replays) + [""]
        plot_replays(replays, DEFAULT_CALIBRATE_EVERY, out / "calibration_replay.png")
    if not (ref_result.get("failed") or online_result.get("failed")):
        lines += online_lines(online_result, ref_result) + [""]
    timings = []
    if not options.accuracy_only:
        labels, specs = throughput_specs(
            options, data_dir, out, throughput_shape, device, bf16, start + options.time_limit - 15
        )
        timings = launch(specs, 1 if jobs else 0)  # one process at a time: no contention
        lines += throughput_lines(
            labels, timings, throughput_shape, budget // SHAPES[shape][3], options.ema_decay
        )
    text = "\n".join(lines)
    print(text)
    (out / "validation.md").write_text(text + "\n")
    ref_result.pop("steps", None)  # large; the replays summarize them (OUT/all/result.json keeps them)
    online_result.pop("steps", None)
    summary = {
        "replays": [{k: v for k, v in r.items() if k != "trace"} for r in replays], "reference": ref_result,
        "online": online_result, "throughput": timings,
        "corpus": meta, "wall_s": time.time() - start,
    }  # fmt: skip
    (out / "validation.json").write_text(json.dumps(summary))
    print(f"wrote {out / 'validation.md'}; total wall time {time.time() - start:.0f}s")
    return summary


def replay_only(options: argparse.Namespace) -> dict:
    """Part 1 (accuracy) offline, from a recorded all-layer run; writes validation_replay.md and the PNG."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_result = json.loads(Path(options.replay_from).read_text())
    budget = ref_result["spec"]["max_tokens"]
    decay = ref_result["spec"]["extra_args"].get("gns_ema_decay", options.ema_decay)
    replays = replays_of(ref_result["steps"], options.every, decay, budget)
    text = "\n".join(accuracy_lines(ref_result, replays))
    print(text)
    (out / "validation_replay.md").write_text(text + "\n")
    plot_replays(replays, DEFAULT_CALIBRATE_EVERY, out / "calibration_replay.png")
    return {"replays": [{k: v for k, v in r.items() if k != "trace"} for r in replays]}


def _g(x) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


if __name__ == "__main__":
    main()
