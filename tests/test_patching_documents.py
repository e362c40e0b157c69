"""Finding the documents of padding-free batches (`hf_gns.patching.documents`)."""

from __future__ import annotations

import pytest
import torch
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
