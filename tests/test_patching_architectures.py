"""hf_gns.patch on 17 tiny HF causal LMs: equivalence, per-example oracle, coverage, unpatch.

Tolerances (fp32 everywhere): logits and loss within rtol 1e-5 / atol 1e-6 of the
unpatched model, parameter gradients within rtol 1e-4 / atol 1e-6 (the atol covers
gradients that are zero in exact arithmetic, such as attention key biases, ~1e-11 here);
per-example squared norms within relative error 1e-4 of the micro-batch oracle (measured:
≤ 2e-6). After unpatch, everything is compared with torch.equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from patching_tiny_models import ARCHITECTURES, BATCH, loss_of, tiny_batch, tiny_model

import hf_gns


def _norm_like_names(model) -> set[str]:
    """Every module whose class name contains "Norm", minus pure containers without own parameters."""
    return {
        name
        for name, module in model.named_modules()
        if "Norm" in type(module).__name__
        and (
            next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None
        )
    }


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _oracle_sq_norms(model, input_ids, names) -> dict[str, torch.Tensor]:
    """One example at a time through the unpatched model, plain autograd.

    The full-batch loss is the mean over the B examples of each example's mean token loss
    (equal lengths), so example i contributes grad_i / B to the full-batch gradient.
    """
    params = dict(model.named_parameters())
    per_example = {name: [] for name in names}
    for i in range(input_ids.shape[0]):
        model.zero_grad()
        loss_of(model, input_ids[i : i + 1]).backward()
        for name in names:
            per_example[name].append((params[name].grad / input_ids.shape[0]).double().square().sum())
    model.zero_grad()
    return {name: torch.stack(values) for name, values in per_example.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_patched_model_matches_unpatched_and_oracle(arch):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    input_ids = tiny_batch()

    expected = reference(input_ids=input_ids, labels=input_ids)
    expected.loss.backward()
    report = hf_gns.patch(model)
    actual = model(input_ids=input_ids, labels=input_ids)
    actual.loss.backward()

    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
    expected_grads, actual_grads = _grads(reference), _grads(model)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    norms = hf_gns.per_example_sq_norms(model)
    assert sorted(norms) == sorted(report.tracked_parameters)
    assert norms, f"{arch}: nothing tracked"
    oracle = _oracle_sq_norms(reference, input_ids, norms)
    for name, values in norms.items():
        assert values.dtype == torch.float32 and values.shape == (BATCH,), name
        relative = (values.double() - oracle[name]).abs() / oracle[name].abs()
        assert relative.max() <= 1e-4, f"{name}: relative error {relative.max():.2e}"

    reported = {entry.name for entry in report.patched} | {entry.name for entry in report.skipped}
    assert reported == _norm_like_names(model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_unpatch_restores_outputs_and_grads_bit_for_bit(arch):
    model = tiny_model(arch)
    reference = copy.deepcopy(model)
    before = {name: id(p) for name, p in model.named_parameters()}
    input_ids = tiny_batch()

    hf_gns.patch(model)
    loss_of(model, input_ids).backward()
    model.zero_grad(set_to_none=True)
    assert hf_gns.unpatch(model) > 0

    for module in model.modules():
        assert not any(key.startswith("_hf_gns") for key in module.__dict__)
        assert "forward" not in module.__dict__
        assert not module._forward_pre_hooks
    assert {name: id(p) for name, p in model.named_parameters()} == before
    expected = reference(input_ids=input_ids, labels=input_ids)
    expected.loss.backward()
    actual = model(input_ids=input_ids, labels=input_ids)
    actual.loss.backward()
    assert torch.equal(actual.logits, expected.logits)
    expected_grads, actual_grads = _grads(reference), _grads(model)
    assert actual_grads.keys() == expected_grads.keys()
    assert all(torch.equal(actual_grads[name], grad) for name, grad in expected_grads.items())


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama", "gemma", "qwen3", "olmo2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bf16_autocast_outputs_match(arch, dtype):
    """Output dtypes follow each flavour's rule under CPU autocast, for fp32 and bf16 weights."""
    model = tiny_model(arch, dtype=dtype)
    reference = copy.deepcopy(model)
    hf_gns.patch(model)
    input_ids = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(input_ids=input_ids, labels=input_ids)
        actual = model(input_ids=input_ids, labels=input_ids)
    assert actual.logits.dtype == expected.logits.dtype
    torch.testing.assert_close(actual.logits, expected.logits)  # measured: bit-identical
    actual.loss.backward()
    assert all(values.shape == (BATCH,) for values in hf_gns.per_example_sq_norms(model).values())
