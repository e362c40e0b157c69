"""Units: Σ_i c_i == the synchronized param.grad, and to_synced_units turns collected norms into |c_i|².

W data-parallel processes are simulated in one process (one model, the ranks run one after
the other; DDP's synchronization averages their gradients). The loss of each micro-batch is
built exactly as `transformers.Trainer.training_step` / `compute_loss` build it:

- token-normalized (`num_items_in_batch`, the model accepts loss kwargs): sum of token losses /
  num_items, num_items counted over the process's accumulated micro-batches, or over all
  processes with `average_tokens_across_devices`, which also multiplies the loss by W;
- mean-reduced (no `num_items_in_batch`): micro-batch mean / accumulation steps;
- an fp16 loss scale multiplies the loss (GradScaler.scale).

The oracle c_i^local is example i's own share of that loss, differentiated alone.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_gns
from hf_gns.gns import to_synced_units

EXAMPLES_PER_MICRO_BATCH, SEQ, VOCAB = 3, 8, 31


def _model():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    hf_gns.patch(model)
    return model


def _data(world, accumulation):
    """data[rank][micro] = (input_ids, labels), labels with a varying number of ignored tokens."""
    gen = torch.Generator().manual_seed(1)
    data = []
    for _ in range(world):
        micro_batches = []
        for _ in range(accumulation):
            ids = torch.randint(0, VOCAB, (EXAMPLES_PER_MICRO_BATCH, SEQ), generator=gen)
            labels = ids.clone()
            for row in range(EXAMPLES_PER_MICRO_BATCH):
                labels[row, : int(torch.randint(0, SEQ - 2, (), generator=gen))] = -100
            micro_batches.append((ids, labels))
        data.append(micro_batches)
    return data


def _label_tokens(labels):
    return int(labels[..., 1:].ne(-100).sum())  # causal LM losses shift labels


def _loss(model, ids, labels, *, normalizer, multiplier):
    """Σ token losses / normalizer × multiplier (GPT-2's loss with num_items_in_batch)."""
    return model(input_ids=ids, labels=labels, num_items_in_batch=normalizer).loss * multiplier


CASES = [
    # world, accumulation, token_normalized, average_tokens_across_devices, loss_scale
    (1, 1, True, False, None),
    (1, 2, True, False, None),
    (1, 2, False, False, None),
    (2, 1, True, False, None),
    (2, 2, True, False, None),
    (2, 2, True, True, None),
    (2, 2, False, False, None),
    (2, 2, True, True, 1024.0),
    (2, 1, False, False, 512.0),
]


@pytest.mark.parametrize(("world", "accumulation", "token_normalized", "average_tokens", "loss_scale"), CASES)
def test_contributions_sum_to_the_synchronized_gradient(
    world, accumulation, token_normalized, average_tokens, loss_scale
):
    model = _model()
    params = dict(model.named_parameters())
    data = _data(world, accumulation)
    scale = 1.0 if loss_scale is None else loss_scale
    global_tokens = sum(_label_tokens(labels) for micro in data for _, labels in micro)

    local_grads, collected, contributions = [], [], []  # contributions: c_i^local per example
    for micro_batches in data:  # one simulated process after the other
        model.zero_grad()
        hf_gns.zero_stats(model)
        local_tokens = sum(_label_tokens(labels) for _, labels in micro_batches)
        for ids, labels in micro_batches:
            if token_normalized:
                normalizer = global_tokens if average_tokens else local_tokens
                multiplier = (world if average_tokens else 1) * scale
            else:
                normalizer, multiplier = _label_tokens(labels), scale / accumulation
            _loss(model, ids, labels, normalizer=normalizer, multiplier=multiplier).backward()
            for row in range(ids.shape[0]):
                own = _loss(
                    model,
                    ids[row : row + 1],
                    labels[row : row + 1],
                    normalizer=normalizer,
                    multiplier=multiplier,
                )
                names = list(hf_gns.per_example_sq_norms(model))
                grads = torch.autograd.grad(own, [params[n] for n in names])
                contributions.append(dict(zip(names, grads)))
        local_grads.append({n: params[n].grad.clone() for n in names})
        collected.append({n: v.clone() for n, v in hf_gns.per_example_sq_norms(model).items()})

    for name in names:
        synced = sum(g[name] for g in local_grads) / world  # DDP: average over processes
        # the rule of units.py: c_i = c_i^local / W, and the loss scale divides out
        total = sum(c[name] for c in contributions) / world
        torch.testing.assert_close(total / scale, synced / scale, rtol=1e-5, atol=1e-7)
        # what the patched backward collected is |c_i^local|², in the same order
        oracle_sq = torch.stack([c[name].square().sum() for c in contributions])
        torch.testing.assert_close(torch.cat([c[name] for c in collected]), oracle_sq, rtol=1e-4, atol=1e-9)

        stats = to_synced_units(
            sum(c[name].sum() for c in collected),  # what the all-reduce sums
            synced.square().sum(),
            world_size=world,
            loss_scale=None if loss_scale is None else torch.tensor(loss_scale),
        )
        expected_example_sum = sum((c[name] / (world * scale)).square().sum() for c in contributions)
        torch.testing.assert_close(
            stats.example_sq_norm_sum.float(), expected_example_sum, rtol=1e-4, atol=1e-12
        )
        expected_batch = sum(c[name] / (world * scale) for c in contributions).square().sum()
        torch.testing.assert_close(stats.batch_sq_norm.float(), expected_batch, rtol=1e-4, atol=1e-12)


def test_local_gradients_for_the_classic_estimate():
    local = torch.tensor([4.0, 16.0])  # |g_r|² of two processes, loss scale 2 (×4 in squares)
    stats = to_synced_units(
        torch.tensor(8.0), torch.tensor(4.0), world_size=2, loss_scale=2.0, local_grad_sq_norm_sum=local.sum()
    )
    assert stats.example_sq_norm_sum.item() == pytest.approx(8.0 / 4 / 4)
    assert stats.batch_sq_norm.item() == pytest.approx(1.0)
    assert stats.local_grad_sq_norm_mean.item() == pytest.approx((1.0 + 4.0) / 2)


def test_bad_world_size_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        to_synced_units(torch.tensor(1.0), torch.tensor(1.0), world_size=0)
