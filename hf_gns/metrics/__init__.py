"""Evaluation metrics shipped inside the package, loadable offline with `evaluate.load(path)`.

Example, with the HF `Trainer`:
```python
>>> from hf_gns.metrics import load_perplexity_metric, perplexity_compute_metrics, sequence_nll
>>> trainer = Trainer(..., preprocess_logits_for_metrics=sequence_nll,
...                   compute_metrics=perplexity_compute_metrics(load_perplexity_metric()))
>>> trainer.evaluate()["eval_perplexity"]
```
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

PERPLEXITY_METRIC_PATH = str(Path(__file__).with_name("perplexity.py"))
IGNORE_INDEX = -100  # the label value HF causal LMs leave out of the loss


def load_perplexity_metric(**kwargs):
    """`evaluate.load` of the packaged metric `hf_gns/metrics/perplexity.py`, by path: no network.

    Args:
        kwargs: passed to `evaluate.load`. `keep_in_memory` defaults to `True`: the Trainer
            gathers predictions across processes itself, and every process computing in
            memory keeps them from racing for the same cache file.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(PERPLEXITY_METRIC_PATH, **kwargs)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence summed next-token NLL and token count: a `preprocess_logits_for_metrics`.

    Token t predicts label t + 1 (HF causal LMs shift the labels inside the model);
    labels equal to -100 are left out, as in the model's loss.

    Args:
        logits (`torch.Tensor` of shape `(B, T, V)`): the model's logits.
        labels (`torch.Tensor` of shape `(B, T)`): the unshifted labels.

    Returns:
        `torch.Tensor` of shape `(B, 2)`, fp32: column 0 the summed NLL in nats, column 1 the
        number of predicted tokens. Small, so the evaluation loop never keeps (B, T, V) logits.
    """
    if isinstance(logits, tuple):  # models that return extra outputs next to the logits
        logits = logits[0]
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)  # (B, T-1), 0 where ignored
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)  # (B,)
    return torch.stack([nll.sum(dim=1), counts.float()], dim=1)  # (B, 2)


def perplexity_compute_metrics(metric) -> Callable:
    """A `compute_metrics` for the `Trainer` that turns `sequence_nll`'s rows into `perplexity`, `mean_nll`.

    Args:
        metric (`evaluate.EvaluationModule`): from `load_perplexity_metric()`.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        rows = eval_prediction.predictions  # (N, 2) numpy, gathered over processes
        result = metric.compute(
            nll_sums=rows[:, 0].tolist(), token_counts=rows[:, 1].round().astype(int).tolist()
        )
        return {"perplexity": result["perplexity"], "mean_nll": result["mean_nll"]}

    return compute_metrics
