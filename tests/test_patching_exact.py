"""Exact per-example norms where a parameter's gradient is not one call of one module per forward.

Every case on a tiny real HF model where it occurs, against the micro-batch oracle (each
example alone through an fp64 copy of the unpatched model, gradient / B):
- a norm called twice per forward (XMOD's `output.LayerNorm`), a module reachable under two
  names, Linears called in a loop (Dory's recurrent layers): one value |a+b|² per example;
- one weight held by several modules (Zamba's `shared_transf`, norms and linears): summed
  per example, reported once under its `named_parameters()` name;
- sequence-first hidden states (XLNet, (T, B, D)): per-example values, not per-token ones;
- in-place edits of patched outputs (CTRL's `inputs_embeds *= ...`, RoCBert's `+=` on a Linear).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import hf_gns
from hf_gns.patching import example_grads
from hf_gns.patching.stats import IncompleteStatisticsError, check_step_statistics

BATCH, SEQ, VOCAB = 3, 6, 96

# model type -> config overrides (tiny sizes; the rest are the config class's defaults)
CONFIGS = {
    "xmod": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "zamba": dict(
        hidden_size=32,
        num_hidden_layers=6,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_hidden_size=64,
        attention_head_dim=16,
        intermediate_size=64,
        mamba_d_state=4,
        mamba_dt_rank=4,
        n_mamba_heads=2,
    ),
    "dory": dict(
        hidden_size=32,
        num_hidden_layers=3,
        n_input_layers=1,
        n_recurrent_layers=1,
        n_output_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    ),
    "xlnet": dict(d_model=32, n_layer=2, n_head=4, d_inner=64, mem_len=0),
    "ctrl": dict(n_embd=32, n_layer=2, n_head=4, dff=64, n_positions=64),
    "roc_bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
}


@pytest.fixture(autouse=True)
def _torch_backend():
    with hf_gns.use_backend("torch"):
        yield


def _tiny(model_type: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **CONFIGS[model_type])
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if model_type == "xmod":
        model.set_default_language(config.languages[0])
    return model.to(dtype).train()


def _batch(seed: int = 1, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(4, VOCAB - 4, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids).loss  # mean over the tokens of equal-length rows


def _oracle(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """|c_b|² of every parameter: example b alone through an fp64 copy, gradient / B."""
    reference = copy.deepcopy(model).double()
    hf_gns.unpatch(reference)
    params = dict(reference.named_parameters())
    values = {name: [] for name in params}
    for b in range(input_ids.shape[0]):
        reference.zero_grad(set_to_none=False)
        _loss(reference, input_ids[b : b + 1]).backward()
        for name, param in params.items():
            grad = torch.zeros_like(param) if param.grad is None else param.grad
            values[name].append((grad / input_ids.shape[0]).square().sum())
    return {name: torch.stack(v) for name, v in values.items()}


def _assert_exact(norms: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], batch: int = BATCH):
    scale = max(v.max().item() for v in oracle.values())
    assert norms
    for name, values in norms.items():
        assert name in oracle, f"{name} is not a name of model.named_parameters()"
        assert values.shape == (batch,), f"{name}: {tuple(values.shape)} values for {batch} examples"
        error = (values.double() - oracle[name]).abs().max().item()
        assert error <= 1e-4 * oracle[name].max().item() + 1e-9 * scale, (
            f"{name}: {values.tolist()} vs oracle {oracle[name].tolist()}"
        )


def _step(model: nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    hf_gns.zero_stats(model)
    model.zero_grad(set_to_none=True)
    _loss(model, input_ids).backward()
    return hf_gns.per_example_sq_norms(model)


@pytest.mark.parametrize("targets", ["norms", "all"])
def test_a_norm_called_twice_per_forward_gives_one_value_per_example_from_the_first_step(targets):
    """XMOD's `output.LayerNorm` runs twice per layer: |a_b + b_b|². A module's first forward runs
    on the vector path and counts its calls, so the first step is exact too."""
    model = _tiny("xmod")
    oracle = _oracle(model, _batch())
    hf_gns.patch(model, targets=targets)
    for _ in range(2):  # the discovering step, then the steady one
        norms = _step(model, _batch())
        assert check_step_statistics(model, BATCH) == []
        _assert_exact(norms, oracle)
    modes = {state.name: state.routing.mode for state in _norm_states(model)}
    assert modes["roberta.encoder.layer.0.output.LayerNorm"] == "multi"
    assert modes["roberta.encoder.layer.0.attention.output.LayerNorm"] == "single"


def _norm_states(model):
    from hf_gns.patching.forward import PATCH_ATTRIBUTE

    return [m.__dict__[PATCH_ATTRIBUTE] for m in model.modules() if PATCH_ATTRIBUTE in m.__dict__]


class _TwiceCalled(nn.Module):
    """One LayerNorm reachable under two names and called twice, around a Linear."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.block = nn.Sequential(nn.Linear(8, 8), self.norm)

    def forward(self, x):
        return self.block(self.norm(x))


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_a_module_under_two_names_sums_its_calls_with_accumulation_and_checkpointing(checkpointing):
    torch.manual_seed(0)
    model = _TwiceCalled()
    reference = copy.deepcopy(model).double()
    report = hf_gns.patch(model)
    assert report.tracked_parameters == ["norm.weight", "norm.bias"]

    def run(x):
        if checkpointing is None:
            return model(x)
        reentrant = checkpointing == "reentrant"
        return torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)

    batches = [torch.randn(3, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)]
    for x in batches:  # two micro-batches of one step
        run(x).square().sum().backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert check_step_statistics(model, 5) == []
    expected = {name: [] for name, _ in reference.named_parameters()}
    for x in batches:
        for b in range(x.shape[0]):
            reference.zero_grad()
            reference(x[b : b + 1].detach().double()).square().sum().backward()
            for name, param in reference.named_parameters():
                expected[name].append(param.grad.square().sum())
    for name in report.tracked_parameters:
        torch.testing.assert_close(norms[name].double(), torch.stack(expected[name]), rtol=1e-5, atol=0)


