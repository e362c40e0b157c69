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
import torch.nn.functional as F
from torch import nn

from ..kernels.linear_op import embedding_sq_norm_tap
from .documents import offsets_for_rows
from .layer_state import LAYER_ATTRIBUTE, LayerPatch
from .layout import back_to_input_layout


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


class _EmbeddingWithExampleGrads(torch.autograd.Function):
    """Lookup of `ids` (B, T) whose backward sends example b's weight-gradient VECTOR (its rows'
    gradients scattered to their ids, (V·D,) fp32) to row b of the leaf's gradient, for embeddings
    called several times per forward (`example_grads.py`); dW is the sum of those rows."""

    @staticmethod
    def forward(ctx, weight, ids, leaf, padding_idx):
        ctx.save_for_backward(ids)
        ctx.config = (weight.shape[0], padding_idx, weight.dtype)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_rows):
        (ids,) = ctx.saved_tensors
        num_embeddings, padding_idx, weight_dtype = ctx.config
        n_examples, width = ids.shape[0], grad_rows.shape[-1]
        grads = grad_rows.float().reshape(n_examples, -1, width)  # (B, T, D)
        if padding_idx is not None:
            grads = grads * (ids != padding_idx).unsqueeze(-1)
        offsets = torch.arange(n_examples, device=ids.device).unsqueeze(1) * num_embeddings
        per_example = grads.new_zeros(n_examples * num_embeddings, width)  # (B·V, D)
        per_example.index_add_(0, (ids + offsets).reshape(-1), grads.reshape(-1, width))
        grad_weight = per_example.view(n_examples, num_embeddings, width).sum(0).to(weight_dtype)
        return grad_weight, None, per_example.view(n_examples, -1), None


def _lookup_with_example_grads(self: nn.Embedding, state: LayerPatch, ids: torch.Tensor, vectors):
    if state.tie is not None:
        raise RuntimeError(
            f"hf_gns: {state.name!r} (weight tied to {state.tie.head_name!r}) is called several times per "
            "forward: not supported; patch with targets='norms'"
        )
    leaf = vectors.leaf_for(state.model_hook, ids.shape[0], ids.device)
    return _EmbeddingWithExampleGrads.apply(self.weight, ids, leaf, self.padding_idx)


def patched_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    """Forward of a patched nn.Embedding: the lookup, then the tap when training (per-example
    gradient vectors instead for an embedding called several times per forward)."""
    state: LayerPatch = getattr(self, LAYER_ATTRIBUTE)
    if not state.tracks_gradients(self):
        return nn.Embedding.forward(self, input)
    batch_size = state.model_hook.batch_size
    ids = input if input.dim() > 1 else input.unsqueeze(1 if input.shape[0] == batch_size else 0)
    # XLNet looks up (T, B) ids: examples along dim 1
    seq_first = ids.dim() == 2 and state.layout.examples_first(ids.unsqueeze(-1), batch_size)[1]
    if seq_first:
        ids = ids.transpose(0, 1)
    vectors = state.routing.vectors_for_call(state.model_hook) if state.routing is not None else None
    if vectors is not None and state.model_hook.example_offsets is not None:
        if state.routing.mode != "discover":
            raise RuntimeError(
                f"hf_gns: {state.name!r} is called several times per forward: per-example gradient vectors "
                "of padding-free (document) batches are not supported"
            )
        vectors = None  # discovering on a document batch: the squared-norm path
    if vectors is not None:
        shared_lookup = ids.shape[0] == 1 and batch_size is not None and batch_size > 1
        if shared_lookup:  # one lookup for the whole batch: each example gets its rows
            ids = ids.expand(batch_size, *ids.shape[1:])
        rows = _lookup_with_example_grads(self, state, ids.reshape(ids.shape[0], -1), vectors)
        rows = rows.view(*ids.shape, rows.shape[-1])
        if shared_lookup:
            return rows
        return back_to_input_layout(rows, seq_first).view(*input.shape, rows.shape[-1])
    out = nn.Embedding.forward(self, ids)
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
    if shared_lookup:
        return tapped.view(shape)
    return back_to_input_layout(tapped.view(out.shape), seq_first).view(*input.shape, out.shape[-1])
