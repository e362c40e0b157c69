"""A global batch that changes at any optimizer step inside GNSTrainer.

Checks: the example stream and its round-robin deal; the data-order invariant (whatever the
batch does, the examples consumed are the fixed stream order, no drop, no repeat, across
epochs); realized batch and micro-batch sizes; loss normalization against a full-batch
oracle (with and without num_items_in_batch, partial micro-batches); the token budget and
the LR in tokens; resume exactness (bitwise on CPU in fp32); 2 processes under torchrun.
"""

import os
import subprocess
import sys

import pytest
import torch
from batching_setup import (
    example_dataset,
    example_indices,
    make_trainer,
    step_logs,
    tiny_model,
    training_arguments,
)

from hf_gns.control import d2z
from hf_gns.trainer.example_stream import DataPosition, ExampleOrder, MicroBatchSampler, StreamReader

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the stream -----------------------------------------------------------------------------


def test_example_order_is_a_fresh_seeded_permutation_each_epoch():
    order = ExampleOrder(10, seed=3)
    first, second = [order[s] for s in range(10)], [order[s] for s in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert [ExampleOrder(10, seed=3)[s] for s in range(20)] == first + second
    assert [ExampleOrder(4, seed=3, shuffle=False)[s] for s in range(6)] == [0, 1, 2, 3, 0, 1]


def test_micro_batch_samplers_deal_the_stream_round_robin():
    order = ExampleOrder(7, seed=0)
    world, size = 3, 2
    position = DataPosition(world, size, base=5)
    samplers = [iter(MicroBatchSampler(order, position, rank)) for rank in range(world)]
    stream = [order[s] for s in range(5, 5 + 4 * world * size)]  # crosses two epoch boundaries
    for i in range(4):
        micro = [next(sampler) for sampler in samplers]  # (rank, j)
        dealt = [micro[rank][j] for j in range(size) for rank in range(world)]
        assert dealt == stream[i * world * size : (i + 1) * world * size]


def test_a_sampler_restarts_at_a_partly_consumed_micro_batch():
    order = ExampleOrder(50, seed=1)
    position = DataPosition(2, 4, base=6, micro_batches=3, carry=1)
    assert position.examples_consumed == 6 + 2 * (3 * 4 - 1)
    micro = next(iter(MicroBatchSampler(order, position, rank=1)))
    assert micro == [order[6 + 2 * 4 * 2 + 1 + 2 * j] for j in range(4)]  # the 3rd micro-batch again


def test_a_position_saved_under_another_grid_resumes_at_the_first_unconsumed_example():
    saved = DataPosition(2, 4, base=6, micro_batches=3, carry=1)  # 6 + 2 × 11 = 28 examples consumed
    same, other = DataPosition(2, 4), DataPosition(3, 2)
    same.load_state_dict(saved.state_dict())
    other.load_state_dict(saved.state_dict())
    assert same == saved  # exact: the cut micro-batch is re-fetched
    assert (other.base, other.micro_batches, other.carry, other.examples_consumed) == (28, 0, 0, 28)


def test_the_stream_refuses_a_collator_that_flattens_examples_into_fewer_rows():
    """A padding-free collator puts a micro-batch's examples in one row: counting rows would be wrong."""
    flattened = {
        "input_ids": torch.arange(10)[None],
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]),
    }
    reader = StreamReader(DataPosition(world_size=1, micro_batch_size=3))
    with pytest.raises(ValueError, match="one row per example"):
        reader.take(iter([flattened]), 3)


# ---- in the trainer -------------------------------------------------------------------------

# Global batches per step of a (tokens -> batch) schedule: SEQ_LEN = 8 tokens per example.
SCHEDULE = [(0, 3), (8 * 6, 7), (8 * 20, 2), (8 * 22, 5), (8 * 36, 2)]  # >= 2: batch control's lower bound


def schedule_file(tmp_path):
    path = tmp_path / "schedule.csv"
    path.write_text("tokens,batch_size\n" + "".join(f"{t},{b}\n" for t, b in SCHEDULE))
    return str(path)


def planned_batches(max_tokens):
    """The batch of each step: the schedule point at or below the tokens seen before it."""
    batches, tokens = [], 0
    while tokens < max_tokens:
        batch = [b for t, b in SCHEDULE if t <= tokens][-1]
        batches.append(batch)
        tokens += 8 * batch
    return batches


