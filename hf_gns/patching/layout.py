"""Where the examples are in a layer's input: dim 0, flattened rows, or dim 1 (sequence-first).

Per-example statistics need the examples along dim 0 of the op's input. Most models
give (B, T, D) or (B, T, H, Dh); OPT flattens tokens to (B·T, D) (batch-major, see
`model_hook.py`); XLNet runs its layers on (T, B, D). The model hook records B from
`input_ids` / `inputs_embeds`. An input of 3 or more dims whose dim 0 is not B and whose
dim 1 is B is sequence-first: the op runs on its (B, T, …) transpose (a view) and the
output is transposed back. When T == B the shape cannot tell; a module seen sequence-first
once stays so (`ExampleLayout.sequence_first`), otherwise dim 0 is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExampleLayout:
    """Per-module memory of the layout seen (None: never seen unambiguously)."""

    sequence_first: bool | None = None

    def examples_first(self, x: torch.Tensor, batch_size: int | None) -> tuple[torch.Tensor, bool]:
        """`x` with examples along dim 0 (a view), and whether it was transposed from (T, B, …)."""
        if batch_size is None or x.dim() < 3:
            return x, False
        dim0_is_batch, dim1_is_batch = x.shape[0] == batch_size, x.shape[1] == batch_size
        if dim1_is_batch and not dim0_is_batch:
            self.sequence_first = True
        elif dim0_is_batch and not dim1_is_batch:
            self.sequence_first = False
        if dim1_is_batch and self.sequence_first:
            return x.transpose(0, 1), True
        return x, False


def back_to_input_layout(y: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Undo `examples_first` on the op's output (contiguous, as the module's own output is)."""
    return y.transpose(0, 1).contiguous() if transposed else y
