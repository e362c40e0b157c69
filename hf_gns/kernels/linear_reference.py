"""Per-example squared gradient norms of linear and embedding layers, in plain PyTorch.

Shapes: a linear layer y = A Wᵀ (+ b) sees the input A (B, T, K) and, in backward, the
output gradient G (B, T, L); example b's weight gradient is G_bᵀ A_b (L, K) and its bias
gradient Σ_t G_bt (L,). An embedding looked up at ids (B, T) with output gradient
g (B, T, D) gives example b the weight gradient E_b, E_b[v] = Σ_{t: ids_bt = v} g_bt.

Two ways to |G_bᵀ A_b|² (Gray et al. 2024 §3; Li et al. 2022, "ghost clipping"):
- simultaneous: form the per-example gradients P_b = G_bᵀ A_b with one batched matmul;
  Σ_b P_b is the weight gradient, so the matmul FLOPs are those backward spends anyway,
  and the extra cost is writing and reading B×L×K values (done in chunks of output rows,
  so memory stays bounded);
- ghost: |G_bᵀ A_b|² = ⟨A_b A_bᵀ, G_b G_bᵀ⟩ (two T×T Gram matrices), ~2BT²(K+L) extra
  FLOPs and B×T² memory, never B×L×K.
`linear_cost.py` picks one from the shapes. Norms come back as (B,) tensors in fp32
(fp64 for fp64 inputs), accumulated in that precision. Imports torch only.

Padding-free batches (an example is a document: rows [offsets[e], offsets[e+1]) of the
input flattened to (N, K)): `documents_as_batch` lays the documents out as a zero-padded
(E, T_max, K) batch, on which both methods above are exact (padding rows add nothing to
G_eᵀ A_e, to Σ_t G_et or to the Gram matrices) and Σ_e P_e is still the weight gradient.
It costs E·T_max/N times the unpadded work and memory (≈1 for documents of similar
length) and needs T_max on the host (`max_example_rows`: known without a sync when the
batch came with `max_length_q`, else one device→host read per offsets tensor, cached).
Embeddings need no padding: `embedding_sq_norms(..., example_offsets=...)` keys rows by
document.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# Largest per-example-gradient chunk (bytes) the simultaneous method materializes at once.
DEFAULT_CHUNK_BYTES = 256 * 2**20


# T_max (rows of the longest example) per offsets tensor: set by whoever knows it without a
# host sync (`hf_gns.patching.documents`), else read once from the device and kept.
_MAX_EXAMPLE_ROWS = WeakIdKeyDictionary()


def remember_max_example_rows(example_offsets: torch.Tensor, max_rows: int) -> None:
    """Record T_max for `example_offsets` (known on the host), so no layer syncs to get it."""
    _MAX_EXAMPLE_ROWS[example_offsets] = int(max_rows)


def max_example_rows(example_offsets: torch.Tensor) -> int:
    """T_max = max_e (offsets[e+1] - offsets[e]): remembered, or one device→host read (then kept)."""
    known = _MAX_EXAMPLE_ROWS.get(example_offsets)
    if known is None:
        known = int(example_offsets.diff().max()) if example_offsets.numel() > 1 else 0  # host sync
        _MAX_EXAMPLE_ROWS[example_offsets] = known
    return known


def example_of_rows(example_offsets: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N,) int64: the example owning each row, for offsets (E+1,) covering rows 0..N-1 (no sync).

    Empty examples own no row: row r belongs to the last e with offsets[e] <= r.
    """
    rows = torch.arange(n_rows, device=example_offsets.device)
    return torch.searchsorted(example_offsets[1:], rows, right=True)


def documents_as_batch(
    rows: torch.Tensor, example_offsets: torch.Tensor, max_rows: int | None = None
) -> torch.Tensor:
    """Rows (N, F) regrouped as a zero-padded batch (E, T_max, F): out[e, t] = rows[offsets[e] + t]
    for t < offsets[e+1] - offsets[e], else 0.

    Args:
        rows (`torch.Tensor`): (N, F), the input (or output gradient) flattened to rows.
        example_offsets (`torch.Tensor`): int64 (E+1,), covering rows 0..N-1.
        max_rows (`int`, *optional*): T_max; defaults to `max_example_rows(example_offsets)`.
    """
    if max_rows is None:
        max_rows = max_example_rows(example_offsets)
    starts, ends = example_offsets[:-1, None], example_offsets[1:, None]  # (E, 1)
    index = starts + torch.arange(max_rows, device=rows.device)  # (E, T_max)
    valid = index < ends
    picked = rows[index.clamp_(max=max(rows.shape[0] - 1, 0))]  # (E, T_max, F)
    return picked.masked_fill_(~valid.unsqueeze(-1), 0)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sq_norms_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """|rows_b|² over all dims but the first, accumulated in fp32 without an fp32 copy."""
    return torch.linalg.vector_norm(rows.flatten(1), dim=1, dtype=_accumulation_dtype(rows.dtype)).square()


