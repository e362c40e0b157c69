"""Every causal LM type of transformers, built tiny from its config class, and the zoo check.

`python tests/zoo_models.py [model_type ...]` prints the table (model type, built?, norms
exact?, all exact?, #tracked, coverage of parameter elements, reason); `test_patching_zoo.py`
runs the same check per model type in CI.

How a model is made tiny, generically (no per-model code; `EXTRAS` holds the few
per-family settings the generic rules cannot guess):
- start from the config class's defaults and rewrite every size-like field found in its
  `to_dict()` (hidden sizes to 32, intermediate sizes to 64, 2 layers, 4 heads, 2 kv heads,
  head dims 8, 4 experts with top-2 routing, vocab 128, state sizes 8, ...), recursively in
  sub-configs (`text_config`, ...);
- per-layer lists (`layer_types`, `layers_block_type`, ...) and pattern strings are cut to
  a few layers that keep every layer kind of the default pattern;
- dropout off, eager attention, special token ids moved inside the vocabulary.

The check (`check_model_type`): per-example squared norms of every tracked parameter against
the micro-batch oracle (each example alone through the unpatched model, plain fp32
autograd), once with `hf_gns.patch(model)` and once with `targets="all"`, on the same
model (unpatched in between). The loss is Σ_b mean_t CE(logits_b,t, target_b,t) / B with
fixed random targets, so example b contributes grad_b / B whatever the model's own loss.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch

BATCH, SEQ = 2, 5
VOCAB = 128
HIDDEN = 32
INTERMEDIATE = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
EXPERTS = 4
TOP_K = 2
# Input token ids are drawn from [FIRST_ID, LAST_ID): special ids are moved to the top of the vocabulary.
FIRST_ID, LAST_ID = 4, VOCAB - 8
MAX_PARAMETERS = 4_000_000  # vision towers of multimodal types are the biggest (and unused)
# Per-example squared norms are exact when |value - oracle| <= RTOL·oracle + ATOL_FRACTION·(largest
# oracle value of the model): the floor covers gradients that are zero in exact arithmetic.
RTOL, ATOL_FRACTION = 1e-3, 1e-9
PERTURBATION = 0.02  # std of the noise added to every initialized parameter

# Size-like config fields, by exact name.
_SIZES: dict[str, int] = {
    **dict.fromkeys(
        ("hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "dim", "word_embed_proj_dim"), HIDDEN
    ),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"), LAYERS),
    **dict.fromkeys(("encoder_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads"), HEADS),
    **dict.fromkeys(("encoder_attention_heads", "num_heads"), HEADS),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels", "d_head", "dim_head"), HEAD_DIM),
    **dict.fromkeys(
        ("v_head_dim", "qk_nope_head_dim", "qk_rope_head_dim", "rotary_dim", "rotary_emb_dim"), HEAD_DIM
    ),
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank"), 16),
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k"), TOP_K),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"), 64),
    **dict.fromkeys(("ssm_state_size", "state_size", "d_state", "mamba_d_state"), 8),
    # Mamba heads × head dim = expand (2) × hidden: 8 × 8 = 2 × 32
    **dict.fromkeys(("mamba_num_heads", "mamba_n_heads"), 8),
    **dict.fromkeys(("linear_num_value_heads", "linear_num_key_heads", "linear_num_heads"), HEADS),
    **dict.fromkeys(
        ("mamba_head_dim", "mamba_headdim", "mamba_d_head", "linear_key_head_dim", "linear_value_head_dim"),
        HEAD_DIM,
    ),
    **dict.fromkeys(("linear_head_dim", "index_head_dim"), HEAD_DIM),
    **dict.fromkeys(("index_n_heads", "indexer_n_heads"), 2),
    **dict.fromkeys(("n_groups", "mamba_n_groups"), 1),
    **dict.fromkeys(("chunk_size", "mamba_chunk_size"), 8),
    **dict.fromkeys(("vocab_size", "n_vocab"), VOCAB),
    "type_vocab_size": 2,
}
# Size-like fields by pattern (checked after the exact names): anything intermediate/ffn-sized.
_SIZE_PATTERN = re.compile(r"intermediate|ffn|dim_ff|inner_|n_inner|mlp_(size|dim|hidden)|expert_dim")
_KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


@dataclass
class ZooResult:
    """Outcome of `check_model_type` for one model type."""

    model_type: str
    built: bool = False
    norms_exact: bool | None = None
    all_exact: bool | None = None
    tracked_norms: int = 0
    tracked_all: int = 0
    coverage: float = 0.0  # fraction of trainable parameter elements tracked in all-layer mode
    reason: str = ""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _model_class(model_type: str):
    """The class `AutoModelForCausalLM` builds for `model_type` (its `config_class` may be a text config)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _is_index_list(value, n_layers: int) -> bool:
    """A list of layer indices (`moe_layers`, `full_attn_idxs`): strictly increasing ints below n_layers."""
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        return False
    return all(0 <= a < b < n_layers for a, b in zip(value, value[1:])) and value[-1] < n_layers


