"""hf_gns.logging_outputs: the training-curves CSV written as logs arrive, its resume, and the plots."""

from __future__ import annotations

import csv
import math
import sys
from types import SimpleNamespace

import pytest
from transformers import TrainerState

from hf_gns import logging_outputs
from hf_gns.logging_outputs import (
    CSV_NAME,
    GNS_PLOT_NAME,
    LOSS_PLOT_NAME,
    TokenProgressCallback,
    TrainingCurvesCallback,
    plot_training_curves,
    plotted_type_groups,
    read_training_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _train_log(step: int, gns: float, groups: bool = True) -> dict:
    logs = {"loss": 5.0 - 0.1 * step, "learning_rate": 1e-3, "gns": gns, "gns_tokens": gns * 64}
    logs.update({"batch_size": 8 * step, "batch_tokens": 512 * step, "tokens_seen": 1000 * step})
    if groups:
        logs.update({"gns/type/norm": gns, "gns/layer/0": 2 * gns})
    return logs


def _read_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def clock(monkeypatch):
    """time.perf_counter under test control."""
    now = SimpleNamespace(value=100.0)
    monkeypatch.setattr(logging_outputs.time, "perf_counter", lambda: now.value)
    return now


def _run_logs(callback, state, args, entries, clock):
    for step, logs in entries:
        clock.value += 2.0  # two seconds between logs
        state.global_step = step
        state.log_history.append({**logs, "step": step})  # Trainer.log stores a copy before on_log
        callback.on_log(args, state, None, logs=dict(logs))


def test_rows_columns_throughput_and_eval_placement(tmp_path, clock):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState()
    callback = TrainingCurvesCallback()
    callback.on_train_begin(args, state, None)
    entries = [
        (1, _train_log(1, 3.0, groups=False)),  # no group column yet
        (2, _train_log(2, 4.0)),  # new columns: the file is rewritten with a wider header
        (2, {"eval_loss": 4.5, "eval_perplexity": math.exp(4.5), "eval_runtime": 0.3}),
        (3, _train_log(3, 5.0)),
        (3, {"train_runtime": 9.0, "train_loss": 4.8}),  # the end-of-training summary: no row
    ]
    _run_logs(callback, state, args, entries, clock)

    path = tmp_path / CSV_NAME
    rows = _read_rows(path)
    header = list(rows[0].keys())
    assert header[:6] == ["step", "tokens_seen", "batch_size", "batch_tokens", "loss", "learning_rate"]
    assert header[-2:] == ["gns/layer/0", "gns/type/norm"]  # group columns last, sorted
    assert "eval_runtime" not in header and "train_runtime" not in header
    assert [row["step"] for row in rows] == ["1", "2", "2", "3"]
    assert rows[0]["gns/type/norm"] == "" and float(rows[1]["gns/type/norm"]) == 4.0
    assert float(rows[2]["eval_loss"]) == 4.5 and rows[2]["loss"] == ""
    assert float(rows[2]["tokens_seen"]) == 2000  # evaluation placed at the tokens trained so far
    # throughput between training logs: 1000 tokens in 2 s, then 1000 tokens in 4 s (an eval in between)
    assert rows[0]["tokens_per_second"] == ""
    assert float(rows[1]["tokens_per_second"]) == pytest.approx(500.0)
    assert float(rows[3]["tokens_per_second"]) == pytest.approx(250.0)

    curves = read_training_curves(path)
    assert curves["gns"][:2] == [3.0, 4.0] and math.isnan(curves["gns"][2])
    assert curves["batch_size"] == [8.0, 16.0, pytest.approx(math.nan, nan_ok=True), 24.0]


def test_resume_rebuilds_the_csv_from_the_restored_log_history(tmp_path, clock):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState()
    first = TrainingCurvesCallback()
    first.on_train_begin(args, state, None)
    _run_logs(first, state, args, [(1, _train_log(1, 3.0)), (2, _train_log(2, 4.0))], clock)
    full = _read_rows(tmp_path / CSV_NAME)

    # A resumed run: the checkpoint's log_history holds step 1 only; the CSV on disk is stale.
    resumed_state = TrainerState(log_history=[dict(state.log_history[0])])
    resumed = TrainingCurvesCallback()
    resumed.on_train_begin(args, resumed_state, None)
    assert [row["step"] for row in _read_rows(tmp_path / CSV_NAME)] == ["1"]
    _run_logs(resumed, resumed_state, args, [(2, _train_log(2, 4.0))], clock)
    again = _read_rows(tmp_path / CSV_NAME)
    drop = {"tokens_per_second"}  # wall-clock dependent
    assert [{k: v for k, v in r.items() if k not in drop} for r in again] == [
        {k: v for k, v in r.items() if k not in drop} for r in full
    ]


def test_only_the_main_process_writes(tmp_path, clock):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState(is_world_process_zero=False)
    callback = TrainingCurvesCallback()
    callback.on_train_begin(args, state, None)
    _run_logs(callback, state, args, [(1, _train_log(1, 3.0))], clock)
    callback.on_train_end(args, state, None)
    assert not (tmp_path / CSV_NAME).exists()
    assert len(callback.rows) == 1


def test_plots_are_pngs_drawn_at_train_end(tmp_path, clock):
    pytest.importorskip("matplotlib")
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState()
    callback = TrainingCurvesCallback()
    callback.on_train_begin(args, state, None)
    entries = [(s, _train_log(s, 2.0 + s)) for s in range(1, 6)]
    entries.append((5, {"eval_loss": 4.0, "eval_perplexity": math.exp(4.0)}))
    _run_logs(callback, state, args, entries, clock)
    callback.on_train_end(args, state, None)
    assert callback.plot_paths == [tmp_path / GNS_PLOT_NAME, tmp_path / LOSS_PLOT_NAME]
    for path in callback.plot_paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000

    other = tmp_path / "elsewhere"
    assert plot_training_curves(tmp_path / CSV_NAME, other) == [other / GNS_PLOT_NAME, other / LOSS_PLOT_NAME]


def test_without_matplotlib_the_plot_function_says_what_to_do(tmp_path, clock, monkeypatch, capsys):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState()
    callback = TrainingCurvesCallback()
    callback.on_train_begin(args, state, None)
    _run_logs(callback, state, args, [(1, _train_log(1, 3.0))], clock)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert plot_training_curves(tmp_path / CSV_NAME) == []
    assert "pip install matplotlib" in capsys.readouterr().out
    assert (tmp_path / CSV_NAME).exists()


def test_a_type_group_equal_to_the_total_is_not_drawn_under_it(tmp_path, clock):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = TrainerState()
    callback = TrainingCurvesCallback(plot=False)
    callback.on_train_begin(args, state, None)
    _run_logs(callback, state, args, [(s, _train_log(s, 2.0 + s)) for s in range(1, 4)], clock)
    assert plotted_type_groups(read_training_curves(tmp_path / CSV_NAME)) == []  # norms only: == gns
    every_layer = [(s, {**_train_log(s, 2.0 + s), "gns/type/mlp": 9.0 * s}) for s in range(4, 6)]
    _run_logs(callback, state, args, every_layer, clock)
    assert plotted_type_groups(read_training_curves(tmp_path / CSV_NAME)) == ["gns/type/mlp"]


class _Bar:
    def __init__(self, total=None, initial=0, **kwargs):
        self.total, self.n, self.written, self.postfix, self.closed = total, initial, [], {}, False

    def update(self, n):
        assert n >= 0, "the bar never moves backwards"
        self.n += n

    def set_postfix(self, postfix, refresh=True):
        self.postfix = dict(postfix)

    def write(self, text):
        self.written.append(text)

    def close(self):
        self.closed = True


def test_the_progress_bar_counts_tokens_against_a_fixed_budget(monkeypatch):
    # Under batch control the number of steps is unknown in advance: a step bar's total kept
    # jumping (3907 -> 1959 -> 3897 ...) as the batch moved. The token bar's total never changes.
    monkeypatch.setattr(logging_outputs, "tqdm", _Bar)
    callback = TokenProgressCallback(max_tokens=10_000, every=2)
    state = TrainerState()
    state.log_history = [{"step": 3, "loss": 1.0, "tokens_seen": 768}]  # resumed at 768 tokens
    callback.on_train_begin(None, state, None)
    bar = callback.bar
    assert (bar.total, bar.n) == (10_000, 768)
    positions, step, tokens = [], 3, 768
    for batch in (4, 8, 4, 16, 64):  # the batch goes up and down; the total stays, the position grows
        step, tokens = step + 1, tokens + batch * 64
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(
            None, state, None, logs={"loss": 2.0, "gns": 12.5, "batch_size": batch, "tokens_seen": tokens}
        )
        positions.append(bar.n)
    assert bar.total == 10_000 and positions == sorted(positions) and bar.n == tokens
    assert bar.postfix == {"gns": "12.5", "batch": "64"}
    callback.on_log(None, state, None, logs={"eval_loss": 9.0})
    # one training log in `every` is printed (the 1st, 3rd, 5th), and every evaluation
    assert [text.split(",")[0].rstrip("}") for text in bar.written] == [
        "{'loss': '2'", "{'loss': '2'", "{'loss': '2'", "{'eval_loss': '9'"
    ]  # fmt: skip
    callback.on_train_end(None, state, None)
    assert bar.closed and callback.bar is None


def test_without_a_token_budget_the_bar_counts_steps(monkeypatch):
    monkeypatch.setattr(logging_outputs, "tqdm", _Bar)
    callback = TokenProgressCallback(max_tokens=None)
    state = TrainerState()
    state.max_steps = 20
    callback.on_train_begin(None, state, None)
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
    assert (callback.bar.total, callback.bar.n) == (20, 3)
