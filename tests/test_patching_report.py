"""PatchReport: contents and the printed table."""

from __future__ import annotations

import pytest
import torch
from patching_tiny_models import tiny_model
from torch import nn

import hf_gns
from hf_gns.patching.report import NOT_A_NORM, PatchedNorm, PatchReport, SkippedNorm


def test_report_of_a_model_with_per_head_norms():
    report = hf_gns.patch(tiny_model("cohere"))  # use_qk_norm: per-head (2-D) CohereLayerNorm weights
    assert {e.class_name for e in report.patched} == {"CohereLayerNorm"} and not report.skipped
    fused = [e for e in report.patched if e.flavour == "LayerNorm out=input"]
    per_head = [e for e in report.patched if e.flavour == "per-example call of its own forward (vmap)"]
    assert [e.name for e in fused] == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
        "model.norm",
    ]
    assert all(e.source == "registry" for e in fused) and all(e.source == "probe" for e in per_head)
    assert sorted(e.name.rsplit(".", 1)[-1] for e in per_head) == ["k_norm", "k_norm", "q_norm", "q_norm"]
    assert report.tracked_parameters == [f"{e.name}.weight" for e in report.patched]


def test_printed_table_is_aligned_and_complete():
    report = PatchReport(
        patched=[
            PatchedNorm(
                "a.norm", "LayerNorm", "LayerNorm out=input", "registry", ("a.norm.weight", "a.norm.bias")
            )
        ],
        skipped=[SkippedNorm("a.long_module_name.q_norm", "CohereLayerNorm", "2-D weight (4, 8) …", True)],
        tracked_parameters=["a.norm.weight", "a.norm.bias"],
    )
    lines = str(report).splitlines()
    assert lines[0] == "hf_gns.patch: 1 norm modules patched, 1 skipped, 2 parameters tracked"
    header, patched, skipped = lines[1:]
    for column in ("module", "class", "tracked", "flavour"):
        start = header.index(column)
        assert patched[start - 1] == " " and skipped[start - 1] == " ", column
        assert patched[start] != " " and skipped[start] != " ", column
    assert patched.split()[:4] == ["patched", "a.norm", "LayerNorm", "weight,"]
    assert patched.endswith("LayerNorm out=input [registry]")
    assert skipped.endswith("2-D weight (4, 8) …")


def test_empty_report_prints_its_summary():
    assert str(PatchReport()) == "hf_gns.patch: 0 norm modules patched, 0 skipped, 0 parameters tracked"


class _Experts(nn.Module):
    """Fused experts: one (E, D, D) tensor, used with einsum (no Linear module)."""

    def __init__(self, n_experts: int, width: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, width, width))

    def forward(self, x):
        return torch.einsum("btd,edf->btf", x, self.gate_up_proj)


class _Holes(nn.Module):
    """A model with every kind of parameter the all-layer patch cannot track, and some it can."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)
        self.frozen = nn.Linear(width, width)
        self.frozen.requires_grad_(False)
        self.conv = nn.Conv1d(width, width, 1)  # tracked
        self.conv2d = nn.Conv2d(width, width, 1)  # not supported
        self.experts = _Experts(2, width)
        self.scale = nn.Parameter(torch.ones(width))  # raw parameter used in forward
        self.twin = nn.Linear(width, width, bias=False)
        self.twin_again = nn.Linear(width, width, bias=False)
        self.twin_again.weight = self.twin.weight  # shared by two linears: summed per example

    def forward(self, x):  # (B, T, D)
        x = self.frozen(self.proj(self.norm(x))) * self.scale
        x = self.conv(x.transpose(1, 2)).transpose(1, 2) + self.experts(x)
        x = x + self.conv2d(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return self.twin_again(self.twin(x))


def test_report_lists_every_untracked_trainable_parameter_with_its_reason():
    model = _Holes()
    report = hf_gns.patch(model, targets="all")
    reasons = {entry.name: entry.reason for entry in report.untracked}
    tracked = {
        "norm.weight",
        "norm.bias",
        "proj.weight",
        "proj.bias",
        "twin.weight",
        "conv.weight",
        "conv.bias",
        "experts.gate_up_proj",  # every token through each expert: the per-example call (probed)
    }
    assert set(report.tracked_parameters) == tracked  # twins: summed
    assert set(reasons) == {"conv2d.weight", "conv2d.bias", "scale"}
    assert "Conv2d" in reasons["conv2d.weight"] and "not supported" in reasons["conv2d.bias"]
    assert reasons["scale"] == "raw parameter used functionally by _Holes.forward: not tracked"
    names = dict(model.named_parameters())
    assert all(name in names for name in [*report.tracked_parameters, *reasons])
    assert report.trainable_elements == sum(p.numel() for p in model.parameters() if p.requires_grad)
    norm, proj, twin, conv, experts = 2 * 8, 8 * 8 + 8, 8 * 8, 8 * 8 + 8, 2 * 8 * 8
    assert report.tracked_elements == norm + proj + twin + conv + experts
    assert f"coverage: {report.tracked_elements:,} of {report.trainable_elements:,}" in str(report)
    assert "untracked  scale" in str(report) and "frozen.weight" not in reasons


def test_strict_all_layers_refuses_untracked_parameters_and_leaves_the_model_alone():
    model = _Holes()
    with pytest.raises(hf_gns.NormPatchError, match=r"(?s)3 trainable parameters.*scale \(_Holes\): raw"):
        hf_gns.patch(model, strict=True, targets="all")
    assert not any(key.startswith("_hf_gns") for m in model.modules() for key in m.__dict__)


def test_norm_mode_counts_other_parameters_without_listing_them():
    model = _Holes()
    report = hf_gns.patch(model, strict=True)  # strict in norm mode: about norm modules only
    assert report.tracked_parameters == ["norm.weight", "norm.bias"]
    assert all(entry.reason == NOT_A_NORM for entry in report.untracked)
    assert report.coverage_holes == [] and "untracked " not in str(report)
    assert report.coverage == pytest.approx(16 / report.trainable_elements)
