"""ModelForwardHook: batch size from the model's inputs, regrouping flattened rows, sinks made ahead."""

from __future__ import annotations

import pytest
import torch
from patching_tiny_models import tiny_batch, tiny_model
from torch import nn
from torch._dynamo.utils import counters

import hf_gns
from hf_gns.patching.model_hook import HOOK_ATTRIBUTE, HOOK_RUNS_EAGERLY, ModelForwardHook


def test_batch_size_comes_from_input_ids_inputs_embeds_or_the_first_tensor():
    hook, model = ModelForwardHook(), nn.Identity()
    hook(model, (), {"input_ids": torch.zeros(3, 7, dtype=torch.long)})
    assert hook.batch_size == 3
    hook(model, (), {"inputs_embeds": torch.zeros(5, 7, 4)})
    assert hook.batch_size == 5
    hook(model, (torch.zeros(2, 4),), {})
    assert hook.batch_size == 2
    hook(model, (), {"use_cache": False})  # nothing to read: keep the last value
    assert hook.batch_size == 2


def test_only_flattened_two_dimensional_inputs_are_regrouped():
    hook = ModelForwardHook()
    hook.batch_size = 3
    flat = torch.arange(3 * 4 * 2.0).reshape(12, 2)
    grouped = hook.group_rows(flat)
    assert grouped.shape == (3, 4, 2) and torch.equal(grouped[1], flat[4:8])
    for untouched in (torch.zeros(3, 2), torch.zeros(7, 2), torch.zeros(6, 4, 2)):
        assert hook.group_rows(untouched) is untouched


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(x).sum()


def test_sinks_are_ready_before_the_forward_when_grad_is_enabled():
    model = _Model()
    hf_gns.patch(model)
    routing = model.norm._hf_gns_state.routing
    routing.mode, routing.vectors = "single", None  # as after its first forward (one call: the sink path)
    sinks = model.norm._hf_gns_state.sinks
    with torch.no_grad():
        model(torch.randn(3, 2, 4))
    assert sinks.spare is None
    seen = []
    model.norm.register_forward_pre_hook(lambda module, args: seen.append(sinks.has_spare(3, args[0].device)))
    model(torch.randn(3, 2, 4))  # the model hook ran first: the norm finds its sink ready
    # (an eager fused norm leaves it there: its backward hands the norms to `sinks.collect`;
    # a compiled forward, or a module on another route, takes it)
    assert seen == [True] and sinks.has_spare(3, torch.device("cpu"))


def test_prepare_sinks_readies_every_sink_before_the_forward_through_a_wrapper():
    model = _Model()
    hf_gns.patch(model)
    wrapper = nn.Sequential(model)  # e.g. DDP or a compiled module around the patched model
    sinks = model.norm._hf_gns_state.sinks
    with torch.no_grad():
        hf_gns.patching.prepare_sinks(wrapper, {"input_ids": torch.zeros(3, 2, dtype=torch.long)})
    assert sinks.spare is None  # nothing to prepare without grad
    hf_gns.patching.prepare_sinks(wrapper, {"input_ids": torch.zeros(3, 2, dtype=torch.long)})
    ready = sinks.spare
    assert ready is not None and ready.shape == (3, 2) and ready.requires_grad
    hf_gns.patching.prepare_sinks(wrapper, {"input_ids": torch.zeros(3, 2, dtype=torch.long)})
    assert sinks.spare is ready  # already ready: nothing new
    wrapper(torch.randn(3, 2, 4)).backward()
    assert sinks.collected[0].shape == (3, 2) and sinks.spare is ready  # used, then recycled


def test_the_hook_tells_each_sink_the_examples_of_the_forward_when_they_are_rows():
    model = _Model()
    hf_gns.patch(model)
    sinks = model.norm._hf_gns_state.sinks
    hf_gns.patching.prepare_sinks(model, {"input_ids": torch.zeros(3, 2, dtype=torch.long)})
    assert sinks.forward_examples == 3
    restarting = torch.tensor([[0, 1, 2, 0, 1, 0]])  # a padding-free row of three documents
    ids = torch.zeros(1, 6, dtype=torch.long)
    hf_gns.patching.prepare_sinks(model, {"input_ids": ids, "position_ids": restarting})
    assert sinks.forward_examples is None  # the compiled norm forward then takes the general path
    model(torch.randn(5, 2, 4)).backward()  # the model's pre-hook
    assert sinks.forward_examples == 5


