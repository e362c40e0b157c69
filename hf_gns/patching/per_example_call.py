"""The per-example call: exact per-example norms for norm layers the fused op cannot express.

Gated RMSNorms `forward(x, gate)` (gate before or after the normalization, grouped or not),
grouped RMSNorms, multi-head LayerNorms on (B, T, H, Dh) inputs, ZAYA's QK norm with its
per-head `temp`, Nemotron's LayerNorm1P with bf16 weights: rather than re-deriving each
flavour's math, the module's own forward runs once per example under `torch.func.vmap`, with
each tracked parameter p replaced by a (B, *p.shape) view of B copies of p:

    y_b = forward_b(x_b; p_b = p)   ⇒   ∂L/∂p_b = c_b (example b's contribution), Σ_b c_b = ∂L/∂p

`PerExampleCopies` makes the copies (an expand, no memory) and, in backward, receives the
(B, *p.shape) per-example gradients: it returns their sum as p's gradient and |c_b|² as the
gradient of the (B, C) sink (column k for the k-th tracked parameter, C = max(2, their number),
at most `MAX_SINK_COLUMNS`), as the fused op does. The outputs are the module's own (same ops,
batched by vmap), so the route is exact by construction for any forward in which examples do
not interact; the probe below checks that on random inputs, outputs and per-example norms
against one-example-at-a-time autograd, before a module is bound to it.

Cost: the module's own (unfused) forward and a per-example reduction of the parameter
gradient, (B, *p.shape) fp32: small next to the layers these norms sit in.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .state import CLASS_FORWARD_ATTRIBUTE

SINK_COLUMNS = 2  # the width of every sink but those of modules reporting more parameters
MAX_SINK_COLUMNS = 8  # parameters one per-example call may track
_PROBE_BATCH, _PROBE_SEQ = 3, 5  # distinct from every other probe dim, so layout mistakes show
_PROBE_RTOL = 1e-4  # per-example squared norms vs the micro-batch oracle (fp32, measured ≤ 1e-6)


class PerExampleCopies(torch.autograd.Function):
    """p → (B, *p.shape) copies; backward: p.grad = Σ_b g_b and sink.grad[:, column] = |g_b|²."""

    @staticmethod
    def forward(ctx, param, sink, n_examples: int, column: int):
        ctx.column, ctx.width = column, sink.shape[1]
        return param.unsqueeze(0).expand(n_examples, *param.shape)

    @staticmethod
    def backward(ctx, grad):  # (B, *p.shape)
        sq_norms = grad.float().flatten(1).square().sum(1)  # (B,) fp32
        sink_grad = grad.new_zeros(grad.shape[0], ctx.width, dtype=torch.float32)
        sink_grad[:, ctx.column] = sq_norms
        return grad.sum(0), sink_grad, None, None


class _ClassForward(nn.Module):
    """Runs the class's forward of `inner` (not the patched instance forward) for functional_call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return type(self.inner).forward(self.inner, *args, **kwargs)


def class_forward(module: nn.Module) -> _ClassForward:
    """`module`'s `_ClassForward`, made once and kept in its `__dict__` (not a submodule: in neither
    `named_modules` nor the state_dict; `unbind_state` deletes it). `patch` makes it as it binds a
    state that may take the per-example call, outside any compiled region: a wrapper made at every
    call broke a compiled graph at each such module (Dynamo: "getattr() on nn.Module with pending
    mutation")."""
    caller = getattr(module, CLASS_FORWARD_ATTRIBUTE, None)
    if caller is None:
        caller = module.__dict__[CLASS_FORWARD_ATTRIBUTE] = _ClassForward(module)
    return caller


