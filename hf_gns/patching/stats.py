"""Reading, checking and clearing the per-example squared norms collected by patched modules.

Units: each value is |c_b|², the squared L2 norm of example b's contribution c_b to
`param.grad` from one backward pass (Σ_b c_b is what that pass added to `param.grad`),
so loss scaling and the loss's reduction are already inside. Turning these into GNS
statistics (B·c_b, accumulation, DDP averaging, fp16 loss scale) is the estimator's job
(DESIGN.md section 2), not this module's.

Per optimizer step, a training loop calls:
1. `check_step_statistics(model, n_examples)`: every tracked parameter that got a
   gradient has exactly one value per example of the step (host-side shapes, no sync);
2. `example_sq_norm_sums(model, names)`: Σ_b |c_b|² per parameter in a few launches;
3. `zero_stats(model)`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .kinds import PATCHED_FORWARDS
from .model_hook import PATCHED_MARK, patch_generation
from .state import PatchState, foreign_forward, patched_states

INCOMPLETE_MODES = ("error", "warn")


class IncompleteStatisticsError(RuntimeError):
    """A tracked parameter got a gradient but not exactly one per-example value per example."""


def _patched_modules(model: nn.Module) -> list[tuple[nn.Module, PatchState]]:
    found = patched_states(model)
    if not found:
        if any(PATCHED_MARK in m.__dict__ for m in model.modules()):
            raise ValueError(
                "hf_gns.patch(model) found nothing to patch in this model (no recognised norm layer; "
                "print its report for the skipped modules): there are no per-example statistics"
            )
        raise ValueError(
            "no patched module in this model: call hf_gns.patch(model) first (and check its report)"
        )
    return found


def _reported_parameters(module: nn.Module, state: PatchState) -> tuple[torch.Tensor | None, ...]:
    """The parameter behind each column of the module's (B, C) squared norms."""
    return state.reported_parameters(module)


def _collecting(state: PatchState) -> bool:
    """False for layers whose reductions are switched off this step (`set_layer_tracking`)."""
    return getattr(state, "enabled", True)


@dataclass
class _Tracked:
    """One tracked parameter and the (module, state, column) sources of its per-example values."""

    name: str
    param: torch.Tensor
    sources: list[tuple[nn.Module, PatchState, int]] = field(default_factory=list)

    def n_values(self) -> int:
        """Values collected since the last `zero_stats` (host-side shapes: no sync)."""
        return sum(sq.shape[0] for _, state, _ in self.sources for sq in state.sinks.collected)


# model → (patch generation, every reported parameter with its sources): walking a large model's
# modules and parameters costs milliseconds of host time, too much for every optimizer step.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> tuple[list[_Tracked], list[PatchState]]:
    """(every reported parameter with its sources, every patched module's state) of `model`."""
    cached = _LAYOUTS.get(model)
    if cached is not None and cached[0] == patch_generation():
        return cached[1], cached[2]
    names = {id(param): name for name, param in model.named_parameters()}
    entries: dict[int, _Tracked] = {}
    patched = _patched_modules(model)
    for module, state in patched:
        for column, param in enumerate(_reported_parameters(module, state)):
            if param is None or id(param) not in names:
                continue
            entry = entries.setdefault(id(param), _Tracked(names[id(param)], param))
            entry.sources.append((module, state, column))
    layout, states = list(entries.values()), [state for _, state in patched]
    _LAYOUTS[model] = (patch_generation(), layout, states, _GuardPlan(layout))
    return layout, states


class _GuardPlan:
    """What `check_step_statistics` needs to pass a complete step in a few host compares: when every
    reported parameter has one source, the step is complete iff every collecting state that reports
    a parameter holds exactly `n_examples` rows."""

    def __init__(self, layout: list[_Tracked]):
        self.single_source = all(len(entry.sources) == 1 for entry in layout)
        self.states = list({id(s): s for entry in layout for _, s, _ in entry.sources}.values())

    def all_complete(self, n_examples: int) -> bool:
        if not self.single_source:
            return False
        for state in self.states:
            if not getattr(state, "enabled", True):
                continue  # switched off this step (`set_layer_tracking`): its parameters are not checked
            rows = 0
            for block in state.sinks.collected:
                rows += block.shape[0]
            if rows != n_examples:
                return False
        return True


def _guard_plan(model: nn.Module) -> _GuardPlan:
    cached = _LAYOUTS.get(model)
    if cached is None or cached[0] != patch_generation():
        _layout(model)
        cached = _LAYOUTS[model]
    return cached[3]


