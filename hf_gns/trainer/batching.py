"""`BatchSizeControlMixin`: a global batch that changes at any optimizer step inside the HF Trainer.

Mechanism (what the mixin overrides, and why):

- Data. One global example stream dealt round-robin to the processes, read through an infinite,
  self-sharded micro-batch sampler (`hf_gns.trainer.example_stream`): whatever the batch does, no
  example is dropped, repeated or reordered.
- Accumulation. HF's `gradient_accumulation_steps` stays 1. `get_batch_samples` asks the
  controller for the next global batch, pulls this process's n micro-batches (the last one cut
  when the granularity is "example"; its remainder is carried into the next step) and hands
  them to the loop as ONE item, a `MicroBatches` list, with HF's own `num_items_in_batch` for
  all of them (gathered across processes when `average_tokens_across_devices`). `training_step`
  feeds them one by one back through `self.training_step` (so mixins above see each micro-batch,
  a mapping), under `accelerator.no_sync` except the last. A loss normalized by
  `num_items_in_batch` is right for any n; otherwise each micro-batch's mean loss is weighted by
  its share of the step's examples (1/n for full micro-batches).
- Decision. Every process calls `BatchSizeController.update` at the same step with the same
  arguments (step, the all-reduced `tokens_seen`, the all-reduced GNS), so all take the same
  decision without talking; a schedule file is read by process 0 and its points broadcast.
- Budget and LR. Training stops at the first step that reaches `max_tokens`. HF's `max_steps`
  is only an estimate for the progress bar (kept ahead of the step count while tokens remain).
  The LR comes from a `TokenLRScheduler`, positioned at each step's start.
- Resume. The controller and the data position (stream base, micro-batches pulled, rows carried)
  are saved in `hf_gns_state.pt` through `register_checkpoint_state` and restored exactly; HF's
  own batch skipping is switched off (`ignore_data_skip`) so nothing is skipped twice.

The measurement interface (what this mixin needs from the trainer it is mixed into; `hf_gns.GNSMixin`
provides it, anything else with these three members works too, nothing checks types):

- `tokens_seen` (`int` attribute or property): global tokens of every optimizer step so far, the
  same on every process. Read once per optimizer step, before the step's batch is decided.
- `current_gns()` (-> `float | None`): the GNS in examples, the same on every process; `None`
  before the first measured step. Read only when the policy needs it (`"gns"`, `"doubling"`).
- `register_checkpoint_state(name, obj)`: save `obj.state_dict()` in every checkpoint and
  `obj.load_state_dict(...)` it on `train(resume_from_checkpoint=...)` BEFORE this mixin's
  `train` runs (so list the measurement mixin first: `class T(GNSMixin, BatchSizeControlMixin, Trainer)`).
  May be called during `__init__`, before or after the measurement set itself up.

Under DeepSpeed (ZeRO 1-3) the engine is told the accumulation boundary per micro-batch
(`hf_gns.trainer.deepspeed.accumulation_boundary`). Not supported with batch control: iterable
datasets, `train_sampling_strategy` other than "random"/"sequential", `auto_find_batch_size`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..control import BatchSizeController, ScheduleFilePolicy, TokenLRScheduler
from .batch_arguments import controller_from_arguments, lr_schedule_from_arguments
from .deepspeed import accumulation_boundary
from .example_stream import (
    DataPosition,
    ExampleOrder,
    MicroBatches,
    MicroBatchSampler,
    StreamReader,
    batch_rows,
    is_hf_dataset,
    stream_dataloader,
    tokens_per_example,
)

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_NAME = "batch_control"
# The measurement interface (module docstring): members this mixin reads from the host trainer.
MEASUREMENT_INTERFACE = ("tokens_seen", "current_gns", "register_checkpoint_state")


# ---- checkpointed state and per-step hooks -------------------------------------------------


class _BatchControlState:
    """What `hf_gns_state.pt` holds for batch control: the controller and the data position."""

    def __init__(self, trainer: BatchSizeControlMixin):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.trainer.batch_size_controller.state_dict(),
            "data_position": self.trainer.data_position.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.batch_size_controller.load_state_dict(state["controller"])
        self.trainer.data_position.load_state_dict(state["data_position"])


class _BatchControlCallback(TrainerCallback):
    """Stops at the token budget, keeps HF's step estimate ahead, reports data epochs."""

    def __init__(self, trainer: BatchSizeControlMixin):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._extend_step_estimate(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._batch_control_step_end(state, control)


# ---- the mixin -----------------------------------------------------------------------------


class BatchSizeControlMixin:
    """Trainer mixin: a global batch chosen by a `BatchSizeController` at every optimizer step.

    See the module docstring for the mechanism. Configured by the `BatchControlArguments`
    fields of the trainer's arguments; a custom controller (e.g. with a `SchedulePolicy` built on
    a Python function) can replace the default one before `train()`:

    ```python
    >>> trainer.batch_size_controller = trainer.make_batch_size_controller(SchedulePolicy(my_function))
    ```

    Attributes:
        batch_size_controller (`BatchSizeController` or `None`): `None` when batch control is off.
        data_position (`DataPosition`): the stream position (global examples consumed, ...).
    """

    batch_size_controller: BatchSizeController | None = None
    data_position: DataPosition | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_batch_control()

    # ---- setup ----

    @property
    def batch_control_enabled(self) -> bool:
        return bool(getattr(self.args, "batch_control_enabled", False))

    def _setup_batch_control(self) -> None:
        """Build the controller and register its checkpoint state (once; `__init__` calls it)."""
        if not self.batch_control_enabled or self.batch_size_controller is not None:
            return
        missing = [name for name in MEASUREMENT_INTERFACE if not hasattr(type(self), name)]
        if missing:
            raise TypeError(
                f"{type(self).__name__}: BatchSizeControlMixin needs a measurement providing {missing} "
                "(see hf_gns.trainer.batching); mix hf_gns.GNSMixin in first: "
                "class T(GNSMixin, BatchSizeControlMixin, Trainer)."
            )
        if self.args.auto_find_batch_size:
            raise ValueError("batch-size control sets the batch itself: turn off auto_find_batch_size.")
        self.batch_size_controller = self.make_batch_size_controller()
        self.data_position = DataPosition(self.args.world_size, self._train_batch_size)
        self._stream_reader = StreamReader(self.data_position)
        self._tokens_at_step = (-1, 0)
        self._tokens_per_example = None
        self._owns_max_steps = False
        self.register_checkpoint_state(CHECKPOINT_STATE_NAME, _BatchControlState(self))
        self.add_callback(_BatchControlCallback(self))

    def make_batch_size_controller(self, policy=None, **overrides) -> BatchSizeController:
        """A controller for this trainer's world size and micro-batch, from the arguments.

        Args:
            policy (`BatchSizePolicy`, *optional*): replaces the policy the arguments name.
            **overrides: other `BatchSizeController` arguments (e.g. `max_batch_size=4096`).
        """
        controller = controller_from_arguments(self.args, self.args.world_size, self._train_batch_size)
        if policy is None and not overrides:
            return controller
        kwargs = dict(
            initial_batch_size=controller.batch_size,
            world_size=controller.world_size,
            micro_batch_size=controller.micro_batch_size,
            granularity=controller.granularity,
            min_batch_size=controller.min_batch_size,  # its default: 2 examples (a GNS needs two)
            max_batch_size=self.args.batch_size_max,
            hysteresis=controller.hysteresis,
            min_interval_tokens=controller.min_interval_tokens,
            min_interval_steps=controller.min_interval_steps,
            monotonic=controller.monotonic,
        )
        kwargs.update(overrides)
        return BatchSizeController(policy if policy is not None else controller.policy, **kwargs)

    # ---- Trainer hooks ----

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if not self.batch_control_enabled:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self.batch_size_controller is None:
            raise RuntimeError(
                f"{type(self).__name__} enables batch control but BatchSizeControlMixin.__init__ never ran "
                "(an __init__ above it in the MRO did not call super().__init__)."
            )
        if self.args.max_tokens is None and self.args.max_steps <= 0:
            raise ValueError(
                "batch-size control needs a budget: set max_tokens (global tokens) or max_steps."
            )
        args = self.args
        saved = args.ignore_data_skip, args.max_steps
        # Our data position is restored from hf_gns_state.pt; HF's batch skipping would skip twice.
        args.ignore_data_skip = True
        self._owns_max_steps = args.max_steps <= 0
        if self._owns_max_steps:
            args.max_steps = self._estimate_steps(self.batch_size_controller.batch_size)
        self._stream_reader.reset()
        try:
            return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            args.ignore_data_skip, args.max_steps = saved

    def get_train_dataloader(self) -> DataLoader:
        if not self.batch_control_enabled:
            return super().get_train_dataloader()
        dataset, collator = self.train_dataset, self.data_collator
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "batch-size control needs a map-style dataset with a length (it deals example indices to "
                "processes); materialize the iterable dataset or tokenize into a datasets.Dataset."
            )
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if strategy not in ("random", "sequential"):
            raise ValueError(
                f"batch-size control orders the data itself: train_sampling_strategy={strategy!r} is not "
                "supported, use 'random' or 'sequential'."
            )
        if is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        order = ExampleOrder(len(dataset), seed=seed, shuffle=strategy == "random")
        self._num_train_examples = len(dataset)
        self._tokens_per_example = tokens_per_example(dataset)
        sampler = MicroBatchSampler(order, self.data_position, rank=self.args.process_index)
        return stream_dataloader(dataset, collator, sampler, self.args, seed)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if not self.batch_control_enabled or self.args.max_tokens is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            first_batch = self.batch_size_controller.batch_size
            schedule, scaling = lr_schedule_from_arguments(
                self.args, first_batch, self._tokens_per_example or 1
            )
            self.lr_scheduler = TokenLRScheduler(
                optimizer if optimizer is not None else self.optimizer,
                schedule,
                scaling,
                batch_size=first_batch,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self.batch_control_enabled:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = self._global_tokens_seen()
        if self.args.max_tokens is not None and tokens >= self.args.max_tokens:  # e.g. resumed at the end
            self.control.should_training_stop = True
            return [], None
        per_device = self._decide_batch(tokens)
        micro_batches = self._stream_reader.take(epoch_iterator, per_device)
        # HF's own count (labels != -100, shifted; gathered across processes if configured).
        _, num_items_in_batch = super().get_batch_samples(iter(micro_batches), len(micro_batches), device)
        return [MicroBatches(micro_batches)], num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not isinstance(inputs, MicroBatches):
            return super().training_step(model, inputs, num_items_in_batch)
        rows = [batch_rows(batch) for batch in inputs]
        total = sum(rows)
        losses = []
        try:
            for i, (batch, n_rows) in enumerate(zip(inputs, rows)):
                # Without num_items_in_batch, HF divides each micro-batch's mean loss by this:
                # weights n_rows / total, i.e. 1/n when all n micro-batches are full.
                self.current_gradient_accumulation_steps = total / n_rows
                last = i == len(inputs) - 1
                if getattr(self, "is_deepspeed_enabled", False):  # the engine steps after the last only
                    context = accumulation_boundary(self.accelerator, last)
                else:
                    context = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with context:
                    # Through self: a host trainer's own training_step sees each micro-batch.
                    losses.append(self.training_step(model, batch, num_items_in_batch))
        finally:
            self.current_gradient_accumulation_steps = len(inputs)
        return torch.stack(losses).sum()

    def floating_point_ops(self, inputs) -> int:
        if isinstance(inputs, MicroBatches):
            parent = super().floating_point_ops  # (zero-argument super() fails inside a generator)
            return sum(parent(batch) for batch in inputs)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        if isinstance(inputs, MicroBatches):
            for batch in inputs:
                super()._track_num_input_tokens(batch)
            return
        return super()._track_num_input_tokens(inputs)

    # ---- decisions ----

    def _global_tokens_seen(self) -> int:
        """`tokens_seen` after the last optimizer step, read once per step (one host sync)."""
        step = self.state.global_step
        if self._tokens_at_step[0] != step:
            self._tokens_at_step = (step, int(self.tokens_seen))
        return self._tokens_at_step[1]

    def _decide_batch(self, tokens: int) -> int:
        """Decide the next step's global batch (the same on every process); returns per-device examples."""
        controller, step = self.batch_size_controller, self.state.global_step
        self._sync_schedule_file(step)
        gns = self.current_gns() if controller.needs_gns(step, tokens) else None
        previous = controller.batch_size
        batch = controller.update(step=step, tokens_seen=tokens, gns=gns)
        if batch != previous:
            logger.info(
                "hf_gns: global batch %d -> %d after step %d (%d tokens)", previous, batch, step, tokens
            )
        if isinstance(self.lr_scheduler, TokenLRScheduler):
            self.lr_scheduler.set_position(tokens, batch)
        return controller.per_device_examples

    def _sync_schedule_file(self, step: int) -> None:
        policy = self.batch_size_controller.policy
        if not isinstance(policy, ScheduleFilePolicy) or step % policy.reload_every_steps:
            return
        if self.args.world_size == 1:
            policy.refresh()
            return
        from accelerate.utils import broadcast_object_list

        if self.args.process_index == 0:
            policy.refresh()
        points = broadcast_object_list([policy.points], from_process=0)[0]
        policy.set_points(points)

    # ---- data ----

    # ---- budget and progress ----

    def _estimate_steps(self, batch_size: int) -> int:
        """Steps to spend `max_tokens` at `batch_size` (a progress-bar estimate, not a limit)."""
        per_example = self._tokens_per_example or tokens_per_example(self.train_dataset) or 1
        return max(1, math.ceil(self.args.max_tokens / (batch_size * per_example)))

    def _extend_step_estimate(self, state) -> None:
        # DefaultFlowCallback stops at state.max_steps; while tokens remain, keep the estimate ahead.
        if self._owns_max_steps and state.global_step + 1 >= state.max_steps:
            remaining = max(self.args.max_tokens - self._global_tokens_seen(), 1)
            state.max_steps = state.global_step + 1 + self._estimate_steps_for(remaining)

    def _estimate_steps_for(self, tokens: int) -> int:
        per_step = self.batch_size_controller.batch_size * (self._tokens_per_example or 1)
        return max(1, math.ceil(tokens / per_step))

    def _batch_control_step_end(self, state, control) -> None:
        if getattr(self, "_num_train_examples", None):
            state.epoch = self.data_position.examples_consumed / self._num_train_examples
        if self.args.max_tokens is None:
            return
        tokens = self._global_tokens_seen()
        if tokens >= self.args.max_tokens:
            control.should_training_stop = True
            if str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) == "steps":
                control.should_save = True  # as DefaultFlowCallback does at max_steps
            if self._owns_max_steps:  # the bar ends full
                state.max_steps = state.global_step
                self._show_step_estimate(state.max_steps)
        elif self._owns_max_steps:
            # Re-estimate the remaining steps at the current batch, so the progress bar's total and
            # ETA follow the batch size (the first estimate, at the starting batch, can be far off).
            state.max_steps = state.global_step + self._estimate_steps_for(self.args.max_tokens - tokens)
            self._show_step_estimate(state.max_steps)

    def _show_step_estimate(self, total_steps: int) -> None:
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None and bar.total != total_steps:
                bar.total = total_steps
                bar.refresh()
