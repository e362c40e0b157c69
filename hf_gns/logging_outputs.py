"""Training curves on disk: a CSV of what the Trainer logged, and PNG plots drawn from it.

`TrainingCurvesCallback` is a `transformers.TrainerCallback` that copies the keys GNSTrainer
logs (`gns`, `batch_size`, `tokens_seen`, ... see `CURVE_COLUMNS`, plus every `gns/<group>`)
and the loss into `<output_dir>/training_curves.csv`, one row per `Trainer.log` call, as
training runs. At the end of training it draws `plot_training_curves` next to it:

- `gns_batch_size.png`: GNS (total, calibrated when `gns_calibrate_every` is on, and per layer
  type) and the global batch size against tokens seen, both in examples (sequences), on a log
  scale: the controller aims the batch at the GNS, so the two belong on one axis;
- `loss.png`: training and evaluation loss against tokens seen.

`TokenProgressCallback` replaces the Trainer's step progress bar when the budget is in tokens:
under batch-size control the number of optimizer steps is not known in advance (it depends on
the batches the GNS will ask for), so a bar over steps keeps changing its total; a bar over
tokens has a fixed total (`max_tokens`) and an ETA from the measured token rate.

Plotting needs matplotlib (in the `dev` extra). Without it the CSV is still written and
`plot_training_curves` says how to get the plots.

Example:
```python
>>> trainer = GNSTrainer(..., callbacks=[TrainingCurvesCallback()])
>>> trainer.train()   # writes <output_dir>/training_curves.csv and the two PNGs
>>> plot_training_curves("outputs/train_gpt2/training_curves.csv")  # redraw later
```
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path

from tqdm.auto import tqdm
from transformers import TrainerCallback

CSV_NAME = "training_curves.csv"
GNS_PLOT_NAME = "gns_batch_size.png"
LOSS_PLOT_NAME = "loss.png"

# Columns in this order; then `gns/<group>` columns in sorted order, as they appear.
CURVE_COLUMNS = (
    "step",  # optimizer steps so far
    "epoch",
    "tokens_seen",  # cumulative global tokens
    "batch_size",  # global examples in the last optimizer step
    "batch_tokens",  # global tokens in it
    "loss",  # training loss, averaged over the steps since the previous log
    "learning_rate",
    "grad_norm",
    "gns",  # gradient noise scale, examples; negative/NaN: not measurable yet (|G|² estimate <= 0, README)
    "gns_tokens",  # the same in tokens (gns × tokens per example)
    "gns_sq_norm",  # EMA of the unbiased |G|² estimate
    "gns_trace_cov",  # EMA of the unbiased tr(Σ) estimate
    "gns_calibrated",  # norm-layer GNS × calibration ratio (gns_calibrate_every): what batch control follows
    "gns_calibration_ratio",  # all-layer GNS / norm-layer GNS, from the calibration steps
    "gns_ddp",  # classic two-batch-size estimate (DDP only, when enabled)
    "gns_skipped_steps",  # steps whose gradients were not finite, cumulative
    "tokens_per_second",  # global training throughput between two training logs (this callback's own)
    "eval_loss",
    "eval_perplexity",
)
GROUP_PREFIX = "gns/"
TYPE_GROUP_PREFIX = "gns/type/"


def _is_curve_key(key: str) -> bool:
    return key in CURVE_COLUMNS or key.startswith(GROUP_PREFIX)


def _ordered_columns(keys) -> list[str]:
    keys = set(keys)
    return [c for c in CURVE_COLUMNS if c in keys] + sorted(k for k in keys if k.startswith(GROUP_PREFIX))


class TrainingCurvesCallback(TrainerCallback):
    """Writes the logged GNS, batch size, loss and tokens to a CSV while training runs; plots it at the end.

    Only the main process writes. On resume the CSV is rebuilt from the restored
    `state.log_history`, so it continues the interrupted run's rows. Rows are appended as
    they are logged; when a new column appears (the first `gns/<group>` or `eval_loss`)
    the file is rewritten with the wider header.

    Args:
        csv_path (`str` or `os.PathLike`, *optional*): where to write. Defaults to
            `<output_dir>/training_curves.csv`.
        plot (`bool`, *optional*, defaults to `True`): draw the PNGs next to the CSV when training ends.
    """

    def __init__(self, csv_path: str | os.PathLike | None = None, plot: bool = True):
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.plot = plot
        self.rows: list[dict[str, float]] = []
        self.columns: list[str] = []
        self.plot_paths: list[Path] = []
        self._last_train_log: tuple[float, float] | None = None  # (time.perf_counter(), tokens_seen)
        self._tokens_seen: float | None = None

    # -- TrainerCallback ------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.csv_path is None:
            self.csv_path = Path(args.output_dir) / CSV_NAME
        self.rows, self._last_train_log, self._tokens_seen = [], None, None
        for entry in state.log_history:  # non-empty when resuming from a checkpoint
            self._add_row(entry, now=None)
        if state.is_world_process_zero:
            self._rewrite()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        row = self._add_row({**logs, "step": state.global_step}, now=time.perf_counter())
        if row is None or not state.is_world_process_zero:
            return
        if set(row) - set(self.columns):
            self._rewrite()
        else:
            with self.csv_path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot and state.is_world_process_zero and self.rows:
            self.plot_paths = plot_training_curves(self.csv_path)

    # -- rows -----------------------------------------------------------------------------------------

    def _add_row(self, entry: dict, now: float | None) -> dict | None:
        row = {k: v for k, v in entry.items() if _is_curve_key(k) and isinstance(v, (int, float))}
        if set(row) <= {"step", "epoch"}:  # e.g. the final train_runtime summary
            return None
        if "tokens_seen" in row:
            self._tokens_seen = row["tokens_seen"]
        elif self._tokens_seen is not None:  # evaluation logs: place them at the tokens trained so far
            row["tokens_seen"] = self._tokens_seen
        if "loss" in row and "tokens_seen" in row and now is not None:
            if self._last_train_log is not None:
                elapsed, tokens = now - self._last_train_log[0], row["tokens_seen"] - self._last_train_log[1]
                if elapsed > 0:
                    row["tokens_per_second"] = tokens / elapsed
            self._last_train_log = (now, row["tokens_seen"])
        self.rows.append(row)
        return row

    def _rewrite(self):
        self.columns = _ordered_columns(k for row in self.rows for k in row)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)


class TokenProgressCallback(TrainerCallback):
    """A progress bar over the token budget, with the GNS and the batch; prints one training log in `every`.

    The bar's total is `max_tokens` and its position the `tokens_seen` of the last training log
    (GNSTrainer logs it; with `logging_steps=1` the bar moves every step, with no extra host
    sync). Without a token budget it counts optimizer steps against `state.max_steps`, like the
    Trainer's own bar. The first training log and then one in `every` are printed above the
    bar, every evaluation log too; all of them still reach `trainer_state.json` and the CSV.
    Only the main process draws.

    Args:
        max_tokens (`int`, *optional*): the run's budget in global tokens; `None` counts steps.
        every (`int`, *optional*, defaults to 50): print one training log in this many.
    """

    def __init__(self, max_tokens: int | None = None, every: int = 50):
        self.max_tokens, self.every = max_tokens, every
        self.bar = None
        self.prediction_bar = None
        self.training_logs = 0
        self.postfix: dict[str, str] = {}

    def _position(self, state) -> int:
        if self.max_tokens is None:
            return state.global_step
        logged = [e["tokens_seen"] for e in state.log_history if "tokens_seen" in e]
        return int(logged[-1]) if logged else 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.training_logs = 0
        if not state.is_world_process_zero:
            return
        if self.max_tokens is None:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)
        else:  # unit_scale: 1.00M tokens; the initial part (a resumed run's past) is not in the rate
            self.bar = tqdm(total=self.max_tokens, initial=self._position(state), unit="tok",
                            unit_scale=True, dynamic_ncols=True)  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None and self.max_tokens is None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        if "loss" in logs:
            self.training_logs += 1
            if self.bar is not None:
                self._move(logs)
            if (self.training_logs - 1) % self.every:
                return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items() if k != "total_flos"}
        (self.bar.write if self.bar is not None else print)(str(text))

    def _move(self, logs: dict) -> None:
        if self.max_tokens is not None and "tokens_seen" in logs:
            self.bar.update(min(int(logs["tokens_seen"]), self.max_tokens) - self.bar.n)
        if "gns" in logs:  # calibrated when calibrating: the value the batch follows
            self.postfix["gns"] = f"{logs.get('gns_calibrated', logs['gns']):.4g}"
        if "batch_size" in logs:
            self.postfix["batch"] = str(logs["batch_size"])
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or not hasattr(eval_dataloader, "__len__"):
            return
        if self.prediction_bar is None:
            self.prediction_bar = tqdm(total=len(eval_dataloader), leave=self.bar is None, dynamic_ncols=True)
        self.prediction_bar.update(1)

    def _close_prediction_bar(self, state) -> None:
        if state.is_world_process_zero and self.prediction_bar is not None:
            self.prediction_bar.close()
        self.prediction_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_predict(self, args, state, control, **kwargs):
        self._close_prediction_bar(state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_training_curves(csv_path: str | os.PathLike) -> dict[str, list[float]]:
    """The CSV written by `TrainingCurvesCallback`, column by column; empty cells are NaN."""
    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns = rows[0].keys() if rows else []
    return {c: [float(row[c]) if row[c] not in ("", None) else math.nan for row in rows] for c in columns}


def _points(curves: dict[str, list[float]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) where both are finite."""
    pairs = [
        (x, y)
        for x, y in zip(curves.get(x_key, []), curves.get(y_key, []))
        if math.isfinite(x) and math.isfinite(y)
    ]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plotted_type_groups(curves: dict[str, list[float]], x_key: str = "tokens_seen") -> list[str]:
    """The `gns/type/<t>` columns drawn next to the total GNS.

    Per-type groups only: per-layer and per-module curves (dozens) stay in the CSV. A type whose
    series IS the total (only norm layers tracked: `gns/type/norm` == `gns`) would hide under the
    total's line and still be listed in the legend: it is left out.
    """
    total = _points(curves, x_key, "gns")
    keys = sorted(k for k in curves if k.startswith(TYPE_GROUP_PREFIX))
    return [key for key in keys if _points(curves, x_key, key) != total]


