"""per_example_sq_norms / zero_stats: accumulation, checkpointing, frozen weights, shared norms."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from patching_tiny_models import BATCH, loss_of, tiny_batch, tiny_model
from torch import nn

import hf_gns


def _stats_of_one_step(model, input_ids) -> dict[str, torch.Tensor]:
    hf_gns.zero_stats(model)
    loss_of(model, input_ids).backward()
    return {name: values.clone() for name, values in hf_gns.per_example_sq_norms(model).items()}


def test_micro_batches_are_concatenated_in_order_and_zero_stats_clears():
    model = tiny_model("llama")
    hf_gns.patch(model)
    first, second = tiny_batch(seed=1), tiny_batch(seed=2, batch=2)
    norms_first = _stats_of_one_step(model, first)
    norms_second = _stats_of_one_step(model, second)

    hf_gns.zero_stats(model)
    loss_of(model, first).backward()
    loss_of(model, second).backward()
    accumulated = hf_gns.per_example_sq_norms(model)
    for name, values in accumulated.items():
        # (the first step ran on the discovering path, `example_grads.py`: the same values to rounding)
        expected = torch.cat([norms_first[name], norms_second[name]])
        torch.testing.assert_close(values, expected, rtol=1e-5, atol=0)

    hf_gns.zero_stats(model)
    assert all(values.shape == (0,) for values in hf_gns.per_example_sq_norms(model).values())


def test_no_grad_and_eval_forwards_collect_nothing():
    model = tiny_model("gpt2")
    hf_gns.patch(model)
    with torch.no_grad():
        loss_of(model, tiny_batch())
    loss_of(model, tiny_batch())  # grad enabled but no backward: the sinks die with the graph
    assert all(values.numel() == 0 for values in hf_gns.per_example_sq_norms(model).values())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gradient_checkpointing_gives_the_same_norms(arch, use_reentrant):
    input_ids = tiny_batch()
    plain = tiny_model(arch)
    hf_gns.patch(plain)
    expected = _stats_of_one_step(plain, input_ids)

    checkpointed = tiny_model(arch)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    hf_gns.patch(checkpointed)
    calls = []
    first_layer_norm = next(
        m for n, m in checkpointed.named_modules() if "layers.0." in n and "_hf_gns_state" in m.__dict__
    )
    first_layer_norm.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    for _step in range(2):  # the second step runs on recycled sinks
        calls.clear()
        actual = _stats_of_one_step(checkpointed, input_ids)
        # checkpointing is really on: the layer ran twice (reentrant: first without grad)
        assert calls == ([False, True] if use_reentrant else [True, True])
        assert actual.keys() == expected.keys()
        for name, values in expected.items():
            assert actual[name].shape == (BATCH,), name
            torch.testing.assert_close(actual[name], values, rtol=1e-5, atol=0, msg=name)


def test_frozen_norms_are_patched_but_not_tracked():
    model = tiny_model("llama")
    for name, param in model.named_parameters():
        param.requires_grad_("norm" not in name)
    report = hf_gns.patch(model)
    assert report.patched and not report.tracked_parameters
    assert "no parameter is tracked" in str(report)
    loss_of(model, tiny_batch()).backward()
    assert hf_gns.per_example_sq_norms(model) == {}


def test_trainable_bias_with_frozen_weight_is_tracked_alone():
    model = tiny_model("gpt2")
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith("ln_f.bias"))
    report = hf_gns.patch(model)
    assert report.tracked_parameters == ["transformer.ln_f.bias"]
    loss_of(model, tiny_batch()).backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert list(norms) == ["transformer.ln_f.bias"] and norms["transformer.ln_f.bias"].shape == (BATCH,)


def test_a_single_example_has_the_squared_norm_of_param_grad():
    model = tiny_model("gpt2")
    hf_gns.patch(model)
    loss_of(model, tiny_batch(batch=1)).backward()
    norms = hf_gns.per_example_sq_norms(model)
    for name, param in model.named_parameters():
        if name in norms:
            torch.testing.assert_close(norms[name], param.grad.double().square().sum().float().reshape(1))


class _SharedNormModel(nn.Module):
    """One LayerNorm applied twice in a forward, reached through a single attribute."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.norm(self.proj(self.norm(x))).square().mean()


