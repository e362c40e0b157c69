"""Fused mixture-of-experts weights under `patch(targets="all")`: per-example norms of 3-D expert tensors.

transformers 5.x stores a MoE layer's experts as 3-D parameters of one module, decorated
by `transformers.integrations.moe.use_experts_implementation`: `gate_up_proj` (E, 2I, D)
(or `up_proj` without a gate) and `down_proj` (E, D, I), transposed as (E, D, 2I) /
(E, I, D) when `is_transposed`, optional biases (E, ·), a gate `_apply_gate` (concatenated
or interleaved halves, GPT-OSS's clamp), an optional `post_expert_norm`. The module is
called as `experts(hidden_states (N, D), top_k_index (N, k), top_k_weights (N, k))` on the
batch's N = B·T tokens, flattened batch-major.

Example b's gradient of expert e's slice is the sum over b's tokens routed to e; slices of
different experts are disjoint blocks of the parameter, so

    |c_b(gate_up_proj)|² = Σ_e |Σ_{t∈b, t→e} dY_t A_tᵀ|²

The bound forward computes the experts as the backends do (rows grouped by expert, token
order kept inside a group, so each example's rows are contiguous) and runs each expert's
two projections through `linear_with_sq_norms` with the examples' row offsets in that
group (the per-document path of `linear_op.py`; an example with no token there has an
empty segment). Every call of one forward feeds ONE sink leaf, so autograd sums the
per-expert squared norms into it: column 0 is the up (gate_up) weight, column 1 the down
weight (sent through a column-swapped view of the sink). Expert biases (GPT-OSS) are
added outside the op and are listed as untracked.

DBRX's experts keep their weights in a submodule `mlp` as 2-D `w1` (gate), `v1` (up) and
`w2` (down), each (E·I, D), viewed as (E, I, D) per forward (`is_split_glu`); they take
the same routed call and report three sink columns (w1, v1, w2), the submodule left
unpatched.

JetMoE's parallel experts hold one 3-D `weight` (E, out, in) and are called as
`experts(rows, expert_size)` on rows already grouped by expert (`layer_input[batch_index]`
in the parent, `expert_size` the rows per expert), without the token of each row
(`is_parallel_experts`). That gather is visible to autograd: the rows' `IndexBackward0` node
saved the index into the parent's batch-major rows, which gives each row's example. Each
expert's rows are then sorted by example (a stable sort; the outputs are put back in order)
so that each example's rows are contiguous for the per-document path.

Which modules: those with the decorator's attributes (or DBRX's or JetMoE's layout) whose forward, on
random routed tokens, equals this computation (`probe_experts`: one instance vouches for
its class).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..kernels.linear_op import linear_forward, linear_with_sq_norms
from ..kernels.linear_reference import example_of_rows, remember_max_example_rows
from .layer_state import LAYER_ATTRIBUTE, LayerPatch, ParameterPatch

_PROBE_TOKENS, _PROBE_TOP_K = 6, 2
_PROBE_RTOL, _PROBE_ATOL = 1e-4, 1e-5


def _up_name(module: nn.Module) -> str:
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


_SPLIT_GLU = ("w1", "v1", "w2")  # DBRX: gate, up, down, each (E·I, D) in the submodule `mlp`


def is_split_glu(module: nn.Module) -> bool:
    """DBRX's experts: `num_experts`, and a submodule `mlp` holding 2-D `w1`, `v1`, `w2` of E·I rows
    and an `activation_fn`; called as `experts(hidden_states, top_k_index, top_k_weights)`."""
    mlp = getattr(module, "mlp", None)
    n_experts = getattr(module, "num_experts", None)
    if not isinstance(mlp, nn.Module) or not isinstance(n_experts, int) or not hasattr(mlp, "activation_fn"):
        return False
    weights = [getattr(mlp, name, None) for name in _SPLIT_GLU]
    return all(isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] % n_experts == 0 for w in weights)


def is_parallel_experts(module: nn.Module) -> bool:
    """JetMoE's experts: one 3-D `weight` (E, out, in), `forward(inputs, expert_size)` on rows grouped
    by expert (`expert_size` rows each), expert e's rows through `F.linear(rows, weight[e])`."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 3:
        return False
    try:
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return False
    return len(parameters) == 2 and "size" in parameters[1]


