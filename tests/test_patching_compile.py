"""torch.compile of patched tiny models: same results as eager, no extra graphs or graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from patching_tiny_models import GraphCounter, loss_of, tiny_batch, tiny_model

import hf_gns
from hf_gns.patching.state import patched_states


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


# opt: flattened (B·T, D) norm inputs; falcon: FalconLinear on the per-example call (vmap), traced
@pytest.mark.parametrize("arch, targets", [("llama", "norms"), ("opt", "norms"), ("falcon", "all")])
def test_compiled_patched_model_matches_eager(arch, targets):
    eager, compiled = tiny_model(arch), tiny_model(arch)
    hf_gns.patch(eager, targets=targets)
    hf_gns.patch(compiled, targets=targets)
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


# cohere: its q/k norms (a (heads, head_dim) weight), and with targets="all" falcon's FalconLinear,
# run through the per-example call (vmap)
@pytest.mark.parametrize(
    "arch, targets", [("llama", "norms"), ("gpt2", "norms"), ("cohere", "norms"), ("falcon", "all")]
)
def test_patching_adds_no_graphs_from_the_first_step(arch, targets):
    unpatched = _graphs_per_step(tiny_model(arch))
    torch._dynamo.reset()
    patched_model = tiny_model(arch)
    hf_gns.patch(patched_model, targets=targets)
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


# ----------------------------------------------------------------------------- GPU


def _norm_case(documents: bool, rms: bool, bias: bool):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 4 * 96, 768) if documents else (4, 96, 768)
    x = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    weight = (1 + 0.5 * torch.randn(768, generator=gen)).to("cuda", torch.bfloat16)
    beta = (0.5 * torch.randn(768, generator=gen)).to("cuda", torch.bfloat16) if bias else None
    dy = torch.randn(shape, generator=gen).to("cuda", torch.bfloat16)
    offsets = torch.tensor([0, 50, 50, 211, 384], device="cuda") if documents else None
    return x, weight, beta, dy, offsets


@pytest.mark.gpu
@pytest.mark.parametrize("documents", [False, True], ids=["dense", "documents"])
@pytest.mark.parametrize("rms,bias", [(False, True), (True, False)], ids=["layernorm", "rmsnorm"])
def test_gpu_inductor_launches_the_norm_kernels_itself_with_the_eager_results(documents, rms, bias):
    """Inductor's code calls the Triton kernels directly (no hf_gns op dispatch), and every output
    equals the eager op's bit for bit (same kernels, same inputs)."""
    from torch._inductor.utils import run_and_get_code

    from hf_gns.kernels import fused_norm, new_sq_norm_sink

    x, weight, beta, dy, offsets = _norm_case(documents, rms, bias)
    n_examples = 4

    def forward(x, weight, beta, sink, offsets):
        return fused_norm(x, weight, beta, 1e-5, rms=rms, sq_norm_sink=sink, example_offsets=offsets)

    results, code = [], ""
    for compiled in (False, True):
        inputs = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, beta)]
        sink = new_sq_norm_sink(n_examples, "cuda")
        fn = torch.compile(forward, fullgraph=True) if compiled else forward

        def run(fn=fn, inputs=inputs, sink=sink):
            y = fn(*inputs, sink, offsets)
            y.backward(dy)
            return y.detach()

        if compiled:
            y, codes = run_and_get_code(run)
            code = "\n".join(codes)
        else:
            y = run()
        results.append([y, *(t.grad for t in inputs if t is not None), sink.grad])
    for name in ("_norm_fwd_kernel", "_reduce_partials_kernel"):
        assert name in code, f"{name} not launched by inductor"
    assert ("_norm_bwd_documents_kernel" if documents else "_norm_bwd_kernel") in code
    assert "torch.ops.hf_gns" not in code, "an hf_gns op is dispatched from the compiled graph"
    for expected, actual in zip(*results, strict=True):
        assert torch.equal(expected, actual)


