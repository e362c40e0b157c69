"""Per-document examples (`example_offsets`) in the norm, linear and embedding kernels.

Oracle: one document at a time through plain autograd in fp64 (norms are row-wise, so a
document alone gives its own rows' outputs and its own parameter gradient). Documents of
unequal lengths, including length 1, empty ones and ones spanning several backward chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_gns.kernels import norm_backward_reference, norm_forward_reference
from hf_gns.kernels.linear_reference import (
    documents_as_batch,
    embedding_sq_norms,
    example_of_rows,
    linear_bias_sq_norms,
    linear_weight_grad_simultaneous,
    linear_weight_sq_norms_ghost,
    max_example_rows,
    remember_max_example_rows,
)
from tests.conftest import triton_runs_here
from tests.test_kernels_norm import EPS, VARIANTS, Variant, oracle_forward

NORM_VARIANTS = [v for v in VARIANTS if v.name in ("layernorm", "rmsnorm", "rmsnorm_llama", "rmsnorm_gemma")]
LENGTHS = [
    0,
    1,
    6,
    0,
    9,
    3,
    1,
    14,
    0,
]  # N = 34: one-row and empty documents (first, inside, last), some crossing chunks


def offsets_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)


def norm_inputs(n_rows, width, dtype, variant: Variant, seed=0, leading=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (*(leading or (1, n_rows)), width)
    x = (3.0 * torch.randn(shape, generator=gen) + 0.5).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(width, generator=gen)).to(dtype)
    bias = (0.5 * torch.randn(width, generator=gen)).to(dtype) if variant.bias else None
    dy = torch.randn(shape, generator=gen).to(dtype)
    return x, weight, bias, dy


def per_document_oracle(x, weight, bias, dy, variant: Variant, offsets):
    """|dγ_e|², |dβ_e|² (fp64) and dγ, dβ, dx, from each document's rows alone."""
    width = x.shape[-1]
    rows, grads = x.reshape(-1, width), dy.reshape(-1, width)
    sq, dws, dbs, dxs = [], [], [], []
    for e in range(offsets.numel() - 1):
        start, end = int(offsets[e]), int(offsets[e + 1])
        xe = rows[start:end].double().requires_grad_()
        we = weight.double().requires_grad_()
        be = None if bias is None else bias.double().requires_grad_()
        oracle_forward(xe, we, be, variant).backward(grads[start:end].double())
        sq.append([we.grad.square().sum().item(), 0.0 if be is None else be.grad.square().sum().item()])
        dws.append(we.grad)
        dbs.append(None if be is None else be.grad)
        dxs.append(xe.grad)
    out = {"sq": torch.tensor(sq, dtype=torch.float64), "dw": torch.stack(dws).sum(0), "dx": torch.cat(dxs)}
    if bias is not None:
        out["db"] = torch.stack(dbs).sum(0)
    return out


def run_backward(backend, x, weight, bias, dy, variant: Variant, offsets):
    if backend == "torch":
        forward, backward = norm_forward_reference, norm_backward_reference
        _, mean, rstd = forward(x, weight, bias, EPS, variant.rms)
        return backward(
            dy, x, weight, mean, rstd, bias is not None, variant.rms, variant.weight_offset,
            variant.cast_before_weight, example_offsets=offsets,
        )  # fmt: skip
    from hf_gns.kernels.norm_launch import norm_backward_triton, norm_forward_triton

    _, mean, rstd = norm_forward_triton(
        x, weight, bias, EPS, variant.rms, variant.weight_offset, variant.cast_before_weight, None
    )
    return norm_backward_triton(
        dy, x, weight, mean, rstd, bias is not None, variant.rms, variant.weight_offset,
        variant.cast_before_weight, example_offsets=offsets,
    )  # fmt: skip


