"""`GNSTrainingArguments`: the `TrainingArguments` of `GNSTrainer`, with its GNS options."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..gns.groups import GROUPINGS
from .batch_arguments import BatchControlArguments

GNS_TRACK_CHOICES = ("norms", "all")


@dataclass
class GNSTrainingArguments(BatchControlArguments, TrainingArguments):
    """`transformers.TrainingArguments` plus the options of the online gradient noise scale.

    The batch-size controller and token-schedule options (`max_tokens`, `batch_size_policy`,
    `lr_schedule`, ...) come from `BatchControlArguments` (`hf_gns.trainer.batch_arguments`).

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

    def __post_init__(self):
        super().__post_init__()
        if self.gns_track not in GNS_TRACK_CHOICES:
            raise ValueError(f"gns_track must be one of {list(GNS_TRACK_CHOICES)}, got {self.gns_track!r}")
        if not 0.0 < self.gns_ema_decay < 1.0:
            raise ValueError(
                f"gns_ema_decay is a decay per example and must be in (0, 1), got {self.gns_ema_decay}; "
                "e.g. 0.9999 averages over about 10k examples"
            )
        if isinstance(self.gns_groups, str):
            self.gns_groups = [g for g in self.gns_groups.replace(",", " ").split() if g]
        unknown = [g for g in self.gns_groups if g not in GROUPINGS]
        if unknown:
            raise ValueError(f"gns_groups has unknown entries {unknown}: choose among {list(GROUPINGS)}")
