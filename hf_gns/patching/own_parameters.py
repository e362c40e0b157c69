"""Modules that use their own parameters functionally, under `patch(targets="all")`.

MoE routers hold a raw (E, D) `weight` and call `F.linear(x, self.weight)` (Mixtral,
Qwen-MoE, OLMoE, GPT-OSS, ...), some with a bias or a per-expert score correction; other
small modules do `x * self.scale` or `x @ self.proj`. None of them is a Linear to rebind,
but each maps tokens to outputs without mixing examples, so the per-example call of
`per_example_call.py` (the module's own forward under `torch.func.vmap`, with per-example
copies of its parameters) gives exact per-example norms, and its probe checks that against
one-example-at-a-time autograd before a module is bound.

Which modules: not a norm, Linear, Conv1D, Embedding, convolution or experts module (those
have their own kinds), with up to `MAX_SINK_COLUMNS` trainable parameters, and no submodule
holding parameters that the forward calls (it would run its own patched forward inside
vmap). A submodule whose parameters the forward only reads (`F.linear(x,
self.classifier.weight)` in LongCat's router, `causal_conv1d_fn(x, self.conv1d.weight)` in
short convolutions: found in the forward's source, every parameter of the submodule) is
taken in: its parameters are tracked here, under dotted names, and the submodule is left
unpatched (`claimed_modules`). Mamba mixers (`A_log`, `D` next to Linears they call) are
therefore not covered: the report lists them.

One functional pattern is tracked next to submodules the forward calls: raw parameters used
only as the right operand of `@` (`relative_states @ self.proj` in Inkling2-Loop's relative
position bias, next to its own Linear and norm). The module's own forward runs unbatched,
its submodules keep their own patches, and `RightOperandCopies` turns each `x @ p` into
y_b = x_b @ p_b on per-example copies of p (a bmm over the examples of dim 0), so that
∂L/∂p_b = Σ_rows x_bᵀ dy_b reaches the sink: exact by construction, at the cost of one
(B, *p.shape) gradient per such parameter. Any other use of p during the forward raises.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .layer_state import LAYER_ATTRIBUTE, ParameterPatch
from .outside_use import METADATA_CALLS
from .per_example_call import (
    MAX_SINK_COLUMNS,
    PerExampleCopies,
    attribute_at,
    own_parameter_names,
    per_example_call,
    probe_per_example_call,
)


@dataclass
class OwnParametersPatch(ParameterPatch):
    """State of a module run through the per-example call: `reported` names its parameters.
    `right_operands`: they are used only as `x @ p` next to submodules the forward calls
    (`RightOperandCopies`), instead of the module's whole forward per example."""

    right_operands: bool = False

    def may_run_per_example_call(self) -> bool:
        return not self.right_operands


_ATTRIBUTE_CHAIN = re.compile(r"\bself((?:\.\w+)+)(\s*\()?")


def _forward_source(module: nn.Module) -> str:
    try:
        return textwrap.dedent(inspect.getsource(type(module).forward))
    except (OSError, TypeError):
        return ""


def read_submodule_parameters(module: nn.Module) -> tuple[str, ...]:
    """Dotted names of the submodules' parameters that `module`'s forward reads without calling the
    submodule, when that covers every submodule holding parameters (else `()`: not a candidate)."""
    holders = {name for name, child in module.named_children() if next(child.parameters(), None) is not None}
    if not holders:
        return ()
    params = dict(module.named_parameters())
    read, called = [], set()
    for match in _ATTRIBUTE_CHAIN.finditer(_forward_source(module)):
        parts = match.group(1)[1:].split(".")
        if parts[0] not in holders:
            continue
        if match.group(2) and isinstance(attribute_at(module, ".".join(parts)), nn.Module):
            called.add(parts[0])  # `self.child(...)`: the submodule runs its own forward
        names = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
        name = next((n for n in names if n in params), None)
        if name is not None and name not in read:
            read.append(name)
    for holder in holders:
        whole = all(name in read for name in params if name.startswith(holder + "."))
        if holder in called or not whole:
            return ()
    return tuple(read)


def right_operand_parameters(module: nn.Module) -> tuple[str, ...]:
    """The module's own parameters when its forward's source uses every one of them only as the
    right operand of `@` (`x @ self.proj`, not `.T`, indexed or called), else `()`."""
    names = own_parameter_names(module)
    source = _forward_source(module)
    for name in names:
        uses = len(re.findall(rf"\bself\.{name}\b", source))
        right = len(re.findall(rf"@\s*self\.{name}\b(?!\s*[.\[(])", source))
        if uses == 0 or right != uses:
            return ()
    return names