def reported_weights(module: nn.Module) -> tuple[str, ...]:
    """The expert weights of `module`, one sink column each (dotted names under `module`)."""
    if is_parallel_experts(module):
        return ("weight",)
    if is_split_glu(module):
        return tuple(f"mlp.{name}" for name in _SPLIT_GLU)
    return ("gate_up_proj" if is_dense(module) or module.has_gate else "up_proj", "down_proj")


def _projections(module: nn.Module):
    """(first-stage projections [(weights (E, ·, ·), transposed, biases or None, sink column)], the
    function of their outputs giving the hidden rows, the down projection the same way)."""
    if is_split_glu(module):
        mlp, n_experts = module.mlp, module.num_experts
        gate, up, down = (
            getattr(mlp, name).view(n_experts, -1, getattr(mlp, name).shape[-1]) for name in _SPLIT_GLU
        )
        act = mlp.activation_fn
        # w2[e] (I, D) is used as hidden @ w2[e]: the transposed (in, out) layout
        return [(gate, False, None, 0), (up, False, None, 1)], lambda g, u: act(g) * u, (down, True, None, 2)
    name, transposed = _up_name(module), bool(module.is_transposed)
    up_bias = getattr(module, f"{name}_bias", None) if module.has_bias else None
    down_bias = getattr(module, "down_proj_bias", None) if module.has_bias else None
    hidden = module._apply_gate if module.has_gate else module.act_fn
    return (
        [(getattr(module, name), transposed, up_bias, 0)],
        hidden,
        (module.down_proj, transposed, down_bias, 1),
    )


