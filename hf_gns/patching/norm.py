"""Planning the norm layers: which norm-like modules to patch, on which route, or why not.

The planner of the `"norm"` kind (`kinds.py` lists every kind's planner and forward; the
others are in `layers.py`). For each norm-like module (`detect.is_norm_like`: registry,
MRO, structure) it finds the route: Liger's mapped spec, the registry's spec or the probe's
(`probe.py`), else the per-example call (`per_example_call.py`) when its probe accepts the
module; modules sharing their weight are routed together (`forward.route_norms`). A module
patched by an earlier call keeps its state (and is re-bound if someone replaced its forward,
e.g. Liger's instance patching). Nothing is bound here: `patch` binds the plan.
"""

from __future__ import annotations

from torch import nn

from .detect import call_route_reason, find_eps_attr, is_norm_like, shared_module_names, unsupported_reason
from .forward import NormPatch, patched_norm_forward, route_norms
from .liger import liger_kind, liger_norm_spec
from .per_example_call import own_parameter_names, probe_per_example_call
from .probe import fallback_candidates, probe_norm
from .registry import registered_spec
from .report import PatchedModule, SkippedModule
from .spec import NormSpec
from .state import Plan, foreign_forward, state_of


def _structural_reason(module: nn.Module) -> str | None:
    """`unsupported_reason`, except that an instance forward bound by Liger does not count: hf_gns
    takes such norms over (Liger keeps its other kernels)."""
    if liger_kind(module) is None or "forward" not in module.__dict__:
        return unsupported_reason(module)
    liger_forward = module.__dict__.pop("forward")
    try:
        return unsupported_reason(module)
    finally:
        module.__dict__["forward"] = liger_forward


def _foreign_forward_name(module: nn.Module) -> str | None:
    """Who replaced our forward on a module patched earlier, or None if ours is still bound."""
    return foreign_forward(module, (patched_norm_forward,))


def _tracked_names(module: nn.Module, state: NormPatch, names: dict[int, str]) -> tuple[str, ...]:
    """Names (as in `model.named_parameters()`, also for a weight shared by two modules) of the
    module's reported parameters that require grad."""
    params = state.reported_parameters(module)
    return tuple(names[id(p)] for p in params if p is not None and p.requires_grad and id(p) in names)


def _call_plan(name: str, module: nn.Module, why_not_fused: str, found_call: set[type]) -> NormPatch | str:
    """A per-example-call `NormPatch` for a module the fused op cannot express, or the reason."""
    excluded = call_route_reason(module)
    if excluded is not None:
        return why_not_fused
    parameters = own_parameter_names(module)
    if type(module) not in found_call:  # one verified instance vouches for its class (same forward)
        reason = probe_per_example_call(module)
        if reason is not None:
            return f"{why_not_fused}; per-example call: {reason}"
        found_call.add(type(module))
    return NormPatch(name, None, None, "probe", parameters=(*parameters, None)[:2])


def _plan_norm(
    name: str,
    module: nn.Module,
    shared: dict[int, list[str]],
    found: dict[type, NormSpec],
    found_call: set[type],
) -> NormPatch | str:
    """A `NormPatch` for `module`, or the reason it cannot have one.

    `found` maps classes to the spec the probe accepted for an earlier instance in this
    call: later instances are probed against that spec alone (cheap, still verified).
    Modules the fused op cannot express take the per-example call when its probe accepts
    them (`found_call`: classes accepted so far).
    """
    reason = _structural_reason(module)
    if reason is not None:
        return _call_plan(name, module, reason, found_call)
    liger_spec = liger_norm_spec(module)
    if isinstance(liger_spec, str):
        return liger_spec
    if liger_spec is not None:  # Liger's kernels do not run on every device: mapped, not probed
        return NormPatch(name, liger_spec, find_eps_attr(module, liger_spec), "liger")
    cls = type(module)
    registered = registered_spec(cls)
    if registered is not None:
        candidates = [registered[0]]
    elif cls in found:
        candidates = [found[cls]]
    else:
        candidates = fallback_candidates()
    eps_attr = find_eps_attr(module, registered[0] if registered else None)
    result = probe_norm(module, candidates, eps_attr)
    if result.spec is None and cls in found:  # this instance differs from the first one: full search
        result = probe_norm(module, fallback_candidates(), eps_attr)
    if result.spec is None:
        if registered:
            return f"registered as {registered[1].__name__} but {result.reason}"
        return _call_plan(name, module, result.reason, found_call)
    if registered is None:
        found.setdefault(cls, result.spec)
    source = "registry" if registered else "probe"
    if result.dtypes is not None:  # e.g. fp32 weights only: the others need the per-example call
        fallback = _call_plan(name, module, result.reason, found_call)
        if isinstance(fallback, str):
            return fallback
        return NormPatch(name, result.spec, eps_attr, source, fused_dtypes=result.dtypes)
    return NormPatch(name, result.spec, eps_attr, source)


def plan_norms(model: nn.Module, linear_method: str = "auto") -> Plan:
    """Decide, for every norm-like module of `model`, its state or the reason it is skipped
    (`linear_method` is not used: every kind's planner takes the same arguments, `kinds.PLANNERS`)."""
    shared = shared_module_names(model)
    parameter_names = {id(param): name for name, param in model.named_parameters()}
    found: dict[type, NormSpec] = {}
    found_call: set[type] = set()
    plan = Plan()
    planned: list[tuple[nn.Module, NormPatch, bool]] = []  # (module, state, patched by an earlier call)
    for name, module in model.named_modules():
        if not is_norm_like(module):
            continue
        existing = state_of(module)
        existing = existing if existing is not None and existing.kind == "norm" else None
        state = existing if existing is not None else _plan_norm(name, module, shared, found, found_call)
        if isinstance(state, str):
            has_parameters = next(module.parameters(recurse=False), None) is not None
            plan.skipped.append(SkippedModule(name, type(module).__name__, state, has_parameters))
            continue
        if existing is not None and _foreign_forward_name(module) is not None:
            plan.rebind.append((module, existing))  # e.g. Liger applied after an earlier patch
        planned.append((module, state, existing is not None))
    to_bind = [(module, state) for module, state, earlier in planned if not earlier]
    for module, state, reason in route_norms(to_bind, shared):
        planned = [entry for entry in planned if entry[0] is not module]
        plan.skipped.append(SkippedModule(state.name, type(module).__name__, reason, True))
    rebound = {id(module) for module, _ in plan.rebind}
    for module, state, earlier in planned:
        tracked = _tracked_names(module, state, parameter_names)
        source = "earlier call" if earlier else state.source
        if id(module) in rebound:
            source = f"re-bound (its forward had been replaced by {_foreign_forward_name(module)})"
        flavour = state.describe() + (state.routing.note if state.routing is not None else "")
        record = PatchedModule(state.name, type(module).__name__, flavour, source, tracked, "norm")
        plan.patched.append(record)
        plan.tracked.extend(tracked)
        if not earlier:
            plan.to_bind.append((module, state))
    return plan
