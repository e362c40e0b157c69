"""Eager launchers of the norm kernels (`norm_triton.py`), built for host cost.

In eager training the autograd engine runs a norm's backward between other ops; when its host
time exceeds the GPU time of the work queued ahead of it, the GPU idles (issue 11: the Trainer
step of a Llama-style 124M model was host-bound in the backward, the fused norm costing ~3x a
PyTorch op's host time per call). So a forward or backward here costs, in Python: a key from the
input's layout, one dict lookup, the allocations it must make, and direct runs of the compiled
kernels.

- A plan per input layout (shape, strides, dtypes, 16-byte alignment of the pointers the caller
  passes, device) holds everything derived from it: the (B, R, D) row strides, grids and tiles,
  allocation sizes and workspace offsets, the integer kernel arguments, and per kernel the
  compiled Triton kernel once its first launch (through `kernel[grid]`, which compiles) has
  returned it. A backward's plans hang off its forward's (same x and γ), keyed by dy's layout.
- Later launches call the compiled kernel's `run` (what `JITFunction.run` ends with) with every
  pointer as an integer: no per-argument specialization in Python, and no `data_ptr` call or
  driver pointer query per tensor in Triton's launcher.
- The forward makes two allocations (y; rstd and mean in one fp32 buffer, which with x and γ is
  all the backward saves), the backward three (dx, dγ/dβ, the (B, 2) squared norms); its fp32
  workspace is one buffer per stream, reused (`_workspace`).

The key holds everything Triton specializes the kernels on (dtypes, pointer alignment, the int
arguments, which follow from the shapes; fresh allocations are 512-byte aligned) and the tile
choice, so a cached compiled kernel runs only where Triton would pick the same one. Launches go
through `kernel[grid]` every time under TRITON_INTERPRET=1, with HF_GNS_FAST_LAUNCH=0, on devices
outside `DIRECT_LAUNCH_DEVICES`, and after any error in the direct path.
"""

from __future__ import annotations

import warnings

import torch
import triton

from . import norm_triton
from .norm_reference import check_example_offsets
from .norm_triton import (
    _DOCUMENT_PIECES_PER_LOAD,
    _as_rows,
    _CachedLauncher,
    _cdiv,
    _next_power_of_2,
    _norm_bwd_documents_kernel,
    _norm_bwd_kernel,
    _norm_fwd_kernel,
    _reduce_partials_kernel,
    _ticket,
    backward_config,
    check_fused_width,
    forward_config,
    reduce_config,
)

_RUNTIME_KNOBS = triton.knobs.runtime
_FLOAT32 = torch.float32


# Triton <= 3.6: a launch hook is a callable or None; later Triton: a HookChain, empty unless set
_HOOK_CHAIN = getattr(triton.knobs, "HookChain", None)


def _no_hook(hook) -> bool:
    return hook is None or (hook.__class__ is _HOOK_CHAIN and not hook.calls)


class _Launch:
    """One kernel launch of a plan: fixed grid, tile and specialization; the compiled kernel once known."""

    __slots__ = ("kernel", "grid", "grid_0", "grid_1", "num_warps", "constexprs", "tail", "compiled")

    def __init__(self, kernel, grid: tuple[int, ...], num_warps: int, **constexprs):
        self.kernel = kernel
        self.grid = grid
        self.grid_0, self.grid_1 = grid[0], (grid[1] if len(grid) > 1 else 1)
        self.num_warps = num_warps
        self.constexprs = constexprs
        params = getattr(kernel, "params", None)  # the interpreter's kernels have none (and no direct launch)
        names = list(constexprs) if params is None else [p.name for p in params if p.is_constexpr]
        self.tail = tuple(constexprs[name] for name in names)  # appended after the runtime arguments
        self.compiled = None

    def first(self, args: tuple, plan: _ForwardPlan) -> None:
        """Launch through Triton (tensors for every pointer): it specializes, compiles and launches;
        keep the compiled kernel for `direct` launches when they are allowed (and it was compiled
        for the plan's device: Triton compiles for the current one)."""
        compiled = norm_triton._compile(self.kernel, self.grid, args, self.constexprs, self.num_warps)
        if plan.direct and _CachedLauncher.enabled and _on_device(plan.device_index):
            self.compiled = compiled

    def direct(self, stream: int, args: tuple) -> None:
        """Run the compiled kernel (pointers as ints), as `JITFunction.run` ends."""
        compiled = self.compiled
        enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
        if (enter is None or _no_hook(enter)) and (leave is None or _no_hook(leave)):
            metadata = enter = leave = None
        else:
            metadata = compiled.launch_metadata(self.grid, stream, *args, *self.tail)
        try:
            compiled.run(
                self.grid_0, self.grid_1, 1, stream, compiled.function, compiled.packed_metadata,
                metadata, enter, leave, *args, *self.tail,
            )  # fmt: skip
        except (AttributeError, TypeError) as error:  # a Triton whose launch protocol differs
            _CachedLauncher.enabled = False
            self.compiled = None
            message = f"hf_gns: direct Triton launch unavailable ({error}); using kernel[grid]"
            warnings.warn(message, stacklevel=3)
            raise _Retry from error


