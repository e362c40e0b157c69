"""The kinds of patched modules: one word for what a module holds, its planner and its forward.

- `"norm"`: a normalization layer (fused op or per-example call; planned in `norm.py`, bound
  to `forward.patched_norm_forward`);
- `"linear"`: nn.Linear / HF Conv1D (`linear.py`); `"embedding"`: nn.Embedding (`embedding.py`);
- `"experts"`: fused MoE experts (`experts.py`); `"conv"`: nn.Conv1d (`conv.py`);
- `"call"`: a module using its own parameters functionally (routers), per-example call
  (`own_parameters.py`).

Every kind's state is a `PatchState` (`state.py`) carrying its `kind`, and so does every
report record (`PatchedModule`); `FORWARDS` gives the forward `patch` binds for a kind, and
`PLANNERS` the planners each `targets` runs: `norm.plan_norms`, and for `targets="all"`
`layers.plan_layers`, which matches each module against the registered `layers.LAYER_KINDS`
(how to tell the kind, why it cannot be patched, how to plan and describe one) and gives
modules of no kind holding parameters to the per-example call. `module_kind` reads the kind
off a module, so that grouping the statistics (`hf_gns.gns.groups`) uses the patcher's
decision instead of guessing from class names.
"""

from __future__ import annotations

from torch import nn

from .conv import patched_conv_forward
from .detect import is_norm_like
from .embedding import patched_embedding_forward
from .experts import patched_experts_forward
from .forward import patched_norm_forward
from .layers import plan_layers
from .linear import patched_linear_forward
from .norm import plan_norms
from .own_parameters import patched_own_parameters_forward
from .state import state_of

FORWARDS = {
    "norm": patched_norm_forward,
    "linear": patched_linear_forward,
    "embedding": patched_embedding_forward,
    "experts": patched_experts_forward,
    "conv": patched_conv_forward,
    "call": patched_own_parameters_forward,
}
KINDS = tuple(FORWARDS)
PATCHED_FORWARDS = tuple(FORWARDS.values())  # what `unpatch` deletes, what the guard counts as ours
# targets → the planners it runs, in order (norms first: the report lists them first)
PLANNERS = {"norms": (plan_norms,), "all": (plan_norms, plan_layers)}


def module_kind(module: nn.Module) -> str | None:
    """The kind of the patch on `module`; for a module not patched, `"norm"` when the patcher
    would take it for a norm layer (`detect.is_norm_like`: registry, MRO, structure), else None."""
    state = state_of(module)
    if state is not None:
        return state.kind
    return "norm" if is_norm_like(module) else None
