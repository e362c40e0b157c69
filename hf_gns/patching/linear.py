"""Linear layers (nn.Linear, HF's Conv1D) under `patch(targets="all")`: which ones, and their forward.

The bound forward computes exactly what the module computes (`F.linear`, or Conv1D's
addmm) through `linear_with_sq_norms`, whose backward also yields the per-example
squared norms of the weight and bias gradients by the simultaneous or the ghost method,
chosen per call from the shapes (`hf_gns.kernels.linear_cost`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.linear_cost import simultaneous_min_seq
from ..kernels.linear_op import _autocast_operands, linear_forward, linear_with_sq_norms, plan_linear
from ..kernels.linear_reference import DEFAULT_CHUNK_BYTES, max_example_rows
from .documents import offsets_for_rows
from .layer_state import LAYER_ATTRIBUTE, LayerPatch, examples_in
from .layout import back_to_input_layout

try:  # compiled autograd traces backward passes: their norms must come through sinks
    from torch._dynamo import compiled_autograd as _compiled_autograd
except ImportError:  # pragma: no cover - older or trimmed torch
    _compiled_autograd = None


def conv1d_class() -> type | None:
    """HF's `Conv1D` (GPT-2's transposed linear), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_linear_like(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def linear_unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` (a Linear or Conv1D) cannot be patched, or None."""
    base = nn.Linear if isinstance(module, nn.Linear) else conv1d_class()
    cls = type(module)
    if cls.forward is not base.forward:
        return (
            f"forward overridden by {cls.__name__}: per-example norms need {base.__name__}'s own computation"
        )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "no 2-D weight tensor"
    if not weight.is_floating_point():
        return f"weight of dtype {weight.dtype} (quantized?): not supported"
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """(K, L): input and output features."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_transposed(module) else (cols, rows)


def describe_linear(module: nn.Module, method: str) -> str:
    """E.g. `"768→3072 auto: ghost for T<31, simultaneous for T≥31"`."""
    in_features, out_features = features(module)
    shape = f"{in_features}→{out_features}"
    if method != "auto":
        return f"{shape} {method}"
    crossover = simultaneous_min_seq(in_features, out_features)
    return f"{shape} auto: ghost for T<{crossover}, simultaneous for T≥{crossover}"


class _LinearWithExampleGrads(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b) whose backward sends example b's gradient VECTORS
    [vec(G_bᵀ A_b), Σ_t g_bt] to row b of the leaf's gradient (fp32), for layers whose
    weight gets gradients from several calls per forward (`example_grads.py`); dW and db are
    the sums of those rows, so the weight gradient is that of the module (in fp32 arithmetic)."""

    @staticmethod
    def forward(ctx, x, weight, bias, leaf, n_examples, transposed):
        x_c, weight_c, bias_c = _autocast_operands(x, weight, bias)  # as autocast would cast them
        with torch.autocast(x.device.type, enabled=False):
            out = linear_forward(x_c, weight_c, bias_c, transposed)
        ctx.save_for_backward(x_c, weight_c)
        ctx.config = (n_examples, transposed, weight.dtype, None if bias is None else bias.dtype)
        return out.detach()  # not a view: models may edit it in place (see `linear_op.py`)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n_examples, transposed, weight_dtype, bias_dtype = ctx.config
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_x = grad_out.to(x.dtype) @ (weight.t() if transposed else weight)
            inputs = x.reshape(n_examples, -1, x.shape[-1]).float()  # A (B, T, K)
            grads = grad_out.reshape(n_examples, -1, grad_out.shape[-1]).float()  # G (B, T, L)
            if transposed:  # per-example dW_b: (B, K, L) or (B, L, K)
                weight_rows = torch.einsum("btk,btl->bkl", inputs, grads)
            else:
                weight_rows = torch.einsum("btl,btk->blk", grads, inputs)
            rows = [weight_rows.flatten(1)]
            grad_bias = None
            if bias_dtype is not None:
                bias_rows = grads.sum(1)  # (B, L)
                rows.append(bias_rows)
                grad_bias = bias_rows.sum(0).to(bias_dtype)
        grad_weight = weight_rows.sum(0).to(weight_dtype)
        return grad_x, grad_weight, grad_bias, torch.cat(rows, dim=1), None, None


def linear_with_example_grads(x, weight, bias, leaf, n_examples: int, transposed: bool) -> torch.Tensor:
    """The layer's output; backward adds example b's [dW_b, db_b] (flattened, fp32) to `leaf.grad[b]`."""
    return _LinearWithExampleGrads.apply(x, weight, bias, leaf, n_examples, transposed)


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`module.weight` and `module.bias`, read from `_parameters` where they are parameters (a dict
    lookup; `nn.Module.__getattr__` costs ~1 µs a read, and this runs at every call)."""
    params = module._parameters
    weight = params["weight"] if "weight" in params else module.weight
    bias = params["bias"] if "bias" in params else getattr(module, "bias", None)
    return weight, bias


def patched_linear_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Forward of a patched Linear/Conv1D: the module's computation, plus a sink when training
    (per-example gradient vectors for layers called several times per forward or sharing weights)."""
    state: LayerPatch = getattr(self, LAYER_ATTRIBUTE)
    weight, bias = _weight_and_bias(self)
    # `state.tracks_gradients(self)`, inline on the parameters just read
    if not (
        state.enabled
        and torch.is_grad_enabled()
        and (weight.requires_grad or (isinstance(bias, torch.Tensor) and bias.requires_grad))
    ):
        return linear_forward(input, weight, bias, state.transposed)
    hook = state.model_hook
    vectors = state.routing.vectors_for_call(hook) if state.routing is not None else None
    if hook.example_offsets is not None:  # padding-free batch: documents are the examples
        if vectors is not None and state.routing.mode != "discover":
            raise RuntimeError(
                f"hf_gns: {state.name!r} is called several times per forward (or shares its weight): "
                "per-example gradient vectors of padding-free (document) batches are not supported"
            )
        offsets = offsets_for_rows(hook.example_offsets, input, hook.token_shape)
        return _linear_with_sink(weight, bias, state, input, offsets)
    x, seq_first = state.layout.examples_first(input, hook.batch_size)  # (T, B, K) → (B, T, K)
    if vectors is not None:
        if state.tie is not None:
            raise RuntimeError(
                f"hf_gns: {state.name!r} (weight tied to {state.tie.embedding_name!r}) is called several "
                "times per forward: not supported; patch with targets='norms'"
            )
        n_examples = examples_in(x, hook.batch_size)
        leaf = vectors.leaf_for(hook, n_examples, x.device)
        out = linear_with_example_grads(x, weight, bias, leaf, n_examples, state.transposed)
        return back_to_input_layout(out, seq_first)
    return back_to_input_layout(_linear_with_sink(weight, bias, state, x, None), seq_first)


def _linear_with_sink(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: LayerPatch,
    input: torch.Tensor,
    offsets: torch.Tensor | None,
) -> torch.Tensor:
    """The squared-norm path: `linear_with_sq_norms`, its (B, 2) (or (E, 2) for documents) squared
    norms going to the module's `sinks`: in eager mode straight from the op's backward (a collector,
    as the fused norms do: no sink leaf, no AccumulateGrad, no hook per call); under torch.compile
    (or compiled autograd, which traces the backward) through a sink, a graph input (`sinks.py`)."""
    n_examples = examples_in(input, state.model_hook.batch_size) if offsets is None else offsets.shape[0] - 1
    # documents are padded to the longest: that T sets both methods' cost (default: mean rows)
    seq = None if offsets is None else max_example_rows(offsets)
    plan = plan_linear(
        input.shape, weight.shape, n_examples, state.method, state.transposed, DEFAULT_CHUNK_BYTES, seq
    )
    state.last_method = plan.method
    if torch.compiler.is_compiling() or getattr(_compiled_autograd, "compiled_autograd_enabled", False):
        sink, collector = state.sinks.take_for(n_examples, input.device), None
    else:
        sink, collector = None, state.sinks.collect
    # with documents the tied embedding's lookup is one flattened (1, N) row of ids
    tied_link = state.tie.take(1 if offsets is not None else n_examples) if state.tie is not None else None
    return linear_with_sq_norms(
        input,
        weight,
        bias,
        sink,
        n_examples,
        method=plan.method,
        transposed=state.transposed,
        tied_link=tied_link,
        example_offsets=offsets,
        plan=plan,
        sq_norm_collector=collector,
    )
