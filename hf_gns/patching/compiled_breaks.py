"""Patched modules whose per-example path breaks a compiled graph at every call.

Their results stay exact; the graph does not stay whole, which is what compiling is for, so
GNSTrainer names them once when it finds the model compiled (measured with aot_eager on the tiny
models of the tests, graph breaks a step, patched against unpatched):

- routed MoE experts under `targets="all"` group the tokens by expert with a host sync
  (`experts.run_experts`, `run_parallel_experts`), and the token counts recompile the graph:
  Mixtral 22 against 10 (transformers' eager experts), Jamba 18 against 0. Dense experts
  (Llama 4) compile whole.

Modules on the vector path (a weight shared by several modules, as Zamba's shared block, or a
module called several times per forward) no longer break the graph: the model hook readies each
forward's gradient-vector leaf outside it (`ExampleGradVectors.ready`), Zamba 0 against 0 (10 a
step before).
"""

from __future__ import annotations

from torch import nn

from .state import patched_states

ROUTED_EXPERTS = "MoE experts (tokens grouped by expert with a host sync)"


def modules_breaking_compiled_graphs(model: nn.Module) -> dict[str, list[str]]:
    """{why: names of the patched modules of `model` that break a compiled graph for that reason}."""
    found: dict[str, list[str]] = {}
    for _, state in patched_states(model):
        if state.kind == "experts" and not state.method_dense:
            found.setdefault(ROUTED_EXPERTS, []).append(state.name)
    return found
