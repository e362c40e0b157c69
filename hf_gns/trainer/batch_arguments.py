"""`BatchControlArguments`: the batch-size controller and token-schedule options of `GNSTrainingArguments`.

A dataclass mixin: `GNSTrainingArguments(BatchControlArguments, TrainingArguments)` gets these
fields on its command line (HfArgumentParser) next to the Trainer's own. Batch control is on
when any of `batch_size_policy`, `max_tokens` or `lr_schedule` is set.

Example (the paper's linear schedule, 64 → 512 sequences over 100M tokens, D2Z learning rate):
```python
>>> args = GNSTrainingArguments(
...     "out", per_device_train_batch_size=8, learning_rate=6e-4,
...     max_tokens=100_000_000, batch_size_policy="linear", batch_size_start=64, batch_size_end=512,
...     lr_schedule="d2z", lr_warmup_fraction=0.01,
... )
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..control import (
    BatchLRScaling,
    BatchSizeController,
    ConstantPolicy,
    DoublingPolicy,
    GNSPolicy,
    LinearRampPolicy,
    ScheduleFilePolicy,
    TokenLRSchedule,
    cosine,
    d2z,
    linear_to_fraction,
)

BATCH_SIZE_POLICIES = ("constant", "linear", "gns", "doubling", "schedule_file")
LR_SCHEDULES = ("d2z", "cosine", "linear_to_fraction", "constant")
# HF `lr_scheduler_type` values with a token-denominated counterpart (used when `lr_schedule` is unset).
HF_SCHEDULER_EQUIVALENTS = {
    "linear": "d2z",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


def _arg(default, description: str):
    return field(default=default, metadata={"help": description})


@dataclass
class BatchControlArguments:
    """Options of the batch-size controller and of the token-denominated LR schedules.

    Global batches are in EXAMPLES (sequences) summed over all processes and accumulated
    micro-batches. The per-device micro-batch is `per_device_train_batch_size`, fixed;
    `gradient_accumulation_steps` must stay 1 (the controller sets the accumulation).

    Args:
        batch_size_policy (`str`, *optional*): `"constant"`, `"linear"`, `"gns"`, `"doubling"` or
            `"schedule_file"`; unset means `"constant"` when batch control is on (see module docstring).
        max_tokens (`int`, *optional*): training budget in global tokens; training stops at the first
            optimizer step that reaches it. Token LR schedules decay over it.
        batch_size_start (`int`, *optional*): global batch of the first step; defaults to
            `world_size × per_device_train_batch_size`; rounded to a realizable batch within the bounds.
        batch_size_end (`int`, *optional*): `"linear"`: the global batch reached after the ramp.
        batch_size_ramp_tokens (`int`, *optional*): `"linear"`: tokens of the ramp; defaults to `max_tokens`.
        batch_size_min (`int`, *optional*), batch_size_max (`int`, *optional*): bounds of the global batch;
            the lower one defaults to 2 examples (a GNS needs two), rounded up to a realizable batch.
            A lower bound that lets the batch be 1 example is refused (`check_examples_per_step`).
        batch_size_granularity (`str`, *optional*, defaults to `"micro_batch"`): `"micro_batch"`: global
            batches are multiples of `world_size × per_device_train_batch_size`; `"example"`: of
            `world_size` (a step's last micro-batch may be partial, the rest carried to the next step).
        gns_batch_multiplier (`float`, *optional*, defaults to 1.0): `"gns"`: target = multiplier × GNS.
        doubling_threshold (`float`, *optional*, defaults to 2.0): `"doubling"`: ×2 when GNS > this × batch.
        batch_size_hysteresis (`float`, *optional*, defaults to 0.1): `"gns"` / `"doubling"`: change only
            when the rounded target differs from the current batch by more than this fraction.
        batch_size_min_interval_steps (`int`, *optional*, defaults to 10), batch_size_min_interval_tokens
            (`int`, *optional*, defaults to 0): `"gns"` / `"doubling"`: at least this many optimizer steps
            and tokens between changes (and before the first one: the GNS needs a few steps to settle).
        batch_size_monotonic (`bool`, *optional*, defaults to `False`): never decrease the batch.
        batch_size_schedule_file (`str`, *optional*): `"schedule_file"`: CSV/JSON of (tokens, batch) points.
        batch_size_schedule_interpolation (`str`, *optional*, defaults to `"step"`): `"step"` or `"linear"`.
        batch_size_schedule_reload_steps (`int`, *optional*, defaults to 10): re-check the file this often.
        lr_schedule (`str`, *optional*): `"d2z"` (linear warmup, linear decay to zero), `"cosine"`,
            `"linear_to_fraction"` or `"constant"`, all in tokens over `max_tokens`; unset: the token
            version of `lr_scheduler_type` (linear → d2z, cosine, constant) when `max_tokens` is set.
        lr_warmup_tokens (`int`, *optional*): warmup in tokens; defaults to `lr_warmup_fraction ×
            max_tokens`, or to `warmup_steps` converted at the first step's batch.
        lr_warmup_fraction (`float`, *optional*, defaults to 0.0): warmup as a fraction of `max_tokens`.
        lr_final_fraction (`float`, *optional*): LR at the end as a fraction of the peak: `"cosine"`
            defaults to 0, `"linear_to_fraction"` to 0.1.
        lr_batch_scaling (`str`, *optional*, defaults to `"none"`): also scale the LR with the global
            batch B: `"sqrt"` (× √(B/B₀)) or `"linear"` (× B/B₀).
        lr_reference_batch_size (`int`, *optional*): B₀; defaults to the first step's global batch.
    """

    batch_size_policy: str | None = _arg(None, f"Batch-size policy: one of {BATCH_SIZE_POLICIES}.")
    max_tokens: int | None = _arg(None, "Training budget in global tokens (replaces max_steps/epochs).")
    batch_size_start: int | None = _arg(None, "Global batch (examples) of the first optimizer step.")
    batch_size_end: int | None = _arg(None, "linear policy: global batch at the end of the ramp.")
    batch_size_ramp_tokens: int | None = _arg(
        None, "linear policy: tokens of the ramp (default: max_tokens)."
    )
    batch_size_min: int | None = _arg(None, "Lower bound of the global batch (examples).")
    batch_size_max: int | None = _arg(None, "Upper bound of the global batch (examples).")
    batch_size_granularity: str = _arg(
        "micro_batch", "Realizable batches: 'micro_batch' or 'example' multiples."
    )
    gns_batch_multiplier: float = _arg(1.0, "gns policy: target batch = multiplier x GNS.")
    doubling_threshold: float = _arg(2.0, "doubling policy: double the batch when GNS > threshold x batch.")
    batch_size_hysteresis: float = _arg(0.1, "gns/doubling: relative dead band around the current batch.")
    batch_size_min_interval_steps: int = _arg(10, "gns/doubling: optimizer steps between changes.")
    batch_size_min_interval_tokens: int = _arg(0, "gns/doubling: tokens between changes.")
    batch_size_monotonic: bool = _arg(False, "Never decrease the global batch.")
    batch_size_schedule_file: str | None = _arg(
        None, "schedule_file policy: CSV/JSON of (tokens, batch) points."
    )
    batch_size_schedule_interpolation: str = _arg("step", "schedule_file policy: 'step' or 'linear'.")
    batch_size_schedule_reload_steps: int = _arg(10, "schedule_file policy: re-check the file every N steps.")
    lr_schedule: str | None = _arg(None, f"LR schedule in tokens: one of {LR_SCHEDULES}.")
    lr_warmup_tokens: int | None = _arg(None, "LR warmup in tokens.")
    lr_warmup_fraction: float = _arg(0.0, "LR warmup as a fraction of max_tokens.")
    lr_final_fraction: float | None = _arg(None, "Final LR / peak LR (cosine: 0, linear_to_fraction: 0.1).")
    lr_batch_scaling: str = _arg("none", "Scale the LR with the global batch: 'none', 'sqrt' or 'linear'.")
    lr_reference_batch_size: int | None = _arg(None, "Global batch at which the LR scaling factor is 1.")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_batch_control_arguments(self)

    @property
    def batch_control_enabled(self) -> bool:
        """Whether the trainer realizes a controlled global batch (and token schedules)."""
        return (
            self.batch_size_policy is not None or self.max_tokens is not None or self.lr_schedule is not None
        )


def check_batch_control_arguments(args) -> None:
    """Raise `ValueError` with what to change when the batch-control options do not fit together."""
    policy = args.batch_size_policy
    if policy is not None and policy not in BATCH_SIZE_POLICIES:
        raise ValueError(f"batch_size_policy must be one of {BATCH_SIZE_POLICIES}, got {policy!r}.")
    if args.lr_schedule is not None and args.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {args.lr_schedule!r}.")
    if args.lr_schedule is not None and args.max_tokens is None:
        raise ValueError("lr_schedule is in tokens and decays over max_tokens: set max_tokens too.")
    if args.max_tokens is not None and args.max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {args.max_tokens}.")
    if policy == "linear" and (
        args.batch_size_end is None or (args.batch_size_ramp_tokens or args.max_tokens) is None
    ):
        raise ValueError(
            "batch_size_policy='linear' ramps from batch_size_start to batch_size_end over "
            "batch_size_ramp_tokens (default max_tokens): set batch_size_end and max_tokens "
            "(or batch_size_ramp_tokens)."
        )
    if policy == "schedule_file" and not args.batch_size_schedule_file:
        raise ValueError(
            "batch_size_policy='schedule_file' needs batch_size_schedule_file=<path to CSV or JSON>."
        )
    if args.batch_size_granularity not in ("micro_batch", "example"):
        raise ValueError(
            f"batch_size_granularity must be 'micro_batch' or 'example', got {args.batch_size_granularity!r}."
        )
    if args.lr_batch_scaling not in ("none", "sqrt", "linear"):
        raise ValueError(
            f"lr_batch_scaling must be 'none', 'sqrt' or 'linear', got {args.lr_batch_scaling!r}."
        )
    if not 0 <= args.lr_warmup_fraction <= 1:
        raise ValueError(f"lr_warmup_fraction must be in [0, 1], got {args.lr_warmup_fraction}.")
    enabled = policy is not None or args.max_tokens is not None or args.lr_schedule is not None
    if enabled and getattr(args, "gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            "With batch-size control the number of accumulated micro-batches is the controller's: "
            f"keep gradient_accumulation_steps=1 (got {args.gradient_accumulation_steps}) and give the "
            "first step's global batch as batch_size_start."
        )


# The variance of one example's gradient is undefined: a GNS needs two examples per optimizer step,
# so batch control's lower bound defaults to 2 (rounded up to a realizable batch), not to 1.
MIN_EXAMPLES_PER_STEP = 2


def _start_and_min(args, world_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(first global batch, lower bound) of batch control, defaults resolved (before rounding)."""
    start = args.batch_size_start or world_size * micro_batch_size
    unit = world_size * micro_batch_size if args.batch_size_granularity == "micro_batch" else world_size
    minimum = max(MIN_EXAMPLES_PER_STEP, unit) if args.batch_size_min is None else args.batch_size_min
    return start, minimum


def controller_from_arguments(args, world_size: int, micro_batch_size: int) -> BatchSizeController:
    """The `BatchSizeController` that `args` describe, for `world_size` processes of `micro_batch_size`.

    Unset bounds: `batch_size_min` is 2 examples (a GNS needs two), rounded up to a realizable batch,
    and the first batch (`batch_size_start`, default `world_size × micro_batch_size`) is raised to it.
    """
    policy_name = args.batch_size_policy or "constant"
    start, _ = _start_and_min(args, world_size, micro_batch_size)
    policies = {
        "constant": lambda: ConstantPolicy(start),
        "linear": lambda: LinearRampPolicy(
            start, args.batch_size_end, args.batch_size_ramp_tokens or args.max_tokens
        ),
        "gns": lambda: GNSPolicy(args.gns_batch_multiplier),
        "doubling": lambda: DoublingPolicy(threshold=args.doubling_threshold),
        "schedule_file": lambda: ScheduleFilePolicy(
            args.batch_size_schedule_file,
            interpolation=args.batch_size_schedule_interpolation,
            reload_every_steps=args.batch_size_schedule_reload_steps,
        ),
    }
    return _controller(
        args, policies[policy_name](), world_size, micro_batch_size,
        hysteresis=args.batch_size_hysteresis,
        min_interval_tokens=args.batch_size_min_interval_tokens,
        min_interval_steps=args.batch_size_min_interval_steps,
        monotonic=args.batch_size_monotonic,
    )  # fmt: skip


def _controller(args, policy, world_size: int, micro_batch_size: int, **behaviour) -> BatchSizeController:
    """A controller with `args`' first batch, bounds and rounding (`_start_and_min`), and `policy`."""
    start, minimum = _start_and_min(args, world_size, micro_batch_size)
    return BatchSizeController(
        policy,
        initial_batch_size=start,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        granularity=args.batch_size_granularity,
        min_batch_size=minimum,
        max_batch_size=args.batch_size_max,
        **behaviour,
    )


def smallest_global_batch(args, world_size: int, micro_batch_size: int) -> int:
    """The smallest global batch (examples) an optimizer step can have under `args`.

    Without batch control: `micro_batch_size × gradient_accumulation_steps × world_size`. With it: the
    smaller of the controller's first batch and its lower bound (what a reactive policy may go down to).
    Raises the controller's `ValueError` on bounds that hold no realizable batch.
    """
    if not getattr(args, "batch_control_enabled", False):
        return micro_batch_size * getattr(args, "gradient_accumulation_steps", 1) * world_size
    # The bounds and rounding of `controller_from_arguments`, without building (or reading) the policy.
    controller = _controller(args, ConstantPolicy(1), world_size, micro_batch_size)
    return min(controller.batch_size, controller.quantize(controller.min_batch_size))


def lr_schedule_from_arguments(
    args, first_batch_size: int, tokens_per_example: float
) -> tuple[TokenLRSchedule, BatchLRScaling | None]:
    """The token LR schedule (and batch scaling) that `args` describe; needs `args.max_tokens`.

    Args:
        first_batch_size (`int`): global batch of the first step (the default reference batch, and
            the batch at which `warmup_steps` converts to tokens).
        tokens_per_example (`float`): tokens of one example, to convert `warmup_steps` to tokens.
    """
    name = args.lr_schedule or HF_SCHEDULER_EQUIVALENTS.get(
        str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    )
    if name is None:
        raise ValueError(
            f"lr_scheduler_type={args.lr_scheduler_type!r} has no token-denominated version; with "
            f"max_tokens set, choose lr_schedule among {LR_SCHEDULES}."
        )
    total = int(args.max_tokens)
    warmup = args.lr_warmup_tokens
    if warmup is None:
        warmup = args.lr_warmup_fraction * total
        steps = getattr(args, "warmup_steps", 0) or 0
        if not warmup and 0 < steps < 1:  # HF: a float below 1 is a fraction of training
            warmup = steps * total
        elif not warmup and steps >= 1:
            warmup = steps * first_batch_size * tokens_per_example
    warmup = int(min(warmup, total))
    if name == "d2z":
        schedule = d2z(total, warmup)
    elif name == "linear_to_fraction":
        schedule = linear_to_fraction(
            total, 0.1 if args.lr_final_fraction is None else args.lr_final_fraction, warmup
        )
    elif name == "cosine":
        schedule = cosine(total, warmup, args.lr_final_fraction or 0.0)
    else:
        schedule = TokenLRSchedule(total, warmup, "constant")
    scaling = None
    if args.lr_batch_scaling != "none":
        scaling = BatchLRScaling(args.lr_batch_scaling, args.lr_reference_batch_size or first_batch_size)
    return schedule, scaling
