"""Linear / embedding ops whose backward also yields per-example squared gradient norms.

As with `fused_norm`, the norms leave backward as the gradient of a (B, 2) fp32 sink leaf:
column 0 the weight's |c_b|², column 1 the bias's (0 for embeddings). No hooks, no side
effects in backward, no host sync; `torch.compile` traces these autograd Functions.

- `linear_with_sq_norms`: y = x Wᵀ + b (nn.Linear) or x W + b (HF's Conv1D, `transposed`),
  computed exactly as the module computes it, so outputs are bit-identical. Its backward
  returns dx, dW, db and the norms, by the simultaneous method (dW is the sum of the
  per-example gradients; on CUDA one Triton pass over them gives both the sum and the
  norms, `linear_triton.py`) or the ghost method (dW by the usual matmul).
- `embedding_sq_norm_tap`: identity on an embedding's output whose backward also gets the
  per-example norms of the embedding weight from the output gradient and the ids; the
  lookup and its weight gradient stay PyTorch's own.

Tied weights (an embedding whose weight is also an LM head's): the tap also returns a
`link`, a zero-memory (B, T·D + 1) tensor that the head's op takes as an input. In
backward the head runs first and sends, as the link's gradient, the rows R_bt of its
per-example gradient at the embedding's ids (see `tied_rows`) and its own |G_bᵀ A_b|²;
the tap then reports the norm of the summed contribution,
|E_b + G_bᵀA_b|² = |E_b|² + 2 Σ_t ⟨g_bt, R_bt⟩ + |G_bᵀA_b|², in its sink.
With per-document `example_offsets` the link is (1, N·D + E): the rows R_t of all N tokens
(each from its own document's gradient, `tied_rows_documents`), then the E head norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .linear_cost import choose_linear_method
from .linear_reference import (
    DEFAULT_CHUNK_BYTES,
    documents_as_batch,
    embedding_sq_norms,
    example_of_rows,
    linear_bias_sq_norms,
    linear_weight_grad_simultaneous,
    linear_weight_sq_norms_ghost,
    max_example_rows,
    sum_and_sq_norms_reference,
    tied_rows,
)
from .norm_op import TRITON_AVAILABLE, _accumulates_parameters, get_backend

if TRITON_AVAILABLE:
    from .linear_triton import sum_and_sq_norms_traceable, sum_and_sq_norms_triton

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _uses_triton(per_example: torch.Tensor) -> bool:
    """The backend rule of `norm_op`: "triton" always, "auto" for CUDA tensors, "torch" never."""
    backend = get_backend()
    if backend == "torch" or not TRITON_AVAILABLE or per_example.dtype not in _TRITON_DTYPES:
        return False
    return backend == "triton" or per_example.is_cuda


def _sum_and_sq_norms_impl(per_example: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if _uses_triton(per_example):
        return sum_and_sq_norms_triton(per_example, out)
    return sum_and_sq_norms_reference(per_example, out)


@torch.library.triton_op("hf_gns::sum_and_sq_norms", mutates_args=())
def _sum_and_sq_norms_op(
    per_example: torch.Tensor, like: torch.Tensor, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_b P_b as a new tensor shaped and typed like `like`, |P_b|² (B,)). Functional on purpose:
    a chunked weight gradient hands each chunk's `out` as a view at a storage offset, and the
    copy into it is then an ordinary aten copy_ in the graph rather than a user Triton kernel
    mutating a view. Why: all-layer GPT-2 and Llama-124M under torch_compile (vocab 50257, so
    the LM head's gradient is formed in chunks) hit an illegal memory access in their first
    compiled backward on the H200 (2026-12-02), while the tiny-vocab GPU tests (one chunk) pass.
    The likely cause is a known Inductor bug (pytorch/pytorch#192219, #192226; fixed upstream by
    #192227, not in torch 2.11 or 2.13): a mutated argument that is a view at a storage offset of an
    intermediate buffer is cloned reading offset + span elements from a buffer Inductor sized to
    the view, i.e. up to ~130 MB past its end for the LM head's last chunk. Not yet checked on a GPU."""
    # A triton_op: under torch.compile Inductor traces this body and launches the kernel itself.
    total = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if use_triton and per_example.is_cuda:
        return total, sum_and_sq_norms_traceable(per_example, total)
    return total, sum_and_sq_norms_reference(per_example, total)


