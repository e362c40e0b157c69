"""Modules using their own parameters functionally (`own_parameters.py`) against the micro-batch oracle."""

from __future__ import annotations

import copy

import torch
from patching_tiny_models import per_example_sq_grad_norms
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


def _patched_against_the_oracle(model: nn.Module, **patch_kwargs):
    """Patch `model` (fp64) with targets="all": every parameter's per-example norms equal the
    micro-batch oracle's (fp32 sinks); returns the report and the (B, T) ids used."""
    ids = torch.randint(0, 16, (B, T), generator=torch.Generator().manual_seed(1))
    expected = per_example_sq_grad_norms(model, ids, _loss)
    report = hf_gns.patch(model, targets="all", **patch_kwargs)
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert set(norms) == set(expected)
    for name, values in norms.items():
        torch.testing.assert_close(values.double(), expected[name], rtol=1e-5, atol=0, msg=name)
    return report, ids


def test_a_module_with_three_parameters_of_its_own_gets_a_wider_sink_and_exact_norms():
    torch.manual_seed(0)
    model = _Model().double()
    report, _ = _patched_against_the_oracle(model)
    assert {"hc.fn", "hc.base", "hc.scale"} <= set(report.tracked_parameters)
    assert report.tracked_elements == report.trainable_elements
    # the (B, 3) sink next to (B, 2) ones: the fused sums pad it, the same numbers
    norms = hf_gns.per_example_sq_norms(model)
    names = list(norms)
    sums = hf_gns.patching.stats.example_sq_norm_sums(model, names)
    torch.testing.assert_close(sums, torch.stack([norms[n].sum() for n in names]))


class _Router(nn.Module):
    """Reads its submodule's weight without calling it (LongCat's router), takes a keyword argument."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(D, 4, bias=False)

    def forward(self, x, **kwargs):
        logits = nn.functional.linear(x.type(torch.float64), self.classifier.weight.type(torch.float64))
        return logits.softmax(-1) * kwargs.get("position_scale", 1.0)


class _RoutedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, D)
        self.router = _Router()
        self.head = nn.Linear(4, 16)

    def forward(self, ids):
        x = self.embed(ids)
        scale = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype).expand(ids.shape).unsqueeze(-1)
        return self.head(self.router(x, position_scale=scale))


def test_a_module_reading_its_submodules_weight_tracks_it_and_leaves_the_submodule_unpatched():
    torch.manual_seed(0)
    model = _RoutedModel().double()
    before = copy.deepcopy(model)
    report, ids = _patched_against_the_oracle(model, strict=True)  # strict: no outside use found either
    kinds = {entry.name: entry.kind for entry in report.layers}
    assert kinds["router"] == "call" and "router.classifier" not in kinds
    assert "_hf_gns_state" not in model.router.classifier.__dict__
    assert report.tracked_elements == report.trainable_elements
    hf_gns.unpatch(model)
    assert not any(key.startswith("_hf_gns") for m in model.modules() for key in m.__dict__)
    with torch.no_grad():
        assert torch.equal(model(ids), before(ids))


class _SharedExperts(nn.Module):
    """Inkling's shared experts: 3-D weights applied to every token, mixed by per-token weights that
    the router gives flattened batch-major, (B·T, N)."""

    def __init__(self):
        super().__init__()
        self.n_shared_experts = 2
        self.up_proj = nn.Parameter(torch.randn(2, 6, D))
        self.down_proj = nn.Parameter(torch.randn(2, D, 6))

    def forward(self, hidden_states, gammas):
        shape = hidden_states.shape
        x = hidden_states.reshape(1, -1, shape[-1]).expand(self.n_shared_experts, -1, -1)
        up = torch.bmm(x, self.up_proj.transpose(1, 2)).tanh() * gammas.reshape(-1, 2, 1).transpose(0, 1)
        return torch.bmm(up, self.down_proj.transpose(1, 2)).sum(0).view(shape)


class _SharedExpertsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, D)
        self.router = nn.Linear(D, 2)
        self.shared_experts = _SharedExperts()
        self.head = nn.Linear(D, 16)

    def forward(self, ids):
        x = self.embed(ids)
        gammas = self.router(x).sigmoid().reshape(-1, 2)
        return self.head(self.shared_experts(x, gammas=gammas))


def test_per_token_arguments_flattened_batch_major_go_with_their_example():
    torch.manual_seed(0)
    model = _SharedExpertsModel().double()
    report, _ = _patched_against_the_oracle(model, strict=True)
    assert {entry.name: entry.kind for entry in report.layers}["shared_experts"] == "call"
    again = hf_gns.patch(model, targets="all")  # an experts-like module on the call route, patched earlier
    (entry,) = [e for e in again.layers if e.name == "shared_experts"]
    assert entry.source == "earlier call" and entry.kind == "call" and "vmap" in entry.flavour
    assert sorted(again.tracked_parameters) == sorted(report.tracked_parameters)


class _RelativeBias(nn.Module):
    """A raw bank used as `x @ self.proj` next to a Linear and a norm the forward calls (Inkling2-Loop's
    relative position bias), used twice: the per-example norm is that of the summed contribution."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, 2 * 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Parameter(torch.randn(4, 6))
        self.after = None  # a callable on the output (the run-time misuse test)

    def forward(self, x):  # (B, T, D) → (B, T, 2, 6)
        states = self.norm(self.linear(x).view(*x.shape[:-1], 2, 4))
        out = states @ self.proj + states.tanh() @ self.proj
        return out if self.after is None else self.after(out)


class _RelativeBiasModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, D)
        self.bias = _RelativeBias()
        self.head = nn.Linear(12, 16)

    def forward(self, ids):
        return self.head(self.bias(self.embed(ids)).flatten(2))


def test_a_raw_right_operand_of_matmul_is_tracked_while_the_submodules_keep_their_kinds():
    torch.manual_seed(0)
    model = _RelativeBiasModel().double()
    before = copy.deepcopy(model)
    report, ids = _patched_against_the_oracle(model, strict=True)
    kinds = {entry.name: entry.kind for entry in report.modules}
    assert kinds["bias"] == "call" and kinds["bias.linear"] == "linear" and kinds["bias.norm"] == "norm"
    assert report.tracked_elements == report.trainable_elements
    hf_gns.unpatch(model)
    assert not any(key.startswith("_hf_gns") for m in model.modules() for key in m.__dict__)
    with torch.no_grad():
        assert torch.equal(model(ids), before(ids))


def test_a_right_operand_of_matmul_used_otherwise_at_run_time_fails_loudly():
    torch.manual_seed(0)
    model = _RelativeBiasModel().double()
    hf_gns.patch(model, targets="all")
    model.bias.after = lambda out: out * model.bias.proj.sum()  # a use the source check cannot see
    ids = torch.randint(0, 16, (B, T))
    try:
        _loss(model, ids)
    except RuntimeError as error:
        assert "right operand of @" in str(error)
    else:
        raise AssertionError("no error")
