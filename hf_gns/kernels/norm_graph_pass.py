"""An Inductor post-grad pass that lets the compiled norm kernels write and read the narrow dtype.

Under autocast (the Trainer's `bf16=True`) the residual stream is fp32, so a norm's output is fp32
and each of its users (the q/k/v or gate/up Linears, GPT-2's Conv1D, the LM head) first casts it to
bf16. Inductor fuses such casts into its own norm kernels, but it cannot fuse them into an opaque
user kernel, so each compiled hf_gns norm cost one more memory-bound launch on a host-bound forward
(Llama-124M, 8×2048, H200: 0.49 ms of forward `to_copy` a step and 25 of the 50 extra forward
launches; issue 11). The kernels already store y in the dtype of their output buffer and upcast dy
as they load it, so the fix is in the graph:

- forward: when every use of a `_norm_fwd_kernel` output y is a cast to one narrower float dtype,
  directly or through views (GPT-2 views y as (B·T, D) first), the kernel writes y in that dtype
  (its buffer is retyped) and the casts are dropped. One rounding to nearest even, as the cast did,
  of an fp32 y that may differ in its last bit: Triton lays out the row reduction for the narrow
  store, so rstd can differ by an ulp (H200: 22 of 12.6M bf16 outputs of an 8×2048×768 RMSNorm
  were one bf16 ulp apart).
- backward: when a `_norm_bwd_kernel`'s dy is one widened bf16/fp16 tensor (through views), the
  kernel reads that tensor and upcasts it (exact; on by default since 2026-12-03, `forward` turns
  it off). That is a norm read by one Linear: every GPT-2 norm but ln_f, Llama's last. On GPT-2
  124M the widening casts it drops were 24 kernels and 0.43 ms of a 46 ms compiled step's GPU time
  (H200 trace, `benchmarks/results/compare_traces_h200_20261203b_gpt2_compiled.txt`).
- residual add: when a norm's input is s = a + b (the residual add before every decoder norm but
  the first; same shape, contiguous), the launch becomes `_norm_fwd_residual_kernel`, which reads
  a and b, stores s for s's other users (the next residual add, the backward) and normalizes it:
  one launch and one read of s fewer per norm (the other 25 of the 50 extra forward launches on
  Llama-124M). s is the same fp32 add.
- backward sums: where a norm feeds several Linears (q/k/v, gate/up), its dy is their gradients
  widened and summed in fp32, and its dx meets the residual stream's gradient in an add whose sum
  the residual branch's output projection reads cast to bf16. The launch becomes
  `_norm_bwd_fused_kernel`, which reads the two or three narrow gradients and sums them in fp32 in
  the graph's order, adds the residual gradient to dx and stores that sum and its cast: two
  memory-bound launches fewer per norm (1.03 + 0.78 ms of such kernels a step on Llama-124M).

All of these compute the same fp32 operations in the same order as the graph they replace.
Measured on the H200 (bench_trainer.py, compiled, one run each; 2026-12-02): with the residual add
and the backward sums, Llama-124M 1.010x of the compiled Trainer (0.974x without them, same run),
Llama-0.85B 0.993x (0.984x); GPT-2 124M, whose dropout sits in the residual add and whose norms
each feed one Conv1D, 53.1 ms a step with them and 52.6 ms (1.014x) without, in two device
calls: not yet a ratio within one run.

`install()` (called by `hf_gns.patch`) puts the pass in `torch._inductor.config.
post_grad_custom_post_pass`, after any pass already there. It touches only nodes that launch
hf_gns's norm kernels. Switches, read when a graph compiles: HF_GNS_COMPILED_NARROW_CASTS =
`both` (the default: the forward outputs and the single-Linear backward inputs), `forward` or
`0`; HF_GNS_COMPILED_RESIDUAL_ADD and HF_GNS_COMPILED_BACKWARD_SUMS = `1` (the default) or `0`.
All three off give the graphs as before the pass (for A/B runs).
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
from collections import Counter
from pathlib import Path

import torch
from torch.fx.immutable_collections import immutable_dict, immutable_list

logger = logging.getLogger(__name__)

# what the pass did since import, by kind: "forward outputs" and "backward inputs" narrowed (tests)
REWRITTEN: Counter = Counter()

_MODES = ("forward", "both", "0")
_NARROW_FLOATS = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float32, *_NARROW_FLOATS)
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default)


def _mode() -> str:
    mode = os.environ.get("HF_GNS_COMPILED_NARROW_CASTS", "both")
    if mode not in _MODES:
        raise ValueError(f"HF_GNS_COMPILED_NARROW_CASTS must be one of {_MODES}, got {mode!r}")
    return mode


def _switch(name: str) -> bool:
    value = os.environ.get(name, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _fuses_residual() -> bool:
    return _switch("HF_GNS_COMPILED_RESIDUAL_ADD")


def _fuses_backward_sums() -> bool:
    return _switch("HF_GNS_COMPILED_BACKWARD_SUMS")


def _norm_kernels():
    """(forward kernels, backward kernels) as `wrap_triton` saw them: the plain kernel first, the
    fused variant (residual forward, fused backward) second; empty without Triton."""
    try:
        from .norm_triton import (
            _norm_bwd_documents_kernel,
            _norm_bwd_fused_kernel,
            _norm_bwd_kernel,
            _norm_fwd_kernel,
            _norm_fwd_residual_kernel,
        )
    except ImportError:  # pragma: no cover - no triton, nothing is launched to rewrite
        return (), ()
    forward = (_norm_fwd_kernel, _norm_fwd_residual_kernel)
    return forward, (_norm_bwd_kernel, _norm_bwd_fused_kernel, _norm_bwd_documents_kernel)


def _launched_kernel(kernel, known):
    """The JIT function among `known` that a side-table kernel is or wraps (torch may wrap a kernel in
    a triton Autotuner, whose `fn` is the JIT function); None if none."""
    for _ in range(3):
        if kernel in known:
            return kernel
        kernel = getattr(kernel, "fn", None)
    return None


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is_cast(node, dtype=None) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.target is torch.ops.prims.convert_element_type.default):
        return False
    return dtype is None or node.args[1] == dtype


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and a.device == b.device


def _fresh_like(val: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new fake tensor of `val`'s layout in `dtype` (never one shared with another node: Inductor's
    reinplacing reads aliasing from the fake tensors' storages)."""
    with val.fake_mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=dtype, device=val.device)


