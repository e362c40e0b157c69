"""Batch-size policies: where a `BatchSizeController`'s target global batch comes from.

A policy maps `ControlInputs` (step, tokens seen, GNS, current batch; all global) to a target
global batch in examples, or `None` for "no opinion, keep the batch". The controller bounds and
rounds the target, and applies hysteresis and minimum intervals to REACTIVE policies (those
that respond to the GNS); schedules are followed as given.

- `ConstantPolicy(b)`: always b.
- `LinearRampPolicy(start, end, ramp_tokens)`: the schedule of Gray et al. 2024 (sec. 5): the
  batch grows linearly in tokens from `start` to `end` over `ramp_tokens`, then stays at `end`.
- `GNSPolicy(multiplier)`: multiplier × GNS. McCandlish et al. 2018 take B_simple as the
  critical batch; Merrill et al. 2025 ("Critical Batch Size Revisited") measure critical batches
  above it, hence the multiplier.
- `DoublingPolicy(threshold=2, factor=2)`: multiply the batch by `factor` whenever the GNS
  exceeds `threshold` × the current batch (Merrill et al. 2025's batch-size warmup, with the GNS
  standing in for their measured critical batch).
- `SchedulePolicy(points or callable)`: a user schedule, (tokens, batch) points or a function.
- `ScheduleFilePolicy(path)`: (tokens, batch) points in a CSV or JSON file, re-read when the file
  changes while training runs.

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlInputs:
    """What a policy may look at, identical on every process.

    Args:
        step (`int`): optimizer steps completed.
        tokens_seen (`int`): global tokens consumed so far.
        gns (`float`, *optional*): current gradient noise scale in examples, `None` while unknown.
        batch_size (`int`): the current global batch, in examples.
    """

    step: int
    tokens_seen: int
    gns: float | None
    batch_size: int


class BatchSizePolicy:
    """Base class. Subclasses set `reactive` / `needs_gns` and implement `target`."""

    reactive: bool = False  # responds to measurements: hysteresis and minimum intervals apply
    needs_gns: bool = False  # reads `inputs.gns` (the trainer pays one host sync per decision for it)

    def target(self, inputs: ControlInputs) -> float | None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConstantPolicy(BatchSizePolicy):
    """A fixed global batch of `batch_size` examples."""

    def __init__(self, batch_size: int):
        _check_positive("batch_size", batch_size)
        self.batch_size = batch_size

    def target(self, inputs: ControlInputs) -> float:
        return self.batch_size

    def __repr__(self) -> str:
        return f"ConstantPolicy({self.batch_size})"


class LinearRampPolicy(BatchSizePolicy):
    """Global batch growing linearly in tokens: `start` at `start_tokens`, `end` after `ramp_tokens` more.

    Args:
        start (`int`), end (`int`): global batches, in examples.
        ramp_tokens (`int`): tokens over which the batch grows (typically the whole budget, `max_tokens`).
        start_tokens (`int`, *optional*, defaults to 0): tokens before which the batch stays at `start`.
    """

    def __init__(self, start: int, end: int, ramp_tokens: int, start_tokens: int = 0):
        _check_positive("start", start)
        _check_positive("end", end)
        _check_positive("ramp_tokens", ramp_tokens)
        self.start, self.end, self.ramp_tokens, self.start_tokens = start, end, ramp_tokens, start_tokens

    def target(self, inputs: ControlInputs) -> float:
        progress = min(max((inputs.tokens_seen - self.start_tokens) / self.ramp_tokens, 0.0), 1.0)
        return self.start + (self.end - self.start) * progress

    def __repr__(self) -> str:
        return f"LinearRampPolicy({self.start} -> {self.end} over {self.ramp_tokens} tokens)"


class GNSPolicy(BatchSizePolicy):
    """Target `multiplier × GNS` (GNS in examples); keeps the batch while the GNS is unknown."""

    reactive = True
    needs_gns = True

    def __init__(self, multiplier: float = 1.0):
        _check_positive("multiplier", multiplier)
        self.multiplier = multiplier

    def target(self, inputs: ControlInputs) -> float | None:
        if inputs.gns is None or not inputs.gns > 0:  # also rejects NaN
            return None
        return self.multiplier * inputs.gns

    def __repr__(self) -> str:
        return f"GNSPolicy(multiplier={self.multiplier})"


class DoublingPolicy(BatchSizePolicy):
    """Multiply the batch by `factor` when the GNS exceeds `threshold` × the current batch."""

    reactive = True
    needs_gns = True

    def __init__(self, threshold: float = 2.0, factor: float = 2.0):
        _check_positive("threshold", threshold)
        if not factor > 1:
            raise ValueError(f"factor must be > 1 (the batch grows by it), got {factor}.")
        self.threshold, self.factor = threshold, factor

    def target(self, inputs: ControlInputs) -> float | None:
        if inputs.gns is None or not inputs.gns > self.threshold * inputs.batch_size:
            return None
        return self.factor * inputs.batch_size

    def __repr__(self) -> str:
        return f"DoublingPolicy(threshold={self.threshold}, factor={self.factor})"


Interpolation = Literal["step", "linear"]


class SchedulePolicy(BatchSizePolicy):
    """A user schedule: (tokens, batch) points, or a callable of `ControlInputs`.

    Args:
        schedule (`Sequence[tuple[int, int]]` or `Callable[[ControlInputs], float | None]`):
            points `(tokens_seen, global_batch)`, any order (they are sorted by tokens); before the
            first point the first batch holds. Or a function returning the target (or `None`).
        interpolation (`str`, *optional*, defaults to `"step"`):
            `"step"`: the batch of the last point at or below `tokens_seen`;
            `"linear"`: linear between neighbouring points.

    Example:
    ```python
    >>> SchedulePolicy([(0, 64), (1_000_000, 128), (5_000_000, 256)])
    >>> SchedulePolicy(lambda inputs: 64 if inputs.tokens_seen < 10**6 else 256)
    ```
    """

    def __init__(
        self,
        schedule: Sequence[tuple[float, float]] | Callable[[ControlInputs], float | None],
        interpolation: Interpolation = "step",
    ):
        if interpolation not in ("step", "linear"):
            raise ValueError(f"interpolation must be 'step' or 'linear', got {interpolation!r}.")
        self.interpolation = interpolation
        self.function = schedule if callable(schedule) else None
        self.points: list[tuple[int, float]] = [] if callable(schedule) else validate_points(schedule)

    def set_points(self, points: Sequence[tuple[float, float]]) -> None:
        self.points = validate_points(points)

    def target(self, inputs: ControlInputs) -> float | None:
        if self.function is not None:
            return self.function(inputs)
        return interpolate_points(self.points, inputs.tokens_seen, self.interpolation)

    def __repr__(self) -> str:
        what = (
            getattr(self.function, "__name__", "callable") if self.function else f"{len(self.points)} points"
        )
        return f"{type(self).__name__}({what}, interpolation={self.interpolation!r})"


class ScheduleFilePolicy(SchedulePolicy):
    """(tokens, batch) points read from a CSV or JSON file, re-read when the file changes.

    CSV: two columns `tokens,batch_size` (a header line is optional; `#` starts a comment).
    JSON: `[[tokens, batch_size], ...]`, `[{"tokens": t, "batch_size": b}, ...]` or
    `{"points": <either form>}`.

    `refresh()` re-reads the file when its modification time or size changed and returns whether
    the points changed; the trainer calls it every `reload_every_steps` optimizer steps (on the main
    process only when there are several, then broadcasts the points). A file that fails to parse
    during training keeps the previous points (with a warning): an editor's half-written save must
    not stop a run. At construction a bad file is an error.

    Args:
        path (`str` or `os.PathLike`): the file.
        interpolation (`str`, *optional*, defaults to `"step"`): as in `SchedulePolicy`.
        reload_every_steps (`int`, *optional*, defaults to 10): how often the trainer checks the file.
    """

    def __init__(
        self, path: str | os.PathLike, interpolation: Interpolation = "step", reload_every_steps: int = 10
    ):
        _check_positive("reload_every_steps", reload_every_steps)
        self.path = os.fspath(path)
        self.reload_every_steps = reload_every_steps
        self._signature: tuple[int, int] | None = None
        super().__init__(read_schedule_file(self.path), interpolation)
        self._signature = self._file_signature()

    def _file_signature(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; `True` when the points changed."""
        signature = self._file_signature()
        if signature is None or signature == self._signature:
            return False
        try:
            points = read_schedule_file(self.path)
        except (OSError, ValueError) as error:
            logger.warning(
                "hf_gns: keeping the previous batch schedule; %s could not be read: %s", self.path, error
            )
            return False
        self._signature = signature
        changed = points != self.points
        if changed:
            logger.info("hf_gns: batch schedule %s re-read: %d points", self.path, len(points))
            self.points = points
        return changed

    def state_dict(self) -> dict[str, Any]:
        return {"points": [list(point) for point in self.points]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The points in force at the checkpoint, so that a resumed run decides as the original did
        # until the file changes again.
        self.points = validate_points(state["points"])
        self._signature = self._file_signature()

    def __repr__(self) -> str:
        return f"ScheduleFilePolicy({self.path!r}, {len(self.points)} points, {self.interpolation!r})"


# ---- (tokens, batch) points ----------------------------------------------------------------


def validate_points(points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Points as sorted `(int tokens, float batch)` pairs; raises `ValueError` on bad input."""
    cleaned = []
    for point in points:
        if len(point) != 2:
            raise ValueError(f"a schedule point is (tokens, batch_size), got {point!r}.")
        tokens, batch = float(point[0]), float(point[1])
        if tokens < 0 or not batch > 0:
            raise ValueError(f"a schedule point needs tokens >= 0 and batch_size > 0, got {point!r}.")
        cleaned.append((int(tokens), batch))
    if not cleaned:
        raise ValueError("a batch-size schedule needs at least one (tokens, batch_size) point.")
    cleaned.sort()
    if len({tokens for tokens, _ in cleaned}) != len(cleaned):
        raise ValueError(f"two schedule points have the same token count: {cleaned}.")
    return cleaned


def interpolate_points(
    points: Sequence[tuple[int, float]], tokens_seen: int, interpolation: Interpolation
) -> float:
    """The schedule's batch at `tokens_seen` (first batch before the first point, last after the last)."""
    index = bisect.bisect_right([tokens for tokens, _ in points], tokens_seen) - 1
    if index < 0:
        return points[0][1]
    if interpolation == "step" or index == len(points) - 1:
        return points[index][1]
    (t0, b0), (t1, b1) = points[index], points[index + 1]
    return b0 + (b1 - b0) * (tokens_seen - t0) / (t1 - t0)


def read_schedule_file(path: str | os.PathLike) -> list[tuple[int, float]]:
    """(tokens, batch_size) points from a `.json` file, or CSV for any other suffix."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if os.fspath(path).endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("points")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of points or {{'points': [...]}}.")
        points = [(p["tokens"], p["batch_size"]) if isinstance(p, dict) else tuple(p) for p in data]
        return validate_points(points)
    rows = []
    for row in csv.reader(io.StringIO(text)):
        cells = [cell.strip() for cell in row]
        if not cells or not cells[0] or cells[0].startswith("#"):
            continue
        try:
            rows.append((float(cells[0]), float(cells[1])))
        except (ValueError, IndexError):
            if rows:  # only the first line may be a header
                raise ValueError(
                    f"{path}: bad schedule line {row!r}; expected 'tokens,batch_size'."
                ) from None
    return validate_points(rows)


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
