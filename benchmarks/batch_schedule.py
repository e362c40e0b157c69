"""Does batch-size control pay? Constant batches vs the linear ramp vs the `gns` policy, at one token budget.

    python benchmarks/batch_schedule.py --phase constant --out out/bs             # H200 call A (~6 min)
    python benchmarks/batch_schedule.py --phase adaptive --merge out/bs/results.json --out out/bs2  # call B
    python benchmarks/batch_schedule.py --from-json out/bs2/results.json --out out/report  # offline
    python benchmarks/batch_schedule.py --tiny --out /tmp/batch_schedule         # CPU smoke, ~1 min

(`--phase all`, the default, runs both phases in one command: more than one 10-minute device
call at the default budget on the H200, measured 2026-12-02: 116 s of data preparation, and
~40 ms a micro-batch per run with 5 runs sharing the GPU.)

Setup (issue 14, part 2):
- Corpus: every `.py` file installed on the machine (stdlib + site-packages, distinct
  files, see `_python_corpus.py`), so no token is seen twice within the budget; the
  character count is printed and written to `results.json`. Byte-level BPE of
  `hf_gns.data`, vocab 8192; held-out documents for the eval loss.
- Model: GPT-2, 4 layers, d=128, 4 heads, block 256: 1.87M parameters (tied embedding
  counted once); budget 20 tokens per parameter (~37M tokens; Hoffmann et al.'s
  compute-optimal ratio).
- Every run: the same D2Z token schedule (2% warmup, linear decay to zero at the budget),
  AdamW (β₂=0.95, weight decay 0.1, clip 1.0), bf16 on GPU, the LR scaled with the current
  global batch B as lr × √(B / 64) from one reference LR (2e-3 at B=64,
  `lr_batch_scaling="sqrt"`), eval loss on 128 held-out blocks at 32 evenly spaced token
  counts.
- Runs, 2 seeds each (the seed sets the initialization and the data order):
  phase 1, constant global batches 32, 64, 128, 256, 512 (8K to 131K tokens a step);
  then the practitioner's batch B_p is the constant batch whose mean final eval loss is
  within 1% of the best constant's and that takes the fewest steps (the largest such
  batch); phase 2, the linear ramp 32 → B_p over the budget, and the `gns` policy on the
  calibrated GNS (`gns_calibrate_every` at its default), multiplier 1, from 32, capped at
  B_p (issue 14's definition).
- The runs of a phase run as separate processes on the one GPU, 5 at a time (`--jobs`),
  smallest batches (most steps) first: concurrency changes wall time, not results. Each
  run is host-bound (a 1.9M-parameter model: ~40 ms a micro-batch on the H200 machine,
  5 runs sharing it), so a few share the GPU well; without MPS the GPU time-slices between
  processes, so more at once need not be faster. Every run stops at its phase's deadline
  (`--time-limit` for the whole command, 540 s: under the device's 10-minute limit) and is
  then marked INCOMPLETE in the table; a batch with an INCOMPLETE run is left out of B_p
  and the targets.

Reported per run: optimizer steps and tokens to reach each target eval loss (linear
interpolation between the two evaluations around the first crossing; "—" when not
reached), final eval loss; one table (printed, and `table.md`), `batch_schedule.png`
(steps vs tokens to each target: the constant batches trace the tradeoff curve of
McCandlish et al.; an adaptive schedule should sit below it), `results.json`, and the
issue's targets with PASS/MISS:
- the `gns` policy capped at B_p reaches B_p's final loss with ≥ 25% fewer tokens than B_p;
- against the best constant batch, to reach its final loss, the `gns` policy takes
  ≤ 1.1× its tokens and ≥ 30% fewer optimizer steps.
Targets pair runs by seed (same initialization and data order): the target loss of seed s
is the final loss of the constant run of seed s, reached by it with its whole budget; the
savings are averaged over seeds, and a target that a seed never reaches is a MISS.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # hf_gns from this checkout

from _lm_runs import SHAPES, RunSpec, launch, n_parameters  # noqa: E402
from _python_corpus import fitted_budget, prepare_token_data  # noqa: E402

TINY_ROOT_PACKAGES = ("asyncio", "email", "json", "xml", "logging", "concurrent")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (results.json, table.md, the PNG)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, stdlib subset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="constant global batches")
    parser.add_argument("--tokens-per-param", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=None, help="the budget (default: tokens-per-param)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak LR at the reference batch")
    parser.add_argument("--lr-reference-batch", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=64, help="largest micro-batch (examples)")
    parser.add_argument("--gns-multiplier", type=float, default=1.0)
    parser.add_argument("--calibrate-every", type=int, default=None, help="default: the trainer's")
    parser.add_argument(
        "--gns-cap",
        type=int,
        default=None,
        help="the adaptive runs' cap instead of B_p from constant runs (--phase all: every run at once)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="concurrent processes (0: in-process; GPU: 5)")
    parser.add_argument("--time-limit", type=float, default=540.0, help="seconds for the whole command")
    parser.add_argument("--data-dir", default=None, help="token data folder (default OUT/data, reused)")
    parser.add_argument(
        "--from-json", default=None, help="no runs: redo the table, verdicts and plot of a results.json"
    )
    parser.add_argument(
        "--phase",
        choices=["all", "constant", "adaptive"],
        default="all",
        help="constant: the constant sweep only; adaptive: the linear and gns runs, capped at B_p of the "
        "constant runs in --merge (the benchmark split over two device calls)",
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, help="results.json files of earlier calls to include"
    )
    return parser.parse_args(argv)


def configure(options: argparse.Namespace) -> dict:
    """Model, data and run settings for the GPU default or the CPU smoke run."""
    settings = _configure(options)
    if options.max_tokens:
        settings["budget"] = options.max_tokens
    return settings


def _configure(options: argparse.Namespace) -> dict:
    import sysconfig

    if options.tiny:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return dict(
            shape="tiny", vocab=512, batches=options.batches or [8, 16, 32, 64], device="cpu", bf16=False,
            roots=[str(stdlib / p) for p in TINY_ROOT_PACKAGES if (stdlib / p).is_dir()],
            max_chars=1_000_000, budget=16_000, n_evals=6, eval_blocks=32, micro=min(options.micro_batch, 16),
            jobs=0 if options.jobs is None else options.jobs,
        )  # fmt: skip
    import torch

    if not torch.cuda.is_available():
        sys.exit("batch_schedule.py needs a CUDA GPU; use --tiny for the CPU smoke run")
    params = n_parameters("small", 8192)
    return dict(
        shape="small", vocab=8192, batches=options.batches or [32, 64, 128, 256, 512], device="cuda",
        bf16=True, roots=None, max_chars=None, budget=int(options.tokens_per_param * params), n_evals=32,
        eval_blocks=128, micro=options.micro_batch, jobs=5 if options.jobs is None else options.jobs,
    )  # fmt: skip


# ---- analysis --------------------------------------------------------------------------------


def crossing(evals: list[dict], target: float) -> tuple[float, float] | None:
    """(steps, tokens) at the first evaluation-interpolated crossing of `target`, or None."""
    previous = None
    for point in evals:
        if point["loss"] <= target:
            if previous is None:
                return float(point["step"]), float(point["tokens"])
            frac = (previous["loss"] - target) / (previous["loss"] - point["loss"])
            steps = previous["step"] + frac * (point["step"] - previous["step"])
            return steps, previous["tokens"] + frac * (point["tokens"] - previous["tokens"])
        previous = point
    return None


def group_label(spec: dict) -> str:
    if spec["policy"] == "constant":
        return f"constant {spec['batch_size']}"
    if spec["policy"] == "linear":
        return f"linear {spec['batch_size']}→{spec['batch_size_end']}"
    return f"gns ≤{spec['batch_size_end']}"


def groups_of(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(group_label(result["spec"]), []).append(result)
    return groups


def final_loss(result: dict) -> float:
    return result["evals"][-1]["loss"] if result.get("evals") else math.nan


def mean_final(runs: list[dict]) -> float:
    return statistics.fmean(final_loss(r) for r in runs)


def practitioner_batch(constant_results: list[dict]) -> tuple[int, int, dict[int, float]]:
    """(B_p, B_best, mean final loss per batch): B_p is the largest batch within 1% of the best."""
    by_batch: dict[int, list[dict]] = {}
    for result in constant_results:
        by_batch.setdefault(result["spec"]["batch_size"], []).append(result)
    finals = {batch: mean_final(runs) for batch, runs in sorted(by_batch.items())}
    usable = {b: v for b, v in finals.items() if math.isfinite(v)}
    best = min(usable, key=usable.get)
    within = [b for b, v in usable.items() if v <= usable[best] * 1.01]
    return max(within), best, finals


def complete_constant_runs(results: list[dict]) -> list[dict]:
    """The constant runs of the batches whose every run finished its budget (a run cut by a deadline
    has a higher loss for want of tokens, not because of its batch)."""
    constant = [r for r in results if r["spec"]["policy"] == "constant" and not r.get("failed")]
    cut = {r["spec"]["batch_size"] for r in constant if not r.get("complete", True)}
    return [r for r in constant if r["spec"]["batch_size"] not in cut]


def to_target(runs: list[dict], target: float) -> dict:
    """Mean steps and tokens to `target` over the runs that reach it, and how many do."""
    hits = [c for c in (crossing(r["evals"], target) for r in runs) if c is not None]
    if not hits:
        return {"reached": 0, "of": len(runs), "steps": math.nan, "tokens": math.nan}
    return {
        "reached": len(hits),
        "of": len(runs),
        "steps": statistics.fmean(h[0] for h in hits),
        "tokens": statistics.fmean(h[1] for h in hits),
    }


def targets_of(finals: dict[int, float], b_p: int, b_best: int) -> dict[str, float]:
    best = finals[b_best]
    return {
        f"best+5% ({best * 1.05:.3f})": best * 1.05,
        f"final of B_p={b_p} ({finals[b_p]:.3f})": finals[b_p],
        f"final of best B={b_best} ({best:.3f})": best,
    }


def _paired(runs: list[dict], references: list[dict]) -> list[tuple[dict, dict]]:
    """Each run with the reference run of the same seed (same initialization and data order)."""
    by_seed = {r["spec"]["seed"]: r for r in references}
    return [(r, by_seed[r["spec"]["seed"]]) for r in runs if r["spec"]["seed"] in by_seed]


def issue_targets(groups: dict[str, list[dict]], b_p: int, b_best: int) -> list[str]:
    """The issue's two targets for each adaptive schedule, seed by seed against the constant runs.

    For seed s the target loss is the final eval loss of the constant run of seed s, which
    reaches it with all of its tokens and steps; the adaptive run of seed s reaches it after the
    interpolated tokens and steps of its first crossing (never: a MISS). Savings are averaged
    over seeds.
    """
    lines = []
    for label, runs in groups.items():
        if label.startswith("constant"):
            continue
        for batch, what in ((b_p, "practitioner"), (b_best, "best")):
            pairs = _paired(runs, groups[f"constant {batch}"])
            hits = [(crossing(run["evals"], final_loss(ref)), ref) for run, ref in pairs]
            reached = [(hit, ref) for hit, ref in hits if hit is not None]
            complete = bool(pairs) and len(reached) == len(pairs)
            token_ratio = statistics.fmean(h[1] / r["tokens"] for h, r in reached) if reached else math.nan
            step_ratio = (
                statistics.fmean(h[0] / r["optimizer_steps"] for h, r in reached) if reached else math.nan
            )
            seeds = f"reached by {len(reached)}/{len(pairs)} seeds"
            if what == "practitioner":
                ok = complete and token_ratio <= 0.75
                lines.append(
                    f"{_verdict(ok)}  {label} vs constant {b_p} (B_p): reaches its final loss with "
                    f"{_fewer(token_ratio)} tokens (target ≥ 25% fewer) and {_fewer(step_ratio)} steps; "
                    f"{seeds}"
                )
            else:
                ok = complete and token_ratio <= 1.1 and step_ratio <= 0.7
                lines.append(
                    f"{_verdict(ok)}  {label} vs constant {b_best} (best): reaches its final loss with "
                    f"{_times(token_ratio)} its tokens (target ≤ 1.1x) and {_fewer(step_ratio)} steps "
                    f"(target ≥ 30% fewer); {seeds}"
                )
    return lines


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "— (not reached)"


def _fewer(ratio: float) -> str:
    """0.62 -> "38% fewer", 1.25 -> "25% more"."""
    if not math.isfinite(ratio):
        return "— (not reached)"
    return f"{100 * (1 - ratio):.0f}% fewer" if ratio <= 1 else f"{100 * (ratio - 1):.0f}% more"


def table(groups: dict[str, list[dict]], targets: dict[str, float]) -> str:
    header = ["run", "seeds", "steps", "Mtok", "wall s", "final loss (seeds)"]
    header += [f"steps / Mtok to {name}" for name in targets]
    rows = [header, ["---"] * len(header)]
    for label, runs in groups.items():
        finals = [final_loss(r) for r in runs]
        flags = [
            " FAILED" if r.get("failed") else "" if r.get("complete", True) else " INCOMPLETE" for r in runs
        ]
        row = [
            label + "".join(sorted(set(flags))),
            str(len(runs)),
            f"{statistics.fmean(r.get('optimizer_steps', math.nan) for r in runs):.0f}",
            f"{statistics.fmean(r.get('tokens', math.nan) for r in runs) / 1e6:.2f}",
            f"{statistics.fmean(r.get('wall_s', math.nan) for r in runs):.0f}",
            f"{statistics.fmean(finals):.4f} ({', '.join(f'{f:.4f}' for f in finals)})",
        ]
        for target in targets.values():
            hit = to_target(runs, target)
            mark = "" if hit["reached"] == hit["of"] else f" ({hit['reached']}/{hit['of']})"
            row.append("—" if not hit["reached"] else f"{hit['steps']:.0f} / {hit['tokens'] / 1e6:.2f}{mark}")
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(groups: dict[str, list[dict]], targets: dict[str, float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(5.2 * (len(targets) + 1), 4.4), squeeze=False)
    _plot_batches(axes[0][-1], groups)
    for ax, (name, target) in zip(axes[0], targets.items()):
        curve, plotted = [], False
        for label, runs in groups.items():
            hits = [c for c in (crossing(r["evals"], target) for r in runs) if c is not None and c[0] > 0]
            if not hits:
                continue
            plotted = True
            xs, ys = [h[0] for h in hits], [h[1] / 1e6 for h in hits]
            if label.startswith("constant"):
                ax.scatter(xs, ys, color="tab:blue", s=14, alpha=0.6)
                curve.append((statistics.fmean(xs), statistics.fmean(ys), label.split()[1]))
            else:
                color = "tab:red" if label.startswith("gns") else "tab:green"
                ax.scatter(xs, ys, color=color, marker="*" if color == "tab:red" else "s", s=70, label=label)
        curve.sort()
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], color="tab:blue", label="constant batches")
            for x, y, batch in curve:
                ax.annotate(batch, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if plotted:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run reached it", ha="center", transform=ax.transAxes)
        ax.set_xlabel("optimizer steps to target")
        ax.set_ylabel("tokens to target (M)")
        ax.set_title(f"eval loss {name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_batches(ax, groups: dict[str, list[dict]]) -> None:
    """The adaptive runs' global batch and the GNS they saw (calibrated when calibrating) vs tokens."""
    for label, runs in groups.items():
        if label.startswith("constant"):
            continue
        color = "tab:red" if label.startswith("gns") else "tab:green"  # as in the other panels
        for index, run in enumerate(runs):
            points = [e for e in run["evals"] if e.get("batch_size")]
            tokens = [e["tokens"] / 1e6 for e in points]
            ax.step(tokens, [e["batch_size"] for e in points], where="post", color=color, alpha=0.8,
                    label=f"{label}: batch" if index == 0 else None)  # fmt: skip
            gns = [(e["tokens"] / 1e6, e.get("gns_calibrated") or e.get("gns")) for e in points]
            gns = [(t, g) for t, g in gns if g and g > 0 and label.startswith("gns")]
            if gns:
                ax.plot(*zip(*gns), color=color, linestyle=":", alpha=0.8,
                        label=f"{label}: GNS it follows" if index == 0 else None)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("global batch / GNS (examples)")
    ax.set_title("adaptive runs: batch and GNS (evaluation points)", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


# ---- the benchmark ---------------------------------------------------------------------------


def make_specs(
    options, settings, data_dir: Path, out: Path, deadline: float, cap: int | None
) -> list[RunSpec]:
    """Phase-1 constant runs (cap None) or the phase-2 adaptive runs capped at `cap`."""
    batches = settings["batches"]
    common = dict(
        data_dir=str(data_dir), shape=settings["shape"], max_tokens=settings["budget"],
        learning_rate=options.lr, lr_reference_batch=options.lr_reference_batch,
        n_evals=settings["n_evals"], eval_blocks=settings["eval_blocks"], device=settings["device"],
        bf16=settings["bf16"], deadline=deadline,
    )  # fmt: skip
    specs = []
    for seed in options.seeds:
        base = RunSpec(
            name="", out_dir="", policy="constant", seed=seed, batch_size=0, micro_batch=0, **common
        )
        if cap is None:
            for batch in batches:
                micro = min(batch, settings["micro"])
                if batch % micro:
                    sys.exit(f"constant batch {batch} is not a multiple of the micro-batch {micro}")
                name = f"constant-{batch}-seed{seed}"
                specs.append(
                    replace(base, name=name, out_dir=str(out / name), batch_size=batch, micro_batch=micro)
                )
            continue
        start = min(batches)
        for policy in ("linear", "gns"):
            name = f"{policy}-{start}-{cap}-seed{seed}"
            specs.append(
                replace(
                    base, name=name, out_dir=str(out / name), policy=policy, batch_size=start,
                    batch_size_end=cap, micro_batch=settings["micro"], gns_multiplier=options.gns_multiplier,
                    calibrate_every=options.calibrate_every,
                )
            )  # fmt: skip
    return specs


def environment() -> dict:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": gpu, "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv=None) -> dict:
    options = parse_args(argv)
    if options.from_json:
        summary = json.loads(Path(options.from_json).read_text())
        return report(summary, Path(options.out))
    if options.tiny:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matmuls: threads only contend (restored at the end)
        try:
            return run(options)
        finally:
            torch.set_num_threads(threads)
    return run(options)


