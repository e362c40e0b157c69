"""benchmarks/_host_timeline.py: per-phase host ms of Trainer steps and the GC's runs (no training)."""

from __future__ import annotations

import gc
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from _host_timeline import _MARKS, PHASES, HostTimeline, format_timeline  # noqa: E402


def _step(timeline: HostTimeline, start: float, gaps_ms: list[float]) -> None:
    """Marks of one step at `start` s, the phases `gaps_ms` apart (the step's own marks only)."""
    timeline.steps.append({})
    t = start
    for name, gap in zip(_MARKS, [0.0, *gaps_ms[:-1]]):
        t += gap / 1e3
        timeline.steps[-1][name] = t


def test_phases_are_medians_between_consecutive_marks_closed_by_the_next_step():
    timeline = HostTimeline()
    gaps = [[1, 10, 20, 2, 3, 4, 5], [1, 12, 18, 2, 3, 4, 5], [3, 14, 16, 2, 3, 4, 5]]
    start = 0.0
    for g in gaps:
        _step(timeline, start, g)
        start += sum(g) / 1e3
    _step(timeline, start, gaps[0])  # closes the third step
    phases = timeline.phase_ms(0, 3)
    assert list(phases) == [*PHASES, "total"]
    assert phases["data"] == pytest.approx(1.0)
    assert phases["launch"] == pytest.approx(12.0)
    assert phases["wait"] == pytest.approx(18.0)
    assert phases["between"] == pytest.approx(5.0)
    assert phases["total"] == pytest.approx(45.0)
    assert timeline.phase_ms(1, 2)["launch"] == pytest.approx(13.0)  # steps 1 and 2 only
    assert timeline.phase_ms(3, 1) == {}  # the last step has no next begin


def test_marks_keep_the_first_micro_batch_and_wrap_marks_training_step_and_clipping():
    timeline = HostTimeline()

    class FakeTrainer:
        def training_step(self, *args):
            return "loss"

        def _clip_grad_norm(self, model):
            return 1.5

    trainer = FakeTrainer()
    timeline.wrap(trainer)
    timeline.mark("begin")
    assert trainer.training_step(None, {}) == "loss"
    first = dict(timeline.steps[-1])
    trainer.training_step(None, {})  # a second micro-batch: the first one's marks stay
    assert timeline.steps[-1]["step_in"] == first["step_in"]
    assert trainer._clip_grad_norm(None) == 1.5
    assert set(timeline.steps[-1]) == {"begin", "step_in", "step_out", "clip_in"}


def test_gc_runs_are_counted_only_while_recording():
    timeline = HostTimeline()
    automatic = gc.isenabled()
    gc.disable()  # only the collections below
    try:
        gc.collect(1)  # not recording: not counted
        timeline.start_gc_recording()
        gc.collect(0)
        gc.collect(2)
        timeline.stop_gc_recording()
        gc.collect(2)
    finally:
        if automatic:
            gc.enable()
    summary = timeline.gc_summary(n_steps=2)
    assert summary["gc0_runs"] == pytest.approx(0.5)
    assert summary["gc1_runs"] == 0
    assert summary["gc2_runs"] == pytest.approx(0.5)
    assert summary["gc2_ms"] > 0
    assert timeline._on_gc not in gc.callbacks
    line = format_timeline("llama124 gns", timeline.phase_ms(0, 1), summary)
    assert "gen2 0.50x" in line


def test_a_run_without_complete_steps_says_so():
    line = format_timeline("gpt2 trainer", {}, HostTimeline().gc_summary(1))
    assert "no step passed every mark" in line
