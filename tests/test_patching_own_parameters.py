"""Modules using their own parameters functionally (`own_parameters.py`) against the micro-batch oracle."""

from __future__ import annotations

import torch
from torch import nn

import hf_gns

B, T, D, STREAMS = 3, 5, 8, 2


class _HyperConnection(nn.Module):
    """Three raw parameters of its own, streams flattened into the features (HY-V4's hyper-connection)."""

    def __init__(self):
        super().__init__()
        self.streams = STREAMS
        self.fn = nn.Parameter(torch.randn(2 * STREAMS, STREAMS * D))
        self.base = nn.Parameter(torch.randn(2 * STREAMS))
        self.scale = nn.Parameter(torch.randn(2))

    def forward(self, streams):  # (B, T, N, D)
        mixes = nn.functional.linear(streams.flatten(2), self.fn)
        pre_logits, post_logits = mixes.split(self.streams, dim=-1)
        pre_b, post_b = self.base.split(self.streams)
        pre = torch.sigmoid(pre_logits * self.scale[0] + pre_b)
        post = torch.sigmoid(post_logits * self.scale[1] + post_b)
        return post, (pre.unsqueeze(-1) * streams).sum(2)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, STREAMS * D)
        self.hc = _HyperConnection()
        self.head = nn.Linear(D, 16)

    def forward(self, ids):
        post, out = self.hc(self.embed(ids).view(*ids.shape, STREAMS, D))
        return self.head(out * post.sum(-1, keepdim=True))


def _loss(model, ids):
    return model(ids).square().mean((1, 2)).sum()


def test_a_module_with_three_parameters_of_its_own_gets_a_wider_sink_and_exact_norms():
    torch.manual_seed(0)
    model = _Model().double()
    ids = torch.randint(0, 16, (B, T), generator=torch.Generator().manual_seed(1))
    expected = {}
    for b in range(B):
        model.zero_grad(set_to_none=True)
        _loss(model, ids[b : b + 1]).backward()
        for name, param in model.named_parameters():
            expected.setdefault(name, []).append(param.grad.square().sum())
    model.zero_grad(set_to_none=True)
    report = hf_gns.patch(model, targets="all")
    assert {"hc.fn", "hc.base", "hc.scale"} <= set(report.tracked_parameters)
    assert report.tracked_elements == report.trainable_elements
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert set(norms) == set(expected)
    for name, values in norms.items():  # fp32 sinks
        torch.testing.assert_close(values.double(), torch.stack(expected[name]), rtol=1e-5, atol=0, msg=name)
    # the (B, 3) sink next to (B, 2) ones: the fused sums pad it, the same numbers
    names = list(norms)
    sums = hf_gns.patching.stats.example_sq_norm_sums(model, names)
    torch.testing.assert_close(sums, torch.stack([norms[n].sum() for n in names]))
