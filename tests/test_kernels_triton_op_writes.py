"""What Inductor learns a compiled hf_gns kernel writes (`norm_triton_op.py`, `linear_triton.py`).

Inductor reads a user Triton kernel's TTIR to find the arguments it stores to, and clones every
such argument before the launch unless it can reuse it in place. When that analysis fails, it
logs a warning and treats every tensor argument as written: each compiled norm would then copy
its input x (and dy in the backward) once more per call, silently (issue 11's compiled gap). These
tests run the same analysis on the traceable launches with a CUDA target (no GPU needed: only
TTIR is generated) and require the exact write sets: the outputs and scratch buffers, never an
input. Under TRITON_INTERPRET=1 (CI) the kernels are interpreted functions with no TTIR, so one
test runs this file again in a process without the interpreter.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

triton = pytest.importorskip("triton")
wrap = pytest.importorskip("torch._higher_order_ops.triton_kernel_wrap")
# torch 2.13 reports reads and writes (identify_accessed_tensors); older torch (2.11, the GPU
# image) the names of the written tensors (identify_mutated_tensors): the same TTIR analysis
if not hasattr(wrap, "identify_accessed_tensors") and not hasattr(wrap, "identify_mutated_tensors"):
    pytest.skip("this torch has no TTIR write analysis for user kernels", allow_module_level=True)

from ttir_cuda_target import cuda_target_active, run_without_interpreter  # noqa: E402

from hf_gns.kernels import linear_triton, norm_triton_op  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    """Records each `wrap_triton(kernel)[grid](...)` launch as (kernel, kwargs by argument name)
    instead of running it, with a CUDA target active for the analysis."""
    recorded = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(self.kernel.arg_names, args, strict=False))
                named.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
                recorded.append((self.kernel, named))

            return launch

    monkeypatch.setattr(torch.library, "wrap_triton", Recorder)
    with cuda_target_active():
        yield recorded


def _writes(kernel, kwargs, caplog) -> set[str]:
    # the module logs through its `log` (torch._dynamo's logger), which does not reach the root
    logger = getattr(wrap, "log", None) or logging.getLogger(wrap.__name__)
    logger.addHandler(caplog.handler)
    try:
        if hasattr(wrap, "identify_accessed_tensors"):
            accesses = wrap.identify_accessed_tensors(kernel, kwargs, {})
            written = {dep.name for dep in accesses.read_writes.writes}
        else:
            written = set(wrap.identify_mutated_tensors(kernel, kwargs, {}))
    finally:
        logger.removeHandler(caplog.handler)
    assert "assuming every input is mutated" not in caplog.text, kernel.fn.__name__
    return {name for name in written if isinstance(kwargs.get(name), torch.Tensor)}


def test_write_sets_are_checked_outside_the_interpreter():
    """CI runs under TRITON_INTERPRET=1: the analysis tests run in a process without it."""
    run_without_interpreter(__file__, passed=13)


interpreted = pytest.mark.skipif(INTERPRETED, reason="interpreted kernels have no TTIR: see the test above")


# Norm inputs: (B, T, D) rows of the widths whose tuned tiles differ (BLOCK_D 1024, 2048, 4096).
@interpreted
@pytest.mark.parametrize("width", [768, 2048, 4096])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
@pytest.mark.parametrize("documents", [False, True], ids=["dense", "documents"])
def test_compiled_norm_kernels_write_only_their_outputs(launches, caplog, width, rms, documents):
    x, dy = torch.randn(2, 8, width), torch.randn(2, 8, width)
    weight, bias = torch.randn(width), None if rms else torch.randn(width)
    _, mean, rstd = norm_triton_op.norm_forward_traceable(x, weight, bias, 1e-5, rms, 0.0, False, x.dtype)
    residual = torch.randn(2, 8, width, dtype=torch.bfloat16)  # the fused residual add's kernel
    add_forward = norm_triton_op.norm_add_forward_traceable
    add_forward(x, residual, weight, bias, 1e-5, rms, 0.0, False, residual.dtype)
    offsets = torch.tensor([0, 5, 16]) if documents else None
    norm_triton_op.norm_backward_traceable(
        dy, x, weight, mean, rstd, bias is not None, rms, 0.0, False, True, offsets
    )
    narrow_dys = [dy.to(torch.bfloat16)] * 2  # the fused backward's kernel: two summed dy, an addend
    config = (x, weight, mean, rstd, bias is not None, rms, 0.0, False, True)
    norm_triton_op.norm_backward_fused_traceable(narrow_dys, dy, torch.bfloat16, *config)
    expected = {
        "_norm_fwd_kernel": {"Y", "Rstd"} | ({"Mean"} if not rms else set()),
        "_norm_fwd_residual_kernel": {"Sum", "Y", "Rstd"} | ({"Mean"} if not rms else set()),
        "_norm_bwd_kernel": {"DX", "PartialW"} | ({"PartialB"} if not rms else set()),
        "_norm_bwd_documents_kernel": {"DX", "PartialW"} | ({"PartialB"} if not rms else set()),
        "_norm_bwd_fused_kernel": {"DX", "DXNarrow", "PartialW"} | ({"PartialB"} if not rms else set()),
        "_reduce_partials_kernel": {"Grads", "SqNorms", "SqPartial", "Ticket"},
    }
    names = [kernel.fn.__name__ for kernel, _ in launches]
    backward = "_norm_bwd_documents_kernel" if documents else "_norm_bwd_kernel"
    assert names == [
        "_norm_fwd_kernel", "_norm_fwd_residual_kernel", backward, "_reduce_partials_kernel",
        "_norm_bwd_fused_kernel", "_reduce_partials_kernel",
    ]  # fmt: skip
    for kernel, kwargs in launches:
        assert _writes(kernel, kwargs, caplog) == expected[kernel.fn.__name__], kernel.fn.__name__


@interpreted
def test_compiled_linear_reduction_writes_only_its_sum_and_partials(launches, caplog):
    per_example, out = torch.randn(3, 40), torch.empty(40)
    linear_triton.sum_and_sq_norms_traceable(per_example, out)
    ((kernel, kwargs),) = launches
    written = _writes(kernel, kwargs, caplog)
    assert kwargs[kernel.arg_names[0]] is per_example and kernel.arg_names[0] not in written
    assert written == {kernel.arg_names[1], kernel.arg_names[2]}  # the sum (out) and the partial norms
