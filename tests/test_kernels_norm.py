"""The fused norm (Triton and reference backends) against a micro-batch oracle.

Oracle: one example at a time, plain autograd through `F.layer_norm` or HF-style
RMSNorm code, in fp64. Tolerances (issue 2): fp32 relative error <= 1e-5; bf16/fp16
max error <= 2x PyTorch's own error (the same oracle code run in that dtype) + atol.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hf_gns.kernels import fused_norm, new_sq_norm_sink, norm_forward_reference, use_backend
from tests.conftest import triton_runs_here


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    rms: bool
    weight: bool = True
    bias: bool = False
    weight_offset: float = 0.0
    cast_before_weight: bool = False
    out_promotes: bool = False  # Llama returns promote_types(weight, input)
    out_float32: bool = False  # nn.LayerNorm under CUDA autocast: fp32 out (and fp32 dy) for a bf16 x


VARIANTS = [
    Variant("layernorm", rms=False, bias=True),
    Variant("layernorm_no_bias", rms=False),
    Variant("layernorm_no_affine", rms=False, weight=False),
    Variant("layernorm_autocast", rms=False, bias=True, out_float32=True),
    Variant("rmsnorm", rms=True),
    Variant("rmsnorm_gemma", rms=True, weight_offset=1.0),
    Variant("rmsnorm_llama", rms=True, cast_before_weight=True, out_promotes=True),
    Variant("rmsnorm_no_affine", rms=True, weight=False),
]
VARIANT_IDS = [v.name for v in VARIANTS]
EPS = 1e-5


def oracle_forward(x, weight, bias, variant: Variant):
    """The norm written the way PyTorch / HF write it, autograd-differentiable."""
    if variant.out_float32:  # what autocast does: the op runs on fp32 copies of its inputs
        up = torch.promote_types(x.dtype, torch.float32)
        x, weight, bias = x.to(up), weight.to(up), bias.to(up)
    if not variant.rms:
        return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)
    if variant.cast_before_weight:  # LlamaRMSNorm.forward
        h = x.to(torch.float32 if x.dtype != torch.float64 else x.dtype)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return weight * h.to(x.dtype)
    h = x.float() if x.dtype != torch.float64 else x  # GemmaRMSNorm / Olmo2RMSNorm style
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    if weight is not None:
        h = h * (variant.weight_offset + weight.to(h.dtype))
    return h.to(x.dtype)


def micro_batch_oracle(x, weight, bias, dy, variant: Variant, dtype):
    """Per example b: y_b, dx_b and the grads of weight/bias from x[b] alone, in `dtype`."""
    ys, dxs, dws, dbs = [], [], [], []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().to(dtype).requires_grad_()
        wb = None if weight is None else weight.detach().to(dtype).requires_grad_()
        bb = None if bias is None else bias.detach().to(dtype).requires_grad_()
        yb = oracle_forward(xb, wb, bb, variant)
        yb.backward(dy[b : b + 1].to(yb.dtype))
        ys.append(yb.detach())
        dxs.append(xb.grad)
        dws.append(None if wb is None else wb.grad.double())
        dbs.append(None if bb is None else bb.grad.double())
    out = {"y": torch.cat(ys), "dx": torch.cat(dxs)}
    if weight is not None:
        out["dw"] = torch.stack(dws).sum(0)
        out["sq_w"] = torch.stack([g.square().sum() for g in dws])
    if bias is not None:
        out["db"] = torch.stack(dbs).sum(0)
        out["sq_b"] = torch.stack([g.square().sum() for g in dbs])
    return out


def run_fused(x, weight, bias, dy, variant: Variant):
    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    sink = new_sq_norm_sink(x) if weight is not None else None
    out_dtype = torch.promote_types(weight.dtype, x.dtype) if variant.out_promotes else x.dtype
    if variant.out_float32:
        out_dtype = torch.promote_types(x.dtype, torch.float32)
    y = fused_norm(
        x,
        weight,
        bias,
        EPS,
        rms=variant.rms,
        weight_offset=variant.weight_offset,
        cast_before_weight=variant.cast_before_weight,
        out_dtype=out_dtype,
        sq_norm_sink=sink,
    )
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    if weight is not None:
        out["dw"] = weight.grad
        out["sq_w"] = sink.grad[:, 0]
    if bias is not None:
        out["db"] = bias.grad
        out["sq_b"] = sink.grad[:, 1]
    return out


def make_inputs(shape, dtype, variant: Variant, device, seed=0, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    width = shape[-1]
    if contiguous:
        x = torch.randn(shape, generator=gen)
    else:  # the same values through a non-contiguous view: swap the first two dims of a buffer
        x = torch.randn((shape[1], shape[0], *shape[2:]), generator=gen).transpose(0, 1)
    x = (3.0 * x + 0.5).to(device=device, dtype=dtype)
    weight = bias = None
    if variant.weight:
        weight = (1.0 + 0.5 * torch.randn(width, generator=gen)).to(device=device, dtype=dtype)
    if variant.bias:
        bias = (0.5 * torch.randn(width, generator=gen)).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return x, weight, bias, dy


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_err(a, b):
    """||a - b|| / ||b||, with an absolute floor for (near-)zero references (LayerNorm at D=1)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-6)).item()


