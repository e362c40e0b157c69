"""`GNSMixin`: the online gradient noise scale as a mixin for any `transformers.Trainer` subclass.

`class SFTTrainerWithGNS(hf_gns.GNSMixin, trl.SFTTrainer)` measures the GNS of whatever the
trainer trains. The mixin overrides only Trainer methods that it extends and calls `super()`
in each (`__init__`, `train`, `training_step`, `_clip_grad_norm`, `_get_grad_norm`, `log`,
`_save_checkpoint`), so it composes with trainers that override them too (TRL's do).

What is measured: the parameters that train. `hf_gns.patch` tracks the norm layers
(`gns_track="norms"`), or also every Linear/Conv1D/Embedding (`"all"`), in both cases only
modules whose parameters require grad. A PEFT model (LoRA, ...) is measured as with `"all"`:
its trainable parameters are the adapters (and the norms when they train).

Per optimizer step, once the step's last backward is queued and BEFORE clipping (at the end of
`training_step` on the micro-batch where `accelerator.sync_gradients` is set, so that its host work
overlaps the device's backward instead of following the Trainer's per-micro-batch sync; under
DeepSpeed in `_clip_grad_norm` / `_get_grad_norm`, which are also the fallback; never in
`on_pre_optimizer_step`, which only sees clipped gradients), `_read_gns_statistics` runs, in
this order (each a method, to override or extend):

1. `_gns_check_statistics(model)`: the guard (`hf_gns.patching.check_step_statistics`): every
   tracked parameter that got a gradient has one per-example value per example of this
   process's step; `gns_incomplete="error"` raises naming the module, `"warn"` flags it;
2. `_gns_local_statistics(model, incomplete)`: this process's statistics as one flat vector
   [B, tokens, Σ|c^local|² per group, |G_B|² share per group, (calibration: 4 values),
   local |g_r|² (`gns_ddp`), incomplete flag per tracked parameter (`gns_incomplete="warn"` only)], from
   `hf_gns.patching.example_sq_norm_sums` and `distributed.grad_sq_norm_shares` (fused reads);
3. `distributed.all_reduce_sum`: the one collective of the step;
4. `_gns_update_estimators(vector)`: drops the parameters that any process flagged (for the
   rest of the run; that step is skipped: no GNS from incomplete statistics), converts to
   synchronized-gradient units (`gns.units.to_synced_units`: DDP averaging, fp16 loss scale),
   updates the estimators (`gns.estimator.GNSEstimator`, the calibration) and the counters;
5. `hf_gns.zero_stats`.

The model is (re)patched at the start of the training loop (`_inner_training_loop`), after the
Trainer applied Liger (`use_liger_kernel`, inside `Trainer.train` in transformers 5.17/5.24),
which rebinds norm forwards: `hf_gns.patch` takes them over again.

Calibration (`gns_calibrate_every=N`, `hf_gns.gns.calibration`): the model is patched with
`targets="all"` but its Linear/Conv1D/Embedding reductions are switched off
(`set_layer_tracking`) except on steps 0, N, 2N, ..., where the step's first micro-batch
switches them on. The vector then also carries Σ|c^local|² and |G_B|² shares of the groups
(all, norms) (zeros on the other steps: the vector's size stays fixed), and the calibration
EMAs are updated from them. Everything else (the estimator, `gns`, the groups) stays on the
norm layers.

Everything stays on the device: the host syncs only when logging, when `current_gns()` or
`tokens_seen` is read, and for the progress bar at logging steps. The per-step read is about
forty small launches and ~0.2 ms of host time for GPT-2's 25 norms
(`benchmarks/bench_trainer_host.py` counts it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import nn
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import distributed
from ..gns.calibration import GNSCalibration
from ..gns.estimator import GNSEstimator, per_example_statistic
from ..gns.groups import clean_name, membership_matrix, parameter_groups
from ..gns.units import to_synced_units
from ..patching import (
    check_step_statistics,
    example_sq_norm_sums,
    patch,
    per_example_sq_norms,
    prepare_sinks,
    set_layer_tracking,
    untracked_among,
    zero_stats,
)
from ..patching.compiled_breaks import ROUTED_EXPERTS, modules_breaking_compiled_graphs
from ..patching.model_hook import patch_generation
from ..patching.stats import IncompleteStatistics, IncompleteStatisticsError
from .arguments import calibration_settings, gns_options
from .checkpoint import CheckpointStateRegistry
from .counting import count_batch
from .deepspeed import ZeroGradSums
from .resume import load_checkpoint_states, really_missing_keys

logger = logging.getLogger(__name__)


class _StepCounters:
    """Device-side counters of the run: cumulative (examples, tokens) and the last step's, checkpointed."""

    def __init__(self):
        self.seen = torch.zeros(2, dtype=torch.int64)  # (examples, tokens) of every step so far
        self.last_batch = torch.zeros(2, dtype=torch.float64)  # (examples, tokens) of the last step

    @property
    def examples_seen(self) -> torch.Tensor:
        return self.seen[0]

    @examples_seen.setter
    def examples_seen(self, value: torch.Tensor | int) -> None:
        self._set(0, value)

    @property
    def tokens_seen(self) -> torch.Tensor:
        return self.seen[1]

    @tokens_seen.setter
    def tokens_seen(self, value: torch.Tensor | int) -> None:
        self._set(1, value)

    def _set(self, index: int, value: torch.Tensor | int) -> None:
        seen = self.seen.clone()
        seen[index] = torch.as_tensor(value, dtype=torch.int64)
        self.seen = seen

    def add_step(self, batch: torch.Tensor) -> None:
        """Count a step of `batch` = (examples, tokens), float64 on the counters' device (3 launches)."""
        self.last_batch = batch
        self.seen = self.seen + batch.round().to(torch.int64)

    def to(self, device: torch.device) -> None:
        self.seen = self.seen.to(device)
        self.last_batch = self.last_batch.to(device)

    def state_dict(self) -> dict:
        return {
            "tokens_seen": self.tokens_seen.cpu().clone(),
            "examples_seen": self.examples_seen.cpu().clone(),
            "last_batch": self.last_batch.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        device = self.seen.device
        seen = torch.stack([state["examples_seen"], state["tokens_seen"]]).to(torch.int64).reshape(2)
        self.seen = seen.to(device)
        self.last_batch = state["last_batch"].to(device=device, dtype=torch.float64)


class GNSMixin:
    """Trainer mixin that measures the gradient noise scale (GNS) online, for free.

    Patches the model's normalization layers (or all supported layers, `gns_track="all"`) with
    `hf_gns.patch` so that the backward pass also yields per-example gradient norms, and logs
    through the Trainer's ordinary logging (so `trainer_state.json`, TensorBoard, W&B get it):
    `gns` (examples), `gns_tokens`, `gns_sq_norm`, `gns_trace_cov`, `gns/<group>`,
    `gns_skipped_steps`, `batch_size`, `batch_tokens`, `tokens_seen` and, when enabled, `gns_ddp`.
    Logged values are the state at the logging step (the GNS is already an EMA; batch values
    are the last optimizer step's). The estimator state, counters and every state registered
    with `register_checkpoint_state` are saved in each checkpoint (`hf_gns_state.pt`) and
    restored by `train(resume_from_checkpoint=...)`.

    Options come from the `gns_*` fields of the trainer's arguments (`GNSTrainingArguments`, or
    any config class made with `hf_gns.gns_config`); arguments without them get the defaults.
    List it first: `class T(GNSMixin, SomeTrainer)`. It provides the measurement interface that
    `BatchSizeControlMixin` reads (`tokens_seen`, `current_gns()`, `register_checkpoint_state`).

    Example:
    ```python
    >>> class SFTTrainerWithGNS(hf_gns.GNSMixin, trl.SFTTrainer):
    ...     pass
    >>> trainer = SFTTrainerWithGNS(model=model, args=hf_gns.gns_config(SFTConfig)("out"), train_dataset=data)
    >>> trainer.train()
    >>> trainer.current_gns()  # examples
    ```
    """

    def __init__(self, *args, **kwargs):
        # Arguments passed through untouched: trainers order them differently (DPOTrainer's second
        # positional argument is ref_model).
        super().__init__(*args, **kwargs)
        self._gns_options = gns_options(self.args)
        self._gns_counters = _StepCounters()
        self._gns_setup_tracking(self.model)
        # DeepSpeed: |G_B|² from gradient sums carried in the all-reduce (hf_gns/trainer/deepspeed.py)
        self._gns_zero = ZeroGradSums(self) if getattr(self, "is_deepspeed_enabled", False) else None
        self.register_checkpoint_state("gns_estimator", self.gns_estimator)
        self.register_checkpoint_state("gns_counters", self._gns_counters)
        if self.gns_ddp_estimator is not None:
            self.register_checkpoint_state("gns_ddp_estimator", self.gns_ddp_estimator)
        if self.gns_calibration.enabled:
            self.register_checkpoint_state("gns_calibration", self.gns_calibration)

    # ---- the measurement interface (see hf_gns.trainer.batching) ----

    def register_checkpoint_state(self, name: str, obj: object) -> None:
        """Save `obj.state_dict()` in every checkpoint and `obj.load_state_dict(...)` it on resume.

        Usable from any `__init__` of the MRO, before or after this mixin's own setup.

        Args:
            name (`str`): unique key in `hf_gns_state.pt`.
            obj: an object with `state_dict()` and `load_state_dict()`; its state must be the same
                on every process (process 0 writes it) and made of tensors, numbers, strings,
                lists and dicts (the file is loaded with `weights_only=True`).
        """
        self._gns_checkpoint_states().register(name, obj)

    def current_gns(self) -> float | None:
        """The GNS that batch control acts on, in examples (one sync): that of all tracked parameters
        (`gns`), or with calibration its calibrated value (`gns_calibrated`; `gns_controller_signal`).
        `None` while unknown (before the first step; calibrated: before a calibration step)."""
        gns = self.gns_estimator.gns_tensor()[0]
        if self._gns_controller_signal == "calibrated":
            gns = self.gns_calibration.calibrate(gns)
        value = gns.item()
        return None if math.isnan(value) else value

    @property
    def tokens_seen(self) -> int:
        """Global tokens (attention-mask ones, or all positions) of every optimizer step so far (one sync)."""
        return int(self._gns_counters.tokens_seen.item())

    @property
    def examples_seen(self) -> int:
        """Global examples (sequences, or documents) of every optimizer step so far (one sync)."""
        return int(self._gns_counters.examples_seen.item())

    # ---- setup ----

    def _gns_checkpoint_states(self) -> CheckpointStateRegistry:
        registry = self.__dict__.get("_gns_registry")
        if registry is None:
            registry = self.__dict__["_gns_registry"] = CheckpointStateRegistry()
        return registry

    def _gns_patch(self, model: nn.Module) -> None:
        all_layers = self._gns_options.gns_track == "all" or self._gns_calibrate_every
        patch(model, strict=self._gns_options.gns_patch_strict, targets="all" if all_layers else "norms")

    def _gns_setup_tracking(self, model: nn.Module) -> None:
        if _is_peft_model(model) and self._gns_options.gns_track == "norms":
            # Under PEFT the adapters train, and they are Linear layers: patch them (and the norms
            # when they train; patch() only tracks parameters that require grad).
            logger.info("hf_gns: PEFT model: measuring the GNS of its trainable parameters (targets='all')")
            self._gns_options.gns_track = "all"
        every, self._gns_controller_signal = calibration_settings(
            self._gns_options, getattr(self.args, "batch_size_policy", None)
        )
        self._gns_calibrate_every = every
        self._gns_patch(model)
        self.gns_calibration = GNSCalibration(
            every,
            ema_decay=self._gns_options.gns_ema_decay,
            dense_examples=self._gns_options.gns_calibrate_dense_examples,
        )
        self._gns_calibrating = False  # whether this step's layer reductions are on
        if every:
            self._gns_setup_calibration(model)
        raw_names = list(per_example_sq_norms(model))  # with calibration: the norm layers only
        if not raw_names:
            raise ValueError(
                f"{type(self).__name__} found no tracked parameter: no patched module has a parameter that "
                f"requires grad (gns_track={self._gns_options.gns_track!r}; frozen norms: use "
                "gns_track='all'). Check print(hf_gns.patch(model))."
            )
        groupings = self._gns_options.gns_groups
        if getattr(self, "is_deepspeed_enabled", False) and self._gns_options.gns_track == "all":
            groupings = []  # the total only: DeepSpeed's global norm (hf_gns/trainer/deepspeed.py)
        groups = parameter_groups(model, raw_names, groupings)
        # Canonical names without wrapper tokens: the same before and after DDP/FSDP/compile wrapping.
        self._gns_tracked_names = [clean_name(n) for n in raw_names]
        self._gns_membership = membership_matrix(groups, raw_names)
        self._gns_group_names = list(groups)
        decay = self._gns_options.gns_ema_decay
        self.gns_estimator = GNSEstimator(self._gns_group_names, ema_decay=decay)
        want_ddp = self._gns_options.gns_log_ddp_estimate and self.args.world_size > 1
        self.gns_ddp_estimator = GNSEstimator(["total"], ema_decay=decay) if want_ddp else None
        self._gns_ddp_hook: distributed.LocalGradSqNormHook | None = None
        self._gns_pending = False
        self._gns_step_examples = 0
        self._gns_step_tokens: torch.Tensor | int = 0
        self._gns_device: torch.device | None = None
        self._gns_last_statistics = None
        # (host numbers, device, their device copy) of the last step
        self._gns_from_host: tuple[list[float], torch.device, torch.Tensor] | None = None
        # (wrapped model, its names of the tracked parameters, the parameters), looked up once per wrapper
        self._gns_tracked_cache: tuple[nn.Module, list[str], list[nn.Parameter]] | None = None
        # (wrapped model, number of dropped parameters, the parameters the guard checks)
        self._gns_checked: tuple[nn.Module, int, int, list[nn.Parameter]] | None = None
        self._gns_compiled_cache: tuple[nn.Module, bool] | None = None  # (wrapped model, compiled?)
        self._gns_in_container = False  # inside BatchSizeControlMixin's micro-batches of one step
        # 1.0 for a tracked parameter dropped from the estimate (gns_incomplete="warn"), on the device
        self._gns_dropped = torch.zeros(len(raw_names))
        self._gns_dropped_here: set[str] = set()  # dropped after this process's guard flagged them
        self._gns_lost: list[int] = []  # tracked indices that `patch` untracked since setup (outside use)
        self._gns_calibration_lost = None  # (model, patch generation, untracked calibration indices)
        self._gns_lost_plan: _SkipPlan | None = None  # what to read of the tracked names when some are lost
        self._gns_calibration_skip: _SkipPlan | None = None  # the same for the calibration's names

    def _gns_setup_calibration(self, model: nn.Module) -> None:
        """Names and (all, norms) membership of every parameter measured on calibration steps."""
        set_layer_tracking(model, True)
        all_names = list(per_example_sq_norms(model))
        set_layer_tracking(model, False)
        norm_names = set(per_example_sq_norms(model))
        self._gns_calibration_names = [clean_name(n) for n in all_names]
        self._gns_calibration_membership = torch.stack(
            [torch.ones(len(all_names)), torch.tensor([float(n in norm_names) for n in all_names])]
        )  # (2, n_all): rows "all", "norms"
        self._gns_calibration_cache: tuple[nn.Module, list[str], list[nn.Parameter]] | None = None

    def _gns_maybe_register_ddp_hook(self, model: nn.Module) -> None:
        if self.gns_ddp_estimator is None or self._gns_ddp_hook is not None:
            return
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "gns_log_ddp_estimate needs DistributedDataParallel (the classic estimate reads each "
                "process's gradient before the all-reduce), but the model is wrapped as "
                f"{type(model).__name__}; set gns_log_ddp_estimate=False"
            )
        tracked = set(self._gns_tracked_names)
        params = [p for name, p in model.named_parameters() if clean_name(name) in tracked]
        self._gns_ddp_hook = distributed.LocalGradSqNormHook(params)
        self._gns_ddp_hook.register(model)

    # ---- training loop hooks ----

    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kw
    ):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if checkpoint is not None:  # refuses a missing/unreadable state unless gns_restart_statistics
            missing = load_checkpoint_states(self, checkpoint, self._gns_checkpoint_states().items())
            if missing:
                logger.warning("%s/hf_gns_state.pt has no state for %s", checkpoint, missing)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kw,
        )

    def _inner_training_loop(self, *args, **kwargs):
        # Here, not in train(): Trainer.train has by now built the model (model_init) and applied
        # Liger, which rebinds norm forwards; patch() takes over what is not ours (else a no-op).
        self._gns_patch(self.model)
        zero_stats(self.model)  # backward passes before training (or of a previous train()) don't count
        if self._gns_calibrate_every:  # layer reductions off until a calibration step
            set_layer_tracking(self.model, False)
            self._gns_calibrating = False
        return super()._inner_training_loop(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not isinstance(inputs, Mapping):
            # A container of micro-batches (BatchSizeControlMixin's loop item): each micro-batch comes
            # back through self.training_step as a mapping and is counted then; the step's statistics
            # are read once the last one's backward is queued.
            self._gns_in_container = True
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._gns_in_container = False
            self._gns_read_after_backward(model)
            return loss
        self._gns_maybe_register_ddp_hook(model)
        if not self._gns_pending and self._gns_calibrate_every:  # the step's first micro-batch
            calibrating = self.gns_calibration.is_calibration_step(self.state.global_step)
            if calibrating != self._gns_calibrating:
                set_layer_tracking(model, calibrating)
                self._gns_calibrating = calibrating
        if not self._gns_pending and self._gns_zero is not None:
            self._gns_zero.begin_step(model)
        count = count_batch(inputs)
        self._gns_step_examples += count.examples  # host int: shapes need no sync
        self._gns_step_tokens = self._gns_step_tokens + count.tokens
        self._gns_pending = True
        if self._gns_is_compiled(model):
            prepare_sinks(model, inputs)  # outside the compiled graph (eager: the model's pre-hook does it)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._gns_in_container and self.accelerator.sync_gradients:
            self._gns_read_after_backward(model)
        return loss

    def _gns_read_after_backward(self, model: nn.Module) -> None:
        """Read the step's statistics right after its last backward is queued, inside `training_step`.

        The Trainer syncs with the device after `training_step` (`logging_nan_inf_filter` reads the
        loss), so what it does next (clipping, the optimizer) starts on an idle device: the read
        queued here runs behind the backward instead, and its host time overlaps the device's. The
        gradients are complete in stream order (DDP and FSDP finish their reductions within the
        backward) and not yet clipped. Under DeepSpeed the engine steps inside the backward: the read
        stays in `_clip_grad_norm` / `_get_grad_norm`, which are no-ops once the step was read."""
        if not getattr(self, "is_deepspeed_enabled", False):
            self._read_gns_statistics(model)

    def _gns_is_compiled(self, model: nn.Module) -> bool:
        """Whether `model` (or a module it wraps) runs under torch.compile, where `prepare_sinks` must
        ready the sinks outside the graph. Looked up once per wrapper object."""
        cached = self._gns_compiled_cache
        if cached is not None and cached[0] is model:
            return cached[1]
        compiled = bool(getattr(self.args, "torch_compile", False)) or _is_compiled(model)
        self._gns_compiled_cache = (model, compiled)
        breaking = modules_breaking_compiled_graphs(model) if compiled else {}
        for why, names in breaking.items():  # exact, but not the one graph compiling is for: say so once
            logger.warning(
                "hf_gns: under torch.compile %d patched %s (%s) break the compiled graph at every call; "
                "the per-example norms stay exact.%s",
                len(names),
                why,
                ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""),
                " gns_track='norms' keeps the graph whole." if why == ROUTED_EXPERTS else "",
            )
        return compiled

    def _clip_grad_norm(self, model):
        self._read_gns_statistics(model)  # a no-op when training_step read this step
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._read_gns_statistics(model)  # a no-op when already read this step
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # ---- the per-step read ----

    @torch.no_grad()
    def _read_gns_statistics(self, model: nn.Module) -> None:
        """Fold this optimizer step's statistics into the estimators (see the module docstring).
        Host work and device launches only: no host-device sync."""
        if not self._gns_pending:
            return
        self._gns_pending = False
        incomplete = self._gns_check_statistics(model)
        vector = self._gns_local_statistics(model, incomplete)
        if self._gns_zero is not None:  # DeepSpeed: the same collective also carries gradient sums
            vector = self._gns_zero.all_reduce(vector, model)
        else:
            distributed.all_reduce_sum(vector)  # the one collective of the step
        if self._gns_calibrate_every:  # host ints: the first step's batch sets the dense start's length
            self.gns_calibration.observe_batch(self._gns_step_examples * distributed.world_size())
        self._gns_update_estimators(vector)
        self._gns_step_examples, self._gns_step_tokens = 0, 0
        zero_stats(model)

    def _gns_check_statistics(self, model: nn.Module) -> list[int]:
        """The guard: indices (into the tracked parameters) of those without exactly one per-example
        value per example of this process's step. Host-side shapes only (no sync). On calibration
        steps the extra layers are checked too, and an incomplete one always raises (the calibration
        has no per-parameter drop)."""
        names, params = self._gns_tracked_parameters(model)
        n_examples = self._gns_step_examples
        checked = self._gns_checked
        generation = patch_generation()
        lost: list[IncompleteStatistics] = []
        if checked is None or checked[:3] != (model, len(self._gns_dropped_here), generation):
            lost = self._gns_untracked_since_setup(model, names, params, n_examples)
            kept = [p for n, p in zip(names, params) if clean_name(n) not in self._gns_dropped_here]
            checked = self._gns_checked = (model, len(self._gns_dropped_here), generation, kept)
        incomplete = lost + check_step_statistics(
            model, n_examples, parameters=checked[3], on_incomplete=self._gns_options.gns_incomplete
        )
        if self._gns_calibrating:
            tracked = {id(p) for p in params}
            extra = [p for p in self._gns_calibration_parameters(model)[1] if id(p) not in tracked]
            check_step_statistics(model, n_examples, parameters=extra, on_incomplete="error")
        if not incomplete:
            return []
        flagged = {clean_name(item.parameter) for item in incomplete}
        for item in incomplete:  # logged once: a dropped parameter is not checked again
            logger.warning("hf_gns: dropped from the GNS for the rest of the run: %s", item)
        self._gns_dropped_here |= flagged
        return [i for i, n in enumerate(self._gns_tracked_names) if n in flagged]

    def _gns_untracked_since_setup(self, model, names, params, n_examples: int) -> list[IncompleteStatistics]:
        """Tracked parameters that `patch` stopped tracking after setup (the first training forward found
        the model using them outside their module's forward, `outside_use.py`), as the guard's verdicts:
        `gns_incomplete="error"` raises naming them, `"warn"` returns them for `_gns_check_statistics`
        to drop (their statistics are no longer read). Runs when the patch generation changes."""
        self._gns_lost = untracked_among(model, params)
        lost = [names[i] for i in self._gns_lost if clean_name(names[i]) not in self._gns_dropped_here]
        cause = (
            "hf_gns stopped tracking it on the first training forward: the model uses it outside its "
            "module's forward (the patch report lists it as untracked)"
        )
        items = [IncompleteStatistics(n, (n.rpartition(".")[0],), 0, n_examples, cause) for n in lost]
        if items and self._gns_options.gns_incomplete == "error":
            lines = "\n".join(f"  {item}" for item in items)
            raise IncompleteStatisticsError(
                f"hf_gns: {len(items)} tracked parameters lack exact per-example statistics this step; "
                f"no GNS is computed from them (gns_incomplete='warn' drops them instead):\n{lines}"
            )
        return items

    def _gns_example_sq_norm_sums(self, model: nn.Module, names: list[str], device) -> torch.Tensor:
        """`example_sq_norm_sums` of the tracked names, 0 for those `patch` untracked since setup."""
        self._gns_lost_plan = _skip_plan(self._gns_lost_plan, names, self._gns_lost, device)
        return _sums_skipping(model, names, self._gns_lost_plan, device)

    def _gns_local_statistics(self, model: nn.Module, incomplete: list[int]) -> torch.Tensor:
        """This process's statistics of the step, one flat fp32 vector of a size fixed for the run:
        [examples, tokens, Σ|c_i^local|² per group, |G_B|² share per group, (calibration: 4 values),
        local |g_r|², (`gns_incomplete="warn"`: a flag per tracked parameter, 1 when this process's
        guard found it incomplete)]. A dozen launches and no sync: the host's numbers (examples,
        tokens without attention mask, flags) reach the device in one non-blocking copy."""
        names, tracked = self._gns_tracked_parameters(model)
        device = tracked[0].device
        self._gns_move_to(device)
        example_sums = self._gns_example_sq_norm_sums(model, names, device)  # Σ_i |c_i|² per parameter
        grad_shares = self._gns_grad_sq_norm_shares(tracked, device)
        # (2, P) @ (P, groups): row 0 Σ|c^local|² and row 1 the |G_B|² share, per group
        per_group = torch.stack([example_sums, grad_shares]) @ self._gns_kept_membership().t()
        tokens = self._gns_step_tokens
        device_tokens = isinstance(tokens, torch.Tensor)  # attention-mask sums, summed where the mask is
        host = [float(self._gns_step_examples), 0.0 if device_tokens else float(tokens), 0.0]
        if self._gns_options.gns_incomplete == "warn":
            flags = [0.0] * len(names)
            for i in incomplete:
                flags[i] = 1.0
            host += flags
        cached = self._gns_from_host
        if cached is None or cached[0] != host or cached[1] != device:
            # a step like the last (same batch size, no new flag) reuses the last copy: read-only below
            cached = self._gns_from_host = (host, device, _host_to_device(host, device))
        from_host = cached[2]  # [examples, tokens, 0, flags...]
        if device_tokens:
            parts = [from_host[:1], tokens.to(device=device, dtype=torch.float32).reshape(1)]
        else:
            parts = [from_host[:2]]
        parts.append(per_group.view(-1))
        if self._gns_calibrate_every:
            parts.append(self._gns_calibration_statistics(model, device))
        hook = self._gns_ddp_hook
        parts.append(hook.take(device).reshape(1) if hook is not None else from_host[2:3])
        parts.append(from_host[3:])  # the flags (empty unless "warn")
        return torch.cat(parts)

    def _gns_kept_membership(self) -> torch.Tensor:
        """(groups, P) membership without the dropped parameters. `gns_incomplete="error"` never drops
        one (an incomplete step raises), so the matrix is the membership itself: no launch."""
        if self._gns_options.gns_incomplete == "error":
            return self._gns_membership
        return self._gns_membership * (1.0 - self._gns_dropped)

    def _gns_grad_sq_norm_shares(self, params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
        """This process's share of |G_B|² per parameter, from the synchronized `param.grad`; zeros under
        DeepSpeed, whose |G_B|² the all-reduce fills in (`ZeroGradSums.all_reduce`)."""
        if self._gns_zero is not None:
            return torch.zeros(len(params), device=device)
        grads = [param.grad for param in params]
        return distributed.grad_sq_norm_shares(grads, sharded=self._gns_grads_sharded()).to(device)

    def _gns_calibration_parameters(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        """Every parameter measured on calibration steps, with its name in the (wrapped) `model`."""
        cached = self._gns_calibration_cache
        if cached is None or cached[0] is not model:
            params = {clean_name(k): (k, p) for k, p in model.named_parameters()}
            pairs = [params[n] for n in self._gns_calibration_names]
            cached = self._gns_calibration_cache = (model, [k for k, _ in pairs], [p for _, p in pairs])
        return cached[1], cached[2]

    def _gns_calibration_untracked(self, model: nn.Module, params: list[nn.Parameter]) -> list[int]:
        """Calibration parameters `patch` untracked since setup (used outside their module's forward):
        left out of both sums of the calibration's "all" group, so it stays exact over what it
        measures. Looked up once per patch generation."""
        cached = self._gns_calibration_lost
        generation = patch_generation()
        if cached is None or cached[:2] != (model, generation):
            cached = self._gns_calibration_lost = (model, generation, untracked_among(model, params))
        return cached[2]

    def _gns_calibration_statistics(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """[Σ|c^local|² of (all, norms), |G_B|² share of (all, norms)] on a calibration step, else zeros."""
        if not self._gns_calibrating:
            return torch.zeros(4, device=device)
        names, params = self._gns_calibration_parameters(model)
        lost = self._gns_calibration_untracked(model, params)
        plan = self._gns_calibration_skip = _skip_plan(self._gns_calibration_skip, names, lost, device)
        example_sums = _sums_skipping(model, names, plan, device)
        grad_shares = self._gns_grad_sq_norm_shares(params, device)
        if plan is not None:
            grad_shares = grad_shares.index_fill(0, plan.skipped.to(device), 0.0)
        membership = self._gns_calibration_membership
        return torch.cat([membership @ example_sums, membership @ grad_shares])

    def _gns_update_estimators(self, vector: torch.Tensor) -> None:
        """Fold the all-reduced vector of `_gns_local_statistics` into the estimators and counters
        (device launches only, no sync)."""
        n_groups = len(self._gns_group_names)
        ddp_at = 2 + 2 * n_groups + (4 if self._gns_calibrate_every else 0)
        values = vector.double()
        examples, tokens = values[0], values[1]
        example_sums = values[2 : 2 + n_groups]
        nan = None
        if self._gns_options.gns_incomplete == "warn":
            n_params = len(self._gns_tracked_names)
            flagged = (vector[-n_params:] > 0).to(self._gns_dropped.dtype)
            # A step where some process flagged a parameter still counted is not used (NaN: skipped).
            incomplete_step = (flagged * (1.0 - self._gns_dropped)).sum() > 0
            self._gns_dropped = torch.maximum(self._gns_dropped, flagged)
            nan = torch.full((), float("nan"), dtype=torch.float64, device=vector.device)
            example_sums = torch.where(incomplete_step, nan, example_sums)
        world = distributed.world_size()
        loss_scale = self._gns_loss_scale()
        stats = to_synced_units(
            example_sums,
            values[2 + n_groups : 2 + 2 * n_groups],
            world_size=world,
            loss_scale=loss_scale,
            local_grad_sq_norm_sum=values[ddp_at : ddp_at + 1]
            if self.gns_ddp_estimator is not None
            else None,
        )
        self.gns_estimator.update(
            small_sq_norm=per_example_statistic(stats.example_sq_norm_sum, examples),
            big_sq_norm=stats.batch_sq_norm,
            big_batch=examples,
        )
        if self.gns_ddp_estimator is not None:
            small = stats.local_grad_sq_norm_mean
            if nan is not None:
                # The DDP hook sums every tracked gradient: once a parameter is dropped the two sides differ.
                small = torch.where(self._gns_dropped.sum() > 0, nan, small)
            self.gns_ddp_estimator.update(
                small_sq_norm=small,
                big_sq_norm=stats.batch_sq_norm[:1],
                big_batch=examples,
                small_batch=examples / world,
            )
        if self._gns_calibrating:
            calibration = to_synced_units(
                values[2 + 2 * n_groups : 4 + 2 * n_groups],
                values[4 + 2 * n_groups : 6 + 2 * n_groups],
                world_size=world,
                loss_scale=loss_scale,
            )
            self.gns_calibration.update(
                small_sq_norm=per_example_statistic(calibration.example_sq_norm_sum, examples),
                big_sq_norm=calibration.batch_sq_norm,
                big_batch=examples,
                step=self.state.global_step,
            )
        self._gns_last_statistics = (examples, tokens, stats)
        self._gns_counters.add_step(values[:2])

    def _gns_move_to(self, device: torch.device) -> None:
        if self._gns_device == device:
            return
        self._gns_device = device
        self._gns_membership = self._gns_membership.to(device)
        self._gns_dropped = self._gns_dropped.to(device)
        self.gns_estimator.to(device)
        self.gns_calibration.to(device)
        if self._gns_calibrate_every:
            self._gns_calibration_membership = self._gns_calibration_membership.to(device)
        if self.gns_ddp_estimator is not None:
            self.gns_ddp_estimator.to(device)
        self._gns_counters.to(device)

    def _gns_loss_scale(self) -> torch.Tensor | float | None:
        if self._gns_zero is not None:
            return self._gns_zero.loss_scale
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return None
        scale = getattr(scaler, "_scale", None)  # the device tensor: get_scale() would sync
        return scale if scale is not None else scaler.get_scale()

    def _gns_grads_sharded(self) -> bool:
        # FSDP1 keeps each rank's shard of the flat gradient in the original parameters' .grad;
        # DTensor gradients (FSDP2) are recognised from their placements instead. Fixed for the run:
        # looked up once (the accelerator state's properties cost microseconds a step).
        sharded = self.__dict__.get("_gns_sharded")
        if sharded is None:
            plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            strategy = getattr(plugin, "sharding_strategy", None)
            sharded = plugin is not None and getattr(strategy, "name", "FULL_SHARD") != "NO_SHARD"
            self.__dict__["_gns_sharded"] = sharded
        return sharded

    def _gns_tracked_parameters(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        """The tracked parameters of the (wrapped) model in `_gns_tracked_names` order, with their names
        in that model; looked up once per wrapper object (wrapping does not change later)."""
        cached = self._gns_tracked_cache
        if cached is not None and cached[0] is model:
            return cached[1], cached[2]
        params = {clean_name(k): (k, p) for k, p in model.named_parameters()}
        missing = [n for n in self._gns_tracked_names if n not in params]
        if missing:
            raise RuntimeError(
                f"tracked parameters {missing[:3]} are not among the wrapped model's parameters; under FSDP1 "
                "set use_orig_params=True (fsdp_config) so the norm weights keep their names"
            )
        names = [params[n][0] for n in self._gns_tracked_names]
        tracked = [params[n][1] for n in self._gns_tracked_names]
        self._gns_tracked_cache = (model, names, tracked)
        return names, tracked

    def last_step_statistics(self) -> dict[str, object]:
        """The last optimizer step's global statistics in synchronized-gradient units (one sync).

        Returns:
            `dict`: `batch_size`, `batch_tokens`, and per group (`{group: float}`)
            `example_sq_norm_sum` (Σ_i |c_i|²) and `batch_sq_norm` (|G_B|²); with `gns_ddp`,
            `local_grad_sq_norm_mean` (mean over processes of |g_r|²). Empty before the first step.
        """
        if self._gns_last_statistics is None:
            return {}
        examples, tokens, stats = self._gns_last_statistics
        result = {
            "batch_size": int(round(examples.item())),
            "batch_tokens": int(round(tokens.item())),
            "example_sq_norm_sum": dict(zip(self._gns_group_names, stats.example_sq_norm_sum.tolist())),
            "batch_sq_norm": dict(zip(self._gns_group_names, stats.batch_sq_norm.tolist())),
        }
        if self.gns_ddp_estimator is not None:
            result["local_grad_sq_norm_mean"] = stats.local_grad_sq_norm_mean.item()
        return result

    # ---- logging and checkpoints ----

    def gns_logs(self) -> dict[str, float]:
        """The GNS keys as logged (one host sync); empty before the first optimizer step."""
        est = self.gns_estimator
        sq_norm, trace_cov = est.components()
        counters = self._gns_counters
        parts = [trace_cov / sq_norm, sq_norm[:1], trace_cov[:1], counters.last_batch]
        dropped = self._gns_dropped.to(sq_norm.device).double().sum()
        parts.append(
            torch.stack([est._skipped.double(), counters.tokens_seen.double(), est._steps.double(), dropped])
        )
        if self.gns_calibration.enabled:
            ratio = self.gns_calibration.ratio_tensor().to(sq_norm.device)
            parts.append(torch.stack([ratio * trace_cov[0] / sq_norm[0], ratio]))
        if self.gns_ddp_estimator is not None:
            parts.append(self.gns_ddp_estimator.gns_tensor())
        values = torch.cat([p.to(sq_norm.device) for p in parts]).tolist()  # the sync
        n = len(self._gns_group_names)
        gns, (sq, tr, examples, tokens, skipped, seen, steps, dropped) = values[:n], values[n : n + 8]
        if steps == 0 and skipped == 0:
            return {}
        logs = {"gns": gns[0]}
        logs["gns_tokens"] = gns[0] * (tokens / examples) if examples else float("nan")
        logs.update({"gns_sq_norm": sq, "gns_trace_cov": tr})
        logs.update({f"gns/{name}": value for name, value in zip(self._gns_group_names[1:], gns[1:])})
        logs.update({"gns_skipped_steps": int(skipped), "batch_size": int(round(examples))})
        logs.update({"batch_tokens": int(round(tokens)), "tokens_seen": int(seen)})
        if self._gns_options.gns_incomplete == "warn":
            logs["gns_dropped_parameters"] = int(dropped)
        extra = values[n + 8 :]
        if self.gns_calibration.enabled:
            (logs["gns_calibrated"], logs["gns_calibration_ratio"]), extra = extra[:2], extra[2:]
        if self.gns_ddp_estimator is not None:
            logs["gns_ddp"] = extra[0]
        return logs

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs, not eval / final summaries
            gns_logs = self.gns_logs()
            logs.update(gns_logs)
            self._gns_show_on_progress_bar(gns_logs.get("gns"))
        super().log(logs, *args, **kwargs)

    def _gns_show_on_progress_bar(self, gns: float | None) -> None:
        if gns is None:
            return
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None:
                bar.set_postfix(gns=f"{gns:.4g}", refresh=False)

    def _issue_warnings_after_load(self, load_result) -> None:
        # transformers 5 saves a tied weight once (lm_head.weight = wte.weight): not a missing key.
        missing = really_missing_keys(self.model, list(load_result.missing_keys))
        super()._issue_warnings_after_load(
            SimpleNamespace(missing_keys=missing, unexpected_keys=load_result.unexpected_keys)
        )

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._gns_checkpoint_states().save(os.path.join(self._get_output_dir(trial=trial), folder))


def _sums_skipping(model: nn.Module, names: list[str], plan: _SkipPlan | None, device) -> torch.Tensor:
    """`example_sq_norm_sums(model, names)` on `device`, with 0 where `plan` skips (parameters that
    `patch` no longer tracks, whose statistics do not exist)."""
    if plan is None:
        return example_sq_norm_sums(model, names).to(device)
    sums = torch.zeros(len(names), device=device)
    if plan.kept_names:
        sums[plan.kept.to(device)] = example_sq_norm_sums(model, plan.kept_names).to(device)
    return sums


class _SkipPlan:
    """Which of a names list to read and which to leave at 0, made once per (list, skipped set): the
    kept names as one list object (`example_sq_norm_sums` caches its layout by the list's identity)
    and the index tensors, so a step with skipped parameters copies nothing to the device."""

    def __init__(self, names: list[str], skipped: list[int], device: torch.device):
        skip = set(skipped)
        keep = [i for i in range(len(names)) if i not in skip]
        self.key = (id(names), tuple(skipped))
        self.kept_names = [names[i] for i in keep]
        self.kept = torch.tensor(keep, dtype=torch.long).to(device)  # once: made when the set changes
        self.skipped = torch.tensor(sorted(skip), dtype=torch.long).to(device)


def _skip_plan(cached: _SkipPlan | None, names: list[str], skipped: list[int], device) -> _SkipPlan | None:
    """`cached` when it still describes (names, skipped), else a new plan; None when nothing is skipped."""
    if not skipped:
        return None
    if cached is not None and cached.key == (id(names), tuple(skipped)):
        return cached
    return _SkipPlan(names, skipped, device)


def _is_peft_model(model: nn.Module) -> bool:
    """A PEFT model (LoRA, ...): told by what it has, without importing peft."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def _is_compiled(model: nn.Module) -> bool:
    """`torch.compile(model)` (an `OptimizedModule`) or `model.compile()`, also under DDP/FSDP wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule

    module = model
    for _ in range(4):  # wrappers nest a few levels deep at most
        if isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None:
            return True
        module = getattr(module, "module", None)
        if not isinstance(module, nn.Module):
            return False
    return False


def _host_to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """fp32 `values` on `device` without a host-device sync: `torch.as_tensor(x, device="cuda")` is a
    blocking copy (it waits for the device's queue); a non-blocking copy of a fresh host tensor is not
    (CUDA stages pageable memory before returning, so the host tensor may go)."""
    tensor = torch.tensor(values, dtype=torch.float32)
    return tensor if device.type == "cpu" else tensor.to(device, non_blocking=True)
