"""SquaredNormSinks: hand-out, collection by the grad hook, recycling; compiled loops without
graph breaks or recompiles."""

from __future__ import annotations

import copy
import warnings

import torch
import torch._dynamo
from patching_tiny_models import BATCH, loss_of, tiny_batch, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import hf_gns
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


def test_two_forwards_before_one_backward_use_two_sinks_and_both_are_recycled():
    sinks, weight = SquaredNormSinks("norm"), torch.ones(4, requires_grad=True)
    x1, x2 = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    first, second = sinks.take(x1), sinks.take(x2)
    assert first is not second
    loss = fused_norm(x1, weight, rms=True, sq_norm_sink=first).square().sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two gradients in one backward pass are no error here
        (loss + fused_norm(x2, weight, rms=True, sq_norm_sink=second).square().sum()).backward()
    assert len(sinks.collected) == 2 and {id(sinks.spare), *map(id, sinks.pool)} == {id(first), id(second)}
    sinks.prepare(3, x1.device)
    reused = {id(sinks.take(x1)), id(sinks.take(x2))}
    assert reused == {id(first), id(second)}  # no new leaves


def _compiled_steps(arch: str, steps: int = 3):
    """A compiled training loop as the Trainer runs it (the whole model compiled, prepare_sinks
    before each forward); returns graphs compiled after each step, graph-break reasons, norms."""
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(arch)
    hf_gns.patch(model)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    frames, norms = [], []
    for step in range(steps):
        input_ids = tiny_batch(seed=step)
        hf_gns.patching.prepare_sinks(compiled, {"input_ids": input_ids})
        compiled(input_ids=input_ids, labels=input_ids).loss.backward()
        frames.append(backend.frame_count)
        norms.append({k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()})
        hf_gns.zero_stats(model)
        model.zero_grad(set_to_none=True)
    breaks = sorted(counters["graph_break"])
    torch._dynamo.reset()
    return frames, breaks, norms


def test_compiled_training_loop_has_no_graph_break_or_recompile():
    """Tiny Llama (whose unpatched compiled forward is one graph): patched, still one graph,
    compiled once in the first step and reused after (a graph break would add graphs, a
    recompilation would add them in later steps), and the norms are exact."""
    frames, breaks, norms = _compiled_steps("llama")
    assert breaks == [] and frames == [1, 1, 1]
    eager = tiny_model("llama")
    hf_gns.patch(eager)
    for step, compiled_norms in enumerate(norms):
        hf_gns.zero_stats(eager)
        loss_of(eager, tiny_batch(seed=step)).backward()
        expected = hf_gns.per_example_sq_norms(eager)
        assert compiled_norms.keys() == expected.keys()
        for name, values in expected.items():
            assert values.shape == (BATCH,)
            torch.testing.assert_close(compiled_norms[name], values, rtol=1e-4, atol=0, msg=name)
