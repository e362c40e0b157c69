"""Which patched modules break a compiled graph at every call (`compiled_breaks.py`)."""

from __future__ import annotations

import torch
import transformers
from zoo_models import build_tiny_model

import hf_gns
from hf_gns.patching.compiled_breaks import ROUTED_EXPERTS, modules_breaking_compiled_graphs
from hf_gns.patching.state import patched_states


def _mixtral():
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def test_routed_experts_are_named_only_when_tracked():
    model = _mixtral()
    hf_gns.patch(model)
    assert modules_breaking_compiled_graphs(model) == {}  # norms only: the graph stays whole
    model = _mixtral()
    hf_gns.patch(model, targets="all")
    experts = ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert modules_breaking_compiled_graphs(model) == {ROUTED_EXPERTS: experts}


def test_norms_of_a_shared_block_are_not_named():
    # vector path, but its leaves are readied outside the graph (test_patching_compile.py: one graph)
    model = build_tiny_model("zamba")  # one shared transformer block, called from two layers
    hf_gns.patch(model)
    routings = [s.routing.mode for _, s in patched_states(model) if "shared_transf" in s.name]
    assert routings and set(routings) == {"shared"}
    assert modules_breaking_compiled_graphs(model) == {}