def _as_if_found_single(model):
    """Routing as after a first forward with one call: the case where the second call comes later."""
    routing = model.norm._hf_gns_state.routing
    routing.mode, routing.vectors = "single", None


def test_a_norm_called_twice_in_one_forward_is_caught_by_the_guard():
    model = _SharedNormModel()
    hf_gns.patch(model)
    _as_if_found_single(model)
    with pytest.warns(UserWarning, match="called more than once per forward"):
        model(torch.randn(3, 4, 8)).backward()
    # the first call of that step took the single-call path: flagged (exact from the next step on,
    # test_patching_exact.py)
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError, match="'norm'.*2× the examples"):
        hf_gns.patching.check_step_statistics(model, 3)


def test_deepcopy_of_a_patched_model_has_its_own_stats():
    model = tiny_model("llama")
    hf_gns.patch(model)
    clone = copy.deepcopy(model)
    loss_of(clone, tiny_batch()).backward()
    assert all(values.numel() == BATCH for values in hf_gns.per_example_sq_norms(clone).values())
    assert all(values.numel() == 0 for values in hf_gns.per_example_sq_norms(model).values())
    assert hf_gns.unpatch(clone) > 0
    assert "forward" in model.model.norm.__dict__  # the original is still patched


def test_stats_of_an_unpatched_model_raise():
    with pytest.raises(ValueError, match="call hf_gns.patch"):
        hf_gns.per_example_sq_norms(tiny_model("gpt2"))


# ---- the per-step guard: every tracked parameter with a gradient has exactly B values ----


