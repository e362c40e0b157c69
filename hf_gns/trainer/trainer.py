"""`GNSTrainer`: the HF Trainer with an online gradient noise scale and batch-size control.

The composition `GNSMixin + BatchSizeControlMixin + Trainer`. The order matters: `GNSMixin`
first, so that its `train` restores the checkpointed states (the controller and the data
position among them) before `BatchSizeControlMixin.train` reads them, and so that its
`training_step` sees every micro-batch that `BatchSizeControlMixin` feeds back through
`self.training_step`.
"""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

from .arguments import check_examples_per_step
from .batching import BatchSizeControlMixin
from .measurement import GNSMixin


class GNSTrainer(GNSMixin, BatchSizeControlMixin, Trainer):
    """`transformers.Trainer` that measures the gradient noise scale (GNS) online, for free
    (`GNSMixin`), and can change the global batch at any optimizer step (`BatchSizeControlMixin`).

    Args:
        model (`PreTrainedModel` or `nn.Module`): patched here if it is not yet.
        args (`GNSTrainingArguments`): Trainer arguments with the `gns_*` and batch-control options;
            plain `TrainingArguments` get the GNS defaults and no batch control.
        *rest: every other `transformers.Trainer` argument.

    Example:
    ```python
    >>> args = GNSTrainingArguments("out", per_device_train_batch_size=8, logging_steps=10)
    >>> trainer = GNSTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    >>> trainer.train()
    >>> trainer.current_gns()  # examples
    ```

    Raises:
        `ValueError`: before anything else, when an optimizer step can hold fewer than 2 examples
            (`check_examples_per_step`): the GNS could never be measured.
    """

    def __init__(self, model=None, args=None, *rest, **kwargs):
        if isinstance(args, TrainingArguments):  # None: the Trainer's default, 8 examples a step
            check_examples_per_step(args)
        super().__init__(model, args, *rest, **kwargs)
