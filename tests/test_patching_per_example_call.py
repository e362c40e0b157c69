"""Norm kinds the fused op cannot express, through the per-example call: gated RMSNorms (gate
before or after the norm, grouped or not), grouped RMSNorm, multi-head LayerNorm on 4-D inputs,
ZAYA's QK norm (a parameter named `temp`), Nemotron's LayerNorm1P with bf16 weights.

Each is checked inside a tiny model against the micro-batch oracle (one example at a time
through an unpatched copy, plain fp32 autograd): outputs equal the unpatched module's, and
per-example squared norms match within relative 1e-4 (measured: ≤ 1e-6); with bf16 weights
within 2e-2 (the oracle rounds in bf16 too).
"""

from __future__ import annotations

import copy
import importlib
import types

import pytest
import torch
from torch import nn

import hf_gns

BATCH, SEQ, WIDTH = 3, 5, 16


def _hf_class(module_name: str, class_name: str):
    """A transformers class, or skip where this transformers version does not ship it."""
    try:
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    except ImportError:
        pytest.skip(f"transformers has no {module_name}")
    if not hasattr(module, class_name):
        pytest.skip(f"transformers.{module_name} has no {class_name}")
    return getattr(module, class_name)


class _Model(nn.Module):
    """Embeds ids, runs the norm on (B, T, ...) inputs (with a gate / second input when it takes one)."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...], n_inputs: int = 1):
        super().__init__()
        width = int(torch.tensor(shape).prod())
        self.embed = nn.Embedding(32, width * n_inputs)
        self.norm, self.shape, self.n_inputs = norm, shape, n_inputs

    def forward(self, input_ids):
        inputs = self.embed(input_ids).chunk(self.n_inputs, dim=-1)
        outputs = self.norm(*(x.reshape(*input_ids.shape, *self.shape) for x in inputs))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return sum(out.float().reshape(*input_ids.shape, -1).sin().sum(-1) for out in outputs)  # (B, T)


def _perturb(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator).to(param))


def _loss(model, input_ids):
    return model(input_ids).mean(-1).sum()  # Σ_b (example b's mean over tokens)


def _check_against_oracle(model: _Model, rtol: float = 1e-4, output_tol: float = 1e-5):
    """Patch `model`; outputs equal, per-example norms of the norm's parameters match the oracle."""
    _perturb(model)
    reference = copy.deepcopy(model)
    device = next(model.parameters()).device
    input_ids = torch.randint(0, 32, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    report = hf_gns.patch(model)
    (entry,) = report.patched
    assert not report.uncovered
    # the module's own ops, batched by vmap: equal in fp32; in bf16 vmap's batching rules round in
    # other places (F.layer_norm with a batched weight: affine after a rounded x̂)
    torch.testing.assert_close(model(input_ids), reference(input_ids), rtol=output_tol, atol=output_tol)
    _loss(model, input_ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    names = [f"norm.{name}" for name, p in model.norm.named_parameters() if p.requires_grad]
    assert sorted(norms) == sorted(names) == sorted(report.tracked_parameters)
    params = dict(reference.named_parameters())
    for b in range(BATCH):
        reference.zero_grad()
        _loss(reference, input_ids[b : b + 1]).backward()
        for name in names:
            expected = params[name].grad.double().square().sum()
            torch.testing.assert_close(norms[name][b].double(), expected, rtol=rtol, atol=0.0, msg=name)
    grads = {name: p.grad for name, p in model.named_parameters()}
    reference.zero_grad()
    _loss(reference, input_ids).backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=10 * output_tol, atol=output_tol, msg=name)
    return entry


def test_mamba2_gated_rmsnorm_gate_before_norm_grouped():
    norm_class = _hf_class("mamba2", "MambaRMSNormGated")
    entry = _check_against_oracle(_Model(norm_class(WIDTH, group_size=WIDTH // 4), (WIDTH,), n_inputs=2))
    assert entry.flavour == "per-example call of its own forward (vmap)" and entry.source == "probe"


def test_qwen3_next_gated_rmsnorm_gate_after_norm():
    norm_class = _hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    _check_against_oracle(_Model(norm_class(WIDTH), (WIDTH,), n_inputs=2))


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_falcon_h1_gated_rmsnorm_with_groups(norm_before_gate):
    norm_class = _hf_class("falcon_h1", "FalconH1RMSNormGated")
    norm = norm_class(WIDTH, n_groups=2, norm_before_gate=norm_before_gate)
    _check_against_oracle(_Model(norm, (WIDTH,), n_inputs=2))


def test_grouped_rmsnorm():
    norm_class = _hf_class("qwen4_exp", "Qwen4ExpTextRMSNorm")
    _check_against_oracle(_Model(norm_class(WIDTH, group_size=4), (WIDTH,)))


def test_xlstm_multi_head_layernorm_on_4d_input():
    norm_class = _hf_class("xlstm", "xLSTMMultiHeadLayerNorm")
    _check_against_oracle(
        _Model(norm_class(num_heads=2, head_dim=WIDTH // 2, use_bias=True), (2, WIDTH // 2))
    )


def test_zaya_qk_norm_parameter_named_temp():
    norm_class = _hf_class("zaya", "ZayaQKNorm")
    config = types.SimpleNamespace(head_dim=8, num_key_value_heads=2)
    entry = _check_against_oracle(_Model(norm_class(config), (2, 8), n_inputs=2))
    assert entry.tracked == ("norm.temp",)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nemotron_layernorm1p_fused_for_fp32_weights_per_example_call_for_bf16(dtype):
    norm_class = _hf_class("nemotron", "NemotronLayerNorm1P")
    torch.manual_seed(0)  # bf16 rounding: about 1 initialization in 30 misses rtol 2e-2 (seed 27)
    model = _Model(norm_class(WIDTH), (WIDTH,)).to(dtype)
    # bf16: the model's own bf16 rounding in both the patched and the oracle runs, so still tight
    bf16 = dtype == torch.bfloat16
    entry = _check_against_oracle(model, rtol=2e-2 if bf16 else 1e-4, output_tol=5e-2 if bf16 else 1e-5)
    assert entry.flavour.startswith("LayerNorm γ+1 out=input for float32, float64 weights, else per-example")
    assert hf_gns.patching.forward.PATCH_ATTRIBUTE in model.norm.__dict__
    assert model.norm.__dict__["_hf_gns_state"].uses_call(model.norm) == (dtype == torch.bfloat16)


class _BatchMixingNorm(nn.Module):
    """Looks like a norm but centres over the batch: no per-example call can reproduce it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x, gate):
        return (x - x.mean(0, keepdim=True)) * self.weight * gate


def test_modules_whose_examples_interact_are_refused():
    report = hf_gns.patch(_Model(_BatchMixingNorm(), (WIDTH,), n_inputs=2))
    (skipped,) = report.skipped
    assert "per-example call: the per-example call does not reproduce the forward" in skipped.reason


class _SequenceFirst(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.embed, self.norm = nn.Embedding(32, 2 * WIDTH), norm

    def forward(self, input_ids):
        x, gate = self.embed(input_ids).transpose(0, 1).chunk(2, dim=-1)  # (T, B, D)
        return self.norm(x, gate).sum()


def test_sequence_first_input_fails_loudly():
    norm_class = _hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    model = _SequenceFirst(norm_class(WIDTH))
    hf_gns.patch(model)
    with pytest.raises(RuntimeError, match=r"'norm' got an input of shape \(5, 3, 16\) whose dim 0 is not"):
        model(torch.zeros(BATCH, SEQ, dtype=torch.long))
    with torch.no_grad():  # nothing to measure: the module's own forward
        model(torch.zeros(BATCH, SEQ, dtype=torch.long))


def test_unpatch_restores_the_class_forward():
    norm_class = _hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    model = _Model(norm_class(WIDTH), (WIDTH,), n_inputs=2)
    modules, keys = list(model.named_modules()), list(model.state_dict())
    hf_gns.patch(model)
    # the class-forward wrapper is made as patch binds (not in a compiled forward), outside the
    # module tree and the state_dict
    assert "_hf_gns_class_forward" in model.norm.__dict__
    assert list(model.named_modules()) == modules and list(model.state_dict()) == keys
    assert hf_gns.unpatch(model) == 1
    assert (
        not any(key.startswith("_hf_gns") for key in model.norm.__dict__)
        and "forward" not in model.norm.__dict__
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_example_call_and_per_dtype_route_on_cuda(dtype):
    """On CUDA: a gated norm and Nemotron's LayerNorm1P against the micro-batch oracle, both on the
    per-example call. LayerNorm1P takes the call route for fp32 weights too on CUDA (the fused op on
    CPU): its forward tests `torch.is_autocast_enabled()`, which is CUDA's autocast, and under it
    casts 1+γ to bf16 before `F.layer_norm`; the probe's CUDA autocast configuration sees that and
    the fused op (1+γ in fp32) does not reproduce it, and fp32 weights under autocast are how mixed
    precision trains. (H200, 2026-12-02: `uses_call` True for fp32, the oracle checks passing.)"""
    bf16 = dtype == torch.bfloat16
    # bf16 against a bf16 oracle: |dγ_b|² sums T products rounded to bf16 on both sides. Over 30 seeds
    # (CPU, bf16, this body) LayerNorm1P's worst relative gap was 3.0e-2; rtol 2e-2 failed once in the
    # H200's GPU suite under -n 8 (2026-12-03), unseeded (passed alone twice)
    tolerances = dict(rtol=5e-2, output_tol=5e-2) if bf16 else {}
    torch.manual_seed(0)
    gated = _hf_class("qwen3_next", "Qwen3NextRMSNormGated")
    _check_against_oracle(_Model(gated(WIDTH), (WIDTH,), n_inputs=2).to("cuda", dtype), **tolerances)
    nemotron = _hf_class("nemotron", "NemotronLayerNorm1P")
    model = _Model(nemotron(WIDTH), (WIDTH,)).to("cuda", dtype)
    _check_against_oracle(model, **tolerances)
    assert model.norm.__dict__["_hf_gns_state"].uses_call(model.norm)


class _TupleArgument(nn.Module):
    """Takes per-example tensors inside a tuple (as attention takes `position_embeddings=(cos, sin)`)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH))

    def forward(self, x, pair, *, shift=None):
        cos, sin = pair
        return x * self.weight * cos + sin + shift["bias"]


def test_per_example_tensors_inside_tuples_and_dicts_go_with_their_example():
    from hf_gns.patching.per_example_call import per_example_call

    torch.manual_seed(0)
    module = _TupleArgument().double()
    x, cos, sin, bias = (torch.randn(BATCH, SEQ, WIDTH, dtype=torch.float64) for _ in range(4))
    sink = torch.zeros(BATCH, 2, requires_grad=True)
    y = per_example_call(module, (x, (cos, sin)), {"shift": {"bias": bias}}, ("weight", None), sink, BATCH)
    torch.testing.assert_close(y, module(x, (cos, sin), shift={"bias": bias}))
    y.square().sum().backward()
    for b in range(BATCH):
        one = module(x[b : b + 1], (cos[b : b + 1], sin[b : b + 1]), shift={"bias": bias[b : b + 1]})
        (grad,) = torch.autograd.grad(one.square().sum(), module.weight)
        torch.testing.assert_close(sink.grad[b, 0].double(), grad.square().sum(), rtol=1e-6, atol=0)
