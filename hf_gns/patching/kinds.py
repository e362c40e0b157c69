"""The kinds of patched modules: one word for what a module holds, shared by the report and `gns/`.

- `"norm"`: a normalization layer (fused op or per-example call; `forward.py`);
- `"linear"`: nn.Linear / HF Conv1D (`linear.py`); `"embedding"`: nn.Embedding (`embedding.py`);
- `"experts"`: fused MoE experts (`experts.py`); `"conv"`: nn.Conv1d (`conv.py`);
- `"call"`: a module using its own parameters functionally (routers), per-example call
  (`own_parameters.py`).

Every patch state carries its `kind`, and so does every report record (`PatchedModule`);
`module_kind` reads it off a module, so that grouping the statistics (`hf_gns.gns.groups`)
uses the patcher's decision instead of guessing from class names.
"""

from __future__ import annotations

from torch import nn

from .detect import is_norm_like
from .state import state_of

KINDS = ("norm", "linear", "embedding", "experts", "conv", "call")


def module_kind(module: nn.Module) -> str | None:
    """The kind of the patch on `module`; for a module not patched, `"norm"` when the patcher
    would take it for a norm layer (`detect.is_norm_like`: registry, MRO, structure), else None."""
    state = state_of(module)
    if state is not None:
        return state.kind
    return "norm" if is_norm_like(module) else None