def run(options: argparse.Namespace) -> dict:
    start = time.time()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = configure(options)
    params = n_parameters(settings["shape"], settings["vocab"])
    data_dir = Path(options.data_dir) if options.data_dir else out / "data"
    # the same held-out size as validate_calibration.py, so that --data-dir can share the folder
    eval_tokens = 128 * max(SHAPES[settings["shape"]][3], SHAPES["gpt2-124m"][3])
    meta = prepare_token_data(
        data_dir, train_tokens=int(settings["budget"] * 1.02) + 4096, eval_tokens=eval_tokens,
        vocab_size=settings["vocab"], roots=settings["roots"], max_chars=settings["max_chars"],
        allow_fewer=True,
    )  # fmt: skip
    corpus, budget = meta["corpus"], fitted_budget(meta, settings["budget"])
    if budget < settings["budget"]:
        print(
            f"WARNING: the installed Python sources hold only {meta['train_tokens_written']:,} training "
            f"tokens: budget cut from {settings['budget']:,} to {budget:,} tokens (no token repeats)"
        )
        settings["budget"] = budget
    print(
        f"corpus: {corpus['files_found']:,} .py files installed ({corpus['bytes_found'] / 1e6:.0f} MB), of "
        f"which {corpus['documents']:,} distinct files read, {corpus['characters'] / 1e6:.1f}M characters "
        f"({corpus['duplicates']:,} duplicates and {corpus['too_large']} files > 1 MB left out); "
        f"{meta['train_tokens_written'] / 1e6:.1f}M training tokens from "
        f"{meta['train_characters_used'] / 1e6:.1f}M characters ({meta['chars_per_token']:.2f} chars/token), "
        f"vocab {meta['vocab_size']}; prepared in {meta['seconds']}s (now {time.time() - start:.0f}s)"
    )
    print(
        f"model: GPT-2 {settings['shape']}, {params / 1e6:.2f}M params; budget {budget / 1e6:.2f}M tokens "
        f"({budget / params:.1f} tokens/parameter); lr {options.lr} × √(B/{options.lr_reference_batch}), "
        f"D2Z; seeds {options.seeds}; {environment()}"
    )
    limit_end = start + options.time_limit - 20  # room for the report
    prior: list[dict] = []
    for path in options.merge or []:  # runs of earlier calls (--phase constant), e.g. on another machine
        prior += json.loads(Path(path).read_text())["runs"]
    results: list[dict] = []
    cap = options.gns_cap
    phases = {"all": ["constant", "adaptive"], "constant": ["constant"], "adaptive": ["adaptive"]}
    phases = phases[options.phase]
    if cap is not None and phases == ["constant", "adaptive"]:
        phases = ["capped"]  # the cap is known: every run at once
    for phase in phases:
        remaining = limit_end - time.time()
        share = 0.6 if phase == "constant" and len(phases) > 1 else 1.0
        deadline = time.time() + share * remaining
        if phase == "constant":
            specs = make_specs(options, settings, data_dir, out, deadline, None)
        elif phase == "adaptive" and cap is not None:  # the cap given: only the adaptive runs
            specs = make_specs(options, settings, data_dir, out, deadline, cap)
        elif phase == "adaptive":
            constants = complete_constant_runs(prior + results)
            if not constants:
                sys.exit("no complete constant-batch run to choose the cap from (run --phase constant first)")
            cap, _, _ = practitioner_batch(constants)
            specs = make_specs(options, settings, data_dir, out, deadline, cap)
        else:
            specs = make_specs(options, settings, data_dir, out, deadline, None)
            specs += make_specs(options, settings, data_dir, out, deadline, cap)
        jobs = len(specs) if settings["jobs"] is None else settings["jobs"]
        t0 = time.time()
        how = "in-process" if jobs == 0 else f"{jobs} concurrent processes"
        print(f"{phase} phase, {len(specs)} runs ({how}), until {deadline - start:.0f} s ...")
        results += launch(specs, jobs)
        print(f"  done in {time.time() - t0:.0f}s")
    results = prior + results
    summary = {
        "environment": environment(), "corpus": meta,
        "settings": {k: v for k, v in settings.items() if k != "roots"}, "parameters": params,
        "runs": results,
    }  # fmt: skip
    summary = report(summary, out)
    summary["wall_s"] = time.time() - start
    (out / "results.json").write_text(json.dumps(summary))
    print(f"total wall time {summary['wall_s']:.0f}s")
    return summary


