"""The batch-size controller: a policy's target, bounded and rounded to a batch the trainer can realize.

The controller speaks in GLOBAL EXAMPLES (sequences summed over every process and every
accumulated micro-batch of one optimizer step). A trainer with `world_size` processes and a
fixed per-device micro-batch of `micro_batch_size` examples realizes a global batch as

    global batch = world_size × per-device examples,
    per-device examples = micro_batch_size × n_accumulation          (granularity "micro_batch")
                        = any positive count, the last micro-batch cut (granularity "example")

so the realizable batches are the positive multiples of one unit: `world_size × micro_batch_size`
("micro_batch", the default: every micro-batch full) or `world_size` ("example"). Rounding is to
the NEAREST multiple of the unit, halves up, after clamping to [min, max]; the result is then
moved one unit inwards if rounding left the bounds. The constructor refuses bounds that hold no
multiple of the unit.

Pure Python: no torch, no torch.distributed, no transformers. Every process of a run holds its
own controller; they take the same decision at the same step because `update` is a pure
function of its arguments and the controller's state, and the trainer passes values that are
identical on every process (the step, the all-reduced token count, the all-reduced GNS).

Example:
```python
>>> from hf_gns.control import BatchSizeController, GNSPolicy
>>> controller = BatchSizeController(
...     GNSPolicy(multiplier=1.0), initial_batch_size=64, world_size=8, micro_batch_size=4,
...     min_batch_size=32, max_batch_size=1024, hysteresis=0.2, min_interval_steps=10,
... )
>>> controller.update(step=10, tokens_seen=1_000_000, gns=300.0)  # 300 rounds to 288 = 9 × 32
288
>>> controller.num_micro_batches  # per process: 288 / 8 = 36 examples = 9 micro-batches of 4
9
```
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

from .policies import BatchSizePolicy, ControlInputs

logger = logging.getLogger(__name__)

Granularity = Literal["micro_batch", "example"]
GRANULARITIES = ("micro_batch", "example")


@dataclass(frozen=True)
class BatchChange:
    """One change of the global batch: before the optimizer step `step + 1`, after `tokens_seen` tokens."""

    step: int
    tokens_seen: int
    old_batch_size: int
    new_batch_size: int
    gns: float | None


def realizable_batch_size(target: float, unit: int, min_batch_size: int, max_batch_size: float) -> int:
    """The multiple of `unit` nearest to `target` (halves up) within [`min_batch_size`, `max_batch_size`].

    Args:
        target (`float`): wanted global batch, in examples (> 0).
        unit (`int`): the realizable step, `world_size × micro_batch_size` or `world_size`.
        min_batch_size (`int`), max_batch_size (`int` or `math.inf`): bounds, in examples; at least one
            multiple of `unit` must lie between them.

    Returns:
        `int`: a positive multiple of `unit`.
    """
    clamped = min(max(target, min_batch_size), max_batch_size)
    multiples = math.floor(clamped / unit + 0.5)
    multiples = max(multiples, math.ceil(min_batch_size / unit))
    if math.isfinite(max_batch_size):
        multiples = min(multiples, int(max_batch_size // unit))
    return unit * multiples


class BatchSizeController:
    """Decides the global batch of each optimizer step from a policy; checkpointable.

    Args:
        policy (`BatchSizePolicy`):
            where the target comes from: `ConstantPolicy`, `LinearRampPolicy`, `GNSPolicy`,
            `DoublingPolicy`, `SchedulePolicy` or `ScheduleFilePolicy` (see `hf_gns.control.policies`).
        initial_batch_size (`int`):
            global examples of the first optimizer step (rounded to a realizable batch).
        world_size (`int`, *optional*, defaults to 1): data-parallel processes.
        micro_batch_size (`int`, *optional*, defaults to 1): examples per process per forward/backward.
        granularity (`str`, *optional*, defaults to `"micro_batch"`):
            `"micro_batch"`: global batches are multiples of `world_size × micro_batch_size`;
            `"example"`: multiples of `world_size` (the last micro-batch of a step may be partial).
        min_batch_size (`int`, *optional*): lower bound, examples; defaults to one unit.
        max_batch_size (`int`, *optional*): upper bound, examples; defaults to no bound.
        hysteresis (`float`, *optional*, defaults to 0.0):
            reactive policies (`gns`, `doubling`) change the batch only when the realizable target
            differs from the current batch by MORE than this fraction of it (0.2: a dead band of ±20%).
        min_interval_tokens (`int`, *optional*, defaults to 0), min_interval_steps (`int`, *optional*,
            defaults to 0): reactive policies change the batch only when both this many tokens and
            this many optimizer steps have passed since the last change (or since the start).
        monotonic (`bool`, *optional*, defaults to `False`): never decrease the batch.

    Schedule policies (`constant`, `linear`, user schedules) are followed exactly, after rounding:
    hysteresis and intervals apply to reactive policies only.
    """

    def __init__(
        self,
        policy: BatchSizePolicy,
        *,
        initial_batch_size: int,
        world_size: int = 1,
        micro_batch_size: int = 1,
        granularity: Granularity = "micro_batch",
        min_batch_size: int | None = None,
        max_batch_size: int | None = None,
        hysteresis: float = 0.0,
        min_interval_tokens: int = 0,
        min_interval_steps: int = 0,
        monotonic: bool = False,
    ):
        if world_size < 1 or micro_batch_size < 1:
            raise ValueError(
                f"world_size ({world_size}) and micro_batch_size ({micro_batch_size}) must be positive."
            )
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
        if hysteresis < 0 or min_interval_tokens < 0 or min_interval_steps < 0:
            raise ValueError(
                "hysteresis, min_interval_tokens and min_interval_steps must be >= 0, got "
                f"{hysteresis}, {min_interval_tokens}, {min_interval_steps}."
            )
        self.policy = policy
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.granularity = granularity
        self.unit = world_size * micro_batch_size if granularity == "micro_batch" else world_size
        self.min_batch_size = self.unit if min_batch_size is None else int(min_batch_size)
        self.max_batch_size = math.inf if max_batch_size is None else int(max_batch_size)
        if self.min_batch_size > self.max_batch_size or (
            math.ceil(self.min_batch_size / self.unit) * self.unit > self.max_batch_size
        ):
            raise ValueError(
                f"No realizable global batch lies in [min_batch_size={self.min_batch_size}, "
                f"max_batch_size={max_batch_size}]: global batches are multiples of {self.unit} "
                f"(world_size {world_size} × {self.unit // world_size} examples). "
                "Widen the bounds, use a smaller per-device micro-batch, or granularity='example'."
            )
        self.hysteresis = float(hysteresis)
        self.min_interval_tokens = int(min_interval_tokens)
        self.min_interval_steps = int(min_interval_steps)
        self.monotonic = monotonic
        self.batch_size = self.quantize(initial_batch_size)
        self.last_change_step = 0
        self.last_change_tokens = 0
        self.changes: list[BatchChange] = []
        self.held_steps = 0  # decisions that kept the batch because the GNS was not positive and finite

    # ---- what the trainer realizes ------------------------------------------------------

    def quantize(self, target: float) -> int:
        """`target` (global examples) bounded and rounded to the nearest realizable global batch."""
        return realizable_batch_size(target, self.unit, self.min_batch_size, self.max_batch_size)

    @property
    def per_device_examples(self) -> int:
        """Examples each process consumes in one optimizer step."""
        return self.batch_size // self.world_size

    @property
    def num_micro_batches(self) -> int:
        """Forward/backward passes per process in one optimizer step (the last one partial if needed)."""
        return -(-self.per_device_examples // self.micro_batch_size)

    # ---- the decision -------------------------------------------------------------------

    def interval_elapsed(self, step: int, tokens_seen: int) -> bool:
        """Whether a reactive policy may change the batch now (minimum interval since the last change)."""
        return (
            step - self.last_change_step >= self.min_interval_steps
            and tokens_seen - self.last_change_tokens >= self.min_interval_tokens
        )

    def needs_gns(self, step: int, tokens_seen: int) -> bool:
        """Whether `update` would read `gns` now; lets the trainer skip a host sync when it would not."""
        return self.policy.needs_gns and (
            not self.policy.reactive or self.interval_elapsed(step, tokens_seen)
        )

    def update(self, *, step: int, tokens_seen: int, gns: float | None = None) -> int:
        """Decide the global batch of the NEXT optimizer step.

        Args:
            step (`int`): optimizer steps completed so far.
            tokens_seen (`int`): global tokens consumed so far.
            gns (`float`, *optional*): current GNS estimate, in examples; `None` while unknown.

        Returns:
            `int`: the global batch, in examples (also `self.batch_size`).
        """
        if self.policy.reactive and not self.interval_elapsed(step, tokens_seen):
            return self.batch_size
        if self.policy.needs_gns and not self._usable_gns(gns, step):
            return self.batch_size
        inputs = ControlInputs(step=step, tokens_seen=tokens_seen, gns=gns, batch_size=self.batch_size)
        target = self.policy.target(inputs)
        if target is None or not math.isfinite(target) or target <= 0:
            return self.batch_size
        proposal = self.quantize(target)
        current = self.batch_size
        if proposal == current or (self.monotonic and proposal < current):
            return current
        if self.policy.reactive and abs(proposal - current) <= self.hysteresis * current:
            return current
        self.changes.append(BatchChange(step, tokens_seen, current, proposal, gns))
        self.batch_size = proposal
        self.last_change_step, self.last_change_tokens = step, tokens_seen
        return proposal

    def _usable_gns(self, gns: float | None, step: int) -> bool:
        """Whether a GNS-driven decision can be taken; otherwise the batch holds, logged once per stretch.

        The GNS is the ratio of two unbiased estimates, tr(Σ) and |G|², and either can come out
        negative over few or noisy steps: when the noise dominates, the |G|² estimate
        (B|G_B|² - s)/(B - 1) falls to or below zero. A negative, zero, infinite or NaN GNS means
        "not measurable yet", not "use a tiny batch": the batch holds until it is positive and finite.
        """
        if gns is not None and math.isfinite(gns) and gns > 0:
            if self.held_steps:
                logger.warning(
                    "hf_gns: the GNS is positive again (%.4g) at step %d: batch control resumes after %d "
                    "held decisions",
                    gns,
                    step,
                    self.held_steps,
                )
                self.held_steps = 0
            return True
        if gns is not None or step > 0:  # None at step 0: nothing measured yet, nothing to report
            if self.held_steps == 0:
                logger.warning(
                    "hf_gns: the GNS is %s at step %d (not positive and finite: the |G|^2 estimate is at or "
                    "below zero, estimator noise); holding the global batch at %d until it is",
                    "NaN (unknown)" if gns is None else f"{gns:.4g}",
                    step,
                    self.batch_size,
                )
            self.held_steps += 1
        return False

    # ---- checkpointing ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (ints, floats, lists, dicts, strings)."""
        return {
            "batch_size": self.batch_size,
            "last_change_step": self.last_change_step,
            "last_change_tokens": self.last_change_tokens,
            "changes": [
                [c.step, c.tokens_seen, c.old_batch_size, c.new_batch_size, c.gns] for c in self.changes
            ],
            "unit": self.unit,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict`; a batch saved under another world size or micro-batch is re-rounded."""
        self.batch_size = int(state["batch_size"])
        if state.get("unit") != self.unit:
            self.batch_size = self.quantize(self.batch_size)
        self.last_change_step = int(state["last_change_step"])
        self.last_change_tokens = int(state["last_change_tokens"])
        self.changes = [BatchChange(*change) for change in state["changes"]]
        self.policy.load_state_dict(state["policy"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(policy={self.policy!r}, batch_size={self.batch_size}, unit={self.unit}, "
            f"bounds=[{self.min_batch_size}, {self.max_batch_size}], hysteresis={self.hysteresis})"
        )