def _new_buffer(graph: torch.fx.Graph, launch, like: torch.Tensor):
    """An `empty` node of `like`'s shape and dtype (contiguous) just before `launch`: a new output
    buffer of a fused kernel."""
    with graph.inserting_before(launch):
        buffer = graph.call_function(
            torch.ops.aten.empty.memory_format,
            (list(like.shape),),
            {"dtype": like.dtype, "device": like.device, "pin_memory": False},
        )
    buffer.meta["val"] = _fresh_like(like, like.dtype)
    return buffer


def _new_output(graph: torch.fx.Graph, launch, name: str, like: torch.Tensor):
    """The getitem of the launch's new written argument `name` (valued like `like`), right after it."""
    if isinstance(launch.meta.get("val"), dict):
        launch.meta["val"] = {**launch.meta["val"], name: _fresh_like(like, like.dtype)}
    with graph.inserting_after(launch):
        output = graph.call_function(operator.getitem, (launch, name))
    output.meta["val"] = _fresh_like(like, like.dtype)
    return output


def _with_kernel_arg(node, name: str, value) -> None:
    kwargs = dict(node.kwargs)
    kwargs["kwargs"] = {**kwargs["kwargs"], name: value}
    node.kwargs = kwargs
    _sync_eager_input_vals(node, {name: _val(value)})


def _sync_eager_input_vals(launch, changed: dict) -> None:
    """Keep the launch's "eager_input_vals" (the fake arguments make_fx recorded, which Inductor
    replays when it decomposes the launch) in step with its rewritten arguments: the kernel, the
    tensors to clone, and the fake values of the `changed` kernel arguments. torch 2.11 flattens
    the record up to the structure of the node's arguments: a stale one failed there with "Node
    arity mismatch"."""
    recorded = launch.meta.get("eager_input_vals")
    if recorded is None:
        return
    args, kwargs = recorded
    # the node's own container types (fx's immutable dict and list): pytree tells them from dict
    # and list, and a plain dict here failed the GPU compile with "Type mismatch"
    launch.meta["eager_input_vals"] = (
        args,
        immutable_dict(
            {
                **kwargs,
                "kernel_idx": launch.kwargs["kernel_idx"],
                "tensors_to_clone": immutable_list(launch.kwargs["tensors_to_clone"]),
                "kwargs": immutable_dict({**kwargs["kwargs"], **changed}),
            }
        ),
    )


