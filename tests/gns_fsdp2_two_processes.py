"""FSDP2 (`fully_shard`, gloo on CPU or NCCL on GPUs): sharded |G_B|² shares and per-example norms.

Run by `tests/test_trainer_distributed.py` under `torch.distributed.run --nproc_per_node 2`.
Each process runs its half of a batch through a tiny GPT-2 whose blocks and root are
`fully_shard`ed; gradients are then DTensors sharded on dim 0. The all-reduced statistics
the trainer computes (Σ |c_i^local|² / W², Σ_ranks of each rank's shard share of |G_B|²)
must equal one unsharded process on the whole batch. Asserts, then exits 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from gns_fixtures import FixedTokens, leave_after_checks, tiny_gpt2
from torch.distributed.fsdp import fully_shard

import hf_gns
from hf_gns import distributed
from hf_gns.gns import clean_name, to_synced_units


def patched_tiny_gpt2():
    model = tiny_gpt2()
    hf_gns.patch(model)
    return model


def main():
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run under torch.distributed.run --nproc_per_node 2, got world size {world}"
    hf_gns.set_backend("torch")
    ids = FixedTokens().rows[: 2 * world]  # (4, T); every row has the same number of tokens
    mine = ids[2 * rank : 2 * rank + 2]

    reference = patched_tiny_gpt2()
    reference(input_ids=ids, labels=ids).loss.backward()
    expected_examples = {n: v.sum().item() for n, v in hf_gns.per_example_sq_norms(reference).items()}
    params = dict(reference.named_parameters())
    expected_batch = {n: params[n].grad.square().sum().item() for n in expected_examples}
    names = list(expected_examples)

    model = patched_tiny_gpt2()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    model(input_ids=mine, labels=mine).loss.backward()
    norms = {clean_name(k): v for k, v in hf_gns.per_example_sq_norms(model).items()}
    sharded = {clean_name(k): p for k, p in model.named_parameters()}
    grads = [sharded[n].grad for n in names]
    assert all(type(g).__name__ == "DTensor" for g in grads), [type(g) for g in grads]
    shares = distributed.grad_sq_norm_shares(grads, sharded=True)
    vector = torch.cat([torch.stack([norms[n].sum() for n in names]), shares])
    distributed.all_reduce_sum(vector)
    stats = to_synced_units(vector[: len(names)], vector[len(names) :], world_size=world)
    for j, name in enumerate(names):
        got_examples, got_batch = stats.example_sq_norm_sum[j].item(), stats.batch_sq_norm[j].item()
        assert abs(got_examples - expected_examples[name]) <= 1e-5 * expected_examples[name], name
        assert abs(got_batch - expected_batch[name]) <= 1e-5 * expected_batch[name], name


if __name__ == "__main__":
    main()
    leave_after_checks()