def _tracked(model: nn.Module, collecting_only: bool = True) -> dict[int, _Tracked]:
    """Every tracked parameter (requires grad; by default only those collecting this step, see
    `set_layer_tracking`), keyed by id, in module order."""
    tracked: dict[int, _Tracked] = {}
    for entry in _layout(model)[0]:
        if not entry.param.requires_grad:
            continue
        sources = [s for s in entry.sources if not collecting_only or _collecting(s[1])]
        if sources:
            tracked[id(entry.param)] = (
                entry if len(sources) == len(entry.sources) else _Tracked(entry.name, entry.param, sources)
            )
    return tracked


def tracked_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in `model.named_parameters()`) of the parameters whose per-example norms are collected
    (including layers switched off for now by `set_layer_tracking`)."""
    return [entry.name for entry in _tracked(model, collecting_only=False).values()]


def untracked_among(model: nn.Module, parameters: list[torch.Tensor]) -> list[int]:
    """Indices of `parameters` that the patch does not track (any more). `patch` untracks a parameter
    after it returned when the first training forward shows the model using it outside its module's
    forward (`outside_use.py`): a caller that listed the tracked parameters before that step must not
    read statistics of it. Walks the layout once per patch generation (cached with it)."""
    tracked = {id(entry.param) for entry in _layout(model)[0]}
    return [i for i, param in enumerate(parameters) if id(param) not in tracked]


def per_example_sq_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per-example squared gradient norms of every tracked parameter (norms; with `targets="all"`
    also Linear, Conv1D and Embedding weights and biases).

    Args:
        model (`nn.Module`): a model patched by `hf_gns.patch` (or a wrapper around it).

    Returns:
        `dict[str, torch.Tensor]`: for each tracked parameter, keyed by its name in
        `model.named_parameters()`, a 1-D fp32 tensor on the parameter's device with one
        value per example seen in backward passes since the last `zero_stats`: micro-batches
        concatenated in the order of their backward passes. No host-device sync.

        An empty (0,) tensor means that no backward pass reached the parameter's module since
        the last `zero_stats`: it is not a statistic (its sum, 0, is not a squared norm).
        Before using values, check them with `check_step_statistics`, which also catches a
        parameter whose gradient did not come through its patched module.

    Example:
    ```python
    >>> for micro_batch in micro_batches:
    ...     model(**micro_batch).loss.backward()
    >>> norms = hf_gns.per_example_sq_norms(model)  # {"model.norm.weight": (B_total,), ...}
    >>> hf_gns.zero_stats(model)
    ```
    """
    result: dict[str, torch.Tensor] = {}
    for entry in _tracked(model).values():
        parts = [sq[:, column] for _, state, column in entry.sources for sq in state.sinks.collected]
        if parts:
            result[entry.name] = torch.cat(parts)
        else:
            result[entry.name] = torch.zeros(0, dtype=torch.float32, device=entry.param.device)
    return result


class _SumPlan:
    """Device index tensors of `example_sq_norm_sums` for one layout of collected rows (cached)."""

    def __init__(
        self, row_counts: list[int], sources: list[list[tuple[int, int]]], width: int, device: torch.device
    ):
        n_owners = len(row_counts)
        # every owner with the same number of rows (the usual case): a (owners, rows, C) sum, no index
        self.rows_each = row_counts[0] if len(set(row_counts)) == 1 else None
        # row r of the concatenated (R, C) values belongs to owner row_owner[r]
        self.row_owner = (
            None
            if self.rows_each is not None
            else torch.repeat_interleave(torch.arange(n_owners), torch.tensor(row_counts)).to(device)
        )
        self.n_owners = n_owners
        # entry (owner, column) → flat index owner·C + column of the (owners, C) sums, and the name it adds to
        flat = [owner * width + column for name_sources in sources for owner, column in name_sources]
        target = [i for i, name_sources in enumerate(sources) for _ in name_sources]
        self.source_index = torch.tensor(flat, dtype=torch.long).to(device)
        self.single = all(len(name_sources) == 1 for name_sources in sources)
        self.target_index = None if self.single else torch.tensor(target, dtype=torch.long).to(device)


_SUM_PLAN_CACHE_SIZE = 16


class _SumLayout:
    """For one (model, names): the states whose blocks are read, per name its (state index, column)
    sources, the widest sink C (narrower blocks are padded to it), and the plans by (rows per state,
    device)."""

    def __init__(self, key: tuple, names: list[str], states: list, sources: tuple):
        self.key, self.names, self.states, self.sources = key, names, states, sources
        self.width = max((state.sinks.columns for state in states), default=2)
        self.plans: dict[tuple, _SumPlan] = {}

    def plan(self, row_counts: list[int], device: torch.device) -> _SumPlan:
        key = (tuple(row_counts), device)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= _SUM_PLAN_CACHE_SIZE:
                self.plans.clear()
            plan = self.plans[key] = _SumPlan(row_counts, self.sources, self.width, device)
        return plan


