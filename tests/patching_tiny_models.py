"""Tiny random-initialized HF causal LMs for the patching tests (CPU, no hub access).

Every config exists in transformers 5.17 and 5.23. Dropout is switched off so that
train-mode forwards (needed for gradient checkpointing) are deterministic.
"""

from __future__ import annotations

import torch
import transformers

VOCAB = 128
HIDDEN = 32
BATCH, SEQ = 3, 8

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
_GQA = dict(_COMMON, num_key_value_heads=2)
_HEAD_DIM = dict(_GQA, head_dim=8)

# name -> (config class, kwargs); LayerNorm family first, then RMSNorm.
CONFIGS = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", _COMMON),
    "opt": ("OPTConfig", dict(_COMMON, ffn_dim=64, word_embed_proj_dim=HIDDEN)),
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4)),
    "falcon": (
        "FalconConfig",
        dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4),
    ),
    "phi": ("PhiConfig", _COMMON),
    "stablelm": ("StableLmConfig", dict(_COMMON, num_key_value_heads=4, qk_layernorm=True)),
    "cohere": ("CohereConfig", dict(_GQA, use_qk_norm=True)),
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", _GQA),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", _HEAD_DIM),
    "gemma": ("GemmaConfig", _HEAD_DIM),
    "gemma2": ("Gemma2Config", _HEAD_DIM),
    "gemma3": ("Gemma3TextConfig", _HEAD_DIM),
    "olmo2": ("Olmo2Config", _GQA),
    "granite": ("GraniteConfig", _GQA),
}
ARCHITECTURES = list(CONFIGS)


def tiny_config(arch: str):
    class_name, kwargs = CONFIGS[arch]
    # token ids inside the tiny vocabulary (the defaults, e.g. GPT-2's 50256, make HF warn)
    config = getattr(transformers, class_name)(**kwargs, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    return config


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny `AutoModelForCausalLM` in train mode (dropout off), eager attention."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="eager")
    return model.to(dtype).train()


def tiny_batch(seed: int = 1, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def loss_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """HF's causal LM loss: the mean over all predicted tokens (equal lengths: mean of per-example means)."""
    return model(input_ids=input_ids, labels=input_ids).loss


def per_example_sq_grad_norms(model, ids: torch.Tensor, loss) -> dict[str, torch.Tensor]:
    """The micro-batch oracle: |∂loss(example b)/∂p|² per parameter p that gets a gradient, one
    example at a time through `model` with plain autograd; name → (B,). Gradients are cleared after."""
    values: dict[str, list[torch.Tensor]] = {}
    for b in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        loss(model, ids[b : b + 1]).backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                values.setdefault(name, []).append(param.grad.square().sum())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(grads) for name, grads in values.items()}


class GraphCounter:
    """A torch.compile backend that runs each graph eagerly and counts the graph runs."""

    def __init__(self):
        self.runs = 0

    def __call__(self, graph_module, example_inputs):
        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run
