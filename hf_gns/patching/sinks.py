"""Sinks: how per-example squared norms get out of backward, eagerly and under torch.compile.

`fused_norm` returns |dγ_b|², |dβ_b|² as the gradient of a (B, 2) fp32 leaf, the sink.
Each norm module owns a `SquaredNormSinks`:

- `take(x)` hands the forward a sink of the right shape. It reuses a spare one when it
  can and only makes a new leaf otherwise.
- A post-accumulate-grad hook on every sink moves `sink.grad` into `collected` (one (B, 2)
  tensor per backward pass, in order), clears the grad and puts the sink back as the
  spare for the next forward.

Why this shape:
- torch.compile cannot create a tensor with `requires_grad=True` inside a graph (Dynamo
  graph-breaks: "Create the tensor outside the compiled region"). Sinks are made outside
  any graph — by the model-level pre-hook before the first forward (`model_hook.py`), and
  recycled by the grad hook during backward — and enter compiled forwards as ordinary
  graph inputs, so there is no graph break in the norms.
- Hooks run in the autograd engine, also for compiled graphs, and collect only sinks
  that really received a gradient. That handles both kinds of activation checkpointing:
  reentrant checkpointing runs the first forward under no_grad (no sink) and the
  recomputation's sink gets the gradient; non-reentrant checkpointing sends the
  gradient to the first forward's sink and the recomputation's sink gets none.
- Sinks that never get a gradient (a forward without backward) are simply dropped with
  their autograd graph: nothing accumulates.
- No host-device sync: the hook only stores a reference to the gradient tensor.

A module called twice within one forward (a shared norm) yields two sinks, and their
squared norms are not those of the summed per-example gradient (|a+b|² ≠ |a|²+|b|²). The
hook notices two gradients for one module within one backward pass and warns once.
"""

from __future__ import annotations

import warnings

import torch

from ..kernels import new_sq_norm_sink

# Backward passes collected without zero_stats before we suspect nobody reads the statistics.
_UNREAD_WARNING_AT = 10_000


def _current_backward_id() -> int:
    """An id of the running backward pass (-1 outside backward); private torch API, so guarded."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if current is None else current()


def new_sink_for(owner: SquaredNormSinks, n_examples: int, device: torch.device) -> torch.Tensor:
    """A fresh (B, 2) sink leaf (as `new_sq_norm_sink` makes) whose gradient goes to `owner`."""
    sink = new_sq_norm_sink(n_examples, device)
    sink.register_post_accumulate_grad_hook(owner._collect)
    return sink


@torch.compiler.disable
def _new_sink_outside_graph(owner: SquaredNormSinks, n_examples: int, device: torch.device) -> torch.Tensor:
    return new_sink_for(owner, n_examples, device)


class SquaredNormSinks:
    """Hands out sinks to one norm module and keeps the per-example squared norms they receive.

    Args:
        name (`str`): the module's name, for warnings.
    """

    def __init__(self, name: str):
        self.name = name
        self.spare: torch.Tensor | None = None  # a (B, 2) leaf with grad None, ready for the next call
        self.collected: list[torch.Tensor] = []  # (B, 2) fp32 per backward pass: |dγ_b|², |dβ_b|²
        self._last_backward_id = -1
        self.reused_in_one_backward = False

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A sink for a forward on `x` (examples along dim 0)."""
        return self.take_for(x.shape[0] if x.dim() > 1 else 1, x.device)

    def take_for(self, n_examples: int, device: torch.device) -> torch.Tensor:
        """A (n_examples, 2) sink on `device`, for inputs whose examples are not along dim 0."""
        sink = self.spare if self.has_spare(n_examples, device) else None
        if sink is None:  # normally made ahead by the model hook; a graph break under compile
            sink = _new_sink_outside_graph(self, n_examples, device)
        self.spare = None
        return sink

    def has_spare(self, n_examples: int, device: torch.device) -> bool:
        """Whether a recycled sink of shape (n_examples, 2) on `device` is ready."""
        spare = self.spare
        return spare is not None and spare.shape[0] == n_examples and spare.device == device

    def _collect(self, sink: torch.Tensor) -> None:
        """Post-accumulate-grad hook: keep this backward's norms, recycle the sink."""
        self.collected.append(sink.grad)
        sink.grad = None
        if len(self.collected) == _UNREAD_WARNING_AT:
            warnings.warn(
                f"hf_gns: {self.name!r} has collected per-example norms of {_UNREAD_WARNING_AT} backward "
                "passes; they stay in memory until hf_gns.zero_stats(model), call it once per optimizer step",
                stacklevel=2,
            )
        self._check_single_use()
        if self.spare is None:
            self.spare = sink

    def _check_single_use(self) -> None:
        backward_id = _current_backward_id()
        if backward_id != -1 and backward_id == self._last_backward_id and not self.reused_in_one_backward:
            self.reused_in_one_backward = True
            warnings.warn(
                f"hf_gns: norm module {self.name!r} got gradients from two calls within one backward pass. "
                "If it is applied twice in one forward (a shared norm), its per-example squared norms are "
                "wrong (|a+b|² ≠ |a|²+|b|²) and the values of both calls appear as separate examples. "
                "Give each call its own module, or leave this module unpatched.",
                stacklevel=2,
            )
        self._last_backward_id = backward_id

    def clear(self) -> None:
        """Forget the collected norms (the spare sink stays)."""
        self.collected.clear()

    def __deepcopy__(self, memo):
        # The hooks of our sinks point at this object; a copy starts empty.
        return SquaredNormSinks(self.name)
