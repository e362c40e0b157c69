"""Wrapped models: DDP and PEFT are handled; compiled, FSDP and DataParallel models are refused."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from patching_tiny_models import BATCH, loss_of, tiny_batch, tiny_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import hf_gns


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A single-process gloo group on CPU (world size 1)."""
    init_file = tmp_path_factory.mktemp("dist") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", world_size=1, rank=0)
    assert dist.get_world_size() == 1
    yield
    dist.destroy_process_group()


def test_ddp_is_patched_through_and_keys_are_the_wrappers_names(process_group):
    reference = tiny_model("llama")
    hf_gns.patch(reference)
    loss_of(reference, tiny_batch()).backward()
    expected = hf_gns.per_example_sq_norms(reference)

    ddp = DistributedDataParallel(tiny_model("llama"))
    report = hf_gns.patch(ddp)
    assert report.patched and all(entry.name.startswith("module.") for entry in report.patched)
    loss_of(ddp, tiny_batch()).backward()
    norms = hf_gns.per_example_sq_norms(ddp)
    assert set(norms) <= {name for name, _ in ddp.named_parameters()}
    assert sorted(norms) == sorted(report.tracked_parameters)
    for name, values in expected.items():
        torch.testing.assert_close(norms[f"module.{name}"], values, rtol=1e-5, atol=0)
    # the inner model answers with its own names
    assert sorted(hf_gns.per_example_sq_norms(ddp.module)) == sorted(expected)
    assert hf_gns.unpatch(ddp) == len(report.patched)


def test_patching_before_ddp_works_too(process_group):
    model = tiny_model("gpt2")
    hf_gns.patch(model)
    ddp = DistributedDataParallel(model)
    loss_of(ddp, tiny_batch()).backward()
    assert all(values.shape == (BATCH,) for values in hf_gns.per_example_sq_norms(ddp).values())


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp_is_refused_with_advice(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    cpu = torch.device("cpu")
    wrapped = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), device_id=cpu)
    with pytest.raises(TypeError, match="before wrapping the model with FullyShardedDataParallel"):
        hf_gns.patch(wrapped)
    sharded = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    fully_shard(sharded)
    with pytest.raises(TypeError, match="call hf_gns.patch\\(model\\) before wrapping"):
        hf_gns.patch(sharded)


def test_compiled_models_are_refused_with_advice():
    model = tiny_model("gpt2")
    with pytest.raises(TypeError, match=r"call hf_gns.patch\(model\) before torch.compile\(model\)"):
        hf_gns.patch(torch.compile(model, backend="eager"))
    model.compile(backend="eager")
    with pytest.raises(TypeError, match=r"before model.compile\(\)"):
        hf_gns.patch(model)


def test_data_parallel_is_refused():
    with pytest.raises(TypeError, match="use DistributedDataParallel"):
        hf_gns.patch(nn.DataParallel(tiny_model("gpt2")))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_patches_frozen_norms_and_tracks_modules_to_save():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    model = peft.get_peft_model(tiny_model("llama"), config)
    report = hf_gns.patch(model)
    assert all(entry.name.startswith("base_model.model.") for entry in report.patched)
    # "norm" matches every *norm module: each gets a trainable copy; the frozen originals are not tracked
    assert len(report.patched) == 10 and len(report.tracked_parameters) == 5
    assert all(name.endswith(".modules_to_save.default.weight") for name in report.tracked_parameters)
    loss_of(model, tiny_batch()).backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert sorted(norms) == sorted(report.tracked_parameters)
    assert all(values.shape == (BATCH,) for values in norms.values())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_lora_without_trainable_norms_says_nothing_is_tracked():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    report = hf_gns.patch(model)
    assert report.patched and not report.tracked_parameters
    assert "no parameter is tracked" in str(report)
    loss_of(model, tiny_batch()).backward()
    assert hf_gns.per_example_sq_norms(model) == {}
