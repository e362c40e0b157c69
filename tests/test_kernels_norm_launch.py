"""The eager launchers' plans (`norm_launch.py`): what they cache, and what a direct launch passes.

The direct launch needs CUDA; here `_compile` is replaced by a recorder (as
`benchmarks/bench_norm_host.py --stub-launch` does) so the plan logic runs on CPU tensors:
the first launch of each plan goes through "Triton" (recorded with tensors for pointers),
later ones run the "compiled kernel" (recorded with ints for pointers). Numbers are checked
under TRITON_INTERPRET=1, where every launch goes through the interpreter.
"""

from __future__ import annotations

import pytest
import torch

from hf_gns.kernels import fused_norm, new_sq_norm_sink, norm_launch, norm_triton, use_backend
from tests.conftest import triton_runs_here


class _Compiled:
    function, packed_metadata = "function", "packed"

    def __init__(self, kernel, runs):
        self.kernel, self.runs = kernel, runs

    def run(self, *args):
        self.runs.append((self.kernel, args[:4], args[9:]))

    def launch_metadata(self, *args):
        raise AssertionError("no launch hook is set")


@pytest.fixture
def stub_launch(monkeypatch):
    """Direct launches on CPU tensors into recorders: `compiles` (first launches), `runs` (direct)."""
    compiles, runs = [], []

    def compile_(kernel, grid, args, constexprs, num_warps):
        compiles.append((kernel.fn.__name__, grid, args, constexprs))
        return _Compiled(kernel.fn.__name__, runs)

    monkeypatch.setattr(norm_triton, "DIRECT_LAUNCH_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(norm_triton, "_compile", compile_)
    monkeypatch.setattr(norm_triton._CachedLauncher, "enabled", True)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    monkeypatch.setattr(norm_launch._RUNTIME_KNOBS, "launch_enter_hook", None)
    monkeypatch.setattr(norm_launch._RUNTIME_KNOBS, "launch_exit_hook", None)
    norm_launch.clear_plans()
    with use_backend("triton"):
        yield compiles, runs
    norm_launch.clear_plans()


def _fwd_bwd(x, weight, bias, rms=False):
    x = x.detach().requires_grad_()
    sink = new_sq_norm_sink(x)
    y = fused_norm(x, weight, bias, 1e-5, rms=rms, sq_norm_sink=sink)
    y.backward(torch.ones_like(y))


def test_one_plan_per_layout_then_direct_launches(stub_launch):
    compiles, runs = stub_launch
    weight, bias = torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True)
    x = torch.randn(2, 8, 16)
    _fwd_bwd(x, weight, bias)
    assert norm_launch.forward_plan_count() == 1
    assert [c[0] for c in compiles] == ["_norm_fwd_kernel", "_norm_bwd_kernel", "_reduce_partials_kernel"]
    assert runs == []
    for _ in range(2):  # the same layout: no new plan, no compile, three direct launches a call
        _fwd_bwd(x, weight, bias)
    assert norm_launch.forward_plan_count() == 1 and len(compiles) == 3
    assert [r[0] for r in runs] == ["_norm_fwd_kernel", "_norm_bwd_kernel", "_reduce_partials_kernel"] * 2
    assert all(r[1][3] == 7 for r in runs)  # on the current stream
    _fwd_bwd(torch.randn(3, 8, 16), weight, bias)  # a new shape: a new plan
    _fwd_bwd(torch.randn(8, 2, 16).transpose(0, 1), weight, bias)  # new strides: a new plan
    _fwd_bwd(x, weight, None)  # no bias: a new plan
    assert norm_launch.forward_plan_count() == 4 and len(compiles) == 12


def _pointer(arg):
    return arg.data_ptr() if isinstance(arg, torch.Tensor) else arg