def attribute_at(module: nn.Module, path: str):
    """`module.a.b` for the dotted `path` "a.b" (a parameter of a submodule); None if missing."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def own_parameter_names(module: nn.Module) -> tuple[str, ...]:
    """The module's own parameters, in registration order (one sink column each)."""
    return tuple(name for name, _ in module.named_parameters(recurse=False))


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args` and `kwargs` as (positional arguments of the class forward, keyword-only ones)."""
    if not kwargs:
        return args, {}
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    return bound.args[1:], bound.kwargs


def per_example_call(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    parameter_names: tuple[str | None, ...],
    sink: torch.Tensor | None,
    n_examples: int,
):
    """The module's forward on `args`, per example (dim 0 of the first argument), with per-example
    copies of the parameters named in `parameter_names` feeding `sink` (see the module docstring).

    A 2-D first argument of B·rows rows (tokens flattened batch-major) is regrouped to
    (B, rows, D) and each example sees its (rows, D); otherwise each example sees a batch of one,
    and another argument of B·T rows next to a (B, T, ...) first argument (per-token values
    flattened batch-major, e.g. a router's weights) its T rows.
    """
    x = args[0]
    regroup = x.dim() == 2 and x.shape[0] != n_examples and x.shape[0] % n_examples == 0
    rows = x.shape[0] // n_examples if regroup else None
    tokens = x.shape[0] * x.shape[1] if x.dim() >= 3 and x.shape[0] == n_examples else None

    def batched(arg):
        if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
            return None
        if regroup and arg.shape[0] == x.shape[0]:
            return arg.reshape(n_examples, rows, *arg.shape[1:])
        if arg.shape[0] == n_examples:
            return arg.unsqueeze(1)  # each example keeps a batch dim of one
        if tokens is not None and arg.shape[0] == tokens:
            return arg.reshape(n_examples, x.shape[1], *arg.shape[1:])
        return None

    def split(value):  # (per-example value, vmap in_dims), through tuples, lists and dicts too
        values = tree_map(lambda leaf: leaf if batched(leaf) is None else batched(leaf), value)
        dims = tree_map(lambda leaf: None if batched(leaf) is None else 0, value)
        return values, dims

    positional, keywords = _positional(module, args, kwargs)
    inputs, in_dims = zip(*(split(arg) for arg in positional)) if positional else ((), ())
    keyword_inputs, keyword_dims = split(keywords)
    copies = {}
    for column, name in enumerate(parameter_names):
        param = None if name is None or sink is None else attribute_at(module, name)
        if param is not None and param.requires_grad:
            copies[f"inner.{name}"] = PerExampleCopies.apply(param, sink, n_examples, column)
    caller = class_forward(module)

    def one_example(params, example_keywords, *example_args):
        return torch.func.functional_call(caller, params, example_args, example_keywords)

    output = torch.func.vmap(one_example, in_dims=(0, keyword_dims, *in_dims))(
        copies, keyword_inputs, *inputs
    )
    return tree_map(lambda t: t.flatten(0, 1) if isinstance(t, torch.Tensor) else t, output)


# --- probe -------------------------------------------------------------------------------


def _candidate_shapes(module: nn.Module, first: torch.Tensor) -> list[tuple[int, ...]]:
    """Input shapes to try, (B, T, ...): multi-head attributes first, then the first parameter's size."""
    b, t = _PROBE_BATCH, _PROBE_SEQ
    shapes = []
    heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int):
        shapes.append((b, t, heads, head_dim))
    if first.dim() == 1:
        n = first.shape[0]
        shapes += [(b, t, n), (b, t, n, 4), (b, n, 2, 2)]  # last: channels-first (B, C, H, W)
    else:
        shapes.append((b, t, *first.shape))
        if first.dim() >= 3:  # a convolution weight (C_out, C_in / groups, K) read by its parent: (B, T, C);
            # expert weights (E, out, in) applied to every token: (B, T, in)
            shapes += [(b, t, first.shape[0]), (b, t, first.shape[-1])]
        if first.dim() == 2:  # a raw weight used as F.linear(x, w) (router) or x @ w: input features;
            # flattened (B·T, D) rows too (routers flatten their input: one example per row)
            shapes += [(b, t, first.shape[-1]), (b, t, first.shape[0]), (b * t, first.shape[-1])]
            # streams flattened into the input features (hyper-connections: (B, T, N, D) → N·D), N one
            # of the module's integer attributes
            features = first.shape[-1]
            counts = {v for v in vars(module).values() if type(v) is int and 1 < v < features}
            shapes += [(b, t, n, features // n) for n in sorted(counts) if features % n == 0]
    return shapes


def _probe_layouts(module: nn.Module, first: torch.Tensor):
    """(input shape, shape of the other inputs or None for x-shaped) pairs to try: x-shaped extras
    first, then per-token values flattened batch-major, (B·T, N) for N one of the module's
    integer attributes or 1 (a router's weights of N shared experts)."""
    shapes = _candidate_shapes(module, first)
    counts = sorted({1} | {v for v in vars(module).values() if type(v) is int and 1 < v <= 64})
    layouts = [(shape, None) for shape in shapes]
    layouts += [(shape, (shape[0] * shape[1], n)) for shape in shapes if len(shape) >= 3 for n in counts]
    return layouts


def _extra_inputs(module: nn.Module, x: torch.Tensor, generator, shape: tuple | None = None) -> tuple:
    """Random tensors (x-shaped, or of `shape`) for the forward's other tensor inputs (gate, key
    states, ...): every required positional parameter, and optional ones named like a gate."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[2:]
    except (TypeError, ValueError):
        return ()
    extras = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        if parameter.default is not parameter.empty and "gate" not in parameter.name:
            break
        extras.append(torch.randn(shape or x.shape, generator=generator, device=x.device, dtype=x.dtype))
    return tuple(extras)


def _outputs(value) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _perturbed_copy(module: nn.Module, names: tuple[str, ...], generator) -> nn.Module:
    probe = copy.deepcopy(module).float()
    with torch.no_grad():
        for param in (attribute_at(probe, name) for name in names):
            param.add_(0.5 * torch.randn(param.shape, generator=generator, device=param.device))
    return probe


def probe_per_example_call(
    module: nn.Module, seed: int = 0, names: tuple[str, ...] | None = None
) -> str | None:
    """`None` if the per-example call of `module` reproduces its forward and yields exact per-example
    norms on random fp32 inputs, else the reason it does not. `names`: the tracked parameters (dotted
    names under `module`), by default its own."""
    names = own_parameter_names(module) if names is None else names
    params = [attribute_at(module, name) for name in names]
    if not params:
        return "no parameters of its own: nothing to track"
    if params[0].device.type == "meta":
        return "weights are on the meta device: patch after the weights are materialized"
    if len(names) > MAX_SINK_COLUMNS:
        listed = ", ".join(names)
        return f"{len(names)} parameters of its own ({listed}): at most {MAX_SINK_COLUMNS} supported"
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    try:
        probe = _perturbed_copy(module, names, generator)
    except Exception as error:
        return f"probe could not copy the module: {error}"
    forward = type(module).forward
    for shape, extra_shape in _probe_layouts(module, params[0]):
        x = torch.randn(shape, generator=generator, device=params[0].device)
        args = (x, *_extra_inputs(module, x, generator, extra_shape))
        try:
            with torch.no_grad():
                expected = _outputs(forward(probe, *args))
        except Exception:
            continue  # not this layout
        if not expected or any(t.shape[:1] != (shape[0],) for t in expected):
            continue
        try:
            return _check_call(probe, args, expected, names, generator)
        except Exception as error:  # any failure means we cannot vouch for the module
            return f"probe failed: {type(error).__name__}: {error}"
    return "probe failed: the original forward raised on every probe input"


def _example_part(arg: torch.Tensor, x: torch.Tensor, b: int) -> torch.Tensor:
    """Example b's part of a probe input: its row, or its T rows of per-token values flattened
    batch-major next to a (B, T, ...) `x` (as `per_example_call` batches them)."""
    if arg is not x and x.dim() >= 3 and arg.shape[0] == x.shape[0] * x.shape[1] != x.shape[0]:
        return arg[b * x.shape[1] : (b + 1) * x.shape[1]]
    return arg[b : b + 1]


def _check_call(probe: nn.Module, args: tuple, expected: list[torch.Tensor], names, generator) -> str | None:
    n = args[0].shape[0]
    sink = torch.zeros(n, max(SINK_COLUMNS, len(names)), device=args[0].device, requires_grad=True)
    try:
        actual = _outputs(per_example_call(probe, args, {}, names, sink, n))
    except Exception as error:
        return f"the per-example call fails: {type(error).__name__}: {error}"
    for want, got in zip(expected, actual):
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return "the per-example call does not reproduce the forward (do examples interact?)"
    upstream = [torch.randn(t.shape, generator=generator, device=t.device) for t in actual]
    differentiable = [i for i, t in enumerate(actual) if t.requires_grad]  # ZayaQKNorm: q does not use temp
    if not differentiable:
        return "no output depends on the parameters"
    torch.autograd.backward([actual[i] for i in differentiable], [upstream[i] for i in differentiable])
    params = [attribute_at(probe, name) for name in names]
    for b in range(n):  # the micro-batch oracle: example b alone, plain autograd
        probe.zero_grad(set_to_none=True)
        outputs = _outputs(type(probe).forward(probe, *(_example_part(a, args[0], b) for a in args)))
        pairs = [(outputs[i], upstream[i][b : b + 1]) for i in differentiable if outputs[i].requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
        for column, param in enumerate(params):
            want = 0.0 if param.grad is None else param.grad.double().square().sum().item()
            got = 0.0 if sink.grad is None else sink.grad[b, column].item()
            if not math.isclose(got, want, rel_tol=_PROBE_RTOL, abs_tol=1e-12):
                return f"per-example norms differ from the one-example oracle ({got:.6g} vs {want:.6g})"
    return None