def _is_layer_pattern(key: str, value, n_layers: int) -> bool:
    """A per-layer list, or a per-layer string such as `"M-M*-"` (only under a key naming a pattern)."""
    if not isinstance(value, (list, str)) or len(value) != n_layers:
        return False
    return isinstance(value, list) or "pattern" in key


def _kept_layers(values: dict, n_layers: int, max_layers: int = 4) -> list[int]:
    """Indices of the layers to keep: the first layer of each distinct kind (read across every
    per-layer list at once), at most `max_layers`, at least `LAYERS`."""
    patterns = [
        [str(item) for item in value]
        for key, value in values.items()
        if _is_layer_pattern(key, value, n_layers) and not _is_index_list(value, n_layers)
    ]
    kinds: dict[tuple, int] = {}
    for layer in range(n_layers):
        kinds.setdefault(tuple(p[layer] for p in patterns), layer)
    kept = sorted(kinds.values())[:max_layers]
    extra = [layer for layer in range(n_layers) if layer not in kept]
    return sorted(kept + extra[: max(0, min(LAYERS, n_layers) - len(kept))])


def _small_value(key: str, value):
    """The tiny value of a size-like field, or `None` to keep it."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if key in _SIZES:
        return _SIZES[key] if value > _SIZES[key] else None
    if "vocab" in key and value > VOCAB:  # vocab_size_per_layer_input, encoder_hash_byte_group_vocab, ...
        return VOCAB
    if (
        "hidden_size" in key or "channel" in key
    ) and value > HIDDEN:  # hidden_size_global, hidden_size_per_layer_input, ...
        return HIDDEN
    if _SIZE_PATTERN.search(key) and value > INTERMEDIATE:
        return INTERMEDIATE
    return None


def _special_token_id(key: str) -> int:
    """A special token id inside the tiny vocabulary, above the ids the inputs use (deterministic)."""
    return VOCAB - 1 - sum(map(ord, key)) % (VOCAB - LAST_ID)


def shrink_config_dict(values: dict, sub_configs: dict) -> dict:
    """Overrides that make a config (given as `to_dict()`) tiny."""
    overrides: dict = {}
    n_layers = next((values[k] for k in _LAYER_COUNT_KEYS if isinstance(values.get(k), int)), None)
    kept = _kept_layers(values, n_layers) if n_layers else None
    heads = next((values[k] for k in ("num_attention_heads", "n_head") if isinstance(values.get(k), int)), 0)
    for key, value in values.items():
        if isinstance(value, dict) and (key in sub_configs or key.endswith("_config")):
            overrides[key] = {**value, **shrink_config_dict(value, {})}
            continue
        small = _small_value(key, value)
        if key in _LAYER_COUNT_KEYS and kept is not None:
            overrides[key] = len(kept)
        elif key in _KV_HEAD_KEYS and (isinstance(value, int) or value is None):
            # grouped-query attention stays grouped, multi-head attention stays multi-head
            overrides[key] = HEADS if value is None or value >= heads else KV_HEADS
        elif small is not None:
            overrides[key] = small
        elif kept is not None and _is_index_list(value, n_layers) and key not in ("eos_token_id",):
            overrides[key] = [kept.index(v) for v in value if v in kept]
        elif kept is not None and _is_layer_pattern(key, value, n_layers):
            items = [value[layer] for layer in kept]
            items = [item if _small_value(key, item) is None else _small_value(key, item) for item in items]
            overrides[key] = "".join(items) if isinstance(value, str) else items
        elif key == "head_dim" and value is None and heads:
            overrides[key] = HEAD_DIM  # = HIDDEN / HEADS, for configs that leave it to the model
        elif isinstance(value, float) and any(
            word in key for word in ("dropout", "pdrop", "_prob", "jitter")
        ):
            overrides[key] = 0.0
        elif key.endswith("_token_id") or key.endswith("_token_index"):
            if isinstance(value, int) and value >= VOCAB:
                overrides[key] = _special_token_id(key)
    if "qk_nope_head_dim" in overrides and "qk_rope_head_dim" in overrides and "qk_head_dim" in values:
        overrides["qk_head_dim"] = overrides["qk_nope_head_dim"] + overrides["qk_rope_head_dim"]
    if kept is not None and isinstance(
        values.get("per_layer_config"), dict
    ):  # overrides keyed by layer index
        overrides["per_layer_config"] = {
            f"{kept.index(int(k)):02d}": {**v, **shrink_config_dict(v, {})}
            for k, v in values["per_layer_config"].items()
            if int(k) in kept
        }
    for key, value in EXTRAS.get(values.get("model_type"), {}).items():  # also reaches sub-configs
        overrides[key] = {**overrides.get(key, values[key]), **value} if isinstance(value, dict) else value
    return overrides


def tiny_config(model_type: str):
    cls = _model_class(model_type).config_class
    default = cls()
    sub_configs = getattr(default, "sub_configs", {}) or {}
    overrides = shrink_config_dict(default.to_dict(), sub_configs)
    config = cls(**{k: v for k, v in overrides.items() if k != "model_type"})
    config.use_cache = False
    return config


# Per-family settings the generic rules cannot guess.
EXTRAS: dict[str, dict] = {
    "cohere_compass_text": dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    ),
    # to_dict() doubles dory's layer counts (attention + mlp blocks); give the block layout directly
    # DbrxAttention reads attn_config.rope_theta and clamps with clip_qkv: the defaults lack both (5.24)
    "dbrx": dict(attn_config=dict(rope_theta=1e4, clip_qkv=8.0)),
    "deepseek_v2": dict(num_experts_per_tok=TOP_K),
    "dots3_note_text": dict(head_dim=16),  # head_dim = nope + rope
    # its config validation (5.25): NVFP4 rounding of keys and values needs a head_dim multiple of 16,
    # and its indexer at most the query heads of one key head (HEADS / KV_HEADS)
    "kolibri1_1": dict(head_dim=16, index_num_heads=1),
    "dory": dict(
        num_hidden_layers=6,
        n_input_layers=2,
        n_recurrent_layers=2,
        n_output_layers=2,
        layer_types=["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
    ),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=8),  # Mamba heads × head dim = expand × hidden
    "musicgen_decoder": dict(num_codebooks=1),  # input_ids are (B · codebooks, T)
    "musicgen_melody_decoder": dict(num_codebooks=1),
    "xmod": dict(default_language="en_XX"),
    "zamba2": dict(attention_hidden_size=2 * HIDDEN),  # the shared block sees [hidden, embeddings]
    # two hybrid layers: zamba ties the shared transformer block across them
    "zamba": dict(
        num_hidden_layers=4,
        layers_block_type=["linear_attention", "hybrid"] * 2,
        attention_hidden_size=2 * HIDDEN,
    ),
    "reformer": dict(is_decoder=True, axial_pos_embds=False),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "qwen4_exp_text": dict(
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2
    ),
    "dots1": dict(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, n_shared_experts=1),
}


def build_tiny_model(model_type: str, seed: int = 0):
    """The tiny fp32 model of `model_type` in train mode (dropout probabilities are 0), eager attention."""
    config = tiny_config(model_type)
    model_class = _model_class(model_type)
    config._attn_implementation = "eager"
    with torch.device("meta"):  # count first: a size the rules missed would make a huge "tiny" model
        n_params = sum(p.numel() for p in model_class(config).parameters())
    if n_params > MAX_PARAMETERS:
        raise ValueError(f"{n_params / 1e6:.1f}M parameters: a size-like config field was not shrunk")
    torch.manual_seed(seed)
    model = model_class(config)
    # Move every parameter off its initial value: zero-initialized projections (and all-ones norm
    # weights) can leave whole blocks with ~0 gradients, where any per-example value looks exact.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(PERTURBATION * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model.float().train()


def _logits(model, input_ids):
    output = model(input_ids=input_ids, use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output[0]
    return logits.float()


def _loss(model, input_ids, targets):
    """Σ_b mean_t CE(b, t) / B: each example's contribution is its own gradient / B."""
    logits = _logits(model, input_ids)
    vocab = logits.shape[-1]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), targets.reshape(-1) % vocab, reduction="none"
    )
    return per_token.reshape(input_ids.shape[0], -1).mean(1).sum() / BATCH


