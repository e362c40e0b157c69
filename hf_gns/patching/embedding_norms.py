"""Embeddings (nn.Embedding: token and position) under `patch(targets="all")`.

The bound forward runs nn.Embedding's own lookup, then `embedding_sq_norm_tap` on its
output: PyTorch computes the weight gradient as before, and the tap's backward adds up
each example's rows separately (ids offset by b·V, `embedding_sq_norms`) for |E_b|².

Position embeddings looked up once for the whole batch ((1, T) ids, as GPT-2's `wpe`)
get a gradient that autograd has already summed over the batch by the time it reaches
the lookup. Their output is therefore expanded to (B, T, D) (a view, no memory) before
the tap, so the tap sees every example's gradient and the expand's backward does the
sum. Downstream code that broadcasts (1, T, D) against (B, T, D) is unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.linear_op import embedding_sq_norm_tap
from .documents import offsets_for_rows
from .layer_state import LAYER_ATTRIBUTE, LayerPatch


def embedding_unsupported_reason(module: nn.Embedding) -> str | None:
    """Why `module` cannot be patched, or None."""
    cls = type(module)
    if cls.forward is not nn.Embedding.forward:
        return f"forward overridden by {cls.__name__} (e.g. scaled or offset lookups): not supported"
    if module.max_norm is not None:
        return "max_norm renormalizes the weight inside forward: not supported"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq rescales gradients by batch-wide counts: not supported"
    if module.sparse:
        return "sparse gradients: not supported"
    return None


def describe_embedding(module: nn.Embedding) -> str:
    return f"{module.num_embeddings}×{module.embedding_dim} rows per example"


def patched_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    """Forward of a patched nn.Embedding: the lookup, then the tap when training."""
    state: LayerPatch = getattr(self, LAYER_ATTRIBUTE)
    out = nn.Embedding.forward(self, input)
    if not state.tracks_gradients(self):
        return out
    batch_size = state.model_hook.batch_size
    ids = input if input.dim() > 1 else input.unsqueeze(1 if input.shape[0] == batch_size else 0)
    rows = out.view(*ids.shape, out.shape[-1])  # (B, ..., D)
    shared_lookup = ids.shape[0] == 1 and batch_size is not None and batch_size > 1
    if shared_lookup:  # one lookup for the whole batch: give each example its own view
        ids = ids.expand(batch_size, *ids.shape[1:])
        rows = rows.expand(batch_size, *rows.shape[1:])
    n_examples, shape, offsets = ids.shape[0], rows.shape, None
    hook = state.model_hook
    if hook.example_offsets is not None:  # padding-free batch: documents are the examples
        offsets = offsets_for_rows(hook.example_offsets, rows, hook.token_shape)
        ids, rows, n_examples = ids.reshape(1, -1), rows.reshape(1, -1, out.shape[-1]), offsets.shape[0] - 1
    ids = ids.reshape(ids.shape[0], -1)  # (B, T)
    sink = state.sinks.take_for(n_examples, out.device)
    tapped, link = embedding_sq_norm_tap(
        rows.reshape(ids.shape[0], -1, out.shape[-1]),
        ids,
        sink,
        self.num_embeddings,
        self.padding_idx,
        with_link=state.tie is not None,
        example_offsets=offsets,
    )
    if state.tie is not None:
        state.tie.put(link, ids)
    return tapped.view(shape) if shared_lookup else tapped.view(out.shape)
