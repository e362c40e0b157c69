"""The one module that talks to other processes: the per-step all-reduce and the DDP hook.

Per optimizer step every process packs its statistics into one flat fp32 vector of a size
fixed for the run (batch size, token count, per-group Σ_i |c_i^local|², per-group shares of
|G_B|², optionally the local |g_r|² of the classic DDP estimate) and a single
`all_reduce(SUM)` gives the global values: per-example statistics of every rank count.

|G_B|² must be counted once. With replicated gradients (DDP, FSDP NO_SHARD) every rank
holds the whole synchronized gradient, so only rank 0 contributes it; with sharded
gradients (FSDP2 DTensors, FSDP1 flat-parameter shards) each rank contributes the squared
norm of its own shard and the sum is the full squared norm.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(vector: torch.Tensor) -> torch.Tensor:
    """Sum `vector` over all processes, in place; a no-op in a single process. Returns `vector`."""
    if world_size() > 1:
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return vector


@functools.lru_cache(maxsize=1)  # imports cost microseconds even when cached: once per process
def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _sq_norm(tensor: torch.Tensor) -> torch.Tensor:
    # vector_norm upcasts internally: no fp32 copy of a bf16 gradient (fp64 stays fp64 until the end).
    wide = tensor.dtype == torch.float64
    return torch.linalg.vector_norm(tensor, dtype=None if wide else torch.float32).float().square()


def _sq_norms(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """fp32 |t|² of each tensor as one (len(tensors),) tensor on `device`, fused: `torch._foreach_norm`
    groups them by device and dtype into a few multi-tensor launches (one `vector_norm` per tensor
    where it is unavailable)."""
    try:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    except (AttributeError, RuntimeError, TypeError):  # fp64 gradients, or torch without dtype=
        return torch.stack([_sq_norm(t).to(device) for t in tensors])
    try:
        return torch.stack(norms).square()
    except RuntimeError:  # gradients on several devices
        return torch.stack([n.to(device) for n in norms]).square()


def grad_sq_norm_shares(grads: Iterable[torch.Tensor | None], sharded: bool) -> torch.Tensor:
    """This process's share of |grad|² for each gradient, such that the shares sum to |grad|² over ranks.

    All squared norms are taken in one fused `torch._foreach_norm` (a few launches for any number
    of gradients, instead of one reduction each).

    Args:
        grads (`Iterable[torch.Tensor | None]`): synchronized gradients (`None` counts 0).
        sharded (`bool`): whether plain-tensor gradients are this rank's shard of a flat
            parameter (FSDP1) rather than a replica (DDP). DTensors are handled from their
            placements: sharded dimensions contribute local shards, replicated mesh dimensions
            are counted once.

    Returns:
        `torch.Tensor`: fp32, one value per gradient, on the gradients' device.
    """
    grads = list(grads)
    counted_here = sharded or rank() == 0
    # the trainer's every step: plain tensors (no None, no DTensor), counted here; told by exact type
    if grads and counted_here and all(type(g) is torch.Tensor for g in grads):
        return _sq_norms(grads, grads[0].device)
    dtensor = _dtensor_class()
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    # the common case (every gradient a plain tensor, counted here: one process, DDP rank 0, FSDP1)
    if (
        grads
        and counted_here
        and not any(g is None or (dtensor is not None and isinstance(g, dtensor)) for g in grads)
    ):
        return _sq_norms(grads, device)
    # (position, local tensor, 1 / number of replicas that hold the same values)
    measured: list[tuple[int, torch.Tensor, float]] = []
    for position, grad in enumerate(grads):
        if grad is None:
            continue
        if dtensor is not None and isinstance(grad, dtensor):
            replicas = 1
            for dim, placement in enumerate(grad.placements):
                if placement.is_replicate():
                    replicas *= grad.device_mesh.size(dim)
            measured.append((position, grad.to_local(), 1.0 / replicas))
        elif counted_here:
            measured.append((position, grad, 1.0))
    if not measured:
        return torch.zeros(len(grads), device=device)
    sq_norms = _sq_norms([local for _, local, _ in measured], device)
    if len(measured) == len(grads) and all(scale == 1.0 for _, _, scale in measured):
        return sq_norms  # the common case (DDP rank 0, FSDP): already in place
    shares = [torch.zeros((), device=device)] * len(grads)
    for i, (position, _, scale) in enumerate(measured):
        shares[position] = sq_norms[i] * scale
    return torch.stack(shares)


class LocalGradSqNormHook:
    """DDP communication hook: records the local |g_r|² of tracked parameters, then averages as usual.

    The classic DDP estimate of the GNS (small batch = one process's batch) needs each
    process's gradient BEFORE the averaging all-reduce; a communication hook is the one
    place that sees it. The hook adds Σ_p |g_r,p|² over the tracked parameters of each
    bucket to `value` (a device tensor, no sync) and then runs DDP's default averaging
    all-reduce, so training is unchanged.

    Args:
        tracked (`Iterable[nn.Parameter]`): the parameters whose local norms to record.
    """

    def __init__(self, tracked: Iterable[nn.Parameter]):
        self.tracked = {id(p) for p in tracked}
        self.value: torch.Tensor | None = None

    def hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        grads = [g for p, g in zip(bucket.parameters(), bucket.gradients()) if id(p) in self.tracked]
        if grads:
            part = torch.stack([_sq_norm(g) for g in grads]).sum()
            self.value = part if self.value is None else self.value + part
        return allreduce_hook(process_group, bucket)

    def take(self, device: torch.device) -> torch.Tensor:
        """The recorded Σ|g_r|² since the last `take` (0 if none), and reset."""
        value = torch.zeros((), device=device) if self.value is None else self.value.to(device)
        self.value = None
        return value

    def register(self, ddp_model: nn.Module) -> None:
        """Register on a `DistributedDataParallel` model (before its first backward)."""
        ddp_model.register_comm_hook(state=None, hook=self.hook)  # a method: DDP reads hook.__name__
