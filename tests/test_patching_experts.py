"""Fused MoE experts and routers under `patch(targets="all")` against the micro-batch oracle (fp64)."""

from __future__ import annotations

import pytest
import torch
from patching_tiny_models import per_example_sq_grad_norms

import hf_gns

transformers = pytest.importorskip("transformers")

B, T = 3, 7


def _mixtral(**overrides):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        **overrides,
    )  # fmt: skip
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # torch's grouped_mm has no fp64
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).double().train()


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    per_token = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), ids.roll(-1, 1).flatten(), reduction="none"
    )
    return per_token.view(ids.shape[0], -1).mean(1).sum()


def _oracle(model, ids):
    return per_example_sq_grad_norms(model, ids, _loss)


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_experts_and_router_norms_equal_the_micro_batch_oracle(method):
    model = _mixtral()
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    expected = _oracle(model, ids)
    report = hf_gns.patch(model, targets="all", linear_method=method)
    kinds = {entry.name: entry.method for entry in report.layers}
    assert "experts" in kinds["model.layers.0.mlp.experts"] and "vmap" in kinds["model.layers.0.mlp.gate"]
    assert report.tracked_elements == report.trainable_elements  # every parameter, experts and routers too
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"):
        torch.testing.assert_close(norms[name].double(), expected[name], rtol=1e-6, atol=0)
    torch.testing.assert_close(
        norms["model.layers.0.mlp.gate.weight"].double(), expected["model.layers.0.mlp.gate.weight"]
    )
    assert set(norms) == set(expected)
    for name, values in norms.items():
        torch.testing.assert_close(values.double(), expected[name], rtol=1e-6, atol=1e-12)


def _against_the_oracle(model_class, config, method: str, strict: bool):
    """`model_class(config)` in fp64 patched with targets="all": every per-example norm equals the
    micro-batch oracle's; returns (model, report, norms, expected)."""
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).double().train()
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    expected = _oracle(model, ids)
    report = hf_gns.patch(model, targets="all", linear_method=method, strict=strict)
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    for name, values in norms.items():
        torch.testing.assert_close(values.double(), expected[name], rtol=1e-6, atol=1e-12, msg=name)
    return model, report, norms, expected


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_dbrx_split_glu_experts_in_a_submodule_equal_the_micro_batch_oracle(method):
    """DBRX: w1, v1, w2 as (E·I, D) in `experts.mlp`, three sink columns, the submodule left unpatched."""
    config = transformers.DbrxConfig(
        d_model=16, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64,
        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
    )  # fmt: skip
    _, report, norms, expected = _against_the_oracle(
        transformers.DbrxForCausalLM, config, method, strict=True
    )
    kinds = {entry.name: entry.kind for entry in report.layers}
    assert kinds["transformer.blocks.0.ffn.experts"] == "experts"
    assert "transformer.blocks.0.ffn.experts.mlp" not in kinds
    assert report.tracked_elements == report.trainable_elements and set(norms) == set(expected)


@pytest.mark.parametrize("method", ["simultaneous", "ghost"])
def test_jetmoe_parallel_experts_on_gathered_rows_equal_the_micro_batch_oracle(method):
    """JetMoE: experts(rows, expert_size) on rows gathered by the parent (MoE and mixture-of-attention);
    the output projection's rows derive from the input projection's (act(up) * gate)."""
    import copy

    config = transformers.JetMoeConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, kv_channels=4, num_key_value_heads=2,
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    model, report, norms, expected = _against_the_oracle(
        transformers.JetMoeForCausalLM, config, method, strict=False
    )
    kinds = {entry.name: entry.kind for entry in report.layers}
    for name in ("mlp.input_linear", "mlp.output_linear", "self_attention.experts.output_linear"):
        assert kinds[f"model.layers.0.{name}"] == "experts"
    assert {n for n in expected if "linear.weight" in n} <= set(norms)
    copy.deepcopy(model)  # the states' last rows (autograd nodes) are not copied


def test_experts_unpatch_restores_the_forward_bit_for_bit():
    """Training forward: the experts and the router take their patched paths."""
    model = _mixtral()
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    hf_gns.patch(model, targets="all")
    patched = model(input_ids=ids, use_cache=False).logits.detach()
    hf_gns.unpatch(model)
    assert not any(key.startswith("_hf_gns") for m in model.modules() for key in m.__dict__)
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-7)  # the fused norms keep rstd in fp32
    assert torch.equal(after, before)


def test_expert_biases_are_listed_untracked_with_their_reason():
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, layer_types=["full_attention"],
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config)
    report = hf_gns.patch(model, targets="all")
    reasons = {entry.name: entry.reason for entry in report.untracked}
    biases = {"model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.experts.down_proj_bias"}
    assert biases <= set(reasons) and all("bias" in reasons[name] for name in biases)
    assert "model.layers.0.mlp.experts.gate_up_proj" in report.tracked_parameters


