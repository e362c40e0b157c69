"""Shared test setup.

Kernel tests run the Triton kernels on CPU under TRITON_INTERPRET=1 (`make test` sets
it); GPU tests carry the `gpu` marker and are deselected in CI (`-m "not gpu"`).
"""

import os

import pytest
import torch


def triton_runs_here(device: str) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    if device == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
