"""hf_gns.trainer.resume and .interrupt: checkpoint checks, derived progress, changed flags, Ctrl-C."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerControl, TrainerState

from hf_gns.trainer.interrupt import SaveOnInterruptCallback
from hf_gns.trainer.resume import (
    CheckpointStateError,
    RunArgumentsState,
    changed_arguments,
    derive_progress,
    load_checkpoint_states,
    read_state_file,
    really_missing_keys,
    tied_parameter_names,
)


def _write_state(checkpoint, state):
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save(state, checkpoint / "hf_gns_state.pt")
    return checkpoint / "hf_gns_state.pt"


def test_read_state_file_names_the_file_for_every_way_it_can_be_broken(tmp_path):
    path = _write_state(tmp_path / "checkpoint-4", {"gns_counters": {"tokens_seen": torch.tensor(7)}})
    assert int(read_state_file(tmp_path / "checkpoint-4")["gns_counters"]["tokens_seen"]) == 7
    intact = path.read_bytes()
    broken = {
        "truncated": intact[: len(intact) // 3],
        "empty": b"",
        "corrupted": intact[:100] + bytes(200) + intact[300:],
        "not a torch file": b"hello",
    }
    for what, data in broken.items():
        path.write_bytes(data)
        with pytest.raises(CheckpointStateError, match=f"{path} is unreadable") as error:
            read_state_file(tmp_path / "checkpoint-4")
        assert "\n" not in str(error.value), what
    path.unlink()
    with pytest.raises(CheckpointStateError, match=f"{path} does not exist"):
        read_state_file(tmp_path / "checkpoint-4")
    torch.save([1, 2], path)
    with pytest.raises(CheckpointStateError, match="holds a list, not the dict"):
        read_state_file(tmp_path / "checkpoint-4")


def _trainer_state(checkpoint, global_step, logged_steps, batch=lambda step: 4, tokens_per_example=64):
    logs, tokens = [], 0
    for step in range(1, global_step + 1):
        tokens += batch(step) * tokens_per_example
        if step in logged_steps:
            row = {"step": step, "loss": 1.0, "tokens_seen": tokens, "batch_size": batch(step)}
            logs.append({**row, "batch_tokens": batch(step) * tokens_per_example})
    logs.append({"step": global_step, "eval_loss": 2.0})  # evaluation logs carry no tokens_seen
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text(
        json.dumps({"global_step": global_step, "log_history": logs})
    )
    return tokens


def test_derive_progress_is_exact_when_every_step_was_logged(tmp_path):
    growing = lambda step: 4 if step <= 3 else 8  # noqa: E731
    tokens = _trainer_state(tmp_path, 6, logged_steps=range(1, 7), batch=growing)
    progress = derive_progress(tmp_path)
    assert (progress.global_step, progress.tokens_seen, progress.examples_seen) == (6, tokens, 3 * 4 + 3 * 8)
    assert (progress.batch_size, progress.batch_tokens) == (8, 8 * 64)
    assert progress.derived["tokens_seen"].startswith("exact") and progress.derived[
        "examples_seen"
    ].startswith("exact")


def test_derive_progress_estimates_and_says_so_when_steps_were_not_logged(tmp_path):
    tokens = _trainer_state(tmp_path, 10, logged_steps={5, 8})  # logging_steps 5 and the checkpoint at 10
    progress = derive_progress(tmp_path)
    assert progress.tokens_seen == tokens == 10 * 4 * 64  # the batch did not change: the estimate is right
    assert progress.examples_seen == 40
    assert "estimated: logged at step 8 plus 2 steps of 256 tokens" in progress.summary()
    assert "estimated from tokens at 64 tokens per example" in progress.summary()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    with pytest.raises(CheckpointStateError, match="logs no tokens_seen/batch_size"):
        derive_progress(tmp_path)


class _State:
    def __init__(self, **state):
        self.state, self.loaded = state, None

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.loaded = state


def _fake_trainer(restart):
    from hf_gns.control import BatchSizeController, ConstantPolicy
    from hf_gns.trainer.example_stream import DataPosition
    from hf_gns.trainer.measurement import _StepCounters

    controller = BatchSizeController(ConstantPolicy(4), initial_batch_size=4, micro_batch_size=4)
    return SimpleNamespace(
        args=SimpleNamespace(gns_restart_statistics=restart),
        _gns_counters=_StepCounters(),
        data_position=DataPosition(world_size=1, micro_batch_size=4),
        batch_size_controller=controller,
    )


def test_load_checkpoint_states_refuses_or_restarts_the_statistics_only(tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    tokens = _trainer_state(checkpoint, 6, logged_steps=range(1, 7), batch=lambda s: 4 if s < 4 else 8)
    states = [("gns_estimator", _State()), ("gns_counters", _State()), ("recipe_arguments", _State())]
    with pytest.raises(CheckpointStateError, match="does not exist.*gns_restart_statistics"):
        load_checkpoint_states(_fake_trainer(restart=False), str(checkpoint), states)

    trainer = _fake_trainer(restart=True)
    assert load_checkpoint_states(trainer, str(checkpoint), states) == ["recipe_arguments"]
    assert int(trainer._gns_counters.tokens_seen) == tokens and int(trainer._gns_counters.examples_seen) == 36
    assert trainer.data_position.examples_consumed == 36  # the next example is the 37th: none repeated
    assert (
        trainer.batch_size_controller.batch_size == 8 and trainer.batch_size_controller.last_change_step == 6
    )
    assert states[0][1].loaded is None  # the estimator starts again

    _write_state(checkpoint, {"gns_estimator": {"x": 1}, "gns_counters": {"y": 2}})  # intact: loaded as saved
    trainer = _fake_trainer(restart=False)
    assert load_checkpoint_states(trainer, str(checkpoint), states) == ["recipe_arguments"]
    assert states[0][1].loaded == {"x": 1} and states[1][1].loaded == {"y": 2}

    class Broken(_State):
        def load_state_dict(self, state):
            raise KeyError(224)

    with pytest.raises(
        CheckpointStateError, match=r"hf_gns_state.pt: its state 'gns_estimator' does not load"
    ):
        load_checkpoint_states(trainer, str(checkpoint), [("gns_estimator", Broken())])


def test_changed_arguments_are_listed_old_to_new():
    saved = RunArgumentsState({"batch_size_policy": "gns", "max_tokens": 1_000_000, "gns_groups": ("type",)})
    current = {"batch_size_policy": "constant", "max_tokens": 800_000, "gns_groups": ["type"], "new_flag": 1}
    changes = changed_arguments(saved.state_dict(), current)
    assert changes == ["--batch_size_policy gns -> constant", "--max_tokens 1000000 -> 800000"]
    assert changed_arguments(saved.state_dict(), saved.state_dict()) == []


def test_a_tied_lm_head_is_not_a_missing_key():
    # transformers 5 saves wte.weight once; loading "misses" lm_head.weight, which the tie fills.
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    assert tied_parameter_names(model) == {"lm_head.weight"}
    assert really_missing_keys(model, ["lm_head.weight"]) == []
    assert really_missing_keys(model, ["lm_head.weight", "transformer.h.0.ln_1.weight"]) == [
        "transformer.h.0.ln_1.weight"
    ]


def test_ctrl_c_asks_for_a_checkpoint_at_the_step_end_and_a_second_one_aborts():
    callback = SaveOnInterruptCallback()
    state, control = TrainerState(), TrainerControl()
    args = SimpleNamespace(world_size=1)
    previous = signal.getsignal(signal.SIGINT)
    callback.on_train_begin(args, state, control)
    try:
        assert signal.getsignal(signal.SIGINT) == callback._on_sigint
        callback.on_step_end(args, state, control)
        assert not (control.should_save or control.should_training_stop or callback.interrupted)
        callback._on_sigint(signal.SIGINT, None)  # the first Ctrl-C: only a flag, training goes on
        callback.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and callback.interrupted
        with pytest.raises(KeyboardInterrupt):  # the second: now
            callback._on_sigint(signal.SIGINT, None)
    finally:
        callback.on_train_end(args, state, control)
    assert signal.getsignal(signal.SIGINT) == previous  # the handler is ours only while training