def test_parameters_shared_by_modules_are_summed_and_reported_once_by_their_name():
    """Zamba's `shared_transf` is one set of parameters (norms and linears) held by one module
    object per hybrid layer (targets="all" checks the norms too)."""
    model = _tiny("zamba")
    oracle = _oracle(model, _batch())
    report = hf_gns.patch(model, targets="all")
    names = {name for name, _ in model.named_parameters()}
    assert set(report.tracked_parameters) <= names and len(set(report.tracked_parameters)) == len(
        report.tracked_parameters
    )
    shared = "model.layers.2.shared_transf.input_layernorm.weight"
    assert shared in report.tracked_parameters
    norms = _step(model, _batch())  # shared parameters are known at patch time: exact from the first step
    assert check_step_statistics(model, BATCH) == []
    _assert_exact(norms, oracle)
    assert "model.layers.2.shared_transf.self_attn.q_proj.weight" in norms


def test_linears_called_in_a_loop_are_exact_from_the_first_step():
    """Dory runs its layers several times per forward."""
    model = _tiny("dory")
    oracle = _oracle(model, _batch())
    hf_gns.patch(model, targets="all")
    for _ in range(2):
        norms = _step(model, _batch())
        assert check_step_statistics(model, BATCH) == []
        _assert_exact(norms, oracle)
    assert "model.layers.1.mlp.down_proj.weight" in norms


class _SecondCallLater(nn.Module):
    """Calls its Linear once per forward, then twice once `twice` is set (a data-dependent path)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.twice = False

    def forward(self, x):
        y = self.proj(x)
        return (self.proj(y) if self.twice else y).square().sum()


def test_a_second_call_found_after_the_first_forward_is_flagged_then_summed():
    torch.manual_seed(0)
    model = _SecondCallLater()
    reference = copy.deepcopy(model).double()
    hf_gns.patch(model, targets="all")
    x = torch.randn(3, 5, 4)
    model(x).backward()  # one call: discovered single
    model.twice = reference.twice = True
    hf_gns.zero_stats(model)
    with pytest.warns(UserWarning, match="called more than once per forward"):
        model(x).backward()
    with pytest.raises(IncompleteStatisticsError, match="proj.weight"):  # 2B values: never used as data
        check_step_statistics(model, 3)
    hf_gns.zero_stats(model)
    model(x).backward()
    assert check_step_statistics(model, 3) == []
    norms = hf_gns.per_example_sq_norms(model)
    for b in range(3):
        reference.zero_grad()
        reference(x[b : b + 1].double()).backward()
        for name, param in reference.named_parameters():
            torch.testing.assert_close(norms[name][b].double(), param.grad.square().sum(), rtol=1e-5, atol=0)


def test_over_the_vector_budget_the_error_names_the_module(monkeypatch):
    monkeypatch.setattr(example_grads, "VECTOR_BUDGET_BYTES", 1024)
    model = _tiny("dory")
    hf_gns.patch(model, targets="all")
    with pytest.raises(RuntimeError, match=r"'model\.layers\.\d\..*' contribute to one parameter"):
        _step(model, _batch())


def test_sequence_first_hidden_states_give_per_example_values():
    """XLNet runs its layers on (T, B, D) and looks up (T, B) ids (norms, linears, embedding)."""
    model = _tiny("xlnet")
    oracle = _oracle(model, _batch())
    hf_gns.patch(model, targets="all")
    norms = _step(model, _batch())
    assert check_step_statistics(model, BATCH) == []
    _assert_exact(norms, oracle)
    assert (
        "transformer.word_embedding.weight" in norms and "transformer.layer.0.ff.layer_norm.weight" in norms
    )


@pytest.mark.parametrize("model_type", ["ctrl", "roc_bert"])
def test_in_place_edits_of_patched_outputs_work_and_stay_exact(model_type):
    """CTRL scales its looked-up embeddings in place; RoCBert adds to a Linear's output in place."""
    model = _tiny(model_type)
    oracle = _oracle(model, _batch())
    hf_gns.patch(model, targets="all")
    norms = _step(model, _batch())
    assert check_step_statistics(model, BATCH) == []
    _assert_exact(norms, oracle)


def test_a_copied_model_keeps_its_routing_and_collects_its_own_values():
    model = _tiny("zamba")
    hf_gns.patch(model, targets="all")
    _step(model, _batch())
    copied = copy.deepcopy(model)
    norms = _step(copied, _batch(seed=2, batch=2))
    assert all(values.shape == (2,) for values in norms.values())
    assert all(values.shape == (BATCH,) for values in hf_gns.per_example_sq_norms(model).values())