def plot_training_curves(csv_path: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draws `gns_batch_size.png` and `loss.png` from a `TrainingCurvesCallback` CSV.

    Args:
        csv_path (`str` or `os.PathLike`): the CSV.
        out_dir (`str` or `os.PathLike`, *optional*): where the PNGs go. Defaults to the CSV's directory.

    Returns:
        `list[pathlib.Path]`: the PNGs written; empty (with a printed message saying how to get
        them) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        print(f"matplotlib is not installed: no plots. `pip install matplotlib`, then hf_gns.logging_outputs."
              f"plot_training_curves({str(csv_path)!r})")  # fmt: skip
        return []
    curves = read_training_curves(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else Path(csv_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    x_key = "tokens_seen" if "tokens_seen" in curves else "step"
    x_label = "tokens seen" if x_key == "tokens_seen" else "optimizer step"
    written = []

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for key in plotted_type_groups(curves, x_key):
        layer_type = key[len(TYPE_GROUP_PREFIX) :]
        axes.plot(*_points(curves, x_key, key), linewidth=1, alpha=0.7, label=f"GNS, {layer_type} layers")
    axes.plot(*_points(curves, x_key, "gns"), color="black", linewidth=2, label="GNS (total)")
    if "gns_calibrated" in curves:  # what the batch follows when calibrating (the total is the norms')
        axes.plot(*_points(curves, x_key, "gns_calibrated"), color="tab:green", linewidth=2,
                  label="GNS, calibrated to every layer")  # fmt: skip
    if "gns_ddp" in curves:
        axes.plot(*_points(curves, x_key, "gns_ddp"), color="gray", linestyle=":", label="GNS (classic DDP)")
    axes.plot(*_points(curves, x_key, "batch_size"), color="tab:red", linewidth=2, drawstyle="steps-post",
              label="global batch size")  # fmt: skip
    if any(y > 0 for y in _points(curves, x_key, "gns")[1] + _points(curves, x_key, "batch_size")[1]):
        axes.set_yscale("log")
    axes.set(xlabel=x_label, ylabel="examples (sequences)", title="Gradient noise scale and batch size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    written.append(out_dir / GNS_PLOT_NAME)
    figure.savefig(written[-1], dpi=120)

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(*_points(curves, x_key, "loss"), label="train loss")
    axes.plot(*_points(curves, x_key, "eval_loss"), marker="o", label="eval loss")
    axes.set(xlabel=x_label, ylabel="loss (nats per token)", title="Loss")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    written.append(out_dir / LOSS_PLOT_NAME)
    figure.savefig(written[-1], dpi=120)
    return written
