"""The one forward pre-hook `patch` puts on the model: batch size and sinks, before each forward.

Batch size. `fused_norm` takes dim 0 of its input as the example dim. That holds for
(B, T, D) and (B, T, H, Dh) inputs, but some models flatten tokens before a norm: OPT's
decoder layers call `final_layer_norm` on `hidden_states.reshape(-1, D)`, a (B·T, D)
input whose dim 0 indexes tokens. Per-token squared norms cannot be summed into
per-example ones (|Σ_t a_t|² ≠ Σ_t |a_t|²), so such inputs are regrouped to (B, T, D)
before the op. The hook records B from `input_ids` / `inputs_embeds` (or the first tensor
argument) and keeps it until the next forward, so that the recomputation of reentrant
activation checkpointing, which runs during backward, still sees it. Only 2-D inputs
whose row count is a multiple of B other than B itself are regrouped; flattening is
batch-major (`reshape(-1, D)` of (B, T, D)), so example b owns rows b·T … (b+1)·T − 1.

Sinks. Every patched module needs a (B, 2) sink leaf per forward (see `sinks.py`), and
torch.compile cannot create leaves inside a graph. Under `torch.compile(model)` (the Trainer's
`torch_compile`) the hook is a frame of its own, which Dynamo is told to run as plain Python
(`_run_top_level_hook_frames_eagerly`): it makes what is missing as in eager mode. Where a
larger compiled region inlines the model's call, the hook is traced into that graph; there
`prepare_sinks(model, inputs)`, called before the compiled call, readies the sinks outside
the graph, and the traced hook finds them and does nothing (no graph break, the same guards
at every step). Without it, that traced hook makes the missing ones in one
`torch.compiler.disable`d call: one graph break at the very top of the first step (and of
the first step after B changes) and a recompilation once the sinks exist. Modules whose
input does not have B rows make their own sink on first use. The hook also writes the forward's
examples to every module's sinks (`note_examples`): the compiled norm forward reads them there,
from an object of its own, instead of reading this hook, which all modules share (Dynamo adds
an identity guard for each module that reaches a shared object).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .documents import example_offsets_from_batch

if TYPE_CHECKING:
    from .forward import NormPatch

HOOK_ATTRIBUTE = "_hf_gns_model_hook"
# Set on the object given to `patch` even when nothing was patched, so that the statistics
# functions can tell "patched, nothing found" from "never patched".
PATCHED_MARK = "_hf_gns_patched"
_BATCH_KWARGS = ("input_ids", "inputs_embeds")
# Keyword arguments by which a padding-free batch marks its documents (`documents.py`).
_DOCUMENT_KWARGS = ("cu_seq_lens_q", "position_ids")
# Outside any compiled graph: finding documents from position_ids reads them on the host.
_documents_of = torch.compiler.disable(example_offsets_from_batch)
_GENERATION = [0]


def patch_generation() -> int:
    """A counter that `patch` and `unpatch` bump: caches of what a model tracks compare it."""
    return _GENERATION[0]


def bump_patch_generation() -> None:
    _GENERATION[0] += 1


def _device(module: nn.Module) -> torch.device:
    """Where a patched module's sinks live: its parameters' device (not every norm has a `weight`).
    Read from `_parameters` directly: `module.parameters()` builds a generator chain, ~20x slower, and
    this runs for every patched module twice per forward."""
    for param in module._parameters.values():
        if param is not None:
            return param.device
    for param in module.parameters():  # a per-example call tracking its submodules' parameters
        return param.device
    raise StopIteration(f"{type(module).__name__} has no parameter")


@torch.compiler.disable
def _make_sinks(owners: list[tuple[nn.Module, NormPatch]], n_examples: int) -> None:
    for module, state in owners:
        state.sinks.prepare(n_examples, _device(module))


@torch.compiler.disable
def _next_forward(hook: ModelForwardHook, n_examples: int) -> None:
    """Count a forward and, once a module takes the vector path, ready this forward's gradient-vector
    leaves (`ExampleGradVectors.ready`): compiled calls then read them as graph inputs."""
    hook.forward_index += 1
    if not hook.counts_forwards:  # no module on the vector path (the patcher or discovery sets it)
        return
    for module, state in hook.norms:
        routing = getattr(state, "routing", None)
        if routing is not None and routing.vectors is not None and routing.mode in ("multi", "shared"):
            routing.vectors.ready(hook.forward_index, n_examples, _device(module))


class ModelForwardHook:
    """State of the model-level pre-hook, shared by the model's patched modules.

    Attributes:
        batch_size (`int`, *optional*): B of the current (or last) forward.
        norms (`list[tuple[nn.Module, NormPatch]]`): the patched modules of this model (norms and,
            with `targets="all"`, layers): the owners of sinks.
        example_offsets (`torch.Tensor`, *optional*): for a padding-free batch, its documents as
            token offsets (int64 (E+1,), `hf_gns.patching.documents`): the examples are then
            documents, not rows, and sinks have E rows. None for ordinary batches.
        token_shape (`tuple[int, int]`, *optional*): (B, T) of the current forward's tokens.
        forward_index (`int`): counts forwards, so that modules can tell calls of one forward
            from the next (`example_grads.py`); advanced in eager mode, and under torch.compile
            (a graph break, outside the graph) only once `counts_forwards` is set by a module
            that needs per-forward gradient vectors.
    """

    def __init__(self):
        self.batch_size: int | None = None
        self.norms: list[tuple[nn.Module, NormPatch]] = []
        self.example_offsets: torch.Tensor | None = None
        self.token_shape: tuple[int, int] | None = None
        self.forward_index = 0
        self.counts_forwards = False

    def read_batch(self, args: tuple, kwargs: dict) -> int | None:
        """Record B, (B, T) and the documents of a padding-free batch from a forward's arguments;
        returns the number of examples: documents when the batch marks them, else rows (None: no
        tensor argument)."""
        candidates = [kwargs.get(key) for key in _BATCH_KWARGS] + list(args)
        batch = next((v for v in candidates if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
        if batch is None:
            return None
        self.batch_size = batch.shape[0]
        self.token_shape = tuple(batch.shape[:2]) if batch.dim() >= 2 else None
        self.example_offsets = None
        # Only batches that can mark documents pay for looking (a host read, a graph break under
        # compile): ordinary Trainer batches carry neither key and stay break-free.
        if torch.is_grad_enabled() and any(kwargs.get(key) is not None for key in _DOCUMENT_KWARGS):
            self.example_offsets = _documents_of(kwargs)
        if self.example_offsets is not None:
            return self.example_offsets.shape[0] - 1  # documents (E is known on the host)
        return self.batch_size

    def note_examples(self, n_examples: int | None) -> None:
        """Tell every owner's sinks the examples of this forward when they are its input rows, where the
        compiled norm forward reads them (`SquaredNormSinks.forward_examples`); None for documents and
        for modules whose calls take per-example vectors (`CallRouting.counts_calls` False), which take
        the general path: the compiled forward then reads no routing."""
        rows = n_examples if self.example_offsets is None else None
        for _, state in self.norms:
            sinks = getattr(state, "sinks", None)
            if sinks is not None:
                routing = getattr(state, "routing", None)
                takes_vectors = routing is not None and not routing.counts_calls
                sinks.forward_examples = None if takes_vectors else rows

    def missing_sinks(self, n_examples: int) -> list[tuple[nn.Module, NormPatch]]:
        """The owners that will need a sink in this forward and have no ready spare."""
        missing = []
        for module, state in self.norms:
            # in steady state every owner has its spare: checked inline (runs twice per forward)
            spare = state.sinks.spare
            if spare is not None and spare.shape[0] == n_examples and spare.device == _device(module):
                continue
            if state.tracks_gradients(module):
                missing.append((module, state))
        return missing

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook (`with_kwargs=True`). Plain Python in eager mode and as a top-level frame
        under `torch.compile(model)`. Traced into a larger compiled graph, it only reads the spares
        `prepare_sinks` readied (no graph break, the same guards every step); unprepared, it makes
        them in one graph break at the top of the forward."""
        n_examples = self.read_batch(args, kwargs)
        self.note_examples(n_examples)
        if n_examples is None or not torch.is_grad_enabled():
            return
        if self.counts_forwards or not torch.compiler.is_compiling():
            _next_forward(self, n_examples)
        missing = self.missing_sinks(n_examples)
        if missing:
            _make_sinks(missing, n_examples)

    def group_rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as (B, rows, D) if it is a flattened (B·rows, D) input, else `x` itself."""
        n_examples = self.batch_size
        if self.example_offsets is not None:  # documents: rows are addressed by offsets, not regrouped
            return x
        if x.dim() != 2 or n_examples is None or x.shape[0] == n_examples or x.shape[0] % n_examples:
            return x
        return x.reshape(n_examples, x.shape[0] // n_examples, x.shape[1])


def _run_top_level_hook_frames_eagerly() -> bool:
    """Have Dynamo run `ModelForwardHook.__call__` as plain Python when it meets it as a frame of
    its own; returns whether it could (the API is private: without it nothing changes).

    `torch.compile(model)` (the Trainer's `torch_compile=True`) traces a module's pre-hooks as
    frames of their own, before the forward's frame. Compiled, this hook's frame checks guards on
    every sink and patched module at every call (~800 for 25 norms), one more cache lookup a step:
    in an H200 profile of the compiled Llama-124M Trainer step (25 norms, profiler on), the two
    frames' lookups took 1.0 ms a step against 0.27 ms for the plain Trainer's one. Running the
    hook's Python instead costs ~23 µs (25 norms, CPU). Skipped, the hook and everything it calls
    run eagerly, as in an eager forward. Where a larger compiled region inlines the model's call
    (`torch.compile` of a training step), the hook is still traced into that graph: frame
    strategies apply only to frames Dynamo starts on, never to inlined calls, so that stays free
    of graph breaks.
    """
    try:
        from torch._C._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        strategy = FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP)  # this frame and its callees
        set_code_exec_strategy(ModelForwardHook.__call__.__code__, strategy)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - torch < 2.6: stays compiled
        return False
    return True


HOOK_RUNS_EAGERLY = _run_top_level_hook_frames_eagerly()

_HOOKS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hooks_of(model: nn.Module) -> list[ModelForwardHook]:
    cached = _HOOKS_OF.get(model)
    if cached is not None and cached[0] == patch_generation():
        return cached[1]
    hooks = [m.__dict__[HOOK_ATTRIBUTE][0] for m in model.modules() if HOOK_ATTRIBUTE in m.__dict__]
    _HOOKS_OF[model] = (patch_generation(), hooks)
    return hooks


@torch.compiler.disable
def prepare_sinks(model: nn.Module, inputs: dict) -> None:
    """Ready the sinks of the next forward of `model` on `inputs`, outside any compiled graph.

    Call it right before each forward of a model that runs under `torch.compile` (GNSTrainer
    does, in `training_step`): a compiled graph that traces the model's pre-hook (a compiled
    function calling the model) then finds every sink ready, so hf_gns adds no graph break and
    no recompilation. Without it such a graph makes the missing sinks itself, at the cost of one
    graph break at its top (and a recompilation on the next step). Under `torch.compile(model)`
    the hook runs as Python (`_run_top_level_hook_frames_eagerly`) and needs no help. A no-op
    when nothing is missing; eager forwards do not need it.

    Args:
        model (`nn.Module`): the patched model, or any wrapper around it (DDP, compiled, PEFT).
        inputs (`dict`): the keyword arguments of the forward (`input_ids` or `inputs_embeds`).
    """
    if not torch.is_grad_enabled():
        return
    for hook in _hooks_of(model):
        n_examples = hook.read_batch((), inputs)
        hook.note_examples(n_examples)
        if n_examples is not None:
            for module, state in hook.missing_sinks(n_examples):
                state.sinks.prepare(n_examples, _device(module))


def attach_model_hook(model: nn.Module) -> ModelForwardHook:
    """The pre-hook state of `model`, registering the hook on the first call."""
    existing = model.__dict__.get(HOOK_ATTRIBUTE)
    if existing is not None:
        return existing[0]
    hook = ModelForwardHook()
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    setattr(model, HOOK_ATTRIBUTE, (hook, handle))
    return hook


def detach_model_hooks(model: nn.Module) -> None:
    """Remove every pre-hook `attach_model_hook` put on `model` or its submodules (and the patch marks)."""
    for module in model.modules():
        module.__dict__.pop(PATCHED_MARK, None)
        entry = module.__dict__.get(HOOK_ATTRIBUTE)
        if entry is not None:
            entry[1].remove()
            delattr(module, HOOK_ATTRIBUTE)
