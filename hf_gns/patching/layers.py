"""Planning, binding and undoing the Linear / Conv1D / Embedding part of `patch(targets="all")`.

Which modules: every nn.Linear, HF Conv1D and nn.Embedding that runs its class's own
forward and has a trainable parameter. Weight sharing decides the rest:
- an nn.Embedding and an nn.Linear holding the same (V, D) weight (tied token embedding and
  LM head) become a tie: the embedding reports the norm of the summed per-example
  contribution |E_b + G_bᵀA_b|² (see `hf_gns.kernels.linear_op`), the head only its bias;
- any other sharing (two linears, a weight also held by a module we do not patch) is
  skipped and reported: a per-module norm of a shared weight would be part of the truth.

Limits: a weight that a model uses outside its module (e.g. logits = h @ wte.weight.T
with no head module) is invisible here, and the embedding's norm would miss that part;
2-D inputs are taken as batch-major rows (B·T, K) or one row per example, so layers fed
token-gathered rows (mixture-of-experts experts) get wrong per-example groupings.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.linear_cost import LINEAR_METHODS
from .conv import conv_unsupported_reason, describe_conv
from .detect import is_norm_like, shared_module_names
from .embedding import describe_embedding, embedding_unsupported_reason
from .example_grads import CallRouting
from .experts import (
    ExpertsPatch,
    describe_experts,
    experts_unsupported_reason,
    is_dense,
    is_experts_like,
    is_parallel_experts,
    probe_experts,
    reported_weights,
)
from .layer_state import LayerPatch, TiedLink
from .linear import (
    describe_linear,
    is_linear_like,
    is_transposed,
    linear_unsupported_reason,
)
from .own_parameters import (
    claimed_modules,
    describe_own_parameters,
    own_parameters_candidate,
    plan_own_parameters,
)
from .report import PatchedModule, SkippedModule
from .state import Plan, patched_states, state_of


def _trainable(module: nn.Module) -> bool:
    """Whether `module` holds a trainable parameter (in a submodule too when it holds none itself:
    DBRX's experts keep their weights in `mlp`)."""
    own = list(module.parameters(recurse=False))
    return any(p.requires_grad for p in (own or module.parameters()))


def _experts_reason(module: nn.Module, probed: dict[type, str | None]) -> str | None:
    reason = experts_unsupported_reason(module)
    if reason is None:
        if type(module) not in probed:  # one verified instance vouches for its class (same forward)
            probed[type(module)] = probe_experts(module)
        reason = probed[type(module)]
    return reason


@dataclass(frozen=True)
class LayerKind:
    """A kind of module `plan_layers` patches (`kinds.py`): how to tell it, why it cannot be patched,
    how to describe it, and how to plan one (`plan`: None for Linear and Embedding, planned
    together afterwards because they may share weights)."""

    name: str
    matches: Callable[[nn.Module], bool]
    unsupported: Callable[[nn.Module, dict], str | None]  # (module, probe cache by class)
    describe: Callable[[nn.Module, object], str]  # (module, state)
    plan: Callable | None = None
    to_call: str | None = None  # a reason starting so sends the module to the per-example call


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The first registered kind matching `module` (`LAYER_KINDS`), or None."""
    return next((kind for kind in LAYER_KINDS if kind.matches(module)), None)


def _is_tie(members: list[tuple[str, nn.Module]]) -> bool:
    kinds = sorted((isinstance(m, nn.Embedding), is_transposed(m)) for _, m in members)
    return len(members) == 2 and kinds == [(False, False), (True, True)]


def _owners_by_weight(model: nn.Module) -> dict[int, list[str]]:
    """Every module name holding each parameter (duplicates included)."""
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name.rsplit(".", 1)[0] if "." in name else "")
    return owners


def plan_layers(model: nn.Module, linear_method: str = "auto") -> Plan:
    """Decide which Linear/Conv1D/Embedding modules of `model` to patch, with the reason for the rest."""
    if linear_method not in LINEAR_METHODS:
        raise ValueError(f"linear_method must be one of {LINEAR_METHODS}, got {linear_method!r}")
    plan = Plan()
    names = {id(p): n for n, p in model.named_parameters()}
    shared = shared_module_names(model)
    owners = _owners_by_weight(model)
    candidates: list[tuple[str, nn.Module]] = []
    probed: dict[type, str | None] = {}
    probed_calls: dict[type, str | None] = {}
    for name, module in model.named_modules():
        if id(module) in plan.claimed:
            continue
        kind = layer_kind(module)
        if kind is None:
            if _takes_per_example_call(module):
                _plan_call(plan, names, owners, shared, name, module, probed_calls)
            continue
        existing = state_of(module)
        if existing is not None:
            reported = existing.reported_parameters(module)
            tracked = tuple(names[id(p)] for p in reported if p is not None and p.requires_grad)
            if existing.kind == "call":  # a module of this kind that took the per-example call
                described = describe_own_parameters(module, existing)
            else:
                described = kind.describe(module, existing)
            plan.patched.append(
                PatchedModule(name, type(module).__name__, described, "earlier call", tracked, existing.kind)
            )
            plan.tracked.extend(tracked)
            _claim(plan, module, existing.reported)
            continue
        reason = kind.unsupported(module, probed)
        if reason is not None and kind.to_call is not None and reason.startswith(kind.to_call):
            # a Linear subclass with its own forward (Llama-4's router), experts of a layout of their own
            # (Inkling's shared experts): the per-example call, if probed right
            _plan_call(plan, names, owners, shared, name, module, probed_calls, why_not=reason)
            continue
        if reason is None and id(module) in shared:
            others = ", ".join(repr(n) for n in shared[id(module)] if n != name)
            reason = f"the same module is also registered as {others}"
        if reason is None and not _trainable(module):
            reason = "frozen (requires_grad=False): nothing to track"
        if reason is None and kind.plan is not None:
            reason = kind.plan(plan, names, owners, name, module, linear_method)
            if reason is None:
                continue
        if reason is not None:
            plan.skipped.append(SkippedModule(name, type(module).__name__, reason, _trainable(module)))
            continue
        candidates.append((name, module))

    by_weight: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in candidates:
        by_weight[id(module.weight)].append((name, module))
    for members in by_weight.values():
        member_names = {name for name, _ in members}
        holders = set(owners[id(members[0][1].weight)])
        tie = _is_tie(members) and holders == member_names
        if len(members) > 1 and not tie and holders <= member_names and _can_share(members):
            _plan_shared(plan, names, members, linear_method)
            continue
        if len(members) > 1 and not tie or not holders <= member_names:
            for name, module in members:
                others = ", ".join(repr(n) for n in sorted(holders - {name}))
                reason = (
                    f"weight shared with {others}: supported are linears sharing weight and bias, and an "
                    "embedding tied to one linear head"
                )
                plan.skipped.append(SkippedModule(name, type(module).__name__, reason, True))
            continue
        link = None
        if tie:
            (embedding_name, _), (head_name, _) = sorted(
                members, key=lambda m: not isinstance(m[1], nn.Embedding)
            )
            link = TiedLink(embedding_name, head_name)
        for name, module in members:
            _plan_one(plan, names, name, module, linear_method, link)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    plan.patched.sort(key=lambda entry: order[entry.name])
    plan.skipped.sort(key=lambda entry: order[entry.name])
    return plan


def _plan_one(
    plan: Plan, names: dict[int, str], name: str, module: nn.Module, method: str, link: TiedLink | None
) -> None:
    if isinstance(module, nn.Embedding):
        state = LayerPatch(name, ("weight", None), "rows", tie=link)
        described = describe_embedding(module)
        if link is not None:
            described += f", tied to {link.head_name!r}: norm of the summed contribution"
    else:
        tied_head = link is not None
        state = LayerPatch(
            name, (None if tied_head else "weight", "bias"), method, is_transposed(module), link
        )
        described = describe_linear(module, method)
        if tied_head:
            described += f", weight tied to {link.embedding_name!r} (reported there)"
    _add_to_plan(plan, names, name, module, state, described)


def _add_to_plan(plan: Plan, names: dict[int, str], name: str, module: nn.Module, state, described: str):
    """Record a planned module: its report line, its tracked parameters (trainable, reported by its
    state), and the (module, state) pair to bind."""
    reported = [p for p in state.reported_parameters(module) if p is not None]
    tracked = tuple(names[id(p)] for p in reported if p.requires_grad and id(p) in names)
    plan.patched.append(
        PatchedModule(name, type(module).__name__, described, "targets=all", tracked, state.kind)
    )
    plan.tracked.extend(tracked)
    if state.kind in ("linear", "embedding") and state.routing is None:  # the kinds with call routing
        mode = "single" if state.tie is not None else "discover"  # a tie's link needs the sink path
        state.routing = CallRouting(state.name, state.sinks, _widths(module), mode)
    plan.to_bind.append((module, state))


def _held_elsewhere(state, module: nn.Module, names: dict[int, str], owners: dict[int, list[str]], name: str):
    """Why `module` cannot be planned alone (a parameter it reports is held by another module), or None."""
    for param in state.reported_parameters(module):
        others = [] if param is None else _held_outside(module, [param], owners, name)
        if others:
            return f"{names.get(id(param), '?')} is also held by {', '.join(map(repr, others))}"
    return None


def _held_outside(module: nn.Module, params, owners: dict[int, list[str]], name: str) -> list[str]:
    """The modules outside `module` (named `name`) and its submodules that hold any of `params`."""
    inside = {name, *(f"{name}.{child}" for child, _ in module.named_modules() if child)}
    return [holder for param in params for holder in owners[id(param)] if holder not in inside]


def _takes_per_example_call(module: nn.Module) -> bool:
    """A module of no other kind holding trainable parameters of its own (`own_parameters.py`)."""
    if is_norm_like(module) or isinstance(module, nn.modules.conv._ConvNd):
        return False
    return own_parameters_candidate(module)


def _plan_call(
    plan: Plan,
    names: dict[int, str],
    owners: dict[int, list[str]],
    shared: dict[int, list[str]],
    name: str,
    module: nn.Module,
    probed: dict[type, str | None],
    why_not: str | None = None,
) -> None:
    """Plan a module that uses its own parameters functionally, or record why it is not tracked
    (`why_not`: the reason its own kind gave, for the report when the per-example call fails too)."""
    existing = state_of(module)
    if existing is not None:
        tracked = tuple(names[id(p)] for p in existing.reported_parameters(module) if p is not None)
        described = describe_own_parameters(module, existing)
        plan.patched.append(
            PatchedModule(name, type(module).__name__, described, "earlier call", tracked, existing.kind)
        )
        plan.tracked.extend(tracked)
        _claim(plan, module, existing.reported)
        return
    held_elsewhere = _held_outside(module, module.parameters(), owners, name)
    if id(module) in shared or held_elsewhere:
        if why_not is not None:
            plan.skipped.append(SkippedModule(name, type(module).__name__, why_not, _trainable(module)))
        return  # else the report's coverage names the sharing
    state = plan_own_parameters(name, module, probed)
    if state is None or isinstance(state, str):
        if why_not is not None:
            state = why_not if state is None else f"{why_not}; {state.split(': ', 1)[-1]}"
        if state is not None:
            plan.skipped.append(SkippedModule(name, type(module).__name__, state, _trainable(module)))
        return
    _add_to_plan(plan, names, name, module, state, describe_own_parameters(module, state))
    _claim(plan, module, state.reported)


def _claim(plan: Plan, module: nn.Module, reported: tuple[str | None, ...]) -> None:
    """Leave the submodules whose parameters `module`'s per-example call tracks unpatched (and unplanned)."""
    for child in claimed_modules(module, tuple(n for n in reported if n)):
        plan.claimed.update(id(m) for m in child.modules())


def _plan_experts(
    plan: Plan,
    names: dict[int, str],
    owners: dict[int, list[str]],
    name: str,
    module: nn.Module,
    method: str,
) -> str | None:
    """Plan a fused-experts module (`experts.py`), or the reason it cannot be."""
    state = ExpertsPatch(name, reported_weights(module), method)
    state.method_dense = is_dense(module)
    state.method_parallel = is_parallel_experts(module)
    return _plan_unless_held_elsewhere(plan, names, owners, name, module, state, describe_experts, claim=True)


def _plan_conv(
    plan: Plan,
    names: dict[int, str],
    owners: dict[int, list[str]],
    name: str,
    module: nn.Module,
    method: str,
) -> str | None:
    """Plan an nn.Conv1d (`conv.py`), or the reason it cannot be."""
    state = LayerPatch(name, ("weight", "bias"), "conv")
    return _plan_unless_held_elsewhere(plan, names, owners, name, module, state, describe_conv)


def _plan_unless_held_elsewhere(
    plan: Plan,
    names: dict[int, str],
    owners: dict[int, list[str]],
    name: str,
    module: nn.Module,
    state,
    describe,
    claim: bool = False,
) -> str | None:
    """Add `module` with `state` to the plan (and, with `claim`, leave the submodules its state
    tracks unplanned), unless a weight it would track is held elsewhere: then the reason."""
    why_not = _held_elsewhere(state, module, names, owners, name)
    if why_not is None:
        _add_to_plan(plan, names, name, module, state, describe(module))
        if claim:
            _claim(plan, module, state.reported)
    return why_not


def _can_share(members: list[tuple[str, nn.Module]]) -> bool:
    """Linears (or Conv1Ds) of one layout holding one weight and one bias: summed per example."""
    first = members[0][1]
    return all(
        is_linear_like(module)
        and is_transposed(module) == is_transposed(first)
        and getattr(module, "bias", None) is getattr(first, "bias", None)
        for _, module in members
    )


def _widths(module: nn.Module) -> tuple[int, int]:
    bias = getattr(module, "bias", None)
    return module.weight.numel(), bias.numel() if isinstance(bias, torch.Tensor) else 0


def _plan_shared(
    plan: Plan, names: dict[int, str], members: list[tuple[str, nn.Module]], method: str
) -> None:
    """Linears sharing one weight (Zamba's shared block, one module object per layer): one vector
    group, summed over every call of every holder, reported by the first holder."""
    holders = [name for name, _ in members]
    first_name = holders[0]
    for name, module in members:
        reports = name == first_name
        reported = ("weight", "bias") if reports else (None, None)
        state = LayerPatch(name, reported, method, is_transposed(module))
        if reports:
            state.routing = CallRouting(name, state.sinks, _widths(module), "shared")
            state.routing.vectors.members = tuple(holders)
            vectors = state.routing.vectors
        else:
            state.routing = CallRouting(name, state.sinks, _widths(module), "shared", vectors)
        others = ", ".join(repr(n) for n in holders if n != name)
        note = "summed per example" if reports else f"reported by {first_name!r}"
        described = f"{describe_linear(module, 'vectors')}, weight shared with {others}: {note}"
        tracked = tuple(
            names[id(p)] for p in state.reported_parameters(module) if p is not None and p.requires_grad
        )
        plan.patched.append(
            PatchedModule(name, type(module).__name__, described, "targets=all", tracked, state.kind)
        )
        plan.tracked.extend(tracked)
        plan.to_bind.append((module, state))


LAYER_KINDS = (  # the order a module is matched in
    LayerKind(
        "conv",
        lambda m: isinstance(m, nn.modules.conv._ConvNd),
        lambda m, probed: conv_unsupported_reason(m),
        lambda m, state: describe_conv(m),
        _plan_conv,
    ),
    LayerKind(
        "experts",
        is_experts_like,
        _experts_reason,
        lambda m, state: describe_experts(m),
        _plan_experts,
        to_call="not a transformers experts module",
    ),
    LayerKind(
        "embedding",
        lambda m: isinstance(m, nn.Embedding),
        lambda m, probed: embedding_unsupported_reason(m),
        lambda m, state: describe_embedding(m),
    ),
    LayerKind(
        "linear",
        is_linear_like,
        lambda m, probed: linear_unsupported_reason(m),
        lambda m, state: describe_linear(m, state.method),
        to_call="forward overridden",
    ),
)


def layer_states(model: nn.Module) -> list[tuple[nn.Module, LayerPatch]]:
    """The (module, state) pairs of every kind but norms (`patch(targets="all")`)."""
    return patched_states(model, "layers")


def set_layer_tracking(model: nn.Module, enabled: bool) -> int:
    """Switch the per-example reductions of the Linear / Conv1D / Embedding layers patched by
    `patch(model, targets="all")` off or on (norm layers are not affected); returns how many
    layers were switched.

    Off, a patched layer runs its plain `F.linear` / Conv1D addmm / `F.embedding` computation:
    no sink, no extra work, outputs and gradients bit-identical to the unpatched layer, and
    `per_example_sq_norms` leaves its parameters out (not collected this step). Switch at
    optimizer-step boundaries, e.g. all-layer statistics on one step in N for calibration:

    ```python
    >>> hf_gns.patch(model, targets="all")
    >>> set_layer_tracking(model, step % 100 == 0)
    ```
    """
    states = layer_states(model)
    if not states:
        raise ValueError(
            "set_layer_tracking: no layer of this model is patched by hf_gns.patch(model, targets='all')"
        )
    for _module, state in states:
        state.enabled = bool(enabled)
    return len(states)


def layer_tracking_enabled(model: nn.Module) -> bool:
    """Whether the all-layer reductions of `model` are on (see `set_layer_tracking`); False
    when no layer of `model` is patched with `targets="all"`."""
    return any(state.enabled for _module, state in layer_states(model))
