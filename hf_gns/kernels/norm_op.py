"""The fused norm as an autograd op: `fused_norm(...)`.

Backward returns dx, dγ, dβ as usual and, as the gradient of an optional `sq_norm_sink`
input of shape (B, 2), the per-example squared norms |dγ_b|², |dβ_b|² (fp32). Routing
the norms through autograd keeps the op functional: no side effects in backward, no
host-device sync, and `torch.compile` sees an ordinary differentiable op.

Two entry points share one implementation:
- eager: a `torch.autograd.Function` calling the planned launchers of `norm_launch.py`
  directly (a plan per input layout, compiled kernels run directly; a
  `torch.library.custom_op` costs ~2x the Python dispatch per call, which matters at
  small D where the kernels take tens of microseconds, and in the eager Trainer step,
  whose backward the host time of 25-50 norm calls can leave the GPU waiting on);
- under `torch.compile`: the same Function calls the `hf_gns::fused_norm_forward` /
  `hf_gns::fused_norm_backward` `torch.library.triton_op`s (`norm_triton_op.py`), whose
  bodies Inductor traces: it launches the Triton kernels from its generated code, with no
  Python op dispatch per call and no graph break.

Backends: "triton" (the kernels in `norm_triton.py`; on CPU only under
TRITON_INTERPRET=1), "torch" (`norm_reference.py`), or "auto" (Triton for CUDA tensors
in fp32/bf16/fp16, the reference otherwise). Set with `set_backend`, `use_backend` or the
HF_GNS_BACKEND environment variable.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .norm_reference import norm_backward_reference, norm_forward_reference
from .norm_triton_op import norm_backward_op, norm_forward_op

try:  # Triton is optional: without it (macOS, Windows) everything runs on the reference.
    from .norm_launch import norm_backward_documents_triton, norm_backward_rows, norm_forward_rows
    from .norm_triton import MAX_FUSED_WIDTH

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    TRITON_AVAILABLE = False
    MAX_FUSED_WIDTH = 0

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_backend = os.environ.get("HF_GNS_BACKEND", "auto")
# HF_GNS_COMPILED_TRITON=0: compiled graphs trace the PyTorch reference instead of the Triton
# kernels (eager keeps Triton) - a switch for diagnosing the compiled path
_COMPILED_TRITON = os.environ.get("HF_GNS_COMPILED_TRITON", "1") != "0"
# HF_GNS_COMPILED_FORWARD=inductor: compiled graphs trace the forward's PyTorch reference (which
# Inductor fuses with the residual add, dropout and dtype casts around the norm, as it fuses its own
# norms) and keep the Triton backward, fed the reference's mean and rstd. An experiment for the
# compiled gap (issue 11); "triton" (the default) launches the Triton forward kernel.
_COMPILED_TRITON_FORWARD = os.environ.get("HF_GNS_COMPILED_FORWARD", "triton") != "inductor"


def set_backend(name: str) -> None:
    """Choose the norm implementation: `"auto"`, `"triton"` or `"torch"`."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown hf_gns backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("backend 'triton' needs the triton package: pip install triton")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of `set_backend`."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _uses_triton(x: torch.Tensor) -> bool:
    if _backend == "torch" or not TRITON_AVAILABLE:
        return False
    if _backend == "triton":
        return True
    return x.is_cuda and x.dtype in _TRITON_DTYPES and x.shape[-1] <= MAX_FUSED_WIDTH


def _backward_reference(
    dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads,
    example_offsets=None,
):  # fmt: skip
    # example_offsets goes to the reference only when given: None keeps dim 0 as the examples
    extra = {} if example_offsets is None else {"example_offsets": example_offsets}
    args = (dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight)
    dx, dw, db, sq_norms = norm_backward_reference(*args, param_grads=param_grads, **extra)
    return dx, dw, db, sq_norms.float()


# ------------------------------------------------------------------------- autograd

_WILL_ENGINE_EXECUTE = getattr(torch._C, "_will_engine_execute_node", None)  # private, so guarded


def _accumulates_parameters(ctx, has_weight: bool, has_bias: bool) -> bool:
    """Whether the running backward pass accumulates into γ (or β): `loss.backward()` does,
    `torch.autograd.grad(loss, others)` does not. A collector then sees what a sink would (a
    sink's norms arrive only where its own AccumulateGrad runs, i.e. in `.backward()`)."""
    if _WILL_ENGINE_EXECUTE is None or not has_weight:
        return True
    nodes = ctx.next_functions  # one per tensor input: x, γ, then β if given (then the offsets)
    node = nodes[1][0]
    if node is None and has_bias:
        node = nodes[2][0]
    if node is None:
        return True
    try:
        return _WILL_ENGINE_EXECUTE(node)
    except RuntimeError:  # "a leaf node ... while running autograd.grad()": it does not accumulate
        return False


