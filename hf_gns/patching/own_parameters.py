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
"""

from __future__ import annotations

import inspect
import re
import textwrap

from torch import nn

from .layer_state import LAYER_ATTRIBUTE, ParameterPatch
from .per_example_call import (
    MAX_SINK_COLUMNS,
    attribute_at,
    own_parameter_names,
    per_example_call,
    probe_per_example_call,
)


class OwnParametersPatch(ParameterPatch):
    """State of a module run through the per-example call: `reported` names its parameters."""


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
        return None
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


def describe_own_parameters(module: nn.Module, names: tuple[str | None, ...] | None = None) -> str:
    listed = ", ".join(n for n in (own_parameter_names(module) if names is None else names) if n)
    return f"{listed}: the module's own forward per example (vmap)"


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
    return per_example_call(self, args, kwargs, state.reported, sink, n_examples)
