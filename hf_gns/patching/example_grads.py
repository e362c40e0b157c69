"""Per-example gradient VECTORS, for parameters whose gradient comes from several calls per forward.

A norm module called twice in one forward (XMOD's `output.LayerNorm`, Gemma3n's
`altup.router_norm`), one weight held by several modules (Zamba's `shared_transf`
layers), or a Linear called twice in one forward: example b's contribution is the sum
a_b + b_b of the calls', and |a_b + b_b|² cannot be made from |a_b|² and |b_b|². Vectors
can be added, squared norms cannot. So these parameters take another path:

- one *vector leaf* per forward and parameter group, a (B, N) fp32 zero leaf (N = weight
  numel + bias numel; expanded, no memory), shared by every call of that forward;
- each call's op sends example b's gradient VECTOR of the parameters to row b of the
  leaf's gradient; autograd adds the calls up (one leaf, several uses: the engine sums
  them before accumulating), so `leaf.grad` is the per-example gradient of the step's
  forward, exactly, over all calls and all modules sharing the parameters;
- a post-accumulate-grad hook turns it into the (B, 2) squared norms |c_b(weight)|²,
  |c_b(bias)|² that every other module yields, in the owner's `SquaredNormSinks.collected`:
  statistics, the report and the guard see one entry of B values per backward, as for any
  module. Under reentrant checkpointing the leaf receives its gradient in several partial
  backward passes: `.grad` keeps accumulating and the entry is rewritten each time, so it
  ends as the squared norm of the sum.

Memory: B·N fp32 per group and forward (norms: B·2D, tiny). Linear and Embedding weights
are refused above `VECTOR_BUDGET_BYTES` with an error naming the module (never a wrong
number); set `HF_GNS_VECTOR_BUDGET_MB` to raise the budget.
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref

import torch

from .sinks import SquaredNormSinks

# Per group and forward: B × (weight + bias elements) × 4 bytes of fp32 per-example gradients.
VECTOR_BUDGET_BYTES = int(float(os.environ.get("HF_GNS_VECTOR_BUDGET_MB", "256")) * 2**20)


_CURRENT_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)  # private torch API, so guarded


def current_backward_id() -> int:
    """An id of the running backward pass (-1 outside backward)."""
    return -1 if _CURRENT_GRAPH_TASK_ID is None else _CURRENT_GRAPH_TASK_ID()


class ExampleGradVectors:
    """Per-forward vector leaves of one parameter group, and their squared norms.

    Args:
        name (`str`): the owner module's name (for messages).
        sinks (`SquaredNormSinks`): the owner's sinks; the (B, 2) squared norms go to their
            `collected`, which statistics read.
        widths (`tuple[int, int]`): elements of the weight and of the bias (0: none).
        members (`tuple[str, ...]`): every module sending gradients here (for messages).
    """

    def __init__(self, name: str, sinks: SquaredNormSinks, widths: tuple[int, int], members=()):
        self.name = name
        self.sinks = sinks
        self.widths = widths
        self.members = tuple(members) or (name,)
        self._key: tuple[int, int] | None = None  # (forward index, B) of `_leaf`
        self._leaf: torch.Tensor | None = None
        self._entry: tuple[weakref.ref, torch.Tensor] | None = None  # (leaf, its entry in collected)
        # Keep `leaf.grad` after collecting (modules known to be called several times, whose leaf can
        # get gradients in several backward passes under reentrant checkpointing); a discovering
        # module's leaf drops it at once, so that a first step's vectors do not pile up.
        self.keep_grads = False

    @property
    def width(self) -> int:
        return self.widths[0] + self.widths[1]

    def fits(self, n_examples: int) -> bool:
        """Whether B·N fp32 fit the budget."""
        return n_examples * self.width * 4 <= VECTOR_BUDGET_BYTES

    def check_budget(self, n_examples: int) -> None:
        """Raise a `RuntimeError` naming the module when B·N fp32 exceed the budget."""
        needed = n_examples * self.width * 4
        if not self.fits(n_examples):
            members = ", ".join(repr(m) for m in self.members)
            raise RuntimeError(
                f"hf_gns: {members} contribute to one parameter several times per forward (a module "
                "called twice, or a weight shared by modules); exact per-example norms need the per-example "
                f"gradient vectors, {needed / 2**20:.0f} MiB for B={n_examples}, over the budget of "
                f"{VECTOR_BUDGET_BYTES / 2**20:.0f} MiB (HF_GNS_VECTOR_BUDGET_MB). Raise the budget, or "
                "freeze these modules or leave them unpatched"
            )

    def ready(self, forward_index: int, n_examples: int, device: torch.device) -> None:
        """Make the leaf of forward `forward_index` ahead of its calls, outside any compiled graph.

        The model hook does this at the start of every forward once a module of the model takes
        the vector path (`model_hook._next_forward`), so that compiled calls find their leaf
        ready (`leaf_for`). Over the budget it makes nothing: the call raises, naming the module."""
        if self.fits(n_examples):
            self._leaf_of_forward(forward_index, n_examples, device)

    def leaf_for(self, model_hook, n_examples: int, device: torch.device) -> torch.Tensor:
        """The (B, N) zero leaf of the current forward of `model_hook`.

        In a compiled graph: the leaf `ready` made for this forward, read as a graph input (no
        guard on the forward index or on the leaf's identity, so no graph break and no
        recompilation). The model hook readies it at the start of every forward of a model with
        vector-path modules (as plain Python under `torch.compile(model)`, in one
        `torch.compiler.disable`d call where a larger compiled region traces the hook), so it is
        always this forward's. Eager calls, and a compiled call that finds no leaf of its shape,
        take it by forward index outside the graph."""
        if torch.compiler.is_compiling():
            leaf = self._leaf
            if leaf is not None and leaf.shape[0] == n_examples and leaf.device == device:
                return leaf
        return self._leaf_outside_graph(model_hook, n_examples, device)

    @torch.compiler.disable
    def _leaf_outside_graph(self, model_hook, n_examples: int, device: torch.device) -> torch.Tensor:
        """The leaf keyed by (forward index, B), made on the forward's first call. Outside compiled
        graphs (a graph break per call under torch.compile): the forward index and the leaf change
        every forward and must not become guards."""
        return self._leaf_of_forward(model_hook.forward_index, n_examples, device)

    def _leaf_of_forward(self, forward_index: int, n_examples: int, device: torch.device) -> torch.Tensor:
        """The leaf of forward `forward_index`, made (budget checked) unless it already exists."""
        key = (forward_index, n_examples)
        leaf = self._leaf
        if leaf is None or self._key != key or leaf.device != device:
            self.check_budget(n_examples)
            leaf = _new_leaf(self, n_examples, device)
            self._leaf, self._key = leaf, key
        return leaf

    def _collect(self, leaf: torch.Tensor) -> None:
        """Post-accumulate-grad hook: (B, 2) squared norms of the summed per-example vectors."""
        grad = leaf.grad.float()
        weight_width = self.widths[0]
        sq_norms = torch.stack(
            [grad[:, :weight_width].square().sum(1), grad[:, weight_width:].square().sum(1)], dim=1
        )
        if not self.keep_grads:
            leaf.grad = None
        collected = self.sinks.collected
        if self._entry is not None and self._entry[0]() is leaf:  # a later partial backward of the same leaf
            index = next((i for i, entry in enumerate(collected) if entry is self._entry[1]), None)
            if index is not None:
                collected[index] = sq_norms
                self._entry = (self._entry[0], sq_norms)
                return
        collected.append(sq_norms)
        self._entry = (weakref.ref(leaf), sq_norms)

    def __deepcopy__(self, memo):
        # The hooks of our leaves point at this object; a copy starts empty, with the copied sinks.
        vectors = ExampleGradVectors(self.name, copy.deepcopy(self.sinks, memo), self.widths, self.members)
        vectors.keep_grads = self.keep_grads
        return vectors


@torch.compiler.disable
def _new_leaf(owner: ExampleGradVectors, n_examples: int, device: torch.device) -> torch.Tensor:
    # Its values are never read (the ops only send gradients to it): a stride-0 zero costs no memory.
    zero = torch.zeros((), dtype=torch.float32, device=device)
    leaf = zero.expand(n_examples, owner.width).detach().requires_grad_()
    leaf.register_post_accumulate_grad_hook(owner._collect)
    return leaf


class CallCounter:
    """Counts a module's calls per forward, to find modules called more than once.

    A forward is keyed by the model hook's forward index and the running backward pass
    (calls recomputed by reentrant activation checkpointing run in their own backward, so a
    module called once per layer is not mistaken for one called twice). Counting runs in
    eager mode only (under torch.compile the Python counter would force recompiles).
    """

    def __init__(self):
        self._key: tuple[int, int] | None = None
        self.calls_in_forward = 0
        self.forwards = 0  # forwards in which the module was called

    def note(self, forward_index: int, backward_id: int | None = None) -> int:
        """Record a call; returns how many calls this forward has seen, this one included
        (`backward_id`: `current_backward_id()`, when the caller has it)."""
        key = (forward_index, current_backward_id() if backward_id is None else backward_id)
        if key != self._key:
            self._key, self.calls_in_forward = key, 0
            self.forwards += 1
        self.calls_in_forward += 1
        return self.calls_in_forward


# How a module's calls are routed (`CallRouting.mode`):
# - "discover": the module's first forward (eager): vectors, exact whatever the number of calls;
# - "single": one call per forward: per-example squared norms straight from the op;
# - "multi": found called several times per forward: vectors from then on;
# - "shared": parameters shared with other modules, or one module under several names: vectors.
ROUTING_MODES = ("discover", "single", "multi", "shared")


class CallRouting:
    """Decides per call whether a module's parameters take the vector path.

    A module's first forward (eager mode) runs on the vector path and counts its calls, so
    that it is exact whatever the count; from the next forward on, a module called once takes
    the squared-norm path. Vectors cost B·N fp32 per module (norms: B·2D; their op saves no
    more than the fused one, see `forward.py`). Linears and embeddings whose vectors exceed
    `VECTOR_BUDGET_BYTES` skip discovery and count on the squared-norm path: if such a module
    turns out to be called twice, `check_budget` raises naming it. A module found called twice
    after discovery (a data-dependent path) makes its step have more values than examples,
    which `check_step_statistics` flags; from the next forward on its calls are summed.
    Under non-reentrant activation checkpointing the recomputation during backward replays the
    original forward's choices (the same ops must run again). Under torch.compile nothing is
    counted: "discover" behaves as "single".

    Args:
        name (`str`): module name.
        sinks (`SquaredNormSinks`): the module's sinks (where vector groups report).
        widths (`tuple[int, int]`): elements of weight and bias.
        mode (`str`): the starting mode (see `ROUTING_MODES`).
        vectors (`ExampleGradVectors`, *optional*): a group shared with other modules ("shared").
    """

    def __init__(self, name, sinks, widths, mode="discover", vectors=None):
        if mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {ROUTING_MODES}, got {mode!r}")
        self.name = name
        self.sinks = sinks
        self.widths = widths
        self.mode = mode
        self.note = ""  # for the report, e.g. ", weight shared with 'x': summed per example"
        self.counter = CallCounter()
        self.vectors = vectors
        if vectors is None and mode != "single":
            self.vectors = ExampleGradVectors(name, sinks, widths)
        if self.vectors is not None:
            self.vectors.keep_grads = mode == "shared"
        self._original: tuple[int, list] = (-1, [])  # (forward index, choice of each call outside backward)
        self._replayed = 0

    @property
    def counts_calls(self) -> bool:
        """Modes "single" and "discover": calls are counted (eager) and, under torch.compile, take
        the squared-norm path; "multi" and "shared" calls always take the vectors."""
        return self.mode in ("single", "discover")

    def vectors_for_call(self, model_hook) -> ExampleGradVectors | None:
        """The vector group this call must use, or None for the squared-norm path."""
        if torch.compiler.is_compiling():  # `counts_calls` inline: traced, a property guards on the class
            return None if self.mode in ("single", "discover") else self.vectors
        forward_index = model_hook.forward_index
        backward_id = current_backward_id()
        in_backward = backward_id != -1
        if in_backward and self._original[0] == forward_index:  # non-reentrant checkpoint recomputation
            choices = self._original[1]
            choice = choices[self._replayed % len(choices)]
            self._replayed += 1
            return choice
        if self.counts_calls:
            self._count(model_hook, backward_id)
        choice = None if self.mode == "single" else self.vectors
        if not in_backward:
            if self._original[0] != forward_index:
                self._original, self._replayed = (forward_index, []), 0
            self._original[1].append(choice)
        return choice

    def _count(self, model_hook, backward_id: int | None = None) -> None:
        calls = self.counter.note(model_hook.forward_index, backward_id)
        if self.mode == "discover":
            if self.counter.forwards > 1 and calls == 1:  # the first forward had one call
                self.mode, self.vectors = "single", None
            elif calls == 1 and not self.vectors.fits(model_hook.batch_size or 1):
                self.mode, self.vectors = "single", None  # too big to discover with vectors: count
            elif calls == 2:
                self.mode, self.vectors.keep_grads = "multi", True
                model_hook.counts_forwards = True
            return
        if calls != 2:
            return
        vectors = ExampleGradVectors(self.name, self.sinks, self.widths)
        vectors.check_budget(model_hook.batch_size or 1)
        vectors.keep_grads = True
        self.mode, self.vectors = "multi", vectors
        model_hook.counts_forwards = True
        warnings.warn(
            f"hf_gns: {self.name!r} is called more than once per forward; its per-example norms of this "
            "step are not exact (its first call took the single-call path, so it has more values than "
            "examples and check_step_statistics flags the step). From the next forward on, its calls "
            "are summed per example exactly.",
            stacklevel=4,
        )

    def __deepcopy__(self, memo):
        routing = CallRouting(self.name, copy.deepcopy(self.sinks, memo), self.widths, "single")
        routing.counter = copy.deepcopy(self.counter, memo)
        routing.mode, routing.note = self.mode, self.note
        routing.vectors = None if self.vectors is None else copy.deepcopy(self.vectors, memo)
        return routing
