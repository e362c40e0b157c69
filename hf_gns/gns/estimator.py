"""Online gradient noise scale: unbiased |G|² and tr(Σ) per step, their EMAs, and the ratio.

Pure math on tensors: no transformers, no torch.distributed. The caller hands in, once per
optimizer step and for every group of parameters, two squared norms in the units of the
final synchronized `param.grad` (see `units.py`):

- `small_sq_norm`: the mean squared norm of gradients estimated from `small_batch` examples;
  from per-example norms (B_small = 1) it is s = B·Σ_i |c_i|², see `per_example_statistic`;
- `big_sq_norm`: |G_B|², the squared norm of the whole step's gradient (B_big = B examples),
  read before clipping.

Since E|G_b|² = |G|² + tr(Σ)/b for a batch of b examples, two batch sizes give
(McCandlish et al. 2018, appendix A; DESIGN.md section 2)

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

both unbiased. Each is averaged by its own bias-corrected EMA whose decay is per example
(the step weight is `decay ** B`, so a step of twice the examples counts twice), and the
GNS is the ratio of the two averages, B_simple = EMA(tr Σ) / EMA(|G|²), in examples.
Never the EMA of per-step ratios: that is biased and has heavy tails.

Steps whose statistics are not all finite are skipped (`torch.where`, no host sync) and
counted. The state is one float64 tensor, and a step is one `fold_step` of ~20 small launches.
Nothing here calls `.item()` except the explicit readers (`values`, `gns`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Number = float | int | torch.Tensor


def per_example_statistic(example_sq_norm_sum: torch.Tensor, batch_size: Number) -> torch.Tensor:
    """The small-batch statistic of per-example gradients (B_small = 1): s = B · Σ_i |c_i|².

    Example i's gradient estimate is B·c_i (so their mean is G_B = Σ_i c_i), and
    s = (1/B) Σ_i |B·c_i|² is the mean squared norm of the B single-example estimates.

    Args:
        example_sq_norm_sum (`torch.Tensor`): Σ_i |c_i|² in synchronized-gradient units, any shape.
        batch_size (`int` or `torch.Tensor`): B, examples in the step (all processes).
    """
    return example_sq_norm_sum * batch_size


class GNSEstimator:
    """Bias-corrected exponential averages of |G|² and tr(Σ) for a set of parameter groups.

    Args:
        group_names (`Sequence[str]`): one name per group, e.g. `["total", "type/norm"]`; every
            statistic passed to `update` has one value per group, in this order.
        ema_decay (`float`, *optional*, defaults to `0.9999`): decay per example; a step of B
            examples multiplies the old average by `ema_decay ** B`. The memory is about
            `1 / (1 - ema_decay)` examples.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where the state lives
            (put it next to the gradients so that `update` never syncs).

    Example:
    ```python
    >>> est = GNSEstimator(["total"], ema_decay=0.999)
    >>> s = per_example_statistic(example_sq_norm_sum, batch_size)  # (1,)
    >>> est.update(small_sq_norm=s, big_sq_norm=batch_grad_sq_norm, big_batch=batch_size)
    >>> est.gns()["total"]  # examples
    ```
    """

    def __init__(
        self, group_names: Sequence[str], ema_decay: float = 0.9999, device: torch.device | str = "cpu"
    ):
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) (a decay per example), got {ema_decay}")
        if len(set(group_names)) != len(group_names) or not group_names:
            raise ValueError(f"group_names must be non-empty and unique, got {list(group_names)}")
        self.group_names = list(group_names)
        self.ema_decay = ema_decay
        # The whole state in one float64 tensor, so that a step updates it in a few launches
        # (`fold_step`): [EMA |G|² (n), EMA tr(Σ) (n), weight, steps, skipped, examples]. The EMAs are
        # unnormalized, the weight is their common normalizer (the EMA of 1); float64 because with
        # decays close to 1 the increments (1 - decay**B) are small and fp32 would lose them. The
        # counts are exact in float64 up to 2**53.
        self._state = torch.zeros(2 * len(self.group_names) + 4, dtype=torch.float64, device=device)

    # views of the state, by name
    @property
    def _sq_norm(self) -> torch.Tensor:
        return self._state[: len(self.group_names)]

    @property
    def _trace_cov(self) -> torch.Tensor:
        n = len(self.group_names)
        return self._state[n : 2 * n]

    @property
    def _weight(self) -> torch.Tensor:
        return self._state[-4]

    @property
    def _steps(self) -> torch.Tensor:
        return self._state[-3]

    @property
    def _skipped(self) -> torch.Tensor:
        return self._state[-2]

    @property
    def _examples(self) -> torch.Tensor:
        return self._state[-1]

    @property
    def device(self) -> torch.device:
        return self._state.device

    def to(self, device: torch.device | str) -> GNSEstimator:
        """Move the state to `device` (in place); returns `self`."""
        self._state = self._state.to(device)
        return self

    def update(
        self,
        small_sq_norm: torch.Tensor,
        big_sq_norm: torch.Tensor,
        big_batch: Number,
        small_batch: Number = 1,
        ema_weight: Number | None = None,
    ) -> None:
        """Fold one optimizer step into the averages (device launches only, no sync).

        Args:
            small_sq_norm (`torch.Tensor` of shape `(n_groups,)`): mean squared norm of the
                small-batch gradient estimates, e.g. `per_example_statistic(...)`.
            big_sq_norm (`torch.Tensor` of shape `(n_groups,)`): |G_B|² of the step's gradient.
            big_batch (`int` or `torch.Tensor`): B_big, examples in the step; also the EMA weight.
            small_batch (`int` or `torch.Tensor`, *optional*, defaults to `1`): B_small.
            ema_weight (`int` or `torch.Tensor`, *optional*): examples this step stands for in the
                averages (the old average is weighed by `ema_decay ** ema_weight`); defaults to
                `big_batch`. A step that is measured only every k steps (a calibration step, see
                `calibration.py`) stands for the examples of all k.
        """
        n = len(self.group_names)
        small = _flat(_float64(small_sq_norm, self.device))
        big = _flat(_float64(big_sq_norm, self.device))
        if small.numel() != n or big.numel() != n:
            raise ValueError(
                f"expected one value per group ({n}: {self.group_names}), "
                f"got {small.numel()} and {big.numel()}"
            )
        b_big, b_small = (
            _number_or_float64(big_batch, self.device),
            _number_or_float64(small_batch, self.device),
        )
        weight = b_big if ema_weight is None else _number_or_float64(ema_weight, self.device)
        self._state = fold_step(self._state, small, big, b_big, b_small, weight, math.log(self.ema_decay))

    # ---- readers (these sync with the device) ----

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected EMAs `(sq_norm, trace_cov)`, each `(n_groups,)` float64; NaN before any step."""
        weight = torch.where(self._weight > 0, self._weight, torch.nan)
        return self._sq_norm / weight, self._trace_cov / weight

    def gns_tensor(self) -> torch.Tensor:
        """B_simple per group, `(n_groups,)` float64 on the state's device, no sync; NaN before any step."""
        sq_norm, trace_cov = self.components()
        return trace_cov / sq_norm

    def gns(self) -> dict[str, float]:
        """B_simple per group name, in examples (one host sync)."""
        return dict(zip(self.group_names, self.gns_tensor().tolist()))

    @property
    def steps(self) -> int:
        """Optimizer steps folded into the averages (one host sync)."""
        return int(self._steps.item())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a statistic was not finite (one host sync)."""
        return int(self._skipped.item())

    def values(self) -> dict[str, dict[str, float]]:
        """`{"gns": {...}, "sq_norm": {...}, "trace_cov": {...}}` keyed by group, as floats (one sync)."""
        sq_norm, trace_cov = self.components()
        table = torch.stack([trace_cov / sq_norm, sq_norm, trace_cov]).tolist()
        return {
            key: dict(zip(self.group_names, row)) for key, row in zip(("gns", "sq_norm", "trace_cov"), table)
        }

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Plain CPU tensors, floats and lists: `torch.save` and `torch.load(weights_only=True)` work."""
        return {
            "group_names": list(self.group_names),
            "ema_decay": self.ema_decay,
            "sq_norm": self._sq_norm.cpu().clone(),
            "trace_cov": self._trace_cov.cpu().clone(),
            "weight": self._weight.cpu().clone(),
            "steps": self._steps.cpu().to(torch.int64),
            "skipped": self._skipped.cpu().to(torch.int64),
            "examples": self._examples.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; the group names must be the same (in the same order)."""
        if list(state["group_names"]) != self.group_names:
            raise ValueError(
                "checkpointed GNS groups differ from this estimator's: "
                f"{list(state['group_names'])} vs {self.group_names}. Resume with the same model, "
                "gns_track and gns_groups as the run that wrote the checkpoint."
            )
        self.ema_decay = float(state["ema_decay"])
        scalars = [state[key].reshape(1) for key in ("weight", "steps", "skipped", "examples")]
        parts = [state["sq_norm"].reshape(-1), state["trace_cov"].reshape(-1), *scalars]
        self._state = torch.cat([part.to(torch.float64) for part in parts]).to(self.device)


def fold_step(
    state: torch.Tensor,
    small: torch.Tensor,
    big: torch.Tensor,
    b_big: Number,
    b_small: Number,
    weight: Number,
    log_decay: float,
) -> torch.Tensor:
    """One step of `GNSEstimator.update` on its stacked state, pure: returns the new state.

    `state` is [EMA |G|² (n), EMA tr(Σ) (n), weight, steps, skipped, examples] (float64); `small`,
    `big` are (n,) float64; the batch sizes and the EMA weight are numbers or 0-d float64 tensors.
    The unbiased estimates (DESIGN.md section 2), with c = B_big·B_small / (B_big − B_small):

        tr(Σ) = (small − big) · c,    |G|² = big − tr(Σ) / B_big

    (the same as (B_big·big − B_small·small) / (B_big − B_small)). A step whose estimates are not
    all finite, or with B_big <= B_small, leaves the averages alone (decay 1) and counts as skipped;
    all of it as one multiply-add over the state: no branch on device values, no sync.
    """
    n = small.numel()
    device = state.device
    diff = b_big - b_small
    if isinstance(diff, torch.Tensor) or diff != 0:
        # x·1.0 is x exactly: the usual B_small = 1 (a number) costs no launch
        scale = (b_big if _is_one(b_small) else b_big * b_small) / diff
    else:  # Python numbers, B_big == B_small: skipped below, like the tensors' inf/NaN
        scale = math.inf
    trace_cov = (small - big) * scale
    mask, counted_tail, skipped_row = _step_constants(n, device)
    if isinstance(b_big, torch.Tensor):
        big_batch = b_big.reshape(1)
    else:  # a fill, not a host-to-device copy
        big_batch = torch.full((1,), float(b_big), dtype=torch.float64, device=device)
    # What a counted step adds before its gains: [|G|² (n), tr(Σ) (n), 1, 1, 0, B_big]. The estimates
    # are finite only when B_big is (they divide by it), so the check may include it.
    counted_row = torch.cat([big - trace_cov / b_big, trace_cov, counted_tail, big_batch])
    ok = (counted_row - counted_row == 0).all()  # all finite (inf - inf, NaN: NaN): 3 launches, isfinite 5
    if isinstance(diff, torch.Tensor):
        ok = ok & (diff > 0)
    elif diff <= 0:  # B_big <= B_small: no noise information
        ok = torch.zeros_like(ok)
    if isinstance(weight, torch.Tensor):
        step_keep = torch.exp(weight * log_decay)  # decay ** B
    else:  # a fill, not a host-to-device copy
        step_keep = torch.full((), math.exp(weight * log_decay), dtype=torch.float64, device=device)
    keep = torch.where(ok, step_keep, 1.0)
    gain = 1.0 - keep
    decay = torch.where(mask, keep, 1.0)  # [keep (2n+1), 1 (3)]
    # Increment: counted [estimates·gain, gain, 1, 0, B_big], skipped [0 (2n+1), 0, 1, 0] (the
    # estimates of a skipped step, maybe NaN, are dropped, so that keep = 1 leaves the averages
    # exact). One where and one product: x·1.0 and 0·0 are exact, so these are the bits of
    # [where(ok, estimates, 0)·gain, gain, counted, 1 − counted, counted·B_big].
    increment = torch.where(ok, counted_row, skipped_row) * torch.where(mask, gain, 1.0)
    return torch.addcmul(increment, decay, state)


def _is_one(value: Number) -> bool:
    return not isinstance(value, torch.Tensor) and value == 1


# (n groups, device) -> (decay mask, counted tail, skipped row), see `_step_constants`
_STEP_CONSTANTS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _step_constants(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fold_step`'s constants for n groups, made once per (n, device) on the device (no host-to-device
    copy, which would sync): the mask of the state entries that decay (the 2n EMAs and their weight,
    not the 3 counters), the tail [1, 1, 0] of a counted step's row and a skipped step's row
    [0 (2n+2), 1, 0]."""
    constants = _STEP_CONSTANTS.get((n, device))
    if constants is None:
        positions = torch.arange(2 * n + 4, device=device)
        mask = positions < 2 * n + 1
        counted_tail = (positions[:3] < 2).to(torch.float64)
        skipped_row = (positions == 2 * n + 2).to(torch.float64)
        constants = _STEP_CONSTANTS[(n, device)] = (mask, counted_tail, skipped_row)
    return constants


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dim() == 1 else tensor.reshape(-1)


def _float64(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.float64 and value.device == device:
            return value  # no dispatch for a no-op `.to` (the trainer's usual case)
        return value.to(device=device, dtype=torch.float64)
    return torch.as_tensor(value, dtype=torch.float64).to(device, non_blocking=True)


def _number_or_float64(value: Number, device: torch.device) -> Number:
    """A Python number stays one (a scalar argument of the ops, no copy); a tensor becomes 0-d float64."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.float64 and value.device == device and value.dim() == 0:
            return value
        return value.to(device=device, dtype=torch.float64).reshape(())
    return float(value)