def _compiled_steps(model, input_ids, patched: bool, steps=3):
    """(graph breaks, unique graphs) from dynamo's counters over `steps` compiled training steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    call = torch.compile(model)
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if patched:  # as GNSTrainer does before each forward: sinks made outside the graph
            hf_gns.patching.prepare_sinks(call, {"input_ids": input_ids})
        call(input_ids=input_ids, labels=input_ids).loss.backward()
        if patched:
            hf_gns.zero_stats(model)
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


@pytest.mark.gpu
@pytest.mark.parametrize("targets", ["norms", "all"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gpu_inductor_patched_model_adds_no_graph_break_or_recompile_and_gives_the_eager_norms(arch, targets):
    input_ids = tiny_batch().cuda()
    unpatched = _compiled_steps(tiny_model(arch).cuda(), input_ids, patched=False)
    patched_model = tiny_model(arch).cuda()
    hf_gns.patch(patched_model, targets=targets)
    assert _compiled_steps(patched_model, input_ids, patched=True) == unpatched
    eager, compiled = tiny_model(arch).cuda(), tiny_model(arch).cuda()
    hf_gns.patch(eager, targets=targets)
    hf_gns.patch(compiled, targets=targets)
    torch._dynamo.reset()
    compiled_call = torch.compile(compiled)
    for _ in range(2):  # the second step runs the compiled graphs
        expected = _step(eager, input_ids)
        actual = _step(compiled, input_ids, compiled_call)
    _assert_same_step(actual, expected)


@pytest.mark.gpu
def test_gpu_reduce_overhead_cuda_graphs_give_the_eager_norms():
    """torch.compile(mode="reduce-overhead") (CUDA graphs): the patched step replays with the
    eager step's results (sinks and statistics read before the next replay)."""
    input_ids = tiny_batch().cuda()
    eager, compiled = tiny_model("llama").cuda(), tiny_model("llama").cuda()
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    call = torch.compile(compiled, mode="reduce-overhead")
    for _ in range(4):  # recording, then replays
        expected = _step(eager, input_ids)
        _assert_same_step(_step(compiled, input_ids, call), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gpu_inductor_forward_with_triton_backward_gives_the_eager_norms(monkeypatch, arch):
    """HF_GNS_COMPILED_FORWARD=inductor: compiled graphs trace the forward's reference (fusable with
    its neighbours) and launch the Triton backward on its mean and rstd; results as eager's."""
    from hf_gns.kernels import norm_op

    monkeypatch.setattr(norm_op, "_COMPILED_TRITON_FORWARD", False)
    input_ids = tiny_batch().cuda()
    eager, compiled = tiny_model(arch).cuda(), tiny_model(arch).cuda()
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    call = torch.compile(compiled)
    expected = _step(eager, input_ids)
    actual, code = run_and_get_code(lambda: _step(compiled, input_ids, call))  # forward and backward
    _assert_same_step(actual, expected)
    source = "\n".join(code)
    assert "_norm_bwd_kernel" in source and "_norm_fwd_kernel" not in source


def _steps_of_several_forwards(model, call, batches_per_step) -> list[tuple]:
    """Steps whose loss sums the forwards of several batches (micro-batches before one backward):
    loss, grads and per-example norms of each step."""
    results = []
    for batches in batches_per_step:
        model.zero_grad(set_to_none=True)
        hf_gns.zero_stats(model)
        loss = sum(call(input_ids=ids, labels=ids).loss for ids in batches)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        norms = {k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()}
        results.append((loss.detach(), grads, norms))
    return results


def test_norms_of_a_shared_block_compile_whole_with_the_eager_norms():
    """Zamba's shared transformer block (one set of norm weights, called from two layers) takes the
    vector path: the model hook readies each forward's gradient-vector leaf outside the graph, so the
    compiled model runs one graph with no break, as unpatched (10 breaks a step before), and gives
    the eager results, also with two forwards before one backward (each has its own leaf)."""
    from torch._dynamo.utils import counters
    from zoo_models import build_tiny_model

    eager, compiled = build_tiny_model("zamba"), build_tiny_model("zamba")
    hf_gns.patch(eager)
    hf_gns.patch(compiled)
    vocab = eager.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    steps = [[torch.randint(0, vocab, (3, 8), generator=generator) for _ in range(n)] for n in (1, 2, 1)]
    expected = _steps_of_several_forwards(eager, eager, steps)
    counters.clear()
    actual = _steps_of_several_forwards(compiled, torch.compile(compiled, backend="aot_eager"), steps)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    shared = "model.layers.1.shared_transf.input_layernorm.weight"
    assert [step[2][shared].shape[0] for step in actual] == [3, 6, 3]  # B values per forward
    for got, want in zip(actual, expected):
        _assert_same_step(got, want)


def test_compiled_norm_guards_read_neither_the_shared_spec_nor_the_model_hook():
    """Dynamo checks a guard for every object a compiled forward reads before each call of the graph;
    an object reached from every norm (the spec of their class, the model hook, the class itself)
    costs an identity guard per norm on top, evaluated in Python. The compiled norm forward reads
    none of them, nor its routing (`compiled_norm_forward`)."""
    import logging

    lines = []

    class _Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    model = tiny_model("llama")
    hf_gns.patch(model)
    compiled_call = torch.compile(model, backend="aot_eager")
    guard_log = logging.getLogger("torch._dynamo.guards.__guards")
    handler = _Lines()
    torch._logging.set_logs(guards=True)
    guard_log.addHandler(handler)
    try:
        for _ in range(2):
            _step(model, tiny_batch(), compiled_call)
    finally:
        guard_log.removeHandler(handler)
        torch._logging.set_logs()
    guards = "\n".join(lines)
    assert guards.count("_hf_gns_state.sinks.spare, accessed_by") == 2 * 2 + 1  # every norm's sink
    for shared in ("_hf_gns_state.spec", "_hf_gns_state.model_hook", "_hf_gns_state.layout"):
        assert shared not in guards
    assert "_hf_gns_state.routing" not in guards
    classes = [line for line in lines if "LAMBDA_GUARD: type(" in line and "layernorm']) is type(" in line]
    assert classes == []  # no identity guard between the norms' classes


# opt: its layers' final_layer_norm gets a flattened (B·T, D) input, the others (B, T, D)
@pytest.mark.parametrize("arch, short", [("llama", {True}), ("opt", {True, False})])
def test_compiled_norms_take_the_short_path_where_examples_are_input_rows(monkeypatch, arch, short):
    """(B, T, D) norm inputs take `compiled_norm_forward`, flattened (B·T, D) ones the general path
    (`test_compiled_patched_model_matches_eager` checks both against eager)."""
    from hf_gns.patching import forward

    taken = []

    def recording(module, x, state):
        y = short_path(module, x, state)
        taken.append(y is not None)
        return y

    short_path = forward.compiled_norm_forward
    monkeypatch.setattr(forward, "compiled_norm_forward", recording)
    model = tiny_model(arch)
    hf_gns.patch(model)
    _step(model, tiny_batch(), torch.compile(model, backend="aot_eager"))
    assert set(taken) == short


def test_compiled_forward_without_grad_gives_the_eager_output_and_takes_no_sink():
    """Evaluation and generation under torch.compile: the short path runs the fused op without a sink."""
    model = tiny_model("llama")
    hf_gns.patch(model)
    input_ids = tiny_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        actual = torch.compile(model, backend="aot_eager")(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    states = patched_states(model)
    assert len(states) == 5 and all(state.sinks.spare is None for _, state in states)
