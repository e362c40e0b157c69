"""Tiny GPT-2 and fixed token data shared by the GNSTrainer tests and the two-process script."""

from __future__ import annotations

import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_gns

N_EXAMPLES, SEQ, VOCAB = 32, 12, 37


class FixedTokens(torch.utils.data.Dataset):
    """Variations of one sequence: a shared signal plus per-example noise, so the GNS is moderate."""

    def __init__(self, n_examples: int = N_EXAMPLES):
        gen = torch.Generator().manual_seed(0)
        base = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        self.rows = base.repeat(n_examples, 1)
        swap = torch.rand(n_examples, SEQ, generator=gen) < 0.35
        self.rows[swap] = torch.randint(0, VOCAB, (int(swap.sum()),), generator=gen)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Rows(FixedTokens):
    """Given token rows, in the given order."""

    def __init__(self, rows):
        self.rows = torch.as_tensor(rows)


class InOrderGNSTrainer(hf_gns.GNSTrainer):
    """Reads the data set in order (no shuffling), to replay the batches of another run."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def make_args(output_dir, **overrides) -> hf_gns.GNSTrainingArguments:
    """Frozen-parameter training arguments (learning rate 0), accumulation 2, effective clipping."""
    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.0,
        optim="sgd",
        max_grad_norm=1e-4,  # effective clipping: a read after clipping would give |G_B|² ~ 1e-8
        max_steps=64,
        logging_steps=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        gns_ema_decay=1 - 1e-7,  # ~ a plain average over the whole run
        seed=0,
    )
    kwargs.update(overrides)
    return hf_gns.GNSTrainingArguments(**kwargs)


def tiny_llama(vocab_size: int = VOCAB, seed: int = 0):
    """A 2-layer Llama (RMSNorm, SwiGLU, RoPE), for Liger and PEFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def leave_after_checks() -> None:
    """End a multi-process test script whose checks have all passed: wait for every rank, close the
    process group, and exit without the interpreter's teardown. On the loaded 2-core CI machine a
    rank has aborted there after correct runs ("terminate called without an active exception",
    SIGABRT, a gloo thread outliving the interpreter), failing them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