class _Retry(Exception):
    """The direct launch failed before launching: launch again through `kernel[grid]`."""


def _on_device(device_index: int | None) -> bool:
    """Whether the current CUDA device is `device_index` (None: not a CUDA plan)."""
    return device_index is None or device_index == torch._C._cuda_getDevice()


def _direct_ready(launch: _Launch, device_index: int | None) -> bool:
    """Whether `launch` can run its compiled kernel now (on CUDA: the current device is the plan's)."""
    return launch.compiled is not None and _CachedLauncher.enabled and _on_device(device_index)


def _current_stream(device_index: int | None) -> int:
    # the raw stream handle: `torch.cuda.current_stream()` builds a Stream object each call
    return torch._C._cuda_getCurrentRawStream(device_index)


def _row_strides(x: torch.Tensor, n_examples: int) -> tuple[int, int] | None:
    """(stride over examples, stride over rows) of `x` viewed as (B, R, D), or None where only a
    copy gives unit stride on D (then each call copies, as `_as_rows` does)."""
    x3 = x.reshape(n_examples, -1, x.shape[-1])
    if x3.stride(-1) != 1 or x3.data_ptr() != x.data_ptr():
        return None
    return x3.stride(0), x3.stride(1)


# ----------------------------------------------------------------------------- forward


class _ForwardPlan:
    """Everything a forward (and its backward) derives from the input's layout."""

    __slots__ = (
        "device", "direct", "device_index", "x_shape", "x_dtype", "width", "n_examples", "rows_per_example",
        "n_rows", "x_strides", "y_shape", "stats_numel", "mean_bytes", "ints", "launch", "backward_plans",
    )  # fmt: skip

    def __init__(self, x, weight, bias, rms, cast_before_weight, out_dtype, device):
        width = x.shape[-1]
        check_fused_width(width)
        self.device = device
        self.direct = device.type in norm_triton.DIRECT_LAUNCH_DEVICES
        self.device_index = device.index if device.type == "cuda" else None
        self.x_shape, self.x_dtype, self.width = x.shape, x.dtype, width
        self.n_examples = x.shape[0] if x.dim() > 1 else 1
        self.n_rows = x.numel() // width
        self.rows_per_example = self.n_rows // self.n_examples if self.n_examples else 0
        self.x_strides = _row_strides(x, self.n_examples) if self.n_rows else None
        self.y_shape = x.shape
        # rstd (n_rows) then, for LayerNorm, mean (n_rows): one fp32 allocation
        self.stats_numel = self.n_rows * (1 if rms else 2)
        self.mean_bytes = 0 if rms else 4 * self.n_rows  # RMSNorm passes rstd as the (unread) mean
        self.backward_plans: dict[tuple, _BackwardPlan] = {}
        self.launch = None
        if self.n_rows == 0:
            return
        strides = self.x_strides or (self.rows_per_example * width, width)  # a copy is contiguous
        block_m, block_d, num_warps = forward_config(width)
        self.ints = (*strides, self.n_rows, self.rows_per_example, width, 1.0 / width)
        self.launch = _Launch(
            _norm_fwd_kernel, (_cdiv(self.n_rows, block_m),), num_warps,
            IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_D=block_d,
        )  # fmt: skip

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as the kernels read it: itself (addressed by `x_strides`), or a (B, R, D) copy."""
        return x if self.x_strides is not None else _as_rows(x, self.n_examples)

    def mean_rstd(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of `stats` as the reference's (mean, rstd): (*x.shape[:-1]) each, mean empty for RMSNorm."""
        rows_shape = self.x_shape[:-1]
        rstd = stats[: self.n_rows].view(rows_shape)
        mean = stats[self.n_rows :].view(rows_shape) if self.mean_bytes else stats[:0]
        return mean, rstd


