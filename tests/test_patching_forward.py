"""The patched norm forward's helpers (`hf_gns/patching/forward.py`)."""

from __future__ import annotations

import torch
from torch import nn

from hf_gns.patching.forward import _bias_without_getattr, norm_bias


class _NoBias(nn.Module):  # HF's RMSNorms: no `bias` attribute at all
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class _BufferBias(_NoBias):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.full((4,), 2.0))


class _PlainBias(_NoBias):
    def __init__(self):
        super().__init__()
        self.__dict__["bias"] = torch.full((4,), 3.0)  # a plain attribute, as nn.Module never makes it


class _ClassNone(_NoBias):
    bias = None


class _PropertyBias(_NoBias):
    @property
    def bias(self):
        return self.weight * 5


def test_bias_read_from_the_dicts_is_the_bias_getattr_finds():
    """The compiled forward's lookup (no `nn.Module.__getattr__`, whose `hasattr` guard would run
    at every call of the graph) gives what `norm_bias` gives, for each place a bias can live."""
    for module, expected in (
        (_NoBias(), None),
        (_BufferBias(), 2.0),
        (_PlainBias(), 3.0),
        (_ClassNone(), None),
        (_PropertyBias(), 5.0),
        (nn.Linear(4, 4, bias=False), None),
    ):
        found, reference = _bias_without_getattr(module), norm_bias(module)
        if expected is None:
            assert found is None and reference is None, type(module).__name__
        else:
            assert torch.equal(found, reference) and found[0].item() == expected, type(module).__name__
