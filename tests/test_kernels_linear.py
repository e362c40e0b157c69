"""Per-example norms of linear and embedding layers: the math (`linear_reference`), the cost
model (`linear_cost`) and the autograd ops (`linear_op`) against loop-over-examples oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_runs_here

from hf_gns.kernels import new_sq_norm_sink, use_backend
from hf_gns.kernels.linear_cost import GHOST_MEMORY_CAP_BYTES, choose_linear_method, simultaneous_min_seq
from hf_gns.kernels.linear_op import embedding_sq_norm_tap, linear_with_sq_norms
from hf_gns.kernels.linear_reference import (
    embedding_sq_norms,
    linear_bias_sq_norms,
    linear_weight_grad_simultaneous,
    linear_weight_sq_norms_ghost,
    sum_and_sq_norms_reference,
    tied_rows,
)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loop_weight_sq_norms(inputs, grad_out):
    """|G_bᵀ A_b|², one example at a time, fp64."""
    return torch.stack([(g.t().double() @ a.double()).square().sum() for a, g in zip(inputs, grad_out)])


@pytest.mark.parametrize("seq", [1, 2, 7])
def test_ghost_and_simultaneous_norms_match_the_loop(seq):
    inputs, grad_out = _randn(4, seq, 5, seed=1), _randn(4, seq, 3, seed=2)
    expected = _loop_weight_sq_norms(inputs, grad_out)
    torch.testing.assert_close(linear_weight_sq_norms_ghost(inputs, grad_out).double(), expected)
    weight_grad, sq_norms = linear_weight_grad_simultaneous(inputs, grad_out, torch.float64)
    torch.testing.assert_close(sq_norms.double(), expected)
    torch.testing.assert_close(weight_grad, grad_out.flatten(0, 1).t() @ inputs.flatten(0, 1))


def test_simultaneous_in_chunks_of_one_row_gives_the_same_gradient_and_norms():
    inputs, grad_out = _randn(3, 6, 5, seed=3), _randn(3, 6, 4, seed=4)
    whole = linear_weight_grad_simultaneous(inputs, grad_out, torch.float64)
    one_row = 3 * 5 * inputs.element_size()  # bytes of one output row's per-example gradients
    chunked = linear_weight_grad_simultaneous(inputs, grad_out, torch.float64, chunk_bytes=one_row)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    transposed, _ = linear_weight_grad_simultaneous(inputs, grad_out, torch.float64, transposed=True)
    torch.testing.assert_close(transposed, whole[0].t())
    # 5 output rows (40-byte rows of G: not 16-byte aligned): chunks of Gᵀ are copied contiguous
    odd = _randn(3, 6, 5, seed=5)
    whole = linear_weight_grad_simultaneous(inputs, odd, torch.float64)
    chunked = linear_weight_grad_simultaneous(inputs, odd, torch.float64, chunk_bytes=2 * 3 * (5 + 6) * 8)
    torch.testing.assert_close(whole[0], odd.flatten(0, 1).t() @ inputs.flatten(0, 1))
    torch.testing.assert_close(whole[1].double(), _loop_weight_sq_norms(inputs, odd))
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])


def test_bias_sq_norms_sum_each_example_over_its_rows():
    grad_out = _randn(3, 4, 2, seed=5)
    expected = torch.stack([g.sum(0).square().sum() for g in grad_out])
    torch.testing.assert_close(linear_bias_sq_norms(grad_out).double(), expected)


def test_embedding_sq_norms_add_repeated_ids_before_squaring_and_skip_padding():
    ids = torch.tensor([[3, 1, 3, 0, 3], [2, 2, 2, 2, 2], [0, 0, 4, 1, 2]])
    grad_out = _randn(3, 5, 4, seed=6)
    for padding_idx in (None, 0):
        expected = []
        for b in range(3):
            rows = torch.zeros(5, 4, dtype=torch.float64).index_add_(0, ids[b], grad_out[b])
            if padding_idx is not None:
                rows[padding_idx] = 0
            expected.append(rows.square().sum())
        got = embedding_sq_norms(ids, grad_out, num_embeddings=5, padding_idx=padding_idx)
        torch.testing.assert_close(got.double(), torch.stack(expected))
    # the naive per-token sum would be wrong here: example 1 looks up one row five times
    naive = grad_out[1].square().sum()
    assert not torch.isclose(embedding_sq_norms(ids, grad_out, 5)[1].double(), naive, rtol=1e-3)


def test_tied_rows_are_the_head_gradient_rows_at_the_ids():
    inputs, grad_out = _randn(2, 3, 4, seed=7), _randn(2, 3, 6, seed=8)
    ids = torch.tensor([[5, 0, 5, 2], [1, 1, 3, 4]])
    per_example = torch.bmm(grad_out.transpose(1, 2), inputs)  # (B, V, K)
    expected = torch.stack([per_example[b, ids[b]] for b in range(2)])
    torch.testing.assert_close(tied_rows(inputs, grad_out, ids), expected)


def test_cost_model_crossover_and_memory_cap():
    assert simultaneous_min_seq(768, 768) == 24
    assert simultaneous_min_seq(768, 3072) == 31
    assert simultaneous_min_seq(768, 50257) == 34
    for in_features, out_features in [(768, 768), (768, 3072), (32, 128), (4096, 11008)]:
        crossover = simultaneous_min_seq(in_features, out_features)
        # the rule of DESIGN.md §2: simultaneous iff T² ≥ 1.5·K·L/(K + L)
        assert (
            crossover**2
            >= 1.5 * in_features * out_features / (in_features + out_features)
            > (crossover - 1) ** 2
        )
        assert choose_linear_method(8, crossover - 1, in_features, out_features) == "ghost"
        assert choose_linear_method(8, crossover, in_features, out_features) == "simultaneous"
    assert choose_linear_method(8, 1, 768, 768) == "ghost"  # 2-D inputs
    # huge layers where the rule says ghost, but the Gram matrices would not fit the cap
    big, seq, batch = 10**6, 800, 1024
    assert seq < simultaneous_min_seq(big, big)
    assert 2 * batch * seq * seq * 4 > GHOST_MEMORY_CAP_BYTES
    assert choose_linear_method(batch, seq, big, big) == "simultaneous"
    assert choose_linear_method(1, seq, big, big) == "ghost"
    assert choose_linear_method(8, 1024, 768, 768, requested="ghost") == "ghost"
    with pytest.raises(ValueError, match="linear method must be one of"):
        choose_linear_method(8, 4, 3, 3, requested="fast")


def _linear_step(method, transposed, x_shape, n_examples, seed=0):
    x = _randn(*x_shape, seed=seed, dtype=torch.float32).requires_grad_()
    weight = _randn(6, 5, seed=seed + 1, dtype=torch.float32)
    weight = (weight.t().contiguous() if transposed else weight).requires_grad_()
    bias = _randn(6, seed=seed + 2, dtype=torch.float32).requires_grad_()
    sink = new_sq_norm_sink(n_examples, "cpu")
    out = linear_with_sq_norms(x, weight, bias, sink, n_examples, method=method, transposed=transposed)
    upstream = _randn(*out.shape, seed=seed + 3, dtype=torch.float32)
    (out * upstream).sum().backward()
    return x, weight, bias, out, upstream, sink


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", ["simultaneous", "ghost", "auto"])
@pytest.mark.parametrize(
    "x_shape", [(3, 4, 5), (3, 5), (12, 5), (3, 2, 2, 5)], ids=["BTK", "BK", "flat", "4d"]
)
def test_linear_op_output_grads_and_norms(method, transposed, x_shape):
    x, weight, bias, out, upstream, sink = _linear_step(method, transposed, x_shape, n_examples=3)
    plain_weight = weight.detach().t() if transposed else weight.detach()
    xr = x.detach().clone().requires_grad_()
    wr = plain_weight.clone().requires_grad_()
    br = bias.detach().clone().requires_grad_()
    expected_out = F.linear(xr, wr, br)
    assert torch.allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    (expected_out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(weight.grad, wr.grad.t() if transposed else wr.grad)
    torch.testing.assert_close(bias.grad, br.grad)
    # oracle: example b's rows (batch-major) and their output gradients
    inputs = x.detach().double().reshape(3, -1, 5)
    grads = upstream.double().reshape(3, -1, 6)
    torch.testing.assert_close(
        sink.grad[:, 0].double(), _loop_weight_sq_norms(inputs, grads), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(sink.grad[:, 1].double(), grads.sum(1).square().sum(1), rtol=1e-5, atol=0)


def test_linear_op_is_bit_identical_to_the_module_forward():
    x = _randn(2, 3, 5, dtype=torch.float32)
    linear = torch.nn.Linear(5, 6)
    sink = new_sq_norm_sink(2, "cpu")
    assert torch.equal(linear_with_sq_norms(x, linear.weight, linear.bias, sink, 2), linear(x))


def test_embedding_tap_and_tied_head_give_the_norm_of_the_summed_contribution():
    """wte and lm_head share one (V, D) weight: the tap reports |E_b + G_bᵀA_b|², never a part."""
    vocab, width, batch = 7, 4, 3
    weight = _randn(vocab, width, seed=9, dtype=torch.float32).requires_grad_()
    ids = torch.tensor([[1, 2, 1, 0, 6], [3, 3, 3, 3, 3], [0, 4, 5, 6, 1]])
    mix = _randn(width, width, seed=10, dtype=torch.float32)

    def model(ids, weight, sinks=None):
        rows = F.embedding(ids, weight)  # (B, T, D)
        link = None
        if sinks is not None:
            rows, link = embedding_sq_norm_tap(rows, ids, sinks[0], vocab, with_link=True)
        hidden = torch.tanh(rows @ mix.to(rows.dtype))
        if sinks is None:
            logits = F.linear(hidden, weight)
        else:
            logits = linear_with_sq_norms(hidden, weight, None, sinks[1], batch, tied_link=(link, ids))
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(1, dims=1).flatten(), reduction="sum")

    sinks = (new_sq_norm_sink(batch, "cpu"), new_sq_norm_sink(batch, "cpu"))
    model(ids, weight, sinks).backward()
    expected = []
    for b in range(batch):
        (grad,) = torch.autograd.grad(model(ids[b : b + 1], weight.double()), weight)
        expected.append(grad.double().square().sum())
    torch.testing.assert_close(sinks[0].grad[:, 0].double(), torch.stack(expected), rtol=1e-5, atol=0)
    # the head's own part (what a per-module norm would report) is not the answer
    assert not torch.allclose(sinks[1].grad[:, 0].double(), torch.stack(expected), rtol=1e-2)


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_linear_op_under_bf16_autocast_matches_the_module_and_the_fp32_norms(method):
    x = _randn(3, 16, 8, seed=11, dtype=torch.float32).requires_grad_()
    linear = torch.nn.Linear(8, 12)
    upstream = _randn(3, 16, 12, seed=12, dtype=torch.float32).to(torch.bfloat16)
    sink = new_sq_norm_sink(3, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_with_sq_norms(x, linear.weight, linear.bias, sink, 3, method=method)
        expected = linear(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    out.backward(upstream)
    weight_grad, x_grad = linear.weight.grad.clone(), x.grad.clone()
    linear.weight.grad = x.grad = None
    expected.backward(upstream)
    assert weight_grad.dtype == torch.float32
    # Autocast's dW is the fp32-accumulated sum rounded once to bf16; the simultaneous dW sums
    # per-example gradients each rounded to bf16 (entries ~4 here, half an ulp = 0.008 each).
    torch.testing.assert_close(weight_grad, linear.weight.grad, rtol=2e-2, atol=3 * 2**-7)
    torch.testing.assert_close(x_grad, x.grad, rtol=2e-2, atol=1e-2)
    inputs, grads = x.detach().double(), upstream.double()
    torch.testing.assert_close(
        sink.grad[:, 0].double(), _loop_weight_sq_norms(inputs, grads), rtol=2e-2, atol=0
    )


@pytest.mark.skipif(
    not triton_runs_here("cpu"), reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sum_and_sq_norms_read_once_match_the_reference(dtype):
    from hf_gns.kernels.linear_triton import BLOCK, sum_and_sq_norms_triton

    per_example = _randn(3, BLOCK + 37, seed=13, dtype=torch.float32).to(dtype)  # two blocks, one partial
    out, expected_out = torch.empty(BLOCK + 37), torch.empty(BLOCK + 37)
    sq_norms = sum_and_sq_norms_triton(per_example, out)
    expected = sum_and_sq_norms_reference(per_example, expected_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sq_norms, expected.float(), rtol=1e-5, atol=0)


@pytest.mark.skipif(
    not triton_runs_here("cpu"), reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)
def test_linear_op_with_the_triton_reduction_matches_the_torch_backend():
    results = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            x, weight, bias, _, _, sink = _linear_step("simultaneous", False, (3, 4, 5), n_examples=3)
        results.append((x.grad, weight.grad, bias.grad, sink.grad))
    for torch_result, triton_result in zip(*results):
        torch.testing.assert_close(triton_result, torch_result, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not triton_runs_here("cpu"), reason="Triton kernels run on CPU only under TRITON_INTERPRET=1"
)
def test_traceable_sum_and_sq_norms_equals_the_eager_launch():
    """The triton_op body (wrap_triton launch) gives the cached launcher's results bit for bit."""
    from hf_gns.kernels.linear_triton import BLOCK, sum_and_sq_norms_traceable, sum_and_sq_norms_triton

    per_example = _randn(3, BLOCK + 37, seed=14, dtype=torch.float32)
    out, traced_out = torch.empty(BLOCK + 37), torch.empty(BLOCK + 37)
    expected = sum_and_sq_norms_triton(per_example, out)
    actual = sum_and_sq_norms_traceable(per_example, traced_out)
    assert torch.equal(out, traced_out) and torch.equal(expected, actual)


