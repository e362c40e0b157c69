"""The per-module state of every patched module, whatever its kind, and the one attribute holding it.

`patch` binds two instance attributes on each module it patches: `forward` (a module-level
function of the kind's file, bound with `types.MethodType`) and `_hf_gns_state`, the
module's `PatchState`. Every kind's state (`NormPatch` in `forward.py`, `LayerPatch` and
its subclasses in `layer_state.py`, `experts.py`, `own_parameters.py`) is a `PatchState`:
the same interface for statistics (`stats.py`), the model hook (`model_hook.py`), the
outside-use finder and the report, and the same bind/unbind (`bind_state`, `unbind_state`).
Nothing goes into the state_dict; `unbind_state` deletes what `bind_state` set, so the
class forward runs again bit for bit.

What every state has (fields of the dataclasses below it): `name`, `kind` (`kinds.py`),
`sinks` (`SquaredNormSinks`, a column per reported parameter), `model_hook`, `routing`,
`layout`, `dropped_columns`; and `reported_parameters(module)` (the parameter behind each
sink column, None where nothing is reported) and `tracks_gradients(module)`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

from torch import nn

from .report import PatchedModule, SkippedModule

STATE_ATTRIBUTE = "_hf_gns_state"
# The instance-level forward that `patch` replaced (Liger's), put back by `unbind_state`.
DISPLACED_ATTRIBUTE = "_hf_gns_displaced_forward"
# The per-example call's wrapper of a module's class forward (`per_example_call.class_forward`),
# deleted by `unbind_state`.
CLASS_FORWARD_ATTRIBUTE = "_hf_gns_class_forward"


class PatchState:
    """Base of every kind's per-module state (see the module docstring)."""

    kind: str
    # whether the per-example reductions run (`set_layer_tracking` switches the non-norm kinds)
    enabled: bool = True

    def reported_parameters(self, module: nn.Module):
        raise NotImplementedError

    def tracks_gradients(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def may_run_per_example_call(self) -> bool:
        """Whether some call of the module may take the per-example call (`per_example_call.py`):
        `patch` then makes its class-forward wrapper as it binds the state."""
        return False


@dataclass
class Plan:
    """What a kind's planner decided (`norm.plan_norms`, `layers.plan_layers`), before anything is bound.

    Args:
        patched (`list[PatchedModule]`), skipped (`list[SkippedModule]`): the report's records.
        tracked (`list[str]`): the parameters the planned modules report.
        to_bind (`list[tuple[nn.Module, PatchState]]`): the modules to bind, with their new state.
        rebind (`list[tuple[nn.Module, PatchState]]`): modules patched by an earlier call whose
            forward someone replaced since (bound again with their state).
        claimed (`set[int]`): ids of submodules tracked by a parent's state (left unpatched).
    """

    patched: list[PatchedModule] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    tracked: list[str] = field(default_factory=list)
    to_bind: list[tuple[nn.Module, PatchState]] = field(default_factory=list)
    rebind: list[tuple[nn.Module, PatchState]] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)


def state_of(module: nn.Module) -> PatchState | None:
    """The state `patch` bound on `module`, or None."""
    return module.__dict__.get(STATE_ATTRIBUTE)


def patched_states(model: nn.Module, kind: str | None = None) -> list[tuple[nn.Module, PatchState]]:
    """Every (module, state) patched in `model`, in module order; only those of `kind` if given
    (`"layers"`: every kind but `"norm"`)."""
    found = []
    for module in model.modules():
        state = module.__dict__.get(STATE_ATTRIBUTE)
        if state is None or (kind == "layers" and state.kind == "norm"):
            continue
        if kind is None or kind == "layers" or state.kind == kind:
            found.append((module, state))
    return found


def instance_forward(module: nn.Module):
    """The function bound as `module.forward` on the instance, or None (the class's forward runs)."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", forward)


def foreign_forward(module: nn.Module, ours) -> str | None:
    """The qualified name of the forward bound on `module` when it is none of `ours` (the functions
    `patch` binds): someone rebound it after `patch` (Liger's instance patching, or deleted it)."""
    function = instance_forward(module)
    if function in ours:
        return None
    if function is None:
        return f"{type(module).__name__}.forward (the class's own: the instance forward was deleted)"
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def bind_state(module: nn.Module, state: PatchState, forward) -> None:
    """Set `module`'s state and rebind its forward to `forward` (a function of `(self, ...)`); an
    instance forward bound by someone else (Liger) is kept aside for `unbind_state`."""
    module.__dict__[STATE_ATTRIBUTE] = state
    displaced = module.__dict__.get("forward")
    if displaced is not None and instance_forward(module) is not forward:
        module.__dict__[DISPLACED_ATTRIBUTE] = displaced
    module.forward = types.MethodType(forward, module)


def unbind_state(module: nn.Module, forwards) -> bool:
    """Undo `bind_state` on `module` (`forwards`: the functions `patch` binds); False if it was not
    patched."""
    if STATE_ATTRIBUTE not in module.__dict__:
        return False
    if instance_forward(module) in forwards:
        del module.forward
    displaced = module.__dict__.pop(DISPLACED_ATTRIBUTE, None)
    if displaced is not None and "forward" not in module.__dict__:
        module.__dict__["forward"] = displaced  # Liger's forward, as before patch
    module.__dict__.pop(CLASS_FORWARD_ATTRIBUTE, None)
    del module.__dict__[STATE_ATTRIBUTE]
    return True