def sum_and_sq_norms(per_example: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ_b P_b into `out` and |P_b|² (B,) from P (B, N): one read of P with Triton (see
    `linear_triton.py`), two torch reductions otherwise; a `triton_op` under torch.compile."""
    if torch.compiler.is_compiling():
        total, sq_norms = _sum_and_sq_norms_op(per_example, out, _uses_triton(per_example))
        out.copy_(total)
        return sq_norms
    return _sum_and_sq_norms_impl(per_example, out)


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
    """The module's own forward: `F.linear` (nn.Linear) or HF Conv1D's addmm on (rows, K)."""
    if not transposed:
        return F.linear(x, weight, bias)
    return _conv1d_forward(x, weight, bias, (*x.shape[:-1], weight.shape[-1]))


def _conv1d_forward(x, weight, bias, out_shape):
    """HF Conv1D's forward (addmm on the rows (N, K), viewed back as `out_shape`)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.addmm(bias, rows, weight) if bias is not None else rows @ weight
    return out.view(out_shape)


class LinearPlan(NamedTuple):
    """What a `linear_with_sq_norms` call derives from its shapes, made once per key (`plan_linear`)
    instead of at every call: the examples, the method, and the shapes the operands are viewed in.

    The patched Linears of a model run forward and backward ~100 times a step, and in eager
    training their host time shows wherever the GPU work queued ahead of it is short (issue 11).
    A plan holds constants of the key's shapes only (a tuple: torch.compile treats it as one).
    """

    n_examples: int
    method: str  # "simultaneous" or "ghost"
    transposed: bool
    chunk_bytes: int
    out_shape: tuple[int, ...]  # Conv1D's output view
    inputs_shape: tuple[int, int, int]  # A viewed as (B, T, K) in backward (T as -1)
    grads_shape: tuple[int, int, int]  # G viewed as (B, T, L) in backward (T as -1)


def _new_plan(x_shape, weight_shape, n_examples, method, transposed, chunk_bytes, seq) -> LinearPlan:
    in_features = x_shape[-1]
    out_features = weight_shape[-1] if transposed else weight_shape[0]
    if seq is None:  # mean rows per example
        seq = math.prod(x_shape) // max(1, n_examples * in_features)
    return LinearPlan(
        n_examples,
        choose_linear_method(n_examples, seq, in_features, out_features, method),
        transposed,
        chunk_bytes,
        (*x_shape[:-1], out_features),
        (n_examples, -1, in_features),
        (n_examples, -1, out_features),
    )


# Plans kept at most (one per layer shape and batch shape seen; a dynamically padded dataset makes
# one per sequence length): past it the cache starts over.
_MAX_PLANS = 4096
_PLANS: dict[tuple, LinearPlan] = {}


def plan_linear(
    x_shape: torch.Size,
    weight_shape: torch.Size,
    n_examples: int,
    method: str = "auto",
    transposed: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    seq: int | None = None,
) -> LinearPlan:
    """The `LinearPlan` of a call on an input of `x_shape`, cached by all the arguments.

    Args:
        seq (`int`, *optional*): the T that the method choice ("auto") uses: by default the mean
            rows per example; the patched layers pass T_max for padding-free batches (documents
            are padded to the longest, which sets both methods' cost).
        (the others as `linear_with_sq_norms` takes them; `x_shape`, `weight_shape`: their shapes)

    Raises:
        `ValueError`: for a method other than "auto", "simultaneous" and "ghost".
    """
    if torch.compiler.is_compiling():  # built inside the graph: Dynamo would guard on a global cache
        return _new_plan(x_shape, weight_shape, n_examples, method, transposed, chunk_bytes, seq)
    key = (x_shape, weight_shape, n_examples, method, transposed, chunk_bytes, seq)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _new_plan(x_shape, weight_shape, n_examples, method, transposed, chunk_bytes, seq)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The operands as autocast would hand them to the matmul: floating tensors other than fp64
    cast to the autocast dtype when autocast is on for x's device, else unchanged."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), cast(weight), cast(bias)


class _LinearWithSqNorms(torch.autograd.Function):
    """The op; `ctx.plan` (a `LinearPlan`) carries everything derived from the shapes."""

    @staticmethod
    def forward(ctx, x, weight, bias, sink, link, ids, example_offsets, plan, collector):
        # Cast once, as autocast would, and keep the casts for backward (as autograd keeps
        # autocast's): the output is bit-identical, and backward casts nothing again.
        # Under autocast the operands are now in its dtype, so its casts inside the matmul are
        # no-ops: no autocast-disabling context needed (~10-20 µs of host time a call).
        x_c, weight_c, bias_c = _autocast_operands(x, weight, bias)
        if plan.transposed:
            out = _conv1d_forward(x_c, weight_c, bias_c, plan.out_shape)
        else:
            out = F.linear(x_c, weight_c, bias_c)
        ctx.plan = plan
        ctx.collector = collector
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(x_c, weight_c, ids, example_offsets)
        # Not a view (F.linear of a 3-D input is one, of addmm's result): models edit layer
        # outputs in place (RoCBert's `embedding_in += ...`), which autograd forbids on views
        # made inside a custom Function. detach() aliases the storage without copying.
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        # Backward normally runs with autocast off (it is thread-local); only a backward called
        # inside an autocast region pays for the context that turns it off.
        if torch.is_autocast_enabled(grad_out.device.type):
            with torch.autocast(grad_out.device.type, enabled=False):
                return _LinearWithSqNorms._backward(ctx, grad_out)
        return _LinearWithSqNorms._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, w, ids, example_offsets = ctx.saved_tensors
        plan: LinearPlan = ctx.plan
        transposed = plan.transposed
        needs_x, needs_weight, needs_bias, needs_sink, needs_link = ctx.needs_input_grad[:5]
        collect = ctx.collector is not None and _accumulates_parameters(ctx, True, ctx.has_bias)
        needs_norms = needs_sink or collect
        grad_x = grad_weight = grad_bias = sq_norms = link_grad = None
        if grad_out.dtype != x.dtype:
            grad_out = grad_out.to(x.dtype)
        if needs_x:
            grad_x = grad_out @ (w.t() if transposed else w)  # (..., K)
        if example_offsets is None:
            extra = {}
            inputs = x.reshape(plan.inputs_shape)  # A (B, T, K)
            grads = grad_out.reshape(plan.grads_shape)  # G (B, T, L)
        else:  # per-document examples: the references take the rows flat, (N, K) and (N, L), and the offsets
            extra = {"example_offsets": example_offsets}
            inputs = x.reshape(-1, x.shape[-1])  # A (N, K), rows of E documents
            grads = grad_out.reshape(-1, grad_out.shape[-1])  # G (N, L)
        weight_sq = None
        if needs_weight and plan.method == "simultaneous":
            grad_weight, weight_sq = linear_weight_grad_simultaneous(
                inputs, grads, ctx.weight_dtype, transposed, plan.chunk_bytes, sum_and_sq_norms, **extra
            )
        elif needs_weight:
            flat_grads, flat_inputs = grads.reshape(-1, grads.shape[-1]), inputs.reshape(-1, x.shape[-1])
            grad_weight = flat_inputs.t() @ flat_grads if transposed else flat_grads.t() @ flat_inputs
            if grad_weight.dtype != ctx.weight_dtype:
                grad_weight = grad_weight.to(ctx.weight_dtype)
        if weight_sq is None and (needs_norms or needs_link):
            weight_sq = linear_weight_sq_norms_ghost(inputs, grads, **extra)
        bias_per_example = None
        if ctx.has_bias and (needs_bias or needs_norms) and example_offsets is None:
            # one read of G for both: the per-example bias grads (B, L) in fp32, and their sum
            bias_per_example = grads.sum(1, dtype=_accumulation_dtype(grads.dtype))
            grad_bias = bias_per_example.sum(0)
            if grad_bias.dtype != grads.dtype:
                grad_bias = grad_bias.to(grads.dtype)  # the dtype the plain sum had
        elif ctx.has_bias and (needs_bias or needs_norms):
            grad_bias = grads.reshape(-1, grads.shape[-1]).sum(0)
        if needs_norms:
            if bias_per_example is not None:
                sq_norms = torch.stack([weight_sq, bias_per_example.square().sum(1)], dim=1)
            elif ctx.has_bias:
                sq_norms = torch.stack([weight_sq, linear_bias_sq_norms(grads, **extra)], dim=1)
            else:  # (B, 2) with a zero bias column, one op
                sq_norms = F.pad(weight_sq.unsqueeze(1), (0, 1))
            if collect:  # as the fp32 sink would receive them
                ctx.collector(sq_norms if sq_norms.dtype == torch.float32 else sq_norms.float())
        if needs_link and example_offsets is None:
            rows = tied_rows(inputs, grads, ids).float().flatten(1)  # (B, T_ids·K)
            link_grad = torch.cat([rows, weight_sq.unsqueeze(1)], dim=1)
        elif needs_link:
            rows = tied_rows_documents(inputs, grads, ids, example_offsets).float().reshape(1, -1)
            link_grad = torch.cat([rows, weight_sq.float().unsqueeze(0)], dim=1)  # (1, N·K + E)
        if not needs_bias:
            grad_bias = None
        sink_grad = sq_norms if needs_sink else None
        return grad_x, grad_weight, grad_bias, sink_grad, link_grad, None, None, None, None


_FLOAT32_ACCUMULATED = (torch.float32, torch.bfloat16, torch.float16)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch.promote_types(dtype, fp32), without its call for the usual dtypes."""
    return torch.float32 if dtype in _FLOAT32_ACCUMULATED else torch.promote_types(dtype, torch.float32)


def linear_with_sq_norms(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sq_norm_sink: torch.Tensor | None,
    n_examples: int,
    method: str = "auto",
    transposed: bool = False,
    tied_link: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    example_offsets: torch.Tensor | None = None,
    plan: LinearPlan | None = None,
    sq_norm_collector: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """A linear layer whose backward also writes per-example |dW_b|², |db_b|² into `sq_norm_sink.grad`.

    Args:
        x (`torch.Tensor`): input (..., K) whose rows are grouped batch-major into
            `n_examples` examples: (B, T, K), (B, K), or flattened (B·T, K).
        weight (`torch.Tensor`): (L, K), or (K, L) when `transposed`.
        bias (`torch.Tensor`, *optional*): (L,).
        sq_norm_sink (`torch.Tensor`, *optional*): (B, 2) fp32 leaf (see `new_sq_norm_sink`);
            None with `sq_norm_collector`.
        n_examples (`int`): B.
        method (`str`, *optional*, defaults to `"auto"`): `"simultaneous"`, `"ghost"`, or
            `"auto"` (`choose_linear_method` from the shapes).
        transposed (`bool`, *optional*, defaults to `False`): HF Conv1D layout, y = x W + b.
        tied_link (`tuple[torch.Tensor, torch.Tensor]`, *optional*): `(link, ids)` from
            `embedding_sq_norm_tap` of the embedding that shares `weight`.
        chunk_bytes (`int`, *optional*): memory bound of the simultaneous method's chunks.
        example_offsets (`torch.Tensor`, *optional*): int64 (E+1,) row offsets of E documents
            in the rows of `x` flattened to (N, K) (padding-free batches); `n_examples` must
            then be E. None: rows are grouped batch-major into `n_examples` examples.
        plan (`LinearPlan`, *optional*): `plan_linear` of these arguments, when the caller has it
            (the patched layers); by default looked up here.
        sq_norm_collector (`Callable[[torch.Tensor], None]`, *optional*): eager mode's cheaper
            alternative to a sink, as `fused_norm` takes it: backward calls it with the (B, 2)
            fp32 squared norms when the backward pass accumulates into `weight` or `bias` (no
            sink leaf, no AccumulateGrad node, no hook per call). Not under torch.compile.

    Returns:
        `torch.Tensor`: the layer's output, bit-identical to the module's.
    """
    if example_offsets is not None and example_offsets.shape[0] - 1 != n_examples:
        given = example_offsets.shape[0] - 1
        raise ValueError(f"example_offsets gives {given} examples, n_examples={n_examples}")
    if sq_norm_collector is not None and (sq_norm_sink is not None or torch.compiler.is_compiling()):
        raise ValueError("linear_with_sq_norms takes sq_norm_collector in eager mode only, not with a sink")
    if plan is None:
        plan = plan_linear(x.shape, weight.shape, n_examples, method, transposed, chunk_bytes)
    link, ids = tied_link if tied_link is not None else (None, None)
    return _LinearWithSqNorms.apply(
        x, weight, bias, sq_norm_sink, link, ids, example_offsets, plan, sq_norm_collector
    )


def tied_rows_documents(
    inputs: torch.Tensor, grad_out: torch.Tensor, ids: torch.Tensor, example_offsets: torch.Tensor
) -> torch.Tensor:
    """`tied_rows` for E documents given as flat rows: R_t = Σ_{s in doc(t)} G[s, ids_t] A_s.

    Args:
        inputs (`torch.Tensor`): the head's input A as rows (N, K).
        grad_out (`torch.Tensor`): its output gradient G as rows (N, V).
        ids (`torch.Tensor`): the embedding's ids, N of them (any shape).
        example_offsets (`torch.Tensor`): int64 (E+1,) row offsets of the documents.

    Returns:
        `torch.Tensor`: R (N, K) in the dtype of `inputs`. The documents are regrouped as a
        zero-padded (E, T_max, ·) batch, so the cost is that of `tied_rows` at T = T_max.
    """
    n_rows = inputs.shape[0]
    if n_rows == 0:
        return inputs.new_zeros(0, inputs.shape[-1])
    max_rows = max_example_rows(example_offsets)
    index = example_offsets[:-1, None] + torch.arange(max_rows, device=inputs.device)  # (E, T_max) rows
    valid = index < example_offsets[1:, None]
    index = index.clamp(max=n_rows - 1)
    doc_ids = ids.reshape(-1)[index]  # (E, T_max)
    picked = grad_out[index.unsqueeze(2), doc_ids.unsqueeze(1)]  # (E, T_s, T_t): G[row(e, s), ids(e, t)]
    picked = picked.masked_fill(~valid.unsqueeze(2), 0)  # rows beyond a document add nothing
    padded_inputs = documents_as_batch(inputs, example_offsets, max_rows)  # (E, T_max, K), zero padded
    padded_rows = torch.bmm(picked.transpose(1, 2), padded_inputs)  # (E, T_t, K)
    example = example_of_rows(example_offsets, n_rows)  # (N,)
    position = torch.arange(n_rows, device=inputs.device) - example_offsets[example]
    return padded_rows[example, position]  # (N, K)


def _tied_cross_terms_documents(grad_rows, grad_link, ids, example_offsets, padding_idx):
    """Per document e: 2 Σ_{t in e} ⟨g_t, R_t⟩ + |G_eᵀA_e|², from the link's gradient (1, N·D + E)."""
    width = grad_rows.shape[-1]
    n_rows = grad_rows.numel() // width
    head_rows = grad_link[0, : n_rows * width].view(n_rows, width)  # R (N, D) fp32
    own_rows = grad_rows.reshape(n_rows, width).float()
    if padding_idx is not None:
        own_rows = own_rows * (ids.reshape(-1, 1) != padding_idx)
    per_row = (own_rows * head_rows).sum(1)  # (N,)
    example = example_of_rows(example_offsets, n_rows)
    cross = torch.zeros(example_offsets.shape[0] - 1, dtype=per_row.dtype, device=per_row.device)
    cross = cross.index_add_(0, example, per_row)
    return 2 * cross + grad_link[0, n_rows * width :]


class _EmbeddingSqNormTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, ids, sink, example_offsets, num_embeddings, padding_idx, with_link):
        ctx.save_for_backward(ids, example_offsets)
        ctx.config = (num_embeddings, padding_idx)
        ctx.set_materialize_grads(False)
        n_examples, seq, width = rows.shape
        # The link carries no data forward; expand keeps it free of memory. Dense: (B, T·D + 1),
        # one row per example; documents: (1, N·D + E), the rows R of all N tokens then E norms.
        if example_offsets is None:
            shape = (n_examples, seq * width + 1) if with_link else (n_examples, 1)
        else:
            n_documents = example_offsets.shape[0] - 1
            shape = (1, rows.numel() + n_documents) if with_link else (1, 1)
        link = torch.zeros((), dtype=torch.float32, device=rows.device).expand(*shape)
        # An alias, not a view: models edit embeddings in place (CTRL's `inputs_embeds *= ...`).
        return rows.detach(), link

    @staticmethod
    def backward(ctx, grad_rows, grad_link):
        if grad_rows is None:
            return None, None, None, None, None, None, None
        ids, example_offsets = ctx.saved_tensors
        num_embeddings, padding_idx = ctx.config
        extra = {} if example_offsets is None else {"example_offsets": example_offsets}
        sq = embedding_sq_norms(ids, grad_rows, num_embeddings, padding_idx, **extra)
        if grad_link is not None and grad_link.shape[1] > 1 and example_offsets is not None:
            sq = sq + _tied_cross_terms_documents(grad_rows, grad_link, ids, example_offsets, padding_idx)
        elif grad_link is not None and grad_link.shape[1] > 1:
            head_rows = grad_link[:, :-1].view(grad_rows.shape)  # R (B, T, D) fp32
            own_rows = grad_rows.float()
            if padding_idx is not None:
                own_rows = own_rows * (ids != padding_idx).unsqueeze(-1)
            sq = sq + 2 * (own_rows * head_rows).sum((1, 2)) + grad_link[:, -1]
        sink_grad = torch.stack([sq, torch.zeros_like(sq)], dim=1) if ctx.needs_input_grad[2] else None
        return grad_rows, None, sink_grad, None, None, None, None


def embedding_sq_norm_tap(
    rows: torch.Tensor,
    ids: torch.Tensor,
    sq_norm_sink: torch.Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    with_link: bool = False,
    example_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity on looked-up `rows` (B, T, D) that sends the per-example |E_b|² of the embedding
    weight (looked up at `ids` (B, T)) to `sq_norm_sink.grad[:, 0]` in backward.

    `example_offsets` (int64 (E+1,), *optional*) groups the B·T flattened rows into E
    documents (padding-free batches); the sink then has E rows.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `rows` (a view, same values) and the tie `link`
        (B, T·D + 1) to pass to the tied head's `linear_with_sq_norms` when `with_link`.
    """
    return _EmbeddingSqNormTap.apply(
        rows, ids, sq_norm_sink, example_offsets, num_embeddings, padding_idx, with_link
    )
