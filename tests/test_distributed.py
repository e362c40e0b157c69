"""distributed.grad_sq_norm_shares in one process: fused squared norms equal the plain ones."""

from __future__ import annotations

import torch

from hf_gns import distributed


def test_fused_grad_sq_norms_equal_one_reduction_per_gradient():
    generator = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(7, generator=generator),
        None,
        torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        torch.zeros(0),
        torch.randn(4, generator=generator, dtype=torch.float64),
    ]
    expected = torch.tensor(
        [0.0 if g is None else g.double().square().sum().item() for g in grads], dtype=torch.float64
    )
    for sharded in (False, True):
        shares = distributed.grad_sq_norm_shares(grads, sharded=sharded)
        assert shares.dtype == torch.float32 and shares.shape == (5,)
        torch.testing.assert_close(shares.double(), expected, rtol=1e-6, atol=0)
    assert distributed.grad_sq_norm_shares([None, None], sharded=False).tolist() == [0.0, 0.0]
    assert distributed.grad_sq_norm_shares([], sharded=False).shape == (0,)
