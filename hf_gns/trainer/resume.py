"""Resuming a `GNSTrainer` run: check a checkpoint's `hf_gns_state.pt` before trusting it.

A checkpoint holds the model, optimizer, LR scheduler and `trainer_state.json` (HF's), and
`hf_gns_state.pt` (ours: the GNS estimator, the token/example counters, the batch-size
controller and the data position). Without the latter a resumed run used to restart its
token count, batch, LR schedule and data position from zero while the model and optimizer
continued: a silently different run. So:

- `read_state_file(checkpoint)` loads `hf_gns_state.pt` or raises `CheckpointStateError`
  naming the file and what is wrong with it (missing, truncated, corrupted, not a dict).
- `missing_states(saved, required)` names the registered states the file lacks.
- With `restart_statistics`, `derive_progress(checkpoint)` recovers what `trainer_state.json`
  still knows (optimizer steps, tokens and examples consumed, the last global batch), so the
  data position, the token budget and the token LR schedule continue; only the GNS statistics
  (estimator EMAs) start again. `DerivedProgress.derived` says which numbers are exact and
  which are estimates.

Plain Python and `torch.load`; no Trainer state is touched here (see `GNSTrainer.train`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from .checkpoint import STATE_FILE

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
# The states that carry the statistics and the run's position (registered by GNSTrainer and
# the batch-control mixin); anything else registered by users is reported by name too.
STATISTICS_STATES = ("gns_estimator", "gns_ddp_estimator", "gns_calibration")
RESTART_HINT = (
    "pass --gns_restart_statistics true (GNSTrainingArguments.gns_restart_statistics) to resume anyway "
    "with fresh GNS statistics; tokens, data position and LR continue from trainer_state.json"
)


class CheckpointStateError(ValueError):
    """A checkpoint's `hf_gns_state.pt` is missing, unreadable or incomplete (the message names it)."""


def state_file(checkpoint: str | os.PathLike) -> str:
    return os.path.join(os.fspath(checkpoint), STATE_FILE)


