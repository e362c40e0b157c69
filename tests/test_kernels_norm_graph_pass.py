"""The post-grad pass that narrows compiled norm launches to the casts around them (`norm_graph_pass.py`).

The graph tests trace the traceable launches with make_fx, as AOTAutograd does (functionalized, with
Inductor's decompositions: the graph the pass sees), which needs Triton's TTIR analysis and so a
process without TRITON_INTERPRET=1; under the interpreter (CI) one test runs this file again without
it. The kernel tests run the kernels (interpreted on CPU): a narrow y or dy gives the same bits as
the cast it replaces. The compiled end-to-end checks are the GPU tests at the end.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("torch._inductor.custom_graph_pass")

from ttir_cuda_target import run_without_interpreter  # noqa: E402

from hf_gns.kernels import norm_graph_pass, norm_triton_op  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUNS_KERNELS = INTERPRETED or torch.cuda.is_available()
traced = pytest.mark.skipif(
    INTERPRETED, reason="no TTIR when interpreted: test_graph_tests_run_outside_the_interpreter runs these"
)
CAST = torch.ops.prims.convert_element_type.default
LAUNCH = torch.ops.higher_order.triton_kernel_wrapper_functional


def test_graph_tests_run_outside_the_interpreter():
    """CI runs under TRITON_INTERPRET=1: the make_fx tests run in a process without it."""
    run_without_interpreter(__file__, passed=27)


def _trace(fn, *inputs):
    """`fn` as AOTAutograd hands a graph to Inductor's post-grad passes: functionalized, decomposed."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx
    from ttir_cuda_target import cuda_target_active

    with cuda_target_active():
        decompositions = select_decomp_table()
        trace = make_fx(torch.func.functionalize(fn), tracing_mode="fake", decomposition_table=decompositions)
        gm = trace(*inputs)
    gm.graph.eliminate_dead_code()  # as post_grad_passes does first
    return gm.graph


def _forward(x, weight, rms=True):
    bias = None if rms else torch.zeros_like(weight)
    return norm_triton_op.norm_forward_traceable(x, weight, bias, 1e-5, rms, 0.0, True, x.dtype)


def _backward(dy, x, weight, mean, rstd, rms=True):
    return norm_triton_op.norm_backward_traceable(dy, x, weight, mean, rstd, not rms, rms, 0.0, True, True)


def _nodes(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target is target]


def kernel_side_table():
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table as table

    return table


def _kernel_arg(graph, name):
    (launch,) = [n for n in _nodes(graph, LAUNCH) if name in n.kwargs["kwargs"]]
    return launch.kwargs["kwargs"][name]


def _assert_eager_vals_follow(launch):
    """The launch's recorded eager arguments match its rewritten ones (torch 2.11 flattens one
    against the other when it decomposes the launch: a stale record failed there with "Node arity
    mismatch; expected 22, but got 20", and a plain dict "Type mismatch", on the H200)."""
    import torch.utils._pytree as pytree

    _, recorded = launch.meta["eager_input_vals"]
    # torch 2.11's decomposition of the launch flattens the record up to the node's structure
    # (container types included: a plain dict for fx's immutable one failed on the GPU)
    pytree.tree_structure((launch.args, launch.kwargs)).flatten_up_to(launch.meta["eager_input_vals"])
    assert recorded["kernel_idx"] == launch.kwargs["kernel_idx"]
    assert list(recorded["tensors_to_clone"]) == list(launch.kwargs["tensors_to_clone"])
    inner = launch.kwargs["kwargs"]
    assert list(recorded["kwargs"]) == list(inner)  # the same names in the same order
    for name, node in inner.items():
        if isinstance(node, torch.fx.Node):
            val, old = node.meta["val"], recorded["kwargs"][name]
            assert (old.dtype, old.shape) == (val.dtype, val.shape), name


X, W, LW = torch.randn(2, 8, 64), torch.randn(64), torch.randn(64, 32)


