"""The GNS options: `GNSArguments` (a dataclass mixin), `GNSTrainingArguments`, and `gns_config`.

`GNSArguments` holds the `gns_*` fields. It composes with any `TrainingArguments` subclass:
`GNSTrainingArguments = GNSArguments + BatchControlArguments + TrainingArguments`, and
`gns_config(SFTConfig)` builds the same composition on TRL's (or any) config class. A trainer
mixin given a config without these fields (plain `TrainingArguments`, TRL's `SFTConfig`) uses
the defaults below (`gns_options`).
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace

from transformers import TrainingArguments

from ..gns.groups import GROUPINGS
from .batch_arguments import MIN_EXAMPLES_PER_STEP, BatchControlArguments, smallest_global_batch

GNS_TRACK_CHOICES = ("norms", "all")
GNS_INCOMPLETE_CHOICES = ("error", "warn")
CONTROLLER_SIGNALS = ("calibrated", "measured")
# After a dense start of one EMA window, one optimizer step in 10 measures every layer
# (`gns_calibrate_every`). Such a step cost 1-13% more than a norms-only one on GPT-2 124M eager
# (H200, README), so calibration costs ≤ 1.3% of throughput after the dense start (issue 14's
# bound: 3%); the ratio's noise grows as √N (`hf_gns.gns.calibration`). Replayed on an H200 run
# (benchmarks/validate_calibration.py), N=10 kept every step within 6% of the all-layer GNS.
DEFAULT_CALIBRATE_EVERY = 10


@dataclass
class GNSArguments:
    """The options of the online gradient noise scale (a dataclass mixin of a `TrainingArguments` class).

    Args:
        gns_track (`str`, *optional*, defaults to `"norms"`): which parameters the GNS is measured
            on: `"norms"` (the normalization layers, free with the fused kernels; Gray et al. 2024
            show their GNS tracks the whole model's) or `"all"` (also Linear, Conv1D and Embedding
            weights, `hf_gns.patch(model, targets="all")`).
        gns_ema_decay (`float`, *optional*, defaults to `0.9999`): EMA decay PER EXAMPLE of the two
            GNS components; a step of B examples weighs the past by `gns_ema_decay ** B`. Memory
            about `1 / (1 - gns_ema_decay)` examples (10k by default: 20 steps of 512 sequences).
        gns_groups (`list[str]`, *optional*, defaults to `["type", "layer", "module"]`): which
            per-group GNS families to log besides the total: `type` (`gns/type/norm`, ...),
            `layer` (`gns/layer/<i>`), `module` (`gns/module/<norm module>`). `[]` logs the total only.
        gns_log_ddp_estimate (`bool`, *optional*, defaults to `False`): also log `gns_ddp`, the
            classic two-batch estimate whose small batch is one process's batch (needs DDP with
            world size > 1; costs one squared norm per tracked gradient in a DDP communication hook).
        gns_patch_strict (`bool`, *optional*, defaults to `False`): `strict` of `hf_gns.patch`: fail
            if a norm module with parameters cannot be patched instead of skipping it.
        gns_restart_statistics (`bool`, *optional*, defaults to `False`): resume from a checkpoint whose
            `hf_gns_state.pt` is missing or unreadable (refused otherwise): the GNS statistics start
            again, the token count, data position and batch continue from `trainer_state.json`
            (`hf_gns.trainer.resume`).
        gns_calibrate_every (`int`, *optional*): with `gns_track="norms"`, one optimizer step in this
            many (steps 0, N, 2N, ...) also measures every Linear/Conv1D/Embedding layer (the model is
            patched with `targets="all"`, whose reductions are switched on for that step only), and
            the ratio (all layers / norm layers, `hf_gns.gns.calibration`) scales the norm layers'
            GNS: logged as `gns_calibrated` and `gns_calibration_ratio`. `0` turns it off. Defaults
            to 10 with `batch_size_policy="gns"` (the norm GNS alone reads several times lower than
            the whole model's, issue 14) and to 0 otherwise.
        gns_calibrate_dense_examples (`int`, *optional*): when calibrating, every step measures every
            layer until about this many examples (then one step in `gns_calibrate_every`): early
            steps move the ratio fast and a sparse sample of them is far off (`hf_gns.gns.calibration`).
            Defaults to one EMA window, `1 / (1 - gns_ema_decay)` examples; `0`: sparse from the start.
        gns_controller_signal (`str`, *optional*): the GNS that batch control acts on (and that
            `current_gns()` returns): `"calibrated"` (`gns_calibrated`; the default when calibrating)
            or `"measured"` (`gns`, the GNS of the tracked parameters; the default otherwise).
        gns_incomplete (`str`, *optional*, defaults to `"error"`): what to do at an optimizer step where a
            tracked parameter got a gradient but not exactly one per-example value per example (its
            module's forward was replaced after patching, its weight was used outside its module, ...):
            `"error"` raises `hf_gns.patching.IncompleteStatisticsError` naming the module and the likely
            cause; `"warn"` drops the parameter from the estimate for the rest of the run (a warning once,
            the count in the logged `gns_dropped_parameters`) and skips that step. Either way no GNS is
            ever computed from incomplete statistics. (Calibration steps' extra layers always raise.)
    """

    gns_track: str = field(
        default="norms", metadata={"help": "Parameters the GNS is measured on: 'norms' or 'all'."}
    )
    gns_ema_decay: float = field(
        default=0.9999, metadata={"help": "EMA decay per example of the GNS components, in (0, 1)."}
    )
    gns_groups: list[str] = field(
        default_factory=lambda: list(GROUPINGS),
        metadata={"help": "Per-group GNS families to log besides the total: type, layer, module."},
    )
    gns_log_ddp_estimate: bool = field(
        default=False, metadata={"help": "Also log the classic DDP estimate `gns_ddp` (world size > 1)."}
    )
    gns_patch_strict: bool = field(
        default=False, metadata={"help": "Fail if some norm module with parameters cannot be patched."}
    )
    gns_restart_statistics: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint without a readable hf_gns_state.pt: fresh GNS statistics."},
    )
    gns_calibrate_every: int | None = field(
        default=None,
        metadata={
            "help": "Measure every layer on one optimizer step in N to calibrate the norm GNS (0: off; "
            "default 10 with batch_size_policy='gns', else 0)."
        },
    )
    gns_calibrate_dense_examples: int | None = field(
        default=None,
        metadata={
            "help": "Calibrate on every step for the first ~N examples (default: one EMA window, "
            "1/(1-gns_ema_decay); 0: off)."
        },
    )
    gns_controller_signal: str | None = field(
        default=None,
        metadata={
            "help": "GNS batch control acts on: 'calibrated' (default when calibrating) or 'measured'."
        },
    )
    gns_incomplete: str = field(
        default="error",
        metadata={"help": "A tracked parameter without one value per example: 'error' or 'warn' (drop it)."},
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_gns_arguments(self)


def check_gns_arguments(args) -> None:
    """Raise `ValueError` naming the option when a `gns_*` value is out of range; normalizes `gns_groups`."""
    if args.gns_track not in GNS_TRACK_CHOICES:
        raise ValueError(f"gns_track must be one of {list(GNS_TRACK_CHOICES)}, got {args.gns_track!r}")
    if not 0.0 < args.gns_ema_decay < 1.0:
        raise ValueError(
            f"gns_ema_decay is a decay per example and must be in (0, 1), got {args.gns_ema_decay}; "
            "e.g. 0.9999 averages over about 10k examples"
        )
    if isinstance(args.gns_groups, str):
        args.gns_groups = [g for g in args.gns_groups.replace(",", " ").split() if g]
    unknown = [g for g in args.gns_groups if g not in GROUPINGS]
    if unknown:
        raise ValueError(f"gns_groups has unknown entries {unknown}: choose among {list(GROUPINGS)}")
    if args.gns_incomplete not in GNS_INCOMPLETE_CHOICES:
        raise ValueError(
            f"gns_incomplete must be one of {list(GNS_INCOMPLETE_CHOICES)}, got {args.gns_incomplete!r}"
        )
    calibration_settings(args, getattr(args, "batch_size_policy", None))  # raises on bad options


def calibration_settings(args, batch_size_policy: str | None) -> tuple[int, str]:
    """`(interval, controller signal)` of the `gns_*` options `args`, defaults resolved (`GNSArguments`).

    Raises:
        `ValueError`: a negative interval, calibration with `gns_track="all"` (every step already
            measures every layer), an unknown signal, or `"calibrated"` without calibration.
    """
    every = getattr(args, "gns_calibrate_every", None)
    track = getattr(args, "gns_track", "norms")
    if every is None:
        every = DEFAULT_CALIBRATE_EVERY if batch_size_policy == "gns" and track == "norms" else 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"gns_calibrate_every must be an int >= 0 (0: off), got {every!r}")
    if every and track != "norms":
        raise ValueError(
            f"gns_calibrate_every={every} calibrates the norm layers' GNS to every layer's, but gns_track="
            f"{track!r} already measures every layer on every step: set gns_calibrate_every=0"
        )
    signal = getattr(args, "gns_controller_signal", None) or ("calibrated" if every else "measured")
    if signal not in CONTROLLER_SIGNALS:
        raise ValueError(f"gns_controller_signal must be one of {list(CONTROLLER_SIGNALS)}, got {signal!r}")
    if signal == "calibrated" and not every:
        raise ValueError(
            "gns_controller_signal='calibrated' needs calibration: set gns_calibrate_every > 0 "
            "(with gns_track='norms')"
        )
    return every, signal


def check_examples_per_step(args, world_size: int | None = None) -> None:
    """Raise `ValueError` (one line, naming the options) when an optimizer step can hold fewer than 2
    examples, so that the GNS could never be measured (`MIN_EXAMPLES_PER_STEP`).

    The smallest global batch is `per_device_train_batch_size × gradient_accumulation_steps ×
    world_size`, or with batch control the smallest the controller may choose (its first batch and
    its lower bound, `smallest_global_batch`; unset, they default to 2 or more). An example is a row
    of the batch here: a row that packs several documents (padding-free) or a DPO pair holds more, so
    TRL configs (`gns_config`) are not checked; `GNSTrainingArguments` and `GNSTrainer` are.

    Args:
        args (`TrainingArguments`): with or without the batch-control fields.
        world_size (`int`, *optional*): data-parallel processes; defaults to `args.world_size`.
    """
    micro_batch = args.per_device_train_batch_size
    if micro_batch < 1:
        raise ValueError(f"per_device_train_batch_size must be at least 1, got {micro_batch}")
    world = args.world_size if world_size is None else world_size
    controlled = getattr(args, "batch_control_enabled", False)
    if controlled and args.batch_size_max is not None and args.batch_size_max < MIN_EXAMPLES_PER_STEP:
        smallest, how = args.batch_size_max, f"batch_size_max={args.batch_size_max}: set it to 2 or more"
    else:
        smallest = smallest_global_batch(args, world, micro_batch)
        if controlled:
            how = f"batch_size_min={args.batch_size_min} allows it: set batch_size_min=2 or more (unset: 2)"
        else:
            how = (
                f"per_device_train_batch_size={micro_batch} x gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} x {world} process{'es' if world > 1 else ''}: use "
                "per_device_train_batch_size=2 or gradient_accumulation_steps=2"
            )
    if smallest < MIN_EXAMPLES_PER_STEP:
        raise ValueError(
            f"the global batch can be {smallest} example per optimizer step, and the GNS needs at least "
            f"{MIN_EXAMPLES_PER_STEP} (the variance of one example is undefined): {how}"
        )


@dataclass
class GNSTrainingArguments(GNSArguments, BatchControlArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the GNS options (`GNSArguments`) and the batch-size
    controller and token-schedule options (`BatchControlArguments`, `hf_gns.trainer.batch_arguments`:
    `max_tokens`, `batch_size_policy`, `lr_schedule`, ...).

    Refuses, when built, a global batch that can be smaller than 2 examples (`check_examples_per_step`).
    """

    def __post_init__(self):
        super().__post_init__()  # TrainingArguments' own: the world size is known after it
        check_examples_per_step(self)


@functools.cache
def gns_config(config_class: type) -> type:
    """`config_class` (a `TrainingArguments` dataclass, e.g. TRL's `SFTConfig`) with the GNS and
    batch-control fields added: the way to pass GNS options to a trainer that takes its own config.

    The class is built once per `config_class` and named `GNS<name>` in this module (so the Trainer's
    `training_args.bin` pickles). Equivalent to writing it out, which is what to do when the arguments
    must also be unpickled in a process that did not call `gns_config`:
    `@dataclass class GNSSFTConfig(GNSArguments, BatchControlArguments, SFTConfig): pass`.

    Example:
    ```python
    >>> from trl import SFTConfig, SFTTrainer
    >>> class SFTTrainerWithGNS(hf_gns.GNSMixin, SFTTrainer): pass
    >>> args = hf_gns.gns_config(SFTConfig)("out", packing=True, gns_track="all", gns_ema_decay=0.999)
    ```
    """
    if issubclass(config_class, GNSArguments):
        return config_class
    if not issubclass(config_class, TrainingArguments):
        raise TypeError(f"gns_config needs a TrainingArguments subclass, got {config_class.__name__}")
    name = f"GNS{config_class.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": f"`{name}` with the GNS options."}
    composed = dataclass(type(name, (GNSArguments, BatchControlArguments, config_class), namespace))
    globals().setdefault(name, composed)
    return composed


def _field_default(f):
    return f.default if f.default is not MISSING else f.default_factory()


def gns_options(args) -> SimpleNamespace:
    """The GNS options of `args`: its `gns_*` fields, the `GNSArguments` defaults for those it lacks."""
    return SimpleNamespace(**{f.name: getattr(args, f.name, _field_default(f)) for f in fields(GNSArguments)})
