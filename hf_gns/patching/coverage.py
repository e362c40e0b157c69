"""Which trainable parameters a patch does not track, and why: the report's untracked list.

Every parameter that requires grad and is not tracked is named (by its name in
`model.named_parameters()`) with a reason, so that a hole in the coverage is visible in the
report and refused by `strict=True` (with `targets="all"`). Frozen parameters are not
listed: they get no gradient, so they are not part of the GNS.

The reasons, first match wins:
- the module that holds it was skipped: that entry's reason;
- `targets="norms"` and it is not in a norm layer (not listed row by row, only counted);
- it is held by several modules (a shared weight not handled as a tie);
- it belongs to a convolution other than HF's Conv1D, or is a fused MoE expert tensor
  (3-D, one slice per expert);
- otherwise it is a raw parameter that a module's forward uses functionally
  (`x @ self.weight`, `F.linear(x, router.weight)`, Mamba's `A_log`, `D`).

Whether a listed parameter really receives a gradient depends on the forward; statically,
every trainable one is listed.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from .report import NOT_A_NORM, PatchReport, UntrackedParameter


def _owner_modules(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every (module name, module) that holds each parameter directly, duplicates included."""
    owners: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            if all(owner is not module for _, owner in owners[id(param)]):
                owners[id(param)].append((module_name, module))
    return owners


def structural_reason(module: nn.Module, attr: str, param) -> str:
    cls = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{cls} (nn.{cls}) not supported"
    if attr.endswith("_bias") and hasattr(module, "has_bias") and "expert" in cls.lower():
        shape = tuple(param.shape)
        return f"expert bias {shape}: added outside the per-example op (two sink columns per module)"
    if param.dim() >= 3 and ("expert" in cls.lower() or "expert" in attr.lower()):
        return f"fused MoE expert weights {tuple(param.shape)} not supported"
    return f"raw parameter used functionally by {cls}.forward: not tracked"


def untracked_parameters(model: nn.Module, report: PatchReport, targets: str) -> list[UntrackedParameter]:
    """The trainable parameters of `model` not in `report.tracked_parameters`, with the reason."""
    tracked = set(report.tracked_parameters)
    skipped = {entry.name: entry.reason for entry in [*report.skipped, *report.skipped_layers]}
    norm_modules = {entry.name for entry in [*report.patched, *report.skipped]}
    owners = _owner_modules(model)
    untracked = []
    for name, param in model.named_parameters():
        if not param.requires_grad or name in tracked:
            continue
        holders = owners[id(param)]
        module_name, module = holders[0] if holders else (name.rpartition(".")[0], model)
        attr = name.rpartition(".")[2]
        held_by_skipped = [skipped[n] for n, _ in holders if n in skipped]
        if held_by_skipped:
            reason = held_by_skipped[0]
        elif targets == "norms" and not any(n in norm_modules for n, _ in holders):
            reason = NOT_A_NORM
        elif len(holders) > 1:
            reason = "shared weight: also held by " + ", ".join(repr(n) for n, _ in holders[1:])
        else:
            reason = structural_reason(module, attr, param)
        untracked.append(UntrackedParameter(name, _numel(param), module_name, type(module).__name__, reason))
    return untracked


def fill_coverage(model: nn.Module, report: PatchReport, targets: str) -> None:
    """Set `report.untracked` and the element counts behind its coverage line."""
    report.untracked = untracked_parameters(model, report, targets)
    sizes = {name: _numel(param) for name, param in model.named_parameters() if param.requires_grad}
    report.trainable_elements = sum(sizes.values())
    report.tracked_elements = sum(sizes.get(name, 0) for name in set(report.tracked_parameters))


def _numel(param) -> int:
    # A ZeRO-3 partitioned parameter holds an empty placeholder; its full size is `ds_numel`.
    return getattr(param, "ds_numel", None) or param.numel()