def test_data_order_invariant_and_realized_batches_while_the_batch_changes(tmp_path):
    dataset = example_dataset(11)  # small: the run crosses epoch boundaries mid-step
    max_tokens = 8 * 56
    trainer = make_trainer(
        str(tmp_path),
        dataset,
        max_tokens=max_tokens,
        batch_size_policy="schedule_file",
        batch_size_schedule_file=schedule_file(tmp_path),
        batch_size_granularity="example",
        per_device_train_batch_size=3,
        # HF's step estimate is then 448 / (7 × 8) = 8 steps: it must be extended while tokens remain,
        # and HF's loop opens a new "epoch" (a new loader iterator, re-fetching a cut micro-batch).
        batch_size_start=7,
    )
    trainer.train()
    plan = planned_batches(max_tokens)
    assert len(plan) > 2 * 8
    assert [sum(len(m) for m in step) for step in trainer.steps_seen] == plan
    # Micro-batches of 3: a step may open with the rows carried from a cut one and end with a cut one.
    assert all(len(m) == 3 for step in trainer.steps_seen for m in step[1:-1])
    assert all(len(step) <= -(-b // 3) + 1 for step, b in zip(trainer.steps_seen, plan))
    assert any(len(step[0]) < 3 and len(step) > 1 for step in trainer.steps_seen)  # carries happened
    consumed = [i for step in trainer.steps_seen for micro in step for i in micro]
    order = ExampleOrder(11, seed=0)
    assert consumed == [order[s] for s in range(sum(plan))]  # the stream, no drop, no repeat
    assert trainer.data_position.examples_consumed == sum(plan)
    logs = step_logs(trainer)
    assert [logs[s][1] for s in sorted(logs)] == plan  # logged batch_size
    assert trainer.tokens_seen == 8 * sum(plan) >= max_tokens > 8 * sum(plan[:-1])  # stops at the budget
    assert trainer.state.epoch == pytest.approx(sum(plan) / 11)  # data epochs
    schedule, tokens = d2z(max_tokens), 0  # default lr_scheduler_type "linear" -> D2Z in tokens
    for step, batch in enumerate(plan, start=1):
        assert logs[step][4] == pytest.approx(1e-2 * schedule(tokens), abs=1e-12)
        tokens += 8 * batch


def one_step_update(tmp_path, dataset, per_device, batch, accepts_loss_kwargs):
    """Parameter change of one SGD step (lr 1) at a global batch of `batch` examples, and which examples."""
    trainer = make_trainer(
        str(tmp_path / f"{per_device}-{batch}-{accepts_loss_kwargs}"),
        dataset,
        max_tokens=10**6,
        max_steps=1,
        batch_size_start=batch,
        batch_size_granularity="example",
        per_device_train_batch_size=per_device,
        optim="sgd",
        learning_rate=1.0,
        lr_schedule="constant",
        max_grad_norm=0.0,
    )
    trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    delta = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}
    return delta, [i for micro in trainer.steps_seen[0] for i in micro], trainer


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "one_over_n"])
@pytest.mark.parametrize("per_device, batch", [(2, 6), (2, 5), (4, 5)])
def test_loss_normalization_matches_the_full_batch_gradient(tmp_path, per_device, batch, accepts_loss_kwargs):
    dataset = example_dataset(16)
    delta, examples, trainer = one_step_update(tmp_path, dataset, per_device, batch, accepts_loss_kwargs)
    assert len(examples) == batch
    # Oracle: the same model, the whole batch in one forward/backward. With loss kwargs, the token
    # sum over HF's num_items_in_batch (labels[..., 1:] counted if HF sees a shifting loss: not for
    # a config-built GPT-2 whose loss_type is None); without, the mean over all tokens.
    model = tiny_model(0)
    ids = dataset.ids[examples]  # (batch, T)
    assert example_indices(ids) == examples
    if accepts_loss_kwargs:
        num_items = (ids[..., 1:] if trainer._loss_shifts_labels else ids).numel()
        model(input_ids=ids, labels=ids, num_items_in_batch=num_items).loss.backward()
    else:
        model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(delta[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    dataset = example_dataset(13)
    common = dict(
        max_tokens=8 * 44,
        batch_size_policy="gns",
        gns_calibrate_every=0,  # the policy on the measured GNS (calibration: test_gns_calibration_trainer)
        batch_size_min=2,  # a GNS needs 2 examples a step (check_examples_per_step)
        batch_size_max=9,
        batch_size_hysteresis=0.0,
        batch_size_min_interval_steps=2,
        batch_size_granularity="example",
        per_device_train_batch_size=2,
        lr_warmup_tokens=8 * 6,
        save_strategy="steps",
        save_steps=1,
    )
    reference = make_trainer(str(tmp_path / "reference"), dataset, dropout=0.1, **common)
    reference.train()
    expected = step_logs(reference)
    batches = [expected[s][1] for s in sorted(expected)]
    assert len(set(batches)) > 1, batches  # the GNS policy did move the batch
    assert any(b % 2 for b in batches)  # odd batches: steps ended mid micro-batch (carried rows)
    # Cut after step 4 (before the first change) and step 7 (inside a micro-batch: 9 examples per step).
    assert batches[5:7] == [9, 9], batches
    for cut in (4, 7):
        resumed = make_trainer(str(tmp_path / "reference"), dataset, dropout=0.1, model_seed=1, **common)
        resumed.train(resume_from_checkpoint=str(tmp_path / "reference" / f"checkpoint-{cut}"))
        got = {s: v for s, v in step_logs(resumed).items() if s > cut}  # the history holds steps <= cut too
        assert sorted(got) == [s for s in sorted(expected) if s > cut]
        for step in got:  # loss, batch_size, tokens_seen, gns, learning_rate: exactly equal
            assert got[step] == expected[step], (cut, step)
        for (name, p), q in zip(resumed.model.named_parameters(), reference.model.parameters()):
            assert torch.equal(p, q), name


def test_batch_control_refuses_what_it_cannot_realize(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        training_arguments(str(tmp_path), max_tokens=100, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="max_tokens"):
        training_arguments(str(tmp_path), lr_schedule="d2z")
    with pytest.raises(ValueError, match="batch_size_end"):
        training_arguments(str(tmp_path), max_tokens=100, batch_size_policy="linear")

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(example_dataset(4))

    trainer = make_trainer(str(tmp_path), Stream(), max_tokens=100, max_steps=5)
    with pytest.raises(ValueError, match="map-style dataset"):
        trainer.train()


def test_two_processes(tmp_path):
    """torchrun, 2 CPU processes: same stream and batches, and the same parameters as 1 process."""
    script = os.path.join(HERE, "batching_two_processes.py")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_GNS_BACKEND="torch", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), HERE, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, script, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    assert two["world_size"] == 2

    sys.path.insert(0, HERE)
    from batching_two_processes import run

    one = run(str(tmp_path / "one"))
    assert one["world_size"] == 1
    assert two["batches"] == one["batches"] and two["consumed"] == one["consumed"]
    for name, value in one["parameters"].items():
        torch.testing.assert_close(two["parameters"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_the_step_estimate_follows_the_batch_size(tmp_path):
    """HF's max_steps (the progress bar's total) is re-estimated at the current batch each step."""
    from transformers import TrainerCallback

    class RecordEstimates(TrainerCallback):
        def __init__(self):
            self.estimates = []

        def on_step_end(self, args, state, control, **kwargs):
            self.estimates.append(state.max_steps)

    max_tokens = 8 * 240
    trainer = make_trainer(
        str(tmp_path),
        example_dataset(64),
        max_tokens=max_tokens,
        batch_size_policy="linear",
        batch_size_start=2,
        batch_size_end=20,
        batch_size_ramp_tokens=max_tokens,
    )
    recorder = RecordEstimates()
    trainer.add_callback(recorder)
    trainer.train()
    steps = trainer.state.global_step
    assert recorder.estimates[-1] == steps  # the last estimate is exact
    # A growing batch shortens the run: the estimate only comes down, to the exact count.
    assert recorder.estimates[0] > 3 * steps
    assert all(later <= earlier for earlier, later in zip(recorder.estimates, recorder.estimates[1:]))