def test_sum_and_sq_norms_triton_op_passes_opcheck_on_the_reference_path():
    per_example, out = _randn(3, 40, seed=15, dtype=torch.float32), torch.empty(40)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.hf_gns.sum_and_sq_norms.default, (per_example, out, False), test_utils=utils
    )
    before = out.clone()
    total, sq_norms = torch.ops.hf_gns.sum_and_sq_norms(per_example, out, False)
    # functional (no kernel mutating a view at a storage offset under Inductor): `out` only gives
    # the sum's shape and dtype, its bytes stay as they were
    assert total.data_ptr() != out.data_ptr() and torch.equal(out.view(torch.int32), before.view(torch.int32))
    torch.testing.assert_close(total, per_example.sum(0))
    torch.testing.assert_close(sq_norms, per_example.square().sum(1))


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_tied_embedding_and_head_with_documents_give_the_norm_of_each_documents_summed_contribution(method):
    """Padding-free rows (1, N) of E documents (one empty) through a tied wte/lm_head: the tap
    reports |E_e + G_eᵀA_e|² per document, against one-document-at-a-time autograd."""
    vocab, width = 7, 4
    weight = _randn(vocab, width, seed=21, dtype=torch.float32).requires_grad_()
    ids = torch.tensor([[1, 2, 1, 0, 6, 3, 3, 3, 5, 0, 4, 4]])  # (1, N = 12)
    offsets = torch.tensor([0, 3, 3, 8, 12])  # documents of 3, 0, 5 and 4 tokens
    n_documents = offsets.numel() - 1
    mix = _randn(width, width, seed=22, dtype=torch.float32)

    def model(ids, weight, sinks=None, offsets=None):
        rows = F.embedding(ids, weight)  # (1, T, D)
        link = None
        if sinks is not None:
            rows, link = embedding_sq_norm_tap(
                rows, ids, sinks[0], vocab, with_link=True, example_offsets=offsets
            )
        hidden = torch.tanh(rows @ mix.to(rows.dtype))  # per token: documents never mix
        if sinks is None:
            logits = F.linear(hidden, weight)
        else:
            logits = linear_with_sq_norms(
                hidden, weight, None, sinks[1], n_documents, method=method, tied_link=(link, ids),
                example_offsets=offsets,
            )  # fmt: skip
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(1, dims=1).flatten(), reduction="sum")

    sinks = (new_sq_norm_sink(n_documents, "cpu"), new_sq_norm_sink(n_documents, "cpu"))
    model(ids, weight, sinks, offsets).backward()
    targets = ids.roll(1, dims=1)
    expected = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        if start == end:
            expected.append(torch.zeros((), dtype=torch.float64))
            continue
        w = weight.detach().double().requires_grad_()
        hidden = torch.tanh(F.embedding(ids[:, start:end], w) @ mix.double())
        loss = F.cross_entropy(
            F.linear(hidden, w).flatten(0, 1), targets[:, start:end].flatten(), reduction="sum"
        )
        (grad,) = torch.autograd.grad(loss, w)
        expected.append(grad.square().sum())
    torch.testing.assert_close(sinks[0].grad[:, 0].double(), torch.stack(expected), rtol=1e-5, atol=1e-12)


