"""torch.compile of patched tiny models: same results as eager, no extra graphs or graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from patching_tiny_models import GraphCounter, loss_of, tiny_batch, tiny_model

import hf_gns


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(model, input_ids, call=None):
    """One forward/backward (through `call`, e.g. the compiled model, if given); returns
    loss, grads and per-example norms (after zeroing both)."""
    model.zero_grad(set_to_none=True)
    hf_gns.zero_stats(model)
    loss = loss_of(model, input_ids) if call is None else call(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()}


def _assert_same_step(actual, expected):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-6)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert actual[2].keys() == expected[2].keys()
    for name, values in expected[2].items():
        torch.testing.assert_close(actual[2][name], values, rtol=1e-4, atol=0, msg=name)


@pytest.mark.parametrize("arch", ["llama", "opt"])  # opt: flattened (B·T, D) norm inputs
def test_compiled_patched_model_matches_eager(arch):
    eager, compiled = tiny_model(arch), tiny_model(arch)
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    compiled_call = torch.compile(compiled, backend="aot_eager")
    # no eager warm-up; the batch size changes and comes back
    for input_ids in (
        tiny_batch(seed=1),
        tiny_batch(seed=2),
        tiny_batch(seed=3, batch=2),
        tiny_batch(seed=4),
    ):
        expected = _step(eager, input_ids)
        _assert_same_step(_step(compiled, input_ids, compiled_call), expected)


def _graphs_per_step(model, steps: int = 3) -> list[int]:
    """How many compiled graphs run in each training step."""
    graphs = GraphCounter()
    compiled = torch.compile(model, backend=graphs)
    counts = []
    for _ in range(steps):
        graphs.runs = 0
        compiled(input_ids=tiny_batch(), labels=tiny_batch()).loss.backward()
        counts.append(graphs.runs)
    return counts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patching_adds_no_graphs_from_the_first_step(arch):
    unpatched = _graphs_per_step(tiny_model(arch))
    torch._dynamo.reset()
    patched_model = tiny_model(arch)
    hf_gns.patch(patched_model)
    assert _graphs_per_step(patched_model) == unpatched


def test_no_graph_break_inside_patched_norms():
    model = tiny_model("llama")
    hf_gns.patch(model)
    loss_of(model, tiny_batch()).backward()  # sinks exist, as in any step after the first
    explanation = torch._dynamo.explain(lambda m: loss_of(m, tiny_batch()))(model)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_inductor_matches_eager():
    eager, compiled = tiny_model("llama"), tiny_model("llama")
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    compiled_call = torch.compile(compiled)
    input_ids = tiny_batch()
    expected = _step(eager, input_ids)
    for _ in range(2):  # the second step runs the compiled graph, not the first compile
        actual = _step(compiled, input_ids, compiled_call)
    _assert_same_step(actual, expected)