def _as_documents(example_offsets: torch.Tensor | None, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat rows (N, F) as zero-padded document batches (E, T_max, F) when offsets are given."""
    if example_offsets is None:
        return rows
    max_rows = max_example_rows(example_offsets)
    return tuple(documents_as_batch(r.reshape(-1, r.shape[-1]), example_offsets, max_rows) for r in rows)


def linear_bias_sq_norms(grad_out: torch.Tensor, example_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """|Σ_t G_bt|² for G (B, T, L): per-example squared norms of the bias gradient.

    With `example_offsets` (int64 (E+1,)), G is taken as rows (N, L) of E documents: (E,) norms.
    """
    if example_offsets is not None:
        rows = grad_out.reshape(-1, grad_out.shape[-1]).to(_accumulation_dtype(grad_out.dtype))
        return _sq_norms_of_rows(
            torch.segment_reduce(rows, "sum", offsets=example_offsets, axis=0, unsafe=True)
        )
    return _sq_norms_of_rows(grad_out.sum(1, dtype=_accumulation_dtype(grad_out.dtype)))


def linear_weight_sq_norms_ghost(
    inputs: torch.Tensor, grad_out: torch.Tensor, example_offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """|G_bᵀ A_b|² = ⟨A_b A_bᵀ, G_b G_bᵀ⟩ for A (B, T, K), G (B, T, L), without forming G_bᵀ A_b.

    For T = 1 this is |a_b|²·|g_b|². With `example_offsets` (int64 (E+1,)), A and G are taken
    as rows (N, K), (N, L) of E documents, padded to (E, T_max, ·): (E,) norms.
    """
    inputs, grad_out = _as_documents(example_offsets, inputs, grad_out)
    if inputs.shape[1] == 1:  # (B, K) rows: the outer product's norm is the product of norms
        return _sq_norms_of_rows(inputs) * _sq_norms_of_rows(grad_out)
    dtype = _accumulation_dtype(inputs.dtype)
    gram_a = torch.bmm(inputs, inputs.transpose(1, 2)).to(dtype)  # (B, T, T)
    gram_g = torch.bmm(grad_out, grad_out.transpose(1, 2)).to(dtype)  # (B, T, T)
    return gram_a.mul_(gram_g).sum((1, 2))


def sum_and_sq_norms_reference(per_example: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write Σ_b per_example[b] into `out` (N,) and return |per_example[b]|² (B,), for P (B, N)."""
    out.copy_(per_example.sum(0, dtype=_accumulation_dtype(per_example.dtype)))
    return _sq_norms_of_rows(per_example)


def linear_weight_grad_simultaneous(
    inputs: torch.Tensor,
    grad_out: torch.Tensor,
    out_dtype: torch.dtype,
    transposed: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = sum_and_sq_norms_reference,
    example_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight gradient Σ_b G_bᵀ A_b and the per-example squared norms |G_bᵀ A_b|², from the same matmuls.

    Args:
        inputs (`torch.Tensor`): A, (B, T, K).
        grad_out (`torch.Tensor`): G, (B, T, L), same dtype as `inputs`.
        out_dtype (`torch.dtype`): dtype of the returned weight gradient (the weight's).
        transposed (`bool`, *optional*, defaults to `False`): return the gradient as (K, L),
            the layout of HF's `Conv1D` weight, instead of nn.Linear's (L, K).
        chunk_bytes (`int`, *optional*, defaults to 256 MiB): the per-example gradients of
            as many output rows as fit in this many bytes are formed at once.
        reduce (`Callable`, *optional*): `(P (B, N), out (N,)) -> (B,)` writing the example sum
            into `out` and returning the squared norms; `sum_and_sq_norms_reference` or the
            one-read Triton kernel.
        example_offsets (`torch.Tensor`, *optional*): int64 (E+1,): A and G are rows (N, K),
            (N, L) of E documents (padding-free batches), formed into the zero-padded
            (E, T_max, ·) batch `documents_as_batch` makes; the norms are then (E,).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the weight gradient and the (B,) norms.
    """
    inputs, grad_out = _as_documents(example_offsets, inputs, grad_out)
    n_examples, seq, in_features = inputs.shape
    out_features = grad_out.shape[-1]
    # cuBLAS runs its fast kernels only on 16-byte aligned leading dimensions. Where G's rows are
    # not (an LM head over a 50257-token vocabulary: a slow sm75 path, 3 ms a chunk on the H200),
    # each chunk of Gᵀ is copied contiguous first, (B, rows, T), and chunks are sized so that
    # the copy and P together fit in chunk_bytes.
    # (Eager only: under torch.compile the stride test breaks Dynamo's trace of this backward, and
    # Inductor picks its own layouts.)
    realign = not torch.compiler.is_compiling() and grad_out.stride(1) * grad_out.element_size() % 16 != 0
    row_bytes = n_examples * (in_features + (seq if realign else 0)) * inputs.element_size()
    rows_per_chunk = max(1, chunk_bytes // row_bytes)
    grad_t = grad_out.transpose(1, 2)  # (B, L, T)
    weight_grad = torch.empty(out_features, in_features, dtype=out_dtype, device=inputs.device)
    if rows_per_chunk >= out_features:  # one chunk (most layers): no slicing, no running sum
        per_example = torch.bmm(grad_t.contiguous() if realign else grad_t, inputs)  # (B, L, K): P_b
        sq_norms = reduce(per_example.view(n_examples, -1), weight_grad.view(-1))
        return (weight_grad.t() if transposed else weight_grad), sq_norms
    sq_norms = torch.zeros(n_examples, dtype=_accumulation_dtype(inputs.dtype), device=inputs.device)
    for start in range(0, out_features, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = grad_t[:, rows].contiguous() if realign else grad_t[:, rows]  # (B, rows, T)
        per_example = torch.bmm(chunk, inputs)  # (B, rows, K): P_b for these rows
        sq_norms += reduce(per_example.view(n_examples, -1), weight_grad[rows].view(-1))
    return (weight_grad.t() if transposed else weight_grad), sq_norms


def per_example_linear_grads(inputs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """P_b = G_bᵀ A_b, (B, L, K) in fp32: the obvious definition, for tests."""
    return torch.bmm(grad_out.transpose(1, 2).float(), inputs.float())


def tied_rows(inputs: torch.Tensor, grad_out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """R_bt = Σ_s G_b[s, ids_bt] A_bs: row ids_bt of the head's per-example gradient G_bᵀ A_b.

    For a head tied to an embedding (weight (V, K) shared), the cross term of
    |E_b + G_bᵀ A_b|² is 2⟨E_b, G_bᵀ A_b⟩ = 2 Σ_t ⟨g_bt, R_bt⟩ (E_b is non-zero only in the
    rows looked up by example b). Costs a B×T_s×T_t gather and 2·B·T_s·T_t·K FLOPs.

    Args:
        inputs (`torch.Tensor`): the head's input A, (B, T_s, K).
        grad_out (`torch.Tensor`): its output gradient G, (B, T_s, V).
        ids (`torch.Tensor`): the embedding's ids, (B, T_t).

    Returns:
        `torch.Tensor`: R, (B, T_t, K) in the dtype of `inputs`.
    """
    n_examples, seq_head, _ = grad_out.shape
    index = ids.unsqueeze(1).expand(n_examples, seq_head, ids.shape[1])  # (B, T_s, T_t)
    picked = torch.gather(grad_out, 2, index)  # (B, T_s, T_t): G_b[s, ids_bt]
    return torch.bmm(picked.transpose(1, 2), inputs)


def embedding_sq_norms(
    ids: torch.Tensor,
    grad_out: torch.Tensor,
    num_embeddings: int,
    padding_idx: int | None = None,
    example_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """|E_b|² for an embedding lookup: each example's rows summed separately, then squared.

    Rows with equal ids in one example add up before squaring (|g + g'|², not |g|² + |g'|²).
    Sorting the keys b·V + id groups them, a segment sum adds each group, and every group
    lands in its example: O(B·T·D) work and memory, no T×T matrix, no host sync.

    Args:
        ids (`torch.Tensor`): (B, T) integer ids.
        grad_out (`torch.Tensor`): (B, T, D) gradient of the looked-up rows.
        num_embeddings (`int`): V.
        padding_idx (`int`, *optional*): rows looked up at this id get no gradient.
        example_offsets (`torch.Tensor`, *optional*): int64 (E+1,): examples are the row
            ranges [offsets[e], offsets[e+1]) of the flattened ids (documents of a
            padding-free batch) instead of dim 0; `ids` and `grad_out` may then have any
            leading shape.

    Returns:
        `torch.Tensor`: (B,) fp32 (fp64 for fp64 `grad_out`), (E,) with `example_offsets`.
    """
    if example_offsets is None:
        n_examples, seq = ids.shape
        example = torch.arange(n_examples, device=ids.device).repeat_interleave(seq)  # (B·T,)
    else:
        n_examples = example_offsets.numel() - 1
        example = example_of_rows(example_offsets, ids.numel())  # (N,)
    rows = grad_out.reshape(ids.numel(), -1).to(_accumulation_dtype(grad_out.dtype))  # (B·T, D)
    if padding_idx is not None:
        rows = rows * (ids.reshape(-1, 1) != padding_idx)
    keys = example * num_embeddings + ids.reshape(-1)
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    segment = starts.cumsum(0) - 1  # (B·T,): group index of each sorted row
    sums = torch.zeros_like(rows).index_add_(0, segment, rows[order])  # (B·T, D), unused groups stay 0
    example_of_group = torch.zeros_like(segment).scatter_(0, segment, example[order])
    return torch.zeros(n_examples, dtype=rows.dtype, device=ids.device).index_add_(
        0, example_of_group, sums.square().sum(1)
    )