@traced
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_forward_writes_y_in_the_dtype_its_users_cast_it_to(dtype, rms):
    def step(x, weight, lw):  # autocast's pattern: the Linear casts the fp32 norm output
        y = _forward(x, weight, rms)[0]
        return y.to(dtype) @ lw.to(dtype), (y.to(dtype) * 2).sum()  # two casts of y (no CSE here)

    graph = _trace(step, X, W, LW)
    assert norm_graph_pass.rewrite_norm_launches(graph) == {"forward outputs": 1}
    graph.lint()
    y_buffer = _kernel_arg(graph, "Y")
    assert y_buffer.kwargs["dtype"] == dtype and y_buffer.meta["val"].dtype == dtype
    (launch,) = _nodes(graph, LAUNCH)
    (y,) = launch.users if rms else [u for u in launch.users if u.args[1] == "Y"]
    assert y.meta["val"].dtype == dtype and launch.meta["val"]["Y"].dtype == dtype
    _assert_eager_vals_follow(launch)
    assert y.meta["val"].untyped_storage() is not y_buffer.meta["val"].untyped_storage()  # no false alias
    assert not any(c.args[0] is y for c in _nodes(graph, CAST))  # the casts of y are gone
    assert {u.target for u in y.users} == {torch.ops.aten.view.default, torch.ops.aten.mul.Tensor}


@traced
def test_forward_narrows_through_views():
    """GPT-2's Conv1D views y as (B·T, D) before autocast's addmm casts it."""

    def step(x, weight, lw):
        y = _forward(x, weight)[0]
        return (y.view(-1, 64).to(torch.bfloat16) @ lw.to(torch.bfloat16)).view(2, 8, 32)

    graph = _trace(step, X, W, LW)
    assert norm_graph_pass.rewrite_norm_launches(graph) == {"forward outputs": 1}
    graph.lint()
    (launch,) = _nodes(graph, LAUNCH)
    (y,) = [u for u in launch.users if u.args[1] == "Y"]
    (view,) = y.users
    assert view.meta["val"].dtype == torch.bfloat16 and view.meta["val"].shape == (16, 64)
    assert view.meta["val"].untyped_storage() is y.meta["val"].untyped_storage()  # still a view of y
    assert [u.target for u in view.users] == [torch.ops.aten.mm.default]


@traced
@pytest.mark.parametrize(
    "use",
    [
        lambda x, y: (y + x, y.to(torch.bfloat16)),  # a residual add reads the fp32 y
        lambda x, y: (y, y.to(torch.bfloat16)),  # y is an output (e.g. saved for the backward)
        lambda x, y: (y.to(torch.bfloat16), y.to(torch.float16)),  # two narrow dtypes
        lambda x, y: (y.to(torch.float64),),  # a widening cast
    ],
    ids=["fp32-user", "output", "two-dtypes", "widening"],
)
def test_forward_keeps_y_when_anything_reads_it_other_than_one_narrowing(use, caplog):
    graph = _trace(lambda x, weight: use(x, _forward(x, weight)[0]), X, W)
    with caplog.at_level("DEBUG", logger="hf_gns"):
        assert norm_graph_pass.rewrite_norm_launches(graph) == {}
    assert _kernel_arg(graph, "Y").kwargs["dtype"] == torch.float32
    assert "keeps an fp32 output, used by [(" in caplog.text  # which uses, for whoever wonders why


@traced
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_backward_reads_dy_from_the_narrow_gradient_it_was_widened_from(rms):
    grads = torch.randn(2, 8, 64, dtype=torch.bfloat16), torch.randn(2, 8, 64, dtype=torch.bfloat16)
    mean, rstd = torch.empty(0 if rms else (2, 8)), torch.rand(2, 8)

    def backward(g1, g2, x, weight, mean, rstd):  # the sum of the casts' bf16 gradients, widened
        return _backward((g1 + g2).float(), x, weight, mean, rstd, rms)

    graph = _trace(backward, *grads, X, W, mean, rstd)
    assert norm_graph_pass.rewrite_norm_launches(graph) == {"backward inputs": 1}
    graph.lint()
    dy = _kernel_arg(graph, "DY")
    assert dy.target is torch.ops.aten.view.default and dy.meta["val"].dtype == torch.bfloat16
    assert dy.args[0].target is torch.ops.aten.add.Tensor and dy.meta["val"].shape == (2, 8, 64)
    assert not _nodes(graph, CAST)  # the widening cast is gone
    _assert_eager_vals_follow(_nodes(graph, LAUNCH)[0])


