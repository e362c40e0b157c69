"""Shared setup of the batch-control trainer tests (pytest and the 2-process torchrun script).

Tiny GPT-2 on a synthetic dataset whose examples are told apart by their first two tokens,
so a test can read back which examples each micro-batch held.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

import hf_gns
from hf_gns.trainer import GNSTrainer, GNSTrainingArguments
from hf_gns.trainer.example_stream import MicroBatches

VOCAB, SEQ_LEN = 97, 8


class ExampleDataset(torch.utils.data.Dataset):
    """Examples whose first two tokens spell their index (base VOCAB); the rest is random.

    A plain torch dataset (the GPU machine has no `datasets`); items are `{"input_ids", "labels"}`.
    """

    def __init__(self, num_examples: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (num_examples, SEQ_LEN), generator=generator)  # (N, T)
        index = torch.arange(num_examples)
        self.ids[:, 0], self.ids[:, 1] = index // VOCAB, index % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def example_dataset(num_examples: int, seed: int = 0) -> ExampleDataset:
    return ExampleDataset(num_examples, seed)


def example_indices(input_ids: torch.Tensor) -> list[int]:
    return (input_ids[:, 0] * VOCAB + input_ids[:, 1]).tolist()


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    return GPT2LMHeadModel(config)


def training_arguments(output_dir: str, **overrides) -> GNSTrainingArguments:
    options = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        gns_groups=[],
    )
    options.update(overrides)
    return GNSTrainingArguments(**options)


class RecordingTrainer(GNSTrainer):
    """Records the example indices of every micro-batch, grouped by optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_seen: list[list[list[int]]] = []  # [step][micro-batch] -> example indices

    def train(self, *args, **kwargs):
        with hf_gns.use_backend(
            "torch"
        ):  # the pure-torch norm path: fast on CPU, kernels are tested elsewhere
            return super().train(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if isinstance(inputs, MicroBatches):
            self.steps_seen.append([])
        else:
            self.steps_seen[-1].append(example_indices(inputs["input_ids"]))
        return super().training_step(model, inputs, num_items_in_batch)


def make_trainer(
    output_dir: str, dataset: torch.utils.data.Dataset, model_seed: int = 0, dropout: float = 0.0, **overrides
):
    return RecordingTrainer(
        model=tiny_model(model_seed, dropout),
        args=training_arguments(output_dir, **overrides),
        train_dataset=dataset,
        data_collator=default_data_collator,
    )


def step_logs(
    trainer, keys=("loss", "batch_size", "tokens_seen", "gns", "learning_rate")
) -> dict[int, tuple]:
    """{step: (values of keys)} from the training log history."""
    return {h["step"]: tuple(h.get(k) for k in keys) for h in trainer.state.log_history if "loss" in h}
