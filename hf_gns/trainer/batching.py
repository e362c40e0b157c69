"""Realizing a global batch that changes at any optimizer step inside the HF Trainer.

Mechanism (what `BatchSizeControlMixin` overrides, and why):

- Data. The examples form ONE global stream, epoch after epoch: stream position s is example
  `perm_e[s mod N]` of epoch e = s // N (`perm_e` a permutation drawn from the data seed and e,
  or the identity for `train_sampling_strategy="sequential"`). Positions are dealt round-robin
  to the W processes: process r's i-th example is position `base + r + W·i`. A step in which
  every process consumes k examples therefore consumes exactly the next W·k positions of the
  stream, whatever k is: no example is dropped, repeated or reordered when the batch changes,
  and no epoch boundary drops a remainder. Each process's `DataLoader` has a fixed micro-batch
  of `per_device_train_batch_size` examples and an infinite, self-sharded batch sampler
  (`MicroBatchSampler`) that Accelerate never wraps: its `BatchSamplerShard` caches the batch
  size and would drop mismatched batches.
- Accumulation. HF's `gradient_accumulation_steps` stays 1. `get_batch_samples` asks the
  controller for the next global batch, pulls this process's n micro-batches (the last one cut
  when the granularity is "example"; its remainder is carried into the next step) and hands
  them to the loop as ONE item, a `MicroBatches` list, with HF's own `num_items_in_batch` for
  all of them (gathered across processes when `average_tokens_across_devices`). `training_step`
  runs them under `accelerator.no_sync` except the last. A loss normalized by
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

Needs from the host trainer (`GNSTrainer`): `tokens_seen`, `current_gns()` and
`register_checkpoint_state(name, obj)`, and a call to `_setup_batch_control()` once that
registry exists. Not supported with batch control: DeepSpeed, iterable datasets,
`train_sampling_strategy` other than "random"/"sequential", `auto_find_batch_size`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import seed_worker

from ..control import BatchSizeController, ScheduleFilePolicy, TokenLRScheduler
from .batch_arguments import controller_from_arguments, lr_schedule_from_arguments

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_NAME = "batch_control"


# ---- the global example stream -------------------------------------------------------------


class ExampleOrder:
    """Global stream position → dataset index: epoch e = s // N is `randperm(N)` seeded with `seed + e`.

    Args:
        num_examples (`int`): N, the dataset's length.
        seed (`int`): data seed; every process must use the same.
        shuffle (`bool`, *optional*, defaults to `True`): `False` gives 0, 1, ..., N-1 every epoch.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("the training dataset is empty.")
        self.num_examples, self.seed, self.shuffle = num_examples, seed, shuffle
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.num_examples, generator=generator)
            else:
                self._perm = torch.arange(self.num_examples)
            self._epoch = epoch
        return self._perm

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        return int(self.permutation(epoch)[offset])


@dataclass
class DataPosition:
    """Where every process stands in the global stream; identical on every process, checkpointed.

    Args:
        world_size (`int`), micro_batch_size (`int`): the grid the position refers to.
        base (`int`): stream position where this grid starts.
        micro_batches (`int`): micro-batches each process pulled from its loader since `base`.
        carry (`int`): rows of the last pulled micro-batch not consumed yet (granularity "example").
    """

    world_size: int
    micro_batch_size: int
    base: int = 0
    micro_batches: int = 0
    carry: int = 0

    @property
    def examples_consumed(self) -> int:
        """Global examples consumed: the stream prefix [0, examples_consumed) has been trained on."""
        return self.base + self.world_size * (self.micro_batches * self.micro_batch_size - self.carry)

    def state_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "base": self.base,
            "micro_batches": self.micro_batches,
            "carry": self.carry,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        saved = DataPosition(**{k: int(v) for k, v in state.items()})
        if (saved.world_size, saved.micro_batch_size) == (self.world_size, self.micro_batch_size):
            self.base, self.micro_batches, self.carry = saved.base, saved.micro_batches, saved.carry
        else:  # another grid: start a fresh one at the first unconsumed position (no drop, no repeat)
            logger.warning(
                "hf_gns: resuming with world_size × micro-batch %d × %d instead of %d × %d: the data order "
                "is kept, but micro-batches are cut differently, so the run will not be bitwise identical",
                self.world_size,
                self.micro_batch_size,
                saved.world_size,
                saved.micro_batch_size,
            )
            self.base, self.micro_batches, self.carry = saved.examples_consumed, 0, 0


class MicroBatchSampler:
    """Infinite batch sampler of one process: micro-batch i holds positions `base + (i·b + j)·W + rank`.

    Starts where `position` says when iterated (re-fetching a partly consumed micro-batch). Has no
    `__len__`: the Trainer then relies on `max_steps`, which the mixin sets.
    """

    def __init__(self, order: ExampleOrder, position: DataPosition, rank: int):
        self.order, self.position, self.rank = order, position, rank

    def __iter__(self) -> Iterator[list[int]]:
        position = self.position
        base, world, size = position.base, position.world_size, position.micro_batch_size
        first = position.micro_batches - (1 if position.carry else 0)
        return self._micro_batches(base, world, size, first)

    def _micro_batches(self, base: int, world: int, size: int, first: int) -> Iterator[list[int]]:
        index = first
        while True:
            start = base + index * size * world + self.rank
            yield [self.order[start + j * world] for j in range(size)]
            index += 1


