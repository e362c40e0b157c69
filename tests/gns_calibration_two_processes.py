"""Calibration under DDP (2 processes on gloo): the calibration statistics are all-reduced like the rest.

Run by `tests/test_gns_calibration_trainer.py` as `ACCELERATE_USE_CPU=1 python -m
torch.distributed.run --nproc_per_node 2 tests/gns_calibration_two_processes.py OUT` (or on
GPUs without ACCELERATE_USE_CPU). A frozen tiny GPT-2 trains 6 steps with gradient
accumulation 2 twice, measured on every layer and on the norms with calibration every step;
calibrated and all-layer GNS must agree at every step (the identity of `hf_gns.gns.calibration`),
and both processes must log the same values. Rank 0 writes `OUT/ok.json`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from gns_fixtures import FixedTokens, leave_after_checks, make_args, tiny_gpt2

import hf_gns


def train(**overrides) -> list[dict]:
    with tempfile.TemporaryDirectory() as output_dir:
        args = make_args(output_dir, per_device_train_batch_size=2, max_steps=6, logging_steps=1, **overrides)
        trainer = hf_gns.GNSTrainer(model=tiny_gpt2(), args=args, train_dataset=FixedTokens(64))
        assert dist.is_initialized() and dist.get_world_size() == 2, "run under torchrun --nproc_per_node 2"
        trainer.train()
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    return [entry for entry in trainer.state.log_history if "gns" in entry]


def main() -> None:
    out = sys.argv[1]
    every_layer = train(gns_track="all", gns_ema_decay=0.99)
    calibrated = train(gns_calibrate_every=1, gns_ema_decay=0.99)
    assert len(every_layer) == len(calibrated) == 6
    for reference, entry in zip(every_layer, calibrated):
        assert entry["batch_size"] == reference["batch_size"] == 2 * 2 * 2  # 2 processes × 2 × accumulation 2
        truth = reference["gns"]
        assert abs(entry["gns_calibrated"] / truth - 1) < 1e-6, (entry, reference)
    values = [(e["gns"], e["gns_calibrated"], e["gns_calibration_ratio"]) for e in calibrated]
    gathered = [None, None]
    dist.all_gather_object(gathered, values)
    assert gathered[0] == gathered[1], gathered  # every process holds the same calibration
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ok.json"), "w") as f:
            json.dump({"calibrated": values, "all_layers": [e["gns"] for e in every_layer]}, f)


if __name__ == "__main__":
    main()
    leave_after_checks()
