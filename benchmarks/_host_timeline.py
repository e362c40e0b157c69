"""Where a Trainer step's host time goes: phases between host clocks (no sync), and the GC's share.

The compiled GNSTrainer step runs 3-6 ms slower than the compiled Trainer's with ~2 ms more GPU
kernel time (issue 11): the device waits on the host. The Trainer syncs once a step (with
`logging_nan_inf_filter` it reads the loss right after `training_step`), so host time spent
before the device has work again is device idle time. This splits every step at the points the
Trainer's loop passes (callbacks, and wrappers around `training_step` and `_clip_grad_norm`):

    data      on_step_begin -> training_step entry      (hf_gns: counting, prepare_sinks)
    launch    training_step entry -> exit               (forward and backward queued; hf_gns's read)
    wait      training_step exit -> _clip_grad_norm     (the loss read: the step's sync)
    clip      _clip_grad_norm -> on_pre_optimizer_step  (gradient norm and clipping queued)
    optimizer on_pre_optimizer_step -> on_optimizer_step
    after     on_optimizer_step -> on_step_end          (scheduler, zero_grad)
    between   on_step_end -> next on_step_begin         (logging, the next batch)

and records the cyclic garbage collector's runs (count and ms per generation) over the same
steps. Host clocks only: the numbers are where the Python thread was, not what the GPU did.
"""

from __future__ import annotations

import gc
import statistics
import time

PHASES = ("data", "launch", "wait", "clip", "optimizer", "after", "between")
# the marks that open each phase, in loop order (the last phase closes at the next step's "begin")
_MARKS = ("begin", "step_in", "step_out", "clip_in", "pre_optimizer", "optimizer", "end")


class HostTimeline:
    """Host timestamps of the loop's marks per optimizer step, and GC runs while `recording`."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self.recording = False
        self.gc_ms = [0.0, 0.0, 0.0]
        self.gc_runs = [0, 0, 0]
        self._gc_start = None

    # -- marks ---------------------------------------------------------------

    def mark(self, name: str) -> None:
        if name == "begin":
            self.steps.append({})
        if self.steps and name not in self.steps[-1]:  # first micro-batch's mark only
            self.steps[-1][name] = time.perf_counter()

    def wrap(self, trainer) -> None:
        """Mark entry and exit of `trainer.training_step` and entry of `trainer._clip_grad_norm`."""
        training_step, clip = trainer.training_step, trainer._clip_grad_norm

        def timed_training_step(*args, **kwargs):
            self.mark("step_in")
            try:
                return training_step(*args, **kwargs)
            finally:
                self.mark("step_out")

        def timed_clip(*args, **kwargs):
            self.mark("clip_in")
            return clip(*args, **kwargs)

        trainer.training_step, trainer._clip_grad_norm = timed_training_step, timed_clip

    # -- garbage collector -----------------------------------------------------

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            if self.recording:
                generation = info.get("generation", 2)
                self.gc_ms[generation] += 1e3 * (time.perf_counter() - self._gc_start)
                self.gc_runs[generation] += 1
            self._gc_start = None

    def start_gc_recording(self) -> None:
        if not self.recording:
            self.recording = True
            gc.callbacks.append(self._on_gc)

    def stop_gc_recording(self) -> None:
        if self.recording:
            self.recording = False
            gc.callbacks.remove(self._on_gc)

    # -- summary -----------------------------------------------------------------

    def phase_ms(self, first: int, count: int) -> dict[str, float]:
        """Median ms of each phase over steps `first` .. `first + count - 1` (0-based, each needing
        the next step's begin)."""
        rows = []
        for k in range(first, min(first + count, len(self.steps) - 1)):
            marks, following = self.steps[k], self.steps[k + 1]
            if not all(name in marks for name in _MARKS) or "begin" not in following:
                continue
            times = [marks[name] for name in _MARKS] + [following["begin"]]
            rows.append([1e3 * (b - a) for a, b in zip(times, times[1:])])
        if not rows:
            return {}
        medians = {phase: statistics.median(r[i] for r in rows) for i, phase in enumerate(PHASES)}
        medians["total"] = statistics.median(sum(r) for r in rows)
        return medians

    def gc_summary(self, n_steps: int) -> dict[str, float]:
        """GC runs and ms per step, by generation, over the recorded steps."""
        per_step = max(n_steps, 1)
        summary = {f"gc{g}_runs": self.gc_runs[g] / per_step for g in range(3)}
        summary.update({f"gc{g}_ms": self.gc_ms[g] / per_step for g in range(3)})
        return summary


def format_timeline(title: str, phases: dict[str, float], gc_stats: dict[str, float]) -> str:
    """One line of phase medians (ms) and GC runs and ms per step."""
    gc_part = ", ".join(
        f"gen{g} {gc_stats.get(f'gc{g}_runs', 0):.2f}x {gc_stats.get(f'gc{g}_ms', 0):.2f} ms"
        for g in range(3)
    )
    if not phases:  # e.g. max_grad_norm 0: the Trainer never calls _clip_grad_norm
        return f"  {title}: no step passed every mark (clipping off?); GC per step {gc_part}"
    parts = [f"{p} {phases[p]:.2f}" for p in (*PHASES, "total") if p in phases]
    return f"  {title}: host ms/step {' | '.join(parts)}; GC per step {gc_part}"
