"""SquaredNormSinks: hand-out, collection by the grad hook, recycling."""

from __future__ import annotations

import copy

import torch

from hf_gns import fused_norm
from hf_gns.patching.sinks import SquaredNormSinks


def _backward_through(sinks: SquaredNormSinks, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    sink = sinks.take(x)
    fused_norm(x, weight, rms=True, sq_norm_sink=sink).square().sum().backward()
    return sink


def test_grads_are_collected_in_order_and_the_sink_is_recycled():
    sinks, weight = SquaredNormSinks("norm"), torch.ones(4, requires_grad=True)
    first = _backward_through(sinks, torch.randn(3, 5, 4), weight)
    assert first.grad is None and sinks.spare is first  # moved out, then recycled
    second = _backward_through(sinks, torch.randn(3, 5, 4), weight)
    assert second is first
    assert [values.shape for values in sinks.collected] == [(3, 2), (3, 2)]
    assert not torch.equal(sinks.collected[0], sinks.collected[1])
    sinks.clear()
    assert sinks.collected == [] and sinks.spare is first


def test_a_different_batch_size_gets_a_new_sink():
    sinks, weight = SquaredNormSinks("norm"), torch.ones(4, requires_grad=True)
    first = _backward_through(sinks, torch.randn(3, 4), weight)
    second = _backward_through(sinks, torch.randn(2, 4), weight)
    assert second is not first and second.shape == (2, 2)


def test_sinks_without_backward_are_not_collected():
    sinks = SquaredNormSinks("norm")
    sinks.take(torch.randn(3, 4))
    assert sinks.collected == [] and sinks.spare is None


def test_a_deep_copy_starts_empty():
    sinks, weight = SquaredNormSinks("norm"), torch.ones(4, requires_grad=True)
    _backward_through(sinks, torch.randn(3, 4), weight)
    clone = copy.deepcopy(sinks)
    assert clone.collected == [] and clone.spare is None and clone.name == "norm"
