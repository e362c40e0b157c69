"""Parameter groups: layer types, layer indices, norm modules, wrapper names, membership matrix."""

import pytest
import torch
from patching_tiny_models import tiny_model

import hf_gns
from hf_gns.gns import clean_name, membership_matrix, parameter_groups
from hf_gns.gns.groups import layer_index, layer_type


def test_gpt2_all_parameters_by_type_layer_and_module():
    model = tiny_model("gpt2")
    hf_gns.patch(model)
    names = [n for n, _ in model.named_parameters()]
    groups = parameter_groups(model, names)
    assert groups["total"] == names
    assert set(groups["type/norm"]) == {n for n in names if ".ln_" in n}
    assert set(groups["type/embedding"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert set(groups["type/attention"]) == {n for n in names if ".attn." in n}  # c_attn and attn.c_proj
    assert set(groups["type/mlp"]) == {n for n in names if ".mlp." in n}  # c_fc and mlp.c_proj
    assert "type/other" not in groups
    assert set(groups["layer/1"]) == {n for n in names if n.startswith("transformer.h.1.")}
    assert groups["module/transformer.ln_f"] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert [g for g in groups if g.startswith("module/")] == sorted(
        f"module/{p}" for p in ("transformer.ln_f", "transformer.h.0.ln_1", "transformer.h.0.ln_2",
                                "transformer.h.1.ln_1", "transformer.h.1.ln_2")
    )  # fmt: skip
    order = list(groups)
    assert order[:5] == ["total", "type/norm", "type/attention", "type/mlp", "type/embedding"]


def test_llama_types_and_qk_norms():
    model = tiny_model("qwen3")
    names = [n for n, _ in model.named_parameters()]
    groups = parameter_groups(model, names, groupings=("type",))
    kinds = {name: group for group, members in groups.items() if group != "total" for name in members}
    assert kinds["model.layers.0.self_attn.q_norm.weight"] == "type/norm"
    assert kinds["model.layers.0.input_layernorm.weight"] == "type/norm"
    assert kinds["model.norm.weight"] == "type/norm"
    assert kinds["model.layers.1.self_attn.o_proj.weight"] == "type/attention"
    assert kinds["model.layers.1.mlp.gate_proj.weight"] == "type/mlp"
    assert kinds["model.embed_tokens.weight"] == "type/embedding"
    assert set(groups) == {"total", "type/norm", "type/attention", "type/mlp", "type/embedding"}


def test_tracked_norms_only_and_selected_groupings():
    model = tiny_model("llama")
    hf_gns.patch(model)
    names = list(hf_gns.per_example_sq_norms(model))
    groups = parameter_groups(model, names, groupings=("layer",))
    assert list(groups) == ["total", "layer/0", "layer/1"]  # model.norm has no layer index
    assert "model.norm.weight" in groups["total"] and all("model.norm" not in n for n in groups["layer/0"])


@pytest.mark.parametrize(
    ("wrapped", "clean"),
    [
        ("module.transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.weight"),
        ("_fsdp_wrapped_module.model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight",
         "model.layers.3.mlp.up_proj.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
        ("model.layers.2.module_list.x", "model.layers.2.module_list.x"),
    ],
)  # fmt: skip
def test_clean_name_drops_wrapper_tokens(wrapped, clean):
    assert clean_name(wrapped) == clean


def test_name_rules_without_modules():
    assert layer_type("gpt_neox.layers.3.attention.dense", None) == "attention"
    assert layer_type("model.layers.3.block_sparse_moe.experts.0.w1", None) == "mlp"
    assert layer_type("lm_head", None) == "embedding"
    assert layer_type("score", None) == "other"
    assert layer_index("transformer.h.11.mlp.c_fc") == 11 and layer_index("lm_head") is None


def test_membership_matrix_sums_parameters_into_groups():
    groups = {"total": ["a", "b", "c"], "x": ["a", "c"], "y": ["b"]}
    matrix = membership_matrix(groups, ["a", "b", "c"])
    per_parameter = torch.tensor([1.0, 10.0, 100.0])
    torch.testing.assert_close(matrix @ per_parameter, torch.tensor([111.0, 101.0, 10.0]))


def test_unknown_grouping_is_refused():
    with pytest.raises(ValueError, match="unknown GNS groupings"):
        parameter_groups(tiny_model("gpt2"), [], groupings=("type", "blocks"))
