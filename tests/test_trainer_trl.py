"""`GNSMixin` on TRL's trainers (CPU, tiny models built from configs, a tokenizer trained here).

`class SFTTrainerWithGNS(GNSMixin, SFTTrainer)` with packing off (padded rows: an example is a
row) and on (TRL's default padding-free packing: several documents per row, marked by restarting
`position_ids`; an example is a document), and `class DPOTrainerWithGNS(GNSMixin, DPOTrainer)`
(TRL puts the chosen and the rejected sequences of a pair in separate rows: an example is a
sequence). Each logs a finite, positive `gns`, and the examples it counts are the batch's.
"""

import math

import pytest
from transformers.utils import logging as hf_logging

import hf_gns
from hf_gns.patching import IncompleteStatisticsError

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl_setup import byte_tokenizer, sentences, tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_backend_and_quiet():
    hf_logging.set_verbosity_error()
    with hf_gns.use_backend("torch"):
        yield


class SFTTrainerWithGNS(hf_gns.GNSMixin, trl.SFTTrainer):
    """Records the examples (rows, or documents of padding-free rows) of every micro-batch."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches = getattr(self, "micro_batches", []) + [
            (documents_in(inputs), len(inputs["input_ids"]))
        ]
        return super().training_step(model, inputs, num_items_in_batch)


class DPOTrainerWithGNS(hf_gns.GNSMixin, trl.DPOTrainer):
    pass


def documents_in(batch) -> int:
    """Documents of a collated batch, from first principles: rows, plus position restarts inside rows."""
    positions = batch.get("position_ids")
    if positions is None:
        return batch["input_ids"].shape[0]
    return positions.shape[0] + int((positions[:, 1:] != positions[:, :-1] + 1).sum())


def common_options(output_dir, **overrides):
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, max_steps=4, logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, gns_groups=["type"], gns_ema_decay=1 - 1e-7,
        dataloader_pin_memory=False,
    )  # fmt: skip
    options.update(overrides)
    return options


def assert_finite_positive_gns(trainer):
    logs = [entry for entry in trainer.state.log_history if "gns" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert math.isfinite(entry["gns"]) and entry["gns"] > 0, entry
        assert entry["gns_skipped_steps"] == 0


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_logs_gns(tmp_path, packing):
    tokenizer = byte_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": sentences(64)})
    config = hf_gns.gns_config(trl.SFTConfig)
    args = config(**common_options(tmp_path, packing=packing, max_length=48))
    trainer = SFTTrainerWithGNS(
        model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert_finite_positive_gns(trainer)
    # the examples counted are the documents of every micro-batch (rows without packing)
    assert trainer.examples_seen == sum(documents for documents, _ in trainer.micro_batches)
    rows = sum(rows for _, rows in trainer.micro_batches)
    assert (trainer.examples_seen > rows) if packing else (trainer.examples_seen == rows)


def test_dpo_trainer_logs_gns(tmp_path):
    tokenizer = byte_tokenizer()
    # chosen: the shared sentence, rejected: random words (a consistent preference, so a clear signal)
    prompts = sentences(16, seed=2, min_words=2)
    chosen, rejected = sentences(16, seed=3, swap=0.1), sentences(16, seed=4, swap=1.0)
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    options = common_options(tmp_path, max_length=32, bf16=False, per_device_train_batch_size=2)
    args = hf_gns.gns_config(trl.DPOConfig)(**options)
    trainer = DPOTrainerWithGNS(
        model=tiny_llama(tokenizer), ref_model=tiny_llama(tokenizer), args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert_finite_positive_gns(trainer)
    # TRL's preference batches hold each pair's chosen and rejected sequences in two rows
    assert trainer.last_step_statistics()["batch_size"] == 2 * 2 * 2


def test_sft_all_layers_refuses_the_lm_head_that_trl_bypasses(tmp_path):
    """TRL's SFTTrainer computes log-probabilities with `lm_head.weight` directly (its fused LM head),
    not through the module: the first training forward finds that use, `patch` stops tracking the
    weight, and the guard refuses the step that GNSTrainer still counted it in."""
    tokenizer = byte_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": sentences(16)})
    args = hf_gns.gns_config(trl.SFTConfig)(**common_options(tmp_path, max_length=48, gns_track="all"))
    trainer = SFTTrainerWithGNS(
        model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    with pytest.raises(
        IncompleteStatisticsError, match=r"lm_head\.weight.*uses it outside its module's forward"
    ):
        trainer.train()


def test_sft_all_layers_with_gns_incomplete_warn_drops_the_bypassed_lm_head(tmp_path, caplog):
    """The same run with `gns_incomplete="warn"`: `lm_head.weight` is dropped (logged), its step is
    skipped, and the later steps log a finite GNS over the parameters still measured."""
    tokenizer = byte_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": sentences(16)})
    options = common_options(tmp_path, max_length=48, gns_track="all", gns_incomplete="warn")
    args = hf_gns.gns_config(trl.SFTConfig)(**options)
    trainer = SFTTrainerWithGNS(
        model=tiny_llama(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    with caplog.at_level("WARNING", logger="hf_gns.trainer.measurement"):
        trainer.train()
    dropped = [r.getMessage() for r in caplog.records if "dropped from the GNS" in r.getMessage()]
    assert len(dropped) == 1 and "lm_head.weight" in dropped[0], dropped
    logs = [entry for entry in trainer.state.log_history if "gns" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert all(math.isfinite(entry["gns"]) for entry in logs), logs
