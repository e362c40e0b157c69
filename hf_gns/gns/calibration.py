"""Calibrating the norm layers' GNS to the whole model's with occasional all-layer steps.

Why. The GNS of the normalization layers follows the whole model's in shape but not in
level (DESIGN.md section 6; issue 14: on non-repeating data the ratio norms/total falls
from ~0.7 to ~0.13 in the first 10% of tokens, then holds). A factor that settles early
can be measured on a few steps: every `every` optimizer steps (steps 0, every, 2·every,
...) one step also measures every Linear/Conv1D/Embedding layer, and

    calibrated GNS = B_norms × r,

B_norms the every-step GNS of the norm layers (`GNSEstimator`) and r the ratio below.

What r is. On a calibration step the trainer has, for two groups measured on the SAME
examples — `all` (every tracked parameter: norms, linears, embeddings) and `norms` (the
norm-layer parameters) — the step's two squared-norm statistics, hence unbiased per-step
estimates of |G|² and tr(Σ) for each group (`estimator.py`). A `GNSEstimator` fed on
calibration steps only averages each of the four components by its own bias-corrected
EMA (EMA_c), and

    r = [EMA_c tr(Σ)_all / EMA_c |G|²_all] / [EMA_c tr(Σ)_norms / EMA_c |G|²_norms].

Why this ratio, and not another:
- Not a ratio of single-step GNS estimates, nor an EMA of such ratios. A step's |G|²
  estimate, (B·|G_B|² − s)/(B − 1), is a difference of two nearly equal numbers when
  B ≪ GNS: its relative noise is of order GNS/B, it is often near zero or negative, and a
  ratio of such values has heavy tails and a bias (E[1/X] ≠ 1/E[X]) that no averaging
  removes. As for the GNS itself (DESIGN.md section 2): average the components, divide once.
- Numerator and denominator from the same steps and the same window, not EMA_c(all) over
  the every-step EMA of the norms. The two groups are measured on the same examples in the
  same backward pass, so their sampling noise is strongly correlated (the logs of the two
  GNS correlate at 0.97-0.99 over whole runs, issue 14) and largely cancels in r; and while
  the GNS grows both EMAs lag it by the same amount, which cancels too. Mixing windows
  would leave both the noise and the lag in r.
- The every-step B_norms (the lowest-noise, most recent estimate) carries the level's
  movement; r, which moves slowly, carries only the factor.

Window. A calibration step enters its EMA with the weight of the examples it stands for,
its own B times the steps until the next calibration step, at the per-example decay
`ema_decay` (by default the every-step estimator's): r then averages over the same span of
training as the B_norms it scales, from 1/`every` of its steps (so its noise is about
√every times B_norms'). With `every` = 1 and the same decay, B_norms × r equals the
all-layer GNS exactly.

Dense start. The first steps, until `dense_examples` examples (by default one EMA window,
1/(1 − ema_decay)), are ALL calibration steps; then one step in `every`. Why: early in
training the ratio moves fast and single steps can be far off the trend (a loss spike during
LR warmup); a sparse sample that happens to hold such a step gives it `every` times its
weight, one that misses it leaves it out, and the EMA carries the error for a whole window.
Measured on the H200 (GPT-2 4×128, batch 64, issue 14's validation run, replayed): calibrating
every 10 steps from step 0, the calibrated GNS was 33% off the all-layer GNS at 10% of the
budget and within 10% on only 61% of the steps after it; with the dense start (157 steps
here) every step after 10% of the budget was within 6% (max 5-15% over five phases of the
sparse schedule). The dense phase costs what all-layer tracking costs, for one window
of examples (a few % of a typical budget); after it, calibration costs 1/`every` of that.

r is unknown (NaN) before the first calibration step and whenever one of the four EMAs
is not positive (an |G|² EMA ≤ 0 means B ≪ GNS for that group: the level is not
measurable yet), and so is the calibrated GNS: a controller keeps its batch on NaN.

Pure math on tensors, no sync except in the explicit readers; tested on CPU directly.
"""

from __future__ import annotations

import torch

from .estimator import GNSEstimator, Number

CALIBRATION_GROUPS = ("all", "norms")


