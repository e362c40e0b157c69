"""Linear layers (nn.Linear, HF's Conv1D) under `patch(targets="all")`: which ones, and their forward.

The bound forward computes exactly what the module computes (`F.linear`, or Conv1D's
addmm) through `linear_with_sq_norms`, whose backward also yields the per-example
squared norms of the weight and bias gradients by the simultaneous or the ghost method,
chosen per call from the shapes (`hf_gns.kernels.linear_cost`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.linear_cost import choose_linear_method, simultaneous_min_seq
from ..kernels.linear_op import linear_forward, linear_with_sq_norms
from ..kernels.linear_reference import max_example_rows
from .documents import offsets_for_rows
from .layer_state import LAYER_ATTRIBUTE, LayerPatch, examples_in


def conv1d_class() -> type | None:
    """HF's `Conv1D` (GPT-2's transposed linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def linear_unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` (a Linear or Conv1D) cannot be patched, or None."""
    base = nn.Linear if isinstance(module, nn.Linear) else conv1d_class()
    cls = type(module)
    if cls.forward is not base.forward:
        return (
            f"forward overridden by {cls.__name__}: per-example norms need {base.__name__}'s own computation"
        )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "no 2-D weight tensor"
    if not weight.is_floating_point():
        return f"weight of dtype {weight.dtype} (quantized?): not supported"
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(K, L): input and output features."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_transposed(module) else (cols, rows)


def describe_linear(module: nn.Module, method: str) -> str:
    """E.g. `"768→3072 auto: ghost for T<31, simultaneous for T≥31"`."""
    in_features, out_features = features(module)
    shape = f"{in_features}→{out_features}"
    if method != "auto":
        return f"{shape} {method}"
    crossover = simultaneous_min_seq(in_features, out_features)
    return f"{shape} auto: ghost for T<{crossover}, simultaneous for T≥{crossover}"


def patched_linear_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Forward of a patched Linear/Conv1D: the module's computation, plus a sink when training."""
    state: LayerPatch = getattr(self, LAYER_ATTRIBUTE)
    if not state.tracks_gradients(self):
        return linear_forward(input, self.weight, self.bias, state.transposed)
    hook, offsets = state.model_hook, None
    if hook.example_offsets is not None:  # padding-free batch: documents are the examples
        offsets = offsets_for_rows(hook.example_offsets, input, hook.token_shape)
        n_examples = offsets.shape[0] - 1
    else:
        n_examples = examples_in(input, hook.batch_size)
    in_features, out_features = features(self)
    seq = input.numel() // max(1, n_examples * in_features)  # T: rows per example
    if offsets is not None:  # documents are padded to the longest: that T sets both methods' cost
        seq = max_example_rows(offsets)
    state.last_method = choose_linear_method(n_examples, seq, in_features, out_features, state.method)
    sink = state.sinks.take_for(n_examples, input.device)
    # with documents the tied embedding's lookup is one flattened (1, N) row of ids
    tied_link = state.tie.take(1 if offsets is not None else n_examples) if state.tie is not None else None
    return linear_with_sq_norms(
        input,
        self.weight,
        self.bias,
        sink,
        n_examples,
        method=state.last_method,
        transposed=state.transposed,
        tied_link=tied_link,
        example_offsets=offsets,
    )
