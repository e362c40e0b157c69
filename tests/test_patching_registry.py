"""Registry: MRO lookup, the forward-override rule, duplicates, the decorator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_gns
from hf_gns.patching.registry import has_registered_base, registered_spec


class PlainRMSNorm(nn.Module):
    def __init__(self, dim: int = 16, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


@pytest.fixture
def registered():
    spec = hf_gns.NormSpec(rms=True)
    hf_gns.register_norm(PlainRMSNorm, spec)
    yield spec
    hf_gns.unregister_norm(PlainRMSNorm)


def test_builtin_classes_are_found_without_imports():
    assert registered_spec(nn.LayerNorm)[0] == hf_gns.NormSpec(rms=False, autocast_op="layer_norm")
    assert registered_spec(nn.RMSNorm)[0].autocast_op == "rms_norm"
    assert registered_spec(nn.Linear) is None


def test_subclasses_inherit_the_spec_through_the_mro(registered):
    class Child(PlainRMSNorm):
        pass

    assert registered_spec(Child) == (registered, PlainRMSNorm)


def test_a_subclass_with_its_own_forward_goes_to_the_probe(registered):
    class Different(PlainRMSNorm):
        def forward(self, x):
            return super().forward(x) * 2

    assert registered_spec(Different) is None
    assert has_registered_base(Different)


def test_registering_twice_is_an_error(registered):
    with pytest.raises(ValueError, match="already registered"):
        hf_gns.register_norm(PlainRMSNorm, hf_gns.NormSpec(rms=True))
    with pytest.raises(ValueError, match="already registered"):
        hf_gns.register_norm(nn.LayerNorm, hf_gns.NormSpec(rms=False))


def test_decorator_registers_and_returns_the_class():
    @hf_gns.register_norm(hf_gns.NormSpec(rms=True, weight_offset=1.0))
    class OffsetNorm(PlainRMSNorm):
        def forward(self, x):
            out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (out * (1.0 + self.weight.float())).to(x.dtype)

    try:
        assert isinstance(OffsetNorm, type)
        assert registered_spec(OffsetNorm)[0].weight_offset == 1.0
        report = hf_gns.patch(nn.Sequential(OffsetNorm()))
        assert [entry.source for entry in report.patched] == ["registry"]
    finally:
        hf_gns.unregister_norm(OffsetNorm)


def test_bad_registrations_are_refused():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        hf_gns.register_norm(int, hf_gns.NormSpec(rms=True))
    with pytest.raises(TypeError, match="NormSpec"):
        hf_gns.register_norm(PlainRMSNorm, {"rms": True})
    with pytest.raises(KeyError, match="was not registered"):
        hf_gns.unregister_norm(PlainRMSNorm)


def test_a_wrong_registration_is_caught_by_the_probe():
    hf_gns.register_norm(PlainRMSNorm, hf_gns.NormSpec(rms=False))  # it is an RMSNorm
    try:
        report = hf_gns.patch(nn.Sequential(PlainRMSNorm()))
    finally:
        hf_gns.unregister_norm(PlainRMSNorm)
    assert not report.patched
    assert report.skipped[0].reason.startswith("registered as PlainRMSNorm but probe mismatch")