class _FusedNorm(torch.autograd.Function):
    """Three paths, chosen in forward: under torch.compile the triton_ops; in eager mode the
    planned launchers of `norm_launch.py` (x, γ and one fp32 stats buffer saved; `ctx.plan` is
    the forward's plan, which the backward's plans hang off); else the PyTorch reference."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        sq_norm_sink,
        example_offsets,
        eps,
        rms,
        weight_offset,
        cast_before_weight,
        out_dtype,
        sq_norm_collector,
    ):
        ctx.config = (bias is not None, rms, weight_offset, cast_before_weight)
        ctx.collector = sq_norm_collector
        ctx.bias_dtype = None if bias is None or weight is None or bias.dtype == weight.dtype else bias.dtype
        ctx.has_sink = sq_norm_sink is not None
        if torch.compiler.is_compiling():
            # the triton_op: Inductor traces its body and launches the kernels itself
            ctx.plan = None
            ctx.use_triton = _uses_triton(x) and _COMPILED_TRITON
            forward_triton = ctx.use_triton and _COMPILED_TRITON_FORWARD
            y, mean, rstd = norm_forward_op(
                x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype, forward_triton
            )
            ctx.save_for_backward(x, weight, mean, rstd, example_offsets)
            return y
        if _uses_triton(x):
            y, stats, ctx.plan = norm_forward_rows(
                x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype
            )
            if example_offsets is None:
                ctx.save_for_backward(x, weight, stats)
            else:
                ctx.save_for_backward(x, weight, stats, example_offsets)
            return y
        ctx.plan = None
        y, mean, rstd = norm_forward_reference(
            x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype
        )
        ctx.save_for_backward(x, weight, mean, rstd, example_offsets)
        return y

    @staticmethod
    def backward(ctx, dy):
        has_bias, rms, weight_offset, cast_before_weight = ctx.config
        # frozen γ, β and no sink (LoRA): skip the parameter gradients and their norms
        needs = ctx.needs_input_grad
        param_grads = needs[1] or needs[2] or ctx.has_sink or ctx.collector is not None
        if torch.compiler.is_compiling():  # a compiled graph, or an eager forward's compiled autograd
            if ctx.plan is None:
                x, weight, mean, rstd, example_offsets = ctx.saved_tensors
            else:  # saved by the eager planned path
                x, weight, stats, *offsets = ctx.saved_tensors
                (mean, rstd), example_offsets = ctx.plan.mean_rstd(stats), (offsets[0] if offsets else None)
            config = (has_bias, rms, weight_offset, cast_before_weight, param_grads)
            use_triton = getattr(ctx, "use_triton", _uses_triton(x) and _COMPILED_TRITON)
            dx, grads, sq_norms = norm_backward_op(
                dy, x, weight, mean, rstd, *config, use_triton, example_offsets
            )
            n_params = 0 if (weight is None or not param_grads) else (2 if has_bias else 1)
            dw = grads[0] if n_params >= 1 else None
            db = grads[1] if n_params == 2 else None
        elif ctx.plan is not None:
            x, weight, stats, *offsets = ctx.saved_tensors
            n_params = 0 if (weight is None or not param_grads) else (2 if has_bias else 1)
            if offsets:  # padding-free: examples are documents
                mean, rstd = ctx.plan.mean_rstd(stats)
                config = (has_bias, rms, weight_offset, cast_before_weight, param_grads)
                args = (dy, x, weight, mean, rstd, *config, offsets[0])
                dx, dw, db, sq_norms = norm_backward_documents_triton(*args)
            else:
                dx, grads, sq_norms = norm_backward_rows(
                    ctx.plan, dy, x, weight, stats, rms, weight_offset, cast_before_weight, n_params
                )
                dw, db = (grads, None) if n_params < 2 else grads.unbind(0)
        else:
            x, weight, mean, rstd, example_offsets = ctx.saved_tensors
            config = (has_bias, rms, weight_offset, cast_before_weight, param_grads)
            dx, dw, db, sq_norms = _backward_reference(dy, x, weight, mean, rstd, *config, example_offsets)
        if db is not None and ctx.bias_dtype is not None:
            db = db.to(ctx.bias_dtype)
        if ctx.collector is not None and _accumulates_parameters(ctx, weight is not None, has_bias):
            ctx.collector(sq_norms)
        return dx, dw, db, (sq_norms if ctx.has_sink else None), None, None, None, None, None, None, None


def new_sq_norm_sink(x_or_n_examples: torch.Tensor | int, device: torch.device | str | None = None):
    """A fresh (B, 2) fp32 leaf whose `.grad`, after backward, holds |dγ_b|², |dβ_b|².

    Takes the norm's input `x` (B = `x.shape[0]`, on `x.device`) or B and a device, for
    callers that make sinks before the input exists. Its values are never read (only its
    gradient matters), so it is left uninitialized.
    """
    if isinstance(x_or_n_examples, torch.Tensor):
        x = x_or_n_examples
        n_examples, device = (x.shape[0] if x.dim() > 1 else 1), x.device
    else:
        n_examples = x_or_n_examples
    return torch.empty(n_examples, 2, dtype=torch.float32, device=device, requires_grad=True)


def fused_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    rms: bool = False,
    weight_offset: float = 0.0,
    cast_before_weight: bool = False,
    out_dtype: torch.dtype | None = None,
    sq_norm_sink: torch.Tensor | None = None,
    example_offsets: torch.Tensor | None = None,
    sq_norm_collector: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """LayerNorm (`rms=False`) or RMSNorm (`rms=True`) over the last dim of `x`.

    Args:
        x (`torch.Tensor`): input of shape (B, ..., D); dim 0 indexes examples, every
            other leading dim (sequence, heads) belongs to the example.
        weight (`torch.Tensor`, *optional*): γ of shape (D,), or None for no affine.
        bias (`torch.Tensor`, *optional*): β of shape (D,); needs `weight`.
        eps (`float`, *optional*, defaults to 1e-5): added to the variance.
        rms (`bool`, *optional*, defaults to `False`): RMSNorm instead of LayerNorm.
        weight_offset (`float`, *optional*, defaults to 0.0): scale by γ + offset
            (1.0 for Gemma's x̂·(1+γ)); the gradient of γ is unchanged.
        cast_before_weight (`bool`, *optional*, defaults to `False`): round x̂ to
            `x.dtype` before the weight product, as Llama's RMSNorm does.
        out_dtype (`torch.dtype`, *optional*): output dtype, defaults to `x.dtype`.
        sq_norm_sink (`torch.Tensor`, *optional*): a (B, 2) fp32 leaf from
            `new_sq_norm_sink(x)`; after backward its `.grad` holds, per example, the
            squared norms of that example's contribution to `weight.grad` (column 0)
            and `bias.grad` (column 1).
        example_offsets (`torch.Tensor`, *optional*): int64 (E+1,) offsets grouping the rows
            of `x` flattened to (N, D) into E examples (per-document, padding-free batches):
            example e owns rows [offsets[e], offsets[e+1]). The sink then has shape (E, 2).
            None: dim 0 indexes the examples.
        sq_norm_collector (`Callable[[torch.Tensor], None]`, *optional*): eager mode's cheaper
            alternative to a sink: backward calls it with the (B, 2) fp32 squared norms (no
            sink leaf, no AccumulateGrad node, no hook: ~10% of the op's host time per call).
            It is called once per backward pass of the op that accumulates into γ or β (as a
            sink's gradient arrives: not for `torch.autograd.grad` w.r.t. other tensors), also
            under either kind of activation checkpointing. Not under torch.compile (use a sink).

    Returns:
        `torch.Tensor` of `x.shape` in `out_dtype`.

    Example:
    ```python
    >>> sink = new_sq_norm_sink(x)
    >>> y = fused_norm(x, ln.weight, ln.bias, ln.eps, sq_norm_sink=sink)
    >>> y.square().sum().backward()
    >>> sink.grad[:, 0]  # |dγ_b|² for every example b
    ```
    """
    shape = x.shape
    width = shape[-1]
    if width == 0:
        raise ValueError("fused_norm needs a non-empty last dimension")
    if weight is not None and weight.shape != (width,):
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match D={width} of the input")
    if bias is not None:
        if weight is None:
            raise ValueError("fused_norm takes a bias only together with a weight")
        if bias.shape != (width,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match D={width} of the input")
    if example_offsets is not None:
        if example_offsets.dim() != 1 or example_offsets.shape[0] < 2:
            raise ValueError("example_offsets must be a 1-D int64 tensor of E+1 >= 2 row offsets")
        n_examples = example_offsets.shape[0] - 1
    else:
        n_examples = shape[0] if len(shape) > 1 else 1
    if sq_norm_collector is not None and (sq_norm_sink is not None or torch.compiler.is_compiling()):
        raise ValueError("fused_norm takes sq_norm_collector in eager mode only, and not with a sink")
    if sq_norm_sink is not None and sq_norm_sink.shape != (n_examples, 2):
        raise ValueError(
            f"sq_norm_sink must have shape ({n_examples}, 2), one row per example; "
            f"got {tuple(sq_norm_sink.shape)}"
        )
    return _FusedNorm.apply(
        x,
        weight,
        bias,
        sq_norm_sink,
        example_offsets,
        float(eps),
        rms,
        float(weight_offset),
        cast_before_weight,
        out_dtype or x.dtype,
        sq_norm_collector,
    )
