"""GNSTrainer with calibration (`gns_calibrate_every`): vs an all-layer run, resume, switched-off steps."""

import json
import os
import subprocess
import sys

import pytest
import torch
from batching_setup import make_trainer
from gns_fixtures import SEQ, FixedTokens, make_args, tiny_gpt2
from transformers.utils import logging as hf_logging

import hf_gns
from hf_gns.patching import embedding, linear
from hf_gns.trainer import STATE_FILE


@pytest.fixture(autouse=True)
def _torch_backend_one_thread_and_quiet():
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only contends on a busy machine
    try:
        with hf_gns.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def _train(tmp_path, dataset=None, **overrides):
    trainer = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path, **overrides), train_dataset=dataset or FixedTokens()
    )
    trainer.train()
    return trainer


def _logs(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "gns" in entry}


@pytest.mark.parametrize(
    "every, learning_rate, tolerance, from_step", [(1, 1e-2, 1e-6, 16), (4, 0.0, 0.10, 32)]
)
def test_calibrated_gns_matches_an_all_layer_run(tmp_path, every, learning_rate, tolerance, from_step):
    """The same training (48 steps) measured on every layer, and on the norms with calibration.

    Every step (training with LR > 0): the calibrated GNS equals the all-layer GNS (same steps, same
    EMAs: an identity, up to the fp32 order of the group sums).
    Every 4 steps (LR 0, so the ratio all/norms is constant): within 10% from step 32. (With LR > 0
    on this tiny run the ratio grows 3x in 48 steps, and a ratio last measured up to 3 steps ago
    lags: 15% low at step 48 with a 200-example window.)
    """
    run = dict(max_steps=48, logging_steps=8, learning_rate=learning_rate, optim="adamw_torch")
    run.update(max_grad_norm=1.0, gns_ema_decay=0.995 if every == 1 else 0.999, gns_groups=[])
    run.update(gns_calibrate_dense_examples=0)  # the sparse schedule from step 0
    run.update(dataset=FixedTokens(256))
    every_layer = _train(tmp_path / "all", gns_track="all", **run)
    calibrated = _train(tmp_path / "calibrated", gns_calibrate_every=every, **run)
    assert calibrated.gns_calibration.steps == 48 // every
    assert calibrated.gns_estimator.group_names == ["total"] and len(calibrated._gns_tracked_names) == 10
    reference, logs = _logs(every_layer), _logs(calibrated)
    assert sorted(logs) == list(range(8, 49, 8))
    for step in (s for s in logs if s >= from_step):
        entry, truth = logs[step], reference[step]["gns"]
        assert entry["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)  # the same training
        assert entry["gns_calibrated"] == pytest.approx(truth, rel=tolerance), (step, entry, truth)
        assert entry["gns_calibrated"] == pytest.approx(
            entry["gns"] * entry["gns_calibration_ratio"], rel=1e-9
        )
        if learning_rate:  # in training, the norm layers' GNS alone reads lower
            assert entry["gns_calibration_ratio"] > 1.5
    assert calibrated.current_gns() == pytest.approx(logs[48]["gns_calibrated"], rel=1e-12)


def test_resume_continues_the_calibration_exactly(tmp_path):
    """Batches of 8 and a dense start of 32 examples: steps 0-3 calibrate, then 6 and 9 (every 3)."""
    args = dict(max_steps=12, logging_steps=1, save_strategy="steps", save_steps=5, gns_ema_decay=0.99)
    args.update(gns_calibrate_every=3, gns_calibrate_dense_examples=32)
    full = _train(tmp_path / "full", **args)
    checkpoint = tmp_path / "full" / "checkpoint-5"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)["gns_calibration"]
    assert int(state["estimator"]["steps"]) == 4 and state["dense_steps"] == 4

    resumed = hf_gns.GNSTrainer(
        model=tiny_gpt2(), args=make_args(tmp_path / "resumed", **args), train_dataset=FixedTokens()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full_logs, resumed_logs = _logs(full), _logs(resumed)
    assert [s for s in resumed_logs if s > 5] == list(range(6, 13))
    for step in range(6, 13):  # steps 6 and 9 calibrate after the resume, 0-3 came from the checkpoint
        for key in ("gns", "gns_calibrated", "gns_calibration_ratio"):
            assert resumed_logs[step][key] == pytest.approx(full_logs[step][key], rel=1e-12, abs=0), (
                step,
                key,
            )
    assert resumed.gns_calibration.steps == full.gns_calibration.steps == 6
    assert resumed.gns_calibration.dense_steps == 4


def test_layer_reductions_run_only_on_calibration_steps(tmp_path, monkeypatch):
    """Count the per-example linear op and embedding tap per optimizer step: zero except steps 0, 4, 8."""
    calls = {"linear": 0, "embedding": 0}

    def counting(name, op):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(linear, "linear_with_sq_norms", counting("linear", linear.linear_with_sq_norms))
    monkeypatch.setattr(
        embedding, "embedding_sq_norm_tap", counting("embedding", embedding.embedding_sq_norm_tap)
    )
    per_step = []

    class CountPerStep(hf_gns.GNSTrainer):
        def _gns_update_estimators(self, vector):
            super()._gns_update_estimators(vector)
            per_step.append(dict(calls))
            calls.update(linear=0, embedding=0)

    trainer = CountPerStep(
        model=tiny_gpt2(),
        args=make_args(tmp_path, max_steps=10, gns_calibrate_every=4, gns_calibrate_dense_examples=0),
        train_dataset=FixedTokens(),
    )
    trainer.train()
    # 2 micro-batches a step; GPT-2: 4 linears a block × 2 blocks + the tied head, wte and wpe.
    # Step 0's first forward runs each module on the call-counting (vector) path, which does not go
    # through these two ops (patching/example_grads.py) except the tied wte/lm_head pair, so step 0
    # counts the second micro-batch plus the tie's two calls.
    on = {"linear": 2 * 9, "embedding": 2 * 2}
    off = {"linear": 0, "embedding": 0}
    assert per_step[0] == {"linear": 9 + 1, "embedding": 2 + 1}
    assert per_step[1:] == [on if step % 4 == 0 else off for step in range(1, 10)]
    assert trainer.gns_calibration.steps == 3 and trainer.gns_estimator.steps == 10


def test_batch_control_acts_on_the_calibrated_gns(tmp_path):
    """With batch_size_policy='gns' calibration is on by default and the controller gets gns_calibrated."""
    seen = []

    def run(name, **overrides):
        trainer = make_trainer(
            str(tmp_path / name), FixedTokens(256), max_tokens=40 * 8 * SEQ, batch_size_policy="gns",
            batch_size_start=8, batch_size_min=4, batch_size_max=64, gns_batch_multiplier=8.0,
            batch_size_min_interval_steps=2, batch_size_granularity="example", **overrides,
        )  # fmt: skip
        update = trainer.batch_size_controller.update

        def spy(**kwargs):
            if kwargs["gns"] is not None:
                measured = trainer.gns_estimator.gns_tensor()[0]
                calibrated = trainer.gns_calibration.calibrate(measured)
                seen.append((kwargs["gns"], measured.item(), calibrated.item()))
            return update(**kwargs)

        trainer.batch_size_controller.update = spy
        trainer.train()
        return trainer

    trainer = run("default")
    assert trainer._gns_calibrate_every == 10 and trainer.gns_calibration.steps >= 2
    assert len(seen) > 5 and all(gns == calibrated for gns, _, calibrated in seen)
    assert all(abs(calibrated / measured - 1) > 0.05 for _, measured, calibrated in seen)
    assert trainer.batch_size_controller.changes
    seen.clear()
    run("measured", gns_controller_signal="measured", gns_calibrate_every=5)
    assert len(seen) > 5 and all(gns == measured for gns, measured, _ in seen)


def test_calibration_options(tmp_path):
    args = make_args(tmp_path)
    assert args.gns_calibrate_every is None
    trainer = hf_gns.GNSTrainer(model=tiny_gpt2(), args=args, train_dataset=FixedTokens())
    assert (
        not trainer.gns_calibration.enabled
        and "gns_calibration" not in trainer._gns_checkpoint_states().names()
    )
    for bad, message in (
        (dict(gns_calibrate_every=-1), "gns_calibrate_every must be an int >= 0"),
        (dict(gns_calibrate_every=5, gns_track="all"), "already measures every layer"),
        (dict(gns_controller_signal="calibrated"), "needs calibration"),
        (dict(gns_controller_signal="norms", gns_calibrate_every=5), "gns_controller_signal must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            make_args(tmp_path, **bad)


def _run_two_processes(script, *script_args):
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_GNS_BACKEND="torch", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(tests, script), *script_args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_processes_all_reduce_the_calibration(tmp_path):
    """DDP on 2 CPU processes, accumulation 2: calibrated every step == all-layer GNS, on both ranks."""
    _run_two_processes("gns_calibration_two_processes.py", str(tmp_path))
    result = json.loads((tmp_path / "ok.json").read_text())
    assert len(result["calibrated"]) == 6 and all(ratio > 0 for _, _, ratio in result["calibrated"])


def test_fsdp2_calibration_steps_give_the_unsharded_statistics():
    """FSDP2 on 2 CPU processes: layer reductions on, off, on; the (all, norms) statistics of each
    step equal one unsharded process's (asserted in the script)."""
    _run_two_processes("gns_calibration_fsdp2_two_processes.py")