def _chunked_linear_step(device: str, compiled: bool):
    """A linear op whose weight gradient is formed in 3 chunks of 2 output rows (views of the weight
    gradient at storage offsets 0, 2·K, 4·K), eager or under torch.compile (Inductor)."""
    x = _randn(3, 4, 8, seed=31, dtype=torch.float32).to(device).requires_grad_()
    weight = _randn(6, 8, seed=32, dtype=torch.float32).to(device).requires_grad_()
    sink = new_sq_norm_sink(3, device)
    two_rows = 2 * 3 * 8 * 4  # bytes of two output rows' per-example gradients, fp32

    def step(x, weight, sink):
        out = linear_with_sq_norms(x, weight, None, sink, 3, method="simultaneous", chunk_bytes=two_rows)
        return out.square().sum()

    torch._dynamo.reset()
    (torch.compile(step) if compiled else step)(x, weight, sink).backward()
    return weight.grad, sink.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_weight_gradient_under_torch_compile_equals_eager(device):
    """Under Inductor each chunk's sum comes out of the reduction op as a new tensor and is copied
    into its view (suspected cause of an illegal memory access of compiled all-layer runs on the H200)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    expected_grad, expected_norms = _chunked_linear_step(device, compiled=False)
    grad, norms = _chunked_linear_step(device, compiled=True)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(norms, expected_norms)


@pytest.mark.gpu
def test_gpu_lm_head_sized_chunked_gradient_under_torch_compile_equals_eager():
    """The shape that crashed compiled all-layer runs on the H200 (a 50257 x 768 head whose gradient
    is formed in 3 chunks of 21845 rows, at storage offsets of 64 and 128 MB): compiled = eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(41)
    x = torch.randn(4, 64, 768, device="cuda", generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(50257, 768, device="cuda", generator=gen)).requires_grad_()

    def step(x, weight, sink):
        out = linear_with_sq_norms(x, weight, None, sink, 4, method="simultaneous")
        return out.float().square().mean()

    results = []
    for compiled in (False, True):
        sink = new_sq_norm_sink(4, "cuda")
        torch._dynamo.reset()
        x.grad = weight.grad = None
        (torch.compile(step) if compiled else step)(x, weight, sink).backward()
        torch.cuda.synchronize()
        results.append((weight.grad.clone(), sink.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_plans_are_made_once_per_shape_and_rebuilt_for_new_shapes():
    """`plan_linear`: one plan per key, reused call after call; a new input shape, batch, method or
    weight shape gets its own; the method is `choose_linear_method`'s for the mean (or given) T."""
    from hf_gns.kernels import linear_op

    linear_op._PLANS.clear()
    x_shape, weight_shape = torch.Size((4, 30, 8)), torch.Size((12, 8))
    plan = linear_op.plan_linear(x_shape, weight_shape, 4)
    assert linear_op.plan_linear(torch.Size((4, 30, 8)), torch.Size((12, 8)), 4) is plan
    assert plan.method == choose_linear_method(4, 30, 8, 12) and plan.n_examples == 4
    assert (
        plan.out_shape == (4, 30, 12) and plan.inputs_shape == (4, -1, 8) and plan.grads_shape == (4, -1, 12)
    )
    others = [
        linear_op.plan_linear(torch.Size((4, 2, 8)), weight_shape, 4),  # shorter sequences
        linear_op.plan_linear(torch.Size((8, 8)), weight_shape, 2),  # flattened rows, 2 examples
        linear_op.plan_linear(x_shape, weight_shape, 4, method="ghost"),
        linear_op.plan_linear(x_shape, torch.Size((8, 12)), 4, transposed=True),  # Conv1D layout
        linear_op.plan_linear(x_shape, weight_shape, 4, seq=1),  # documents: T_max given
    ]
    assert len({id(p) for p in (plan, *others)}) == 6 and len(linear_op._PLANS) == 6
    assert others[0].method == choose_linear_method(4, 2, 8, 12) == "ghost" != plan.method
    assert others[1].grads_shape == (2, -1, 12) and others[2].method == "ghost"
    assert others[3].out_shape == (4, 30, 12) and others[4].method == "ghost"
    with pytest.raises(ValueError, match="linear method"):
        linear_op.plan_linear(x_shape, weight_shape, 4, method="fast")
    assert len(linear_op._PLANS) == 6
    linear_op._PLANS.clear()


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_cached_plan_gives_the_results_of_a_fresh_one(method, transposed):
    """A call that builds its plan, one that finds it cached, and one handed a plan built apart give
    the same bits (outputs, gradients, norms), on 3-D and flattened inputs."""
    from hf_gns.kernels import linear_op

    for x_shape in ((3, 7, 5), (21, 5)):
        results = []
        for route in ("built", "cached", "given"):
            if route == "built":
                linear_op._PLANS.clear()
            x = _randn(*x_shape, seed=31, dtype=torch.float32).requires_grad_()
            weight = _randn(
                *((5, 6) if transposed else (6, 5)), seed=32, dtype=torch.float32
            ).requires_grad_()
            bias = _randn(6, seed=33, dtype=torch.float32).requires_grad_()
            sink = new_sq_norm_sink(3, "cpu")
            plan = None
            if route == "given":
                plan = linear_op._new_plan(x.shape, weight.shape, 3, method, transposed, 1 << 28, None)
            out = linear_with_sq_norms(x, weight, bias, sink, 3, method, transposed, plan=plan)
            (out * _randn(*out.shape, seed=34, dtype=torch.float32)).sum().backward()
            results.append((out.detach(), x.grad, weight.grad, bias.grad, sink.grad))
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    linear_op._PLANS.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_a_linear_collector_receives_what_a_sink_would(method, bias, transposed, dtype):
    """`sq_norm_collector` (eager): backward hands it the (B, 2) fp32 squared norms a sink's grad holds
    (the same bits), once per backward pass that accumulates into the weight or the bias."""
    weight_shape = (5, 6) if transposed else (6, 5)
    results = []
    for route in ("sink", "collector"):
        x = _randn(3, 4, 5, seed=35, dtype=dtype).requires_grad_()
        w = _randn(*weight_shape, seed=36, dtype=dtype).requires_grad_()
        b = _randn(6, seed=37, dtype=dtype).requires_grad_() if bias else None
        collected = []
        sink = new_sq_norm_sink(3, "cpu") if route == "sink" else None
        collector = collected.append if sink is None else None
        out = linear_with_sq_norms(x, w, b, sink, 3, method, transposed, sq_norm_collector=collector)
        out.backward(_randn(*out.shape, seed=38, dtype=dtype))
        assert route == "sink" or len(collected) == 1
        results.append(
            (sink.grad if sink is not None else collected[0], x.grad, w.grad, b.grad if bias else x)
        )
    for from_sink, from_collector in zip(*results, strict=True):
        assert from_sink.dtype == from_collector.dtype and torch.equal(from_sink, from_collector)
    assert results[1][0].dtype == torch.float32
    x = _randn(3, 4, 5, seed=35, dtype=dtype).requires_grad_()
    w = _randn(*weight_shape, seed=36, dtype=dtype).requires_grad_()
    b = _randn(6, seed=37, dtype=dtype).requires_grad_()
    collected = []  # a pass that accumulates into no parameter (autograd.grad) collects nothing, as a sink
    out = linear_with_sq_norms(x, w, b, None, 3, method, transposed, sq_norm_collector=collected.append)
    torch.autograd.grad(out.sum(), [x])
    assert collected == []
    # frozen weight, trained bias: collected (the bias's accumulation)
    out = linear_with_sq_norms(
        x, w.detach(), b, None, 3, method, transposed, sq_norm_collector=collected.append
    )
    out.sum().backward()
    assert len(collected) == 1 and collected[0].shape == (3, 2)
    with pytest.raises(ValueError, match="sq_norm_collector"):
        linear_with_sq_norms(x, w, b, new_sq_norm_sink(3, "cpu"), 3, sq_norm_collector=print)


@pytest.mark.gpu
def test_gpu_keyed_launches_of_the_sum_and_norms_kernel_match_triton_launches():
    """`sum_and_sq_norms_triton` keys its cached launches by the operands' dtypes, 16-byte alignment
    and sizes: the direct runs give the bits of launches through `kernel[grid]`, for aligned and
    misaligned operands (a chunk's `out` sits at any row of the weight gradient), call after call."""
    from hf_gns.kernels import norm_triton
    from hf_gns.kernels.linear_triton import BLOCK, _launch, sum_and_sq_norms_triton

    gen = torch.Generator(device="cuda").manual_seed(43)
    sources = {dtype: torch.randn(3 * (BLOCK + 37) + 8, device="cuda", generator=gen).to(dtype) for dtype in
               (torch.float32, torch.bfloat16)}  # fmt: skip
    results = {}
    for enabled in (False, True):
        was_enabled = norm_triton._CachedLauncher.enabled
        norm_triton._CachedLauncher.enabled = enabled
        _launch.compiled.clear()
        try:
            for (dtype, source), n_cols, p_offset, out_offset in (
                (item, n, p, o)
                for item in sources.items()
                for n in (BLOCK + 37, 96)
                for p in (0, 1)
                for o in (0, 3)
            ):
                for call in range(2):
                    per_example = source[p_offset : p_offset + 3 * n_cols].view(3, n_cols)
                    out = torch.zeros(n_cols + 4, device="cuda")[out_offset : out_offset + n_cols]
                    sq_norms = sum_and_sq_norms_triton(per_example, out)
                    torch.cuda.synchronize()
                    results[enabled, dtype, n_cols, p_offset, out_offset, call] = (
                        out.clone(),
                        sq_norms.clone(),
                    )
        finally:
            norm_triton._CachedLauncher.enabled = was_enabled
            _launch.compiled.clear()
    for key, (out, sq_norms) in results.items():
        if key[0]:
            expected_out, expected_sq = results[(False, *key[1:])]
            assert torch.equal(out, expected_out) and torch.equal(sq_norms, expected_sq), key