def is_dense(module: nn.Module) -> bool:
    """Expert-major dense experts (Llama 4): `forward(hidden_states)` on (E·N, D), every expert
    seeing all N tokens (pre-scaled by the router), gate_up (E, D, 2I) and down (E, I, D) by bmm."""
    if hasattr(module, "has_gate") or not hasattr(module, "act_fn"):
        return False
    try:
        parameters = list(inspect.signature(type(module).forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(parameters) == 2


def experts_unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` is not a fused-experts module this file can run, or None."""
    if is_split_glu(module) or is_parallel_experts(module):
        weight = module.weight if is_parallel_experts(module) else module.mlp.w1
        if not weight.is_floating_point() or weight.device.type == "meta":
            return f"w1 of dtype {weight.dtype} on {weight.device.type}: not supported"
        return None
    needed = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate")
    if not all(hasattr(module, attr) for attr in needed) and not is_dense(module):
        return "not a transformers experts module (use_experts_implementation, or dense expert-major bmm)"
    for attr in (_up_name(module), "down_proj"):
        param = getattr(module, attr, None)
        if not isinstance(param, torch.Tensor) or param.dim() != 3:
            return f"no 3-D {attr!r} parameter"
        if not param.is_floating_point():
            return f"{attr} of dtype {param.dtype} (quantized?): not supported"
        if param.device.type == "meta":
            return "weights are on the meta device: patch after the weights are materialized"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallel: not supported"
    if is_dense(module) and getattr(module, "gate_up_proj", None) is None:
        return "dense experts without a 3-D 'gate_up_proj'"
    return None


def is_experts_like(module: nn.Module) -> bool:
    """A module holding 3-D expert weights as transformers' experts modules do (or DBRX's layout)."""
    fused = hasattr(module, "down_proj") and isinstance(module.down_proj, nn.Parameter)
    return fused or is_split_glu(module) or is_parallel_experts(module)


def describe_experts(module: nn.Module) -> str:
    if is_parallel_experts(module):
        shape = tuple(module.weight.shape)
        return f"{shape[0]} experts {shape[1:]}, rows gathered by index: per-example sums over routed rows"
    if is_split_glu(module):
        shape = (module.mlp.w1.shape[0] // module.num_experts, module.mlp.w1.shape[1])
        return f"{module.num_experts} experts, gate/up/down {shape}, per-example sums over routed tokens"
    up = getattr(module, _up_name(module))
    return f"{module.num_experts} experts {tuple(up.shape[1:])}, per-example sums over routed tokens"


class _LastRows:
    """(autograd node of a parallel-experts call's output, its row examples), for a later call on rows
    derived from that output; a copied model starts without it (autograd nodes cannot be copied)."""

    def __init__(self, node=None, rows: torch.Tensor | None = None):
        self.node, self.rows = node, rows

    def __deepcopy__(self, memo):
        return _LastRows()


class ExpertsPatch(ParameterPatch):
    """State of a patched experts module: sink columns (up weight, down weight)."""

    method_dense: bool = False  # expert-major dense experts (`is_dense`)
    method_parallel: bool = False  # rows grouped by expert, gathered by index (`is_parallel_experts`)
    last_rows: _LastRows | None = None  # parallel experts only
    kind = "experts"


def run_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    sink: torch.Tensor | None = None,
    token_example: torch.Tensor | None = None,
    n_examples: int = 1,
    method: str = "auto",
) -> torch.Tensor:
    """The experts' output (N, D); with `sink`, per-example squared norms of each expert weight go to
    its sink column (`reported_weights`; examples given per token by `token_example`, (N,) int64)."""
    n_tokens, top_k = top_k_index.shape[0], top_k_index.shape[-1]
    x = hidden_states.reshape(n_tokens, -1)
    first_stage, hidden_of, (down_weight, down_transposed, down_bias, down_column) = _projections(module)
    expert_ids = top_k_index.reshape(-1)  # (S,), S = N·k pairs, token-major
    order = torch.sort(expert_ids, stable=True).indices  # grouped by expert, token order inside
    n_experts = module.num_experts
    if sink is None:
        counts = torch.bincount(expert_ids, minlength=n_experts)[:n_experts].tolist()  # host sync
    else:  # rows per (expert, example), read once: each expert's example offsets and longest example
        pair_examples = token_example.repeat_interleave(top_k)  # (S,)
        keys = torch.where(
            expert_ids < n_experts, expert_ids * n_examples + pair_examples, n_experts * n_examples
        )
        pair_counts = torch.bincount(keys, minlength=n_experts * n_examples + 1)[: n_experts * n_examples]
        pair_counts = pair_counts.view(n_experts, n_examples)
        all_offsets = torch.nn.functional.pad(pair_counts.cumsum(1), (1, 0))  # (E, B+1), on the device
        host_counts = pair_counts.tolist()  # host sync (one per forward)
        counts = [sum(row) for row in host_counts]
    outputs, rows_done, start = [], [], 0
    for expert, count in enumerate(counts):
        rows = order[start : start + count]
        start += count
        if count == 0:
            continue
        tokens = rows // top_k
        inputs = x[tokens]
        offsets = None
        if sink is not None:  # rows of each example are contiguous in this group: their offsets
            offsets = all_offsets[expert]
            remember_max_example_rows(offsets, max(host_counts[expert]))
        stage = []
        for weight, transposed, bias, column in first_stage:
            y = _project(
                inputs, weight[expert], _column(sink, column), n_examples, method, transposed, offsets
            )
            stage.append(y if bias is None else y + bias[expert])
        hidden = hidden_of(*stage)
        down_sink = _column(sink, down_column)
        down = _project(hidden, down_weight[expert], down_sink, n_examples, method, down_transposed, offsets)
        if down_bias is not None:
            down = down + down_bias[expert]
        outputs.append(down)
        rows_done.append(rows)
    pairs = top_k_index.numel()
    out = x.new_zeros(pairs, x.shape[-1], dtype=outputs[0].dtype if outputs else x.dtype)
    if outputs:  # rows routed to no real expert (sentinels) stay zero
        out = out.index_copy(0, torch.cat(rows_done), torch.cat(outputs))
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)  # token-major rows, as the backends give it
    out = out * top_k_weights.reshape(-1, 1).to(out.dtype)
    return out.view(n_tokens, top_k, -1).sum(1).to(hidden_states.dtype).view(hidden_states.shape)


def run_dense_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    sink: torch.Tensor | None = None,
    n_examples: int = 1,
    method: str = "auto",
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense expert-major experts (`is_dense`): (E·N, D) → (E·N, D). Expert e's N rows are the batch's
    tokens batch-major, so each expert's projections take the B examples (or `offsets`) directly."""
    up_weight, down_weight = module.gate_up_proj, module.down_proj  # (E, D, 2I), (E, I, D)
    n_experts, hidden = up_weight.shape[0], up_weight.shape[1]
    x = hidden_states.reshape(n_experts, -1, hidden)
    swapped = None if sink is None else sink.flip(1)
    outputs = []
    for expert in range(n_experts):
        up = _project(x[expert], up_weight[expert], sink, n_examples, method, True, offsets)
        gate, up = up.chunk(2, dim=-1)
        hidden_rows = up * module.act_fn(gate)
        outputs.append(_project(hidden_rows, down_weight[expert], swapped, n_examples, method, True, offsets))
    return torch.cat(outputs).view(-1, down_weight.shape[-1])


def _column(sink: torch.Tensor | None, column: int) -> torch.Tensor | None:
    """A (B, 2) view of `sink` whose column 0 is `column` (what `linear_with_sq_norms` reports its
    weight into; its bias column gets zeros, none of these projections has a bias inside the op)."""
    if sink is None:
        return None
    if column + 1 < sink.shape[1]:
        return sink[:, column : column + 2]
    return sink[:, column - 1 : column + 1].flip(1)


def _project(inputs, weight, sink, n_examples, method, transposed, offsets):
    if sink is None:
        return linear_forward(inputs, weight, None, transposed)
    return linear_with_sq_norms(
        inputs, weight, None, sink, n_examples, method=method, transposed=transposed, example_offsets=offsets
    )


def _token_examples(state: LayerPatch, n_tokens: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """(example of each of the N tokens, (N,) int64; number of examples) of the current forward."""
    hook = state.model_hook
    if hook.example_offsets is not None:  # padding-free batch: documents over the B·T tokens
        offsets = hook.example_offsets
        if hook.token_shape is None or hook.token_shape[0] * hook.token_shape[1] != n_tokens:
            raise RuntimeError(
                f"hf_gns: experts {state.name!r} got {n_tokens} tokens, not the batch's {hook.token_shape}"
            )
        return example_of_rows(offsets, n_tokens).to(device), offsets.shape[0] - 1
    n_examples = hook.batch_size or 1
    if n_tokens % n_examples:
        raise RuntimeError(
            f"hf_gns: experts {state.name!r} got {n_tokens} tokens, not a multiple of the batch of "
            f"{n_examples} examples: per-example norms need the tokens flattened batch-major"
        )
    return torch.arange(n_tokens, device=device) // (n_tokens // n_examples), n_examples


def patched_experts_forward(self: nn.Module, hidden_states, *args, **kwargs):
    """Forward of a patched experts module: the experts' computation, plus a sink when training."""
    state: ExpertsPatch = getattr(self, LAYER_ATTRIBUTE)
    if state.method_dense:
        return _dense_forward(self, state, hidden_states, *args, **kwargs)
    if state.method_parallel:
        return _parallel_forward(self, state, hidden_states, *args, **kwargs)
    if len(args) != 2 or kwargs or not state.tracks_gradients(self):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    top_k_index, top_k_weights = args
    token_example, n_examples = _token_examples(state, top_k_index.shape[0], hidden_states.device)
    sink = state.sinks.take_for(n_examples, hidden_states.device)
    return run_experts(
        self, hidden_states, top_k_index, top_k_weights, sink, token_example, n_examples, state.method
    )


def _dense_forward(self, state, hidden_states, *args, **kwargs):
    if args or kwargs or not state.tracks_gradients(self):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    hook = state.model_hook
    n_tokens = hidden_states.shape[0] // self.gate_up_proj.shape[0]
    offsets = None
    if hook.example_offsets is not None:
        offsets, n_examples = hook.example_offsets, hook.example_offsets.shape[0] - 1
    else:
        n_examples = hook.batch_size or 1
        if n_tokens % n_examples:
            raise RuntimeError(
                f"hf_gns: experts {state.name!r} got {n_tokens} tokens per expert, not a multiple of the "
                f"batch of {n_examples} examples"
            )
    sink = state.sinks.take_for(n_examples, hidden_states.device)
    return run_dense_experts(self, hidden_states, sink, n_examples, state.method, offsets)


def run_parallel_experts(
    module: nn.Module,
    inputs: torch.Tensor,
    expert_size: list[int],
    sink: torch.Tensor | None = None,
    row_example: torch.Tensor | None = None,
    n_examples: int = 1,
    method: str = "auto",
) -> torch.Tensor:
    """JetMoE's parallel experts on `inputs` (R, in) grouped by expert; with `sink`, per-example squared
    norms of `weight` go to `sink.grad[:, 0]` (examples given per row by `row_example`, (R,) int64)."""
    weight, n_experts = module.weight, module.weight.shape[0]
    if sink is not None:  # rows per (expert, example), read once: each expert's example offsets
        sizes = torch.tensor(expert_size, device=inputs.device)
        expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=inputs.device), sizes)
        keys = expert_of_row * n_examples + row_example
        pair_counts = torch.bincount(keys, minlength=n_experts * n_examples).view(n_experts, n_examples)
        all_offsets = torch.nn.functional.pad(pair_counts.cumsum(1), (1, 0))  # (E, B+1)
        host_counts = pair_counts.tolist()  # host sync (one per forward)
    outputs, start = [], 0
    for expert, count in enumerate(expert_size):
        rows = inputs[start : start + count]
        if sink is None or count == 0:
            outputs.append(linear_forward(rows, weight[expert], None, False))
        else:  # each example's rows contiguous (stable sort by example), the outputs put back in order
            order = torch.sort(row_example[start : start + count], stable=True).indices
            offsets = all_offsets[expert]
            remember_max_example_rows(offsets, max(host_counts[expert]))
            y = _project(rows[order], weight[expert], sink, n_examples, method, False, offsets)
            outputs.append(y[torch.argsort(order)])
        start += count
    return torch.cat(outputs)


# Autograd nodes of row-wise ops: row r of their output depends on row r of their inputs only.
_ROW_WISE = frozenset(
    {"MulBackward0", "AddBackward0", "SubBackward0", "DivBackward0", "NegBackward0", "SiluBackward0",
     "GeluBackward0", "SigmoidBackward0", "TanhBackward0", "ReluBackward0", "ToCopyBackward0",
     "CloneBackward0", "SplitBackward0", "SplitWithSizesBackward0"}
)  # fmt: skip


def _rows_of_earlier_experts(state: LayerPatch, inputs: torch.Tensor) -> torch.Tensor | None:
    """The row examples of an earlier parallel-experts output of this forward that `inputs` derives from
    by row-wise ops only (JetMoE: act(up) * gate of the input projection's rows), or None."""
    tags = {
        id(other.last_rows.node): other.last_rows.rows
        for _, other in state.model_hook.norms
        if getattr(other, "last_rows", None) is not None and other.last_rows.node is not None
    }
    found, stack, seen = {}, [inputs.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in tags:
            found[id(tags[id(node)])] = tags[id(node)]
            continue
        name = node.name()
        if name == "AccumulateGrad":  # a parameter (broadcast over rows)
            continue
        if name not in _ROW_WISE or (name.startswith("Split") and node._saved_dim == 0):
            return None
        stack.extend(next_node for next_node, _ in node.next_functions)
    return next(iter(found.values())) if len(found) == 1 else None


def _gathered_row_examples(state: LayerPatch, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(example of each row of `inputs`, number of examples): from the index that gathered the rows
    out of batch-major rows (`source[index]`, whose autograd node saved the index), or from the
    output of an earlier parallel-experts call that the rows derive from row-wise."""
    hook = state.model_hook
    node = inputs.grad_fn
    gathered = node is not None and node.name() == "IndexBackward0"
    indices = getattr(node, "_saved_indices", None) if gathered else None
    n_examples = hook.batch_size or 1
    if hook.example_offsets is None and not indices:
        rows = _rows_of_earlier_experts(state, inputs)
        if rows is not None:
            return rows, n_examples
    if hook.example_offsets is not None or not indices or len(indices) != 1 or indices[0] is None:
        raise RuntimeError(
            f"hf_gns: experts {state.name!r} got rows that were not gathered by one index from batch-major "
            "rows (x[index], seen by autograd) of a padded batch, nor derived row-wise from such experts' "
            "output: the example of each row is unknown, its per-example norms cannot be computed; patch "
            "with targets='norms'"
        )
    source_rows = node._saved_self_sym_sizes[0]
    if source_rows % n_examples:
        raise RuntimeError(
            f"hf_gns: experts {state.name!r} gathers its rows from {source_rows} rows, not a multiple of the "
            f"batch of {n_examples} examples"
        )
    return indices[0] // (source_rows // n_examples), n_examples


def _parallel_forward(self, state, inputs, *args, **kwargs):
    if len(args) != 1 or kwargs or not state.tracks_gradients(self):
        return type(self).forward(self, inputs, *args, **kwargs)
    row_example, n_examples = _gathered_row_examples(state, inputs)
    sink = state.sinks.take_for(n_examples, inputs.device)
    output = run_parallel_experts(self, inputs, list(args[0]), sink, row_example, n_examples, state.method)
    state.last_rows = _LastRows(output.grad_fn, row_example)  # for a later call on rows derived from these
    return output


def probe_experts(module: nn.Module, seed: int = 0) -> str | None:
    """None if `run_experts` reproduces `module`'s own forward on random routed tokens, else why not."""
    if is_dense(module):
        return _probe_dense(module, seed)
    if is_parallel_experts(module):
        return _probe_parallel(module, seed)
    (up, transposed, _, _), *_ = _projections(module)[0]
    hidden = up.shape[1] if transposed else up.shape[2]
    n_experts = module.num_experts
    top_k = min(_PROBE_TOP_K, n_experts)
    generator = torch.Generator(device=up.device).manual_seed(seed)
    x = torch.randn(_PROBE_TOKENS, hidden, generator=generator, device=up.device).to(up.dtype)
    scores = torch.rand(_PROBE_TOKENS, n_experts, generator=generator, device=up.device)
    top_k_index = scores.topk(top_k, dim=-1).indices
    top_k_weights = torch.rand(_PROBE_TOKENS, top_k, generator=generator, device=up.device).to(up.dtype)
    return _run_and_compare(module, run_experts, (x, top_k_index, top_k_weights), up.dtype)


def _probe_parallel(module: nn.Module, seed: int) -> str | None:
    weight = module.weight
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    expert_size = [(2 * expert + 1) % 4 for expert in range(weight.shape[0])]  # an empty group too
    x = torch.randn(sum(expert_size), weight.shape[2], generator=generator, device=weight.device)
    return _run_and_compare(module, run_parallel_experts, (x.to(weight.dtype), expert_size), weight.dtype)


def _probe_dense(module: nn.Module, seed: int) -> str | None:
    up = module.gate_up_proj
    generator = torch.Generator(device=up.device).manual_seed(seed)
    x = torch.randn(up.shape[0] * _PROBE_TOKENS, up.shape[1], generator=generator, device=up.device)
    return _run_and_compare(module, run_dense_experts, (x.to(up.dtype),), up.dtype)


def _run_and_compare(module: nn.Module, run, args: tuple, dtype: torch.dtype) -> str | None:
    """The module's own forward and `run` (the generic computation) on `args`, compared; or why not."""
    try:
        with torch.no_grad():
            expected = type(module).forward(module, *args)
            actual = run(module, *args)
    except Exception as error:
        return f"probe failed: {type(error).__name__}: {error}"
    return _compare(expected, actual, dtype)


def _compare(expected, actual: torch.Tensor, dtype: torch.dtype) -> str | None:
    if not isinstance(expected, torch.Tensor) or expected.numel() != actual.numel():
        return "probe: its forward does not return one tensor of the expected shape"
    expected = expected.reshape(actual.shape)  # DBRX views its (N, D) output as (N, 1, D) for (N, D) inputs
    scale = max(expected.abs().max().item(), 1.0)
    rtol = _PROBE_RTOL if dtype in (torch.float32, torch.float64) else 2e-2  # low precision: rounding
    if not torch.allclose(
        actual.float(), expected.float(), rtol=rtol, atol=rtol * _PROBE_ATOL / _PROBE_RTOL * scale
    ):
        return "probe: its forward differs from the generic experts computation (custom routing or gate?)"
    return None
