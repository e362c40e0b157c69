"""Grouping tracked parameters for per-group GNS: by layer type, by layer index, by norm module.

A group's statistics are those of the concatenation of its parameters' gradients: squared
norms simply add over the parameters, so a group is a 0/1 row of a (groups × parameters)
membership matrix applied to per-parameter statistics.

Groups (names are logged as `gns/<group>`):
- `total`: every tracked parameter;
- `type/norm`, `type/attention`, `type/mlp`, `type/embedding`, `type/other`: norm parameters
  are those of modules the patch records as kind "norm" (`hf_gns.patching.kinds`); the others
  are told apart by tokens of their dotted module path (`attn`, `q_proj`, `mlp`, `c_fc`, `wte`,
  ...), so `h.3.attn.c_proj` is attention and `h.3.mlp.c_proj` is MLP;
- `layer/<i>`: the first integer in the module path (`transformer.h.3…`, `model.layers.3…`);
- `module/<name>`: each norm module, e.g. `module/transformer.h.3.ln_1`.
Wrapper tokens (DDP's leading `module.`, FSDP's `_fsdp_wrapped_module`, activation
checkpointing's `_checkpoint_wrapped_module`, torch.compile's `_orig_mod`) are dropped from
the names used in group labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GROUPINGS = ("type", "layer", "module")
LAYER_TYPES = ("norm", "attention", "mlp", "embedding", "other")

_WRAPPER_TOKENS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
_EMBEDDING_TOKENS = {
    "embed", "embeds", "embedding", "embeddings", "embed_tokens", "embed_positions", "wte", "wpe",
    "lm_head", "word_embeddings", "position_embeddings", "embed_in", "embed_out", "shared",
}  # fmt: skip
_ATTENTION_TOKENS = {
    "attn", "attention", "self_attn", "self_attention", "cross_attn", "encoder_attn", "q_proj",
    "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value",
}  # fmt: skip
_MLP_TOKENS = {
    "mlp", "ffn", "fc", "fc1", "fc2", "c_fc", "feed_forward", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3", "experts", "block_sparse_moe",
}  # fmt: skip


def clean_name(name: str) -> str:
    """`name` without wrapper tokens: `module._fsdp_wrapped_module.h.0.ln_1` -> `h.0.ln_1`."""
    tokens = [t for t in name.split(".") if t not in _WRAPPER_TOKENS]
    if tokens and tokens[0] == "module":  # DDP / DataParallel
        tokens = tokens[1:]
    return ".".join(tokens)


def is_norm_module(module: nn.Module) -> bool:
    """Whether the patch says `module` is a norm layer (its record's kind, `hf_gns.patching.kinds`);
    for a module not patched, whether the patcher would take it for one."""
    from ..patching.kinds import module_kind

    return module_kind(module) == "norm"


def layer_type(module_path: str, module: nn.Module | None) -> str:
    """One of `LAYER_TYPES` for the module owning a parameter (see the module docstring)."""
    if module is not None and is_norm_module(module):
        return "norm"
    tokens = set(module_path.split("."))
    if tokens & _EMBEDDING_TOKENS or isinstance(module, nn.Embedding):
        return "embedding"
    if tokens & _ATTENTION_TOKENS:
        return "attention"
    if tokens & _MLP_TOKENS:
        return "mlp"
    return "other"


def layer_index(module_path: str) -> int | None:
    """The first integer token of a dotted path (`model.layers.3.mlp` -> 3), or `None`."""
    return next((int(t) for t in module_path.split(".") if t.isdigit()), None)


def parameter_groups(
    model: nn.Module, names: Sequence[str], groupings: Sequence[str] = GROUPINGS
) -> dict[str, list[str]]:
    """Group the tracked parameters `names` (as in `model.named_parameters()`).

    Args:
        model (`nn.Module`): the model the names refer to (used to find owning module classes).
        names (`Sequence[str]`): tracked parameter names.
        groupings (`Sequence[str]`, *optional*, defaults to `("type", "layer", "module")`): which
            families of groups to build besides `total`.

    Returns:
        `dict[str, list[str]]`: group name -> parameter names, `total` first, then families in
        the order of `groupings`, each family's groups sorted (layers numerically).
    """
    unknown = set(groupings) - set(GROUPINGS)
    if unknown:
        raise ValueError(f"unknown GNS groupings {sorted(unknown)}: choose among {list(GROUPINGS)}")
    modules = dict(model.named_modules())
    families: dict[str, dict[str, list[str]]] = {family: {} for family in groupings}
    for name in names:
        module_path = name.rpartition(".")[0]
        module = modules.get(module_path)
        path = clean_name(module_path)
        kind = layer_type(path, module)
        labels = {"type": f"type/{kind}", "module": f"module/{path}" if kind == "norm" else None}
        index = layer_index(path)
        labels["layer"] = None if index is None else f"layer/{index}"
        for family in groupings:
            if labels[family] is not None:
                families[family].setdefault(labels[family], []).append(name)
    groups = {"total": list(names)}
    for family in groupings:
        members = families[family]
        if family == "layer":
            order = sorted(members, key=lambda g: int(g.split("/")[1]))
        elif family == "type":
            order = [f"type/{t}" for t in LAYER_TYPES if f"type/{t}" in members]
        else:
            order = sorted(members)
        groups.update((group, members[group]) for group in order)
    return groups


def membership_matrix(groups: dict[str, list[str]], names: Sequence[str]) -> torch.Tensor:
    """(n_groups, n_params) fp32 0/1 matrix: `matrix @ per_parameter_stat` gives per-group stats."""
    column = {name: j for j, name in enumerate(names)}
    matrix = torch.zeros(len(groups), len(names), dtype=torch.float32)
    for i, members in enumerate(groups.values()):
        matrix[i, [column[name] for name in members]] = 1.0
    return matrix