def test_report_records_and_states_carry_the_kind_that_groups_use():
    from hf_gns.gns.groups import parameter_groups
    from hf_gns.patching.kinds import KINDS, module_kind

    model = _mixtral()
    report = hf_gns.patch(model, targets="all")
    kinds = {entry.name: entry.kind for entry in [*report.patched, *report.layers]}
    assert kinds["model.layers.0.mlp.experts"] == "experts" and kinds["model.layers.0.mlp.gate"] == "call"
    assert kinds["model.embed_tokens"] == "embedding" and kinds["lm_head"] == "linear"
    assert kinds["model.norm"] == "norm" and set(kinds.values()) <= set(KINDS)
    by_kind = report.by_kind()  # the report's views by kind
    assert list(by_kind)[0] == "norm" and {e.name for e in by_kind["experts"]} == {
        name for name, kind in kinds.items() if kind == "experts"
    }
    assert sorted(n for names in report.tracked_by_kind().values() for n in names) == sorted(
        report.tracked_parameters
    )
    assert f"{len(by_kind['experts'])} experts" in report.summary()
    modules = dict(model.named_modules())
    assert all(module_kind(modules[name]) == kind for name, kind in kinds.items())
    groups = parameter_groups(model, report.tracked_parameters, groupings=("type",))
    assert set(groups["type/norm"]) == {n for n in report.tracked_parameters if "norm" in n}
    assert "model.layers.0.mlp.experts.gate_up_proj" in groups["type/mlp"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "dbrx", "jetmoe"])
def test_gpu_experts_with_the_default_experts_implementation_equal_the_oracle(family):
    """On CUDA the experts modules run transformers' default implementation (grouped_mm) when
    unpatched; patched, every tracked parameter matches the one-example oracle (fp32). DBRX and
    JetMoE: their own layouts (split GLU in a submodule; rows gathered by the parent)."""
    if family == "dbrx":
        config = transformers.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=64,
            attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=2),
        )  # fmt: skip
        model_class = transformers.DbrxForCausalLM
    elif family == "jetmoe":
        config = transformers.JetMoeConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, kv_channels=8, num_key_value_heads=2,
            intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        )  # fmt: skip
        model_class = transformers.JetMoeForCausalLM
    elif family == "mixtral":
        config = transformers.MixtralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        )  # fmt: skip
        model_class = transformers.MixtralForCausalLM
    else:
        config = transformers.GptOssConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=64, layer_types=["full_attention", "sliding_attention"],
        )  # fmt: skip
        model_class = transformers.GptOssForCausalLM
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_class(config).cuda().train()
    ids = torch.randint(0, 64, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    expected = {name: values.cpu() for name, values in _oracle(model, ids).items()}
    report = hf_gns.patch(model, targets="all")
    assert any(entry.kind == "experts" for entry in report.layers), report
    _loss(model, ids).backward()
    norms = hf_gns.per_example_sq_norms(model)
    assert report.coverage > 0.95, report
    for name, values in norms.items():
        torch.testing.assert_close(values.double().cpu(), expected[name].double(), rtol=2e-3, atol=1e-9)


def test_experts_documents_of_a_padding_free_batch_equal_the_per_document_oracle():
    """`run_experts` with tokens grouped into documents of uneven lengths (one with no token routed
    to some experts): sink columns = per-document |dW_up|², |dW_down|² of the module alone."""
    from hf_gns.kernels import new_sq_norm_sink
    from hf_gns.patching.experts import run_experts

    experts = _mixtral().model.layers[0].mlp.experts
    lengths = [5, 1, 9, 3]  # documents over N = 18 tokens
    n_tokens, generator = sum(lengths), torch.Generator().manual_seed(3)
    x = torch.randn(n_tokens, 16, dtype=torch.float64, generator=generator)
    top_k_index = torch.rand(n_tokens, 4, generator=generator).topk(2, dim=-1).indices
    top_k_weights = torch.rand(n_tokens, 2, dtype=torch.float64, generator=generator)
    upstream = torch.randn(n_tokens, 16, dtype=torch.float64, generator=generator)
    token_example = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    sink = new_sq_norm_sink(len(lengths), "cpu")
    out = run_experts(experts, x, top_k_index, top_k_weights, sink, token_example, len(lengths), "auto")
    (out * upstream).sum().backward()
    start = 0
    for doc, length in enumerate(lengths):
        rows = slice(start, start + length)
        start += length
        experts.zero_grad(set_to_none=True)
        alone = type(experts).forward(experts, x[rows], top_k_index[rows], top_k_weights[rows])
        (alone * upstream[rows]).sum().backward()
        for column, param in enumerate((experts.gate_up_proj, experts.down_proj)):
            want = 0.0 if param.grad is None else param.grad.square().sum().item()
            assert sink.grad[doc, column].item() == pytest.approx(want, rel=1e-6, abs=1e-12)