def claimed_modules(module: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    """The submodules holding parameters among `names` (left unpatched: `module` tracks them)."""
    return [attribute_at(module, name.rpartition(".")[0]) for name in names if "." in name]


def own_parameters_candidate(module: nn.Module) -> bool:
    """Whether `module` holds trainable parameters of its own, or reads its submodules' (worth a plan
    or a skip reason)."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return True
    return any(attribute_at(module, name).requires_grad for name in read_submodule_parameters(module))


def _structural(module: nn.Module) -> str:
    """What the coverage calls these parameters (`coverage.py`), as the start of a skip reason."""
    from .coverage import structural_reason

    attr, param = next(iter(module.named_parameters(recurse=False)))
    return structural_reason(module, attr, param).removesuffix(": not tracked").removesuffix(" not supported")


def plan_own_parameters(
    name: str, module: nn.Module, probed: dict[type, str | None]
) -> OwnParametersPatch | str | None:
    """The state for `module`, or the reason it cannot be tracked; None when it is no candidate at all
    (submodules with parameters that its forward calls, or a module reading only its submodules'
    parameters that the probe refuses: the submodules are then planned as usual)."""
    own = own_parameter_names(module)
    read = read_submodule_parameters(module)
    if not read and any(next(child.parameters(), None) is not None for child in module.children()):
        right = right_operand_parameters(module)
        if not right or len(right) > MAX_SINK_COLUMNS:
            return None
        return OwnParametersPatch(name, (*right, None)[: max(2, len(right))], "call", right_operands=True)
    names = own + read
    if len(names) > MAX_SINK_COLUMNS:
        listed = ", ".join(names)
        count = f"{len(names)} parameters ({listed}), at most {MAX_SINK_COLUMNS}"
        return f"{_structural(module)}: {count}" if own else None
    if type(module) not in probed:  # one verified instance vouches for its class (same forward)
        probed[type(module)] = probe_per_example_call(module, names=names)
    if probed[type(module)] is not None:
        return f"{_structural(module)}: per-example call {probed[type(module)]}" if own else None
    return OwnParametersPatch(name, (*names, None)[: max(2, len(names))], "call")


def describe_own_parameters(module: nn.Module, state: OwnParametersPatch | None = None) -> str:
    listed = ", ".join(n for n in (own_parameter_names(module) if state is None else state.reported) if n)
    if state is not None and state.right_operands:
        return f"{listed}: x @ p on per-example copies (its submodules keep their own patches)"
    return f"{listed}: the module's own forward per example (vmap)"


_MATMULS = (torch.Tensor.__matmul__, torch.Tensor.matmul, torch.matmul)


class RightOperandCopies(TorchFunctionMode):
    """For one forward of `module`: each `x @ p` with p a tracked parameter (`params`, one per sink
    column, None where not reported) and x of `n_examples` along dim 0 becomes bmm(x as
    (B, rows, K), p_b), p_b per-example copies of p (`PerExampleCopies`, made once per forward so
    that several uses add up before the square); any other use of p raises (its gradient would be
    missing from the sink)."""

    def __init__(self, module: nn.Module, params: tuple, sink, n_examples: int):
        super().__init__()
        self.module_name = type(module).__name__
        self.sink, self.n_examples = sink, n_examples
        self.columns = {}  # id(p) → [column, p, its copies or None]
        for column, param in enumerate(params):
            if param is not None and param.requires_grad:
                self.columns[id(param)] = [column, param, None]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in METADATA_CALLS:
            return func(*args, **kwargs)
        if func in _MATMULS and len(args) == 2 and not kwargs and id(args[1]) in self.columns:
            x, param = args
            entry = self.columns[id(param)]
            if entry[1] is param and param.dim() == 2 and x.dim() >= 2 and x.shape[0] == self.n_examples:
                if entry[2] is None:  # (B, K, N)
                    entry[2] = PerExampleCopies.apply(param, self.sink, self.n_examples, entry[0])
                rows = x.reshape(self.n_examples, -1, x.shape[-1])  # (B, rows, K)
                return torch.bmm(rows, entry[2]).reshape(*x.shape[:-1], param.shape[-1])
        for leaf in tree_flatten((args, kwargs))[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.columns:
                raise RuntimeError(
                    f"hf_gns: {self.module_name} uses a parameter it tracks as the right operand of @ "
                    f"otherwise ({getattr(func, '__name__', func)} on shape {tuple(leaf.shape)}, or x "
                    f"without the {self.n_examples} examples along dim 0): its per-example norms would be "
                    "wrong; patch with targets='norms'"
                )
        return func(*args, **kwargs)


def patched_own_parameters_forward(self: nn.Module, *args, **kwargs):
    """Forward of a module run through the per-example call (the class forward when not training)."""
    state: OwnParametersPatch = getattr(self, LAYER_ATTRIBUTE)
    if not state.tracks_gradients(self) or not args:
        return type(self).forward(self, *args, **kwargs)
    hook = state.model_hook
    if hook.example_offsets is not None:
        raise RuntimeError(
            f"hf_gns: {state.name!r} ({type(self).__name__}) runs the per-example call, which takes one "
            "example per row: padding-free batches (several documents per row) are not supported for it; "
            "pad the batch, or patch with targets='norms'"
        )
    x = args[0]
    n_examples = hook.batch_size or x.shape[0]
    if x.shape[0] != n_examples and not (x.dim() == 2 and x.shape[0] % n_examples == 0):
        raise RuntimeError(
            f"hf_gns: {state.name!r} ({type(self).__name__}) got an input of shape {tuple(x.shape)} whose "
            f"dim 0 is not the batch of {n_examples} examples: its per-example norms cannot be computed"
        )
    device = next(p for p in state.reported_parameters(self) if p is not None).device
    sink = state.sinks.take_for(n_examples, device)
    if state.right_operands:
        with RightOperandCopies(self, state.reported_parameters(self), sink, n_examples):
            return type(self).forward(self, *args, **kwargs)
    return per_example_call(self, args, kwargs, state.reported, sink, n_examples)