_FORWARD_PLANS: dict[tuple, _ForwardPlan] = {}
# Plans are small (the compiled kernels they point at stay in Triton's cache): a bound, not an LRU.
_MAX_PLANS = 1024


def clear_plans() -> None:
    """Forget every cached plan (and compiled kernel handle) and workspace; the next calls build them
    again."""
    _FORWARD_PLANS.clear()
    _WORKSPACES.clear()


def forward_plan_count() -> int:
    """How many forward plans are cached (tests pin what a call builds)."""
    return len(_FORWARD_PLANS)


def _forward_plan(x, weight, bias, rms, cast_before_weight, out_dtype, device, x_ptr, w_ptr, b_ptr):
    """The plan of a forward on these inputs (pointers given by the caller, which launches with them)."""
    key = (
        x.shape, x.stride(), x.dtype, out_dtype, device, rms, cast_before_weight,
        None if weight is None else weight.dtype, None if bias is None else bias.dtype,
        x_ptr % 16 == 0, w_ptr is None or w_ptr % 16 == 0, b_ptr is None or b_ptr % 16 == 0,
    )  # fmt: skip
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        if len(_FORWARD_PLANS) >= _MAX_PLANS:  # e.g. a new sequence length every batch: start over
            _FORWARD_PLANS.clear()
        plan = _FORWARD_PLANS[key] = _ForwardPlan(x, weight, bias, rms, cast_before_weight, out_dtype, device)
    return plan


def norm_forward_rows(x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype):
    """The forward launch: `(y, stats, plan)`; `stats` (fp32) holds rstd over the rows of x, then for
    LayerNorm their mean (`plan.mean_rstd(stats)` views them as the reference returns them).
    `eps` and `weight_offset` are floats, `out_dtype` a dtype."""
    device = x.device
    w_ptr = None if weight is None else weight.data_ptr()
    b_ptr = None if bias is None else bias.data_ptr()
    x_ptr = x.data_ptr()
    plan = _forward_plan(x, weight, bias, rms, cast_before_weight, out_dtype, device, x_ptr, w_ptr, b_ptr)
    y = torch.empty(plan.y_shape, dtype=out_dtype, device=device)
    stats = torch.empty(plan.stats_numel, dtype=_FLOAT32, device=device)
    launch = plan.launch
    if launch is None:  # no rows
        return y, stats, plan
    rows = x if plan.x_strides is not None else _as_rows(x, plan.n_examples)
    if _direct_ready(launch, plan.device_index):
        stats_ptr = stats.data_ptr()
        x_ptr = x_ptr if rows is x else rows.data_ptr()
        args = (x_ptr, y.data_ptr(), w_ptr, b_ptr, stats_ptr + plan.mean_bytes, stats_ptr,
                *plan.ints, eps, weight_offset)  # fmt: skip
        try:
            launch.direct(_current_stream(plan.device_index), args)
            return y, stats, plan
        except _Retry:
            pass
    mean, rstd = plan.mean_rstd(stats)
    args = (rows, y, weight, bias, rstd if rms else mean, rstd, *plan.ints, eps, weight_offset)
    launch.first(args, plan)
    return y, stats, plan


# ---------------------------------------------------------------------------- backward


