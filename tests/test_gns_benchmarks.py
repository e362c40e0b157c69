"""benchmarks/batch_schedule.py and validate_calibration.py: analysis on made-up runs, CPU smoke runs."""

import json
import math
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

import hf_gns

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import batch_schedule  # noqa: E402
import validate_calibration  # noqa: E402


def _run(policy, batch, seed, losses, tokens_per_eval=100, end=None):
    """A made-up result: evaluations every `tokens_per_eval` tokens at the given losses."""
    evals = [
        {"step": i * tokens_per_eval // batch, "tokens": i * tokens_per_eval, "loss": loss}
        for i, loss in enumerate(losses)
    ]
    spec = {"policy": policy, "batch_size": batch, "batch_size_end": end, "seed": seed}
    return {"spec": spec, "evals": evals, "tokens": evals[-1]["tokens"], "optimizer_steps": evals[-1]["step"]}


def test_crossing_interpolates_between_evaluations():
    run = _run("constant", 10, 0, [5.0, 4.0, 3.0, 2.5])
    assert batch_schedule.crossing(run["evals"], 3.5) == pytest.approx((15.0, 150.0))
    assert batch_schedule.crossing(run["evals"], 2.5) == pytest.approx((30.0, 300.0))
    assert batch_schedule.crossing(run["evals"], 6.0) == (0.0, 0.0)
    assert batch_schedule.crossing(run["evals"], 2.0) is None


def test_practitioner_batch_and_the_issue_targets():
    constants = [
        _run("constant", 10, 0, [5.0, 3.0, 2.00]),
        _run("constant", 10, 1, [5.0, 3.0, 2.02]),
        _run("constant", 20, 0, [5.0, 3.2, 2.015]),
        _run("constant", 20, 1, [5.0, 3.2, 2.025]),
        _run("constant", 40, 0, [5.0, 3.5, 2.20]),
        _run("constant", 40, 1, [5.0, 3.5, 2.20]),
    ]
    b_p, b_best, finals = batch_schedule.practitioner_batch(constants)
    assert (b_p, b_best) == (20, 10)  # 20 is within 1% of the best and takes fewer steps; 40 is not
    assert finals[20] == pytest.approx(2.02)
    # seed 0 reaches 2.015 (its B_p run's final loss) at 137.5 tokens, seed 1 2.025 at 112.5: on
    # average 37.5% fewer than the B_p runs' 200; the best runs' finals at 0.875x and 0.625x the
    # steps of the B=10 runs: 25% fewer on average, short of 30%
    gns = [
        _run("gns", 10, 0, [5.0, 2.03, 1.99], end=20),
        _run("gns", 10, 1, [5.0, 2.03, 1.99], end=20),
    ]
    groups = batch_schedule.groups_of(constants + gns)
    assert list(groups) == ["constant 10", "constant 20", "constant 40", "gns ≤20"]
    verdicts = batch_schedule.issue_targets(groups, b_p, b_best)
    assert verdicts[0].startswith("PASS") and "38% fewer tokens" in verdicts[0], verdicts
    assert "25% more steps" in verdicts[0] and "25% fewer steps" in verdicts[1], verdicts
    assert verdicts[1].startswith("MISS") and "0.75x its tokens" in verdicts[1], verdicts
    table = batch_schedule.table(groups, batch_schedule.targets_of(finals, b_p, b_best))
    assert table.count("\n") == 5 and "constant 40" in table


def test_runs_cut_by_the_deadline_do_not_choose_the_cap():
    """A constant batch with an INCOMPLETE run is left out of B_p (device call 3 picked B_p from
    runs that had one step: their loss was the initial loss)."""
    complete = [_run("constant", 10, 0, [5.0, 3.0, 2.0]), _run("constant", 20, 0, [5.0, 3.1, 2.01])]
    cut = _run("constant", 40, 0, [5.0, 4.0]) | {"complete": False}
    kept = batch_schedule.complete_constant_runs(complete + [cut, _run("gns", 10, 0, [5.0, 2.0], end=20)])
    assert kept == complete
    assert batch_schedule.practitioner_batch(kept)[:2] == (20, 10)


@pytest.fixture
def quiet_torch_backend():
    hf_logging.set_verbosity_error()
    with hf_gns.use_backend("torch"):  # the pure-torch norm path: fast on CPU
        yield


def test_batch_schedule_tiny_smoke(tmp_path, quiet_torch_backend):
    """One seed, the cap given (one phase): every run completes and the outputs are written."""
    argv = ["--tiny", "--out", str(tmp_path), "--seeds", "0", "--batches", "8", "32", "--gns-cap", "32"]
    summary = batch_schedule.main(argv + ["--max-tokens", "8000"])
    runs = summary["runs"]
    names = ["constant-8-seed0", "constant-32-seed0", "linear-8-32-seed0", "gns-8-32-seed0"]
    assert [r["spec"]["name"] for r in runs] == names
    for run in runs:
        assert run["complete"] and not run.get("failed")
        assert run["tokens"] >= summary["settings"]["budget"]
        assert run["evals"][0]["tokens"] == 0 and run["evals"][-1]["tokens"] == run["tokens"]
    gns_run = runs[-1]
    assert gns_run["final_gns"]["gns_calibration_ratio"] > 0  # calibration is on by default for policy gns
    assert (tmp_path / "batch_schedule.png").stat().st_size > 0
    assert "| constant 8 |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["corpus"]["corpus"]["characters"] > 100_000


def test_validate_calibration_tiny_smoke(tmp_path, quiet_torch_backend):
    argv = ["--tiny", "--out", str(tmp_path), "--every", "1", "4", "--throughput-steps", "10"]
    summary = validate_calibration.main(argv + ["--max-tokens", "12000"])
    every_step, every_4, sparse_4 = summary["replays"]  # the trainer's schedule, then without dense start
    # calibrating every step reproduces the all-layer GNS exactly (the replay uses the trainer's units)
    assert every_step["max"] < 1e-9
    steps = summary["reference"]["optimizer_steps"]
    assert every_4["dense_steps"] > steps and every_4["calibration_steps"] == steps  # a tiny run: all dense
    assert sparse_4["dense_steps"] == 0 and sparse_4["calibration_steps"] == math.ceil(steps / 4)
    online = summary["online"]["evals"][-1]
    assert online["gns_calibrated"] == pytest.approx(online["gns"] * online["gns_calibration_ratio"])
    assert all(run["timing"]["steps"] == 10 for run in summary["throughput"])
    assert "calibration costs" in (tmp_path / "validation.md").read_text()


class _Launched(Exception):
    """Stops a benchmark at its first launch: the test only needs what it would run."""


def _record_launches(monkeypatch, module) -> list[str]:
    names: list[str] = []

    def launch(specs, jobs):
        names.extend(spec.name for spec in specs)
        raise _Launched

    monkeypatch.setattr(module, "launch", launch)
    return names


def test_batch_schedule_adaptive_phase_with_a_given_cap_runs_only_the_adaptive_runs(
    tmp_path, monkeypatch, quiet_torch_backend
):
    """`--phase adaptive --gns-cap B` skips choosing B_p and runs no constant batch again
    (it once re-ran them all, and the re-runs that hit the deadline polluted the table)."""
    names = _record_launches(monkeypatch, batch_schedule)
    argv = ["--tiny", "--out", str(tmp_path), "--seeds", "0", "--batches", "8", "32", "--max-tokens", "8000"]
    with pytest.raises(_Launched):
        batch_schedule.main(argv + ["--phase", "adaptive", "--gns-cap", "32"])
    assert names == ["linear-8-32-seed0", "gns-8-32-seed0"]


def test_validate_calibration_accuracy_only_launches_no_throughput_run(tmp_path, monkeypatch):
    names = _record_launches(monkeypatch, validate_calibration)
    with pytest.raises(_Launched):
        validate_calibration.main(
            ["--tiny", "--out", str(tmp_path), "--accuracy-only", "--max-tokens", "8000"]
        )
    assert names == ["all-layers", "calibrated"]
    with pytest.raises(SystemExit, match="exclude each other"):
        validate_calibration.main(["--tiny", "--out", str(tmp_path), "--accuracy-only", "--throughput-only"])
