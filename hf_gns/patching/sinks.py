"""Sinks: how per-example squared norms get out of backward, eagerly and under torch.compile.

`fused_norm` returns |dγ_b|², |dβ_b|² as the gradient of a (B, 2) fp32 leaf, the sink.
Each norm module owns a `SquaredNormSinks`:

- `take(x)` hands the forward the `spare` sink when it has the right shape. Only when it
  has not does it make one (from the `pool` of recycled sinks, or a new leaf).
- A post-accumulate-grad hook on every sink moves `sink.grad` into `collected` (one (B, 2)
  tensor per backward pass, in order), clears the grad and puts the sink back as the
  spare for the next forward (or into the pool when a spare is already there).
- `prepare(n, device)` readies a spare ahead of a forward, outside any compiled graph.

Why this shape:
- torch.compile cannot create a tensor with `requires_grad=True` inside a graph (Dynamo
  graph-breaks: "Create the tensor outside the compiled region"). Sinks are made outside
  any graph — by `prepare_sinks` before a compiled forward (the trainer calls it in
  `training_step`), by the model-level pre-hook in eager mode (`model_hook.py`), and
  recycled by the grad hook during backward — and enter compiled forwards as ordinary
  graph inputs. Compiled code reads only `spare` (never the pool, whose length Dynamo
  would guard on), and finds it ready at every step, so the compiled graph neither
  breaks nor recompiles.
- Hooks run in the autograd engine, also for compiled graphs, and collect only sinks
  that really received a gradient. That handles both kinds of activation checkpointing:
  reentrant checkpointing runs the first forward under no_grad (no sink) and the
  recomputation's sink gets the gradient; non-reentrant checkpointing sends the
  gradient to the first forward's sink and the recomputation's sink gets none.
- Sinks that never get a gradient (a forward without backward) are simply dropped with
  their autograd graph: nothing accumulates.
- No host-device sync: the hook only stores a reference to the gradient tensor.

A module called twice within one forward (a shared norm) yields two sinks, and their
squared norms are not those of the summed per-example gradient (|a+b|² ≠ |a|²+|b|²): it
collects 2B values for B examples, which `stats.check_step_statistics` turns into an
error naming the module. (Two gradients in one backward pass are no sign of it: two
forwards of the model before one backward, e.g. two micro-batches in one loss, are fine.)
"""

from __future__ import annotations

import warnings

import torch

from ..kernels import new_sq_norm_sink

# Backward passes collected without zero_stats before we suspect nobody reads the statistics.
_UNREAD_WARNING_AT = 10_000
# Recycled sinks kept beyond the spare: as many forwards as may run before one backward.
_POOL_SIZE = 8


def new_sink_for(owner: SquaredNormSinks, n_examples: int, device: torch.device) -> torch.Tensor:
    """A fresh (B, C) sink leaf (as `new_sq_norm_sink` makes, C = `owner.columns`) whose gradient
    goes to `owner`."""
    if owner.columns == 2:
        sink = new_sq_norm_sink(n_examples, device)
    else:  # a module reporting more than two parameters (`per_example_call.py`, `experts.py`)
        sink = torch.empty(n_examples, owner.columns, dtype=torch.float32, device=device, requires_grad=True)
    sink.register_post_accumulate_grad_hook(owner._collect)
    return sink


@torch.compiler.disable
def _new_sink_outside_graph(owner: SquaredNormSinks, n_examples: int, device: torch.device) -> torch.Tensor:
    return new_sink_for(owner, n_examples, device)


def spare_fits(spare: torch.Tensor | None, n_examples: int, device: torch.device) -> bool:
    """Whether `spare` is a sink for `n_examples` examples on `device` (a function, not a method,
    so that compiled code calling it adds no guard on the sinks object's methods)."""
    return spare is not None and spare.shape[0] == n_examples and spare.device == device


class SquaredNormSinks:
    """Hands out sinks to one norm module and keeps the per-example squared norms they receive.

    Args:
        name (`str`): the module's name, for warnings.
        columns (`int`, *optional*, defaults to 2): C, the sink's width: one column per reported
            parameter (a norm's weight and bias, a Linear's; more for modules with more parameters).
    """

    def __init__(self, name: str, columns: int = 2):
        self.name = name
        self.columns = columns
        self.spare: torch.Tensor | None = None  # a (B, C) leaf with grad None, ready for the next call
        self.pool: list[torch.Tensor] = []  # further recycled sinks (eager code only)
        self.collected: list[torch.Tensor] = []  # (B, C) fp32 per backward pass: |dγ_b|², |dβ_b|²
        # Examples of the model's current forward when they are its input rows (None: documents, calls
        # taking per-example vectors, or not known): set by the model hook at every forward, so that
        # the compiled norm forward needs nothing from the hook, which all modules share (`forward.py`,
        # `model_hook.py`).
        self.forward_examples: int | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A sink for a forward on `x` (examples along dim 0)."""
        return self.take_for(x.shape[0] if x.dim() > 1 else 1, x.device)

    def take_for(self, n_examples: int, device: torch.device) -> torch.Tensor:
        """A (n_examples, C) sink on `device`, for inputs whose examples are not along dim 0."""
        if not self.has_spare(n_examples, device):
            if torch.compiler.is_compiling():  # not prepared: a graph break (see prepare_sinks)
                self.spare = _new_sink_outside_graph(self, n_examples, device)
            else:
                self.prepare(n_examples, device)
        sink, self.spare = self.spare, None
        return sink

    def prepare(self, n_examples: int, device: torch.device) -> None:
        """Make sure a (n_examples, C) spare sink on `device` is ready (eager code only)."""
        if self.has_spare(n_examples, device):
            return
        if self.spare is not None and len(self.pool) < _POOL_SIZE:
            self.pool.append(self.spare)
        match = next(
            (i for i, s in enumerate(self.pool) if s.shape[0] == n_examples and s.device == device), None
        )
        self.spare = self.pool.pop(match) if match is not None else new_sink_for(self, n_examples, device)

    def has_spare(self, n_examples: int, device: torch.device) -> bool:
        """Whether a recycled sink of shape (n_examples, C) on `device` is ready."""
        return spare_fits(self.spare, n_examples, device)

    def collect(self, sq_norms: torch.Tensor) -> None:
        """Keep one backward pass's (B, C) squared norms. The hook below calls it with a sink's
        gradient; eager fused norms call it from their backward directly (`fused_norm`'s
        `sq_norm_collector`: no sink leaf, no AccumulateGrad node, no hook per call)."""
        self.collected.append(sq_norms)
        if len(self.collected) == _UNREAD_WARNING_AT:
            warnings.warn(
                f"hf_gns: {self.name!r} has collected per-example norms of {_UNREAD_WARNING_AT} backward "
                "passes; they stay in memory until hf_gns.zero_stats(model), call it once per optimizer step",
                stacklevel=3,
            )

    def _collect(self, sink: torch.Tensor) -> None:
        """Post-accumulate-grad hook: keep this backward's norms, recycle the sink."""
        self.collect(sink.grad)
        sink.grad = None
        if self.spare is None:
            self.spare = sink
        elif len(self.pool) < _POOL_SIZE:
            self.pool.append(sink)

    def clear(self) -> None:
        """Forget the collected norms (the spare and pooled sinks stay)."""
        self.collected.clear()

    def __deepcopy__(self, memo):
        # The hooks of our sinks point at this object; a copy starts empty.
        return SquaredNormSinks(self.name, self.columns)
