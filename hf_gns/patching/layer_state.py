"""Per-instance state of a Linear / Conv1D / Embedding module patched by `patch(targets="all")`.

Like `NormPatch`, it is a `PatchState` held in the one instance attribute (`state.py`) next to the rebound
`forward`: nothing in the state_dict, parameters untouched. The model-level hook
(`model_hook.py`) keeps these states in its list of sink owners, so their sinks are made
outside compiled graphs like the norms'.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .example_grads import CallRouting
from .layout import ExampleLayout
from .model_hook import ModelForwardHook
from .per_example_call import attribute_at
from .sinks import SquaredNormSinks
from .state import STATE_ATTRIBUTE, PatchState

LAYER_ATTRIBUTE = STATE_ATTRIBUTE  # one attribute for every kind's state
# LayerPatch.method of the kinds other than "linear" (whose methods are "auto", "ghost", ...)
_KIND_OF_METHOD = {"rows": "embedding", "conv": "conv", "call": "call"}


def examples_in(x: torch.Tensor, batch_size: int | None) -> int:
    """How many examples the rows of `x` belong to: dim 0 of a ≥3-D input; for a 2-D input
    (rows, K), the model's batch size B when rows is a multiple of it (flattened (B·T, K),
    batch-major, as OPT's MLP sees it), else one example per row."""
    if x.dim() >= 3:
        return x.shape[0]
    if x.dim() == 2:
        rows = x.shape[0]
        return batch_size if batch_size and rows % batch_size == 0 else rows
    return 1


class TiedLink:
    """Hands the tie link from an embedding's forward to the head that shares its weight.

    The embedding runs first in a forward and `put`s its (link, ids); the head `take`s them.
    Only forward touches this object (backward flows through the link tensor itself).
    """

    def __init__(self, embedding_name: str, head_name: str):
        self.embedding_name = embedding_name
        self.head_name = head_name
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warned = False

    def put(self, link: torch.Tensor, ids: torch.Tensor) -> None:
        self.pending = (link, ids)

    def take(self, n_examples: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        pending, self.pending = self.pending, None
        if pending is not None and pending[1].shape[0] == n_examples:
            return pending
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"hf_gns: {self.head_name!r} shares its weight with {self.embedding_name!r} but ran "
                f"without a lookup of {n_examples} examples in {self.embedding_name!r} earlier in the same "
                "forward (was the model called with inputs_embeds?); the shared weight's per-example norms "
                "of that forward miss the head's contribution",
                stacklevel=3,
            )
        return None

    def __deepcopy__(self, memo):
        # Both states of a copied tie share one new, empty link (deepcopy memoizes the result).
        return TiedLink(self.embedding_name, self.head_name)


@dataclass
class LayerPatch(PatchState):
    """State of one patched Linear / Conv1D / Embedding module.

    Args:
        name (`str`): module name in the patched model.
        reported (`tuple[str | None, ...]`): the parameter attribute reported from each sink
            column, two for most kinds (`"weight"`, `"bias"`, or `None`: not reported here, e.g.
            the weight of a head tied to an embedding, which the embedding reports).
        method (`str`): for linear layers, the requested method (`"auto"`, `"simultaneous"`,
            `"ghost"`); `"rows"` for embeddings.
        transposed (`bool`): HF Conv1D layout.
        tie (`TiedLink`, *optional*): set on both modules of an embedding/head tie.
        model_hook (`ModelForwardHook`): batch size and sink preparation.
        sinks (`SquaredNormSinks`): per-example squared norms, (B, C) per backward, a column per
            reported attribute.
        last_method (`str`, *optional*): the method the last forward chose.
        enabled (`bool`): whether the per-example reduction runs (`set_layer_tracking`); when
            off, the forward is the module's plain computation and nothing is collected.
        routing (`CallRouting`, *optional*): squared-norm path, or per-example gradient vectors
            for layers called several times per forward or sharing their weight (set when planned).
        layout (`ExampleLayout`): where its inputs' examples are (sequence-first or not).
        dropped_columns (`frozenset[int]`): sink columns no longer reported (their parameter is
            used outside this module's forward, `outside_use.py`).
    """

    name: str
    reported: tuple[str | None, ...]
    method: str = "auto"
    transposed: bool = False
    tie: TiedLink | None = None
    model_hook: ModelForwardHook = field(default_factory=ModelForwardHook)
    sinks: SquaredNormSinks = field(default=None)
    last_method: str | None = None
    enabled: bool = True
    routing: CallRouting | None = None
    layout: ExampleLayout = field(default_factory=ExampleLayout)
    dropped_columns: frozenset = frozenset()

    def __post_init__(self):
        if self.sinks is None:
            self.sinks = SquaredNormSinks(self.name, max(2, len(self.reported)))

    @property
    def kind(self) -> str:
        """What the module holds (`kinds.py`): `"linear"`, `"embedding"`, `"conv"` or `"call"`."""
        return _KIND_OF_METHOD.get(self.method, "linear")

    def reported_parameters(self, module: nn.Module) -> tuple[torch.Tensor | None, ...]:
        """The parameter behind each sink column (None where nothing is reported, or where the
        parameter was found used outside this module, `outside_use.py`)."""
        return tuple(
            None if attr is None or column in self.dropped_columns else attribute_at(module, attr)
            for column, attr in enumerate(self.reported)
        )

    def tracks_gradients(self, module: nn.Module) -> bool:
        """True when this call's backward will produce parameter gradients worth measuring
        (never while tracking is switched off by `set_layer_tracking`)."""
        if not (self.enabled and torch.is_grad_enabled()):
            return False
        bias = getattr(module, "bias", None)
        return module.weight.requires_grad or (isinstance(bias, torch.Tensor) and bias.requires_grad)


class ParameterPatch(LayerPatch):
    """A `LayerPatch` whose sink columns are named parameters of the module (`reported`), for
    modules without a Linear's `weight`/`bias` pair: fused experts (`experts.py`) and modules
    using their parameters functionally (`own_parameters.py`)."""

    def tracks_gradients(self, module: nn.Module) -> bool:
        if not (self.enabled and torch.is_grad_enabled()):
            return False
        return any(p is not None and p.requires_grad for p in self.reported_parameters(module))
