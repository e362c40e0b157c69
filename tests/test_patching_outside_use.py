"""Tracked parameters used outside their module's forward: untracked on the first training forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hf_gns


class _Reaching(nn.Module):
    """`proj.weight` is used by the parent too (as Mamba's mixer uses `dt_proj.weight`)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(16, width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, 16)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = self.proj(x) + x @ self.proj.weight.t()  # inside and outside its module
        return self.head(x)


def test_a_weight_used_outside_its_module_is_untracked_and_listed_after_the_first_forward():
    model = _Reaching()
    report = hf_gns.patch(model, targets="all")
    assert "proj.weight" in report.tracked_parameters  # statically, nothing tells
    ids = torch.randint(0, 16, (3, 5))
    model(input_ids=ids).sum().backward()
    assert "proj.weight" not in report.tracked_parameters
    reasons = {entry.name: entry.reason for entry in report.untracked}
    assert (
        "used outside its module's forward" in reasons["proj.weight"]
        and "_Reaching" in reasons["proj.weight"]
    )
    assert report.tracked_elements == report.trainable_elements - model.proj.weight.numel()
    norms = hf_gns.per_example_sq_norms(model)
    assert "proj.weight" not in norms and norms["proj.bias"].shape == (3,)
    hf_gns.patching.check_step_statistics(model, 3)  # the rest is complete
    assert "proj.weight" not in hf_gns.patching.tracked_parameter_names(model)
    assert not any("outside_use" in key for key in model.__dict__)  # the finder removed itself


def test_strict_raises_on_the_first_forward_and_metadata_reads_do_not_count():
    model = _Reaching()
    hf_gns.patch(model, targets="all", strict=True)
    with pytest.raises(RuntimeError, match=r"proj\.weight: used outside its module's forward"):
        model(input_ids=torch.randint(0, 16, (2, 3)))
    hf_gns.unpatch(model)

    class _Reads(_Reaching):
        def forward(self, input_ids):
            assert self.proj.weight.dtype == torch.float32 and self.proj.weight.shape[0] == 4
            return self.head(self.proj(self.embed(input_ids)))

    model = _Reads()
    report = hf_gns.patch(model, targets="all", strict=True)
    model(input_ids=torch.randint(0, 16, (2, 3))).sum().backward()
    assert report.tracked_elements == report.trainable_elements
