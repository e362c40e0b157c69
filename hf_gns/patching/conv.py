"""nn.Conv1d under `patch(targets="all")`: per-example squared norms of its weight and bias.

Mamba-style mixers run a causal depthwise `nn.Conv1d` over (B, C, T) (groups = C, padding
K-1, output cut to T by the caller); a few other models use ordinary ones. For input x
(B, C_in, L), output gradient dy (B, C_out, L_out) and groups g, example b's weight gradient
is, with the zero-padded input unfolded into windows X_b[c, l, k] = x_pad[b, c, l·s + k·d],

    dW_b[o, c, k] = Σ_l dy_b[o, l] · X_b[g(o)·C_in/g + c, l, k]      db_b[o] = Σ_l dy_b[o, l]

(Opacus' unfold method). The op forms the (B, *W.shape) per-example gradients in fp32 (at least) —
conv weights in these models are small (depthwise: C·K) — and returns their sum as W's
gradient and |dW_b|², |db_b|² as the (B, 2) sink's gradient, like the other layer kinds.
Only padding_mode="zeros" (F.conv1d's own padding) is supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer_state import LAYER_ATTRIBUTE, LayerPatch, examples_in


def conv_unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` (a convolution) cannot be patched, or None."""
    cls = type(module)
    if not isinstance(module, nn.Conv1d):
        return f"{cls.__name__} (nn.{cls.__name__}) not supported: only nn.Conv1d"
    if cls.forward is not nn.Conv1d.forward:
        return f"forward overridden by {cls.__name__}: per-example norms need Conv1d's own computation"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} not supported (only 'zeros')"
    if not module.weight.is_floating_point():
        return f"weight of dtype {module.weight.dtype} (quantized?): not supported"
    return None


def describe_conv(module: nn.Conv1d) -> str:
    out_channels, in_per_group, kernel = module.weight.shape
    return f"Conv1d {module.in_channels}→{out_channels} k={kernel} groups={module.groups}: per-example unfold"


def _padding(module: nn.Conv1d) -> tuple[int, int]:
    """(left, right) zero padding that F.conv1d applies for the module's `padding`."""
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        total = module.dilation[0] * (module.kernel_size[0] - 1)  # "same"
        return total // 2, total - total // 2
    return padding[0], padding[0]


def conv1d_per_example_grads(
    x: torch.Tensor, grad_out: torch.Tensor, module: nn.Conv1d
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW_b (B, C_out, C_in/g, K), db_b (B, C_out)) in fp32, for input x (B, C_in, L) and its output's
    gradient dy (B, C_out, L_out)."""
    kernel, stride, dilation, groups = (
        module.kernel_size[0],
        module.stride[0],
        module.dilation[0],
        module.groups,
    )
    left, right = _padding(module)
    accumulate = torch.promote_types(x.dtype, torch.float32)
    padded = F.pad(x.to(accumulate), (left, right))
    windows = padded.unfold(2, dilation * (kernel - 1) + 1, stride)[..., ::dilation]  # (B, C_in, L_out', K)
    n_out = grad_out.shape[-1]
    windows = windows[:, :, :n_out]
    batch, in_channels = x.shape[:2]
    out_channels = grad_out.shape[1]
    windows = windows.reshape(batch, groups, in_channels // groups, n_out, kernel)
    grads = grad_out.to(accumulate).reshape(batch, groups, out_channels // groups, n_out)
    weight = torch.einsum("bgclk,bgol->bgock", windows, grads).reshape(batch, out_channels, -1, kernel)
    return weight, grads.reshape(batch, out_channels, n_out).sum(2)


class _Conv1dWithSqNorms(torch.autograd.Function):
    """y = conv1d(x, W, b); backward also sends |dW_b|², |db_b|² to the sink's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, module):
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv1d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        module = ctx.module
        left, right = _padding(module)  # through the explicitly padded input: "same" with an even kernel too
        padded_shape = (*x.shape[:-1], x.shape[-1] + left + right)
        grad_padded = torch.nn.grad.conv1d_input(
            padded_shape, weight, grad_out.to(weight.dtype), module.stride, 0, module.dilation, module.groups
        )
        grad_x = grad_padded[..., left : left + x.shape[-1]].to(x.dtype)
        weight_rows, bias_rows = conv1d_per_example_grads(x, grad_out, module)
        sink_grad = torch.stack(
            [
                weight_rows.flatten(1).square().sum(1),
                bias_rows.square().sum(1) if ctx.has_bias else torch.zeros_like(bias_rows[:, 0]),
            ],
            dim=1,
        )
        grad_bias = bias_rows.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_x, weight_rows.sum(0).to(weight.dtype), grad_bias, sink_grad, None


def patched_conv_forward(self: nn.Conv1d, input: torch.Tensor) -> torch.Tensor:
    """Forward of a patched nn.Conv1d: its own computation, plus a sink when training."""
    state: LayerPatch = getattr(self, LAYER_ATTRIBUTE)
    if not state.tracks_gradients(self):
        return type(self).forward(self, input)
    hook = state.model_hook
    if hook.example_offsets is not None or input.dim() != 3:
        raise RuntimeError(
            f"hf_gns: Conv1d {state.name!r} got an input of shape {tuple(input.shape)}"
            + (" in a padding-free batch" if hook.example_offsets is not None else "")
            + ": per-example norms need (B, C, L) with one example per row; patch with targets='norms'"
        )
    n_examples = examples_in(input, hook.batch_size)
    sink = state.sinks.take_for(n_examples, input.device)
    return _Conv1dWithSqNorms.apply(input, self.weight, self.bias, sink, self)
