"""`torch.compile` on CPU through Inductor's own graph passes, with its code generation replaced by
an fx interpreter that runs each Triton launch in Triton's interpreter.

This lets CPU tests run what hf_gns's post-grad pass (`norm_graph_pass.py`) makes of real model
graphs: Inductor's joint-graph passes, partition, decompositions and post-grad passes (the custom
pass among them, then reinplacing and the launches' decomposition into mutations) are the ones a
GPU compile runs; only the last step, Inductor's code generation, is replaced. Tracing a
`wrap_triton` launch needs the kernel's TTIR, so the kernels must stay JIT functions: this runs in
a process without TRITON_INTERPRET=1, under `ttir_cuda_target.cuda_target_active()`, and at run time
each launched kernel and every JIT function it calls (its helpers, `tl.sum`, ...) runs interpreted.

The interpreter stores fp32 -> bf16 by truncation (the GPU and torch round to nearest even), so
steps compared bit for bit use fp16 autocast, which it rounds as torch does.
"""

from __future__ import annotations

import contextlib

import torch

LAUNCH = torch.ops.higher_order.triton_kernel_wrapper_functional
LAUNCH_IN_PLACE = torch.ops.higher_order.triton_kernel_wrapper_mutation
_INTERPRETED: dict = {}  # the Python function of a JIT function -> its InterpretedFunction


def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


@contextlib.contextmanager
def _jit_calls_interpreted():
    """Inside the block a call of a JIT function (a kernel's helper, `tl.sum`) runs it interpreted,
    as under TRITON_INTERPRET=1. Triton's own device call leaves `triton.language` patched for the
    interpreter, which breaks the TTIR of any later trace: this one undoes its patch each call."""
    from triton.runtime.interpreter import _patch_lang
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        scope = _patch_lang(self.fn)
        try:
            return _interpreted(self.fn).rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    previous = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = previous


def _launch_interpreted(kwargs: dict, tensors: dict) -> None:
    """Run the launch described by a launch node's `kwargs` on `tensors` (its tensor arguments)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.jit import JITFunction

    kernel = kernel_side_table.get_kernel(kwargs["kernel_idx"])
    while not isinstance(kernel, JITFunction):  # an Autotuner or Heuristics wraps the JIT function
        kernel = kernel.fn
    constants = kernel_side_table.get_constant_args(kwargs["constant_args_idx"])
    (grid,) = kwargs["grid"]  # hf_gns picks its configs in Python: one grid, no autotuning
    with _jit_calls_interpreted():
        _interpreted(kernel.fn)[tuple(grid)](**tensors, **constants)


class _Runner(torch.fx.Interpreter):
    """Runs a post-grad graph eagerly, its Triton launches interpreted."""

    def call_function(self, target, args, kwargs):
        if target is LAUNCH_IN_PLACE:
            _launch_interpreted(kwargs, dict(kwargs["kwargs"]))
            return None
        if target is LAUNCH:
            cloned = set(kwargs["tensors_to_clone"])
            tensors = {k: v.clone() if k in cloned else v for k, v in kwargs["kwargs"].items()}
            _launch_interpreted(kwargs, tensors)
            return {k: v for k, v in tensors.items() if k in cloned}
        return super().call_function(target, args, kwargs)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs, is_inference: bool = False, **_):
    """Inductor's `inner_compile` without code generation: its post-grad passes, then the graph."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.compile_fx import _recursive_post_grad_passes
    from torch._inductor.virtualized import V

    with V.set_fake_mode(torch._guards.detect_fake_mode(example_inputs)):
        _recursive_post_grad_passes(gm, is_inference=is_inference)
    runner = _Runner(gm)
    return make_boxed_func(lambda *args: runner.run(*args))


def _backend(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, inner_compile=_inner_compile)


def compile_interpreted(model: torch.nn.Module, monkeypatch):
    """`torch.compile(model)` as described above, with the compiled norms launching their Triton
    kernels for CPU tensors, and no compile cache (each call compiles under the current switches)."""
    from hf_gns.kernels import norm_triton_op

    monkeypatch.setattr(norm_triton_op, "_launches_triton", lambda x, use_triton: use_triton)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    return torch.compile(model, backend=_backend)
