"""The forward that `patch` binds onto each norm instance, and the state it reads.

`patched_norm_forward` is a plain module-level function bound with `types.MethodType`, so
`copy.deepcopy(model)` rebinds it to the copy. Everything it needs lives in one instance
attribute, `_hf_gns_state` (a `NormPatch`, `state.py`): no buffers, no parameters, nothing in the
state_dict, and `unpatch` only has to delete two instance attributes.

Two routes, chosen per module at patch time (and per weight dtype where the probe accepted
the fused op for some dtypes only, e.g. NemotronLayerNorm1P: fp32 weights yes, bf16 no):
- `"fused"`: `fused_norm` computes the module's math (`NormSpec`), one kernel;
- `"call"`: the module's own forward per example with per-example parameter copies
  (`per_example_call.py`), for what the fused op cannot express: gated and grouped
  RMSNorms, multi-head LayerNorms, parameters named other than weight/bias.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..kernels import fused_norm, norm_forward_reference
from .documents import offsets_for_rows
from .example_grads import CallRouting, ExampleGradVectors
from .layout import ExampleLayout, back_to_input_layout
from .model_hook import ModelForwardHook
from .per_example_call import per_example_call
from .sinks import SquaredNormSinks, spare_fits
from .spec import NormSpec, resolve_eps, result_dtype
from .state import STATE_ATTRIBUTE, PatchState

try:  # compiled autograd traces backward passes: their norms must come through sinks
    from torch._dynamo import compiled_autograd as _compiled_autograd
except ImportError:  # pragma: no cover - older or trimmed torch
    _compiled_autograd = None

PATCH_ATTRIBUTE = STATE_ATTRIBUTE  # one attribute for every kind's state (`state.py`)
_WEIGHT_AND_BIAS = ("weight", "bias")


@dataclass
class NormPatch(PatchState):
    """Per-instance state of a patched norm module.

    Args:
        name (`str`): the module's name in the model that was patched (for messages).
        spec (`NormSpec`, *optional*): what the module computes, for the fused route (`None`
            when the module only runs the per-example call).
        eps_attr (`str`, *optional*): the attribute holding ε, read at every call (fused route).
        source (`str`): `"registry"` or `"probe"`: how the route was found.
        model_hook (`ModelForwardHook`): the model-level hook (batch size, sink preparation).
        sinks (`SquaredNormSinks`): per-example squared norms collected in backward.
        parameters (`tuple[str | None, str | None]`, *optional*, defaults to `("weight", "bias")`):
            the parameter attributes behind the sink's two columns.
        fused_dtypes (`frozenset[torch.dtype]`, *optional*): weight dtypes for which the fused op
            was verified; other dtypes take the per-example call. `None`: all dtypes, or (with
            `spec=None`) none.
        routing (`CallRouting`, *optional*): fused route only: squared-norm path or per-example
            vectors (modules called several times per forward, parameters shared by modules).
        reports (`bool`): whether statistics list this module's parameters (False for the
            other holders of parameters shared by several modules: the first one reports).
        layout (`ExampleLayout`): where its inputs' examples are (sequence-first or not).
    """

    name: str
    spec: NormSpec | None
    eps_attr: str | None
    source: str
    model_hook: ModelForwardHook = field(default_factory=ModelForwardHook)
    sinks: SquaredNormSinks = field(default=None)
    parameters: tuple[str | None, str | None] = ("weight", "bias")
    fused_dtypes: frozenset | None = None
    routing: CallRouting | None = None
    reports: bool = True
    layout: ExampleLayout = field(default_factory=ExampleLayout)
    dropped_columns: frozenset = frozenset()  # parameters found used outside the module (`outside_use.py`)
    # What the compiled forward reads instead of `spec` (see `compiled_norm_forward`): None where
    # it takes the general path (the per-example call route, parameters other than weight/bias).
    compiled_call: tuple | None = field(init=False, default=None)
    kind: ClassVar[str] = "norm"  # see `kinds.py`

    def __post_init__(self):
        if self.sinks is None:
            self.sinks = SquaredNormSinks(self.name)
        spec = self.spec
        if spec is not None and self.fused_dtypes is None and self.parameters == _WEIGHT_AND_BIAS:
            # a new tuple per module: one object reached from several modules costs Dynamo an
            # identity guard for each
            fields = [spec.rms, spec.weight_offset, spec.cast_before_weight, spec.output_dtype]
            # the last field: whether the module's class has a `bias` attribute (None: not known
            # yet, `note_class` tells), so that the compiled forward need not read `type(module)`
            self.compiled_call = tuple(fields + [spec.autocast_op, self.eps_attr, None])

    def note_class(self, module: nn.Module) -> None:
        """Record in `compiled_call` whether `module`'s class has a `bias` attribute: traced,
        `type(module)` costs an identity guard between the classes of the norms (evaluated in
        Python at every call of the graph), and a `hasattr` guard on the class."""
        if self.compiled_call is not None:
            self.compiled_call = self.compiled_call[:-1] + (hasattr(type(module), "bias"),)

    def __deepcopy__(self, memo):
        # A copied model gets its own, empty statistics (the sinks' hooks point at this object)
        # and shares the copied model's hook.
        model_hook = copy.deepcopy(self.model_hook, memo)
        copied = NormPatch(
            self.name,
            self.spec,
            self.eps_attr,
            self.source,
            model_hook,
            copy.deepcopy(self.sinks, memo),
            self.parameters,
            self.fused_dtypes,
            copy.deepcopy(self.routing, memo),
            self.reports,
            copy.deepcopy(self.layout, memo),
        )
        copied.compiled_call = self.compiled_call
        return copied

    def describe(self) -> str:
        """The route for reports, e.g. `"RMSNorm γ+1 out=input"` or `"per-example call (vmap)"`."""
        call = "per-example call of its own forward (vmap)"
        if self.spec is None:
            return call
        if self.fused_dtypes is None:
            return self.spec.describe()
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.fused_dtypes))
        return f"{self.spec.describe()} for {dtypes} weights, else {call}"

    def may_run_per_example_call(self) -> bool:
        return self.spec is None or self.fused_dtypes is not None

    def uses_call(self, module: nn.Module) -> bool:
        """Whether this call takes the per-example call route (by the module's weight dtype)."""
        if self.spec is None:
            return True
        return self.fused_dtypes is not None and module.weight.dtype not in self.fused_dtypes

    def own_parameters(self, module: nn.Module) -> tuple[torch.Tensor | None, ...]:
        """The parameter behind each column of the module's (B, 2) squared norms (None: no column)."""
        found = (None if attr is None else getattr(module, attr, None) for attr in self.parameters)
        return tuple(p if isinstance(p, torch.Tensor) else None for p in found)

    def reported_parameters(self, module: nn.Module) -> tuple[torch.Tensor | None, ...]:
        """`own_parameters`, or none where another module sharing them reports them."""
        own = self.own_parameters(module)
        if not self.reports:
            return (None,) * len(own)
        return tuple(None if column in self.dropped_columns else p for column, p in enumerate(own))

    def tracks_gradients(self, module: nn.Module) -> bool:
        """True when this call's backward will produce parameter gradients worth measuring."""
        if not torch.is_grad_enabled():
            return False
        return any(p is not None and p.requires_grad for p in self.own_parameters(module))


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    """β of a norm module; several HF classes have no `bias` attribute at all."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _bias_without_getattr(module: nn.Module, bias_on_class: bool | None = None) -> torch.Tensor | None:
    """`norm_bias` for a module whose `_parameters` has no `bias`, read from its dicts. Traced, the
    `getattr(module, "bias", None)` of `norm_bias` costs a `hasattr` guard that runs
    `nn.Module.__getattr__` and its AttributeError at every call of the graph. `bias_on_class`
    False (known at patch time, `NormPatch.note_class`): the class has no `bias` attribute, so
    `type(module)` is not read either (traced, an identity guard between the norms' classes)."""
    on_class = None if bias_on_class is False else getattr(type(module), "bias", None)
    if isinstance(on_class, property):  # computed: only getattr knows
        return norm_bias(module)
    found = module._buffers["bias"] if "bias" in module._buffers else module.__dict__.get("bias", on_class)
    return found if isinstance(found, torch.Tensor) else None


def weight_and_bias(
    module: nn.Module, bias_on_class: bool | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`module.weight` and `norm_bias(module)`, read from `_parameters` where they are parameters
    (a dict lookup; `nn.Module.__getattr__` costs ~1 µs a read, and this runs at every call);
    `bias_on_class`: see `_bias_without_getattr`."""
    params = module._parameters
    weight = params["weight"] if "weight" in params else module.weight
    bias = params["bias"] if "bias" in params else _bias_without_getattr(module, bias_on_class)
    return weight, bias


def run_norm(
    module: nn.Module,
    hidden_states: torch.Tensor,
    spec: NormSpec,
    eps_attr: str,
    sq_norm_sink: torch.Tensor | None = None,
    example_offsets: torch.Tensor | None = None,
    parameters: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    sq_norm_collector=None,
) -> torch.Tensor:
    """`module`'s forward computed by `fused_norm` according to `spec` (`parameters`: its
    `weight_and_bias`, when the caller has them)."""
    weight, bias = weight_and_bias(module) if parameters is None else parameters
    return fused_norm(
        hidden_states,
        weight,
        bias,
        spec.resolve_eps(getattr(module, eps_attr), hidden_states),
        rms=spec.rms,
        weight_offset=spec.weight_offset,
        cast_before_weight=spec.cast_before_weight,
        out_dtype=spec.result_dtype(hidden_states, weight),
        sq_norm_sink=sq_norm_sink,
        example_offsets=example_offsets,
        sq_norm_collector=sq_norm_collector,
    )


def _run_tracked(module, x, state: NormPatch, n_examples: int, parameters, example_offsets=None):
    """`run_norm` with this module's per-example squared norms going to its `sinks`: in eager mode
    straight from the op's backward (`SquaredNormSinks.collect`: no sink leaf, no AccumulateGrad,
    no hook per call); under torch.compile (or compiled autograd, which traces the backward)
    through a sink, a graph input (see `sinks.py`)."""
    if torch.compiler.is_compiling() or getattr(_compiled_autograd, "compiled_autograd_enabled", False):
        sink = state.sinks.take_for(n_examples, x.device)
        return run_norm(module, x, state.spec, state.eps_attr, sink, example_offsets, parameters)
    collector = state.sinks.collect
    return run_norm(module, x, state.spec, state.eps_attr, None, example_offsets, parameters, collector)


def norm_routing(
    name: str, module: nn.Module, sinks: SquaredNormSinks, mode: str, vectors=None
) -> CallRouting:
    """The call routing of a norm module (see `CallRouting`)."""
    bias = norm_bias(module)
    widths = (module.weight.numel(), 0 if bias is None else bias.numel())
    return CallRouting(name, sinks, widths, mode, vectors)


class _NormExampleGradTap(torch.autograd.Function):
    """Identity on a norm's output whose backward sends example b's gradient vectors
    [dγ_b, dβ_b] = [Σ_r dy_r ⊙ x̂_r, Σ_r dy_r] to row b of the leaf's gradient (fp32), x̂
    recomputed from the input that the fused op saves anyway (no extra memory kept). Autograd
    adds the rows of every call sharing the leaf (`example_grads.py`); dγ and dβ themselves
    come from the fused op as usual."""

    @staticmethod
    def forward(ctx, y, x, leaf, eps, rms, cast_before_weight, has_bias):
        ctx.save_for_backward(x)
        ctx.config = (eps, rms, cast_before_weight, has_bias)
        return y.detach()  # an alias, not a view: models may edit it in place

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        eps, rms, cast_before_weight, has_bias = ctx.config
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xhat, _, _ = norm_forward_reference(
            x, None, None, eps, rms, 0.0, cast_before_weight, out_dtype=compute
        )
        n_examples, width = x.shape[0], x.shape[-1]
        xhat = xhat.reshape(n_examples, -1, width)  # (B, R, D)
        grads = dy.reshape(n_examples, -1, width).to(compute)  # (B, R, D)
        rows = [(grads * xhat).sum(1)] + ([grads.sum(1)] if has_bias else [])  # dγ_b (, dβ_b): (B, D)
        return dy, None, torch.cat(rows, dim=1).float(), None, None, None, None


def run_norm_with_example_grads(
    module: nn.Module, x: torch.Tensor, spec: NormSpec, eps_attr: str, leaf: torch.Tensor
) -> torch.Tensor:
    """`module`'s forward by the fused op (no sink), followed by the tap that sends the per-example
    gradient vectors of γ (and β) to `leaf`'s gradient (B, D + D_β)."""
    eps = spec.resolve_eps(getattr(module, eps_attr), x)
    y = run_norm(module, x, spec, eps_attr)
    has_bias = norm_bias(module) is not None
    return _NormExampleGradTap.apply(y, x, leaf, eps, spec.rms, spec.cast_before_weight, has_bias)


def _call_forward(module: nn.Module, state: NormPatch, args: tuple, kwargs: dict):
    """The per-example call route (see `per_example_call.py`); the class forward when not training."""
    if not state.tracks_gradients(module):
        return type(module).forward(module, *args, **kwargs)
    if state.model_hook.example_offsets is not None:
        raise RuntimeError(
            f"hf_gns: norm module {state.name!r} ({type(module).__name__}) runs the per-example call, which "
            "takes one example per row: padding-free batches (several documents per row) are not supported "
            "for it; pad the batch, or leave this module unpatched"
        )
    x = args[0]
    n_examples = state.model_hook.batch_size or x.shape[0]
    if x.shape[0] != n_examples and not (x.dim() == 2 and x.shape[0] % n_examples == 0):
        raise RuntimeError(
            f"hf_gns: norm module {state.name!r} got an input of shape {tuple(x.shape)} whose dim 0 is not "
            f"the batch of {n_examples} examples: its per-example norms cannot be computed (sequence-first "
            "layout?); leave it unpatched"
        )
    device = next(p for p in state.reported_parameters(module) if p is not None).device
    sink = state.sinks.take_for(n_examples, device)
    return per_example_call(module, args, kwargs, state.parameters, sink, n_examples)


def patched_norm_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """Forward of a patched norm: the fused kernel, plus a sink for per-example norms when training
    (or the per-example call, for modules and weight dtypes the fused op cannot express).

    Runs at every norm call of every step, so it reads the parameters once (`weight_and_bias`)
    and builds nothing it does not need."""
    state: NormPatch = getattr(self, PATCH_ATTRIBUTE)
    if state.compiled_call is not None and torch.compiler.is_compiling():
        y = compiled_norm_forward(self, hidden_states, state)
        if y is not None:
            return y
    if state.uses_call(self):
        return _call_forward(self, state, (hidden_states, *args), kwargs)
    hook = state.model_hook
    parameters = weight, bias = weight_and_bias(self)
    if state.parameters == _WEIGHT_AND_BIAS:  # what `tracks_gradients` reads, inline
        tracks = _tracks(weight, bias)
    else:
        tracks = state.tracks_gradients(self)
    vectors: ExampleGradVectors | None = None
    if tracks and state.routing is not None and hidden_states.dim() >= 2:
        vectors = state.routing.vectors_for_call(hook)
    if hook.example_offsets is not None and tracks:  # padding-free: examples are documents
        if vectors is not None and state.routing.mode != "discover":
            raise RuntimeError(
                f"hf_gns: {state.name!r} is called several times per forward (or shares its parameters): "
                "per-example gradient vectors of padding-free (document) batches are not supported"
            )
        offsets = offsets_for_rows(hook.example_offsets, hidden_states, hook.token_shape)
        return _run_tracked(self, hidden_states, state, offsets.shape[0] - 1, parameters, offsets)
    x = hook.group_rows(hidden_states)  # (B, ..., D): dim 0 indexes examples
    x, transposed = state.layout.examples_first(x, hook.batch_size)  # (T, B, D) → (B, T, D)
    if not tracks:
        y = run_norm(self, x, state.spec, state.eps_attr, parameters=parameters)
    elif vectors is None:
        y = _run_tracked(self, x, state, x.shape[0] if x.dim() > 1 else 1, parameters)
    else:
        leaf = vectors.leaf_for(hook, x.shape[0], x.device)
        y = run_norm_with_example_grads(self, x, state.spec, state.eps_attr, leaf)
    if transposed:
        y = back_to_input_layout(y, transposed)
    return y if x is hidden_states or y.dim() == hidden_states.dim() else y.reshape(hidden_states.shape)


def _tracks(weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """`NormPatch.tracks_gradients` for the parameters weight and bias, already read."""
    return torch.is_grad_enabled() and (
        (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
    )


def compiled_norm_forward(module: nn.Module, x: torch.Tensor, state: NormPatch) -> torch.Tensor | None:
    """The fused route as torch.compile traces it in the common case; None: take the general path.

    Every attribute a compiled forward reads becomes a guard node that Dynamo checks before each
    call of the graph, and the general path reads many per norm: its state's spec (shared by
    every norm of the class: an identity guard per norm), the model hook (likewise), the layout
    and routing objects, a dict check per method called on each. Here a norm reads its
    `compiled_call` tuple, its sinks' `forward_examples` (None also where its calls take
    per-example vectors) and spare sink, and the module's own parameters and ε; not its class
    (`note_class`). On a tiny 12-layer Llama (25 norms) that took the guards hf_gns adds to the
    compiled forward from 1682 to 1149 lines of `TORCH_LOGS=guards` output, and their check after a
    step from 490-955 to 547-561 µs on the CPU machine (`benchmarks/bench_compiled_guards.py`, three
    runs each). Without the routing and class reads (no identity guard between the norms'
    classes, which Dynamo evaluates in Python: one per norm), 4388 against 4214 lines (3210
    unpatched, transformers 5.25).

    Common case: examples along dim 0 of an input of 3 or more dims whose dim 1 is not the batch
    (a (B, T, ...) input; sequence-first inputs, flattened (B·T, D) ones and padding-free batches
    of documents go the general path, as do calls with no spare sink ready: a graph break there).
    """
    rms, weight_offset, cast_before_weight, output_dtype, autocast_op, eps_attr, bias_on_class = (
        state.compiled_call
    )
    weight, bias = weight_and_bias(module, bias_on_class)
    tracks = _tracks(weight, bias)
    sink = None
    if tracks:
        sinks = state.sinks
        # None also where the calls take per-example vectors (`CallRouting`; `note_examples`)
        n_examples, sink = sinks.forward_examples, sinks.spare
        if n_examples is None or x.dim() < 3 or x.shape[0] != n_examples or x.shape[1] == n_examples:
            return None
        if not spare_fits(sink, n_examples, x.device):
            return None
        sinks.spare = None  # taken, as `SquaredNormSinks.take_for` does
    return fused_norm(
        x,
        weight,
        bias,
        resolve_eps(getattr(module, eps_attr), x),
        rms=rms,
        weight_offset=weight_offset,
        cast_before_weight=cast_before_weight,
        out_dtype=result_dtype(output_dtype, autocast_op, x, weight),
        sq_norm_sink=sink,
    )


def route_norms(
    planned: list[tuple[nn.Module, NormPatch]], shared_modules: dict[int, list[str]]
) -> list[tuple[nn.Module, NormPatch, str]]:
    """Set the call routing of each planned norm; returns the ones that cannot be patched, with why.

    A weight held by several norm modules (Zamba's shared transformer block: one set of
    parameters, one module object per layer) gets one vector group: every call of every
    holder adds to it, the first holder reports it under its `named_parameters()` name, the
    others report nothing. A module reachable under several names (called from several
    parents) takes the vector path from the start. The rest count their calls (`CallRouting`).
    """
    by_weight: dict[int, list[tuple[nn.Module, NormPatch]]] = defaultdict(list)
    for module, state in planned:
        if state.spec is None or state.fused_dtypes is not None:
            continue  # the per-example call route (`per_example_call.py`): no routing
        by_weight[id(module.weight)].append((module, state))
        state.note_class(module)
    refused = []
    for members in by_weight.values():
        first_module, first = members[0]
        if len(members) == 1:
            mode = "shared" if id(first_module) in shared_modules else "discover"
            first.routing = norm_routing(first.name, first_module, first.sinks, mode)
            if mode == "shared":
                callers = ", ".join(repr(name) for name in shared_modules[id(first_module)])
                first.routing.note = f", called from {callers}: calls summed per example"
            continue
        if len({id(norm_bias(module)) for module, _ in members}) > 1:
            holders = ", ".join(repr(state.name) for _, state in members)
            refused += [
                (m, s, f"weight shared by {holders} but not its bias: not supported") for m, s in members
            ]
            continue
        vectors = norm_routing(first.name, first_module, first.sinks, "shared").vectors
        vectors.members = tuple(state.name for _, state in members)
        for module, state in members:
            state.routing = norm_routing(state.name, module, state.sinks, "shared", vectors)
            state.reports = state is first
            others = ", ".join(repr(s.name) for _, s in members if s is not state)
            reported = "summed per example" if state.reports else f"reported by {first.name!r}"
            state.routing.note = f", parameters shared with {others}: {reported}"
    return refused
