"""patch / unpatch: per-instance binding, idempotence, strict mode, checkpoints, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from patching_tiny_models import loss_of, tiny_batch, tiny_model
from torch import nn

import hf_gns


def test_patch_binds_per_instance_and_touches_no_class_or_parameter():
    model = tiny_model("llama")
    norm_class = type(model.model.norm)
    class_forward = norm_class.forward
    parameters = {name: p for name, p in model.named_parameters()}
    state_dict_keys = list(model.state_dict())
    hf_gns.patch(model)
    assert norm_class.forward is class_forward and type(model.model.norm) is norm_class
    assert nn.LayerNorm.forward is nn.LayerNorm.__dict__["forward"]
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == state_dict_keys
    assert model.model.norm.forward.__self__ is model.model.norm
    other = tiny_model("llama")  # another instance of the same class stays unpatched
    assert "forward" not in other.model.norm.__dict__


def test_patching_twice_is_a_no_op():
    model = tiny_model("gpt2")
    first = hf_gns.patch(model)
    forward = model.transformer.ln_f.forward
    second = hf_gns.patch(model)
    assert model.transformer.ln_f.forward is forward
    assert [e.name for e in second.patched] == [e.name for e in first.patched]
    assert {e.source for e in second.patched} == {"earlier call"}
    assert second.tracked_parameters == first.tracked_parameters
    assert len(model._forward_pre_hooks) == 1
    assert "patched by an earlier call" in str(second)


def test_strict_names_every_uncovered_norm_and_leaves_the_model_alone():
    # GroupNorm normalizes over channels-first groups: neither the fused op nor the per-example call
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.GroupNorm(4, 8))
    with pytest.raises(hf_gns.NormPatchError) as error:
        hf_gns.patch(model, strict=True)
    message = str(error.value)
    for name in ("  2 (GroupNorm)", "  3 (GroupNorm)"):
        assert name in message
    assert "normalizes over other dims" in message and "register_norm" in message
    assert not any(key.startswith("_hf_gns") for m in model.modules() for key in m.__dict__)
    report = hf_gns.patch(model)  # without strict: patches what it can
    assert len(report.patched) == 1 and len(report.uncovered) == 2


def test_strict_accepts_weightless_norms():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8, elementwise_affine=False), nn.LayerNorm(8))
    report = hf_gns.patch(model, strict=True)
    assert [e.name for e in report.patched] == ["2"]
    assert [e.reason for e in report.skipped] == ["no learnable weight: nothing to track (left unpatched)"]


class _SharedParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.block = nn.Sequential(nn.Linear(8, 8), self.norm)

    def forward(self, x):
        return self.block(self.norm(x))


def test_a_module_reachable_twice_is_patched_on_the_summing_path():
    # its per-example values are checked against the oracle in test_patching_exact.py
    report = hf_gns.patch(_SharedParent())
    assert [entry.name for entry in report.patched] == ["norm"] and not report.skipped
    assert "called from 'norm', 'block.1'" in report.patched[0].flavour


def test_an_instance_level_forward_override_is_respected():
    model = nn.Sequential(nn.LayerNorm(8))
    model[0].forward = lambda x: x
    report = hf_gns.patch(model)
    assert report.skipped[0].reason.startswith("its forward is already replaced on the instance")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_checkpoints_are_those_of_the_unpatched_model(arch, tmp_path):
    unpatched, patched = tiny_model(arch), tiny_model(arch)
    hf_gns.patch(patched)
    loss_of(patched, tiny_batch()).backward()  # sinks and statistics exist
    assert patched.state_dict().keys() == unpatched.state_dict().keys()
    assert all(torch.equal(v, unpatched.state_dict()[k]) for k, v in patched.state_dict().items())

    unpatched.save_pretrained(tmp_path / "unpatched")
    patched.save_pretrained(tmp_path / "patched")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "patched" / file).read_bytes() == (tmp_path / "unpatched" / file).read_bytes(), (
            file
        )

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "patched", attn_implementation="eager"
    )
    assert not any(key.startswith("_hf_gns") for m in loaded.modules() for key in m.__dict__)
    input_ids = tiny_batch()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids).logits, unpatched.eval()(input_ids).logits)


def test_unpatched_copy_of_patched_model_is_plain():
    model = tiny_model("llama")
    hf_gns.patch(model)
    clone = copy.deepcopy(model)
    hf_gns.unpatch(clone)
    assert not any(
        key.startswith("_hf_gns") or key == "forward" for m in clone.modules() for key in m.__dict__
    )
    assert not clone._forward_pre_hooks and len(model._forward_pre_hooks) == 1
    assert "forward" in model.model.norm.__dict__
