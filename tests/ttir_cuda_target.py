"""A CUDA Triton target on a machine without a GPU, for what needs only TTIR: Inductor's analysis of
what a user kernel writes, and make_fx tracing of `wrap_triton` launches (which runs that analysis).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch


class CudaTarget:
    """An active Triton driver that only names a CUDA target (sm_90), for TTIR generation."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def cuda_target_active():
    """The CUDA target active inside the block (skips the test if this triton has no NVIDIA backend)."""
    import triton

    driver = triton.runtime.driver
    previous = driver.__dict__.get("_active")  # None on a machine without a GPU driver
    driver.set_active(CudaTarget())
    try:
        triton.compiler.compiler.make_backend(CudaTarget().get_current_target())
    except Exception as error:  # a triton build without the NVIDIA backend
        driver._active = previous
        pytest.skip(f"no CUDA backend in this triton: {error}")
    try:
        yield
    finally:
        driver._active = previous  # reset_active() would create a driver, which fails without a GPU


def run_without_interpreter(test_file: str, passed: int) -> None:
    """Run `test_file` in a process without TRITON_INTERPRET=1 (the JIT kernels, hence TTIR) and
    require `passed` tests to pass there: how CI, which interprets, runs the TTIR-dependent tests."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the TTIR tests run in this process")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", test_file]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{passed} passed" in done.stdout, done.stdout[-3000:]
