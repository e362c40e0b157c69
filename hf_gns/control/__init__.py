"""Batch-size control and token-denominated LR schedules (pure: no torch.distributed, no transformers)."""

from .controller import BatchChange, BatchSizeController, realizable_batch_size
from .policies import (
    BatchSizePolicy,
    ConstantPolicy,
    ControlInputs,
    DoublingPolicy,
    GNSPolicy,
    LinearRampPolicy,
    ScheduleFilePolicy,
    SchedulePolicy,
    read_schedule_file,
)
from .schedules import BatchLRScaling, TokenLRSchedule, TokenLRScheduler, cosine, d2z, linear_to_fraction

__all__ = [
    "BatchChange",
    "BatchLRScaling",
    "BatchSizeController",
    "BatchSizePolicy",
    "ConstantPolicy",
    "ControlInputs",
    "DoublingPolicy",
    "GNSPolicy",
    "LinearRampPolicy",
    "ScheduleFilePolicy",
    "SchedulePolicy",
    "TokenLRSchedule",
    "TokenLRScheduler",
    "cosine",
    "d2z",
    "linear_to_fraction",
    "read_schedule_file",
    "realizable_batch_size",
]