def force_chunks(monkeypatch, block_m, rows_per_chunk):
    """Make the Triton backward cut its rows into `rows_per_chunk`-row chunks of `block_m`-row tiles.

    Every module that imported `backward_config` by name gets the forced one (patching only
    `norm_triton` left the launchers on the real config), and the eager launch plans, which
    cache configs, start empty."""
    from hf_gns.kernels import norm_launch, norm_triton, norm_triton_op

    def config(width, n_examples, n_rows, device):
        block_d = norm_triton.triton.next_power_of_2(width)
        n_chunks = -(-n_rows // rows_per_chunk)
        return block_m, block_d, 4, rows_per_chunk, n_chunks, norm_triton.DEFAULT_BACKWARD_OPTIONS

    for module in (norm_triton, norm_launch, norm_triton_op):
        monkeypatch.setattr(module, "backward_config", config)
    # fresh plan caches for the test, the real ones back afterwards: forced plans do not outlive it
    monkeypatch.setattr(norm_launch, "_FORWARD_PLANS", {})
    monkeypatch.setattr(norm_launch, "_WORKSPACES", {})


def backends():
    return ["torch", "triton"] if triton_runs_here("cpu") else ["torch"]


def check(got, exact, dtype=torch.float32):
    dx, dw, db, sq = got
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(sq.double(), exact["sq"], **tol)
    torch.testing.assert_close(dw.double(), exact["dw"], **tol)
    torch.testing.assert_close(dx.reshape(exact["dx"].shape).double(), exact["dx"], **tol)
    if "db" in exact:
        torch.testing.assert_close(db.double(), exact["db"], **tol)


@pytest.mark.parametrize("variant", NORM_VARIANTS, ids=[v.name for v in NORM_VARIANTS])
@pytest.mark.parametrize(
    "backend, chunking",
    [("torch", None), ("triton", (2, 4)), ("triton", (4, 8)), ("triton", (1, 3))],
    ids=["torch", "triton-m2c4", "triton-m4c8", "triton-m1c3"],
)
def test_norm_per_document_matches_one_document_at_a_time(monkeypatch, variant, backend, chunking):
    """Chunks of 3, 4 and 8 rows (tiles of 1, 2, 4): documents start and end inside and at chunk edges."""
    if backend not in backends():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    if chunking is not None:
        force_chunks(monkeypatch, *chunking)
    offsets = offsets_of(LENGTHS)
    x, weight, bias, dy = norm_inputs(int(offsets[-1]), 24, torch.float32, variant)
    got = run_backward(backend, x, weight, bias, dy, variant, offsets)
    assert got[3].shape == (len(LENGTHS), 2)
    check(got, per_document_oracle(x, weight, bias, dy, variant, offsets))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_documents_across_rows_of_a_batch_and_per_head_rows(backend):
    """(B, T) batches with restarts, and 4-D (B, T, H, Dh) inputs: offsets count rows of (N, D)."""
    if backend not in backends():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = NORM_VARIANTS[0]
    offsets = offsets_of([3, 5, 2, 6])  # a (2, 8) batch: row 0 = docs 0,1; row 1 = docs 2,3
    x, weight, bias, dy = norm_inputs(16, 16, torch.float32, variant, leading=(2, 8))
    check(
        run_backward(backend, x, weight, bias, dy, variant, offsets),
        per_document_oracle(x, weight, bias, dy, variant, offsets),
    )
    heads = 3  # token-major rows: each token owns 3 consecutive rows
    x, weight, bias, dy = norm_inputs(48, 8, torch.float32, variant, leading=(2, 8, heads))
    row_offsets = offsets * heads
    check(
        run_backward(backend, x, weight, bias, dy, variant, row_offsets),
        per_document_oracle(x, weight, bias, dy, variant, row_offsets),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_documents_low_precision_match_the_reference(monkeypatch, dtype):
    if not triton_runs_here("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    force_chunks(monkeypatch, 2, 4)
    variant = NORM_VARIANTS[0]
    offsets = offsets_of(LENGTHS)
    x, weight, bias, dy = norm_inputs(int(offsets[-1]), 24, dtype, variant)
    got = run_backward("triton", x, weight, bias, dy, variant, offsets)
    ref = run_backward("torch", x, weight, bias, dy, variant, offsets)
    torch.testing.assert_close(got[3], ref[3].float(), rtol=1e-4, atol=1e-4)  # fp32 sums of the same rows
    check(got, per_document_oracle(x, weight, bias, dy, variant, offsets), dtype)


def test_triton_documents_are_bitwise_deterministic_and_close_to_the_dense_path(monkeypatch):
    if not triton_runs_here("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = NORM_VARIANTS[0]
    x, weight, bias, dy = norm_inputs(12, 40, torch.float32, variant, leading=(3, 4))
    dense = run_backward("torch", x, weight, bias, dy, variant, None)
    force_chunks(monkeypatch, 2, 2)
    offsets = offsets_of([4, 4, 4])  # one document per row: the dense examples
    first = run_backward("triton", x, weight, bias, dy, variant, offsets)
    second = run_backward("triton", x, weight, bias, dy, variant, offsets)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_parameters_with_documents_still_give_dx(backend):
    if backend not in backends():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = NORM_VARIANTS[0]
    offsets = offsets_of([2, 5])
    x, weight, bias, dy = norm_inputs(7, 8, torch.float32, variant)
    _, mean, rstd = norm_forward_reference(x, weight, bias, EPS, False)
    impl = norm_backward_reference
    if backend == "triton":
        from hf_gns.kernels.norm_launch import norm_backward_triton as impl
    dx, dw, db, sq = impl(
        dy, x, weight, mean, rstd, True, False, 0.0, False, param_grads=False, example_offsets=offsets
    )
    assert dw is None and db is None and sq.shape == (2, 2) and not sq.any()
    torch.testing.assert_close(
        dx.double(), per_document_oracle(x, weight, bias, dy, variant, offsets)["dx"].reshape(dx.shape)
    )


def test_bad_offsets_fail_with_a_clear_error():
    variant = NORM_VARIANTS[0]
    x, weight, bias, dy = norm_inputs(5, 8, torch.float32, variant)
    for bad in (
        torch.tensor([0, 2, 4]),
        torch.tensor([1, 5]),
        torch.tensor([0, 3, 2, 5]),
        torch.tensor([0, 5.0]),
    ):
        with pytest.raises(ValueError, match="example_offsets"):
            run_backward("torch", x, weight, bias, dy, variant, bad)


# --------------------------------------------------------------------------- linear, embedding


def linear_per_document_oracle(rows, grad_rows, offsets, with_bias=True):
    """|dW_e|², |db_e|² in fp64 from each document's rows through F.linear alone."""
    sq_w, sq_b = [], []
    for e in range(offsets.numel() - 1):
        start, end = int(offsets[e]), int(offsets[e + 1])
        weight = torch.zeros(grad_rows.shape[-1], rows.shape[-1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(grad_rows.shape[-1], dtype=torch.float64, requires_grad=True)
        F.linear(rows[start:end].double(), weight, bias).backward(grad_rows[start:end].double())
        sq_w.append(weight.grad.square().sum())
        sq_b.append(bias.grad.square().sum())
    return torch.stack(sq_w), torch.stack(sq_b)


def test_documents_as_batch_pads_each_document_with_zero_rows():
    offsets = offsets_of([2, 0, 3])
    rows = torch.arange(10.0).reshape(5, 2)
    padded = documents_as_batch(rows, offsets)
    assert padded.shape == (3, 3, 2)
    assert padded[0, :2].tolist() == rows[:2].tolist() and not padded[0, 2].any()
    assert not padded[1].any()
    assert padded[2].tolist() == rows[2:].tolist()
    assert example_of_rows(offsets, 5).tolist() == [0, 0, 2, 2, 2]


def test_max_example_rows_is_remembered_without_reading_the_device():
    offsets = offsets_of([2, 7, 1])
    assert max_example_rows(offsets) == 7
    other = offsets_of([2, 7, 1])
    remember_max_example_rows(other, 9)  # a caller that knows it (e.g. max_length_q) sets it
    assert max_example_rows(other) == 9


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_linear_per_document_norms_match_one_document_at_a_time(method):
    gen = torch.Generator().manual_seed(0)
    offsets = offsets_of(LENGTHS)
    n_rows = int(offsets[-1])
    rows, grad_rows = torch.randn(n_rows, 5, generator=gen), torch.randn(n_rows, 7, generator=gen)
    exact_w, exact_b = linear_per_document_oracle(rows, grad_rows, offsets)
    if method == "simultaneous":  # rows (N, ·) and the offsets, as the linear op passes them
        weight_grad, sq_w = linear_weight_grad_simultaneous(
            rows, grad_rows, torch.float32, chunk_bytes=64, example_offsets=offsets
        )
        torch.testing.assert_close(weight_grad, grad_rows.t() @ rows, rtol=1e-5, atol=1e-5)  # Σ_e P_e = dW
    else:
        sq_w = linear_weight_sq_norms_ghost(rows, grad_rows, example_offsets=offsets)
    torch.testing.assert_close(sq_w.double(), exact_w, rtol=1e-5, atol=1e-5)
    bias_sq = linear_bias_sq_norms(grad_rows, example_offsets=offsets)
    torch.testing.assert_close(bias_sq.double(), exact_b, rtol=1e-5, atol=1e-5)
    padded = documents_as_batch(grad_rows, offsets)  # (E, T_max, L): the dense functions agree
    torch.testing.assert_close(linear_bias_sq_norms(padded).double(), exact_b, rtol=1e-5, atol=1e-5)


def test_embedding_per_document_norms_add_repeats_within_a_document_only():
    offsets = offsets_of([3, 1, 0, 4])
    ids = torch.tensor([[2, 5, 2, 2, 5, 1, 0, 5]])  # id 2 repeats inside doc 0 and appears in doc 3
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(1, 8, 4, generator=gen)
    exact = []
    for e in range(4):
        start, end = int(offsets[e]), int(offsets[e + 1])
        weight = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
        F.embedding(ids[0, start:end], weight, padding_idx=0).backward(grad[0, start:end].double())
        exact.append(weight.grad.square().sum())
    got = embedding_sq_norms(ids, grad, 6, padding_idx=0, example_offsets=offsets)
    torch.testing.assert_close(got.double(), torch.stack(exact), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- through the ops


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_norm_sink_gets_per_document_norms(backend):
    from hf_gns.kernels import fused_norm, new_sq_norm_sink, use_backend

    if backend not in backends():
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    variant = NORM_VARIANTS[0]
    offsets = offsets_of(LENGTHS)
    x, weight, bias, dy = norm_inputs(int(offsets[-1]), 24, torch.float32, variant)
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    sink = new_sq_norm_sink(len(LENGTHS), "cpu")
    with use_backend(backend):
        y = fused_norm(x, weight, bias, EPS, sq_norm_sink=sink, example_offsets=offsets)
        y.backward(dy)
    exact = per_document_oracle(x, weight.detach(), bias.detach(), dy, variant, offsets)
    torch.testing.assert_close(sink.grad.double(), exact["sq"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), exact["dw"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_linear_op_sink_gets_per_document_norms(method):
    from hf_gns.kernels import new_sq_norm_sink
    from hf_gns.kernels.linear_op import linear_with_sq_norms

    gen = torch.Generator().manual_seed(1)
    offsets = offsets_of(LENGTHS)
    n_rows = int(offsets[-1])
    x, dy = torch.randn(1, n_rows, 5, generator=gen), torch.randn(1, n_rows, 7, generator=gen)
    weight = torch.randn(7, 5, generator=gen, requires_grad=True)
    bias = torch.randn(7, generator=gen, requires_grad=True)
    sink = new_sq_norm_sink(len(LENGTHS), "cpu")
    out = linear_with_sq_norms(x, weight, bias, sink, len(LENGTHS), method=method, example_offsets=offsets)
    out.backward(dy)
    exact_w, exact_b = linear_per_document_oracle(x[0], dy[0], offsets)
    torch.testing.assert_close(sink.grad[:, 0].double(), exact_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sink.grad[:, 1].double(), exact_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, dy[0].t() @ x[0], rtol=1e-5, atol=1e-5)


def test_embedding_tap_sink_gets_per_document_norms():
    from hf_gns.kernels import new_sq_norm_sink
    from hf_gns.kernels.linear_op import embedding_sq_norm_tap

    offsets = offsets_of([2, 3])
    ids = torch.tensor([[1, 1, 2, 1, 1]])
    rows = torch.randn(1, 5, 3, requires_grad=True)
    sink = new_sq_norm_sink(2, "cpu")
    tapped, _ = embedding_sq_norm_tap(rows, ids, sink, 4, example_offsets=offsets)
    grad = torch.randn(1, 5, 3)
    tapped.backward(grad)
    expected = [
        grad[0, :2].sum(0).square().sum(),
        grad[0, 2].square().sum() + grad[0, 3:].sum(0).square().sum(),
    ]
    torch.testing.assert_close(sink.grad[:, 0], torch.stack(expected))


# ----------------------------------------------------------------------------- GPU


def random_lengths(n_rows, n_documents, seed):
    """`n_documents` lengths summing to `n_rows`: uneven, with one-row and empty documents among them."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n_rows - 1, generator=gen)[: n_documents - 3].add(1).sort().values.tolist()
    lengths = torch.tensor([0, *cuts, n_rows]).diff().tolist()
    return [1, 0, *lengths[:-1], lengths[-1] - 1]  # a one-row and an empty document up front


def on(device, tensors):
    return [None if t is None else t.to(device) for t in tensors]


def gpu_error_rule(variant, width, dtype, lengths, device="cuda"):
    """Triton vs the fp64 reference: max error <= 2x the reference's own error (its fp32 math on
    the same `dtype` inputs) + one ulp of `dtype` at the reference's scale."""
    offsets = offsets_of(lengths, device)
    x, weight, bias, dy = on(device, norm_inputs(int(offsets[-1]), width, dtype, variant, seed=3))
    got = run_backward("triton", x, weight, bias, dy, variant, offsets)
    own = run_backward("torch", x, weight, bias, dy, variant, offsets)  # fp32 math on the same inputs
    to64 = (x.double(), weight.double(), None if bias is None else bias.double(), dy.double())
    exact = run_backward("torch", *to64, variant, offsets)
    ulp = torch.finfo(dtype).eps
    for name, g, o, e in zip(("dx", "dw", "db", "sq"), got, own, exact, strict=True):
        if e is None:
            continue
        err, own_err = (g.double() - e).abs().max().item(), (o.double() - e).abs().max().item()
        assert err <= 2 * own_err + ulp * e.abs().max().item() + 1e-6, (name, err, own_err)
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("variant", NORM_VARIANTS, ids=[v.name for v in NORM_VARIANTS])
@pytest.mark.parametrize("width", [768, 2051, 4096], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_documents", [24, 700], ids=["24docs", "700docs"])
def test_gpu_triton_documents_match_the_reference(variant, width, dtype, n_documents):
    gpu_error_rule(variant, width, dtype, random_lengths(8192, n_documents, seed=n_documents))


@pytest.mark.gpu
def test_gpu_triton_documents_are_bitwise_deterministic():
    variant = NORM_VARIANTS[0]
    offsets = offsets_of(random_lengths(16384, 64, seed=1), "cuda")
    x, weight, bias, dy = on("cuda", norm_inputs(16384, 768, torch.bfloat16, variant, seed=5))
    runs = [run_backward("triton", x, weight, bias, dy, variant, offsets) for _ in range(3)]
    for results in runs[1:]:
        for a, b in zip(runs[0], results, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_fused_norm_with_documents_through_autograd():
    from hf_gns.kernels import fused_norm, new_sq_norm_sink, use_backend

    variant = NORM_VARIANTS[1]  # RMSNorm
    lengths = random_lengths(4096, 40, seed=2)
    offsets = offsets_of(lengths, "cuda")
    x, weight, _, dy = (
        t.cuda() if t is not None else None for t in norm_inputs(4096, 2048, torch.bfloat16, variant)
    )
    weight.requires_grad_()
    sink = new_sq_norm_sink(len(lengths), "cuda")
    with use_backend("triton"):
        fused_norm(x, weight, None, EPS, rms=True, sq_norm_sink=sink, example_offsets=offsets).backward(dy)
    exact = run_backward("torch", x.double(), weight.detach().double(), None, dy.double(), variant, offsets)
    torch.testing.assert_close(sink.grad.double(), exact[3], rtol=1e-3, atol=1e-6)