_SUM_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → _SumLayout


def _sum_layout(model: nn.Module, names: list[str]) -> _SumLayout:
    cached = _SUM_LAYOUTS.get(model)
    generation = patch_generation()
    # the same list object as last time (a trainer's cached names, never edited): no tuple of every
    # name to build and compare
    if cached is not None and cached.key[0] == generation:
        if (cached.names is names and len(names) == len(cached.key[1])) or cached.key[1] == tuple(names):
            return cached
    key = (generation, tuple(names))
    tracked = {entry.name: entry for entry in _tracked(model, collecting_only=False).values()}
    unknown = [n for n in names if n not in tracked]
    if unknown:
        raise ValueError(f"example_sq_norm_sums: {unknown[:3]} are not tracked parameters of this model")
    owners: dict[int, int] = {}
    states = []
    sources = []
    for name in names:
        name_sources = []
        for _, state, column in tracked[name].sources:
            if id(state) not in owners:
                owners[id(state)] = len(states)
                states.append(state)
            name_sources.append((owners[id(state)], column))
        sources.append(tuple(name_sources))
    layout = _SUM_LAYOUTS[model] = _SumLayout(key, names, states, tuple(sources))
    return layout


def _first_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def example_sq_norm_sums(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Σ over the examples collected since the last `zero_stats` of |c_b|², per parameter, fused.

    The same numbers as `torch.stack([per_example_sq_norms(model)[n].sum() for n in names])`,
    in a handful of launches whatever the number of parameters: one `cat` of every collected
    (B, C) block, one sum per module (a reshape when every module holds the same rows, else
    an `index_add_`), one gather (plus one `index_add_` for a parameter reported by several
    modules). The index tensors depend only on the layout (rows collected per module,
    `names`) and are cached, so a steady training loop copies nothing to the device. No
    host-device sync.

    Args:
        model (`nn.Module`): the patched model (or a wrapper around it).
        names (`list[str]`): tracked parameter names as in `model.named_parameters()`; pass the
            same list object every step for the cheapest lookup.

    Returns:
        `torch.Tensor`: fp32, shape (len(names),), on the device of the collected values; 0 for
        a parameter with nothing collected (check with `check_step_statistics` first).
    """
    layout = _sum_layout(model, names)
    width = layout.width
    blocks: list[torch.Tensor] = []
    row_counts: list[int] = []
    for state in layout.states:
        collected = state.sinks.collected
        pad = width - state.sinks.columns
        rows = 0
        for block in collected:
            blocks.append(block if not pad else torch.nn.functional.pad(block, (0, pad)))
            rows += block.shape[0]
        row_counts.append(rows)
    device = blocks[0].device if blocks else _first_device(model)
    if not blocks:
        return torch.zeros(len(names), dtype=torch.float32, device=device)
    plan = layout.plan(row_counts, device)
    try:
        values = torch.cat(blocks)  # (R, C) fp32
    except RuntimeError:  # blocks on several devices (a model split over devices)
        values = torch.cat([block.to(device) for block in blocks])
    if plan.rows_each is not None:
        owner_sums = values.view(plan.n_owners, plan.rows_each, width).sum(1)
    else:
        owner_sums = torch.zeros(plan.n_owners, width, dtype=values.dtype, device=device)
        owner_sums.index_add_(0, plan.row_owner, values)
    picked = owner_sums.view(-1).index_select(0, plan.source_index)
    if plan.single:
        return picked
    return torch.zeros(len(names), dtype=values.dtype, device=device).index_add_(0, plan.target_index, picked)


@dataclass(frozen=True)
class IncompleteStatistics:
    """A tracked parameter without exactly one per-example value per example this step.

    Attributes:
        parameter (`str`): name in `model.named_parameters()`.
        modules (`tuple[str, ...]`): the patched module(s) that report it.
        n_values (`int`): per-example values collected this step.
        n_examples (`int`): examples of the step (this process).
        cause (`str`): the likely cause, in words.
    """

    parameter: str
    modules: tuple[str, ...]
    n_values: int
    n_examples: int
    cause: str

    def __str__(self) -> str:
        modules = ", ".join(repr(m) for m in self.modules)
        return (
            f"{self.parameter} (module {modules}): {self.n_values} per-example values for "
            f"{self.n_examples} examples: {self.cause}"
        )


def _cause(entry: _Tracked, n_values: int, n_examples: int) -> str:
    foreign = [
        f for module, _, _ in entry.sources if (f := foreign_forward(module, PATCHED_FORWARDS)) is not None
    ]
    if foreign:
        return (
            f"its forward was replaced after hf_gns.patch (now {foreign[0]}, e.g. by Liger's instance "
            "patching), so the fused op no longer runs; call hf_gns.patch(model) again after the other patch"
        )
    if n_values == 0:
        return (
            "it got a gradient that did not pass through its patched forward (the weight is used outside "
            "its module, e.g. `x @ module.weight`, or the module ran under no_grad with its output reused)"
        )
    if len(entry.sources) > 1 and n_values == len(entry.sources) * n_examples:
        return (
            f"the parameter is shared by {len(entry.sources)} patched modules, each reporting its own part; "
            "per-example norms of the sum cannot be formed from the parts"
        )
    if n_values % n_examples == 0:
        k = n_values // n_examples
        return (
            f"{k}× the examples: the module ran {k} times per example (called several times in one "
            "forward: |a+b|² cannot be formed from |a|², |b|²), or its input is sequence-first (T, B, D) "
            "so that dim 0 counts positions; leave it unpatched or give each call its own module"
        )
    if n_values < n_examples:
        return (
            "fewer values than examples: part of the step's backward passes did not reach the patched "
            "forward, or zero_stats ran within the step"
        )
    return (
        "the module's input does not put examples along dim 0 (sequence-first or token-flattened rows "
        "that could not be regrouped)"
    )


def check_step_statistics(
    model: nn.Module,
    n_examples: int,
    parameters: list[torch.Tensor] | None = None,
    on_incomplete: str = "error",
) -> list[IncompleteStatistics]:
    """Check that every tracked parameter has exactly one per-example value per example of the step.

    Call it once per optimizer step, after the step's backward passes and before reading the
    statistics. Host-side only (tensor shapes, `param.grad is not None`): no host-device sync.
    A tracked parameter is incomplete when its values do not number `n_examples` and it got a
    gradient (or got some values but not `n_examples`): zero values with a gradient means the
    gradient bypassed the fused op (the forward was rebound after patching, e.g. by Liger, or
    the weight is used outside its module); k·`n_examples` values a module called k times per
    forward, a shared weight or a sequence-first input. A parameter with neither values nor
    gradient was simply not used this step and is fine. Gradients must be reset to `None`
    between steps (`zero_grad(set_to_none=True)`, the default).

    Args:
        model (`nn.Module`): the patched model (or a wrapper around it).
        n_examples (`int`): examples of this step on this process (documents for
            padding-free batches): what every tracked parameter must have.
        parameters (`list[torch.Tensor]`, *optional*): check only these (e.g. the ones a
            trainer still tracks after dropping incomplete ones); all tracked by default.
        on_incomplete (`str`, *optional*, defaults to `"error"`): `"error"` raises
            `IncompleteStatisticsError` naming every incomplete parameter, its module and
            the likely cause; `"warn"` warns once per call and returns them, for the caller
            to drop from its estimate.

    Returns:
        `list[IncompleteStatistics]`: empty when every checked parameter is complete.
    """
    if on_incomplete not in INCOMPLETE_MODES:
        raise ValueError(f"on_incomplete must be one of {INCOMPLETE_MODES}, got {on_incomplete!r}")
    if _guard_plan(model).all_complete(n_examples):  # the steady state: a few host compares
        return []
    wanted = None if parameters is None else {id(p) for p in parameters}
    incomplete = []
    for key, entry in _tracked(model).items():
        if wanted is not None and key not in wanted:
            continue
        n_values = entry.n_values()
        if n_values == n_examples or (n_values == 0 and entry.param.grad is None):
            continue
        modules = tuple(dict.fromkeys(state.name for _, state, _ in entry.sources))
        cause = _cause(entry, n_values, n_examples)
        incomplete.append(IncompleteStatistics(entry.name, modules, n_values, n_examples, cause))
    if incomplete:
        lines = "\n".join(f"  {item}" for item in incomplete)
        if on_incomplete == "error":
            raise IncompleteStatisticsError(
                f"hf_gns: {len(incomplete)} tracked parameters lack exact per-example statistics this step; "
                f"no GNS is computed from them:\n{lines}"
            )
        warnings.warn(
            f"hf_gns: dropping {len(incomplete)} tracked parameters without exact per-example statistics "
            f"from the estimate:\n{lines}",
            stacklevel=2,
        )
    return incomplete


def zero_stats(model: nn.Module) -> None:
    """Forget the per-example squared norms collected so far (call once per optimizer step)."""
    for state in _layout(model)[1]:
        state.sinks.clear()
