"""ZeRO-3 partitioned parameters: gathered while `patch` inspects and probes the modules.

Under DeepSpeed ZeRO-3 (a model built inside `deepspeed.zero.Init`, e.g. `from_pretrained`
with a stage-3 config, or after `deepspeed.initialize`), each parameter's `data` is an empty
placeholder between uses and the full values are gathered around each module's forward. `patch`
needs the values (the numerical probe runs the original forward) and the shapes (a norm's width,
a Linear's 2-D weight), so it runs with the parameters it inspects gathered on every rank:
those of the norm-like modules for `targets="norms"` (small), every parameter for `"all"` (the
whole model at once, transiently: patch before partitioning where memory is short; GNSTrainer
patches in `__init__`, before `deepspeed.initialize`, unless the model was built under
`zero.Init`). Gathering is read-only (`modifier_rank=None`): the partitions are not written back.
Nothing else needs the values: the patched forward runs inside DeepSpeed's own gathering hooks,
and `unpatch` only restores instance attributes.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .detect import is_norm_like


def partitioned_parameters(parameters) -> list[nn.Parameter]:
    """The ZeRO-3 parameters among `parameters` whose values are not present on this rank now."""
    return [
        p
        for p in parameters
        if hasattr(p, "ds_id") and getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"
    ]


def patch_parameters(model: nn.Module, targets: str) -> list[nn.Parameter]:
    """The partitioned parameters that `patch(model, targets=targets)` inspects."""
    if targets == "all":
        return partitioned_parameters(model.parameters())
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if is_norm_like(module):
            seen.update((id(p), p) for p in module.parameters())
    return partitioned_parameters(seen.values())


@contextlib.contextmanager
def gathered(parameters: list[nn.Parameter]):
    """Full values of partitioned ZeRO-3 `parameters` on every rank inside the block (read-only)."""
    if not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield
