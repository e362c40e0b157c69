"""`patch` and `unpatch`: per-instance rebinding of the planned modules (norms; every kind with "all").

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

from ..kernels import norm_graph_pass
from . import zero3
from .coverage import fill_coverage
from .kinds import FORWARDS, PATCHED_FORWARDS, PLANNERS
from .model_hook import PATCHED_MARK, attach_model_hook, bump_patch_generation, detach_model_hooks
from .outside_use import OutsideUseFinder, detach_outside_use_finder
from .per_example_call import class_forward
from .report import PatchReport
from .state import bind_state, patched_states, unbind_state
from .wrappers import check_patchable


class NormPatchError(RuntimeError):
    """Raised by `patch(model, strict=True)` when some norm modules with parameters cannot be patched."""


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
            `torch.compile` and before FSDP. Patching norms also installs, once per process, an
            Inductor post-grad pass that rewrites only hf_gns's own compiled norm launches (they
            write the autocast dtype their users cast to, and take in the residual add before them
            and the gradient sums around their backward: `hf_gns/kernels/norm_graph_pass.py`, whose
            docstring names the switches that turn each part off). It stays after `unpatch`, where
            it finds nothing to rewrite.
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
    norm_plan, *layer_plans = (planner(model, linear_method) for planner in PLANNERS[targets])
    layer_plan = layer_plans[0] if layer_plans else None
    report = PatchReport(norm_plan.patched, norm_plan.skipped, list(norm_plan.tracked))
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
    for module, state in norm_plan.rebind:
        _bind(module, state)
    if report.patched:  # compiled norms then read and write the narrow dtype of the casts around them
        norm_graph_pass.install()
    if not report.patched and not report.layers:
        skipped = len(report.skipped) + len(report.skipped_layers)
        warnings.warn(
            f"hf_gns.patch: nothing to patch in {type(model).__name__} (no recognised norm layer"
            + ("" if targets == "norms" else " or Linear/Conv1D/Embedding")
            + (f"; {skipped} skipped, see the report" if skipped else "")
            + "): no per-example statistics will be collected",
            stacklevel=2,
        )
    to_bind = [pair for plan in (norm_plan, *layer_plans) for pair in plan.to_bind]
    if to_bind:
        model_hook = attach_model_hook(model)
        for module, state in to_bind:  # every kind alike: the hook prepares its sinks
            state.model_hook = model_hook
            model_hook.norms.append((module, state))
            model_hook.counts_forwards |= state.routing is not None and state.routing.mode == "shared"
            _bind(module, state)
    if layer_plan is not None:  # weights the model also uses outside their module: the first forward tells
        detach_outside_use_finder(model)
        OutsideUseFinder(model, patched_states(model), report, strict).attach(model)
    return report


def _bind(module: nn.Module, state) -> None:
    bind_state(module, state, FORWARDS[state.kind])
    if state.may_run_per_example_call():  # made here, outside any compiled region (see class_forward)
        class_forward(module)


def unpatch(model: nn.Module) -> int:
    """Restore every module patched by `hf_gns.patch` (norms, and layers of `targets="all"`);
    returns how many were restored.

    Deletes the instance attributes `patch` set and removes its model-level hook, so the
    class forward is used again and outputs and gradients equal the unpatched model's bit
    for bit. Collected statistics are dropped.
    """
    restored = sum(unbind_state(module, PATCHED_FORWARDS) for module in model.modules())
    detach_outside_use_finder(model)
    detach_model_hooks(model)
    bump_patch_generation()
    return restored
