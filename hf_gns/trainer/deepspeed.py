"""DeepSpeed ZeRO (stages 1, 2 and 3) under Accelerate: |G_B|² without `param.grad`.

Under DeepSpeed, `accelerator.backward` runs the engine's backward AND, on the step's last
micro-batch, its step (clipping, the optimizer, zeroing the gradients); ZeRO partitions and
reduces the gradients inside the engine. When the Trainer then calls `_clip_grad_norm`, where
`GNSMixin` reads the step, `param.grad` holds nothing usable. The per-example squared norms are
not affected: they come out of the patched backward on every rank. What is missing is |G_B|²,
the squared norm of the synchronized gradient of the tracked parameters. It comes from two
sources, both exact and both independent of the ZeRO stage:

- **The tracked parameters (the norm layers by default): gradient sums carried in the step's
  all-reduce.** A tensor hook on each tracked parameter adds the gradient of every backward pass
  (this process's contribution, before DeepSpeed sees it) into an fp32 buffer. The buffers ride
  in the step's one all-reduce, after the statistics vector (2·D floats per LayerNorm, D per
  RMSNorm), and |G_B|² = |Σ_ranks g_r / W|² per parameter: DeepSpeed averages the W data-parallel
  gradients as DDP does. No DeepSpeed internals; the same numbers as DDP's `param.grad`.
- **Every layer (`gns_track="all"`, and the "all" group of calibration steps): DeepSpeed's own
  norm.** Carrying the whole gradient would double the step's communication, and per-parameter
  reads of ZeRO's partitions (`deepspeed.utils.safe_get_full_grad`) cost one collective per
  parameter. The engine's step computes the norm of the whole synchronized, unscaled gradient
  before clipping (`engine.get_global_grad_norm()`, what the Trainer logs as `grad_norm`): that
  is |G_B|² of every trainable parameter, so it serves when every trainable parameter is
  tracked (checked at setup; a one-line error otherwise). It gives the total only: with
  `gns_track="all"` the per-group GNS (`gns/type/...`) is not logged under DeepSpeed.

Units: DeepSpeed's fp16 loss scale S multiplies both the per-example norms and the hooked
gradients (S², read at the step's first micro-batch, before the engine's step may change it);
the engine's norm is unscaled and is multiplied by S² here, so that `to_synced_units` divides
every |G_B|² by S² alike.

Batch control: the number of micro-batches per optimizer step may change at any step: each
micro-batch but the last runs with Accelerate's `sync_gradients` off, which makes
`DeepSpeedEngineWrapper.backward` call `engine.set_gradient_accumulation_boundary(False)` and
skip the engine's step (`accumulation_boundary`).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from .. import distributed
from ..gns.groups import clean_name
from ..patching import per_example_sq_norms
from ..patching.stats import IncompleteStatisticsError

logger = logging.getLogger(__name__)

# Refusals, one line each (the `ValueError` message names what to use instead).
ALL_LAYERS_NEED_FULL_COVERAGE = (
    "hf_gns under DeepSpeed measures the all-layer |G_B|^2 (gns_track='all', gns_calibrate_every) from the "
    "engine's global gradient norm, which covers every trainable parameter, but {n} trainable parameters are "
    "not tracked (e.g. {names}); use gns_track='norms' with gns_calibrate_every=0, or DDP/FSDP"
)
DDP_ESTIMATE_UNSUPPORTED = (
    "gns_log_ddp_estimate needs DDP (it reads each process's gradient before the all-reduce); "
    "under DeepSpeed set gns_log_ddp_estimate=False"
)


def is_deepspeed_engine(model: nn.Module) -> bool:
    """Whether `model` is a `deepspeed.DeepSpeedEngine` (told by name: no deepspeed import)."""
    return type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "get_global_grad_norm")


@contextlib.contextmanager
def accumulation_boundary(accelerator, last: bool):
    """Run one micro-batch of a step of several: the engine's step only after the `last` one.

    Accelerate tells DeepSpeed the accumulation boundary from `gradient_state.sync_gradients`
    (`DeepSpeedEngineWrapper.backward`); the Trainer sets it once per loop item, and a
    `MicroBatches` item of batch control holds the whole step.
    """
    state = accelerator.gradient_state
    saved = state.sync_gradients
    state._set_sync_gradients(last)
    try:
        yield
    finally:
        state._set_sync_gradients(saved)


class ZeroGradSums:
    """Per-step gradient sums of the tracked parameters, and DeepSpeed's all-layer norm.

    Owned by `GNSMixin` (`_gns_zero`) under DeepSpeed; see the module docstring.

    Args:
        trainer: the `GNSMixin` trainer (its tracked names, groups and calibration layout).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        options = trainer._gns_options
        self.all_layers_tracked = options.gns_track == "all"  # |G_B|² of the total from the engine's norm
        self.calibrating_all = bool(trainer._gns_calibrate_every)
        if options.gns_log_ddp_estimate:
            raise ValueError(DDP_ESTIMATE_UNSUPPORTED)
        if self.all_layers_tracked or self.calibrating_all:
            measured = trainer._gns_calibration_names if self.calibrating_all else trainer._gns_tracked_names
            _check_full_coverage(trainer.model, set(measured))
        self.loss_scale = 1.0
        self._hooked: list[int] = []  # ids of the parameters whose hooks feed the buffers
        self._handles: list = []
        self._sums: list[torch.Tensor | None] = []  # fp32, one per tracked parameter (None: no grad yet)
        self._widths: list[int] = []

    # ---- per step ----

    def begin_step(self, model: nn.Module) -> None:
        """At a step's first micro-batch: hooks on the (wrapped) tracked parameters, the loss scale."""
        self.loss_scale = _engine_loss_scale(model)
        if self.all_layers_tracked:
            return
        _, params = self.trainer._gns_tracked_parameters(model)
        if [id(p) for p in params] != self._hooked:
            self._register(params)

    def _register(self, params: list[nn.Parameter]) -> None:
        for handle in self._handles:
            handle.remove()
        self._hooked = [id(p) for p in params]
        self._sums = [None] * len(params)
        # ZeRO-3 partitions keep the full shape in `ds_shape` (the local data may be empty).
        self._widths = [math.prod(getattr(p, "ds_shape", p.shape)) for p in params]
        self._handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _make_hook(self, index: int):
        def add_grad(grad: torch.Tensor) -> None:
            flat = grad.detach().reshape(-1).float()
            current = self._sums[index]
            self._sums[index] = flat.clone() if current is None else current.add_(flat)

        return add_grad

    def local_grad_sums(self, device: torch.device) -> torch.Tensor:
        """This process's gradient sums of the step, flat fp32 (zeros where none), then reset."""
        if self.all_layers_tracked or not self._widths:
            return torch.zeros(0, device=device)
        parts = [
            torch.zeros(width, device=device) if s is None else s.to(device)
            for s, width in zip(self._sums, self._widths)
        ]
        self._sums = [None] * len(self._widths)
        return torch.cat(parts)

    def global_grad_sq_norm(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """The engine's |G|² of every trainable parameter in the units of the collected statistics
        (× S², see the module docstring); NaN when the engine has none (overflow, or disabled)."""
        norm = model.get_global_grad_norm() if is_deepspeed_engine(model) else None
        if norm is None:
            return torch.full((), float("nan"), device=device)
        norm = torch.as_tensor(norm, dtype=torch.float32).to(device)
        return norm.square() * (self.loss_scale**2)

    def all_reduce(self, vector: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """`distributed.all_reduce_sum(vector)` with this step's gradient sums appended to the same
        collective; returns the reduced vector with its |G_B|² entries filled in (the layout of
        `GNSMixin._gns_local_statistics`: [B, tokens, Σ|c|² per group, |G_B|² per group,
        (calibration: Σ|c|² all, norms, |G_B|² all, norms), ...])."""
        trainer = self.trainer
        device = vector.device
        self.flag_bypassed(model, vector)
        sums = self.local_grad_sums(device)
        n = vector.numel()
        reduced = distributed.all_reduce_sum(torch.cat([vector, sums]))
        vector, sums = reduced[:n], reduced[n:]
        n_groups = len(trainer._gns_group_names)
        batch = slice(2 + n_groups, 2 + 2 * n_groups)
        world = distributed.world_size()
        if self.all_layers_tracked or self.calibrating_all:
            everything = self.global_grad_sq_norm(model, device)
        if self.all_layers_tracked:
            # the total only (groups are off under DeepSpeed); a dropped parameter would make the engine's
            # norm cover more than the per-example sums: no estimate then
            dropped = trainer._gns_dropped.to(device).sum() > 0
            vector[batch] = torch.where(dropped, torch.full_like(everything, float("nan")), everything)
            return vector
        # |G_B|² per tracked parameter, in the units of the collected (unsynchronized) values: the
        # synchronized gradient is Σ_r g_r / W, and `to_synced_units` leaves |G_B|² as given.
        per_parameter = torch.stack([part.square().sum() for part in torch.split(sums, self._widths)]) / (
            world**2
        )
        vector[batch] = trainer._gns_kept_membership().to(device) @ per_parameter
        if self.calibrating_all:
            at = 2 + 2 * n_groups + 2  # calibration |G_B|² of (all, norms)
            if trainer._gns_calibrating:
                vector[at] = everything
                vector[at + 1] = per_parameter.sum()
        return vector

    def flag_bypassed(self, model: nn.Module, vector: torch.Tensor) -> list[str]:
        """The guard's "got a gradient but no per-example value" check, which reads `param.grad`
        (cleared by DeepSpeed's step by now): here from the hooks. Such a parameter's gradient did not
        pass through its patched forward (rebound after `patch`, or the weight used outside its
        module). `gns_incomplete="error"` raises; `"warn"` sets its flag in `vector` (the last entries,
        one per tracked parameter), so that the step is skipped and the parameter dropped, as for DDP.
        Returns the names flagged."""
        trainer = self.trainer
        fired = [i for i, s in enumerate(self._sums) if s is not None]
        if not fired:
            return []
        names, _ = trainer._gns_tracked_parameters(model)
        values = per_example_sq_norms(model)  # host-side shapes of what was collected
        bypassed = [
            i
            for i in fired
            if values.get(names[i]) is not None
            and values[names[i]].shape[0] == 0
            and clean_name(names[i]) not in trainer._gns_dropped_here
        ]
        if not bypassed:
            return []
        flagged = [names[i] for i in bypassed]
        message = (
            f"hf_gns: {len(flagged)} tracked parameters got a gradient this step but no per-example value "
            f"(e.g. {', '.join(flagged[:3])}): their gradient did not pass through the patched forward "
            "(replaced after hf_gns.patch, or the weight used outside its module)"
        )
        if trainer._gns_options.gns_incomplete == "error":
            raise IncompleteStatisticsError(message + "; no GNS is computed from them")
        logger.warning("%s; dropped from the GNS for the rest of the run", message)
        trainer._gns_dropped_here |= {clean_name(n) for n in flagged}
        n_params = len(names)
        for i in bypassed:
            vector[vector.numel() - n_params + i] = 1.0
        return flagged

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._hooked = [], []


def _engine_loss_scale(model: nn.Module) -> float:
    """DeepSpeed's current fp16 loss scale (1 under bf16/fp32): what this step's backward passes use."""
    optimizer = getattr(model, "optimizer", None) if is_deepspeed_engine(model) else None
    scale = getattr(optimizer, "loss_scale", None)
    if scale is None:
        return 1.0
    return float(scale)


def _check_full_coverage(model: nn.Module, measured: set[str]) -> None:
    missing = [n for n, p in model.named_parameters() if p.requires_grad and clean_name(n) not in measured]
    if missing:
        raise ValueError(ALL_LAYERS_NEED_FULL_COVERAGE.format(n=len(missing), names=", ".join(missing[:3])))
