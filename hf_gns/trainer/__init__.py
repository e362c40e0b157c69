"""The trainer side: `GNSMixin` (measurement), `BatchSizeControlMixin`, `GNSTrainer`, the arguments."""

from .arguments import GNSArguments, GNSTrainingArguments, gns_config
from .batching import BatchSizeControlMixin
from .checkpoint import STATE_FILE, CheckpointStateRegistry
from .measurement import GNSMixin
from .trainer import GNSTrainer

__all__ = [
    "STATE_FILE",
    "BatchSizeControlMixin",
    "CheckpointStateRegistry",
    "GNSArguments",
    "GNSMixin",
    "GNSTrainer",
    "GNSTrainingArguments",
    "gns_config",
]
