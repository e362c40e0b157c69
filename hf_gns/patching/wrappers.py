"""Wrapped models: which wrappers `patch` sees through and which it refuses.

Seen through, because the norm modules inside are ordinary modules called by the wrapper:
- DistributedDataParallel: its `.module` is walked like any child; names keep the
  `module.` prefix, as in `ddp.named_parameters()`. The parameters are not touched, so
  DDP's gradient hooks are unaffected.
- PEFT `PeftModel`: walked as is (names start with `base_model.model.`). Under LoRA the
  norm weights are frozen: the norms are patched (the fused op is also faster) but nothing
  is tracked, and the report says so. Norms listed in `modules_to_save` are trainable
  copies and are tracked.

Refused, with what to do instead:
- torch.compile'd models (`OptimizedModule`, or `module.compile()`): the compiled graph
  was traced from the old forwards.
- FSDP (FullyShardedDataParallel or `fully_shard`): parameters are flattened / sharded
  DTensors, and the wrapper may be re-created per call.
- nn.DataParallel: its per-call replicas share the instance `forward` bound to the
  original module.
"""

from __future__ import annotations

import torch
from torch import nn


def _fsdp_classes() -> tuple[type, ...]:
    if not torch.distributed.is_available():
        return ()
    import torch.distributed.fsdp as fsdp

    return tuple(
        cls
        for cls in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None))
        if cls
    )


def check_patchable(model: nn.Module) -> None:
    """Raise a `TypeError` saying what to do if `model` is wrapped in a way `patch` cannot handle."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"hf_gns.patch expects a torch.nn.Module, got {type(model).__name__}")
    fsdp_classes = _fsdp_classes()
    for name, module in model.named_modules():
        where = f"module {name!r}" if name else "the model"
        if isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            raise TypeError(
                f"hf_gns.patch: {where} is torch.compile'd: "
                "call hf_gns.patch(model) before torch.compile(model)"
            )
        if getattr(module, "_compiled_call_impl", None) is not None:
            raise TypeError(
                f"hf_gns.patch: {where} was compiled in place with .compile(): "
                "call hf_gns.patch(model) before model.compile()"
            )
        if fsdp_classes and isinstance(module, fsdp_classes):
            raise TypeError(
                f"hf_gns.patch: {where} is wrapped by FSDP: call hf_gns.patch(model) before wrapping the "
                "model with FullyShardedDataParallel / fully_shard (or before accelerator.prepare)"
            )
        if isinstance(module, nn.DataParallel):
            raise TypeError(
                f"hf_gns.patch: {where} is nn.DataParallel, whose replicas cannot carry per-instance "
                "patches: use DistributedDataParallel (patch before or after wrapping)"
            )