SHAPES = [(3, 37), (2, 5, 64), (2, 3, 4, 16), (2, 3, 130), (1, 2, 1), (2, 2, 1000)]


def backends_for(device):
    return ["torch", "triton"] if triton_runs_here(device) else ["torch"]


def full_batch_pytorch(x, weight, bias, dy, variant: Variant):
    """PyTorch's own result in the input dtype: the whole batch through plain autograd."""
    x = x.detach().requires_grad_()
    weight = None if weight is None else weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    y = oracle_forward(x, weight, bias, variant)
    y.backward(dy.to(y.dtype))
    out = {"y": y.detach(), "dx": x.grad}
    if weight is not None:
        out["dw"] = weight.grad
    if bias is not None:
        out["db"] = bias.grad
    return out


def pytorch_own_error(x, weight, bias, dy, variant, exact):
    """PyTorch's max error against the fp64 oracle when run in the input dtype."""
    own = micro_batch_oracle(x, weight, bias, dy, variant, x.dtype)  # per-example norms
    own.update(full_batch_pytorch(x, weight, bias, dy, variant))  # y, dx, dw, db as PyTorch gives them
    return {key: max_err(own[key], ref) for key, ref in exact.items()}


def dx_term_scale(x, weight, dy, variant):
    """max |rstd · dy ⊙ w_eff|: the size of the terms whose difference is dx."""
    _, _, rstd = norm_forward_reference(x.double(), None, None, EPS, rms=variant.rms)
    w_eff = 1.0 if weight is None else weight.double().abs().max().item() + variant.weight_offset
    return (rstd.max() * dy.double().abs().max()).item() * w_eff


