"""Perplexity of a causal LM from its summed per-sequence negative log-likelihoods, as an `evaluate` metric.

A local metric module: `evaluate.load(path_to_this_file)` reads it from disk, so it works
offline (`evaluate.load("perplexity")` fetches a script from the hub, and that one runs a
model itself). This one takes what the evaluation loop already has: for every sequence,
the summed negative log-likelihood of its predicted tokens (nats) and how many tokens
that was.

    perplexity = exp(Σ_s nll_s / Σ_s tokens_s)

which weighs every token equally: the same as exp(mean token loss) over the whole
evaluation set, whatever the sequences' lengths and however they were batched.

Example:
```python
>>> import evaluate
>>> from hf_gns.metrics import PERPLEXITY_METRIC_PATH
>>> metric = evaluate.load(PERPLEXITY_METRIC_PATH)
>>> metric.compute(nll_sums=[2.0, 4.0], token_counts=[2, 2])["perplexity"]  # exp(6 / 4)
4.4816890703380645
```

This file is copied into `evaluate`'s module cache and imported from there, so it
imports only `evaluate`, `datasets` and `numpy`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = (
    """Corpus perplexity exp(Σ nll / Σ tokens) from summed per-sequence negative log-likelihoods (nats)."""
)

_KWARGS_DESCRIPTION = """
Args:
    nll_sums (`list[float]`): for each sequence, the summed negative log-likelihood (natural log)
        of the tokens it predicts.
    token_counts (`list[int]`): for each sequence, how many tokens `nll_sums` covers (>= 0).
Returns:
    perplexity (`float`): exp(Σ nll_sums / Σ token_counts), every token weighted equally.
    mean_nll (`float`): Σ nll_sums / Σ token_counts, nats per token (the log of `perplexity`).
    num_tokens (`int`): Σ token_counts.
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sums, token_counts):
        nll = np.asarray(nll_sums, dtype=np.float64)
        counts = np.asarray(token_counts, dtype=np.int64)
        if (counts < 0).any():
            raise ValueError("token_counts must be >= 0")
        if not np.isfinite(nll).all():
            raise ValueError("nll_sums must be finite; a NaN/inf loss makes perplexity meaningless")
        num_tokens = int(counts.sum())
        if num_tokens == 0:
            raise ValueError("perplexity needs at least one token; token_counts sum to 0")
        mean_nll = float(nll.sum() / num_tokens)
        return {"perplexity": float(np.exp(mean_nll)), "mean_nll": mean_nll, "num_tokens": num_tokens}