def test_the_hook_tells_no_examples_to_modules_whose_calls_take_per_example_vectors():
    """The compiled norm forward reads no routing: `forward_examples` None sends such calls (a module
    called twice per forward, parameters shared) to the general path, which sums their vectors."""
    model = _Model()
    hf_gns.patch(model)
    state = model.norm._hf_gns_state
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long)}
    for mode, told in (("discover", 3), ("single", 3), ("multi", None), ("shared", None)):
        state.routing.mode = mode
        hf_gns.patching.prepare_sinks(model, batch)
        assert state.sinks.forward_examples == told, mode


def test_padding_free_batches_count_documents_and_ordinary_batches_do_not_look():
    hook, model = ModelForwardHook(), nn.Identity()
    ids = torch.zeros(1, 8, dtype=torch.long)
    restarting = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert hook.read_batch((), {"input_ids": ids, "position_ids": restarting}) == 3
    assert hook.example_offsets.tolist() == [0, 3, 5, 8] and hook.token_shape == (1, 8)
    assert hook.read_batch((), {"input_ids": ids, "cu_seq_lens_q": torch.tensor([0, 6, 8])}) == 2
    assert hook.group_rows(torch.zeros(8, 4)).shape == (8, 4)  # documents: never regrouped by B
    assert hook.read_batch((), {"input_ids": torch.zeros(3, 8, dtype=torch.long)}) == 3
    assert hook.example_offsets is None
    with torch.no_grad():
        assert hook.read_batch((), {"input_ids": ids, "position_ids": restarting}) == 1
    hook(model, (), {"input_ids": ids, "position_ids": torch.arange(8)[None]})  # one document per row
    assert hook.example_offsets is None and hook.batch_size == 1


def _eager_sq_norms(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    hf_gns.patch(model)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return hf_gns.per_example_sq_norms(model)


def _assert_norms_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, values in expected.items():
        torch.testing.assert_close(actual[name], values, rtol=1e-5, atol=0, msg=name)


def test_compiled_model_runs_the_hook_as_python_not_as_a_dynamo_frame():
    """`torch.compile(model)` (the Trainer's torch_compile) meets the pre-hook as a frame of its own:
    it runs as plain Python (no guard check on every sink each step), so Dynamo converts one frame,
    the forward; the hook makes the sinks itself without a graph break, even with no prepare_sinks;
    and it counts every forward."""
    if not HOOK_RUNS_EAGERLY:
        pytest.skip("this torch has no Dynamo frame strategies: the hook is traced as its own frame")
    input_ids = tiny_batch()
    model = tiny_model("llama")
    hf_gns.patch(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        compiled(input_ids=input_ids, labels=input_ids).loss.backward()
        norms = {k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()}
        hf_gns.zero_stats(model)
        model.zero_grad(set_to_none=True)
    assert dict(counters["frames"]) == {"total": 1, "ok": 1} and dict(counters["graph_break"]) == {}
    assert model.__dict__[HOOK_ATTRIBUTE][0].forward_index == 2
    _assert_norms_equal(norms, _eager_sq_norms(input_ids))
    torch._dynamo.reset()


def test_a_compiled_step_that_inlines_the_model_call_still_traces_the_hook_without_a_break():
    """Frame strategies apply only to frames Dynamo starts on: a compiled training step that calls
    the model inlines the hook into its graph, as before (fullgraph=True: a break would raise)."""
    input_ids = tiny_batch()
    model = tiny_model("llama")
    hf_gns.patch(model)
    torch._dynamo.reset()

    @torch.compile(backend="eager", fullgraph=True)
    def loss_of_step(ids):
        return model(input_ids=ids, labels=ids).loss

    for _ in range(2):
        hf_gns.patching.prepare_sinks(model, {"input_ids": input_ids})
        loss_of_step(input_ids).backward()
        norms = {k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()}
        hf_gns.zero_stats(model)
        model.zero_grad(set_to_none=True)
    _assert_norms_equal(norms, _eager_sq_norms(input_ids))
    torch._dynamo.reset()
