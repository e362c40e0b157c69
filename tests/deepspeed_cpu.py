"""DeepSpeed under Accelerate on a CPU with several processes, from HF's `deepspeed=` (test harness only).

`TrainingArguments(deepspeed=...)` under torch.distributed.run: transformers (5.24) hands
accelerate no backend then (`ddp_backend` reaches `PartialState` only without `deepspeed`), and accelerate
1.15 finds none without a device (`PartialState._prepare_backend`), so it reports ONE process
while DeepSpeed's own `init_distributed` (gloo, `DS_ACCELERATOR=cpu`) joins all of them: every
process then reads the same batches. With `ACCELERATE_USE_CPU=1` it never enables DeepSpeed.
`cpu_deepspeed_state()` makes Accelerate pick gloo (its multi-CPU backend) before the Trainer
builds its state; `DistributedType` still becomes DEEPSPEED. `accelerate launch --config_file
recipes/accelerate/deepspeed_zero2.yaml` needs none of this: there `--ddp_backend gloo` reaches
accelerate (on GPUs it picks nccl itself).
"""

from __future__ import annotations

import os


def cpu_deepspeed_state() -> None:
    """Call before the first `TrainingArguments(deepspeed=...)`, under torch.distributed.run."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_CPU

    state.PartialState._prepare_backend = prepare_backend


def zero_config(stage: int) -> dict:
    """A ZeRO config whose sizes the Trainer fills in ("auto")."""
    zero = {"stage": stage}
    if stage == 3:  # save_model writes the gathered weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
    }