class MicroBatches(list):
    """This process's micro-batches for one optimizer step: ONE item of the Trainer's loop."""


def batch_rows(batch: Mapping[str, Any]) -> int:
    """Examples in a collated batch (the leading size of its first tensor)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise TypeError("batch-size control needs collated batches holding tensors (a dict of tensors).")


def slice_rows(batch: Mapping[str, Any], start: int, stop: int) -> Mapping[str, Any]:
    """Rows [start, stop) of every per-example tensor of a collated batch; other values kept."""
    rows = batch_rows(batch)
    sliced = {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
        else value
        for key, value in batch.items()
    }
    try:
        return type(batch)(sliced)
    except TypeError:
        return sliced


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

    # ---- setup ----

    @property
    def batch_control_enabled(self) -> bool:
        return bool(getattr(self.args, "batch_control_enabled", False))

    def _setup_batch_control(self) -> None:
        """Build the controller and register its checkpoint state; call once the host's registry exists."""
        if not self.batch_control_enabled or self.batch_size_controller is not None:
            return
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("batch-size control does not support DeepSpeed (its engine owns accumulation).")
        if self.args.auto_find_batch_size:
            raise ValueError("batch-size control sets the batch itself: turn off auto_find_batch_size.")
        self.batch_size_controller = self.make_batch_size_controller()
        self.data_position = DataPosition(self.args.world_size, self._train_batch_size)
        self._stream_iterator = None
        self._carry_batch = None
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
            min_batch_size=self.args.batch_size_min,
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
                f"{type(self).__name__} enables batch control but never called _setup_batch_control(): "
                "call it at the end of __init__, once register_checkpoint_state works."
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
        self._stream_iterator = None
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
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        order = ExampleOrder(len(dataset), seed=seed, shuffle=strategy == "random")
        self._num_train_examples = len(dataset)
        self._tokens_per_example = _tokens_per_example(dataset)
        sampler = MicroBatchSampler(order, self.data_position, rank=self.args.process_index)
        workers = self.args.dataloader_num_workers
        params = dict(
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
            # Its own generator: creating an iterator then draws no number from the global RNG, which
            # HF restores on resume just before creating it (dropout would otherwise diverge).
            generator=torch.Generator().manual_seed(seed),
        )
        if workers > 0:
            params.update(
                persistent_workers=self.args.dataloader_persistent_workers,
                prefetch_factor=self.args.dataloader_prefetch_factor,
            )
        # Not accelerator.prepare(): it would wrap the sampler in BatchSamplerShard and re-shard it.
        # Batches stay on the host; training_step moves them (Trainer._prepare_inputs).
        return DataLoader(dataset, **params)

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
        micro_batches = self._take_examples(epoch_iterator, per_device)
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
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
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

    def _take_examples(self, iterator, count: int) -> list[Mapping[str, Any]]:
        """This process's next `count` examples as micro-batches, carrying a cut micro-batch's rest."""
        position = self.data_position
        if iterator is not self._stream_iterator:  # a new loader iterator starts at the saved position
            self._stream_iterator, self._carry_batch = iterator, None
            if position.carry:
                refetched = next(iterator)
                rows = batch_rows(refetched)
                self._carry_batch = slice_rows(refetched, rows - position.carry, rows)
        taken = []
        while count > 0:
            if self._carry_batch is not None:
                batch, self._carry_batch = self._carry_batch, None
            else:
                batch = next(iterator)
                position.micro_batches += 1
            rows = batch_rows(batch)
            if rows <= count:
                taken.append(batch)
                count -= rows
            else:
                taken.append(slice_rows(batch, 0, count))
                self._carry_batch = slice_rows(batch, count, rows)
                count = 0
        position.carry = batch_rows(self._carry_batch) if self._carry_batch is not None else 0
        return taken

    # ---- budget and progress ----

    def _estimate_steps(self, batch_size: int) -> int:
        """Steps to spend `max_tokens` at `batch_size` (a progress-bar estimate, not a limit)."""
        tokens_per_example = self._tokens_per_example or _tokens_per_example(self.train_dataset) or 1
        return max(1, math.ceil(self.args.max_tokens / (batch_size * tokens_per_example)))

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


def _is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


def _tokens_per_example(dataset) -> int | None:
    """Length of the first example's `input_ids` (an estimate for progress and warmup conversion)."""
    try:
        ids = dataset[0]["input_ids"]
    except (KeyError, IndexError, TypeError):
        return None
    return len(ids) if hasattr(ids, "__len__") else None
