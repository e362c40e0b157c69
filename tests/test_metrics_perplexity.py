"""hf_gns.metrics: the packaged perplexity metric (loaded by path, offline) against hand-computed values."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("evaluate", reason="the perplexity metric is an `evaluate` module")
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

from hf_gns.metrics import (
    PERPLEXITY_METRIC_PATH,
    load_perplexity_metric,
    perplexity_compute_metrics,
    sequence_nll,
)


@pytest.fixture(scope="module")
def metric():
    return load_perplexity_metric()


def _hand_nll(row: list[float], target: int) -> float:
    """-log softmax(row)[target], one position, in plain Python floats."""
    log_norm = math.log(sum(math.exp(v) for v in row))
    return log_norm - row[target]


def test_metric_is_loaded_from_the_package_by_path(metric):
    assert PERPLEXITY_METRIC_PATH.endswith("hf_gns/metrics/perplexity.py")
    assert metric.name == "perplexity"
    assert set(metric.features) == {"nll_sums", "token_counts"}


def test_perplexity_of_hand_computed_nll_sums(metric):
    # Two sequences: 3 tokens with summed NLL 1.5, 1 token with NLL 2.5 -> exp(4 / 4) = e, not the
    # mean of per-sequence perplexities (exp(0.5) + exp(2.5)) / 2.
    result = metric.compute(nll_sums=[1.5, 2.5], token_counts=[3, 1])
    assert result["perplexity"] == pytest.approx(math.e, rel=1e-12)
    assert result["mean_nll"] == pytest.approx(1.0, rel=1e-12)
    assert result["num_tokens"] == 4
    # add_batch accumulates exactly like one compute over the concatenation
    metric.add_batch(nll_sums=[1.5], token_counts=[3])
    metric.add_batch(nll_sums=[2.5], token_counts=[1])
    assert metric.compute()["perplexity"] == pytest.approx(math.e, rel=1e-12)


@pytest.mark.parametrize(
    "nll_sums, token_counts, message",
    [([1.0], [0], "at least one token"), ([1.0], [-1], ">= 0"), ([float("nan")], [2], "finite")],
)
def test_perplexity_refuses_meaningless_input(metric, nll_sums, token_counts, message):
    with pytest.raises(ValueError, match=message):
        metric.compute(nll_sums=nll_sums, token_counts=token_counts)


def test_sequence_nll_against_a_hand_computed_softmax():
    logits = torch.tensor(
        [
            [[0.0, 1.0, 2.0], [1.0, 0.0, -1.0], [0.5, 0.5, 3.0], [2.0, 2.0, 2.0]],
            [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -2.0, 1.0], [0.1, 0.2, 0.3]],
        ]
    )  # (B=2, T=4, V=3)
    labels = torch.tensor([[0, 2, 1, 0], [1, -100, 2, 1]])  # (2, 4); -100 is left out
    rows = sequence_nll(logits, labels)  # (2, 2)

    expected = []
    for b in range(2):
        nll, count = 0.0, 0
        for t in range(3):  # position t predicts label t + 1
            target = int(labels[b, t + 1])
            if target != -100:
                nll += _hand_nll(logits[b, t].tolist(), target)
                count += 1
        expected.append((nll, count))
    assert rows.shape == (2, 2) and rows.dtype == torch.float32
    for (nll, count), row in zip(expected, rows.tolist()):
        assert row[0] == pytest.approx(nll, rel=1e-6)
        assert row[1] == count
    assert [count for _, count in expected] == [3, 2]


def test_trainer_evaluate_gives_the_perplexity_of_every_token(tmp_path):
    """Through Trainer.evaluate: exp(mean NLL over all predicted tokens), odd last batch included."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(0, 50, (7, 16))  # 7 sequences: batches of 3, 3, 1
    ids[2, :5] = -100  # labels masked at the start of one sequence
    rows = [{"input_ids": row.clamp(min=0), "labels": row} for row in ids]
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            str(tmp_path), per_device_eval_batch_size=3, report_to="none", dataloader_pin_memory=False
        ),
        eval_dataset=rows,
        data_collator=default_data_collator,
        preprocess_logits_for_metrics=sequence_nll,
        compute_metrics=perplexity_compute_metrics(load_perplexity_metric()),
    )
    metrics = trainer.evaluate()

    with torch.no_grad():
        logits = model(input_ids=ids.clamp(min=0)).logits.double()  # (7, 16, V)
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = ids[:, 1:]
    mask = targets != -100
    token_nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert metrics["eval_mean_nll"] == pytest.approx(token_nll.mean().item(), rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(token_nll.mean().item()), rel=1e-5)
