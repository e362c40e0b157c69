"""Reading and clearing the per-example squared norms collected by patched norm modules.

Units: each value is |c_b|², the squared L2 norm of example b's contribution c_b to
`param.grad` from one backward pass (Σ_b c_b is what that pass added to `param.grad`),
so loss scaling and the loss's reduction are already inside. Turning these into GNS
statistics (B·c_b, accumulation, DDP averaging, fp16 loss scale) is the estimator's job
(DESIGN.md section 2), not this module's.
"""

from __future__ import annotations

import torch
from torch import nn

from .forward import PATCH_ATTRIBUTE, NormPatch, norm_bias
from .layer_state import LayerPatch
from .layers import layer_states


def _patched_modules(model: nn.Module) -> list[tuple[nn.Module, NormPatch | LayerPatch]]:
    found = [(m, m.__dict__[PATCH_ATTRIBUTE]) for m in model.modules() if PATCH_ATTRIBUTE in m.__dict__]
    found += layer_states(model)
    if not found:
        raise ValueError(
            "no patched norm module in this model: call hf_gns.patch(model) first (and check its report)"
        )
    return found


def _reported_parameters(module: nn.Module, state: NormPatch | LayerPatch) -> tuple[torch.Tensor | None, ...]:
    """The parameter behind each column of the module's (B, 2) squared norms."""
    if isinstance(state, LayerPatch):
        return state.reported_parameters(module)
    return module.weight, norm_bias(module)


def per_example_sq_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-example squared gradient norms of every tracked parameter (norms; with `targets="all"`
    also Linear, Conv1D and Embedding weights and biases).

    Args:
        model (`nn.Module`): a model patched by `hf_gns.patch` (or a wrapper around it).

    Returns:
        `dict[str, torch.Tensor]`: for each norm parameter that requires grad, keyed by its
        name in `model.named_parameters()`, a 1-D fp32 tensor on the parameter's device with
        one value per example seen in backward passes since the last `zero_stats`:
        micro-batches concatenated in the order of their backward passes. Empty (0,)
        tensors before the first backward. No host-device sync.

    Example:
    ```python
    >>> for micro_batch in micro_batches:
    ...     model(**micro_batch).loss.backward()
    >>> norms = hf_gns.per_example_sq_norms(model)  # {"model.norm.weight": (B_total,), ...}
    >>> hf_gns.zero_stats(model)
    ```
    """
    names = {id(param): name for name, param in model.named_parameters()}
    result: dict[str, torch.Tensor] = {}
    for module, state in _patched_modules(model):
        if isinstance(state, LayerPatch) and not state.enabled:
            continue  # switched off by set_layer_tracking: not collected this step
        collected = state.sinks.collected
        for column, param in enumerate(_reported_parameters(module, state)):
            if param is None or not param.requires_grad or id(param) not in names:
                continue
            if collected:
                values = torch.cat([sq_norms[:, column] for sq_norms in collected])
            else:
                values = torch.zeros(0, dtype=torch.float32, device=param.device)
            result[names[id(param)]] = values
    return result


def zero_stats(model: nn.Module) -> None:
    """Forget the per-example squared norms collected so far (call once per optimizer step)."""
    for _module, state in _patched_modules(model):
        state.sinks.clear()
