"""Tiny Llama, a byte-level tokenizer trained here, and small text / preference data for the TRL tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = "the a cat dog sat ran on under mat log red blue big small quick slow".split()


BASE = "the quick red dog sat on the big blue mat".split()


def sentences(n: int, seed: int = 0, swap: float = 0.3, min_words: int = 4) -> list[str]:
    """`n` variations of one sentence (a shared signal plus per-example noise, so the GNS is moderate):
    each word swapped for a random one with probability `swap`, cut to a random length (unequal lengths)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [
            WORDS[int(torch.randint(0, len(WORDS), (), generator=generator))]
            if float(torch.rand((), generator=generator)) < swap
            else word
            for word in BASE
        ]
        length = int(torch.randint(min_words, len(BASE) + 1, (), generator=generator))
        out.append(" ".join(words[:length]))
    return out


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the sentences (no hub): ~300 tokens, <pad> and <eos>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences(200, seed=1), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)
