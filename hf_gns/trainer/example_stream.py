"""The global example stream of batch-size control: order, position, sampler and reader.

The examples form ONE global stream, epoch after epoch: stream position s is example
`perm_e[s mod N]` of epoch e = s // N (`perm_e` a permutation drawn from the data seed and e, or
the identity for sequential sampling). Positions are dealt round-robin to the W processes:
process r's i-th example is position `base + r + W·i`. A step in which every process consumes k
examples therefore consumes exactly the next W·k positions of the stream, whatever k is: no
example is dropped, repeated or reordered when the batch changes, and no epoch boundary drops a
remainder. Each process's `DataLoader` has a fixed micro-batch and an infinite, self-sharded
batch sampler (`MicroBatchSampler`) that Accelerate never wraps (its `BatchSamplerShard` caches
the batch size and would drop mismatched batches); `StreamReader` pulls any number of examples
from it, cutting the last micro-batch when needed and carrying its rest into the next step.

No Trainer here: `hf_gns.trainer.batching.BatchSizeControlMixin` wires these into the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers.trainer_utils import seed_worker

logger = logging.getLogger(__name__)


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


def _check_rows_are_examples(batch: Mapping[str, Any], micro_batch_size: int) -> None:
    """The stream counts and cuts micro-batches by rows: each row must be one dataset example."""
    rows = batch_rows(batch)
    if rows != micro_batch_size:
        raise ValueError(
            f"batch-size control: the collator turned {micro_batch_size} examples into {rows} rows (e.g. a "
            "padding-free collator flattening them into one row); the example stream needs one row per "
            "example. Turn off packing/padding_free, or batch-size control (batch_size_policy, max_tokens)."
        )


class StreamReader:
    """Takes any number of this process's next examples from a `MicroBatchSampler` loader.

    Keeps `position` (checkpointed by the caller) up to date: micro-batches pulled and rows
    carried. A new loader iterator (a fresh `train()` or a resume) restarts at the position,
    re-fetching a partly consumed micro-batch and dropping its consumed rows.
    """

    def __init__(self, position: DataPosition):
        self.position = position
        self._iterator = None
        self._carry_batch: Mapping[str, Any] | None = None

    def reset(self) -> None:
        """Forget the iterator: the next `take` starts from the saved position."""
        self._iterator, self._carry_batch = None, None

    def take(self, iterator, count: int) -> list[Mapping[str, Any]]:
        """The next `count` examples of `iterator` as micro-batches (the last one possibly cut)."""
        position = self.position
        if iterator is not self._iterator:  # a new loader iterator starts at the saved position
            self._iterator, self._carry_batch = iterator, None
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
                _check_rows_are_examples(batch, position.micro_batch_size)
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


def stream_dataloader(dataset, collator, sampler: MicroBatchSampler, args, seed: int) -> DataLoader:
    """A `DataLoader` over `sampler` with the Trainer's worker options (`args`: `TrainingArguments`).

    Not for `accelerator.prepare()`: it would wrap the sampler in `BatchSamplerShard` and re-shard
    it. Batches stay on the host; the Trainer's `training_step` moves them.
    """
    workers = args.dataloader_num_workers
    params = dict(
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=args.dataloader_pin_memory,
        worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index),
        # Its own generator: creating an iterator then draws no number from the global RNG, which
        # HF restores on resume just before creating it (dropout would otherwise diverge).
        generator=torch.Generator().manual_seed(seed),
    )
    if workers > 0:
        params.update(
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
        )
    return DataLoader(dataset, **params)


def is_hf_dataset(dataset) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.Dataset)


def tokens_per_example(dataset) -> int | None:
    """Length of the first example's `input_ids` (an estimate for progress and warmup conversion)."""
    try:
        ids = dataset[0]["input_ids"]
    except (KeyError, IndexError, TypeError):
        return None
    return len(ids) if hasattr(ids, "__len__") else None
