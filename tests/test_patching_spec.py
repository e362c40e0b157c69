"""NormSpec: validation, output dtype rules, autocast, ε resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_gns import NormSpec
from hf_gns.patching.spec import AUTOCAST_FP32_DEVICES


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="output_dtype"):
        NormSpec(rms=True, output_dtype="weight")
    with pytest.raises(ValueError, match="autocast_op"):
        NormSpec(rms=True, autocast_op="group_norm")


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("input", torch.bfloat16), ("promote", torch.float32), ("float32", torch.float32)],
)
def test_output_dtype_rules(rule, expected):
    x, weight = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(4)
    assert NormSpec(rms=True, output_dtype=rule).result_dtype(x, weight) == expected


def test_autocast_rule_follows_the_devices_policy():
    """CPU autocast leaves layer_norm / rms_norm alone; CUDA autocast runs them in fp32."""
    assert "cpu" not in AUTOCAST_FP32_DEVICES["layer_norm"]
    assert "cuda" in AUTOCAST_FP32_DEVICES["layer_norm"]
    spec = NormSpec(rms=False, autocast_op="layer_norm")
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert spec.result_dtype(x, None) == nn.LayerNorm(4)(x).dtype == torch.bfloat16


def test_eps_none_is_the_compute_dtypes_machine_epsilon():
    spec = NormSpec(rms=True)
    assert spec.resolve_eps(1e-5, torch.zeros(1)) == 1e-5
    assert spec.resolve_eps(None, torch.zeros(1, dtype=torch.bfloat16)) == torch.finfo(torch.float32).eps
    assert spec.resolve_eps(None, torch.zeros(1, dtype=torch.float64)) == torch.finfo(torch.float64).eps


def test_describe_names_the_flavour():
    assert NormSpec(rms=True, weight_offset=1.0).describe() == "RMSNorm γ+1 out=input"
    llama = NormSpec(rms=True, cast_before_weight=True, output_dtype="promote")
    assert llama.describe() == "RMSNorm cast-x̂ out=promote"