def read_state_file(checkpoint: str | os.PathLike) -> dict:
    """The registered states saved in `checkpoint/hf_gns_state.pt`.

    Raises:
        `CheckpointStateError`: the file is missing, truncated or corrupted, or does not hold a dict.
    """
    path = state_file(checkpoint)
    if not os.path.isfile(path):
        raise CheckpointStateError(
            f"{path} does not exist: the checkpoint has no GNS/batch-control state (deleted, or not "
            f"written by GNSTrainer)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        KeyError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as err:  # noqa: E501
        # A truncated zip gives "PytorchStreamReader failed ...", a corrupted pickle a KeyError or
        # UnpicklingError: all mean the file cannot be trusted.
        text = str(err).strip()
        first_line = text.splitlines()[0].split(". ")[0] if text else type(err).__name__
        raise CheckpointStateError(f"{path} is unreadable (truncated or corrupted: {first_line})") from err
    if not isinstance(saved, dict):
        raise CheckpointStateError(f"{path} holds a {type(saved).__name__}, not the dict GNSTrainer writes")
    return saved


def missing_states(saved: dict, required: list[str]) -> list[str]:
    """Names in `required` that `saved` lacks or holds in an unusable form (not a dict)."""
    return [name for name in required if not isinstance(saved.get(name), dict)]


@dataclass
class DerivedProgress:
    """What `trainer_state.json` says about a run's position, for resuming without `hf_gns_state.pt`.

    Attributes:
        global_step (`int`): optimizer steps done.
        tokens_seen (`int`), examples_seen (`int`): global tokens and examples consumed.
        batch_size (`int`), batch_tokens (`int`): the last logged optimizer step's global batch.
        derived (`dict[str, str]`): for each number, "exact" or how it was estimated.
    """

    global_step: int
    tokens_seen: int
    examples_seen: int
    batch_size: int
    batch_tokens: int
    derived: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{name} {getattr(self, name):,} ({how})" for name, how in self.derived.items()]
        return ", ".join(parts)


def derive_progress(checkpoint: str | os.PathLike) -> DerivedProgress:
    """Tokens, examples and batch of a run at `checkpoint`, from its `trainer_state.json` log history.

    `GNSTrainer` logs `tokens_seen`, `batch_size` and `batch_tokens` at every logging step. At the
    checkpoint's step the token count is exact when that step was logged (the recipe logs every
    step); otherwise it is the last logged count plus the remaining steps at the last logged batch.
    Examples are summed over the logged steps when every step was logged, else converted from
    tokens at the last batch's tokens per example (exact for fixed-length examples).

    Raises:
        `CheckpointStateError`: no `trainer_state.json`, or it has no logged `tokens_seen` and no
        `num_input_tokens_seen`.
    """
    path = os.path.join(os.fspath(checkpoint), TRAINER_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        global_step = int(state["global_step"])
        history = list(state.get("log_history", []))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointStateError(f"{path} is missing or unreadable ({err}): cannot resume from it") from err
    logs = [e for e in history if {"tokens_seen", "batch_size"} <= set(e) and e.get("step", 0) <= global_step]
    if not logs:
        raise CheckpointStateError(
            f"{path} logs no tokens_seen/batch_size (not a GNSTrainer run, or no step logged yet): the token "
            "count and data position cannot be derived; start a new run instead"
        )
    last = logs[-1]
    batch_size, batch_tokens = int(last["batch_size"]), int(last["batch_tokens"])
    derived = {"global_step": "exact"}
    missing_steps = global_step - int(last["step"])
    tokens = int(last["tokens_seen"]) + missing_steps * batch_tokens
    derived["tokens_seen"] = (
        "exact, logged at this step"
        if missing_steps == 0
        else f"estimated: logged at step {last['step']} plus {missing_steps} steps of {batch_tokens} tokens"
    )
    per_step = {int(e["step"]): int(e["batch_size"]) for e in logs}
    if sorted(per_step) == list(range(1, global_step + 1)):
        examples = sum(per_step.values())
        derived["examples_seen"] = "exact, every step logged"
    else:
        examples = math.floor(tokens * batch_size / batch_tokens + 0.5) if batch_tokens else 0
        per_example = batch_tokens / max(batch_size, 1)
        derived["examples_seen"] = f"estimated from tokens at {per_example:g} tokens per example"
    derived["batch_size"] = f"the last logged step's (step {last['step']})"
    return DerivedProgress(global_step, tokens, examples, batch_size, batch_tokens, derived)


def restore_progress(trainer, progress: DerivedProgress) -> None:
    """Position `trainer`'s counters, data stream and controller at `progress` (GNS statistics stay fresh).

    The LR follows: the token LR schedule is positioned from `tokens_seen` at every step, and HF
    restores the optimizer and scheduler from the checkpoint itself.
    """
    counters = trainer._gns_counters
    counters.tokens_seen = torch.tensor(progress.tokens_seen, dtype=torch.int64)
    counters.examples_seen = torch.tensor(progress.examples_seen, dtype=torch.int64)
    counters.last_batch = torch.tensor([progress.batch_size, progress.batch_tokens], dtype=torch.float64)
    position = getattr(trainer, "data_position", None)
    if position is not None:  # a fresh grid at the first unconsumed example: no drop, no repeat
        position.base, position.micro_batches, position.carry = progress.examples_seen, 0, 0
    controller = getattr(trainer, "batch_size_controller", None)
    if controller is not None:
        controller.batch_size = controller.quantize(progress.batch_size)
        # Reactive policies wait their minimum interval again: the fresh GNS needs steps to settle.
        controller.last_change_step = progress.global_step
        controller.last_change_tokens = progress.tokens_seen


# ---- arguments that change a run's trajectory --------------------------------------------------


def plain_value(value):
    """`value` as a type `torch.load(weights_only=True)` and JSON accept (enums by value, else str)."""
    value = getattr(value, "value", value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    return str(value)


class RunArgumentsState:
    """The arguments a run was started with, saved in every checkpoint (`register_checkpoint_state`).

    Loading does nothing: the comparison with the current arguments happens before training
    (`changed_arguments`), where a refusal still costs nothing.
    """

    def __init__(self, arguments: dict):
        self.arguments = {name: plain_value(value) for name, value in arguments.items()}

    def state_dict(self) -> dict:
        return dict(self.arguments)

    def load_state_dict(self, state: dict) -> None:
        pass


def changed_arguments(saved: dict, current: dict) -> list[str]:
    """`--name old -> new` for every argument in both dicts whose value differs."""
    changes = []
    for name in sorted(set(saved) & set(current)):
        old, new = saved[name], plain_value(current[name])
        if old != new:
            changes.append(f"--{name} {old} -> {new}")
    return changes


# ---- loading the model weights -----------------------------------------------------------------


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied weights such as `lm_head.weight`).

    transformers 5 saves a tied parameter once; a checkpoint then "misses" its alias, which loading
    fills by the tie itself, so the alias is not a missing key.
    """
    first_name: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases.add(name)
        else:
            first_name[id(param)] = name
    return aliases


def really_missing_keys(model: torch.nn.Module, missing_keys: list[str]) -> list[str]:
    """`missing_keys` of a checkpoint load without the tied aliases, which the tie fills."""
    aliases = tied_parameter_names(model)
    return [key for key in missing_keys if key not in aliases]


# ---- resuming a trainer --------------------------------------------------------------------------

# States that place the run (token count, batch, data position): derived from trainer_state.json
# when restarting the statistics; the statistics themselves (STATISTICS_STATES) start again.
POSITION_STATES = ("gns_counters", "batch_control")


def load_checkpoint_states(trainer, checkpoint: str, states: list[tuple[str, object]]) -> list[str]:
    """Restore every registered state from `checkpoint/hf_gns_state.pt`, or refuse naming the file.

    Args:
        trainer: the `GNSTrainer` (its `args.gns_restart_statistics` and, when restarting, its
            counters, data position and controller, see `restore_progress`).
        checkpoint (`str`): the checkpoint directory.
        states (`list[tuple[str, object]]`): the registered (name, object) pairs.

    Returns:
        `list[str]`: registered names the file does not hold that are neither statistics nor the
        run's position (user states added later; left as they are).

    Raises:
        `CheckpointStateError`: the file is missing, unreadable or lacks the statistics or the
            run's position, and `gns_restart_statistics` is off; or a state does not load.
    """
    restart = bool(getattr(trainer.args, "gns_restart_statistics", False))
    path = state_file(checkpoint)
    try:
        saved = read_state_file(checkpoint)
    except CheckpointStateError as error:
        if not restart:
            raise CheckpointStateError(f"{error}; {RESTART_HINT}") from error
        saved = {}
    names = [name for name, _ in states]
    essential = [n for n in names if n in STATISTICS_STATES + POSITION_STATES and n not in saved]
    if essential and not restart:
        raise CheckpointStateError(f"{path} has no state for {', '.join(essential)}; {RESTART_HINT}")
    for name, obj in states:
        if name not in saved:
            continue
        try:
            obj.load_state_dict(saved[name])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
            raise CheckpointStateError(
                f"{path}: its state {name!r} does not load ({type(err).__name__}: {err}); {RESTART_HINT}"
            ) from err
    if any(name in essential for name in POSITION_STATES):  # restart: what is readable is restored above
        progress = derive_progress(checkpoint)
        restore_progress(trainer, progress)
        logger.warning(
            "hf_gns: %s lacks %s; gns_restart_statistics: the GNS statistics start again and the run "
            "continues from trainer_state.json: %s",
            path,
            ", ".join(essential),
            progress.summary(),
        )
    elif essential:
        logger.warning("hf_gns: %s lacks %s; gns_restart_statistics: they start again", path, essential)
    return [n for n in names if n not in saved and n not in STATISTICS_STATES + POSITION_STATES]
