"""Padding-free batches: where the documents of a batch are, as `example_offsets` for the kernels.

A padding-free batch (TRL's `padding_free`/`packing`, `transformers.DataCollatorWithFlattening`)
concatenates several documents into one row, (1, N), and marks where each starts, either with
`cu_seq_lens_q`/`cu_seq_lens_k` (cumulative lengths, as flash-attention's varlen kernels take
them) or with `position_ids` that restart for every document. An example is then a document,
not a row: its per-example gradient norm is that of its own contribution, and the step's
example count is the number of documents (DESIGN.md section 2).

The kernels take the documents as `example_offsets`, int64 (E+1,): the tokens of the batch
flattened to N = B·T, document e owning tokens [offsets[e], offsets[e+1]) (BRIEF interface 1).
Sources, in order of preference:
- `cu_seq_lens_q`: used as is (no host sync; E = its length - 1 is known on the host).
- `position_ids` (B, T): a document starts at the start of every row and wherever the position
  does not follow the previous one (`p[t] != p[t-1] + 1`; for well-formed packing, where
  positions restart at 0 or at `position_ids_start`). This is the rule transformers' own
  mask builder (`find_packed_sequence_indices`) uses. Finding E needs the values on the host:
  ONE device→host copy of `position_ids` per forward when they live on the GPU (none when the
  batch is still on the CPU).
A batch whose rows are single documents (ordinary (B, T) batches, `position_ids = arange(T)`)
gives None: rows are the examples, as without this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..kernels.linear_reference import remember_max_example_rows

_TOKEN_KEYS = ("input_ids", "inputs_embeds")
# offsets -> {rows per token: offsets scaled to rows}: one multiplication per forward, not per layer
_SCALED_OFFSETS = WeakIdKeyDictionary()


def _token_shape(batch: Mapping) -> tuple[int, int] | None:
    """(B, T) of the batch's tokens, from `input_ids` (B, T) or `inputs_embeds` (B, T, D)."""
    for key in _TOKEN_KEYS:
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return tuple(value.shape[:2])
    return None


def _offsets_from_cu_seq_lens(batch: Mapping, token_shape: tuple[int, int] | None) -> torch.Tensor:
    cu_q, cu_k = batch["cu_seq_lens_q"], batch.get("cu_seq_lens_k")
    if not isinstance(cu_q, torch.Tensor) or cu_q.dim() != 1 or cu_q.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must be a 1-D tensor of E+1 cumulative lengths, got {cu_q!r:.80}")
    if cu_k is not None and (not isinstance(cu_k, torch.Tensor) or cu_k.shape != cu_q.shape):
        raise ValueError(
            "hf_gns: per-document examples need cu_seq_lens_k == cu_seq_lens_q (self-attention over "
            f"the same documents); got shapes {tuple(cu_q.shape)} and {getattr(cu_k, 'shape', cu_k)}"
        )
    offsets = cu_q.to(torch.int64)
    if cu_q.device.type == "cpu":  # values are free to check on the host
        n_tokens = None if token_shape is None else token_shape[0] * token_shape[1]
        if (
            int(offsets[0]) != 0
            or bool((offsets.diff() < 0).any())
            or n_tokens not in (None, int(offsets[-1]))
        ):
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to the batch's {n_tokens} tokens, got {cu_q.tolist()}"
            )
        if cu_k is not None and cu_k is not cu_q and not torch.equal(cu_k.to(torch.int64), offsets):
            raise ValueError("hf_gns: per-document examples need cu_seq_lens_k == cu_seq_lens_q")
        remember_max_example_rows(offsets, int(offsets.diff().max()))
    max_length = batch.get("max_length_q")
    if isinstance(max_length, int):  # DataCollatorWithFlattening hands it over as a Python int
        remember_max_example_rows(offsets, max_length)
    return offsets


def _offsets_from_position_ids(position_ids: torch.Tensor, token_shape: tuple[int, int] | None):
    """Offsets of the documents marked by restarting `position_ids`, or None if every row is one."""
    if token_shape is not None and position_ids.shape == (1, token_shape[1]) and token_shape[0] > 1:
        return None  # one position row shared by the whole batch: ordinary rows
    if position_ids.dim() != 2 or (token_shape is not None and tuple(position_ids.shape) != token_shape):
        raise ValueError(
            f"hf_gns: cannot find documents in position_ids of shape {tuple(position_ids.shape)} "
            f"(tokens {token_shape}); per-document examples need (B, T) position ids, or pass "
            "cu_seq_lens_q/cu_seq_lens_k"
        )
    positions = position_ids.cpu()  # the one device→host copy (a sync when on the GPU)
    n_rows, seq = positions.shape
    starts = torch.ones(n_rows, seq, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    n_documents = int(starts.sum())
    if n_documents == n_rows:
        return None
    host = torch.cat([starts.reshape(-1).nonzero().squeeze(1), torch.tensor([n_rows * seq])])
    offsets = host.to(position_ids.device, non_blocking=True)
    remember_max_example_rows(offsets, int(host.diff().max()))
    return offsets


def _check_no_padding(batch: Mapping) -> None:
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "hf_gns: the batch marks documents (padding-free) and also pads (attention_mask has zeros); "
            "per-example statistics for this mix are not supported: use padding-free batches without "
            "padding, or ordinary padded batches without document markers"
        )