class GNSCalibration:
    """The calibration factor r = B_all / B_norms from occasional all-layer steps (see module docstring).

    Args:
        every (`int`): after the dense start, a calibration step every this many optimizer steps
            (steps 0, every, 2·every, ...); 0 turns calibration off (`is_calibration_step` is always
            `False`, r stays NaN).
        ema_decay (`float`, *optional*, defaults to `0.9999`): decay per example of training; each
            calibration step weighs its B times the steps it stands for (until the next one).
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where the state lives.
        dense_examples (`int`, *optional*): calibrate on every step until about this many
            examples (`observe_batch` turns it into steps from the first step's batch); defaults to
            one EMA window, `round(1 / (1 - ema_decay))`; 0: sparse from the start.

    Example:
    ```python
    >>> calibration = GNSCalibration(every=10, ema_decay=0.9999)
    >>> if calibration.is_calibration_step(step):  # before the step's forward: switch all layers on
    ...     calibration.update(small_sq_norm=s_all_norms, big_sq_norm=g_all_norms, big_batch=batch)
    >>> calibration.calibrate(estimator.gns_tensor()[0])  # the calibrated GNS, examples
    ```
    """

    def __init__(
        self,
        every: int,
        ema_decay: float = 0.9999,
        device: torch.device | str = "cpu",
        dense_examples: int | None = None,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"calibration interval must be an int >= 0 (0: off), got {every!r}")
        if dense_examples is None:
            dense_examples = round(1 / (1 - ema_decay))
        if dense_examples < 0:
            raise ValueError(f"dense_examples must be >= 0, got {dense_examples!r}")
        self.every = every
        self.dense_examples = int(dense_examples)
        self.dense_steps: int | None = None  # set by the first observe_batch (step 0 calibrates anyway)
        self.estimator = GNSEstimator(list(CALIBRATION_GROUPS), ema_decay=ema_decay, device=device)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def observe_batch(self, examples: int) -> None:
        """The global examples of the first step (a host int; later calls do nothing): fixes the dense
        start at `ceil(dense_examples / examples)` steps."""
        if self.dense_steps is None and examples > 0:
            self.dense_steps = -(-self.dense_examples // int(examples))

    def is_calibration_step(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based: steps completed before it) measures every layer."""
        return self.enabled and (step % self.every == 0 or step < (self.dense_steps or 0))

    def steps_represented(self, step: int) -> int:
        """How many optimizer steps the calibration step `step` stands for: up to the next one."""
        if not self.enabled:
            return 1
        following = step + 1
        while not self.is_calibration_step(following):
            following += 1
        return following - step

    def to(self, device: torch.device | str) -> GNSCalibration:
        """Move the state to `device` (in place); returns `self`."""
        self.estimator.to(device)
        return self

    def update(
        self,
        small_sq_norm: torch.Tensor,
        big_sq_norm: torch.Tensor,
        big_batch: Number,
        step: int | None = None,
    ) -> None:
        """Fold one calibration step into the averages (no sync).

        Args:
            small_sq_norm (`torch.Tensor` of shape `(2,)`): the per-example statistic s = B·Σ_i |c_i|²
                of the groups `("all", "norms")`, in synchronized-gradient units.
            big_sq_norm (`torch.Tensor` of shape `(2,)`): |G_B|² of the same two groups.
            big_batch (`int` or `torch.Tensor`): B, the step's examples.
            step (`int`, *optional*): the step's index: it weighs B × `steps_represented(step)`
                examples; without it, B × `every` (a step of the sparse schedule).
        """
        represented = max(self.every, 1) if step is None else self.steps_represented(step)
        self.estimator.update(
            small_sq_norm=small_sq_norm,
            big_sq_norm=big_sq_norm,
            big_batch=big_batch,
            ema_weight=torch.as_tensor(big_batch, dtype=torch.float64) * represented,
        )

    def ratio_tensor(self) -> torch.Tensor:
        """r = B_all / B_norms from the calibration EMAs, a 0-d float64 tensor (no sync); NaN when unknown."""
        sq_norm, trace_cov = self.estimator.components()
        known = (sq_norm > 0).all() & (trace_cov > 0).all()  # False on NaN (no step yet) too
        ratio = (trace_cov[0] * sq_norm[1]) / (sq_norm[0] * trace_cov[1])
        return torch.where(known, ratio, torch.nan)

    def calibrate(self, gns: torch.Tensor | float) -> torch.Tensor:
        """`gns × r` (no sync): the norm layers' GNS scaled to the whole model's; NaN while r is unknown."""
        ratio = self.ratio_tensor()
        return torch.as_tensor(gns, dtype=torch.float64, device=ratio.device) * ratio

    @property
    def steps(self) -> int:
        """Calibration steps folded in (one host sync)."""
        return self.estimator.steps

    def values(self) -> dict[str, float]:
        """`ratio`, `gns_all`, `gns_norms` (the calibration EMAs' GNS) and `steps`, as floats (one sync)."""
        gns = self.estimator.gns_tensor()
        ratio, gns_all, gns_norms, steps = torch.stack(
            [self.ratio_tensor(), gns[0], gns[1], self.estimator._steps.double()]
        ).tolist()
        return {"ratio": ratio, "gns_all": gns_all, "gns_norms": gns_norms, "steps": steps}

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Plain CPU tensors, numbers and lists (`torch.load(weights_only=True)` works)."""
        state = {"every": self.every, "dense_steps": self.dense_steps}
        return state | {"estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`. The interval stays this object's (a resumed run may change it);
        the dense start's length is the checkpointed run's (so the schedule continues as it was)."""
        self.estimator.load_state_dict(state["estimator"])
        if state.get("dense_steps") is not None:
            self.dense_steps = int(state["dense_steps"])