@traced
def test_backward_replays_the_views_between_dy_and_its_widening():
    grad = torch.randn(16, 64, dtype=torch.bfloat16)  # an (B·T, D) matmul gradient
    mean, rstd = torch.empty(0), torch.rand(2, 8)
    graph = _trace(
        lambda g, x, w, m, r: _backward(g.float().view(2, 8, 64), x, w, m, r), grad, X, W, mean, rstd
    )
    assert norm_graph_pass.rewrite_norm_launches(graph) == {"backward inputs": 1}
    graph.lint()
    dy = _kernel_arg(graph, "DY")
    assert dy.meta["val"].dtype == torch.bfloat16 and dy.meta["val"].shape == (2, 8, 64)
    assert dy.args[0].target is torch.ops.aten.view.default and dy.args[0].args[0].op == "placeholder"
    assert not _nodes(graph, CAST)


@traced
def test_backward_keeps_an_fp32_sum_of_widened_gradients():
    """q, k and v each cast y: their gradients are widened, then summed in fp32 (as eager sums them);
    rounding that sum to bf16 would lose precision, so the pass leaves it."""
    grads = torch.randn(2, 8, 64, dtype=torch.bfloat16), torch.randn(2, 8, 64, dtype=torch.bfloat16)
    mean, rstd = torch.empty(0), torch.rand(2, 8)
    graph = _trace(
        lambda g1, g2, x, w, m, r: _backward(g1.float() + g2.float(), x, w, m, r), *grads, X, W, mean, rstd
    )
    assert norm_graph_pass.rewrite_norm_launches(graph) == {}


@traced
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_residual_add_before_a_norm_moves_into_its_kernel(rms):
    """h = residual + sublayer (fp32 + bf16, as under autocast) feeding a norm: the residual kernel
    reads both, stores h for h's other users (the next residual add, the backward), and the add goes."""
    sublayer = torch.randn(2, 8, 64, dtype=torch.bfloat16)

    def step(residual, sublayer, weight, lw):
        h = residual + sublayer
        y = _forward(h, weight, rms)[0]
        return y.to(torch.bfloat16) @ lw.to(torch.bfloat16), h * 2

    graph = _trace(step, X, sublayer, W, LW)
    done = norm_graph_pass.rewrite_norm_launches(graph, mode="forward", fuse_residual=True)
    assert done == {"residual adds": 1, "forward outputs": 1}
    graph.lint()
    (launch,) = _nodes(graph, LAUNCH)
    kernel = norm_graph_pass._launched_kernel(
        kernel_side_table().get_kernel(launch.kwargs["kernel_idx"]), norm_graph_pass._norm_kernels()[0]
    )
    assert kernel is norm_graph_pass._norm_kernels()[0][1]  # the residual kernel
    inner = launch.kwargs["kwargs"]
    assert [inner[k].args[0].name for k in ("X", "Residual")] == ["residual_1", "sublayer_1"]
    assert inner["Sum"].meta["val"].dtype == torch.float32 and "Sum" in launch.kwargs["tensors_to_clone"]
    assert not _nodes(graph, torch.ops.aten.add.Tensor)
    (stored,) = [u for u in launch.users if u.args[1] == "Sum"]
    (mul,) = _nodes(graph, torch.ops.aten.mul.Tensor)
    assert mul.args[0] is stored and stored.meta["val"].shape == (2, 8, 64)
    _assert_eager_vals_follow(launch)
    if rms:  # the absent Bias stood for X: it moved with X
        assert inner["Bias"] is inner["X"]