class _BackwardPlan:
    """Everything a backward derives from the layouts of x (its forward plan) and dy."""

    __slots__ = (
        "dy_strides", "n_params", "workspace_numel", "partial_b_bytes", "sq_bytes", "grads_shape",
        "sq_shape", "bwd_ints", "reduce_ints", "bwd", "reduce",
    )  # fmt: skip

    def __init__(self, plan: _ForwardPlan, dy: torch.Tensor, weight, rms, cast_before_weight, n_params):
        n_examples, rows_per_example, width = plan.n_examples, plan.rows_per_example, plan.width
        self.dy_strides = _row_strides(dy, n_examples) if plan.n_rows else None
        self.n_params = n_params
        self.grads_shape = (width,) if n_params == 1 else (n_params, width)
        self.sq_shape = (n_examples, 2)
        self.bwd = self.reduce = None
        if plan.n_rows == 0:
            return
        block_m, block_d, num_warps, rows_per_chunk, n_chunks, options = backward_config(
            width, n_examples, rows_per_example, plan.device
        )
        reduce_b, reduce_c, reduce_d, reduce_warps = reduce_config(width, n_examples, n_chunks)
        n_blocks = _cdiv(width, reduce_d)
        partial_numel = n_params * n_examples * n_chunks * width
        # one fp32 workspace: partial sums (P, B, C, D), then per-block squared norms (B, 2, blocks)
        self.workspace_numel = partial_numel + n_examples * 2 * n_blocks
        self.partial_b_bytes = 4 * (partial_numel // max(n_params, 1))
        self.sq_bytes = 4 * partial_numel
        x_strides = plan.x_strides or (rows_per_example * width, width)
        dy_strides = self.dy_strides or (rows_per_example * width, width)
        self.bwd_ints = (*x_strides, *dy_strides, n_examples, rows_per_example, rows_per_chunk, n_chunks,
                         width, 1.0 / width)  # fmt: skip
        self.bwd = _Launch(
            _norm_bwd_kernel, (n_examples, n_chunks), num_warps,
            IS_RMS=rms, HAS_WEIGHT=weight is not None, N_PARAMS=n_params,
            CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_D=block_d, **options.constexprs(),
        )  # fmt: skip
        if n_params == 0:
            return
        self.reduce_ints = (n_examples, n_chunks, width, 0, 0)
        self.reduce = _Launch(
            _reduce_partials_kernel, (n_blocks,), reduce_warps,
            N_PARAMS=n_params, BLOCK_B=reduce_b, BLOCK_C=reduce_c, BLOCK_D=reduce_d,
            BLOCK_N=min(_next_power_of_2(n_blocks), 1024 // reduce_b), SEGMENTED=False,
        )  # fmt: skip


def norm_backward_rows(
    plan: _ForwardPlan, dy, x, weight, stats, rms, weight_offset, cast_before_weight, n_params
):  # fmt: skip
    """The backward launches of a forward made by `norm_forward_rows`: `(dx, grads, sq_norms)`, grads
    dγ (D,) for P = 1 parameter, (2, D) stacking dγ, dβ for P = 2, None for P = 0; sq_norms (B, 2)
    fp32 (zeros for P = 0)."""
    dy_ptr = dy.data_ptr()
    key = (dy.shape, dy.stride(), dy.dtype, dy_ptr % 16 == 0, n_params)
    bplan = plan.backward_plans.get(key)
    if bplan is None:
        if dy.shape != plan.x_shape:
            raise ValueError(f"dy of shape {tuple(dy.shape)} does not match x of shape {tuple(plan.x_shape)}")
        bplan = _BackwardPlan(plan, dy, weight, rms, cast_before_weight, n_params)
        plan.backward_plans[key] = bplan
    device = plan.device
    dx = torch.empty(plan.x_shape, dtype=plan.x_dtype, device=device)
    bwd, reduce = bplan.bwd, bplan.reduce
    if reduce is None:  # no rows, or P = 0
        sq_norms = torch.zeros(bplan.sq_shape, dtype=_FLOAT32, device=device)
        if bwd is None:  # no rows
            grads = torch.zeros(bplan.grads_shape, dtype=weight.dtype, device=device) if n_params else None
            return dx, grads, sq_norms
    else:
        grads = torch.empty(bplan.grads_shape, dtype=weight.dtype, device=device)  # dγ (, dβ)
        sq_norms = torch.empty(bplan.sq_shape, dtype=_FLOAT32, device=device)
    rows = x if plan.x_strides is not None else _as_rows(x, plan.n_examples)
    dy_rows = dy if bplan.dy_strides is not None else _as_rows(dy, plan.n_examples)
    if _direct_ready(bwd, plan.device_index) and (reduce is None or reduce.compiled is not None):
        stream = _current_stream(plan.device_index)
        found = _WORKSPACES.get((device, stream))
        if found is None or found[0].numel() < bplan.workspace_numel:
            found = _workspace(bplan.workspace_numel, device, stream)
        workspace, ticket = found
        stats_ptr, ws_ptr = stats.data_ptr(), workspace.data_ptr()
        w_ptr = None if weight is None else weight.data_ptr()
        x_ptr = rows.data_ptr()
        dy_ptr = dy_ptr if dy_rows is dy else dy_rows.data_ptr()
        try:
            bwd.direct(
                stream,
                (x_ptr, dy_ptr, w_ptr, stats_ptr + plan.mean_bytes, stats_ptr, dx.data_ptr(), ws_ptr,
                 ws_ptr + bplan.partial_b_bytes, *bplan.bwd_ints, weight_offset),
            )  # fmt: skip
            if reduce is not None:
                reduce.direct(
                    stream,
                    (ws_ptr, grads.data_ptr(), ws_ptr + bplan.sq_bytes, sq_norms.data_ptr(),
                     ticket.data_ptr(), None, *bplan.reduce_ints),
                )  # fmt: skip
            return dx, (grads if reduce is not None else None), sq_norms
        except _Retry:
            pass
    workspace = torch.empty(bplan.workspace_numel, dtype=_FLOAT32, device=device)
    mean, rstd = plan.mean_rstd(stats)
    partial_b = workspace[bplan.partial_b_bytes // 4 :]
    args = (rows, dy_rows, weight, rstd if rms else mean, rstd, dx, workspace, partial_b, *bplan.bwd_ints)
    bwd.first((*args, weight_offset), plan)
    if reduce is None:
        return dx, None, sq_norms
    sq_partial = workspace[bplan.sq_bytes // 4 :]
    reduce.first((workspace, grads, sq_partial, sq_norms, _ticket(device), None, *bplan.reduce_ints), plan)
    return dx, grads, sq_norms


# (device, stream): (fp32 workspace, reduction ticket); see `_workspace`
_WORKSPACES: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(numel: int, device: torch.device, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 workspace of at least `numel` elements on `stream`, and the stream's reduction ticket.

    Both kernels of a backward use the workspace and are done with it when the backward's reduction
    ends; kernels on one stream run in order, so every backward on that stream (every plan) can reuse
    one buffer, grown to the largest need (the partial sums of the H200 Llama-124M step: 1.6 MB), and
    skip an allocation per call. Replacing it with a larger one frees the old one while kernels queued
    on the stream may still read it: the caching allocator hands that memory out again only to work
    ordered after them on the same stream. Another stream gets its own (as the ticket does)."""
    found = _WORKSPACES.get((device, stream))
    if found is None or found[0].numel() < numel:
        ticket = _ticket(device) if found is None else found[1]
        found = _WORKSPACES[device, stream] = (torch.empty(numel, dtype=_FLOAT32, device=device), ticket)
    return found


# ------------------------------------------------------------------ the functional launchers


def norm_forward_triton(x, weight, bias, eps, rms, weight_offset, cast_before_weight, out_dtype):
    """Launch the forward kernel. Returns `(y, mean, rstd)` like `norm_forward_reference`."""
    y, stats, plan = norm_forward_rows(
        x, weight, bias, float(eps), rms, float(weight_offset), cast_before_weight, out_dtype or x.dtype
    )
    return (y, *plan.mean_rstd(stats))


def _stats_of(mean, rstd, rms):
    """One fp32 buffer holding rstd then (LayerNorm) mean, as `norm_forward_rows` makes it."""
    parts = [rstd.reshape(-1)] if rms else [rstd.reshape(-1), mean.reshape(-1)]
    return torch.cat(parts).to(_FLOAT32)


def norm_backward_triton(
    dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads=True,
    example_offsets=None,
):  # fmt: skip
    """Launch the backward kernels. Returns `(dx, dw, db, sq_norms)` like the reference;
    with `example_offsets` (int64 (E+1,)), examples are row ranges of x viewed as (N, D)."""
    if example_offsets is not None:
        return norm_backward_documents_triton(
            dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads,
            example_offsets,
        )  # fmt: skip
    n_params = 0 if (weight is None or not param_grads) else (2 if has_bias else 1)
    out_dtype = dy.dtype
    bias = weight if has_bias else None  # only its dtype and alignment enter the plan
    w_ptr = None if weight is None else weight.data_ptr()
    x_ptr = x.data_ptr()
    plan = _forward_plan(x, weight, bias, rms, cast_before_weight, out_dtype, x.device, x_ptr, w_ptr, w_ptr)
    stats = _stats_of(mean, rstd, rms)
    dx, grads, sq_norms = norm_backward_rows(
        plan, dy, x, weight, stats, rms, float(weight_offset), cast_before_weight, n_params
    )
    if n_params == 0:
        return dx, None, None, sq_norms
    if n_params == 1:
        return dx, grads, None, sq_norms
    return dx, grads[0], grads[1], sq_norms


# Launches of the padding-free backward: less often called, launched through the per-call-keyed launcher.
_launch_backward_documents = _CachedLauncher(_norm_bwd_documents_kernel)
_launch_reduce = _CachedLauncher(_reduce_partials_kernel)


def norm_backward_documents_triton(
    dy, x, weight, mean, rstd, has_bias, rms, weight_offset, cast_before_weight, param_grads, example_offsets
):
    """`norm_backward_triton` with examples given as row ranges of the (N, D) input (see the
    `norm_triton` module docstring). No host-device sync: every size comes from N and E."""
    width = x.shape[-1]
    x3 = _as_rows(x, 1)  # (1, N, D)
    dy3 = _as_rows(dy, 1)  # (1, N, D)
    n_rows = x3.shape[1]
    check_example_offsets(example_offsets, n_rows)
    offsets = example_offsets.contiguous()
    n_examples = offsets.numel() - 1
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_params = 0 if (weight is None or not param_grads) else (2 if has_bias else 1)
    sq_norms = torch.zeros(n_examples, 2, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        grads = [torch.zeros_like(weight) if n_params >= k else None for k in (1, 2)]
        return dx, *grads, sq_norms

    block_m, block_d, num_warps, rows_per_chunk, n_chunks, _ = backward_config(width, 1, n_rows, x.device)
    n_slots = n_chunks + n_examples - 1  # slot k + e for chunk k, example e
    search_steps = (n_examples - 1).bit_length()  # ⌈log2 E⌉ halvings find a row's example
    reduce_b, _, reduce_d, reduce_warps = reduce_config(width, n_examples, _DOCUMENT_PIECES_PER_LOAD)
    n_blocks = _cdiv(width, reduce_d)
    partial_numel = n_params * n_slots * width
    # one fp32 workspace: partial sums (P, slots, D), then per-block squared norms (E, 2, blocks)
    workspace = torch.empty(partial_numel + n_examples * 2 * n_blocks, dtype=torch.float32, device=x.device)
    _launch_backward_documents(
        (n_chunks,),
        (x3, dy3, weight, mean, rstd, dx, workspace, workspace[n_slots * width :], offsets,
         x3.stride(1), dy3.stride(1),
         n_rows, n_examples, rows_per_chunk, search_steps, width, 1.0 / width, weight_offset),
        num_warps,
        IS_RMS=rms, HAS_WEIGHT=weight is not None, N_PARAMS=n_params,
        CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    if n_params == 0:
        return dx, None, None, sq_norms

    grads = torch.empty(n_params, width, dtype=weight.dtype, device=x.device)  # dγ, dβ
    _launch_reduce(
        (n_blocks,),
        (workspace, grads, workspace[partial_numel:], sq_norms, _ticket(x.device), offsets,
         n_examples, n_chunks, width, rows_per_chunk, n_slots),
        reduce_warps,
        N_PARAMS=n_params, BLOCK_B=reduce_b, BLOCK_C=_DOCUMENT_PIECES_PER_LOAD, BLOCK_D=reduce_d,
        BLOCK_N=min(_next_power_of_2(n_blocks), 1024 // reduce_b), SEGMENTED=True,
    )  # fmt: skip
    return dx, grads[0], (grads[1] if n_params == 2 else None), sq_norms