def _is_view(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.target in _VIEWS


def _casts_through_views(node, views: list, casts: list) -> bool:
    """Whether every use of `node` is a cast or a view whose uses are (recursively); collects both."""
    for user in node.users:
        if _is_cast(user):
            casts.append(user)
        elif _is_view(user):
            views.append(user)
            if not _casts_through_views(user, views, casts):
                return False
        else:
            return False
    return True


def _uses(node, depth: int = 2) -> list:
    """`node`'s users as (target, their users' targets...), `depth` levels down: for the debug log."""
    if depth == 0:
        return [str(u.target) for u in node.users]
    return [(str(u.target), _uses(u, depth - 1)) for u in node.users]


def _retyped_view(view, source_val: torch.Tensor) -> torch.Tensor:
    """The fake value of `view` applied to `source_val` (sharing its storage, as a view does)."""
    with source_val.fake_mode:
        return view.target(source_val, *view.args[1:], **view.kwargs)


def _narrow_forward_output(graph: torch.fx.Graph, launch) -> bool:
    """y written in the dtype all its users cast it to (directly or through views); the casts removed."""
    y_buffer = launch.kwargs["kwargs"].get("Y")
    if not (
        isinstance(y_buffer, torch.fx.Node)
        and y_buffer.target is torch.ops.aten.empty.memory_format
        and len(y_buffer.users) == 1
    ):
        return False
    outputs = [u for u in launch.users if u.target is operator.getitem and u.args[1] == "Y"]
    if len(outputs) != 1 or not outputs[0].users:
        return False
    y, views, casts = outputs[0], [], []
    if not _casts_through_views(y, views, casts) or not casts or len({c.args[1] for c in casts}) != 1:
        # y itself is used (an fp32 residual add, an output): it stays fp32. Logged (debug level of
        # the "hf_gns" logger) to show which uses keep a norm wide.
        logger.debug("hf_gns: %s keeps an fp32 output, used by %s", launch.name, _uses(y))
        return False
    dtype, y_val = casts[0].args[1], _val(y)
    if dtype not in _NARROW_FLOATS or y_val is None or y_val.dtype.itemsize <= dtype.itemsize:
        logger.debug("hf_gns: %s keeps an fp32 output, used by %s", launch.name, _uses(y))
        return False
    if not all(_val(c) is not None and _same_layout(_val(c), _val(c.args[0])) for c in casts):
        return False
    y_buffer.kwargs = {**y_buffer.kwargs, "dtype": dtype}
    y_buffer.meta["val"] = _fresh_like(_val(y_buffer), dtype)
    _sync_eager_input_vals(launch, {"Y": y_buffer.meta["val"]})
    y.meta["val"] = _fresh_like(y_val, dtype)
    if isinstance(launch.meta.get("val"), dict):
        launch.meta["val"] = {**launch.meta["val"], "Y": _fresh_like(y_val, dtype)}
    for view in views:  # users after their sources: the order they were found in
        view.meta["val"] = _retyped_view(view, view.args[0].meta["val"])
    for cast in casts:
        cast.replace_all_uses_with(cast.args[0])
        graph.erase_node(cast)
    return True


def _narrow_backward_input(graph: torch.fx.Graph, launch) -> bool:
    """dy read from the narrow tensor it was widened from (the views between them replayed on it)."""
    views, cast = [], launch.kwargs["kwargs"].get("DY")
    while _is_view(cast):
        views.append(cast)
        cast = cast.args[0]
    if not _is_cast(cast, torch.float32):
        return False
    narrow, cast_val = cast.args[0], _val(cast)
    narrow_val = _val(narrow)
    if narrow_val is None or cast_val is None or narrow_val.dtype not in _NARROW_FLOATS:
        return False
    if not _same_layout(narrow_val, cast_val):  # the launch's strides were taken from the cast
        return False
    new_dy = narrow
    for view in reversed(views):  # from the cast outwards
        with graph.inserting_before(launch):
            replayed = graph.call_function(view.target, (new_dy, *view.args[1:]), view.kwargs)
        replayed.meta["val"] = _retyped_view(view, new_dy.meta["val"])
        new_dy = replayed
    _with_kernel_arg(launch, "DY", new_dy)
    for node in (*views, cast):  # now dead unless something else reads them
        if not node.users:
            graph.erase_node(node)
    return True


def _replay_views(graph, views, source):
    """`views` (outermost first) applied to `source` again, before the current insertion point."""
    for view in reversed(views):
        replayed = graph.call_function(view.target, (source, *view.args[1:]), view.kwargs)
        replayed.meta["val"] = _retyped_view(view, source.meta["val"])
        source = replayed
    return source


def _any_between(first, last, nodes: set) -> bool:
    """Whether one of `nodes` comes after `first` and before `last` in graph order (a short walk:
    the add feeding a norm sits a few nodes before its launch)."""
    node = first.next
    while node is not last and node.op != "root":
        if node in nodes:
            return True
        node = node.next
    return False


def _fuse_residual_add(graph: torch.fx.Graph, launch, residual_kernel) -> bool:
    """The add s = a + b that makes the norm's input computed (and s stored) by the norm kernel."""
    inner = launch.kwargs["kwargs"]
    views, add = [], inner.get("X")
    while _is_view(add):
        views.append(add)
        add = add.args[0]
    if not (
        isinstance(add, torch.fx.Node)
        and add.target is torch.ops.aten.add.Tensor
        and len(add.args) == 2
        and not add.kwargs  # alpha
        and all(isinstance(t, torch.fx.Node) for t in add.args)
    ):
        return False
    add_val, operand_vals = _val(add), [_val(t) for t in add.args]
    if add_val is None or any(v is None for v in operand_vals) or add_val.dtype not in _FLOATS:
        return False
    if not add_val.is_contiguous() or not all(isinstance(d, int) for d in add_val.shape):
        return False  # the sum gets a fresh contiguous buffer of static shape
    if not all(_same_layout(v, add_val) and v.dtype in _FLOATS for v in operand_vals):
        return False  # a broadcast or a strided operand: the kernel reads all three alike
    others = [u for u in add.users if u not in views]
    if _any_between(add, launch, set(others)):
        return False  # a use of the sum before the norm: leave the order alone
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    buffer = _new_buffer(graph, launch, add_val)
    with graph.inserting_before(launch):
        x, residual, total = (_replay_views(graph, views, t) for t in (*add.args, buffer))
    # X also stands in for absent arguments (Bias of an RMSNorm): every use of it moves
    arguments = {name: x if value is inner["X"] else value for name, value in inner.items()}
    launch.kwargs = {
        **launch.kwargs,
        "kernel_idx": kernel_side_table.add_kernel(residual_kernel),
        "kwargs": {**arguments, "Residual": residual, "Sum": total},
        "tensors_to_clone": [*launch.kwargs["tensors_to_clone"], "Sum"],
    }
    moved = {name: value for name, value in launch.kwargs["kwargs"].items() if inner.get(name) is not value}
    _sync_eager_input_vals(launch, {name: _val(value) for name, value in moved.items()})
    total_val = total.meta["val"]
    stored = _new_output(graph, launch, "Sum", total_val)
    if tuple(total_val.shape) != tuple(add_val.shape):
        with graph.inserting_after(stored):
            stored = _replay_views(
                graph,
                [graph.call_function(torch.ops.aten.view.default, (stored, list(add_val.shape)))],
                stored,
            )
    for user in others:
        user.replace_input_with(add, stored)
    for node in (*views, add):
        if not node.users:
            graph.erase_node(node)
    return True


def _widened_terms(node) -> list | None:
    """The casts to fp32 of narrow tensors whose fp32 sum `node` is, in the order the fused kernel
    adds them (its dy is (t0 + t1) + t2), or None. A cast of a bf16/fp16 tensor of its own layout
    is one term; an add (no alpha) used only here, of a term and a sum, is the sum's terms then the
    term: fp32 addition commutes, so a + (b + c) is (b + c) + a, bit for bit (it does not
    associate, so (a + b) + (c + d) is not a chain and is left alone)."""
    if _is_cast(node, torch.float32):
        source_val, cast_val = _val(node.args[0]), _val(node)
        if source_val is None or cast_val is None or source_val.dtype not in _NARROW_FLOATS:
            return None
        return [node] if _same_layout(source_val, cast_val) else None
    if not (
        isinstance(node, torch.fx.Node)
        and node.target is torch.ops.aten.add.Tensor
        and len(node.args) == 2
        and not node.kwargs
        and len(node.users) == 1
    ):
        return None
    left, right = (_widened_terms(t) for t in node.args)
    if left is None or right is None or (len(left) > 1 and len(right) > 1):
        return None
    terms = left + right if len(right) == 1 else right + left
    add_val = _val(node)
    if add_val is None or any(not _same_layout(_val(t), add_val) for t in terms):
        return None  # a broadcast
    return terms


def _defined_before(node, launch) -> bool:
    """Whether `node` comes before `launch` in graph order (a walk back from the launch)."""
    current = launch.prev
    while current.op != "root":
        if current is node:
            return True
        current = current.prev
    return False


def _summed_dys(launch):
    """(the launch's dy views outermost first, the narrow terms of its dy) where dy is a sum of
    two or three widened narrow tensors (the q/k/v or gate/up gradients), else None."""
    views, dy = [], launch.kwargs["kwargs"].get("DY")
    while _is_view(dy) and len(dy.users) == 1:
        views.append(dy)
        dy = dy.args[0]
    terms = _widened_terms(dy)
    if terms is None or not 2 <= len(terms) <= 3:
        return None
    return views, dy, terms


def _residual_gradient_add(launch):
    """(add, the other addend, casts of the sum to one narrow dtype) where the launch's dx is read
    only by dx + r, r an fp32 tensor of dx's layout computed before the launch (the residual
    stream's gradient), else None."""
    outputs = [u for u in launch.users if u.target is operator.getitem and u.args[1] == "DX"]
    if len(outputs) != 1 or len(outputs[0].users) != 1:
        return None
    dx, (add,) = outputs[0], outputs[0].users
    if not (add.target is torch.ops.aten.add.Tensor and len(add.args) == 2 and not add.kwargs):
        return None
    other = add.args[1] if add.args[0] is dx else add.args[0]
    if other is dx or not isinstance(other, torch.fx.Node):
        return None
    dx_val, other_val, add_val = _val(dx), _val(other), _val(add)
    if dx_val is None or other_val is None or add_val is None:
        return None
    if not all(v.dtype == torch.float32 and _same_layout(v, dx_val) for v in (other_val, add_val)):
        return None
    if not dx_val.is_contiguous() or not _defined_before(other, launch):
        return None
    casts = [
        u for u in add.users if _is_cast(u) and u.args[1] in _NARROW_FLOATS and _same_layout(_val(u), add_val)
    ]
    casts = [c for c in casts if c.args[1] == casts[0].args[1]]
    return add, other, casts


def _fuse_backward_sums(graph: torch.fx.Graph, launch, fused_kernel) -> Counter:
    """The sums around a dense norm backward moved into `_norm_bwd_fused_kernel`: its dy's sum of
    widened narrow gradients (read narrow, summed in the kernel) and the residual gradient added to
    its dx (with that sum's narrow cast); what was fused, by kind."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    inner = launch.kwargs["kwargs"]
    dys, residual = _summed_dys(launch), _residual_gradient_add(launch)
    if dys is None and residual is None:
        return Counter()
    arguments = dict(inner)
    done: Counter = Counter()
    new_buffers = []
    if dys is not None:
        views, root, terms = dys
        with graph.inserting_before(launch):
            sources = [_replay_views(graph, views, term.args[0]) for term in terms]
        arguments["DY"], arguments["DY2"], arguments["DY3"] = (sources + [sources[0]] * 2)[:3]
        arguments["N_DY"] = len(terms)
        done["backward dy sums"] += 1
    else:  # unread pointers: X, which the kernel reads anyway (never a node that could go dead)
        arguments["DY2"] = arguments["DY3"] = inner["X"]
        arguments["N_DY"] = 1
    if residual is not None:
        add, other, casts = residual
        arguments["Addend"] = other
        if casts:
            arguments["DXNarrow"] = _new_buffer(graph, launch, _val(casts[0]))
            new_buffers.append("DXNarrow")
        else:
            arguments["DXNarrow"] = inner["DX"]
        done["backward residual adds"] += 1
    else:
        arguments["Addend"], arguments["DXNarrow"] = inner["X"], inner["DX"]
    arguments["HAS_ADDEND"] = residual is not None
    arguments["HAS_NARROW_DX"] = bool(new_buffers)
    launch.kwargs = {
        **launch.kwargs,
        "kernel_idx": kernel_side_table.add_kernel(fused_kernel),
        "kwargs": arguments,
        "tensors_to_clone": [*launch.kwargs["tensors_to_clone"], *new_buffers],
    }
    changed = {name: _val(value) for name, value in arguments.items() if inner.get(name) is not value}
    _sync_eager_input_vals(launch, changed)
    if residual is not None:
        dx = next(u for u in launch.users if u.target is operator.getitem and u.args[1] == "DX")
        if new_buffers:
            narrow_out = _new_output(graph, launch, "DXNarrow", _val(casts[0]))
            for cast in casts:
                cast.replace_all_uses_with(narrow_out)
                graph.erase_node(cast)
        add.replace_all_uses_with(dx)
        graph.erase_node(add)
    if dys is not None:
        _erase_dead(graph, [*dys[0], dys[1]])
    return done


def _erase_dead(graph: torch.fx.Graph, nodes: list) -> None:
    """Erase `nodes` and, through their inputs, the views, casts and adds that only they read."""
    pure = (*_VIEWS, torch.ops.prims.convert_element_type.default, torch.ops.aten.add.Tensor)
    while nodes:
        node = nodes.pop()
        if node.op == "call_function" and node.target in pure and not node.users and node.graph is graph:
            inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
            graph.erase_node(node)
            nodes.extend(inputs)


def rewrite_norm_launches(
    graph: torch.fx.Graph, mode: str = "both", fuse_residual: bool = False, fuse_backward_sums: bool = False
) -> Counter:
    """Rewrite the hf_gns norm launches of a post-grad `graph` in place; returns what was done."""
    done: Counter = Counter()
    if mode == "0" and not fuse_residual and not fuse_backward_sums:
        return done
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    forward_kernels, backward_kernels = _norm_kernels()
    launcher = torch.ops.higher_order.triton_kernel_wrapper_functional
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not launcher:
            continue
        kernel = _launched_kernel(
            kernel_side_table.get_kernel(node.kwargs["kernel_idx"]), forward_kernels + backward_kernels
        )
        if (
            fuse_residual
            and kernel is forward_kernels[0]
            and _fuse_residual_add(graph, node, forward_kernels[1])
        ):
            done["residual adds"] += 1
        if kernel in forward_kernels and mode != "0" and _narrow_forward_output(graph, node):
            done["forward outputs"] += 1
        if fuse_backward_sums and kernel is backward_kernels[0]:
            done.update(_fuse_backward_sums(graph, node, backward_kernels[1]))
        if mode == "both" and kernel in backward_kernels and _narrow_backward_input(graph, node):
            done["backward inputs"] += 1
    if done:
        logger.debug("hf_gns: compiled norm launches rewritten: %s", dict(done))
    REWRITTEN.update(done)
    return done


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - a torch without custom graph passes: nothing installed
    CustomGraphPass = None


if CustomGraphPass is not None:

    class NormLaunchRewrite(CustomGraphPass):
        """`rewrite_norm_launches` as Inductor's post-grad custom pass, run after `chained` (the pass
        that was configured before, kept)."""

        def __init__(self, chained=None):
            self.chained = chained

        def __call__(self, graph: torch.fx.Graph) -> None:
            for previous in self.chained if isinstance(self.chained, (list, tuple)) else (self.chained,):
                if previous is not None:
                    previous(graph)
            rewrite_norm_launches(graph, _mode(), _fuses_residual(), _fuses_backward_sums())

        def uuid(self):
            # FX graph cache key: this file's source, the mode, and the chained passes' keys (None,
            # "do not cache", if one of them has none)
            chained = self.chained if isinstance(self.chained, (list, tuple)) else (self.chained,)
            keys = [p.uuid() if hasattr(p, "uuid") else None for p in chained if p is not None]
            if any(key is None for key in keys):
                return None
            source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
            return (source, _mode(), _fuses_residual(), _fuses_backward_sums(), *keys)


def install() -> bool:
    """Chain `NormLaunchRewrite` into Inductor's post-grad custom pass (once); False where this torch
    has no custom graph passes or the mode is "0"."""
    if CustomGraphPass is None or (_mode() == "0" and not _fuses_residual() and not _fuses_backward_sums()):
        return False
    from torch._inductor import config

    current = config.post_grad_custom_post_pass
    if isinstance(current, NormLaunchRewrite):
        return True
    config.post_grad_custom_post_pass = NormLaunchRewrite(current)
    return True
