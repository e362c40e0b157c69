"""Learning-rate schedules driven by tokens seen rather than optimizer steps.

With a batch that changes during training, a step no longer stands for a fixed amount of
data, so step-based schedules (HF's `get_linear_schedule_with_warmup` & co.) would stretch
or squeeze as the batch changes. Here the LR multiplier is a function of GLOBAL TOKENS
consumed before the step, t, over a budget T with W warmup tokens:

    warmup (t < W):   m(t) = t / W
    then, p = (t − W) / (T − W) clipped to [0, 1], and f the final fraction:
      "linear":   m = 1 − (1 − f)·p   (f = 0: linear decay to zero, "D2Z": Bergsma et al. 2025,
                                       "Straight to Zero: Why Linearly Decaying the LR to Zero Works Best")
      "cosine":   m = f + (1 − f)·(1 + cos πp)/2
      "constant": m = 1

Like HF's step schedules, the first step of a warmup runs at m = 0 (t = 0).

Optionally the LR also scales with the current global batch B relative to a reference
batch B₀: × (B/B₀)^½ ("sqrt", the rule for Adam-type optimizers, Malladi et al. 2022) or
× B/B₀ ("linear", Goyal et al. 2017 for SGD).

`TokenLRScheduler` is a `torch.optim.lr_scheduler.LRScheduler`: the trainer tells it the
position (tokens seen, global batch) at the start of each optimizer step; `step()`, which
the HF Trainer calls after each optimizer step, re-applies that position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

Decay = Literal["linear", "cosine", "constant"]
BatchScalingRule = Literal["none", "sqrt", "linear"]


@dataclass(frozen=True)
class TokenLRSchedule:
    """LR multiplier as a function of global tokens seen.

    Args:
        total_tokens (`int`): the budget T (tokens at which the decay ends).
        warmup_tokens (`int`, *optional*, defaults to 0): W, tokens of linear warmup from 0.
        decay (`str`, *optional*, defaults to `"linear"`): `"linear"`, `"cosine"` or `"constant"`.
        final_fraction (`float`, *optional*, defaults to 0.0): f, the multiplier reached at T.
    """

    total_tokens: int
    warmup_tokens: int = 0
    decay: Decay = "linear"
    final_fraction: float = 0.0

    def __post_init__(self):
        if self.total_tokens <= 0:
            raise ValueError(f"total_tokens must be > 0, got {self.total_tokens}.")
        if not 0 <= self.warmup_tokens <= self.total_tokens:
            raise ValueError(
                f"warmup_tokens must be in [0, total_tokens={self.total_tokens}], got {self.warmup_tokens}."
            )
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"decay must be 'linear', 'cosine' or 'constant', got {self.decay!r}.")
        if not 0 <= self.final_fraction <= 1:
            raise ValueError(f"final_fraction must be in [0, 1], got {self.final_fraction}.")

    def __call__(self, tokens_seen: float) -> float:
        if tokens_seen < self.warmup_tokens:
            return max(tokens_seen, 0) / self.warmup_tokens
        if self.decay == "constant":
            return 1.0
        span = self.total_tokens - self.warmup_tokens
        progress = min((tokens_seen - self.warmup_tokens) / span, 1.0) if span > 0 else 1.0
        if self.decay == "linear":
            return 1.0 - (1.0 - self.final_fraction) * progress
        return self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


def d2z(total_tokens: int, warmup_tokens: int = 0) -> TokenLRSchedule:
    """Linear warmup, then linear decay to zero at `total_tokens` (Bergsma et al. 2025)."""
    return TokenLRSchedule(total_tokens, warmup_tokens, "linear", 0.0)


def linear_to_fraction(total_tokens: int, fraction: float, warmup_tokens: int = 0) -> TokenLRSchedule:
    """Linear warmup, then linear decay to `fraction` of the peak at `total_tokens` (e.g. 0.1: "10×")."""
    return TokenLRSchedule(total_tokens, warmup_tokens, "linear", fraction)


def cosine(total_tokens: int, warmup_tokens: int = 0, final_fraction: float = 0.0) -> TokenLRSchedule:
    """Linear warmup, then a half cosine down to `final_fraction` of the peak at `total_tokens`."""
    return TokenLRSchedule(total_tokens, warmup_tokens, "cosine", final_fraction)


@dataclass(frozen=True)
class BatchLRScaling:
    """LR factor (B / B₀)^p for the current global batch B: p = ½ ("sqrt"), 1 ("linear") or 0 ("none").

    Args:
        rule (`str`): `"none"`, `"sqrt"` or `"linear"`.
        reference_batch_size (`int`): B₀, the global batch (examples) at which the factor is 1,
            normally the batch the peak LR was tuned for.
    """

    rule: BatchScalingRule
    reference_batch_size: int

    def __post_init__(self):
        if self.rule not in ("none", "sqrt", "linear"):
            raise ValueError(f"rule must be 'none', 'sqrt' or 'linear', got {self.rule!r}.")
        if self.reference_batch_size <= 0:
            raise ValueError(f"reference_batch_size must be > 0, got {self.reference_batch_size}.")

    def __call__(self, batch_size: int) -> float:
        ratio = batch_size / self.reference_batch_size
        return {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.rule]


class TokenLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Sets each param group's LR to `base_lr × schedule(tokens_seen) × batch_scaling(batch_size)`.

    Args:
        optimizer (`torch.optim.Optimizer`): its groups' `lr` (at construction) are the peak LRs.
        schedule (`TokenLRSchedule`): the multiplier in tokens.
        batch_scaling (`BatchLRScaling`, *optional*): the factor for the global batch; none by default.
        batch_size (`int`, *optional*): the global batch before the first `set_position`.

    Call `set_position(tokens_seen, batch_size)` before each optimizer step. The state dict holds
    plain numbers only (HF reloads `scheduler.pt` with `weights_only=True`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: TokenLRSchedule,
        batch_scaling: BatchLRScaling | None = None,
        batch_size: int | None = None,
    ):
        self.schedule = schedule
        self.batch_scaling = batch_scaling
        self.tokens_seen = 0
        self.batch_size = (
            batch_size if batch_size is not None else getattr(batch_scaling, "reference_batch_size", 1)
        )
        super().__init__(optimizer)

    def multiplier(self) -> float:
        """The factor applied to every base LR at the current position."""
        scale = self.batch_scaling(self.batch_size) if self.batch_scaling is not None else 1.0
        return self.schedule(self.tokens_seen) * scale

    def get_lr(self) -> list[float]:
        factor = self.multiplier()
        return [base_lr * factor for base_lr in self.base_lrs]

    def set_position(self, tokens_seen: int, batch_size: int) -> None:
        """Move to `tokens_seen` global tokens and a global batch of `batch_size` examples; sets the LRs."""
        self.tokens_seen, self.batch_size = int(tokens_seen), int(batch_size)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "batch_size": self.batch_size,
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "_last_lr": list(self._last_lr),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = state_dict["last_epoch"]
        self.set_position(state_dict["tokens_seen"], state_dict["batch_size"])
