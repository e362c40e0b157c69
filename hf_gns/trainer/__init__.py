"""`GNSTrainer` and its arguments: the HF Trainer with an online gradient noise scale."""

from .arguments import GNSTrainingArguments
from .checkpoint import STATE_FILE, CheckpointStateRegistry
from .trainer import GNSTrainer

__all__ = ["STATE_FILE", "CheckpointStateRegistry", "GNSTrainer", "GNSTrainingArguments"]