@traced
@pytest.mark.parametrize(
    "add,other_shape",
    [
        (lambda a, b: a + b[0, 0], (2, 8, 64)),
        (lambda a, b: torch.add(a, b, alpha=2), (2, 8, 64)),
        (lambda a, b: a + b.transpose(0, 1), (8, 2, 64)),
    ],
    ids=["broadcast", "alpha", "strided"],
)
def test_residual_add_stays_when_the_kernel_cannot_read_it_alike(add, other_shape):
    other = torch.randn(other_shape)

    def step(a, b, weight):
        return _forward(add(a, b), weight)[0]

    graph = _trace(step, X, other, W)
    assert norm_graph_pass.rewrite_norm_launches(graph, mode="0", fuse_residual=True) == {}
    assert _nodes(graph, torch.ops.aten.add.Tensor)


@traced
def test_residual_add_stays_when_the_sum_is_used_before_the_norm():
    def step(a, b, weight):
        h = a + b
        doubled = h * 2  # traced before the norm's launch: moving the add would reorder the graph
        return _forward(h, weight)[0], doubled

    graph = _trace(step, X, torch.randn(2, 8, 64), W)
    assert norm_graph_pass.rewrite_norm_launches(graph, mode="0", fuse_residual=True) == {}
    assert _nodes(graph, torch.ops.aten.add.Tensor)


def _fused_backward_graph(sum_dys, residual=lambda dx, r: dx + r, rms=True):
    """A Llama block's norm backward as AOTAutograd hands it over: dy the fp32 sum of the widened
    q/k/v gradients, dx + the residual stream's gradient, that sum cast for the output projection."""
    grads = [torch.randn(2, 8, 64, dtype=torch.bfloat16) for _ in range(4)]
    mean, rstd = torch.empty(0 if rms else (2, 8)), torch.rand(2, 8)

    def backward(g1, g2, g3, g4, residual_grad, x, weight, mean, rstd):
        dy = sum_dys(*(g.float() for g in (g1, g2, g3, g4)))
        total = residual(_backward(dy, x, weight, mean, rstd, rms)[0], residual_grad)
        return total, total.to(torch.bfloat16)

    return _trace(backward, *grads, torch.randn(2, 8, 64), X, W, mean, rstd)


def _fused_launch(graph):
    (launch,) = [n for n in _nodes(graph, LAUNCH) if "DY" in n.kwargs["kwargs"]]
    kernel = kernel_side_table().get_kernel(launch.kwargs["kernel_idx"])
    return launch, norm_graph_pass._launched_kernel(kernel, norm_graph_pass._norm_kernels()[1])


def _placeholder_of(node):
    while node.op != "placeholder":
        node = node.args[0]
    return node.name


@traced
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_backward_sums_move_into_the_fused_kernel(rms):
    graph = _fused_backward_graph(lambda a, b, c, d: (a + b) + c, rms=rms)
    done = norm_graph_pass.rewrite_norm_launches(graph, mode="forward", fuse_backward_sums=True)
    assert done == {"backward dy sums": 1, "backward residual adds": 1}
    graph.lint()
    launch, kernel = _fused_launch(graph)
    assert kernel is norm_graph_pass._norm_kernels()[1][1]  # _norm_bwd_fused_kernel
    inner = launch.kwargs["kwargs"]
    assert [_placeholder_of(inner[k]) for k in ("DY", "DY2", "DY3")] == ["g1_1", "g2_1", "g3_1"]
    assert all(inner[k].meta["val"].dtype == torch.bfloat16 for k in ("DY", "DY2", "DY3"))
    assert (inner["N_DY"], inner["HAS_ADDEND"], inner["HAS_NARROW_DX"]) == (3, True, True)
    assert inner["Addend"].name == "residual_grad_1"
    assert (
        inner["DXNarrow"].meta["val"].dtype == torch.bfloat16
        and "DXNarrow" in launch.kwargs["tensors_to_clone"]
    )
    assert not _nodes(graph, torch.ops.aten.add.Tensor) and not _nodes(graph, CAST)  # sums and casts gone
    output = graph.find_nodes(op="output")[0]
    (total, narrow) = output.args[0]
    assert (total.args, narrow.args) == ((launch, "DX"), (launch, "DXNarrow"))
    _assert_eager_vals_follow(launch)


