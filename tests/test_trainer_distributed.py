"""Two processes (DDP on gloo) give the statistics of one process on the combined batch.

`gns_two_processes.py` runs under `torch.distributed.run --nproc_per_node 2` and records, per
optimizer step, the global statistics and the rows each process used; here one process replays
the combined micro-batches (rank 0's rows then rank 1's, in order) and must find the same
Σ_i |c_i|² and |G_B|² per group (relative 1e-5), with and without gradient accumulation and
with `average_tokens_across_devices` off and on. Each process's own rows, replayed alone, give
the local |g_r|² behind the classic DDP estimate `gns_ddp`.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from gns_fixtures import InOrderGNSTrainer, Rows, make_args, tiny_gpt2
from transformers.utils import logging as hf_logging

import hf_gns

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def run_two_processes(script, *script_args):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_GNS_BACKEND="torch", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(TESTS, script), *script_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def replay(tmp_path, micro_batches, accumulation, steps):
    """Statistics of one process reading `micro_batches` (lists of rows) in order."""
    hf_logging.set_verbosity_error()
    rows = [row for micro in micro_batches for row in micro]
    args = make_args(
        tmp_path,
        per_device_train_batch_size=len(micro_batches[0]),
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        logging_steps=1,
        max_grad_norm=1.0,
    )
    records = []

    class Recording(InOrderGNSTrainer):
        def _read_gns_statistics(self, model):
            pending = self._gns_pending
            super()._read_gns_statistics(model)
            if pending:
                records.append(self.last_step_statistics())

    with hf_gns.use_backend("torch"):
        Recording(model=tiny_gpt2(), args=args, train_dataset=Rows(rows)).train()
    return records


def assert_close_rel(actual, expected, rel=1e-5):
    assert actual == pytest.approx(expected, rel=rel, abs=0), (actual, expected)


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    """One two-process launch (they are slow to start) runs all four cases."""
    out = tmp_path / "results.json"
    run_two_processes("gns_two_processes.py", str(out))
    with open(out) as f:
        results = json.load(f)
    assert [(r["accumulation"], r["average_tokens"]) for r in results] == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    for case, result in enumerate(results):
        check_case(result, tmp_path / str(case))


def check_case(result, tmp_path):
    accumulation, ranks = result["accumulation"], result["micro_batches"]
    steps = len(result["statistics"])
    assert steps == 3 and len(ranks) == 2 and len(ranks[0]) == len(ranks[1]) == steps * accumulation
    combined = [ranks[0][m] + ranks[1][m] for m in range(len(ranks[0]))]
    reference = replay(tmp_path / "combined", combined, accumulation, steps)
    for got, want in zip(result["statistics"], reference):
        assert got["batch_size"] == want["batch_size"] == 4 * accumulation
        assert got["batch_tokens"] == want["batch_tokens"]
        assert got["example_sq_norm_sum"].keys() == want["example_sq_norm_sum"].keys()
        for group in want["example_sq_norm_sum"]:
            assert_close_rel(got["example_sq_norm_sum"][group], want["example_sq_norm_sum"][group])
            assert_close_rel(got["batch_sq_norm"][group], want["batch_sq_norm"][group])
    assert result["tokens_seen"] == sum(r["batch_tokens"] for r in reference)

    # classic DDP estimate: each process's own batch, alone, gives its local gradient
    local = [replay(tmp_path / f"rank{r}", ranks[r], accumulation, steps) for r in range(2)]
    for k, got in enumerate(result["statistics"]):
        mean_local = (local[0][k]["batch_sq_norm"]["total"] + local[1][k]["batch_sq_norm"]["total"]) / 2
        assert_close_rel(got["local_grad_sq_norm_mean"], mean_local)

    last = result["logs"][-1]
    assert last["gns"] == pytest.approx(last["gns_trace_cov"] / last["gns_sq_norm"])
    assert last["tokens_seen"] == result["tokens_seen"]
    assert math.isfinite(last["gns_ddp"])


def test_fsdp2_sharded_gradients_give_the_unsharded_statistics():
    """`fully_shard` on gloo: DTensor shard shares of |G_B|² and per-example norms, all-reduced (rel 1e-5)."""
    run_two_processes("gns_fsdp2_two_processes.py")
