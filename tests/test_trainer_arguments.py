"""GNSTrainingArguments and GNSTrainer refuse, at the start and in one line, a batch that cannot give a GNS.

Issue 16, item 2 and expectation (2): `per_device_train_batch_size=1` on one process used to log
`gns: nan` on every step, never move the batch and exit 0. Only the recipe refused it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from torch import nn
from transformers import TrainingArguments

import hf_gns
from hf_gns.trainer.arguments import check_examples_per_step, gns_config
from hf_gns.trainer.batch_arguments import controller_from_arguments


def _one_line_refusal(build, match: str) -> str:
    with pytest.raises(ValueError, match=match) as error:
        build()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_one_example_per_step_is_refused_when_the_arguments_are_built(tmp_path):
    message = _one_line_refusal(
        lambda: hf_gns.GNSTrainingArguments(str(tmp_path), per_device_train_batch_size=1),
        "the global batch can be 1 example per optimizer step, and the GNS needs at least 2",
    )
    assert "per_device_train_batch_size=1 x gradient_accumulation_steps=1 x 1 process" in message


@pytest.mark.parametrize(
    "options",
    [
        dict(per_device_train_batch_size=2),
        dict(per_device_train_batch_size=1, gradient_accumulation_steps=2),
        dict(per_device_train_batch_size=1, max_tokens=1000, batch_size_start=2, batch_size_min=2),
        dict(per_device_train_batch_size=4, max_tokens=1000, batch_size_granularity="example"),
    ],
)
def test_two_or_more_examples_per_step_are_accepted(tmp_path, options):
    hf_gns.GNSTrainingArguments(str(tmp_path), **options)


def test_batch_control_starts_at_two_examples(tmp_path):
    # unset bounds: the lower one is 2 examples, and the first batch is raised to it
    for options in (dict(), dict(batch_size_start=1), dict(batch_size_granularity="example")):
        args = hf_gns.GNSTrainingArguments(
            str(tmp_path), per_device_train_batch_size=1, max_tokens=1000, batch_size_policy="gns", **options
        )
        controller = controller_from_arguments(args, world_size=1, micro_batch_size=1)
        assert (controller.batch_size, controller.min_batch_size) == (2, 2), options
        assert controller.update(step=100, tokens_seen=10_000, gns=0.5) == 2  # a GNS below 2: held at 2
    unit_four = controller_from_arguments(
        hf_gns.GNSTrainingArguments(str(tmp_path), per_device_train_batch_size=4, max_tokens=1000),
        world_size=1,
        micro_batch_size=4,
    )
    assert (unit_four.batch_size, unit_four.quantize(1)) == (4, 4)  # realizable batches: unchanged


@pytest.mark.parametrize(
    "options, named",
    [
        (dict(per_device_train_batch_size=1, batch_size_min=1), "batch_size_min=1 allows it"),
        (
            dict(per_device_train_batch_size=4, batch_size_granularity="example", batch_size_min=1),
            "batch_size_min=1 allows it",
        ),
        (dict(per_device_train_batch_size=1, batch_size_max=1), "batch_size_max=1: set it to 2 or more"),
    ],
)
def test_batch_control_that_can_reach_one_example_is_refused(tmp_path, options, named):
    message = _one_line_refusal(
        lambda: hf_gns.GNSTrainingArguments(
            str(tmp_path), max_tokens=1000, batch_size_policy="gns", **options
        ),
        "can be 1 example per optimizer step",
    )
    assert named in message


def test_the_world_size_counts(tmp_path):
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=1)
    check_examples_per_step(args, world_size=2)  # 1 example on each of 2 processes: a GNS
    with pytest.raises(ValueError, match="x 1 process"):
        check_examples_per_step(args)


def test_gns_trainer_refuses_plain_arguments_before_patching(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=1, report_to=[])
    _one_line_refusal(lambda: hf_gns.GNSTrainer(model=model, args=args), "the GNS needs at least 2")
    assert not any("forward" in m.__dict__ for m in model.modules())  # refused before patching
    # arguments changed after they were built are checked again by the trainer
    gns_args = hf_gns.GNSTrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to=[])
    gns_args.per_device_train_batch_size = 1
    _one_line_refusal(lambda: hf_gns.GNSTrainer(model=model, args=gns_args), "the GNS needs at least 2")


def test_configs_of_other_trainers_are_not_checked(tmp_path):
    # TRL's DPO pairs and padding-free rows hold several examples in one row: gns_config adds the
    # options to such configs without the row-count check (GNSMixin measures what the rows hold).
    @dataclass
    class PairConfig(TrainingArguments):
        pass

    gns_config(PairConfig)(str(tmp_path), per_device_train_batch_size=1)
