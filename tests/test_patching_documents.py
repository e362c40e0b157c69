"""Finding the documents of padding-free batches (`hf_gns.patching.documents`)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from hf_gns.kernels.linear_reference import max_example_rows
from hf_gns.patching.documents import count_documents, example_offsets_from_batch, offsets_for_rows

DOCUMENTS = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}, {"input_ids": [9, 10, 11, 12]}]


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_flattening_collator_batches_give_one_example_per_document(flash_kwargs):
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(DOCUMENTS)
    offsets = example_offsets_from_batch(batch)
    assert offsets.dtype == torch.int64 and offsets.tolist() == [0, 3, 4, 8]
    assert max_example_rows(offsets) == 4  # known on the host: layers never sync for it
    assert count_documents(batch) == 3


def test_position_ids_starting_elsewhere_and_restarts_across_rows_of_a_batch():
    batch = DataCollatorWithFlattening(position_ids_start=2)(DOCUMENTS)  # RoBERTa-style positions
    assert example_offsets_from_batch(batch).tolist() == [0, 3, 4, 8]
    rows = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]),
    }
    assert example_offsets_from_batch(rows).tolist() == [0, 2, 5, 10]  # every row starts a document


def test_ordinary_batches_have_no_documents():
    ids = torch.zeros(3, 4, dtype=torch.long)
    assert example_offsets_from_batch({"input_ids": ids}) is None
    assert (
        example_offsets_from_batch({"input_ids": ids, "position_ids": torch.arange(4).expand(3, 4)}) is None
    )
    assert example_offsets_from_batch({"input_ids": ids, "position_ids": torch.arange(4)[None]}) is None
    assert count_documents({"input_ids": ids}) is None


def test_unsupported_markers_fail_with_a_clear_error():
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(DOCUMENTS)
    with pytest.raises(ValueError, match="cu_seq_lens_k == cu_seq_lens_q"):
        example_offsets_from_batch({**batch, "cu_seq_lens_k": torch.tensor([0, 4, 8], dtype=torch.int32)})
    with pytest.raises(ValueError, match="cu_seq_lens_k == cu_seq_lens_q"):
        example_offsets_from_batch({**batch, "cu_seq_lens_k": torch.tensor([0, 2, 4, 8], dtype=torch.int32)})
    with pytest.raises(ValueError, match="rise from 0 to the batch's 8 tokens"):
        example_offsets_from_batch(
            {**batch, "cu_seq_lens_q": torch.tensor([0, 3, 4, 9]), "cu_seq_lens_k": None}
        )
    plain = DataCollatorWithFlattening()(DOCUMENTS)
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        example_offsets_from_batch({**plain, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])})
    with pytest.raises(ValueError, match="position_ids of shape"):
        example_offsets_from_batch({**plain, "position_ids": plain["position_ids"].expand(3, 1, 8)})


def test_offsets_for_rows_scale_token_offsets_to_per_head_rows():
    offsets = torch.tensor([0, 3, 4, 8])
    assert offsets_for_rows(offsets, torch.zeros(1, 8, 16), (1, 8)) is offsets
    assert offsets_for_rows(offsets, torch.zeros(8, 16), (1, 8)) is offsets  # flattened (B·T, D)
    per_head = offsets_for_rows(offsets, torch.zeros(1, 8, 4, 16), (1, 8))  # (B, T, H, Dh)
    assert per_head.tolist() == [0, 12, 16, 32]
    assert offsets_for_rows(offsets, torch.zeros(1, 8, 4, 16), (1, 8)) is per_head  # made once per forward
    with pytest.raises(ValueError, match="token-major"):
        offsets_for_rows(offsets, torch.zeros(1, 4, 8, 16), (1, 8))  # heads before tokens


# --------------------------------------------------------------------------- end to end


def per_document_oracle(model, documents, n_predicted):
    """|c_e|² per parameter: document e alone through the unpatched model, its summed token loss
    divided by the pack's predicted-token count (the packed loss's mean), plain autograd."""
    norms = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    for document in documents:
        ids = torch.tensor([document["input_ids"]])
        model.zero_grad()
        logits = model(input_ids=ids).logits.double()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum") / n_predicted
        if ids.shape[1] > 1:  # a one-token document predicts nothing: zero contribution
            loss.backward()
        for name, param in model.named_parameters():
            if name in norms:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                norms[name].append(grad.double().square().sum())
    return {name: torch.stack(values) for name, values in norms.items()}


PACK = [
    {"input_ids": [5, 6, 7, 8, 9]},
    {"input_ids": [10]},
    {"input_ids": [11, 12, 13]},
    {"input_ids": [3, 4]},
]


@pytest.mark.parametrize(
    "arch, targets, flash_kwargs, backend",
    [
        ("llama", "norms", False, "torch"),
        ("llama", "all", False, "torch"),
        ("llama", "all", True, "torch"),
        ("qwen3", "norms", False, "torch"),
        ("qwen3", "norms", False, "triton"),
    ],
    ids=["llama-norms", "llama-all", "llama-all-cu_seq", "qwen3-per-head-norms", "qwen3-triton"],
)
def test_patched_tiny_model_gives_per_document_norms_of_a_flattened_batch(
    arch, targets, flash_kwargs, backend
):
    """DataCollatorWithFlattening → one (1, N) row of 4 documents: hf_gns reports 4 examples per
    parameter, each the norm of that document's own contribution. (Eager/SDPA attention keeps
    documents apart only with use_cache=False: transformers builds the block-diagonal mask from
    position_ids when there is no cache.)"""
    import hf_gns
    from tests.conftest import triton_runs_here
    from tests.patching_tiny_models import tiny_model

    if backend == "triton" and not triton_runs_here("cpu"):
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(PACK)
    n_predicted = int((batch["labels"] != -100).sum())
    hf_gns.patch(model, targets=targets)
    with hf_gns.kernels.use_backend(backend):
        model(**batch, use_cache=False).loss.backward()
    got = hf_gns.per_example_sq_norms(model)
    exact = per_document_oracle(reference, PACK, n_predicted)
    assert hf_gns.patching.check_step_statistics(model, len(PACK)) == []
    if arch == "qwen3":  # q_norm sees (1, N, H, Dh): document offsets scaled to H rows a token
        assert "model.layers.0.self_attn.q_norm.weight" in got
    if targets == "all":
        assert "model.embed_tokens.weight" in got and "model.layers.0.self_attn.q_proj.weight" in got
    for name, values in got.items():
        assert values.shape == (len(PACK),), name
        torch.testing.assert_close(values.double(), exact[name], rtol=1e-4, atol=1e-9, msg=name)


def test_tied_embedding_with_documents_reports_the_summed_contribution_per_document():
    """GPT-2 (wte tied to lm_head, Conv1D layers, wpe looked up at the restarting position ids)."""
    import hf_gns
    from tests.patching_tiny_models import tiny_model

    model = tiny_model("gpt2")
    reference = copy.deepcopy(model)
    batch = DataCollatorWithFlattening()(PACK)
    n_predicted = int((batch["labels"] != -100).sum())
    hf_gns.patch(model, targets="all")
    with hf_gns.kernels.use_backend("torch"):
        model(**batch, use_cache=False).loss.backward()
    got = hf_gns.per_example_sq_norms(model)
    exact = per_document_oracle(reference, PACK, n_predicted)
    assert "transformer.wte.weight" in got and "transformer.wpe.weight" in got
    for name, values in got.items():
        torch.testing.assert_close(values.double(), exact[name], rtol=1e-4, atol=1e-9, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_gpu_patched_tiny_llama_gives_per_document_norms(flash_kwargs):
    """On CUDA (Triton kernels, batch tensors on the GPU): the same per-document norms as the CPU oracle."""
    import hf_gns
    from tests.patching_tiny_models import tiny_model

    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(PACK)
    n_predicted = int((batch["labels"] != -100).sum())
    model = model.cuda()
    hf_gns.patch(model, targets="all")
    cuda_batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model(**cuda_batch, use_cache=False).loss.backward()
    got = hf_gns.per_example_sq_norms(model)
    exact = per_document_oracle(reference, PACK, n_predicted)
    for name, values in got.items():
        torch.testing.assert_close(values.cpu().double(), exact[name], rtol=1e-3, atol=1e-9, msg=name)


def test_prepared_sinks_have_one_row_per_document():
    """`prepare_sinks` (called before a compiled forward) sizes the sinks to E documents too."""
    import hf_gns
    from hf_gns.patching import model_hook
    from tests.patching_tiny_models import tiny_model

    model = tiny_model("llama")
    hf_gns.patch(model)
    batch = DataCollatorWithFlattening()(PACK)
    model_hook.prepare_sinks(model, batch)
    hook = model.__dict__[model_hook.HOOK_ATTRIBUTE][0]
    assert all(state.sinks.has_spare(len(PACK), torch.device("cpu")) for _, state in hook.norms)
    model(**batch, use_cache=False).loss.backward()
    assert all(values.shape == (len(PACK),) for values in hf_gns.per_example_sq_norms(model).values())