@traced
def test_backward_sums_keep_the_order_of_the_fp32_adds():
    """a + (b + c) is (b + c) + a bit for bit; (a + b) + (c + d) is no chain the kernel adds alike."""
    graph = _fused_backward_graph(lambda a, b, c, d: a + (b + c))
    assert (
        norm_graph_pass.rewrite_norm_launches(graph, mode="forward", fuse_backward_sums=True)[
            "backward dy sums"
        ]
        == 1
    )
    inner = _fused_launch(graph)[0].kwargs["kwargs"]
    assert [_placeholder_of(inner[k]) for k in ("DY", "DY2", "DY3")] == ["g2_1", "g3_1", "g1_1"]
    graph = _fused_backward_graph(lambda a, b, c, d: (a + b) + (c + d))
    done = norm_graph_pass.rewrite_norm_launches(graph, mode="forward", fuse_backward_sums=True)
    assert done == {"backward residual adds": 1}
    inner = _fused_launch(graph)[0].kwargs["kwargs"]
    assert inner["N_DY"] == 1 and inner["DY2"] is inner["X"]  # an unread pointer, not a dead node's


@traced
def test_backward_residual_add_stays_when_its_addend_comes_after_the_kernel():
    graph = _fused_backward_graph(lambda a, b, c, d: a + b, residual=lambda dx, r: dx + dx.exp())
    done = norm_graph_pass.rewrite_norm_launches(graph, mode="forward", fuse_backward_sums=True)
    assert done == {"backward dy sums": 1}
    inner = _fused_launch(graph)[0].kwargs["kwargs"]
    assert (inner["N_DY"], inner["HAS_ADDEND"], inner["HAS_NARROW_DX"]) == (2, False, False)
    graph.lint()


@traced
def test_backward_keeps_an_fp32_dy_and_mode_switches_hold():
    mean, rstd = torch.empty(0), torch.rand(2, 8)
    graph = _trace(lambda dy, x, w, m, r: _backward(dy, x, w, m, r), torch.randn(2, 8, 64), X, W, mean, rstd)
    assert norm_graph_pass.rewrite_norm_launches(graph) == {}

    def both(x, weight, g, lw):
        y, mean, rstd = _forward(x, weight)
        return y.to(torch.bfloat16) @ lw.to(torch.bfloat16), _backward(g.float(), x, weight, mean, rstd)

    inputs = (X, W, torch.randn(2, 8, 64, dtype=torch.bfloat16), LW)
    rewrite = norm_graph_pass.rewrite_norm_launches
    assert rewrite(_trace(both, *inputs), mode="0") == {}
    assert rewrite(_trace(both, *inputs), mode="forward") == {"forward outputs": 1}
    assert rewrite(_trace(both, *inputs)) == {"forward outputs": 1, "backward inputs": 1}


