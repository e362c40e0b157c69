"""Two-process GNSTrainer run (DDP on gloo), recording what a single process must reproduce.

Run by `tests/test_trainer_distributed.py` as
`ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node 2 tests/gns_two_processes.py OUT.json`,
or on GPUs without ACCELERATE_USE_CPU. For each case (gradient accumulation 1 and 2,
`average_tokens_across_devices` off and on) it trains a frozen tiny GPT-2 for a few steps and
records, per optimizer step, the global statistics (`GNSTrainer.last_step_statistics`) and the
token rows every process used in every micro-batch. The test replays the combined batches
in one process and compares.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile

import torch
import torch.distributed as dist
from gns_fixtures import FixedTokens, leave_after_checks, make_args, tiny_gpt2

import hf_gns

STEPS = 3
CASES = [
    (1, False),
    (1, True),
    (2, False),
    (2, True),
]  # (gradient accumulation, average_tokens_across_devices)


class RecordingTrainer(hf_gns.GNSTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[list[list[int]]] = []
        self.step_statistics: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches.append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch)

    def _read_gns_statistics(self, model):
        pending = self._gns_pending
        super()._read_gns_statistics(model)
        if pending:
            self.step_statistics.append(self.last_step_statistics())


def run_case(accumulation: int, average_tokens: bool) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        args = make_args(
            output_dir,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=accumulation,
            max_steps=STEPS,
            logging_steps=1,
            max_grad_norm=1.0,
            average_tokens_across_devices=average_tokens,
            gns_log_ddp_estimate=True,
            gns_ema_decay=0.99,
        )
        trainer = RecordingTrainer(model=tiny_gpt2(), args=args, train_dataset=FixedTokens())
        assert dist.is_initialized() and dist.get_world_size() == 2, "run under torchrun --nproc_per_node 2"
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    logs = [entry for entry in trainer.state.log_history if "gns" in entry]
    assert len(logs) == STEPS and all(math.isfinite(entry["gns_ddp"]) for entry in logs), logs
    assert logs[-1]["batch_size"] == 2 * 2 * accumulation
    micro_batches = [None, None]
    dist.all_gather_object(micro_batches, trainer.micro_batches)
    return {
        "accumulation": accumulation,
        "average_tokens": average_tokens,
        "micro_batches": micro_batches,  # [rank][micro-batch] -> rows
        "statistics": trainer.step_statistics,
        "logs": logs,
        "tokens_seen": trainer.tokens_seen,
    }


def main():
    hf_gns.set_backend("torch")
    results = [run_case(accumulation, average_tokens) for accumulation, average_tokens in CASES]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
    leave_after_checks()