def _inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(FIRST_ID, LAST_ID, (BATCH, SEQ), generator=generator)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return input_ids, targets


def oracle(model, input_ids, targets) -> dict[str, list[torch.Tensor] | None]:
    """Each example's gradient / B, one example at a time through `model` (plain autograd);
    `None` for a parameter that gets no gradient at all (e.g. a vision tower fed no image)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    used: set[str] = set()
    for b in range(BATCH):
        model.zero_grad(set_to_none=True)
        _loss(model, input_ids[b : b + 1], targets[b : b + 1]).backward()
        for name, param in params.items():
            if param.grad is not None:
                used.add(name)
            grads[name].append(torch.zeros_like(param) if param.grad is None else param.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {name: (values if name in used else None) for name, values in grads.items()}


def _compare(mode: str, model, report, input_ids, targets, per_example) -> list[str]:
    """Run the patched model and compare; returns a list of failures (empty: exact)."""
    import hf_gns

    failures = []
    names = set(dict(model.named_parameters()))
    unknown = [n for n in report.tracked_parameters if n not in names]
    if unknown:
        failures.append(f"{mode}: report names not in named_parameters: {unknown[:3]}")
    hf_gns.zero_stats(model) if report.tracked_parameters else None
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _loss(model, input_ids, targets).backward()
    for w in caught:
        if "hf_gns" in str(w.message):
            failures.append(f"{mode}: warning: {str(w.message)[:120]}")
    twice = sorted({n for n in report.tracked_parameters if report.tracked_parameters.count(n) > 1})
    if twice:  # one parameter reported by two modules: each reports its own part, not the sum
        failures.append(f"{mode}: tracked by two modules: {twice[:3]}")
    listed = {entry.name for entry in getattr(report, "untracked", [])} | set(report.tracked_parameters)
    unlisted = [n for n, grads in per_example.items() if grads is not None and n not in listed]
    if unlisted:
        failures.append(f"{mode}: neither tracked nor listed as untracked in the report: {unlisted[:3]}")
    norms = hf_gns.per_example_sq_norms(model) if report.tracked_parameters else {}
    missing = sorted(set(report.tracked_parameters) - set(norms))
    if missing:
        failures.append(f"{mode}: tracked but not in per_example_sq_norms: {missing[:3]}")
    params = dict(model.named_parameters())
    expected = {
        name: torch.stack([g.double().square().sum() for g in grads])
        for name, grads in per_example.items()
        if grads is not None
    }
    # fp32 noise floor: gradients that are zero in exact arithmetic (attention key biases) ~1e-7 of the rest
    scale = max((values.max().item() for values in expected.values()), default=0.0)
    for name, values in norms.items():
        if per_example.get(name) is None:
            if values.numel():
                failures.append(f"{mode}: {name}: {values.numel()} values for a parameter with no gradient")
            continue
        if values.shape != (BATCH,):
            failures.append(f"{mode}: {name}: {tuple(values.shape)} values instead of ({BATCH},)")
            continue
        error = (values.double() - expected[name]).abs()
        if (error > RTOL * expected[name] + ATOL_FRACTION * scale).any():
            worst = (error / expected[name].clamp_min(1e-30)).max().item()
            failures.append(f"{mode}: {name}: relative error {worst:.2g}")
    for name, grads in per_example.items():
        total = sum(grads) if grads is not None else None
        grad = params[name].grad
        if (total is None) != (grad is None) or (
            total is not None
            and not torch.allclose(grad, total, rtol=1e-3, atol=1e-5 * math.sqrt(scale) + 1e-9)
        ):
            failures.append(f"{mode}: {name}: param.grad differs from the unpatched model's")
    return failures


def _skipped_norms(report) -> list[str]:
    """Norm modules with parameters that the patch left alone (a hole in norm-mode coverage), by class."""
    by_class: dict[str, list[str]] = {}
    for entry in report.uncovered:
        by_class.setdefault(f"{entry.class_name}: {entry.reason}", []).append(entry.name)
    return [f"norms: {len(names)} skipped {what}"[:200] for what, names in by_class.items()]


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in f"{type(error).__name__}: {error}".splitlines() if line.strip()]
    return " ".join(lines)[:200]


def check_model_type(model_type: str) -> ZooResult:
    """Build `model_type` tiny and compare both patch modes against the micro-batch oracle."""
    result = ZooResult(model_type)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # tiny ops: threads only add contention (measured 60x slower on a loaded 2-core box)
    try:
        return _check(result, start)
    finally:
        torch.set_num_threads(threads)


def _check(result: ZooResult, start: float) -> ZooResult:
    import hf_gns

    model_type = result.model_type
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_tiny_model(model_type)
            input_ids, targets = _inputs()
            per_example = oracle(model, input_ids, targets)
    except Exception as error:
        result.reason = f"cannot build/run: {_first_line(error)}"
        result.seconds = time.perf_counter() - start
        return result
    result.built = True
    # parameters that receive a gradient: what coverage is measured against
    trainable = {n: p.numel() for n, p in model.named_parameters() if per_example.get(n) is not None}
    for mode, targets_arg in (("norms", "norms"), ("all", "all")):
        try:
            report = hf_gns.patch(model, targets=targets_arg)
            skipped = _skipped_norms(report) if mode == "norms" else []
            failures = skipped + _compare(mode, model, report, input_ids, targets, per_example)
            tracked = [n for n in report.tracked_parameters if n in trainable]
        except Exception as error:
            failures, tracked = [f"{mode}: {_first_line(error)}"], []
        finally:
            hf_gns.unpatch(model)
        exact = not failures
        if mode == "norms":
            result.norms_exact, result.tracked_norms = exact, len(tracked)
        else:
            result.all_exact, result.tracked_all = exact, len(tracked)
            result.coverage = sum(trainable[n] for n in set(tracked)) / max(1, sum(trainable.values()))
        result.failures += failures
    result.reason = "; ".join(result.failures[:3])
    result.seconds = time.perf_counter() - start
    return result


def _mark(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


_COLUMNS = (
    ("model type", 28),
    ("built", 5),
    ("norms", 5),
    ("all", 5),
    ("#norm", 5),
    ("#all", 5),
    ("cover", 6),
)


def _row(result: ZooResult) -> str:
    cells = (
        result.model_type,
        _mark(result.built),
        _mark(result.norms_exact),
        _mark(result.all_exact),
        str(result.tracked_norms),
        str(result.tracked_all),
        f"{result.coverage:.1%}",
    )
    row = " ".join(cell.ljust(width) for cell, (_, width) in zip(cells, _COLUMNS))
    return f"{row} {result.seconds:5.1f}s  {result.reason}"


def main(argv: list[str]) -> None:
    """Print the zoo table for the given model types (default: all of them) and the counts."""
    print(" ".join(name.ljust(width) for name, width in _COLUMNS) + "   time  reason")
    results = []
    for model_type in argv or causal_lm_types():
        results.append(check_model_type(model_type))
        print(_row(results[-1]), flush=True)
    built = [r for r in results if r.built]
    norms_exact = sum(bool(r.norms_exact) for r in built)
    all_exact = sum(bool(r.all_exact) for r in built)
    seconds = sum(r.seconds for r in results)
    print(
        f"\n{len(results)} model types, {len(built)} built; norms exact {norms_exact}/{len(built)}; "
        f"all exact {all_exact}/{len(built)}; {seconds:.0f} s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