def example_offsets_from_batch(kwargs: Mapping) -> torch.Tensor | None:
    """The documents of a padding-free batch as `example_offsets`, or None for ordinary rows.

    Args:
        kwargs (`Mapping`): the model's forward keyword arguments (or the batch dict):
            `input_ids`/`inputs_embeds` (B, T[, D]) and `cu_seq_lens_q` (preferred: no host
            sync) or `position_ids` (B, T) restarting for each document (one device→host copy
            of the position ids per call when they are on the GPU).

    Returns:
        `torch.Tensor | None`: int64 (E+1,) on the batch's device, document e owning the tokens
        [offsets[e], offsets[e+1]) of the batch flattened to B·T; None when no row holds more
        than one document (dim 0 indexes the examples).

    Raises:
        `ValueError`: for markers that cannot describe documents of the batch (wrong shapes,
        cu_seq_lens_k different from cu_seq_lens_q, padding mixed with packing; checking an
        `attention_mask` given with document markers reads it on the host).

    Example:
    ```python
    >>> batch = DataCollatorWithFlattening()([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    >>> example_offsets_from_batch(batch)
    tensor([0, 3, 5])
    ```
    """
    token_shape = _token_shape(kwargs)
    if kwargs.get("cu_seq_lens_q") is not None:
        offsets = _offsets_from_cu_seq_lens(kwargs, token_shape)
    elif isinstance(kwargs.get("position_ids"), torch.Tensor):
        offsets = _offsets_from_position_ids(kwargs["position_ids"], token_shape)
    else:
        return None
    if offsets is not None:
        _check_no_padding(kwargs)
    return offsets


def count_documents(batch: Mapping) -> int | None:
    """Examples of a padding-free micro-batch: its number of documents, or None when its rows are
    its examples (no document markers). For the trainer's example count; see
    `example_offsets_from_batch` for the rules and the host sync of GPU-resident position ids."""
    offsets = example_offsets_from_batch(batch)
    return None if offsets is None else offsets.numel() - 1


def offsets_for_rows(
    example_offsets: torch.Tensor, x: torch.Tensor, token_shape: Sequence[int]
) -> torch.Tensor:
    """`example_offsets` (in tokens) as offsets into the rows of `x` viewed as (rows, D).

    A layer's input holds the batch's B·T tokens in token-major order with some rows per token:
    (B, T, D) or (B·T, D) one, (B, T, H, Dh) (a per-head norm such as Qwen3's q_norm) H. The
    token offsets are then scaled by the rows per token.

    Args:
        example_offsets (`torch.Tensor`): int64 (E+1,) over the B·T tokens.
        x (`torch.Tensor`): the layer's input, (..., D).
        token_shape (`Sequence[int]`): (B, T) of the batch.

    Raises:
        `ValueError`: when `x`'s rows are not token-major multiples of the batch's tokens (e.g.
        heads before tokens, (B, H, T, Dh)): documents would not be contiguous rows.
    """
    n_batch, seq = token_shape
    n_tokens = n_batch * seq
    n_rows = x.numel() // max(x.shape[-1], 1)
    leading = tuple(x.shape[:-1])
    token_major = leading[:2] == (n_batch, seq) or (len(leading) >= 1 and leading[0] == n_tokens)
    if n_tokens == 0 or n_rows % n_tokens or not (token_major or n_rows == n_tokens):
        raise ValueError(
            f"hf_gns: an input of shape {tuple(x.shape)} does not hold the batch's {n_batch}×{seq} tokens "
            "token-major, so its documents are not contiguous rows; per-document statistics are not "
            "supported for this layer"
        )
    rows_per_token = n_rows // n_tokens
    if rows_per_token == 1:
        return example_offsets
    scaled = _SCALED_OFFSETS.setdefault(example_offsets, {})
    if rows_per_token not in scaled:
        scaled[rows_per_token] = example_offsets * rows_per_token
    return scaled[rows_per_token]
