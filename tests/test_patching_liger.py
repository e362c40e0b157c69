"""Liger-Kernel and hf_gns in either order: hf_gns's fused op takes every norm over, exactly.

Liger's Triton kernels do not run on CPU (not even under TRITON_INTERPRET=1 at 0.8.5), so
these tests apply Liger's norm patch only (`rms_norm=True`, no RoPE/SwiGLU/fused CE) and
never call Liger's kernels: after hf_gns takes the norms over, the model runs on CPU. The
GPU check with all of Liger's kernels is `benchmarks/liger_gns.py`.
"""

from __future__ import annotations

import pytest
import torch
from patching_tiny_models import BATCH, HIDDEN, loss_of, tiny_batch, tiny_model

import hf_gns
from hf_gns.patching.liger import liger_norm_spec

liger_monkey_patch = pytest.importorskip("liger_kernel.transformers.monkey_patch")
from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm  # noqa: E402

NORM_NAMES = [
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
    "model.norm",
]


@pytest.fixture
def apply_liger(monkeypatch):
    """Liger's instance patch of the norms, as the Trainer applies it; the module-level class swap
    it also makes (modeling_llama.LlamaRMSNorm = LigerRMSNorm) is undone at once."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", modeling_llama.LlamaRMSNorm)
    hf_class = modeling_llama.LlamaRMSNorm

    def apply(model):
        liger_monkey_patch._apply_liger_kernel_to_instance(
            model=model, rope=False, swiglu=False, fused_linear_cross_entropy=False, rms_norm=True
        )
        modeling_llama.LlamaRMSNorm = hf_class

    return apply


def _oracle_sq_norms(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """|c_b|² of every norm weight: example b alone through an unpatched fp64 model, gradient / B."""
    model = tiny_model("llama", dtype=torch.float64)
    values = {name: [] for name in NORM_NAMES}
    for b in range(input_ids.shape[0]):
        model.zero_grad()
        loss_of(model, input_ids[b : b + 1]).backward()
        for name in NORM_NAMES:
            grad = model.get_submodule(name).weight.grad
            values[name].append((grad / input_ids.shape[0]).square().sum())
    return {f"{name}.weight": torch.stack(v) for name, v in values.items()}


def _assert_exact(model, input_ids):
    hf_gns.zero_stats(model)
    loss_of(model, input_ids).backward()
    assert hf_gns.patching.check_step_statistics(model, input_ids.shape[0]) == []
    norms = hf_gns.per_example_sq_norms(model)
    oracle = _oracle_sq_norms(input_ids)
    assert sorted(norms) == sorted(oracle)
    for name, expected in oracle.items():
        torch.testing.assert_close(norms[name].double(), expected, rtol=1e-4, atol=1e-12, msg=name)


def test_liger_first_then_patch_takes_the_norms_over(apply_liger):
    model = tiny_model("llama")
    apply_liger(model)
    liger_forward = model.model.norm.forward
    assert liger_forward.__func__ is LigerRMSNorm.forward
    report = hf_gns.patch(model, strict=True)
    assert [e.name for e in report.patched] == NORM_NAMES
    assert {e.source for e in report.patched} == {"liger"}
    assert {e.flavour for e in report.patched} == {"RMSNorm cast-x̂ out=input"}
    _assert_exact(model, tiny_batch())
    hf_gns.unpatch(model)  # Liger's forward comes back
    assert model.model.norm.forward == liger_forward


def test_liger_after_patch_is_caught_by_the_guard_and_patch_again_rebinds(apply_liger):
    model = tiny_model("llama")
    hf_gns.patch(model)
    apply_liger(model)  # what Trainer.train() does after GNSTrainer.__init__ patched
    for name in NORM_NAMES:  # Liger's math in torch, to run on CPU (its Triton kernel needs a GPU)
        module = model.get_submodule(name)
        module.__dict__["forward"] = _liger_rms_forward_in_torch.__get__(module)
    loss_of(model, tiny_batch()).backward()
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError) as error:
        hf_gns.patching.check_step_statistics(model, BATCH)
    message = str(error.value)
    assert all(f"{name}.weight (module '{name}')" in message for name in NORM_NAMES)
    assert "replaced after hf_gns.patch" in message

    for name in NORM_NAMES:  # Liger's real forward, as the Trainer leaves it
        module = model.get_submodule(name)
        module.__dict__["forward"] = LigerRMSNorm.forward.__get__(module)
    report = hf_gns.patch(model)
    rebound = "re-bound (its forward had been replaced by liger_kernel.transformers.rms_norm.LigerRMSNorm"
    assert all(e.source.startswith(rebound) for e in report.patched)
    model.zero_grad()
    _assert_exact(model, tiny_batch())
    again = hf_gns.patch(model)
    assert {e.source for e in again.patched} == {"earlier call"}


def _liger_rms_forward_in_torch(self, hidden_states):
    """LigerRMSNorm.forward with casting_mode='llama', offset 0, written in torch."""
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return (x.to(hidden_states.dtype) * (self.offset + self.weight)).to(hidden_states.dtype)


def test_liger_norm_modules_are_taken_over_with_their_offset_and_casting_mode():
    model = tiny_model("llama")
    reference = tiny_model("llama")
    hf_gns.patch(reference)
    for name in NORM_NAMES:  # what models built after apply_liger_kernel_to_llama() hold
        liger = LigerRMSNorm(HIDDEN, eps=model.config.rms_norm_eps)
        liger.weight.data.copy_(model.get_submodule(name).weight)
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, liger)
    report = hf_gns.patch(model, strict=True)
    assert [(e.name, e.class_name, e.source) for e in report.patched] == [
        (name, "LigerRMSNorm", "liger") for name in NORM_NAMES
    ]
    _assert_exact(model, tiny_batch())


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (LigerRMSNorm(8), hf_gns.NormSpec(rms=True, cast_before_weight=True, eps_attr="variance_epsilon")),
        (
            LigerRMSNorm(8, offset=1.0, casting_mode="gemma", init_fn="zeros"),
            hf_gns.NormSpec(rms=True, weight_offset=1.0, eps_attr="variance_epsilon"),
        ),
        (LigerRMSNorm(8, casting_mode="none"), hf_gns.NormSpec(rms=True, eps_attr="variance_epsilon")),
        (LigerLayerNorm(8, bias=True), hf_gns.NormSpec(rms=False, eps_attr="variance_epsilon")),
        (torch.nn.LayerNorm(8), None),
    ],
)
def test_liger_attributes_map_to_norm_specs(module, expected):
    assert liger_norm_spec(module) == expected


def test_liger_gemma_casting_matches_its_math():
    """The Gemma mapping (offset 1, fp32 throughout) reproduces Liger's formula in bf16."""
    liger = LigerRMSNorm(HIDDEN, offset=1.0, casting_mode="gemma", init_fn="zeros").to(torch.bfloat16)
    torch.nn.init.normal_(liger.weight, std=0.1)
    hf_gns.patch(liger)
    x = torch.randn(3, 5, HIDDEN, dtype=torch.bfloat16)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + liger.variance_epsilon)
    expected = (h * (1.0 + liger.weight.float())).to(torch.bfloat16)
    assert torch.equal(liger(x), expected)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kwargs", [{}, {"offset": 1.0, "casting_mode": "gemma", "init_fn": "zeros"}, {"casting_mode": "none"}]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_taken_over_liger_norms_compute_what_liger_computes(kwargs, dtype):
    """hf_gns's op in a LigerRMSNorm's place against Liger's own kernel: the same output, within
    one rounding of the output dtype ("none" casting: Liger computes in bf16, hf_gns in fp32)."""
    torch.manual_seed(0)
    liger = LigerRMSNorm(HIDDEN * 4, **kwargs).cuda().to(dtype)
    torch.nn.init.normal_(liger.weight, mean=0.0 if kwargs else 1.0, std=0.1)
    x = torch.randn(4, 64, HIDDEN * 4, device="cuda", dtype=dtype)
    expected = liger(x.clone())
    hf_gns.patch(liger)
    actual = liger(x.clone())
    assert actual.dtype == expected.dtype
    tolerance = 2 * torch.finfo(dtype).eps * (8 if kwargs.get("casting_mode") == "none" else 1)
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
def test_gpu_norms_under_every_liger_kernel_equal_the_micro_batch_oracle(monkeypatch):
    """Liger's full instance patch (RoPE, SwiGLU, fused linear cross-entropy, RMSNorm) then
    hf_gns.patch: per-example norms equal one-example-at-a-time autograd through the same model."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger swaps them module-wide
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    model = tiny_model("llama").cuda()
    liger_monkey_patch._apply_liger_kernel_to_instance(model=model)
    hf_gns.patch(model, strict=True)
    input_ids = tiny_batch().cuda()
    loss_of(model, input_ids).backward()
    assert hf_gns.patching.check_step_statistics(model, BATCH) == []
    norms = {k: v.clone() for k, v in hf_gns.per_example_sq_norms(model).items()}
    params = dict(model.named_parameters())
    for b in range(BATCH):
        model.zero_grad()
        hf_gns.zero_stats(model)
        loss_of(model, input_ids[b : b + 1]).backward()
        for name, values in norms.items():
            oracle = (params[name].grad.double() / BATCH).square().sum()
            torch.testing.assert_close(values[b].double(), oracle, rtol=1e-3, atol=1e-12, msg=name)
