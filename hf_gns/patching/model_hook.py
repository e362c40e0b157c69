"""The one forward pre-hook `patch` puts on the model: batch size and sinks, before each forward.

Batch size. `fused_norm` takes dim 0 of its input as the example dim. That holds for
(B, T, D) and (B, T, H, Dh) inputs, but some models flatten tokens before a norm: OPT's
decoder layers call `final_layer_norm` on `hidden_states.reshape(-1, D)`, a (B·T, D)
input whose dim 0 indexes tokens. Per-token squared norms cannot be summed into
per-example ones (|Σ_t a_t|² ≠ Σ_t |a_t|²), so such inputs are regrouped to (B, T, D)
before the op. The hook records B from `input_ids` / `inputs_embeds` (or the first tensor
argument) and keeps it until the next forward, so that the recomputation of reentrant
activation checkpointing, which runs during backward, still sees it. Only 2-D inputs
whose row count is a multiple of B other than B itself are regrouped; flattening is
batch-major (`reshape(-1, D)` of (B, T, D)), so example b owns rows b·T … (b+1)·T − 1.

Sinks. Every patched norm needs a (B, 2) sink leaf per forward (see `sinks.py`), and
torch.compile cannot create leaves inside a graph. The hook makes the missing ones
before the model's forward, in one `torch.compiler.disable`d call: under torch.compile
the only graph break is then at the very top of the first step (and of the first step
after B changes); Dynamo recompiles once the sinks exist and steady-state steps run as
one graph. Norms whose input does not have B rows make their own sink on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .sinks import new_sink_for

if TYPE_CHECKING:
    from .forward import NormPatch

HOOK_ATTRIBUTE = "_hf_gns_model_hook"
# Set on the object given to `patch` even when nothing was patched, so that the statistics
# functions can tell "patched, nothing found" from "never patched".
PATCHED_MARK = "_hf_gns_patched"
_BATCH_KWARGS = ("input_ids", "inputs_embeds")
_GENERATION = [0]


def patch_generation() -> int:
    """A counter that `patch` and `unpatch` bump: caches of what a model tracks compare it."""
    return _GENERATION[0]


def bump_patch_generation() -> None:
    _GENERATION[0] += 1


@torch.compiler.disable
def _make_sinks(norms: list[tuple[nn.Module, NormPatch]], n_examples: int) -> None:
    for module, state in norms:
        state.sinks.spare = new_sink_for(state.sinks, n_examples, module.weight.device)


class ModelForwardHook:
    """State of the model-level pre-hook, shared by the model's patched norms.

    Attributes:
        batch_size (`int`, *optional*): B of the current (or last) forward.
        norms (`list[tuple[nn.Module, NormPatch]]`): the patched norm modules of this model.
    """

    def __init__(self):
        self.batch_size: int | None = None
        self.norms: list[tuple[nn.Module, NormPatch]] = []

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (`with_kwargs=True`)."""
        candidates = [kwargs.get(key) for key in _BATCH_KWARGS] + list(args)
        batch = next((v for v in candidates if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
        if batch is None:
            return
        self.batch_size = n_examples = batch.shape[0]
        if not torch.is_grad_enabled():
            return
        missing = [
            (module, state)
            for module, state in self.norms
            if state.tracks_gradients(module) and not state.sinks.has_spare(n_examples, module.weight.device)
        ]
        if missing:
            _make_sinks(missing, n_examples)

    def group_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as (B, rows, D) if it is a flattened (B·rows, D) input, else `x` itself."""
        n_examples = self.batch_size
        if x.dim() != 2 or n_examples is None or x.shape[0] == n_examples or x.shape[0] % n_examples:
            return x
        return x.reshape(n_examples, x.shape[0] // n_examples, x.shape[1])


def attach_model_hook(model: nn.Module) -> ModelForwardHook:
    """The pre-hook state of `model`, registering the hook on the first call."""
    existing = model.__dict__.get(HOOK_ATTRIBUTE)
    if existing is not None:
        return existing[0]
    hook = ModelForwardHook()
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(model, HOOK_ATTRIBUTE, (hook, handle))
    return hook


def detach_model_hooks(model: nn.Module) -> None:
    """Remove every pre-hook `attach_model_hook` put on `model` or its submodules (and the patch marks)."""
    for module in model.modules():
        module.__dict__.pop(PATCHED_MARK, None)
        entry = module.__dict__.get(HOOK_ATTRIBUTE)
        if entry is not None:
            entry[1].remove()
            delattr(module, HOOK_ATTRIBUTE)
