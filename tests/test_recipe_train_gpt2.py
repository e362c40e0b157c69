"""recipes/train_gpt2.py: a short run in-process; its norm-stats callback against a direct computation."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the recipe and hf_gns.data need the datasets package")
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainerState

import hf_gns
from hf_gns.data import load_tokenizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "train_gpt2.py"
NORM_STATS_KEYS = ("norm_stats/examples", "norm_stats/mean_sq_norm", "norm_stats/grad_sq_norm")


def _load_recipe():
    spec = importlib.util.spec_from_file_location("train_gpt2", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the recipe's string annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _load_recipe()


def test_short_run_logs_norm_stats_and_saves_a_model_that_reloads(recipe, tmp_path):
    output_dir = tmp_path / "run"
    result = recipe.main(
        [
            "--output_dir", str(output_dir),
            "--max_steps", "3",
            "--corpus_max_bytes", "200000",
            "--logging_steps", "1",
            "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip

    train_logs = [entry for entry in result["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3]
    for entry in train_logs:
        assert math.isfinite(entry["loss"])
        assert entry["norm_stats/examples"] == 4 * 2  # per-device batch × accumulation steps
        for key in ("norm_stats/mean_sq_norm", "norm_stats/grad_sq_norm"):
            assert math.isfinite(entry[key]) and entry[key] > 0, (key, entry)
    assert math.isfinite(result["eval_loss"]) and result["perplexity"] == pytest.approx(
        math.exp(result["eval_loss"])
    )
    assert result["max_logit_diff"] < 1e-3

    saved_history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert all(key in saved_history[0] for key in NORM_STATS_KEYS)

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir)
    assert not any("_hf_gns" in name for module in reloaded.modules() for name in vars(module))
    tokenizer = load_tokenizer(output_dir)
    input_ids = torch.tensor([tokenizer("def main():\n    pass\n")["input_ids"]])  # (1, T)
    assert torch.isfinite(reloaded(input_ids=input_ids).logits).all()


def test_norm_stats_callback_matches_a_direct_computation(recipe):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    report = hf_gns.patch(model)
    callback = recipe.NormStatsCallback(model, report.tracked_parameters)
    state = TrainerState()

    expected_mean_sq, expected_grad_sq = [], []
    for _ in range(2):  # two optimizer steps of two micro-batches (3 + 2 examples) each
        model.zero_grad()
        for batch_size in (3, 2):
            input_ids = torch.randint(0, 64, (batch_size, 16))  # (B, T)
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        per_param = hf_gns.per_example_sq_norms(model)
        expected_mean_sq.append(sum(values for values in per_param.values()).mean().item())
        params = dict(model.named_parameters())
        expected_grad_sq.append(sum(params[name].grad.pow(2).sum().item() for name in per_param))
        callback.on_pre_optimizer_step(None, state, None)
        assert all(values.numel() == 0 for values in hf_gns.per_example_sq_norms(model).values())

    state.log_history.append({"loss": 1.0, "step": 2})
    logs = {"loss": 1.0}
    callback.on_log(None, state, None, logs=logs)
    assert logs["norm_stats/examples"] == 5
    assert logs["norm_stats/mean_sq_norm"] == pytest.approx(sum(expected_mean_sq) / 2, rel=1e-5)
    assert logs["norm_stats/grad_sq_norm"] == pytest.approx(sum(expected_grad_sq) / 2, rel=1e-5)
    assert state.log_history[-1]["norm_stats/mean_sq_norm"] == logs["norm_stats/mean_sq_norm"]

    eval_logs = {"eval_loss": 1.0}  # nothing pending, and not a training log: left alone
    callback.on_log(None, state, None, logs=eval_logs)
    assert eval_logs == {"eval_loss": 1.0}
