"""The numerical probe: finds each flavour, refuses look-alikes whose math differs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_gns import NormSpec
from hf_gns.patching.detect import find_eps_attr, unsupported_reason
from hf_gns.patching.probe import FP32_WEIGHT_DTYPES, fallback_candidates, probe_norm

WIDTH = 24


class LlamaLikeNorm(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH))
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class GemmaLikeNorm(LlamaLikeNorm):
    def forward(self, h):
        out = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (out * (1.0 + self.weight.float())).type_as(h)


class Fp32OutputNorm(LlamaLikeNorm):
    def forward(self, h):
        h = h.float()
        return self.weight.float() * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class LayerNorm1P(nn.LayerNorm):
    """An nn.LayerNorm subclass with γ+1 (its own forward, so not nn.LayerNorm's spec)."""

    def forward(self, x):
        weight, bias = self.weight.float() + 1.0, self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RoundedLayerNorm1P(nn.LayerNorm):
    """NemotronLayerNorm1P-like: γ+1 is computed in the weight dtype, so bf16 weights round it."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class StdNorm(LlamaLikeNorm):
    """Divides by (std + ε), not sqrt(var + ε): close, but not the same function."""

    def forward(self, h):
        return (
            self.weight * (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + self.variance_epsilon)
        )


class HardCodedEpsNorm(LlamaLikeNorm):
    def forward(self, h):
        dtype = h.dtype
        h = h.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-3)).to(dtype)


class TupleNorm(LlamaLikeNorm):
    def forward(self, h):
        return super().forward(h), h


def _probe(module):
    return probe_norm(module, fallback_candidates(), find_eps_attr(module))


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (LlamaLikeNorm(), NormSpec(rms=True, cast_before_weight=True, output_dtype="promote")),
        (GemmaLikeNorm(), NormSpec(rms=True, weight_offset=1.0)),
        (Fp32OutputNorm(), NormSpec(rms=True, output_dtype="float32")),
        (LayerNorm1P(WIDTH), NormSpec(rms=False, weight_offset=1.0)),
    ],
    ids=["llama", "gemma", "fp32-output", "layernorm-1p"],
)
def test_probe_finds_the_flavour(module, expected):
    assert unsupported_reason(module) is None
    assert _probe(module).spec == expected


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (StdNorm(), "probe mismatch"),
        (HardCodedEpsNorm(), "probe mismatch"),
        (TupleNorm(), "forward returns tuple"),
    ],
    ids=["std", "hard-coded-eps", "tuple"],
)
def test_probe_refuses_look_alikes(module, reason):
    result = _probe(module)
    assert result.spec is None and result.reason.startswith(reason), result.reason


def test_probe_accepts_a_spec_for_the_weight_dtypes_where_it_matches():
    # exact with fp32 weights, but the fused op does not round γ+1 to bf16 as the module does with
    # bf16 weights: the spec serves fp32/fp64 weights only (the others take the per-example call)
    result = _probe(RoundedLayerNorm1P(WIDTH))
    assert result.spec == NormSpec(rms=False, weight_offset=1.0)
    assert result.dtypes == FP32_WEIGHT_DTYPES
    assert result.reason.startswith("probe mismatch") and "bfloat16 weight" in result.reason


def test_probe_checks_registered_specs_in_bf16_too():
    result = probe_norm(LlamaLikeNorm(), [NormSpec(rms=True, output_dtype="promote")], "variance_epsilon")
    assert result.spec is None and "bfloat16" in result.reason  # x̂ rounding only shows in bf16


def test_torch_rmsnorm_with_default_eps_is_accepted():
    module = nn.RMSNorm(WIDTH)  # eps=None: machine epsilon of the compute dtype
    assert probe_norm(module, [NormSpec(rms=True, autocast_op="rms_norm")], "eps").spec is not None


def test_probe_leaves_module_and_global_rng_untouched():
    module = GemmaLikeNorm()
    weight = module.weight.detach().clone()
    state = torch.random.get_rng_state()
    _probe(module)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(module.weight, weight)


class TwoInputNorm(LlamaLikeNorm):
    def forward(self, h, residual=None):
        return super().forward(h if residual is None else h + residual)


class PerHeadNorm(LlamaLikeNorm):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, WIDTH))


class NoEpsNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, h):
        return F.layer_norm(h, (WIDTH,), self.weight, None, 1e-5)


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (TwoInputNorm(), "forward takes more than one input"),
        (PerHeadNorm(), "2-D weight (4, 24)"),
        (NoEpsNorm(), "no ε attribute"),
        (nn.LayerNorm(WIDTH, elementwise_affine=False), "no learnable weight"),
        (nn.GroupNorm(2, WIDTH), "GroupNorm normalizes over other dims"),
    ],
    ids=["two-inputs", "per-head", "no-eps", "no-weight", "groupnorm"],
)
def test_structural_checks_explain_what_is_unsupported(module, reason):
    assert unsupported_reason(module).startswith(reason)


def test_meta_weights_are_refused_with_advice():
    with torch.device("meta"):
        module = LlamaLikeNorm()
    assert _probe(module).reason.startswith("weights are on the meta device")