def test_direct_launches_pass_what_triton_was_given(stub_launch):
    """Pointers as ints at the offsets of the views Triton got, the same scalars, constexprs last."""
    compiles, runs = stub_launch
    weight, bias = torch.ones(24, requires_grad=True), torch.zeros(24, requires_grad=True)
    x = torch.randn(3, 5, 24)
    _fwd_bwd(x, weight, bias)
    _fwd_bwd(x, weight, bias)
    assert len(compiles) == len(runs) == 3
    # pointers: (kernel, [(argument, relative to argument)]) whose differences must agree
    pairs = {
        "_norm_fwd_kernel": [(4, 5)],  # mean = rstd + 4·n_rows bytes, in one stats buffer
        "_norm_bwd_kernel": [(3, 4), (7, 6)],  # mean - rstd; partial dβ - workspace
        "_reduce_partials_kernel": [(2, 0)],  # per-block squared norms - workspace
    }
    fixed = {"_norm_fwd_kernel": (0, 2, 3), "_norm_bwd_kernel": (0, 2), "_reduce_partials_kernel": ()}
    for (name, grid, first, constexprs), (run_name, run_grid, direct) in zip(compiles, runs, strict=True):
        assert run_name == name and tuple(run_grid[: len(grid)]) == tuple(grid)
        first = [_pointer(a) for a in first]
        assert len(direct) == len(first) + len(constexprs)
        assert tuple(direct[len(first) :]) == tuple(constexprs.values())
        for a, b in pairs[name]:
            assert direct[a] - direct[b] == first[a] - first[b], (name, a, b)
        for i in fixed[name]:  # x, γ, β: the caller's tensors
            assert direct[i] == first[i], (name, i)
        n_pointers = {"_norm_fwd_kernel": 6, "_norm_bwd_kernel": 8, "_reduce_partials_kernel": 6}[name]
        assert direct[n_pointers : len(first)] == tuple(first[n_pointers:]), name  # the scalar arguments


def test_stride_zero_gradient_takes_a_copy(stub_launch):
    """`y.sum().backward()` sends an expanded (stride 0) dy: the plan copies it to rows."""
    compiles, _ = stub_launch
    x = torch.randn(2, 4, 8).requires_grad_()
    weight = torch.ones(8, requires_grad=True)
    fused_norm(x, weight, None, rms=True).sum().backward()
    bwd = next(args for name, _, args, _ in compiles if name == "_norm_bwd_kernel")
    dy_rows = bwd[1]
    assert dy_rows.is_contiguous() and dy_rows.shape == (2, 4, 8)