def report(summary: dict, out: Path) -> dict:
    """Table, verdicts and plot of `summary["runs"]` (printed and written to `out`); the summary
    with the analysis added. Also the offline path (`--from-json`)."""
    results = summary["runs"]
    ok = [r for r in results if not r.get("failed")]
    for failed in (r for r in results if r.get("failed")):
        print(f"FAILED {failed['spec']['name']}:\n{failed['log_tail']}")
    if not any(r["spec"]["policy"] == "constant" for r in ok):
        sys.exit("no constant-batch run completed: nothing to compare against (see the logs above)")
    constants = complete_constant_runs(ok)
    if not constants:
        sys.exit("no constant-batch run completed its budget: no B_p, no targets (see INCOMPLETE above)")
    left_out = sorted({r["spec"]["batch_size"] for r in ok if r["spec"]["policy"] == "constant"} - {
        r["spec"]["batch_size"] for r in constants})  # fmt: skip
    if left_out:
        print(f"WARNING: constant batches {left_out} have INCOMPLETE runs: left out of B_p and the targets")
    b_p, b_best, finals = practitioner_batch(constants)
    groups = groups_of(ok)
    targets = targets_of(finals, b_p, b_best)
    text = table(groups, targets)
    verdicts = issue_targets(groups, b_p, b_best)
    print(f"\npractitioner's batch B_p = {b_p} (best constant: {b_best}); mean final losses {finals}\n")
    print(text)
    print()
    for line in verdicts:
        print(line)
    for label, runs in groups.items():
        if not label.startswith("constant"):
            changes = [r.get("batch_changes", [])[-6:] for r in runs]
            keys = ("gns", "gns_calibrated", "gns_calibration_ratio")
            gns = [{k: r.get("final_gns", {}).get(k) for k in keys} for r in runs]
            print(f"{label}: last batch changes [step, tokens, batch] {changes}; final {gns}")
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(groups, targets, out / "batch_schedule.png")
    (out / "table.md").write_text(text + "\n\n" + "\n".join(verdicts) + "\n")
    print(f"\nwrote {out / 'table.md'}" + (f", {out / 'batch_schedule.png'}" if plotted else ""))
    summary.update(practitioner_batch=b_p, best_batch=b_best, mean_final_losses=finals)
    summary.update(targets=targets, verdicts=verdicts)
    return summary


if __name__ == "__main__":
    main()