def test_install_chains_the_configured_pass_once(monkeypatch):
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class Earlier(CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "earlier-v1"

    earlier = Earlier()
    monkeypatch.setattr(config, "post_grad_custom_post_pass", earlier)
    assert norm_graph_pass.install() and norm_graph_pass.install()  # idempotent
    installed = config.post_grad_custom_post_pass
    assert isinstance(installed, norm_graph_pass.NormLaunchRewrite) and installed.chained is earlier
    graph = torch.fx.Graph()
    installed(graph)
    assert seen == [graph]
    key = installed.uuid()
    assert key[-1] == "earlier-v1" and key == installed.uuid()
    monkeypatch.setenv("HF_GNS_COMPILED_NARROW_CASTS", "forward")
    assert installed.uuid() != key  # the mode is part of the FX graph cache key
    assert norm_graph_pass.NormLaunchRewrite(lambda graph: None).uuid() is None  # an unkeyed pass: no caching


def test_install_respects_the_off_switch_and_rejects_unknown_modes(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config, "post_grad_custom_post_pass", None)
    for switch in ("HF_GNS_COMPILED_RESIDUAL_ADD", "HF_GNS_COMPILED_BACKWARD_SUMS"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("HF_GNS_COMPILED_NARROW_CASTS", "0")
    assert norm_graph_pass._fuses_residual() and norm_graph_pass._fuses_backward_sums()  # the defaults
    monkeypatch.setenv("HF_GNS_COMPILED_RESIDUAL_ADD", "0")
    monkeypatch.setenv("HF_GNS_COMPILED_BACKWARD_SUMS", "0")
    assert not norm_graph_pass.install() and config.post_grad_custom_post_pass is None  # all off
    monkeypatch.setenv("HF_GNS_COMPILED_BACKWARD_SUMS", "1")  # one fusion alone installs it
    assert norm_graph_pass.install() and isinstance(
        config.post_grad_custom_post_pass, norm_graph_pass.NormLaunchRewrite
    )
    monkeypatch.setenv("HF_GNS_COMPILED_RESIDUAL_ADD", "on")
    with pytest.raises(ValueError, match="HF_GNS_COMPILED_RESIDUAL_ADD must be 0 or 1"):
        norm_graph_pass.install()
    monkeypatch.setenv("HF_GNS_COMPILED_NARROW_CASTS", "yes")
    with pytest.raises(ValueError, match="HF_GNS_COMPILED_NARROW_CASTS must be one of"):
        norm_graph_pass.install()


def test_patch_installs_the_pass(monkeypatch):
    from patching_tiny_models import tiny_model
    from torch._inductor import config

    import hf_gns

    monkeypatch.setattr(config, "post_grad_custom_post_pass", None)
    hf_gns.patch(tiny_model("llama"))
    assert isinstance(config.post_grad_custom_post_pass, norm_graph_pass.NormLaunchRewrite)


# ------------------------------------------------------------------- the kernels, narrow


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


runs_kernels = pytest.mark.skipif(not RUNS_KERNELS, reason="the kernels need a GPU or TRITON_INTERPRET=1")


def _norm_inputs(rms):
    device = _device()
    x, weight = torch.randn(2, 8, 96, device=device), torch.randn(96, device=device)
    return x, weight, None if rms else torch.randn(96, device=device)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_forward_kernel_writes_the_bits_of_the_cast_it_absorbs(dtype, rms):
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("the interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even, as torch does)")
    args = (*_norm_inputs(rms), 1e-5, rms, 0.0, True)
    wide = norm_triton_op.norm_forward_traceable(*args, torch.float32)[0]
    narrow = norm_triton_op.norm_forward_traceable(*args, dtype)[0]
    assert narrow.dtype == dtype
    # one rounding of (nearly) the same fp32 y: Triton may lay the row reduction out differently for
    # a narrow store, so y may differ in its last fp32 bit and, rarely, round the other way
    cast = wide.to(dtype)
    torch.testing.assert_close(narrow.float(), cast.float(), rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert (narrow != cast).float().mean() < 0.01


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_backward_kernel_reads_a_narrow_dy_as_its_widening(dtype, rms):
    x, weight, bias = _norm_inputs(rms)
    forward = norm_triton_op.norm_forward_traceable
    _, mean, rstd = forward(x, weight, bias, 1e-5, rms, 0.0, True, torch.float32)
    dy = torch.randn_like(x).to(dtype)
    config = (x, weight, mean, rstd, not rms, rms, 0.0, True, True)
    for expected, actual in zip(
        norm_triton_op.norm_backward_traceable(dy.float(), *config),
        norm_triton_op.norm_backward_traceable(dy, *config),
        strict=True,
    ):  # the same values: dy widened exactly, fp32 sums perhaps laid out in another order
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@runs_kernels
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_residual_kernel_stores_the_sum_and_normalizes_it(rms):
    x, weight, bias = _norm_inputs(rms)
    sublayer = torch.randn_like(x).to(torch.bfloat16)  # fp32 residual + a bf16 sublayer output
    args = (weight, bias, 1e-5, rms, 0.0, True, torch.bfloat16)
    total, *fused = norm_triton_op.norm_add_forward_traceable(x, sublayer, *args)
    assert total.dtype == torch.float32 and torch.equal(total, x + sublayer)  # one fp32 add, as torch's
    unfused = norm_triton_op.norm_forward_traceable(x + sublayer, *args)
    for expected, actual in zip(unfused, fused, strict=True):  # the reduction layout may differ
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous tensors of one shape"):
        norm_triton_op.norm_add_forward_traceable(x, sublayer[:, :4], *args)


@runs_kernels
@pytest.mark.parametrize("n_dy", [1, 2, 3])
@pytest.mark.parametrize("rms", [True, False], ids=["rmsnorm", "layernorm"])
def test_fused_backward_kernel_sums_the_narrow_dys_and_adds_the_residual_gradient(n_dy, rms):
    """The q/k/v (gate/up) gradients summed in fp32 in the kernel, dx + the residual gradient and its
    bf16 copy: the values of the unfused graph's adds and casts."""
    x, weight, bias = _norm_inputs(rms)
    _, mean, rstd = norm_triton_op.norm_forward_traceable(
        x, weight, bias, 1e-5, rms, 0.0, True, torch.float32
    )
    dys = [torch.randn_like(x).to(torch.bfloat16) for _ in range(n_dy)]
    residual_grad = torch.randn_like(x)
    config = (x, weight, mean, rstd, not rms, rms, 0.0, True, True)
    widened = dys[0].float()
    for dy in dys[1:]:
        widened = widened + dy.float()  # as the graph sums them: ((q + k) + v)
    dx, grads, sq_norms = norm_triton_op.norm_backward_traceable(widened, *config)
    total, narrow, fused_grads, fused_sq_norms = norm_triton_op.norm_backward_fused_traceable(
        dys, residual_grad, torch.float16, *config
    )
    torch.testing.assert_close(total, dx + residual_grad, rtol=1e-5, atol=1e-6)
    assert narrow.dtype == torch.float16 and torch.equal(narrow, total.to(torch.float16))  # the cast's bits
    torch.testing.assert_close(fused_grads, grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_sq_norms, sq_norms, rtol=1e-5, atol=1e-6)
    alone = norm_triton_op.norm_backward_fused_traceable(dys, None, None, *config)
    assert alone[1] is None
    torch.testing.assert_close(alone[0], dx, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one to three tensors of one layout"):
        norm_triton_op.norm_backward_fused_traceable([*dys, dys[0][:, :4]], None, None, *config)


# ------------------------------------------------------------------- compiled, on the GPU


def _compiled_autocast_steps(arch, mode, monkeypatch, steps=2, residual="0", backward_sums="0"):
    """Loss, gradients and per-example norms of the last of `steps` compiled bf16-autocast steps of a
    patched tiny model with the pass in `mode`, and what the pass narrowed."""
    import torch._dynamo
    from patching_tiny_models import tiny_batch, tiny_model

    import hf_gns
    from hf_gns.patching.state import patched_states

    monkeypatch.setenv("HF_GNS_COMPILED_NARROW_CASTS", mode)
    monkeypatch.setenv("HF_GNS_COMPILED_RESIDUAL_ADD", residual)
    monkeypatch.setenv("HF_GNS_COMPILED_BACKWARD_SUMS", backward_sums)
    torch._dynamo.reset()
    before = norm_graph_pass.REWRITTEN.copy()
    model = tiny_model(arch).cuda()
    hf_gns.patch(model)
    call, input_ids = torch.compile(model), tiny_batch().cuda()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        hf_gns.zero_stats(model)
        with torch.autocast("cuda", torch.bfloat16):
            loss = call(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    norms = {name: v.clone() for name, v in hf_gns.per_example_sq_norms(model).items()}
    n_norms = len(patched_states(model, "norm"))
    return (loss.detach(), grads, norms), norm_graph_pass.REWRITTEN - before, n_norms


@pytest.mark.gpu
def test_gpu_compiled_autocast_llama_norms_write_and_read_bf16_with_the_same_results(monkeypatch):
    """Every patched norm of a compiled bf16-autocast Llama step writes bf16 (and, with "both", the
    last norm reads its bf16 gradient; with HF_GNS_COMPILED_RESIDUAL_ADD=1, computes the residual add
    before it; with HF_GNS_COMPILED_BACKWARD_SUMS=1, sums the q/k/v and gate/up gradients and adds
    the residual gradient in its backward kernel), with the results of the step without the pass up
    to bf16 rounding."""
    reference, narrowed, _ = _compiled_autocast_steps("llama", "0", monkeypatch)
    assert not narrowed
    forward_only, narrowed, n_norms = _compiled_autocast_steps("llama", "forward", monkeypatch)
    assert narrowed == {"forward outputs": n_norms}, (narrowed, n_norms)
    _assert_close_steps(forward_only, reference, rtol=1e-3)  # fp32 y to the last bit, then one rounding
    both, narrowed, _ = _compiled_autocast_steps("llama", "both", monkeypatch)
    # a dy is one widened gradient only where the norm feeds one Linear: Llama's last norm (the
    # q/k/v and gate/up gradients are widened and summed in fp32, which the pass leaves)
    assert narrowed == {"forward outputs": n_norms, "backward inputs": 1}, (narrowed, n_norms)
    _assert_close_steps(both, reference, rtol=2e-2)  # dy rounded to bf16 where eager rounds it
    fused, narrowed, _ = _compiled_autocast_steps("llama", "forward", monkeypatch, residual="1")
    # every norm's input but the first (the embedding) is a residual add
    assert narrowed == {"forward outputs": n_norms, "residual adds": n_norms - 1}, (narrowed, n_norms)
    _assert_close_steps(fused, reference, rtol=1e-3)  # the same fp32 sums, the norms as above
    summed, narrowed, _ = _compiled_autocast_steps("llama", "forward", monkeypatch, backward_sums="1")
    # every norm but the last feeds several Linears (q/k/v, gate/up) and its dx meets the residual
    # gradient in an add; the last norm's dx is the stream's gradient itself (read by a cast first)
    expected = {
        "forward outputs": n_norms,
        "backward dy sums": n_norms - 1,
        "backward residual adds": n_norms - 1,
    }
    assert narrowed == expected, (narrowed, n_norms)
    _assert_close_steps(summed, reference, rtol=1e-3)  # the same fp32 sums in the kernel


@pytest.mark.gpu
def test_gpu_compiled_autocast_gpt2_norms_write_bf16_with_the_same_results(monkeypatch):
    """GPT-2's Conv1D views the norm output as (B·T, D) before its cast: the pass follows the view.
    ln_f's output is also returned by the graph (the last hidden state), so it stays fp32."""
    reference, narrowed, _ = _compiled_autocast_steps("gpt2", "0", monkeypatch)
    assert not narrowed
    forward_only, narrowed, n_norms = _compiled_autocast_steps("gpt2", "forward", monkeypatch)
    assert narrowed == {"forward outputs": n_norms - 1}, (narrowed, n_norms)
    _assert_close_steps(forward_only, reference, rtol=1e-3)
    # the defaults: each norm feeds one Conv1D (no dy sum); the counts of the CPU step test
    # (test_kernels_norm_graph_pass_steps.py, torch 2.13), not yet seen on a GPU
    fused, narrowed, _ = _compiled_autocast_steps(
        "gpt2", "forward", monkeypatch, residual="1", backward_sums="1"
    )
    expected = {
        "forward outputs": n_norms - 1,
        "residual adds": n_norms - 1,
        "backward residual adds": n_norms - 1,
    }
    assert narrowed == expected, (narrowed, n_norms)
    _assert_close_steps(fused, reference, rtol=1e-3)
    # the defaults since 2026-12-03: the backward also reads each Conv1D's bf16 input gradient
    # (ln_f's dy adds the returned hidden state's gradient: not one widened tensor); the counts of
    # the CPU step test, not yet seen on a GPU
    defaults, narrowed, _ = _compiled_autocast_steps(
        "gpt2", "both", monkeypatch, residual="1", backward_sums="1"
    )
    assert narrowed == {**expected, "backward inputs": n_norms - 1}, (narrowed, n_norms)
    _assert_close_steps(defaults, reference, rtol=2e-2)  # dy rounded to bf16 where eager rounds it


def _assert_close_steps(actual, expected, rtol):
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=1e-5)
    for wanted, got in zip(expected[1:], actual[1:], strict=True):
        assert wanted.keys() == got.keys()
        for name in wanted:
            torch.testing.assert_close(got[name], wanted[name], rtol=rtol, atol=1e-5, msg=name)