def check_against_oracle(shape, dtype, variant, device, backend, contiguous=True):
    """fp32: relative error <= 1e-5 (or within 2x PyTorch's own fp32 error where the math is
    cancellation-limited, as RMSNorm's dx at D=1); bf16/fp16: max error <= 2x PyTorch's own
    error in that dtype + one ulp of the dtype at the reference's scale."""
    x, weight, bias, dy = make_inputs(shape, dtype, variant, device, contiguous=contiguous)
    with use_backend(backend):
        got = run_fused(x, weight, bias, dy, variant)
    exact = micro_batch_oracle(x, weight, bias, dy, variant, torch.float64)
    own = pytorch_own_error(x, weight, bias, dy, variant, exact)
    ulp = torch.finfo(dtype).eps
    for key, ref in exact.items():
        err = max_err(got[key], ref)
        if dtype == torch.float32 and rel_err(got[key], ref) <= 1e-5:
            continue
        atol = ulp * ref.double().abs().max().item()
        if key == "dx":
            # dx = rstd·(g - x̂·mean(g ⊙ x̂)) is a difference of terms of size |rstd·g| that
            # cancels almost fully where 1 - x̂² ≈ ε/x² (RMSNorm at D=1): allow a few ulps of
            # that scale, since fused multiply-adds round it differently from PyTorch
            atol = max(atol, 16 * ulp * dx_term_scale(x, weight, dy, variant))
        assert err <= 2 * own[key] + atol, (key, err, own[key], atol)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_micro_batch_oracle(variant, shape, dtype, backend):
    if backend not in backends_for("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    check_against_oracle(shape, dtype, variant, "cpu", backend)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_input(variant, backend):
    if backend not in backends_for("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    check_against_oracle((3, 4, 24), torch.float32, variant, "cpu", backend, contiguous=False)


def test_non_unit_stride_last_dim():
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((2, 3, 16), torch.float32, variant, "cpu")
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # stride 2 along D
    assert x_strided.stride(-1) == 2
    for backend in backends_for("cpu"):
        with use_backend(backend):
            got = run_fused(x_strided, weight, bias, dy, variant)
        exact = micro_batch_oracle(x, weight, bias, dy, variant, torch.float64)
        assert rel_err(got["sq_w"], exact["sq_w"]) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sink_grads_sum_to_param_grad_identity(backend):
    """Σ_b dγ_b == dγ is implied; here: the norms of a single example equal |dγ|²."""
    if backend not in backends_for("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((1, 6, 40), torch.float32, variant, "cpu")
    with use_backend(backend):
        got = run_fused(x, weight, bias, dy, variant)
    torch.testing.assert_close(got["sq_w"][0], got["dw"].square().sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got["sq_b"][0], got["db"].square().sum(), rtol=1e-6, atol=0)


def test_triton_backward_is_bitwise_deterministic():
    if not triton_runs_here("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((3, 50, 48), torch.bfloat16, variant, "cpu", seed=3)
    with use_backend("triton"):
        first = run_fused(x, weight, bias, dy, variant)
        second = run_fused(x, weight, bias, dy, variant)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_backward_never_writes_into_dy():
    """Gemma2 reuses dy after the norm's backward: dx must not alias it."""
    variant = VARIANTS[3]
    for backend in backends_for("cpu"):
        x, weight, _, dy = make_inputs((2, 3, 16), torch.float32, variant, "cpu")
        dy_before = dy.clone()
        with use_backend(backend):
            run_fused(x, weight, None, dy, variant)
        assert torch.equal(dy, dy_before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_parameters_skip_their_gradients(backend):
    """γ, β frozen and no sink (LoRA): dx as usual, no parameter gradients computed."""
    if backend not in backends_for("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((2, 5, 24), torch.float32, variant, "cpu")
    with use_backend(backend):
        tracked = run_fused(x, weight, bias, dy, variant)
        x_frozen = x.detach().requires_grad_()
        y = fused_norm(x_frozen, weight, bias, EPS)
        y.backward(dy)
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(x_frozen.grad, tracked["dx"], rtol=0, atol=0)


def test_reference_upcast_false_computes_in_input_dtype():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    _, _, rstd = norm_forward_reference(x, None, None, EPS, rms=True, upcast=False)
    assert rstd.dtype == torch.bfloat16
    _, _, rstd = norm_forward_reference(x, None, None, EPS, rms=True)
    assert rstd.dtype == torch.float32


def test_clear_errors_for_bad_input():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="does not match D=8"):
        fused_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="bias only together with a weight"):
        fused_norm(x, None, torch.zeros(8))
    with pytest.raises(ValueError, match=r"sq_norm_sink must have shape \(\d+, 2\), one row per example"):
        fused_norm(x, torch.ones(8), sq_norm_sink=torch.zeros(3, 2, requires_grad=True))
    with pytest.raises(ValueError, match="example_offsets must be a 1-D int64 tensor"):
        fused_norm(x, torch.ones(8), example_offsets=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sq_norm_sink must have shape \(3, 2\)"):  # E = 3 documents
        sink = torch.zeros(2, 2, requires_grad=True)
        fused_norm(x, torch.ones(8), sq_norm_sink=sink, example_offsets=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="unknown hf_gns backend"):
        with use_backend("cuda"):
            pass


def test_compiles_without_graph_breaks():
    """The op is traceable: dynamo sees the autograd.Function and the custom ops."""
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((2, 3, 16), torch.float32, variant, "cpu")

    def step(x, weight, bias, sink):
        return fused_norm(x, weight, bias, EPS, sq_norm_sink=sink)

    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    sink = new_sq_norm_sink(x)
    explanation = torch._dynamo.explain(step)(x, weight, bias, sink)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y = compiled(x, weight, bias, sink)
    y.backward(dy)
    eager = run_fused(x, weight, bias, dy, variant)
    torch.testing.assert_close(y.detach(), eager["y"])
    torch.testing.assert_close(sink.grad[:, 0], eager["sq_w"])
    torch.testing.assert_close(weight.grad, eager["dw"])


def test_triton_ops_pass_opcheck():
    x = torch.randn(2, 3, 16)
    weight, bias = torch.randn(16), torch.randn(16)
    args = (x, weight, bias, EPS, False, 0.0, False, torch.float32, True)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.hf_gns.fused_norm_forward.default, args, test_utils=utils)
    y, mean, rstd = torch.ops.hf_gns.fused_norm_forward(*args)
    bwd_args = (torch.randn_like(x), x, weight, mean, rstd, True, False, 0.0, False, True, True)
    torch.library.opcheck(torch.ops.hf_gns.fused_norm_backward.default, bwd_args, test_utils=utils)
    offsets = torch.tensor([0, 2, 2, 6])  # 3 documents over the 6 rows, one empty
    dx, grads, sq_norms = torch.ops.hf_gns.fused_norm_backward(*bwd_args, offsets)
    assert grads.shape == (2, 16) and sq_norms.shape == (3, 2)
    torch.library.opcheck(
        torch.ops.hf_gns.fused_norm_backward.default, (*bwd_args, offsets), test_utils=utils
    )


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("documents", [False, True], ids=["dense", "documents"])
def test_traceable_launchers_equal_the_eager_launchers(variant, documents):
    """The triton_op bodies launch the kernels through wrap_triton with their own buffers; under
    the interpreter they must give the eager launchers' results bit for bit."""
    from hf_gns.kernels.norm_launch import norm_backward_triton, norm_forward_triton
    from hf_gns.kernels.norm_triton_op import norm_backward_traceable, norm_forward_traceable

    if not triton_runs_here("cpu"):
        pytest.skip("runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")
    x, weight, bias, dy = make_inputs((3, 5, 24), torch.float32, variant, "cpu")
    kw = {
        "rms": variant.rms,
        "weight_offset": variant.weight_offset,
        "cast_before_weight": variant.cast_before_weight,
    }
    fwd = (x, weight, bias, EPS, kw["rms"], kw["weight_offset"], kw["cast_before_weight"], torch.float32)
    expected_fwd, actual_fwd = norm_forward_triton(*fwd), norm_forward_traceable(*fwd)
    for expected, actual in zip(expected_fwd, actual_fwd, strict=True):
        assert torch.equal(expected, actual)
    _, mean, rstd = expected_fwd
    offsets = torch.tensor([0, 4, 4, 11, 15]) if documents else None
    for param_grads in (True, False):
        bwd = (
            dy,
            x,
            weight,
            mean,
            rstd,
            bias is not None,
            kw["rms"],
            kw["weight_offset"],
            kw["cast_before_weight"],
        )
        dx, dw, db, sq = norm_backward_triton(*bwd, param_grads, example_offsets=offsets)
        dx_t, grads_t, sq_t = norm_backward_traceable(*bwd, param_grads, offsets)
        assert torch.equal(dx, dx_t)
        present = [g for g in (dw, db) if g is not None]
        assert grads_t.shape[0] == len(present)
        for g, g_t in zip(present, grads_t, strict=True):
            assert torch.equal(g, g_t)
        if present:
            assert torch.equal(sq, sq_t)


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = [(4, 37), (2, 64, 768), (2, 16, 2048 + 3), (2, 8, 4, 128), (2, 4, 16384), (1, 3, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_triton_matches_oracle(variant, shape, dtype):
    check_against_oracle(shape, dtype, variant, "cuda", "triton")
    check_against_oracle(shape, dtype, variant, "cuda", "triton", contiguous=False)


@pytest.mark.gpu
def test_gpu_triton_is_bitwise_deterministic():
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((8, 2048, 768), torch.bfloat16, variant, "cuda", seed=5)
    with use_backend("triton"):
        runs = [run_fused(x, weight, bias, dy, variant) for _ in range(3)]
    for key in runs[0]:
        assert all(torch.equal(runs[0][key], r[key]) for r in runs[1:]), key


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[5]], ids=["layernorm", "rmsnorm_llama"])
def test_gpu_cached_launch_matches_triton_launch(variant):
    """The direct launch of a cached compiled kernel gives the bits `kernel[grid]` gives,
    also when a later call's pointers are not 16-byte aligned (a different specialization)."""
    from hf_gns.kernels import norm_triton

    x, weight, bias, dy = make_inputs((4, 96, 200), torch.bfloat16, variant, "cuda", seed=7)
    misaligned = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view_as(x).copy_(x)
    assert misaligned.data_ptr() % 16 != 0
    results = {}
    for enabled in (False, True):
        norm_triton._CachedLauncher.enabled = enabled
        try:
            with use_backend("triton"):
                for name, inp in (("aligned", x), ("misaligned", misaligned), ("aligned2", x)):
                    results[enabled, name] = run_fused(inp, weight, bias, dy, variant)
        finally:
            norm_triton._CachedLauncher.enabled = True
    for name in ("aligned", "misaligned", "aligned2"):
        for key in results[False, name]:
            assert torch.equal(results[False, name][key], results[True, name][key]), (name, key)


@pytest.mark.gpu
def test_gpu_inductor_compiles_layernorm_with_bias():
    """Inductor refuses custom ops whose outputs alias each other; dγ and dβ must not share a buffer."""
    variant = VARIANTS[0]
    x, weight, bias, dy = make_inputs((2, 64, 768), torch.bfloat16, variant, "cuda", seed=3)
    for tensor in (x, weight, bias):
        tensor.requires_grad_()
    sink = new_sq_norm_sink(x)

    out_dtype = torch.promote_types(weight.dtype, x.dtype) if variant.out_promotes else x.dtype

    def step(x, weight, bias, sink):
        return fused_norm(x, weight, bias, EPS, out_dtype=out_dtype, sq_norm_sink=sink)

    torch._dynamo.reset()
    with use_backend("triton"):
        y = torch.compile(step, fullgraph=True)(x, weight, bias, sink)
        y.backward(dy.to(y.dtype))
        eager = run_fused(x.detach(), weight.detach(), bias.detach(), dy, variant)
    torch.testing.assert_close(y.detach(), eager["y"])
    torch.testing.assert_close(sink.grad[:, 0], eager["sq_w"])
    torch.testing.assert_close(bias.grad, eager["db"])


def test_cached_launcher_compiles_once_per_key_then_launches_directly(monkeypatch):
    """The direct-launch protocol on fakes (the real one needs CUDA): the first call of a key goes
    through `kernel[grid]`, later ones call the compiled kernel's `run` with the constexprs appended;
    a caller's `key=` replaces the per-argument key, and a new key compiles again."""
    import types

    from hf_gns.kernels import norm_triton

    runs, compiles = [], []

    class Compiled:
        function, packed_metadata = "function", "packed"

        def run(self, *args):
            runs.append(args)

        def launch_metadata(self, *args):  # only called when a launch hook is set
            raise AssertionError("no launch hook is set")

    class Kernel:
        params = [types.SimpleNamespace(name="BLOCK", is_constexpr=True)]

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiles.append((grid, args, kwargs))
                return Compiled()

            return launch

    class FakeCudaTensor:
        is_cuda = True
        device = types.SimpleNamespace(index=0)
        dtype = torch.float32

        def data_ptr(self):
            return 4096

    monkeypatch.setattr(norm_triton._CachedLauncher, "enabled", True)
    monkeypatch.setattr(norm_triton.triton.knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(norm_triton.triton.knobs.runtime, "launch_exit_hook", None)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    launcher = norm_triton._CachedLauncher(Kernel())
    x = FakeCudaTensor()
    for _ in range(3):
        launcher((2,), (x, 5), 4, BLOCK=64)
    assert len(compiles) == 1 and compiles[0][2] == {"BLOCK": 64, "num_warps": 4}
    assert [r[:4] for r in runs] == [(2, 1, 1, 7)] * 2
    assert runs[0][4:] == ("function", "packed", None, None, None, x, 5, 64)
    launcher((3,), (x, 5), 4, key=("shapes",), BLOCK=64)  # a caller's key: compiled once more
    launcher((3,), (x, 6), 4, key=("shapes",), BLOCK=64)
    assert len(compiles) == 2 and runs[-1][:4] == (3, 1, 1, 7) and runs[-1][-2:] == (6, 64)
    key = launcher.call_key((torch.zeros(4), 5, 1.0, None), 4, {"BLOCK": 64})
    assert key == (4, 64, (torch.float32, True), (False, False, True), float, None)
