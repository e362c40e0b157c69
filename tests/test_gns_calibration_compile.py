"""Calibration under torch.compile: switching the all-layer reductions on for one step in N.

`set_layer_tracking` flips a Python flag read inside every patched Linear/Embedding forward, so
Dynamo guards on it: a compiled model gets one graph per state (off, on), compiled the first
time each state is seen and reused afterwards: no recompilation per calibration step, no graph
break, and the same numbers as eager. (Checked here under aot_eager; under inductor on CPU a
model-level loop gave the same two graphs and per-example norms within 3e-7 of eager.)
"""

import pytest
import torch
import torch._dynamo
from gns_fixtures import FixedTokens, make_args, tiny_llama
from torch._dynamo.utils import counters
from transformers.utils import logging as hf_logging

import hf_gns


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()
        torch.set_num_threads(threads)


def test_gns_trainer_compiled_calibrates_as_eager(tmp_path):
    """GNSTrainer with `torch_compile=True` (aot_eager), calibrating on steps 0, 1 and 4: the same
    losses, GNS and calibrated GNS as the eager trainer, two graphs and no graph break."""
    hf_logging.set_verbosity_error()
    run = dict(max_steps=8, logging_steps=8, learning_rate=1e-2, optim="adamw_torch", max_grad_norm=1.0)
    run.update(gns_ema_decay=0.999, gns_groups=[], gns_calibrate_every=4)
    run.update(gns_calibrate_dense_examples=16)  # batches of 8: steps 0, 1 (dense), then 4
    results = []
    with hf_gns.use_backend("torch"):
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
            args = make_args(tmp_path / str(compiled), **run, **extra)
            trainer = hf_gns.GNSTrainer(model=tiny_llama(), args=args, train_dataset=FixedTokens(64))
            trainer.train()
            logs = [entry for entry in trainer.state.log_history if "gns" in entry][-1]
            results.append((logs, trainer.gns_calibration.steps))
    (eager, eager_steps), (compiled, compiled_steps) = results
    assert eager_steps == compiled_steps == 3
    for key in ("loss", "gns", "gns_calibrated", "gns_calibration_ratio"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5), key
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 2
