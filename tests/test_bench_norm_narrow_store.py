"""`benchmarks/norm_narrow_store.py`: a GPU-only comparison that says so, in one line, without a GPU."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import norm_narrow_store  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_without_a_gpu_it_says_why_and_exits_2(capsys):
    assert norm_narrow_store.main([]) == 2
    assert capsys.readouterr().out.strip() == (
        "norm_narrow_store.py: needs a CUDA GPU (the CPU interpreter truncates fp32 -> bf16)"
    )


@pytest.mark.gpu
def test_gpu_narrow_store_differs_from_the_cast_in_few_outputs():
    result = norm_narrow_store.compare((8, 2048, 768), rms=True)
    assert result["bf16 outputs differing"] < result["outputs"] // 10_000  # H200: 22 of 12.6M
