"""Batch control on 2 processes (run by tests/test_trainer_batching.py::test_two_processes).

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/batching_two_processes.py OUTPUT_DIR

Runs a tiny GPT-2 under a (tokens -> batch) schedule that changes the global batch to odd
multiples of the world size (so steps end inside a micro-batch), and asserts on process 0
that the two processes together consumed exactly the fixed stream, dealt round-robin:
process r's i-th example of a step that starts at stream position S is position S + r + 2i.
Then runs the GNS policy and asserts both processes took the same batch at every step.
Writes the batches, the consumed stream and the final parameters to OUTPUT_DIR/result.pt,
where the pytest side compares them with the same run on 1 process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from batching_setup import example_dataset, make_trainer
from gns_fixtures import leave_after_checks

from hf_gns.trainer.example_stream import ExampleOrder

NUM_EXAMPLES, MAX_TOKENS = 15, 8 * 40
# Global batches, all even so that 1 and 2 processes realize the same ones (unit = world size).
SCHEDULE = {"0": 2, str(8 * 4): 6, str(8 * 16): 10, str(8 * 30): 4}


def run(output_dir: str) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    schedule = os.path.join(output_dir, f"schedule-{os.environ.get('RANK', '0')}.json")
    with open(schedule, "w") as handle:
        handle.write("[" + ", ".join(f"[{t}, {b}]" for t, b in SCHEDULE.items()) + "]")
    trainer = make_trainer(
        output_dir,
        example_dataset(NUM_EXAMPLES),
        max_tokens=MAX_TOKENS,
        batch_size_policy="schedule_file",
        batch_size_schedule_file=schedule,
        batch_size_granularity="example",
        per_device_train_batch_size=2,
        # SGD: Adam would blow rounding noise up to full steps where the gradient is ~0 (the key bias).
        optim="sgd",
        learning_rate=0.5,
    )
    trainer.train()
    world = trainer.args.world_size
    steps = trainer.steps_seen  # this process: [step][micro-batch] -> example indices
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, steps)
    else:
        gathered = [steps]
    order = ExampleOrder(NUM_EXAMPLES, seed=0)
    batches, consumed, start = [], [], 0
    for step in range(len(steps)):
        per_rank = [[i for micro in gathered[rank][step] for i in micro] for rank in range(world)]
        count = len(per_rank[0])
        assert all(len(examples) == count for examples in per_rank), per_rank
        for rank, examples in enumerate(per_rank):  # the round-robin deal
            assert examples == [order[start + rank + world * i] for i in range(count)], (step, rank)
        stream = [per_rank[rank][i] for i in range(count) for rank in range(world)]
        consumed.extend(stream)
        batches.append(world * count)
        start += world * count
    assert consumed == [order[s] for s in range(start)]
    logged = [h["batch_size"] for h in trainer.state.log_history if "loss" in h]
    assert logged == batches, (logged, batches)
    assert len(set(batches)) > 2, batches
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return {"world_size": world, "batches": batches, "consumed": consumed, "parameters": parameters}


def run_gns_policy(output_dir: str) -> list[int]:
    """The GNS policy on 2 processes: both must take the same decision at every step, without talking."""
    trainer = make_trainer(
        output_dir,
        example_dataset(NUM_EXAMPLES),
        max_tokens=8 * 60,
        batch_size_policy="gns",
        gns_calibrate_every=0,  # the policy on the measured GNS (calibration: test_gns_calibration_trainer)
        batch_size_min=2,
        batch_size_max=12,
        batch_size_hysteresis=0.0,
        batch_size_min_interval_steps=2,
        batch_size_granularity="example",
        per_device_train_batch_size=2,
    )
    trainer.train()
    counts = [sum(len(micro) for micro in step) for step in trainer.steps_seen]
    gathered = [None, None]
    dist.all_gather_object(gathered, counts)
    assert gathered[0] == gathered[1], gathered
    batches = [h["batch_size"] for h in trainer.state.log_history if "loss" in h]
    assert batches == [2 * c for c in counts] and len(set(batches)) > 1, batches
    return batches


def main() -> None:
    output_dir = sys.argv[1]
    assert int(os.environ.get("WORLD_SIZE", "1")) == 2, "run me with torchrun --nproc_per_node 2"
    run_gns_policy(os.path.join(output_dir, "gns"))
    result = run(output_dir)
    assert result["world_size"] == 2 and dist.get_world_size() == 2
    if dist.get_rank() == 0:
        torch.save(result, os.path.join(output_dir, "result.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
    leave_after_checks()
