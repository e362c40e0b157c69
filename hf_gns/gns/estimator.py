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
counted. Nothing here calls `.item()` except the explicit readers (`values`, `gns`).
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
        n = len(self.group_names)
        # Unnormalized EMAs and their common normalizer (the EMA of 1), in float64: with decays
        # close to 1 the increments (1 - decay**B) are small and fp32 would lose them.
        self._sq_norm = torch.zeros(n, dtype=torch.float64, device=device)
        self._trace_cov = torch.zeros(n, dtype=torch.float64, device=device)
        self._weight = torch.zeros((), dtype=torch.float64, device=device)
        self._steps = torch.zeros((), dtype=torch.int64, device=device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._examples = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self._weight.device

    def to(self, device: torch.device | str) -> GNSEstimator:
        """Move the state to `device` (in place); returns `self`."""
        for name in ("_sq_norm", "_trace_cov", "_weight", "_steps", "_skipped", "_examples"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def update(
        self,
        small_sq_norm: torch.Tensor,
        big_sq_norm: torch.Tensor,
        big_batch: Number,
        small_batch: Number = 1,
        ema_weight: Number | None = None,
    ) -> None:
        """Fold one optimizer step into the averages.

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
        small = torch.as_tensor(small_sq_norm, device=self.device).to(torch.float64).reshape(-1)
        big = torch.as_tensor(big_sq_norm, device=self.device).to(torch.float64).reshape(-1)
        if small.numel() != n or big.numel() != n:
            raise ValueError(
                f"expected one value per group ({n}: {self.group_names}), "
                f"got {small.numel()} and {big.numel()}"
            )
        b_big = torch.as_tensor(big_batch, device=self.device).to(torch.float64)
        b_small = torch.as_tensor(small_batch, device=self.device).to(torch.float64)
        sq_norm = (b_big * big - b_small * small) / (b_big - b_small)
        trace_cov = (small - big) / (1.0 / b_small - 1.0 / b_big)
        # b_big <= b_small (one example) carries no noise information: count it as skipped too.
        ok = torch.isfinite(sq_norm).all() & torch.isfinite(trace_cov).all() & (b_big > b_small)
        weight = b_big if ema_weight is None else torch.as_tensor(ema_weight, device=self.device).double()
        keep = torch.where(ok, torch.exp(weight * math.log(self.ema_decay)), 1.0)  # decay ** B
        self._sq_norm = torch.where(ok, keep * self._sq_norm + (1 - keep) * sq_norm, self._sq_norm)
        self._trace_cov = torch.where(ok, keep * self._trace_cov + (1 - keep) * trace_cov, self._trace_cov)
        self._weight = keep * self._weight + (1 - keep)
        self._steps += ok.to(torch.int64)
        self._skipped += (~ok).to(torch.int64)
        self._examples += torch.where(ok, b_big, 0.0)

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
            "sq_norm": self._sq_norm.cpu(),
            "trace_cov": self._trace_cov.cpu(),
            "weight": self._weight.cpu(),
            "steps": self._steps.cpu(),
            "skipped": self._skipped.cpu(),
            "examples": self._examples.cpu(),
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
        device = self.device
        self._sq_norm = state["sq_norm"].to(device, torch.float64)
        self._trace_cov = state["trace_cov"].to(device, torch.float64)
        self._weight = state["weight"].to(device, torch.float64)
        self._steps = state["steps"].to(device, torch.int64)
        self._skipped = state["skipped"].to(device, torch.int64)
        self._examples = state["examples"].to(device, torch.float64)