def _rms_forward_liger_style(self, hidden_states):
    """What an instance-level patch (Liger's) binds: a correct RMSNorm that bypasses hf_gns."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_complete_statistics_pass_the_guard_over_micro_batches():
    model = tiny_model("gpt2")
    hf_gns.patch(model, targets="all")
    loss_of(model, tiny_batch(seed=1)).backward()
    loss_of(model, tiny_batch(seed=2, batch=2)).backward()
    assert hf_gns.patching.check_step_statistics(model, BATCH + 2) == []
    expected = f"{BATCH + 2} per-example values for 7 examples"
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError, match=expected):
        hf_gns.patching.check_step_statistics(model, 7)


def test_a_forward_rebound_after_patching_is_an_error_naming_the_module():
    model = tiny_model("llama")
    hf_gns.patch(model)
    norm = model.model.layers[1].post_attention_layernorm
    norm.forward = types.MethodType(_rms_forward_liger_style, norm)
    loss_of(model, tiny_batch()).backward()
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError) as error:
        hf_gns.patching.check_step_statistics(model, BATCH)
    message = str(error.value)
    assert message.count("\n") == 1  # one line per incomplete parameter, only this one
    assert "model.layers.1.post_attention_layernorm.weight" in message
    assert "replaced after hf_gns.patch" in message and "_rms_forward_liger_style" in message
    assert "0 per-example values for 3 examples" in message


class _WeightUsedOutside(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.other = nn.LayerNorm(8)

    def forward(self, x):
        return (self.norm(x) + x * self.other.weight).square().mean()


def test_a_weight_used_outside_its_module_is_an_error():
    model = _WeightUsedOutside()
    hf_gns.patch(model)
    model(torch.randn(3, 4, 8)).backward()
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError) as error:
        hf_gns.patching.check_step_statistics(model, 3)
    message = str(error.value)
    assert "other.weight (module 'other')" in message and "outside its module" in message
    assert "other.bias" not in message and "norm.weight" not in message  # no gradient / complete


def test_a_module_called_twice_is_an_error_and_warn_mode_returns_it_for_dropping():
    model = _SharedNormModel()
    hf_gns.patch(model)
    _as_if_found_single(model)
    with pytest.warns(UserWarning, match="called more than once per forward"):
        model(torch.randn(3, 4, 8)).backward()
    # the first step's first call took the single-call path (exact from the next step on,
    # test_patching_exact.py): flagged
    with pytest.raises(hf_gns.patching.IncompleteStatisticsError, match="2× the examples"):
        hf_gns.patching.check_step_statistics(model, 3)
    with pytest.warns(UserWarning, match="dropping 2 tracked parameters"):
        incomplete = hf_gns.patching.check_step_statistics(model, 3, on_incomplete="warn")
    assert [(i.parameter, i.modules, i.n_values) for i in incomplete] == [
        ("norm.weight", ("norm",), 6),
        ("norm.bias", ("norm",), 6),
    ]
    remaining = [model.proj.weight]  # the caller drops them: nothing left to check
    assert hf_gns.patching.check_step_statistics(model, 3, parameters=remaining) == []
    with pytest.raises(ValueError, match="on_incomplete"):
        hf_gns.patching.check_step_statistics(model, 3, on_incomplete="ignore")


def test_unused_parameters_without_gradient_are_fine():
    model = _WeightUsedOutside()
    hf_gns.patch(model)
    assert hf_gns.patching.check_step_statistics(model, 3) == []  # no backward, no gradient: nothing to check


def test_patching_a_model_with_nothing_to_patch_warns_and_stats_say_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="nothing to patch in Sequential"):
        report = hf_gns.patch(model)
    assert not report.patched
    with pytest.raises(ValueError, match="found nothing to patch"):
        hf_gns.per_example_sq_norms(model)
    hf_gns.unpatch(model)
    with pytest.raises(ValueError, match="call hf_gns.patch"):
        hf_gns.per_example_sq_norms(model)


def test_before_any_backward_every_tracked_parameter_has_an_empty_tensor():
    # issue 16 item 7: documented (README "Using it", the docstring): (0,) means no value yet, not a norm of 0
    model = tiny_model("gpt2")
    report = hf_gns.patch(model)
    for norms in (hf_gns.per_example_sq_norms(model), None):
        if norms is None:  # again after a step and zero_stats
            loss_of(model, tiny_batch(seed=1)).backward()
            assert all(v.shape == (BATCH,) for v in hf_gns.per_example_sq_norms(model).values())
            hf_gns.zero_stats(model)
            norms = hf_gns.per_example_sq_norms(model)
        assert list(norms) == report.tracked_parameters
        assert all(v.shape == (0,) and v.dtype == torch.float32 for v in norms.values())


def test_tracked_parameter_names_are_known_before_any_backward():
    model = tiny_model("gpt2")
    report = hf_gns.patch(model)
    assert hf_gns.patching.tracked_parameter_names(model) == report.tracked_parameters


# ---- the fused per-step read ----


def test_example_sq_norm_sums_equal_the_per_parameter_sums():
    model = tiny_model("gpt2")
    hf_gns.patch(model, targets="all")
    loss_of(model, tiny_batch(seed=1)).backward()
    loss_of(model, tiny_batch(seed=2, batch=2)).backward()
    norms = hf_gns.per_example_sq_norms(model)
    names = list(norms)[::-1]  # any order
    expected = torch.stack([norms[n].sum() for n in names])
    for _ in range(2):  # the second call reuses the cached index plan
        torch.testing.assert_close(hf_gns.patching.example_sq_norm_sums(model, names), expected)
    hf_gns.zero_stats(model)
    assert torch.equal(hf_gns.patching.example_sq_norm_sums(model, names), torch.zeros(len(names)))
    with pytest.raises(ValueError, match="not tracked"):
        hf_gns.patching.example_sq_norm_sums(model, ["transformer.wte.bias"])


def test_a_weight_shared_by_two_norms_with_their_own_biases_is_skipped_with_the_reason():
    # (a weight shared with its bias is summed per example: test_patching_exact.py)
    model = _SharedWeightNorms()
    report = hf_gns.patch(model)
    assert not report.tracked_parameters
    assert {e.name for e in report.uncovered} == {"first", "second"}
    assert all("not its bias" in e.reason for e in report.uncovered)


class _SharedWeightNorms(nn.Module):
    """Two LayerNorm modules holding one weight parameter."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.LayerNorm(8), nn.LayerNorm(8)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x) * 2).square().mean()
