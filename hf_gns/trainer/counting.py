"""Counting a micro-batch's examples and tokens: the one place that decides what an example is.

An example is one row of the batch (a sequence), or one DOCUMENT when the batch is padding-free
(several documents flattened into one row, marked by `position_ids` restarting at 0 or by
`cu_seq_lens_*`, as TRL's padding-free packing and `transformers.DataCollatorWithFlattening`
produce): the per-example norms are then per document, and the count must match them.
Tokens are the attention mask's ones, or every position when there is no mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from accelerate.utils import find_batch_size

from ..patching.documents import count_documents


@dataclass
class BatchCount:
    """What one micro-batch adds to the step.

    Attributes:
        examples (`int`): sequences, or documents of a padding-free batch; from shapes (no sync).
        tokens (`torch.Tensor` or `int`): attention-mask ones (a tensor, summed where the mask
            lives: no sync) or all positions (`int`).
    """

    examples: int
    tokens: torch.Tensor | int


def _token_tensor(inputs: Mapping) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(inputs.get(key), torch.Tensor):
            return inputs[key]
    return next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)


def count_batch(inputs: Mapping) -> BatchCount:
    """Examples and tokens of one collated micro-batch (a mapping of tensors).

    Raises:
        `TypeError`: the batch holds no tensor to count.
        `ValueError`: document markers that do not fit the batch (`hf_gns.patching.documents`).
    """
    ids = _token_tensor(inputs)
    if ids is None:
        raise TypeError(f"cannot count the examples of a batch without tensors (keys {sorted(inputs)})")
    documents = count_documents(inputs)  # None unless the batch is padding-free
    examples = find_batch_size(ids) if documents is None else documents
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        tokens: torch.Tensor | int = mask.sum()
    else:
        tokens = ids.shape[0] * (ids.shape[1] if ids.dim() > 1 else 1)
    return BatchCount(examples=examples, tokens=tokens)
