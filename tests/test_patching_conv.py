"""nn.Conv1d under `patch(targets="all")`: per-example norms against the micro-batch oracle (fp64)."""

from __future__ import annotations

import pytest
import torch
from patching_tiny_models import per_example_sq_grad_norms
from torch import nn

import hf_gns

B, T, D, V = 3, 9, 6, 32


class _ConvLM(nn.Module):
    """Embedding → causal depthwise conv (Mamba's) → strided dilated conv → head."""

    def __init__(self, groups: int, stride: int, dilation: int, padding):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.causal = nn.Conv1d(D, D, 4, groups=D, padding=3)
        self.conv = nn.Conv1d(D, 2 * D, 3, stride=stride, dilation=dilation, padding=padding, groups=groups)
        self.head = nn.Linear(2 * D, V)

    def forward(self, input_ids):
        x = self.embed(input_ids).transpose(1, 2)  # (B, D, T)
        x = self.causal(x)[..., : input_ids.shape[1]]  # causal: cut to T
        x = torch.tanh(self.conv(x)).transpose(1, 2)  # (B, L_out, 2D)
        return self.head(x)


def _loss(model, ids):
    return model(input_ids=ids).logsumexp(-1).mean(1).sum()


@pytest.mark.parametrize(
    "groups, stride, dilation, padding", [(1, 1, 1, 1), (2, 2, 2, 0), (D, 1, 1, "same"), (3, 1, 2, "valid")]
)
def test_conv1d_norms_equal_the_micro_batch_oracle(groups, stride, dilation, padding):
    torch.manual_seed(0)
    model = _ConvLM(groups, stride, dilation, padding).double()
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    expected = per_example_sq_grad_norms(model, ids, _loss)
    report = hf_gns.patch(model, targets="all")
    assert report.tracked_elements == report.trainable_elements
    assert any("Conv1d" in entry.method for entry in report.layers)
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    for name in ("causal.weight", "causal.bias", "conv.weight", "conv.bias"):
        torch.testing.assert_close(norms[name].double(), expected[name], rtol=1e-7, atol=1e-14)
    hf_gns.unpatch(model)
    assert "forward" not in model.conv.__dict__


def test_conv_kinds_other_than_conv1d_are_listed_untracked():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv1d(2, 2, 1, padding_mode="circular"))
    report = hf_gns.patch(model, targets="all")
    reasons = {entry.name: entry.reason for entry in report.untracked}
    assert "Conv2d" in reasons["0.weight"] and "padding_mode='circular'" in reasons["1.weight"]
