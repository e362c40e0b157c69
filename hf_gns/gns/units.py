"""The one place that turns collected statistics into units of the synchronized gradient.

What each process collects (`hf_gns.per_example_sq_norms`) is |c_i^local|², example i's
contribution to THIS process's `param.grad` from its backward pass. That contribution
already contains everything applied to the loss before `backward`: the division by the
number of accumulated micro-batches, HF's token normalization by `num_items_in_batch`
(and, with `average_tokens_across_devices`, the multiplication by the world size W that
makes the global token count the denominator), and the fp16 loss scale.

Two things happen after the backward and are applied here:

- data-parallel synchronization (DDP all-reduce, FSDP reduce-scatter) AVERAGES the
  processes' gradients: the synchronized `param.grad` is (1/W) Σ_ranks grad_rank, so the
  contribution of example i to it is c_i = c_i^local / W and |c_i|² = |c_i^local|² / W²
  (with `average_tokens_across_devices` the ×W in the loss and this ÷W cancel, which is
  exactly what HF intends: the gradient of Σ_tokens loss / N_global);
- fp16 loss scaling: the gradients read before `GradScaler.unscale_` carry the scale S,
  squared norms S². Both |c_i|² and |G_B|² are divided by S² (the GNS ratio does not
  change, but the two components, which are logged and averaged over steps whose scale
  differs, do).

The test `tests/test_gns_units.py` proves Σ_i c_i == `param.grad` for accumulation, DDP
averaging, `average_tokens_across_devices` on and off, and a loss scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class SyncedStatistics(NamedTuple):
    """Statistics in units of the final, synchronized, unscaled `param.grad`.

    Attributes:
        example_sq_norm_sum (`torch.Tensor`): Σ_i |c_i|² over every example of the step.
        batch_sq_norm (`torch.Tensor`): |G_B|² = |Σ_i c_i|².
        local_grad_sq_norm_mean (`torch.Tensor`, *optional*): mean over processes of |g_r|²,
            g_r a process's local gradient before averaging (the classic DDP small batch).
    """

    example_sq_norm_sum: torch.Tensor
    batch_sq_norm: torch.Tensor
    local_grad_sq_norm_mean: torch.Tensor | None = None


def to_synced_units(
    local_example_sq_norm_sum: torch.Tensor,
    batch_sq_norm: torch.Tensor,
    *,
    world_size: int,
    loss_scale: torch.Tensor | float | None = None,
    grad_average: bool = True,
    local_grad_sq_norm_sum: torch.Tensor | None = None,
) -> SyncedStatistics:
    """Convert one step's collected statistics to units of the synchronized, unscaled gradient.

    Args:
        local_example_sq_norm_sum (`torch.Tensor`): Σ over processes and examples of |c_i^local|²,
            the values of `hf_gns.per_example_sq_norms` summed (and all-reduced).
        batch_sq_norm (`torch.Tensor`): |G_B|² of the synchronized `param.grad`, as read (before
            unscaling under fp16).
        world_size (`int`): number of data-parallel processes whose gradients are synchronized.
        loss_scale (`torch.Tensor` or `float`, *optional*): the fp16 loss scale the gradients still
            carry, `None` (or 1) when they carry none (fp32/bf16, or already unscaled).
        grad_average (`bool`, *optional*, defaults to `True`): whether synchronization averages
            the processes' gradients (DDP, FSDP) rather than summing them.
        local_grad_sq_norm_sum (`torch.Tensor`, *optional*): Σ over processes of |g_r|², each
            process's local gradient before synchronization (for the classic DDP estimate).

    Returns:
        `SyncedStatistics`
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_process = 1.0 / world_size**2 if grad_average else 1.0
    # A local gradient g_r enters the average as g_r / W; in its own right it is the gradient
    # of that process's batch, so |g_r|² is averaged over processes without the 1/W².
    if loss_scale is None:
        unscale = 1.0
    elif isinstance(loss_scale, torch.Tensor):
        unscale = (1.0 / loss_scale.to(torch.float64) ** 2).to(batch_sq_norm.device)
    else:  # a Python number stays one: a host tensor copied to the device would sync
        unscale = 1.0 / float(loss_scale) ** 2
    local_mean = None
    if local_grad_sq_norm_sum is not None:
        local_mean = local_grad_sq_norm_sum * unscale / world_size
        if not grad_average:
            local_mean = local_mean * world_size**2  # sum-synchronized: g_r counts whole in the sum
    return SyncedStatistics(
        example_sq_norm_sum=_scaled(local_example_sq_norm_sum, per_process * unscale),
        batch_sq_norm=_scaled(batch_sq_norm, unscale),
        local_grad_sq_norm_mean=local_mean,
    )


def _scaled(value: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    # one process without loss scaling: no launch for a product with 1 (the trainer reads every step)
    if isinstance(factor, float) and factor == 1.0:
        return value
    return value * factor