@pytest.mark.skipif(not triton_runs_here("cpu"), reason="runs the Triton kernels: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_planned_launchers_give_the_references_numbers_for_odd_layouts(rms):
    """Transposed input, expanded dy, misaligned input: the plans' strides and copies are right."""
    from hf_gns.kernels import norm_backward_reference, norm_forward_reference

    gen = torch.Generator().manual_seed(3)
    width = 24
    weight = 1 + 0.1 * torch.randn(width, generator=gen)
    bias = 0.1 * torch.randn(width, generator=gen) if not rms else None
    buffer = torch.randn(3 * 5 * width + 1, generator=gen)
    inputs = {
        "transposed": torch.randn(5, 3, width, generator=gen).transpose(0, 1),
        "misaligned": buffer[1:].view(3, 5, width),
    }
    for name, x in inputs.items():
        ref_y, mean, rstd = norm_forward_reference(x, weight, bias, 1e-5, rms)
        dy = torch.ones(()).expand(x.shape)  # stride 0
        ref = norm_backward_reference(dy, x, weight, mean, rstd, bias is not None, rms)
        with use_backend("triton"):
            xg = x.detach().requires_grad_()
            w, b = weight.clone().requires_grad_(), None if bias is None else bias.clone().requires_grad_()
            sink = new_sq_norm_sink(xg)
            y = fused_norm(xg, w, b, 1e-5, rms=rms, sq_norm_sink=sink)
            y.sum().backward()
        torch.testing.assert_close(y, ref_y, msg=name)
        torch.testing.assert_close(xg.grad, ref[0], msg=name)
        torch.testing.assert_close(w.grad, ref[1], msg=name)
        torch.testing.assert_close(sink.grad, ref[3].float(), msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_collector_receives_what_a_sink_would(backend):
    """`sq_norm_collector` (eager): backward hands it the (B, 2) squared norms a sink's grad holds."""
    if backend == "triton" and not triton_runs_here("cpu"):
        pytest.skip("runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 16, generator=gen)
    weight, bias = 1 + 0.1 * torch.randn(16, generator=gen), 0.1 * torch.randn(16, generator=gen)
    results = []
    for route in ("sink", "collector"):
        xg, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        collected = []
        sink = new_sq_norm_sink(xg) if route == "sink" else None
        with use_backend(backend):
            y = fused_norm(
                xg, w, b, sq_norm_sink=sink, sq_norm_collector=collected.append if sink is None else None
            )
            y.backward(torch.ones_like(y))
        results.append((sink.grad if sink is not None else collected[0], w.grad, b.grad, xg.grad))
        assert route == "sink" or len(collected) == 1
    for from_sink, from_collector in zip(*results, strict=True):
        assert torch.equal(from_sink, from_collector)
    collected = []  # a pass that accumulates into no parameter (autograd.grad) collects nothing, as a sink
    xg = x.clone().requires_grad_()
    y = fused_norm(
        xg, weight.clone().requires_grad_(), bias.clone().requires_grad_(), sq_norm_collector=collected.append
    )
    torch.autograd.grad(y.sum(), [xg])
    assert collected == []
    for w, b in ((None, None), (weight.clone(), bias.clone().requires_grad_())):  # no γ; frozen γ, β trained
        xg = x.clone().requires_grad_()
        fused_norm(xg, w, b, sq_norm_collector=collected.append).sum().backward()
    assert [c.shape for c in collected] == [(3, 2), (3, 2)] and torch.equal(collected[0], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="sq_norm_collector"):
        fused_norm(x, weight, bias, sq_norm_sink=new_sq_norm_sink(x), sq_norm_collector=print)


@pytest.mark.gpu
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_gpu_planned_launches_match_triton_launches_on_every_stream(rms):
    """The direct runs of cached plans (pointers as ints, the reused per-stream workspace) give the bits
    of launches through `kernel[grid]`, on the default stream and on a side stream, call after call."""
    gen = torch.Generator().manual_seed(11)
    results = {}
    for enabled in (False, True):
        was_enabled = norm_triton._CachedLauncher.enabled
        norm_triton._CachedLauncher.enabled = enabled
        norm_launch.clear_plans()
        try:
            for shape in ((4, 96, 200), (2, 64, 768)):
                x = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
                weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to("cuda", torch.bfloat16)
                bias = (
                    None if rms else (0.1 * torch.randn(shape[-1], generator=gen)).to("cuda", torch.bfloat16)
                )
                side = torch.cuda.Stream()
                for call, stream in enumerate((None, None, side, side, None)):
                    with torch.cuda.stream(stream):  # None: the current stream
                        xg = x.clone().requires_grad_()
                        w = weight.clone().requires_grad_()
                        b = None if bias is None else bias.clone().requires_grad_()
                        collected = []
                        with use_backend("triton"):
                            y = fused_norm(xg, w, b, rms=rms, sq_norm_collector=collected.append)
                            y.backward(torch.ones_like(y))
                        grads = (y, xg.grad, w.grad, collected[0]) + (() if b is None else (b.grad,))
                    torch.cuda.synchronize()
                    results[enabled, shape, call] = [g.detach().clone() for g in grads]
        finally:
            norm_triton._CachedLauncher.enabled = was_enabled
            norm_launch.clear_plans()
        gen.manual_seed(11)
    for key, expected in results.items():
        if key[0]:
            continue
        for want, got in zip(expected, results[(True, *key[1:])], strict=True):
            assert torch.equal(want, got), key


def test_backwards_share_one_workspace_per_stream_grown_to_the_largest(stub_launch):
    """Direct backwards (a plan's second call on) reuse one workspace per stream, across plans."""
    weight = torch.ones(16, requires_grad=True)
    for _ in range(2):
        _fwd_bwd(torch.randn(2, 8, 16), weight, None, rms=True)
    ((small, ticket),) = norm_launch._WORKSPACES.values()
    for _ in range(2):
        _fwd_bwd(torch.randn(2, 4, 16), weight, None, rms=True)  # a smaller need: the same buffer
    assert list(norm_launch._WORKSPACES.values()) == [(small, ticket)]
    for _ in range(2):
        _fwd_bwd(torch.randn(8, 64, 16), weight, None, rms=True)  # a larger one: replaced, same ticket
    ((large, same_ticket),) = norm_launch._WORKSPACES.values()
    assert large.numel() > small.numel() and same_ticket is ticket


def test_compiled_autograd_collects_what_eager_autograd_does():
    """An eager forward's backward traced by compiled autograd (its forward inside the context or
    not) collects the per-example norms eager autograd collects: the planned backward's saved tensors
    and the collector both survive the trace."""
    from torch._dynamo import compiled_autograd

    import hf_gns

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    hf_gns.patch(model)
    x = torch.randn(3, 4, 8)
    sinks = model[1]._hf_gns_state.sinks

    def collected(forward_inside: bool) -> torch.Tensor:
        hf_gns.zero_stats(model)
        if forward_inside:
            with compiled_autograd._enable(torch.compile(backend="eager")):
                model(x).sum().backward()
        else:
            loss = model(x).sum()
            with compiled_autograd._enable(torch.compile(backend="eager")):
                loss.backward()
        (values,) = sinks.collected
        return values

    # the planned (Triton) path where its kernels run here, else the reference
    with use_backend("triton" if triton_runs_here("cpu") else "torch"):
        hf_gns.zero_stats(model)
        model(x).sum().backward()
        (eager,) = sinks.collected
        torch._dynamo.reset()
        # (on CPU the traced backward runs the reference: equal up to summation order)
        torch.testing.assert_close(collected(False), eager)
        torch.testing.assert_close(collected(True), eager)
