"""`patch` and `unpatch`: per-instance replacement of norm forwards by the fused op.

`patch` plans first (find norm-like modules, check their structure, find their spec in
the registry or by the probe) and binds only when the plan is complete, so that
`strict=True` fails without touching the model. Binding sets two instance attributes
on each patched module, `forward` (a bound method) and `_hf_gns_state` (its `PatchState`,
`state.py`: the same for every kind), and one
forward pre-hook on the object given to `patch` that records the batch size and prepares sinks
(see `model_hook.py`). Classes, `__class__`, torch.nn, parameters and buffers are never touched,
which keeps state_dict keys, parameter identity and `save_pretrained` output as before.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import zero3
from .coverage import fill_coverage
from .detect import call_route_reason, find_eps_attr, is_norm_like, shared_module_names, unsupported_reason
from .forward import NormPatch, patched_norm_forward, route_norms
from .layers import PATCHED_FORWARDS, bind_layers, plan_layers
from .liger import instance_forward, liger_kind, liger_norm_spec
from .model_hook import PATCHED_MARK, attach_model_hook, bump_patch_generation, detach_model_hooks
from .outside_use import OutsideUseFinder, detach_outside_use_finder
from .per_example_call import own_parameter_names, probe_per_example_call
from .probe import fallback_candidates, probe_norm
from .registry import registered_spec
from .report import PatchedModule, PatchReport, SkippedModule
from .spec import NormSpec
from .state import bind_state, patched_states, state_of, unbind_state
from .wrappers import check_patchable


class NormPatchError(RuntimeError):
    """Raised by `patch(model, strict=True)` when some norm modules with parameters cannot be patched."""


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
    function = instance_forward(module)
    if function is patched_norm_forward:
        return None
    if function is None:
        return f"{type(module).__name__}.forward (the class's own: the instance forward was deleted)"
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


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


def _plan(
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


def _bind(module: nn.Module, state: NormPatch) -> None:
    bind_state(module, state, patched_norm_forward)


PATCH_TARGETS = ("norms", "all")


def patch(
    model: nn.Module, strict: bool = False, targets: str = "norms", linear_method: str = "auto"
) -> PatchReport:
    """Run every normalization layer of `model` on the fused op that also yields per-example norms.

    Recognises norm modules through the registry (looked up along the MRO) and a structural
    fallback, confirms each by a numerical probe, and binds a new forward per instance.
    Calling it again is a no-op for modules already patched (the report lists them as
    patched by an earlier call). Undo with `hf_gns.unpatch(model)`.

    Args:
        model (`nn.Module`): any model, also wrapped by DDP or PEFT. Patch before
            `torch.compile` and before FSDP.
        strict (`bool`, *optional*, defaults to `False`): raise `NormPatchError`, leaving
            the model untouched, if a norm-like module that owns parameters cannot be patched
            (with `targets="all"`: also a Linear/Conv1D/Embedding with trainable parameters).
        targets (`str`, *optional*, defaults to `"norms"`): `"norms"` tracks the normalization
            layers; `"all"` also nn.Linear, HF Conv1D and nn.Embedding modules (weights and
            biases; a token embedding tied to the LM head reports the norm of the summed
            contribution under the embedding's name). See `layers.py`.
        linear_method (`str`, *optional*, defaults to `"auto"`): per-example norm method of
            linear layers under `targets="all"`: `"auto"` (chosen per call from the shapes,
            `hf_gns.kernels.linear_cost`), `"simultaneous"` or `"ghost"`.

    Returns:
        `PatchReport`: patched modules with their flavour, skipped modules with the reason,
        and tracked parameter names (names in `model.named_parameters()`). `print` it.

    Example:
    ```python
    >>> report = hf_gns.patch(model)
    >>> print(report)
    >>> model(**batch).loss.backward()
    >>> hf_gns.per_example_sq_norms(model)["model.norm.weight"]  # (B,) fp32
    ```
    """
    if targets not in PATCH_TARGETS:
        raise ValueError(
            f"hf_gns.patch: targets must be one of {PATCH_TARGETS}, got {targets!r}: 'norms' tracks the "
            "normalization layers, 'all' also every Linear, Conv1D and Embedding"
        )
    partitioned = zero3.patch_parameters(model, targets)
    if partitioned:  # ZeRO-3: the probe needs the values (hf_gns/patching/zero3.py)
        with zero3.gathered(partitioned):
            return patch(model, strict=strict, targets=targets, linear_method=linear_method)
    check_patchable(model)
    layer_plan = plan_layers(model, linear_method) if targets == "all" else None
    shared = shared_module_names(model)
    parameter_names = {id(param): name for name, param in model.named_parameters()}
    found: dict[type, NormSpec] = {}
    found_call: set[type] = set()
    report = PatchReport()
    planned: list[tuple[nn.Module, NormPatch, bool]] = []  # (module, state, patched by an earlier call)
    rebind: list[tuple[nn.Module, NormPatch]] = []
    for name, module in model.named_modules():
        if not is_norm_like(module):
            continue
        existing = state_of(module)
        existing = existing if existing is not None and existing.kind == "norm" else None
        plan = existing if existing is not None else _plan(name, module, shared, found, found_call)
        foreign = _foreign_forward_name(module) if existing is not None else None
        if isinstance(plan, str):
            has_parameters = next(module.parameters(recurse=False), None) is not None
            report.skipped.append(SkippedModule(name, type(module).__name__, plan, has_parameters))
            continue
        if foreign is not None:  # e.g. Liger applied after an earlier patch: take the norm back
            rebind.append((module, existing))
        planned.append((module, plan, existing is not None))
    to_bind = [(module, state) for module, state, earlier in planned if not earlier]
    for module, state, reason in route_norms(to_bind, shared):
        planned = [entry for entry in planned if entry[0] is not module]
        report.skipped.append(SkippedModule(state.name, type(module).__name__, reason, True))
    rebound = {id(module) for module, _ in rebind}
    for module, plan, earlier in planned:
        tracked = _tracked_names(module, plan, parameter_names)
        source = "earlier call" if earlier else plan.source
        if id(module) in rebound:
            source = f"re-bound (its forward had been replaced by {_foreign_forward_name(module)})"
        flavour = plan.describe() + (plan.routing.note if plan.routing is not None else "")
        report.patched.append(
            PatchedModule(plan.name, type(module).__name__, flavour, source, tracked, "norm")
        )
        report.tracked_parameters.extend(tracked)
    to_bind = [(module, state) for module, state, earlier in planned if not earlier]
    if strict and report.uncovered:
        details = "\n".join(f"  {e.name} ({e.class_name}): {e.reason}" for e in report.uncovered)
        raise NormPatchError(
            f"hf_gns.patch(strict=True): {len(report.uncovered)} norm modules with parameters cannot be "
            f"patched; the model was left unchanged:\n{details}\n"
            "Register their classes with hf_gns.register_norm(cls, NormSpec(...)) if they are plain "
            "LayerNorm/RMSNorm variants, or call patch with strict=False to skip them."
        )
    if layer_plan is not None:
        report.layers, report.skipped_layers = layer_plan.patched, layer_plan.skipped
        report.tracked_parameters.extend(layer_plan.tracked)
    fill_coverage(model, report, targets)
    if layer_plan is not None and strict and report.coverage_holes:
        details = "\n".join(f"  {e.name} ({e.class_name}): {e.reason}" for e in report.coverage_holes)
        raise NormPatchError(
            f"hf_gns.patch(strict=True, targets='all'): {len(report.coverage_holes)} trainable parameters "
            f"would not be tracked; the model was left unchanged:\n{details}"
        )
    model.__dict__[PATCHED_MARK] = True
    bump_patch_generation()
    for module, state in rebind:
        _bind(module, state)
    if not report.patched and not report.layers:
        skipped = len(report.skipped) + len(report.skipped_layers)
        warnings.warn(
            f"hf_gns.patch: nothing to patch in {type(model).__name__} (no recognised norm layer"
            + ("" if targets == "norms" else " or Linear/Conv1D/Embedding")
            + (f"; {skipped} skipped, see the report" if skipped else "")
            + "): no per-example statistics will be collected",
            stacklevel=2,
        )
    if to_bind or (layer_plan is not None and layer_plan.to_bind):
        model_hook = attach_model_hook(model)
        for module, state in to_bind:
            state.model_hook = model_hook
            model_hook.norms.append((module, state))
            model_hook.counts_forwards |= state.routing is not None and state.routing.mode == "shared"
            _bind(module, state)
        if layer_plan is not None:
            bind_layers(layer_plan, model_hook)
    if layer_plan is not None:  # weights the model also uses outside their module: the first forward tells
        detach_outside_use_finder(model)
        OutsideUseFinder(model, patched_states(model), report, strict).attach(model)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every module patched by `hf_gns.patch` (norms, and layers of `targets="all"`);
    returns how many were restored.

    Deletes the instance attributes `patch` set and removes its model-level hook, so the
    class forward is used again and outputs and gradients equal the unpatched model's bit
    for bit. Collected statistics are dropped.
    """
    forwards = (patched_norm_forward, *PATCHED_FORWARDS)
    restored = sum(unbind_state(module, forwards) for module in model.modules())
    detach_outside_use_finder(model)
    detach_model_hooks(model)
    bump_patch_generation()
    return restored
